//! Who holds a tty open: Klipper keeps its MCUs' ttys open while it runs, and a second
//! reader on the same tty would corrupt both conversations. Looked up in `/proc/*/fd` when a
//! board appears (an event), never polled.

use std::path::Path;

/// Does any other process have `tty` open? Processes whose fds cannot be read (another
/// user's, without root) are taken as not holding it: the daemon runs as the printer user,
/// the same as Klipper, or as root.
pub fn tty_in_use(tty: &Path) -> std::io::Result<bool> {
    let target = std::fs::canonicalize(tty)?;
    let me = std::process::id().to_string();
    for proc_entry in std::fs::read_dir("/proc")? {
        let Ok(proc_entry) = proc_entry else { continue };
        let name = proc_entry.file_name();
        let Some(pid) = name.to_str().filter(|n| n.bytes().all(|b| b.is_ascii_digit())) else { continue };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else { continue };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|link| link == target) {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_another_process_holds_is_in_use_and_ours_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fake-tty");
        std::fs::write(&path, b"").unwrap();
        // Our own open file does not count.
        let _ours = std::fs::File::open(&path).unwrap();
        assert!(!tty_in_use(&path).unwrap());
        // The child opens the file, says so, and holds it until its stdin closes.
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg("exec 3<\"$0\"; echo open; read _")
            .arg(&path)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut said = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut said).unwrap();
        assert_eq!(said, "open\n");
        assert!(tty_in_use(&path).unwrap());
        drop(child.stdin.take());
        child.wait().unwrap();
        assert!(!tty_in_use(&path).unwrap());
    }
}
