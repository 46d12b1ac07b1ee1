//! Step 4 print safety on the rig, against the real printer host: every path that stops
//! Klipper asks Moonraker first, and only Moonraker's own answer counts. The print states are
//! real (a file of dwells run by Klippy's virtual_sdcard: printing, paused, cancelled, and
//! after M112 a shutdown with a stale `paused`); the 401 comes from the real Moonraker asked
//! from outside its trusted_clients, the hang from the real Moonraker SIGSTOPped. Two stand-ins stay,
//! for what the real Moonraker cannot be: a web server that is not Moonraker (`python3 -m
//! http.server`, its bare 404) and a reverse proxy that denies the client (nginx's 403), each
//! with a real print running behind it. Each refusal leaves Klipper running: the stand-in
//! systemctl logs no stop.

mod rig_support;
mod support;

use std::process::Output;

use rig_support::*;

fn stderr(o: &Output) -> String {
    text(&o.stderr)
}

/// Boards reset and Klippy ready with `[mcu]` on `board`; the guard resets the rig at the end.
fn begin(board: &str) -> LeaveRigClean {
    in_rig();
    let clean = LeaveRigClean;
    reset_boards();
    klipper_ready_on(&[("mcu", board)]);
    clean
}

/// Refused with `code`, stderr saying each of `says`, Klipper never stopped.
fn assert_refused(out: &Output, code: i32, says: &[&str], log: &ServiceLog) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(code), "{err}");
    for s in says {
        assert!(err.contains(s), "expected {s:?} in:\n{err}");
    }
    assert!(err.contains("help: "), "every failure has a help line: {err}");
    assert!(log.verbs("klipper").is_empty(), "Klipper was stopped: {:?}", log.entries());
    assert!(klipper_is_active());
}

/// Item 1: moonraker_url points at a web server that is not Moonraker while the printer
/// really prints. Its bare 404 says nothing about the print: refused, --yes or not; only
/// --skip-print-check passes (once the print was cancelled), and the history says so.
#[test]
#[ignore = "runs inside the USB rig"]
fn a_bare_404_is_not_nothing_printing() {
    let _clean = begin(EBB.0);
    let rig = FlashRig::new(EBB, EBB.1, &[("bootloader_secs", 15), ("reconnect_secs", 30)]);
    let web = support::PlainWebServer::start();
    ok(&rig.kflash(&["settings", "set", "moonraker_url", &web.url]));
    let print = RealPrint::start("benchy.gcode", 4000);

    let log = ServiceLog::start();
    for args in [&["flash", EBB.0][..], &["flash", EBB.0, "--yes"]] {
        let out = rig.kflash_logged(args);
        assert_refused(
            &out,
            9,
            &["answered /server/info with HTTP 404", "not Moonraker's JSON", "moonraker_url", "--skip-print-check"],
            &log,
        );
        assert!(!stderr(&out).contains("Klipper is not connected to Moonraker"), "{}", stderr(&out));
    }
    let out = rig.kflash_logged(&["katapult-check", EBB.0, "--yes"]);
    assert_refused(&out, 9, &["not Moonraker's JSON"], &log);
    assert_eq!(print_state(), "printing", "the real print ran on behind the refusals");

    // The user knows better (the print is over) and says so explicitly.
    print.cancel();
    let out = rig.kflash_logged(&["flash", EBB.0, "--skip-print-check", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("the print state was not checked (--skip-print-check"), "{}", stderr(&out));
    log.assert_klipper_stopped_and_restarted();
    let h: serde_json::Value = serde_json::from_str(&ok(&rig.kflash(&["history", EBB.0, "--json"]))).unwrap();
    let last = h.as_array().unwrap().last().unwrap().clone();
    assert_eq!((last["result"].as_str(), last["print_check"].as_str()), (Some("ok"), Some("skipped")), "{last}");
}

/// Item 2: during a real paused print, a Moonraker that refuses (the real one's 401 to an
/// untrusted client, without or with a wrong key; a proxy's 403) or hangs (the real one SIGSTOPped) is not
/// "unreachable": `flash --yes` refuses with help.
#[test]
#[ignore = "runs inside the USB rig"]
fn refusals_and_a_hang_refuse_even_with_yes() {
    let _clean = begin(EBB.0);
    let rig = FlashRig::new(EBB, EBB.1, &[("moonraker_secs", 2)]);
    let print = RealPrint::start("benchy.gcode", 4000);
    print.pause();
    let log = ServiceLog::start();

    // kflash reaches the real Moonraker from outside its trusted_clients.
    let untrusted = UntrustedClient::new();
    ok(&rig.kflash(&["settings", "set", "moonraker_url", &untrusted.url]));
    let out = rig.kflash_logged(&["flash", EBB.0, "--yes"]);
    assert_refused(&out, 9, &["Moonraker refused the request (401 Unauthorized)", "set moonraker_api_key"], &log);
    ok(&rig.kflash(&["settings", "set", "moonraker_api_key", "wrong"]));
    let out = rig.kflash_logged(&["flash", EBB.0, "--yes"]);
    assert_refused(&out, 9, &["with the configured API key (401", "moonraker_api_key is wrong"], &log);
    // With the right key Moonraker answers: paused is busy (exit 10).
    ok(&rig.kflash(&["settings", "set", "moonraker_api_key", &untrusted.key]));
    let out = rig.kflash_logged(&["flash", EBB.0, "--yes"]);
    assert_refused(&out, 10, &["the printer is paused benchy.gcode ("], &log);

    // A reverse proxy in front of the real Moonraker denies this client.
    let proxy = ForbiddingProxy::start();
    ok(&rig.kflash(&["settings", "set", "moonraker_url", &proxy.url]));
    ok(&rig.kflash(&["settings", "unset", "moonraker_api_key"]));
    let out = rig.kflash_logged(&["flash", EBB.0, "--yes"]);
    assert_refused(&out, 9, &["Moonraker refused the request", "403"], &log);
    ok(&rig.kflash(&["settings", "set", "moonraker_url", "http://127.0.0.1:7125"]));

    let frozen = Frozen::unit("moonraker");
    let t = std::time::Instant::now();
    let out = rig.kflash_logged(&["flash", EBB.0, "--yes"]);
    assert!(t.elapsed().as_secs_f64() < 15.0, "the request deadline (2 s) ends the wait: {:?}", t.elapsed());
    assert_refused(&out, 9, &["did not answer /server/info within 2.0 s"], &log);
    drop(frozen);
    assert_eq!(print_state(), "paused", "the real print is still paused");
}

/// Item 3: katapult-check stops Klipper too, so it asks Moonraker first: refused while a real
/// print runs (even with --skip-print-check), and let through once it was cancelled.
#[test]
#[ignore = "runs inside the USB rig"]
fn katapult_check_is_refused_during_a_print() {
    let _clean = begin(NITEHAWK.0);
    let rig = FlashRig::new(NITEHAWK, NITEHAWK.1, &[]);
    let print = RealPrint::start("calibration_cube.gcode", 4000);
    let log = ServiceLog::start();
    for args in [&["katapult-check", NITEHAWK.0][..], &["katapult-check", NITEHAWK.0, "--yes", "--skip-print-check"]] {
        let out = rig.kflash_logged(args);
        assert_refused(&out, 10, &["the printer is printing calibration_cube.gcode ("], &log);
    }
    assert_eq!(board_json(NITEHAWK.0)["mode"], "klipper");

    // Cancelled is not busy.
    print.cancel();
    let out = rig.kflash_logged(&["katapult-check", NITEHAWK.0, "--yes", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("printer is cancelled"), "{}", stderr(&out));
    log.assert_klipper_stopped_and_restarted();
}

/// Item 4: after a real emergency stop Klippy is shut down and print_stats stays paused. Not
/// a dead end: kflash says nothing moves, shows the stale state and asks; --yes flashes.
#[test]
#[ignore = "runs inside the USB rig"]
fn after_an_emergency_stop_kflash_asks_and_yes_flashes() {
    let _clean = begin(EBB.0);
    let rig = FlashRig::new(EBB, EBB.1, &[("bootloader_secs", 15), ("reconnect_secs", 30)]);
    let print = RealPrint::start("benchy.gcode", 4000);
    print.pause();
    print.emergency_stop();
    assert_eq!(print_state(), "paused", "the real print_stats keeps the stale state");
    let log = ServiceLog::start();

    let out = rig.kflash_logged(&["flash", EBB.0]);
    assert_refused(
        &out,
        10,
        &[
            "Klippy is shutdown (Shutdown due to M112 command), so nothing moves",
            "so nothing moves",
            "print_stats still says paused benchy.gcode (",
            "Flash anyway? no",
            "pass --yes",
        ],
        &log,
    );
    assert!(!stderr(&out).contains("wait for the print to finish"), "not a dead end: {}", stderr(&out));

    let out = rig.kflash_logged(&["flash", EBB.0, "--yes"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stderr(&out).matches("Flash anyway? yes (--yes)").count(), 1, "asked once: {}", stderr(&out));
    assert!(stderr(&out).contains("Klipper is ready and reports"), "level (c) after M112: {}", stderr(&out));
    log.assert_klipper_stopped_and_restarted();
    assert_eq!(board_json(EBB.0)["version"], klipper_tree_version().as_str());
    let h: serde_json::Value = serde_json::from_str(&ok(&rig.kflash(&["history", EBB.0, "--json"]))).unwrap();
    assert_eq!(h.as_array().unwrap().last().unwrap()["print_check"], "klippy-halted");
}
