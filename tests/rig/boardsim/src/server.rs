//! `kflash-boardsim serve`: all boards in one process, one event loop.
//!
//! Inputs arrive as [`Msg`]s on one channel: control requests from the unix socket, bytes
//! from each board's gadget tty, CDC control requests seen by usbmon, and timers (the
//! modelled reboot / jump delays). Every timer and tty session carries the board's
//! generation number, which increments at every disconnect, so stale ones are ignored.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kflash::protocol::katapult::{ConnectInfo, Response as KResponse, CMD_SEND_BLOCK, PROTO_VERSION_1_1_0};
use kflash::protocol::klipper::DataDictionary;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::config::{BoardConfig, Mode};
use crate::ctl::{self, Request, Response};
use crate::dfu::{DfuSeDevice, RomDfu};
use crate::events::EventLog;
use crate::faults::{Fault, Faults};
use crate::firmware::{dictionary_json, standin_image, AppCheck};
use crate::flash::{FlashMemory, KatapultDevice, KatapultEvent, KatapultOutput};
use crate::gadget::{self, Function, Gadget, UsbIdentity};
use crate::gadgetfs;
use crate::klipperdev::{KlipperDevice, KlipperEvent};
use crate::say;
use crate::tty::{open_raw, SessionEvent, Tty, TtySession};
use crate::usbmon::{parse_line, ControlSetup, LineEvent, LineState};

/// gadgetfs mount point inside the state directory.
const GADGETFS_DIR: &str = "gadgetfs";

/// Where a reboot goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootTarget {
    /// Power-on: the application if it is valid, else Katapult.
    Normal,
    /// Bootloader request: Katapult.
    Katapult,
    /// Katapult's jump after COMPLETE.
    App,
    /// ROM bootloader.
    Dfu,
}

impl BootTarget {
    fn from_mode(m: Option<Mode>) -> BootTarget {
        match m {
            None | Some(Mode::Klipper) => BootTarget::Normal,
            Some(Mode::Katapult) => BootTarget::Katapult,
            Some(Mode::Dfu) => BootTarget::Dfu,
        }
    }
    fn as_str(&self) -> &'static str {
        match self {
            BootTarget::Normal => "application",
            BootTarget::Katapult => "katapult",
            BootTarget::App => "application (after COMPLETE)",
            BootTarget::Dfu => "rom-bootloader",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub enum TimerKind {
    Boot(BootTarget),
    Jump,
    ReopenTty(u32),
    DropCable,
}

pub enum Msg {
    Ctl(Request, oneshot::Sender<Response>),
    Tty { board: usize, gen: u64, ev: SessionEvent },
    Usbmon { board: usize, setup: ControlSetup },
    UsbmonDied { board: usize, error: String },
    Timer { board: usize, gen: u64, kind: TimerKind },
    // What the ROM DFU device did with a request (from its gadgetfs thread).
    Dfu { board: usize, gen: u64, note: String },
    Views(oneshot::Sender<Vec<ReadyView>>),
}

/// What wait-ready needs to know about a board.
#[derive(Debug, Clone)]
pub struct ReadyView {
    name: String,
    udc_index: usize,
    bus: u32,
    bound: bool,
    pending: bool,
    identity: Option<UsbIdentity>,
}

impl ReadyView {
    /// `None` when the host side matches the board's state.
    fn not_ready(&self) -> Option<String> {
        if self.pending {
            return Some("rebooting".into());
        }
        let hv = gadget::host_view(self.udc_index, self.bus);
        if !self.bound {
            return hv.present.then(|| "unplugged, but the host still sees a device".into());
        }
        let Some(id) = &self.identity else {
            return Some("no identity".into());
        };
        if !hv.present {
            return Some("not enumerated by the host yet".into());
        }
        if hv.vid_pid.as_deref() != Some(id.vid_pid().as_str()) {
            return Some(format!("host sees {} instead of {}", hv.vid_pid.as_deref().unwrap_or("?"), id.vid_pid()));
        }
        if id.function == Function::Acm {
            let Some(tty) = &hv.tty else {
                return Some("no host tty yet".into());
            };
            if !hv.dev_node {
                return Some(format!("/dev/{tty} does not exist yet"));
            }
            if hv.by_id.is_none() {
                return Some(format!("no /dev/serial/by-id link to /dev/{tty} yet"));
            }
        }
        None
    }
}

#[derive(Debug, Serialize)]
struct BoardStatus {
    name: String,
    mode: &'static str,
    plugged: bool,
    rebooting_to: Option<&'static str>,
    mcu: String,
    serial: String,
    usb: Option<String>,
    manufacturer: Option<String>,
    product: Option<String>,
    version: Option<String>,
    app: Option<String>,
    app_start: String,
    katapult_version: String,
    blocks_written: u32,
    flashes: u32,
    faults: Vec<String>,
    /// The Klipper firmware is in its shutdown state (until the board reboots).
    shutdown: bool,
    udc: String,
    bus: u32,
    board_tty: String,
    host_tty: Option<String>,
    by_id: Option<String>,
}

struct Board {
    cfg: BoardConfig,
    gadget: Gadget,
    bus: u32,
    plugged: bool,
    /// Valid while the gadget is bound.
    mode: Mode,
    pending: Option<BootTarget>,
    gen: u64,
    flash: FlashMemory,
    installed: Option<AppCheck>,
    /// Dictionary of the running application (Klipper mode).
    running: Option<DataDictionary>,
    faults: Faults,
    line: LineState,
    klipper: Option<KlipperDevice>,
    /// When the running Klipper firmware booted (its model clock starts there).
    klipper_boot: Instant,
    katapult: Option<KatapultDevice>,
    session: Option<TtySession>,
    blocks_session: u32,
    flashes: u32,
    dirty: bool,
}

impl Board {
    /// The application start Katapult reports and enforces (`wrong-app-start` changes it;
    /// the application itself is always looked for at `cfg.app_start`).
    fn katapult_app_start(&self) -> u32 {
        self.faults.wrong_app_start().unwrap_or(self.cfg.app_start)
    }

    fn installed(&mut self) -> &AppCheck {
        if self.installed.is_none() {
            let start = self.cfg.app_start;
            self.installed = Some(AppCheck::inspect(&self.flash.image_from(start)));
        }
        self.installed.as_ref().expect("just set")
    }

    fn katapult_info(&self) -> ConnectInfo {
        let (a, b, c) =
            ((PROTO_VERSION_1_1_0 >> 16) as u8, (PROTO_VERSION_1_1_0 >> 8) as u8, PROTO_VERSION_1_1_0 as u8);
        ConnectInfo {
            proto_version: (a, b, c),
            app_start: self.katapult_app_start(),
            block_size: 64,
            mcu: self.faults.wrong_mcu().unwrap_or(&self.cfg.mcu).to_string(),
            version: Some(self.cfg.katapult_version.clone()),
        }
    }

    fn identity(&self, mode: Mode) -> UsbIdentity {
        match mode {
            Mode::Klipper => UsbIdentity {
                vid: 0x1d50,
                pid: 0x614e,
                device_class: 0x02,
                manufacturer: "Klipper".into(),
                product: self
                    .running
                    .as_ref()
                    .map(|d| d.mcu.clone())
                    .filter(|m| !m.is_empty())
                    .unwrap_or_else(|| self.cfg.mcu.clone()),
                serial: self.cfg.serial.clone(),
                function: Function::Acm,
            },
            Mode::Katapult => UsbIdentity {
                vid: 0x1d50,
                pid: 0x6177,
                device_class: 0x02,
                manufacturer: "katapult".into(),
                // Katapult's USB product string is its CONFIG_MCU, like CONNECT's answer:
                // a bootloader built for another MCU shows that MCU in both.
                product: self.faults.wrong_mcu().unwrap_or(&self.cfg.mcu).to_string(),
                serial: self.cfg.katapult_serial.clone(),
                function: Function::Acm,
            },
            Mode::Dfu => {
                let (vid, pid, man, prod) = self.cfg.profile.rom_usb;
                // A real DFU interface where gadgetfs can show one (STM32), else SourceSink.
                let dfu = self.rom_dfu().is_some() && gadgetfs::available();
                UsbIdentity {
                    vid,
                    pid,
                    device_class: 0x00,
                    manufacturer: man.into(),
                    product: prod.into(),
                    serial: self.rom_serial(),
                    function: if dfu { Function::RomDfu } else { Function::SourceSink },
                }
            }
        }
    }
}

impl Board {
    /// The ROM bootloader's serial number (12 characters, like the chip-UID one of a real ROM).
    fn rom_serial(&self) -> String {
        self.cfg.serial.chars().take(12).collect()
    }

    /// The ROM's DFU descriptors, for MCUs whose ROM bootloader is USB DFU.
    fn rom_dfu(&self) -> Option<RomDfu> {
        RomDfu::stm32(&self.cfg.mcu, &self.cfg.profile, &self.rom_serial())
    }
}

/// The flash a board starts with.
fn initial_flash(cfg: &BoardConfig) -> Result<FlashMemory> {
    let p = &cfg.profile;
    let mut flash = FlashMemory::new(p.flash_base, p.flash_size, p.pages);
    if cfg.empty_flash {
        return Ok(flash);
    }
    let image = match &cfg.image {
        Some(path) => std::fs::read(path)
            .with_context(|| format!("board '{}': cannot read image {}", cfg.name, path.display()))?,
        None => {
            standin_image(cfg.app_start, p.initial_sp, &dictionary_json(&cfg.app, &cfg.version, &cfg.mcu, p.clock_freq))
        }
    };
    flash.load(cfg.app_start, &image);
    Ok(flash)
}

fn crc32(data: &[u8]) -> u32 {
    crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC).checksum(data)
}

pub struct Sim {
    boards: Vec<Board>,
    log: EventLog,
    tx: mpsc::UnboundedSender<Msg>,
    state_dir: PathBuf,
}

impl Sim {
    fn find(&self, name: &str) -> Result<usize, Response> {
        self.boards.iter().position(|b| b.cfg.name == name).ok_or_else(|| {
            let names: Vec<&str> = self.boards.iter().map(|b| b.cfg.name.as_str()).collect();
            Response::err(format!("no board named '{name}' (boards: {})", names.join(", ")))
        })
    }

    fn timer(&self, board: usize, delay: Duration, kind: TimerKind) {
        let tx = self.tx.clone();
        let gen = self.boards[board].gen;
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(Msg::Timer { board, gen, kind });
        });
    }

    fn name(&self, i: usize) -> String {
        self.boards[i].cfg.name.clone()
    }

    /// Which mode a boot ends in.
    fn resolve(&mut self, i: usize, target: BootTarget) -> Mode {
        let b = &mut self.boards[i];
        match target {
            BootTarget::Katapult => Mode::Katapult,
            BootTarget::Dfu => Mode::Dfu,
            BootTarget::App if b.faults.return_katapult() => Mode::Katapult,
            BootTarget::Normal | BootTarget::App => {
                if b.installed().is_klipper() {
                    Mode::Klipper
                } else {
                    Mode::Katapult
                }
            }
        }
    }

    /// Bind the gadget in `mode` and start talking on its tty.
    fn power_up(&mut self, i: usize, mode: Mode, reason: &str) {
        let name = self.name(i);
        let b = &mut self.boards[i];
        b.running = None;
        b.klipper = None;
        b.katapult = None;
        match mode {
            Mode::Klipper => {
                if let AppCheck::Klipper { dictionary, compressed } = b.installed().clone() {
                    b.klipper = Some(KlipperDevice::new(compressed));
                    b.klipper_boot = Instant::now();
                    b.running = Some(dictionary);
                }
            }
            Mode::Katapult => {
                let (rules, timing) = (b.cfg.profile.rules, b.cfg.profile.timing);
                b.katapult = Some(KatapultDevice::new(b.katapult_info(), rules, timing));
                b.blocks_session = 0;
            }
            Mode::Dfu => {}
        }
        let id = b.identity(mode);
        b.line = LineState::default();
        b.mode = mode;
        if id.function == Function::RomDfu {
            let desc = b.rom_dfu().expect("RomDfu only for MCUs with a DFU ROM");
            let (tx, gen) = (self.tx.clone(), b.gen);
            let notify = Box::new(move |note: String| {
                let _ = tx.send(Msg::Dfu { board: i, gen, note });
            });
            b.gadget.prepare_rom_dfu(DfuSeDevice::new(desc, b.flash.clone()), notify);
        }
        match b.gadget.set_identity(&id).and_then(|_| b.gadget.bind()) {
            Ok(None) => {}
            Ok(Some(e)) => {
                say!("{name}: ROM DFU through gadgetfs failed, SourceSink instead: {e:#}");
                self.log.log(Some(&name), "error", json!({"what": "rom-dfu", "error": format!("{e:#}")}));
            }
            Err(e) => {
                say!("{name}: cannot enumerate as {}: {e:#}", mode.as_str());
                self.log.log(Some(&name), "error", json!({"what": "bind", "error": format!("{e:#}")}));
                return;
            }
        }
        let b = &mut self.boards[i];
        let function = match b.gadget.function() {
            Function::Acm => "acm",
            Function::SourceSink => "sourcesink",
            Function::RomDfu => "dfu",
        };
        self.log.log(
            Some(&name),
            "connect",
            json!({
                "mode": mode.as_str(),
                "reason": reason,
                "usb": id.vid_pid(),
                "manufacturer": id.manufacturer,
                "product": id.product,
                "serial": id.serial,
                "function": function,
                "by_id": id.by_id_name().filter(|_| b.gadget.function() == Function::Acm),
                "version": b.running.as_ref().map(|d| d.version.clone()),
                "bind_mono": b.gadget.bound_at,
            }),
        );
        if b.gadget.function() == Function::Acm {
            self.open_session(i, 0);
        }
    }

    fn open_session(&mut self, i: usize, attempt: u32) {
        let b = &mut self.boards[i];
        b.session = None;
        let gen = b.gen;
        let tx = self.tx.clone();
        let opened = open_raw(&b.gadget.tty, None).and_then(Tty::new);
        match opened {
            Ok(tty) => {
                b.session = Some(TtySession::start(tty, move |ev| {
                    let _ = tx.send(Msg::Tty { board: i, gen, ev });
                }));
            }
            Err(e) => {
                say!("{}: cannot open {}: {e} (attempt {attempt})", b.cfg.name, b.gadget.tty.display());
                if attempt < 40 {
                    self.timer(i, Duration::from_millis(50), TimerKind::ReopenTty(attempt + 1));
                }
            }
        }
    }

    /// Unbind (USB disconnect) and forget the running firmware state.
    fn power_down(&mut self, i: usize, reason: &str) {
        let name = self.name(i);
        let b = &mut self.boards[i];
        // The noisy Katapult link goes with the Katapult session.
        if b.katapult.is_some() {
            if let Some(left) = b.faults.end_katapult_session() {
                self.log.log(
                    Some(&name),
                    "fault",
                    json!({"action": "clear", "fault": left, "note": "the board left Katapult"}),
                );
            }
        }
        b.session = None;
        b.klipper = None;
        b.katapult = None;
        b.running = None;
        b.gen += 1;
        b.dirty = true;
        if b.gadget.bound {
            if let Err(e) = b.gadget.unbind() {
                say!("{name}: unbind failed: {e:#}");
            }
            self.log.log(Some(&name), "disconnect", json!({"reason": reason}));
        }
    }

    /// Disconnect now and come back as `target` after the modelled delay.
    fn reboot(&mut self, i: usize, target: BootTarget, reason: &str) {
        self.power_down(i, reason);
        let name = self.name(i);
        let b = &mut self.boards[i];
        b.pending = None;
        if b.faults.no_return() {
            b.plugged = false;
            self.log.log(
                Some(&name),
                "fault",
                json!({"action": "fired", "fault": "no-return", "note": "board stays absent until `plug`"}),
            );
            return;
        }
        let delay = match b.faults.slow_return() {
            Some(s) => Duration::from_secs_f64(s),
            None => Duration::from_millis(b.cfg.timings.reboot_delay_ms),
        };
        b.pending = Some(target);
        self.log.log(
            Some(&name),
            "reboot",
            json!({"to": target.as_str(), "reason": reason, "delay_ms": delay.as_millis() as u64}),
        );
        self.timer(i, delay, TimerKind::Boot(target));
    }

    fn handle_timer(&mut self, i: usize, gen: u64, kind: TimerKind) {
        if self.boards[i].gen != gen {
            return;
        }
        match kind {
            TimerKind::Boot(target) => {
                self.boards[i].pending = None;
                let mode = self.resolve(i, target);
                self.power_up(i, mode, &format!("boot to {}", target.as_str()));
            }
            TimerKind::ReopenTty(attempt) => {
                if self.boards[i].gadget.bound && self.boards[i].session.is_none() {
                    self.open_session(i, attempt);
                }
            }
            TimerKind::Jump => self.jump(i),
            TimerKind::DropCable => {
                let name = self.name(i);
                self.power_down(i, "cable pulled (drop-mid-transfer)");
                self.boards[i].plugged = false;
                self.boards[i].pending = None;
                self.log.log(Some(&name), "unplug", json!({"reason": "fault drop-mid-transfer"}));
            }
        }
    }

    /// Katapult's application jump, complete_delay after COMPLETE.
    fn jump(&mut self, i: usize) {
        let name = self.name(i);
        let b = &mut self.boards[i];
        let start = b.cfg.app_start;
        let image = b.flash.image_from(start);
        let check = b.installed().clone();
        let (result, dict) = match &check {
            AppCheck::Klipper { dictionary, .. } => ("klipper", Some(dictionary)),
            AppCheck::NoDictionary => ("bricked (no data dictionary in the image)", None),
            AppCheck::NoApplication => ("no application (word 0 is 0 or 0xffffffff)", None),
        };
        b.flashes += 1;
        self.log.log(
            Some(&name),
            "flash-complete",
            json!({
                "blocks": b.blocks_session,
                "image_bytes": image.len(),
                "image_crc32": format!("{:08x}", crc32(&image)),
                "result": result,
                "version": dict.map(|d| d.version.clone()),
                "app": dict.and_then(|d| d.app.clone()),
                "mcu": dict.map(|d| d.mcu.clone()),
            }),
        );
        self.reboot(i, BootTarget::App, "katapult COMPLETE");
    }

    /// Write a response; `katapult` ones may be hit by `corrupt-crc` (the noisy Katapult link).
    fn send(&mut self, i: usize, mut bytes: Vec<u8>, katapult: bool, delay: Duration) {
        let b = &mut self.boards[i];
        let crc_pos_from_end = 4; // Katapult frame: ... crc16 (2) + 0x7e 0x03
        if katapult && bytes.len() >= crc_pos_from_end && b.faults.take_corrupt_crc() {
            let n = bytes.len();
            bytes[n - crc_pos_from_end] ^= 0xff;
            say!("{}: corrupting the CRC of a response (fault corrupt-crc)", b.cfg.name);
        }
        if let Some(s) = &b.session {
            s.send(bytes, delay);
        }
    }

    fn handle_tty(&mut self, i: usize, gen: u64, ev: SessionEvent) {
        if self.boards[i].gen != gen {
            return;
        }
        let name = self.name(i);
        match ev {
            SessionEvent::Closed(why) => {
                let b = &mut self.boards[i];
                b.session = None;
                if b.gadget.bound {
                    say!("{name}: board tty closed while bound ({why}); reopening");
                    self.timer(i, Duration::from_millis(50), TimerKind::ReopenTty(1));
                }
            }
            SessionEvent::Data(data) => match self.boards[i].mode {
                Mode::Klipper => self.klipper_data(i, &data),
                Mode::Katapult => self.katapult_data(i, &data),
                Mode::Dfu => {}
            },
        }
    }

    fn klipper_data(&mut self, i: usize, data: &[u8]) {
        let name = self.name(i);
        let since_boot = self.boards[i].klipper_boot.elapsed();
        if self.boards[i].faults.mute() {
            // A hung firmware: the bytes sit unread, nothing is acked or answered.
            return;
        }
        let Some(dev) = self.boards[i].klipper.as_mut() else {
            return;
        };
        let (blocks, events) = dev.feed(data, since_boot);
        for blk in blocks {
            self.send(i, blk.encode(), false, Duration::ZERO);
        }
        for ev in events {
            match ev {
                KlipperEvent::Reset => {
                    say!("{name}: klipper: reset command");
                    self.reboot(i, BootTarget::Normal, "klipper reset command");
                    return;
                }
                KlipperEvent::IdentifyDone { size } => {
                    let d = self.boards[i].running.as_ref();
                    self.log.log(
                        Some(&name),
                        "identify",
                        json!({
                            "bytes": size,
                            "version": d.map(|d| d.version.clone()),
                            "app": d.and_then(|d| d.app.clone()),
                            "mcu": d.map(|d| d.mcu.clone()),
                        }),
                    );
                }
                KlipperEvent::Identify { .. } => {}
                KlipperEvent::Configured { oids, crc } => {
                    self.log.log(Some(&name), "configured", json!({"oids": oids, "crc": crc}));
                }
                KlipperEvent::Shutdown { reason } => {
                    // A real board stays shut down until it reboots: `reset` must re-power it.
                    self.boards[i].dirty = true;
                    self.log.log(Some(&name), "shutdown", json!({"reason": reason}));
                }
                other => say!("{name}: klipper: {other:?}"),
            }
        }
    }

    fn katapult_data(&mut self, i: usize, data: &[u8]) {
        let name = self.name(i);
        let b = &mut self.boards[i];
        let Some(dev) = b.katapult.as_mut() else {
            return;
        };
        if let Some(n) = b.faults.drop_after() {
            dev.halt_after_blocks = Some(n);
        }
        let out = dev.feed(data, &mut b.flash);
        let latency = Duration::from_millis(b.cfg.timings.block_latency_ms);
        let scale = b.cfg.timings.flash_time_scale * b.faults.flash_slowdown();
        // Modelled erase/program time since the last reply: the next reply waits for it.
        let mut work = Duration::ZERO;
        let mut last_delay = Duration::ZERO;
        for o in out {
            match o {
                KatapultOutput::Work(d) => work += d.mul_f64(scale),
                KatapultOutput::Reply(r) => {
                    let mut delay = std::mem::take(&mut work);
                    if matches!(&r, KResponse::Ack { cmd, .. } if *cmd == CMD_SEND_BLOCK) {
                        delay += latency;
                    }
                    last_delay = delay;
                    let bytes = r.encode().expect("device responses always encode");
                    self.send(i, bytes, true, delay);
                }
                KatapultOutput::Event(ev) => self.katapult_event(i, &name, ev),
            }
        }
        // drop-mid-transfer: the device stopped right after the Nth ack.
        let b = &mut self.boards[i];
        let acked = b.katapult.as_ref().map_or(0, |k| k.blocks_acked);
        if let Some(n) = b.faults.drop_after().filter(|n| acked >= *n) {
            b.faults.consume("drop-mid-transfer");
            self.log.log(
                Some(&name),
                "fault",
                json!({"action": "fired", "fault": format!("drop-mid-transfer={n}"), "blocks": acked}),
            );
            // Let the Nth ack go out (after its modelled flash time), then pull the cable.
            self.timer(i, last_delay + Duration::from_millis(20), TimerKind::DropCable);
        }
    }

    fn katapult_event(&mut self, i: usize, name: &str, ev: KatapultEvent) {
        let b = &mut self.boards[i];
        match ev {
            KatapultEvent::Connected => {
                let info = b.katapult.as_ref().map(|k| k.info.clone());
                self.log.log(
                    Some(name),
                    "katapult-connect",
                    json!({
                        "mcu": info.as_ref().map(|i| i.mcu.clone()),
                        "app_start": info.as_ref().map(|i| format!("{:#x}", i.app_start)),
                    }),
                );
            }
            KatapultEvent::BlockWritten { addr, retransmit, .. } => {
                b.installed = None;
                b.dirty = true;
                b.blocks_session += 1;
                if b.blocks_session == 1 {
                    self.log.log(Some(name), "flash-start", json!({"addr": format!("{addr:#x}")}));
                }
                if retransmit {
                    say!("{name}: identical retransmit of block {addr:#x} accepted");
                }
            }
            KatapultEvent::BlockRejected { addr, reason } => {
                self.log.log(
                    Some(name),
                    "block-rejected",
                    json!({"addr": format!("{addr:#x}"), "reason": format!("{reason:?}")}),
                );
            }
            KatapultEvent::Eof { pages } => {
                // rp2040 writes its last buffered page at EOF.
                b.installed = None;
                let blocks = b.blocks_session;
                self.log.log(Some(name), "flash-eof", json!({"pages": pages, "blocks": blocks}));
            }
            KatapultEvent::Complete => {
                let delay = Duration::from_millis(b.cfg.timings.complete_delay_ms);
                self.log.log(Some(name), "complete", json!({"jump_in_ms": delay.as_millis() as u64}));
                self.timer(i, delay, TimerKind::Jump);
            }
            KatapultEvent::FramingError { error, nacked } => {
                say!(
                    "{name}: katapult framing error: {error} ({})",
                    if nacked { "NACK sent" } else { "no NACK: already sent" }
                );
            }
            KatapultEvent::UnknownCommand { cmd } => {
                say!("{name}: command {cmd:#04x} -> command error")
            }
        }
    }

    fn handle_usbmon(&mut self, i: usize, setup: ControlSetup) {
        let name = self.name(i);
        let b = &mut self.boards[i];
        if !b.gadget.bound || b.mode != Mode::Klipper || b.pending.is_some() {
            return;
        }
        let Some((ev, request)) = b.line.newly_requesting(&setup) else {
            return;
        };
        match ev {
            LineEvent::Baud(baud) => say!("{name}: host set {baud} baud"),
            LineEvent::ControlLines { dtr, rts } => say!("{name}: host set DTR={dtr} RTS={rts}"),
        }
        if !request {
            return;
        }
        let action = if b.faults.mute() {
            "unseen (fault mute: the firmware hangs)"
        } else if b.faults.ignore_touch() {
            "ignored (fault ignore-touch)"
        } else if b.faults.rom_dfu() {
            "reboot to rom-bootloader (fault rom-dfu)"
        } else {
            "reboot to katapult"
        };
        self.log.log(Some(&name), "touch", json!({"baud": 1200, "dtr": false, "action": action}));
        if b.faults.ignore_touch() || b.faults.mute() {
            return;
        }
        let target = if b.faults.rom_dfu() { BootTarget::Dfu } else { BootTarget::Katapult };
        self.reboot(i, target, "1200-baud bootloader request");
    }

    fn status(&mut self, i: usize) -> BoardStatus {
        let b = &mut self.boards[i];
        let hv = gadget::host_view(b.cfg.udc, b.bus);
        let installed = b.installed().clone();
        let (version, app) = match (&b.running, &installed) {
            (Some(d), _) => (Some(d.version.clone()), d.app.clone()),
            (None, AppCheck::Klipper { dictionary, .. }) => (Some(dictionary.version.clone()), dictionary.app.clone()),
            _ => (None, None),
        };
        let id = b.gadget.bound.then(|| b.identity(b.mode));
        BoardStatus {
            name: b.cfg.name.clone(),
            mode: if b.gadget.bound { b.mode.as_str() } else { "absent" },
            plugged: b.plugged,
            rebooting_to: b.pending.map(|t| t.as_str()),
            mcu: b.cfg.mcu.clone(),
            serial: b.cfg.serial.clone(),
            usb: id.as_ref().map(|i| i.vid_pid()),
            manufacturer: id.as_ref().map(|i| i.manufacturer.clone()),
            product: id.as_ref().map(|i| i.product.clone()),
            version,
            app,
            app_start: format!("{:#x}", b.cfg.app_start),
            katapult_version: b.cfg.katapult_version.clone(),
            blocks_written: b.blocks_session,
            flashes: b.flashes,
            faults: b.faults.specs(),
            shutdown: b.gadget.bound && b.mode == Mode::Klipper && b.klipper.as_ref().is_some_and(|k| k.is_shutdown()),
            udc: b.gadget.udc.clone(),
            bus: b.bus,
            board_tty: b.gadget.tty.display().to_string(),
            host_tty: hv.tty.map(|t| format!("/dev/{t}")),
            by_id: hv.by_id,
        }
    }

    fn views(&self) -> Vec<ReadyView> {
        self.boards
            .iter()
            .map(|b| ReadyView {
                name: b.cfg.name.clone(),
                udc_index: b.cfg.udc,
                bus: b.bus,
                bound: b.gadget.bound,
                pending: b.pending.is_some(),
                identity: b.gadget.identity().cloned(),
            })
            .collect()
    }

    /// Put a board back into its boards-file state.
    fn reset_board(&mut self, i: usize) -> Result<()> {
        let b = &mut self.boards[i];
        b.faults = Faults::new(b.cfg.faults.clone());
        let untouched = !b.dirty && b.pending.is_none() && b.plugged == b.cfg.plugged;
        b.flashes = 0;
        b.blocks_session = 0;
        if untouched {
            return Ok(());
        }
        let flash = initial_flash(&b.cfg)?;
        self.power_down(i, "reset");
        let b = &mut self.boards[i];
        b.pending = None;
        b.flash = flash;
        b.installed = None;
        b.plugged = b.cfg.plugged;
        if b.plugged {
            let target = BootTarget::from_mode(Some(b.cfg.mode));
            let mode = self.resolve(i, target);
            self.power_up(i, mode, "reset");
        }
        self.boards[i].dirty = false;
        Ok(())
    }

    /// Handle a control request; `None` when a spawned task answers later.
    fn handle_ctl(&mut self, req: Request, reply: oneshot::Sender<Response>) {
        let resp = match self.ctl(req, reply) {
            Some((resp, reply)) => (resp, reply),
            None => return,
        };
        let _ = resp.1.send(resp.0);
    }

    fn ctl(&mut self, req: Request, reply: oneshot::Sender<Response>) -> Option<(Response, oneshot::Sender<Response>)> {
        macro_rules! board {
            ($name:expr) => {
                match self.find(&$name) {
                    Ok(i) => i,
                    Err(e) => return Some((e, reply)),
                }
            };
        }
        let resp = match req {
            Request::WaitReady { timeout_ms } => {
                self.spawn_wait(reply, timeout_ms, Value::Null);
                return None;
            }
            Request::Status { board } => {
                let idx: Vec<usize> = match board {
                    Some(n) => vec![board!(n)],
                    None => (0..self.boards.len()).collect(),
                };
                let list: Vec<Value> =
                    idx.into_iter().map(|i| serde_json::to_value(self.status(i)).expect("status serializes")).collect();
                Response::ok(Value::Array(list))
            }
            Request::Plug { board, mode } => {
                let i = board!(board);
                let name = self.name(i);
                if self.boards[i].plugged {
                    Response::err(format!("board '{name}' is already plugged in (unplug it first)"))
                } else {
                    self.boards[i].plugged = true;
                    self.boards[i].dirty = true;
                    self.log.log(Some(&name), "plug", json!({"mode": mode.map(|m| m.as_str())}));
                    let target = BootTarget::from_mode(mode);
                    let m = self.resolve(i, target);
                    self.power_up(i, m, "plugged in");
                    Response::ok(json!({"mode": m.as_str()}))
                }
            }
            Request::Unplug { board } => {
                let i = board!(board);
                let name = self.name(i);
                if !self.boards[i].plugged {
                    Response::err(format!("board '{name}' is already unplugged"))
                } else {
                    self.power_down(i, "unplugged");
                    self.boards[i].plugged = false;
                    self.boards[i].pending = None;
                    self.log.log(Some(&name), "unplug", json!({"reason": "ctl"}));
                    Response::ok(Value::Null)
                }
            }
            Request::Reboot { board, mode } => {
                let i = board!(board);
                let name = self.name(i);
                if !self.boards[i].plugged {
                    Response::err(format!("board '{name}' is unplugged (plug it first)"))
                } else {
                    self.reboot(i, BootTarget::from_mode(mode), "ctl reboot");
                    Response::ok(Value::Null)
                }
            }
            Request::Fault { board, specs } => {
                let i = board!(board);
                let name = self.name(i);
                if specs.is_empty() {
                    return Some((Response::err("give a fault spec or 'clear'"), reply));
                }
                if specs.len() == 1 && specs[0] == "clear" {
                    self.boards[i].faults.clear();
                    self.log.log(Some(&name), "fault", json!({"action": "clear"}));
                } else {
                    let parsed: Result<Vec<Fault>, String> = specs.iter().map(|s| Fault::parse(s)).collect();
                    match parsed {
                        Err(e) => return Some((Response::err(e), reply)),
                        Ok(list) => {
                            for f in list {
                                self.log.log(Some(&name), "fault", json!({"action": "set", "fault": f.to_string()}));
                                self.boards[i].faults.set(f);
                            }
                        }
                    }
                }
                // Faults that shape the bootloader apply to a running Katapult at once.
                let b = &mut self.boards[i];
                b.installed = None;
                let info = b.katapult_info();
                if let Some(k) = b.katapult.as_mut() {
                    k.app_start = info.app_start;
                    k.info = info;
                }
                Response::ok(json!(self.boards[i].faults.specs()))
            }
            Request::Reset { wait, timeout_ms } => {
                let mut errors = Vec::new();
                for i in 0..self.boards.len() {
                    if let Err(e) = self.reset_board(i) {
                        errors.push(format!("{e:#}"));
                    }
                }
                self.log.log(None, "reset", json!({}));
                if !errors.is_empty() {
                    Response::err(errors.join("; "))
                } else if wait {
                    self.spawn_wait(reply, timeout_ms, Value::Null);
                    return None;
                } else {
                    Response::ok(Value::Null)
                }
            }
            Request::SetVersion { board, version } => {
                let i = board!(board);
                let name = self.name(i);
                let b = &mut self.boards[i];
                let (cfg_app, cfg_mcu) = (b.cfg.app.clone(), b.cfg.mcu.clone());
                let (app, mcu) = match b.installed() {
                    AppCheck::Klipper { dictionary, .. } => (
                        dictionary.app.clone().unwrap_or(cfg_app),
                        if dictionary.mcu.is_empty() { cfg_mcu } else { dictionary.mcu.clone() },
                    ),
                    _ => (cfg_app, cfg_mcu),
                };
                let start = b.cfg.app_start;
                let img = standin_image(
                    start,
                    b.cfg.profile.initial_sp,
                    &dictionary_json(&app, &version, &mcu, b.cfg.profile.clock_freq),
                );
                b.flash.load(start, &img);
                b.installed = None;
                b.dirty = true;
                if b.mode == Mode::Klipper && b.gadget.bound {
                    if let AppCheck::Klipper { dictionary, compressed } = b.installed().clone() {
                        if let Some(k) = b.klipper.as_mut() {
                            k.set_dictionary(compressed);
                        }
                        b.running = Some(dictionary);
                    }
                }
                self.log.log(Some(&name), "set-version", json!({"version": version}));
                Response::ok(Value::Null)
            }
            Request::Mark { text } => {
                self.log.log(None, "mark", json!({"text": text}));
                Response::ok(Value::Null)
            }
        };
        Some((resp, reply))
    }

    fn spawn_wait(&self, reply: oneshot::Sender<Response>, timeout_ms: u64, result: Value) {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let r = wait_ready(tx, Duration::from_millis(timeout_ms), result).await;
            let _ = reply.send(r);
        });
    }

    async fn shutdown(&mut self) {
        for i in 0..self.boards.len() {
            if let Some(s) = self.boards[i].session.take() {
                s.close().await;
            }
            if let Err(e) = self.boards[i].gadget.remove() {
                say!("{}: cannot remove gadget: {e:#}", self.boards[i].cfg.name);
            }
        }
        gadgetfs::unmount(&self.state_dir.join(GADGETFS_DIR));
        self.log.log(None, "serve-stop", json!({}));
        let _ = std::fs::remove_file(ctl::socket_path(&self.state_dir));
        let _ = std::fs::remove_file(self.state_dir.join(ctl::PID_NAME));
    }
}

/// Poll the host side until every board matches its state (boards change state only
/// through this process, so the only thing to wait for is the host's enumeration and udev).
async fn wait_ready(tx: mpsc::UnboundedSender<Msg>, timeout: Duration, result: Value) -> Response {
    let deadline = Instant::now() + timeout;
    loop {
        let (otx, orx) = oneshot::channel();
        if tx.send(Msg::Views(otx)).is_err() {
            return Response::err("the simulator is shutting down");
        }
        let Ok(views) = orx.await else {
            return Response::err("the simulator is shutting down");
        };
        let waiting: Vec<String> = tokio::task::spawn_blocking(move || {
            views.iter().filter_map(|v| v.not_ready().map(|r| format!("{}: {r}", v.name))).collect()
        })
        .await
        .unwrap_or_else(|e| vec![format!("internal error: {e}")]);
        if waiting.is_empty() {
            return Response::ok(result);
        }
        if Instant::now() >= deadline {
            return Response::timeout(format!(
                "boards not ready after {:.1} s: {}",
                timeout.as_secs_f64(),
                waiting.join("; ")
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn serve_conn(stream: UnixStream, tx: mpsc::UnboundedSender<Msg>) {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    let resp = match lines.next_line().await {
        Ok(Some(line)) => match serde_json::from_str::<Request>(&line) {
            Ok(req) => {
                let (otx, orx) = oneshot::channel();
                if tx.send(Msg::Ctl(req, otx)).is_err() {
                    Response::err("the simulator is shutting down")
                } else {
                    orx.await.unwrap_or_else(|_| Response::err("the simulator dropped the request"))
                }
            }
            Err(e) => Response::err(format!("bad request: {e}")),
        },
        _ => return,
    };
    let mut out = serde_json::to_string(&resp).expect("responses serialize");
    out.push('\n');
    let _ = w.write_all(out.as_bytes()).await;
}

fn start_usbmon(board: usize, name: &str, bus: u32, tx: mpsc::UnboundedSender<Msg>) -> Result<()> {
    let path = Path::new(gadget::USBMON_DIR).join(format!("{bus}u"));
    let file = std::fs::File::open(&path).with_context(|| {
        format!(
            "board '{name}': cannot open usbmon {} (modprobe usbmon; mount -t debugfs none /sys/kernel/debug)",
            path.display()
        )
    })?;
    std::thread::Builder::new()
        .name(format!("usbmon-{bus}"))
        .spawn(move || {
            let reader = std::io::BufReader::new(file);
            for line in reader.lines() {
                match line {
                    Ok(l) => {
                        if let Some(s) = parse_line(&l) {
                            if s.request_type == 0x21 && tx.send(Msg::Usbmon { board, setup: s }).is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Msg::UsbmonDied { board, error: e.to_string() });
                        return;
                    }
                }
            }
            let _ = tx.send(Msg::UsbmonDied { board, error: "end of file".into() });
        })
        .context("cannot start a usbmon thread")?;
    Ok(())
}

/// Run the simulator until SIGTERM / SIGINT.
pub async fn serve(boards_file: &Path, state_dir: &Path) -> Result<()> {
    let cfgs = crate::config::load_boards(boards_file)?;
    gadget::check_environment()?;
    std::fs::create_dir_all(state_dir).with_context(|| format!("cannot create state dir {}", state_dir.display()))?;
    let sock = ctl::socket_path(state_dir);
    if sock.exists() {
        if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
            anyhow::bail!("another kflash-boardsim serve is already listening on {}", sock.display());
        }
        std::fs::remove_file(&sock).with_context(|| format!("cannot remove stale {}", sock.display()))?;
    }
    let mut log = EventLog::create(&state_dir.join(ctl::EVENTS_NAME))?;
    let (tx, mut rx) = mpsc::unbounded_channel::<Msg>();

    let mut boards = Vec::new();
    for (i, cfg) in cfgs.into_iter().enumerate() {
        let gadget = Gadget::create(&cfg.name, cfg.udc).with_context(|| format!("board '{}'", cfg.name))?;
        let bus = gadget::host_bus(cfg.udc).with_context(|| format!("board '{}'", cfg.name))?;
        start_usbmon(i, &cfg.name, bus, tx.clone())?;
        say!(
            "{}: gadget {} on {} (host bus {bus}), board tty {}, rom mode without DFU: {}",
            cfg.name,
            gadget.dir.display(),
            gadget.udc,
            gadget.tty.display(),
            if gadget.has_sourcesink() { "SourceSink (no tty)" } else { "ACM (usb_f_ss_lb missing)" }
        );
        boards.push(Board {
            flash: initial_flash(&cfg)?,
            faults: Faults::new(cfg.faults.clone()),
            cfg,
            gadget,
            bus,
            plugged: false,
            mode: Mode::Klipper,
            pending: None,
            gen: 0,
            installed: None,
            running: None,
            line: LineState::default(),
            klipper: None,
            klipper_boot: Instant::now(),
            katapult: None,
            session: None,
            blocks_session: 0,
            flashes: 0,
            dirty: false,
        });
    }
    // Before any board is plugged: gadgetfs needs a free UDC when it is mounted.
    match gadgetfs::init(&state_dir.join(GADGETFS_DIR)) {
        Ok(ep0) => say!("ROM DFU (STM32): gadgetfs, ep0 {}", ep0.display()),
        Err(e) => {
            say!("ROM DFU (STM32): gadgetfs unavailable, SourceSink instead: {e:#}");
            log.log(None, "error", json!({"what": "gadgetfs", "error": format!("{e:#}")}));
        }
    }
    log.log(None, "serve-start", json!({"boards_file": boards_file.display().to_string(), "pid": std::process::id()}));
    let mut sim = Sim { boards, log, tx: tx.clone(), state_dir: state_dir.to_path_buf() };
    for i in 0..sim.boards.len() {
        if sim.boards[i].cfg.plugged {
            sim.boards[i].plugged = true;
            let target = BootTarget::from_mode(Some(sim.boards[i].cfg.mode));
            let mode = sim.resolve(i, target);
            sim.power_up(i, mode, "initial state");
        }
    }

    let listener = UnixListener::bind(&sock).with_context(|| format!("cannot listen on {}", sock.display()))?;
    std::fs::write(state_dir.join(ctl::PID_NAME), format!("{}\n", std::process::id()))?;
    let ltx = tx.clone();
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((s, _)) => {
                    tokio::spawn(serve_conn(s, ltx.clone()));
                }
                Err(e) => {
                    say!("control socket accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    say!("serving {} boards; control socket {}", sim.boards.len(), sock.display());

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            msg = rx.recv() => {
                let Some(msg) = msg else { break };
                match msg {
                    Msg::Ctl(req, reply) => sim.handle_ctl(req, reply),
                    Msg::Tty { board, gen, ev } => sim.handle_tty(board, gen, ev),
                    Msg::Usbmon { board, setup } => sim.handle_usbmon(board, setup),
                    Msg::UsbmonDied { board, error } => {
                        let name = sim.name(board);
                        say!("{name}: usbmon reader stopped: {error}; 1200-baud requests are no longer seen");
                        sim.log.log(Some(&name), "error", json!({"what": "usbmon", "error": error}));
                    }
                    Msg::Timer { board, gen, kind } => sim.handle_timer(board, gen, kind),
                    Msg::Dfu { board, gen, note } => {
                        if sim.boards[board].gen == gen {
                            let name = sim.name(board);
                            sim.log.log(Some(&name), "dfu", json!({"note": note}));
                        }
                    }
                    Msg::Views(reply) => { let _ = reply.send(sim.views()); }
                }
            }
        }
    }
    say!("shutting down");
    sim.shutdown().await;
    Ok(())
}
