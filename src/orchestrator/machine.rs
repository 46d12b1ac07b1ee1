//! The decisions of a flash run, as a pure state machine: no tokio, no I/O, no clock.
//!
//! The driver feeds [`Input`]s with the time they arrived ([`Machine::handle`]) and carries
//! out the [`Command`]s it gets back; it wakes the machine at [`Machine::next_deadline`]
//! with [`Input::DeadlinePassed`]. Everything a run decides — what to build, whether to stop
//! Klipper, which board to flash next, when a board has failed, when Klipper starts again,
//! what goes into the history — is decided here, so it is tested here, without a rig.
//!
//! ```text
//! run:    Preflight → Building → StoppingKlipper → Flashing → StartingKlipper → Verifying → Done
//!                  ↘ (refused, nothing to flash, cancelled) → Done
//! board:  Queued → Building → Built ─┬→ UpToDate
//!                                    └→ AwaitingBootloader → CheckingTarget → Writing → AwaitingApplication
//!                                       → Identifying → Flashed{view: pending → confirmed | not listed | not checked}
//!         any step → Failed{phase, cause} | LeftInBootloader{phase, cause} | Skipped{cause}
//!         a refusal (wrong MCU, wrong application start) → Releasing → Failed (never another method)
//! ```
//!
//! Guarantees (each proven by the tests in `tests.rs`): Klipper is started exactly once after
//! it was stopped, whatever happens; nothing touches a board while Klipper runs; no write
//! before the bootloader's MCU and application start were checked; a refusal is never retried
//! with another method; at most `policy.parallel` boards are being flashed at once; one board's
//! failure does not stop the others; every board gets exactly one history record.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::event::{Event, EventKind};
use crate::history::{Durations, FlashResult};
use crate::identity::Mode;
use crate::registry::{FlashMethod, Timeouts};

/// Settled before the run (from `--yes`, `--force`, `--only-outdated`, `--parallel` …): the
/// machine never asks.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Flash boards that already run the built version (`--force`, or "Flash anyway? y").
    pub flash_current: bool,
    /// How many boards may be flashed at once (1: one after another).
    pub parallel: usize,
    /// How many builds may run at once.
    pub builds: usize,
    pub deadlines: Deadlines,
}

impl Policy {
    pub fn new(timeouts: &Timeouts) -> Policy {
        Policy { flash_current: false, parallel: 1, builds: 1, deadlines: Deadlines::from_timeouts(timeouts) }
    }
}

/// How long each step of a board may take.
#[derive(Debug, Clone, PartialEq)]
pub struct Deadlines {
    /// From the bootloader request to the board showing up in Katapult.
    pub bootloader: Duration,
    /// Checking the target and writing, per method.
    pub write: Duration,
    /// From the end of the write (or a release) to the board showing up running Klipper.
    pub reconnect: Duration,
    /// Reading the running version from the board.
    pub identify: Duration,
    /// From Klipper's start to Klippy ready with this run's versions.
    pub klippy_ready: Duration,
}

/// How long after a step's own timeout the machine stops waiting for its answer. The work
/// enforces the timeouts itself and says what it found (ignored the request, came back in
/// Katapult …); the machine's deadline is the backstop for work that never answers.
pub const BACKSTOP: Duration = Duration::from_secs(10);

impl Deadlines {
    pub fn from_timeouts(t: &Timeouts) -> Deadlines {
        let secs = |s: u64| Duration::from_secs(s) + BACKSTOP;
        Deadlines {
            bootloader: secs(t.bootloader_secs),
            write: secs(t.flash_secs),
            reconnect: secs(t.reconnect_secs),
            identify: secs(10),
            klippy_ready: secs(t.klippy_ready_secs),
        }
    }
}

/// One board of the plan, in the order it is to be flashed (boards behind a bridge first).
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedBoard {
    pub key: String,
    /// Found sitting in Katapult (an interrupted flash, a first install): no bootloader request.
    pub in_bootloader: bool,
    /// The methods to try, in order: the board's own, then the allowed fallbacks.
    pub methods: Vec<FlashMethod>,
    /// Boards whose flash must be over before this one starts: those behind a USB-to-CAN
    /// bridge, whose reboot takes their bus away.
    pub after: Vec<String>,
}

/// Where the run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    /// Asking Moonraker whether Klipper may be stopped at all.
    Preflight,
    /// Building every board (and reading what they run) while Klipper still runs.
    Building,
    /// The print check again, then the stop.
    StoppingKlipper,
    Flashing,
    StartingKlipper,
    /// Waiting for Klippy to be ready and to report the new versions.
    Verifying,
    Done,
}

/// The step a board failed in, in the order a board goes through them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Preflight,
    Build,
    StopKlipper,
    Bootloader,
    /// Checking the bootloader's MCU and application start against the image.
    CheckTarget,
    Write,
    Reconnect,
    Identify,
    /// Klipper's own view of the board after it started again.
    KlipperVerify,
}

/// Why a step failed. Data, not prose: front ends word it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(tag = "cause", rename_all = "kebab-case")]
pub enum Cause {
    /// The run was interrupted (a signal, the user).
    Cancelled,
    /// The step's deadline passed.
    DeadlinePassed,
    /// The bootloader's MCU or application start does not match the image: nothing was
    /// written, and no other method is tried.
    Refused {
        reason: String,
    },
    /// The board went away during the step.
    DeviceGone,
    VersionMismatch {
        expected: String,
        running: String,
    },
    /// The driver's task for the step ended without an answer (it panicked).
    DriverFailed,
    /// Any other error of the step: its kind ([`crate::Error::kind`]) and message.
    Error {
        kind: String,
        message: String,
    },
}

/// Why Klipper's own view of a flashed board was not checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Unchecked {
    /// Moonraker could not be reached at the print check.
    MoonrakerDown,
    /// `--skip-print-check` passed a check that could not be answered.
    PrintCheckSkipped,
    /// Klipper was not running before kflash and was left stopped.
    KlipperLeftStopped,
    /// Klipper could not be started again.
    KlipperNotStarted,
    Cancelled,
}

/// Klipper's view of a flashed board.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(tag = "klipper", rename_all = "kebab-case")]
pub enum KlipperView {
    /// Klipper has not been asked yet.
    Pending,
    /// Klippy is ready and reports the new version for this board.
    Confirmed,
    /// Klippy is ready, but no `[mcu]` section uses this board's serial.
    NotListed,
    NotChecked {
        why: Unchecked,
    },
}

/// Where a board is. The last five are terminal (with `Flashed` once Klipper's view is in).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum BoardState {
    Queued,
    Building,
    Built,
    AwaitingBootloader,
    CheckingTarget,
    Writing {
        method: FlashMethod,
    },
    AwaitingApplication,
    Identifying,
    /// Refused before any write: sent back to the firmware it had.
    Releasing {
        cause: Cause,
    },
    /// It runs the built version (read from the board itself).
    Flashed {
        view: KlipperView,
    },
    /// It already runs the built version and the policy does not flash current boards.
    UpToDate,
    /// Never touched: the run ended before its turn.
    Skipped {
        cause: Cause,
    },
    Failed {
        phase: Phase,
        cause: Cause,
    },
    /// The write did not complete; the board waits in Katapult for the next flash.
    LeftInBootloader {
        phase: Phase,
        cause: Cause,
    },
}

impl BoardState {
    pub fn is_terminal(&self) -> bool {
        match self {
            BoardState::Flashed { view } => *view != KlipperView::Pending,
            BoardState::UpToDate
            | BoardState::Skipped { .. }
            | BoardState::Failed { .. }
            | BoardState::LeftInBootloader { .. } => true,
            _ => false,
        }
    }

    /// A board held by the flash part of the run (counts against `policy.parallel`).
    pub fn is_flashing(&self) -> bool {
        matches!(
            self,
            BoardState::AwaitingBootloader
                | BoardState::CheckingTarget
                | BoardState::Writing { .. }
                | BoardState::AwaitingApplication
                | BoardState::Identifying
                | BoardState::Releasing { .. }
        )
    }

    /// Whether the board ended as planned: flashed and verified as far as it could be, or
    /// already current.
    pub fn passed(&self) -> bool {
        match self {
            BoardState::UpToDate => true,
            BoardState::Flashed { view } => match view {
                KlipperView::Confirmed | KlipperView::NotListed => true,
                KlipperView::NotChecked { why } => {
                    matches!(
                        why,
                        Unchecked::MoonrakerDown | Unchecked::PrintCheckSkipped | Unchecked::KlipperLeftStopped
                    )
                }
                KlipperView::Pending => false,
            },
            _ => false,
        }
    }

    /// The outcome once the run is interrupted, times out or the step fails with `cause`.
    fn settled(&self, cause: Cause) -> BoardState {
        use BoardState::*;
        match self {
            Queued | Built => Skipped { cause },
            Building if cause == Cause::Cancelled => Skipped { cause },
            Building => Failed { phase: Phase::Build, cause },
            AwaitingBootloader => Failed { phase: Phase::Bootloader, cause },
            CheckingTarget => LeftInBootloader { phase: Phase::CheckTarget, cause },
            Writing { .. } => LeftInBootloader { phase: Phase::Write, cause },
            // Released after a refusal: the refusal is what the user must hear about.
            Releasing { cause: refusal } => LeftInBootloader { phase: Phase::CheckTarget, cause: refusal.clone() },
            AwaitingApplication => Failed { phase: Phase::Reconnect, cause },
            Identifying => Failed { phase: Phase::Identify, cause },
            Flashed { view: KlipperView::Pending } if cause == Cause::Cancelled => {
                Flashed { view: KlipperView::NotChecked { why: Unchecked::Cancelled } }
            }
            Flashed { view: KlipperView::Pending } => Failed { phase: Phase::KlipperVerify, cause },
            done => done.clone(),
        }
    }
}

/// A finished build.
#[derive(Debug, Clone, PartialEq)]
pub struct Built {
    pub version: String,
    pub cached: bool,
    /// What the image is (`Klipper`, `Kalico`), when known.
    pub app: Option<String>,
    pub size: u64,
    /// How long the build (or the cache lookup) took.
    pub secs: f64,
}

impl Built {
    pub fn new(version: &str, cached: bool) -> Built {
        Built { version: version.to_string(), cached, app: None, size: 0, secs: 0.0 }
    }
}

/// What Klipper says after it started again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KlipperAnswer {
    /// Klippy is ready; the version each board's `[mcu]` reports (absent: not in printer.cfg).
    Running(BTreeMap<String, String>),
    /// It could not be asked.
    Unchecked(Unchecked),
}

/// Something the driver saw or finished. `key` names a board of the plan; inputs for a
/// board that is not waiting for them (late, after a deadline or a cancel) are ignored.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// The print-safety gate: `Ok` is a clearance.
    PrinterChecked(Result<(), Cause>),
    BuildFinished {
        key: String,
        result: Result<Built, Cause>,
    },
    /// What the boards run now, by key (absent: unknown, e.g. Moonraker unreachable).
    VersionsRead(BTreeMap<String, String>),
    /// `Err`: Klipper was not stopped (a print started, the service manager failed).
    KlipperStopped(Result<(), Cause>),
    /// The board showed up in `mode`: the answer of [`Command::EnterBootloader`],
    /// [`Command::AwaitApplication`] and [`Command::SendToApplication`].
    DeviceAppeared {
        key: String,
        mode: Mode,
    },
    TargetChecked {
        key: String,
        result: Result<(), Cause>,
    },
    WriteDone {
        key: String,
        result: Result<(), Cause>,
    },
    /// The version the board itself reports.
    Identified {
        key: String,
        result: Result<String, Cause>,
    },
    /// The board's step in flight failed (a touch that could not be sent, a release that did
    /// not go out, a task that panicked).
    BoardFailed {
        key: String,
        cause: Cause,
    },
    /// `Ok(false)`: Klipper was not running before kflash and stays stopped.
    KlipperStarted(Result<bool, Cause>),
    KlippyChecked(Result<KlipperAnswer, Cause>),
    DeadlinePassed,
    Cancel,
}

/// Work the driver can be told to drop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    PrinterCheck,
    Versions,
    Board(String),
    KlipperCheck,
}

/// What the driver is to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Ask the print-safety gate (the first time; the stop asks again).
    CheckPrinter,
    Build {
        key: String,
    },
    ReadVersions,
    /// Re-check print safety and stop Klipper, holding the one guard for the run.
    StopKlipper,
    /// The 1200-baud touch, with the wait for the board in Katapult armed before it.
    EnterBootloader {
        key: String,
    },
    /// Connect to Katapult and check MCU and application start against the image.
    CheckTarget {
        key: String,
    },
    Write {
        key: String,
        method: FlashMethod,
    },
    /// After the write: await the board running Klipper (already there counts: the write's
    /// answer may come after the board is back).
    AwaitApplication {
        key: String,
    },
    /// After a refusal: ask Katapult to start the installed firmware again and await it.
    SendToApplication {
        key: String,
    },
    Identify {
        key: String,
    },
    StartKlipper,
    /// Wait for Klippy ready and read the versions of these boards (key → expected version).
    CheckKlipper {
        expected: BTreeMap<String, String>,
    },
    Abort(Work),
    AppendHistory(BoardReport),
    Emit(Event),
}

impl Command {
    /// The board a step on one board works on (`None` for run-wide commands).
    pub fn board_key(&self) -> Option<&str> {
        match self {
            Command::Build { key }
            | Command::EnterBootloader { key }
            | Command::CheckTarget { key }
            | Command::Write { key, .. }
            | Command::AwaitApplication { key }
            | Command::SendToApplication { key }
            | Command::Identify { key } => Some(key),
            _ => None,
        }
    }
}

/// One board's record of the run, for the history and the summary.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BoardReport {
    pub key: String,
    pub state: BoardState,
    pub built: Option<String>,
    pub cached: Option<bool>,
    pub version_before: Option<String>,
    pub version_after: Option<String>,
    /// The method that wrote the image (differs from the first after a fallback).
    pub method: Option<FlashMethod>,
    pub durations: Durations,
}

impl BoardReport {
    pub fn result(&self) -> FlashResult {
        match &self.state {
            BoardState::UpToDate | BoardState::Skipped { .. } => FlashResult::Skipped,
            s if s.passed() => FlashResult::Ok,
            _ => FlashResult::Failed,
        }
    }
}

/// Klipper, as far as the run is concerned.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Klipper {
    Untouched,
    Stopping,
    Stopped(Instant),
    Starting(Instant),
    /// Start answered (or never needed): nothing more to do with the service.
    Settled,
}

#[derive(Debug)]
struct Slot {
    plan: PlannedBoard,
    state: BoardState,
    since: Instant,
    deadline: Option<Instant>,
    built: Option<Built>,
    version_before: Option<String>,
    version_after: Option<String>,
    method: usize,
    method_used: Option<FlashMethod>,
    /// The first write error, reported if every method fails.
    first_error: Option<Cause>,
    durations: Durations,
    recorded: bool,
}

/// The run's state machine. See the module docs.
#[derive(Debug)]
pub struct Machine {
    policy: Policy,
    run: RunState,
    boards: Vec<Slot>,
    klipper: Klipper,
    downtime: Option<Duration>,
    klipper_start_failed: bool,
    /// What the boards run was read (or found unknowable).
    versions_read: bool,
    cancelled: bool,
    verify_deadline: Option<Instant>,
    out: Vec<Command>,
}

impl Machine {
    /// A run of `plan` under `policy`, starting at `now`; returns the first commands.
    pub fn new(plan: Vec<PlannedBoard>, policy: Policy, now: Instant) -> (Machine, Vec<Command>) {
        let boards = plan
            .into_iter()
            .map(|plan| Slot {
                plan,
                state: BoardState::Queued,
                since: now,
                deadline: None,
                built: None,
                version_before: None,
                version_after: None,
                method: 0,
                method_used: None,
                first_error: None,
                durations: Durations::default(),
                recorded: false,
            })
            .collect();
        let policy = Policy { parallel: policy.parallel.max(1), builds: policy.builds.max(1), ..policy };
        let mut m = Machine {
            policy,
            run: RunState::Preflight,
            boards,
            klipper: Klipper::Untouched,
            downtime: None,
            klipper_start_failed: false,
            versions_read: false,
            cancelled: false,
            verify_deadline: None,
            out: Vec::new(),
        };
        m.emit(Event::run(EventKind::Run { state: RunState::Preflight }));
        m.out.push(Command::CheckPrinter);
        let first = std::mem::take(&mut m.out);
        (m, first)
    }

    pub fn run_state(&self) -> RunState {
        self.run
    }

    pub fn board_state(&self, key: &str) -> Option<&BoardState> {
        self.boards.iter().find(|b| b.plan.key == key).map(|b| &b.state)
    }

    pub fn is_done(&self) -> bool {
        self.run == RunState::Done
    }

    /// Every planned board passed and Klipper runs again if it was stopped.
    pub fn ok(&self) -> bool {
        self.is_done() && !self.cancelled && !self.klipper_start_failed && self.boards.iter().all(|b| b.state.passed())
    }

    /// From the stop to the start of Klipper, once it started again.
    pub fn klipper_downtime(&self) -> Option<Duration> {
        self.downtime
    }

    /// Each board's record, in plan order.
    pub fn reports(&self) -> Vec<BoardReport> {
        self.boards.iter().map(report).collect()
    }

    /// When the driver must wake the machine with [`Input::DeadlinePassed`] at the latest.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.boards.iter().filter_map(|b| b.deadline).chain(self.verify_deadline).min()
    }

    /// Take `input`, which arrived at `now`; return what to do. Deadlines at or before `now`
    /// pass first.
    pub fn handle(&mut self, now: Instant, input: Input) -> Vec<Command> {
        if self.run != RunState::Done {
            self.expire(now);
            self.take(now, input);
            self.advance(now);
            self.record_finished();
        }
        std::mem::take(&mut self.out)
    }

    fn take(&mut self, now: Instant, input: Input) {
        match input {
            Input::PrinterChecked(result) if self.run == RunState::Preflight => self.printer_checked(result, now),
            Input::BuildFinished { key, result } => self.build_finished(&key, result, now),
            Input::VersionsRead(versions) if !self.versions_read => self.take_versions(versions),
            Input::KlipperStopped(result) if self.klipper == Klipper::Stopping => self.klipper_stopped(result, now),
            Input::DeviceAppeared { key, mode } => self.appeared(&key, mode, now),
            Input::TargetChecked { key, result } => {
                let Some(i) = self.waiting(&key, |s| *s == BoardState::CheckingTarget) else { return };
                match result {
                    Ok(()) => self.write(i, now),
                    Err(cause) => self.write_failed(i, cause, now),
                }
            }
            Input::WriteDone { key, result } => self.write_done(&key, result, now),
            Input::Identified { key, result } => self.identified(&key, result, now),
            Input::BoardFailed { key, cause } => {
                let Some(i) = self.waiting(&key, |s| *s == BoardState::Building || s.is_flashing()) else { return };
                let next = self.boards[i].state.settled(cause);
                self.set_state(i, next, now);
            }
            Input::KlipperStarted(result) => self.klipper_started(result, now),
            Input::KlippyChecked(result) if self.run == RunState::Verifying => self.klippy_checked(result, now),
            Input::Cancel if !self.cancelled => self.cancel(now),
            _ => {}
        }
    }

    fn printer_checked(&mut self, result: Result<(), Cause>, now: Instant) {
        match result {
            Ok(()) => {
                self.set_run(RunState::Building);
                self.out.push(Command::ReadVersions);
            }
            Err(cause) => {
                for i in 0..self.boards.len() {
                    self.set_state(i, BoardState::Failed { phase: Phase::Preflight, cause: cause.clone() }, now);
                }
            }
        }
    }

    fn build_finished(&mut self, key: &str, result: Result<Built, Cause>, now: Instant) {
        let Some(i) = self.waiting(key, |s| *s == BoardState::Building) else { return };
        match result {
            Ok(built) => {
                let Built { version, cached, app, size, secs } = built.clone();
                self.emit(Event::board(key, EventKind::Built { version, cached, app, size, secs }));
                self.boards[i].built = Some(built);
                self.set_state(i, BoardState::Built, now);
            }
            Err(cause) => self.set_state(i, BoardState::Failed { phase: Phase::Build, cause }, now),
        }
    }

    fn take_versions(&mut self, versions: BTreeMap<String, String>) {
        for i in 0..self.boards.len() {
            let key = self.boards[i].plan.key.clone();
            self.boards[i].version_before = versions.get(&key).cloned();
            if let Some(version) = versions.get(&key).cloned() {
                let built = self.boards[i].built.as_ref().map(|b| b.version.clone()).unwrap_or_default();
                self.emit(Event::board(&key, EventKind::RunningBefore { version, built }));
            }
        }
        self.versions_read = true;
    }

    /// `Err`: nothing was stopped, so nothing is flashed and nothing is started.
    fn klipper_stopped(&mut self, result: Result<(), Cause>, now: Instant) {
        match result {
            Ok(()) => {
                self.klipper = Klipper::Stopped(now);
                self.emit(Event::run(EventKind::KlipperStopped));
                if !self.cancelled {
                    self.set_run(RunState::Flashing);
                }
            }
            Err(cause) => {
                self.klipper = Klipper::Settled;
                for i in 0..self.boards.len() {
                    if self.boards[i].state == BoardState::Built {
                        let failed = BoardState::Failed { phase: Phase::StopKlipper, cause: cause.clone() };
                        self.set_state(i, failed, now);
                    }
                }
            }
        }
    }

    fn write_done(&mut self, key: &str, result: Result<(), Cause>, now: Instant) {
        let Some(i) = self.waiting(key, |s| matches!(s, BoardState::Writing { .. })) else { return };
        if let Err(cause) = result {
            return self.write_failed(i, cause, now);
        }
        let slot = &mut self.boards[i];
        slot.method_used = slot.plan.methods.get(slot.method).copied();
        let deadline = now + self.policy.deadlines.reconnect;
        self.set_state(i, BoardState::AwaitingApplication, now);
        self.boards[i].deadline = Some(deadline);
        self.out.push(Command::AwaitApplication { key: key.to_string() });
    }

    /// The version read from the board itself must be the one built.
    fn identified(&mut self, key: &str, result: Result<String, Cause>, now: Instant) {
        let Some(i) = self.waiting(key, |s| *s == BoardState::Identifying) else { return };
        let expected = self.boards[i].built.as_ref().map(|b| b.version.clone()).unwrap_or_default();
        let next = match result {
            Ok(running) => {
                self.boards[i].version_after = Some(running.clone());
                if running == expected {
                    BoardState::Flashed { view: KlipperView::Pending }
                } else {
                    BoardState::Failed { phase: Phase::Identify, cause: Cause::VersionMismatch { expected, running } }
                }
            }
            Err(cause) => BoardState::Failed { phase: Phase::Identify, cause },
        };
        self.set_state(i, next, now);
    }

    /// Klipper's start answered: ask it about the flashed boards, unless it cannot be asked.
    fn klipper_started(&mut self, result: Result<bool, Cause>, now: Instant) {
        let Klipper::Starting(stopped) = self.klipper else { return };
        self.klipper = Klipper::Settled;
        let downtime = now.saturating_duration_since(stopped);
        self.downtime = Some(downtime);
        let downtime_secs = downtime.as_secs_f64();
        let unchecked = match result {
            Ok(running) => {
                self.emit(Event::run(EventKind::KlipperStarted { downtime_secs, running }));
                (!running).then_some(Unchecked::KlipperLeftStopped)
            }
            Err(cause) => {
                self.klipper_start_failed = true;
                self.emit(Event::run(EventKind::KlipperNotStarted { downtime_secs, cause }));
                Some(Unchecked::KlipperNotStarted)
            }
        };
        if let Some(why) = if self.cancelled { Some(Unchecked::Cancelled) } else { unchecked } {
            return self.settle_pending(why, now);
        }
        let expected: BTreeMap<String, String> = self
            .boards
            .iter()
            .filter(|b| pending(b))
            .map(|b| (b.plan.key.clone(), b.version_after.clone().unwrap_or_default()))
            .collect();
        if !expected.is_empty() {
            self.set_run(RunState::Verifying);
            self.verify_deadline = Some(now + self.policy.deadlines.klippy_ready);
            self.out.push(Command::CheckKlipper { expected });
        }
    }

    fn klippy_checked(&mut self, result: Result<KlipperAnswer, Cause>, now: Instant) {
        self.verify_deadline = None;
        let running = match result {
            Ok(KlipperAnswer::Running(running)) => running,
            Ok(KlipperAnswer::Unchecked(why)) => return self.settle_pending(why, now),
            Err(cause) => return self.settle_all(cause, now),
        };
        for i in 0..self.boards.len() {
            if !pending(&self.boards[i]) {
                continue;
            }
            let expected = self.boards[i].version_after.clone().unwrap_or_default();
            let next = match running.get(&self.boards[i].plan.key) {
                Some(v) if *v == expected => BoardState::Flashed { view: KlipperView::Confirmed },
                Some(v) => BoardState::Failed {
                    phase: Phase::KlipperVerify,
                    cause: Cause::VersionMismatch { expected, running: v.clone() },
                },
                None => BoardState::Flashed { view: KlipperView::NotListed },
            };
            self.set_state(i, next, now);
        }
    }

    /// Everything the driver is still doing is dropped; Klipper is started if it was stopped
    /// (a stop in flight is let finish, so its outcome is known).
    fn cancel(&mut self, now: Instant) {
        self.cancelled = true;
        match self.run {
            RunState::Preflight => self.out.push(Command::Abort(Work::PrinterCheck)),
            RunState::Building if !self.versions_read => self.out.push(Command::Abort(Work::Versions)),
            RunState::Verifying => {
                self.verify_deadline = None;
                self.out.push(Command::Abort(Work::KlipperCheck));
            }
            _ => {}
        }
        self.settle_all(Cause::Cancelled, now);
    }

    /// Every board not yet finished takes `cause` in its current step.
    fn settle_all(&mut self, cause: Cause, now: Instant) {
        for i in 0..self.boards.len() {
            if !self.boards[i].state.is_terminal() {
                self.give_up(i, cause.clone(), now);
            }
        }
    }

    /// The machine stops waiting for board `i`: the driver drops the step in flight, and the
    /// board ends where it was with `cause`.
    fn give_up(&mut self, i: usize, cause: Cause, now: Instant) {
        let state = &self.boards[i].state;
        if *state == BoardState::Building || state.is_flashing() {
            self.out.push(Command::Abort(Work::Board(self.boards[i].plan.key.clone())));
        }
        let next = state.settled(cause);
        self.set_state(i, next, now);
    }

    /// Flashed boards whose Klipper view is pending get `why` as the reason it was not checked.
    fn settle_pending(&mut self, why: Unchecked, now: Instant) {
        for i in 0..self.boards.len() {
            if pending(&self.boards[i]) {
                self.set_state(i, BoardState::Flashed { view: KlipperView::NotChecked { why } }, now);
            }
        }
    }

    fn appeared(&mut self, key: &str, mode: Mode, now: Instant) {
        let Some(i) = self.boards.iter().position(|b| b.plan.key == key) else { return };
        match (&self.boards[i].state, mode) {
            (BoardState::AwaitingBootloader, Mode::Katapult) => self.check_target(i, now),
            (BoardState::AwaitingApplication, Mode::Klipper) => self.identify(i, now),
            (BoardState::Releasing { cause }, Mode::Klipper) => {
                let failed = BoardState::Failed { phase: Phase::CheckTarget, cause: cause.clone() };
                self.set_state(i, failed, now);
            }
            _ => {}
        }
    }

    fn check_target(&mut self, i: usize, now: Instant) {
        let deadline = now + self.policy.deadlines.write;
        self.set_state(i, BoardState::CheckingTarget, now);
        self.boards[i].deadline = Some(deadline);
        self.out.push(Command::CheckTarget { key: self.boards[i].plan.key.clone() });
    }

    fn write(&mut self, i: usize, now: Instant) {
        let slot = &self.boards[i];
        let Some(&method) = slot.plan.methods.get(slot.method) else {
            let cause = slot
                .first_error
                .clone()
                .unwrap_or(Cause::Error { kind: "no-method".into(), message: "no flash method was planned".into() });
            return self.set_state(i, BoardState::LeftInBootloader { phase: Phase::Write, cause }, now);
        };
        let deadline = now + self.policy.deadlines.write;
        self.set_state(i, BoardState::Writing { method }, now);
        self.boards[i].deadline = Some(deadline);
        self.out.push(Command::Write { key: self.boards[i].plan.key.clone(), method });
    }

    /// A check or write failed. A refusal sends the board back untouched; a board that went
    /// away is not chased; anything else tries the next method while one is left.
    fn write_failed(&mut self, i: usize, cause: Cause, now: Instant) {
        let key = self.boards[i].plan.key.clone();
        let phase = if self.boards[i].state == BoardState::CheckingTarget { Phase::CheckTarget } else { Phase::Write };
        match cause {
            Cause::Refused { .. } => {
                let deadline = now + self.policy.deadlines.reconnect;
                self.set_state(i, BoardState::Releasing { cause }, now);
                self.boards[i].deadline = Some(deadline);
                self.out.push(Command::SendToApplication { key });
            }
            Cause::DeviceGone => self.set_state(i, BoardState::Failed { phase, cause }, now),
            cause if phase == Phase::Write && self.boards[i].method + 1 < self.boards[i].plan.methods.len() => {
                let slot = &mut self.boards[i];
                let from = slot.plan.methods[slot.method];
                slot.method += 1;
                let to = slot.plan.methods[slot.method];
                slot.first_error.get_or_insert(cause.clone());
                self.emit(Event::board(&key, EventKind::MethodFallback { from, to, cause }));
                self.write(i, now);
            }
            cause => {
                let cause = self.boards[i].first_error.clone().unwrap_or(cause);
                self.set_state(i, BoardState::LeftInBootloader { phase, cause }, now);
            }
        }
    }

    fn identify(&mut self, i: usize, now: Instant) {
        let deadline = now + self.policy.deadlines.identify;
        self.set_state(i, BoardState::Identifying, now);
        self.boards[i].deadline = Some(deadline);
        self.out.push(Command::Identify { key: self.boards[i].plan.key.clone() });
    }

    /// Deadlines at or before `now` fail their step.
    fn expire(&mut self, now: Instant) {
        for i in 0..self.boards.len() {
            if self.boards[i].deadline.is_some_and(|d| d <= now) {
                self.give_up(i, Cause::DeadlinePassed, now);
            }
        }
        if self.verify_deadline.is_some_and(|d| d <= now) {
            self.verify_deadline = None;
            self.out.push(Command::Abort(Work::KlipperCheck));
            self.settle_all(Cause::DeadlinePassed, now);
        }
    }

    /// Start whatever may start now, and move the run on when its part is finished.
    fn advance(&mut self, now: Instant) {
        loop {
            let before = self.run;
            match self.run {
                RunState::Preflight if self.boards.iter().all(|b| b.state.is_terminal()) => self.finish(),
                RunState::Building => self.advance_builds(now),
                RunState::StoppingKlipper if self.klipper == Klipper::Settled => self.finish(),
                RunState::StoppingKlipper => {
                    if let Klipper::Stopped(at) = self.klipper {
                        // Cancelled while the stop was under way: start it again at once.
                        self.start_klipper(at);
                    }
                }
                RunState::Flashing => self.advance_flashes(now),
                RunState::StartingKlipper if self.klipper == Klipper::Settled => self.finish(),
                RunState::Verifying if !self.boards.iter().any(pending) => self.finish(),
                _ => {}
            }
            if self.run == before {
                break;
            }
        }
    }

    fn advance_builds(&mut self, now: Instant) {
        if self.cancelled {
            return self.finish();
        }
        let building = self.boards.iter().filter(|b| b.state == BoardState::Building).count();
        let queued: Vec<usize> =
            (0..self.boards.len()).filter(|&i| self.boards[i].state == BoardState::Queued).collect();
        for &i in queued.iter().take(self.policy.builds.saturating_sub(building)) {
            self.set_state(i, BoardState::Building, now);
            self.out.push(Command::Build { key: self.boards[i].plan.key.clone() });
        }
        let all_built = self.boards.iter().all(|b| !matches!(b.state, BoardState::Queued | BoardState::Building));
        if !all_built || !self.versions_read {
            return;
        }
        for i in 0..self.boards.len() {
            let b = &self.boards[i];
            let current = b.version_before.is_some() && b.version_before == b.built.as_ref().map(|x| x.version.clone());
            if b.state == BoardState::Built && current && !self.policy.flash_current {
                self.boards[i].version_after = self.boards[i].version_before.clone();
                self.set_state(i, BoardState::UpToDate, now);
            }
        }
        if self.boards.iter().any(|b| b.state == BoardState::Built) {
            self.klipper = Klipper::Stopping;
            self.set_run(RunState::StoppingKlipper);
            self.out.push(Command::StopKlipper);
        } else {
            self.finish();
        }
    }

    fn advance_flashes(&mut self, now: Instant) {
        let Klipper::Stopped(stopped) = self.klipper else { return };
        if !self.cancelled {
            let mut busy = self.boards.iter().filter(|b| b.state.is_flashing()).count();
            for i in 0..self.boards.len() {
                if busy >= self.policy.parallel {
                    break;
                }
                if self.boards[i].state != BoardState::Built || self.waits_for_others(i) {
                    continue;
                }
                busy += 1;
                if self.boards[i].plan.in_bootloader {
                    self.check_target(i, now);
                } else {
                    let deadline = now + self.policy.deadlines.bootloader;
                    self.set_state(i, BoardState::AwaitingBootloader, now);
                    self.boards[i].deadline = Some(deadline);
                    self.out.push(Command::EnterBootloader { key: self.boards[i].plan.key.clone() });
                }
            }
        }
        let finished = self.boards.iter().all(|b| !b.state.is_flashing() && b.state != BoardState::Built);
        if finished {
            self.start_klipper(stopped);
        }
    }

    /// Whether a board its plan puts after is still to be flashed or being flashed.
    fn waits_for_others(&self, i: usize) -> bool {
        self.boards[i].plan.after.iter().any(|key| {
            self.boards.iter().any(|b| {
                &b.plan.key == key
                    && (b.state.is_flashing()
                        || matches!(b.state, BoardState::Queued | BoardState::Building | BoardState::Built))
            })
        })
    }

    /// The one place that starts Klipper: only from `Stopped`, which it leaves for good.
    fn start_klipper(&mut self, stopped: Instant) {
        self.klipper = Klipper::Starting(stopped);
        self.set_run(RunState::StartingKlipper);
        self.out.push(Command::StartKlipper);
    }

    fn finish(&mut self) {
        self.set_run(RunState::Done);
    }

    /// The board `key`, if its state is one `waiting` accepts.
    fn waiting(&self, key: &str, waiting: impl Fn(&BoardState) -> bool) -> Option<usize> {
        self.boards.iter().position(|b| b.plan.key == key && waiting(&b.state))
    }

    fn set_run(&mut self, state: RunState) {
        if self.run != state {
            self.run = state;
            self.emit(Event::run(EventKind::Run { state }));
        }
    }

    /// Move a board on, booking the time of the step it leaves.
    fn set_state(&mut self, i: usize, state: BoardState, now: Instant) {
        let slot = &mut self.boards[i];
        let spent = now.saturating_duration_since(slot.since).as_secs_f64();
        let add = |d: &mut Option<f64>| *d = Some(d.unwrap_or(0.0) + spent);
        let d = &mut slot.durations;
        match slot.state {
            BoardState::Building => add(&mut d.build),
            BoardState::AwaitingBootloader => add(&mut d.bootloader),
            BoardState::CheckingTarget | BoardState::Writing { .. } | BoardState::Releasing { .. } => add(&mut d.flash),
            BoardState::AwaitingApplication | BoardState::Identifying => add(&mut d.verify),
            _ => {}
        }
        slot.state = state.clone();
        slot.since = now;
        slot.deadline = None;
        let key = slot.plan.key.clone();
        self.emit(Event::board(&key, EventKind::Board { state }));
    }

    /// Each finished board's history record, once, as soon as nothing about it can change:
    /// the records of boards that went through the flash wait for Klipper's start, so they
    /// carry the downtime.
    fn record_finished(&mut self) {
        let klipper_open = matches!(self.klipper, Klipper::Stopping | Klipper::Stopped(_) | Klipper::Starting(_));
        for i in 0..self.boards.len() {
            let b = &self.boards[i];
            if b.recorded || !b.state.is_terminal() {
                continue;
            }
            let flashed = b.durations.bootloader.is_some() || b.durations.flash.is_some();
            if flashed && klipper_open {
                continue;
            }
            let mut r = report(b);
            if flashed {
                r.durations.klipper_downtime = self.downtime.map(|d| d.as_secs_f64());
            }
            self.boards[i].recorded = true;
            self.out.push(Command::AppendHistory(r));
        }
    }

    fn emit(&mut self, e: Event) {
        self.out.push(Command::Emit(e));
    }
}

fn pending(b: &Slot) -> bool {
    b.state == BoardState::Flashed { view: KlipperView::Pending }
}

fn report(b: &Slot) -> BoardReport {
    BoardReport {
        key: b.plan.key.clone(),
        state: b.state.clone(),
        built: b.built.as_ref().map(|x| x.version.clone()),
        cached: b.built.as_ref().map(|x| x.cached),
        version_before: b.version_before.clone(),
        version_after: b.version_after.clone(),
        method: b.method_used,
        durations: b.durations.clone(),
    }
}
