//! Reading and writing kflash's TOML files: atomic replacement on write, and parse errors
//! that name the file, line and column. A file that fails to parse is never rewritten:
//! callers load before they save, and a failed load stops them.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};

/// Parse `path` as TOML into `T`. A missing file yields `None`.
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("read", path, e)),
    };
    parse_toml(path, &text).map(Some)
}

/// Parse TOML text, turning serde's error into file:line:column plus what was expected.
pub fn parse_toml<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T> {
    toml::from_str(text).map_err(|e| {
        let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
        Error::FileParse { path: path.to_path_buf(), line, column, message: e.message().trim().replace('\n', "; ") }
    })
}

/// 1-based line and column of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Serialize `value` as TOML (with a header comment) and replace `path` atomically.
pub fn save_toml<T: Serialize>(path: &Path, header: &str, value: &T) -> Result<()> {
    let body = toml::to_string_pretty(value)
        .map_err(|e| Error::FileInvalid { path: path.to_path_buf(), message: format!("cannot be written: {e}") })?;
    write_atomic(path, format!("{header}{body}").as_bytes())
}

/// Replace `path` atomically, keeping its permissions (see [`crate::atomic_file::replace`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::atomic_file::replace(path, bytes).map_err(|e| Error::io("replace", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one() {
        let t = "a = 1\nbb = x\n";
        assert_eq!(line_col(t, 0), (1, 1));
        assert_eq!(line_col(t, 11), (2, 6));
    }
}
