//! Seeding a new board's firmware config from a board profile (`kflash add --profile`).
//!
//! The profile's fragment goes through the tree's own `make olddefconfig`, on a private copy
//! with a private `OUT=` (see [`crate::firmware::migrate`]), so the result is a complete config
//! for this Klipper tree. Kconfig silently drops a symbol it does not know (or whose
//! dependencies are not met), so every setting of the fragment is checked to have survived.
//! The board is then registered with its config marked unreviewed: flash and flash-all refuse
//! it until `kflash config KEY` has shown it to the user.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::app::boards::{add_board, AddRequest};
use crate::error::{Error, Result};
use crate::hotplug::Board;
use crate::kconfig::{self, assignments, KConfig};
use crate::profiles::Profile;
use crate::registry::{mcu_compatible, store, BoardEntry, Registry};

/// Refuse a profile made for another MCU than the board's.
pub fn check_profile_mcu(profile: &Profile, board_mcu: &str) -> Result<()> {
    if mcu_compatible(&profile.mcu, board_mcu) {
        Ok(())
    } else {
        Err(Error::ProfileMismatch {
            profile: profile.name.clone(),
            profile_mcu: profile.mcu.clone(),
            board_mcu: if board_mcu.is_empty() { "unknown MCU".into() } else { board_mcu.to_string() },
        })
    }
}

/// The profile's settings that are not in `config` with the same value (dropped or changed
/// by olddefconfig), as `CONFIG_X=value` strings.
pub fn lost_settings(profile: &Profile, config: &str) -> Vec<String> {
    let got = assignments(config);
    profile
        .settings
        .iter()
        .filter(|(k, v)| {
            let want = v.trim_matches('"');
            !got.iter().any(|(gk, gv)| gk == k && gv.as_deref() == Some(want))
        })
        .map(|(k, v)| format!("{k}={v}"))
        .collect()
}

/// The MCU a config is for: `CONFIG_MCU`, or `linux` for Klipper's Linux process (whose
/// Kconfig has no `CONFIG_MCU`).
pub fn config_mcu(cfg: &KConfig) -> Option<String> {
    match cfg.mcu() {
        Some(m) => Some(m.to_string()),
        None => (cfg.get("CONFIG_BOARD_DIRECTORY") == Some("linux")).then(|| "linux".to_string()),
    }
}

/// Run the tree's olddefconfig on the profile's fragment and return the complete config.
/// Refused when a setting did not survive or the result is for another MCU.
pub async fn seed_config(klipper: &Path, profile: &Profile, timeout: Duration) -> Result<Vec<u8>> {
    kconfig::check_klipper_dir(klipper)?;
    let work = tempfile::Builder::new()
        .prefix("kflash-seed-")
        .tempdir()
        .map_err(|e| Error::io("create a temporary directory in", std::env::temp_dir(), e))?;
    let fragment = work.path().join(format!("{}.config", profile.name));
    std::fs::write(&fragment, profile.fragment()).map_err(|e| Error::io("write", &fragment, e))?;
    let m = crate::firmware::migrate::check(klipper, &fragment, timeout).await?;
    let text = String::from_utf8_lossy(&m.migrated).into_owned();
    let lost = lost_settings(profile, &text);
    let mcu = config_mcu(&KConfig::parse(&text));
    if !lost.is_empty() || mcu.as_deref() != Some(profile.mcu.as_str()) {
        return Err(Error::Tool {
            program: "make olddefconfig".into(),
            message: format!(
                "the Klipper tree at {} does not accept the board profile '{}': {}{}; nothing was registered or written",
                klipper.display(),
                profile.name,
                if lost.is_empty() { String::new() } else { format!("it dropped {}", lost.join(", ")) },
                match mcu {
                    Some(m) if m != profile.mcu => format!(" (the result is for {m}, not {})", profile.mcu),
                    None => " (the result names no MCU)".into(),
                    _ => String::new(),
                }
            ),
        });
    }
    Ok(m.migrated)
}

/// What `add --profile` did.
#[derive(Debug, Clone)]
pub struct SeededBoard {
    pub entry: BoardEntry,
    pub config: PathBuf,
    pub profile: String,
}

/// Register `board` with a config seeded from `profile`, marked unreviewed. Checked in this
/// order, and nothing is written unless all pass: the profile's MCU against the board's, the
/// registration itself, no config already at the board's path, the seeded config. Then the
/// config is written atomically and boards.toml saved.
pub async fn add_with_profile(
    reg: &mut Registry,
    board: &Board,
    req: &AddRequest,
    profile: &Profile,
) -> Result<SeededBoard> {
    let board_mcu = req.mcu.clone().or_else(|| board.identity.mcu.clone()).unwrap_or_default();
    check_profile_mcu(profile, &board_mcu)?;
    let mut trial = reg.clone();
    let entry = add_board(&mut trial, board, req)?;
    let path = trial.config_path(&entry.key);
    if path.exists() {
        return Err(Error::InvalidInput(format!(
            "{} already exists (kept from an earlier board?): move it aside to seed a new one, or add the board without --profile to use it",
            path.display()
        )));
    }
    let timeout = Duration::from_secs(reg.settings.timeouts.build_secs);
    let config = seed_config(&reg.settings.klipper_dir(), profile, timeout).await?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("create", dir, e))?;
    }
    store::write_atomic(&path, &config)?;
    trial.mark_unreviewed(&entry.key, &profile.name)?;
    if let Err(e) = trial.save_boards() {
        // The board was not registered: its seeded config must not be left to a later board.
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    *reg = trial;
    Ok(SeededBoard { entry, config: path, profile: profile.name.clone() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile() -> Profile {
        Profile::parse(
            "t",
            "# title: T\n# mcu: stm32h723xx\n# source: https://a\n# bootloader: b\nCONFIG_MACH_STM32H723=y\nCONFIG_CANBUS_FREQUENCY=500000\nCONFIG_MCU=\"stm32h723xx\"\n",
        )
        .unwrap()
    }

    #[test]
    fn lost_settings_names_dropped_and_changed_ones() {
        let p = profile();
        let full = "CONFIG_MACH_STM32H723=y\nCONFIG_CANBUS_FREQUENCY=500000\nCONFIG_MCU=\"stm32h723xx\"\n";
        assert!(lost_settings(&p, full).is_empty());
        let changed =
            "# CONFIG_MACH_STM32H723 is not set\nCONFIG_CANBUS_FREQUENCY=1000000\nCONFIG_MCU=\"stm32h723xx\"\n";
        assert_eq!(lost_settings(&p, changed), ["CONFIG_MACH_STM32H723=y", "CONFIG_CANBUS_FREQUENCY=500000"]);
    }

    #[test]
    fn a_profile_for_another_mcu_is_refused() {
        let p = profile();
        assert!(check_profile_mcu(&p, "stm32h723xx").is_ok());
        let e = check_profile_mcu(&p, "rp2040").unwrap_err();
        assert_eq!(e.kind(), "profile-mismatch");
        assert!(e.to_string().contains("rp2040") && e.help().unwrap().contains("kflash profiles"));
    }
}
