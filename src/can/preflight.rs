//! Before a CAN node is touched: its interface exists, is UP, has a transmit queue deep enough
//! for Katapult's bursts, and runs at the bitrate the node's firmware was built for
//! (`CONFIG_CANBUS_FREQUENCY`). The state is read from sysfs (flags, tx_queue_len) and
//! rtnetlink (the bitrate); the check itself is pure.

use std::path::Path;

use super::error::CanError;

/// Transmit queue kflash asks for: Katapult's SEND_BLOCK is 10 frames, and a short queue
/// drops frames under load (ENOBUFS). Klipper's CANBUS docs recommend 128.
pub const MIN_TXQUEUELEN: u32 = 128;

/// What the kernel says about a CAN interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceState {
    pub up: bool,
    pub txqueuelen: Option<u32>,
    /// `None`: the interface has no bit timing (vcan), or it could not be read.
    pub bitrate: Option<u32>,
    /// Why the bitrate is unknown, when it is.
    pub bitrate_note: Option<String>,
}

/// Read `interface`'s state; `Ok(None)` when there is no such interface.
pub fn read_interface(interface: &str) -> std::io::Result<Option<InterfaceState>> {
    read_interface_in(Path::new("/sys/class/net"), interface, netlink_bitrate)
}

fn read_interface_in(
    sys_net: &Path,
    interface: &str,
    bitrate: impl FnOnce(&str) -> Result<Option<u32>, String>,
) -> std::io::Result<Option<InterfaceState>> {
    let dir = sys_net.join(interface);
    let flags = match std::fs::read_to_string(dir.join("flags")) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap_or(0);
    let txqueuelen = std::fs::read_to_string(dir.join("tx_queue_len")).ok().and_then(|s| s.trim().parse().ok());
    let (bitrate, bitrate_note) = match bitrate(interface) {
        Ok(Some(b)) => (Some(b), None),
        Ok(None) => (None, Some(format!("{interface} reports no bitrate (a virtual CAN interface has none)"))),
        Err(e) => (None, Some(format!("the bitrate of {interface} could not be read: {e}"))),
    };
    Ok(Some(InterfaceState { up: flags & libc::IFF_UP as u32 != 0, txqueuelen, bitrate, bitrate_note }))
}

fn netlink_bitrate(interface: &str) -> Result<Option<u32>, String> {
    let iface = socketcan::CanInterface::open(interface).map_err(|e| e.to_string())?;
    iface.bit_rate().map_err(|e| e.to_string())
}

/// The interface as the node needs it, or the first thing to fix. `want_bitrate` is the
/// node's `CONFIG_CANBUS_FREQUENCY`, when its config has one.
pub fn check(interface: &str, state: Option<&InterfaceState>, want_bitrate: Option<u32>) -> Result<(), CanError> {
    let iface = interface.to_string();
    let Some(state) = state else {
        return Err(CanError::InterfaceMissing { interface: iface, bitrate: want_bitrate });
    };
    if !state.up {
        return Err(CanError::InterfaceDown { interface: iface, bitrate: want_bitrate });
    }
    if let Some(len) = state.txqueuelen.filter(|l| *l < MIN_TXQUEUELEN) {
        return Err(CanError::TxQueueShort { interface: iface, txqueuelen: len });
    }
    if let (Some(have), Some(want)) = (state.bitrate, want_bitrate) {
        if have != want {
            return Err(CanError::BitrateMismatch { interface: iface, have, want });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(up: bool, txq: u32, bitrate: Option<u32>) -> InterfaceState {
        InterfaceState { up, txqueuelen: Some(txq), bitrate, bitrate_note: None }
    }

    #[test]
    fn each_problem_says_what_to_run() {
        let err = |s: Option<&InterfaceState>, want| check("can0", s, want).unwrap_err();
        let e = err(None, Some(1_000_000));
        assert_eq!(e.to_string(), "CAN interface can0 does not exist");
        assert!(e.help().contains("sudo ip link set can0 up type can bitrate 1000000"), "{}", e.help());

        let e = err(Some(&state(false, 128, None)), Some(500_000));
        assert_eq!(e.to_string(), "CAN interface can0 is down");
        assert!(e.help().contains("sudo ip link set can0 up type can bitrate 500000"), "{}", e.help());

        let e = err(Some(&state(true, 10, Some(1_000_000))), Some(1_000_000));
        assert!(e.to_string().contains("txqueuelen is 10"), "{e}");
        assert!(e.help().contains("sudo ip link set can0 txqueuelen 128"), "{}", e.help());

        let e = err(Some(&state(true, 128, Some(500_000))), Some(1_000_000));
        assert!(e.to_string().contains("500000 bit/s") && e.to_string().contains("1000000"), "{e}");
        assert!(e.help().contains("sudo ip link set can0 down"), "{}", e.help());
        assert!(e.help().contains("sudo ip link set can0 up type can bitrate 1000000"), "{}", e.help());
    }

    #[test]
    fn a_good_interface_passes_and_an_unknown_bitrate_is_not_a_failure() {
        assert!(check("can0", Some(&state(true, 128, Some(1_000_000))), Some(1_000_000)).is_ok());
        assert!(check("vcan0", Some(&state(true, 1000, None)), Some(1_000_000)).is_ok());
        assert!(check("can0", Some(&state(true, 128, Some(250_000))), None).is_ok());
    }

    #[test]
    fn state_comes_from_sysfs_flags_and_queue_length() {
        let dir = tempfile::tempdir().unwrap();
        let can0 = dir.path().join("can0");
        std::fs::create_dir(&can0).unwrap();
        std::fs::write(can0.join("flags"), "0x1\n").unwrap();
        std::fs::write(can0.join("tx_queue_len"), "10\n").unwrap();
        let s = read_interface_in(dir.path(), "can0", |_| Ok(Some(1_000_000))).unwrap().unwrap();
        assert_eq!(s, InterfaceState { up: true, txqueuelen: Some(10), bitrate: Some(1_000_000), bitrate_note: None });
        std::fs::write(can0.join("flags"), "0x1002\n").unwrap();
        let s = read_interface_in(dir.path(), "can0", |_| Ok(None)).unwrap().unwrap();
        assert!(!s.up);
        assert!(s.bitrate_note.unwrap().contains("no bitrate"));
        assert_eq!(read_interface_in(dir.path(), "can1", |_| Ok(None)).unwrap(), None);
    }
}
