//! Step 4 print safety on the rig: every path that stops Klipper asks Moonraker first, and
//! only Moonraker's own answer counts. The Moonraker stand-in plays the printer's states
//! (printing, paused, an emergency stop, 401, 403, a hang); a plain `python3 -m http.server`
//! plays a URL that is not Moonraker. Each refusal leaves Klipper running: the stand-in
//! systemctl logs no stop.

mod rig_support;
mod support;

use std::path::PathBuf;
use std::process::Output;

use rig_support::*;

/// Stand-in switches on for the scenario, removed on drop (also when it fails).
struct Switches(Vec<PathBuf>);

impl Switches {
    fn new() -> Switches {
        Switches(Vec::new())
    }

    fn on(&mut self, name: &str, contents: &str) {
        let path = rig_state_dir().join("moonraker").join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, contents).unwrap();
        self.0.push(path);
    }

    fn off(&mut self, name: &str) {
        let path = rig_state_dir().join("moonraker").join(name);
        let _ = std::fs::remove_file(&path);
        self.0.retain(|p| *p != path);
    }
}

impl Drop for Switches {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn stderr(o: &Output) -> String {
    text(&o.stderr)
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
/// prints. Its bare 404 says nothing about the print: refused, --yes or not; only
/// --skip-print-check passes, and the history says so.
#[test]
#[ignore = "runs inside the USB rig"]
fn a_bare_404_is_not_nothing_printing() {
    in_rig();
    // The stand-in's switches script the print states and faults (a hang, a proxy's 403);
    // the same gate against the real Klippy and Moonraker: rig_real_stack.rs.
    let _host = UsePrinterHost::new(PrinterHost::StandIn);
    reset_boards();
    let _clean = LeaveRigClean;
    let rig = FlashRig::new(EBB, EBB.1, &[("bootloader_secs", 15), ("reconnect_secs", 30)]);
    let web = support::PlainWebServer::start();
    ok(&rig.kflash(&["settings", "set", "moonraker_url", &web.url]));
    let mut sw = Switches::new();
    sw.on("printing", "benchy.gcode\n0.42\n");

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

    // The user knows better (nothing prints) and says so explicitly.
    sw.off("printing");
    let out = rig.kflash_logged(&["flash", EBB.0, "--skip-print-check", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("the print state was not checked (--skip-print-check"), "{}", stderr(&out));
    log.assert_klipper_stopped_and_restarted();
    let h: serde_json::Value = serde_json::from_str(&ok(&rig.kflash(&["history", EBB.0, "--json"]))).unwrap();
    let last = h.as_array().unwrap().last().unwrap().clone();
    assert_eq!((last["result"].as_str(), last["print_check"].as_str()), (Some("ok"), Some("skipped")), "{last}");
}

/// Item 2: during a paused print, a Moonraker that refuses (401 without or with a wrong
/// key, a proxy's 403) or hangs is not "unreachable": `flash --yes` refuses with help.
#[test]
#[ignore = "runs inside the USB rig"]
fn refusals_and_a_hang_refuse_even_with_yes() {
    in_rig();
    // The stand-in's switches script the print states and faults (a hang, a proxy's 403);
    // the same gate against the real Klippy and Moonraker: rig_real_stack.rs.
    let _host = UsePrinterHost::new(PrinterHost::StandIn);
    reset_boards();
    let _clean = LeaveRigClean;
    let rig = FlashRig::new(EBB, EBB.1, &[("moonraker_secs", 2)]);
    let mut sw = Switches::new();
    sw.on("paused", "benchy.gcode\n0.42\n");
    sw.on("api-key", "s3cret");
    let log = ServiceLog::start();

    let out = rig.kflash_logged(&["flash", EBB.0, "--yes"]);
    assert_refused(&out, 9, &["Moonraker refused the request (401 Unauthorized)", "set moonraker_api_key"], &log);
    ok(&rig.kflash(&["settings", "set", "moonraker_api_key", "wrong"]));
    let out = rig.kflash_logged(&["flash", EBB.0, "--yes"]);
    assert_refused(&out, 9, &["with the configured API key (401", "moonraker_api_key is wrong"], &log);
    // With the right key Moonraker answers: paused is busy (exit 10).
    ok(&rig.kflash(&["settings", "set", "moonraker_api_key", "s3cret"]));
    let out = rig.kflash_logged(&["flash", EBB.0, "--yes"]);
    assert_refused(&out, 10, &["the printer is paused benchy.gcode (42%)"], &log);
    sw.off("api-key");

    sw.on("forbidden", "");
    let out = rig.kflash_logged(&["flash", EBB.0, "--yes"]);
    assert_refused(&out, 9, &["Moonraker refused the request", "403"], &log);
    sw.off("forbidden");

    sw.on("delay", "30");
    let t = std::time::Instant::now();
    let out = rig.kflash_logged(&["flash", EBB.0, "--yes"]);
    assert!(t.elapsed().as_secs_f64() < 15.0, "the request deadline (2 s) ends the wait: {:?}", t.elapsed());
    assert_refused(&out, 9, &["did not answer /server/info within 2.0 s"], &log);
    sw.off("delay");
}

/// Item 3: katapult-check stops Klipper too, so it asks Moonraker first.
#[test]
#[ignore = "runs inside the USB rig"]
fn katapult_check_is_refused_during_a_print() {
    in_rig();
    // The stand-in's switches script the print states and faults (a hang, a proxy's 403);
    // the same gate against the real Klippy and Moonraker: rig_real_stack.rs.
    let _host = UsePrinterHost::new(PrinterHost::StandIn);
    reset_boards();
    let _clean = LeaveRigClean;
    let rig = FlashRig::new(NITEHAWK, NITEHAWK.1, &[]);
    let mut sw = Switches::new();
    sw.on("printing", "calibration_cube.gcode\n0.37\n");
    let log = ServiceLog::start();
    for args in [&["katapult-check", NITEHAWK.0][..], &["katapult-check", NITEHAWK.0, "--yes", "--skip-print-check"]] {
        let out = rig.kflash_logged(args);
        assert_refused(&out, 10, &["the printer is printing calibration_cube.gcode (37%)"], &log);
    }
    assert_eq!(board_json(NITEHAWK.0)["mode"], "klipper");
}

/// Item 4: after an emergency stop Klippy is shut down and print_stats stays paused. Not a
/// dead end: kflash says nothing moves, shows the stale state and asks; --yes flashes.
#[test]
#[ignore = "runs inside the USB rig"]
fn after_an_emergency_stop_kflash_asks_and_yes_flashes() {
    in_rig();
    // The stand-in's switches script the print states and faults (a hang, a proxy's 403);
    // the same gate against the real Klippy and Moonraker: rig_real_stack.rs.
    let _host = UsePrinterHost::new(PrinterHost::StandIn);
    reset_boards();
    restart_klipper_and_wait_ready();
    let _clean = LeaveRigClean;
    let rig = FlashRig::new(EBB, EBB.1, &[("bootloader_secs", 15), ("reconnect_secs", 30)]);
    let mut sw = Switches::new();
    sw.on("paused", "benchy.gcode\n0.42\n");
    sw.on("klippy-shutdown", "");
    assert_eq!(klippy_state(), "shutdown", "the M112 latched");
    let log = ServiceLog::start();

    let out = rig.kflash_logged(&["flash", EBB.0]);
    assert_refused(
        &out,
        10,
        &[
            "Klippy is shutdown (Shutdown due to M112 command), so nothing moves",
            "print_stats still says paused benchy.gcode (42%)",
            "Flash anyway? no",
            "pass --yes",
        ],
        &log,
    );
    assert!(!stderr(&out).contains("wait for the print to finish"), "not a dead end: {}", stderr(&out));

    let out = rig.kflash_logged(&["flash", EBB.0, "--yes"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stderr(&out).matches("Flash anyway? yes (--yes)").count(), 1, "asked once: {}", stderr(&out));
    log.assert_klipper_stopped_and_restarted();
    assert_eq!(board_json(EBB.0)["version"], klipper_tree_version().as_str());
    let h: serde_json::Value = serde_json::from_str(&ok(&rig.kflash(&["history", EBB.0, "--json"]))).unwrap();
    assert_eq!(h.as_array().unwrap().last().unwrap()["print_check"], "klippy-halted");
}
