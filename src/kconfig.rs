//! A board's cached Kconfig file (`configs/<key>.config`): what it says about the MCU and
//! flash layout, and running `make menuconfig` on it without touching the user's own
//! `klipper/.config`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};
use crate::registry::{mcu_compatible, BoardEntry};

/// The parts of a Klipper `.config` kflash cares about.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KConfig {
    values: BTreeMap<String, String>,
}

impl KConfig {
    /// Parse `CONFIG_X=value` lines; comments (`# CONFIG_Y is not set`) and blanks are skipped.
    pub fn parse(text: &str) -> KConfig {
        let values = text
            .lines()
            .filter_map(|l| l.trim().split_once('='))
            .filter(|(k, _)| k.starts_with("CONFIG_"))
            .map(|(k, v)| (k.to_string(), v.trim().trim_matches('"').to_string()))
            .collect();
        KConfig { values }
    }

    pub fn load(path: &Path) -> Result<KConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("read", path, e))?;
        Ok(KConfig::parse(&text))
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// `CONFIG_MCU`, e.g. `stm32h723xx`.
    pub fn mcu(&self) -> Option<&str> {
        self.get("CONFIG_MCU")
    }

    /// `CONFIG_FLASH_APPLICATION_ADDRESS` (where Katapult must jump), if set.
    pub fn application_address(&self) -> Option<u32> {
        let v = self.get("CONFIG_FLASH_APPLICATION_ADDRESS")?;
        match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
            Some(hex) => u32::from_str_radix(hex, 16).ok(),
            None => v.parse().ok(),
        }
    }
}

/// Refuse a config whose `CONFIG_MCU` is not the board's MCU.
pub fn check_mcu(board: &BoardEntry, path: &Path, cfg: &KConfig) -> Result<()> {
    match cfg.mcu() {
        Some(mcu) if mcu_compatible(&board.mcu, mcu) => Ok(()),
        found => Err(Error::McuMismatch {
            key: board.key.clone(),
            board_mcu: board.mcu.clone(),
            config_mcu: found.unwrap_or("no CONFIG_MCU at all").to_string(),
            path: path.to_path_buf(),
        }),
    }
}

/// `make -C <klipper_dir> KCONFIG_CONFIG=<abs config> menuconfig`. KCONFIG_CONFIG goes on
/// the command line because Klipper's Makefile ignores it in the environment.
pub fn menuconfig_command(klipper_dir: &Path, config: &Path) -> Command {
    let mut cmd = Command::new("make");
    cmd.arg("-C").arg(klipper_dir).arg(kconfig_arg(config)).arg("menuconfig");
    cmd
}

pub fn kconfig_arg(config: &Path) -> String {
    format!("KCONFIG_CONFIG={}", absolute(config).display())
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().map(|d| d.join(p)).unwrap_or_else(|_| p.to_path_buf())
    }
}

/// Check that a directory looks like a Klipper/Kalico source tree.
pub fn check_klipper_dir(dir: &Path) -> Result<()> {
    if dir.join("Makefile").is_file() {
        Ok(())
    } else {
        Err(Error::NotKlipperTree { path: dir.to_path_buf() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::FlashMethod;

    const H723: &str = "# Automatically generated file; DO NOT EDIT.\nCONFIG_LOW_LEVEL_OPTIONS=y\nCONFIG_MACH_STM32=y\nCONFIG_BOARD_DIRECTORY=\"stm32\"\nCONFIG_MCU=\"stm32h723xx\"\nCONFIG_CLOCK_FREQ=520000000\nCONFIG_FLASH_APPLICATION_ADDRESS=0x8020000\n# CONFIG_USB_SERIAL_NUMBER_CHIPID is not set\n";

    fn board(mcu: &str) -> BoardEntry {
        BoardEntry {
            key: "octopus".into(),
            name: "Octopus".into(),
            mcu: mcu.into(),
            serial: Some("1".into()),
            serial_pattern: None,
            flash_method: FlashMethod::Default,
            flashable: true,
        }
    }

    #[test]
    fn parses_mcu_and_application_address() {
        let c = KConfig::parse(H723);
        assert_eq!(c.mcu(), Some("stm32h723xx"));
        assert_eq!(c.application_address(), Some(0x0802_0000));
        assert_eq!(c.get("CONFIG_BOARD_DIRECTORY"), Some("stm32"));
        assert_eq!(c.get("CONFIG_USB_SERIAL_NUMBER_CHIPID"), None);
    }

    #[test]
    fn mcu_check() {
        let c = KConfig::parse(H723);
        let p = Path::new("/c/octopus.config");
        assert!(check_mcu(&board("stm32h723xx"), p, &c).is_ok());
        assert!(check_mcu(&board("stm32h723"), p, &c).is_ok());
        let e = check_mcu(&board("rp2040"), p, &c).unwrap_err();
        assert_eq!(
            e.to_string(),
            "board 'octopus' is an rp2040 but its firmware config /c/octopus.config is for stm32h723xx"
        );
        let e = check_mcu(&board("rp2040"), p, &KConfig::parse("")).unwrap_err();
        assert!(e.to_string().contains("no CONFIG_MCU"));
    }

    #[test]
    fn menuconfig_puts_kconfig_on_the_command_line() {
        let cmd = menuconfig_command(Path::new("/home/pi/klipper"), Path::new("/cfg/kflash/configs/a.config"));
        let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(args, ["-C", "/home/pi/klipper", "KCONFIG_CONFIG=/cfg/kflash/configs/a.config", "menuconfig"]);
        assert_eq!(cmd.get_program(), "make");
    }
}
