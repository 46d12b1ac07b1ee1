//! `kflash install` / `kflash uninstall` into a staged root (`--root DIR`): the files created
//! and replaced (bytes and modes), the manifest, uninstall restoring the tree exactly,
//! idempotent re-install, a broken manifest refused, rollback of a failed install, the
//! sudoers rule (checked by the real visudo) and the unit (checked by the real
//! `systemd-analyze verify`).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use kflash::install::{self, system::Ran, InstallError, InstallRequest, Root};

const KFLASH: &str = env!("CARGO_BIN_EXE_kflash");

fn kflash(args: &[&str]) -> Output {
    Command::new(KFLASH).args(args).stdin(Stdio::null()).output().expect("run kflash")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "kflash failed ({}):\n{}\n{}", out.status, text(&out.stdout), text(&out.stderr));
    text(&out.stdout)
}

fn me() -> String {
    nix::unistd::User::from_uid(nix::unistd::geteuid()).unwrap().unwrap().name
}

/// Every entry under `root`: path -> (kind, mode, content or link target).
fn snapshot(root: &Path) -> BTreeMap<PathBuf, (char, u32, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            let mode = meta.permissions().mode() & 0o7777;
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            if meta.is_dir() {
                out.insert(rel, ('d', mode, Vec::new()));
                stack.push(p);
            } else if meta.file_type().is_symlink() {
                out.insert(rel, ('l', mode, std::fs::read_link(&p).unwrap().into_os_string().into_encoded_bytes()));
            } else {
                out.insert(rel, ('f', mode, std::fs::read(&p).unwrap()));
            }
        }
    }
    out
}

/// A staged root like a Debian system: /etc/udev/rules.d with a hand-copied older rule
/// (mode 0600, to see modes restored), /etc/sudoers.d, /usr/local/bin, /var/lib.
fn staged_root() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    for d in ["etc/udev/rules.d", "etc/systemd/system", "etc/sudoers.d", "usr/local/bin", "var/lib"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let old = root.join("etc/udev/rules.d/70-kflash.rules");
    std::fs::write(&old, "# an older kflash rule copied by hand\n").unwrap();
    std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(root.join("etc/udev/rules.d/60-other.rules"), "# not ours\n").unwrap();
    (t, root)
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

fn install_staged(root: &Path, extra: &[&str]) -> String {
    let r = root.to_str().unwrap();
    let user = me();
    let mut args = vec!["install", "--root", r, "--user", &user, "--yes"];
    args.extend_from_slice(extra);
    ok(&kflash(&args))
}

#[test]
fn install_writes_exactly_its_files_and_uninstall_restores_the_tree() {
    let (_t, root) = staged_root();
    let before = snapshot(&root);
    let out = install_staged(&root, &["--sudoers"]);
    assert!(out.contains("created /usr/local/bin/kflash"), "{out}");
    assert!(
        out.contains("replaced /etc/udev/rules.d/70-kflash.rules (the previous file is kept in /var/lib/kflash/backup/etc/udev/rules.d/70-kflash.rules)"),
        "{out}"
    );
    assert!(out.contains("did not run `systemctl enable --now kflash.service` (staged root"), "{out}");

    // The binary byte for byte, the rules as in the repo, the unit filled in, modes exact.
    let bin = root.join("usr/local/bin/kflash");
    assert_eq!(std::fs::read(&bin).unwrap(), std::fs::read(KFLASH).unwrap());
    assert_eq!(mode(&bin), 0o755);
    let rules = root.join("etc/udev/rules.d/70-kflash.rules");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    assert_eq!(std::fs::read(&rules).unwrap(), std::fs::read(repo.join("udev-rules/70-kflash.rules")).unwrap());
    assert_eq!(mode(&rules), 0o644);
    let unit = std::fs::read_to_string(root.join("etc/systemd/system/kflash.service")).unwrap();
    assert!(
        unit.contains(&format!("\nUser={}\n", me())) && unit.contains("\nExecStart=/usr/local/bin/kflash daemon\n")
    );
    assert_eq!(mode(&root.join("etc/systemd/system/kflash.service")), 0o644);
    let sudoers = root.join("etc/sudoers.d/kflash");
    assert_eq!(mode(&sudoers), 0o440);
    // The original rule is backed up with its content and mode.
    let backup = root.join("var/lib/kflash/backup/etc/udev/rules.d/70-kflash.rules");
    assert_eq!(std::fs::read_to_string(&backup).unwrap(), "# an older kflash rule copied by hand\n");
    assert_eq!(mode(&backup), 0o600);
    // Nothing else was touched, no temporary file left.
    let after = snapshot(&root);
    let new: Vec<_> = after.keys().filter(|k| !before.contains_key(*k)).map(|k| k.display().to_string()).collect();
    assert_eq!(
        new,
        [
            "etc/sudoers.d/kflash",
            "etc/systemd/system/kflash.service",
            "usr/local/bin/kflash",
            "var/lib/kflash",
            "var/lib/kflash/backup",
            "var/lib/kflash/backup/etc",
            "var/lib/kflash/backup/etc/udev",
            "var/lib/kflash/backup/etc/udev/rules.d",
            "var/lib/kflash/backup/etc/udev/rules.d/70-kflash.rules",
            "var/lib/kflash/install-manifest.json",
        ]
    );
    assert_eq!(
        after[Path::new("etc/udev/rules.d/60-other.rules")],
        before[Path::new("etc/udev/rules.d/60-other.rules")]
    );

    // The manifest says exactly that.
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("var/lib/kflash/install-manifest.json")).unwrap()).unwrap();
    let files: Vec<(String, String)> = m["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["path"].as_str().unwrap().to_string(), f["previous"]["was"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(
        files,
        [
            ("/usr/local/bin/kflash".to_string(), "absent".to_string()),
            ("/etc/udev/rules.d/70-kflash.rules".into(), "replaced".into()),
            ("/etc/systemd/system/kflash.service".into(), "absent".into()),
            ("/etc/sudoers.d/kflash".into(), "absent".into()),
        ]
    );
    assert_eq!(m["units_enabled"], serde_json::json!([]), "a staged root enables nothing");

    let out = ok(&kflash(&["uninstall", "--root", root.to_str().unwrap(), "--yes"]));
    assert!(out.contains("put back the previous /etc/udev/rules.d/70-kflash.rules"), "{out}");
    assert_eq!(snapshot(&root), before, "uninstall must leave the tree exactly as it was");
    // A second uninstall has nothing to do.
    let out = ok(&kflash(&["uninstall", "--root", root.to_str().unwrap(), "--yes"]));
    assert!(out.contains("not installed"), "{out}");
}

#[test]
fn reinstalling_keeps_the_original_backup() {
    let (_t, root) = staged_root();
    let before = snapshot(&root);
    install_staged(&root, &["--no-sudoers"]);
    // Unchanged files are kept; a file changed by hand since is updated, and the backup still
    // holds the file from before the first install.
    let rules = root.join("etc/udev/rules.d/70-kflash.rules");
    std::fs::write(&rules, "# edited after install\n").unwrap();
    let out = install_staged(&root, &["--no-sudoers"]);
    assert!(out.contains("kept /usr/local/bin/kflash (unchanged)"), "{out}");
    assert!(out.contains("updated /etc/udev/rules.d/70-kflash.rules (the original stays backed up)"), "{out}");
    let backup = root.join("var/lib/kflash/backup/etc/udev/rules.d/70-kflash.rules");
    assert_eq!(std::fs::read_to_string(&backup).unwrap(), "# an older kflash rule copied by hand\n");
    // A third run with the sudoers rule adds it to the same manifest.
    install_staged(&root, &["--sudoers"]);
    ok(&kflash(&["uninstall", "--root", root.to_str().unwrap(), "--yes"]));
    assert_eq!(snapshot(&root), before);
}

#[test]
fn a_broken_manifest_is_refused_and_nothing_changes() {
    let (_t, root) = staged_root();
    install_staged(&root, &["--no-sudoers"]);
    let manifest = root.join("var/lib/kflash/install-manifest.json");
    let good = std::fs::read(&manifest).unwrap();
    for broken in [
        &b"{ not json"[..],
        &br#"{"format": 9, "kflash_version": "x", "user": "u", "files": [], "dirs_created": [], "units_enabled": []}"#
            [..],
    ] {
        std::fs::write(&manifest, broken).unwrap();
        let before = snapshot(&root);
        for args in [vec!["install", "--yes", "--no-sudoers", "--user", "root"], vec!["uninstall", "--yes"]] {
            let mut args = args.clone();
            args.extend(["--root", root.to_str().unwrap()]);
            let out = kflash(&args);
            assert_eq!(out.status.code(), Some(3), "{args:?}: {}", text(&out.stderr));
            let err = text(&out.stderr);
            assert!(err.contains("install-manifest.json is unreadable"), "{err}");
            assert!(err.contains("help: kflash will not guess"), "{err}");
            assert_eq!(snapshot(&root), before, "{args:?} changed files");
        }
    }
    std::fs::write(&manifest, good).unwrap();
    ok(&kflash(&["uninstall", "--root", root.to_str().unwrap(), "--yes"]));
}

#[test]
fn dry_run_changes_nothing_and_says_what_it_would_do() {
    let (_t, root) = staged_root();
    let before = snapshot(&root);
    let out = ok(&kflash(&["install", "--root", root.to_str().unwrap(), "--user", "root", "--sudoers", "--dry-run"]));
    assert!(out.contains("create /usr/local/bin/kflash (mode 0755)"), "{out}");
    assert!(out.contains("replace /etc/udev/rules.d/70-kflash.rules"), "{out}");
    assert!(out.contains("create /etc/sudoers.d/kflash (mode 0440)"), "{out}");
    assert!(out.contains("root ALL=(root) NOPASSWD: "), "{out}");
    assert_eq!(snapshot(&root), before);
}

#[test]
fn the_service_user_comes_from_the_klipper_unit() {
    let (_t, root) = staged_root();
    std::fs::write(root.join("etc/systemd/system/klipper.service"), "[Service]\nUser=nobody\nExecStart=/bin/true\n")
        .unwrap();
    let out = ok(&kflash(&["install", "--root", root.to_str().unwrap(), "--dry-run"]));
    assert!(out.contains("service user: nobody (group nogroup; found by User= of "), "{out}");
    // The default for the sudoers rule is yes for a user other than root.
    assert!(out.contains("create /etc/sudoers.d/kflash"), "{out}");
    let out = kflash(&["install", "--root", root.to_str().unwrap(), "--dry-run", "--user", "no-such-user-kflash"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("there is no user named 'no-such-user-kflash'"), "{}", text(&out.stderr));
}

#[test]
fn without_root_the_system_is_not_touched() {
    // As an unprivileged user: setpriv drops root for this one command.
    let unprivileged = |sub: &str| {
        let mut c = if nix::unistd::geteuid().is_root() {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups", KFLASH]);
            c
        } else {
            Command::new(KFLASH)
        };
        c.args([sub, "--yes"]).env("HOME", "/nonexistent").stdin(Stdio::null());
        c.output().unwrap()
    };
    for sub in ["install", "uninstall"] {
        let out = unprivileged(sub);
        assert_eq!(out.status.code(), Some(2), "{sub}: {}", text(&out.stderr));
        let err = text(&out.stderr);
        assert!(err.contains(&format!("`kflash {sub}` changes system files and needs root")), "{err}");
        assert!(err.contains(&format!("rerun it with sudo: `sudo kflash {sub}`")), "{err}");
    }
}

#[test]
fn the_sudoers_rule_is_valid_for_visudo_and_scoped() {
    assert!(Path::new("/usr/sbin/visudo").exists(), "visudo missing: tests/setup-host installs the sudo package");
    let (_t, root) = staged_root();
    install_staged(&root, &["--sudoers"]);
    let rule = std::fs::read_to_string(root.join("etc/sudoers.d/kflash")).unwrap();
    let lines: Vec<&str> = rule.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).collect();
    let systemctl = install::system::find_program("systemctl", "/usr/bin/systemctl");
    let s = systemctl.display();
    assert_eq!(
        lines,
        [format!("{} ALL=(root) NOPASSWD: {s} stop klipper, {s} start klipper, {s} is-active klipper", me())]
    );
    let out = Command::new("/usr/sbin/visudo").arg("-cf").arg(root.join("etc/sudoers.d/kflash")).output().unwrap();
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    // visudo does catch a broken rule (so the check above can fail).
    let bad = root.join("bad");
    std::fs::write(&bad, rule.replace("NOPASSWD:", "NOPASSWD")).unwrap();
    assert!(!Command::new("/usr/sbin/visudo").arg("-cf").arg(&bad).output().unwrap().status.success());
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    let analyze = Path::new("/usr/bin/systemd-analyze");
    assert!(analyze.exists(), "systemd-analyze missing: tests/setup-host installs the systemd package");
    // The bindir is the build's, so ExecStart names an executable that exists on this machine.
    let (_t, root) = staged_root();
    let bindir = Path::new(KFLASH).parent().unwrap().to_str().unwrap().to_string();
    install_staged(&root, &["--no-sudoers", "--bindir", &bindir]);
    let unit = root.join("etc/systemd/system/kflash.service");
    let verify = |path: &Path| {
        Command::new(analyze).args(["verify", "--man=no"]).arg(path).env("SYSTEMD_LOG_COLOR", "0").output().unwrap()
    };
    let out = verify(&unit);
    assert!(out.status.success() && text(&out.stderr).trim().is_empty(), "{}", text(&out.stderr));
    // The check does fail on a broken unit.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("kflash.service");
    let text_unit = std::fs::read_to_string(&unit).unwrap();
    std::fs::write(&broken, text_unit.replace("Type=notify", "Type=notfy")).unwrap();
    let out = verify(&broken);
    assert!(
        text(&out.stderr).contains("Failed to parse service type"),
        "verify missed a bad Type=: {}",
        text(&out.stderr)
    );
    std::fs::write(&broken, text_unit.replace(&format!("{bindir}/kflash"), "/nonexistent/kflash")).unwrap();
    assert!(!verify(&broken).status.success(), "verify missed a missing ExecStart binary");
}

/// System commands that record what they are asked and fail on one.
struct Scripted {
    fail_on: &'static str,
    calls: std::sync::Mutex<Vec<String>>,
}

impl install::system::SystemCommands for Scripted {
    async fn run(&self, argv: &[String]) -> Result<Ran, InstallError> {
        let line = argv.join(" ");
        self.calls.lock().unwrap().push(line.clone());
        if line.contains(self.fail_on) {
            return Err(InstallError::Command {
                command: line,
                status: "exit status 1".into(),
                stderr: "Job for kflash.service failed".into(),
            });
        }
        Ok(Ran::Done)
    }
}

#[tokio::test]
async fn a_failed_start_rolls_back_everything_this_run_did() {
    let (_t, root) = staged_root();
    let before = snapshot(&root);
    let req = InstallRequest {
        root: Root::new(&root),
        bindir: "/usr/local/bin".into(),
        user: Some(me()),
        config_dir: Some(root.join("no-config")),
        exe: KFLASH.into(),
    };
    let setup = install::resolve(&req).unwrap();
    let plan = install::plan(&setup, true).unwrap();
    let sys = Scripted { fail_on: "enable --now", calls: Default::default() };
    let err = install::install(&plan, &sys, std::future::pending()).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.starts_with("`systemctl enable --now kflash.service` failed (exit status 1)"), "{msg}");
    assert!(msg.contains("everything this install had changed was undone"), "{msg}");
    assert_eq!(snapshot(&root), before, "the rollback must restore the tree exactly");
    let calls = sys.calls.lock().unwrap().clone();
    assert_eq!(
        calls,
        [
            "udevadm control --reload",
            install::system::udev_trigger().join(" ").as_str(),
            "systemctl daemon-reload",
            "systemctl enable --now kflash.service",
            "systemctl disable --now kflash.service",
            "systemctl daemon-reload",
            "udevadm control --reload",
            install::system::udev_trigger().join(" ").as_str(),
        ]
    );

    // An interruption (the cancel future) rolls back the same way.
    let sys = Scripted { fail_on: "never", calls: Default::default() };
    let err = install::install(&plan, &sys, async { "SIGINT" }).await.unwrap_err();
    assert!(err.to_string().starts_with("interrupted by SIGINT"), "{err}");
    assert_eq!(err.exit_code(), 130);
    assert_eq!(snapshot(&root), before);
}
