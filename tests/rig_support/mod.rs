//! Helpers for scenarios that run inside the USB rig (tests/rig/run-scenarios boots the
//! guest and runs every `tests/rig_*.rs` binary there with `--ignored`).
#![allow(dead_code)]

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
    assert!(
        std::env::var_os("KFLASH_RIG").is_some(),
        "this scenario runs inside the USB rig: tests/rig/run-scenarios"
    );
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

pub fn kflash_bin() -> &'static str {
    env!("CARGO_BIN_EXE_kflash")
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
        self.lines
            .recv_timeout(Duration::from_secs(secs))
            .unwrap_or_else(|_| panic!("no watch line within {secs} s"))
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
        let status = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("watch did not exit within 10 s of SIGINT")
            .unwrap();
        assert!(status.success(), "watch exited with {status} after Ctrl-C");
        // stdout is closed now, so the reader thread has delivered everything.
        self.lines.iter().collect()
    }
}

/// `(action, device-key-or-serial, mode)` of a watch record, for compact assertions.
pub fn summary(v: &serde_json::Value) -> (String, String, String) {
    let who = v["device"].as_str().map(str::to_string).unwrap_or_else(|| v["serial"].as_str().unwrap_or("?").to_string());
    (v["action"].as_str().unwrap().to_string(), who, v["mode"].as_str().unwrap().to_string())
}
