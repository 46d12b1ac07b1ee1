//! Where a registered board is found: a USB device (its chip-id serial or by-id pattern; the
//! tty, its bootloader and its re-enumerations follow from there) or a node on a CAN bus,
//! known by interface and UUID. This replaces the assumption that every board is a USB tty.

use std::fmt;

use crate::can::CanUuid;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Locator {
    /// A USB board, including a USB-to-CAN bridge (flashed over USB).
    Usb { serial: Option<String>, serial_pattern: Option<String> },
    /// A CAN node behind `interface`.
    Can { interface: String, uuid: CanUuid },
}

impl Locator {
    pub fn is_can(&self) -> bool {
        matches!(self, Locator::Can { .. })
    }
}

impl fmt::Display for Locator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Locator::Usb { serial: Some(s), .. } => write!(f, "USB serial {s}"),
            Locator::Usb { serial_pattern: Some(p), .. } => write!(f, "USB {p}"),
            Locator::Usb { .. } => f.write_str("USB"),
            Locator::Can { interface, uuid } => write!(f, "CAN {interface} uuid {uuid}"),
        }
    }
}

/// Linux interface names: 1–15 bytes, no '/', ':' or whitespace.
pub fn check_interface_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name.bytes().any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace());
    if ok {
        Ok(())
    } else {
        Err(format!("'{name}' is not a network interface name (like can0)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names() {
        for good in ["can0", "vcan0", "can-toolhead"] {
            assert!(check_interface_name(good).is_ok(), "{good}");
        }
        for bad in ["", "can 0", "a/b", "can0:1", "sixteen-chars-xx", ".."] {
            assert!(check_interface_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn display_says_how_the_board_is_found() {
        let can = Locator::Can { interface: "can0".into(), uuid: "0a1b2c3d4e5f".parse().unwrap() };
        assert_eq!(can.to_string(), "CAN can0 uuid 0a1b2c3d4e5f");
        assert!(can.is_can());
        let usb = Locator::Usb { serial: Some("ABC".into()), serial_pattern: None };
        assert_eq!(usb.to_string(), "USB serial ABC");
        assert!(!usb.is_can());
    }
}
