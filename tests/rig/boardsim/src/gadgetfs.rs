//! ROM DFU mode through the kernel's gadgetfs (drivers/usb/gadget/legacy/inode.c).
//!
//! Why not a configfs function: the DFU interface needs its DFU functional descriptor (type
//! 0x21) in the configuration descriptor, and FunctionFS in the rig's Debian 6.1 kernel
//! accepts a class descriptor 0x21 only after a HID or CCID interface (`ffs_do_single_desc`;
//! DFU support came with a later "f_fs: Add support for DFU functional descriptor" patch).
//! gadgetfs takes the device and configuration descriptors byte for byte from user space and
//! hands user space every control request it does not answer itself (strings, SET_INTERFACE,
//! class requests), so the STM32 ROM's descriptors and DfuSe requests are exactly reproduced.
//!
//! Limits of gadgetfs: one device per system (one board in DFU mode at a time; the others
//! fall back to SourceSink); it sets bcdUSB to 2.00 (the F4 ROM says 1.00); its ep0 buffer
//! is 256 bytes: an IN request's wLength is cut to 256 and the transfer ends without a short
//! packet (a 2048-byte UPLOAD times out on the host: `dfu-util -t 256`), and an OUT data
//! stage over 256 bytes is stalled by the kernel.
//!
//! gadgetfs binds to the first UDC without a driver. To put the board on its own
//! `dummy_udc.N`, the driver is registered with the gadget bus's `drivers_autoprobe` off and
//! then bound explicitly through `/sys/bus/gadget/drivers/gadgetfs/bind`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};

use crate::dfu::{DfuSeDevice, Reply, Setup};

const AUTOPROBE: &str = "/sys/bus/gadget/drivers_autoprobe";
const BIND: &str = "/sys/bus/gadget/drivers/gadgetfs/bind";
/// struct usb_gadgetfs_event: 8 bytes (usb_ctrlrequest or speed) + u32 type.
const EVENT_SIZE: usize = 12;
const GADGETFS_CONNECT: u32 = 1;
const GADGETFS_DISCONNECT: u32 = 2;
const GADGETFS_SETUP: u32 = 3;

/// The ep0 file of the mounted gadgetfs (set once by [`init`]).
static EP0: OnceLock<PathBuf> = OnceLock::new();
/// gadgetfs has one device: whether a board holds it.
static IN_USE: AtomicBool = AtomicBool::new(false);

/// Called with a line for the event log (what a request did, or an error).
pub type Notify = Box<dyn Fn(String) + Send>;

/// Load and mount gadgetfs under `dir`. Must run while a UDC is free (gadgetfs names its
/// ep0 file after one at mount time), i.e. before the boards are plugged.
pub fn init(dir: &Path) -> Result<PathBuf> {
    if !Path::new("/sys/module/gadgetfs").exists() {
        let out = std::process::Command::new("modprobe").arg("gadgetfs").output().context("cannot run modprobe")?;
        if !out.status.success() {
            bail!("modprobe gadgetfs failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let target = c(&dir.to_string_lossy());
    // SAFETY: plain mount(2) with NUL-terminated strings that outlive the call.
    let r =
        unsafe { libc::mount(c("gadgetfs").as_ptr(), target.as_ptr(), c("gadgetfs").as_ptr(), 0, std::ptr::null()) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            bail!("cannot mount gadgetfs on {}: {e}", dir.display());
        }
    }
    let ep0 = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| !n.to_string_lossy().starts_with("ep")))
        .with_context(|| format!("gadgetfs on {} has no ep0 file", dir.display()))?;
    let _ = EP0.set(ep0.clone());
    Ok(ep0)
}

/// Unmount (at shutdown).
pub fn unmount(dir: &Path) {
    if let Ok(c) = std::ffi::CString::new(dir.to_string_lossy().as_bytes()) {
        // SAFETY: umount2(2) with a NUL-terminated path.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Whether a board can enter ROM DFU through gadgetfs now.
pub fn available() -> bool {
    EP0.get().is_some() && !IN_USE.load(Ordering::SeqCst)
}

/// A ROM DFU device on one UDC, served by a thread until [`DfuPort::stop`].
pub struct DfuPort {
    stop: Option<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

/// Releases the one gadgetfs device when a start fails half-way.
struct Claim;
impl Drop for Claim {
    fn drop(&mut self) {
        IN_USE.store(false, Ordering::SeqCst);
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 fills two fds we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("pipe: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fresh fds from pipe2.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The gadget-bus device of `udc` (`/sys/devices/platform/dummy_udc.N/gadget.K`).
fn gadget_device(udc: &str) -> Result<String> {
    let dir = PathBuf::from("/sys/devices/platform").join(udc);
    std::fs::read_dir(&dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("gadget"))
        .with_context(|| format!("{} has no gadget device", dir.display()))
}

/// Register the gadgetfs driver with `device`'s descriptors without binding it anywhere.
fn register_unbound(ep0: &mut File, config: &[u8]) -> Result<()> {
    std::fs::write(AUTOPROBE, "0").with_context(|| format!("cannot write {AUTOPROBE}"))?;
    let r = ep0.write_all(config);
    let restore = std::fs::write(AUTOPROBE, "1");
    r.context("gadgetfs refused the descriptors")?;
    restore.with_context(|| format!("cannot re-enable {AUTOPROBE}"))
}

impl DfuPort {
    /// Present `device` on `udc` (e.g. "dummy_udc.0", not bound by configfs).
    pub fn start(udc: &str, device: DfuSeDevice, notify: Notify) -> Result<DfuPort> {
        let Some(ep0_path) = EP0.get() else { bail!("gadgetfs is not mounted") };
        if IN_USE.swap(true, Ordering::SeqCst) {
            bail!("gadgetfs already serves another board in DFU mode (one device per system)");
        }
        let claim = Claim;
        let gadget = gadget_device(udc)?;
        let mut ep0 = OpenOptions::new()
            .read(true)
            .write(true)
            .open(ep0_path)
            .with_context(|| format!("cannot open {}", ep0_path.display()))?;
        // Tag 0, the full-speed configuration, no high-speed one, the device descriptor.
        let mut buf = 0u32.to_ne_bytes().to_vec();
        buf.extend(device.desc.config_descriptor());
        buf.extend(device.desc.device_descriptor());
        register_unbound(&mut ep0, &buf)?;
        // Bound first: before that, ep0 has no events and reading it fails (EINVAL); the
        // host's first requests wait in the kernel until the thread reads them.
        std::fs::write(BIND, &gadget)
            .with_context(|| format!("cannot bind gadgetfs to {gadget} ({udc}) through {BIND}"))?;
        let (stop_rd, stop_wr) = pipe()?;
        let thread = std::thread::Builder::new()
            .name(format!("dfu-{udc}"))
            .spawn(move || {
                let _claim = claim;
                serve_ep0(ep0, stop_rd, device, notify);
            })
            .context("cannot start the DFU thread")?;
        let port = DfuPort { stop: Some(stop_wr), thread: Some(thread) };
        Ok(port)
    }

    /// Disconnect: the thread closes ep0, which unregisters the driver (USB disconnect).
    pub fn stop(&mut self) {
        if let Some(fd) = self.stop.take() {
            let _ = File::from(fd).write_all(b"x");
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for DfuPort {
    fn drop(&mut self) {
        self.stop();
    }
}

fn sys_read(fd: RawFd, buf: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: read(2) into a buffer we own, length within it.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn sys_write(fd: RawFd, buf: &[u8]) -> std::io::Result<usize> {
    // SAFETY: write(2) from a buffer we own, length within it.
    let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn serve_ep0(ep0: File, stop: OwnedFd, mut device: DfuSeDevice, notify: Notify) {
    let fd = ep0.as_raw_fd();
    let mut events = [0u8; EVENT_SIZE * 8];
    loop {
        let mut fds = [
            libc::pollfd { fd, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: poll(2) on two pollfds we own.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            notify(format!("poll on ep0 failed: {e}"));
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        if fds[0].revents & libc::POLLIN == 0 {
            // POLLHUP: a request was superseded by a new SETUP; its event follows.
            continue;
        }
        let n = match sys_read(fd, &mut events) {
            Ok(n) => n,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) => continue,
            Err(e) => {
                notify(format!("reading ep0 events failed: {e}"));
                return;
            }
        };
        for ev in events[..n].chunks_exact(EVENT_SIZE) {
            match u32::from_ne_bytes([ev[8], ev[9], ev[10], ev[11]]) {
                GADGETFS_SETUP => {
                    let setup = Setup::parse(ev[..8].try_into().expect("8 bytes"));
                    if let Err(e) = answer(fd, setup, &mut device) {
                        notify(format!("control request {setup:?}: {e}"));
                    }
                    if let Some(note) = device.note.take() {
                        notify(note);
                    }
                }
                GADGETFS_CONNECT => device.reset(),
                GADGETFS_DISCONNECT => {}
                _ => {}
            }
        }
    }
}

/// Finish one control request on ep0 the gadgetfs way: IN data or stall by write/read,
/// OUT status by a zero-length read, OUT stall by a write.
fn answer(fd: RawFd, s: Setup, device: &mut DfuSeDevice) -> std::io::Result<()> {
    if s.is_in() {
        match device.control(s, &[]) {
            Reply::Data(mut d) => {
                d.truncate(s.length as usize);
                sys_write(fd, &d).map(|_| ())
            }
            Reply::Ack | Reply::Stall => stall_in(fd),
        }
    } else if s.length > 0 {
        // The data stage is read (and acknowledged) before the request can be judged.
        let mut data = vec![0u8; s.length as usize];
        let n = sys_read(fd, &mut data)?;
        device.control(s, &data[..n]);
        Ok(())
    } else {
        match device.control(s, &[]) {
            Reply::Stall => match sys_write(fd, &[0]) {
                Err(e) if e.raw_os_error() == Some(libc::EL2HLT) => Ok(()),
                r => r.map(|_| ()),
            },
            _ => sys_read(fd, &mut []).map(|_| ()),
        }
    }
}

fn stall_in(fd: RawFd) -> std::io::Result<()> {
    match sys_read(fd, &mut [0u8; 1]) {
        Err(e) if e.raw_os_error() == Some(libc::EL2HLT) => Ok(()),
        r => r.map(|_| ()),
    }
}
