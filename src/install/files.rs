//! Putting a file in place with an exact mode: written to a temporary file beside it, checked
//! (visudo for the sudoers rule) and fsynced, then renamed over the path, so nothing ever
//! sees half a file, and a rule that does not validate never reaches /etc/sudoers.d.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::InstallError;

/// A file written next to its destination and not yet renamed into place. Dropping it
/// removes the temporary file.
pub struct Staged {
    tmp: tempfile::NamedTempFile,
    dest: PathBuf,
}

impl Staged {
    /// Write `bytes` with `mode` to a temporary file in `dest`'s directory (which must exist).
    /// The name starts with a dot and contains one, so neither sudo's includedir nor udev
    /// (`*.rules`) nor systemd (`*.service`) read it meanwhile.
    pub fn write(dest: &Path, bytes: &[u8], mode: u32) -> Result<Staged, InstallError> {
        let dir = dest.parent().unwrap_or(Path::new("/"));
        let mut tmp = tempfile::Builder::new()
            .prefix(".kflash-")
            .suffix(".tmp")
            .tempfile_in(dir)
            .map_err(|e| InstallError::io("create a temporary file in", dir, e))?;
        tmp.write_all(bytes).map_err(|e| InstallError::io("write", tmp.path(), e))?;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| InstallError::io("set the mode of", tmp.path(), e))?;
        tmp.as_file().sync_all().map_err(|e| InstallError::io("sync", tmp.path(), e))?;
        Ok(Staged { tmp, dest: dest.to_path_buf() })
    }

    pub fn temp_path(&self) -> &Path {
        self.tmp.path()
    }

    /// Rename it over the destination and sync the directory.
    pub fn commit(self) -> Result<(), InstallError> {
        let dest = self.dest;
        self.tmp.persist(&dest).map_err(|e| InstallError::io("rename a temporary file to", &dest, e.error))?;
        if let Some(dir) = dest.parent() {
            if let Ok(d) = std::fs::File::open(dir) {
                // Best effort: the data is synced; some filesystems refuse a directory fsync.
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

/// Write `bytes` to `dest` atomically with `mode`.
pub fn put(dest: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    Staged::write(dest, bytes, mode)?.commit()
}

/// What is at a path now.
pub struct Existing {
    pub bytes: Vec<u8>,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

pub fn existing(path: &Path) -> Result<Option<Existing>, InstallError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(InstallError::io("inspect", path, e)),
    };
    if !meta.is_file() {
        return Err(InstallError::io(
            "replace",
            path,
            std::io::Error::other("it is not a regular file (a symlink or directory): move it aside first"),
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| InstallError::io("read", path, e))?;
    Ok(Some(Existing { bytes, mode: meta.permissions().mode() & 0o7777, uid: meta.uid(), gid: meta.gid() }))
}

/// Give `path` this owner when we may (as root); a staged root run by a user keeps its own.
pub fn chown_if_root(path: &Path, uid: u32, gid: u32) -> Result<(), InstallError> {
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(|e| InstallError::io("chown", path, e))?;
    }
    Ok(())
}

pub fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Remove a file; one that is already gone counts as removed.
pub fn remove(path: &Path) -> Result<(), InstallError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(InstallError::io("remove", path, e)),
    }
}
