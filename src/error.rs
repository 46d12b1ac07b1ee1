//! Errors a user can meet. Each says what happened; [`Error::help`] says what to do next,
//! and [`Error::exit_code`] maps it to the documented process exit status.

use std::path::PathBuf;

/// Documented exit codes (see README, "Exit codes").
pub mod exit {
    pub const OK: i32 = 0;
    /// A runtime failure not covered below.
    pub const FAILURE: i32 = 1;
    /// Bad command line or invalid argument value.
    pub const USAGE: i32 = 2;
    /// A kflash file (boards.toml, settings.toml, a board config) is unreadable or invalid.
    pub const CONFIG: i32 = 3;
    /// The board is not registered, not connected, or ambiguous.
    pub const BOARD: i32 = 4;
    /// An external tool (make, menuconfig, git) failed.
    pub const TOOL: i32 = 5;
    /// USB/udev trouble: no udev, a device did not appear before its deadline.
    pub const DEVICE: i32 = 6;
    /// Flashing or post-flash verification failed.
    pub const FLASH: i32 = 7;
    /// The Klipper service could not be stopped or started, or another kflash is flashing.
    pub const SERVICE: i32 = 8;
    /// Moonraker could not be asked, or refused.
    pub const MOONRAKER: i32 = 9;
    /// The printer is printing or paused.
    pub const BUSY: i32 = 10;
    /// Interrupted by Ctrl-C / SIGTERM.
    pub const INTERRUPTED: i32 = 130;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}:{line}:{column}: {message}", path.display())]
    FileParse { path: PathBuf, line: usize, column: usize, message: String },

    #[error("{}: {message}", path.display())]
    FileInvalid { path: PathBuf, message: String },

    #[error("could not {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("no board with key '{0}' is registered")]
    UnknownBoard(String),

    #[error("{0}")]
    BoardConflict(String),

    #[error("{0}")]
    InvalidInput(String),

    #[error("board '{key}' is an {board_mcu} but its firmware config {} is for {config_mcu}", path.display())]
    McuMismatch { key: String, board_mcu: String, config_mcu: String, path: PathBuf },

    #[error("{message}")]
    ConfigRejected { key: String, message: String },

    #[error(
        "board '{key}' has a firmware config seeded from the board profile '{profile}' that nobody has reviewed yet"
    )]
    ConfigUnreviewed { key: String, profile: String },

    #[error("the board profile '{profile}' is for {profile_mcu}, but the board is an {board_mcu}; nothing was registered or written")]
    ProfileMismatch { profile: String, profile_mcu: String, board_mcu: String },

    #[error("board '{key}' has no firmware config yet ({} does not exist)", path.display())]
    NoBoardConfig { key: String, path: PathBuf },

    #[error("{} is not a Klipper source tree (no Makefile)", path.display())]
    NotKlipperTree { path: PathBuf },

    #[error("there is no cached firmware for '{key}' built from the current Klipper tree and config")]
    NoCachedFirmware { key: String },
    /// The Klipper tree's Kconfig would change a setting the board depends on.
    #[error("the Klipper tree's Kconfig would change critical settings of '{key}' ({}):\n{changes}", path.display())]
    ConfigMigration { key: String, path: PathBuf, changes: String },

    /// make failed: the exact command and the whole log, for running it again by hand.
    #[error("make failed: the build failed ({status}); last lines:\n{tail}\n  command: {command}\n  full log: {}", log.display())]
    BuildFailed { status: String, tail: String, command: String, log: PathBuf },

    #[error("{0}")]
    NeedsTerminal(String),

    #[error("{0}")]
    DeviceNotFound(String),

    #[error("udev is not available: {0}")]
    Udev(String),

    #[error("timed out after {secs:.1} s waiting for {what}")]
    Timeout { what: String, secs: f64 },

    #[error("{program} failed: {message}")]
    Tool { program: String, message: String },

    #[error(transparent)]
    Flash(#[from] crate::flash::FlashError),

    #[error(transparent)]
    Service(#[from] crate::service::ServiceError),

    #[error(transparent)]
    History(#[from] crate::history::HistoryError),

    #[error(transparent)]
    Moonraker(#[from] crate::moonraker::MoonrakerError),

    #[error(transparent)]
    Can(#[from] crate::can::CanError),

    #[error("the printer is {0}: kflash will not stop Klipper now")]
    PrinterBusy(String),

    #[error(transparent)]
    Safety(#[from] crate::safety::SafetyError),

    #[error(transparent)]
    Install(#[from] crate::install::InstallError),

    #[error("interrupted by {0}")]
    Interrupted(&'static str),

    /// The kflash daemon carried out the run, and it failed with this.
    #[error("{}", .0.message)]
    Daemon(crate::daemon::socket::ErrorDoc),

    /// flash-all: boards without a usable config (one line each).
    #[error("{} board(s) have no usable firmware config:\n  {}", .0.len(), .0.join("\n  "))]
    BoardsUnconfigured(Vec<String>),

    /// flash-all: the boards that did not pass.
    #[error("{} board(s) did not pass: {}", .0.len(), .0.join(", "))]
    BoardsFailed(Vec<String>),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io { action, path: path.into(), source }
    }

    /// One line telling the user what to do about it.
    pub fn help(&self) -> Option<String> {
        Some(match self {
            Error::FileParse { path, .. } | Error::FileInvalid { path, .. } => format!(
                "fix {} by hand (kflash will not rewrite a file it cannot read), or move it aside to start fresh",
                path.display()
            ),
            Error::Io { .. } => "check that the path exists and that you may read and write it".into(),
            Error::UnknownBoard(_) => "run `kflash devices` to see registered boards, or `kflash add` to register one".into(),
            Error::BoardConflict(_) => "choose another name or key, or change the existing board with `kflash set`".into(),
            Error::McuMismatch { key, .. } => format!(
                "run `kflash config {key}` and pick the board's MCU, or fix the board's MCU with `kflash set {key} --mcu …`"
            ),
            Error::ConfigRejected { key, .. } => format!("run `kflash config {key}` again and choose the board's MCU"),
            Error::ConfigUnreviewed { key, .. } => format!(
                "run `kflash config {key}` and check the MCU, bootloader offset, clock and interface against your board; saving (or leaving menuconfig) marks it reviewed"
            ),
            Error::ProfileMismatch { .. } => {
                "pick the profile for this board's MCU (`kflash profiles`), or add it without --profile and set it up with `kflash config KEY`".into()
            }
            Error::NoBoardConfig { key, .. } => format!("run `kflash config {key}` to create it"),
            Error::NotKlipperTree { .. } => {
                "set klipper_dir to your Klipper or Kalico checkout: `kflash settings set klipper_dir ~/klipper`".into()
            }
            Error::NoCachedFirmware { key } => format!("run `kflash build {key}` first, or drop --no-build"),
            Error::ConfigMigration { key, .. } => format!(
                "run `kflash config {key}` to review the settings against the updated Klipper and save them; the config was not changed"
            ),
            Error::BuildFailed { log, .. } => format!(
                "run the command above in a shell to investigate; the whole output is in {}",
                log.display()
            ),
            Error::NeedsTerminal(_) => {
                "run it in an interactive terminal (over SSH: `ssh -t`); `kflash config KEY --show` prints the config".into()
            }
            Error::DeviceNotFound(_) => "check the USB cable and run `kflash devices` to see what is connected".into(),
            Error::Udev(_) => "kflash needs udev (systemd-udevd running, /run/udev present); on a container host run it on the machine itself".into(),
            Error::Timeout { .. } => "check the board's USB connection; `kflash watch` shows what the board does".into(),
            Error::Tool { .. } => "read the output above; run the same command by hand to investigate".into(),
            Error::Flash(e) => e.help(),
            Error::Service(e) => return e.help(),
            Error::History(e) => return e.help(),
            Error::Moonraker(e) => return e.help(),
            Error::Can(e) => e.help(),
            Error::Safety(e) => return e.help(),
            Error::Install(e) => e.help(),
            Error::PrinterBusy(_) => "wait for the print to finish (or cancel it), then run kflash again".into(),
            Error::Daemon(doc) => return doc.help.clone(),
            Error::Interrupted(_) => {
                "kflash started Klipper again if it had stopped it; a board interrupted mid-flash may be left in Katapult: run `kflash flash KEY` again".into()
            }
            Error::BoardsUnconfigured(_) => {
                "run `kflash config KEY` for each board above, or pass --skip-unconfigured to flash the others".into()
            }
            Error::BoardsFailed(_) => "each failed board above says what happened and what to do; Klipper runs again, and `kflash flash KEY` retries one board".into(),
            Error::InvalidInput(_) => return None,
        })
    }

    /// A stable name for the kind of error, for `--json` output and scripts.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::FileParse { .. } => "file-parse",
            Error::FileInvalid { .. } => "file-invalid",
            Error::Io { .. } => "io",
            Error::UnknownBoard(_) => "unknown-board",
            Error::BoardConflict(_) => "board-conflict",
            Error::InvalidInput(_) => "invalid-input",
            Error::McuMismatch { .. } => "mcu-mismatch",
            Error::ConfigRejected { .. } => "config-rejected",
            Error::ConfigUnreviewed { .. } => "config-unreviewed",
            Error::ProfileMismatch { .. } => "profile-mismatch",
            Error::NoBoardConfig { .. } => "no-board-config",
            Error::NotKlipperTree { .. } => "not-klipper-tree",
            Error::NoCachedFirmware { .. } => "no-cached-firmware",
            Error::ConfigMigration { .. } => "config-migration",
            Error::BuildFailed { .. } => "build-failed",
            Error::NeedsTerminal(_) => "needs-terminal",
            Error::DeviceNotFound(_) => "device-not-found",
            Error::Udev(_) => "udev",
            Error::Timeout { .. } => "timeout",
            Error::Tool { .. } => "tool",
            Error::Flash(_) => "flash",
            Error::Service(_) => "service",
            Error::History(_) => "history",
            Error::Moonraker(_) => "moonraker",
            Error::Can(e) if e.is_interface() => "can-interface",
            Error::Can(_) => "can",
            Error::PrinterBusy(_) => "printer-busy",
            Error::Safety(crate::safety::SafetyError::Unanswered { .. }) => "print-state-unknown",
            Error::Safety(crate::safety::SafetyError::MoonrakerDownNotConfirmed { .. }) => "moonraker-down",
            Error::Safety(crate::safety::SafetyError::HaltedNotConfirmed { .. }) => "klippy-halted",
            Error::Install(e) => e.kind(),
            Error::Interrupted(_) => "interrupted",
            // The daemon's own kind; leaked once, as the process ends with it.
            Error::Daemon(doc) => Box::leak(doc.kind.clone().into_boxed_str()),
            Error::BoardsUnconfigured(_) => "boards-unconfigured",
            Error::BoardsFailed(_) => "boards-failed",
        }
    }

    pub fn exit_code(&self) -> i32 {
        match self {
            Error::FileParse { .. }
            | Error::FileInvalid { .. }
            | Error::McuMismatch { .. }
            | Error::ConfigRejected { .. }
            | Error::ConfigUnreviewed { .. }
            | Error::ProfileMismatch { .. }
            | Error::NoBoardConfig { .. }
            | Error::NotKlipperTree { .. }
            | Error::ConfigMigration { .. } => exit::CONFIG,
            Error::NoCachedFirmware { .. } => exit::FAILURE,
            Error::BuildFailed { .. } => exit::TOOL,
            Error::NeedsTerminal(_) => exit::USAGE,
            Error::Io { .. } => exit::FAILURE,
            Error::UnknownBoard(_) | Error::BoardConflict(_) | Error::DeviceNotFound(_) => exit::BOARD,
            Error::InvalidInput(_) => exit::USAGE,
            Error::Udev(_) | Error::Timeout { .. } => exit::DEVICE,
            Error::Tool { .. } => exit::TOOL,
            Error::Flash(_) => exit::FLASH,
            Error::Service(_) => exit::SERVICE,
            Error::History(_) => exit::FAILURE,
            Error::Moonraker(_) => exit::MOONRAKER,
            Error::Can(e) => e.exit_code(),
            Error::PrinterBusy(_) => exit::BUSY,
            Error::Safety(e) => e.exit_code(),
            Error::Install(e) => e.exit_code(),
            Error::Interrupted(_) => exit::INTERRUPTED,
            Error::Daemon(doc) => doc.exit_code,
            Error::BoardsUnconfigured(_) => exit::CONFIG,
            Error::BoardsFailed(_) => exit::FLASH,
        }
    }
}
