//! What the daemon knows about the boards, as a sans-IO tracker: fed the registry, board
//! events, Klippy's state and the versions learned, it answers the status and says what
//! changed. No I/O, no clock: tests drive it directly.
//!
//! A board's state is one of:
//! - `missing`: registered, not connected;
//! - `bootloader`: connected in Katapult or a ROM bootloader;
//! - `current` / `outdated`: running Klipper, its version known and equal to / different from
//!   the host tree's (with how far apart: [`crate::version::relation`]);
//! - `unknown`: running Klipper, its version not known (yet).
//!
//! A CAN node (a registry entry located on a CAN interface) is not a hotplug device: its
//! state comes from its interface (from the kernel) and Klippy's view, as
//! [`crate::can::presence`] weighs them; the bus itself is never queried here.
//!
//! A version is forgotten when its board goes away: it may come back with other firmware.
//! Klippy's view of a board counts only if Klippy became ready after the board appeared
//! (Klippy reads an MCU's version when it connects, and a replugged board is not reconnected
//! until Klipper restarts).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::can::presence::{self, Link, Presence};
use crate::hotplug::{Action, Board, BoardEvent};
use crate::identity::Mode;
use crate::locator::Locator;
use crate::moonraker::McuStatus;
pub use crate::moonraker_link::KlippyState;
use crate::registry::BoardEntry;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FirmwareState {
    Current,
    Outdated,
    Unknown,
    Bootloader,
    Missing,
}

/// Where a board's running version came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum VersionSource {
    /// Klippy's `mcu_version` for the `[mcu]` that uses this board's serial.
    Klippy,
    /// The board's own identify dictionary, read by the daemon.
    Identify,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BoardStatus {
    pub key: String,
    pub name: String,
    pub mcu: String,
    pub connected: bool,
    pub mode: Option<Mode>,
    pub devnode: Option<String>,
    pub version: Option<String>,
    pub version_source: Option<VersionSource>,
    pub state: FirmwareState,
    /// How the board's version relates to the host's, in words ("3 commits behind").
    pub relation: Option<String>,
    /// Left out of flash-all.
    pub excluded: bool,
    /// More than one connected device matches this entry.
    pub ambiguous: bool,
    /// printer.cfg has an `[mcu]` on this board's serial (Klippy needs it).
    pub in_printer_cfg: bool,
    /// A CAN node's interface and UUID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// Why a CAN node is missing or its state unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl BoardStatus {
    /// One line for the journal: the state, and for a CAN node what it rests on (its
    /// interface, Klippy's view), since no tty says whether it is there.
    pub fn summary(&self) -> String {
        let n = &self.name;
        match (self.state, self.reason.as_deref()) {
            (FirmwareState::Outdated, _) => format!(
                "{n} runs {}, not the host's version ({})",
                self.version.as_deref().unwrap_or("?"),
                self.relation.as_deref().unwrap_or("")
            ),
            (FirmwareState::Current, _) => format!("{n} runs the host's version"),
            (FirmwareState::Bootloader, _) => format!("{n} is in its bootloader"),
            (FirmwareState::Missing, Some(r)) => format!("{n} is not reachable: {r}"),
            (FirmwareState::Missing, None) => format!("{n} is not connected"),
            (FirmwareState::Unknown, Some(r)) => format!("{n}: its version is not known: {r}"),
            (FirmwareState::Unknown, None) => format!("{n} is connected; its version is not known yet"),
        }
    }
}

/// The whole picture, as `kflash status --json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    pub daemon: bool,
    pub host_version: Option<String>,
    pub klippy: KlippyState,
    pub boards: Vec<BoardStatus>,
    /// Klipper/Katapult boards connected but not registered.
    pub unregistered: Vec<Board>,
    /// Boards in a ROM bootloader (not registrable, and stuck if they were flashed).
    pub rom_bootloaders: Vec<Board>,
    /// Why the registry on disk is not the one in use (a broken edit), if it is not.
    pub registry_error: Option<String>,
    /// The daemon's own memory, filled in when the daemon answers `status`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<super::memory::MemoryUse>,
}

impl Status {
    /// The status in a few lines, for the printer's console (`KFLASH_STATUS`).
    pub fn console_lines(&self) -> Vec<String> {
        let host = self.host_version.as_deref().unwrap_or("unknown (the Klipper tree is not a git checkout)");
        let mut lines = vec![format!("kflash: host Klipper {host}")];
        for b in &self.boards {
            let what = match b.state {
                FirmwareState::Current => format!("current ({})", b.version.as_deref().unwrap_or("?")),
                FirmwareState::Outdated => format!(
                    "OUTDATED: runs {} ({})",
                    b.version.as_deref().unwrap_or("?"),
                    b.relation.as_deref().unwrap_or("another version")
                ),
                FirmwareState::Unknown => match &b.reason {
                    Some(why) => format!("state not known: {why}"),
                    None => "connected, version not known yet".into(),
                },
                FirmwareState::Bootloader => {
                    format!("in its bootloader ({})", b.mode.map(|m| m.as_str()).unwrap_or("?"))
                }
                FirmwareState::Missing => match &b.reason {
                    Some(why) => format!("missing: {why}"),
                    None => "not connected".into(),
                },
            };
            lines.push(format!("kflash: {} ({}): {what}", b.name, b.key));
        }
        let outdated = self.boards.iter().filter(|b| b.state == FirmwareState::Outdated).count();
        if outdated > 0 {
            lines.push(format!("kflash: {outdated} board(s) to flash: run KFLASH_FLASH_ALL or `kflash flash-all`"));
        }
        lines
    }
}

/// Something worth announcing: a change the status alone would not make loud.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "notice", rename_all = "kebab-case")]
pub enum Notice {
    /// A registered board's status changed (state, version, connection).
    Board { status: BoardStatus },
    /// A Klipper or Katapult board that is not registered appeared.
    Unregistered { board: Board },
    /// A board appeared in a chip's ROM bootloader.
    RomBootloader { board: Board },
    /// Two connected devices match one registered board.
    SameIdentity { key: String, devnodes: Vec<String> },
    /// A registered board printer.cfg uses went away.
    MissingButNeeded { key: String },
}

#[derive(Debug, Clone)]
struct Learned {
    version: String,
    source: VersionSource,
}

/// The daemon's knowledge. Every input returns the notices it caused.
pub struct Tracker {
    entries: Vec<BoardEntry>,
    /// Present devices by syspath, with the input count when each appeared.
    present: BTreeMap<String, (Board, u64)>,
    versions: BTreeMap<String, Learned>,
    host_version: Option<String>,
    klippy: KlippyState,
    /// The input count when Klippy last became ready, and the MCUs it reported then.
    klippy_ready_at: Option<u64>,
    mcus: Vec<McuStatus>,
    /// Klippy's `state_message` while it is in shutdown or error.
    klippy_message: Option<String>,
    /// CAN interfaces as the kernel last said, with the input count of their last change.
    links: BTreeMap<String, (Link, u64)>,
    registry_error: Option<String>,
    seq: u64,
}

impl Tracker {
    pub fn new(entries: Vec<BoardEntry>, host_version: Option<String>, boards: Vec<Board>) -> Tracker {
        let mut t = Tracker {
            entries,
            present: BTreeMap::new(),
            versions: BTreeMap::new(),
            host_version,
            klippy: KlippyState::Unknown,
            klippy_ready_at: None,
            mcus: Vec::new(),
            klippy_message: None,
            links: BTreeMap::new(),
            registry_error: None,
            seq: 0,
        };
        for b in boards {
            t.present.insert(b.identity.syspath.clone(), (b, 0));
        }
        t
    }

    pub fn status(&self) -> Status {
        let connected: Vec<&Board> = self.present.values().map(|(b, _)| b).collect();
        let boards = self.entries.iter().map(|e| self.board_status(e, &connected)).collect();
        let unregistered = connected
            .iter()
            .filter(|b| b.key.is_none() && b.identity.mode.is_eligible() && b.identity.mcu.is_some())
            .map(|b| (*b).clone())
            .collect();
        let rom_bootloaders =
            connected.iter().filter(|b| b.identity.mode == Mode::RomBootloader).map(|b| (*b).clone()).collect();
        Status {
            daemon: true,
            host_version: self.host_version.clone(),
            klippy: self.klippy,
            boards,
            unregistered,
            rom_bootloaders,
            registry_error: self.registry_error.clone(),
            memory: None,
        }
    }

    fn board_status(&self, e: &BoardEntry, connected: &[&Board]) -> BoardStatus {
        if let Locator::Can { interface, uuid } = e.locator() {
            return self.can_status(e, &interface, &uuid);
        }
        let matches: Vec<&&Board> = connected.iter().filter(|b| b.key.as_deref() == Some(&e.key)).collect();
        let first = matches.first().map(|b| **b);
        let learned = self.versions.get(&e.key).filter(|_| first.is_some_and(|b| b.identity.mode == Mode::Klipper));
        let version = learned.map(|l| l.version.clone());
        let (running, relation) = self.against_host(version.as_deref());
        let state = match first.map(|b| b.identity.mode) {
            None => FirmwareState::Missing,
            Some(Mode::Katapult | Mode::RomBootloader) => FirmwareState::Bootloader,
            Some(_) => running,
        };
        BoardStatus {
            key: e.key.clone(),
            name: e.name.clone(),
            mcu: e.mcu.clone(),
            connected: first.is_some(),
            mode: first.map(|b| b.identity.mode),
            devnode: first.and_then(|b| b.identity.devnode.clone()),
            version,
            version_source: learned.map(|l| l.source),
            state,
            relation,
            excluded: !e.flashable,
            ambiguous: matches.len() > 1,
            in_printer_cfg: self.in_printer_cfg(e, first),
            interface: None,
            uuid: None,
            reason: None,
        }
    }

    /// A CAN node: its interface and Klippy's view, never the bus.
    fn can_status(&self, e: &BoardEntry, interface: &str, uuid: &crate::can::CanUuid) -> BoardStatus {
        let link = self.links.get(interface).copied();
        let view =
            presence::KlippyView { state: self.klippy, message: self.klippy_message.as_deref(), mcus: &self.mcus };
        let mut presence = presence::assess(interface, uuid, link.map(|(l, _)| l), view);
        // Klippy read the version when it connected: an interface that went away since (and
        // came back) may carry a node flashed meanwhile.
        if let (Presence::Running { .. }, Some((_, changed)), Some(ready)) = (&presence, link, self.klippy_ready_at) {
            if changed > ready {
                presence = Presence::Unknown {
                    reason: format!("{interface} went down after Klippy connected; Klippy's view is from before"),
                };
            }
        }
        let missing = matches!(presence, Presence::Missing { .. });
        let (version, reason) = match presence {
            Presence::Running { version, .. } => (Some(version), None),
            Presence::Missing { reason } | Presence::Unknown { reason } => (None, Some(reason)),
        };
        let (running, relation) = self.against_host(version.as_deref());
        let state = if missing { FirmwareState::Missing } else { running };
        BoardStatus {
            key: e.key.clone(),
            name: e.name.clone(),
            mcu: e.mcu.clone(),
            connected: version.is_some(),
            mode: version.as_ref().map(|_| Mode::Klipper),
            devnode: None,
            version_source: version.as_ref().map(|_| VersionSource::Klippy),
            version,
            state,
            relation,
            excluded: !e.flashable,
            ambiguous: false,
            in_printer_cfg: crate::moonraker::mcu_for_canbus_uuid(&self.mcus, uuid).is_some(),
            interface: Some(interface.to_string()),
            uuid: Some(uuid.to_string()),
            reason,
        }
    }

    /// A board running `version`, against the host's Klipper: its state (unknown while
    /// either version is) and how far apart the two are. USB and CAN boards alike.
    fn against_host(&self, version: Option<&str>) -> (FirmwareState, Option<String>) {
        match (version, self.host_version.as_deref()) {
            (Some(v), Some(h)) => {
                let state = if v == h { FirmwareState::Current } else { FirmwareState::Outdated };
                (state, Some(crate::version::relation(h, v).to_string()))
            }
            _ => (FirmwareState::Unknown, None),
        }
    }

    fn in_printer_cfg(&self, e: &BoardEntry, board: Option<&Board>) -> bool {
        let by_board = board.is_some_and(|b| crate::moonraker::mcu_for_board(&self.mcus, &b.identity).is_some());
        let by_serial = e.serial.as_deref().is_some_and(|s| crate::moonraker::mcu_for_serial(&self.mcus, s).is_some());
        by_board || by_serial
    }

    /// Run `change` and return what it changed, as notices.
    fn observe(&mut self, change: impl FnOnce(&mut Tracker) -> Vec<Notice>) -> Vec<Notice> {
        self.seq += 1;
        let before = self.status();
        let mut notices = change(self);
        let after = self.status();
        for b in &after.boards {
            let old = before.boards.iter().find(|o| o.key == b.key);
            if old != Some(b) {
                if b.ambiguous && !old.is_some_and(|o| o.ambiguous) {
                    let devnodes = self.devnodes_of(&b.key);
                    notices.push(Notice::SameIdentity { key: b.key.clone(), devnodes });
                }
                if b.state == FirmwareState::Missing && old.is_some_and(|o| o.connected) && b.in_printer_cfg {
                    notices.push(Notice::MissingButNeeded { key: b.key.clone() });
                }
                notices.push(Notice::Board { status: b.clone() });
            }
        }
        notices
    }

    fn devnodes_of(&self, key: &str) -> Vec<String> {
        self.present
            .values()
            .filter(|(b, _)| b.key.as_deref() == Some(key))
            .filter_map(|(b, _)| b.identity.devnode.clone())
            .collect()
    }

    /// A device came, went or changed.
    pub fn board_event(&mut self, ev: &BoardEvent) -> Vec<Notice> {
        self.observe(|t| {
            let b: &Board = &ev.board;
            let syspath = b.identity.syspath.clone();
            let mut notices = Vec::new();
            match ev.action {
                Action::Removed => {
                    t.present.remove(&syspath);
                    if let Some(key) = &b.key {
                        t.versions.remove(key);
                    }
                }
                Action::Added | Action::ModeChanged => {
                    if let Some(key) = &b.key {
                        t.versions.remove(key);
                    }
                    let seq = t.seq;
                    t.present.insert(syspath, (b.clone(), seq));
                    if b.key.is_none() && b.identity.mode.is_eligible() && b.identity.mcu.is_some() {
                        notices.push(Notice::Unregistered { board: b.clone() });
                    }
                    if b.identity.mode == Mode::RomBootloader {
                        notices.push(Notice::RomBootloader { board: b.clone() });
                    }
                    t.take_klippy_version(b);
                }
                Action::Changed => {
                    let seq = t.present.get(&syspath).map(|(_, s)| *s).unwrap_or(t.seq);
                    t.present.insert(syspath, (b.clone(), seq));
                }
            }
            notices
        })
    }

    /// Klippy's state changed (pushed by Moonraker). On `ready`, `mcus` is what it reports.
    pub fn klippy_state(&mut self, state: KlippyState, mcus: Vec<McuStatus>) -> Vec<Notice> {
        self.observe(|t| {
            // Only the change into `ready` is Klippy connecting to its MCUs; asking again while
            // it stays ready says nothing new about when it read them.
            if state == KlippyState::Ready && t.klippy != KlippyState::Ready {
                t.klippy_ready_at = Some(t.seq);
            }
            t.klippy = state;
            t.klippy_message = None;
            if state == KlippyState::Ready {
                t.mcus = mcus;
                let boards: Vec<Board> = t.present.values().map(|(b, _)| b.clone()).collect();
                for b in &boards {
                    t.take_klippy_version(b);
                }
            }
            Vec::new()
        })
    }

    /// Klippy's word for `board`, if Klippy connected to it after it appeared.
    fn take_klippy_version(&mut self, board: &Board) {
        let (Some(key), Some(ready_at)) = (&board.key, self.klippy_ready_at) else { return };
        if self.klippy != KlippyState::Ready || board.identity.mode != Mode::Klipper {
            return;
        }
        let appeared = self.present.get(&board.identity.syspath).map(|(_, s)| *s).unwrap_or(u64::MAX);
        if appeared >= ready_at {
            return;
        }
        let found = crate::moonraker::mcu_for_board(&self.mcus, &board.identity).and_then(|m| m.mcu_version.clone());
        if let Some(version) = found {
            self.versions.insert(key.clone(), Learned { version, source: VersionSource::Klippy });
        }
    }

    /// The board's own word (identify), read by the daemon.
    pub fn identified(&mut self, syspath: &str, appearance: u64, version: String) -> Vec<Notice> {
        self.observe(|t| {
            // An answer read from an earlier appearance of the device (it left and came back
            // meanwhile, perhaps with other firmware) says nothing about this one.
            match t.present.get(syspath) {
                Some((b, seen)) if *seen == appearance => {
                    if let Some(key) = b.key.clone() {
                        t.versions.insert(key, Learned { version, source: VersionSource::Identify });
                    }
                }
                _ => {}
            }
            Vec::new()
        })
    }

    /// Which appearance of the device at `syspath` is present now (a count that changes each
    /// time it is added or changes mode); `None` when it is not present.
    pub fn appearance(&self, syspath: &str) -> Option<u64> {
        self.present.get(syspath).map(|(_, seen)| *seen)
    }

    /// Registered boards running Klipper whose version is not known: candidates for
    /// identify (the daemon checks nobody holds their tty).
    pub fn unknown_versions(&self) -> Vec<Board> {
        self.present
            .values()
            .map(|(b, _)| b)
            .filter(|b| b.identity.mode == Mode::Klipper)
            .filter(|b| b.key.as_ref().is_some_and(|k| !self.versions.contains_key(k)))
            .cloned()
            .collect()
    }

    /// A reloaded registry (SIGHUP): new entries, and boards re-resolved against them.
    pub fn registry(&mut self, entries: Vec<BoardEntry>, boards: Vec<Board>) -> Vec<Notice> {
        self.observe(|t| {
            t.entries = entries;
            t.registry_error = None;
            let old = std::mem::take(&mut t.present);
            for b in boards {
                let seq = old.get(&b.identity.syspath).map(|(_, s)| *s).unwrap_or(t.seq);
                t.present.insert(b.identity.syspath.clone(), (b, seq));
            }
            let keys: Vec<String> = t.entries.iter().map(|e| e.key.clone()).collect();
            t.versions.retain(|k, _| keys.contains(k));
            let boards: Vec<Board> = t.present.values().map(|(b, _)| b.clone()).collect();
            for b in &boards {
                t.take_klippy_version(b);
            }
            Vec::new()
        })
    }

    /// The registry on disk is broken: the last good one stays in use.
    pub fn registry_broken(&mut self, error: String) -> Vec<Notice> {
        self.observe(|t| {
            t.registry_error = Some(error);
            Vec::new()
        })
    }

    /// Klippy's `state_message` (asked after it entered shutdown or error): it may name the
    /// CAN node it lost.
    pub fn klippy_message(&mut self, message: Option<String>) -> Vec<Notice> {
        self.observe(|t| {
            t.klippy_message = message;
            Vec::new()
        })
    }

    /// The kernel's word on CAN interfaces (their state now, or a change).
    pub fn links(&mut self, changes: Vec<(String, Link)>) -> Vec<Notice> {
        self.observe(|t| {
            let wanted = t.can_interfaces();
            for (name, link) in changes.into_iter().filter(|(n, _)| wanted.contains(n)) {
                let seq = t.seq;
                match t.links.get(&name) {
                    Some((old, _)) if *old == link => {}
                    // The first look is not a change: Klippy's view from before still counts.
                    None => {
                        t.links.insert(name, (link, 0));
                    }
                    Some(_) => {
                        t.links.insert(name, (link, seq));
                    }
                }
            }
            Vec::new()
        })
    }

    /// The CAN interfaces the registered CAN nodes sit on (to be looked at).
    pub fn can_interfaces(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .entries
            .iter()
            .filter_map(|e| match e.locator() {
                Locator::Can { interface, .. } => Some(interface),
                Locator::Usb { .. } => None,
            })
            .collect();
        all.sort();
        all.dedup();
        all
    }

    pub fn host_version_str(&self) -> Option<&str> {
        self.host_version.as_deref()
    }

    pub fn host_version(&mut self, version: Option<String>) -> Vec<Notice> {
        self.observe(|t| {
            t.host_version = version;
            Vec::new()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::BoardIdentity;
    use crate::registry::FlashMethod;

    const HOST: &str = "v0.13.0-10-gnew";
    const OLD: &str = "v0.13.0-7-gold";

    fn entry(key: &str, serial: &str) -> BoardEntry {
        BoardEntry {
            key: key.into(),
            name: key.to_uppercase(),
            mcu: "stm32h723xx".into(),
            serial: Some(serial.into()),
            serial_pattern: None,
            flash_method: FlashMethod::Katapult,
            flashable: true,
            canbus_uuid: None,
            can_interface: None,
        }
    }

    fn board(key: Option<&str>, serial: &str, mode: Mode, n: u32) -> Board {
        let app = match mode {
            Mode::Katapult => "katapult",
            _ => "Klipper",
        };
        let by_id = format!("/dev/serial/by-id/usb-{app}_stm32h723xx_{serial}-if00");
        Board {
            identity: BoardIdentity {
                mode,
                mcu: Some("stm32h723xx".into()),
                serial: Some(serial.into()),
                vendor_id: Some("1d50".into()),
                product_id: Some(if mode == Mode::Katapult { "6177" } else { "614e" }.into()),
                manufacturer: Some(app.into()),
                port_path: Some(format!("platform-dummy_hcd.0-usb-0:{n}:1.0")),
                usb_device: Some(format!("/devices/usb1/1-{n}")),
                devnode: Some(format!("/dev/ttyACM{n}")),
                by_id: Some(by_id),
                by_path: None,
                syspath: format!("/devices/usb1/1-{n}/1-{n}:1.0/tty/ttyACM{n}"),
                rom_bootloader: None,
            },
            key: key.map(String::from),
        }
    }

    fn ev(action: Action, b: &Board) -> BoardEvent {
        BoardEvent { action, board: Box::new(b.clone()), previous_mode: None }
    }

    fn mcu(serial_by_id: &str, version: &str) -> McuStatus {
        McuStatus {
            object: "mcu".into(),
            name: "mcu".into(),
            mcu_version: Some(version.into()),
            mcu: Some("stm32h723xx".into()),
            app: None,
            serial: Some(serial_by_id.into()),
            canbus_uuid: None,
        }
    }

    fn state_of(t: &Tracker, key: &str) -> BoardStatus {
        t.status().boards.into_iter().find(|b| b.key == key).unwrap()
    }

    fn board_notices(n: &[Notice]) -> Vec<(String, FirmwareState)> {
        n.iter()
            .filter_map(|n| match n {
                Notice::Board { status } => Some((status.key.clone(), status.state)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_board_is_missing_then_unknown_then_outdated_by_identify() {
        let mut t = Tracker::new(vec![entry("octopus", "AAA")], Some(HOST.into()), vec![]);
        assert_eq!(state_of(&t, "octopus").state, FirmwareState::Missing);
        let b = board(Some("octopus"), "AAA", Mode::Klipper, 1);
        let n = t.board_event(&ev(Action::Added, &b));
        assert_eq!(board_notices(&n), [("octopus".to_string(), FirmwareState::Unknown)]);
        assert_eq!(t.unknown_versions(), std::slice::from_ref(&b));
        let first = t.appearance(&b.identity.syspath).unwrap();
        let n = t.identified(&b.identity.syspath, first, OLD.into());
        assert_eq!(board_notices(&n), [("octopus".to_string(), FirmwareState::Outdated)]);
        let s = state_of(&t, "octopus");
        assert_eq!((s.version.as_deref(), s.version_source), (Some(OLD), Some(VersionSource::Identify)));
        assert_eq!(s.relation.as_deref(), Some("3 commits behind"));
        assert!(t.unknown_versions().is_empty());
        // Nothing changes: nothing is said.
        assert!(t.identified(&b.identity.syspath, first, OLD.into()).is_empty());

        // It leaves and comes back while an identify of its first appearance is under way:
        // that answer is not taken for the new appearance.
        t.board_event(&ev(Action::Removed, &b));
        t.board_event(&ev(Action::Added, &b));
        let second = t.appearance(&b.identity.syspath).unwrap();
        assert_ne!(first, second);
        assert!(t.identified(&b.identity.syspath, first, HOST.into()).is_empty());
        assert_eq!(state_of(&t, "octopus").state, FirmwareState::Unknown);
        assert_eq!(t.unknown_versions(), std::slice::from_ref(&b));
        let n = t.identified(&b.identity.syspath, second, HOST.into());
        assert_eq!(board_notices(&n), [("octopus".to_string(), FirmwareState::Current)]);
    }

    #[test]
    fn a_version_is_forgotten_when_the_board_goes_away_or_enters_its_bootloader() {
        let b = board(Some("octopus"), "AAA", Mode::Klipper, 1);
        let mut t = Tracker::new(vec![entry("octopus", "AAA")], Some(HOST.into()), vec![b.clone()]);
        t.identified(&b.identity.syspath, 0, HOST.into());
        assert_eq!(state_of(&t, "octopus").state, FirmwareState::Current);
        t.board_event(&ev(Action::Removed, &b));
        let boot = board(Some("octopus"), "AAA", Mode::Katapult, 2);
        let n = t.board_event(&ev(Action::ModeChanged, &boot));
        assert_eq!(board_notices(&n), [("octopus".to_string(), FirmwareState::Bootloader)]);
        t.board_event(&ev(Action::Removed, &boot));
        let back = board(Some("octopus"), "AAA", Mode::Klipper, 3);
        t.board_event(&ev(Action::ModeChanged, &back));
        assert_eq!(state_of(&t, "octopus").state, FirmwareState::Unknown, "a returning board is asked again");
    }

    #[test]
    fn klippys_word_counts_only_for_boards_it_connected_to_after_they_appeared() {
        let b = board(Some("octopus"), "AAA", Mode::Klipper, 1);
        let by_id = b.identity.by_id.clone().unwrap();
        let mut t = Tracker::new(vec![entry("octopus", "AAA")], Some(HOST.into()), vec![b.clone()]);
        let n = t.klippy_state(KlippyState::Ready, vec![mcu(&by_id, OLD)]);
        assert_eq!(board_notices(&n), [("octopus".to_string(), FirmwareState::Outdated)]);
        assert_eq!(state_of(&t, "octopus").version_source, Some(VersionSource::Klippy));
        assert!(state_of(&t, "octopus").in_printer_cfg);
        // Replugged (e.g. flashed by hand): Klippy's view is from before, so it is not taken.
        t.board_event(&ev(Action::Removed, &b));
        let n = t.board_event(&ev(Action::Added, &b));
        assert_eq!(board_notices(&n), [("octopus".to_string(), FirmwareState::Unknown)]);
        // Klipper restarted: now it counts.
        t.klippy_state(KlippyState::Disconnected, vec![]);
        t.klippy_state(KlippyState::Ready, vec![mcu(&by_id, HOST)]);
        assert_eq!(state_of(&t, "octopus").state, FirmwareState::Current);
    }

    #[test]
    fn a_needed_board_going_away_an_unregistered_board_and_one_identity_twice_are_announced() {
        let b = board(Some("octopus"), "AAA", Mode::Klipper, 1);
        let by_id = b.identity.by_id.clone().unwrap();
        let mut t = Tracker::new(vec![entry("octopus", "AAA")], Some(HOST.into()), vec![b.clone()]);
        t.klippy_state(KlippyState::Ready, vec![mcu(&by_id, HOST)]);
        let n = t.board_event(&ev(Action::Removed, &b));
        assert!(n.contains(&Notice::MissingButNeeded { key: "octopus".into() }), "{n:?}");
        let stranger = board(None, "BBB", Mode::Klipper, 2);
        let n = t.board_event(&ev(Action::Added, &stranger));
        assert_eq!(n, [Notice::Unregistered { board: stranger.clone() }]);
        assert_eq!(t.status().unregistered, [stranger]);
        t.board_event(&ev(Action::Added, &b));
        let twin = board(Some("octopus"), "AAA", Mode::Klipper, 3);
        let n = t.board_event(&ev(Action::Added, &twin));
        assert!(
            n.contains(&Notice::SameIdentity {
                key: "octopus".into(),
                devnodes: vec!["/dev/ttyACM1".into(), "/dev/ttyACM3".into()]
            }),
            "{n:?}"
        );
    }

    fn can_entry(key: &str, uuid: &str) -> BoardEntry {
        BoardEntry {
            serial: None,
            canbus_uuid: Some(uuid.parse().unwrap()),
            can_interface: Some("vcan0".into()),
            ..entry(key, "")
        }
    }

    fn can_mcu(name: &str, uuid: &str, version: &str) -> McuStatus {
        McuStatus {
            object: format!("mcu {name}"),
            name: name.into(),
            mcu_version: Some(version.into()),
            mcu: Some("stm32g0b1xx".into()),
            app: None,
            serial: None,
            canbus_uuid: Some(uuid.into()),
        }
    }

    const EBB: &str = "0a1b2c3d4e5f";
    const SB: &str = "00000000beef";

    #[test]
    fn can_nodes_take_klippys_view_and_go_missing_with_their_interface() {
        let mut t = Tracker::new(vec![can_entry("ebb", EBB), can_entry("sb", SB)], Some(HOST.into()), vec![]);
        assert_eq!(t.can_interfaces(), ["vcan0"]);
        t.links(vec![("vcan0".into(), Link::Up), ("eth0".into(), Link::Up)]);
        let s = state_of(&t, "ebb");
        assert_eq!((s.state, s.connected), (FirmwareState::Unknown, false));
        assert!(s.reason.as_deref().unwrap().contains("Klippy is not reachable"), "{s:?}");
        let n = t.klippy_state(KlippyState::Ready, vec![can_mcu("ebb", EBB, HOST), can_mcu("sb", "00000000BEEF", OLD)]);
        assert_eq!(
            board_notices(&n),
            [("ebb".to_string(), FirmwareState::Current), ("sb".to_string(), FirmwareState::Outdated)]
        );
        let sb = state_of(&t, "sb");
        assert_eq!((sb.connected, sb.mode, sb.version.as_deref()), (true, Some(Mode::Klipper), Some(OLD)));
        assert_eq!((sb.interface.as_deref(), sb.uuid.as_deref()), (Some("vcan0"), Some(SB)));
        assert!(sb.in_printer_cfg && sb.reason.is_none());
        // The same comparison with the host as a USB board's: how far apart, not just "differs".
        assert_eq!(sb.relation, Some(crate::version::relation(HOST, OLD).to_string()));
        assert!(state_of(&t, "ebb").relation.is_some());
        assert_eq!(sb.summary(), format!("{} runs {OLD}, not the host's version (3 commits behind)", sb.name));
        let json = serde_json::to_value(&sb).unwrap();
        assert_eq!((json["interface"].as_str(), json["uuid"].as_str()), (Some("vcan0"), Some(SB)));

        // The interface goes down: both missing, and printer.cfg needs them.
        let n = t.links(vec![("vcan0".into(), Link::Down)]);
        assert_eq!(
            board_notices(&n),
            [("ebb".to_string(), FirmwareState::Missing), ("sb".to_string(), FirmwareState::Missing)]
        );
        assert!(n.contains(&Notice::MissingButNeeded { key: "ebb".into() }), "{n:?}");
        let ebb = state_of(&t, "ebb");
        assert!(ebb.reason.as_deref().unwrap().contains("vcan0 is down"));
        let line = ebb.summary();
        assert!(
            line.starts_with(&format!("{} is not reachable: ", ebb.name)) && line.contains("vcan0 is down"),
            "{line}"
        );
        // Back up while Klippy stays ready: its view is from before the outage.
        t.links(vec![("vcan0".into(), Link::Up)]);
        let s = state_of(&t, "ebb");
        assert_eq!(s.state, FirmwareState::Unknown, "{s:?}");
        assert!(s.summary().starts_with(&format!("{}: its version is not known: ", s.name)), "{}", s.summary());
        assert!(s.reason.unwrap().contains("went down after Klippy connected"));
        // Klipper restarted: its view counts again.
        t.klippy_state(KlippyState::Disconnected, vec![]);
        t.klippy_state(KlippyState::Ready, vec![can_mcu("ebb", EBB, HOST)]);
        assert_eq!(state_of(&t, "ebb").state, FirmwareState::Current);
        assert_eq!(state_of(&t, "sb").state, FirmwareState::Unknown, "no longer in printer.cfg");
    }

    #[test]
    fn a_can_node_klippy_lost_is_missing_and_console_lines_say_why() {
        let mut t = Tracker::new(vec![can_entry("ebb", EBB)], Some(HOST.into()), vec![]);
        t.klippy_state(KlippyState::Ready, vec![can_mcu("ebb", EBB, HOST)]);
        t.klippy_state(KlippyState::Shutdown, vec![]);
        assert_eq!(state_of(&t, "ebb").state, FirmwareState::Unknown);
        let n = t.klippy_message(Some("Lost communication with MCU 'ebb'".into()));
        assert_eq!(board_notices(&n), [("ebb".to_string(), FirmwareState::Missing)]);
        let lines = t.status().console_lines();
        assert!(lines[1].contains("missing: Klippy lost [mcu ebb]"), "{lines:?}");
    }

    #[test]
    fn a_reloaded_registry_resolves_present_boards_again() {
        let stranger = board(None, "BBB", Mode::Klipper, 2);
        let mut t = Tracker::new(vec![], Some(HOST.into()), vec![stranger.clone()]);
        assert_eq!(t.status().unregistered.len(), 1);
        let registered = board(Some("ebb"), "BBB", Mode::Klipper, 2);
        let n = t.registry(vec![entry("ebb", "BBB")], vec![registered]);
        assert_eq!(board_notices(&n), [("ebb".to_string(), FirmwareState::Unknown)]);
        assert!(t.status().unregistered.is_empty());
        t.registry_broken("boards.toml:3: expected `=`".into());
        assert_eq!(t.status().registry_error.as_deref(), Some("boards.toml:3: expected `=`"));
        assert_eq!(t.status().boards.len(), 1, "the last good registry stays in use");
    }
}
