//! What goes wrong with a board on a CAN bus, each said with what to check or run.

use super::{CanApp, CanUuid};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CanError {
    #[error("CAN interface {interface} does not exist")]
    InterfaceMissing { interface: String, bitrate: Option<u32> },

    #[error("CAN interface {interface} is down")]
    InterfaceDown { interface: String, bitrate: Option<u32> },

    #[error(
        "CAN interface {interface}: txqueuelen is {txqueuelen}, below the {} Katapult's bursts need",
        super::preflight::MIN_TXQUEUELEN
    )]
    TxQueueShort { interface: String, txqueuelen: u32 },

    #[error(
        "CAN interface {interface} runs at {have} bit/s, but the board's firmware is built for {want} bit/s \
         (CONFIG_CANBUS_FREQUENCY)"
    )]
    BitrateMismatch { interface: String, have: u32, want: u32 },

    /// The bootloader request went out, but the node never answered as Katapult: flashtool's
    /// "CONNECT timed out".
    #[error(
        "CAN node {uuid} on {interface} did not reach Katapult within {secs:.1} s after the bootloader request{}",
        seen_note(.seen, .others)
    )]
    NeverKatapult { uuid: CanUuid, interface: String, secs: f64, seen: Option<CanApp>, others: Vec<String> },

    /// The node was flashed but did not come back running Klipper (under its UUID).
    #[error("CAN node {uuid} on {interface} did not come back running Klipper within {secs:.1} s{}", seen_note(.seen, .others))]
    NotBack { uuid: CanUuid, interface: String, secs: f64, seen: Option<CanApp>, others: Vec<String> },

    /// The flashed firmware answers under another UUID (a chip-id hash that changed, e.g.
    /// after switching between Klipper and Kalico or a changed CAN UUID setting).
    #[error("CAN node {old} came back running Klipper under a new UUID: {new} (on {interface})")]
    UuidChanged { old: CanUuid, new: CanUuid, interface: String },

    /// The node stopped answering in the middle of the write.
    #[error("CAN node {uuid} on {interface} stopped answering during {during}: {detail}")]
    LostMidWrite { uuid: CanUuid, interface: String, during: String, detail: String },

    /// Katapult on the flash node id is another node than the one meant.
    #[error("the Katapult node that answered on {interface} is {reported}, not {uuid}: refusing to write")]
    WrongNode { uuid: CanUuid, reported: CanUuid, interface: String },

    #[error("CAN bus {interface}: {message}")]
    Io { interface: String, message: String },

    #[error("method {method} cannot flash a CAN node; kflash writes over CAN itself (method katapult)")]
    MethodUnsupported { method: &'static str },

    /// The USB-to-CAN bridge is back on USB, but its CAN interface did not appear.
    #[error("the USB-to-CAN bridge is back, but CAN interface {interface} did not appear within {secs:.1} s")]
    BridgeInterfaceMissing { interface: String, secs: f64 },

    /// Nobody brought the bridge's interface up, and kflash could not either.
    #[error("CAN interface {interface} of the USB-to-CAN bridge could not be brought up: {message}")]
    BridgeBringUp { interface: String, bitrate: Option<u32>, message: String },

    /// The bridge answered the bootloader request by landing in its chip's ROM bootloader.
    #[error(
        "the USB-to-CAN bridge landed in {name} ({vid_pid}) instead of Katapult: {interface} and every board behind \
         it are gone until it runs Klipper again"
    )]
    BridgeInRom { name: String, vid_pid: String, interface: String },
}

fn seen_note(seen: &Option<CanApp>, others: &[String]) -> String {
    let mut note = match seen {
        Some(app) => format!(" (it still answers as {})", app.name()),
        None => " (it did not answer queries at all)".into(),
    };
    if seen.is_none() && !others.is_empty() {
        note.push_str(&format!(
            "; other unassigned nodes answered the same queries ({}): nodes answering one query together can knock \
             each other off the bus (bus-off)",
            others.join(", ")
        ));
    }
    note
}

fn up_command(interface: &str, bitrate: Option<u32>) -> String {
    let rate = bitrate.map(|b| b.to_string()).unwrap_or_else(|| "<CONFIG_CANBUS_FREQUENCY>".into());
    format!("sudo ip link set {interface} up type can bitrate {rate}")
}

impl CanError {
    /// Nothing was written: the node must be sent back to its firmware, and no other method tried.
    pub fn is_refusal(&self) -> bool {
        matches!(self, CanError::WrongNode { .. } | CanError::MethodUnsupported { .. })
    }

    /// The interface is not usable: fixed on the host, not on the board.
    pub fn is_interface(&self) -> bool {
        matches!(
            self,
            CanError::InterfaceMissing { .. }
                | CanError::BridgeInterfaceMissing { .. }
                | CanError::BridgeBringUp { .. }
                | CanError::InterfaceDown { .. }
                | CanError::TxQueueShort { .. }
                | CanError::BitrateMismatch { .. }
        )
    }

    pub fn help(&self) -> String {
        match self {
            CanError::InterfaceMissing { interface, bitrate } => format!(
                "plug in the USB-CAN adapter (or check that the bridge board runs Klipper), then bring it up: `{}`; \
                 to keep it across reboots add it to /etc/network/interfaces.d/{interface} (allow-hotplug)",
                up_command(interface, *bitrate)
            ),
            CanError::InterfaceDown { interface, bitrate } => format!("bring it up: `{}`", up_command(interface, *bitrate)),
            CanError::TxQueueShort { interface, .. } => format!(
                "run `sudo ip link set {interface} txqueuelen {}` (and set txqueuelen in its interfaces file)",
                super::preflight::MIN_TXQUEUELEN
            ),
            CanError::BitrateMismatch { interface, want, .. } => format!(
                "every node on a bus must use one bitrate: `sudo ip link set {interface} down && {}`, or change \
                 CONFIG_CANBUS_FREQUENCY with `kflash config KEY` if the bus is right",
                up_command(interface, Some(*want))
            ),
            CanError::NeverKatapult { interface, seen: Some(CanApp::Klipper), .. } => format!(
                "the firmware ignored the request: check that the node has Katapult built for CAN on {interface} at \
                 the bus bitrate (its Klipper must be built with the bootloader offset Katapult uses), that the UUID is \
                 right (`kflash devices --can` with Klipper stopped), then power-cycle it and run `kflash flash KEY` again"
            ),
            CanError::NeverKatapult { interface, others, .. } if !others.is_empty() => format!(
                "power-cycle the toolheads, then flash with only this node unassigned on {interface} (start Klipper \
                 once so it assigns the others, or unplug them) and run `kflash flash KEY` again"
            ),
            CanError::NeverKatapult { interface, .. } => format!(
                "check the node's power and CAN wiring (CANH/CANL, 120 Ω termination at both ends), that Katapult on it \
                 is built for CAN at the bitrate of {interface} and that the UUID is right (`kflash devices --can` with \
                 Klipper stopped); power-cycle it and run `kflash flash KEY` again"
            ),
            CanError::NotBack { .. } => "the image was written and read back; the node may be slow to start (raise \
                 timeouts.reconnect_secs) or the new firmware does not start on CAN (check `kflash config KEY --show`: \
                 interface, pins and bitrate); if it waits in Katapult, run `kflash flash KEY` again"
                .into(),
            CanError::UuidChanged { new, .. } => format!(
                "the flash itself is done; set `canbus_uuid: {new}` in the board's [mcu …] section of printer.cfg and \
                 run `kflash set KEY --canbus-uuid {new}`, then restart Klipper"
            ),
            CanError::LostMidWrite { interface, .. } => format!(
                "the image is incomplete and was not started: the node stays in Katapult. Check wiring and \
                 termination, `ip -details -statistics link show {interface}` for bus-off and error counters (a \
                 bus-off needs `sudo ip link set {interface} down` and up again unless restart-ms is set), then run \
                 `kflash flash KEY` again"
            ),
            CanError::WrongNode { .. } => {
                "nothing was written; another node waits in Katapult on the bus: power-cycle it, then try again".into()
            }
            CanError::Io { interface, .. } => format!("check `ip -details link show {interface}`"),
            CanError::MethodUnsupported { .. } => "run `kflash set KEY --method katapult`".into(),
            CanError::BridgeInterfaceMissing { interface, .. } => format!(
                "check `dmesg` for the gs_usb driver and `ip link` for the interface's name (a second adapter may have \
                 taken {interface}: set `kflash set KEY --can-interface NAME`); power-cycle the bridge if it stays away"
            ),
            CanError::BridgeBringUp { interface, bitrate, .. } => {
                format!("bring it up yourself: `{}` and `sudo ip link set {interface} txqueuelen 128`", up_command(interface, *bitrate))
            }
            CanError::BridgeInRom { .. } => "the bridge has no working Katapult: write Klipper with the ROM's DFU \
                 (`make flash FLASH_DEVICE=0483:df11` in the Klipper tree, or `dfu-util -a 0 -d 0483:df11 -s \
                 0x08000000:leave -D out/klipper.bin` with Katapult's offset if you keep it), or press its reset / \
                 power-cycle it to leave the ROM and boot the firmware it had; then run `kflash flash-all` again"
                .into(),
        }
    }

    pub fn exit_code(&self) -> i32 {
        if self.is_interface() {
            crate::error::exit::DEVICE
        } else {
            crate::error::exit::FLASH
        }
    }
}
