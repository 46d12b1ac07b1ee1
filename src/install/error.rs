//! What can go wrong installing or uninstalling the service, each with what to do about it.

use std::path::PathBuf;

use crate::error::exit;

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("`kflash {command}` changes system files and needs root")]
    NotRoot { command: &'static str },

    #[error("could not tell which user runs Klipper ({tried})")]
    NoPrinterUser { tried: String },

    #[error("there is no user named '{0}'")]
    UnknownUser(String),

    #[error("{what} '{value}' cannot go into a unit or sudoers file ({why})")]
    BadName { what: &'static str, value: String, why: &'static str },

    #[error("the install manifest {} is unreadable: {message}", path.display())]
    BrokenManifest { path: PathBuf, message: String },

    #[error("could not {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("visudo is not installed, so the sudoers rule cannot be checked before it is put in place")]
    NoVisudo,

    #[error("visudo rejected the sudoers rule kflash wrote ({message}); nothing was put in /etc/sudoers.d")]
    SudoersInvalid { message: String },

    #[error("`{command}` failed ({status}){}", if stderr.is_empty() { String::new() } else { format!(": {stderr}") })]
    Command { command: String, status: String, stderr: String },

    #[error("interrupted by {0}")]
    Interrupted(&'static str),

    /// The install failed and what it had done is undone (or, in `not_undone`, could not be).
    #[error("{cause}\n  {}", rollback_summary(.undone, .not_undone))]
    RolledBack { cause: Box<InstallError>, undone: Vec<String>, not_undone: Vec<String> },

    /// The uninstall stopped part way: the manifest still lists what is left.
    #[error("{cause}\n  done before it stopped: {}", if .done.is_empty() { "nothing".to_string() } else { .done.join("; ") })]
    UninstallStopped { cause: Box<InstallError>, done: Vec<String> },
}

fn rollback_summary(undone: &[String], not_undone: &[String]) -> String {
    if not_undone.is_empty() {
        if undone.is_empty() {
            "nothing had been changed yet".to_string()
        } else {
            format!("everything this install had changed was undone ({} steps)", undone.len())
        }
    } else {
        format!("could NOT undo: {}", not_undone.join("; "))
    }
}

impl InstallError {
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> InstallError {
        InstallError::Io { action, path: path.into(), source }
    }

    pub fn help(&self) -> String {
        match self {
            InstallError::NotRoot { command } => {
                format!("rerun it with sudo: `sudo kflash {command}` (`--dry-run` shows what it would change without root)")
            }
            InstallError::NoPrinterUser { .. } => "pass --user NAME: the user Klipper runs as (often pi)".into(),
            InstallError::UnknownUser(_) => "pass --user with an existing user: the one Klipper runs as".into(),
            InstallError::BadName { .. } => {
                "use a plain name (letters, digits, '.', '_', '-', '@'); for a bindir, a path without spaces".into()
            }
            InstallError::BrokenManifest { path, .. } => format!(
                "kflash will not guess what an earlier install changed: repair {} (it is JSON), or undo the install by hand and delete it",
                path.display()
            ),
            InstallError::Io { .. } => "check that the path exists and that you may write it".into(),
            InstallError::NoVisudo => "install sudo (`apt install sudo`), or pass --no-sudoers".into(),
            InstallError::SudoersInvalid { .. } => {
                "this is a kflash bug: please report it with the message above; pass --no-sudoers to install without the rule".into()
            }
            InstallError::Command { .. } => "run the command by hand to see why it fails, fix that, then run kflash again".into(),
            InstallError::Interrupted(_) => "run the command again when you are ready".into(),
            InstallError::RolledBack { cause, not_undone, .. } if not_undone.is_empty() => cause.help(),
            InstallError::RolledBack { .. } => {
                "undo the steps listed as not undone by hand; `kflash uninstall` undoes what the manifest lists".into()
            }
            InstallError::UninstallStopped { cause, .. } => format!(
                "{}; then run `kflash uninstall` again: the manifest still lists what is left to undo",
                cause.help()
            ),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            InstallError::NotRoot { .. } => "not-root",
            InstallError::NoPrinterUser { .. } | InstallError::UnknownUser(_) => "no-printer-user",
            InstallError::BadName { .. } => "bad-name",
            InstallError::BrokenManifest { .. } => "broken-manifest",
            InstallError::Io { .. } => "io",
            InstallError::NoVisudo | InstallError::SudoersInvalid { .. } => "sudoers",
            InstallError::Command { .. } => "command-failed",
            InstallError::Interrupted(_) => "interrupted",
            InstallError::RolledBack { cause, .. } | InstallError::UninstallStopped { cause, .. } => cause.kind(),
        }
    }

    pub fn exit_code(&self) -> i32 {
        match self {
            InstallError::NotRoot { .. } | InstallError::BadName { .. } => exit::USAGE,
            InstallError::NoPrinterUser { .. } | InstallError::UnknownUser(_) => exit::USAGE,
            InstallError::BrokenManifest { .. } => exit::CONFIG,
            InstallError::Io { .. } => exit::FAILURE,
            InstallError::NoVisudo | InstallError::SudoersInvalid { .. } | InstallError::Command { .. } => exit::TOOL,
            InstallError::Interrupted(_) => exit::INTERRUPTED,
            InstallError::RolledBack { cause, .. } | InstallError::UninstallStopped { cause, .. } => cause.exit_code(),
        }
    }
}
