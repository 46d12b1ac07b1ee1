//! The machine alone, on every path: scripted runs for each rule, and a property test that
//! answers the machine's commands in random order with random outcomes (failures, lost
//! hotplug events, driver panics, a cancel at any step) and checks the guarantees on the trace.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;
use crate::identity::Mode;
use crate::registry::{FlashMethod, Timeouts};

const NEW: &str = "v0.13.0-1-gnew";
const OLD: &str = "v0.12.0-1-gold";

fn board(key: &str) -> PlannedBoard {
    PlannedBoard { key: key.into(), in_bootloader: false, methods: vec![FlashMethod::Katapult], after: vec![] }
}

fn policy() -> Policy {
    Policy::new(&Timeouts::default())
}

fn err(what: &str) -> Cause {
    Cause::Error { kind: "io".into(), message: what.into() }
}

fn refused() -> Cause {
    Cause::Refused { reason: "the bootloader reports stm32f103xe, the image is for stm32h723xx".into() }
}

/// A machine, its clock, and everything it said.
struct Run {
    m: Machine,
    now: Instant,
    said: Vec<Command>,
}

impl Run {
    fn new(plan: Vec<PlannedBoard>, policy: Policy) -> Run {
        let now = Instant::now();
        let (m, said) = Machine::new(plan, policy, now);
        Run { m, now, said }
    }

    fn feed(&mut self, input: Input) -> Vec<Command> {
        let out = self.m.handle(self.now, input);
        self.said.extend(out.iter().cloned());
        out
    }

    fn after(&mut self, d: Duration, input: Input) -> Vec<Command> {
        self.now += d;
        self.feed(input)
    }

    /// Wake the machine at its next deadline.
    fn deadline(&mut self) -> Vec<Command> {
        self.now = self.m.next_deadline().expect("a deadline is set");
        self.feed(Input::DeadlinePassed)
    }

    fn state(&self, key: &str) -> BoardState {
        self.m.board_state(key).unwrap().clone()
    }

    fn count(&self, f: impl Fn(&Command) -> bool) -> usize {
        self.said.iter().filter(|c| f(c)).count()
    }

    fn history(&self) -> Vec<BoardReport> {
        self.said
            .iter()
            .filter_map(|c| match c {
                Command::AppendHistory(r) => Some(r.clone()),
                _ => None,
            })
            .collect()
    }

    /// Preflight passes, the boards run `running`, every build makes NEW.
    fn built(&mut self, running: &[(&str, &str)]) {
        self.feed(Input::PrinterChecked(Ok(())));
        let keys: Vec<String> = self.m.reports().into_iter().map(|r| r.key).collect();
        let versions = running.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.feed(Input::VersionsRead(versions));
        for key in keys {
            let built = Input::BuildFinished { key, result: Ok(Built::new(NEW, false)) };
            self.after(Duration::from_secs(2), built);
        }
    }

    fn stopped(&mut self, running: &[(&str, &str)]) {
        self.built(running);
        assert!(self.said.contains(&Command::StopKlipper), "{:?}", self.said);
        self.after(Duration::from_millis(300), Input::KlipperStopped(Ok(())));
    }

    /// Bootloader, check, write, return and identify for `key`, all succeeding.
    fn flash(&mut self, key: &str) {
        let k = key.to_string();
        if self.state(key) == BoardState::AwaitingBootloader {
            self.after(Duration::from_millis(800), Input::DeviceAppeared { key: k.clone(), mode: Mode::Katapult });
        }
        self.after(Duration::from_millis(50), Input::TargetChecked { key: k.clone(), result: Ok(()) });
        self.after(Duration::from_secs(1), Input::WriteDone { key: k.clone(), result: Ok(()) });
        self.after(Duration::from_millis(900), Input::DeviceAppeared { key: k.clone(), mode: Mode::Klipper });
        self.after(Duration::from_millis(30), Input::Identified { key: k, result: Ok(NEW.into()) });
    }

    fn started(&mut self) {
        assert_eq!(self.said.last(), Some(&Command::StartKlipper), "{:?}", self.said);
        self.after(Duration::from_millis(500), Input::KlipperStarted(Ok(true)));
    }
}

fn is_board_command(c: &Command) -> bool {
    matches!(
        c,
        Command::EnterBootloader { .. }
            | Command::CheckTarget { .. }
            | Command::Write { .. }
            | Command::AwaitApplication { .. }
            | Command::SendToApplication { .. }
            | Command::Identify { .. }
    )
}

#[test]
fn one_board_end_to_end_in_order() {
    let mut r = Run::new(vec![board("octopus")], policy());
    assert_eq!(r.said.last(), Some(&Command::CheckPrinter));
    let out = r.feed(Input::PrinterChecked(Ok(())));
    assert!(out.contains(&Command::ReadVersions) && out.contains(&Command::Build { key: "octopus".into() }));
    r.feed(Input::VersionsRead(BTreeMap::from([("octopus".to_string(), OLD.to_string())])));
    let out = r.after(
        Duration::from_secs(40),
        Input::BuildFinished { key: "octopus".into(), result: Ok(Built::new(NEW, false)) },
    );
    assert!(out.contains(&Command::StopKlipper), "built and outdated: Klipper stops");
    assert!(!out.iter().any(is_board_command), "nothing touches the board before Klipper stopped");
    let out = r.after(Duration::from_millis(300), Input::KlipperStopped(Ok(())));
    assert!(out.contains(&Command::EnterBootloader { key: "octopus".into() }));
    r.flash("octopus");
    assert_eq!(r.state("octopus"), BoardState::Flashed { view: KlipperView::Pending });
    r.started();
    assert_eq!(r.m.run_state(), RunState::Verifying);
    assert!(r.said.contains(&Command::CheckKlipper { expected: BTreeMap::from([("octopus".into(), NEW.into())]) }));
    assert!(r.history().is_empty(), "the record waits for Klipper's view");
    r.after(
        Duration::from_secs(3),
        Input::KlippyChecked(Ok(KlipperAnswer::Running(BTreeMap::from([("octopus".into(), NEW.into())])))),
    );
    assert!(r.m.is_done() && r.m.ok());
    let h = r.history();
    assert_eq!(h.len(), 1);
    assert_eq!(h[0].state, BoardState::Flashed { view: KlipperView::Confirmed });
    assert_eq!(h[0].result(), crate::history::FlashResult::Ok);
    assert_eq!((h[0].version_before.as_deref(), h[0].version_after.as_deref()), (Some(OLD), Some(NEW)));
    assert_eq!(h[0].method, Some(FlashMethod::Katapult));
    let d = &h[0].durations;
    assert_eq!(d.build, Some(40.0));
    assert_eq!(d.bootloader, Some(0.8));
    assert!((d.flash.unwrap() - 1.05).abs() < 1e-9, "{d:?}");
    assert!((d.verify.unwrap() - 0.93).abs() < 1e-9, "{d:?}");
    // Stopped at +40.3 s, started at +43.58 s.
    assert!((d.klipper_downtime.unwrap() - 3.28).abs() < 1e-9, "{d:?}");
    assert_eq!(r.m.klipper_downtime(), Some(Duration::from_millis(3280)));
}

#[test]
fn current_board_is_not_flashed_and_klipper_is_not_stopped() {
    let mut r = Run::new(vec![board("octopus")], policy());
    r.built(&[("octopus", NEW)]);
    assert_eq!(r.state("octopus"), BoardState::UpToDate);
    assert!(r.m.is_done() && r.m.ok());
    assert_eq!(r.count(|c| *c == Command::StopKlipper || *c == Command::StartKlipper), 0);
    assert_eq!(r.history()[0].result(), crate::history::FlashResult::Skipped);
}

#[test]
fn flash_current_policy_flashes_current_board() {
    let mut r = Run::new(vec![board("octopus")], Policy { flash_current: true, ..policy() });
    r.stopped(&[("octopus", NEW)]);
    assert_eq!(r.state("octopus"), BoardState::AwaitingBootloader);
}

#[test]
fn only_outdated_boards_are_flashed() {
    let mut r = Run::new(vec![board("a"), board("b")], policy());
    r.stopped(&[("a", NEW), ("b", OLD)]);
    assert_eq!(r.state("a"), BoardState::UpToDate);
    assert_eq!(r.state("b"), BoardState::AwaitingBootloader);
    assert_eq!(r.count(|c| matches!(c, Command::EnterBootloader { key } if key == "a")), 0);
}

#[test]
fn unknown_versions_flash_every_board() {
    let mut r = Run::new(vec![board("a"), board("b")], Policy { parallel: 2, ..policy() });
    r.stopped(&[]);
    assert_eq!(r.state("a"), BoardState::AwaitingBootloader);
    assert_eq!(r.state("b"), BoardState::AwaitingBootloader);
}

#[test]
fn board_in_bootloader_is_checked_and_written_without_a_request() {
    let mut r = Run::new(vec![PlannedBoard { in_bootloader: true, ..board("ebb") }], policy());
    r.stopped(&[]);
    assert_eq!(r.state("ebb"), BoardState::CheckingTarget);
    assert_eq!(r.count(|c| matches!(c, Command::EnterBootloader { .. })), 0);
    r.flash("ebb");
    r.started();
    assert_eq!(r.m.run_state(), RunState::Verifying);
}

#[test]
fn printer_busy_refuses_before_anything() {
    let mut r = Run::new(vec![board("a"), board("b")], policy());
    r.feed(Input::PrinterChecked(Err(Cause::Error { kind: "printer-busy".into(), message: "printing".into() })));
    assert!(r.m.is_done() && !r.m.ok());
    assert_eq!(r.count(|c| matches!(c, Command::Build { .. } | Command::StopKlipper | Command::StartKlipper)), 0);
    let h = r.history();
    assert_eq!(h.len(), 2);
    assert!(h.iter().all(|r| matches!(r.state, BoardState::Failed { phase: Phase::Preflight, .. })));
}

#[test]
fn a_refused_stop_starts_nothing() {
    let mut r = Run::new(vec![board("a")], policy());
    r.built(&[]);
    r.feed(Input::KlipperStopped(Err(Cause::Error { kind: "printer-busy".into(), message: "a print began".into() })));
    assert!(r.m.is_done());
    assert_eq!(r.count(|c| *c == Command::StartKlipper || is_board_command(c)), 0);
    assert!(matches!(r.state("a"), BoardState::Failed { phase: Phase::StopKlipper, .. }));
    assert_eq!(r.history().len(), 1);
}

#[test]
fn a_failed_build_does_not_stop_the_others() {
    let mut r = Run::new(vec![board("a"), board("b")], Policy { builds: 2, ..policy() });
    let out = r.feed(Input::PrinterChecked(Ok(())));
    assert_eq!(out.iter().filter(|c| matches!(c, Command::Build { .. })).count(), 2, "two builds at once");
    r.feed(Input::VersionsRead(BTreeMap::new()));
    r.feed(Input::BuildFinished { key: "a".into(), result: Err(err("make failed")) });
    let out = r.feed(Input::BuildFinished { key: "b".into(), result: Ok(Built::new(NEW, true)) });
    assert!(out.contains(&Command::StopKlipper));
    assert!(matches!(r.state("a"), BoardState::Failed { phase: Phase::Build, .. }));
    assert_eq!(r.history().len(), 1, "the failed build is recorded at once");
}

#[test]
fn builds_respect_their_limit() {
    let mut r = Run::new(vec![board("a"), board("b"), board("c")], policy());
    let out = r.feed(Input::PrinterChecked(Ok(())));
    assert_eq!(out.iter().filter(|c| matches!(c, Command::Build { .. })).count(), 1);
    let out = r.feed(Input::BuildFinished { key: "a".into(), result: Ok(Built::new(NEW, false)) });
    assert_eq!(
        out.iter().filter(|c| matches!(c, Command::Build { .. })).collect::<Vec<_>>(),
        [&Command::Build { key: "b".into() }]
    );
    assert!(!out.contains(&Command::StopKlipper), "Klipper stops only after every build and the versions");
}

#[test]
fn no_write_before_the_target_check_passes() {
    let mut r = Run::new(vec![board("a")], policy());
    r.stopped(&[]);
    let out = r.feed(Input::DeviceAppeared { key: "a".into(), mode: Mode::Katapult });
    assert_eq!(
        out.iter().filter(|c| is_board_command(c)).collect::<Vec<_>>(),
        [&Command::CheckTarget { key: "a".into() }]
    );
    // A write result before any write is ignored.
    r.feed(Input::WriteDone { key: "a".into(), result: Ok(()) });
    assert_eq!(r.state("a"), BoardState::CheckingTarget);
    let out = r.feed(Input::TargetChecked { key: "a".into(), result: Ok(()) });
    assert!(out.contains(&Command::Write { key: "a".into(), method: FlashMethod::Katapult }));
}

#[test]
fn a_refusal_sends_the_board_back_and_never_tries_another_method() {
    for at_write in [false, true] {
        let plan = PlannedBoard { methods: vec![FlashMethod::MakeFlash, FlashMethod::Katapult], ..board("a") };
        let mut r = Run::new(vec![plan], policy());
        r.stopped(&[]);
        r.feed(Input::DeviceAppeared { key: "a".into(), mode: Mode::Katapult });
        if at_write {
            r.feed(Input::TargetChecked { key: "a".into(), result: Ok(()) });
            r.feed(Input::WriteDone { key: "a".into(), result: Err(refused()) });
        } else {
            r.feed(Input::TargetChecked { key: "a".into(), result: Err(refused()) });
        }
        assert_eq!(r.state("a"), BoardState::Releasing { cause: refused() });
        assert_eq!(r.said.iter().filter(|c| matches!(c, Command::SendToApplication { .. })).count(), 1);
        r.feed(Input::DeviceAppeared { key: "a".into(), mode: Mode::Klipper });
        assert_eq!(r.state("a"), BoardState::Failed { phase: Phase::CheckTarget, cause: refused() });
        assert_eq!(r.count(|c| matches!(c, Command::Write { .. })), at_write as usize, "no second method");
        assert_eq!(r.count(|c| matches!(c, Command::Emit(Event { kind: EventKind::MethodFallback { .. }, .. }))), 0);
        r.started();
        assert!(r.m.is_done() && !r.m.ok());
    }
}

#[test]
fn a_failed_release_leaves_the_board_in_its_bootloader() {
    let mut r = Run::new(vec![board("a")], policy());
    r.stopped(&[]);
    r.feed(Input::DeviceAppeared { key: "a".into(), mode: Mode::Katapult });
    r.feed(Input::TargetChecked { key: "a".into(), result: Err(refused()) });
    r.deadline();
    assert_eq!(r.state("a"), BoardState::LeftInBootloader { phase: Phase::CheckTarget, cause: refused() });
}

#[test]
fn a_failed_write_falls_back_to_the_next_method_and_reports_the_first_error() {
    let plan = PlannedBoard { methods: vec![FlashMethod::Katapult, FlashMethod::MakeFlash], ..board("a") };
    let mut r = Run::new(vec![plan.clone()], policy());
    r.stopped(&[]);
    r.feed(Input::DeviceAppeared { key: "a".into(), mode: Mode::Katapult });
    r.feed(Input::TargetChecked { key: "a".into(), result: Ok(()) });
    let out = r.feed(Input::WriteDone { key: "a".into(), result: Err(err("no answer")) });
    assert!(out.contains(&Command::Write { key: "a".into(), method: FlashMethod::MakeFlash }));
    r.feed(Input::WriteDone { key: "a".into(), result: Err(err("make flash failed")) });
    assert_eq!(r.state("a"), BoardState::LeftInBootloader { phase: Phase::Write, cause: err("no answer") });

    // The second method succeeding is recorded as the method used.
    let mut r = Run::new(vec![plan], policy());
    r.stopped(&[]);
    r.feed(Input::DeviceAppeared { key: "a".into(), mode: Mode::Katapult });
    r.feed(Input::TargetChecked { key: "a".into(), result: Ok(()) });
    r.feed(Input::WriteDone { key: "a".into(), result: Err(err("no answer")) });
    r.feed(Input::WriteDone { key: "a".into(), result: Ok(()) });
    r.feed(Input::DeviceAppeared { key: "a".into(), mode: Mode::Klipper });
    r.feed(Input::Identified { key: "a".into(), result: Ok(NEW.into()) });
    r.started();
    r.feed(Input::KlippyChecked(Ok(KlipperAnswer::Running(BTreeMap::new()))));
    assert_eq!(r.history()[0].method, Some(FlashMethod::MakeFlash));
    assert_eq!(r.state("a"), BoardState::Flashed { view: KlipperView::NotListed });
    assert!(r.m.ok(), "a board Klipper does not list is verified as far as it can be");
}

#[test]
fn a_board_that_went_away_is_not_chased_with_another_method() {
    let plan = PlannedBoard { methods: vec![FlashMethod::Katapult, FlashMethod::MakeFlash], ..board("a") };
    let mut r = Run::new(vec![plan], policy());
    r.stopped(&[]);
    r.feed(Input::DeviceAppeared { key: "a".into(), mode: Mode::Katapult });
    r.feed(Input::TargetChecked { key: "a".into(), result: Ok(()) });
    r.feed(Input::WriteDone { key: "a".into(), result: Err(Cause::DeviceGone) });
    assert_eq!(r.state("a"), BoardState::Failed { phase: Phase::Write, cause: Cause::DeviceGone });
    assert_eq!(r.count(|c| matches!(c, Command::Write { .. })), 1);
}

#[test]
fn after_the_write_the_application_is_awaited() {
    let mut r = Run::new(vec![board("a")], policy());
    r.stopped(&[]);
    r.feed(Input::DeviceAppeared { key: "a".into(), mode: Mode::Katapult });
    r.feed(Input::TargetChecked { key: "a".into(), result: Ok(()) });
    // An appearance nobody awaits (the write is still running) moves nothing.
    r.feed(Input::DeviceAppeared { key: "a".into(), mode: Mode::Klipper });
    assert!(matches!(r.state("a"), BoardState::Writing { .. }));
    let out = r.feed(Input::WriteDone { key: "a".into(), result: Ok(()) });
    assert!(out.contains(&Command::AwaitApplication { key: "a".into() }), "{out:?}");
    let out = r.feed(Input::DeviceAppeared { key: "a".into(), mode: Mode::Klipper });
    assert!(out.contains(&Command::Identify { key: "a".into() }), "{out:?}");
}

#[test]
fn a_wrong_running_version_fails_identify() {
    let mut r = Run::new(vec![board("a")], policy());
    r.stopped(&[]);
    r.feed(Input::DeviceAppeared { key: "a".into(), mode: Mode::Katapult });
    r.feed(Input::TargetChecked { key: "a".into(), result: Ok(()) });
    r.feed(Input::WriteDone { key: "a".into(), result: Ok(()) });
    r.feed(Input::DeviceAppeared { key: "a".into(), mode: Mode::Klipper });
    r.feed(Input::Identified { key: "a".into(), result: Ok(OLD.into()) });
    let mismatch = Cause::VersionMismatch { expected: NEW.into(), running: OLD.into() };
    assert_eq!(r.state("a"), BoardState::Failed { phase: Phase::Identify, cause: mismatch });
    r.started();
    assert!(r.m.is_done(), "nothing flashed: Klipper's view is not awaited");
}

/// Each step's deadline fails the board in that step, and the driver is told to drop it.
#[test]
fn deadlines_fail_the_step_they_belong_to() {
    let dl = Cause::DeadlinePassed;
    let cases: Vec<(usize, BoardState)> = vec![
        (0, BoardState::Failed { phase: Phase::Bootloader, cause: dl.clone() }),
        (1, BoardState::LeftInBootloader { phase: Phase::CheckTarget, cause: dl.clone() }),
        (2, BoardState::LeftInBootloader { phase: Phase::Write, cause: dl.clone() }),
        (3, BoardState::Failed { phase: Phase::Reconnect, cause: dl.clone() }),
        (4, BoardState::Failed { phase: Phase::Identify, cause: dl.clone() }),
    ];
    for (steps, expected) in cases {
        let mut r = Run::new(vec![board("a")], policy());
        r.stopped(&[]);
        let inputs = [
            Input::DeviceAppeared { key: "a".into(), mode: Mode::Katapult },
            Input::TargetChecked { key: "a".into(), result: Ok(()) },
            Input::WriteDone { key: "a".into(), result: Ok(()) },
            Input::DeviceAppeared { key: "a".into(), mode: Mode::Klipper },
        ];
        for input in inputs.into_iter().take(steps) {
            r.after(Duration::from_millis(100), input);
        }
        let waiting = r.m.next_deadline().unwrap();
        // Just before the deadline nothing happens; at it, the step fails.
        r.now = waiting - Duration::from_millis(1);
        r.feed(Input::DeadlinePassed);
        assert!(!r.state("a").is_terminal());
        let out = r.deadline();
        assert_eq!(r.state("a"), expected, "after {steps} steps");
        assert!(out.contains(&Command::Abort(Work::Board("a".into()))), "{out:?}");
        assert_eq!(out.last(), Some(&Command::StartKlipper));
        r.started();
        assert!(r.m.is_done() && !r.m.ok());
        assert_eq!(r.history().len(), 1);
    }
    // Klippy that never gets ready.
    let mut r = Run::new(vec![board("a")], policy());
    r.stopped(&[]);
    r.flash("a");
    r.started();
    let out = r.deadline();
    assert!(out.contains(&Command::Abort(Work::KlipperCheck)));
    assert_eq!(r.state("a"), BoardState::Failed { phase: Phase::KlipperVerify, cause: dl });
    assert!(r.m.is_done());
}

#[test]
fn a_failing_board_does_not_stop_the_others_verification() {
    let mut r = Run::new(vec![board("a"), board("b"), board("c")], policy());
    r.stopped(&[]);
    // a: never shows up in its bootloader; the next board goes on.
    let out = r.deadline();
    assert!(out.contains(&Command::EnterBootloader { key: "b".into() }), "{out:?}");
    r.flash("b");
    // c's task panics mid-write.
    r.feed(Input::DeviceAppeared { key: "c".into(), mode: Mode::Katapult });
    r.feed(Input::TargetChecked { key: "c".into(), result: Ok(()) });
    r.feed(Input::BoardFailed { key: "c".into(), cause: Cause::DriverFailed });
    assert_eq!(r.state("c"), BoardState::LeftInBootloader { phase: Phase::Write, cause: Cause::DriverFailed });
    r.started();
    assert!(r.said.contains(&Command::CheckKlipper { expected: BTreeMap::from([("b".into(), NEW.into())]) }));
    r.feed(Input::KlippyChecked(Ok(KlipperAnswer::Running(BTreeMap::from([("b".into(), NEW.into())])))));
    assert_eq!(r.state("b"), BoardState::Flashed { view: KlipperView::Confirmed });
    assert!(r.m.is_done() && !r.m.ok());
    let keys: BTreeSet<String> = r.history().into_iter().map(|h| h.key).collect();
    assert_eq!(keys.len(), 3);
    assert_eq!(r.history().len(), 3);
    assert_eq!(r.count(|c| *c == Command::StartKlipper), 1);
}

#[test]
fn sequential_by_default_and_parallel_up_to_the_limit() {
    let mut r = Run::new(vec![board("a"), board("b"), board("c")], policy());
    r.stopped(&[]);
    assert_eq!(r.count(|c| matches!(c, Command::EnterBootloader { .. })), 1);
    r.flash("a");
    assert_eq!(r.count(|c| matches!(c, Command::EnterBootloader { .. })), 2, "b after a, not before");

    let mut r = Run::new(vec![board("a"), board("b"), board("c")], Policy { parallel: 2, ..policy() });
    r.stopped(&[]);
    assert_eq!(r.count(|c| matches!(c, Command::EnterBootloader { .. })), 2);
    r.flash("b");
    assert!(r.said.contains(&Command::EnterBootloader { key: "c".into() }));
}

#[test]
fn klipper_left_stopped_or_not_started_is_not_asked_for_its_view() {
    for (answer, why, ok) in [
        (Ok(false), Unchecked::KlipperLeftStopped, true),
        (Err(err("systemctl start failed")), Unchecked::KlipperNotStarted, false),
    ] {
        let mut r = Run::new(vec![board("a")], policy());
        r.stopped(&[]);
        r.flash("a");
        r.feed(Input::KlipperStarted(answer));
        assert_eq!(r.state("a"), BoardState::Flashed { view: KlipperView::NotChecked { why } });
        assert_eq!(r.count(|c| matches!(c, Command::CheckKlipper { .. })), 0);
        assert!(r.m.is_done());
        assert_eq!(r.m.ok(), ok);
    }
}

#[test]
fn klipper_view_that_cannot_be_asked_still_passes() {
    let mut r = Run::new(vec![board("a")], policy());
    r.stopped(&[]);
    r.flash("a");
    r.started();
    r.feed(Input::KlippyChecked(Ok(KlipperAnswer::Unchecked(Unchecked::MoonrakerDown))));
    assert!(r.m.is_done() && r.m.ok());
}

#[test]
fn klipper_reporting_another_version_fails_verification() {
    let mut r = Run::new(vec![board("a")], policy());
    r.stopped(&[]);
    r.flash("a");
    r.started();
    r.feed(Input::KlippyChecked(Ok(KlipperAnswer::Running(BTreeMap::from([("a".into(), OLD.into())])))));
    assert!(matches!(r.state("a"), BoardState::Failed { phase: Phase::KlipperVerify, .. }));
}

#[test]
fn events_carry_a_board_key_and_serialize() {
    let mut r = Run::new(vec![board("a")], policy());
    r.stopped(&[]);
    let events: Vec<String> = r
        .said
        .iter()
        .filter_map(|c| match c {
            Command::Emit(e) => Some(serde_json::to_string(e).unwrap()),
            _ => None,
        })
        .collect();
    assert!(events.contains(&r#"{"event":"run","state":"preflight"}"#.to_string()), "{events:?}");
    assert!(events.contains(&r#"{"board":"a","event":"board","state":{"state":"awaiting-bootloader"}}"#.to_string()));
    assert!(events.contains(
        &r#"{"board":"a","event":"built","version":"v0.13.0-1-gnew","cached":false,"app":null,"size":0,"secs":0.0}"#
            .to_string()
    ));
    let failed = Event::board(
        "a",
        EventKind::Board {
            state: BoardState::Failed {
                phase: Phase::Write,
                cause: Cause::VersionMismatch { expected: "x".into(), running: "y".into() },
            },
        },
    );
    assert_eq!(
        serde_json::to_string(&failed).unwrap(),
        r#"{"board":"a","event":"board","state":{"state":"failed","phase":"write","cause":{"cause":"version-mismatch","expected":"x","running":"y"}}}"#
    );
}

/// A cancel at every point of a two-board run: Klipper is started exactly once if it was
/// stopped, nothing touches a board after the cancel, every board gets one record, and the
/// run ends once the run-level steps in flight answered.
#[test]
fn a_cancel_at_every_step() {
    // The full run as a script; the cancel comes before step `at`.
    let script = |r: &mut Run, step: usize| -> bool {
        let a = |k: &str| k.to_string();
        let inputs = vec![
            Input::PrinterChecked(Ok(())),
            Input::VersionsRead(BTreeMap::new()),
            Input::BuildFinished { key: a("a"), result: Ok(Built::new(NEW, false)) },
            Input::BuildFinished { key: a("b"), result: Ok(Built::new(NEW, true)) },
            Input::KlipperStopped(Ok(())),
            Input::DeviceAppeared { key: a("a"), mode: Mode::Katapult },
            Input::DeviceAppeared { key: a("b"), mode: Mode::Katapult },
            Input::TargetChecked { key: a("a"), result: Ok(()) },
            Input::TargetChecked { key: a("b"), result: Ok(()) },
            Input::WriteDone { key: a("a"), result: Ok(()) },
            Input::DeviceAppeared { key: a("a"), mode: Mode::Klipper },
            Input::WriteDone { key: a("b"), result: Ok(()) },
            Input::DeviceAppeared { key: a("b"), mode: Mode::Klipper },
            Input::Identified { key: a("a"), result: Ok(NEW.into()) },
            Input::Identified { key: a("b"), result: Ok(NEW.into()) },
            Input::KlipperStarted(Ok(true)),
            Input::KlippyChecked(Ok(KlipperAnswer::Running(BTreeMap::new()))),
        ];
        match inputs.get(step) {
            Some(i) => {
                r.after(Duration::from_millis(100), i.clone());
                true
            }
            None => false,
        }
    };
    let mut at = 0;
    loop {
        let mut r = Run::new(vec![board("a"), board("b")], Policy { parallel: 2, builds: 2, ..policy() });
        let mut step = 0;
        while step < at && script(&mut r, step) {
            step += 1;
        }
        if step < at || r.m.is_done() {
            break; // every point covered
        }
        let before = r.said.len();
        r.feed(Input::Cancel);
        r.feed(Input::Cancel); // a second signal changes nothing
                               // Only the run-level steps in flight are still answered: a stop under way finishes.
        let mut stopped = at > 4;
        if r.m.run_state() == RunState::StoppingKlipper {
            r.feed(Input::KlipperStopped(Ok(())));
            stopped = true;
        }
        if r.m.run_state() == RunState::StartingKlipper {
            r.feed(Input::KlipperStarted(Ok(true)));
        }
        assert!(r.m.is_done(), "cancel at {at}: run {:?}", r.m.run_state());
        assert!(!r.m.ok());
        let starts = r.count(|c| *c == Command::StartKlipper);
        assert_eq!(starts, usize::from(stopped), "cancel at {at}: {:?}", r.said);
        assert!(!r.said[before..].iter().any(is_board_command), "cancel at {at}: {:?}", &r.said[before..]);
        let h = r.history();
        assert_eq!(h.len(), 2, "cancel at {at}: {h:?}");
        assert!(h.iter().all(|x| x.state.is_terminal()));
        // Late answers change nothing.
        let n = r.said.len();
        r.feed(Input::WriteDone { key: "a".into(), result: Ok(()) });
        r.feed(Input::KlipperStarted(Ok(true)));
        assert_eq!(r.said.len(), n);
        at += 1;
    }
    assert!(at > 15);
}

// --- The property test: a random world answering the machine. ---

/// What the machine is waiting for from the world.
#[derive(Debug, Clone, PartialEq)]
enum Pending {
    PrinterCheck,
    Versions,
    Build(String),
    Stop,
    Bootloader(String),
    Check(String),
    Write(String),
    Back(String),
    SendBack(String),
    Identify(String),
    Start,
    KlipperCheck(BTreeMap<String, String>),
}

impl Pending {
    fn key(&self) -> Option<&str> {
        match self {
            Pending::Build(k)
            | Pending::Bootloader(k)
            | Pending::Check(k)
            | Pending::Write(k)
            | Pending::Back(k)
            | Pending::SendBack(k)
            | Pending::Identify(k) => Some(k),
            _ => None,
        }
    }
}

struct World {
    choices: Vec<u8>,
    at: usize,
    pending: Vec<Pending>,
}

impl World {
    fn pick(&mut self, n: usize) -> usize {
        let c = self.choices.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        usize::from(c) % n
    }

    fn take(&mut self, commands: &[Command]) {
        for c in commands {
            let p = match c {
                Command::CheckPrinter => Pending::PrinterCheck,
                Command::ReadVersions => Pending::Versions,
                Command::Build { key } => Pending::Build(key.clone()),
                Command::StopKlipper => Pending::Stop,
                Command::EnterBootloader { key } => Pending::Bootloader(key.clone()),
                Command::CheckTarget { key } => Pending::Check(key.clone()),
                Command::Write { key, .. } => Pending::Write(key.clone()),
                Command::AwaitApplication { key } => Pending::Back(key.clone()),
                Command::SendToApplication { key } => Pending::SendBack(key.clone()),
                Command::Identify { key } => Pending::Identify(key.clone()),
                Command::StartKlipper => Pending::Start,
                Command::CheckKlipper { expected } => Pending::KlipperCheck(expected.clone()),
                Command::Abort(w) => {
                    self.pending.retain(|p| match w {
                        Work::Board(k) => p.key() != Some(k),
                        Work::PrinterCheck => *p != Pending::PrinterCheck,
                        Work::Versions => *p != Pending::Versions,
                        Work::KlipperCheck => !matches!(p, Pending::KlipperCheck(_)),
                    });
                    continue;
                }
                Command::AppendHistory(_) | Command::Emit(_) => continue,
            };
            self.pending.push(p);
        }
    }

    /// Answer one pending step, with an outcome of the world's choosing; `None` when the
    /// world stays silent (a lost event: only the machine's deadline ends that wait).
    fn answer(&mut self, keys: &[String]) -> Option<Input> {
        let i = self.pick(self.pending.len());
        let p = self.pending.remove(i);
        let fail = |why: &str| Cause::Error { kind: "io".into(), message: why.into() };
        let board_failed = |k: String, c: Cause| Some(Input::BoardFailed { key: k, cause: c });
        match p {
            Pending::PrinterCheck => {
                Some(Input::PrinterChecked(if self.pick(4) == 3 { Err(fail("busy")) } else { Ok(()) }))
            }
            Pending::Versions => {
                let mut v = BTreeMap::new();
                for k in keys {
                    match self.pick(3) {
                        1 => v.insert(k.clone(), NEW.to_string()),
                        2 => v.insert(k.clone(), OLD.to_string()),
                        _ => None,
                    };
                }
                Some(Input::VersionsRead(v))
            }
            Pending::Build(key) => {
                let result = match self.pick(5) {
                    4 => Err(fail("make")),
                    n => Ok(Built::new(NEW, n == 1)),
                };
                Some(Input::BuildFinished { key, result })
            }
            Pending::Stop => Some(Input::KlipperStopped(if self.pick(5) == 4 { Err(fail("busy")) } else { Ok(()) })),
            Pending::Bootloader(key) => match self.pick(6) {
                3 => board_failed(key, fail("tty")),
                4 => board_failed(key, Cause::DriverFailed),
                5 => None,
                _ => Some(Input::DeviceAppeared { key, mode: Mode::Katapult }),
            },
            Pending::Check(key) => {
                let result = match self.pick(8) {
                    4 => Err(refused()),
                    5 => Err(fail("no answer")),
                    6 => Err(Cause::DeviceGone),
                    7 => return None,
                    _ => Ok(()),
                };
                Some(Input::TargetChecked { key, result })
            }
            Pending::Write(key) => {
                let result = match self.pick(9) {
                    4 => Err(fail("timeout")),
                    5 => Err(refused()),
                    6 => Err(Cause::DeviceGone),
                    7 => return board_failed(key, Cause::DriverFailed),
                    8 => return None,
                    _ => Ok(()),
                };
                Some(Input::WriteDone { key, result })
            }
            Pending::Back(key) => match self.pick(6) {
                4 => board_failed(key, fail("came back in Katapult")),
                5 => None,
                _ => Some(Input::DeviceAppeared { key, mode: Mode::Klipper }),
            },
            Pending::SendBack(key) => match self.pick(4) {
                2 => board_failed(key, fail("send")),
                3 => None,
                _ => Some(Input::DeviceAppeared { key, mode: Mode::Klipper }),
            },
            Pending::Identify(key) => {
                let result = match self.pick(7) {
                    4 => Ok(OLD.to_string()),
                    5 => Err(fail("identify")),
                    6 => return None,
                    _ => Ok(NEW.to_string()),
                };
                Some(Input::Identified { key, result })
            }
            Pending::Start => Some(Input::KlipperStarted(match self.pick(6) {
                4 => Ok(false),
                5 => Err(fail("start")),
                _ => Ok(true),
            })),
            Pending::KlipperCheck(expected) => Some(Input::KlippyChecked(match self.pick(7) {
                3 => Ok(KlipperAnswer::Running(BTreeMap::new())),
                4 => Ok(KlipperAnswer::Unchecked(Unchecked::MoonrakerDown)),
                5 => Err(fail("klippy error")),
                6 => return None,
                _ => Ok(KlipperAnswer::Running(expected)),
            })),
        }
    }
}

/// Run a random world against the machine; check the guarantees on what happened.
fn random_run(n: usize, parallel: usize, builds: usize, flags: u8, cancel_at: Option<usize>, choices: Vec<u8>) {
    let plan: Vec<PlannedBoard> = (0..n)
        .map(|i| PlannedBoard {
            key: format!("b{i}"),
            in_bootloader: flags & (1 << i) != 0,
            methods: if flags & (1 << (i + 4)) != 0 {
                vec![FlashMethod::Katapult, FlashMethod::MakeFlash]
            } else {
                vec![FlashMethod::Katapult]
            },
            after: vec![],
        })
        .collect();
    let keys: Vec<String> = plan.iter().map(|p| p.key.clone()).collect();
    let policy = Policy { parallel, builds, flash_current: flags & 0x80 != 0, ..policy() };
    let mut r = Run::new(plan, policy);
    let mut world = World { choices, at: 0, pending: Vec::new() };
    world.take(&r.said.clone());

    // What the world told the machine, in order with what it said back.
    let mut klipper_stopped = false;
    let mut cancelled = false;
    let mut checked: BTreeSet<String> = BTreeSet::new();
    let mut refused_keys: BTreeSet<String> = BTreeSet::new();
    let mut states: BTreeMap<String, BoardState> = BTreeMap::new();
    let mut identified: BTreeSet<String> = BTreeSet::new();
    let mut klipper_runs = false;
    let mut started = 0;
    for step in 0.. {
        assert!(step < 2000, "the run does not end");
        if r.m.is_done() {
            break;
        }
        let input = if cancel_at == Some(step) {
            cancelled = true;
            Input::Cancel
        } else if !world.pending.is_empty() && (r.m.next_deadline().is_none() || world.pick(8) != 0) {
            match world.answer(&keys) {
                Some(input) => input,
                None => continue,
            }
        } else if let Some(d) = r.m.next_deadline() {
            r.now = d;
            Input::DeadlinePassed
        } else {
            panic!("stuck: run {:?}, nothing pending and no deadline; said {:?}", r.m.run_state(), r.said);
        };
        match &input {
            Input::KlipperStopped(Ok(())) => klipper_stopped = true,
            Input::TargetChecked { key, result: Ok(()) } => {
                checked.insert(key.clone());
            }
            Input::TargetChecked { key, result: Err(Cause::Refused { .. }) }
            | Input::WriteDone { key, result: Err(Cause::Refused { .. }) } => {
                refused_keys.insert(key.clone());
            }
            _ => {}
        }
        r.now += Duration::from_millis(world.pick(200) as u64);
        let out = r.feed(input);
        for c in &out {
            match c {
                Command::StartKlipper => {
                    started += 1;
                    assert!(klipper_stopped, "Klipper is started only after it was stopped");
                }
                Command::Write { key, .. } => {
                    assert!(checked.contains(key), "{key} written before its target check passed");
                    assert!(!refused_keys.contains(key), "{key} written after a refusal");
                }
                c if is_board_command(c) => {
                    assert!(klipper_stopped && started == 0, "{c:?} while Klipper runs");
                    assert!(!cancelled, "{c:?} after the cancel");
                }
                Command::Emit(Event { board: Some(k), kind: EventKind::Board { state } }) => {
                    if *state == (BoardState::Flashed { view: KlipperView::Pending }) {
                        identified.insert(k.clone());
                    }
                    states.insert(k.clone(), state.clone());
                }
                Command::Emit(Event { kind: EventKind::KlipperStarted { running: true, .. }, .. }) => {
                    klipper_runs = true;
                }
                Command::CheckKlipper { expected } => {
                    let pending: BTreeSet<String> = identified.iter().cloned().collect();
                    assert_eq!(
                        expected.keys().cloned().collect::<BTreeSet<_>>(),
                        pending,
                        "every flashed board, only those"
                    );
                }
                _ => {}
            }
        }
        let flashing = states.values().filter(|s| s.is_flashing()).count();
        assert!(flashing <= parallel.max(1), "{flashing} boards flashing at once, limit {parallel}");
        let building = states.values().filter(|s| **s == BoardState::Building).count();
        assert!(building <= builds.max(1), "{building} builds at once, limit {builds}");
        world.take(&out);
    }
    assert_eq!(started, usize::from(klipper_stopped), "Klipper started exactly once after the stop");
    let history = r.history();
    let recorded: Vec<&str> = history.iter().map(|h| h.key.as_str()).collect();
    let mut unique = recorded.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), recorded.len(), "a board recorded twice: {recorded:?}");
    assert_eq!(unique.len(), n, "every board recorded: {recorded:?}");
    for h in &history {
        assert!(h.state.is_terminal(), "{h:?}");
        assert_eq!(Some(&h.state), r.m.board_state(&h.key), "the record is the board's final state");
        if h.durations.bootloader.is_some() || h.durations.flash.is_some() {
            assert!(h.durations.klipper_downtime.is_some(), "a flashed board's record has the downtime: {h:?}");
        }
    }
    if cancelled {
        assert!(!r.m.ok());
    }
    // The other boards' failures never keep a flashed board from Klipper's check.
    if klipper_runs && !cancelled {
        assert!(r.said.iter().any(|c| matches!(c, Command::CheckKlipper { .. })) || identified.is_empty());
    }
    for k in &identified {
        let end = r.m.board_state(k).unwrap();
        assert!(
            matches!(end, BoardState::Flashed { .. } | BoardState::Failed { phase: Phase::KlipperVerify, .. }),
            "{k} was flashed, yet ended {end:?}"
        );
    }
    if r.m.ok() {
        assert!(history.iter().all(|h| h.state.passed()));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_worlds_keep_every_guarantee(
        n in 1usize..=4,
        parallel in 0usize..=3,
        builds in 0usize..=2,
        flags in any::<u8>(),
        cancel_at in proptest::option::of(0usize..120),
        choices in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        random_run(n, parallel, builds, flags, cancel_at, choices);
    }
}

#[test]
fn a_bridge_waits_for_every_board_behind_it_even_with_boards_in_parallel() {
    // Planned first on purpose: the machine holds the bridge back, not only the plan's order.
    let bridge = PlannedBoard { after: vec!["ebb".into(), "sb".into()], ..board("bridge") };
    let mut r = Run::new(vec![bridge, board("ebb"), board("sb")], Policy { parallel: 3, ..policy() });
    r.stopped(&[]);
    assert_eq!(r.state("bridge"), BoardState::Built);
    assert_eq!((r.state("ebb"), r.state("sb")), (BoardState::AwaitingBootloader, BoardState::AwaitingBootloader));
    r.flash("ebb");
    assert_eq!(r.state("bridge"), BoardState::Built, "sb is still being flashed");
    // A board behind it that fails is over too: the bridge goes on.
    r.after(Duration::from_secs(1), Input::BoardFailed { key: "sb".into(), cause: err("no Katapult") });
    assert_eq!(r.state("bridge"), BoardState::AwaitingBootloader);
    assert!(!r.said.contains(&Command::StartKlipper), "Klipper waits for the bridge: its bus is down meanwhile");
    // Back in Klipper means its interface is back and UP (the effect awaits both).
    r.flash("bridge");
    r.started();
    let order: Vec<&str> = r
        .said
        .iter()
        .filter_map(|c| match c {
            Command::EnterBootloader { key } => Some(key.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(order, ["ebb", "sb", "bridge"]);
}
