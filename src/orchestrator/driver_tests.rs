//! The driver on tokio's paused clock, with scripted effects: timers are the machine's
//! deadlines, a panicking task answers as a failed step, a cancel drops the work in flight.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::LocalBoxFuture;
use futures::FutureExt;

use super::driver::{drive, Effects};
use super::*;
use crate::identity::Mode;
use crate::registry::{FlashMethod, Timeouts};

const NEW: &str = "v0.13.0-1-gnew";

#[derive(Clone, Copy, PartialEq)]
enum Write {
    Ok,
    Panic,
    Hang,
}

struct Inner {
    write: Write,
    lose_bootloader: bool,
    started: Mutex<Vec<String>>,
    records: Mutex<Vec<BoardReport>>,
    events: Mutex<Vec<Event>>,
    writing: AtomicUsize,
    most_writing: AtomicUsize,
    writes_dropped: AtomicUsize,
}

/// Counts a write in flight; counts it as dropped if it never finished.
struct InFlight<'a>(&'a Inner, bool);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.writing.fetch_sub(1, Ordering::SeqCst);
        if !self.1 {
            self.0.writes_dropped.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[derive(Clone)]
struct Script(Arc<Inner>);

impl Script {
    fn new(write: Write, lose_bootloader: bool) -> Script {
        let inner = Inner {
            write,
            lose_bootloader,
            started: Mutex::default(),
            records: Mutex::default(),
            events: Mutex::default(),
            writing: AtomicUsize::new(0),
            most_writing: AtomicUsize::new(0),
            writes_dropped: AtomicUsize::new(0),
        };
        Script(Arc::new(inner))
    }

    fn count(&self, what: &str) -> usize {
        self.0.started.lock().unwrap().iter().filter(|s| s.as_str() == what).count()
    }
}

impl Effects for Script {
    fn start(&self, command: Command) -> LocalBoxFuture<'_, Option<Input>> {
        let me = self.0.clone();
        let name = format!("{command:?}").split([' ', '(', '{']).next().unwrap().to_string();
        me.started.lock().unwrap().push(name);
        let sleep = |ms| tokio::time::sleep(Duration::from_millis(ms));
        async move {
            match command {
                Command::CheckPrinter => Some(Input::PrinterChecked(Ok(()))),
                Command::ReadVersions => Some(Input::VersionsRead(Default::default())),
                Command::Build { key } => {
                    sleep(5000).await;
                    Some(Input::BuildFinished { key, result: Ok(Built::new(NEW, false)) })
                }
                Command::StopKlipper => {
                    sleep(500).await;
                    Some(Input::KlipperStopped(Ok(())))
                }
                Command::EnterBootloader { key } => {
                    sleep(1000).await;
                    if me.lose_bootloader {
                        // Its event never comes, and the work's own timeout is lost too.
                        std::future::pending::<()>().await;
                    }
                    Some(Input::DeviceAppeared { key, mode: Mode::Katapult })
                }
                Command::CheckTarget { key } => Some(Input::TargetChecked { key, result: Ok(()) }),
                Command::Write { key, .. } => {
                    let now = me.writing.fetch_add(1, Ordering::SeqCst) + 1;
                    me.most_writing.fetch_max(now, Ordering::SeqCst);
                    let mut flight = InFlight(&me, false);
                    sleep(2000).await;
                    match me.write {
                        Write::Panic => panic!("the write task panics"),
                        Write::Hang => std::future::pending::<()>().await,
                        Write::Ok => {}
                    }
                    flight.1 = true;
                    drop(flight);
                    Some(Input::WriteDone { key, result: Ok(()) })
                }
                Command::AwaitApplication { key } => Some(Input::DeviceAppeared { key, mode: Mode::Klipper }),
                Command::Identify { key } => Some(Input::Identified { key, result: Ok(NEW.into()) }),
                Command::StartKlipper => {
                    sleep(500).await;
                    Some(Input::KlipperStarted(Ok(true)))
                }
                Command::CheckKlipper { expected } => {
                    sleep(3000).await;
                    Some(Input::KlippyChecked(Ok(KlipperAnswer::Running(expected))))
                }
                other => panic!("not a work command: {other:?}"),
            }
        }
        .boxed_local()
    }

    fn emit(&self, event: Event) {
        self.0.events.lock().unwrap().push(event);
    }

    fn record(&self, report: BoardReport) {
        self.0.records.lock().unwrap().push(report);
    }
}

fn plan(n: usize) -> Vec<PlannedBoard> {
    (0..n)
        .map(|i| PlannedBoard {
            key: format!("b{i}"),
            in_bootloader: false,
            methods: vec![FlashMethod::Katapult],
            after: vec![],
        })
        .collect()
}

async fn run(n: usize, parallel: usize, script: &Script, cancel_after: Option<Duration>) -> Machine {
    let policy = Policy { parallel, ..Policy::new(&Timeouts::default()) };
    let (m, first) = Machine::new(plan(n), policy, tokio::time::Instant::now().into_std());
    let cancel = async move {
        match cancel_after {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    drive(m, first, script, cancel).await
}

#[tokio::test(start_paused = true)]
async fn parallel_boards_share_one_stop_and_the_downtime_is_the_slowest_board() {
    let script = Script::new(Write::Ok, false);
    let m = run(3, 3, &script, None).await;
    assert!(m.ok(), "{:?}", m.reports());
    assert_eq!(script.0.most_writing.load(Ordering::SeqCst), 3, "three writes at once");
    assert_eq!((script.count("StopKlipper"), script.count("StartKlipper")), (1, 1));
    // Bootloader 1 s + write 2 s + start 0.5 s, for all three boards together.
    assert_eq!(m.klipper_downtime(), Some(Duration::from_millis(3500)));
    let records = script.0.records.lock().unwrap().clone();
    assert_eq!(records.len(), 3);
    assert!(records.iter().all(|r| r.state == BoardState::Flashed { view: KlipperView::Confirmed }));

    let script = Script::new(Write::Ok, false);
    let m = run(3, 1, &script, None).await;
    assert!(m.ok());
    assert_eq!(script.0.most_writing.load(Ordering::SeqCst), 1, "one after another");
    assert_eq!(m.klipper_downtime(), Some(Duration::from_millis(9500)));
}

#[tokio::test(start_paused = true)]
async fn a_panicking_write_still_starts_klipper_and_records_the_board() {
    let script = Script::new(Write::Panic, false);
    let m = run(2, 1, &script, None).await;
    assert!(m.is_done() && !m.ok());
    let failed = BoardState::LeftInBootloader { phase: Phase::Write, cause: Cause::DriverFailed };
    assert_eq!(m.board_state("b0"), Some(&failed));
    assert_eq!(m.board_state("b1"), Some(&failed), "the next board was still flashed");
    assert_eq!(script.count("StartKlipper"), 1);
    assert_eq!(script.0.records.lock().unwrap().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn work_that_never_answers_ends_at_the_machines_deadline() {
    let script = Script::new(Write::Ok, true);
    let started = tokio::time::Instant::now();
    let m = run(1, 1, &script, None).await;
    let failed = BoardState::Failed { phase: Phase::Bootloader, cause: Cause::DeadlinePassed };
    assert_eq!(m.board_state("b0"), Some(&failed));
    assert_eq!(script.count("StartKlipper"), 1);
    // Build 5 s, stop 0.5 s, bootloader_secs 10 s + the backstop 10 s, start 0.5 s: ended
    // by the machine's timer, not a poll.
    assert_eq!(started.elapsed(), Duration::from_millis(26_000));
    assert_eq!(m.klipper_downtime(), Some(Duration::from_millis(20_500)));
}

#[tokio::test(start_paused = true)]
async fn a_cancel_mid_write_drops_the_write_starts_klipper_and_records_every_board() {
    let script = Script::new(Write::Hang, false);
    // Builds 10 s, stop 0.5 s, bootloader 1 s: the first write hangs from 11.5 s.
    let m = run(2, 1, &script, Some(Duration::from_secs(20))).await;
    assert!(m.is_done() && !m.ok());
    assert_eq!(script.0.writes_dropped.load(Ordering::SeqCst), 1, "the hanging write was dropped");
    assert_eq!(
        m.board_state("b0"),
        Some(&BoardState::LeftInBootloader { phase: Phase::Write, cause: Cause::Cancelled })
    );
    assert_eq!(m.board_state("b1"), Some(&BoardState::Skipped { cause: Cause::Cancelled }));
    assert_eq!(script.count("StartKlipper"), 1);
    assert_eq!(script.0.records.lock().unwrap().len(), 2);
}
