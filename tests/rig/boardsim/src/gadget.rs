//! configfs USB gadgets (one per board, each on its own dummy_udc) and the host-side view of
//! them in sysfs (the dummy_hcd bus paired with the UDC, the enumerated device, its tty and
//! its /dev/serial/by-id link).

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::dfu::DfuSeDevice;
use crate::gadgetfs::{DfuPort, Notify};

pub const CONFIGFS_GADGETS: &str = "/sys/kernel/config/usb_gadget";
pub const USBMON_DIR: &str = "/sys/kernel/debug/usb/usbmon";
const GADGET_PREFIX: &str = "kflash-";

/// Which function the gadget's configuration holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Function {
    /// CDC-ACM (usb_f_acm): a tty on both sides.
    Acm,
    /// SourceSink (usb_f_ss_lb): vendor-specific bulk endpoints, no tty. ROM mode of the
    /// RP2040 (its PICOBOOT interface is vendor-specific too), and of an STM32 when gadgetfs
    /// cannot serve it.
    SourceSink,
    /// The STM32 ROM's DFU device through gadgetfs (not configfs; see gadgetfs.rs).
    RomDfu,
}

/// USB descriptors of one identity of a board.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsbIdentity {
    pub vid: u16,
    pub pid: u16,
    pub device_class: u8,
    pub manufacturer: String,
    pub product: String,
    pub serial: String,
    pub function: Function,
}

impl UsbIdentity {
    pub fn vid_pid(&self) -> String {
        format!("{:04x}:{:04x}", self.vid, self.pid)
    }

    /// The /dev/serial/by-id name udev's 60-serial.rules gives the tty, when it has one.
    pub fn by_id_name(&self) -> Option<String> {
        if self.function != Function::Acm {
            return None;
        }
        let clean = |s: &str| -> String {
            s.chars().map(|c| if c.is_ascii_alphanumeric() || "#+-.:=@_".contains(c) { c } else { '_' }).collect()
        };
        Some(format!("usb-{}_{}_{}-if00", clean(&self.manufacturer), clean(&self.product), clean(&self.serial)))
    }
}

/// One configfs gadget bound (or not) to one UDC.
pub struct Gadget {
    pub dir: PathBuf,
    pub udc: String,
    acm_name: String,
    ss_name: Option<String>,
    /// Board-side tty of the ACM function.
    pub tty: PathBuf,
    pub bound: bool,
    /// CLOCK_MONOTONIC seconds just before the last bind (the `connect` event's `bind_mono`).
    pub bound_at: Option<f64>,
    /// The function linked into c.1 (Acm or SourceSink).
    function: Function,
    identity: Option<UsbIdentity>,
    /// The DFU device the next bind presents (Function::RomDfu).
    rom_dfu: Option<(DfuSeDevice, Notify)>,
    /// The gadgetfs DFU device while bound as RomDfu.
    port: Option<DfuPort>,
}

impl std::fmt::Debug for DfuPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DfuPort")
    }
}

fn write_attr(path: &Path, value: &str) -> Result<()> {
    fs::write(path, value).with_context(|| format!("cannot write '{}' to {}", value.trim_end(), path.display()))
}

fn mkdir(path: &Path) -> Result<()> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot create {}", path.display())),
    }
}

/// Check that configfs gadgets and the UDCs are available; returns the UDC names.
pub fn check_environment() -> Result<Vec<String>> {
    if !Path::new(CONFIGFS_GADGETS).is_dir() {
        bail!(
            "{CONFIGFS_GADGETS} does not exist: load libcomposite and mount configfs \
             (modprobe libcomposite; mount -t configfs none /sys/kernel/config)"
        );
    }
    let mut udcs: Vec<String> = match fs::read_dir("/sys/class/udc") {
        Ok(rd) => rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect(),
        Err(_) => Vec::new(),
    };
    udcs.sort();
    if udcs.is_empty() {
        bail!("no USB device controllers in /sys/class/udc: modprobe dummy_hcd num=N");
    }
    Ok(udcs)
}

/// The USB bus number of the host controller paired with dummy_udc.N
/// (/sys/devices/platform/dummy_hcd.N/usbB).
pub fn host_bus(udc_index: usize) -> Result<u32> {
    let dir = format!("/sys/devices/platform/dummy_hcd.{udc_index}");
    let rd =
        fs::read_dir(&dir).with_context(|| format!("cannot read {dir} (is dummy_hcd loaded with enough num=?)"))?;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(n) = name.strip_prefix("usb") {
            if let Ok(b) = n.parse() {
                return Ok(b);
            }
        }
    }
    bail!("{dir} has no usbN bus directory")
}

/// The host-side view of the device on a dummy_hcd bus.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct HostView {
    pub present: bool,
    pub vid_pid: Option<String>,
    /// e.g. "ttyACM0"
    pub tty: Option<String>,
    /// Whether /dev/<tty> exists.
    pub dev_node: bool,
    /// /dev/serial/by-id/… link resolving to the tty.
    pub by_id: Option<String>,
}

/// Look at /sys/devices/platform/dummy_hcd.N/usbB/B-1 and /dev/serial/by-id.
pub fn host_view(udc_index: usize, bus: u32) -> HostView {
    let dev = PathBuf::from(format!("/sys/devices/platform/dummy_hcd.{udc_index}/usb{bus}/{bus}-1"));
    let mut v = HostView::default();
    let read = |f: &str| fs::read_to_string(dev.join(f)).ok().map(|s| s.trim().to_string());
    let (Some(vid), Some(pid)) = (read("idVendor"), read("idProduct")) else {
        return v;
    };
    v.present = true;
    v.vid_pid = Some(format!("{vid}:{pid}"));
    let Ok(rd) = fs::read_dir(&dev) else { return v };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with(&format!("{bus}-1:")) {
            continue;
        }
        if let Ok(ttys) = fs::read_dir(e.path().join("tty")) {
            if let Some(t) = ttys.flatten().next() {
                v.tty = Some(t.file_name().to_string_lossy().into_owned());
                break;
            }
        }
    }
    if let Some(tty) = &v.tty {
        let node = PathBuf::from("/dev").join(tty);
        v.dev_node = node.exists();
        if let Ok(rd) = fs::read_dir("/dev/serial/by-id") {
            for e in rd.flatten() {
                if fs::canonicalize(e.path()).ok().as_deref() == Some(node.as_path()) {
                    v.by_id = Some(format!("/dev/serial/by-id/{}", e.file_name().to_string_lossy()));
                    break;
                }
            }
        }
    }
    v
}

impl Gadget {
    /// Create (or re-create) the gadget `kflash-<board>` for dummy_udc.N with an ACM function
    /// (and a SourceSink function when the kernel has usb_f_ss_lb).
    pub fn create(board: &str, udc_index: usize) -> Result<Gadget> {
        let udc = format!("dummy_udc.{udc_index}");
        if !Path::new("/sys/class/udc").join(&udc).exists() {
            let have = check_environment().map(|u| u.join(", ")).unwrap_or_default();
            bail!("board '{board}' needs {udc}, but /sys/class/udc has [{have}] (start the rig with more --udcs)");
        }
        let dir = Path::new(CONFIGFS_GADGETS).join(format!("{GADGET_PREFIX}{board}"));
        if dir.exists() {
            remove_gadget_dir(&dir).with_context(|| format!("cannot remove stale gadget {}", dir.display()))?;
        }
        mkdir(&dir)?;
        write_attr(&dir.join("bcdUSB"), "0x0200")?;
        write_attr(&dir.join("bMaxPacketSize0"), "64")?;
        mkdir(&dir.join("strings/0x409"))?;
        let cfg = dir.join("configs/c.1");
        mkdir(&cfg)?;
        mkdir(&cfg.join("strings/0x409"))?;
        write_attr(&cfg.join("strings/0x409/configuration"), "kflash-boardsim")?;
        write_attr(&cfg.join("MaxPower"), "100")?;
        let acm_name = format!("acm.{board}");
        let acm = dir.join("functions").join(&acm_name);
        mkdir(&acm).context("cannot create the ACM function (is usb_f_acm available?)")?;
        let port: u32 = fs::read_to_string(acm.join("port_num"))
            .context("cannot read the ACM port_num")?
            .trim()
            .parse()
            .context("bad ACM port_num")?;
        let ss_name = format!("SourceSink.{board}");
        let ss = match fs::create_dir(dir.join("functions").join(&ss_name)) {
            Ok(()) => Some(ss_name),
            Err(_) => None,
        };
        std::os::unix::fs::symlink(&acm, cfg.join(&acm_name)).context("cannot link the ACM function into c.1")?;
        Ok(Gadget {
            dir,
            udc,
            acm_name,
            ss_name: ss,
            tty: PathBuf::from(format!("/dev/ttyGS{port}")),
            bound: false,
            bound_at: None,
            function: Function::Acm,
            identity: None,
            rom_dfu: None,
            port: None,
        })
    }

    /// Whether ROM-DFU mode can be shown without a tty (usb_f_ss_lb present).
    pub fn has_sourcesink(&self) -> bool {
        self.ss_name.is_some()
    }

    pub fn identity(&self) -> Option<&UsbIdentity> {
        self.identity.as_ref()
    }

    fn set_function(&mut self, f: Function) -> Result<()> {
        // RomDfu does not go through configfs: c.1 keeps what it has.
        let f = if f == Function::SourceSink && self.ss_name.is_none() { Function::Acm } else { f };
        if f == self.function || f == Function::RomDfu {
            return Ok(());
        }
        let cfg = self.dir.join("configs/c.1");
        let (old, new) = match f {
            Function::SourceSink => (self.acm_name.clone(), self.ss_name.clone().unwrap_or_default()),
            _ => (self.ss_name.clone().unwrap_or_default(), self.acm_name.clone()),
        };
        fs::remove_file(cfg.join(&old)).with_context(|| format!("cannot unlink {old} from c.1"))?;
        std::os::unix::fs::symlink(self.dir.join("functions").join(&new), cfg.join(&new))
            .with_context(|| format!("cannot link {new} into c.1"))?;
        self.function = f;
        Ok(())
    }

    /// The function actually in use (SourceSink falls back to ACM when unavailable).
    pub fn function(&self) -> Function {
        if self.port.is_some() {
            Function::RomDfu
        } else {
            self.function
        }
    }

    /// The DFU device the next bind presents when the identity's function is RomDfu.
    pub fn prepare_rom_dfu(&mut self, device: DfuSeDevice, notify: Notify) {
        self.rom_dfu = Some((device, notify));
    }

    /// Change the descriptors (the gadget must be unbound).
    pub fn set_identity(&mut self, id: &UsbIdentity) -> Result<()> {
        if self.bound {
            bail!("internal error: identity change while bound");
        }
        write_attr(&self.dir.join("idVendor"), &format!("0x{:04x}", id.vid))?;
        write_attr(&self.dir.join("idProduct"), &format!("0x{:04x}", id.pid))?;
        write_attr(&self.dir.join("bcdDevice"), "0x0100")?;
        write_attr(&self.dir.join("bDeviceClass"), &format!("0x{:02x}", id.device_class))?;
        let s = self.dir.join("strings/0x409");
        write_attr(&s.join("manufacturer"), &id.manufacturer)?;
        write_attr(&s.join("product"), &id.product)?;
        write_attr(&s.join("serialnumber"), &id.serial)?;
        self.set_function(id.function)?;
        self.identity = Some(id.clone());
        Ok(())
    }

    /// "Plug in": bind to the UDC. A RomDfu identity goes through gadgetfs; when that fails
    /// the board shows the same identity with SourceSink (the error is returned in `Ok`).
    pub fn bind(&mut self) -> Result<Option<anyhow::Error>> {
        if self.bound {
            return Ok(None);
        }
        let mut fallback = None;
        self.bound_at = Some(crate::events::now_monotonic());
        if self.identity.as_ref().is_some_and(|i| i.function == Function::RomDfu) {
            match self.rom_dfu.take() {
                Some((device, notify)) => match DfuPort::start(&self.udc, device, notify) {
                    Ok(port) => {
                        self.port = Some(port);
                        self.bound = true;
                        return Ok(None);
                    }
                    Err(e) => fallback = Some(e),
                },
                None => fallback = Some(anyhow::anyhow!("internal error: no DFU device prepared")),
            }
            self.set_function(Function::SourceSink)?;
        }
        write_attr(&self.dir.join("UDC"), &self.udc)?;
        self.bound = true;
        Ok(fallback)
    }

    /// "Unplug": unbind from the UDC.
    pub fn unbind(&mut self) -> Result<()> {
        if self.bound {
            self.bound = false;
            if let Some(mut port) = self.port.take() {
                port.stop();
                return Ok(());
            }
            write_attr(&self.dir.join("UDC"), "\n")?;
        }
        Ok(())
    }

    /// Remove the gadget from configfs.
    pub fn remove(&mut self) -> Result<()> {
        let _ = self.unbind();
        remove_gadget_dir(&self.dir)
    }
}

/// Tear down a gadget directory in the order configfs requires.
fn remove_gadget_dir(dir: &Path) -> Result<()> {
    if let Ok(udc) = fs::read_to_string(dir.join("UDC")) {
        if !udc.trim().is_empty() {
            write_attr(&dir.join("UDC"), "\n")?;
        }
    }
    if let Ok(rd) = fs::read_dir(dir.join("configs")) {
        for c in rd.flatten() {
            let c = c.path();
            if let Ok(items) = fs::read_dir(&c) {
                for it in items.flatten() {
                    let p = it.path();
                    if fs::symlink_metadata(&p).map(|m| m.file_type().is_symlink()).unwrap_or(false) {
                        fs::remove_file(&p).with_context(|| format!("cannot unlink {}", p.display()))?;
                    }
                }
            }
            let _ = fs::remove_dir(c.join("strings/0x409"));
            fs::remove_dir(&c).with_context(|| format!("cannot remove {}", c.display()))?;
        }
    }
    if let Ok(rd) = fs::read_dir(dir.join("functions")) {
        for f in rd.flatten() {
            fs::remove_dir(f.path()).with_context(|| format!("cannot remove {}", f.path().display()))?;
        }
    }
    let _ = fs::remove_dir(dir.join("strings/0x409"));
    fs::remove_dir(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_id_names() {
        let mut id = UsbIdentity {
            vid: 0x1d50,
            pid: 0x614e,
            device_class: 2,
            manufacturer: "Klipper".into(),
            product: "stm32h723xx".into(),
            serial: "29001A001151313531383332".into(),
            function: Function::Acm,
        };
        assert_eq!(id.by_id_name().unwrap(), "usb-Klipper_stm32h723xx_29001A001151313531383332-if00");
        id.manufacturer = "STMicroelectronics".into();
        id.product = "DFU in FS Mode".into();
        assert_eq!(id.by_id_name().unwrap(), "usb-STMicroelectronics_DFU_in_FS_Mode_29001A001151313531383332-if00");
        id.function = Function::SourceSink;
        assert!(id.by_id_name().is_none());
        assert_eq!(id.vid_pid(), "1d50:614e");
    }
}
