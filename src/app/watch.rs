//! `kflash watch`: one record per USB serial hotplug change, as a text line or a JSON object.

use std::collections::HashMap;

use chrono::{DateTime, Local, SecondsFormat};
use serde::Serialize;

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
    pub mode: Mode,
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
            mode: id.mode,
            previous_mode: None,
            mcu: id.mcu.clone(),
            serial: id.serial.clone(),
            devnode: id.devnode.clone(),
            by_id: id.by_id.clone(),
            by_path: id.by_path.clone(),
            device: b.key.clone(),
            name: b.key.as_ref().and_then(|k| names.get(k).cloned()),
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
        let mode = match self.previous_mode {
            Some(p) => format!("{} (was {p})", self.mode),
            None => self.mode.to_string(),
        };
        format!(
            "{time}  {:<12}  {who:<24}  {mode:<20}  {:<12}  {:<24}  {}",
            self.action,
            self.mcu.as_deref().unwrap_or("-"),
            self.serial.as_deref().unwrap_or("-"),
            self.devnode.as_deref().unwrap_or("-"),
        )
    }
}
