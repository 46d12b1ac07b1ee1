//! What the dashboard shows about the boards and the printer host, built from the library's
//! own views (the daemon's status tracker and `kflash devices`' view), so the dashboard says
//! exactly what `kflash status` and `kflash devices` say.

use kflash::app::boards::DevicesView;
use kflash::daemon::status::{FirmwareState, KlippyState, Status};
use kflash::identity::Mode;

/// One registered board's line.
#[derive(Debug, Clone, PartialEq)]
pub struct BoardRow {
    pub key: String,
    pub name: String,
    pub mcu: String,
    pub connected: bool,
    pub mode: Option<Mode>,
    pub serial: Option<String>,
    pub devnode: Option<String>,
    pub method: String,
    pub version: Option<String>,
    pub state: FirmwareState,
    /// How far the running version is from the host's ("3 commits behind").
    pub relation: Option<String>,
    pub excluded: bool,
    pub ambiguous: bool,
    /// The profile its config was seeded from, while nobody reviewed it.
    pub unreviewed: Option<String>,
    /// A CAN node: its interface and UUID (`vcan0 0a1b2c3d4e5f`).
    pub can: Option<String>,
    /// Why a CAN node is missing or its state unknown.
    pub reason: Option<String>,
}

/// A connected device that is not a registered board.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceRow {
    /// `klipper`, `katapult`, `rom-bootloader`, `other`.
    pub mode: String,
    pub mcu: Option<String>,
    pub serial: Option<String>,
    /// Its by-id name, devnode or syspath.
    pub name: String,
    /// Why it cannot be flashed (other serial devices).
    pub reason: Option<String>,
}

/// The boards pane and the host line of the status pane.
#[derive(Debug, Clone, PartialEq)]
pub struct BoardsView {
    pub host_version: Option<String>,
    pub klippy: KlippyState,
    pub boards: Vec<BoardRow>,
    /// Klipper/Katapult boards that are connected but not registered.
    pub unregistered: Vec<DeviceRow>,
    /// Everything else kflash sees and will not flash (ROM bootloaders included).
    pub other: Vec<DeviceRow>,
    pub registry_error: Option<String>,
}

impl BoardsView {
    /// Join the tracker's status (versions, states) with the devices view (serials, methods,
    /// what cannot be flashed and why).
    pub fn new(status: &Status, devices: &DevicesView) -> BoardsView {
        let boards = status
            .boards
            .iter()
            .map(|b| {
                let reg = devices.registered.iter().find(|r| r.key == b.key);
                BoardRow {
                    key: b.key.clone(),
                    name: b.name.clone(),
                    mcu: b.mcu.clone(),
                    connected: b.connected,
                    mode: b.mode,
                    serial: reg.and_then(|r| r.serial.clone()),
                    devnode: b.devnode.clone(),
                    method: reg.map(|r| r.flash_method.as_str().to_string()).unwrap_or_else(|| "default".into()),
                    version: b.version.clone(),
                    state: b.state,
                    relation: b.relation.clone(),
                    excluded: b.excluded,
                    ambiguous: b.ambiguous,
                    unreviewed: reg.and_then(|r| r.config_unreviewed.clone()),
                    can: b.interface.as_ref().zip(b.uuid.as_ref()).map(|(i, u)| format!("{i} {u}")),
                    reason: b.reason.clone(),
                }
            })
            .collect();
        let device = |b: &kflash::hotplug::Board, reason: Option<String>| {
            let id = &b.identity;
            DeviceRow {
                mode: id.mode.as_str().to_string(),
                mcu: id.mcu.clone(),
                serial: id.serial.clone(),
                name: id
                    .by_id_name()
                    .map(str::to_string)
                    .or_else(|| id.devnode.clone())
                    .unwrap_or_else(|| id.syspath.clone()),
                reason,
            }
        };
        BoardsView {
            host_version: status.host_version.clone(),
            klippy: status.klippy,
            boards,
            unregistered: devices.unregistered.iter().map(|b| device(b, None)).collect(),
            other: devices.other.iter().map(|o| device(&o.board, Some(o.reason.clone()))).collect(),
            registry_error: status.registry_error.clone(),
        }
    }
}

/// The status pane's facts that are not about boards.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HostView {
    /// Moonraker's `print_stats.state` (`standby`, `printing`, …), `None` when not known.
    pub print_state: Option<String>,
    /// The daemon's socket, when a daemon answers there.
    pub daemon: Option<String>,
    /// The last flash in the history, in a few words.
    pub last_flash: Option<String>,
}

/// The history's last record in a few words.
pub fn last_flash_text(r: &kflash::history::FlashRecord) -> String {
    let result = match r.result {
        kflash::history::FlashResult::Ok => "ok",
        kflash::history::FlashResult::Failed => "FAILED",
        kflash::history::FlashResult::Skipped => "skipped",
    };
    // The time without sub-seconds and offset: "2026-12-01 07:45".
    let time = r.time.get(..16).unwrap_or(&r.time).replace('T', " ");
    format!("{} {result} {time} ({})", r.board_key, r.version_after.as_deref().unwrap_or("-"))
}

pub fn klippy_text(k: KlippyState) -> &'static str {
    match k {
        KlippyState::Unknown => "unknown (Moonraker not reached)",
        KlippyState::Disconnected => "disconnected",
        KlippyState::Startup => "starting",
        KlippyState::Ready => "ready",
        KlippyState::Shutdown => "shutdown",
        KlippyState::Error => "error",
    }
}

pub fn mode_text(m: Option<Mode>) -> &'static str {
    match m {
        Some(Mode::Klipper) => "Klipper",
        Some(Mode::Katapult) => "Katapult",
        Some(Mode::RomBootloader) => "ROM",
        Some(Mode::Other) => "other",
        None => "-",
    }
}
