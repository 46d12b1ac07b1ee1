//! Runs the [`Machine`]: each command the machine gives becomes a future, each future's
//! answer goes back in with the time it arrived, and the machine's next deadline is a timer. The I/O itself lives behind [`Effects`]. The futures run inside
//! the driver's own task (they may borrow the caller's registry, hotplug handle, reporter).
//!
//! - Work that panics answers for itself: the machine gets its step's failure
//!   ([`Cause::DriverFailed`]), so Klipper is still started and the board still recorded.
//! - [`Command::Abort`] drops the work (the step's deadline passed, or the run was cancelled).
//! - `cancel` (a signal) is fed once as [`Input::Cancel`]; the run then ends as the machine
//!   decides: Klipper started if it was stopped, every board recorded.
//!
//! The parallel limit is the machine's decision; the driver starts what it is told.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures::future::{AbortHandle, Abortable, LocalBoxFuture};
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use tokio::time::Instant;

use super::machine::{BoardReport, Cause, Command, Input, Machine, Work};
use crate::event::Event;

/// The run's I/O: what the driver calls to carry out the machine's commands. The work runs
/// as futures inside the driver's own task, so it may borrow what the caller owns (the
/// registry, the hotplug handle, the reporter).
pub trait Effects {
    /// Start `command`'s work. The output is the machine's answer; `None` answers nothing
    /// (the machine's deadline ends the wait). Only work commands come here, never `Emit`,
    /// `AppendHistory` or `Abort`.
    fn start(&self, command: Command) -> LocalBoxFuture<'_, Option<Input>>;
    fn emit(&self, event: Event);
    fn record(&self, report: BoardReport);
}

/// Run `machine` from its first commands until it is done, feeding it the answers of the
/// work and one `Cancel` when `cancel` completes. Returns the finished machine (its reports, `ok()`, the downtime).
pub async fn drive<E: Effects + ?Sized>(
    mut machine: Machine,
    first: Vec<Command>,
    effects: &E,
    cancel: impl Future<Output = ()>,
) -> Machine {
    let mut work = FuturesUnordered::new();
    // Each piece of work's command, to answer for it if it panics, and its handle, to drop it.
    let mut running: HashMap<u64, (Command, AbortHandle)> = HashMap::new();
    let mut next_id = 0u64;
    let mut commands = first;
    tokio::pin!(cancel);
    let mut cancelled = false;
    loop {
        for command in commands.drain(..) {
            match command {
                Command::Emit(e) => effects.emit(e),
                Command::AppendHistory(r) => effects.record(r),
                Command::Abort(what) => running.retain(|_, (c, handle)| {
                    let hit = work_of(c).as_ref() == Some(&what);
                    if hit {
                        handle.abort();
                    }
                    !hit
                }),
                command => {
                    let (handle, registration) = AbortHandle::new_pair();
                    let id = next_id;
                    next_id += 1;
                    let future = AssertUnwindSafe(effects.start(command.clone())).catch_unwind();
                    let future = Abortable::new(future, registration);
                    work.push(async move { (id, future.await) });
                    running.insert(id, (command, handle));
                }
            }
        }
        if machine.is_done() {
            break;
        }
        let deadline = machine.next_deadline().map(Instant::from_std);
        if work.is_empty() && deadline.is_none() {
            // Nothing can ever answer: a bug in the effects, not a state to wait in forever.
            tracing::error!("the flash run has nothing left to wait for in state {:?}", machine.run_state());
            break;
        }
        let input = tokio::select! {
            biased;
            _ = &mut cancel, if !cancelled => {
                cancelled = true;
                Some(Input::Cancel)
            }
            Some((id, result)) = work.next(), if !work.is_empty() => {
                let command = running.remove(&id).map(|(c, _)| c);
                match result {
                    Ok(Ok(answer)) => answer,
                    // The work panicked: its step failed.
                    Ok(Err(_panic)) => command.map(lost),
                    // Dropped on the machine's word: it expects no answer.
                    Err(_aborted) => None,
                }
            }
            _ = sleep_until(deadline), if deadline.is_some() => Some(Input::DeadlinePassed),
        };
        if let Some(input) = input {
            commands = machine.handle(Instant::now().into_std(), input);
        }
    }
    machine
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// What a command's work can be dropped as.
fn work_of(command: &Command) -> Option<Work> {
    if let Some(key) = command.board_key() {
        return Some(Work::Board(key.to_string()));
    }
    match command {
        Command::CheckPrinter => Some(Work::PrinterCheck),
        Command::ReadVersions => Some(Work::Versions),
        Command::CheckKlipper { .. } => Some(Work::KlipperCheck),
        // Klipper's stop and start are never dropped halfway.
        _ => None,
    }
}

/// The answer for a command whose task panicked: its step failed.
fn lost(command: Command) -> Input {
    let cause = Cause::DriverFailed;
    if let Some(key) = command.board_key() {
        return Input::BoardFailed { key: key.to_string(), cause };
    }
    match command {
        Command::CheckPrinter => Input::PrinterChecked(Err(cause)),
        Command::ReadVersions => Input::VersionsRead(Default::default()),
        Command::StopKlipper => Input::KlipperStopped(Err(cause)),
        Command::StartKlipper => Input::KlipperStarted(Err(cause)),
        Command::CheckKlipper { .. } => Input::KlippyChecked(Err(cause)),
        _ => Input::DeadlinePassed,
    }
}
