//! The one progress stream of kflash: structured events (a board key and a kind, no prose),
//! for the CLI, `--json`, the daemon and the dashboard alike.
//!
//! Every layer says what happened through it: the orchestrator's machine (run and board
//! states), the print gate, the build (its output lines, a wait for another build's lock, the
//! Kconfig check), Katapult's block-by-block progress, and each step of the flash. Lower layers
//! that do not know which board they work for take a [`Progress`]; the run wraps it with the
//! board's key. [`words`] turns an event into the line a person reads, the same for every
//! front end.

pub mod words;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::firmware::Migration;
use crate::orchestrator::{BoardState, Cause, RunState};
use crate::protocol::katapult::ConnectInfo;
use crate::registry::FlashMethod;

/// Something that happened. `board` is `None` for the run as a whole.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub board: Option<String>,
    #[serde(flatten)]
    pub kind: EventKind,
}

impl Event {
    pub fn run(kind: EventKind) -> Event {
        Event { board: None, kind }
    }

    pub fn board(key: &str, kind: EventKind) -> Event {
        Event { board: Some(key.to_string()), kind }
    }
}

/// Where events go. Lower layers (a build, a Katapult session) emit kinds; whoever called
/// them knows which board it is about.
pub trait Progress: Send {
    fn emit(&mut self, kind: EventKind);
}

/// Nobody listens.
impl Progress for () {
    fn emit(&mut self, _kind: EventKind) {}
}

/// Collects the kinds (tests, and callers that look at them afterwards).
impl Progress for Vec<EventKind> {
    fn emit(&mut self, kind: EventKind) {
        self.push(kind);
    }
}

/// Why Klipper's own view of the flashed boards was not checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NotChecked {
    MoonrakerDown,
    PrintCheckSkipped,
    KlipperLeftStopped,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum EventKind {
    // ---- the orchestrator's machine ------------------------------------------------------
    /// The run entered a new state.
    Run {
        state: RunState,
    },
    /// A board entered a new state; terminal states carry the outcome (phase and cause).
    Board {
        state: BoardState,
    },
    /// A board's image is ready.
    Built {
        version: String,
        cached: bool,
        app: Option<String>,
        size: u64,
        secs: f64,
    },
    /// What the board runs before the flash, as Klipper reported it, and what was built.
    RunningBefore {
        version: String,
        built: String,
    },
    /// A write failed in a way that allows another method; the next one is tried.
    MethodFallback {
        from: FlashMethod,
        to: FlashMethod,
        cause: Cause,
    },
    /// Klipper was stopped for the flashes.
    KlipperStopped,
    /// Klipper runs again (or was left stopped because it was not running before kflash).
    KlipperStarted {
        downtime_secs: f64,
        running: bool,
    },
    /// Klipper could not be started again; the next kflash run retries from its marker.
    KlipperNotStarted {
        downtime_secs: f64,
        cause: Cause,
    },

    // ---- the print gate ------------------------------------------------------------------
    /// Moonraker is asked whether a print runs (`again`: right before the stop).
    PrintCheckStarted {
        url: String,
        again: bool,
    },
    /// Nothing is printing (`print_state`: `print_stats`, when Klippy has it).
    PrinterIdle {
        print_state: Option<String>,
        klippy_starting: bool,
    },
    /// Moonraker says Klippy is not connected, so nothing prints through it.
    KlippyDisconnected {
        reason: String,
    },
    /// Klippy is shut down or in error: nothing moves.
    KlippyHalted {
        state: String,
        message: Option<String>,
    },
    /// Klippy is halted, but `print_stats` still names a print from before the halt.
    HaltedWithPrint {
        state: String,
        message: Option<String>,
        print: String,
    },
    /// `--skip-print-check` passed a check Moonraker could not answer.
    PrintCheckSkipped {
        error: String,
    },
    /// Nothing listens at Moonraker's address.
    MoonrakerDown {
        error: String,
    },

    // ---- the build -----------------------------------------------------------------------
    BuildStarted {
        name: String,
    },
    /// Another build holds the build directory (`out_dir`) or the tree's turn.
    BuildWaiting {
        tree: PathBuf,
        out_dir: Option<PathBuf>,
    },
    /// The build waited for was this very firmware: it is taken from the cache.
    BuildShared,
    /// The tree's Kconfig changed the board's config, or warned about it.
    ConfigChecked {
        migration: Migration,
    },
    /// One line of make's output.
    BuildOutput {
        line: String,
    },
    /// Klippy's view of the running versions is not trusted in this state.
    VersionsUntrusted {
        klippy_state: String,
    },

    // ---- Klipper's service ---------------------------------------------------------------
    KlipperStopping {
        service: String,
    },
    /// The service was not running before kflash; it will be left stopped.
    KlipperWasStopped {
        service: String,
    },
    KlipperStarting {
        service: String,
    },
    /// The start failed (the machine's [`EventKind::KlipperNotStarted`] says what follows).
    KlipperStartFailed {
        error: String,
    },
    /// `katapult-check`'s own start (it runs no orchestrator): after `downtime_secs`, or left
    /// stopped because it was not running before kflash.
    KlipperRestarted {
        service: String,
        downtime_secs: f64,
        started: bool,
    },

    // ---- the flash -----------------------------------------------------------------------
    /// A CAN board's interface passed the preflight (before Klipper is stopped). `bitrate` is
    /// `None` when it cannot be read (`note` says why).
    CanInterfaceChecked {
        interface: String,
        txqueuelen: Option<u32>,
        bitrate: Option<u32>,
        want_bitrate: Option<u32>,
        note: Option<String>,
    },
    /// Another CAN operation holds the interface: this one waits its turn.
    CanInterfaceBusy {
        interface: String,
    },
    /// The CAN admin message asking the node for its bootloader went out.
    CanBootloaderRequested {
        interface: String,
        uuid: String,
    },
    /// A USB-to-CAN bridge's CAN interface is back and UP after its reflash: brought up by
    /// kflash (at `bitrate`, txqueuelen 128) or by the system (networkd, ifupdown).
    CanInterfaceBack {
        interface: String,
        by_kflash: bool,
        bitrate: Option<u32>,
        secs: f64,
    },
    BootloaderRequested,
    InBootloader {
        devnode: Option<String>,
        secs: f64,
    },
    /// Nothing answered the bootloader request; the USB port is reset.
    UsbReset {
        why: String,
    },
    KatapultConnected {
        info: ConnectInfo,
    },
    WriteStarted {
        method: FlashMethod,
        bytes: Option<usize>,
        device: Option<String>,
    },
    WriteProgress {
        done: usize,
        total: usize,
    },
    ReadBackProgress {
        done: usize,
        total: usize,
    },
    EndOfFile {
        pages: u32,
    },
    WriteCompleted,
    Written {
        method: FlashMethod,
        blocks: Option<usize>,
        pages: Option<u32>,
        secs: f64,
    },
    /// After a fallback, the next method failed too (the first error stays the board's).
    MethodFailedToo {
        method: FlashMethod,
        error: String,
    },
    AwaitingApplication,
    BackInApplication {
        devnode: Option<String>,
        secs: f64,
    },
    /// After a refusal: nothing was written, and the board runs its old firmware again.
    SentBack,
    /// After a refusal: nothing was written, but the board stays in its bootloader.
    LeftInBootloader {
        error: String,
    },
    Identifying,
    Identified {
        version: String,
        secs: f64,
    },

    // ---- Klipper's view after the start ----------------------------------------------------
    KlippyNotChecked {
        why: NotChecked,
    },
    AwaitingKlippy,
    /// Klippy stays shut down after an emergency stop: kflash sends FIRMWARE_RESTART.
    FirmwareRestart {
        state: String,
        message: Option<String>,
    },
    /// Klippy is ready and reports the flashed version for this board.
    KlippyReports {
        version: String,
        secs: f64,
    },
    /// No `[mcu]` of printer.cfg uses this board's serial.
    NoMcuSection,

    /// The flash history could not be written.
    HistoryNotWritten {
        error: String,
    },
}
