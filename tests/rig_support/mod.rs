//! Helpers for scenarios that run inside the USB rig (tests/rig/run-scenarios boots the
//! guest and runs every `tests/rig_*.rs` binary there with `--ignored`).
#![allow(dead_code)]

mod can_bus;
mod gs_usb;
#[allow(unused_imports)]
pub use can_bus::{standin_image_32k, VcanBus};
#[allow(unused_imports)]
pub use gs_usb::{dmesg_tail, free_udc, gs_usb_interfaces, json_lines};

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Boards of tests/rig/boards/default.toml.
pub const OCTOPUS: (&str, &str, &str) = ("octopus", "stm32h723xx", "29001A001151313531383332");
pub const NITEHAWK: (&str, &str, &str) = ("nitehawk", "rp2040", "E661640843545B2E");
pub const EBB: (&str, &str, &str) = ("ebb", "stm32f446xx", "1D0041000B50534E4E313020");
/// Starts unplugged; serial is a custom string, as with USB_SERIAL_NUMBER set by the user.
pub const MMB: (&str, &str, &str) = ("cubic", "rp2040", "mmb_cubic");

pub fn by_id(board: (&str, &str, &str), vendor: &str) -> String {
    format!("/dev/serial/by-id/usb-{vendor}_{}_{}-if00", board.1, board.2)
}

/// Refuse to run outside the rig: these tests drive simulated USB gadgets.
pub fn in_rig() {
    assert!(std::env::var_os("KFLASH_RIG").is_some(), "this scenario runs inside the USB rig: tests/rig/run-scenarios");
}

pub fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program).args(args).output().unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// `boardctl ARGS…`, which must succeed.
pub fn boardctl(args: &[&str]) -> String {
    let out = run("boardctl", args);
    assert!(out.status.success(), "boardctl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Restore every simulated board to the boards file's initial state and let udev finish.
pub fn reset_boards() {
    boardctl(&["reset"]);
    boardctl(&["wait-ready"]);
    settle();
}

pub fn settle() {
    let out = run("udevadm", &["settle", "--timeout=30"]);
    assert!(out.status.success(), "udevadm settle failed");
}

/// The kflash binary under test: this build's, or `KFLASH_RIG_BIN` (to measure a release
/// build: `tests/rig/run -- env KFLASH_RIG_BIN=target/release/kflash target/debug/deps/rig_…`).
pub fn kflash_bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("KFLASH_RIG_BIN")
            .ok()
            .filter(|b| !b.is_empty())
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_kflash").into())
    })
}

/// Run kflash with a private config dir.
pub fn kflash(cfg: &Path, args: &[&str]) -> Output {
    Command::new(kflash_bin())
        .arg("--config-dir")
        .arg(cfg)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run kflash")
}

pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "kflash failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn config_dir() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("kflash");
    (d, p)
}

/// A running `kflash watch --json`, its stdout lines delivered over a channel.
pub struct Watch {
    child: Child,
    lines: mpsc::Receiver<serde_json::Value>,
}

impl Watch {
    /// Start watch and return once it says it is watching (events flow from then on).
    pub fn start(cfg: &Path) -> Watch {
        let mut w = Watch::spawn(cfg);
        let stderr = w.child.stderr.take().unwrap();
        let mut reader = BufReader::new(stderr);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.contains("watching USB serial devices"), "unexpected first line: {line}");
        std::thread::spawn(move || for _ in reader.lines() {});
        w
    }

    /// Start watch without waiting for it to be ready.
    pub fn spawn(cfg: &Path) -> Watch {
        let mut child = Command::new(kflash_bin())
            .arg("--config-dir")
            .arg(cfg)
            .args(["watch", "--json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start kflash watch");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let v: serde_json::Value =
                    serde_json::from_str(&line).unwrap_or_else(|e| panic!("watch printed non-JSON {line:?}: {e}"));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        Watch { child, lines: rx }
    }

    /// The next line, or panic after `secs`.
    pub fn next(&self, secs: u64) -> serde_json::Value {
        self.lines.recv_timeout(Duration::from_secs(secs)).unwrap_or_else(|_| panic!("no watch line within {secs} s"))
    }

    /// `n` lines, each within `secs`.
    pub fn take(&self, n: usize, secs: u64) -> Vec<serde_json::Value> {
        (0..n).map(|_| self.next(secs)).collect()
    }

    /// Stop with SIGINT (Ctrl-C); returns the lines printed after the ones already read and
    /// asserts a clean exit.
    pub fn stop(self) -> Vec<serde_json::Value> {
        let pid = self.child.id().to_string();
        run("kill", &["-INT", &pid]);
        let (tx, rx) = mpsc::channel();
        let mut child = self.child;
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        let status =
            rx.recv_timeout(Duration::from_secs(10)).expect("watch did not exit within 10 s of SIGINT").unwrap();
        assert!(status.success(), "watch exited with {status} after Ctrl-C");
        // stdout is closed now, so the reader thread has delivered everything.
        self.lines.iter().collect()
    }
}

/// `(action, device-key-or-serial, mode)` of a watch record, for compact assertions.
pub fn summary(v: &serde_json::Value) -> (String, String, String) {
    let who =
        v["device"].as_str().map(str::to_string).unwrap_or_else(|| v["serial"].as_str().unwrap_or("?").to_string());
    (v["action"].as_str().unwrap().to_string(), who, v["mode"].as_str().unwrap().to_string())
}

// ---- flash scenarios (rig_faults.rs, rig_signals.rs) ------------------------------------
//
// A private kflash (config, state and cache dirs), the stand-ins' systemctl.log, and the
// simulator's events.jsonl delimited by `boardctl mark`.

/// `$KFLASH_RIG_STATE` (the simulator's and the stand-ins' state directory).
pub fn rig_state_dir() -> PathBuf {
    PathBuf::from(std::env::var("KFLASH_RIG_STATE").unwrap_or_else(|_| "/run/kflash-rig".into()))
}

/// The stand-in Klipper tree (`tests/rig/standins/start` creates it at `$HOME/klipper`).
pub fn klipper_dir() -> PathBuf {
    PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join("klipper")
}

/// The text of a process output stream.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// One board of `boardctl status --json`.
pub fn board_json(name: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(&boardctl(&["status", "--json"])).unwrap();
    v.as_array().unwrap().iter().find(|b| b["name"] == name).cloned().unwrap_or_else(|| panic!("no board {name}"))
}

/// `systemctl is-active klipper` through the stand-in.
pub fn klipper_is_active() -> bool {
    run("systemctl", &["is-active", "klipper"]).status.success()
}

/// Start Klipper if an earlier scenario left it stopped, so each scenario begins alike.
pub fn ensure_klipper_active() {
    if !klipper_is_active() {
        eprintln!("note: klipper was inactive at the start of this scenario; starting it");
        let out = run("systemctl", &["start", "klipper"]);
        assert!(out.status.success(), "systemctl start klipper: {}", text(&out.stderr));
    }
}

/// `git describe` of the stand-in tree: the version a fresh build reports.
pub fn klipper_tree_version() -> String {
    let o = Command::new("git")
        .arg("-C")
        .arg(klipper_dir())
        .args(["describe", "--always", "--tags", "--long", "--dirty"])
        .output()
        .unwrap();
    text(&o.stdout).trim().to_string()
}

/// A private kflash: config dir with one registered, configured board; its own state dir
/// (stop marker, lock, history) and a firmware cache shared by the scenarios of one guest
/// (the same config builds the same firmware; sharing only saves the build time).
pub struct FlashRig {
    _tmp: tempfile::TempDir,
    pub cfg: PathBuf,
    pub state: PathBuf,
    pub cache: PathBuf,
}

impl FlashRig {
    /// `board` registered from its Klipper by-id link, its config made for `config_mcu`,
    /// and `settings.toml` with these `[timeouts]` (the rest default).
    pub fn new(board: (&str, &str, &str), config_mcu: &str, timeouts: &[(&str, u64)]) -> FlashRig {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = tmp.path().join("cfg");
        let state = tmp.path().join("state");
        let cache = std::env::temp_dir().join("kflash-rig-scenario-cache");
        std::fs::create_dir_all(&cfg).unwrap();
        let mut settings = format!(
            "klipper_dir = \"{}\"\nservice_command = \"sudo -n systemctl\"\n[timeouts]\n",
            klipper_dir().display()
        );
        for (k, v) in timeouts {
            settings.push_str(&format!("{k} = {v}\n"));
        }
        std::fs::write(cfg.join("settings.toml"), settings).unwrap();
        let rig = FlashRig { _tmp: tmp, cfg, state, cache };
        rig.add_board(board, config_mcu);
        rig
    }

    /// Register `board` from its Klipper by-id link and make its config for `config_mcu`.
    pub fn add_board(&self, board: (&str, &str, &str), config_mcu: &str) {
        ok(&self.kflash(&["add", "--device", &by_id(board, "Klipper"), "--name", board.0, "--key", board.0]));
        let st = Command::new("make")
            .arg("-C")
            .arg(klipper_dir())
            .arg(format!("KCONFIG_CONFIG={}", self.cfg.join(format!("configs/{}.config", board.0)).display()))
            .arg("menuconfig")
            .env("RIG_MENUCONFIG_MCU", config_mcu)
            .output()
            .unwrap();
        assert!(st.status.success(), "make menuconfig: {}", text(&st.stderr));
    }

    /// `kflash --config-dir CFG ARGS…` with this rig's state and cache dirs, stdin null.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(kflash_bin());
        c.arg("--config-dir")
            .arg(&self.cfg)
            .args(args)
            .env("KFLASH_STATE_DIR", &self.state)
            .env("KFLASH_CACHE_DIR", &self.cache)
            .stdin(Stdio::null());
        c
    }

    pub fn kflash(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run kflash")
    }

    /// Run kflash and echo its stderr (shown by the test harness when the scenario fails).
    pub fn kflash_logged(&self, args: &[&str]) -> Output {
        let t = std::time::Instant::now();
        let out = self.kflash(args);
        eprintln!(
            "---- kflash {} -> {} after {:.1} s; stderr:\n{}----",
            args.join(" "),
            out.status,
            t.elapsed().as_secs_f64(),
            text(&out.stderr)
        );
        out
    }

    /// kflash's stop marker (`service::STOP_MARKER_FILE`) in this rig's state dir.
    pub fn stop_marker(&self) -> PathBuf {
        self.state.join("klipper-stopped.json")
    }
}

/// One line of the stand-in's systemctl.log.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceEvent {
    pub ts: f64,
    pub verb: String,
    pub unit: String,
}

/// systemctl.log from the moment of [`ServiceLog::start`].
pub struct ServiceLog {
    from: usize,
}

impl ServiceLog {
    fn lines() -> Vec<String> {
        std::fs::read_to_string(rig_state_dir().join("systemctl.log"))
            .map(|t| t.lines().map(str::to_string).collect())
            .unwrap_or_default()
    }

    pub fn start() -> ServiceLog {
        ServiceLog { from: Self::lines().len() }
    }

    pub fn entries(&self) -> Vec<ServiceEvent> {
        Self::lines()
            .iter()
            .skip(self.from)
            .filter_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                (w.len() >= 3).then(|| ServiceEvent {
                    ts: w[0].parse().unwrap_or(f64::NAN),
                    verb: w[1].to_string(),
                    unit: w[2].to_string(),
                })
            })
            .collect()
    }

    /// The verbs logged for `unit` (stop, start, stop-failed, …), in order.
    pub fn verbs(&self, unit: &str) -> Vec<String> {
        self.entries().into_iter().filter(|e| e.unit == unit).map(|e| e.verb).collect()
    }

    /// Seconds from the first `stop UNIT` to the next `start UNIT`.
    pub fn downtime(&self, unit: &str) -> Option<f64> {
        let e: Vec<ServiceEvent> = self.entries().into_iter().filter(|e| e.unit == unit).collect();
        let stop = e.iter().position(|e| e.verb == "stop")?;
        let start = e[stop..].iter().find(|e| e.verb == "start")?;
        Some(start.ts - e[stop].ts)
    }

    /// Exactly one stop and then one start of klipper, and it is active now.
    pub fn assert_klipper_stopped_and_restarted(&self) {
        assert_eq!(
            self.verbs("klipper"),
            ["stop", "start"],
            "systemctl.log since the scenario began: {:?}",
            self.entries()
        );
        assert!(klipper_is_active(), "klipper is not active afterwards");
    }
}

/// The simulator's events.jsonl after a `boardctl mark`.
pub struct EventLog {
    mark: String,
}

impl EventLog {
    /// Write a unique mark into the event log; [`EventLog::events`] returns what follows it.
    pub fn mark(label: &str) -> EventLog {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let mark = format!("{label} {nanos}");
        boardctl(&["mark", &mark]);
        EventLog { mark }
    }

    pub fn events(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(rig_state_dir().join("events.jsonl")).expect("read events.jsonl");
        let all: Vec<serde_json::Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        let at = all
            .iter()
            .position(|e| e["event"] == "mark" && e["text"] == self.mark.as_str())
            .unwrap_or_else(|| panic!("mark {:?} not in events.jsonl", self.mark));
        all[at + 1..].to_vec()
    }

    /// Events of one board since the mark.
    pub fn of(&self, board: &str) -> Vec<serde_json::Value> {
        self.events().into_iter().filter(|e| e["board"] == board).collect()
    }

    /// Events of `kind` for `board` since the mark.
    pub fn kind(&self, board: &str, kind: &str) -> Vec<serde_json::Value> {
        self.of(board).into_iter().filter(|e| e["event"] == kind).collect()
    }

    /// No `flash-start` / `flash-complete` for any board but `except` since the mark.
    pub fn assert_no_writes_except(&self, except: &str) {
        let writes: Vec<serde_json::Value> =
            self.events().into_iter().filter(|e| e["board"] != except && is_write(e)).collect();
        assert!(writes.is_empty(), "written to other boards than {except}: {writes:?}");
    }

    /// Nothing written to `board` since the mark.
    /// How many writes to `board`'s flash followed the mark.
    pub fn writes(&self, board: &str) -> usize {
        self.of(board).into_iter().filter(is_write).count()
    }

    pub fn assert_not_written(&self, board: &str) {
        let w: Vec<_> = self.of(board).into_iter().filter(is_write).collect();
        assert!(w.is_empty(), "{board} was written: {w:?}");
    }
}

/// A write to a board's flash: a Katapult session that started writing, or a COMPLETE after
/// blocks were written. (A COMPLETE with no blocks just starts the installed firmware.)
fn is_write(e: &serde_json::Value) -> bool {
    e["event"] == "flash-start" || (e["event"] == "flash-complete" && e["blocks"].as_u64().unwrap_or(1) > 0)
}

/// A kflash running in the background whose stderr lines are collected as they come.
pub struct Background {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    started: std::time::Instant,
}

impl Background {
    pub fn spawn(mut cmd: Command) -> Background {
        let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("start kflash");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Background { child, lines: rx, seen: Vec::new(), started: std::time::Instant::now() }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Block until a stderr line contains `needle` (within `secs`); returns it.
    pub fn wait_for_line(&mut self, needle: &str, secs: u64) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        eprintln!("[{:.1} s] saw {line:?}", self.started.elapsed().as_secs_f64());
                        return line;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("no stderr line with {needle:?} within {secs} s; so far:\n{}", self.seen.join("\n"))
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!("kflash closed stderr before printing {needle:?}; it printed:\n{}", self.seen.join("\n"))
                }
            }
        }
    }

    /// Send a signal by name (`INT`, `TERM`, `HUP`, `KILL`).
    pub fn signal(&self, sig: &str) {
        eprintln!("[{:.1} s] kill -{sig} {}", self.started.elapsed().as_secs_f64(), self.pid());
        let out = run("kill", &[&format!("-{sig}"), &self.pid().to_string()]);
        assert!(out.status.success(), "kill -{sig}: {}", text(&out.stderr));
    }

    /// Wait (at most `secs`) for the exit; returns the status and the whole stderr.
    pub fn finish(mut self, secs: u64) -> (std::process::ExitStatus, String) {
        let deadline = std::time::Instant::now() + Duration::from_secs(secs);
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            if std::time::Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("kflash did not exit within {secs} s; stderr so far:\n{}", self.seen.join("\n"));
            }
            // The reader thread ends at EOF; wait on it rather than spin.
            match self.lines.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => self.seen.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => std::thread::sleep(Duration::from_millis(20)),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        };
        // The process is gone, so its stderr is closed: drain what the reader still holds.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(line);
        }
        let all = self.seen.join("\n");
        eprintln!(
            "---- kflash exited {status} after {:.1} s; stderr:\n{all}\n----",
            self.started.elapsed().as_secs_f64()
        );
        (status, all)
    }
}

/// One request to Moonraker at 127.0.0.1:7125 (a trusted client); the parsed JSON body, or
/// why not.
fn moonraker_request(verb: &str, path: &str, secs: u64) -> Result<serde_json::Value, String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", 7125)).map_err(|e| format!("connect to Moonraker: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(secs))).map_err(|e| e.to_string())?;
    write!(s, "{verb} {path} HTTP/1.0\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).map_err(|e| e.to_string())?;
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(body).map_err(|e| format!("Moonraker answered {resp:?}: {e}"))
}

/// `GET path` on Moonraker; the parsed JSON body, or why not.
pub fn try_moonraker_get(path: &str) -> Result<serde_json::Value, String> {
    moonraker_request("GET", path, 10)
}

/// `POST path` (no body) on Moonraker; the parsed JSON body.
pub fn moonraker_post(path: &str) -> serde_json::Value {
    moonraker_request("POST", path, 30).unwrap_or_else(|e| panic!("POST {path}: {e}"))
}

/// `POST path` with a JSON body on Moonraker; the parsed JSON body.
pub fn moonraker_post_json(path: &str, body: &serde_json::Value) -> serde_json::Value {
    use std::io::{Read, Write};
    let body = body.to_string();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", 7125)).expect("connect to Moonraker");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.0\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let json = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(json).unwrap_or_else(|e| panic!("POST {path}: Moonraker answered {resp:?}: {e}"))
}

pub fn moonraker_get(path: &str) -> serde_json::Value {
    try_moonraker_get(path).unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// Klippy's state as Moonraker reports it (`/server/info` `klippy_state`).
pub fn klippy_state() -> String {
    moonraker_get("/server/info")["result"]["klippy_state"].as_str().unwrap_or("?").to_string()
}

pub fn home() -> PathBuf {
    PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
}

/// The pid of the real program running as `unit` (klipper or moonraker).
pub fn real_pid(unit: &str) -> Option<u64> {
    std::fs::read_to_string(rig_state_dir().join(format!("services/{unit}.real.pid"))).ok()?.trim().parse().ok()
}

/// Wait (at most `secs`) until Moonraker answers and reports Klippy `ready`.
pub fn wait_moonraker_with_klippy_ready(secs: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let state = try_moonraker_get("/server/info")
            .map(|v| v["result"]["klippy_state"].as_str().unwrap_or("?").to_string())
            .unwrap_or_else(|e| e);
        if state == "ready" {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "Moonraker with Klippy ready not within {secs} s: {state}");
        // Over HTTP Moonraker pushes nothing: poll.
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Moonraker as a client from outside `trusted_clients` reaches it: at an address of the
/// guest's own that is not loopback (`10.255.255.1` on `lo`, like the printer host's LAN
/// address), where the real Moonraker (`host: all`, trusting 127.0.0.0/8 and ::1) wants the
/// API key. No Moonraker restart: that costs about 30 s in the guest.
pub struct UntrustedClient {
    pub url: String,
    /// The key Moonraker generated (asked on its Unix socket, which is always trusted).
    pub key: String,
}

impl UntrustedClient {
    pub fn new() -> UntrustedClient {
        let out = run("ip", &["addr", "replace", "10.255.255.1/32", "dev", "lo"]);
        assert!(out.status.success(), "ip addr replace: {}", text(&out.stderr));
        let key = moonraker_unix_rpc("access.get_api_key");
        let key = key.as_str().unwrap_or_else(|| panic!("no API key: {key}")).to_string();
        UntrustedClient { url: "http://10.255.255.1:7125".into(), key }
    }
}

/// A JSON-RPC call on Moonraker's Unix socket (always trusted); the result.
pub fn moonraker_unix_rpc(method: &str) -> serde_json::Value {
    use std::io::{Read, Write};
    let sock = home().join("printer_data/comms/moonraker.sock");
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap_or_else(|e| panic!("{}: {e}", sock.display()));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "{{\"jsonrpc\": \"2.0\", \"method\": \"{method}\", \"id\": 1}}\x03").unwrap();
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while s.read(&mut byte).unwrap() == 1 && byte[0] != 3 {
        reply.push(byte[0]);
    }
    let v: serde_json::Value = serde_json::from_slice(&reply).unwrap();
    v["result"].clone()
}

/// A real program SIGSTOPped: its sockets stay open (the kernel still accepts connections on
/// Moonraker's port, Klippy's Unix socket stays connected), but nothing answers. SIGCONT on
/// drop, passed or failed, so the unit can be stopped and started again.
pub struct Frozen(u64);

impl Frozen {
    /// Freeze the process with this pid.
    pub fn pid(pid: u64) -> Frozen {
        let out = run("kill", &["-STOP", &pid.to_string()]);
        assert!(out.status.success(), "kill -STOP {pid}: {}", text(&out.stderr));
        Frozen(pid)
    }

    /// Freeze the real program the unit (klipper or moonraker) runs now.
    pub fn unit(unit: &str) -> Frozen {
        Frozen::pid(real_pid(unit).unwrap_or_else(|| panic!("the real {unit} does not run")))
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = run("kill", &["-CONT", &self.0.to_string()]);
    }
}

/// A reverse proxy in front of Moonraker that denies this client (nginx `deny`): every
/// request gets nginx's 403 page. Stops on drop.
pub struct ForbiddingProxy {
    pub url: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl ForbiddingProxy {
    pub fn start() -> ForbiddingProxy {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stopped.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let Ok(mut c) = conn else { continue };
                let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let body = "<html>\r\n<head><title>403 Forbidden</title></head>\r\n<body>\r\n<center><h1>403 \
                            Forbidden</h1></center>\r\n<hr><center>nginx/1.22.1</center>\r\n</body>\r\n</html>\r\n";
                let _ = write!(
                    c,
                    "HTTP/1.1 403 Forbidden\r\nServer: nginx/1.22.1\r\nContent-Type: text/html\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        ForbiddingProxy { url, stop }
    }
}

impl Drop for ForbiddingProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = std::net::TcpStream::connect(self.url.trim_start_matches("http://"));
    }
}

// ---- real prints: a file of dwells through virtual_sdcard --------------------------------

/// `print_stats.state` as Moonraker reports it.
pub fn print_state() -> String {
    let v = moonraker_get("/printer/objects/query?print_stats");
    v["result"]["status"]["print_stats"]["state"].as_str().unwrap_or("?").to_string()
}

/// Wait (at most `secs`) for `print_stats.state` to be `want`.
pub fn wait_print_state(want: &str, secs: u64) {
    let t = std::time::Instant::now();
    loop {
        let now = print_state();
        if now == want {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(secs), "print_stats not {want} after {secs} s: {now}");
        // Over HTTP Moonraker pushes nothing: poll.
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A real print: `file` in Moonraker's gcodes dir holding `dwells` half-second dwells (G4),
/// started through Moonraker and run by Klippy's virtual_sdcard. A print still printing or
/// paused when this is dropped is cancelled, so the next scenario finds the printer idle.
pub struct RealPrint {
    pub file: String,
}

impl RealPrint {
    pub fn start(file: &str, dwells: usize) -> RealPrint {
        let gcodes = home().join("printer_data/gcodes");
        std::fs::create_dir_all(&gcodes).unwrap();
        std::fs::write(gcodes.join(file), "G4 P500\n".repeat(dwells)).unwrap();
        let v = moonraker_post(&format!("/printer/print/start?filename={file}"));
        assert!(v.get("result").is_some(), "print start: {v}");
        let print = RealPrint { file: file.to_string() };
        let t = std::time::Instant::now();
        wait_print_state("printing", 60);
        eprintln!("note: {file} printing {:.1} s after the start request", t.elapsed().as_secs_f64());
        print
    }

    pub fn pause(&self) {
        moonraker_post("/printer/print/pause");
        wait_print_state("paused", 60);
    }

    pub fn cancel(&self) {
        moonraker_post("/printer/print/cancel");
        wait_print_state("cancelled", 60);
    }

    /// M112 sent as G-code: Klippy shuts down ("Shutdown due to M112 command"); print_stats
    /// keeps its state. (The request itself fails: Klippy shuts down while handling it.)
    pub fn emergency_stop(&self) {
        let _ = moonraker_request("POST", "/printer/gcode/script?script=M112", 30);
        let t = std::time::Instant::now();
        while klippy_state() != "shutdown" {
            assert!(t.elapsed() < Duration::from_secs(60), "Klippy not shut down 60 s after M112");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for RealPrint {
    fn drop(&mut self) {
        let busy = try_moonraker_get("/printer/objects/query?print_stats")
            .map(|v| matches!(v["result"]["status"]["print_stats"]["state"].as_str(), Some("printing" | "paused")))
            .unwrap_or(false);
        if busy && klippy_state_or_none().as_deref() == Some("ready") {
            let _ = moonraker_request("POST", "/printer/print/cancel", 30);
        }
    }
}

fn klippy_state_or_none() -> Option<String> {
    try_moonraker_get("/server/info").ok()?["result"]["klippy_state"].as_str().map(str::to_string)
}

/// Klippy's own state, asked live through Moonraker (`/printer/info`, forwarded to Klippy);
/// with the real stack only when the answer comes from the Klippy process running now (right
/// after a restart the real Moonraker still answers for the old one for a moment).
fn live_klippy_state() -> Result<String, String> {
    let v = try_moonraker_get("/printer/info")?;
    let r = &v["result"];
    let state = r["state"].as_str().map(str::to_string).ok_or_else(|| format!("/printer/info: {v}"))?;
    match (real_pid("klipper"), r["process_id"].as_u64()) {
        (Some(now), Some(answered)) if now != answered => Err(format!("{state} (from the previous Klippy)")),
        _ => Ok(state),
    }
}

/// Wait until Klippy has settled (ready, shutdown or error) or `secs` passed; the last state.
fn wait_klippy_settled(secs: u64) -> Result<String, String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let state = live_klippy_state();
        if let Ok(s) = &state {
            if matches!(s.as_str(), "ready" | "shutdown" | "error") {
                return state;
            }
        }
        if std::time::Instant::now() >= deadline {
            return state;
        }
        // Over HTTP Moonraker pushes nothing: poll.
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Restart Klipper and wait (at most 120 s) until Klippy is ready; how long that took, or
/// why not.
fn try_restart_klipper_and_wait_ready() -> Result<Duration, String> {
    let t = std::time::Instant::now();
    let out = run("systemctl", &["stop", "klipper"]);
    if !out.status.success() {
        return Err(format!("systemctl stop klipper: {}", text(&out.stderr)));
    }
    // A board an earlier Klippy shut down refuses the next one ("Can not update MCU config as
    // it is shutdown") until it reboots: what a user's FIRMWARE_RESTART does.
    let all: serde_json::Value = serde_json::from_str(&boardctl(&["status", "--json"])).unwrap();
    let shut: Vec<&str> =
        all.as_array().unwrap().iter().filter(|b| b["shutdown"] == true).filter_map(|b| b["name"].as_str()).collect();
    if !shut.is_empty() {
        eprintln!("note: rebooting {shut:?}, left in a firmware shutdown");
        for name in &shut {
            boardctl(&["reboot", name, "klipper"]);
        }
        boardctl(&["wait-ready"]);
        settle();
    }
    let out = run("systemctl", &["start", "klipper"]);
    if !out.status.success() {
        return Err(format!("systemctl start klipper: {}", text(&out.stderr)));
    }
    // The real Klippy takes 10-20 s in the guest to configure its boards.
    match wait_klippy_settled(120) {
        Ok(s) if s == "ready" => {
            eprintln!("note: Klippy ready {:.1} s after systemctl restart klipper", t.elapsed().as_secs_f64());
            Ok(t.elapsed())
        }
        Ok(s) | Err(s) => Err(format!("Klippy not ready after a restart: {s}; {}", klippy_log_tail(20))),
    }
}

/// The real Klippy's log, where realstack.py points `-l`.
pub fn klippy_log() -> PathBuf {
    home().join("printer_data/logs/klippy.log")
}

/// The last lines of the real Klippy's log (empty with the stand-ins).
pub fn klippy_log_tail(n: usize) -> String {
    let log = std::fs::read_to_string(klippy_log()).unwrap_or_default();
    let mut tail: Vec<&str> = log.lines().rev().take(n).collect();
    tail.reverse();
    if tail.is_empty() {
        String::new()
    } else {
        format!("klippy.log ends:\n{}", tail.join("\n"))
    }
}

/// Restart Klipper so the printer host's view (Moonraker's MCU versions, read when Klippy
/// connects) matches the boards as they are now, and wait until Klippy is ready (there is no
/// event for it over HTTP, so this polls `/printer/info`).
pub fn restart_klipper_and_wait_ready() -> Duration {
    try_restart_klipper_and_wait_ready().unwrap_or_else(|e| panic!("{e}"))
}

fn mcus_json() -> PathBuf {
    rig_state_dir().join("moonraker/mcus.json")
}

/// printer.cfg names exactly these `(section, board)` MCUs (e.g. `[("mcu", "octopus"), ("mcu
/// ebb", "ebb")]`) and Klippy is ready on them, reading the boards as they are now.
///
/// Only the boards a scenario involves: a board another scenario left in Katapult or unplugged
/// would keep Klippy out of `ready`. Klipper is restarted only when its view is not current
/// (other sections, another version, not ready): each real Klippy start costs 10-20 s.
pub fn klipper_ready_on(sections: &[(&str, &str)]) {
    write_mcus_json(sections);
    match klippy_view(sections) {
        Ok(()) => eprintln!("note: Klippy is ready on {sections:?} already"),
        Err(why) => {
            eprintln!("note: restarting Klipper for {sections:?}: {why}");
            restart_klipper_and_wait_ready();
        }
    }
}

/// printer.cfg names exactly these `(section, board)` MCUs, and Klipper runs: restarted when
/// that changed printer.cfg (or it was stopped), and not waited for. For scenarios whose first
/// step is a kflash command that stops Klipper anyway: the print-safety gate lets a Klippy
/// that is starting (or not connected yet) pass, since nothing can be printing, and the
/// flash's level (c) waits for the Klippy that kflash starts.
pub fn klipper_running_on(sections: &[(&str, &str)]) {
    if write_mcus_json(sections) || !klipper_is_active() {
        eprintln!("note: restarting Klipper for {sections:?} (not waiting for ready)");
        let out = run("systemctl", &["restart", "klipper"]);
        assert!(out.status.success(), "systemctl restart klipper: {}", text(&out.stderr));
    }
}

/// printer.cfg names exactly these `(section, board)` MCUs from the next Klipper start on;
/// true when that is a change.
pub fn write_mcus_json(sections: &[(&str, &str)]) -> bool {
    let map: serde_json::Map<String, serde_json::Value> =
        sections.iter().map(|(s, b)| (s.to_string(), serde_json::Value::from(*b))).collect();
    let json = serde_json::Value::Object(map).to_string();
    if std::fs::read_to_string(mcus_json()).ok().as_deref() != Some(json.as_str()) {
        std::fs::create_dir_all(mcus_json().parent().unwrap()).unwrap();
        std::fs::write(mcus_json(), &json).unwrap();
        return true;
    }
    false
}

/// Ok when the running Klippy is ready with exactly these MCU sections, each reporting the
/// version its board runs now; else why not.
fn klippy_view(sections: &[(&str, &str)]) -> Result<(), String> {
    if !klipper_is_active() {
        return Err("klipper is stopped".into());
    }
    // A Klippy that LeaveRigClean restarted may still be starting.
    let state = wait_klippy_settled(60)?;
    if state != "ready" {
        return Err(format!("Klippy is {state}"));
    }
    let list = try_moonraker_get("/printer/objects/list")?;
    let mut have: Vec<String> = list["result"]["objects"]
        .as_array()
        .map(|a| a.iter().filter_map(|o| o.as_str()).filter(|o| *o == "mcu" || o.starts_with("mcu ")))
        .into_iter()
        .flatten()
        .map(str::to_string)
        .collect();
    let mut want: Vec<String> = sections.iter().map(|(s, _)| s.to_string()).collect();
    have.sort();
    want.sort();
    if have != want {
        return Err(format!("printer.cfg has {have:?}"));
    }
    let query: Vec<String> = sections.iter().map(|(s, _)| s.replace(' ', "%20")).collect();
    let v = try_moonraker_get(&format!("/printer/objects/query?configfile=settings&{}", query.join("&")))?;
    let status = &v["result"]["status"];
    for (section, board) in sections {
        let b = board_json(board);
        // The section's board (by its serial path), then what Klippy read from it.
        let serial = status["configfile"]["settings"][*section]["serial"].as_str().unwrap_or("?");
        let want = format!(
            "/dev/serial/by-id/usb-Klipper_{}_{}-if00",
            b["mcu"].as_str().unwrap_or("?"),
            b["serial"].as_str().unwrap_or("?")
        );
        if serial != want {
            return Err(format!("[{section}] is {serial}, not {board} ({want})"));
        }
        let seen = status[*section]["mcu_version"].as_str().unwrap_or("?");
        if b["mode"] != "klipper" || b["version"].as_str() != Some(seen) {
            return Err(format!("[{section}] says {seen}, the board is {} {}", b["mode"], b["version"]));
        }
    }
    Ok(())
}

/// Dropped at the end of a flash scenario, passed or failed: boards back to the boards file,
/// and when that re-powered a board, Klipper restarted (not waited for: the next scenario's
/// [`klipper_ready_on`] does) so its view matches the boards. Best effort and never panics
/// (it also runs while a failed test unwinds).
/// Boards reset and Klipper running with printer.cfg naming these boards (not waited for:
/// kflash stops it first, and level (c) waits for the Klippy kflash starts); the returned
/// guard resets the rig when the scenario ends.
pub fn begin(sections: &[(&str, &str)]) -> LeaveRigClean {
    in_rig();
    let clean = LeaveRigClean;
    reset_boards();
    klipper_running_on(sections);
    clean
}

pub struct LeaveRigClean;

impl Drop for LeaveRigClean {
    fn drop(&mut self) {
        let repowered = reset_repowered();
        if repowered {
            // Re-powering a board that a running Klippy used makes Klippy shut the others
            // down, and a shut-down board stays so until it reboots (as on a real printer):
            // with Klipper stopped, reset those too. Found by CI: after rig_install, the next
            // scenarios' Klippy failed on "Can not update MCU 'ebb' config as it is shutdown".
            let _ = Command::new("systemctl").args(["stop", "klipper"]).output();
            let _ = reset_repowered();
        }
        if repowered || !klipper_is_active() {
            if let Err(e) = Command::new("systemctl").args(["restart", "klipper"]).output() {
                eprintln!("cleanup: systemctl restart klipper: {e}");
            }
        }
    }
}

/// `boardctl reset`, waited for; true when it re-powered a board (or that is unknown). Best
/// effort and never panics: it runs while a failed test unwinds.
fn reset_repowered() -> bool {
    let mark = std::panic::catch_unwind(|| EventLog::mark("LeaveRigClean")).ok();
    if let Err(e) = Command::new("boardctl").args(["reset"]).output() {
        eprintln!("cleanup: boardctl reset: {e}");
    }
    let _ = Command::new("boardctl").args(["wait-ready"]).output();
    let _ = Command::new("udevadm").args(["settle", "--timeout=30"]).output();
    mark.and_then(|m| std::panic::catch_unwind(|| m.events()).ok())
        .is_none_or(|ev| ev.iter().any(|e| e["board"].is_string()))
}

impl Drop for Background {
    /// A scenario that failed while kflash still ran: do not leave it running.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Wait until Moonraker's `/server/info` reports Klippy in `want`; the time it took. Polled:
/// over HTTP Moonraker pushes nothing. (Right after a restart this may still be the previous
/// Klippy's word: `klipper_ready_on` checks the process.)
pub fn wait_klippy(want: &str, timeout: Duration) -> Duration {
    let t = std::time::Instant::now();
    loop {
        let state = try_moonraker_get("/server/info")
            .map(|v| v["result"]["klippy_state"].as_str().unwrap_or("?").to_string())
            .unwrap_or_else(|e| e);
        if state == want {
            return t.elapsed();
        }
        assert!(t.elapsed() < timeout, "Klippy not {want} after {timeout:?} (last: {state}); {}", klippy_log_tail(40));
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// CPU time of all the process's threads from the scheduler (`/proc/PID/task/*/schedstat`,
/// nanoseconds), in seconds: exact, where utime + stime are counted in whole ticks.
pub fn sched_cpu_secs(pid: u32) -> f64 {
    let mut ns = 0u64;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let text = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        ns += text.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
    }
    ns as f64 / 1e9
}

/// Voluntary + involuntary context switches of all the process's threads: its wake-ups.
pub fn wakeups(pid: u32) -> u64 {
    let mut n = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let text = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        for l in text.lines() {
            if l.starts_with("voluntary_ctxt_switches:") || l.starts_with("nonvoluntary_ctxt_switches:") {
                n += l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap();
            }
        }
    }
    n
}
