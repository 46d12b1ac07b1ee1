//! `kflash install` / `kflash uninstall`: put the binary, the udev rules, the systemd unit
//! and (if chosen) a scoped sudoers rule in place, reload udev and systemd, enable and start
//! the service; record exactly what changed in a manifest; undo exactly that.
//!
//! The library decides nothing interactively: the caller resolves the [`Setup`], chooses
//! whether to install the sudoers rule, and gets back what was changed.

mod error;
pub mod files;
pub mod manifest;
pub mod system;
pub mod templates;

use std::future::Future;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

pub use error::InstallError;
use manifest::{FileRecord, Manifest, Previous};
use system::{Ran, SystemCommands};

pub const UNIT_NAME: &str = "kflash.service";
pub const UNIT_PATH: &str = "/etc/systemd/system/kflash.service";
pub const RULES_PATH: &str = "/etc/udev/rules.d/70-kflash.rules";
pub const SUDOERS_PATH: &str = "/etc/sudoers.d/kflash";
pub const STATE_DIR: &str = "/var/lib/kflash";
pub const MANIFEST_PATH: &str = "/var/lib/kflash/install-manifest.json";
pub const BACKUP_DIR: &str = "/var/lib/kflash/backup";
pub const DEFAULT_BINDIR: &str = "/usr/local/bin";

/// Where `/` is: the running system, or a staged tree (`--root DIR`, for packaging and tests),
/// where no system command runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Root(PathBuf);

impl Root {
    pub fn new(dir: impl Into<PathBuf>) -> Root {
        Root(dir.into())
    }

    pub fn is_system(&self) -> bool {
        self.0 == Path::new("/")
    }

    /// The on-disk path of a system path.
    pub fn disk(&self, system_path: &Path) -> PathBuf {
        self.0.join(system_path.strip_prefix("/").unwrap_or(system_path))
    }
}

/// Refuse to change the running system without root (a dry run or a staged root needs none).
pub fn check_privileges(root: &Root, dry_run: bool, command: &'static str) -> Result<(), InstallError> {
    if root.is_system() && !dry_run && !nix::unistd::geteuid().is_root() {
        return Err(InstallError::NotRoot { command });
    }
    Ok(())
}

/// What the caller asks for.
#[derive(Debug, Clone)]
pub struct InstallRequest {
    pub root: Root,
    /// System path of the directory the binary goes to.
    pub bindir: PathBuf,
    /// The printer user; `None` finds it (see [`resolve`]).
    pub user: Option<String>,
    /// kflash config dir to read `klipper_service` from; `None`: the printer user's.
    pub config_dir: Option<PathBuf>,
    /// The binary to install (normally the running executable).
    pub exe: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct PrinterUser {
    pub name: String,
    pub uid: u32,
    pub group: String,
    pub home: PathBuf,
    /// How it was found, e.g. "User= of klipper.service".
    pub found_by: String,
}

/// Everything install needs to know, resolved.
#[derive(Debug, Clone)]
pub struct Setup {
    pub root: Root,
    pub bindir: PathBuf,
    pub user: PrinterUser,
    pub klipper_service: String,
    pub systemctl: PathBuf,
    pub exe: PathBuf,
}

impl Setup {
    /// The sudoers rule's default: yes for a printer user other than root. The service runs
    /// `sudo -n systemctl stop|start klipper` around every flash, and without the rule that
    /// fails with "a password is required"; the rule allows nothing else. Root needs no rule.
    pub fn sudoers_default(&self) -> bool {
        self.user.uid != 0
    }
}

/// Find the printer user: `--user`; else `User=` of the Klipper service's unit file; else
/// the owner of `printer_data` in the invoking user's home (`$SUDO_USER`, then `$HOME`).
/// Then read `klipper_service` from that user's kflash settings.
pub fn resolve(req: &InstallRequest) -> Result<Setup, InstallError> {
    let user = match &req.user {
        Some(name) => lookup_user(name, "--user")?,
        None => find_printer_user(&req.root, "klipper")?,
    };
    let config_dir = req.config_dir.clone().unwrap_or_else(|| user.home.join(".config/kflash"));
    let klipper_service = match crate::registry::Registry::open(&config_dir) {
        Ok(reg) => reg.settings.klipper_service,
        Err(e) => {
            return Err(InstallError::io(
                "read the kflash settings in",
                &config_dir,
                std::io::Error::other(format!("{e} (fix it, or pass --config-dir)")),
            ))
        }
    };
    templates::check_name("Klipper service", &klipper_service)?;
    Ok(Setup {
        root: req.root.clone(),
        bindir: req.bindir.clone(),
        user,
        klipper_service,
        systemctl: system::find_program("systemctl", "/usr/bin/systemctl"),
        exe: req.exe.clone(),
    })
}

fn lookup_user(name: &str, found_by: &str) -> Result<PrinterUser, InstallError> {
    templates::check_name("user", name)?;
    let u = nix::unistd::User::from_name(name)
        .map_err(|e| InstallError::io("look up the user", name, e.into()))?
        .ok_or_else(|| InstallError::UnknownUser(name.to_string()))?;
    let group = nix::unistd::Group::from_gid(u.gid)
        .ok()
        .flatten()
        .map(|g| g.name)
        .unwrap_or_else(|| u.gid.as_raw().to_string());
    Ok(PrinterUser { name: u.name, uid: u.uid.as_raw(), group, home: u.dir, found_by: found_by.into() })
}

fn find_printer_user(root: &Root, service: &str) -> Result<PrinterUser, InstallError> {
    let mut tried = Vec::new();
    for dir in ["/etc/systemd/system", "/lib/systemd/system", "/usr/lib/systemd/system"] {
        let unit = root.disk(&Path::new(dir).join(format!("{service}.service")));
        if let Ok(text) = std::fs::read_to_string(&unit) {
            if let Some(name) = text.lines().find_map(|l| l.trim().strip_prefix("User=")).map(str::trim) {
                return lookup_user(name, &format!("User= of {}", unit.display()));
            }
            tried.push(format!("{} has no User=", unit.display()));
        }
    }
    if tried.is_empty() {
        tried.push(format!("no {service}.service unit file"));
    }
    let homes = [
        std::env::var("SUDO_USER").ok().and_then(|u| nix::unistd::User::from_name(&u).ok().flatten()).map(|u| u.dir),
        std::env::var_os("HOME").map(PathBuf::from),
    ];
    for home in homes.into_iter().flatten() {
        let data = home.join("printer_data");
        if let Ok(meta) = std::fs::metadata(&data) {
            let owner = nix::unistd::User::from_uid(meta.uid().into()).ok().flatten();
            if let Some(owner) = owner {
                return lookup_user(&owner.name, &format!("owner of {}", data.display()));
            }
        }
        tried.push(format!("no {}", data.display()));
    }
    Err(InstallError::NoPrinterUser { tried: tried.join(", ") })
}

/// One file install writes.
#[derive(Debug, Clone)]
pub struct PlannedFile {
    /// System path.
    pub path: PathBuf,
    pub contents: Vec<u8>,
    pub mode: u32,
    pub action: FileAction,
}

#[derive(Debug, Clone, PartialEq)]
pub enum FileAction {
    Create,
    /// An existing file, backed up first (not when an earlier install already did: that
    /// backup holds the original).
    Replace {
        backed_up_before: bool,
    },
    /// Written by an earlier install and unchanged since.
    Unchanged,
}

/// What install will do, computed without changing anything (`--dry-run` prints it).
#[derive(Debug, Clone)]
pub struct Plan {
    pub setup: Setup,
    pub files: Vec<PlannedFile>,
    pub sudoers: bool,
    /// The manifest of an earlier install, whose records are kept.
    pub earlier: Option<Manifest>,
}

/// Compute the plan. A manifest that cannot be read stops it here.
pub fn plan(setup: &Setup, sudoers: bool) -> Result<Plan, InstallError> {
    let root = &setup.root;
    let earlier = Manifest::load(&root.disk(Path::new(MANIFEST_PATH)))?;
    let exe = std::fs::read(&setup.exe).map_err(|e| InstallError::io("read the kflash binary", &setup.exe, e))?;
    let mut wanted = vec![
        (setup.bindir.join("kflash"), exe, 0o755),
        (PathBuf::from(RULES_PATH), templates::UDEV_RULES.as_bytes().to_vec(), 0o644),
        (
            PathBuf::from(UNIT_PATH),
            templates::unit(&setup.user.name, &setup.user.group, &setup.bindir)?.into_bytes(),
            0o644,
        ),
    ];
    if sudoers {
        let rule = templates::sudoers(&setup.user.name, &setup.systemctl, &setup.klipper_service)?;
        wanted.push((PathBuf::from(SUDOERS_PATH), rule.into_bytes(), 0o440));
    }
    let mut planned = Vec::new();
    for (path, contents, mode) in wanted {
        let recorded = earlier.as_ref().and_then(|m| m.record(&path)).is_some();
        let action = match files::existing(&root.disk(&path))? {
            None => FileAction::Create,
            Some(e) if recorded && e.bytes == contents && e.mode == mode => FileAction::Unchanged,
            Some(_) if recorded => FileAction::Replace { backed_up_before: true },
            Some(_) => FileAction::Replace { backed_up_before: false },
        };
        planned.push(PlannedFile { path, contents, mode, action });
    }
    Ok(Plan { setup: setup.clone(), files: planned, sudoers, earlier })
}

impl Plan {
    /// One line per change, for `--dry-run`.
    pub fn describe(&self) -> Vec<String> {
        let mut lines = vec![format!(
            "service user: {} (group {}; found by {})",
            self.setup.user.name, self.setup.user.group, self.setup.user.found_by
        )];
        for f in &self.files {
            lines.push(match f.action {
                FileAction::Create => format!("create {} (mode {:04o})", f.path.display(), f.mode),
                FileAction::Replace { backed_up_before: false } => format!(
                    "replace {} (mode {:04o}); its current content is kept in {}",
                    f.path.display(),
                    f.mode,
                    backup_path(&f.path).display()
                ),
                FileAction::Replace { backed_up_before: true } => {
                    format!("update {} (written by an earlier install; the original stays backed up)", f.path.display())
                }
                FileAction::Unchanged => format!("keep {} (unchanged)", f.path.display()),
            });
        }
        if !self.sudoers {
            lines.push(format!("no sudoers rule ({SUDOERS_PATH} is not written)"));
        }
        lines.push(format!("write the manifest {MANIFEST_PATH}"));
        for argv in
            [system::udev_reload(), system::udev_trigger(), system::daemon_reload(), system::enable_now(UNIT_NAME)]
        {
            let note = if self.setup.root.is_system() { "" } else { " (not run: staged root)" };
            lines.push(format!("run `{}`{note}", argv.join(" ")));
        }
        lines
    }

    pub fn sudoers_rule(&self) -> Option<String> {
        self.files
            .iter()
            .find(|f| f.path == Path::new(SUDOERS_PATH))
            .map(|f| String::from_utf8_lossy(&f.contents).into())
    }
}

/// Where the original of `path` is kept.
pub fn backup_path(path: &Path) -> PathBuf {
    Path::new(BACKUP_DIR).join(path.strip_prefix("/").unwrap_or(path))
}

/// What install or uninstall did, one line per change.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub changes: Vec<String>,
    pub notes: Vec<String>,
}

/// Something this run did, and how to undo it if a later step fails.
enum Undo {
    /// A file this run created (or a backup it wrote).
    Remove(PathBuf),
    /// A file this run replaced: its previous content.
    Restore { disk: PathBuf, bytes: Vec<u8>, mode: u32, uid: u32, gid: u32 },
    /// A directory this run created.
    RemoveDir(PathBuf),
    /// A command to run (disable a unit this run enabled).
    Run(Vec<String>),
}

struct Journal {
    undo: Vec<(String, Undo)>,
    /// Reload commands run: they are run again after a rollback, so udev and systemd forget
    /// the files again.
    reloaded: bool,
}

/// Install what the plan says. On failure, or when `cancel` fires, everything this run did
/// is undone and the error says so.
pub async fn install<S: SystemCommands>(
    plan: &Plan,
    sys: &S,
    cancel: impl Future<Output = &'static str>,
) -> Result<Report, InstallError> {
    check_privileges(&plan.setup.root, false, "install")?;
    let mut cancel = std::pin::pin!(cancel);
    let mut journal = Journal { undo: Vec::new(), reloaded: false };
    let mut report = Report::default();
    match apply(plan, sys, &mut cancel, &mut journal, &mut report).await {
        Ok(()) => Ok(report),
        Err(cause) => {
            let (undone, not_undone) = rollback(journal, sys).await;
            Err(InstallError::RolledBack { cause: Box::new(cause), undone, not_undone })
        }
    }
}

async fn run_step<S: SystemCommands>(
    sys: &S,
    argv: &[String],
    cancel: &mut std::pin::Pin<&mut impl Future<Output = &'static str>>,
) -> Result<Ran, InstallError> {
    tokio::select! {
        biased;
        sig = cancel.as_mut() => Err(InstallError::Interrupted(sig)),
        r = sys.run(argv) => r,
    }
}

fn describe_ran(argv: &[String], ran: &Ran) -> String {
    match ran {
        Ran::Done => format!("ran `{}`", argv.join(" ")),
        Ran::Skipped(why) => format!("did not run `{}` ({why})", argv.join(" ")),
    }
}

async fn apply<S: SystemCommands>(
    plan: &Plan,
    sys: &S,
    cancel: &mut std::pin::Pin<&mut impl Future<Output = &'static str>>,
    journal: &mut Journal,
    report: &mut Report,
) -> Result<(), InstallError> {
    let root = &plan.setup.root;
    let mut manifest = plan.earlier.clone().unwrap_or_else(|| Manifest::new(&plan.setup.user.name));
    manifest.user = plan.setup.user.name.clone();
    manifest.kflash_version = env!("CARGO_PKG_VERSION").to_string();
    if let Some(earlier) = &plan.earlier {
        for f in &earlier.files {
            if !plan.files.iter().any(|p| p.path == f.path) {
                report.notes.push(format!(
                    "{} from an earlier install is kept (`kflash uninstall` undoes it)",
                    f.path.display()
                ));
            }
        }
    }
    // The manifest's directory first: if a later step fails, it is removed with the rest.
    ensure_dir(root, Path::new(STATE_DIR), &mut manifest, journal)?;
    for f in &plan.files {
        let disk = root.disk(&f.path);
        if f.action == FileAction::Unchanged {
            report.changes.push(format!("kept {} (unchanged)", f.path.display()));
            continue;
        }
        ensure_dir(root, f.path.parent().unwrap_or(Path::new("/")), &mut manifest, journal)?;
        let before = files::existing(&disk)?;
        let sha256 = files::sha256(&f.contents);
        let previous = match (&before, manifest.record(&f.path)) {
            (_, Some(rec)) => rec.previous.clone(),
            (None, None) => Previous::Absent,
            (Some(old), None) => {
                let backup = backup_path(&f.path);
                ensure_dir(root, backup.parent().unwrap_or(Path::new("/")), &mut manifest, journal)?;
                let backup_disk = root.disk(&backup);
                files::put(&backup_disk, &old.bytes, old.mode)?;
                journal.undo.push((format!("removed the backup {}", backup.display()), Undo::Remove(backup_disk)));
                Previous::Replaced {
                    backup,
                    mode: old.mode,
                    uid: old.uid,
                    gid: old.gid,
                    sha256: files::sha256(&old.bytes),
                }
            }
        };
        let staged = files::Staged::write(&disk, &f.contents, f.mode)?;
        if f.path == Path::new(SUDOERS_PATH) {
            system::visudo_check(staged.temp_path()).await?;
        }
        staged.commit()?;
        files::chown_if_root(&disk, 0, 0)?;
        match before {
            Some(old) => journal.undo.push((
                format!("put back the previous {}", f.path.display()),
                Undo::Restore { disk, bytes: old.bytes, mode: old.mode, uid: old.uid, gid: old.gid },
            )),
            None => journal.undo.push((format!("removed {}", f.path.display()), Undo::Remove(disk))),
        }
        report.changes.push(match (&previous, &f.action) {
            (_, FileAction::Replace { backed_up_before: true }) => {
                format!("updated {} (the original stays backed up)", f.path.display())
            }
            (Previous::Replaced { backup, .. }, _) => {
                format!("replaced {} (the previous file is kept in {})", f.path.display(), backup.display())
            }
            _ => format!("created {} (mode {:04o})", f.path.display(), f.mode),
        });
        manifest.files.retain(|r| r.path != f.path);
        manifest.files.push(FileRecord { path: f.path.clone(), mode: f.mode, sha256, previous });
    }
    save_manifest(root, &manifest, plan.earlier.as_ref(), journal)?;
    report.changes.push(format!("wrote the manifest {MANIFEST_PATH}"));

    for argv in [system::udev_reload(), system::udev_trigger(), system::daemon_reload()] {
        journal.reloaded = true;
        let ran = run_step(sys, &argv, cancel).await?;
        report.changes.push(describe_ran(&argv, &ran));
    }
    let enable = system::enable_now(UNIT_NAME);
    let newly_enabled = !manifest.units_enabled.iter().any(|u| u == UNIT_NAME);
    if newly_enabled {
        // Pushed before the run: a start that fails may still have left it enabled.
        journal.undo.push((format!("disabled {UNIT_NAME}"), Undo::Run(system::disable_now(UNIT_NAME))));
    }
    let ran = run_step(sys, &enable, cancel).await?;
    report.changes.push(describe_ran(&enable, &ran));
    if newly_enabled && ran == Ran::Done {
        manifest.units_enabled.push(UNIT_NAME.to_string());
        manifest.save(&root.disk(Path::new(MANIFEST_PATH)))?;
    }
    Ok(())
}

fn save_manifest(
    root: &Root,
    manifest: &Manifest,
    earlier: Option<&Manifest>,
    journal: &mut Journal,
) -> Result<(), InstallError> {
    let disk = root.disk(Path::new(MANIFEST_PATH));
    let undo = match std::fs::read(&disk) {
        Ok(bytes) if earlier.is_some() => Undo::Restore { disk: disk.clone(), bytes, mode: 0o644, uid: 0, gid: 0 },
        _ => Undo::Remove(disk.clone()),
    };
    manifest.save(&disk)?;
    journal.undo.push(("restored the manifest".into(), undo));
    Ok(())
}

/// Create `dir` and missing parents, recording each one created (parents first).
fn ensure_dir(root: &Root, dir: &Path, manifest: &mut Manifest, journal: &mut Journal) -> Result<(), InstallError> {
    let mut missing = Vec::new();
    for d in dir.ancestors() {
        if root.disk(d).exists() {
            break;
        }
        missing.push(d.to_path_buf());
    }
    for d in missing.into_iter().rev() {
        let disk = root.disk(&d);
        std::fs::create_dir(&disk).map_err(|e| InstallError::io("create the directory", &disk, e))?;
        journal.undo.push((format!("removed the directory {}", d.display()), Undo::RemoveDir(disk)));
        manifest.dirs_created.push(d);
    }
    Ok(())
}

async fn rollback<S: SystemCommands>(journal: Journal, sys: &S) -> (Vec<String>, Vec<String>) {
    let (mut undone, mut not_undone) = (Vec::new(), Vec::new());
    for (what, undo) in journal.undo.into_iter().rev() {
        let result = match undo {
            Undo::Remove(p) => files::remove(&p),
            Undo::Restore { disk, bytes, mode, uid, gid } => {
                files::put(&disk, &bytes, mode).and_then(|_| files::chown_if_root(&disk, uid, gid))
            }
            Undo::RemoveDir(p) => std::fs::remove_dir(&p).map_err(|e| InstallError::io("remove the directory", &p, e)),
            Undo::Run(argv) => sys.run(&argv).await.map(|_| ()),
        };
        match result {
            Ok(()) => undone.push(what),
            Err(e) => not_undone.push(format!("{what}: {e}")),
        }
    }
    if journal.reloaded {
        for argv in [system::daemon_reload(), system::udev_reload(), system::udev_trigger()] {
            if let Err(e) = sys.run(&argv).await {
                not_undone.push(format!("`{}` after undoing: {e}", argv.join(" ")));
            }
        }
    }
    (undone, not_undone)
}

/// What uninstall will undo (for `--dry-run` and the question), or `None` when nothing is
/// installed. A broken manifest is an error: nothing is guessed.
pub fn uninstall_plan(root: &Root) -> Result<Option<Vec<String>>, InstallError> {
    let Some(m) = Manifest::load(&root.disk(Path::new(MANIFEST_PATH)))? else {
        return Ok(None);
    };
    let mut lines: Vec<String> = m.units_enabled.iter().map(|u| format!("disable and stop {u}")).collect();
    for f in m.files.iter().rev() {
        lines.push(match &f.previous {
            Previous::Absent => format!("remove {}", f.path.display()),
            Previous::Replaced { backup, .. } => {
                format!("put back the previous {} from {}", f.path.display(), backup.display())
            }
        });
    }
    lines.push(format!("remove the manifest {MANIFEST_PATH} and the directories install created"));
    for argv in [system::daemon_reload(), system::udev_reload(), system::udev_trigger()] {
        lines.push(format!("run `{}`", argv.join(" ")));
    }
    Ok(Some(lines))
}

/// Undo what the manifest lists. Each step done is taken off the manifest at once, so an
/// uninstall that stops part way can simply be run again.
pub async fn uninstall<S: SystemCommands>(
    root: &Root,
    sys: &S,
    cancel: impl Future<Output = &'static str>,
) -> Result<Report, InstallError> {
    check_privileges(root, false, "uninstall")?;
    let manifest_disk = root.disk(Path::new(MANIFEST_PATH));
    let mut report = Report::default();
    let Some(mut m) = Manifest::load(&manifest_disk)? else {
        report.notes.push(format!("kflash is not installed here (no {MANIFEST_PATH}): nothing to undo"));
        return Ok(report);
    };
    let mut cancel = std::pin::pin!(cancel);
    match undo_manifest(root, &mut m, sys, &mut cancel, &mut report).await {
        Ok(()) => Ok(report),
        Err(cause) => Err(InstallError::UninstallStopped { cause: Box::new(cause), done: report.changes }),
    }
}

async fn undo_manifest<S: SystemCommands>(
    root: &Root,
    m: &mut Manifest,
    sys: &S,
    cancel: &mut std::pin::Pin<&mut impl Future<Output = &'static str>>,
    report: &mut Report,
) -> Result<(), InstallError> {
    let manifest_disk = root.disk(Path::new(MANIFEST_PATH));
    while let Some(unit) = m.units_enabled.last().cloned() {
        let argv = system::disable_now(&unit);
        let ran = run_step(sys, &argv, cancel).await?;
        report.changes.push(describe_ran(&argv, &ran));
        m.units_enabled.pop();
        m.save(&manifest_disk)?;
    }
    while let Some(f) = m.files.last().cloned() {
        let disk = root.disk(&f.path);
        if let Some(now) = files::existing(&disk)? {
            if files::sha256(&now.bytes) != f.sha256 {
                report.notes.push(format!("{} had been changed since the install", f.path.display()));
            }
        }
        match &f.previous {
            Previous::Absent => {
                files::remove(&disk)?;
                report.changes.push(format!("removed {}", f.path.display()));
            }
            Previous::Replaced { backup, mode, uid, gid, sha256 } => {
                let backup_disk = root.disk(backup);
                let bytes = std::fs::read(&backup_disk).map_err(|e| InstallError::io("read the backup", backup, e))?;
                if &files::sha256(&bytes) != sha256 {
                    return Err(InstallError::BrokenManifest {
                        path: manifest_disk.clone(),
                        message: format!("the backup {} is not the file it recorded", backup.display()),
                    });
                }
                files::put(&disk, &bytes, *mode)?;
                files::chown_if_root(&disk, *uid, *gid)?;
                files::remove(&backup_disk)?;
                report.changes.push(format!("put back the previous {}", f.path.display()));
            }
        }
        m.files.pop();
        m.save(&manifest_disk)?;
    }
    for argv in [system::daemon_reload(), system::udev_reload(), system::udev_trigger()] {
        let ran = run_step(sys, &argv, cancel).await?;
        report.changes.push(describe_ran(&argv, &ran));
    }
    files::remove(&manifest_disk)?;
    report.changes.push(format!("removed the manifest {MANIFEST_PATH}"));
    for d in m.dirs_created.iter().rev() {
        match std::fs::remove_dir(root.disk(d)) {
            Ok(()) => report.changes.push(format!("removed the directory {}", d.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => report.notes.push(format!("left the directory {} ({e})", d.display())),
        }
    }
    Ok(())
}
