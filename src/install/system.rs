//! The commands install and uninstall run on the system (udevadm, systemctl), behind a
//! trait so a staged root runs none of them.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use super::InstallError;

/// How a command went.
#[derive(Debug, Clone, PartialEq)]
pub enum Ran {
    Done,
    /// Not run, and why (a staged root).
    Skipped(String),
}

pub trait SystemCommands {
    fn run(&self, argv: &[String]) -> impl std::future::Future<Output = Result<Ran, InstallError>> + Send;
}

/// Runs the commands for real, each with a deadline (a `systemctl enable --now` waits for the
/// service's READY=1, at most its TimeoutStartSec=, 90 s by default).
pub struct HostCommands {
    pub timeout: Duration,
}

impl Default for HostCommands {
    fn default() -> Self {
        HostCommands { timeout: Duration::from_secs(150) }
    }
}

impl SystemCommands for HostCommands {
    async fn run(&self, argv: &[String]) -> Result<Ran, InstallError> {
        run_checked(argv, self.timeout).await.map(|_| Ran::Done)
    }
}

/// For a staged root: the system is not the one being installed to, so nothing runs.
pub struct StagedRoot;

impl SystemCommands for StagedRoot {
    async fn run(&self, _argv: &[String]) -> Result<Ran, InstallError> {
        Ok(Ran::Skipped("staged root: not run".into()))
    }
}

/// Run `argv`, with its output captured; a non-zero exit is an error carrying stderr.
pub async fn run_checked(argv: &[String], timeout: Duration) -> Result<String, InstallError> {
    let command = argv.join(" ");
    let (program, args) = argv.split_first().expect("a command has a program");
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let out = match tokio::time::timeout(timeout, cmd.output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => {
            return Err(InstallError::Command { command, status: "could not be run".into(), stderr: e.to_string() })
        }
        Err(_) => {
            return Err(InstallError::Command {
                command,
                status: format!("no answer within {} s", timeout.as_secs()),
                stderr: String::new(),
            })
        }
    };
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let status = match out.status.code() {
        Some(c) => format!("exit status {c}"),
        None => "killed by a signal".into(),
    };
    let stderr: String = String::from_utf8_lossy(&out.stderr).trim().chars().take(2000).collect();
    Err(InstallError::Command { command, status, stderr })
}

fn words(w: &[&str]) -> Vec<String> {
    w.iter().map(|s| s.to_string()).collect()
}

pub fn udev_reload() -> Vec<String> {
    words(&["udevadm", "control", "--reload"])
}

/// Re-run the rules on the devices the rules are about (udev keeps a device's properties from
/// its last event): tty, USB device and net interfaces of vendor 1d50, waiting until udev has
/// handled the events.
pub fn udev_trigger() -> Vec<String> {
    words(&[
        "udevadm",
        "trigger",
        "--action=change",
        "--settle",
        "--subsystem-match=tty",
        "--subsystem-match=usb",
        "--subsystem-match=net",
        "--property-match=ID_VENDOR_ID=1d50",
    ])
}

pub fn daemon_reload() -> Vec<String> {
    words(&["systemctl", "daemon-reload"])
}

pub fn enable_now(unit: &str) -> Vec<String> {
    words(&["systemctl", "enable", "--now", unit])
}

pub fn disable_now(unit: &str) -> Vec<String> {
    words(&["systemctl", "disable", "--now", unit])
}

/// The first `name` on PATH (the path sudo's secure_path finds too on Debian), else `fallback`.
pub fn find_program(name: &str, fallback: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join(name)).find(|p| is_executable(p)))
        .unwrap_or_else(|| PathBuf::from(fallback))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.is_absolute() && std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `visudo -cf FILE`: is this sudoers file valid? (It only reads the file.)
pub async fn visudo_check(file: &Path) -> Result<(), InstallError> {
    let visudo = ["/usr/sbin/visudo", "/sbin/visudo"]
        .iter()
        .map(PathBuf::from)
        .find(|p| is_executable(p))
        .or_else(|| Some(find_program("visudo", "")).filter(|p| is_executable(p)))
        .ok_or(InstallError::NoVisudo)?;
    let argv = vec![visudo.display().to_string(), "-cf".into(), file.display().to_string()];
    match run_checked(&argv, Duration::from_secs(30)).await {
        Ok(_) => Ok(()),
        Err(InstallError::Command { status, stderr, .. }) => {
            Err(InstallError::SudoersInvalid { message: format!("{status}: {stderr}") })
        }
        Err(e) => Err(e),
    }
}
