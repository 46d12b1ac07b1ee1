//! CAN toolheads in the status, the daemon and `watch`, on the guest kernel's CAN stack: two
//! simulated nodes on a vcan interface, the real Klippy connected to both through printer.cfg
//! (`canbus_uuid`), registered from Moonraker's configfile with `kflash add --from-moonraker`
//! while Klipper runs. `kflash status --json` (one-shot and the daemon's) says which is current
//! and which outdated from Klippy's view, and a node whose interface goes down is missing, with
//! why — all without a frame sent by kflash on the bus.

mod rig_support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rig_support::*;

const EBB_UUID: &str = "0a1b2c3d4e5f";
const SB_UUID: &str = "00000000beef";
const MCU: &str = "stm32g0b1xx";
const OLD: &str = "v0.12.0-old";

struct Cfg {
    _tmp: tempfile::TempDir,
    cfg: PathBuf,
    state: PathBuf,
}

impl Cfg {
    fn new() -> Cfg {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = tmp.path().join("cfg");
        let state = tmp.path().join("state");
        std::fs::create_dir_all(&cfg).unwrap();
        std::fs::write(cfg.join("settings.toml"), format!("klipper_dir = \"{}\"\n", klipper_dir().display())).unwrap();
        Cfg { _tmp: tmp, cfg, state }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(kflash_bin());
        c.arg("--config-dir").arg(&self.cfg).args(args).env("KFLASH_STATE_DIR", &self.state).stdin(Stdio::null());
        c
    }

    fn kflash(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run kflash")
    }

    /// `kflash status --json` asking the daemon at `socket` (none there: the one-shot check).
    fn status(&self, socket: Option<&std::path::Path>) -> serde_json::Value {
        let nobody = self.state.join("nobody.sock");
        let out = self.command(&["status", "--json"]).env("KFLASH_SOCKET", socket.unwrap_or(&nobody)).output().unwrap();
        serde_json::from_str(&ok(&out)).unwrap_or_else(|e| panic!("{e}: {}", text(&out.stderr)))
    }
}

fn board<'a>(status: &'a serde_json::Value, key: &str) -> &'a serde_json::Value {
    status["boards"].as_array().unwrap().iter().find(|b| b["key"] == key).unwrap_or_else(|| panic!("{status}"))
}

fn brief(b: &serde_json::Value) -> (String, bool, String, String, String) {
    (
        b["state"].as_str().unwrap_or("").into(),
        b["connected"].as_bool().unwrap_or(false),
        b["version"].as_str().unwrap_or("").into(),
        b["interface"].as_str().unwrap_or("").into(),
        b["uuid"].as_str().unwrap_or("").into(),
    )
}

/// The next `n` CAN node records of `watch` (the USB board's are passed over), each within 20 s.
fn can_records(watch: &Watch, n: usize) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    while out.len() < n {
        let r = watch.next(20);
        if r.get("uuid").is_some() {
            out.push(r);
        }
    }
    out
}

/// printer.cfg back to the USB board alone (Klippy would stay in error without the vcan).
struct KlippyOnUsbOnly;

impl Drop for KlippyOnUsbOnly {
    fn drop(&mut self) {
        write_mcus_json(&[("mcu", OCTOPUS.0)]);
        let _ = Command::new("systemctl").args(["restart", "klipper"]).output();
    }
}

/// The daemon's notices, read on a thread.
fn subscribe(socket: &std::path::Path) -> (mpsc::Receiver<serde_json::Value>, UnixStream) {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.write_all(b"{\"request\":\"subscribe\"}\n").unwrap();
    let reader = BufReader::new(stream.try_clone().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in reader.lines().map_while(Result::ok) {
            if tx.send(serde_json::from_str(&line).unwrap()).is_err() {
                break;
            }
        }
    });
    (rx, stream)
}

/// The first notice of `key` in `state` within `secs`, and how long it took.
fn notice(rx: &mpsc::Receiver<serde_json::Value>, key: &str, state: &str, secs: u64) -> (serde_json::Value, f64) {
    let t = Instant::now();
    let s = notice_where(rx, key, secs, |s| s["state"] == state);
    (s, t.elapsed().as_secs_f64())
}

/// The first status notice of `key` that `pred` accepts, within `secs`.
fn notice_where(
    rx: &mpsc::Receiver<serde_json::Value>,
    key: &str,
    secs: u64,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let n = rx.recv_timeout(left).unwrap_or_else(|_| panic!("no such notice of {key} in {secs} s: {seen:#?}"));
        let s = &n["notice"]["status"];
        if s["key"] == key && pred(s) {
            return s.clone();
        }
        seen.push(n);
    }
}

#[test]
#[ignore = "runs inside the USB rig"]
fn can_toolheads_show_current_outdated_and_missing_in_status_daemon_and_watch() {
    let _clean = begin(&[("mcu", OCTOPUS.0)]);
    let host = klipper_tree_version();
    let bus = VcanBus::start(
        "vcan-ks1",
        &[&format!("ebb,{EBB_UUID},{MCU},{host}"), &format!("sb,{SB_UUID},{MCU},{OLD}")],
        &[],
    );
    let _klippy_back = KlippyOnUsbOnly;
    let (ebb, sb) = (format!("can:{}:{EBB_UUID}", bus.name), format!("can:{}:{SB_UUID}", bus.name));
    write_mcus_json(&[("mcu", OCTOPUS.0), ("mcu ebb36", &ebb), ("mcu sb2209", &sb)]);
    restart_klipper_and_wait_ready();
    let queries_before = bus.events().matches("QueryAnswered").count();

    // Registered from printer.cfg through Moonraker, Klipper running all along.
    let c = Cfg::new();
    let services = ServiceLog::start();
    for (section, uuid) in [("ebb36", EBB_UUID), ("mcu sb2209", SB_UUID)] {
        let entry: serde_json::Value =
            serde_json::from_str(&ok(&c.kflash(&["add", "--from-moonraker", section, "--json"]))).unwrap();
        assert_eq!(
            (entry["canbus_uuid"].as_str(), entry["can_interface"].as_str(), entry["mcu"].as_str()),
            (Some(uuid), Some(bus.name), Some(MCU)),
            "{entry}"
        );
    }
    let out = c.kflash(&["add", "--from-moonraker", "toolhead"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("[mcu ebb36] (0a1b2c3d4e5f)"),
        "names what printer.cfg has: {}",
        text(&out.stderr)
    );
    assert!(services.verbs("klipper").is_empty(), "Klipper untouched: {:?}", services.entries());

    // One-shot status.
    let once = c.status(None);
    assert_eq!(once["daemon"], false, "{once}");
    let current = ("current".to_string(), true, host.clone(), bus.name.to_string(), EBB_UUID.to_string());
    let outdated = ("outdated".to_string(), true, OLD.to_string(), bus.name.to_string(), SB_UUID.to_string());
    assert_eq!(brief(board(&once, "ebb36")), current, "{once}");
    assert_eq!(brief(board(&once, "sb2209")), outdated, "{once}");

    // `watch --json`: each node as it is now.
    let watch = Watch::start(&c.cfg);
    let mut present: Vec<(String, String, String)> = can_records(&watch, 2)
        .iter()
        .map(|r| {
            (
                r["action"].as_str().unwrap().into(),
                r["device"].as_str().unwrap().into(),
                r["state"].as_str().unwrap().into(),
            )
        })
        .collect();
    present.sort();
    assert_eq!(
        present,
        [("present".into(), "ebb36".into(), "current".into()), ("present".into(), "sb2209".into(), "outdated".into())]
    );

    // The daemon says the same.
    let socket = c.state.join("daemon.sock");
    let mut cmd = c.command(&["daemon", "--socket", socket.to_str().unwrap()]);
    cmd.env("RUST_LOG", "kflash=debug");
    let mut daemon = Background::spawn(cmd);
    daemon.wait_for_line("kflash daemon ready", 60);
    let s = c.status(Some(&socket));
    assert_eq!(s["daemon"], true, "{s}");
    assert_eq!(brief(board(&s, "ebb36")), current, "{s}");
    assert_eq!(brief(board(&s, "sb2209")), outdated, "{s}");

    // The interface goes down: both nodes missing, told as it happens.
    let (notices, _stream) = subscribe(&socket);
    let down = run("ip", &["link", "set", bus.name, "down"]);
    assert!(down.status.success(), "{}", text(&down.stderr));
    let (gone, after) = notice(&notices, "sb2209", "missing", 10);
    assert!(gone["reason"].as_str().unwrap().contains("vcan-ks1 is down"), "{gone}");
    let s = c.status(Some(&socket));
    for key in ["ebb36", "sb2209"] {
        let b = board(&s, key);
        assert_eq!((b["state"].as_str(), b["connected"].as_bool()), (Some("missing"), Some(false)), "{s}");
    }
    let once = c.status(None);
    assert_eq!(board(&once, "ebb36")["state"], "missing", "one-shot too: {once}");
    for removed in can_records(&watch, 2) {
        assert_eq!(
            (removed["action"].as_str(), removed["state"].as_str()),
            (Some("removed"), Some("missing")),
            "{removed}"
        );
        assert!(removed["reason"].as_str().unwrap().contains("is down"), "{removed}");
    }
    watch.stop();

    // Back up: Klippy's view is from before the outage (or Klippy has lost the node
    // meanwhile), so the node is not taken as current again until Klippy reconnects.
    let up = run("ip", &["link", "set", bus.name, "up"]);
    assert!(up.status.success());
    let back = notice_where(&notices, "ebb36", 10, |s| !s["reason"].as_str().unwrap_or("").contains("is down"));
    assert_ne!(back["state"], "current", "{back}");
    let why = back["reason"].as_str().unwrap();
    assert!(why.contains("went down after Klippy connected") || why.contains("Klippy"), "{back}");
    assert_eq!(bus.events().matches("QueryAnswered").count(), queries_before, "kflash sent no query: {}", bus.events());
    daemon.signal("TERM");
    let (st, log) = daemon.finish(20);
    assert!(st.success(), "{log}");
    eprintln!("interface down -> daemon notice in {after:.3} s");
}
