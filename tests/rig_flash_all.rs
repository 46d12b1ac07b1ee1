//! Step 6 on real USB: `kflash flash-all` over three simulated boards, with the real Klippy
//! and Moonraker as the printer host and the systemctl stand-in as the service manager.
//! Every scenario checks the systemctl log (one stop and one start, or none), what the
//! simulated boards saw (writes, bootloader requests) and the history.

mod pty;
mod rig_support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use pty::PtyChild;

use rig_support::*;

const BOARDS: [(&str, &str, &str); 3] = [OCTOPUS, NITEHAWK, EBB];
/// printer.cfg for the three boards: level (c) is checked for each.
const ALL_IN_PRINTER_CFG: [(&str, &str); 3] = [("mcu", "octopus"), ("mcu nitehawk", "nitehawk"), ("mcu ebb", "ebb")];

/// A private kflash with the three boards registered and configured.
fn three_boards(timeouts: &[(&str, u64)]) -> FlashRig {
    let rig = FlashRig::new(OCTOPUS, OCTOPUS.1, timeouts);
    for b in &BOARDS[1..] {
        rig.add_board(*b, b.1);
    }
    rig
}

fn json_of(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}\nstderr:\n{}", text(&out.stdout), text(&out.stderr)))
}

/// The report's rows by board key.
fn rows_by_key(report: &serde_json::Value) -> BTreeMap<String, serde_json::Value> {
    report["boards"].as_array().unwrap().iter().map(|b| (b["key"].as_str().unwrap().to_string(), b.clone())).collect()
}

fn history(rig: &FlashRig) -> Vec<serde_json::Value> {
    let h: serde_json::Value = serde_json::from_str(&ok(&rig.kflash(&["history", "--json"]))).unwrap();
    h.as_array().cloned().unwrap_or_else(|| h["records"].as_array().cloned().unwrap_or_default())
}

fn assert_verified(row: &serde_json::Value, version: &str) {
    assert_eq!(row["flash"], "flashed", "{row}");
    assert_eq!(row["verify"], "verified", "{row}");
    assert_eq!(row["version_after"], version, "{row}");
    assert_eq!(row["state"]["state"], "flashed", "{row}");
    assert_eq!(row["state"]["view"]["klipper"], "confirmed", "level (c): Klippy reports the new version: {row}");
}

/// A digest of every file (path, size, content) under `dir`.
fn tree_digest(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.display().to_string(), std::fs::read(&p).unwrap_or_default()));
            }
        }
    }
    out.sort();
    out
}

#[test]
#[ignore = "runs inside the USB rig"]
fn three_boards_one_stop_each_verified_then_only_the_outdated_one() {
    let _clean = begin(&ALL_IN_PRINTER_CFG);
    let rig = three_boards(&[]);
    let version = klipper_tree_version();
    let log = ServiceLog::start();
    let events = EventLog::mark("flash-all three");

    let out = rig.kflash_logged(&["flash-all", "--yes", "--json"]);
    let report = json_of(&out);
    assert_eq!(out.status.code(), Some(0), "{report}");
    assert_eq!(report["ok"], true, "{report}");
    let rows = rows_by_key(&report);
    assert_eq!(rows.len(), 3, "{report}");
    for (name, _, _) in BOARDS {
        assert_verified(&rows[name], &version);
        assert_eq!(board_json(name)["version"], version.as_str(), "{name} runs the flashed image");
        assert_eq!(events.kind(name, "flash-complete").len(), 1, "{name} written once");
        assert_eq!(events.kind(name, "touch").len(), 1, "{name}: one bootloader request");
    }
    log.assert_klipper_stopped_and_restarted();
    let downtime = report["klipper_downtime_secs"].as_f64().expect("a downtime");
    let logged = log.downtime("klipper").unwrap();
    assert!((downtime - logged).abs() < 1.0, "kflash's downtime {downtime} vs systemctl.log's {logged}");
    let stderr = text(&out.stderr);
    for (name, _, _) in BOARDS {
        assert!(stderr.contains(&format!("{name} | [Verify] Klipper is ready and reports {version}")), "{stderr}");
    }
    let h = history(&rig);
    assert_eq!(h.len(), 3, "one record per board: {h:?}");
    for r in &h {
        assert_eq!(r["result"], "ok", "{r}");
        assert!(r["durations"]["klipper_downtime"].as_f64().is_some(), "{r}");
    }

    // Every board current: nothing to do, and Klipper is not touched.
    klipper_ready_on(&ALL_IN_PRINTER_CFG);
    let log = ServiceLog::start();
    let out = rig.kflash_logged(&["flash-all", "--yes", "--json"]);
    let report = json_of(&out);
    assert_eq!(out.status.code(), Some(0), "{report}");
    assert!(text(&out.stderr).contains(&format!("All boards already run {version}. Flash anyway? no")));
    assert_eq!(report["boards"].as_array().unwrap().len(), 0, "{report}");
    let current: Vec<&str> = report["left_out"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["why"] == "current")
        .map(|l| l["key"].as_str().unwrap())
        .collect();
    assert_eq!(current.len(), 3, "{report}");
    assert!(log.verbs("klipper").is_empty(), "Klipper was not touched: {:?}", log.entries());

    // One board outdated (Klippy sees the old version after a restart): only it is flashed.
    boardctl(&["set-version", "ebb", "v0.12.0-300-gdeadbeef"]);
    restart_klipper_and_wait_ready();
    let log = ServiceLog::start();
    let events = EventLog::mark("flash-all only outdated");
    let out = rig.kflash_logged(&["flash-all", "--only-outdated", "--json"]);
    let report = json_of(&out);
    assert_eq!(out.status.code(), Some(0), "{report}");
    let rows = rows_by_key(&report);
    assert_eq!(rows.keys().collect::<Vec<_>>(), ["ebb"], "{report}");
    assert_verified(&rows["ebb"], &version);
    events.assert_no_writes_except("ebb");
    log.assert_klipper_stopped_and_restarted();
}

#[test]
#[ignore = "runs inside the USB rig"]
fn dry_run_prints_the_plan_and_touches_nothing() {
    let _clean = begin(&ALL_IN_PRINTER_CFG);
    let rig = three_boards(&[]);
    std::fs::create_dir_all(&rig.state).unwrap();
    let dirs = [rig.cfg.clone(), rig.state.clone(), rig.cache.clone()];
    let before: Vec<_> = dirs.iter().map(|d| tree_digest(d)).collect();
    let log = ServiceLog::start();
    let events = EventLog::mark("dry run");

    let out = rig.kflash_logged(&["flash-all", "--dry-run", "--json"]);
    let plan = json_of(&out);
    assert_eq!(out.status.code(), Some(0), "{plan}");
    let keys: Vec<&str> = plan["boards"].as_array().unwrap().iter().map(|b| b["key"].as_str().unwrap()).collect();
    assert_eq!(keys.len(), 3, "{plan}");
    for (name, _, _) in BOARDS {
        assert!(keys.contains(&name), "{plan}");
    }
    assert_eq!(plan["versions"]["source"], "klippy", "{plan}");
    for b in plan["boards"].as_array().unwrap() {
        assert!(["cached", "build"].contains(&b["build"]["build"].as_str().unwrap_or("")), "{b}");
    }

    let after: Vec<_> = dirs.iter().map(|d| tree_digest(d)).collect();
    assert!(before == after, "--dry-run changed files in the config, state or cache dirs");
    assert!(log.entries().is_empty(), "--dry-run called the service manager: {:?}", log.entries());
    let touched: Vec<_> =
        events.events().into_iter().filter(|e| e["event"] == "touch" || e["event"] == "flash-start").collect();
    assert!(touched.is_empty(), "--dry-run touched a board: {touched:?}");
}

#[test]
#[ignore = "runs inside the USB rig"]
fn unconfigured_boards_refuse_the_run_unless_skipped() {
    let _clean = begin(&ALL_IN_PRINTER_CFG);
    let rig = three_boards(&[]);
    std::fs::remove_file(rig.cfg.join("configs/nitehawk.config")).unwrap();
    let log = ServiceLog::start();
    let out = rig.kflash_logged(&["flash-all", "--yes"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("nitehawk: board 'nitehawk' has no firmware config yet"), "{stderr}");
    assert!(stderr.contains("--skip-unconfigured"), "{stderr}");
    assert!(log.entries().is_empty(), "{:?}", log.entries());

    let out = rig.kflash_logged(&["flash-all", "--dry-run", "--skip-unconfigured", "--json"]);
    let plan = json_of(&out);
    let left: Vec<_> = plan["left_out"].as_array().unwrap().iter().filter(|l| l["why"] == "unconfigured").collect();
    assert_eq!(left.len(), 1, "{plan}");
    assert_eq!(left[0]["key"], "nitehawk");
    assert_eq!(plan["boards"].as_array().unwrap().len(), 2, "{plan}");
}

#[test]
#[ignore = "runs inside the USB rig"]
fn mixed_outcomes_are_summarised_and_klipper_runs_again() {
    // nitehawk is not in printer.cfg: it never comes back, and Klippy must still get ready.
    let sections = [("mcu", "octopus"), ("mcu ebb", "ebb")];
    let _clean = begin(&sections);
    let rig = three_boards(&[("reconnect_secs", 6)]);
    // octopus: a config whose application address the tree's Kconfig would change (critical).
    let path = rig.cfg.join("configs/octopus.config");
    let cfg = std::fs::read_to_string(&path).unwrap();
    let broken = cfg.replace("CONFIG_FLASH_APPLICATION_ADDRESS=0x8020000", "CONFIG_FLASH_APPLICATION_ADDRESS=0xZZZZ");
    assert_ne!(cfg, broken, "the config has an application address");
    std::fs::write(&path, &broken).unwrap();
    // nitehawk: written, then never back (the fault is set while it is being written; its
    // flash is slowed so the write outlasts boardctl's call).
    boardctl(&["fault", "nitehawk", "slow-flash=6"]);
    let version = klipper_tree_version();
    let log = ServiceLog::start();
    let events = EventLog::mark("mixed");

    let mut bg = Background::spawn(rig.command(&["flash-all", "--yes"]));
    bg.wait_for_line("nitehawk | [Flash] writing", 180);
    boardctl(&["fault", "nitehawk", "no-return"]);
    let (status, stderr) = bg.finish(180);
    assert_eq!(status.code(), Some(7), "{stderr}");
    assert!(
        stderr.contains("octopus | -> FAILED in Build: the Klipper tree's Kconfig would change critical"),
        "{stderr}"
    );
    assert!(stderr.contains("nitehawk | -> FAILED in Reconnect"), "{stderr}");
    assert!(stderr.contains("ebb | -> flashed, verified by the board and by Klipper"), "{stderr}");
    assert!(stderr.contains("error: 2 board(s) did not pass: nitehawk, octopus"), "{stderr}");
    assert_eq!(board_json("ebb")["version"], version.as_str());
    assert_eq!(events.kind("nitehawk", "flash-complete").len(), 1, "nitehawk was written");
    events.assert_not_written("octopus");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), broken, "the refused config is untouched");
    log.assert_klipper_stopped_and_restarted();
    let h = history(&rig);
    let results: BTreeMap<String, String> =
        h.iter().map(|r| (r["board_key"].as_str().unwrap_or("?").to_string(), r["result"].to_string())).collect();
    assert_eq!(h.len(), 3, "one record per board: {h:?}");
    assert_eq!(results.get("ebb").map(String::as_str), Some("\"ok\""), "{h:?}");
}

#[test]
#[ignore = "runs inside the USB rig"]
fn a_print_or_an_unreachable_moonraker_refuses_before_anything_stops() {
    let _clean = begin(&ALL_IN_PRINTER_CFG);
    klipper_ready_on(&ALL_IN_PRINTER_CFG);
    let rig = three_boards(&[]);
    let log = ServiceLog::start();
    let events = EventLog::mark("refused");
    {
        let _print = RealPrint::start("flash_all_refused.gcode", 200);
        let out = rig.kflash_logged(&["flash-all", "--yes"]);
        assert_eq!(out.status.code(), Some(10), "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains("printing"), "{}", text(&out.stderr));
    }
    {
        let out = run("systemctl", &["stop", "moonraker"]);
        assert!(out.status.success());
        let out = rig.kflash_logged(&["flash-all"]);
        let _ = run("systemctl", &["start", "moonraker"]);
        assert_ne!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains("Moonraker"), "{}", text(&out.stderr));
    }
    assert!(log.verbs("klipper").is_empty(), "Klipper was touched: {:?}", log.entries());
    let touched: Vec<_> =
        events.events().into_iter().filter(|e| e["event"] == "touch" || e["event"] == "flash-start").collect();
    assert!(touched.is_empty(), "a board was touched: {touched:?}");
    wait_moonraker_with_klippy_ready(60);
}

/// `--events`: stderr is the run's event stream, one JSON object per line, every layer in it
/// (the gate, builds, Katapult's blocks, the udev-verified return, identify, Klippy's word).
fn assert_event_stream(stderr: &str, version: &str) {
    let events: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON event line ({e}): {l}\n{stderr}")))
        .collect();
    let of = |board: Option<&str>, kind: &str| -> Vec<&serde_json::Value> {
        events.iter().filter(|e| e["event"] == kind && e["board"].as_str() == board).collect()
    };
    assert_eq!(of(None, "klipper-stopped").len(), 1, "{stderr}");
    assert_eq!(of(None, "klipper-started").len(), 1, "{stderr}");
    assert_eq!(of(None, "print-check-started").len(), 2, "the gate, and again before the stop: {stderr}");
    for (name, _, _) in BOARDS {
        let key = Some(name);
        assert_eq!(of(key, "built").len(), 1, "{name}: {stderr}");
        assert!(!of(key, "write-progress").is_empty(), "{name}: {stderr}");
        assert_eq!(of(key, "identified")[0]["version"], version, "{name}: {stderr}");
        assert_eq!(of(key, "klippy-reports")[0]["version"], version, "{name}: {stderr}");
        let states = of(key, "board");
        assert_eq!(states.last().unwrap()["state"]["state"], "flashed", "{name}: {stderr}");
    }
}

#[test]
#[ignore = "runs inside the USB rig"]
fn parallel_flashes_overlap_inside_one_stop() {
    let _clean = begin(&ALL_IN_PRINTER_CFG);
    let rig = three_boards(&[]);
    let version = klipper_tree_version();
    let log = ServiceLog::start();
    let events = EventLog::mark("parallel");

    let out = rig.kflash_logged(&["flash-all", "--yes", "--parallel", "--json", "--events"]);
    let report = json_of(&out);
    assert_eq!(out.status.code(), Some(0), "{report}");
    let rows = rows_by_key(&report);
    for (name, _, _) in BOARDS {
        assert_verified(&rows[name], &version);
    }
    log.assert_klipper_stopped_and_restarted();
    assert_event_stream(&String::from_utf8_lossy(&out.stderr), &version);
    // The writes overlap: every board's first block is written before any board's write ends.
    let starts: Vec<f64> = BOARDS.iter().map(|b| events.kind(b.0, "flash-start")[0]["ts"].as_f64().unwrap()).collect();
    let ends: Vec<f64> = BOARDS.iter().map(|b| events.kind(b.0, "flash-complete")[0]["ts"].as_f64().unwrap()).collect();
    let last_start = starts.iter().cloned().fold(f64::MIN, f64::max);
    let first_end = ends.iter().cloned().fold(f64::MAX, f64::min);
    assert!(last_start < first_end, "the writes did not overlap: starts {starts:?}, ends {ends:?}");
    let sum: f64 = rows.values().map(|r| r["seconds"].as_f64().unwrap()).sum();
    let downtime = report["klipper_downtime_secs"].as_f64().unwrap();
    eprintln!("parallel: downtime {downtime:.2} s, boards' own times {sum:.2} s in all");
    assert!(downtime < sum, "downtime {downtime} is not below the boards' summed time {sum}");
}

#[test]
#[ignore = "runs inside the USB rig"]
fn a_board_waiting_in_katapult_is_flashed_without_a_bootloader_request() {
    let _clean = begin(&ALL_IN_PRINTER_CFG);
    let rig = three_boards(&[]);
    boardctl(&["reboot", "ebb", "katapult"]);
    boardctl(&["wait-ready"]);
    settle();
    let version = klipper_tree_version();
    let events = EventLog::mark("in katapult");

    let dry = json_of(&rig.kflash(&["flash-all", "--dry-run", "--json"]));
    assert_eq!(dry["boards"][0]["key"], "ebb", "a board in Katapult goes first: {dry}");
    assert_eq!(dry["boards"][0]["mode"], "katapult", "{dry}");

    let out = rig.kflash_logged(&["flash-all", "--yes", "--json"]);
    let report = json_of(&out);
    assert_eq!(out.status.code(), Some(0), "{report}");
    let rows = rows_by_key(&report);
    for (name, _, _) in BOARDS {
        assert_verified(&rows[name], &version);
    }
    assert!(events.kind("ebb", "touch").is_empty(), "ebb was sent a bootloader request: {:?}", events.of("ebb"));
    assert_eq!(events.kind("ebb", "flash-complete").len(), 1);
}

#[test]
#[ignore = "runs inside the USB rig"]
fn a_signal_mid_batch_starts_klipper_and_completes_the_history() {
    for sig in ["INT", "TERM", "HUP"] {
        let _clean = begin(&ALL_IN_PRINTER_CFG);
        let rig = three_boards(&[]);
        let log = ServiceLog::start();
        let mut bg = Background::spawn(rig.command(&["flash-all", "--yes"]));
        bg.wait_for_line("Klipper stopped: flashing", 120);
        bg.signal(sig);
        let (status, stderr) = bg.finish(60);
        assert_eq!(status.code(), Some(130), "SIG{sig}: {stderr}");
        log.assert_klipper_stopped_and_restarted();
        let h = history(&rig);
        assert_eq!(h.len(), 3, "SIG{sig}: one record per board: {h:?}");
        assert!(h.iter().all(|r| r["result"] == "failed"), "SIG{sig}: {h:?}");
        assert!(!rig.stop_marker().exists(), "SIG{sig}: the stop marker is gone");
    }
}

#[test]
#[ignore = "runs inside the USB rig"]
fn the_version_questions_on_a_terminal() {
    let _clean = begin(&ALL_IN_PRINTER_CFG);
    let rig = three_boards(&[]);
    let version = klipper_tree_version();
    // Every board current by Klippy's word (the installed images say so; Klippy restarted).
    for (name, _, _) in BOARDS {
        boardctl(&["set-version", name, &version]);
    }
    restart_klipper_and_wait_ready();
    let log = ServiceLog::start();

    let mut cmd = rig.command(&["flash-all"]);
    cmd.env("TERM", "dumb");
    let mut all = PtyChild::spawn(cmd);
    all.expect(&format!("All boards already run {version}. Flash anyway? [y/N]"), Duration::from_secs(60));
    all.type_bytes(b"n");
    let status = all.wait(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{}", all.output());
    assert!(all.output().contains("nothing to flash"), "{}", all.output());
    assert!(log.entries().is_empty(), "Klipper was not touched: {:?}", log.entries());

    // One outdated: the list, then the question; Ctrl-C there ends at once, nothing touched.
    boardctl(&["set-version", "ebb", "v0.12.0-300-gdeadbeef"]);
    restart_klipper_and_wait_ready();
    let log = ServiceLog::start();
    let mut cmd = rig.command(&["flash-all"]);
    cmd.env("TERM", "dumb");
    let mut some = PtyChild::spawn(cmd);
    some.expect("Flash only outdated boards? [Y/n]", Duration::from_secs(60));
    let out = some.output();
    assert!(out.contains("ebb") && out.contains("outdated: runs v0.12.0-300-gdeadbeef"), "{out}");
    assert!(out.contains("octopus") && out.contains("current"), "{out}");
    let (took, status) = some.ctrl_c(Duration::from_secs(10));
    assert_eq!(status.code(), Some(130), "{}", some.output());
    assert!(took < Duration::from_secs(3), "Ctrl-C at the question took {took:?}");
    assert!(log.entries().is_empty(), "Klipper was not touched: {:?}", log.entries());
    assert!(history(&rig).is_empty(), "nothing ran, so nothing is recorded");
}
