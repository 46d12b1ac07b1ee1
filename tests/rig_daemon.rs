//! Step 7 on real USB, with the real Klippy and Moonraker: `kflash daemon` reports each
//! board's firmware state from udev events (an outdated board as it appears, a
//! board stuck in Katapult, an unregistered board), picks up a newly registered board on
//! SIGHUP, answers `kflash status`, stops cleanly on SIGTERM, and starts Klipper when an
//! interrupted flash left it stopped.

mod rig_support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use rig_support::*;

/// The bound on one replugged board's report, one sample under whatever load CI has: a stall
/// bound, not the measurement. The 1 s target is the soak's quiet p99 over 50 replugs.
const REPORT_AFTER_APPEARING_LIMIT_SECS: f64 = 5.0;

/// A subscription to the daemon's notices, read on a thread; each with the wall time it came.
struct Subscription {
    notices: mpsc::Receiver<((f64, f64), serde_json::Value)>,
    _stream: UnixStream,
}

/// Wall time and CLOCK_MONOTONIC (udev's `USEC_INITIALIZED` clock), in seconds.
fn now() -> (f64, f64) {
    let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given.
    assert_eq!(unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) }, 0);
    (wall, ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9)
}

/// When udev announced the device (`USEC_INITIALIZED`, CLOCK_MONOTONIC seconds).
fn udev_initialized(devlink: &str) -> f64 {
    let out = run("udevadm", &["info", "--query=property", devlink]);
    let props = text(&out.stdout);
    let usec = props.lines().find_map(|l| l.strip_prefix("USEC_INITIALIZED=")).unwrap_or_else(|| panic!("{props}"));
    usec.parse::<f64>().unwrap() / 1e6
}

impl Subscription {
    fn new(socket: &Path) -> Subscription {
        let mut stream = UnixStream::connect(socket).unwrap();
        stream.write_all(b"{\"request\":\"subscribe\"}\n").unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in reader.lines().map_while(Result::ok) {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                if tx.send((now(), v)).is_err() {
                    break;
                }
            }
        });
        let sub = Subscription { notices: rx, _stream: stream };
        let (_, first) = sub.notices.recv_timeout(Duration::from_secs(10)).expect("the status first");
        assert_eq!(first["reply"], "status", "{first}");
        sub
    }

    /// The first notice about `key`'s status in state `state`, and when it came.
    fn board_state(&self, key: &str, state: &str, secs: u64) -> ((f64, f64), serde_json::Value) {
        let deadline = std::time::Instant::now() + Duration::from_secs(secs);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let Ok((at, n)) = self.notices.recv_timeout(left) else {
                panic!("no notice of {key} {state} within {secs} s; saw {seen:#?}");
            };
            let s = &n["notice"]["status"];
            if s["key"] == key && s["state"] == state {
                return (at, s.clone());
            }
            seen.push(n);
        }
    }
}

struct Daemon {
    process: Background,
    socket: PathBuf,
}

impl Daemon {
    fn start(rig: &FlashRig) -> Daemon {
        let socket = rig.state.join("daemon.sock");
        let mut cmd = rig.command(&["daemon", "--socket", socket.to_str().unwrap()]);
        cmd.env("RUST_LOG", "kflash=debug");
        let mut process = Background::spawn(cmd);
        process.wait_for_line("kflash daemon ready", 60);
        Daemon { process, socket }
    }

    fn status(&self, rig: &FlashRig) -> serde_json::Value {
        let out = rig.command(&["status", "--json"]).env("KFLASH_SOCKET", &self.socket).output().unwrap();
        serde_json::from_str(&ok(&out)).unwrap()
    }
}

/// A line of the printer's console (Moonraker's gcode store) containing `needle`, within
/// `secs` (Moonraker pushes nothing over HTTP: asked again until then).
fn console_line_with(needle: &str, secs: u64) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let store = moonraker_get("/server/gcode_store?count=100");
        let lines: Vec<String> = store["result"]["gcode_store"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|l| l["message"].as_str().map(String::from))
            .collect();
        if let Some(l) = lines.iter().find(|l| l.contains(needle)) {
            return l.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no console line with {needle:?}; the console:\n{}",
            lines.join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn board<'a>(status: &'a serde_json::Value, key: &str) -> &'a serde_json::Value {
    status["boards"].as_array().unwrap().iter().find(|b| b["key"] == key).unwrap_or_else(|| panic!("{status}"))
}

/// The boardsim `connect` event of `board` after the mark: when its USB gadget was bound.
fn bound_at(events: &EventLog, board: &str) -> f64 {
    events.kind(board, "connect").last().unwrap_or_else(|| panic!("no connect event of {board}"))["ts"]
        .as_f64()
        .unwrap()
}

#[test]
#[ignore = "runs inside the USB rig"]
fn the_daemon_reports_board_states_reloads_on_sighup_and_stops_on_sigterm() {
    in_rig();
    let _clean = LeaveRigClean;
    reset_boards();
    // Klippy ready on octopus: it holds octopus's tty, so its version comes from Klippy.
    klipper_ready_on(&[("mcu", OCTOPUS.0)]);
    let host = klipper_tree_version();
    let rig = FlashRig::new(OCTOPUS, OCTOPUS.1, &[]);
    let d = Daemon::start(&rig);

    let s = d.status(&rig);
    assert_eq!((&s["daemon"], &s["host_version"], &s["klippy"]), (&true.into(), &host.clone().into(), &"ready".into()));
    let octopus = board(&s, OCTOPUS.0);
    let old = board_json(OCTOPUS.0)["version"].as_str().unwrap().to_string();
    assert_eq!((&octopus["state"], &octopus["version"]), (&"outdated".into(), &old.clone().into()), "{s}");
    assert_eq!(octopus["version_source"], "klippy", "Klippy holds its tty, so the daemon did not touch it: {s}");
    assert_eq!(octopus["in_printer_cfg"], true);
    let unregistered: Vec<&str> =
        s["unregistered"].as_array().unwrap().iter().map(|b| b["serial"].as_str().unwrap()).collect();
    assert!(unregistered.contains(&NITEHAWK.2) && unregistered.contains(&EBB.2), "{s}");

    // Through the real Moonraker: the agent is listed, the README's KFLASH_STATUS macro (in the
    // real Klippy's printer.cfg) answers in the console, and front ends get the status as JSON.
    let agents = moonraker_get("/server/extensions/list");
    let names: Vec<&str> =
        agents["result"]["agents"].as_array().unwrap().iter().filter_map(|a| a["name"].as_str()).collect();
    assert!(names.contains(&"kflash"), "{agents}");
    moonraker_post("/printer/gcode/script?script=KFLASH_STATUS");
    let line = console_line_with("kflash: octopus (octopus): OUTDATED", 20);
    eprintln!("KFLASH_STATUS answered in the console: {line}");
    let req = moonraker_post_json(
        "/server/extensions/request",
        &serde_json::json!({"agent": "kflash", "method": "kflash_status"}),
    );
    assert_eq!(board(&req["result"], OCTOPUS.0)["state"], "outdated", "{req}");

    // A board nobody holds appears: the daemon reads its version itself.
    let sub = Subscription::new(&d.socket);
    let events = EventLog::mark("daemon: cubic plugged");
    boardctl(&["plug", MMB.0]);
    let mut process = d.process;
    process.wait_for_line("an unregistered klipper board appeared", 30);
    ok(&rig.kflash(&["add", "--device", &by_id(MMB, "Klipper"), "--name", "Cubic", "--key", MMB.0]));
    process.signal("HUP");
    let ((at, _), cubic) = sub.board_state(MMB.0, "outdated", 30);
    assert_eq!((&cubic["version"], &cubic["version_source"]), (&old.clone().into(), &"identify".into()), "{cubic}");
    eprintln!("SIGHUP: cubic registered and identified {:.3} s after its bind", at - bound_at(&events, MMB.0));

    // Replugged: reported outdated on appearing (udev's announcement). The target is 1 s, and
    // the soak measures it as a p99 over 50 quiet replugs; this one sample, under whatever load
    // the machine has, is printed and bounded against a stall only (one CI run under load took
    // 1.47 s). The USB enumeration before it, under emulation, is said apart.
    let events = EventLog::mark("daemon: cubic replugged");
    boardctl(&["unplug", MMB.0]);
    sub.board_state(MMB.0, "missing", 30);
    boardctl(&["plug", MMB.0]);
    let ((wall, mono), _) = sub.board_state(MMB.0, "outdated", 30);
    let appeared = udev_initialized(&by_id(MMB, "Klipper"));
    let (since_bind, since_udev) = (wall - bound_at(&events, MMB.0), mono - appeared);
    eprintln!(
        "cubic replugged: outdated reported {since_udev:.3} s after udev announced it ({since_bind:.3} s after the \
         USB bind, enumeration included)"
    );
    assert!(
        since_udev < REPORT_AFTER_APPEARING_LIMIT_SECS,
        "the outdated board was reported {since_udev:.3} s after it appeared"
    );

    // Stuck in Katapult: reported as such, without a version; auto_recover is off (the
    // default), so nothing is written.
    let stuck_events = EventLog::mark("daemon: cubic stuck");
    boardctl(&["reboot", MMB.0, "katapult"]);
    let (_, stuck) = sub.board_state(MMB.0, "bootloader", 30);
    assert_eq!((&stuck["mode"], &stuck["version"]), (&"katapult".into(), &serde_json::Value::Null), "{stuck}");
    process.wait_for_line("Cubic is in its bootloader", 10);
    stuck_events.assert_not_written(MMB.0);

    // No daemon: `kflash status` checks once by itself, and says so.
    process.signal("TERM");
    let (status, stderr) = process.finish(30);
    assert!(status.success(), "{status}: {stderr}");
    assert!(!d.socket.exists(), "the socket is removed at a clean stop");
    let out = rig.command(&["status", "--json"]).env("KFLASH_SOCKET", &d.socket).output().unwrap();
    let once: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(once["daemon"], false, "{once}");
    assert_eq!(board(&once, MMB.0)["state"], "bootloader", "{once}");
    assert_eq!(board(&once, OCTOPUS.0)["state"], "outdated", "{once}");
}

#[test]
#[ignore = "runs inside the USB rig"]
fn the_daemon_starts_klipper_left_stopped_by_an_interrupted_flash() {
    in_rig();
    let _clean = LeaveRigClean;
    reset_boards();
    klipper_running_on(&[("mcu", OCTOPUS.0)]);
    let rig = FlashRig::new(OCTOPUS, OCTOPUS.1, &[("bootloader_secs", 15), ("reconnect_secs", 20)]);
    boardctl(&["fault", OCTOPUS.0, "slow-flash=1.8"]);
    let log = ServiceLog::start();
    let mut flash = Background::spawn(rig.command(&["flash", OCTOPUS.0, "--yes"]));
    flash.wait_for_line("[Flash] writing", 120);
    flash.signal("KILL");
    flash.finish(30);
    assert!(!klipper_is_active() && rig.stop_marker().exists(), "kill -9 left Klipper stopped, with its marker");

    let socket = rig.state.join("daemon.sock");
    let mut daemon = Background::spawn(rig.command(&["daemon", "--socket", socket.to_str().unwrap()]));
    let line = daemon.wait_for_line("left stopped by kflash", 60);
    assert!(line.contains("flash of octopus") && line.contains("started it again"), "{line}");
    daemon.wait_for_line("kflash daemon ready", 60);
    log.assert_klipper_stopped_and_restarted();
    assert!(!rig.stop_marker().exists());
    daemon.signal("TERM");
    assert!(daemon.finish(30).0.success());
}

/// Flashing through the daemon. `KFLASH_FLASH_ALL` from the real printer's console during a
/// real print is refused, says so in the console, and Klipper is never stopped. Then
/// `kflash flash-all` on the command line is carried out by the daemon (the CLI draws its
/// events and summary), a second concurrent `flash-all` is refused as busy, and the board
/// ends current with Klipper stopped once and started again.
#[test]
#[ignore = "runs inside the USB rig"]
fn the_daemon_carries_out_flash_all_one_at_a_time_and_refuses_the_console_during_a_print() {
    in_rig();
    let _clean = LeaveRigClean;
    reset_boards();
    klipper_ready_on(&[("mcu", OCTOPUS.0)]);
    let rig = FlashRig::new(OCTOPUS, OCTOPUS.1, &[]);
    let mut d = Daemon::start(&rig);
    let s = d.status(&rig);
    assert_eq!(board(&s, OCTOPUS.0)["state"], "outdated", "{s}");

    // From the console, during a print: refused by the print gate, and said in the console.
    let log = ServiceLog::start();
    let print = RealPrint::start("benchy.gcode", 4000);
    moonraker_post("/printer/gcode/script?script=KFLASH_FLASH_ALL");
    let line = console_line_with("the printer is printing", 60);
    eprintln!("KFLASH_FLASH_ALL during a print answered in the console: {line}");
    assert!(line.contains("kflash: flash-all failed: the printer is printing benchy.gcode"), "{line}");
    assert!(log.verbs("klipper").is_empty(), "Klipper was touched during a print: {:?}", log.entries());
    assert_eq!(print_state(), "printing", "the print ran on");
    d.process.wait_for_line("a flash-all asked from the printer's console ended", 30);
    print.cancel();

    // From the command line: the daemon carries it out.
    let log = ServiceLog::start();
    boardctl(&["fault", OCTOPUS.0, "slow-flash=1.8"]);
    let mut cmd = rig.command(&["flash-all", "--yes"]);
    cmd.env("KFLASH_SOCKET", &d.socket);
    let mut first = Background::spawn(cmd);
    first.wait_for_line("a flash-all is carried out by the kflash daemon", 60);
    first.wait_for_line("writing", 300);
    let second = rig.command(&["flash-all", "--yes"]).env("KFLASH_SOCKET", &d.socket).output().unwrap();
    let second_err = text(&second.stderr);
    assert_eq!(second.status.code(), Some(10), "{second_err}");
    assert!(second_err.contains("busy") && second_err.contains("a flash-all is running"), "{second_err}");
    let (status, stderr) = first.finish(600);
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.contains(OCTOPUS.0) && stderr.contains("flashed"), "the summary is drawn by the CLI: {stderr}");
    log.assert_klipper_stopped_and_restarted();
    d.process.wait_for_line("a flash-all handed over through the socket", 10);
    // Moonraker's front ends are told (an agent event), with the version read back.
    let sent = d.process.wait_for_line("agent event board_flashed sent", 30);
    assert!(sent.contains(OCTOPUS.0) && sent.contains(&klipper_tree_version()), "{sent}");
    let after = board_json(OCTOPUS.0);
    assert_eq!(after["version"].as_str().unwrap(), klipper_tree_version(), "the board runs the host's version");

    d.process.signal("TERM");
    let (status, stderr) = d.process.finish(30);
    assert!(status.success(), "{status}: {stderr}");
}

/// `auto_recover = true`: a registered board found stuck in Katapult is re-flashed with its
/// cached image for the host's version, through the print gate, and verified; Klipper stops
/// once and starts again. (With it off, the default, the first scenario shows a stuck board
/// reported and nothing written.)
#[test]
#[ignore = "runs inside the USB rig"]
fn with_auto_recover_a_board_stuck_in_katapult_is_reflashed_from_the_cache() {
    in_rig();
    let _clean = LeaveRigClean;
    reset_boards();
    klipper_ready_on(&[("mcu", OCTOPUS.0)]);
    let rig = FlashRig::new(OCTOPUS, OCTOPUS.1, &[]);
    // The cached image for the host's version: auto-recovery never builds.
    ok(&rig.kflash(&["build", OCTOPUS.0]));
    let settings = rig.cfg.join("settings.toml");
    let old = std::fs::read_to_string(&settings).unwrap();
    std::fs::write(&settings, format!("auto_recover = true\n{old}")).unwrap();
    let mut d = Daemon::start(&rig);

    let log = ServiceLog::start();
    let events = EventLog::mark("auto-recover: octopus stuck");
    boardctl(&["reboot", OCTOPUS.0, "katapult"]);
    d.process.wait_for_line("is stuck in Katapult: re-flashing it (auto_recover)", 60);
    let line = d.process.wait_for_line("auto-recovery", 600);
    assert!(line.contains("was re-flashed and runs"), "{line}");
    assert!(events.writes(OCTOPUS.0) > 0, "the stuck board was written: {:?}", events.of(OCTOPUS.0));
    log.assert_klipper_stopped_and_restarted();
    let after = board_json(OCTOPUS.0);
    assert_eq!(after["version"].as_str().unwrap(), klipper_tree_version(), "the board runs the host's version");
    let s = d.status(&rig);
    assert_eq!(board(&s, OCTOPUS.0)["mode"], "klipper", "{s}");

    d.process.signal("TERM");
    let (status, stderr) = d.process.finish(30);
    assert!(status.success(), "{status}: {stderr}");
}
