//! Reading and writing kflash's TOML files: atomic replacement on write, and parse errors
//! that name the file, line and column. A file that fails to parse is never rewritten:
//! callers load before they save, and a failed load stops them.

use std::io::Write;
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

/// Write `bytes` to a temporary file in the same directory, fsync it, rename it over
/// `path`, then fsync the directory so the rename survives a power cut. Readers see the
/// old file or the new one, never half of either.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io("create directory", dir, e))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".kflash-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| Error::io("create a temporary file in", dir, e))?;
    tmp.write_all(bytes).map_err(|e| Error::io("write", tmp.path().to_path_buf(), e))?;
    tmp.as_file().sync_all().map_err(|e| Error::io("sync", tmp.path().to_path_buf(), e))?;
    tmp.persist(path).map_err(|e| Error::io("replace", path, e.error))?;
    if let Ok(d) = std::fs::File::open(dir) {
        // Directory fsync is best effort: some filesystems refuse it and the data is safe anyway.
        let _ = d.sync_all();
    }
    Ok(())
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

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.toml");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "two");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("f.toml")]);
    }
}
