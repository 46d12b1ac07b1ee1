//! A simulated USB-to-CAN bridge as a real gs_usb device: a configfs gadget (1d50:606f) whose
//! one function is FunctionFS, served from user space with [`GsUsbDevice`]. The guest's own
//! `gs_usb` driver binds to it and creates a CAN interface (can0); the frames the host sends
//! there are relayed to a CAN socket (the vcan "wire" the simulated toolheads sit on) and the
//! toolheads' answers come back to the host the same way, so everything above the driver is
//! the real kernel stack.
//!
//! Threads, each blocked in the kernel on one file: ep0 (control requests and the function's
//! enable/disable), the bulk OUT endpoint (frames from the host), and the CAN socket (frames
//! from the wire). Nothing polls.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use socketcan::{CanSocket, EmbeddedFrame, Frame, Id, Socket, StandardId};

use crate::bridgesim::OwnNode;
use crate::dfu::{Reply, Setup};
use crate::gadget::CONFIGFS_GADGETS;
use crate::gsusb::{interface_descriptors, GsEvent, GsUsbDevice, HostFrame, HOST_FRAME_LEN};

const DESCRIPTORS_MAGIC_V2: u32 = 3;
const STRINGS_MAGIC: u32 = 2;
const HAS_FS_DESC: u32 = 1;
const HAS_HS_DESC: u32 = 2;
/// struct usb_functionfs_event: usb_ctrlrequest (8 bytes), type, 3 bytes of padding.
const EVENT_SIZE: usize = 12;
const EVENT_ENABLE: u8 = 2;
const EVENT_DISABLE: u8 = 3;
const EVENT_SETUP: u8 = 4;

/// What the bridge presents on USB.
#[derive(Debug, Clone)]
pub struct BridgeUsb {
    pub udc: String,
    pub manufacturer: String,
    pub product: String,
    pub serial: String,
}

/// Called with each event for the log (JSON values).
pub type Log = Arc<dyn Fn(serde_json::Value) + Send + Sync>;

/// The gadget while it exists; dropped: unplugged and removed.
pub struct Bridge {
    dir: PathBuf,
    mount: PathBuf,
    udc: String,
}

/// The FunctionFS descriptor blob: full- and high-speed, one interface, two bulk endpoints.
fn descriptors() -> Vec<u8> {
    let (fs, hs) = (interface_descriptors(64), interface_descriptors(512));
    let mut b = Vec::new();
    b.extend(DESCRIPTORS_MAGIC_V2.to_le_bytes());
    b.extend(((12 + 8 + fs.len() + hs.len()) as u32).to_le_bytes());
    b.extend((HAS_FS_DESC | HAS_HS_DESC).to_le_bytes());
    b.extend(3u32.to_le_bytes());
    b.extend(3u32.to_le_bytes());
    b.extend(fs);
    b.extend(hs);
    b
}

/// The FunctionFS strings blob: English, the interface's name.
fn strings() -> Vec<u8> {
    let text = b"gs_usb\0";
    let mut b = Vec::new();
    b.extend(STRINGS_MAGIC.to_le_bytes());
    b.extend(((16 + 2 + text.len()) as u32).to_le_bytes());
    b.extend(1u32.to_le_bytes());
    b.extend(1u32.to_le_bytes());
    b.extend(0x0409u16.to_le_bytes());
    b.extend(text);
    b
}

fn write_attr(path: &Path, value: &str) -> Result<()> {
    fs::write(path, value).with_context(|| format!("cannot write '{value}' to {}", path.display()))
}

fn mount_functionfs(name: &str, dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let (source, target, kind) = (c(name), c(&dir.to_string_lossy()), c("functionfs"));
    // SAFETY: mount(2) with NUL-terminated strings that outlive the call.
    if unsafe { libc::mount(source.as_ptr(), target.as_ptr(), kind.as_ptr(), 0, std::ptr::null()) } != 0 {
        bail!("cannot mount functionfs '{name}' on {}: {}", dir.display(), std::io::Error::last_os_error());
    }
    Ok(())
}

impl Bridge {
    /// Create the gadget, serve it, bind it to its UDC: the host enumerates it now.
    pub fn plug(usb: &BridgeUsb, wire: &str, log: Log, own: Arc<Mutex<OwnNode>>) -> Result<Bridge> {
        let dir = Path::new(CONFIGFS_GADGETS).join("kflash-bridge");
        if dir.exists() {
            bail!("{} exists: another bridge runs (or a stale one: remove it)", dir.display());
        }
        let mount = PathBuf::from("/run/kflash-boardsim/ffs-bridge");
        let mut bridge = Bridge { dir: dir.clone(), mount: PathBuf::new(), udc: usb.udc.clone() };
        fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        write_attr(&dir.join("idVendor"), "0x1d50")?;
        write_attr(&dir.join("idProduct"), "0x606f")?;
        write_attr(&dir.join("bcdUSB"), "0x0200")?;
        write_attr(&dir.join("bcdDevice"), "0x0100")?;
        fs::create_dir_all(dir.join("strings/0x409"))?;
        write_attr(&dir.join("strings/0x409/manufacturer"), &usb.manufacturer)?;
        write_attr(&dir.join("strings/0x409/product"), &usb.product)?;
        write_attr(&dir.join("strings/0x409/serialnumber"), &usb.serial)?;
        fs::create_dir_all(dir.join("configs/c.1/strings/0x409"))?;
        write_attr(&dir.join("configs/c.1/MaxPower"), "100")?;
        let function = dir.join("functions/ffs.bridge");
        fs::create_dir(&function).context("cannot create the FunctionFS function (is usb_f_fs available?)")?;
        std::os::unix::fs::symlink(&function, dir.join("configs/c.1/ffs.bridge"))?;
        mount_functionfs("bridge", &mount)?;
        bridge.mount = mount.clone();

        let mut ep0 = OpenOptions::new().read(true).write(true).open(mount.join("ep0"))?;
        ep0.write_all(&descriptors()).context("FunctionFS refused the descriptors")?;
        ep0.write_all(&strings()).context("FunctionFS refused the strings")?;
        let ep_in = Arc::new(Mutex::new(OpenOptions::new().write(true).open(mount.join("ep1"))?));
        let ep_out = OpenOptions::new().read(true).open(mount.join("ep2"))?;
        let socket = CanSocket::open(wire).with_context(|| format!("cannot open CAN interface {wire}"))?;
        let device = Arc::new(Mutex::new(GsUsbDevice::new()));

        spawn("bridge-ep0", {
            let (device, log) = (device.clone(), log.clone());
            move || serve_ep0(ep0, device, log)
        })?;
        spawn("bridge-out", {
            let (device, ep_in, log) = (device.clone(), ep_in.clone(), log.clone());
            let socket = CanSocket::open(wire)?;
            move || host_to_wire(ep_out, ep_in, socket, device, own, log)
        })?;
        spawn("bridge-in", move || wire_to_host(socket, ep_in, device, log))?;
        write_attr(&dir.join("UDC"), &usb.udc)?;
        Ok(bridge)
    }
}

impl Bridge {
    /// The firmware reboots: the device leaves the bus (FunctionFS keeps its endpoints, whose
    /// reads wait for the next enable).
    pub fn unplug(&self) -> Result<()> {
        write_attr(&self.dir.join("UDC"), "\n")
    }

    /// The firmware is back: the host enumerates the gs_usb device again.
    pub fn replug(&self) -> Result<()> {
        write_attr(&self.dir.join("UDC"), &self.udc)
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = fs::write(self.dir.join("UDC"), "\n");
        let _ = fs::remove_file(self.dir.join("configs/c.1/ffs.bridge"));
        if !self.mount.as_os_str().is_empty() {
            if let Ok(c) = std::ffi::CString::new(self.mount.to_string_lossy().as_bytes()) {
                // SAFETY: umount2(2) with a NUL-terminated path.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        let _ = fs::remove_dir(self.dir.join("functions/ffs.bridge"));
        let _ = fs::remove_dir(self.dir.join("configs/c.1/strings/0x409"));
        let _ = fs::remove_dir(self.dir.join("configs/c.1"));
        let _ = fs::remove_dir(self.dir.join("strings/0x409"));
        let _ = fs::remove_dir(&self.dir);
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<()> {
    std::thread::Builder::new().name(name.into()).spawn(f).with_context(|| format!("cannot start {name}"))?;
    Ok(())
}

fn serve_ep0(mut ep0: File, device: Arc<Mutex<GsUsbDevice>>, log: Log) {
    let mut events = [0u8; EVENT_SIZE * 4];
    loop {
        let n = match ep0.read(&mut events) {
            Ok(n) => n,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) => continue,
            Err(e) => {
                log(serde_json::json!({"event": "bridge-error", "what": format!("ep0: {e}")}));
                return;
            }
        };
        for ev in events[..n].chunks_exact(EVENT_SIZE) {
            match ev[8] {
                EVENT_SETUP => {
                    let s = Setup::parse(ev[..8].try_into().expect("8 bytes"));
                    if let Err(e) = answer(&mut ep0, s, &device, &log) {
                        log(serde_json::json!({"event": "bridge-error", "what": format!("{s:?}: {e}")}));
                    }
                }
                EVENT_ENABLE => log(serde_json::json!({"event": "bridge-usb", "state": "configured"})),
                EVENT_DISABLE => {
                    device.lock().expect("device").started = false;
                    log(serde_json::json!({"event": "bridge-usb", "state": "disabled"}));
                }
                _ => {}
            }
        }
    }
}

/// One control request the FunctionFS way: IN data by write, OUT data (and status) by read;
/// a stall is the opposite call, which fails with EL2HLT.
fn answer(ep0: &mut File, s: Setup, device: &Mutex<GsUsbDevice>, log: &Log) -> std::io::Result<()> {
    let mut data = vec![0u8; if s.is_in() { 0 } else { s.length as usize }];
    if !s.is_in() {
        let n = ep0.read(&mut data)?;
        data.truncate(n);
    }
    let (reply, event) = device.lock().expect("device").control(s, &data);
    if let Some(e) = event {
        let v = match e {
            GsEvent::HostFormat(f) => serde_json::json!({"event": "bridge-host-format", "byte_order": f}),
            GsEvent::BitTiming { bitrate } => serde_json::json!({"event": "bridge-bittiming", "bitrate": bitrate}),
            GsEvent::Started => serde_json::json!({"event": "bridge-channel", "state": "started"}),
            GsEvent::Stopped => serde_json::json!({"event": "bridge-channel", "state": "stopped"}),
        };
        log(v);
    }
    let stalled = |r: std::io::Result<usize>| match r {
        Err(e) if e.raw_os_error() == Some(libc::EL2HLT) => Ok(()),
        r => r.map(|_| ()),
    };
    match (s.is_in(), reply) {
        (true, Reply::Data(mut d)) => {
            d.truncate(s.length as usize);
            ep0.write_all(&d)
        }
        (true, _) => stalled(ep0.read(&mut [0u8; 1])),
        // The OUT data stage was read above, which acknowledged it.
        (false, Reply::Stall) if s.length == 0 => stalled(ep0.write(&[0])),
        (false, _) if s.length == 0 => ep0.read(&mut []).map(|_| ()),
        (false, _) => Ok(()),
    }
}

fn host_to_wire(
    mut ep_out: File,
    ep_in: Arc<Mutex<File>>,
    wire: CanSocket,
    device: Arc<Mutex<GsUsbDevice>>,
    own: Arc<Mutex<OwnNode>>,
    log: Log,
) {
    let mut buf = [0u8; 512];
    loop {
        let n = match ep_out.read(&mut buf) {
            Ok(n) => n,
            // The function was disabled (unplug, reset): the next read waits for it again.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ESHUTDOWN | libc::EINTR | libc::EAGAIN)) => continue,
            Err(e) => {
                log(serde_json::json!({"event": "bridge-error", "what": format!("bulk OUT: {e}")}));
                return;
            }
        };
        let Some(frame) = device.lock().expect("device").host_sent(&buf[..n]) else { continue };
        let sent = match StandardId::new(frame.can_id as u16)
            .and_then(|id| socketcan::CanFrame::new(Id::Standard(id), frame.payload()))
        {
            Some(f) => wire.write_frame(&f).map_err(|e| e.to_string()),
            None => Err(format!("not a classic 11-bit frame: {frame:?}")),
        };
        if let Err(e) = sent {
            log(serde_json::json!({"event": "bridge-error", "what": format!("to the wire: {e}")}));
        }
        // The echo completes the driver's transmission (its 10 slots would run out without).
        if let Err(e) = ep_in.lock().expect("ep1").write_all(&frame.encode()) {
            log(serde_json::json!({"event": "bridge-error", "what": format!("echo: {e}")}));
        }
        // The bridge's own node hears the host too; its answers go to the host only.
        for answer in own.lock().expect("own node").host_frame(&frame) {
            if let Err(e) = ep_in.lock().expect("ep1").write_all(&answer.encode()) {
                log(serde_json::json!({"event": "bridge-error", "what": format!("own node: {e}")}));
            }
        }
    }
}

fn wire_to_host(wire: CanSocket, ep_in: Arc<Mutex<File>>, device: Arc<Mutex<GsUsbDevice>>, log: Log) {
    loop {
        let frame = match wire.read_frame() {
            Ok(socketcan::CanFrame::Data(d)) if !d.is_extended() => d,
            Ok(_) => continue,
            Err(e) => {
                log(serde_json::json!({"event": "bridge-error", "what": format!("from the wire: {e}")}));
                return;
            }
        };
        // A stopped channel (can0 down) has no reads pending: the frame is lost, as on the
        // real bridge.
        if !device.lock().expect("device").started {
            continue;
        }
        let host = HostFrame::rx(frame.raw_id(), frame.data());
        let bytes: [u8; HOST_FRAME_LEN] = host.encode();
        if let Err(e) = ep_in.lock().expect("ep1").write_all(&bytes) {
            log(serde_json::json!({"event": "bridge-error", "what": format!("to the host: {e}")}));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_blob_counts_three_descriptors_per_speed() {
        let d = descriptors();
        assert_eq!(u32::from_le_bytes(d[0..4].try_into().unwrap()), 3);
        assert_eq!(u32::from_le_bytes(d[4..8].try_into().unwrap()) as usize, d.len());
        assert_eq!(d.len(), 20 + 2 * 23);
        let s = strings();
        assert_eq!(u32::from_le_bytes(s[4..8].try_into().unwrap()) as usize, s.len());
        assert!(s.ends_with(b"gs_usb\0"));
    }
}
