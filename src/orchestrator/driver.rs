//! Runs the [`Machine`]: each command the machine gives becomes a task, each task's answer
//! (or the hotplug stream's) goes back in with the time it arrived, and the machine's next
//! deadline is a timer. The I/O itself lives behind [`Effects`].
//!
//! - A task that panics answers for itself: the machine gets its step's failure
//!   ([`Cause::DriverFailed`]), so Klipper is still started and the board still recorded.
//! - [`Command::Abort`] drops the task (a cancelled future: the step's deadline passed, or
//!   the run was cancelled).
//! - `cancel` (a signal) is fed once as [`Input::Cancel`]; the run then ends as the machine
//!   decides: Klipper started if it was stopped, every board recorded.
//!
//! The parallel limit is the machine's decision; the driver starts what it is told.

use std::collections::HashMap;
use std::future::Future;

use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, Id, JoinSet};
use tokio::time::Instant;

use super::event::Event;
use super::machine::{BoardReport, Cause, Command, Input, Machine, Work};

/// The run's I/O: what the driver calls to carry out the machine's commands.
pub trait Effects: Send + Sync + 'static {
    /// Start `command`'s work. The output is the machine's answer, or `None` when the answer
    /// comes from the hotplug stream (the bootloader request: the board's arrival is the
    /// answer). Only work commands come here, never `Emit`, `AppendHistory` or `Abort`.
    fn start(&self, command: Command) -> BoxFuture<'static, Option<Input>>;
    fn emit(&self, event: Event);
    fn record(&self, report: BoardReport);
}

/// Run `machine` from its first commands until it is done, feeding it the answers of the
/// tasks, the `hotplug` inputs (planned boards appearing) and one `Cancel` when `cancel`
/// completes. Returns the finished machine (its reports, `ok()`, the downtime).
pub async fn drive<E: Effects>(
    mut machine: Machine,
    first: Vec<Command>,
    effects: std::sync::Arc<E>,
    mut hotplug: mpsc::UnboundedReceiver<Input>,
    cancel: impl Future<Output = ()>,
) -> Machine {
    let mut tasks: JoinSet<Option<Input>> = JoinSet::new();
    // Each task's command, to answer for it if it panics, and its handle, to drop it.
    let mut running: HashMap<Id, (Command, AbortHandle)> = HashMap::new();
    let mut commands = first;
    let mut hotplug_open = true;
    tokio::pin!(cancel);
    let mut cancelled = false;
    loop {
        for command in commands.drain(..) {
            match command {
                Command::Emit(e) => effects.emit(e),
                Command::AppendHistory(r) => effects.record(r),
                Command::Abort(work) => {
                    running.retain(|_, (c, handle)| {
                        let hit = work_of(c).as_ref() == Some(&work);
                        if hit {
                            handle.abort();
                        }
                        !hit
                    });
                }
                work => {
                    let handle = tasks.spawn(effects.start(work.clone()));
                    running.insert(handle.id(), (work, handle));
                }
            }
        }
        if machine.is_done() {
            break;
        }
        let deadline = machine.next_deadline().map(Instant::from_std);
        if cancelled && tasks.is_empty() && !hotplug_open && deadline.is_none() {
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
            Some(done) = tasks.join_next_with_id(), if !tasks.is_empty() => match done {
                Ok((id, answer)) => {
                    running.remove(&id);
                    answer
                }
                Err(e) => running.remove(&e.id()).and_then(|(command, _)| e.is_panic().then(|| lost(command))),
            },
            input = hotplug.recv(), if hotplug_open => {
                hotplug_open = input.is_some();
                input
            }
            _ = sleep_until(deadline), if deadline.is_some() => Some(Input::DeadlinePassed),
        };
        if let Some(input) = input {
            commands = machine.handle(Instant::now().into_std(), input);
        }
    }
    tasks.abort_all();
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
    match command {
        Command::CheckPrinter => Some(Work::PrinterCheck),
        Command::ReadVersions => Some(Work::Versions),
        Command::CheckKlipper { .. } => Some(Work::KlipperCheck),
        Command::Build { key }
        | Command::EnterBootloader { key }
        | Command::CheckTarget { key }
        | Command::Write { key, .. }
        | Command::SendToApplication { key }
        | Command::Identify { key } => Some(Work::Board(key.clone())),
        // Klipper's stop and start are never dropped halfway.
        Command::StopKlipper | Command::StartKlipper => None,
        Command::Abort(_) | Command::AppendHistory(_) | Command::Emit(_) => None,
    }
}

/// The answer for a command whose task panicked: its step failed.
fn lost(command: Command) -> Input {
    let cause = Cause::DriverFailed;
    match command {
        Command::CheckPrinter => Input::PrinterChecked(Err(cause)),
        Command::ReadVersions => Input::VersionsRead(Default::default()),
        Command::StopKlipper => Input::KlipperStopped(Err(cause)),
        Command::StartKlipper => Input::KlipperStarted(Err(cause)),
        Command::CheckKlipper { .. } => Input::KlippyChecked(Err(cause)),
        Command::Build { key }
        | Command::EnterBootloader { key }
        | Command::CheckTarget { key }
        | Command::Write { key, .. }
        | Command::SendToApplication { key }
        | Command::Identify { key } => Input::BoardFailed { key, cause },
        Command::Abort(_) | Command::AppendHistory(_) | Command::Emit(_) => Input::DeadlinePassed,
    }
}
