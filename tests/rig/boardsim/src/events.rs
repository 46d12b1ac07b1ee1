//! The event log: one JSON object per line in `<state-dir>/events.jsonl`, also echoed to
//! stdout (which the rig saves as boardsim.log).

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

pub struct EventLog {
    file: Option<File>,
}

pub fn now_unix() -> f64 {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    (d.as_millis() as f64) / 1000.0
}

/// Seconds on the system's CLOCK_MONOTONIC (microsecond precision): the clock udev's
/// `USEC_INITIALIZED`, `udevadm monitor` and `kflash watch --json` use, so event times
/// compare with theirs (the rig's return-latency benchmark).
pub fn now_monotonic() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes only into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ((ts.tv_sec as f64) * 1e6 + (ts.tv_nsec / 1000) as f64).round() / 1e6
}

impl EventLog {
    /// Create (truncate) the log file.
    pub fn create(path: &Path) -> anyhow::Result<EventLog> {
        let file =
            File::create(path).map_err(|e| anyhow::anyhow!("cannot create event log {}: {e}", path.display()))?;
        Ok(EventLog { file: Some(file) })
    }

    /// A log that only prints (unit tests).
    #[allow(dead_code)]
    pub fn stdout_only() -> EventLog {
        EventLog { file: None }
    }

    /// Record `{"ts":…, "mono":…, "board":…, "event":…, …fields}`.
    pub fn log(&mut self, board: Option<&str>, event: &str, fields: Value) {
        let mut m = Map::new();
        m.insert("ts".into(), Value::from(now_unix()));
        m.insert("mono".into(), Value::from(now_monotonic()));
        if let Some(b) = board {
            m.insert("board".into(), Value::from(b));
        }
        m.insert("event".into(), Value::from(event));
        if let Value::Object(f) = fields {
            for (k, v) in f {
                m.insert(k, v);
            }
        }
        let line = Value::Object(m).to_string();
        println!("event {line}");
        if let Some(f) = &mut self.file {
            let _ = writeln!(f, "{line}");
            let _ = f.flush();
        }
    }
}

/// Print a human log line with a timestamp (stdout = boardsim.log in the rig).
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        println!("[{:.3}] {}", $crate::events::now_unix(), format!($($arg)*))
    };
}
