//! Where a registered CAN node stands, from what can be known without a frame on the bus:
//! its interface (from the kernel) and Klippy's view (through Moonraker). A UUID query would
//! say more, but Klippy owns the bus while it runs, so the status never sends one; only
//! `kflash devices --can` does, with Klipper stopped. Sans-IO: the inputs are plain values.

use crate::can::CanUuid;
use crate::moonraker::McuStatus;
use crate::moonraker_link::KlippyState;

/// What the kernel says about a CAN interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    Up,
    Down,
    /// No such interface (a USB-to-CAN adapter unplugged, or never configured).
    Absent,
}

/// What Klippy said, as the status keeps it.
#[derive(Debug, Clone, Copy)]
pub struct KlippyView<'a> {
    pub state: KlippyState,
    /// Klippy's `state_message` when it is in shutdown or error ("Lost communication with MCU
    /// 'ebb36'").
    pub message: Option<&'a str>,
    /// The MCUs it reported when last ready (their sections name the nodes even after).
    pub mcus: &'a [McuStatus],
}

/// A CAN node's presence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Presence {
    /// Klippy talks to it now: `version` is what it read when it connected.
    Running { version: String, section: String },
    /// Known not to be reachable, and why.
    Missing { reason: String },
    /// Cannot be told without querying the bus, and why.
    Unknown { reason: String },
}

/// The presence of node `uuid` on `interface`; `link` is `None` when the interface was not
/// looked at.
pub fn assess(interface: &str, uuid: &CanUuid, link: Option<Link>, klippy: KlippyView<'_>) -> Presence {
    match link {
        Some(Link::Absent) => {
            return Presence::Missing {
                reason: format!(
                "the CAN interface {interface} does not exist: plug in the USB-to-CAN adapter or configure {interface}"
            ),
            }
        }
        Some(Link::Down) => {
            return Presence::Missing {
                reason: format!(
                "the CAN interface {interface} is down: bring it up (`ip link set {interface} up type can bitrate …`)"
            ),
            }
        }
        Some(Link::Up) | None => {}
    }
    let mcu = crate::moonraker::mcu_for_canbus_uuid(klippy.mcus, uuid);
    let section = mcu.map(|m| m.object.clone());
    match (klippy.state, mcu) {
        (KlippyState::Ready, Some(m)) => match &m.mcu_version {
            Some(v) => Presence::Running { version: v.clone(), section: m.object.clone() },
            None => Presence::Unknown { reason: format!("Klippy is ready but reported no version for [{}]", m.object) },
        },
        (KlippyState::Ready, None) => Presence::Unknown {
            reason: format!(
                "printer.cfg has no [mcu] with canbus_uuid {uuid}, and the bus is not queried while Klipper runs \
                 (`kflash devices --can` queries it with Klipper stopped)"
            ),
        },
        (KlippyState::Shutdown | KlippyState::Error, _) => {
            let message = klippy.message.unwrap_or("").trim();
            match mcu.filter(|m| names_mcu(message, &m.name)) {
                Some(m) => Presence::Missing {
                    reason: format!(
                        "Klippy lost [{}]: {}",
                        m.object,
                        crate::moonraker::first_line(message).unwrap_or(message)
                    ),
                },
                None => Presence::Unknown { reason: klippy_not_ready(klippy.state, section.as_deref()) },
            }
        }
        (state, _) => Presence::Unknown { reason: klippy_not_ready(state, section.as_deref()) },
    }
}

/// Does Klippy's message blame MCU `name` ("Lost communication with MCU 'ebb36'", "mcu
/// 'ebb36': Unable to connect")?
fn names_mcu(message: &str, name: &str) -> bool {
    message.contains(&format!("MCU '{name}'")) || message.contains(&format!("mcu '{name}'"))
}

fn klippy_not_ready(state: KlippyState, section: Option<&str>) -> String {
    let state = match state {
        KlippyState::Unknown => "not reachable through Moonraker",
        KlippyState::Disconnected => "not running",
        KlippyState::Startup => "starting",
        KlippyState::Shutdown => "shut down",
        KlippyState::Error => "in error",
        KlippyState::Ready => "ready",
    };
    let whose = section.map(|s| format!(" ([{s}])")).unwrap_or_default();
    format!("Klippy is {state}, and only Klippy's view{whose} is taken while Klipper may own the bus")
}

/// The kernel's word on `interface` from sysfs: `Absent` when there is no such interface.
pub fn read_link(interface: &str) -> Link {
    read_link_in(std::path::Path::new("/sys/class/net"), interface)
}

fn read_link_in(sys_net: &std::path::Path, interface: &str) -> Link {
    match std::fs::read_to_string(sys_net.join(interface).join("flags")) {
        Ok(flags) => {
            let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap_or(0);
            if flags & libc::IFF_UP as u32 != 0 {
                Link::Up
            } else {
                Link::Down
            }
        }
        Err(_) => Link::Absent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uuid() -> CanUuid {
        "0a1b2c3d4e5f".parse().unwrap()
    }

    fn ebb(version: Option<&str>) -> McuStatus {
        McuStatus {
            object: "mcu ebb36".into(),
            name: "ebb36".into(),
            mcu_version: version.map(String::from),
            mcu: Some("stm32g0b1xx".into()),
            app: None,
            serial: None,
            canbus_uuid: Some("0A1B2C3D4E5F".into()),
        }
    }

    fn view<'a>(state: KlippyState, message: Option<&'a str>, mcus: &'a [McuStatus]) -> KlippyView<'a> {
        KlippyView { state, message, mcus }
    }

    #[test]
    fn klippy_ready_gives_the_version_its_section_reported() {
        let mcus = [ebb(Some("v0.13.0-7-gold"))];
        let p = assess("can0", &uuid(), Some(Link::Up), view(KlippyState::Ready, None, &mcus));
        assert_eq!(p, Presence::Running { version: "v0.13.0-7-gold".into(), section: "mcu ebb36".into() });
        // Not looked at the interface: Klippy's word still counts.
        assert!(matches!(
            assess("can0", &uuid(), None, view(KlippyState::Ready, None, &mcus)),
            Presence::Running { .. }
        ));
    }

    #[test]
    fn an_interface_gone_or_down_makes_the_node_missing_whatever_klippy_said() {
        let mcus = [ebb(Some("v1"))];
        let ready = view(KlippyState::Ready, None, &mcus);
        let Presence::Missing { reason } = assess("can0", &uuid(), Some(Link::Down), ready) else { panic!() };
        assert!(reason.contains("can0 is down") && reason.contains("ip link set can0 up"), "{reason}");
        let Presence::Missing { reason } = assess("can0", &uuid(), Some(Link::Absent), ready) else { panic!() };
        assert!(reason.contains("can0 does not exist"), "{reason}");
    }

    #[test]
    fn a_node_not_in_printer_cfg_is_unknown_and_says_how_to_look() {
        let p = assess("can0", &uuid(), Some(Link::Up), view(KlippyState::Ready, None, &[]));
        let Presence::Unknown { reason } = p else { panic!("{p:?}") };
        assert!(reason.contains("kflash devices --can"), "{reason}");
    }

    #[test]
    fn klippy_shut_down_on_losing_this_node_makes_it_missing_and_another_node_unknown() {
        let mcus = [ebb(Some("v1"))];
        let msg = "Lost communication with MCU 'ebb36'\nOnce the underlying issue is corrected, use the\n\"FIRMWARE_RESTART\" command";
        let p = assess("can0", &uuid(), Some(Link::Up), view(KlippyState::Shutdown, Some(msg), &mcus));
        let Presence::Missing { reason } = p else { panic!("{p:?}") };
        assert_eq!(reason, "Klippy lost [mcu ebb36]: Lost communication with MCU 'ebb36'");
        let other = "Lost communication with MCU 'mcu'";
        let p = assess("can0", &uuid(), Some(Link::Up), view(KlippyState::Shutdown, Some(other), &mcus));
        let Presence::Unknown { reason } = p else { panic!("{p:?}") };
        assert!(reason.contains("shut down") && reason.contains("[mcu ebb36]"), "{reason}");
        let connect = "mcu 'ebb36': Unable to connect";
        assert!(matches!(
            assess("can0", &uuid(), None, view(KlippyState::Error, Some(connect), &mcus)),
            Presence::Missing { .. }
        ));
    }

    #[test]
    fn klippy_not_ready_leaves_the_node_unknown_with_why() {
        for state in [KlippyState::Unknown, KlippyState::Disconnected, KlippyState::Startup] {
            let p = assess("can0", &uuid(), Some(Link::Up), view(state, None, &[]));
            assert!(matches!(p, Presence::Unknown { .. }), "{state:?}: {p:?}");
        }
    }

    #[test]
    fn sysfs_flags_say_up_down_or_absent() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("can0")).unwrap();
        std::fs::write(dir.path().join("can0/flags"), "0x41\n").unwrap();
        std::fs::create_dir_all(dir.path().join("can1")).unwrap();
        std::fs::write(dir.path().join("can1/flags"), "0x80\n").unwrap();
        assert_eq!(read_link_in(dir.path(), "can0"), Link::Up);
        assert_eq!(read_link_in(dir.path(), "can1"), Link::Down);
        assert_eq!(read_link_in(dir.path(), "can9"), Link::Absent);
    }
}
