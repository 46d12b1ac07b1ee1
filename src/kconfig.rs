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

/// `make -C <klipper_dir> KCONFIG_CONFIG=<abs config> OUT=<abs out>/ menuconfig`. Both go on
/// the command line: Klipper's Makefile ignores KCONFIG_CONFIG in the environment, and every
/// make run (menuconfig included) remakes `$(OUT)board-link`, so without a private OUT= it
/// would repoint the tree's own `out/board` and break the user's in-tree build.
pub fn menuconfig_command(klipper_dir: &Path, config: &Path, out_dir: &Path) -> Command {
    let mut cmd = Command::new("make");
    cmd.arg("-C").arg(klipper_dir).arg(kconfig_arg(config)).arg(out_arg(out_dir)).arg("menuconfig");
    cmd
}

pub fn kconfig_arg(config: &Path) -> String {
    format!("KCONFIG_CONFIG={}", absolute(config).display())
}

/// `OUT=<abs dir>/`: Klipper's targets are `$(OUT)klipper.elf`, so it must end in `/`.
pub fn out_arg(out_dir: &Path) -> String {
    let mut out = absolute(out_dir).display().to_string();
    if !out.ends_with('/') {
        out.push('/');
    }
    format!("OUT={out}")
}

/// Every assignment of a `.config`, in file order: `Some(value)` (quotes kept off strings)
/// or `None` for `# CONFIG_X is not set`.
pub fn assignments(text: &str) -> Vec<(String, Option<String>)> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            if let Some(name) = l.strip_prefix("# ").and_then(|r| r.strip_suffix(" is not set")) {
                return name.starts_with("CONFIG_").then(|| (name.to_string(), None));
            }
            let (k, v) = l.split_once('=')?;
            k.starts_with("CONFIG_").then(|| (k.to_string(), Some(v.trim().trim_matches('"').to_string())))
        })
        .collect()
}

/// Settings a board depends on to boot and talk to the host: the MCU, the bootloader offset
/// (application start), the clock reference and frequency, the communication interface and
/// its pins, the USB serial number and the CAN bus speed. A silent change to one of these can
/// leave a board unbootable or unreachable.
pub fn is_critical(key: &str) -> bool {
    let k = key.strip_prefix("CONFIG_").unwrap_or(key);
    const EXACT: [&str; 13] = [
        "MCU",
        "FLASH_APPLICATION_ADDRESS",
        "CLOCK_FREQ",
        "CLOCK_REF_FREQ",
        "USBSERIAL",
        "USBCANBUS",
        "CANSERIAL",
        "SERIAL",
        "SERIAL_BAUD",
        "CANBUS_FREQUENCY",
        "USB_SERIAL_NUMBER",
        "USB_SERIAL_NUMBER_CHIPID",
        "RPXXXX_HAVE_BOOTLOADER",
    ];
    EXACT.contains(&k)
        || k.contains("FLASH_START")
        || k.contains("CLOCK_REF")
        || k.contains("CRYSTAL")
        // interface/pin choices: STM32_USB_PA11_PA12, STM32_SERIAL_USART1, STM32_CANBUS_PB8_PB9,
        // STM32_USBCANBUS_PA11_PA12, RPXXXX_SERIAL_UART0_PINS_0_1, RPXXXX_CANBUS_GPIO_RX, ...
        || k.contains("_USB_P")
        || k.contains("_SERIAL_USART")
        || k.contains("_SERIAL_UART")
        || k.contains("_SERIAL_LPUART")
        || k.contains("_CANBUS_")
        || k.contains("_USBCANBUS_")
        || k.contains("_CMD_")
        || k.starts_with("CANBUS_")
}

/// The communication interface a config selects, for people.
pub fn interface(cfg: &KConfig) -> Option<String> {
    let set = |k: &str| cfg.get(k) == Some("y");
    let base = if set("CONFIG_USBCANBUS") {
        format!("USB to CAN bus bridge, CAN {} bit/s", cfg.get("CONFIG_CANBUS_FREQUENCY").unwrap_or("?"))
    } else if set("CONFIG_CANSERIAL") {
        format!("CAN bus, {} bit/s", cfg.get("CONFIG_CANBUS_FREQUENCY").unwrap_or("?"))
    } else if set("CONFIG_USBSERIAL") {
        "USB".to_string()
    } else if set("CONFIG_SERIAL") {
        format!("serial (UART), {} baud", cfg.get("CONFIG_SERIAL_BAUD").unwrap_or("?"))
    } else {
        return None;
    };
    // The selected pin choice, e.g. CONFIG_STM32_USB_PA11_PA12 or CONFIG_STM32_SERIAL_USART1.
    let pins = cfg
        .values
        .iter()
        .filter(|(k, v)| {
            v.as_str() == "y"
                && is_critical(k)
                && !["CONFIG_USBSERIAL", "CONFIG_USBCANBUS", "CONFIG_CANSERIAL", "CONFIG_SERIAL"].contains(&k.as_str())
                && !k.contains("CLOCK_REF")
                && !k.contains("FLASH_START")
                && !k.contains("SERIAL_NUMBER")
                && !k.contains("BOOTLOADER")
        })
        .map(|(k, _)| k.as_str())
        .next();
    Some(match pins {
        Some(p) => format!("{base} ({p})"),
        None => base,
    })
}

/// The clock reference (external crystal or internal) and the CPU frequency, for people.
pub fn clock(cfg: &KConfig) -> Option<String> {
    let freq = cfg.get("CONFIG_CLOCK_FREQ").and_then(|f| f.parse::<u64>().ok());
    let reference = match cfg.get("CONFIG_CLOCK_REF_FREQ").and_then(|f| f.parse::<u64>().ok()) {
        Some(0) => Some("internal clock".to_string()),
        Some(hz) => Some(format!("{} MHz crystal", hz as f64 / 1e6)),
        None => cfg
            .values
            .iter()
            .find(|(k, v)| v.as_str() == "y" && k.contains("CLOCK_REF_"))
            .map(|(k, _)| k.trim_start_matches("CONFIG_").to_string()),
    };
    match (freq, reference) {
        (Some(f), Some(r)) => Some(format!("{} MHz, {r}", f as f64 / 1e6)),
        (Some(f), None) => Some(format!("{} MHz", f as f64 / 1e6)),
        (None, Some(r)) => Some(r),
        (None, None) => None,
    }
}

/// Where the firmware starts and what that says about a bootloader, for people.
pub fn bootloader_offset(cfg: &KConfig) -> Option<String> {
    let app = cfg.application_address()?;
    let boot = cfg
        .get("CONFIG_FLASH_BOOT_ADDRESS")
        .and_then(|v| u32::from_str_radix(v.trim_start_matches("0x").trim_start_matches("0X"), 16).ok());
    // The start of flash: the boot address rounded down to 4 KiB (rp2040 boots at 0x10000100,
    // after its 256-byte second stage), else the address's top byte.
    let flash_start = boot.map(|b| b & !0xfff).unwrap_or(app & 0xff00_0000);
    Some(match app.checked_sub(flash_start) {
        Some(0) => format!("application at {app:#x} (no bootloader)"),
        Some(off) if off <= 0x100 => {
            format!("application at {app:#x} (no bootloader, after the {off}-byte boot stage)")
        }
        Some(off) => format!("application at {app:#x} ({} KiB bootloader offset)", off / 1024),
        None => format!("application at {app:#x}"),
    })
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
            canbus_uuid: None,
            can_interface: None,
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
    fn show_helpers_describe_clock_interface_and_offset() {
        let c = KConfig::parse(&format!(
            "{H723}CONFIG_FLASH_BOOT_ADDRESS=0x8000000\nCONFIG_CLOCK_REF_FREQ=25000000\nCONFIG_USBSERIAL=y\nCONFIG_STM32_USB_PA11_PA12=y\n"
        ));
        assert_eq!(clock(&c).as_deref(), Some("520 MHz, 25 MHz crystal"));
        assert_eq!(interface(&c).as_deref(), Some("USB (CONFIG_STM32_USB_PA11_PA12)"));
        assert_eq!(bootloader_offset(&c).as_deref(), Some("application at 0x8020000 (128 KiB bootloader offset)"));
        let rp = KConfig::parse("CONFIG_FLASH_BOOT_ADDRESS=0x10000100\nCONFIG_FLASH_APPLICATION_ADDRESS=0x10004000\n");
        assert_eq!(bootloader_offset(&rp).as_deref(), Some("application at 0x10004000 (16 KiB bootloader offset)"));
        let rp = KConfig::parse("CONFIG_FLASH_BOOT_ADDRESS=0x10000100\nCONFIG_FLASH_APPLICATION_ADDRESS=0x10000100\n");
        assert_eq!(
            bootloader_offset(&rp).as_deref(),
            Some("application at 0x10000100 (no bootloader, after the 256-byte boot stage)")
        );
        let can = KConfig::parse("CONFIG_CANSERIAL=y\nCONFIG_CANBUS_FREQUENCY=500000\n");
        assert_eq!(interface(&can).as_deref(), Some("CAN bus, 500000 bit/s"));
    }

    #[test]
    fn critical_keys() {
        for k in [
            "CONFIG_MCU",
            "CONFIG_FLASH_APPLICATION_ADDRESS",
            "CONFIG_STM32_FLASH_START_20000",
            "CONFIG_CLOCK_FREQ",
            "CONFIG_STM32_CLOCK_REF_25M",
            "CONFIG_USBSERIAL",
            "CONFIG_STM32_SERIAL_USART1",
            "CONFIG_USB_SERIAL_NUMBER",
            "CONFIG_CANBUS_FREQUENCY",
            "CONFIG_RPXXXX_CANBUS_GPIO_RX",
        ] {
            assert!(is_critical(k), "{k}");
        }
        for k in ["CONFIG_WANT_SENSORS", "CONFIG_INITIAL_PINS", "CONFIG_HAVE_GPIO", "CONFIG_STACK_SIZE"] {
            assert!(!is_critical(k), "{k}");
        }
    }

    #[test]
    fn assignments_keep_unset_symbols() {
        let a = assignments("# c\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_S=\"x y\"\n");
        assert_eq!(
            a,
            vec![
                ("CONFIG_A".to_string(), Some("y".to_string())),
                ("CONFIG_B".to_string(), None),
                ("CONFIG_S".to_string(), Some("x y".to_string()))
            ]
        );
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
    fn menuconfig_puts_kconfig_and_out_on_the_command_line() {
        let cmd = menuconfig_command(
            Path::new("/home/pi/klipper"),
            Path::new("/cfg/kflash/configs/a.config"),
            Path::new("/tmp/kflash-menuconfig"),
        );
        let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(
            args,
            [
                "-C",
                "/home/pi/klipper",
                "KCONFIG_CONFIG=/cfg/kflash/configs/a.config",
                "OUT=/tmp/kflash-menuconfig/",
                "menuconfig"
            ]
        );
        assert_eq!(cmd.get_program(), "make");
    }
}
