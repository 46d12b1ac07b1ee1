//! Klipper is always started again: SIGINT, SIGTERM and SIGHUP sent to `kflash flash` while
//! Klipper is stopped make kflash start it and exit 130; after a `kill -9` the stop marker
//! stays and the next kflash command (any command) starts Klipper and says why.
//!
//! A second concurrent `kflash flash` being refused is covered by rig_flash.rs.

mod rig_support;

use rig_support::*;

/// Faults that keep kflash busy in one phase long enough to signal it there, and the stderr
/// line that announces that phase.
#[derive(Clone, Copy)]
enum Phase {
    /// Inside the Katapult session: the flash is slow (`slow-flash=1.8`), so the first
    /// SEND_BLOCK's 128 KiB sector erase alone keeps the H7 busy 1.8 s (1 s typical).
    Writing,
    /// Waiting for the board to re-enumerate in Katapult (the reboot takes 6 s).
    Bootloader,
    /// Waiting for the board to come back running Klipper after COMPLETE (6 s again).
    Verify,
}

impl Phase {
    fn faults(self) -> &'static [&'static str] {
        match self {
            Phase::Writing => &["slow-flash=1.8"],
            Phase::Bootloader | Phase::Verify => &["slow-return=6"],
        }
    }

    fn line(self) -> &'static str {
        match self {
            Phase::Writing => "[Flash] writing",
            Phase::Bootloader => "[Bootloader] requesting the bootloader",
            Phase::Verify => "[Verify] waiting for the board to come back",
        }
    }
}

struct Started {
    // Dropped in this order: a kflash still running is killed, then the rig is reset.
    kflash: Background,
    rig: FlashRig,
    log: ServiceLog,
    events: EventLog,
    _clean: LeaveRigClean,
}

/// Boards reset, Klipper running, then `kflash flash octopus --yes` started in the
/// background and followed until it announces `phase` (Klipper is stopped by then).
fn flash_until(name: &str, phase: Phase) -> Started {
    in_rig();
    let clean = LeaveRigClean;
    reset_boards();
    klipper_running_on(&[("mcu", OCTOPUS.0)]);
    let rig = FlashRig::new(OCTOPUS, OCTOPUS.1, &[("bootloader_secs", 15), ("reconnect_secs", 20)]);
    let mut args = vec!["fault", OCTOPUS.0];
    args.extend_from_slice(phase.faults());
    boardctl(&args);
    let log = ServiceLog::start();
    let events = EventLog::mark(&format!("rig_signals {name}"));
    let mut kflash = Background::spawn(rig.command(&["flash", OCTOPUS.0, "--yes"]));
    kflash.wait_for_line(phase.line(), 120);
    assert_eq!(log.verbs("klipper"), ["stop"], "Klipper is stopped while kflash flashes");
    assert!(!klipper_is_active());
    assert!(rig.stop_marker().exists(), "the stop marker exists while Klipper is stopped");
    Started { kflash, rig, log, events, _clean: clean }
}

/// Send `sig` in `phase`; kflash must exit 130 having started Klipper again. Returns the rig
/// (for more checks) and kflash's stderr.
fn interrupted(sig: &str, phase: Phase) -> (FlashRig, String, LeaveRigClean) {
    let s = flash_until(&format!("SIG{sig}"), phase);
    s.kflash.signal(sig);
    let (status, stderr) = s.kflash.finish(60);
    assert_eq!(status.code(), Some(130), "exit status after SIG{sig}; stderr:\n{stderr}");
    assert!(stderr.contains(&format!("error: interrupted by SIG{sig}")), "stderr:\n{stderr}");
    assert!(stderr.contains("help: "), "stderr:\n{stderr}");
    s.log.assert_klipper_stopped_and_restarted();
    assert!(!s.rig.stop_marker().exists(), "the stop marker is removed once Klipper runs again");
    s.events.assert_no_writes_except(OCTOPUS.0);
    eprintln!("SIG{sig}: Klipper down {:.2} s", s.log.downtime("klipper").unwrap());
    // Klipper was started by kflash itself: the next command finds nothing to repair.
    let again = s.rig.kflash(&["devices"]);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(!text(&again.stderr).contains("left stopped"), "nothing to repair: {}", text(&again.stderr));
    (s.rig, stderr, s._clean)
}

#[test]
#[ignore = "runs inside the USB rig"]
fn sigint_while_writing() {
    interrupted("INT", Phase::Writing);
}

#[test]
#[ignore = "runs inside the USB rig"]
fn sigterm_while_writing() {
    interrupted("TERM", Phase::Writing);
}

#[test]
#[ignore = "runs inside the USB rig"]
fn sighup_while_writing() {
    interrupted("HUP", Phase::Writing);
}

#[test]
#[ignore = "runs inside the USB rig"]
fn sigint_while_waiting_for_the_bootloader() {
    interrupted("INT", Phase::Bootloader);
}

#[test]
#[ignore = "runs inside the USB rig"]
fn sigterm_while_waiting_for_the_board_to_come_back() {
    interrupted("TERM", Phase::Verify);
}

/// The rest of an interrupted flash's outcome: what the user reads and what the history keeps.
#[test]
#[ignore = "runs inside the USB rig"]
fn interrupted_flash_reads_well_and_is_in_the_history() {
    let (rig, stderr, _clean) = interrupted("INT", Phase::Writing);
    let mut problems = Vec::new();
    // stderr is a pipe: no terminal colour codes (the interrupt path logs through tracing).
    if stderr.contains('\x1b') {
        problems.push(format!("ANSI escape codes on a piped stderr: {stderr:?}"));
    }
    // The attempt is in the flash history like any other failed attempt.
    let hist = rig.kflash(&["history", OCTOPUS.0, "--json"]);
    assert!(hist.status.success(), "{}", text(&hist.stderr));
    let records: serde_json::Value = serde_json::from_slice(&hist.stdout).unwrap();
    match records.as_array().unwrap().as_slice() {
        [r] if r["result"] == "failed" && r["error"].as_str().unwrap_or("").contains("SIGINT") => {}
        other => problems.push(format!("the history should hold one failed record saying SIGINT, it holds {other:?}")),
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
#[ignore = "runs inside the USB rig"]
fn kill_9_leaves_a_marker_and_the_next_command_starts_klipper() {
    let s = flash_until("SIGKILL", Phase::Writing);
    let pid = s.kflash.pid();
    s.kflash.signal("KILL");
    let (status, _) = s.kflash.finish(30);
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9), "{status}");

    // Nothing could run: Klipper stays stopped and the marker says who stopped it.
    assert_eq!(s.log.verbs("klipper"), ["stop"], "{:?}", s.log.entries());
    assert!(!klipper_is_active(), "klipper must still be stopped after kill -9");
    let marker: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.rig.stop_marker()).expect("the stop marker survives kill -9"))
            .unwrap();
    assert_eq!(marker["pid"], pid, "{marker}");
    assert_eq!(marker["service"], "klipper", "{marker}");
    assert_eq!(marker["reason"], "flash of octopus", "{marker}");

    // Any next command repairs it, and says so on stderr.
    let out = s.rig.kflash(&["devices"]);
    let err = text(&out.stderr);
    eprintln!("kflash devices after kill -9: {}\nstderr:\n{err}", out.status);
    assert!(out.status.success(), "{err}");
    assert!(err.contains(&format!("klipper was left stopped by kflash (pid {pid}")), "stderr says why:\n{err}");
    assert!(err.contains("flash of octopus"), "{err}");
    assert!(err.contains("started it again"), "{err}");
    s.log.assert_klipper_stopped_and_restarted();
    assert!(!s.rig.stop_marker().exists(), "the marker is gone once Klipper runs");
    s.events.assert_no_writes_except(OCTOPUS.0);
    eprintln!("kill -9: Klipper down {:.2} s until the next kflash command", s.log.downtime("klipper").unwrap());

    // Only once.
    let again = s.rig.kflash(&["devices"]);
    assert!(!text(&again.stderr).contains("left stopped"), "{}", text(&again.stderr));
    assert_eq!(s.log.verbs("klipper"), ["stop", "start"]);
}
