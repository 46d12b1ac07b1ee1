//! `kflash watch`: one record per USB serial hotplug change, as a text line or a JSON object,
//! and one per change of a registered CAN node as the status sees it (its interface from the
//! kernel, Klippy's view through Moonraker; the bus itself is not queried).

use std::collections::HashMap;

use chrono::{DateTime, Local, SecondsFormat};
use serde::Serialize;

use crate::daemon::status::{BoardStatus, FirmwareState};
use crate::hotplug::{Board, BoardEvent};
use crate::identity::Mode;

/// One line of `kflash watch --json`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WatchRecord {
    pub time: String,
    /// Seconds on CLOCK_MONOTONIC when kflash had the record: the clock of udev's
    /// `USEC_INITIALIZED` and the rig simulator's `bind_mono`, for measuring latency.
    pub monotonic: f64,
    /// `present` (already there when watch started), `added`, `removed`, `mode-changed`, `changed`.
    pub action: String,
    /// `null` for a CAN node not running Klipper as far as is known.
    pub mode: Option<Mode>,
    pub previous_mode: Option<Mode>,
    pub mcu: Option<String>,
    pub serial: Option<String>,
    pub devnode: Option<String>,
    pub by_id: Option<String>,
    pub by_path: Option<String>,
    /// Registry key of the board, or null when unregistered.
    pub device: Option<String>,
    /// Display name of the registered board.
    pub name: Option<String>,
    /// A CAN node: its interface, UUID, state (`current`, `outdated`, `unknown`, `missing`),
    /// version (Klippy's) and why it is missing or unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<FirmwareState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

fn monotonic_now() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes only into the timespec passed to it.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

impl WatchRecord {
    pub fn from_event(ev: &BoardEvent, names: &HashMap<String, String>, now: DateTime<Local>) -> WatchRecord {
        let mut r = WatchRecord::present(&ev.board, names, now);
        r.action = ev.action.as_str().to_string();
        r.previous_mode = ev.previous_mode;
        r
    }

    pub fn present(b: &Board, names: &HashMap<String, String>, now: DateTime<Local>) -> WatchRecord {
        let id = &b.identity;
        WatchRecord {
            time: now.to_rfc3339_opts(SecondsFormat::Millis, false),
            monotonic: monotonic_now(),
            action: "present".into(),
            mode: Some(id.mode),
            previous_mode: None,
            mcu: id.mcu.clone(),
            serial: id.serial.clone(),
            devnode: id.devnode.clone(),
            by_id: id.by_id.clone(),
            by_path: id.by_path.clone(),
            device: b.key.clone(),
            name: b.key.as_ref().and_then(|k| names.get(k).cloned()),
            interface: None,
            uuid: None,
            state: None,
            version: None,
            reason: None,
        }
    }

    /// A CAN node's status; `before` is its previous one (`None`: already there when watch
    /// started). Coming into Klippy's view is `added`, going missing `removed`.
    pub fn can(s: &BoardStatus, before: Option<&BoardStatus>, now: DateTime<Local>) -> WatchRecord {
        let action = match before {
            None => "present",
            Some(b) if !b.connected && s.connected => "added",
            Some(b) if b.state != FirmwareState::Missing && s.state == FirmwareState::Missing => "removed",
            Some(_) => "changed",
        };
        WatchRecord {
            time: now.to_rfc3339_opts(SecondsFormat::Millis, false),
            monotonic: monotonic_now(),
            action: action.into(),
            mode: s.mode,
            previous_mode: before.and_then(|b| b.mode).filter(|m| Some(*m) != s.mode),
            mcu: Some(s.mcu.clone()),
            serial: None,
            devnode: None,
            by_id: None,
            by_path: None,
            device: Some(s.key.clone()),
            name: Some(s.name.clone()),
            interface: s.interface.clone(),
            uuid: s.uuid.clone(),
            state: Some(s.state),
            version: s.version.clone(),
            reason: s.reason.clone(),
        }
    }

    pub fn json_line(&self) -> String {
        serde_json::to_string(self).expect("a watch record always serializes")
    }

    /// `12:03:04.120  mode-changed  Octopus Pro [octopus]  katapult (was klipper)  stm32h723xx  29001A…  /dev/ttyACM1`
    pub fn text_line(&self) -> String {
        let time = DateTime::parse_from_rfc3339(&self.time)
            .map(|t| t.format("%H:%M:%S%.3f").to_string())
            .unwrap_or_else(|_| self.time.clone());
        let who = match (&self.name, &self.device) {
            (Some(n), Some(k)) => format!("{n} [{k}]"),
            (None, Some(k)) => format!("[{k}]"),
            _ => "(unregistered)".to_string(),
        };
        let now = self.mode.map(|m| m.to_string()).unwrap_or_else(|| "-".into());
        let mode = match self.previous_mode {
            Some(p) => format!("{now} (was {p})"),
            None => now,
        };
        if let (Some(interface), Some(uuid)) = (&self.interface, &self.uuid) {
            let state = self.state.map(|s| format!("{s:?}").to_lowercase()).unwrap_or_default();
            let why = self.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default();
            return format!(
                "{time}  {:<12}  {who:<24}  {mode:<20}  {:<12}  CAN {interface} {uuid}  {state} {}{why}",
                self.action,
                self.mcu.as_deref().unwrap_or("-"),
                self.version.as_deref().unwrap_or("-"),
            );
        }
        format!(
            "{time}  {:<12}  {who:<24}  {mode:<20}  {:<12}  {:<24}  {}",
            self.action,
            self.mcu.as_deref().unwrap_or("-"),
            self.serial.as_deref().unwrap_or("-"),
            self.devnode.as_deref().unwrap_or("-"),
        )
    }
}

/// The registered CAN nodes, followed as the status sees them: their interfaces (rtnetlink)
/// and Klippy's view (Moonraker's pushes, then one question per change). Never the bus.
pub struct CanWatch {
    tracker: crate::daemon::status::Tracker,
    last: Vec<BoardStatus>,
    links: Option<crate::can::linkwatch::LinkWatch>,
    mr: crate::moonraker::Moonraker,
    inbox: crate::moonraker_link::LinkInbox,
    task: crate::moonraker_link::LinkTask,
    _link: crate::moonraker_link::LinkHandle,
    answers_tx: tokio::sync::mpsc::Sender<crate::daemon::KlippyUpdate>,
    answers: tokio::sync::mpsc::Receiver<crate::daemon::KlippyUpdate>,
}

impl CanWatch {
    /// `None` when no CAN node is registered. The first records are each node as it is now
    /// (`present`).
    pub async fn start(reg: &crate::registry::Registry) -> Option<(CanWatch, Vec<WatchRecord>)> {
        let entries: Vec<_> = reg.boards().filter(|e| e.locator().is_can()).cloned().collect();
        if entries.is_empty() {
            return None;
        }
        let host = crate::firmware::TreeStamp::compute(&reg.settings.klipper_dir()).await.version().map(String::from);
        let mut tracker = crate::daemon::status::Tracker::new(entries, host, Vec::new());
        // Subscribed before the first read, so no change falls in between.
        let links = crate::can::linkwatch::LinkWatch::open()
            .map_err(|e| tracing::warn!("CAN interfaces cannot be watched ({e}); Klippy's view only"))
            .ok();
        tracker.links(crate::daemon::read_links(&tracker.can_interfaces()));
        let mut config = crate::moonraker_link::LinkConfig::new(reg.settings.moonraker_socket(), &[]);
        config.client_name = "kflash-watch".into();
        let (link, inbox, task) = crate::moonraker_link::spawn(config);
        let mr = crate::moonraker::Moonraker::from_settings(&reg.settings);
        let first = crate::daemon::ask_klippy(&mr).await;
        tracker.klippy_state(first.state, first.mcus);
        tracker.klippy_message(first.message);
        let (answers_tx, answers) = tokio::sync::mpsc::channel(4);
        let last = tracker.status().boards;
        let now = Local::now();
        let records = last.iter().map(|s| WatchRecord::can(s, None, now)).collect();
        Some((CanWatch { tracker, last, links, mr, inbox, task, _link: link, answers_tx, answers }, records))
    }

    /// The next change of one or more nodes.
    pub async fn next(&mut self) -> Vec<WatchRecord> {
        loop {
            tokio::select! {
                changes = crate::daemon::next_links(&mut self.links) => {
                    let changes = changes.unwrap_or_else(|e| {
                        if e.raw_os_error() != Some(libc::ENOBUFS) {
                            tracing::warn!("CAN interfaces can no longer be watched ({e})");
                            self.links = None;
                        }
                        crate::daemon::read_links(&self.tracker.can_interfaces())
                    });
                    self.tracker.links(changes);
                }
                Some(event) = self.inbox.events.recv() => match event {
                    crate::moonraker_link::LinkEvent::Klippy(state) => {
                        // Ready: what Klippy read from its MCUs comes with the answer (taken now
                        // with none, it would forget them).
                        if state != crate::moonraker_link::KlippyState::Ready {
                            self.tracker.klippy_state(state, Vec::new());
                        }
                        // What it read from its MCUs, or why it stopped: asked off this loop.
                        let (mr, tx) = (self.mr.clone(), self.answers_tx.clone());
                        tokio::spawn(async move {
                            let _ = tx.send(crate::daemon::ask_klippy(&mr).await).await;
                        });
                    }
                    crate::moonraker_link::LinkEvent::Disconnected { .. } => {
                        self.tracker.klippy_state(crate::moonraker_link::KlippyState::Unknown, Vec::new());
                    }
                    _ => {}
                },
                Some(update) = self.answers.recv() => {
                    // An answer older than the last push is stale.
                    let pushed = *self.inbox.klippy.borrow();
                    if pushed != crate::moonraker_link::KlippyState::Unknown && pushed != update.state {
                        continue;
                    }
                    self.tracker.klippy_state(update.state, update.mcus);
                    self.tracker.klippy_message(update.message);
                }
            }
            let now = Local::now();
            let after = self.tracker.status().boards;
            let records: Vec<WatchRecord> = after
                .iter()
                .filter_map(|s| {
                    let before = self.last.iter().find(|b| b.key == s.key);
                    (before != Some(s)).then(|| WatchRecord::can(s, before, now))
                })
                .collect();
            self.last = after;
            if !records.is_empty() {
                return records;
            }
        }
    }

    /// Close the Moonraker connection.
    pub async fn stop(self) {
        self.task.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::status::VersionSource;

    fn can(connected: bool, state: FirmwareState) -> BoardStatus {
        BoardStatus {
            key: "ebb36".into(),
            name: "EBB36".into(),
            mcu: "stm32g0b1xx".into(),
            connected,
            mode: connected.then_some(Mode::Klipper),
            devnode: None,
            version: connected.then(|| "v0.13.0-7-gold".into()),
            version_source: connected.then_some(VersionSource::Klippy),
            state,
            relation: None,
            excluded: false,
            ambiguous: false,
            in_printer_cfg: true,
            interface: Some("can0".into()),
            uuid: Some("0a1b2c3d4e5f".into()),
            reason: (!connected).then(|| "the CAN interface can0 is down".into()),
        }
    }

    #[test]
    fn can_records_say_present_added_removed_and_why() {
        let now = Local::now();
        let up = can(true, FirmwareState::Outdated);
        let down = can(false, FirmwareState::Missing);
        let r = WatchRecord::can(&up, None, now);
        assert_eq!((r.action.as_str(), r.mode, r.device.as_deref()), ("present", Some(Mode::Klipper), Some("ebb36")));
        let json: serde_json::Value = serde_json::from_str(&r.json_line()).unwrap();
        assert_eq!((json["interface"].as_str(), json["uuid"].as_str()), (Some("can0"), Some("0a1b2c3d4e5f")));
        assert_eq!((json["state"].as_str(), json["version"].as_str()), (Some("outdated"), Some("v0.13.0-7-gold")));
        let r = WatchRecord::can(&down, Some(&up), now);
        assert_eq!((r.action.as_str(), r.mode, r.previous_mode), ("removed", None, Some(Mode::Klipper)));
        assert!(
            r.text_line().contains("CAN can0 0a1b2c3d4e5f  missing - (the CAN interface can0 is down)"),
            "{}",
            r.text_line()
        );
        assert_eq!(WatchRecord::can(&up, Some(&down), now).action, "added");
    }
}
