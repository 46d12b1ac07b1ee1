//! `kflash config KEY`: edit a board's own Kconfig file with `make menuconfig`, refusing a
//! config for another MCU before anything runs and never keeping one that menuconfig made
//! for another MCU.
//!
//! menuconfig runs on a private copy of the board's config with a private `OUT=`: Klipper's
//! Makefile remakes `$(OUT)board-link` on every run (menuconfig included), so without it the
//! tree's own `out/board` would be repointed at this board's architecture, and a config older
//! than `src/Kconfig` would be rewritten in place (leaving `.config.old`). The board's file is
//! only replaced, atomically, when menuconfig saved something different.

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

impl ConfigSummary {
    /// The settings a user checks, as (label, value) pairs: MCU, clock, interface, bootloader
    /// offset. Missing ones say so.
    pub fn highlights(&self) -> Vec<(&'static str, String)> {
        let Some(cfg) = &self.config else { return Vec::new() };
        let none = || "not set".to_string();
        vec![
            ("MCU", cfg.mcu().map(str::to_string).unwrap_or_else(none)),
            ("clock", kconfig::clock(cfg).unwrap_or_else(none)),
            ("interface", kconfig::interface(cfg).unwrap_or_else(none)),
            ("bootloader offset", kconfig::bootloader_offset(cfg).unwrap_or_else(none)),
            (
                "USB serial number",
                match (cfg.get("CONFIG_USB_SERIAL_NUMBER_CHIPID"), cfg.get("CONFIG_USB_SERIAL_NUMBER")) {
                    (Some("y"), _) => "chip id".to_string(),
                    (_, Some(s)) => s.to_string(),
                    _ => none(),
                },
            ),
        ]
    }
}

#[derive(Debug, Clone)]
pub enum Edited {
    /// Saved, for this MCU.
    Saved { path: PathBuf, mcu: String },
    /// menuconfig saved nothing new: the board's config is as it was.
    Unchanged { path: PathBuf },
    /// menuconfig exited without writing a config, and the board has none.
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

/// Run menuconfig on a copy of the board's file (the terminal is handed to make). A result
/// for another MCU is kept aside at `KEY.config.rejected` and the board's config left alone.
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
    let work = tempfile::Builder::new()
        .prefix("kflash-menuconfig-")
        .tempdir()
        .map_err(|e| Error::io("create a temporary directory in", std::env::temp_dir(), e))?;
    // A new board gets an empty file: menuconfig starts from the defaults, and make does not
    // run olddefconfig to create a default config that would look like a saved one.
    let copy = work.path().join(format!("{key}.config"));
    std::fs::write(&copy, before.as_deref().unwrap_or_default()).map_err(|e| Error::io("write", &copy, e))?;
    let status = kconfig::menuconfig_command(&klipper, &copy, &work.path().join("out"))
        .status()
        .map_err(|e| Error::Tool { program: "make".into(), message: format!("cannot run make: {e}") })?;
    if !status.success() {
        return Err(Error::Tool {
            program: "make menuconfig".into(),
            message: format!("exited with {status}; {} was not changed", path.display()),
        });
    }
    let after = std::fs::read(&copy).map_err(|e| Error::io("read", &copy, e))?;
    if after.is_empty() {
        return Ok(Edited::NothingSaved { path });
    }
    if before.as_deref() == Some(after.as_slice()) {
        return Ok(Edited::Unchanged { path });
    }
    let cfg = KConfig::parse(&String::from_utf8_lossy(&after));
    if let Err(mismatch) = kconfig::check_mcu(board, &path, &cfg) {
        // Keep what the user made; the board's working config was never touched.
        let rejected = path.with_extension("config.rejected");
        store::write_atomic(&rejected, &after)?;
        return Err(Error::ConfigRejected {
            key: key.to_string(),
            message: format!(
                "{mismatch}; your new config was kept at {} and the previous one left in place",
                rejected.display()
            ),
        });
    }
    store::write_atomic(&path, &after)?;
    Ok(Edited::Saved { path, mcu: cfg.mcu().unwrap_or("?").to_string() })
}

/// After menuconfig saved or confirmed a board's config: clear its "seeded from a profile,
/// not reviewed" mark. Reopens the registry so nothing changed meanwhile is lost. Returns the
/// profile the config was seeded from, if it was unreviewed.
pub fn mark_reviewed(dir: &std::path::Path, key: &str) -> Result<Option<String>> {
    let mut reg = Registry::open(dir)?;
    let profile = reg.unreviewed_profile(key).map(str::to_string);
    if reg.mark_reviewed(key) {
        reg.save_boards()?;
    }
    Ok(profile)
}
