//! Step 3 on real USB: `kflash flash` end to end against simulated boards — real make,
//! 1200-baud request seen by the board through usbmon, Katapult over the gadget tty, the
//! board re-enumerating, identify over the tty — with the real Klippy and Moonraker as the
//! printer host (level (c): Klippy ready and reporting the new version) and the systemctl
//! stand-in as the service manager.

mod rig_support;

use std::path::PathBuf;
use std::process::{Command, Output};

use rig_support::*;

struct Flashing {
    _tmp: tempfile::TempDir,
    cfg: PathBuf,
    state: PathBuf,
    cache: PathBuf,
}

fn klipper_tree() -> PathBuf {
    PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join("klipper")
}

fn rig_state() -> PathBuf {
    PathBuf::from(std::env::var("KFLASH_RIG_STATE").unwrap_or_else(|_| "/run/kflash-rig".into()))
}

/// A registry with `board` registered and configured for `mcu`.
fn setup(board: (&str, &str, &str), config_mcu: &str) -> Flashing {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("cfg");
    let state = tmp.path().join("state");
    let cache = tmp.path().join("cache");
    std::fs::create_dir_all(&cfg).unwrap();
    std::fs::write(
        cfg.join("settings.toml"),
        format!(
            "klipper_dir = \"{}\"\nservice_command = \"sudo -n systemctl\"\n[timeouts]\nbootloader_secs = 15\nreconnect_secs = 20\n",
            klipper_tree().display()
        ),
    )
    .unwrap();
    let f = Flashing { _tmp: tmp, cfg, state, cache };
    ok(&f.kflash(&["add", "--device", &by_id(board, "Klipper"), "--name", board.0, "--key", board.0]));
    let st = Command::new("make")
        .arg("-C")
        .arg(klipper_tree())
        .arg(format!("KCONFIG_CONFIG={}", f.cfg.join(format!("configs/{}.config", board.0)).display()))
        // OUT= too: like Klipper's, every make run remakes $(OUT)board-link.
        .arg(format!("OUT={}/", f.cfg.join(format!("menuconfig-{}", board.0)).display()))
        .arg("menuconfig")
        .env("RIG_MENUCONFIG_MCU", config_mcu)
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    f
}

impl Flashing {
    fn kflash(&self, args: &[&str]) -> Output {
        Command::new(kflash_bin())
            .arg("--config-dir")
            .arg(&self.cfg)
            .args(args)
            .env("KFLASH_STATE_DIR", &self.state)
            .env("KFLASH_CACHE_DIR", &self.cache)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run kflash")
    }
}

fn board_status(name: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(&boardctl(&["status", "--json"])).unwrap();
    v.as_array().unwrap().iter().find(|b| b["name"] == name).cloned().unwrap()
}

fn tree_version() -> String {
    let o = Command::new("git")
        .arg("-C")
        .arg(klipper_tree())
        .args(["describe", "--always", "--tags", "--long", "--dirty"])
        .output()
        .unwrap();
    String::from_utf8(o.stdout).unwrap().trim().to_string()
}

/// `(verb, service)` of each systemctl stop/start since `from` lines.
fn service_log(from: usize) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(rig_state().join("systemctl.log")).unwrap_or_default();
    text.lines()
        .skip(from)
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() >= 3 && (w[1] == "stop" || w[1] == "start")).then(|| (w[1].to_string(), w[2].to_string()))
        })
        .collect()
}

fn service_log_len() -> usize {
    std::fs::read_to_string(rig_state().join("systemctl.log")).map(|t| t.lines().count()).unwrap_or(0)
}

fn klipper_active() -> bool {
    Command::new("systemctl").args(["is-active", "klipper"]).output().unwrap().status.success()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
#[ignore = "runs inside the USB rig"]
fn flash_one_board_end_to_end() {
    let _clean = begin(&[("mcu", OCTOPUS.0)]);
    // The version before comes from a ready Klippy only (one still starting is not trusted).
    klipper_ready_on(&[("mcu", OCTOPUS.0)]);
    let f = setup(OCTOPUS, OCTOPUS.1);
    let before = board_status(OCTOPUS.0);
    let log_at = service_log_len();

    let out = f.kflash(&["flash", OCTOPUS.0, "--yes", "--json"]);
    let summary: serde_json::Value =
        serde_json::from_str(&ok(&out)).unwrap_or_else(|e| panic!("{e}: {}", stderr(&out)));
    let version = tree_version();
    assert_eq!(summary["version_after"], version.as_str(), "{summary}");
    let after = board_status(OCTOPUS.0);
    assert_eq!(after["version"], version.as_str(), "the simulated board runs the flashed image");
    assert_eq!(after["mode"], "klipper");
    assert_ne!(before["version"], after["version"]);
    assert_eq!(service_log(log_at), vec![("stop".into(), "klipper".into()), ("start".into(), "klipper".into())]);
    assert!(klipper_active());
    let downtime = summary["timings"]["klipper_downtime"].as_f64().unwrap();
    eprintln!("single-board flash: Klipper downtime {downtime:.1} s, timings {}", summary["timings"]);

    let log = stderr(&out);
    assert!(log.contains("Klipper is ready and reports"), "level (c) verified through Moonraker: {log}");

    // Already at the built version: skipped without stopping Klipper, unless --force.
    let log_at = service_log_len();
    let again: serde_json::Value =
        serde_json::from_str(&ok(&f.kflash(&["flash", OCTOPUS.0, "--yes", "--json"]))).unwrap();
    assert!(again["skipped"].as_str().unwrap().contains("already runs"), "{again}");
    assert!(service_log(log_at).is_empty(), "Klipper untouched when skipping");
    let history = ok(&f.kflash(&["history", OCTOPUS.0, "--json"]));
    let h: serde_json::Value = serde_json::from_str(&history).unwrap();
    let results: Vec<&str> = h.as_array().unwrap().iter().map(|r| r["result"].as_str().unwrap()).collect();
    assert_eq!(results, ["ok", "skipped"], "{history}");
    assert_eq!(h[0]["version_after"], version.as_str());
    assert_eq!(h[0]["version_before"], before["version"]);

    // Nothing was written to the other boards.
    for other in [NITEHAWK, EBB] {
        assert_eq!(board_status(other.0)["version"], before["version"], "{} untouched", other.0);
    }
}

#[test]
#[ignore = "runs inside the USB rig"]
fn wrong_mcu_config_is_refused_before_anything() {
    let _clean = begin(&[("mcu", OCTOPUS.0)]);
    // Registered as the stm32h723 it is, but its config says stm32f446: refused at build time.
    let f = setup(OCTOPUS, EBB.1);
    let log_at = service_log_len();
    let out = f.kflash(&["flash", OCTOPUS.0, "--yes"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("is an stm32h723xx but its firmware config"), "{}", stderr(&out));
    assert!(service_log(log_at).is_empty(), "Klipper was never stopped");
    assert_eq!(board_status(OCTOPUS.0)["mode"], "klipper");
}

#[test]
#[ignore = "runs inside the USB rig"]
fn wrong_application_start_is_refused_before_any_write() {
    let _clean = begin(&[("mcu", OCTOPUS.0)]);
    let f = setup(OCTOPUS, OCTOPUS.1);
    boardctl(&["fault", OCTOPUS.0, "wrong-app-start=0x8008000"]);
    let before = board_status(OCTOPUS.0);
    let log_at = service_log_len();
    let out = f.kflash(&["flash", OCTOPUS.0, "--yes"]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert!(stderr(&out).contains("Katapult starts the application at 0x8008000"), "{}", stderr(&out));
    let after = board_status(OCTOPUS.0);
    assert_eq!(after["blocks_written"].as_u64().unwrap_or(0), 0, "nothing written: {after}");
    assert_eq!(before["version"], after["version"]);
    assert_eq!(after["mode"], "klipper", "sent back to its old firmware: {after}");
    assert_eq!(service_log(log_at), vec![("stop".into(), "klipper".into()), ("start".into(), "klipper".into())]);
    assert!(klipper_active());
}

#[test]
#[ignore = "runs inside the USB rig"]
fn second_concurrent_flash_is_refused() {
    let _clean = begin(&[("mcu", OCTOPUS.0)]);
    let f = setup(OCTOPUS, OCTOPUS.1);
    // Slow the board down so the first flash is still running.
    boardctl(&["fault", OCTOPUS.0, "slow-return=6"]);
    let mut first = Command::new(kflash_bin())
        .arg("--config-dir")
        .arg(&f.cfg)
        .args(["flash", OCTOPUS.0, "--yes"])
        .env("KFLASH_STATE_DIR", &f.state)
        .env("KFLASH_CACHE_DIR", &f.cache)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the first one has stopped Klipper (it holds the lock by then).
    let stderr_pipe = first.stderr.take().unwrap();
    let mut reader = std::io::BufReader::new(stderr_pipe);
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        assert!(std::io::BufRead::read_line(&mut reader, &mut line).unwrap() > 0, "first flash ended early: {seen}");
        seen.push_str(&line);
        if line.contains("stopped") {
            break;
        }
    }
    let second = f.kflash(&["flash", OCTOPUS.0, "--yes"]);
    assert_eq!(second.status.code(), Some(8), "{}", stderr(&second));
    assert!(stderr(&second).contains("another kflash (pid"), "{}", stderr(&second));
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    assert!(first.wait().unwrap().success());
    assert!(klipper_active());
}

#[test]
#[ignore = "runs inside the USB rig"]
fn katapult_check_yes_no_and_rom() {
    let _clean = begin(&[("mcu", NITEHAWK.0)]);
    let f = setup(NITEHAWK, NITEHAWK.1);
    let log_at = service_log_len();
    let check = |f: &Flashing| -> serde_json::Value {
        let out = f.kflash(&["katapult-check", NITEHAWK.0, "--json"]);
        serde_json::from_str(&ok(&out)).unwrap_or_else(|e| panic!("{e}: {}", stderr(&out)))
    };

    let yes = check(&f);
    assert_eq!(yes["has_katapult"], "yes", "{yes}");
    assert_eq!(yes["left_in"], "klipper", "sent back to the application: {yes}");
    assert_eq!(yes["katapult_version"], "v0.0.1-109-g902f335");
    boardctl(&["wait-ready"]);
    assert_eq!(board_status(NITEHAWK.0)["mode"], "klipper");
    assert_eq!(service_log(log_at), vec![("stop".into(), "klipper".into()), ("start".into(), "klipper".into())]);

    boardctl(&["fault", NITEHAWK.0, "ignore-touch"]);
    let no = check(&f);
    assert_eq!(no["has_katapult"], "no", "{no}");
    assert!(no["detail"].as_str().unwrap().contains("USB reset"), "{no}");
    assert_eq!(board_status(NITEHAWK.0)["mode"], "klipper");

    reset_boards();
    boardctl(&["fault", NITEHAWK.0, "rom-dfu"]);
    let rom = check(&f);
    assert_eq!(rom["has_katapult"], "no", "{rom}");
    assert!(rom["detail"].as_str().unwrap().contains("BOOTSEL"), "{rom}");
    assert!(klipper_active());
}

/// `make flash` and Katapult's flashtool.py write the image after kflash's own checks; the
/// stand-in tools speak the same protocol to the simulated board as the real ones.
#[test]
#[ignore = "runs inside the USB rig"]
fn flash_with_make_flash_and_flashtool() {
    let _clean = begin(&[("mcu", NITEHAWK.0)]);
    for (board, method) in [(NITEHAWK, "make-flash"), (EBB, "flashtool")] {
        // printer.cfg names the board being flashed from kflash's Klipper start on, so level
        // (c) waits for one board's configuration, not two.
        write_mcus_json(&[("mcu", board.0)]);
        let f = setup(board, board.1);
        std::fs::write(
            f.cfg.join("settings.toml"),
            format!(
                "klipper_dir = \"{}\"\nallow_flash_fallback = false\n[timeouts]\nbootloader_secs = 15\nreconnect_secs = 30\n",
                klipper_tree().display()
            ),
        )
        .unwrap();
        let log_at = service_log_len();
        let out = f.kflash(&["flash", board.0, "--yes", "--json", "--method", method]);
        let summary: serde_json::Value =
            serde_json::from_str(&ok(&out)).unwrap_or_else(|e| panic!("{e}: {}", stderr(&out)));
        assert_eq!(summary["method"], method, "{summary}");
        assert_eq!(summary["version_after"], tree_version().as_str());
        assert_eq!(board_status(board.0)["version"], tree_version().as_str());
        assert!(stderr(&out).contains(&format!("running {method} on /dev/serial/by-path/")), "{}", stderr(&out));
        assert!(stderr(&out).contains("Klipper is ready and reports"), "level (c): {}", stderr(&out));
        assert_eq!(service_log(log_at), vec![("stop".into(), "klipper".into()), ("start".into(), "klipper".into())]);
    }
    assert_eq!(board_status(OCTOPUS.0)["blocks_written"].as_u64().unwrap_or(0), 0, "octopus untouched");
}

/// Moonraker decides whether kflash may stop Klipper: a real print refuses, a completed one
/// does not; the real Moonraker with API-key-only authorization wants the key; an
/// unreachable Moonraker needs an explicit yes.
#[test]
#[ignore = "runs inside the USB rig"]
fn moonraker_gates_the_flash() {
    let _clean = begin(&[("mcu", EBB.0)]);
    klipper_ready_on(&[("mcu", EBB.0)]);
    let f = setup(EBB, EBB.1);

    let print = RealPrint::start("calibration_cube.gcode", 4000);
    let log_at = service_log_len();
    let out = f.kflash(&["flash", EBB.0, "--yes"]);
    assert_eq!(out.status.code(), Some(10), "{}", stderr(&out));
    assert!(stderr(&out).contains("the printer is printing calibration_cube.gcode"), "{}", stderr(&out));
    assert!(service_log(log_at).is_empty(), "Klipper untouched during a print");
    print.cancel();

    // A print that ran to its end leaves print_stats `complete`: not busy.
    let _done = RealPrint::start("short.gcode", 8);
    wait_print_state("complete", 60);

    // kflash reaches Moonraker from outside its trusted_clients: the real 401, then the key.
    let untrusted = UntrustedClient::new();
    ok(&f.kflash(&["settings", "set", "moonraker_url", &untrusted.url]));
    let out = f.kflash(&["flash", EBB.0]);
    assert_eq!(out.status.code(), Some(9), "401 without the key, and no --yes: {}", stderr(&out));
    assert!(stderr(&out).contains("401") && stderr(&out).contains("moonraker_api_key"), "{}", stderr(&out));
    ok(&f.kflash(&["settings", "set", "moonraker_api_key", &untrusted.key]));
    let out = f.kflash(&["flash", EBB.0, "--force"]);
    ok(&out);
    assert!(stderr(&out).contains("printer is complete"), "{}", stderr(&out));
    assert!(stderr(&out).contains("Klipper is ready and reports"), "level (c) with the key: {}", stderr(&out));

    let stop = Command::new("systemctl").args(["stop", "moonraker"]).output().unwrap();
    assert!(stop.status.success());
    let log_at = service_log_len();
    let refused = f.kflash(&["flash", EBB.0, "--force"]);
    assert_eq!(refused.status.code(), Some(9), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("Moonraker is not reachable") && stderr(&refused).contains("pass --yes"),
        "{}",
        stderr(&refused)
    );
    assert!(service_log(log_at).is_empty());
    let forced = f.kflash(&["flash", EBB.0, "--force", "--yes"]);
    let log = stderr(&forced);
    assert!(forced.status.success(), "{log}");
    assert!(log.contains("Moonraker was unreachable, so Klipper's own view of the board was not checked"), "{log}");
    let start = Command::new("systemctl").args(["start", "moonraker"]).output().unwrap();
    assert!(start.status.success());
    assert!(klipper_active());
}
