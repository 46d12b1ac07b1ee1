//! The STM32 system-memory (ROM) bootloader's USB DFU device (pure, no I/O): its descriptors
//! and its DfuSe request state machine, as ST AN3156 ("USB DFU protocol used in the STM32
//! bootloader") and the USB DFU 1.1 class specification describe them.
//!
//! What a real ROM shows (lsusb -v of an STM32F401/F411, 512 KiB, the same sector map as the
//! F446): VID:PID 0483:df11, bcdDevice 0x2200, iManufacturer "STMicroelectronics",
//! iProduct "STM32  BOOTLOADER" (two spaces), iSerialNumber 12 hex digits from the chip UID,
//! one configuration (bmAttributes 0xc0, 100 mA), one interface 0 with class FE/01/02 and no
//! endpoints, one alternate setting per memory whose iInterface is the DfuSe memory map
//! (`@Internal Flash  /0x08000000/04*016Kg,01*064Kg,03*128Kg`, `@Option Bytes  /0x1FFFC000/01*016 e`,
//! `@OTP Memory /0x1FFF7800/01*512 e,01*016 e`, `@Device Feature/0xFFFF0000/01*004 e`), and
//! after the last one the DFU functional descriptor: bmAttributes 0x0b (will detach,
//! manifestation intolerant, upload, download), wDetachTimeOut 255 ms, wTransferSize 2048,
//! bcdDFUVersion 0x011a (DfuSe). The STM32H743's ROM (published `dfu-util -l` listings):
//! bcdDevice 0x0200, `@Internal Flash   /0x08000000/16*128Kg` and
//! `@Option Bytes   /0x5200201C/01*128 e`; the 1 MiB H723 has 8 of those sectors.
//!
//! Requests answered (interface 0, AN3156 section 3 / DFU 1.1 section 6): GETSTATUS,
//! GETSTATE, CLRSTATUS, ABORT, UPLOAD (block 0: the command list; block n >= 2: memory at
//! `(n - 2) * wLength + address pointer`), DNLOAD block 0 with the Set Address Pointer
//! command (0x21). Erase (0x41), read unprotect (0x92), data blocks and leave are not
//! modelled: the device goes to dfuERROR (errSTALLEDPKT) and says so in its note.

use crate::firmware::McuProfile;
use crate::flash::FlashMemory;

pub const DFU_DNLOAD: u8 = 1;
pub const DFU_UPLOAD: u8 = 2;
pub const DFU_GETSTATUS: u8 = 3;
pub const DFU_CLRSTATUS: u8 = 4;
pub const DFU_GETSTATE: u8 = 5;
pub const DFU_ABORT: u8 = 6;

/// DFU 1.1 table 6.1 (bState).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    Idle = 2,
    DnloadSync = 3,
    DnBusy = 4,
    DnloadIdle = 5,
    UploadIdle = 9,
    Error = 10,
}

/// DFU 1.1 table 6.2 (bStatus), the ones this device reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = 0x00,
    ErrAddress = 0x08,
    ErrStalledPkt = 0x0f,
}

/// The USB identity and memory map of one MCU's ROM DFU bootloader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RomDfu {
    pub vid: u16,
    pub pid: u16,
    pub bcd_device: u16,
    pub manufacturer: String,
    pub product: String,
    pub serial: String,
    /// iInterface of alternate setting 0, 1, ...
    pub alt_names: Vec<String>,
    pub transfer_size: u16,
}

pub const STM32_ROM_PRODUCT: &str = "STM32  BOOTLOADER";
pub const STM32_ROM_MANUFACTURER: &str = "STMicroelectronics";

impl RomDfu {
    /// The ROM DFU of an STM32 (`None` for other families: the RP2040's ROM is not DFU).
    pub fn stm32(mcu: &str, profile: &McuProfile, serial: &str) -> Option<RomDfu> {
        let m = mcu.to_ascii_lowercase();
        if !m.starts_with("stm32") {
            return None;
        }
        let kib = profile.flash_size / 1024;
        let (bcd_device, alt_names) = if m.starts_with("stm32h7") {
            let sectors = kib / 128;
            (
                0x0200,
                vec![
                    format!("@Internal Flash   /0x08000000/{sectors:02}*128Kg"),
                    "@Option Bytes   /0x5200201C/01*128 e".to_string(),
                ],
            )
        } else if m.starts_with("stm32f4") || m.starts_with("stm32f2") {
            // 4 x 16 KiB, 1 x 64 KiB, then 128 KiB sectors (RM0390 / RM0090 flash module).
            let big = kib.saturating_sub(128) / 128;
            (
                0x2200,
                vec![
                    format!("@Internal Flash  /0x08000000/04*016Kg,01*064Kg,{big:02}*128Kg"),
                    "@Option Bytes  /0x1FFFC000/01*016 e".to_string(),
                    "@OTP Memory /0x1FFF7800/01*512 e,01*016 e".to_string(),
                    "@Device Feature/0xFFFF0000/01*004 e".to_string(),
                ],
            )
        } else {
            // Uniform pages (f0/f1/g0/g4): the same notation, the page size from the profile.
            let page = profile.pages.page_size(profile.flash_base);
            let pages = profile.flash_size / page;
            (0x2200, vec![format!("@Internal Flash  /0x08000000/{pages:03}*{:02}Kg", page / 1024)])
        };
        Some(RomDfu {
            vid: 0x0483,
            pid: 0xdf11,
            bcd_device,
            manufacturer: STM32_ROM_MANUFACTURER.into(),
            product: STM32_ROM_PRODUCT.into(),
            serial: serial.into(),
            alt_names,
            transfer_size: 2048,
        })
    }

    /// The 18-byte device descriptor.
    pub fn device_descriptor(&self) -> Vec<u8> {
        let mut d = vec![18, 0x01, 0x00, 0x02, 0x00, 0x00, 0x00, 64];
        d.extend_from_slice(&self.vid.to_le_bytes());
        d.extend_from_slice(&self.pid.to_le_bytes());
        d.extend_from_slice(&self.bcd_device.to_le_bytes());
        d.extend_from_slice(&[1, 2, 3, 1]);
        d
    }

    /// The full-speed configuration descriptor with its interface and functional descriptors.
    pub fn config_descriptor(&self) -> Vec<u8> {
        let mut d = vec![9, 0x02, 0, 0, 1, 1, 0, 0xc0, 50];
        for (alt, _) in self.alt_names.iter().enumerate() {
            d.extend_from_slice(&[9, 0x04, 0, alt as u8, 0, 0xfe, 0x01, 0x02, 4 + alt as u8]);
        }
        // DFU functional descriptor (DFU 1.1 table 4.2): will detach, manifestation
        // intolerant, upload and download capable; DfuSe 1.1a.
        d.extend_from_slice(&[9, 0x21, 0x0b]);
        d.extend_from_slice(&255u16.to_le_bytes());
        d.extend_from_slice(&self.transfer_size.to_le_bytes());
        d.extend_from_slice(&0x011au16.to_le_bytes());
        let total = d.len() as u16;
        d[2..4].copy_from_slice(&total.to_le_bytes());
        d
    }

    /// String descriptor `index` (0: the language list, en-US only).
    pub fn string_descriptor(&self, index: u8) -> Option<Vec<u8>> {
        let text = match index {
            0 => return Some(vec![4, 0x03, 0x09, 0x04]),
            1 => &self.manufacturer,
            2 => &self.product,
            3 => &self.serial,
            n => self.alt_names.get(n as usize - 4)?,
        };
        let mut d = vec![0, 0x03];
        for u in text.encode_utf16() {
            d.extend_from_slice(&u.to_le_bytes());
        }
        d[0] = d.len() as u8;
        Some(d)
    }
}

/// One control request as it arrives on ep0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setup {
    pub request_type: u8,
    pub request: u8,
    pub value: u16,
    pub index: u16,
    pub length: u16,
}

impl Setup {
    pub fn parse(b: &[u8; 8]) -> Setup {
        Setup {
            request_type: b[0],
            request: b[1],
            value: u16::from_le_bytes([b[2], b[3]]),
            index: u16::from_le_bytes([b[4], b[5]]),
            length: u16::from_le_bytes([b[6], b[7]]),
        }
    }

    pub fn is_in(&self) -> bool {
        self.request_type & 0x80 != 0
    }
}

/// How to finish a control request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// IN data stage with these bytes.
    Data(Vec<u8>),
    /// Status stage only (OUT requests).
    Ack,
    /// Protocol stall.
    Stall,
}

/// The ROM bootloader's DfuSe state machine over a snapshot of the board's flash.
#[derive(Debug, Clone)]
pub struct DfuSeDevice {
    pub desc: RomDfu,
    flash: FlashMemory,
    pub state: State,
    pub status: Status,
    pub alt: u8,
    pub address: u32,
    /// What the last request did, for the simulator's event log (taken by the caller).
    pub note: Option<String>,
}

impl DfuSeDevice {
    pub fn new(desc: RomDfu, flash: FlashMemory) -> Self {
        DfuSeDevice { desc, address: flash.base, flash, state: State::Idle, status: Status::Ok, alt: 0, note: None }
    }

    /// A USB reset: the ROM starts over in dfuIDLE on alternate setting 0.
    pub fn reset(&mut self) {
        self.state = State::Idle;
        self.status = Status::Ok;
        self.alt = 0;
        self.address = self.flash.base;
    }

    fn fail(&mut self, status: Status, note: String) -> Reply {
        self.state = State::Error;
        self.status = status;
        self.note = Some(note);
        Reply::Stall
    }

    /// Handle one control request (`data`: the OUT data stage, empty for IN requests).
    pub fn control(&mut self, s: Setup, data: &[u8]) -> Reply {
        match (s.request_type, s.request) {
            // GET_DESCRIPTOR (string): the kernel answers device/config itself.
            (0x80, 6) if s.value >> 8 == 0x03 => match self.desc.string_descriptor(s.value as u8) {
                Some(d) => Reply::Data(d),
                None => Reply::Stall,
            },
            (0x00, 9) => Reply::Ack, // SET_CONFIGURATION
            (0x01, 11) => {
                // SET_INTERFACE
                if s.index == 0 && (s.value as usize) < self.desc.alt_names.len() {
                    self.alt = s.value as u8;
                    Reply::Ack
                } else {
                    Reply::Stall
                }
            }
            (0x81, 10) => Reply::Data(vec![self.alt]), // GET_INTERFACE
            (0x81, 0) => Reply::Data(vec![0, 0]),      // GET_STATUS (interface)
            (0x21, _) | (0xa1, _) if s.index == 0 => self.dfu_request(s, data),
            _ => Reply::Stall,
        }
    }

    fn dfu_request(&mut self, s: Setup, data: &[u8]) -> Reply {
        match s.request {
            DFU_GETSTATUS => {
                // A command sent by DNLOAD runs now: busy once, then done.
                let reported = if self.state == State::DnloadSync {
                    self.state = State::DnloadIdle;
                    State::DnBusy
                } else {
                    self.state
                };
                Reply::Data(vec![self.status as u8, 0, 0, 0, reported as u8, 0])
            }
            DFU_GETSTATE => Reply::Data(vec![self.state as u8]),
            DFU_CLRSTATUS if self.state == State::Error => {
                self.state = State::Idle;
                self.status = Status::Ok;
                Reply::Ack
            }
            DFU_ABORT if self.state != State::Error => {
                self.state = State::Idle;
                Reply::Ack
            }
            DFU_DNLOAD if matches!(self.state, State::Idle | State::DnloadIdle) => self.dnload(s, data),
            DFU_UPLOAD if matches!(self.state, State::Idle | State::UploadIdle) => self.upload(s),
            r => self.fail(Status::ErrStalledPkt, format!("request {r} not valid in state {:?} (stalled)", self.state)),
        }
    }

    fn dnload(&mut self, s: Setup, data: &[u8]) -> Reply {
        if s.value == 0 && data.len() == 5 && data[0] == 0x21 {
            self.address = u32::from_le_bytes([data[1], data[2], data[3], data[4]]);
            self.state = State::DnloadSync;
            self.note = Some(format!("set address pointer {:#010x}", self.address));
            return Reply::Ack;
        }
        let what = match (s.value, data.first()) {
            (0, None) => "leave (manifestation)".to_string(),
            (0, Some(0x41)) => "erase".to_string(),
            (0, Some(0x92)) => "read unprotect".to_string(),
            (0, Some(c)) => format!("command {c:#04x}"),
            (n, _) => format!("data block {n} ({} bytes)", data.len()),
        };
        // The data stage is already acknowledged; the error shows in the next GETSTATUS.
        self.fail(Status::ErrStalledPkt, format!("DNLOAD {what}: not modelled by the simulator"));
        Reply::Ack
    }

    fn upload(&mut self, s: Setup) -> Reply {
        match s.value {
            0 => {
                // AN3156 "Get command": the commands this bootloader supports.
                self.state = State::UploadIdle;
                Reply::Data(vec![0x00, 0x21, 0x41, 0x92])
            }
            1 => self.fail(Status::ErrStalledPkt, "UPLOAD block 1 is not valid".into()),
            n => {
                let start = (n as u64 - 2) * s.length as u64 + self.address as u64;
                if self.alt != 0 || start < self.flash.base as u64 || start >= self.flash.end() {
                    return self.fail(
                        Status::ErrAddress,
                        format!("UPLOAD at {start:#x} (alt {}): outside the internal flash", self.alt),
                    );
                }
                let len = (s.length as u64).min(self.flash.end() - start) as usize;
                self.state = State::UploadIdle;
                self.note = Some(format!("upload {len} bytes at {start:#010x}"));
                Reply::Data(self.flash.read(start as u32, len))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firmware::profile_for;

    fn f446() -> RomDfu {
        RomDfu::stm32("stm32f446xx", &profile_for("stm32f446xx").unwrap(), "377A364D3234").unwrap()
    }

    fn setup(request_type: u8, request: u8, value: u16, length: u16) -> Setup {
        Setup { request_type, request, value, index: 0, length }
    }

    #[test]
    fn descriptors_match_a_real_f4_rom() {
        let d = f446();
        assert_eq!(d.alt_names[0], "@Internal Flash  /0x08000000/04*016Kg,01*064Kg,03*128Kg");
        assert_eq!(d.alt_names.len(), 4);
        let cfg = d.config_descriptor();
        // wTotalLength 0x0036 as lsusb shows for the real device.
        assert_eq!(cfg.len(), 0x36);
        assert_eq!(&cfg[..9], &[9, 2, 0x36, 0, 1, 1, 0, 0xc0, 50]);
        assert_eq!(&cfg[9..18], &[9, 4, 0, 0, 0, 0xfe, 1, 2, 4]);
        assert_eq!(&cfg[cfg.len() - 9..], &[9, 0x21, 0x0b, 255, 0, 0x00, 0x08, 0x1a, 0x01]);
        let dev = d.device_descriptor();
        assert_eq!(dev.len(), 18);
        assert_eq!(&dev[8..14], &[0x83, 0x04, 0x11, 0xdf, 0x00, 0x22]);
        assert_eq!(d.string_descriptor(2).unwrap()[0] as usize, 2 + 2 * STM32_ROM_PRODUCT.len());
        assert_eq!(d.string_descriptor(0), Some(vec![4, 3, 9, 4]));
        assert!(d.string_descriptor(8).is_none());
    }

    #[test]
    fn layouts_per_family() {
        let h7 = RomDfu::stm32("stm32h723xx", &profile_for("stm32h723xx").unwrap(), "x").unwrap();
        assert_eq!(h7.alt_names[0], "@Internal Flash   /0x08000000/08*128Kg");
        assert_eq!(h7.bcd_device, 0x0200);
        let f407 = RomDfu::stm32("stm32f407xx", &profile_for("stm32f407xx").unwrap(), "x").unwrap();
        assert_eq!(f407.alt_names[0], "@Internal Flash  /0x08000000/04*016Kg,01*064Kg,07*128Kg");
        let g0 = RomDfu::stm32("stm32g0b1xx", &profile_for("stm32g0b1xx").unwrap(), "x").unwrap();
        assert_eq!(g0.alt_names[0], "@Internal Flash  /0x08000000/256*02Kg");
        assert!(RomDfu::stm32("rp2040", &profile_for("rp2040").unwrap(), "x").is_none());
    }

    #[test]
    fn set_address_then_upload_like_dfu_util() {
        let p = profile_for("stm32f446xx").unwrap();
        let mut flash = FlashMemory::new(p.flash_base, p.flash_size, p.pages);
        flash.load(0x0800_8000, &[1, 2, 3, 4]);
        let mut dev = DfuSeDevice::new(f446(), flash);
        assert_eq!(dev.control(setup(0x01, 11, 0, 0), &[]), Reply::Ack);
        let status = |dev: &mut DfuSeDevice| match dev.control(setup(0xa1, DFU_GETSTATUS, 0, 6), &[]) {
            Reply::Data(d) => (d[0], d[4]),
            r => panic!("{r:?}"),
        };
        assert_eq!(status(&mut dev), (0, State::Idle as u8));
        let cmd = [0x21, 0x00, 0x80, 0x00, 0x08];
        assert_eq!(dev.control(setup(0x21, DFU_DNLOAD, 0, 5), &cmd), Reply::Ack);
        assert_eq!(status(&mut dev), (0, State::DnBusy as u8));
        assert_eq!(status(&mut dev), (0, State::DnloadIdle as u8));
        assert_eq!(dev.control(setup(0x21, DFU_ABORT, 0, 0), &[]), Reply::Ack);
        assert_eq!(status(&mut dev), (0, State::Idle as u8));
        match dev.control(setup(0xa1, DFU_UPLOAD, 2, 256), &[]) {
            Reply::Data(d) => {
                assert_eq!(d.len(), 256);
                assert_eq!(&d[..5], &[1, 2, 3, 4, 0xff]);
            }
            r => panic!("{r:?}"),
        }
        match dev.control(setup(0xa1, DFU_UPLOAD, 3, 256), &[]) {
            Reply::Data(d) => assert!(d.iter().all(|&b| b == 0xff)),
            r => panic!("{r:?}"),
        }
        assert_eq!(dev.control(setup(0xa1, DFU_GETSTATE, 0, 1), &[]), Reply::Data(vec![State::UploadIdle as u8]));
    }

    #[test]
    fn errors_stall_and_clear() {
        let p = profile_for("stm32f446xx").unwrap();
        let mut dev = DfuSeDevice::new(f446(), FlashMemory::new(p.flash_base, p.flash_size, p.pages));
        // Erase is not modelled: acknowledged, then reported as an error.
        assert_eq!(dev.control(setup(0x21, DFU_DNLOAD, 0, 5), &[0x41, 0, 0, 0, 8]), Reply::Ack);
        assert_eq!(dev.state, State::Error);
        assert!(dev.note.take().unwrap().contains("not modelled"));
        assert_eq!(dev.control(setup(0xa1, DFU_UPLOAD, 2, 64), &[]), Reply::Stall);
        assert_eq!(dev.control(setup(0x21, DFU_CLRSTATUS, 0, 0), &[]), Reply::Ack);
        assert_eq!(dev.state, State::Idle);
        // Outside the flash.
        let cmd = [0x21, 0x00, 0x00, 0x00, 0x20];
        dev.control(setup(0x21, DFU_DNLOAD, 0, 5), &cmd);
        dev.control(setup(0x21, DFU_ABORT, 0, 0), &[]);
        assert_eq!(dev.control(setup(0xa1, DFU_UPLOAD, 2, 64), &[]), Reply::Stall);
        assert_eq!(dev.status, Status::ErrAddress);
        // DETACH (0) is for run-time mode; a DFU-mode device stalls it.
        assert_eq!(dev.control(setup(0x21, 0, 0, 0), &[]), Reply::Stall);
    }
}
