//! `kflash config KEY`: edit a board's own Kconfig file with `make menuconfig`, refusing a
//! config for another MCU before anything runs and never keeping one that menuconfig made
//! for another MCU.

use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::kconfig::{self, KConfig};
use crate::registry::{store, Registry};

/// What a board's config says, for `kflash config KEY --show`.
#[derive(Debug, Clone)]
pub struct ConfigSummary {
    pub path: PathBuf,
    /// `None` when the board has no config yet.
    pub config: Option<KConfig>,
}

#[derive(Debug, Clone)]
pub enum Edited {
    /// Saved, for this MCU.
    Saved { path: PathBuf, mcu: String },
    /// menuconfig exited without writing a config.
    NothingSaved { path: PathBuf },
}

/// Load a board's config, refusing one for another MCU.
pub fn checked_config(reg: &Registry, key: &str) -> Result<ConfigSummary> {
    let board = reg.get(key)?;
    let path = reg.config_path(key);
    if !path.exists() {
        return Ok(ConfigSummary { path, config: None });
    }
    let cfg = KConfig::load(&path)?;
    kconfig::check_mcu(board, &path, &cfg)?;
    Ok(ConfigSummary { path, config: Some(cfg) })
}

/// Run menuconfig on the board's file (the terminal is handed to make). A result for another
/// MCU is moved aside to `KEY.config.rejected` and the previous config put back.
pub fn edit_config(reg: &Registry, key: &str) -> Result<Edited> {
    let board = reg.get(key)?;
    // A config for another MCU is refused before anything else happens.
    let ConfigSummary { path, .. } = checked_config(reg, key)?;
    let before = match std::fs::read(&path) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io("read", &path, e)),
    };
    let klipper = reg.settings.klipper_dir();
    kconfig::check_klipper_dir(&klipper)?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io("create directory", parent, e))?;
    }
    let status = kconfig::menuconfig_command(&klipper, &path)
        .status()
        .map_err(|e| Error::Tool { program: "make".into(), message: format!("cannot run make: {e}") })?;
    if !status.success() {
        return Err(Error::Tool { program: "make menuconfig".into(), message: format!("exited with {status}") });
    }
    if !path.exists() {
        return Ok(Edited::NothingSaved { path });
    }
    let cfg = KConfig::load(&path)?;
    if let Err(mismatch) = kconfig::check_mcu(board, &path, &cfg) {
        // Keep what the user made, but put the board's working config back.
        let rejected = path.with_extension("config.rejected");
        std::fs::copy(&path, &rejected).map_err(|e| Error::io("keep a copy at", &rejected, e))?;
        match &before {
            Some(b) => store::write_atomic(&path, b)?,
            None => std::fs::remove_file(&path).map_err(|e| Error::io("remove", &path, e))?,
        }
        return Err(Error::ConfigRejected {
            key: key.to_string(),
            message: format!(
                "{mismatch}; your new config was kept at {} and the previous one restored",
                rejected.display()
            ),
        });
    }
    Ok(Edited::Saved { path, mcu: cfg.mcu().unwrap_or("?").to_string() })
}
