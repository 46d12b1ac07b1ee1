//! The flash history: one JSON object per line in `<state_dir>/history.jsonl`.
//!
//! Appends are a single `write` of a whole line followed by fsync, so a crash leaves at
//! most one torn last line. Reading skips (and reports) lines it cannot parse and never
//! rewrites the file: the history is the user's record, not ours to "repair".

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const HISTORY_FILE: &str = "history.jsonl";

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("could not {action} the flash history {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl HistoryError {
    pub fn help(&self) -> Option<String> {
        match self {
            HistoryError::Io { path, .. } => Some(format!(
                "check that {} exists and that you may read and write it",
                path.parent().unwrap_or(Path::new(".")).display()
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlashResult {
    Ok,
    Failed,
    Skipped,
}

/// Seconds each step took; `None` for a step that did not run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Durations {
    #[serde(default)]
    pub build: Option<f64>,
    #[serde(default)]
    pub bootloader: Option<f64>,
    #[serde(default)]
    pub flash: Option<f64>,
    #[serde(default)]
    pub verify: Option<f64>,
    #[serde(default)]
    pub klipper_downtime: Option<f64>,
}

/// One flash attempt of one board.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlashRecord {
    /// RFC 3339, local time with offset.
    pub time: String,
    pub board_key: String,
    pub board_name: String,
    pub mcu: String,
    #[serde(default)]
    pub version_before: Option<String>,
    #[serde(default)]
    pub version_after: Option<String>,
    /// `None` when no firmware was built (failed build, skipped board).
    #[serde(default)]
    pub firmware_sha256: Option<String>,
    #[serde(default)]
    pub firmware_size: Option<u64>,
    /// `katapult` or `make-flash`.
    pub method: String,
    pub result: FlashResult,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub durations: Durations,
    /// How the print-safety check came out; `skipped` when `--skip-print-check` passed a
    /// check that could not be answered. `None` in records from before the gate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub print_check: Option<crate::safety::PrintCheck>,
}

impl FlashRecord {
    /// A record stamped now, with every optional field empty.
    pub fn new(board_key: &str, board_name: &str, mcu: &str, method: &str, result: FlashResult) -> FlashRecord {
        FlashRecord {
            time: chrono::Local::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, false),
            board_key: board_key.into(),
            board_name: board_name.into(),
            mcu: mcu.into(),
            version_before: None,
            version_after: None,
            firmware_sha256: None,
            firmware_size: None,
            method: method.into(),
            result,
            error: None,
            durations: Durations::default(),
            print_check: None,
        }
    }
}

/// A line of the history that is not a flash record.
#[derive(Debug, Clone, PartialEq)]
pub struct CorruptLine {
    /// 1-based.
    pub line: usize,
    pub message: String,
}

/// What [`read_all`] found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    pub records: Vec<FlashRecord>,
    pub corrupt: Vec<CorruptLine>,
}

pub fn history_path(state_dir: &Path) -> PathBuf {
    state_dir.join(HISTORY_FILE)
}

/// Append one record as one line, then fsync.
pub fn append(state_dir: &Path, record: &FlashRecord) -> Result<(), HistoryError> {
    let path = history_path(state_dir);
    let io = |action, source| HistoryError::Io { action, path: path.clone(), source };
    std::fs::create_dir_all(state_dir).map_err(|e| io("create the directory of", e))?;
    let mut file = OpenOptions::new().read(true).append(true).create(true).open(&path).map_err(|e| io("open", e))?;
    let mut line = serde_json::to_string(record).expect("a FlashRecord always serializes");
    line.push('\n');
    // After a torn write the file does not end in a newline; start a fresh line so this
    // record is not glued onto the broken one.
    if !ends_with_newline(&mut file).map_err(|e| io("read", e))? {
        line.insert(0, '\n');
    }
    file.write_all(line.as_bytes()).map_err(|e| io("append to", e))?;
    file.sync_all().map_err(|e| io("sync", e))
}

fn ends_with_newline(file: &mut File) -> std::io::Result<bool> {
    if file.metadata()?.len() == 0 {
        return Ok(true);
    }
    file.seek(SeekFrom::End(-1))?;
    let mut last = [0u8; 1];
    file.read_exact(&mut last)?;
    Ok(last[0] == b'\n')
}

/// The records, oldest first, of one board (`Some(key)`) or all boards. Corrupt lines
/// are skipped with a warning in the log; [`read_all`] returns them too.
pub fn read(state_dir: &Path, key: Option<&str>) -> Result<Vec<FlashRecord>, HistoryError> {
    let history = read_all(state_dir)?;
    let path = history_path(state_dir);
    for c in &history.corrupt {
        tracing::warn!("{}:{}: skipped a line that is not a flash record: {}", path.display(), c.line, c.message);
    }
    Ok(history.records.into_iter().filter(|r| key.is_none_or(|k| r.board_key == k)).collect())
}

/// Every record plus every line that did not parse. A missing file is an empty history.
pub fn read_all(state_dir: &Path) -> Result<History, HistoryError> {
    let path = history_path(state_dir);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(History::default()),
        Err(source) => return Err(HistoryError::Io { action: "read", path, source }),
    };
    Ok(parse(&String::from_utf8_lossy(&bytes)))
}

fn parse(text: &str) -> History {
    let mut history = History::default();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<FlashRecord>(line) {
            Ok(r) => history.records.push(r),
            Err(e) => history.corrupt.push(CorruptLine { line: i + 1, message: e.to_string() }),
        }
    }
    history
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &str, result: FlashResult) -> FlashRecord {
        let mut r = FlashRecord::new(key, "Octopus Pro", "stm32h723xx", "katapult", result);
        r.version_before = Some("v0.12.0-1-gaaaa".into());
        r.version_after = Some("v0.13.0-730-g84104bbbd".into());
        r.firmware_sha256 = Some("ab".repeat(32));
        r.firmware_size = Some(31_337);
        r.durations =
            Durations { build: Some(41.5), flash: Some(3.25), klipper_downtime: Some(12.0), ..Default::default() };
        r
    }

    #[test]
    fn records_how_the_print_check_came_out() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = record("octopus", FlashResult::Ok);
        r.print_check = Some(crate::safety::PrintCheck::Skipped);
        append(dir.path(), &r).unwrap();
        let text = std::fs::read_to_string(dir.path().join(HISTORY_FILE)).unwrap();
        assert!(text.contains(r#""print_check":"skipped""#), "{text}");
        assert_eq!(read_all(dir.path()).unwrap().records, [r]);
        // Records from before the gate have no print_check.
        let old = r#"{"time":"2026-01-01T00:00:00+00:00","board_key":"a","board_name":"A","mcu":"m","method":"katapult","result":"ok"}"#;
        let parsed: FlashRecord = serde_json::from_str(old).unwrap();
        assert_eq!(parsed.print_check, None);
    }

    #[test]
    fn appends_and_reads_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let a = record("octopus", FlashResult::Ok);
        let mut b = record("nitehawk", FlashResult::Failed);
        b.error = Some("board did not enter Katapult".into());
        let c = record("octopus", FlashResult::Skipped);
        for r in [&a, &b, &c] {
            append(dir.path(), r).unwrap();
        }
        assert_eq!(read(dir.path(), None).unwrap(), vec![a.clone(), b.clone(), c.clone()]);
        assert_eq!(read(dir.path(), Some("octopus")).unwrap(), vec![a, c]);
        assert_eq!(read(dir.path(), Some("nope")).unwrap(), vec![]);
        let text = std::fs::read_to_string(history_path(dir.path())).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert!(text.lines().nth(1).unwrap().contains(r#""result":"failed""#), "{text}");
    }

    #[test]
    fn missing_file_is_empty_history() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_all(&dir.path().join("not-yet")).unwrap(), History::default());
    }

    #[test]
    fn corrupt_lines_are_skipped_reported_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let a = record("octopus", FlashResult::Ok);
        append(dir.path(), &a).unwrap();
        let path = history_path(dir.path());
        // A torn line (no newline at the end), as a crash mid-write would leave.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"time\":\"2024-").unwrap();
        drop(f);
        let b = record("nitehawk", FlashResult::Ok);
        append(dir.path(), &b).unwrap();
        std::fs::write(&path, std::fs::read_to_string(&path).unwrap() + "not json at all\n\n").unwrap();
        let before = std::fs::read(&path).unwrap();

        let h = read_all(dir.path()).unwrap();
        assert_eq!(h.records, vec![a.clone(), b.clone()], "the record after the torn line survives");
        assert_eq!(h.corrupt.iter().map(|c| c.line).collect::<Vec<_>>(), vec![2, 4]);
        assert_eq!(read(dir.path(), None).unwrap(), vec![a, b]);
        assert_eq!(std::fs::read(&path).unwrap(), before, "reading never rewrites the file");
    }

    #[test]
    fn old_records_without_optional_fields_parse() {
        let h = parse(
            r#"{"time":"2024-05-01T12:00:00+02:00","board_key":"ebb","board_name":"EBB36","mcu":"stm32g0b1xx","method":"katapult","result":"skipped"}"#,
        );
        assert!(h.corrupt.is_empty(), "{:?}", h.corrupt);
        assert_eq!(h.records[0].result, FlashResult::Skipped);
        assert_eq!(h.records[0].durations, Durations::default());
    }

    #[test]
    fn unwritable_dir_is_an_error_with_help() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, "").unwrap();
        let e = append(&file, &record("x", FlashResult::Ok)).unwrap_err();
        assert!(e.to_string().starts_with("could not create the directory of the flash history"), "{e}");
        assert!(e.help().is_some());
    }
}
