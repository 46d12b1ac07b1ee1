//! `kflash-boardsim pty`: one simulated Klipper-mode board on a host pseudo-terminal, for
//! running the real Klippy against the simulator without USB (host tests, development).
//!
//! The board's tty is the pty slave; `--link` is a symlink to it (point printer.cfg's
//! `serial:` there). The firmware image is read at every boot, so replacing `--image` and
//! having Klippy send `reset` (FIRMWARE_RESTART) "flashes" a new version. A reset is a
//! reboot: the pty is closed and the link removed (the host sees the device vanish), and
//! after `--reboot-delay-ms` a new pty appears behind the same link.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::firmware::{dictionary_json, profile_for, standin_image, AppCheck};
use crate::klipperdev::{KlipperDevice, KlipperEvent};
use crate::say;

/// Where the firmware comes from.
pub enum ImageSource {
    /// A firmware file (klipper.bin, starting at the application address); read at every boot.
    File(PathBuf),
    /// The simulator's own stand-in image.
    Standin { app: String, version: String, mcu: String },
}

impl ImageSource {
    pub fn load(&self) -> Result<Vec<u8>> {
        match self {
            ImageSource::File(p) => std::fs::read(p).with_context(|| format!("reading {}", p.display())),
            ImageSource::Standin { app, version, mcu } => {
                let p = profile_for(mcu).with_context(|| format!("unknown MCU {mcu}"))?;
                Ok(standin_image(p.app_start, p.initial_sp, &dictionary_json(app, version, mcu, p.clock_freq)))
            }
        }
    }
}

/// Open a new pty pair: (master, slave path). The slave is opened once too (raw mode) and
/// returned so the master never sees a hang-up while no host has the port open.
fn open_pty() -> Result<(OwnedFd, OwnedFd, PathBuf)> {
    // SAFETY: plain libc calls; every fd is wrapped in an OwnedFd at once.
    unsafe {
        let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        if m < 0 {
            return Err(std::io::Error::last_os_error()).context("posix_openpt");
        }
        let master = OwnedFd::from_raw_fd(m);
        if libc::grantpt(m) != 0 || libc::unlockpt(m) != 0 {
            return Err(std::io::Error::last_os_error()).context("grantpt/unlockpt");
        }
        let mut buf = [0 as libc::c_char; 128];
        if libc::ptsname_r(m, buf.as_mut_ptr(), buf.len()) != 0 {
            return Err(std::io::Error::last_os_error()).context("ptsname_r");
        }
        let path = PathBuf::from(std::ffi::CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned());
        let slave = crate::tty::open_raw(&path, None).with_context(|| format!("opening {}", path.display()))?;
        Ok((master, slave, path))
    }
}

fn write_all(fd: &OwnedFd, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        // SAFETY: writing from a valid buffer to a valid fd.
        let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        data = &data[n as usize..];
    }
    Ok(())
}

fn relink(link: &Path, target: &Path) -> Result<()> {
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(target, link).with_context(|| format!("symlink {}", link.display()))
}

/// Serve one board until killed.
pub fn run(source: ImageSource, link: &Path, reboot_delay: Duration) -> Result<()> {
    loop {
        let image = source.load()?;
        let AppCheck::Klipper { dictionary, compressed } = AppCheck::inspect(&image) else {
            bail!("the image has no Klipper/Kalico data dictionary");
        };
        let (master, _slave, path) = open_pty()?;
        relink(link, &path)?;
        say!(
            "pty: {} -> {}: {} {} {} ({} bytes of dictionary)",
            link.display(),
            path.display(),
            dictionary.app.as_deref().unwrap_or("?"),
            dictionary.mcu,
            dictionary.version,
            compressed.len()
        );
        let boot = Instant::now();
        let mut dev = KlipperDevice::new(compressed);
        let mut buf = [0u8; 4096];
        'session: loop {
            let mut pfd = libc::pollfd { fd: master.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, 500) };
            if r <= 0 {
                continue;
            }
            // SAFETY: reading into a valid buffer from a valid fd.
            let n = unsafe { libc::read(master.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            let (blocks, events) = dev.feed(&buf[..n as usize], boot.elapsed());
            let bytes: Vec<u8> = blocks.iter().flat_map(|b| b.encode()).collect();
            if !bytes.is_empty() {
                write_all(&master, &bytes).context("writing to the pty")?;
            }
            for ev in events {
                match ev {
                    KlipperEvent::Identify { .. } => {}
                    KlipperEvent::Reset => {
                        say!("pty: reset command: rebooting in {} ms", reboot_delay.as_millis());
                        break 'session;
                    }
                    other => say!("pty: {other:?}"),
                }
            }
        }
        // USB disconnect: the port goes away, comes back after the reboot delay.
        drop(master);
        let _ = std::fs::remove_file(link);
        std::thread::sleep(reboot_delay);
    }
}
