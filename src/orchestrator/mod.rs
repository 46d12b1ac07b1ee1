//! The flash orchestrator: one design for `kflash flash KEY` and `kflash flash-all`.
//!
//! - [`machine`]: the run's decisions as a pure state machine (no I/O, no clock), unit-tested
//!   on every path;
//! - [`event`]: the one structured progress stream it emits;
//! - [`driver`]: runs the machine's commands as futures behind an [`driver::Effects`] trait,
//!   with the machine's deadlines as timers, panics answered as failed steps, and a cancel.
//!
//! Not yet wired: the `Effects` that does the real I/O (print gate, build, Klipper guard,
//! Katapult, hotplug) and `kflash flash KEY` running through it; today's `kflash flash`
//! still runs [`crate::app::flash`].

pub mod driver;
pub mod event;
pub mod machine;

#[cfg(test)]
mod driver_tests;
#[cfg(test)]
mod tests;

pub use event::{Event, EventKind};
pub use machine::{
    BoardReport, BoardState, Built, Cause, Command, Deadlines, Input, KlipperAnswer, KlipperView, Machine, Phase,
    PlannedBoard, Policy, RunState, Unchecked, Work,
};
