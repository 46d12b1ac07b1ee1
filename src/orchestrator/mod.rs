//! The flash orchestrator: one design for `kflash flash KEY` and `kflash flash-all`.
//!
//! - [`machine`]: the run's decisions as a pure state machine (no I/O, no clock), unit-tested
//!   on every path;
//! - [`crate::event`]: the one structured progress stream it emits (with every other layer);
//! - [`driver`]: runs the machine's commands as futures behind an [`driver::Effects`] trait,
//!   with the machine's deadlines as timers, panics answered as failed steps, and a cancel.
//!
//! The `Effects` that does the real I/O (print gate, build, Klipper guard, udev, Katapult,
//! Moonraker) is `app::flash_effects`; `kflash flash KEY` ([`crate::app::flash::flash_one`])
//! is a run with one board.

pub mod driver;
pub mod machine;

#[cfg(test)]
mod driver_tests;
#[cfg(test)]
mod tests;

pub use crate::event::{Event, EventKind};
pub use machine::{
    BoardReport, BoardState, Built, Cause, Command, Deadlines, Input, KlipperAnswer, KlipperView, Machine, Phase,
    PlannedBoard, Policy, RunState, Unchecked, Work,
};
