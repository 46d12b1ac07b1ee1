//! Replacing a file atomically: readers see the old file or the new one, never half of
//! either, and a file the user owns keeps its permissions.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Write `bytes` to a temporary file in the same directory, fsync it, rename it over
/// `path`, then fsync the directory so the rename survives a power cut.
///
/// The new file gets the old one's mode (a user's 0600 or 0644 stays as it was); a file
/// that did not exist gets 0666 minus the umask, as any editor would create it (a
/// temporary file alone would be 0600).
pub fn replace(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mode = match std::fs::metadata(path) {
        Ok(m) => m.permissions().mode() & 0o7777,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0o666 & !umask(),
        Err(e) => return Err(e),
    };
    let mut tmp = tempfile::Builder::new().prefix(".kflash-").suffix(".tmp").tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().set_permissions(std::fs::Permissions::from_mode(mode))?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    if let Ok(d) = std::fs::File::open(dir) {
        // Best effort: some filesystems refuse a directory fsync, and the data is safe anyway.
        let _ = d.sync_all();
    }
    Ok(())
}

/// The process umask, read without changing it (umask(2) can only set it, and setting it
/// even briefly would race with other threads creating files).
fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Umask:").map(|v| v.trim().to_string())))
        .and_then(|v| u32::from_str_radix(&v, 8).ok())
        .unwrap_or(0o022)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.toml");
        replace(&p, b"one").unwrap();
        replace(&p, b"two").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "two");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("f.toml")]);
    }

    #[test]
    fn an_existing_file_keeps_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        for m in [0o600, 0o640, 0o644, 0o664] {
            let p = dir.path().join(format!("f{m:o}"));
            std::fs::write(&p, "old").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(m)).unwrap();
            replace(&p, b"new").unwrap();
            assert_eq!(mode(&p), m, "{p:?}");
        }
    }

    #[test]
    fn a_new_file_gets_the_umask_mode_not_the_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("new");
        replace(&p, b"x").unwrap();
        assert_eq!(mode(&p), 0o666 & !umask());
    }
}
