//! Registry operations as the commands need them: the `devices` view (registered boards
//! joined with what is connected), picking a connected board, and adding one.

use std::sync::Arc;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::hotplug::{Board, KeyResolver};
use crate::identity::Mode;
use crate::registry::{serial_pattern_for, BoardEntry, FlashMethod, Registry};

/// Resolve connected devices to registry keys.
pub fn resolver(reg: &Registry) -> KeyResolver {
    let boards: Vec<BoardEntry> = reg.boards().cloned().collect();
    Arc::new(move |id| boards.iter().find(|b| b.matches(id)).map(|b| b.key.clone()))
}

#[derive(Debug, Clone, Serialize)]
pub struct RegisteredRow {
    pub key: String,
    pub name: String,
    pub mcu: String,
    pub flash_method: FlashMethod,
    pub flashable: bool,
    pub connected: bool,
    /// More than one connected device matches this entry: kflash will not pick one.
    pub ambiguous: bool,
    pub mode: Option<Mode>,
    pub devnode: Option<String>,
    pub by_id: Option<String>,
    pub serial: Option<String>,
    /// The board profile its config was seeded from, while nobody has reviewed it
    /// (`kflash config KEY`); flash and flash-all refuse the board until then.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_unreviewed: Option<String>,
    /// A USB-to-CAN bridge: its own UUID and the interface it provides (`uuid f3f4159b80a6,
    /// provides can0`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub can_bridge: Option<String>,
    /// A CAN node: where it is (`can0 uuid 0a1b2c3d4e5f`). Whether it answers is only known
    /// by a query with Klipper stopped (`kflash devices --can`), so `connected` stays false.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub can: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct OtherRow {
    #[serde(flatten)]
    pub board: Board,
    /// Why it cannot be registered.
    pub reason: String,
}

/// A connected USB-to-CAN bridge (1d50:606f): its own CAN node and the interface it provides.
#[derive(Debug, Clone, Serialize)]
pub struct BridgeRow {
    pub key: Option<String>,
    pub mcu: Option<String>,
    pub serial: Option<String>,
    /// Computed from the USB serial (a chip id); `None` for a custom serial.
    pub canbus_uuid: Option<String>,
    /// The net device under its USB interface (`None` while the driver has not made one).
    pub interface: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DevicesView {
    /// USB-to-CAN bridges among the connected devices (registered or not).
    pub bridges: Vec<BridgeRow>,
    pub registered: Vec<RegisteredRow>,
    /// Klipper/Katapult boards that are connected but not registered.
    pub unregistered: Vec<Board>,
    /// Serial devices kflash will not flash.
    pub other: Vec<OtherRow>,
}

pub fn devices_view(reg: &Registry, connected: &[Board]) -> DevicesView {
    let registered = reg
        .boards()
        .map(|e| {
            let matches: Vec<&Board> = connected.iter().filter(|b| e.matches(&b.identity)).collect();
            let first = matches.first();
            RegisteredRow {
                key: e.key.clone(),
                name: e.name.clone(),
                mcu: e.mcu.clone(),
                flash_method: e.flash_method,
                flashable: e.flashable,
                connected: !matches.is_empty(),
                ambiguous: matches.len() > 1,
                mode: first.map(|b| b.identity.mode),
                devnode: first.and_then(|b| b.identity.devnode.clone()),
                by_id: first.and_then(|b| b.identity.by_id.clone()),
                serial: e.serial.clone().or_else(|| first.and_then(|b| b.identity.serial.clone())),
                config_unreviewed: reg.unreviewed_profile(&e.key).map(str::to_string),
                can_bridge: match (e.is_can_bridge(), e.canbus_uuid) {
                    (true, Some(uuid)) => Some(format!("uuid {uuid}, provides {}", e.can_interface())),
                    _ => None,
                },
                can: match e.locator() {
                    crate::locator::Locator::Can { interface, uuid } => Some(format!("{interface} uuid {uuid}")),
                    crate::locator::Locator::Usb { .. } => None,
                },
            }
        })
        .collect();
    let mut unregistered = Vec::new();
    let mut other = Vec::new();
    for b in connected.iter().filter(|b| b.key.is_none()) {
        match ineligible_reason(reg, b) {
            None => unregistered.push(b.clone()),
            Some(reason) => other.push(OtherRow { board: b.clone(), reason }),
        }
    }
    let bridges = connected
        .iter()
        .filter(|b| b.identity.is_can_bridge())
        .map(|b| BridgeRow {
            key: b.key.clone(),
            mcu: b.identity.mcu.clone(),
            serial: b.identity.serial.clone(),
            canbus_uuid: b.identity.bridge_uuid().map(|u| u.to_string()),
            interface: b.identity.bridge_interface(),
        })
        .collect();
    DevicesView { bridges, registered, unregistered, other }
}

/// Why a connected device cannot be registered, or `None` if it can.
pub fn ineligible_reason(reg: &Registry, b: &Board) -> Option<String> {
    if let Some(reason) = b.identity.by_id_name().and_then(|n| reg.settings.blocked_reason(n)) {
        return Some(format!("blocked: {reason}"));
    }
    match b.identity.mode {
        Mode::Klipper | Mode::Katapult if b.identity.mcu.is_none() => Some("reports no MCU".into()),
        Mode::Klipper | Mode::Katapult => None,
        Mode::RomBootloader => Some(format!(
            "{} (mask-ROM bootloader; flash Katapult or Klipper onto it first)",
            b.identity.rom_bootloader.unwrap_or("ROM bootloader")
        )),
        Mode::Other => Some("not a Klipper or Katapult device".into()),
    }
}

/// Connected boards that `kflash add` may register.
pub fn add_candidates(reg: &Registry, connected: &[Board]) -> Vec<Board> {
    connected.iter().filter(|b| b.key.is_none() && ineligible_reason(reg, b).is_none()).cloned().collect()
}

/// Find a connected device by devnode, by-id/by-path link or name, USB serial, or syspath.
pub fn select_device<'a>(connected: &'a [Board], selector: &str) -> Result<&'a Board> {
    let sel = selector.trim();
    let resolved = std::fs::canonicalize(sel).ok().map(|p| p.to_string_lossy().into_owned());
    let hits: Vec<&Board> = connected
        .iter()
        .filter(|b| {
            let id = &b.identity;
            let eq = |v: &Option<String>| v.as_deref() == Some(sel);
            eq(&id.devnode)
                || eq(&id.by_id)
                || eq(&id.by_path)
                || id.by_id_name() == Some(sel)
                || eq(&id.serial)
                || id.syspath == sel
                || (resolved.is_some() && id.devnode == resolved)
        })
        .collect();
    match hits.as_slice() {
        [one] => Ok(one),
        [] => Err(Error::DeviceNotFound(format!("no connected USB serial device matches '{sel}'"))),
        _ => Err(Error::DeviceNotFound(format!("'{sel}' matches {} devices; name the devnode instead", hits.len()))),
    }
}

/// What the user chose when adding a board.
#[derive(Debug, Clone, Default)]
pub struct AddRequest {
    pub name: String,
    /// Defaults to the slug of the name.
    pub key: Option<String>,
    /// Defaults to the MCU the device reports.
    pub mcu: Option<String>,
    pub flash_method: FlashMethod,
    pub exclude: bool,
}

/// Register `board` (in memory). Identity is the chip-id serial + MCU when the device has a
/// serial, plus a by-id pattern kalico-flash would understand.
pub fn add_board(reg: &mut Registry, board: &Board, req: &AddRequest) -> Result<BoardEntry> {
    if let Some(why) = ineligible_reason(reg, board) {
        return Err(Error::InvalidInput(format!(
            "{} cannot be registered: {why}",
            board.identity.devnode.as_deref().unwrap_or(&board.identity.syspath)
        )));
    }
    if let Some(k) = &board.key {
        return Err(Error::BoardConflict(format!("this device is already registered as '{k}'")));
    }
    let name = req.name.trim();
    if name.is_empty() {
        return Err(Error::InvalidInput("a board needs a name".into()));
    }
    let key = match &req.key {
        Some(k) => k.clone(),
        None => reg.key_for_name(name)?,
    };
    let reported = board.identity.mcu.clone().unwrap_or_default();
    let mcu = req.mcu.clone().unwrap_or_else(|| reported.clone());
    if !reported.is_empty() && !crate::registry::mcu_compatible(&mcu, &reported) {
        return Err(Error::InvalidInput(format!("the device reports MCU {reported}, not {mcu}")));
    }
    // A USB-to-CAN bridge is also a CAN node, and provides the interface its boards are on.
    let bridge = board.identity.is_can_bridge();
    if bridge && board.identity.bridge_uuid().is_none() {
        return Err(Error::InvalidInput(
            "this USB-to-CAN bridge has a custom USB serial, so its CAN UUID cannot be computed: register it with \
             `kflash add --canbus-uuid UUID` from `kflash devices --can`"
                .into(),
        ));
    }
    let entry = BoardEntry {
        key,
        name: name.to_string(),
        mcu,
        serial: board.identity.serial.clone(),
        serial_pattern: board.identity.by_id_name().map(serial_pattern_for),
        flash_method: req.flash_method,
        flashable: !req.exclude,
        canbus_uuid: board.identity.bridge_uuid(),
        can_interface: bridge.then(|| board.identity.bridge_interface()).flatten(),
    };
    reg.add(entry.clone())?;
    Ok(entry)
}

/// Register a node on a CAN bus by its UUID (from `kflash devices --can`, printer.cfg's
/// `canbus_uuid` or Katapult's query) and interface. Its MCU cannot be asked without stopping
/// Klipper, so it must be given.
pub fn add_can_board(
    reg: &mut Registry,
    uuid: crate::can::CanUuid,
    interface: Option<&str>,
    req: &AddRequest,
) -> Result<BoardEntry> {
    let name = req.name.trim();
    if name.is_empty() {
        return Err(Error::InvalidInput("a board needs a name".into()));
    }
    let mcu =
        match req.mcu.as_deref().map(str::trim) {
            Some(m) if !m.is_empty() => m.to_string(),
            _ => return Err(Error::InvalidInput(
                "a CAN node needs --mcu (its CONFIG_MCU, e.g. stm32g0b1xx): kflash cannot ask it while Klipper runs"
                    .into(),
            )),
        };
    let key = match &req.key {
        Some(k) => k.clone(),
        None => reg.key_for_name(name)?,
    };
    let entry = BoardEntry {
        key,
        name: name.to_string(),
        mcu,
        serial: None,
        serial_pattern: None,
        flash_method: req.flash_method,
        flashable: !req.exclude,
        canbus_uuid: Some(uuid),
        can_interface: interface.filter(|i| *i != crate::registry::DEFAULT_CAN_INTERFACE).map(String::from),
    };
    reg.add(entry.clone())?;
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{BoardIdentity, DeviceRecord};

    fn bridge(serial: &str) -> Board {
        let props = [
            ("PRODUCT", "1d50/606f/100"),
            ("ID_VENDOR_ID", "1d50"),
            ("ID_MODEL_ID", "606f"),
            ("ID_MODEL", "stm32g0b1xx"),
            ("ID_SERIAL_SHORT", serial),
        ];
        let rec = DeviceRecord {
            syspath: "/sys/devices/platform/dummy_hcd.9/usb10/10-1".into(),
            subsystem: "usb".into(),
            devnode: None,
            properties: props.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        Board { identity: BoardIdentity::from_record(&rec).unwrap(), key: None }
    }

    #[test]
    fn a_bridge_is_listed_and_registered_with_its_uuid_and_interface() {
        let dir = tempfile::tempdir().unwrap();
        let mut reg = Registry::open(dir.path()).unwrap();
        let b = bridge("2D0028000B51333234383230");
        let view = devices_view(&reg, std::slice::from_ref(&b));
        assert_eq!(view.unregistered.len(), 1, "a bridge runs Klipper: it can be added");
        assert_eq!(view.bridges[0].canbus_uuid.as_deref(), Some("f3f4159b80a6"));
        assert_eq!(view.bridges[0].interface, None, "no such device in this sysfs");
        let entry = add_board(&mut reg, &b, &AddRequest { name: "U2C".into(), ..Default::default() }).unwrap();
        assert_eq!(entry.canbus_uuid.map(|u| u.to_string()).as_deref(), Some("f3f4159b80a6"));
        assert!(entry.is_can_bridge() && entry.can_interface() == "can0", "{entry:?}");
        assert_eq!(entry.mcu, "stm32g0b1xx");
        // A custom serial has no UUID to compute: said, with the way out.
        let err = add_board(&mut reg, &bridge("my-bridge"), &AddRequest { name: "Other".into(), ..Default::default() })
            .unwrap_err();
        assert!(err.to_string().contains("--canbus-uuid"), "{err}");
    }
}
