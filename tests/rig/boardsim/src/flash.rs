//! Simulated flash memory and the Katapult device state machine (pure, no I/O).
//!
//! Write semantics follow Katapult's stm32 `flash_write_block` (src/stm32/flash.c): blocks
//! must be aligned and at or above the application start; the first block of a page erases
//! the page (unless the page is already erased) and counts one page for SEND_EOF's answer;
//! an identical retransmitted block is accepted; different data over a non-erased block is
//! an error. The same rules are used for every MCU (rp2040 uses 4 KiB "pages").

use std::collections::BTreeMap;

use kflash::protocol::katapult::{
    AckData, Command, ConnectInfo, FrameDecoder, FrameError, Response, DEVICE_MAX_FRAME_LEN,
};

use crate::faults::Faults;
use crate::firmware::PageLayout;

/// Sparse flash: pages that were never written read as 0xFF.
#[derive(Debug, Clone, PartialEq)]
pub struct FlashMemory {
    pub base: u32,
    pub size: u32,
    pub layout: PageLayout,
    /// page start → page bytes (always the page's full size).
    pages: BTreeMap<u32, Vec<u8>>,
}

impl FlashMemory {
    pub fn new(base: u32, size: u32, layout: PageLayout) -> Self {
        FlashMemory { base, size, layout, pages: BTreeMap::new() }
    }

    /// One past the last flash address.
    pub fn end(&self) -> u64 {
        self.base as u64 + self.size as u64
    }

    fn contains(&self, addr: u32, len: u32) -> bool {
        addr >= self.base && addr as u64 + len as u64 <= self.end()
    }

    /// Read `len` bytes (0xFF outside flash and in erased areas).
    pub fn read(&self, addr: u32, len: usize) -> Vec<u8> {
        let mut out = vec![0xff; len];
        for (i, b) in out.iter_mut().enumerate() {
            let a = addr as u64 + i as u64;
            if a >= self.end() || a < self.base as u64 {
                continue;
            }
            let a = a as u32;
            let start = self.layout.page_start(a);
            if let Some(p) = self.pages.get(&start) {
                *b = p[(a - start) as usize];
            }
        }
        out
    }

    /// True when every byte in the range is 0xFF.
    pub fn is_erased(&self, addr: u32, len: u32) -> bool {
        self.read(addr, len as usize).iter().all(|&b| b == 0xff)
    }

    pub fn erase_page(&mut self, addr: u32) {
        let start = self.layout.page_start(addr);
        self.pages.remove(&start);
    }

    /// Program bytes (like real flash, only 1→0 transitions stick: the result is the AND).
    pub fn program(&mut self, addr: u32, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let a = addr + i as u32;
            if !self.contains(a, 1) {
                continue;
            }
            let start = self.layout.page_start(a);
            let size = self.layout.page_size(a) as usize;
            let page = self.pages.entry(start).or_insert_with(|| vec![0xff; size]);
            page[(a - start) as usize] &= b;
        }
    }

    /// Erase everything.
    #[cfg(test)]
    pub fn erase_all(&mut self) {
        self.pages.clear();
    }

    /// Erase the pages under `addr..addr+len` and program `data` there (test setup / initial
    /// firmware).
    pub fn load(&mut self, addr: u32, data: &[u8]) {
        let mut a = addr;
        while (a as u64) < addr as u64 + data.len() as u64 {
            self.erase_page(a);
            let start = self.layout.page_start(a);
            a = start + self.layout.page_size(a);
        }
        self.program(addr, data);
    }

    /// The bytes from `addr` up to the last non-erased byte of flash (what a scan of the
    /// installed application looks at).
    pub fn image_from(&self, addr: u32) -> Vec<u8> {
        let mut last: Option<u64> = None;
        for (&start, page) in self.pages.iter().rev() {
            if let Some(p) = page.iter().rposition(|&b| b != 0xff) {
                last = Some(start as u64 + p as u64);
                break;
            }
        }
        match last {
            Some(l) if l >= addr as u64 => self.read(addr, (l - addr as u64 + 1) as usize),
            _ => Vec::new(),
        }
    }
}

/// Why a SEND_BLOCK was refused with a command error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteError {
    WrongLength(usize),
    BelowAppStart,
    Misaligned,
    OutOfFlash,
    /// Different data over a block that is not erased (out-of-order write).
    NotErased,
}

/// Something the device did that the simulator logs or reacts to.
#[derive(Debug, Clone, PartialEq)]
pub enum KatapultEvent {
    /// A framing error was answered with a NACK (or silently dropped when `nacked` is false).
    FramingError {
        error: FrameError,
        nacked: bool,
    },
    Connected,
    BlockWritten {
        addr: u32,
        erased_page: bool,
        retransmit: bool,
    },
    BlockRejected {
        addr: u32,
        reason: WriteError,
    },
    Eof {
        pages: u32,
    },
    /// COMPLETE was acked: the caller jumps to the application after complete_delay.
    Complete,
    Busy {
        cmd: u8,
    },
    UnknownCommand {
        cmd: u8,
    },
}

/// Output of one feed: responses to send and events, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum KatapultOutput {
    Reply(Response),
    Event(KatapultEvent),
}

/// One Katapult boot session (state is reset when the bootloader restarts).
#[derive(Debug, Clone)]
pub struct KatapultDevice {
    decoder: FrameDecoder,
    need_valid: bool,
    /// What CONNECT reports.
    pub info: ConnectInfo,
    /// Application start enforced for writes.
    pub app_start: u32,
    pub page_write_count: u32,
    /// SEND_BLOCKs acknowledged in this session.
    pub blocks_acked: u32,
    pub completed: bool,
}

impl KatapultDevice {
    /// `info` is what CONNECT reports; its app_start is also enforced.
    pub fn new(info: ConnectInfo) -> Self {
        KatapultDevice {
            decoder: FrameDecoder::with_max_len(DEVICE_MAX_FRAME_LEN),
            need_valid: false,
            app_start: info.app_start,
            info,
            page_write_count: 0,
            blocks_acked: 0,
            completed: false,
        }
    }

    /// Feed received bytes; returns replies and events in order. `faults` supplies `busy`.
    pub fn feed(&mut self, bytes: &[u8], flash: &mut FlashMemory, faults: &mut Faults) -> Vec<KatapultOutput> {
        self.decoder.push(bytes);
        let mut out = Vec::new();
        while let Some(item) = self.decoder.next_frame() {
            match item {
                Err(error) => {
                    // The firmware NACKs once, then stays quiet until a valid frame arrives.
                    let nacked = !self.need_valid;
                    self.need_valid = true;
                    if nacked {
                        out.push(KatapultOutput::Reply(Response::Nack));
                    }
                    out.push(KatapultOutput::Event(KatapultEvent::FramingError { error, nacked }));
                }
                Ok(frame) => {
                    self.need_valid = false;
                    if faults.take_busy() {
                        out.push(KatapultOutput::Reply(Response::Busy));
                        out.push(KatapultOutput::Event(KatapultEvent::Busy { cmd: frame.cmd }));
                        continue;
                    }
                    match Command::from_frame(&frame) {
                        Ok(cmd) => self.dispatch(cmd, flash, &mut out),
                        Err(_) => {
                            out.push(KatapultOutput::Reply(Response::CommandError));
                            out.push(KatapultOutput::Event(KatapultEvent::BlockRejected {
                                addr: 0,
                                reason: WriteError::WrongLength(frame.payload.len()),
                            }));
                        }
                    }
                }
            }
        }
        out
    }

    fn dispatch(&mut self, cmd: Command, flash: &mut FlashMemory, out: &mut Vec<KatapultOutput>) {
        let bs = self.info.block_size;
        match cmd {
            Command::Connect => {
                out.push(KatapultOutput::Reply(Response::ack(&AckData::Connect(self.info.clone()))));
                out.push(KatapultOutput::Event(KatapultEvent::Connected));
            }
            Command::SendBlock { addr, data } => match self.write_block(addr, &data, flash) {
                Ok((erased_page, retransmit)) => {
                    self.blocks_acked += 1;
                    out.push(KatapultOutput::Reply(Response::ack(&AckData::SendBlock { addr })));
                    out.push(KatapultOutput::Event(KatapultEvent::BlockWritten { addr, erased_page, retransmit }));
                }
                Err(reason) => {
                    out.push(KatapultOutput::Reply(Response::CommandError));
                    out.push(KatapultOutput::Event(KatapultEvent::BlockRejected { addr, reason }));
                }
            },
            Command::SendEof => {
                let pages = self.page_write_count;
                out.push(KatapultOutput::Reply(Response::ack(&AckData::SendEof { page_count: pages })));
                out.push(KatapultOutput::Event(KatapultEvent::Eof { pages }));
            }
            Command::RequestBlock { addr } => {
                let data = flash.read(addr, bs as usize);
                out.push(KatapultOutput::Reply(Response::ack(&AckData::RequestBlock { addr, data })));
            }
            Command::Complete => {
                self.completed = true;
                out.push(KatapultOutput::Reply(Response::ack(&AckData::Complete)));
                out.push(KatapultOutput::Event(KatapultEvent::Complete));
            }
            // USB builds have no CAN id: command error, like any unknown command.
            Command::GetCanbusId | Command::Unknown(_) => {
                let cmd = Command::code(&cmd);
                out.push(KatapultOutput::Reply(Response::CommandError));
                out.push(KatapultOutput::Event(KatapultEvent::UnknownCommand { cmd }));
            }
        }
    }

    /// Returns (erased a page, was an identical retransmit).
    fn write_block(&mut self, addr: u32, data: &[u8], flash: &mut FlashMemory) -> Result<(bool, bool), WriteError> {
        let bs = self.info.block_size;
        if data.len() != bs as usize {
            return Err(WriteError::WrongLength(data.len()));
        }
        if addr < self.app_start {
            return Err(WriteError::BelowAppStart);
        }
        if addr & (bs - 1) != 0 {
            return Err(WriteError::Misaligned);
        }
        if !flash.contains(addr, bs) {
            return Err(WriteError::OutOfFlash);
        }
        let page_size = flash.layout.page_size(addr);
        let page = flash.layout.page_start(addr);
        let mut erase = false;
        if page == addr {
            if flash.is_erased(addr, page_size) {
                // already erased
            } else if flash.read(addr, bs as usize) == data && flash.is_erased(addr + bs, page_size - bs) {
                return Ok((false, true));
            } else {
                erase = true;
            }
            self.page_write_count += 1;
        } else if !flash.is_erased(addr, bs) {
            if flash.read(addr, bs as usize) == data {
                return Ok((false, true));
            }
            return Err(WriteError::NotErased);
        }
        if erase {
            flash.erase_page(page);
        }
        flash.program(addr, data);
        Ok((erase, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::faults::Fault;
    use kflash::protocol::katapult::{Frame, FrameDecoder as HostDecoder};

    const START: u32 = 0x0800_8000;

    fn device() -> (KatapultDevice, FlashMemory) {
        let info = ConnectInfo {
            proto_version: (1, 1, 0),
            app_start: START,
            block_size: 64,
            mcu: "stm32f446xx".into(),
            version: Some("v0.0.1-sim".into()),
        };
        (KatapultDevice::new(info), FlashMemory::new(0x0800_0000, 512 * 1024, PageLayout::Stm32F4))
    }

    fn send(dev: &mut KatapultDevice, flash: &mut FlashMemory, f: &mut Faults, cmd: Command) -> Vec<Response> {
        replies(dev.feed(&cmd.encode().unwrap(), flash, f))
    }

    fn replies(out: Vec<KatapultOutput>) -> Vec<Response> {
        out.into_iter()
            .filter_map(|o| match o {
                KatapultOutput::Reply(r) => Some(r),
                _ => None,
            })
            .collect()
    }

    fn block(addr: u32, fill: u8) -> Command {
        Command::SendBlock { addr, data: vec![fill; 64] }
    }

    #[test]
    fn connect_and_write_read_back() {
        let (mut d, mut fl) = device();
        let mut f = Faults::default();
        let r = send(&mut d, &mut fl, &mut f, Command::Connect);
        assert!(matches!(r[0].ack_data().unwrap(), AckData::Connect(ref i) if i.app_start == START));
        // Two pages: 0x08008000 (16K sector) and 0x0800C000.
        for i in 0..3u32 {
            let r = send(&mut d, &mut fl, &mut f, block(START + i * 64, i as u8));
            assert_eq!(r, vec![Response::ack(&AckData::SendBlock { addr: START + i * 64 })]);
        }
        let r = send(&mut d, &mut fl, &mut f, block(0x0800_C000, 7));
        assert_eq!(r[0].ack_data().unwrap(), AckData::SendBlock { addr: 0x0800_C000 });
        let r = send(&mut d, &mut fl, &mut f, Command::SendEof);
        assert_eq!(r[0].ack_data().unwrap(), AckData::SendEof { page_count: 2 });
        let r = send(&mut d, &mut fl, &mut f, Command::RequestBlock { addr: START + 64 });
        assert_eq!(r[0].ack_data().unwrap(), AckData::RequestBlock { addr: START + 64, data: vec![1; 64] });
        let r = send(&mut d, &mut fl, &mut f, Command::RequestBlock { addr: START + 4096 });
        assert_eq!(r[0].ack_data().unwrap(), AckData::RequestBlock { addr: START + 4096, data: vec![0xff; 64] });
        assert_eq!(d.blocks_acked, 4);
    }

    #[test]
    fn retransmit_and_out_of_order() {
        let (mut d, mut fl) = device();
        let mut f = Faults::default();
        send(&mut d, &mut fl, &mut f, block(START, 1));
        // identical retransmit of a page's first block while the rest is erased: accepted,
        // no extra page count
        assert!(send(&mut d, &mut fl, &mut f, block(START, 1))[0].ack_data().is_ok());
        assert_eq!(d.page_write_count, 1);
        send(&mut d, &mut fl, &mut f, block(START + 64, 2));
        // identical retransmit inside the page: accepted
        assert!(send(&mut d, &mut fl, &mut f, block(START + 64, 2))[0].ack_data().is_ok());
        // different data over a written block inside the page: error (out of order)
        assert_eq!(send(&mut d, &mut fl, &mut f, block(START + 64, 3)), vec![Response::CommandError]);
        assert_eq!(d.page_write_count, 1);
        // the first block again once later blocks exist: the page is erased and counted
        // again (like the firmware), which also wipes the later blocks
        assert!(send(&mut d, &mut fl, &mut f, block(START, 9))[0].ack_data().is_ok());
        assert_eq!(d.page_write_count, 2);
        assert_eq!(fl.read(START, 2), vec![9, 9]);
        assert_eq!(fl.read(START + 64, 4), vec![0xff; 4]);
    }

    #[test]
    fn bad_writes() {
        let (mut d, mut fl) = device();
        let mut f = Faults::default();
        let err = vec![Response::CommandError];
        assert_eq!(send(&mut d, &mut fl, &mut f, block(START - 64, 1)), err);
        assert_eq!(send(&mut d, &mut fl, &mut f, block(START + 4, 1)), err);
        assert_eq!(send(&mut d, &mut fl, &mut f, block(0x0808_0000, 1)), err);
        let short = Command::SendBlock { addr: START, data: vec![0; 32] };
        assert_eq!(send(&mut d, &mut fl, &mut f, short), err);
        let no_addr = Frame::new(0x12, vec![]).unwrap().encode();
        assert_eq!(replies(d.feed(&no_addr, &mut fl, &mut f)), err);
        assert_eq!(send(&mut d, &mut fl, &mut f, Command::Unknown(0x90)), err);
        assert_eq!(send(&mut d, &mut fl, &mut f, Command::GetCanbusId), err);
        assert_eq!(d.blocks_acked, 0);
    }

    #[test]
    fn nack_once_until_valid_frame() {
        let (mut d, mut fl) = device();
        let mut f = Faults::default();
        let mut bad = Command::Connect.encode().unwrap();
        bad[4] ^= 1;
        let mut bytes = bad.clone();
        bytes.extend(&bad);
        bytes.extend([0x42, 0x43]);
        assert_eq!(replies(d.feed(&bytes, &mut fl, &mut f)), vec![Response::Nack]);
        let r = send(&mut d, &mut fl, &mut f, Command::Connect);
        assert_eq!(r.len(), 1);
        assert!(r[0].ack_data().is_ok());
        assert_eq!(replies(d.feed(&bad, &mut fl, &mut f)), vec![Response::Nack]);
        // Replies are well-formed frames the host decodes.
        let mut host = HostDecoder::new();
        let enc = Response::Nack.encode().unwrap();
        assert!(host.feed(&enc)[0].is_ok());
    }

    #[test]
    fn busy_fault() {
        let (mut d, mut fl) = device();
        let mut f = Faults::new(vec![Fault::Busy(2)]);
        assert_eq!(send(&mut d, &mut fl, &mut f, Command::Connect), vec![Response::Busy]);
        assert_eq!(send(&mut d, &mut fl, &mut f, Command::Connect), vec![Response::Busy]);
        assert!(send(&mut d, &mut fl, &mut f, Command::Connect)[0].ack_data().is_ok());
    }

    #[test]
    fn complete_event() {
        let (mut d, mut fl) = device();
        let mut f = Faults::default();
        let out = d.feed(&Command::Complete.encode().unwrap(), &mut fl, &mut f);
        assert_eq!(
            out,
            vec![
                KatapultOutput::Reply(Response::ack(&AckData::Complete)),
                KatapultOutput::Event(KatapultEvent::Complete)
            ]
        );
        assert!(d.completed);
    }

    #[test]
    fn flash_image_from() {
        let mut fl = FlashMemory::new(0x0800_0000, 512 * 1024, PageLayout::Stm32F4);
        assert!(fl.image_from(START).is_empty());
        fl.load(START, &[1, 2, 3, 0xff, 0xff, 5]);
        assert_eq!(fl.image_from(START), vec![1, 2, 3, 0xff, 0xff, 5]);
        fl.load(START, &[7]);
        assert_eq!(fl.image_from(START), vec![7]);
        fl.erase_all();
        assert_eq!(fl.read(START, 2), vec![0xff, 0xff]);
    }
}
