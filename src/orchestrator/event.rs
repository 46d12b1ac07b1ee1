//! The one progress stream of a flash run: structured events (a board key and a kind, no
//! prose), for the CLI, `--json`, the daemon and the dashboard alike. Front ends turn them
//! into words; the library only says what happened.

use serde::Serialize;

use super::machine::{BoardState, Cause, RunState};
use crate::registry::FlashMethod;

/// Something that happened in a run. `board` is `None` for the run as a whole.
#[derive(Debug, Clone, PartialEq, Serialize)]
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

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum EventKind {
    /// The run entered a new state.
    Run { state: RunState },
    /// A board entered a new state; terminal states carry the outcome (phase and cause).
    Board { state: BoardState },
    /// A board's image is ready.
    Built { version: String, cached: bool },
    /// What the board runs before the flash, as Klipper reported it.
    RunningBefore { version: String },
    /// A write failed in a way that allows another method; the next one is tried.
    MethodFallback { from: FlashMethod, to: FlashMethod, cause: Cause },
    /// Klipper was stopped for the flashes.
    KlipperStopped,
    /// Klipper runs again (or was left stopped because it was not running before kflash).
    KlipperStarted { downtime_secs: f64, running: bool },
    /// Klipper could not be started again; the next kflash run retries from its marker.
    KlipperNotStarted { downtime_secs: f64, cause: Cause },
}
