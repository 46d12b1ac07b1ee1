//! The Klipper service around a flash: stop it, and make sure it is started again
//! whatever happens (error, `?`, panic, Ctrl-C, SIGTERM, SIGHUP), and that even a
//! `kill -9` is noticed and repaired by the next kflash run.
//!
//! * [`ServiceManager`] runs `<service_command> stop|start|is-active <service>`.
//! * [`KlipperGuard`] stops Klipper and starts it again on [`KlipperGuard::restart`] or,
//!   failing that, on drop. A marker file written *before* the stop lets
//!   [`recover_stale_stop`] start Klipper after a kflash that died without restarting it.
//! * [`FlashLock`] keeps two kflash processes from flashing at once.
//! * [`shutdown_signal`] / [`ShutdownSignals`] turn SIGINT, SIGTERM and SIGHUP into a future
//!   the orchestrator `select!`s its flash future against, so the future (and the guard in
//!   it) is dropped instead of the process dying with Klipper stopped.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::registry::Settings;

/// Marker of a stop by kflash, present from just before `stop` until a successful start.
pub const STOP_MARKER_FILE: &str = "klipper-stopped.json";
/// The file [`FlashLock`] locks; it also says who holds the lock.
pub const FLASH_LOCK_FILE: &str = "flash.lock";

/// Most of a failing command's stderr worth showing.
const MAX_STDERR: usize = 2000;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("could not run `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },

    #[error("`{command}` failed ({status}){}", stderr_suffix(.stderr))]
    CommandFailed { command: String, status: String, stderr: String },

    #[error("`{command}` did not finish within {secs:.1} s")]
    Timeout { command: String, secs: f64 },

    #[error("Klipper ({service}) could not be started again: {cause}")]
    NotRestarted { service: String, start_command: String, cause: String },

    #[error("Klipper ({service}) was stopped by another kflash (pid {pid}) for {reason}")]
    StoppedByOther { service: String, pid: u32, reason: String },

    #[error("{}", locked_message(*.pid, .doing, .since))]
    Locked { pid: Option<u32>, doing: String, since: String },

    #[error("could not {action} {}: {source}", path.display())]
    State {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn stderr_suffix(stderr: &str) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!(": {stderr}")
    }
}

impl ServiceError {
    /// What the user should do about it.
    pub fn help(&self) -> Option<String> {
        Some(match self {
            ServiceError::Spawn { .. } => {
                "check `service_command` (`kflash settings set service_command \"sudo -n systemctl\"`)".into()
            }
            ServiceError::CommandFailed { command, stderr, .. } if needs_password(stderr) => format!(
                "`{command}` needs a password: allow passwordless sudo for systemctl (a sudoers rule), \
                 or set `service_command` to a command that needs none"
            ),
            ServiceError::CommandFailed { command, .. } => {
                format!("run `{command}` by hand and check `systemctl status` and `journalctl -xe` for the service")
            }
            ServiceError::Timeout { .. } => {
                "check the service with `systemctl status`; raise `timeouts.service_secs` if it is just slow".into()
            }
            ServiceError::NotRestarted { start_command, .. } => format!(
                "Klipper is still stopped: start it with `{start_command}`; the next kflash run will also try again"
            ),
            ServiceError::StoppedByOther { .. } | ServiceError::Locked { .. } => {
                "wait for the other kflash to finish".into()
            }
            ServiceError::State { .. } => "check that kflash's state directory exists and that you may write it".into(),
        })
    }
}

fn locked_message(pid: Option<u32>, doing: &str, since: &str) -> String {
    match pid {
        Some(pid) => format!("another kflash (pid {pid}) has been busy with {doing} since {since}"),
        None => "another kflash is starting a flash".into(),
    }
}

fn needs_password(stderr: &str) -> bool {
    stderr.contains("password is required") || stderr.contains("a terminal is required")
}

/// Runs the service manager (`sudo -n systemctl` by default) for one service.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceManager {
    /// The program and its leading arguments, e.g. `["sudo", "-n", "systemctl"]`.
    pub command: Vec<String>,
    pub service: String,
    pub timeout: Duration,
}

impl ServiceManager {
    pub fn new(command: Vec<String>, service: impl Into<String>, timeout: Duration) -> ServiceManager {
        ServiceManager { command, service: service.into(), timeout }
    }

    pub fn from_settings(settings: &Settings) -> ServiceManager {
        ServiceManager::new(
            settings.service_command.split_whitespace().map(String::from).collect(),
            settings.klipper_service.clone(),
            Duration::from_secs(settings.timeouts.service_secs),
        )
    }

    /// Crate-private: outside, Klipper is stopped only through [`KlipperGuard::stop`], which
    /// takes the print-safety gate's clearance.
    pub(crate) async fn stop(&self) -> Result<(), ServiceError> {
        self.run_checked("stop").await
    }

    pub async fn start(&self) -> Result<(), ServiceError> {
        self.run_checked("start").await
    }

    /// Is the service running (or about to)? `failed` and `inactive` count as not running.
    pub async fn is_active(&self) -> Result<bool, ServiceError> {
        let out = self.run("is-active").await?;
        self.parse_is_active(&out)
    }

    /// The command line for `verb`, as the user would type it.
    pub fn command_line(&self, verb: &str) -> String {
        let mut words = self.command.clone();
        words.push(verb.to_string());
        words.push(self.service.clone());
        words.join(" ")
    }

    /// `start` without an async runtime, for [`KlipperGuard`]'s drop.
    pub fn start_blocking(&self) -> Result<(), ServiceError> {
        let out = self.run_blocking("start")?;
        self.check(&out, "start")
    }

    async fn run_checked(&self, verb: &str) -> Result<(), ServiceError> {
        let out = self.run(verb).await?;
        self.check(&out, verb)
    }

    async fn run(&self, verb: &str) -> Result<Output, ServiceError> {
        let mut cmd = tokio::process::Command::from(self.std_command(verb)?);
        // A timeout drops the future; the child must not outlive it.
        cmd.kill_on_drop(true);
        match tokio::time::timeout(self.timeout, cmd.output()).await {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(source)) => Err(ServiceError::Spawn { command: self.command_line(verb), source }),
            Err(_) => Err(self.timeout_error(verb)),
        }
    }

    fn run_blocking(&self, verb: &str) -> Result<Output, ServiceError> {
        let child = self
            .std_command(verb)?
            .spawn()
            .map_err(|source| ServiceError::Spawn { command: self.command_line(verb), source })?;
        let pid = child.id();
        // std has no wait-with-timeout: a thread waits and the channel carries the deadline.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        match rx.recv_timeout(self.timeout) {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(source)) => Err(ServiceError::Spawn { command: self.command_line(verb), source }),
            Err(_) => {
                // The waiting thread has not reaped the child (recv timed out), so the pid
                // still names it.
                let _ =
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
                Err(self.timeout_error(verb))
            }
        }
    }

    fn std_command(&self, verb: &str) -> Result<std::process::Command, ServiceError> {
        use std::os::unix::process::CommandExt;
        let (program, args) = self.command.split_first().ok_or_else(|| ServiceError::Spawn {
            command: self.command_line(verb),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "service_command is empty"),
        })?;
        let mut cmd = std::process::Command::new(program);
        cmd.args(args)
            .arg(verb)
            .arg(&self.service)
            // Output is captured, never inherited: after SIGHUP the terminal is gone.
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a Ctrl-C at the terminal must not kill the start
            // that repairs the Ctrl-C.
            .process_group(0);
        Ok(cmd)
    }

    fn check(&self, out: &Output, verb: &str) -> Result<(), ServiceError> {
        if out.status.success() {
            return Ok(());
        }
        Err(ServiceError::CommandFailed {
            command: self.command_line(verb),
            status: describe_status(out.status),
            stderr: trimmed_stderr(out),
        })
    }

    fn parse_is_active(&self, out: &Output) -> Result<bool, ServiceError> {
        let stdout = String::from_utf8_lossy(&out.stdout);
        match stdout.lines().next().map(str::trim) {
            Some("active" | "reloading" | "activating" | "refreshing") => Ok(true),
            Some("inactive" | "failed" | "deactivating" | "maintenance") => Ok(false),
            _ if out.status.success() => Ok(true),
            _ => Err(ServiceError::CommandFailed {
                command: self.command_line("is-active"),
                status: describe_status(out.status),
                stderr: trimmed_stderr(out),
            }),
        }
    }

    fn timeout_error(&self, verb: &str) -> ServiceError {
        ServiceError::Timeout { command: self.command_line(verb), secs: self.timeout.as_secs_f64() }
    }
}

fn describe_status(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => "unknown status".into(),
    }
}

fn trimmed_stderr(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stderr);
    let text = text.trim();
    match text.char_indices().nth(MAX_STDERR) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_string(),
    }
}

// ---- which process wrote a file ------------------------------------------------------

/// A process, identified well enough that a recycled pid or a reboot is not mistaken
/// for it: pid plus its start time (clock ticks since boot) plus the boot id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ProcessStamp {
    pid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    process_start: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    boot_id: Option<String>,
}

impl ProcessStamp {
    fn current() -> ProcessStamp {
        let pid = std::process::id();
        ProcessStamp { pid, process_start: proc_start_ticks(pid), boot_id: boot_id() }
    }

    fn is_alive(&self) -> bool {
        if let (Some(then), Some(now)) = (&self.boot_id, boot_id()) {
            if *then != now {
                return false;
            }
        }
        if !Path::new("/proc/self/stat").exists() {
            // No procfs: all we can ask is whether the pid exists (signal 0 = just check).
            return nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), None).is_ok();
        }
        match (proc_start_ticks(self.pid), self.process_start) {
            (None, _) => false,
            (Some(now), Some(then)) => now == then,
            (Some(_), None) => true,
        }
    }
}

/// Field 22 (starttime) of /proc/<pid>/stat; `None` when the process is gone or a zombie.
fn proc_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and ')', so split after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    if matches!(fields.first(), Some(&"Z") | Some(&"X")) {
        return None;
    }
    fields.get(19)?.parse().ok()
}

fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok().map(|s| s.trim().to_string())
}

// ---- the stop marker -----------------------------------------------------------------

/// `<state_dir>/klipper-stopped.json`: who stopped Klipper, when, why, and how to start it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StopMarker {
    #[serde(flatten)]
    process: ProcessStamp,
    /// RFC 3339, local time.
    pub time: String,
    pub service: String,
    pub command: Vec<String>,
    pub reason: String,
}

impl StopMarker {
    pub fn pid(&self) -> u32 {
        self.process.pid
    }

    fn is_ours(&self) -> bool {
        self.process == ProcessStamp::current()
    }
}

fn marker_path(state_dir: &Path) -> PathBuf {
    state_dir.join(STOP_MARKER_FILE)
}

/// The marker, if there is one. An unreadable marker still means "Klipper was left
/// stopped", so it comes back as `Some(Err)`.
fn read_marker(path: &Path) -> Option<Result<StopMarker, String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Some(serde_json::from_str(&text).map_err(|e| e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => Some(Err(e.to_string())),
    }
}

fn write_marker(path: &Path, marker: &StopMarker) -> Result<(), ServiceError> {
    let json = serde_json::to_vec_pretty(marker).expect("a StopMarker always serializes");
    crate::atomic_file::replace(path, &json).map_err(|source| ServiceError::State {
        action: "write",
        path: path.into(),
        source,
    })
}

fn remove_marker(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        // Harmless: the next run finds it, sees a dead pid and starts a running Klipper.
        Err(e) => tracing::warn!("could not remove {}: {e}", path.display()),
    }
}

fn now_rfc3339() -> String {
    chrono::Local::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, false)
}

/// `12:03:04` for today, else `2024-05-01 12:03:04`; the raw text if it does not parse.
fn short_time(rfc3339: &str) -> String {
    match chrono::DateTime::parse_from_rfc3339(rfc3339) {
        Ok(t) => {
            let t = t.with_timezone(&chrono::Local);
            if t.date_naive() == chrono::Local::now().date_naive() {
                t.format("%H:%M:%S").to_string()
            } else {
                t.format("%Y-%m-%d %H:%M:%S").to_string()
            }
        }
        Err(_) => rfc3339.to_string(),
    }
}

// ---- the guard -----------------------------------------------------------------------

/// Klipper stopped by kflash. Call [`KlipperGuard::restart`]; if the guard is dropped
/// instead (early return, `?`, panic, a cancelled future), drop starts Klipper
/// synchronously, best effort, and logs what happened.
#[derive(Debug)]
pub struct KlipperGuard {
    manager: ServiceManager,
    marker: PathBuf,
    stop_began: Instant,
    was_active: bool,
    /// We stopped it and have not started it (nor given up on starting it) yet.
    must_start: bool,
}

/// What [`KlipperGuard::restart`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct RestartReport {
    /// From the stop command to the start command returning.
    pub downtime: Duration,
    /// `false` when Klipper was not running before kflash, so it was left stopped.
    pub started: bool,
}

impl RestartReport {
    pub fn summary(&self, service: &str) -> String {
        if self.started {
            format!("started {service} again after {:.1} s", self.downtime.as_secs_f64())
        } else {
            format!("left {service} stopped: it was not running before kflash")
        }
    }
}

impl KlipperGuard {
    /// Stop the service for `reason` (e.g. "flash of octopus"). The marker is written
    /// before the stop, so there is no moment where Klipper is stopped and unmarked.
    /// A service that is not running is neither stopped nor started later.
    ///
    /// `clearance` is the print-safety gate's permission
    /// ([`crate::safety::clear_to_stop_klipper`]), the only way to get one: Klipper is
    /// never stopped without asking Moonraker about the print first.
    pub async fn stop(
        manager: ServiceManager,
        state_dir: &Path,
        reason: &str,
        clearance: crate::safety::Clearance,
    ) -> Result<KlipperGuard, ServiceError> {
        tracing::info!("stopping {} for {reason}; print check: {}", manager.service, clearance.check().as_str());
        let marker = marker_path(state_dir);
        // A marker left by a dead kflash means Klipper is down only because of kflash:
        // it must run afterwards even though it is inactive now.
        let inherited = match read_marker(&marker) {
            Some(Ok(m)) if !m.is_ours() && m.process.is_alive() => {
                return Err(ServiceError::StoppedByOther { pid: m.pid(), service: m.service, reason: m.reason })
            }
            Some(_) => true,
            None => false,
        };
        let was_active = inherited || manager.is_active().await?;
        let mut guard = KlipperGuard { manager, marker, stop_began: Instant::now(), was_active, must_start: false };
        if !was_active {
            tracing::info!("{} is not running; kflash will not start it afterwards", guard.manager.service);
            return Ok(guard);
        }
        write_marker(&guard.marker, &guard.new_marker(reason))?;
        guard.stop_began = Instant::now();
        if let Err(e) = guard.manager.stop().await {
            guard.undo_failed_stop().await;
            return Err(e);
        }
        guard.must_start = true;
        Ok(guard)
    }

    /// Was the service running before kflash? If not, it stays stopped.
    pub fn was_active(&self) -> bool {
        self.was_active
    }

    /// A line for the user when kflash will not start the service again.
    pub fn note(&self) -> Option<String> {
        (!self.was_active)
            .then(|| format!("{} was already stopped before kflash; it will be left stopped", self.manager.service))
    }

    pub fn service(&self) -> &str {
        &self.manager.service
    }

    /// Start the service again (if kflash stopped it) and remove the marker. On failure the
    /// marker stays, so the next kflash run retries; drop does not retry.
    pub async fn restart(mut self) -> Result<RestartReport, ServiceError> {
        if !self.must_start {
            return Ok(RestartReport { downtime: self.stop_began.elapsed(), started: false });
        }
        let result = self.manager.start().await;
        // Past this point drop must not start it again: it either ran or failed with a reason.
        self.must_start = false;
        match result {
            Ok(()) => {
                remove_marker(&self.marker);
                Ok(RestartReport { downtime: self.stop_began.elapsed(), started: true })
            }
            Err(e) => Err(ServiceError::NotRestarted {
                service: self.manager.service.clone(),
                start_command: self.manager.command_line("start"),
                cause: e.to_string(),
            }),
        }
    }

    fn new_marker(&self, reason: &str) -> StopMarker {
        StopMarker {
            process: ProcessStamp::current(),
            time: now_rfc3339(),
            service: self.manager.service.clone(),
            command: self.manager.command.clone(),
            reason: reason.to_string(),
        }
    }

    /// `stop` failed: if it half-worked (the service is down now), start it again; the
    /// marker goes either way, since nothing is left for a later run to repair.
    async fn undo_failed_stop(&self) {
        if let Ok(false) = self.manager.is_active().await {
            if let Err(e) = self.manager.start().await {
                tracing::error!(
                    "{} is stopped after a failed stop and could not be started: {e}",
                    self.manager.service
                );
                return; // keep the marker: the next run retries
            }
        }
        remove_marker(&self.marker);
    }
}

impl Drop for KlipperGuard {
    fn drop(&mut self) {
        if !self.must_start {
            return;
        }
        let service = &self.manager.service;
        tracing::warn!("kflash was interrupted with {service} stopped; starting it again");
        match self.manager.start_blocking() {
            Ok(()) => {
                remove_marker(&self.marker);
                tracing::warn!("started {service} again after {:.1} s", self.stop_began.elapsed().as_secs_f64());
            }
            Err(e) => tracing::error!(
                "could not start {service} again: {e}; start it with `{}` (the next kflash run will also try)",
                self.manager.command_line("start")
            ),
        }
    }
}

/// Repair a stop left behind by a kflash that died (kill -9, power loss, crash): if the
/// marker's process is gone, start the service and remove the marker. `None` when there
/// is nothing to do, or when the process that wrote the marker is still running.
pub async fn recover_stale_stop(manager: &ServiceManager, state_dir: &Path) -> Option<Result<String, ServiceError>> {
    let path = marker_path(state_dir);
    let marker = read_marker(&path)?;
    if let Ok(m) = &marker {
        if m.process.is_alive() {
            return None;
        }
    }
    let (starter, what) = match &marker {
        Ok(m) => (
            ServiceManager::new(m.command.clone(), m.service.clone(), manager.timeout),
            format!(
                "{} was left stopped by kflash (pid {}, stopped at {} for {}, which never finished)",
                m.service,
                m.pid(),
                short_time(&m.time),
                m.reason
            ),
        ),
        Err(e) => (
            manager.clone(),
            format!("{} may have been left stopped by kflash ({} is unreadable: {e})", manager.service, path.display()),
        ),
    };
    Some(match starter.start().await {
        Ok(()) => {
            remove_marker(&path);
            Ok(format!("{what}; started it again"))
        }
        Err(e) => Err(ServiceError::NotRestarted {
            service: starter.service.clone(),
            start_command: starter.command_line("start"),
            cause: format!("{what}; {e}"),
        }),
    })
}

// ---- one flash at a time -------------------------------------------------------------

#[derive(Debug, Serialize, Deserialize)]
struct LockInfo {
    pid: u32,
    since: String,
    doing: String,
}

/// An exclusive `flock` on `<state_dir>/flash.lock`, held while this value lives. The
/// kernel drops it when the process exits however it exits, so it is never stale.
#[derive(Debug)]
pub struct FlashLock {
    _file: Flock<File>,
    path: PathBuf,
}

impl FlashLock {
    /// Take the lock without waiting; `doing` (e.g. "flash of octopus") is shown to a
    /// second kflash that is refused: "another kflash (pid 1234) has been busy with flash
    /// of octopus since 12:03:04".
    pub fn acquire(state_dir: &Path, doing: &str) -> Result<FlashLock, ServiceError> {
        let path = state_dir.join(FLASH_LOCK_FILE);
        let io_err = |action, source| ServiceError::State { action, path: path.clone(), source };
        std::fs::create_dir_all(state_dir).map_err(|e| io_err("create the directory of", e))?;
        // No truncate on open: the holder's details must survive until we own the lock.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io_err("open", e))?;
        // std opens files O_CLOEXEC, so children (make, flashtool) do not inherit the lock
        // and cannot keep it after we exit.
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((mut file, Errno::EWOULDBLOCK)) => return Err(holder_error(&mut file)),
            Err((_, errno)) => return Err(io_err("lock", errno.into())),
        };
        let info = LockInfo { pid: std::process::id(), since: now_rfc3339(), doing: doing.to_string() };
        let json = serde_json::to_string(&info).expect("LockInfo always serializes");
        // Rewrite in place: replacing the file would leave the lock on the old inode.
        file.set_len(0).map_err(|e| io_err("write", e))?;
        file.rewind().map_err(|e| io_err("write", e))?;
        file.write_all(json.as_bytes()).map_err(|e| io_err("write", e))?;
        Ok(FlashLock { _file: file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn holder_error(file: &mut File) -> ServiceError {
    let mut text = String::new();
    let _ = file.read_to_string(&mut text);
    match serde_json::from_str::<LockInfo>(&text) {
        Ok(info) => ServiceError::Locked { pid: Some(info.pid), doing: info.doing, since: short_time(&info.since) },
        // The holder has the lock but has not written its details yet.
        Err(_) => ServiceError::Locked { pid: None, doing: String::new(), since: String::new() },
    }
}

// ---- signals -------------------------------------------------------------------------

/// SIGINT, SIGTERM and SIGHUP as a stream of names. Install it *before* stopping Klipper
/// so no signal can kill the process in between. Once installed (by this or by
/// [`shutdown_signal`]), these signals no longer kill the process for its remaining
/// lifetime: tokio cannot uninstall its handlers. Panics keep unwinding as usual.
pub struct ShutdownSignals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    pub fn install() -> std::io::Result<ShutdownSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(ShutdownSignals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// The next of the three signals, by name.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
            _ = self.hup.recv() => "SIGHUP",
        }
    }
}

/// Resolves on SIGINT, SIGTERM or SIGHUP with the signal's name. Use it in `select!`
/// against the flash future (with `biased;` and this branch first, so the handlers are
/// installed before the flash future first runs); dropping the flash future drops its
/// [`KlipperGuard`], which starts Klipper.
pub async fn shutdown_signal() -> &'static str {
    match ShutdownSignals::install() {
        Ok(mut signals) => signals.recv().await,
        Err(e) => {
            tracing::warn!("cannot listen for SIGINT/SIGTERM/SIGHUP: {e}");
            std::future::pending().await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_a_dead_pid_is_not() {
        let me = ProcessStamp::current();
        assert!(me.is_alive());
        let recycled = ProcessStamp { process_start: me.process_start.map(|t| t + 1), ..me.clone() };
        assert!(!recycled.is_alive(), "same pid, other start time: a recycled pid");
        let rebooted = ProcessStamp { boot_id: Some("another-boot".into()), ..me };
        assert!(!rebooted.is_alive());
    }

    #[test]
    fn reaped_child_is_not_alive() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!ProcessStamp { pid, process_start: None, boot_id: None }.is_alive());
    }

    #[test]
    fn marker_round_trips_with_flat_pid() {
        let m = StopMarker {
            process: ProcessStamp::current(),
            time: now_rfc3339(),
            service: "klipper".into(),
            command: vec!["sudo".into(), "-n".into(), "systemctl".into()],
            reason: "flash of octopus".into(),
        };
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["pid"], std::process::id());
        assert_eq!(serde_json::from_value::<StopMarker>(json).unwrap(), m);
    }

    #[test]
    fn command_line_and_help() {
        let s = Settings::default();
        let m = ServiceManager::from_settings(&s);
        assert_eq!(m.command_line("stop"), "sudo -n systemctl stop klipper");
        let e = ServiceError::CommandFailed {
            command: m.command_line("stop"),
            status: "exit status 1".into(),
            stderr: "sudo: a password is required".into(),
        };
        assert_eq!(
            e.to_string(),
            "`sudo -n systemctl stop klipper` failed (exit status 1): sudo: a password is required"
        );
        assert!(e.help().unwrap().contains("passwordless sudo"));
    }

    #[test]
    fn short_time_is_clock_time_today() {
        let t = short_time(&now_rfc3339());
        assert_eq!(t.len(), 8, "{t}");
        assert_eq!(short_time("2001-02-03T04:05:06+00:00").len(), 19);
        assert_eq!(short_time("garbage"), "garbage");
    }
}
