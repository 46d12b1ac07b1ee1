//! The real I/O of a flash run: the orchestrator's [`Effects`], carrying out each
//! [`Command`] with the print gate, the build, the Klipper guard, udev, Katapult and
//! Moonraker.
//!
//! - Each command's work says what happened in the machine's terms (an [`Input`] with a
//!   [`Cause`]), and keeps the step's own [`Error`] beside it, so the run ends with that
//!   error (its message, help and exit code), not a translation.
//! - The work runs as futures inside the driver's task: shared state is in `RefCell`s that are
//!   never borrowed across an `.await`.
//! - The one reporter is shared the same way: each report borrows it for a moment, and a
//!   question's answer is awaited without holding it.
//! - The Klipper guard lives here from the stop to the start; if the run is dropped in
//!   between, dropping the guard starts Klipper.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Mutex;
use std::time::{Duration, Instant as StdInstant};

use futures::future::LocalBoxFuture;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::flash::{find_connected, FlashOptions, Reporter, Timings};
use crate::can::lock::InterfaceLock;
use crate::can::AdminReply;
use crate::error::{Error, Result};
use crate::event::{NotChecked, Progress};
use crate::firmware::{self, BuildOptions, BuildOutcome};
use crate::flash::can::CanTarget;
use crate::flash::katapult::{check_target, Expectation, KatapultSession};
use crate::flash::{can, external, identify, usb, FlashError};
use crate::history::{Durations, FlashRecord, FlashResult};
use crate::hotplug::{Board, Hotplug};
use crate::identity::Mode;
use crate::locator::Locator;
use crate::moonraker::{mcu_for_board, mcu_for_canbus_uuid, Moonraker, MoonrakerError};
use crate::orchestrator::driver::Effects;
use crate::orchestrator::{
    BoardReport, BoardState, Built, Cause, Command, Event, EventKind, Input, KlipperAnswer, Unchecked,
};
use crate::registry::{BoardEntry, FlashMethod, Registry};
use crate::safety::{clear_to_stop_klipper, Clearance, GateOptions, PrintCheck};
use crate::service::{KlipperGuard, ServiceManager};

/// The one reporter, shared by every piece of work of the run.
///
/// A mutex only so the build's progress (which is `Send`) can hold it; the lock is never
/// held across an `.await`, so it is never contended.
pub(crate) struct SharedReporter<'r>(Mutex<&'r mut dyn Reporter>);

impl<'r> SharedReporter<'r> {
    pub(crate) fn new(rep: &'r mut dyn Reporter) -> Self {
        SharedReporter(Mutex::new(rep))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, &'r mut dyn Reporter> {
        // A report that panicked poisons nothing the next one needs.
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn event(&self, e: &Event) {
        self.lock().event(e);
    }

    /// Something about the run as a whole.
    fn run(&self, kind: EventKind) {
        self.event(&Event::run(kind));
    }

    /// Something about one board of the run.
    pub(crate) fn board(&self, key: &str, kind: EventKind) {
        self.event(&Event::board(key, kind));
    }
}

/// The shared reporter as a `&mut dyn Reporter` (the print gate) or a [`Progress`] (a build,
/// a Katapult session); with a key, what it emits is about that board.
struct View<'a, 'r>(&'a SharedReporter<'r>, Option<&'a str>);

impl Reporter for View<'_, '_> {
    fn event(&mut self, e: &Event) {
        self.0.event(e);
    }

    fn confirm(&mut self, question: &str) -> LocalBoxFuture<'static, bool> {
        // The question's future owns what it needs: the reporter is free while the user thinks.
        self.0.lock().confirm(question)
    }
}

impl Progress for View<'_, '_> {
    fn emit(&mut self, kind: EventKind) {
        match self.1 {
            Some(key) => self.0.board(key, kind),
            None => self.0.run(kind),
        }
    }
}

/// What the work learned about one board, for the summary and the history.
pub(crate) struct BoardWork {
    pub entry: BoardEntry,
    /// The first method of the plan (the one chosen).
    pub method: FlashMethod,
    pub built: Option<Rc<BuildOutcome>>,
    /// The board as found connected after the build.
    pub board: Option<Board>,
    /// The board in Katapult.
    pub boot: Option<Board>,
    /// The board back running Klipper.
    pub back: Option<Board>,
    pub version_before: Option<String>,
    pub timings: Timings,
    /// A node on a CAN bus (then `board`, `boot` and `back` stay `None`).
    pub can: Option<CanTarget>,
    /// The CAN interface's turn, held from the bootloader request until the node is back and
    /// identified (or its flash ended otherwise).
    can_lock: Option<InterfaceLock>,
    /// The other nodes that answered while this one was awaited in Katapult.
    can_known: Vec<AdminReply>,
    /// A USB-to-CAN bridge: its own node, on the interface it provides (found and written
    /// as a USB board; asked for its bootloader and identified over CAN).
    pub bridge: Option<CanTarget>,
    /// The bitrate to bring the bridge's interface up at, if nothing else does.
    bridge_bitrate: Option<u32>,
    /// The step's own error, and whether it came from a write (the first write error is kept
    /// when another method is tried).
    error: Option<(bool, Error)>,
    /// Identified running the built version.
    flashed: bool,
}

impl BoardWork {
    pub(crate) fn new(entry: BoardEntry, method: FlashMethod) -> BoardWork {
        let can = match entry.locator() {
            Locator::Can { interface, uuid } => Some(CanTarget { interface, uuid }),
            Locator::Usb { .. } => None,
        };
        let bridge = match (entry.is_can_bridge(), entry.canbus_uuid) {
            (true, Some(uuid)) => Some(CanTarget { interface: entry.can_interface().to_string(), uuid }),
            _ => None,
        };
        BoardWork {
            can,
            can_lock: None,
            can_known: Vec::new(),
            bridge,
            bridge_bitrate: None,
            entry,
            method,
            built: None,
            board: None,
            boot: None,
            back: None,
            version_before: None,
            timings: Timings::default(),
            error: None,
            flashed: false,
        }
    }
}

/// The real effects of one run.
pub(crate) struct FlashEffects<'a, 'r> {
    pub reg: &'a Registry,
    pub hp: &'a Hotplug,
    pub opts: &'a FlashOptions,
    pub state_dir: PathBuf,
    /// Why Klipper is stopped, for the stop marker and a second kflash ("flash of octopus").
    pub reason: String,
    pub rep: &'a SharedReporter<'r>,
    mr: Moonraker,
    gate: GateOptions,
    boards: RefCell<BTreeMap<String, BoardWork>>,
    /// The first clearance, which the check right before the stop builds on.
    first: RefCell<Option<Clearance>>,
    /// The last print check's outcome.
    pub print_check: Cell<Option<PrintCheck>>,
    guard: RefCell<Option<KlipperGuard>>,
    pub klipper_downtime: Cell<Option<f64>>,
    /// An error of the run as a whole (print gate, stop, start, Klipper's check).
    run_error: RefCell<Option<Error>>,
    /// The signal that cancelled the run.
    pub interrupted: Cell<Option<&'static str>>,
    builds_left: Cell<usize>,
    build_ended: Notify,
}

impl<'a, 'r> FlashEffects<'a, 'r> {
    pub(crate) fn new(
        reg: &'a Registry,
        hp: &'a Hotplug,
        opts: &'a FlashOptions,
        state_dir: PathBuf,
        reason: String,
        rep: &'a SharedReporter<'r>,
        boards: Vec<BoardWork>,
    ) -> Self {
        FlashEffects {
            reg,
            hp,
            opts,
            state_dir,
            reason,
            rep,
            mr: Moonraker::from_settings(&reg.settings),
            gate: GateOptions { skip_print_check: opts.skip_print_check },
            builds_left: Cell::new(boards.len()),
            boards: RefCell::new(boards.into_iter().map(|b| (b.entry.key.clone(), b)).collect()),
            first: RefCell::new(None),
            print_check: Cell::new(None),
            guard: RefCell::new(None),
            klipper_downtime: Cell::new(None),
            run_error: RefCell::new(None),
            interrupted: Cell::new(None),
            build_ended: Notify::new(),
        }
    }

    fn secs(&self, f: impl Fn(&crate::registry::Timeouts) -> u64) -> Duration {
        Duration::from_secs(f(&self.reg.settings.timeouts))
    }

    fn with<T>(&self, key: &str, f: impl FnOnce(&mut BoardWork) -> T) -> T {
        f(self.boards.borrow_mut().get_mut(key).expect("the machine only names planned boards"))
    }

    /// A board step failed with `e`: keep it as the board's error, and say what the machine
    /// needs to know.
    fn board_error(&self, key: &str, e: Error, from_write: bool) -> Cause {
        let cause = cause_of(&e);
        self.with(key, |b| b.error = Some((from_write, e)));
        cause
    }

    fn run_failed(&self, e: Error) -> Cause {
        let cause = cause_of(&e);
        self.run_error.borrow_mut().get_or_insert(e);
        cause
    }

    /// The text of the error a board ended with, as the history records it.
    pub(crate) fn failure_text(&self, key: &str, state: &BoardState) -> String {
        self.failure_info(key, state).0
    }

    /// The message and help of the error a board ended with (same choice as
    /// [`Self::take_failure`], without taking it).
    pub(crate) fn failure_info(&self, key: &str, state: &BoardState) -> (String, Option<String>) {
        let info = |e: &Error| (e.to_string(), e.help());
        if let Some(sig) = self.interrupted.get() {
            return info(&Error::Interrupted(sig));
        }
        if let Some(i) = self.with(key, |b| b.error.as_ref().map(|(_, e)| info(e))) {
            return i;
        }
        if let Some(e) = &*self.run_error.borrow() {
            return info(e);
        }
        info(&error_of(state))
    }

    /// The error a board ended with, taken out for the caller (same choice as
    /// [`Self::failure_text`]).
    pub(crate) fn take_failure(&self, key: &str, state: &BoardState) -> Error {
        if let Some(sig) = self.interrupted.get() {
            return Error::Interrupted(sig);
        }
        if let Some((_, e)) = self.with(key, |b| b.error.take()) {
            return e;
        }
        if let Some(e) = self.run_error.borrow_mut().take() {
            return e;
        }
        error_of(state)
    }

    /// The error of the run as a whole (print gate, stop, start, Klipper's check), if any.
    pub(crate) fn take_run_error(&self) -> Option<Error> {
        self.run_error.borrow_mut().take()
    }

    pub(crate) fn take_board(&self, key: &str) -> Option<BoardWork> {
        self.boards.borrow_mut().remove(key)
    }

    // ---- the steps -------------------------------------------------------------------

    async fn check_printer(&self) -> Input {
        match clear_to_stop_klipper(&self.mr, self.gate, None, &mut View(self.rep, None)).await {
            Ok(c) => {
                self.print_check.set(Some(c.check()));
                *self.first.borrow_mut() = Some(c);
                Input::PrinterChecked(Ok(()))
            }
            Err(e) => Input::PrinterChecked(Err(self.run_failed(e))),
        }
    }

    /// Build (or take from the cache), then find the board: it is resolved after the build,
    /// as it is plugged in now.
    async fn build(&self, key: &str) -> Input {
        let _ended = BuildEnded(self);
        let entry = self.with(key, |b| b.entry.clone());
        self.rep.board(key, EventKind::BuildStarted { name: entry.name.clone() });
        let opts = BuildOptions {
            rebuild: false,
            cache_only: self.opts.no_build,
            cache_dir: self.opts.cache_dir.clone(),
            state_dir: Some(self.state_dir.clone()),
            jobs: self.opts.jobs,
            tree: self.opts.tree.clone(),
        };
        let built = match firmware::firmware_for(self.reg, &entry, &opts, &mut View(self.rep, Some(key))).await {
            Ok(b) => b,
            Err(e) => return Input::BuildFinished { key: key.into(), result: Err(self.board_error(key, e, false)) },
        };
        let answer = Built {
            version: built.firmware.version.clone(),
            cached: built.cached,
            app: built.firmware.app.clone(),
            size: built.firmware.size,
            secs: built.elapsed.as_secs_f64(),
        };
        let built = Rc::new(built);
        self.with(key, |b| {
            b.timings.build = Some(built.elapsed.as_secs_f64());
            b.built = Some(built.clone());
        });
        if let Some(target) = self.with(key, |b| b.can.clone()) {
            let result = self.can_preflight(key, &target, &built).map(|()| answer);
            return Input::BuildFinished {
                key: key.into(),
                result: result.map_err(|e| self.board_error(key, e, false)),
            };
        }
        if let Some(target) = self.with(key, |b| b.bridge.clone()) {
            let bitrate = self.bus_bitrate(&target.interface, &built);
            self.with(key, |b| b.bridge_bitrate = bitrate);
        }
        match find_connected(self.hp, &entry) {
            Ok(board) => {
                // Found waiting in Katapult: that is where the write starts.
                let boot = (board.identity.mode == Mode::Katapult).then(|| board.clone());
                self.with(key, |b| {
                    b.board = Some(board);
                    b.boot = boot;
                });
                Input::BuildFinished { key: key.into(), result: Ok(answer) }
            }
            Err(e) => Input::BuildFinished { key: key.into(), result: Err(self.board_error(key, e, false)) },
        }
    }

    /// What the built boards run now, by Klipper's word, read once the builds are done (so the
    /// decision is made on Klippy's state of now, and only for boards that built). Only when
    /// the print check found Klippy ready.
    async fn read_versions(&self) -> Input {
        loop {
            let ended = self.build_ended.notified();
            if self.builds_left.get() == 0 {
                break;
            }
            ended.await;
        }
        let mut versions = BTreeMap::new();
        let ready: Vec<(String, Whereabouts)> = self
            .boards
            .borrow()
            .values()
            .filter_map(|b| {
                b.built.as_ref()?;
                Some((b.entry.key.clone(), Whereabouts::of(b)?))
            })
            .collect();
        if ready.is_empty() || self.print_check.get() != Some(PrintCheck::Idle) {
            return Input::VersionsRead(versions);
        }
        // Klippy's MCU versions are what it saw when it last connected; only trust them
        // while it is ready (after a shutdown or error they may be stale).
        match self.mr.server_info().await {
            Ok(si) if si.klippy_state == "ready" => {}
            Ok(si) => {
                self.rep.run(EventKind::VersionsUntrusted { klippy_state: si.klippy_state.clone() });
                return Input::VersionsRead(versions);
            }
            Err(_) => return Input::VersionsRead(versions),
        }
        for (key, board) in ready {
            if let Some(v) = board.running_version(&self.mr).await.ok().flatten() {
                self.with(&key, |b| b.version_before = Some(v.clone()));
                versions.insert(key, v);
            }
        }
        Input::VersionsRead(versions)
    }

    /// The print check once more (a print may have started during the build), then the stop.
    async fn stop_klipper(&self) -> Input {
        let first = self.first.borrow_mut().take();
        let clearance =
            match clear_to_stop_klipper(&self.mr, self.gate, first.as_ref(), &mut View(self.rep, None)).await {
                Ok(c) => c,
                Err(e) => return Input::KlipperStopped(Err(self.run_failed(e))),
            };
        self.print_check.set(Some(clearance.check()));
        let service = &self.reg.settings.klipper_service;
        self.rep.run(EventKind::KlipperStopping { service: service.clone() });
        let manager = ServiceManager::from_settings(&self.reg.settings);
        match KlipperGuard::stop(manager, &self.state_dir, &self.reason, clearance).await {
            Ok(guard) => {
                if !guard.was_active() {
                    self.rep.run(EventKind::KlipperWasStopped { service: guard.service().to_string() });
                }
                *self.guard.borrow_mut() = Some(guard);
                Input::KlipperStopped(Ok(()))
            }
            Err(e) => Input::KlipperStopped(Err(self.run_failed(e.into()))),
        }
    }

    async fn enter_bootloader(&self, key: &str) -> Input {
        if let Some(target) = self.with(key, |b| b.can.clone()) {
            return self.enter_bootloader_can(key, &target).await;
        }
        if let Some(target) = self.with(key, |b| b.bridge.clone()) {
            return self.enter_bootloader_bridge(key, &target).await;
        }
        // Resolved again now that Klipper is stopped: it may have been replugged meanwhile.
        let entry = self.with(key, |b| b.entry.clone());
        let board = match find_connected(self.hp, &entry) {
            Ok(board) => board,
            Err(e) => return Input::BoardFailed { key: key.into(), cause: self.board_error(key, e, false) },
        };
        self.with(key, |b| b.board = Some(board.clone()));
        let t = StdInstant::now();
        self.rep.board(key, EventKind::BootloaderRequested);
        match usb::enter_bootloader(self.hp, &board, Instant::now() + self.secs(|t| t.bootloader_secs)).await {
            Ok(boot) => {
                let devnode = boot.identity.devnode.clone();
                self.rep.board(key, EventKind::InBootloader { devnode, secs: t.elapsed().as_secs_f64() });
                self.with(key, |b| {
                    b.timings.bootloader = Some(t.elapsed().as_secs_f64());
                    b.boot = Some(boot);
                });
                Input::DeviceAppeared { key: key.into(), mode: Mode::Katapult }
            }
            Err(e) => Input::BoardFailed { key: key.into(), cause: self.board_error(key, e.into(), false) },
        }
    }

    /// A CAN board's interface, checked before Klipper is stopped: there, UP, a long enough
    /// transmit queue, the bitrate of the board's `CONFIG_CANBUS_FREQUENCY`. Only kflash's own
    /// Katapult writer speaks CAN.
    fn can_preflight(&self, key: &str, target: &CanTarget, built: &BuildOutcome) -> Result<()> {
        let method = self.with(key, |b| b.method);
        if !matches!(method, FlashMethod::Katapult | FlashMethod::Default) {
            return Err(crate::can::CanError::MethodUnsupported { method: method.as_str() }.into());
        }
        let want = built.config.get("CONFIG_CANBUS_FREQUENCY").and_then(|f| f.trim().parse::<u32>().ok());
        let state = crate::can::preflight::read_interface(&target.interface)
            .map_err(|e| Error::io("read the state of", format!("/sys/class/net/{}", target.interface), e))?;
        crate::can::preflight::check(&target.interface, state.as_ref(), want)?;
        let state = state.expect("checked");
        self.rep.board(
            key,
            EventKind::CanInterfaceChecked {
                interface: target.interface.clone(),
                txqueuelen: state.txqueuelen,
                bitrate: state.bitrate,
                want_bitrate: want,
                note: state.bitrate_note,
            },
        );
        Ok(())
    }

    /// The bus bitrate behind a bridge: the cached configs of the CAN boards on its interface,
    /// else the bridge's own `CONFIG_CANBUS_FREQUENCY`.
    fn bus_bitrate(&self, interface: &str, own: &BuildOutcome) -> Option<u32> {
        let freq = |text: &str| {
            text.lines()
                .find_map(|l| l.trim().strip_prefix("CONFIG_CANBUS_FREQUENCY="))
                .and_then(|v| v.trim().parse::<u32>().ok())
        };
        self.reg
            .boards()
            .filter(|e| matches!(e.locator(), Locator::Can { interface: i, .. } if i == interface))
            .find_map(|e| freq(&std::fs::read_to_string(self.reg.config_path(&e.key)).ok()?))
            .or_else(|| own.config.get("CONFIG_CANBUS_FREQUENCY").and_then(|f| f.trim().parse().ok()))
    }

    /// A bridge: the interface's turn, the bootloader request to its own node by UUID, then
    /// the same board on USB in Katapult (or named in its ROM bootloader), by udev event.
    async fn enter_bootloader_bridge(&self, key: &str, target: &CanTarget) -> Input {
        let t = StdInstant::now();
        let entry = self.with(key, |b| b.entry.clone());
        let board = match find_connected(self.hp, &entry) {
            Ok(board) => board,
            Err(e) => return Input::BoardFailed { key: key.into(), cause: self.board_error(key, e, false) },
        };
        self.with(key, |b| b.board = Some(board.clone()));
        let lock = InterfaceLock::acquire(&self.state_dir, &target.interface, || {
            self.rep.board(key, EventKind::CanInterfaceBusy { interface: target.interface.clone() })
        })
        .await;
        match lock {
            Ok(lock) => self.with(key, |b| b.can_lock = Some(lock)),
            Err(e) => return Input::BoardFailed { key: key.into(), cause: self.board_error(key, e, false) },
        }
        let fail = |e: Error| {
            self.with(key, |b| b.can_lock = None);
            Input::BoardFailed { key: key.into(), cause: self.board_error(key, e, false) }
        };
        let original = board.identity.clone();
        // Armed before the request: the bridge can be back before this task runs again.
        let waiter = self.hp.arm("the bridge in its bootloader", move |b| {
            b.identity.same_board(&original) && matches!(b.identity.mode, Mode::Katapult | Mode::RomBootloader)
        });
        self.rep.board(
            key,
            EventKind::CanBootloaderRequested { interface: target.interface.clone(), uuid: target.uuid.to_string() },
        );
        let sent = match target.open() {
            Ok(socket) => crate::flash::bridge::request_bootloader(socket, &target.interface, target.uuid)
                .await
                .map_err(Error::from),
            Err(e) => Err(e),
        };
        if let Err(e) = sent {
            return fail(e);
        }
        let found = match waiter.until(Instant::now() + self.secs(|t| t.bootloader_secs)).await {
            Ok(b) => b,
            Err(Error::Timeout { secs, .. }) => {
                return fail(
                    FlashError::NoBootloader(format!(
                        "the bridge did not show up in Katapult on USB within {secs:.1} s after the bootloader request \
                         on {}",
                        target.interface
                    ))
                    .into(),
                )
            }
            Err(e) => return fail(e),
        };
        if found.identity.mode != Mode::Katapult {
            let id = &found.identity;
            return fail(
                crate::can::CanError::BridgeInRom {
                    name: id.rom_bootloader.unwrap_or("a ROM bootloader").to_string(),
                    vid_pid: format!(
                        "{}:{}",
                        id.vendor_id.as_deref().unwrap_or("?"),
                        id.product_id.as_deref().unwrap_or("?")
                    ),
                    interface: target.interface.clone(),
                }
                .into(),
            );
        }
        let devnode = found.identity.devnode.clone();
        let secs = t.elapsed().as_secs_f64();
        self.rep.board(key, EventKind::InBootloader { devnode, secs });
        self.with(key, |b| {
            b.timings.bootloader = Some(secs);
            b.boot = Some(found);
        });
        Input::DeviceAppeared { key: key.into(), mode: Mode::Katapult }
    }

    /// A bridge after its write: the same board back on USB running Klipper, then its
    /// interface back and UP (others get a grace to bring it up, then kflash does).
    async fn await_application_bridge(&self, key: &str, target: &CanTarget) -> Input {
        let board = self.with(key, |b| b.board.clone()).expect("a flashed bridge was found connected");
        let t = StdInstant::now();
        self.rep.board(key, EventKind::AwaitingApplication);
        let deadline = Instant::now() + self.secs(|t| t.reconnect_secs);
        let fail = |e: Error| {
            self.with(key, |b| b.can_lock = None);
            Input::BoardFailed { key: key.into(), cause: self.board_error(key, e, false) }
        };
        let back = match usb::await_application(self.hp, &board.identity, deadline).await {
            Ok(back) => back,
            Err(e) => return fail(e.into()),
        };
        self.rep.board(
            key,
            EventKind::BackInApplication {
                devnode: Some(format!("USB {}", back.identity.syspath)),
                secs: t.elapsed().as_secs_f64(),
            },
        );
        let bitrate = self.with(key, |b| b.bridge_bitrate);
        let up = t.elapsed();
        match crate::flash::bridge::await_interface_up(&target.interface, bitrate, deadline).await {
            Ok(by) => {
                let by_kflash = match by {
                    crate::flash::bridge::BroughtUp::Kflash { bitrate } => Some(bitrate),
                    crate::flash::bridge::BroughtUp::Others => None,
                };
                let secs = (t.elapsed() - up).as_secs_f64();
                self.rep.board(
                    key,
                    EventKind::CanInterfaceBack {
                        interface: target.interface.clone(),
                        by_kflash: by_kflash.is_some(),
                        bitrate: by_kflash,
                        secs,
                    },
                );
                self.with(key, |b| {
                    b.timings.reconnect = Some(t.elapsed().as_secs_f64());
                    b.back = Some(back);
                });
                Input::DeviceAppeared { key: key.into(), mode: Mode::Klipper }
            }
            Err(e) => fail(e.into()),
        }
    }

    /// The interface's turn, then the bootloader request by UUID and Katapult's answer.
    async fn enter_bootloader_can(&self, key: &str, target: &CanTarget) -> Input {
        let t = StdInstant::now();
        let lock = InterfaceLock::acquire(&self.state_dir, &target.interface, || {
            self.rep.board(key, EventKind::CanInterfaceBusy { interface: target.interface.clone() })
        })
        .await;
        match lock {
            Ok(lock) => self.with(key, |b| b.can_lock = Some(lock)),
            Err(e) => return Input::BoardFailed { key: key.into(), cause: self.board_error(key, e, false) },
        }
        self.rep.board(
            key,
            EventKind::CanBootloaderRequested { interface: target.interface.clone(), uuid: target.uuid.to_string() },
        );
        let deadline = Instant::now() + self.secs(|t| t.bootloader_secs);
        let entered = match target.open() {
            Ok(socket) => can::enter_bootloader(socket, target, deadline).await,
            Err(e) => Err(e),
        };
        match entered {
            Ok(known) => {
                let secs = t.elapsed().as_secs_f64();
                self.rep.board(key, EventKind::InBootloader { devnode: Some(target.describe()), secs });
                self.with(key, |b| {
                    b.timings.bootloader = Some(secs);
                    b.can_known = known;
                });
                Input::DeviceAppeared { key: key.into(), mode: Mode::Katapult }
            }
            Err(e) => {
                self.with(key, |b| b.can_lock = None);
                Input::BoardFailed { key: key.into(), cause: self.board_error(key, e, false) }
            }
        }
    }

    async fn write_can(&self, key: &str, target: &CanTarget, built: &BuildOutcome, mcu: &str) -> Result<()> {
        let image = std::fs::read(&built.firmware.image).map_err(|e| Error::io("read", &built.firmware.image, e))?;
        let expect = expectation(mcu, built);
        let method = FlashMethod::Katapult;
        self.rep
            .board(key, EventKind::WriteStarted { method, bytes: Some(image.len()), device: Some(target.describe()) });
        let t = StdInstant::now();
        let mut progress = View(self.rep, Some(key));
        let flash = can::write(target.open()?, target, &image, &expect, &mut progress);
        let report = tokio::time::timeout(self.secs(|t| t.flash_secs), flash).await.map_err(|_| {
            FlashError::NoResponse { command: "the flash", tries: 1, last: "timeouts.flash_secs passed".into() }
        })??;
        let (blocks, pages, secs) = (Some(report.blocks), Some(report.pages), t.elapsed().as_secs_f64());
        self.rep.board(key, EventKind::Written { method, blocks, pages, secs });
        Ok(())
    }

    async fn await_application_can(&self, key: &str, target: &CanTarget) -> Input {
        let t = StdInstant::now();
        self.rep.board(key, EventKind::AwaitingApplication);
        let deadline = Instant::now() + self.secs(|t| t.reconnect_secs);
        let known = self.with(key, |b| b.can_known.clone());
        let back = match target.open() {
            Ok(socket) => can::await_application(socket, target, &known, deadline).await,
            Err(e) => Err(e),
        };
        match back {
            Ok(()) => {
                let secs = t.elapsed().as_secs_f64();
                self.rep.board(key, EventKind::BackInApplication { devnode: Some(target.describe()), secs });
                self.with(key, |b| b.timings.reconnect = Some(secs));
                Input::DeviceAppeared { key: key.into(), mode: Mode::Klipper }
            }
            Err(e) => {
                self.with(key, |b| b.can_lock = None);
                Input::BoardFailed { key: key.into(), cause: self.board_error(key, e, false) }
            }
        }
    }

    /// For the external tools: connect to Katapult ourselves and check MCU and application
    /// start before handing the board over, so no tool writes to the wrong board. Katapult's
    /// own write checks the same itself, first thing.
    async fn check_target(&self, key: &str) -> Input {
        let (method, boot, built, mcu) =
            self.with(key, |b| (b.method, b.boot.clone(), b.built.clone(), b.entry.mcu.clone()));
        if method == FlashMethod::Katapult {
            return Input::TargetChecked { key: key.into(), result: Ok(()) };
        }
        let (boot, built) = (boot.expect("in Katapult"), built.expect("built"));
        let t = StdInstant::now();
        let checked = async {
            let image =
                std::fs::read(&built.firmware.image).map_err(|e| Error::io("read", &built.firmware.image, e))?;
            let info = KatapultSession::open(boot.identity.devnode.as_deref())?.connect().await?;
            self.rep.board(key, EventKind::KatapultConnected { info: info.clone() });
            check_target(&info, &expectation(&mcu, &built), &image)?;
            Ok::<_, Error>(())
        }
        .await;
        self.add_write_time(key, t);
        let result = checked.map_err(|e| self.board_error(key, e, false));
        Input::TargetChecked { key: key.into(), result }
    }

    async fn write(&self, key: &str, method: FlashMethod) -> Input {
        let (boot, built, mcu, target) =
            self.with(key, |b| (b.boot.clone(), b.built.clone(), b.entry.mcu.clone(), b.can.clone()));
        if let Some(target) = target {
            let t = StdInstant::now();
            let result = self.write_can(key, &target, &built.expect("built"), &mcu).await;
            self.add_write_time(key, t);
            let result = result.map_err(|e| {
                let refused =
                    matches!(&e, Error::Can(c) if c.is_refusal()) || matches!(&e, Error::Flash(f) if f.is_refusal());
                if !refused {
                    // Left in Katapult: this board's bus work is over.
                    self.with(key, |b| b.can_lock = None);
                }
                self.board_error(key, e, true)
            });
            return Input::WriteDone { key: key.into(), result };
        }
        let (boot, built) = (boot.expect("in Katapult"), built.expect("built"));
        let t = StdInstant::now();
        let result = match method {
            FlashMethod::Katapult | FlashMethod::Default => self.write_katapult(key, &boot, &built, &mcu).await,
            FlashMethod::MakeFlash | FlashMethod::Flashtool => self.write_external(key, method, &boot, &built).await,
        };
        self.add_write_time(key, t);
        // After a fallback the first method's error is the one reported; a refusal is reported
        // whichever method met it (nothing was written, and nothing else is tried).
        let result = result.map_err(|e| {
            let earlier = self.with(key, |b| matches!(b.error, Some((true, _))));
            if earlier && !matches!(&e, Error::Flash(f) if f.is_refusal()) {
                self.rep.board(key, EventKind::MethodFailedToo { method, error: e.to_string() });
                cause_of(&e)
            } else {
                self.board_error(key, e, true)
            }
        });
        Input::WriteDone { key: key.into(), result }
    }

    fn add_write_time(&self, key: &str, t: StdInstant) {
        self.with(key, |b| b.timings.write = Some(b.timings.write.unwrap_or(0.0) + t.elapsed().as_secs_f64()));
    }

    async fn write_katapult(&self, key: &str, boot: &Board, built: &BuildOutcome, mcu: &str) -> Result<()> {
        let image = std::fs::read(&built.firmware.image).map_err(|e| Error::io("read", &built.firmware.image, e))?;
        let expect = expectation(mcu, built);
        let mut session = KatapultSession::open(boot.identity.devnode.as_deref())?;
        let (method, device) = (FlashMethod::Katapult, boot.identity.devnode.clone());
        self.rep.board(key, EventKind::WriteStarted { method, bytes: Some(image.len()), device });
        let t = StdInstant::now();
        let mut progress = View(self.rep, Some(key));
        let flash = session.flash(&image, &expect, &mut progress);
        let report = tokio::time::timeout(self.secs(|t| t.flash_secs), flash).await.map_err(|_| {
            FlashError::NoResponse { command: "the flash", tries: 1, last: "timeouts.flash_secs passed".into() }
        })??;
        let (blocks, pages, secs) = (Some(report.blocks), Some(report.pages), t.elapsed().as_secs_f64());
        self.rep.board(key, EventKind::Written { method, blocks, pages, secs });
        Ok(())
    }

    async fn write_external(&self, key: &str, method: FlashMethod, boot: &Board, built: &BuildOutcome) -> Result<()> {
        // by-path names the USB port, which survives the re-enumerations the tools cause.
        let device = boot.identity.by_path.clone().or_else(|| boot.identity.devnode.clone()).unwrap_or_default();
        let timeout = self.secs(|t| t.flash_secs);
        let t = StdInstant::now();
        self.rep.board(key, EventKind::WriteStarted { method, bytes: None, device: Some(device.clone()) });
        let settings = &self.reg.settings;
        match method {
            FlashMethod::Flashtool => {
                external::flashtool(&settings.katapult_dir(), &device, &built.firmware.image, timeout).await?
            }
            _ => {
                external::make_flash(
                    &settings.klipper_dir(),
                    // The copy that was built, so make's own olddefconfig never touches the board's file.
                    &built.built_config,
                    &built.build_dir,
                    &device,
                    timeout,
                )
                .await?
            }
        }
        let secs = t.elapsed().as_secs_f64();
        self.rep.board(key, EventKind::Written { method, blocks: None, pages: None, secs });
        Ok(())
    }

    async fn await_application(&self, key: &str) -> Input {
        if let Some(target) = self.with(key, |b| b.can.clone()) {
            return self.await_application_can(key, &target).await;
        }
        if let Some(target) = self.with(key, |b| b.bridge.clone()) {
            return self.await_application_bridge(key, &target).await;
        }
        let board = self.with(key, |b| b.board.clone()).expect("a flashed board was found connected");
        let t = StdInstant::now();
        self.rep.board(key, EventKind::AwaitingApplication);
        let deadline = Instant::now() + self.secs(|t| t.reconnect_secs);
        match usb::await_application(self.hp, &board.identity, deadline).await {
            Ok(back) => {
                let devnode = back.identity.devnode.clone();
                self.rep.board(key, EventKind::BackInApplication { devnode, secs: t.elapsed().as_secs_f64() });
                self.with(key, |b| {
                    b.timings.reconnect = Some(t.elapsed().as_secs_f64());
                    b.back = Some(back);
                });
                Input::DeviceAppeared { key: key.into(), mode: Mode::Klipper }
            }
            Err(e) => Input::BoardFailed { key: key.into(), cause: self.board_error(key, e.into(), false) },
        }
    }

    /// After a refusal nothing was written: ask Katapult to start the installed firmware
    /// again and await it, so Klipper finds the board as it was. The refusal stays the
    /// board's error; how the release went is a warning.
    async fn send_to_application(&self, key: &str) -> Input {
        if let Some(target) = self.with(key, |b| b.can.clone()) {
            let deadline = Instant::now() + self.secs(|t| t.reconnect_secs);
            let sent = match target.open() {
                Ok(socket) => can::send_to_application(socket, &target, deadline).await,
                Err(e) => Err(e),
            };
            self.with(key, |b| b.can_lock = None);
            return match sent {
                Ok(()) => {
                    self.rep.board(key, EventKind::SentBack);
                    Input::DeviceAppeared { key: key.into(), mode: Mode::Klipper }
                }
                Err(e) => {
                    self.rep.board(key, EventKind::LeftInBootloader { error: e.to_string() });
                    Input::BoardFailed { key: key.into(), cause: cause_of(&e) }
                }
            };
        }
        let boot = self.with(key, |b| b.boot.clone()).expect("in Katapult");
        let (bridge, bitrate) = self.with(key, |b| (b.bridge.clone(), b.bridge_bitrate));
        let started = async {
            KatapultSession::open(boot.identity.devnode.as_deref())?.start_application().await?;
            let deadline = Instant::now() + self.secs(|t| t.reconnect_secs);
            usb::await_application(self.hp, &boot.identity, deadline).await?;
            // A bridge's boards are reachable again only once its interface is UP.
            if let Some(t) = bridge {
                crate::flash::bridge::await_interface_up(&t.interface, bitrate, deadline).await?;
                self.with(key, |b| b.can_lock = None);
            }
            Ok::<(), Error>(())
        };
        match started.await {
            Ok(()) => {
                self.rep.board(key, EventKind::SentBack);
                Input::DeviceAppeared { key: key.into(), mode: Mode::Klipper }
            }
            Err(e) => {
                self.rep.board(key, EventKind::LeftInBootloader { error: e.to_string() });
                Input::BoardFailed { key: key.into(), cause: cause_of(&e) }
            }
        }
    }

    async fn identify(&self, key: &str) -> Input {
        let (back, built) = self.with(key, |b| (b.back.clone(), b.built.clone()));
        let devnode = back.and_then(|b| b.identity.devnode).unwrap_or_default();
        let expected = built.map(|b| b.firmware.version.clone()).unwrap_or_default();
        let t = StdInstant::now();
        self.rep.board(key, EventKind::Identifying);
        let deadline = Instant::now() + Duration::from_secs(10);
        let read = match self.with(key, |b| b.can.clone().or_else(|| b.bridge.clone())) {
            Some(target) => {
                let read = match target.open() {
                    Ok(socket) => can::identify(socket, &target, deadline).await,
                    Err(e) => Err(e),
                };
                // The node is back and identified (or not): the bus is free for others.
                self.with(key, |b| b.can_lock = None);
                read
            }
            None => identify::read_identify(Path::new(&devnode), deadline).await.map_err(Error::from),
        };
        let dict = match read {
            Ok(d) => d,
            Err(e) => return Input::Identified { key: key.into(), result: Err(self.board_error(key, e, false)) },
        };
        self.with(key, |b| b.timings.identify = Some(t.elapsed().as_secs_f64()));
        if dict.version != expected {
            let e = FlashError::VersionMismatch { expected, running: dict.version.clone() };
            self.board_error(key, e.into(), false);
        } else {
            let (version, secs) = (dict.version.clone(), t.elapsed().as_secs_f64());
            self.rep.board(key, EventKind::Identified { version, secs });
            self.with(key, |b| b.flashed = true);
        }
        Input::Identified { key: key.into(), result: Ok(dict.version) }
    }

    /// Start Klipper again, and say why Klipper's own view of the flashed boards will not be
    /// checked when it will not.
    async fn start_klipper(&self) -> Input {
        let Some(guard) = self.guard.borrow_mut().take() else { return Input::KlipperStarted(Ok(false)) };
        let service = &self.reg.settings.klipper_service;
        self.rep.run(EventKind::KlipperStarting { service: service.clone() });
        let r = match guard.restart().await {
            Ok(r) => r,
            Err(e) => {
                self.rep.run(EventKind::KlipperStartFailed { error: e.to_string() });
                return Input::KlipperStarted(Err(self.run_failed(e.into())));
            }
        };
        self.klipper_downtime.set(Some(r.downtime.as_secs_f64()));

        let flashed = self.boards.borrow().values().any(|b| b.flashed);
        if flashed && self.interrupted.get().is_none() {
            let why = match (self.print_check.get(), r.started) {
                (Some(PrintCheck::MoonrakerDown), _) => Some(NotChecked::MoonrakerDown),
                (Some(PrintCheck::Skipped), _) => Some(NotChecked::PrintCheckSkipped),
                (_, false) => Some(NotChecked::KlipperLeftStopped),
                _ => None,
            };
            if let Some(why) = why {
                self.rep.run(EventKind::KlippyNotChecked { why });
            }
        }
        Input::KlipperStarted(Ok(r.started))
    }

    /// Level (c): after Klipper is back, Klippy is ready and reports the new version for each
    /// flashed board's MCU.
    ///
    /// After an emergency stop (the gate's `KlippyHalted`, which the user confirmed) the other
    /// boards are still shut down, and a restarted Klippy stops in `error` ("Can not update MCU
    /// 'mcu' config as it is shutdown"): then kflash sends the FIRMWARE_RESTART the user would.
    async fn check_klipper(&self, expected: BTreeMap<String, String>) -> Input {
        let check = self.print_check.get();
        match check {
            Some(PrintCheck::MoonrakerDown) => {
                return Input::KlippyChecked(Ok(KlipperAnswer::Unchecked(Unchecked::MoonrakerDown)))
            }
            Some(PrintCheck::Skipped) => {
                return Input::KlippyChecked(Ok(KlipperAnswer::Unchecked(Unchecked::PrintCheckSkipped)))
            }
            _ => {}
        }
        let t = StdInstant::now();
        let deadline = Instant::now() + self.secs(|t| t.klippy_ready_secs);
        self.rep.run(EventKind::AwaitingKlippy);
        let info = match self.await_klippy(check, deadline).await {
            Ok(info) => info,
            Err(e) => return Input::KlippyChecked(Err(self.unconfirmed(&expected, e))),
        };
        let mut running = BTreeMap::new();
        for (key, version) in &expected {
            let Some(board) = self.with(key, |b| Whereabouts::of(b)) else { continue };
            let (key, version) = (key.clone(), version.clone());
            let answer = match board.running_version(&self.mr).await {
                Ok(answer) => answer,
                Err(e) => {
                    return Input::KlippyChecked(Err(
                        self.unconfirmed(&expected, e.behind_moonraker(&info.klippy_state))
                    ))
                }
            };
            match answer {
                Some(v) if v == version => {
                    self.rep.board(&key, EventKind::KlippyReports { version: v, secs: t.elapsed().as_secs_f64() })
                }
                Some(v) => {
                    let e = FlashError::VersionMismatch {
                        expected: version.clone(),
                        running: format!("{v} according to Klipper"),
                    };
                    self.board_error(&key, e.into(), false);
                    running.insert(key, v);
                    continue;
                }
                None => {
                    self.rep.board(&key, EventKind::NoMcuSection);
                    continue;
                }
            }
            running.insert(key, version);
        }
        Input::KlippyChecked(Ok(KlipperAnswer::Running(running)))
    }

    /// Klippy not ready, or Moonraker unable to say what it runs: every flashed board's flash
    /// was good (level b), but Klipper's check was not had.
    fn unconfirmed(&self, expected: &BTreeMap<String, String>, cause: MoonrakerError) -> Cause {
        if expected.is_empty() {
            return self.run_failed(cause.into());
        }
        let cause = std::sync::Arc::new(cause);
        let mut first = None;
        for (key, version) in expected {
            let e = FlashError::KlipperUnconfirmed { version: version.clone(), cause: cause.clone() };
            let c = self.board_error(key, e.into(), false);
            first.get_or_insert(c);
        }
        first.expect("expected is not empty")
    }

    async fn await_klippy(
        &self,
        check: Option<PrintCheck>,
        deadline: Instant,
    ) -> std::result::Result<crate::moonraker::ServerInfo, MoonrakerError> {
        if check == Some(PrintCheck::KlippyHalted) {
            match self.mr.wait_klippy_settled(deadline).await {
                Err(MoonrakerError::KlippyNotReady { state, message, .. }) if message.contains("shutdown") => {
                    let message = crate::moonraker::first_line(&message).map(String::from);
                    self.rep.run(EventKind::FirmwareRestart { state: state.clone(), message });
                    self.mr.firmware_restart().await?;
                }
                Err(e) => return Err(e),
                Ok(_) => {}
            }
        }
        self.mr.wait_klippy_ready(deadline).await
    }

    /// The history record of a finished board.
    fn history_record(&self, report: &BoardReport) -> FlashRecord {
        let key = &report.key;
        let outcome = match &report.state {
            BoardState::UpToDate => FlashResult::Skipped,
            s if s.passed() && self.interrupted.get().is_none() && self.run_error.borrow().is_none() => FlashResult::Ok,
            _ => FlashResult::Failed,
        };
        let error = (outcome == FlashResult::Failed).then(|| self.failure_text(key, &report.state));
        self.with(key, |b| {
            let method = report.method.unwrap_or(b.method);
            let mut r = FlashRecord::new(&b.entry.key, &b.entry.name, &b.entry.mcu, method.as_str(), outcome);
            r.version_before = b.version_before.clone();
            r.version_after = if outcome == FlashResult::Failed { None } else { report.version_after.clone() };
            let firmware = b.built.as_ref().map(|x| &x.firmware);
            r.firmware_sha256 = firmware.map(|f| f.sha256.clone());
            r.firmware_size = firmware.map(|f| f.size);
            r.error = error;
            r.print_check = self.print_check.get();
            let t = &b.timings;
            let sum = |xs: &[Option<f64>]| xs.iter().flatten().copied().reduce(|x, y| x + y);
            let touched = t.bootloader.is_some() || t.write.is_some();
            r.durations = Durations {
                build: t.build,
                bootloader: t.bootloader,
                flash: t.write,
                verify: sum(&[t.reconnect, t.identify]),
                klipper_downtime: if touched { self.klipper_downtime.get() } else { None },
            };
            r
        })
    }
}

/// Counts a build as ended however its work ends (answer, panic, abort), so the version read
/// waiting for the builds is never left waiting.
struct BuildEnded<'e, 'a, 'r>(&'e FlashEffects<'a, 'r>);

impl Drop for BuildEnded<'_, '_, '_> {
    fn drop(&mut self) {
        self.0.builds_left.set(self.0.builds_left.get().saturating_sub(1));
        self.0.build_ended.notify_waiters();
    }
}

impl Effects for FlashEffects<'_, '_> {
    fn start(&self, command: Command) -> LocalBoxFuture<'_, Option<Input>> {
        Box::pin(async move {
            Some(match command {
                Command::CheckPrinter => self.check_printer().await,
                Command::Build { key } => self.build(&key).await,
                Command::ReadVersions => self.read_versions().await,
                Command::StopKlipper => self.stop_klipper().await,
                Command::EnterBootloader { key } => self.enter_bootloader(&key).await,
                Command::CheckTarget { key } => self.check_target(&key).await,
                Command::Write { key, method } => self.write(&key, method).await,
                Command::AwaitApplication { key } => self.await_application(&key).await,
                Command::SendToApplication { key } => self.send_to_application(&key).await,
                Command::Identify { key } => self.identify(&key).await,
                Command::StartKlipper => self.start_klipper().await,
                Command::CheckKlipper { expected } => self.check_klipper(expected).await,
                Command::Abort(_) | Command::AppendHistory(_) | Command::Emit(_) => return None,
            })
        })
    }

    fn emit(&self, event: Event) {
        tracing::debug!(?event, "flash run");
        self.rep.event(&event);
    }

    fn record(&self, report: BoardReport) {
        let record = self.history_record(&report);
        if let Err(e) = crate::history::append(&self.state_dir, &record) {
            self.rep.board(&report.key, EventKind::HistoryNotWritten { error: e.to_string() });
        }
    }
}

fn expectation(mcu: &str, built: &BuildOutcome) -> Expectation {
    Expectation { mcu: built.config.mcu().unwrap_or(mcu).to_string(), app_start: built.config.application_address() }
}

/// Where Klippy's view of a board is found: its USB device, or its CAN UUID.
pub enum Whereabouts {
    Usb(Box<Board>),
    Can(crate::can::CanUuid),
}

impl Whereabouts {
    fn of(b: &BoardWork) -> Option<Whereabouts> {
        // A bridge is in printer.cfg by its CAN UUID, like the boards behind it.
        match (b.can.as_ref().or(b.bridge.as_ref()), &b.board) {
            (Some(t), _) => Some(Whereabouts::Can(t.uuid)),
            (None, Some(board)) => Some(Whereabouts::Usb(Box::new(board.clone()))),
            (None, None) => None,
        }
    }

    /// What Klipper says it runs (`None`: no `[mcu]` section names it, or no version).
    pub async fn running_version(&self, mr: &Moonraker) -> std::result::Result<Option<String>, MoonrakerError> {
        match self {
            Whereabouts::Usb(board) => running_version(mr, board).await,
            Whereabouts::Can(uuid) => {
                let mcus = mr.mcus().await?;
                Ok(mcu_for_canbus_uuid(&mcus, uuid).and_then(|m| m.mcu_version.clone()))
            }
        }
    }
}

/// What Klipper says this board runs, by the board's configured serial path (`None`: no
/// `[mcu]` section uses it, or Klippy has no version for it).
pub(crate) async fn running_version(
    mr: &Moonraker,
    board: &Board,
) -> std::result::Result<Option<String>, MoonrakerError> {
    let mcus = mr.mcus().await?;
    Ok(mcu_for_board(&mcus, &board.identity).and_then(|m| m.mcu_version.clone()))
}

/// An error in the machine's terms.
fn cause_of(e: &Error) -> Cause {
    match e {
        Error::Flash(f) if f.is_refusal() => Cause::Refused { reason: e.to_string() },
        Error::Can(c) if c.is_refusal() => Cause::Refused { reason: e.to_string() },
        Error::Flash(FlashError::DeviceGone(_)) => Cause::DeviceGone,
        Error::Flash(FlashError::VersionMismatch { expected, running }) => {
            Cause::VersionMismatch { expected: expected.clone(), running: running.clone() }
        }
        e => Cause::Error { kind: e.kind().into(), message: e.to_string() },
    }
}

/// The error for a board that ended without one of its own (the machine's backstop deadline
/// passed, or a step's work panicked).
fn error_of(state: &BoardState) -> Error {
    let (phase, cause) = match state {
        BoardState::Failed { phase, cause } | BoardState::LeftInBootloader { phase, cause } => (Some(*phase), cause),
        BoardState::Skipped { cause } => (None, cause),
        _ => return Error::Tool { program: "kflash".into(), message: format!("the flash ended in state {state:?}") },
    };
    let step = phase.map(|p| format!("{p:?}")).unwrap_or_else(|| "the run".into()).to_lowercase();
    match cause {
        Cause::DeadlinePassed => Error::Tool {
            program: "kflash".into(),
            message: format!("the {step} step did not answer, even after its own timeout"),
        },
        Cause::VersionMismatch { expected, running } => {
            FlashError::VersionMismatch { expected: expected.clone(), running: running.clone() }.into()
        }
        cause => Error::Tool { program: "kflash".into(), message: format!("the {step} step failed: {cause:?}") },
    }
}
