//! Simulated flash memory and the Katapult device state machine (pure, no I/O).
//!
//! Write semantics follow Katapult's flash drivers:
//! * stm32 `flash_write_block` (src/stm32/flash.c): blocks must be aligned and at or above
//!   the application start; the first block of a page erases the page (unless the page is
//!   already erased) and counts one page for SEND_EOF's answer; an identical retransmitted
//!   block is accepted; different data over a non-erased block is an error.
//! * rp2040 (src/rp2040/flash.c): blocks go into a 256-byte page buffer; a block outside
//!   the buffered page flushes it (erase the 4 KiB sector when the page starts one, then
//!   program 256 bytes, count one page); SEND_EOF flushes the last page and answers the
//!   count of 256-byte pages. No erase check, no retransmit check.
//!
//! Time is modelled, not spent: the device reports [`KatapultOutput::Work`] (how long the
//! MCU is busy erasing/programming before its next reply, from the family's datasheet
//! figures in `firmware.rs`); the server delays that reply accordingly.

use std::collections::BTreeMap;

use kflash::protocol::katapult::{
    AckData, Command, ConnectInfo, FrameDecoder, FrameError, Response, DEVICE_MAX_FRAME_LEN,
};

use std::time::Duration;

use crate::firmware::{FlashTiming, PageLayout, WriteRules};

/// Katapult rp2040: program page (the buffer) and erase sector.
pub const RP2040_PAGE: u32 = 256;
pub const RP2040_SECTOR: u32 = 4096;

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

    /// Erase `addr..addr+len` (whole layout pages are dropped, partial ones set to 0xFF).
    pub fn erase_range(&mut self, addr: u32, len: u32) {
        let end = addr as u64 + len as u64;
        let mut a = addr as u64;
        while a < end && a < self.end() {
            let start = self.layout.page_start(a as u32);
            let size = self.layout.page_size(a as u32) as u64;
            let page_end = start as u64 + size;
            if a == start as u64 && page_end <= end {
                self.pages.remove(&start);
            } else if let Some(p) = self.pages.get_mut(&start) {
                let from = (a - start as u64) as usize;
                let to = (end.min(page_end) - start as u64) as usize;
                p[from..to].fill(0xff);
            }
            a = page_end;
        }
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
    UnknownCommand {
        cmd: u8,
    },
}

/// Output of one feed: responses to send and events, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum KatapultOutput {
    Reply(Response),
    Event(KatapultEvent),
    /// The MCU erases / programs flash for this long before it sends its next reply.
    Work(Duration),
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
    rules: WriteRules,
    timing: FlashTiming,
    /// rp2040: the page buffer (start address, 256 bytes) not yet written to flash.
    buffer: Option<(u32, Vec<u8>)>,
    /// Stop processing once this many SEND_BLOCKs were acked (the cable is pulled right
    /// after that ack: later frames, even ones already received, are never processed).
    pub halt_after_blocks: Option<u32>,
    /// A CAN build answers GET_CANBUS_ID with its UUID; a USB build has none.
    pub canbus_uuid: Option<[u8; 6]>,
}

impl KatapultDevice {
    /// `info` is what CONNECT reports; its app_start is also enforced. `rules` picks the
    /// flash driver, `timing` the modelled erase / program times.
    pub fn new(info: ConnectInfo, rules: WriteRules, timing: FlashTiming) -> Self {
        KatapultDevice {
            decoder: FrameDecoder::with_max_len(DEVICE_MAX_FRAME_LEN),
            need_valid: false,
            app_start: info.app_start,
            info,
            page_write_count: 0,
            blocks_acked: 0,
            completed: false,
            rules,
            timing,
            buffer: None,
            halt_after_blocks: None,
            canbus_uuid: None,
        }
    }

    /// Feed received bytes; returns replies, events and modelled work in order.
    pub fn feed(&mut self, bytes: &[u8], flash: &mut FlashMemory) -> Vec<KatapultOutput> {
        let mut out = Vec::new();
        if self.halted() {
            return out;
        }
        self.decoder.push(bytes);
        while !self.halted() {
            let Some(item) = self.decoder.next_frame() else { break };
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

    /// True once `halt_after_blocks` SEND_BLOCKs were acked.
    pub fn halted(&self) -> bool {
        self.halt_after_blocks.is_some_and(|n| self.blocks_acked >= n)
    }

    fn dispatch(&mut self, cmd: Command, flash: &mut FlashMemory, out: &mut Vec<KatapultOutput>) {
        let bs = self.info.block_size;
        match cmd {
            Command::Connect => {
                out.push(KatapultOutput::Reply(Response::ack(&AckData::Connect(self.info.clone()))));
                out.push(KatapultOutput::Event(KatapultEvent::Connected));
            }
            Command::SendBlock { addr, data } => match self.write_block(addr, &data, flash) {
                Ok((erased_page, retransmit, work)) => {
                    self.blocks_acked += 1;
                    if !work.is_zero() {
                        out.push(KatapultOutput::Work(work));
                    }
                    out.push(KatapultOutput::Reply(Response::ack(&AckData::SendBlock { addr })));
                    out.push(KatapultOutput::Event(KatapultEvent::BlockWritten { addr, erased_page, retransmit }));
                }
                Err(reason) => {
                    out.push(KatapultOutput::Reply(Response::CommandError));
                    out.push(KatapultOutput::Event(KatapultEvent::BlockRejected { addr, reason }));
                }
            },
            Command::SendEof => {
                if self.rules == WriteRules::Rp2040 {
                    let (work, _) = self.flush_rp2040(flash);
                    if !work.is_zero() {
                        out.push(KatapultOutput::Work(work));
                    }
                }
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
            Command::GetCanbusId if self.canbus_uuid.is_some() => {
                let uuid = self.canbus_uuid.expect("checked");
                out.push(KatapultOutput::Reply(Response::ack(&AckData::CanbusId(uuid))));
            }
            // USB builds have no CAN id: command error, like any unknown command.
            Command::GetCanbusId | Command::Unknown(_) => {
                let cmd = Command::code(&cmd);
                out.push(KatapultOutput::Reply(Response::CommandError));
                out.push(KatapultOutput::Event(KatapultEvent::UnknownCommand { cmd }));
            }
        }
    }

    /// Returns (erased a page, was an identical retransmit, modelled flash time).
    fn write_block(
        &mut self,
        addr: u32,
        data: &[u8],
        flash: &mut FlashMemory,
    ) -> Result<(bool, bool, Duration), WriteError> {
        match self.rules {
            WriteRules::Stm32 => self.write_block_stm32(addr, data, flash),
            WriteRules::Rp2040 => self.write_block_rp2040(addr, data, flash),
        }
    }

    /// katapult src/flashcmd.c `command_write_block`: length, app start, alignment and flash
    /// bounds, the same for every family. Returns the block size.
    fn check_block(&self, addr: u32, data: &[u8], flash: &FlashMemory) -> Result<u32, WriteError> {
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
        Ok(bs)
    }

    /// katapult src/flashcmd.c `command_write_block` + src/rp2040/flash.c
    /// `flash_write_block`: length, app start, alignment and flash bounds are checked; the
    /// block lands in the page buffer, which is flushed first when the block lies outside it.
    fn write_block_rp2040(
        &mut self,
        addr: u32,
        data: &[u8],
        flash: &mut FlashMemory,
    ) -> Result<(bool, bool, Duration), WriteError> {
        let bs = self.check_block(addr, data, flash)?;
        let page = RP2040_PAGE.max(bs);
        let inside = matches!(&self.buffer, Some((start, _)) if addr >= *start && addr + bs <= *start + page);
        let (work, erased) = if inside { (Duration::ZERO, false) } else { self.flush_rp2040(flash) };
        let (start, buf) = self.buffer.get_or_insert_with(|| (addr - addr % page, vec![0xff; page as usize]));
        let off = (addr - *start) as usize;
        buf[off..off + data.len()].copy_from_slice(data);
        Ok((erased, false, work))
    }

    /// rp2040 `flush_buffer`: erase the 4 KiB sector when the buffered page starts one, then
    /// program the page. Returns the modelled time and whether a sector was erased.
    fn flush_rp2040(&mut self, flash: &mut FlashMemory) -> (Duration, bool) {
        let Some((start, buf)) = self.buffer.take() else {
            return (Duration::ZERO, false);
        };
        let mut work = Duration::ZERO;
        let erase = start % RP2040_SECTOR == 0;
        if erase {
            flash.erase_range(start, RP2040_SECTOR);
            work += self.timing.erase(RP2040_SECTOR);
        }
        flash.program(start, &buf);
        work += self.timing.program(buf.len() as u32);
        self.page_write_count += 1;
        (work, erase)
    }

    /// katapult src/stm32/flash.c `flash_write_block`.
    fn write_block_stm32(
        &mut self,
        addr: u32,
        data: &[u8],
        flash: &mut FlashMemory,
    ) -> Result<(bool, bool, Duration), WriteError> {
        let bs = self.check_block(addr, data, flash)?;
        let page_size = flash.layout.page_size(addr);
        let page = flash.layout.page_start(addr);
        let mut erase = false;
        if page == addr {
            if flash.is_erased(addr, page_size) {
                // already erased
            } else if flash.read(addr, bs as usize) == data && flash.is_erased(addr + bs, page_size - bs) {
                return Ok((false, true, Duration::ZERO));
            } else {
                erase = true;
            }
            self.page_write_count += 1;
        } else if !flash.is_erased(addr, bs) {
            if flash.read(addr, bs as usize) == data {
                return Ok((false, true, Duration::ZERO));
            }
            return Err(WriteError::NotErased);
        }
        let mut work = self.timing.program(bs);
        if erase {
            flash.erase_page(page);
            work += self.timing.erase(page_size);
        }
        flash.program(addr, data);
        Ok((erase, false, work))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firmware::profile_for;
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
        let p = profile_for("stm32f446xx").unwrap();
        (KatapultDevice::new(info, p.rules, p.timing), FlashMemory::new(0x0800_0000, 512 * 1024, PageLayout::Stm32F4))
    }

    fn send(dev: &mut KatapultDevice, flash: &mut FlashMemory, cmd: Command) -> Vec<Response> {
        replies(dev.feed(&cmd.encode().unwrap(), flash))
    }

    fn work(out: &[KatapultOutput]) -> Duration {
        out.iter()
            .map(|o| match o {
                KatapultOutput::Work(d) => *d,
                _ => Duration::ZERO,
            })
            .sum()
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
        let r = send(&mut d, &mut fl, Command::Connect);
        assert!(matches!(r[0].ack_data().unwrap(), AckData::Connect(ref i) if i.app_start == START));
        // Two pages: 0x08008000 (16K sector) and 0x0800C000.
        for i in 0..3u32 {
            let r = send(&mut d, &mut fl, block(START + i * 64, i as u8));
            assert_eq!(r, vec![Response::ack(&AckData::SendBlock { addr: START + i * 64 })]);
        }
        let r = send(&mut d, &mut fl, block(0x0800_C000, 7));
        assert_eq!(r[0].ack_data().unwrap(), AckData::SendBlock { addr: 0x0800_C000 });
        let r = send(&mut d, &mut fl, Command::SendEof);
        assert_eq!(r[0].ack_data().unwrap(), AckData::SendEof { page_count: 2 });
        let r = send(&mut d, &mut fl, Command::RequestBlock { addr: START + 64 });
        assert_eq!(r[0].ack_data().unwrap(), AckData::RequestBlock { addr: START + 64, data: vec![1; 64] });
        let r = send(&mut d, &mut fl, Command::RequestBlock { addr: START + 4096 });
        assert_eq!(r[0].ack_data().unwrap(), AckData::RequestBlock { addr: START + 4096, data: vec![0xff; 64] });
        assert_eq!(d.blocks_acked, 4);
    }

    #[test]
    fn retransmit_and_out_of_order() {
        let (mut d, mut fl) = device();
        send(&mut d, &mut fl, block(START, 1));
        // identical retransmit of a page's first block while the rest is erased: accepted,
        // no extra page count
        assert!(send(&mut d, &mut fl, block(START, 1))[0].ack_data().is_ok());
        assert_eq!(d.page_write_count, 1);
        send(&mut d, &mut fl, block(START + 64, 2));
        // identical retransmit inside the page: accepted
        assert!(send(&mut d, &mut fl, block(START + 64, 2))[0].ack_data().is_ok());
        // different data over a written block inside the page: error (out of order)
        assert_eq!(send(&mut d, &mut fl, block(START + 64, 3)), vec![Response::CommandError]);
        assert_eq!(d.page_write_count, 1);
        // the first block again once later blocks exist: the page is erased and counted
        // again (like the firmware), which also wipes the later blocks
        assert!(send(&mut d, &mut fl, block(START, 9))[0].ack_data().is_ok());
        assert_eq!(d.page_write_count, 2);
        assert_eq!(fl.read(START, 2), vec![9, 9]);
        assert_eq!(fl.read(START + 64, 4), vec![0xff; 4]);
    }

    #[test]
    fn bad_writes() {
        let (mut d, mut fl) = device();
        let err = vec![Response::CommandError];
        assert_eq!(send(&mut d, &mut fl, block(START - 64, 1)), err);
        assert_eq!(send(&mut d, &mut fl, block(START + 4, 1)), err);
        assert_eq!(send(&mut d, &mut fl, block(0x0808_0000, 1)), err);
        let short = Command::SendBlock { addr: START, data: vec![0; 32] };
        assert_eq!(send(&mut d, &mut fl, short), err);
        let no_addr = Frame::new(0x12, vec![]).unwrap().encode();
        assert_eq!(replies(d.feed(&no_addr, &mut fl)), err);
        assert_eq!(send(&mut d, &mut fl, Command::Unknown(0x90)), err);
        assert_eq!(send(&mut d, &mut fl, Command::GetCanbusId), err);
        assert_eq!(d.blocks_acked, 0);
    }

    #[test]
    fn nack_once_until_valid_frame() {
        let (mut d, mut fl) = device();
        let mut bad = Command::Connect.encode().unwrap();
        bad[4] ^= 1;
        let mut bytes = bad.clone();
        bytes.extend(&bad);
        bytes.extend([0x42, 0x43]);
        assert_eq!(replies(d.feed(&bytes, &mut fl)), vec![Response::Nack]);
        let r = send(&mut d, &mut fl, Command::Connect);
        assert_eq!(r.len(), 1);
        assert!(r[0].ack_data().is_ok());
        assert_eq!(replies(d.feed(&bad, &mut fl)), vec![Response::Nack]);
        // Replies are well-formed frames the host decodes.
        let mut host = HostDecoder::new();
        let enc = Response::Nack.encode().unwrap();
        assert!(host.feed(&enc)[0].is_ok());
    }

    #[test]
    fn complete_event() {
        let (mut d, mut fl) = device();
        let out = d.feed(&Command::Complete.encode().unwrap(), &mut fl);
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

    fn rp2040_device() -> (KatapultDevice, FlashMemory) {
        let p = profile_for("rp2040").unwrap();
        let info = ConnectInfo {
            proto_version: (1, 1, 0),
            app_start: 0x1000_4000,
            block_size: 64,
            mcu: "rp2040".into(),
            version: Some("v0.0.1-sim".into()),
        };
        (KatapultDevice::new(info, p.rules, p.timing), FlashMemory::new(p.flash_base, p.flash_size, p.pages))
    }

    fn feed(d: &mut KatapultDevice, fl: &mut FlashMemory, cmd: Command) -> Vec<KatapultOutput> {
        d.feed(&cmd.encode().unwrap(), fl)
    }

    /// Katapult's rp2040 driver counts 256-byte pages: a 44,096-byte image (689 blocks of
    /// 64 bytes) is 173 pages, not 11 sectors.
    #[test]
    fn rp2040_counts_256_byte_pages() {
        let (mut d, mut fl) = rp2040_device();
        let image: Vec<u8> = (0..44_096u32).map(|i| (i % 251) as u8).collect();
        let blocks = image.len().div_ceil(64);
        for (i, chunk) in image.chunks(64).enumerate() {
            let mut data = chunk.to_vec();
            data.resize(64, 0xff);
            let r = replies(feed(&mut d, &mut fl, Command::SendBlock { addr: 0x1000_4000 + 64 * i as u32, data }));
            assert!(r[0].ack_data().is_ok(), "block {i}");
        }
        assert_eq!(blocks, 689);
        let r = replies(feed(&mut d, &mut fl, Command::SendEof));
        assert_eq!(r[0].ack_data().unwrap(), AckData::SendEof { page_count: 173 });
        assert_eq!(fl.read(0x1000_4000, image.len()), image, "every page was flushed, the last at EOF");
    }

    /// Blocks are buffered: nothing reaches flash (and no time passes) until the page is
    /// left; the flush erases the 4 KiB sector only when the page starts one.
    #[test]
    fn rp2040_buffering_and_timing() {
        let (mut d, mut fl) = rp2040_device();
        fl.load(0x1000_4000, &[0u8; 8192]); // an old image everywhere
        let t = profile_for("rp2040").unwrap().timing;
        for i in 0..4u32 {
            let out = feed(&mut d, &mut fl, block(0x1000_4000 + 64 * i, 1));
            assert_eq!(work(&out), Duration::ZERO, "buffered");
        }
        assert_eq!(fl.read(0x1000_4000, 1), vec![0], "not written yet");
        // next page: the first (sector-starting) page is flushed: erase 45 ms + program 0.4 ms
        let out = feed(&mut d, &mut fl, block(0x1000_4100, 2));
        assert_eq!(work(&out), t.erase(4096) + t.program(256));
        assert_eq!(work(&out), Duration::from_micros(45_400));
        assert_eq!(fl.read(0x1000_4000, 1), vec![1]);
        assert_eq!(fl.read(0x1000_4200, 1), vec![0xff], "the rest of the sector was erased");
        // EOF flushes the second page: no erase (not a sector start)
        let out = feed(&mut d, &mut fl, Command::SendEof);
        assert_eq!(work(&out), Duration::from_micros(400));
        assert_eq!(replies(out)[0].ack_data().unwrap(), AckData::SendEof { page_count: 2 });
        assert_eq!(fl.read(0x1000_4100, 1), vec![2]);
        // below the app start / misaligned are still refused
        assert_eq!(replies(feed(&mut d, &mut fl, block(0x1000_3fc0, 1))), vec![Response::CommandError]);
        assert_eq!(replies(feed(&mut d, &mut fl, block(0x1000_4004, 1))), vec![Response::CommandError]);
    }

    /// stm32f4: the first block of a sector erases it (16 KiB: 250 ms), every block costs
    /// 16 words x 16 us; an already erased sector is not erased again.
    #[test]
    fn stm32_timing() {
        let (mut d, mut fl) = device();
        fl.load(START, &[0u8; 64]);
        let out = feed(&mut d, &mut fl, block(START, 1));
        assert_eq!(work(&out), Duration::from_micros(250_000 + 256));
        let out = feed(&mut d, &mut fl, block(START + 64, 1));
        assert_eq!(work(&out), Duration::from_micros(256));
        // 0x08010000 starts a 64 KiB sector, erased already: no erase time
        let out = feed(&mut d, &mut fl, block(0x0801_0000, 1));
        assert_eq!(work(&out), Duration::from_micros(256));
        // the Work comes before the ack it delays
        let out = feed(&mut d, &mut fl, block(0x0802_0000 - 64, 3));
        assert!(matches!(out[0], KatapultOutput::Work(_)) && matches!(out[1], KatapultOutput::Reply(_)));
        let t = profile_for("stm32f446xx").unwrap().timing;
        assert_eq!(t.erase(64 * 1024), Duration::from_millis(550));
        assert_eq!(t.erase(128 * 1024), Duration::from_secs(1));
        let h7 = profile_for("stm32h723xx").unwrap().timing;
        assert_eq!((h7.erase(128 * 1024), h7.program(64)), (Duration::from_secs(1), Duration::from_micros(100)));
        let g0 = profile_for("stm32g0b1xx").unwrap().timing;
        assert_eq!((g0.erase(2048), g0.program(64)), (Duration::from_millis(22), Duration::from_micros(680)));
        // a page size the table lacks (boards-file override) scales from the first entry
        assert_eq!(g0.erase(4096), Duration::from_millis(44));
    }

    /// drop-mid-transfer: exactly N blocks are acked, even when more frames arrive in the
    /// same read.
    #[test]
    fn halt_after_exactly_n_blocks() {
        let (mut d, mut fl) = device();
        d.halt_after_blocks = Some(3);
        let mut bytes = Vec::new();
        for i in 0..5u32 {
            bytes.extend(block(START + 64 * i, 1).encode().unwrap());
        }
        let r = replies(d.feed(&bytes[..bytes.len() / 2], &mut fl));
        let r2 = replies(d.feed(&bytes[bytes.len() / 2..], &mut fl));
        assert_eq!(r.len() + r2.len(), 3);
        assert_eq!(d.blocks_acked, 3);
        assert!(d.halted());
        assert_eq!(fl.read(START + 128, 1), vec![1]);
        assert_eq!(fl.read(START + 192, 1), vec![0xff], "block 4 never written");
        assert!(d.feed(&Command::Connect.encode().unwrap(), &mut fl).is_empty());
    }

    #[test]
    fn erase_range_partial() {
        let mut fl = FlashMemory::new(0x0800_0000, 64 * 1024, PageLayout::Uniform(2048));
        fl.load(0x0800_0000, &[0u8; 4096]);
        fl.erase_range(0x0800_0100, 2048);
        assert_eq!(fl.read(0x0800_00ff, 2), vec![0, 0xff]);
        assert_eq!(fl.read(0x0800_08ff, 2), vec![0xff, 0]);
    }
}
