//! The record of what `kflash install` changed, so that `kflash uninstall` undoes exactly
//! that. Paths in it are system paths (`/etc/...`), resolved against the root at use, so a
//! staged root (`--root DIR`) works the same.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::InstallError;

pub const FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub kflash_version: String,
    /// The user the service runs as.
    pub user: String,
    /// Files written, in the order they were written.
    pub files: Vec<FileRecord>,
    /// Directories created (parents first); removed at uninstall when empty.
    pub dirs_created: Vec<PathBuf>,
    /// Units enabled (and started) by install.
    pub units_enabled: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRecord {
    pub path: PathBuf,
    /// The mode and SHA-256 of what install wrote.
    pub mode: u32,
    pub sha256: String,
    pub previous: Previous,
}

/// What was at the path before the first install.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "was", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Previous {
    /// Nothing: uninstall removes the file.
    Absent,
    /// A file, kept in `backup`: uninstall puts it back with its mode and owner.
    Replaced { backup: PathBuf, mode: u32, uid: u32, gid: u32, sha256: String },
}

impl Manifest {
    pub fn new(user: &str) -> Manifest {
        Manifest {
            format: FORMAT,
            kflash_version: env!("CARGO_PKG_VERSION").to_string(),
            user: user.to_string(),
            files: Vec::new(),
            dirs_created: Vec::new(),
            units_enabled: Vec::new(),
        }
    }

    pub fn record(&self, path: &Path) -> Option<&FileRecord> {
        self.files.iter().find(|f| f.path == path)
    }

    /// Read the manifest at `disk_path`: `None` when there is none; a manifest that cannot be
    /// read or understood is an error (never guessed around).
    pub fn load(disk_path: &Path) -> Result<Option<Manifest>, InstallError> {
        let bytes = match std::fs::read(disk_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(InstallError::io("read", disk_path, e)),
        };
        let broken = |message: String| InstallError::BrokenManifest { path: disk_path.to_path_buf(), message };
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| broken(e.to_string()))?;
        if m.format != FORMAT {
            return Err(broken(format!("format {} is not the format {FORMAT} this kflash writes", m.format)));
        }
        let bad = |p: &Path| !p.is_absolute() || p.components().any(|c| c == std::path::Component::ParentDir);
        if let Some(p) =
            m.files.iter().map(|f| f.path.as_path()).chain(m.dirs_created.iter().map(|d| d.as_path())).find(|p| bad(p))
        {
            return Err(broken(format!("path {} is not absolute and plain", p.display())));
        }
        Ok(Some(m))
    }

    /// Write it atomically: a reader (or a crash) sees the old manifest or the new one.
    pub fn save(&self, disk_path: &Path) -> Result<(), InstallError> {
        let mut text = serde_json::to_string_pretty(self).expect("a manifest always serializes");
        text.push('\n');
        crate::atomic_file::replace(disk_path, text.as_bytes()).map_err(|e| InstallError::io("write", disk_path, e))
    }
}
