//! Board identity: what a USB serial device is (Klipper, Katapult, ROM bootloader or some
//! other serial adapter), which MCU it carries, its chip-id serial and the USB port it sits
//! on — derived from udev properties, never from the by-id name alone.
//!
//! The same physical board changes its by-id name, VID:PID and often its ttyACM number as
//! it moves Klipper → Katapult → Klipper; [`BoardIdentity::same_board`] is how the rest of
//! kflash recognises it across those re-enumerations.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

/// USB vendor id shared by Klipper and Katapult (OpenMoko's allocation).
pub const VID_OPENMOKO: &str = "1d50";
/// Klipper application firmware.
pub const PID_KLIPPER: &str = "614e";
/// Katapult (formerly CanBoot) bootloader.
pub const PID_KATAPULT: &str = "6177";
/// Klipper's USB-to-CAN bridge (gs_usb).
pub const PID_CAN_BRIDGE: &str = "606f";

/// Mask ROM bootloaders a board can fall into instead of Katapult.
const ROM_BOOTLOADERS: &[(&str, &str, &str)] =
    &[("0483", "df11", "STM32 ROM DFU"), ("2e8a", "0003", "RP2040 BOOTSEL"), ("2e8a", "000f", "RP2350 BOOTSEL")];

/// What the device is running right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Klipper/Kalico application firmware (1d50:614e, `usb-Klipper_…`).
    Klipper,
    /// Katapult or legacy CanBoot bootloader (1d50:6177, `usb-katapult_…`, `usb-CanBoot_…`).
    Katapult,
    /// A chip's mask-ROM bootloader (STM32 DFU, RP2040 BOOTSEL): no tty, not flashable by Katapult.
    RomBootloader,
    /// Any other USB serial device (CH340, FTDI, a probe…): shown, never flashed.
    Other,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Klipper => "klipper",
            Mode::Katapult => "katapult",
            Mode::RomBootloader => "rom-bootloader",
            Mode::Other => "other",
        }
    }

    /// Klipper and Katapult boards are the ones kflash can register and flash.
    pub fn is_eligible(self) -> bool {
        matches!(self, Mode::Klipper | Mode::Katapult)
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A udev device as kflash sees it: owned data, safe to send across threads (libudev objects
/// stay on the monitor thread).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    pub syspath: String,
    pub subsystem: String,
    pub devnode: Option<String>,
    pub properties: BTreeMap<String, String>,
}

/// Everything kflash knows about one USB serial device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BoardIdentity {
    pub mode: Mode,
    /// MCU as the firmware reports it in the USB product string, e.g. `stm32h723xx`.
    pub mcu: Option<String>,
    /// USB serial number; Klipper and Katapult both use the chip id by default.
    pub serial: Option<String>,
    pub vendor_id: Option<String>,
    pub product_id: Option<String>,
    /// USB manufacturer string (`Klipper`, `katapult`, `CanBoot`, …).
    pub manufacturer: Option<String>,
    /// udev's `ID_PATH` (physical port + interface), stable across re-enumerations.
    pub port_path: Option<String>,
    /// The USB device (not interface) this sits on, e.g. `/devices/.../usb1/1-1`.
    pub usb_device: Option<String>,
    pub devnode: Option<String>,
    pub by_id: Option<String>,
    pub by_path: Option<String>,
    pub syspath: String,
    /// Human description for ROM bootloaders (e.g. "STM32 ROM DFU").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rom_bootloader: Option<&'static str>,
}

impl BoardIdentity {
    /// Derive an identity from a udev record. Returns `None` for devices that are not USB
    /// serial devices or known ROM bootloaders (e.g. `/dev/ttyS0`, a USB hub).
    pub fn from_record(rec: &DeviceRecord) -> Option<BoardIdentity> {
        let prop = |k: &str| rec.properties.get(k).filter(|v| !v.is_empty()).cloned();
        // systemd ≥ 252 emits ID_USB_*; older ones only ID_*. Prefer the USB-specific ones.
        let pick = |a: &str, b: &str| prop(a).or_else(|| prop(b));

        let vendor_id = pick("ID_USB_VENDOR_ID", "ID_VENDOR_ID").map(|v| v.to_ascii_lowercase());
        let product_id = pick("ID_USB_MODEL_ID", "ID_MODEL_ID").map(|v| v.to_ascii_lowercase());
        let links: Vec<&str> =
            rec.properties.get("DEVLINKS").map(|l| l.split_whitespace().collect()).unwrap_or_default();
        let by_id = links.iter().find(|l| l.starts_with("/dev/serial/by-id/")).map(|s| s.to_string());
        let by_path = links.iter().find(|l| l.starts_with("/dev/serial/by-path/")).map(|s| s.to_string());
        let usb_device = usb_device_of(&rec.syspath);

        if rec.subsystem == "usb" {
            // Only whole USB devices in a mask-ROM bootloader interest us.
            let (vid, pid) = (
                prop("ID_VENDOR_ID").or_else(|| prop("ID_USB_VENDOR_ID")),
                prop("ID_MODEL_ID").or_else(|| prop("ID_USB_MODEL_ID")),
            );
            let (vid, pid) = match (vid, pid) {
                (Some(v), Some(p)) => (v.to_ascii_lowercase(), p.to_ascii_lowercase()),
                _ => (
                    prop("PRODUCT").and_then(|p| vid_pid_from_product(&p).map(|x| x.0))?,
                    prop("PRODUCT").and_then(|p| vid_pid_from_product(&p).map(|x| x.1))?,
                ),
            };
            if vid == VID_OPENMOKO && pid == PID_CAN_BRIDGE {
                // Klipper's USB-to-CAN bridge: no tty, but Klipper runs on it (the USB product
                // string is its CONFIG_MCU, the serial its chip id, as for a USB board).
                let attr = |f: &str| {
                    std::fs::read_to_string(std::path::Path::new(&rec.syspath).join(f))
                        .ok()
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty())
                };
                return Some(BoardIdentity {
                    mode: Mode::Klipper,
                    mcu: pick("ID_USB_MODEL", "ID_MODEL").or_else(|| attr("product")),
                    serial: pick("ID_USB_SERIAL_SHORT", "ID_SERIAL_SHORT").or_else(|| attr("serial")),
                    vendor_id: Some(vid),
                    product_id: Some(pid),
                    manufacturer: pick("ID_USB_VENDOR", "ID_VENDOR"),
                    port_path: prop("ID_PATH"),
                    usb_device: Some(rec.syspath.clone()),
                    devnode: None,
                    by_id: None,
                    by_path: None,
                    syspath: rec.syspath.clone(),
                    rom_bootloader: None,
                });
            }
            let rom = rom_bootloader_name(&vid, &pid)?;
            return Some(BoardIdentity {
                mode: Mode::RomBootloader,
                mcu: None,
                serial: pick("ID_USB_SERIAL_SHORT", "ID_SERIAL_SHORT"),
                vendor_id: Some(vid),
                product_id: Some(pid),
                manufacturer: pick("ID_USB_VENDOR", "ID_VENDOR"),
                port_path: prop("ID_PATH"),
                usb_device: Some(rec.syspath.clone()),
                devnode: rec.devnode.clone(),
                by_id: None,
                by_path: None,
                syspath: rec.syspath.clone(),
                rom_bootloader: Some(rom),
            });
        }

        // A tty that is not on USB (ttyS*, a pty, a console) is not a board.
        let is_usb = prop("ID_BUS").as_deref() == Some("usb") || vendor_id.is_some() || by_id.is_some();
        if rec.subsystem != "tty" || !is_usb {
            return None;
        }

        let name = by_id.as_deref().and_then(ByIdName::from_link);
        let manufacturer = pick("ID_USB_VENDOR", "ID_VENDOR").or_else(|| name.as_ref().map(|n| n.vendor.clone()));
        let mode = classify(vendor_id.as_deref(), product_id.as_deref(), manufacturer.as_deref());
        let model = pick("ID_USB_MODEL", "ID_MODEL").or_else(|| name.as_ref().map(|n| n.model.clone()));
        let serial =
            pick("ID_USB_SERIAL_SHORT", "ID_SERIAL_SHORT").or_else(|| name.as_ref().and_then(|n| n.serial.clone()));
        let mcu = if mode.is_eligible() { model } else { None };

        Some(BoardIdentity {
            mode,
            mcu,
            serial,
            vendor_id,
            product_id,
            manufacturer,
            port_path: prop("ID_PATH"),
            usb_device,
            devnode: rec.devnode.clone(),
            by_id,
            by_path,
            syspath: rec.syspath.clone(),
            rom_bootloader: None,
        })
    }

    /// Klipper's USB-to-CAN bridge (1d50:606f).
    pub fn is_can_bridge(&self) -> bool {
        self.vendor_id.as_deref() == Some(VID_OPENMOKO) && self.product_id.as_deref() == Some(PID_CAN_BRIDGE)
    }

    /// A bridge's own CAN UUID, from its USB serial (`None` for a custom serial).
    pub fn bridge_uuid(&self) -> Option<crate::can::CanUuid> {
        self.is_can_bridge().then(|| self.serial.as_deref().and_then(crate::can::bridge::uuid_from_usb_serial))?
    }

    /// The CAN interface a bridge provides: the net device under its USB interface in sysfs.
    pub fn bridge_interface(&self) -> Option<String> {
        if !self.is_can_bridge() {
            return None;
        }
        let dev = self.usb_device.as_deref()?;
        let dev = if dev.starts_with("/sys/") { dev.to_string() } else { format!("/sys{dev}") };
        let name = dev.rsplit('/').next()?.to_string();
        let rd = std::fs::read_dir(&dev).ok()?;
        rd.flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&format!("{name}:")))
            .find_map(|e| std::fs::read_dir(e.path().join("net")).ok()?.flatten().next())
            .map(|n| n.file_name().to_string_lossy().into_owned())
    }

    /// The by-id file name without its directory, if there is one.
    pub fn by_id_name(&self) -> Option<&str> {
        self.by_id.as_deref().map(|p| p.rsplit('/').next().unwrap_or(p))
    }

    /// Is `other` the same physical board, possibly in another mode? Serial + MCU decide when
    /// both sides know them; otherwise the USB port does. The by-id name never decides,
    /// because it changes with the mode. Between Klipper and Katapult the serial alone
    /// decides: each reports its own CONFIG_MCU, and a bootloader built for another MCU
    /// variant is still this board (and must be found, so that CONNECT's check refuses it).
    pub fn same_board(&self, other: &BoardIdentity) -> bool {
        if let (Some(a), Some(b), Some(ma), Some(mb)) = (&self.serial, &other.serial, &self.mcu, &other.mcu) {
            let app_and_bootloader =
                matches!((self.mode, other.mode), (Mode::Klipper, Mode::Katapult) | (Mode::Katapult, Mode::Klipper));
            return a == b && (ma == mb || app_and_bootloader);
        }
        match (&self.usb_device, &other.usb_device) {
            (Some(a), Some(b)) => a == b,
            _ => match (&self.port_path, &other.port_path) {
                (Some(a), Some(b)) => port_of(a) == port_of(b),
                _ => false,
            },
        }
    }
}

fn classify(vid: Option<&str>, pid: Option<&str>, manufacturer: Option<&str>) -> Mode {
    match (vid, pid) {
        (Some(VID_OPENMOKO), Some(PID_KLIPPER)) => return Mode::Klipper,
        (Some(VID_OPENMOKO), Some(PID_KATAPULT)) => return Mode::Katapult,
        _ => {}
    }
    // Boards built with a custom USB id still announce themselves by manufacturer string.
    match manufacturer.map(|m| m.to_ascii_lowercase()).as_deref() {
        Some("klipper") | Some("kalico") => Mode::Klipper,
        Some("katapult") | Some("canboot") => Mode::Katapult,
        _ => Mode::Other,
    }
}

fn rom_bootloader_name(vid: &str, pid: &str) -> Option<&'static str> {
    ROM_BOOTLOADERS.iter().find(|(v, p, _)| *v == vid && *p == pid).map(|(_, _, n)| *n)
}

/// `PRODUCT=483/df11/2200` (kernel uevent, hex without leading zeros) → ("0483", "df11").
fn vid_pid_from_product(product: &str) -> Option<(String, String)> {
    let mut it = product.split('/');
    let v = u16::from_str_radix(it.next()?, 16).ok()?;
    let p = u16::from_str_radix(it.next()?, 16).ok()?;
    Some((format!("{v:04x}"), format!("{p:04x}")))
}

/// The syspath of the USB device a tty or interface hangs off:
/// `/devices/platform/dummy_hcd.0/usb1/1-1/1-1:1.0/tty/ttyACM0` → `/devices/platform/dummy_hcd.0/usb1/1-1`.
pub fn usb_device_of(syspath: &str) -> Option<String> {
    let parts: Vec<&str> = syspath.split('/').collect();
    let idx = parts.iter().rposition(|p| is_usb_device_name(p))?;
    Some(parts[..=idx].join("/"))
}

/// `1-1`, `1-1.2`, `3-2.4.1` (bus-port[.port…]); not `1-1:1.0` (an interface) nor `usb1`.
fn is_usb_device_name(s: &str) -> bool {
    let Some((bus, ports)) = s.split_once('-') else { return false };
    !bus.is_empty()
        && bus.bytes().all(|b| b.is_ascii_digit())
        && !ports.is_empty()
        && ports.split('.').all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// `ID_PATH` of an interface ends in `:1.0`; strip it to compare ports.
fn port_of(id_path: &str) -> &str {
    match id_path.rsplit_once(':') {
        Some((head, tail)) if tail.contains('.') && head.contains("usb-") => head,
        _ => id_path,
    }
}

/// The parts of a `/dev/serial/by-id` name, `usb-<vendor>_<model>_<serial>-if<NN>[-port<N>]`.
///
/// udev builds the name from strings in which spaces became `_`, so splitting is a best
/// guess: vendor and model are taken as the first two `_`-separated words and the rest is
/// the serial (Klipper's custom serials such as `mmb_cubic` contain `_`). Identity comes
/// from udev properties; this parser is the fallback and powers by-id glob patterns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ByIdName {
    pub bus: String,
    pub vendor: String,
    pub model: String,
    pub serial: Option<String>,
    pub interface: Option<String>,
}

impl ByIdName {
    pub fn from_link(link: &str) -> Option<ByIdName> {
        Self::parse(link.rsplit('/').next().unwrap_or(link))
    }

    pub fn parse(name: &str) -> Option<ByIdName> {
        let (bus, rest) = name.split_once('-')?;
        // Strip `-ifNN` and an optional `-portN` suffix.
        let (body, interface) = match rest.rfind("-if") {
            Some(i) => {
                let suffix = &rest[i + 3..];
                let num: String = suffix.chars().take_while(|c| c.is_ascii_hexdigit()).collect();
                (&rest[..i], if num.is_empty() { None } else { Some(num) })
            }
            None => (rest, None),
        };
        let mut words = body.splitn(3, '_');
        let vendor = words.next().filter(|s| !s.is_empty())?.to_string();
        let model = words.next().filter(|s| !s.is_empty())?.to_string();
        let serial = words.next().filter(|s| !s.is_empty()).map(str::to_string);
        Some(ByIdName { bus: bus.to_string(), vendor, model, serial, interface })
    }

    /// Mode as far as the name alone tells.
    pub fn mode(&self) -> Mode {
        classify(None, None, Some(&self.vendor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Properties as systemd 252's 60-serial.rules produce them for a CDC-ACM tty.
    fn tty(vendor: &str, vid: &str, pid: &str, model: &str, serial: &str, acm: u32) -> DeviceRecord {
        let by_id = format!("/dev/serial/by-id/usb-{vendor}_{model}_{serial}-if00");
        let by_path = "/dev/serial/by-path/platform-dummy_hcd.0-usb-0:1:1.0".to_string();
        let props = [
            ("ID_BUS", "usb"),
            ("ID_USB_VENDOR", vendor),
            ("ID_USB_VENDOR_ID", vid),
            ("ID_USB_MODEL", model),
            ("ID_USB_MODEL_ID", pid),
            ("ID_USB_SERIAL_SHORT", serial),
            ("ID_PATH", "platform-dummy_hcd.0-usb-0:1:1.0"),
        ];
        let mut properties: BTreeMap<String, String> =
            props.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        properties.insert("DEVLINKS".into(), format!("{by_id} {by_path}"));
        DeviceRecord {
            syspath: format!("/sys/devices/platform/dummy_hcd.0/usb1/1-1/1-1:1.0/tty/ttyACM{acm}"),
            subsystem: "tty".into(),
            devnode: Some(format!("/dev/ttyACM{acm}")),
            properties,
        }
    }

    #[test]
    fn klipper_stm32_from_properties() {
        let id =
            BoardIdentity::from_record(&tty("Klipper", "1d50", "614e", "stm32h723xx", "29001A001151313531383332", 0))
                .unwrap();
        assert_eq!(id.mode, Mode::Klipper);
        assert_eq!(id.mcu.as_deref(), Some("stm32h723xx"));
        assert_eq!(id.serial.as_deref(), Some("29001A001151313531383332"));
        assert_eq!(id.devnode.as_deref(), Some("/dev/ttyACM0"));
        assert_eq!(id.by_id_name(), Some("usb-Klipper_stm32h723xx_29001A001151313531383332-if00"));
        assert_eq!(id.by_path.as_deref(), Some("/dev/serial/by-path/platform-dummy_hcd.0-usb-0:1:1.0"));
        assert_eq!(id.usb_device.as_deref(), Some("/sys/devices/platform/dummy_hcd.0/usb1/1-1"));
    }

    #[test]
    fn katapult_and_legacy_canboot() {
        let k = BoardIdentity::from_record(&tty("katapult", "1d50", "6177", "rp2040", "E661640843545B2E", 1)).unwrap();
        assert_eq!((k.mode, k.mcu.as_deref()), (Mode::Katapult, Some("rp2040")));
        let c =
            BoardIdentity::from_record(&tty("CanBoot", "1d50", "6177", "stm32f446xx", "3E0033000851303531373732", 0))
                .unwrap();
        assert_eq!((c.mode, c.mcu.as_deref()), (Mode::Katapult, Some("stm32f446xx")));
    }

    #[test]
    fn other_serial_device_is_not_eligible() {
        let mut rec = tty("1a86", "1a86", "7523", "USB_Serial", "", 0);
        rec.properties.insert("DEVLINKS".into(), "/dev/serial/by-id/usb-1a86_USB_Serial-if00-port0".into());
        rec.properties.remove("ID_USB_SERIAL_SHORT");
        let id = BoardIdentity::from_record(&rec).unwrap();
        assert_eq!(id.mode, Mode::Other);
        assert!(!id.mode.is_eligible());
        assert_eq!(id.mcu, None);
    }

    #[test]
    fn non_usb_tty_is_ignored() {
        let rec = DeviceRecord {
            syspath: "/sys/devices/platform/serial8250/tty/ttyS0".into(),
            subsystem: "tty".into(),
            devnode: Some("/dev/ttyS0".into()),
            properties: BTreeMap::new(),
        };
        assert_eq!(BoardIdentity::from_record(&rec), None);
    }

    #[test]
    fn custom_usb_id_still_classified_by_manufacturer() {
        let id = BoardIdentity::from_record(&tty("Klipper", "1209", "beef", "rp2040", "mmb_cubic", 0)).unwrap();
        assert_eq!(id.mode, Mode::Klipper);
        assert_eq!(id.serial.as_deref(), Some("mmb_cubic"));
    }

    #[test]
    fn rom_dfu_usb_device() {
        let rec = DeviceRecord {
            syspath: "/sys/devices/platform/dummy_hcd.0/usb1/1-1".into(),
            subsystem: "usb".into(),
            devnode: Some("/dev/bus/usb/001/003".into()),
            properties: [("PRODUCT", "483/df11/2200"), ("DEVTYPE", "usb_device")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let id = BoardIdentity::from_record(&rec).unwrap();
        assert_eq!(id.mode, Mode::RomBootloader);
        assert_eq!(id.rom_bootloader, Some("STM32 ROM DFU"));
        assert_eq!(id.vendor_id.as_deref(), Some("0483"));
    }

    #[test]
    fn a_usb_to_can_bridge_runs_klipper_and_has_a_uuid() {
        let props = [
            ("PRODUCT", "1d50/606f/100"),
            ("DEVTYPE", "usb_device"),
            ("ID_VENDOR_ID", "1d50"),
            ("ID_MODEL_ID", "606f"),
            ("ID_MODEL", "stm32g0b1xx"),
            ("ID_VENDOR", "Klipper"),
            ("ID_SERIAL_SHORT", "2D0028000B51333234383230"),
        ];
        let rec = DeviceRecord {
            syspath: "/sys/devices/platform/dummy_hcd.3/usb4/4-1".into(),
            subsystem: "usb".into(),
            devnode: Some("/dev/bus/usb/004/002".into()),
            properties: props.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        let id = BoardIdentity::from_record(&rec).unwrap();
        assert!(id.is_can_bridge());
        assert_eq!((id.mode, id.mcu.as_deref(), id.devnode.as_deref()), (Mode::Klipper, Some("stm32g0b1xx"), None));
        assert_eq!(id.bridge_uuid().map(|u| u.to_string()).as_deref(), Some("f3f4159b80a6"));
        // Its Katapult on USB is the same board.
        let boot =
            BoardIdentity::from_record(&tty("katapult", "1d50", "6177", "stm32g0b1xx", "2D0028000B51333234383230", 1))
                .unwrap();
        assert!(id.same_board(&boot) && boot.same_board(&id) && !boot.is_can_bridge());
    }

    #[test]
    fn by_id_names_parse() {
        let n = ByIdName::parse("usb-Klipper_stm32h723xx_29001A001151313531383332-if00").unwrap();
        assert_eq!((n.vendor.as_str(), n.model.as_str()), ("Klipper", "stm32h723xx"));
        assert_eq!(n.serial.as_deref(), Some("29001A001151313531383332"));
        assert_eq!(n.interface.as_deref(), Some("00"));
        assert_eq!(n.mode(), Mode::Klipper);

        let n = ByIdName::parse("usb-katapult_rp2040_E661640843545B2E-if00").unwrap();
        assert_eq!(
            (n.mode(), n.model.as_str(), n.serial.as_deref()),
            (Mode::Katapult, "rp2040", Some("E661640843545B2E"))
        );

        let n = ByIdName::parse("usb-CanBoot_stm32f446xx_3E0033000851303531373732-if00").unwrap();
        assert_eq!((n.mode(), n.model.as_str()), (Mode::Katapult, "stm32f446xx"));

        let n = ByIdName::parse("usb-Klipper_rp2040_mmb_cubic-if00").unwrap();
        assert_eq!((n.model.as_str(), n.serial.as_deref()), ("rp2040", Some("mmb_cubic")));

        let n = ByIdName::parse("usb-1a86_USB_Serial-if00-port0").unwrap();
        assert_eq!((n.vendor.as_str(), n.mode()), ("1a86", Mode::Other));
        assert_eq!(n.interface.as_deref(), Some("00"));
    }

    #[test]
    fn same_board_across_klipper_katapult_klipper() {
        let app =
            BoardIdentity::from_record(&tty("Klipper", "1d50", "614e", "stm32h723xx", "29001A001151313531383332", 0))
                .unwrap();
        // Katapult comes back on ttyACM1 because something still held ttyACM0.
        let boot =
            BoardIdentity::from_record(&tty("katapult", "1d50", "6177", "stm32h723xx", "29001A001151313531383332", 1))
                .unwrap();
        assert!(app.same_board(&boot));
        let other =
            BoardIdentity::from_record(&tty("Klipper", "1d50", "614e", "stm32h723xx", "0D0031000A51333234383230", 0))
                .unwrap();
        assert!(!app.same_board(&other), "same port but another chip id is another board");
        // Katapult built for another MCU variant (its USB product is its CONFIG_MCU): the
        // chip id still says it is this board.
        let foreign =
            BoardIdentity::from_record(&tty("katapult", "1d50", "6177", "stm32h743xx", "29001A001151313531383332", 1))
                .unwrap();
        assert!(app.same_board(&foreign) && foreign.same_board(&app));
        let twin =
            BoardIdentity::from_record(&tty("Klipper", "1d50", "614e", "stm32h743xx", "29001A001151313531383332", 1))
                .unwrap();
        assert!(!app.same_board(&twin), "two Klipper boards: serial and MCU both decide");
    }

    #[test]
    fn rom_bootloader_matches_by_port() {
        let app =
            BoardIdentity::from_record(&tty("Klipper", "1d50", "614e", "stm32h723xx", "29001A001151313531383332", 0))
                .unwrap();
        let dfu = DeviceRecord {
            syspath: "/sys/devices/platform/dummy_hcd.0/usb1/1-1".into(),
            subsystem: "usb".into(),
            devnode: None,
            properties: [("PRODUCT", "483/df11/2200")].iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        let dfu = BoardIdentity::from_record(&dfu).unwrap();
        assert!(app.same_board(&dfu));
    }

    #[test]
    fn usb_device_path_parsing() {
        assert_eq!(
            usb_device_of("/devices/pci0000:00/0000:00:14.0/usb3/3-2/3-2.4/3-2.4:1.0/tty/ttyACM2").as_deref(),
            Some("/devices/pci0000:00/0000:00:14.0/usb3/3-2/3-2.4")
        );
        assert_eq!(usb_device_of("/devices/platform/serial8250/tty/ttyS0"), None);
    }
}
