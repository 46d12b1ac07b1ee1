//! Waits for Moonraker's Unix socket to (re)appear, on inotify events rather than by
//! polling: Moonraker binds `<printer_data>/comms/moonraker.sock` when it starts (after
//! unlinking a stale one), so a creation of that name in its directory is the moment to
//! try connecting. While the directory itself does not exist yet, the nearest existing
//! ancestor is watched instead, and the watch moves down as directories appear.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::io::unix::AsyncFd;

struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

pub struct SocketWatch {
    fd: AsyncFd<InotifyFd>,
    socket: PathBuf,
    /// The directory watched now and its watch.
    watched: Option<(PathBuf, WatchDescriptor)>,
}

const DIR_EVENTS: AddWatchFlags = AddWatchFlags::IN_CREATE
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_ATTRIB)
    .union(AddWatchFlags::IN_DELETE_SELF)
    .union(AddWatchFlags::IN_MOVE_SELF)
    .union(AddWatchFlags::IN_ONLYDIR);

impl SocketWatch {
    /// Starts watching at once, so a socket created after this call is never missed.
    pub fn new(socket: &Path) -> io::Result<SocketWatch> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).map_err(io::Error::from)?;
        // SAFETY: the fd is owned by `InotifyFd`, which the AsyncFd owns, so it stays open
        // for as long as it is registered.
        let fd = unsafe { AsyncFd::register(InotifyFd(inotify)) }.map_err(|e| io::Error::other(e.to_string()))?;
        let mut watch = SocketWatch { fd, socket: socket.to_path_buf(), watched: None };
        watch.arm()?;
        Ok(watch)
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Watch the socket's directory, or its nearest existing ancestor. Watching the same
    /// directory again keeps its watch: removing it would queue an IN_IGNORED, which would
    /// rearm again, and so on for ever.
    fn arm(&mut self) -> io::Result<()> {
        let mut dir = self.socket.parent().unwrap_or(Path::new("/")).to_path_buf();
        loop {
            if let Some((watched, _)) = &self.watched {
                if *watched == dir && dir.is_dir() {
                    return Ok(());
                }
            }
            match self.fd.get_ref().0.add_watch(&dir, DIR_EVENTS) {
                Ok(wd) => {
                    tracing::debug!(dir = %dir.display(), "watching for {}", self.socket.display());
                    if let Some((_, old)) = self.watched.replace((dir, wd)) {
                        if old != wd {
                            // Gone already when the directory was removed; nothing to undo then.
                            let _ = self.fd.get_ref().0.rm_watch(old);
                        }
                    }
                    return Ok(());
                }
                Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ENOTDIR) => match dir.parent() {
                    Some(up) => dir = up.to_path_buf(),
                    None => return Err(io::Error::new(io::ErrorKind::NotFound, "no directory to watch")),
                },
                Err(e) => {
                    return Err(io::Error::new(io::Error::from(e).kind(), format!("inotify on {}: {e}", dir.display())))
                }
            }
        }
    }

    /// Resolves when the socket may have appeared: it was created (or moved in, or its
    /// attributes changed) in its directory, or the directory chain changed so that the
    /// socket now exists. Cancel-safe: events are read only when the fd is readable.
    pub async fn changed(&mut self) -> io::Result<()> {
        let parent = self.socket.parent().map(Path::to_path_buf);
        let name: Option<OsString> = self.socket.file_name().map(|n| n.to_os_string());
        loop {
            let mut guard = self.fd.readable().await?;
            let events = match guard.try_io(|fd| fd.get_ref().0.read_events().map_err(io::Error::from)) {
                Ok(result) => result?,
                Err(_would_block) => continue,
            };
            let watching_parent = self.watched.as_ref().map(|(d, _)| Some(d) == parent.as_ref()).unwrap_or(false);
            let mut rearm = false;
            let mut hit = false;
            let current = self.watched.as_ref().map(|(_, wd)| *wd);
            for ev in &events {
                if ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                    // Events were lost: the socket may have appeared among them.
                    hit = true;
                } else if Some(ev.wd) != current {
                    // A watch given up when rearming (its IN_IGNORED among them).
                    continue;
                } else if ev
                    .mask
                    .intersects(AddWatchFlags::IN_IGNORED | AddWatchFlags::IN_DELETE_SELF | AddWatchFlags::IN_MOVE_SELF)
                {
                    // The watched directory went (or moved): its watch is dead, so start afresh.
                    self.watched = None;
                    rearm = true;
                } else if watching_parent {
                    hit |= ev.name.as_ref() == name.as_ref();
                } else {
                    // Something appeared in an ancestor: perhaps the next directory down.
                    rearm = true;
                }
            }
            if rearm {
                self.arm()?;
                if self.socket.exists() {
                    return Ok(());
                }
            }
            if hit {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_socket_created_in_a_directory_that_did_not_exist_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("printer_data/comms/moonraker.sock");
        let mut watch = SocketWatch::new(&socket).unwrap();
        let make = socket.clone();
        let creator = tokio::spawn(async move {
            tokio::task::yield_now().await;
            std::fs::create_dir_all(make.parent().unwrap()).unwrap();
            std::fs::write(dir.path().join("printer_data/comms/other"), b"").unwrap();
            let _listener = std::os::unix::net::UnixListener::bind(&make).unwrap();
            dir
        });
        tokio::time::timeout(Duration::from_secs(10), async {
            while !socket.exists() {
                watch.changed().await.unwrap();
            }
        })
        .await
        .expect("the socket's creation is reported");
        let _dir = creator.await.unwrap();
    }

    #[tokio::test]
    async fn other_files_do_not_wake_it() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("moonraker.sock");
        let mut watch = SocketWatch::new(&socket).unwrap();
        std::fs::write(dir.path().join("moonraker.log"), b"x").unwrap();
        let woke = tokio::time::timeout(Duration::from_millis(200), watch.changed()).await;
        assert!(woke.is_err(), "an unrelated file woke the watch");
        let _l = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        tokio::time::timeout(Duration::from_secs(10), watch.changed()).await.expect("woken").unwrap();
    }

    /// Activity beside the missing directory makes it look again, once: it must not turn
    /// into a loop of rearming (each removed watch queues an IN_IGNORED). The daemon's host
    /// test hung on exactly that, its single-threaded runtime starved; here the watch runs
    /// on a thread of its own, so a spin fails the test instead of hanging it.
    #[test]
    fn activity_in_an_ancestor_does_not_spin() {
        let (done_tx, done) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let wakes = rt.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let socket = dir.path().join("comms/moonraker.sock");
                let mut watch = SocketWatch::new(&socket).unwrap();
                std::fs::create_dir(dir.path().join("run")).unwrap();
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(dir.path().join("run"), std::fs::Permissions::from_mode(0o755)).unwrap();
                let mut wakes = 0;
                let _ = tokio::time::timeout(Duration::from_millis(300), async {
                    loop {
                        watch.changed().await.unwrap();
                        wakes += 1;
                    }
                })
                .await;
                wakes
            });
            let _ = done_tx.send(wakes);
        });
        let wakes = done.recv_timeout(Duration::from_secs(10)).expect("the watch spun instead of waiting");
        assert_eq!(wakes, 0, "nothing the socket needs happened");
    }
}
