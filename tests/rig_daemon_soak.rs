//! Step 7's soak and measurements on real USB: `kflash daemon` with three registered boards
//! taken off the bus and back as fast as the guest's USB stack and udev go (1002 plug/unplug
//! cycles in all: the three boards at once, 334 each, through sysfs `authorized`; 1000 each
//! took 14-17 min of CI's 90), a `subscribe` client counting its
//! notices, and an independent `udevadm monitor` as the ground truth of what happened. Each
//! cycle step waits for udev's event of the board, never for the daemon.
//!
//! - Nothing missed or duplicated: per board, the `board` notices whose `connected` differs
//!   from the one before (a connection change: appeared or went away) number exactly the
//!   udev `add` / `remove` events of its tty, no two consecutive `board` notices are equal,
//!   and the subscriber never lagged.
//! - The final state is right: every board connected, in Klipper, its version identified
//!   (checked at each memory checkpoint, once the daemon has caught up with udev, and through
//!   `kflash status --json` at the end).
//! - Memory: the live heap (the daemon's `status`: glibc's count of bytes in live
//!   allocations, libudev's included) after 334 cycles is at most 256 KiB above its highest
//!   at 84, 167 and 250 cycles, each read at the idle thread count; VmRSS at most 8 MiB
//!   above (a gross bound: freed memory the allocator keeps moves it by MiBs).
//! - Reaction time: from udev's broadcast (the `udevadm monitor` receipt, CLOCK_MONOTONIC) to
//!   the subscriber's receipt of the notice (CLOCK_MONOTONIC, read as the line arrives; the
//!   daemon's notices carry no timestamp). Printed under the soak's load, and measured in
//!   quiet conditions over 50 real unplug/plug cycles of one board (its gadget unbound and
//!   bound), each step once the daemon has said it all.
//! - CPU time while idle, first: utime + stime and the scheduler's exact figure over 60 s with
//!   the three boards connected and identified, Klippy and Moonraker running; no notices.
//!   Then 20 s with Moonraker stopped, whose once-a-second push is the only thing left to wake
//!   the daemon: at most 2 wake-ups.

mod rig_support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rig_support::*;

/// The boards soaked; octopus stays with Klippy (which would shut down if it went away).
const SOAKED: [(&str, &str, &str); 3] = [NITEHAWK, EBB, MMB];
/// Plug/unplug cycles per board, the three at once: 1002 in all (`KFLASH_SOAK_CYCLES`
/// changes it, e.g. 1000 for a thousand each, about 15 min; the checkpoints scale with it).
const CYCLES: usize = 334;
/// The last checkpoint before the end; memory at the end is compared with the highest up to
/// here. The daemon's anonymous
/// memory climbs for several hundred cycles and then flattens (measured, one identify per
/// appearance: RssAnon 3.4 MiB idle, 8.9 after 250 cycles, 11.7 after 500, 14.8 after 750,
/// 15.3 after 1000; an earlier build: 4.9, 15.9, 18.5, 18.0, 18.5): its buffers fill (the
/// hotplug broadcast keeps its last 1024 board events, about 170 cycles of three boards; the
/// notice broadcast its last 256) and the allocator's arenas, used by the identify tasks and
/// the blocking pool's threads, reach their size. A leak of one board record per event
/// (about 6 KiB a cycle) would still add 0.5 MiB over the last 84 cycles. The buffers are full
/// by the checkpoint at 167 cycles.
const WARMUP: usize = 250;
/// The checkpoints before WARMUP.
const EARLY: [usize; 2] = [84, 167];
/// How the soak unplugs (the fastest real way the guest has).
const SOAK_UNPLUG: Unplug = Unplug::Authorized;
/// Reaction-time samples in quiet conditions: one board replugged at a time.
const QUIET_CYCLES: usize = 50;
/// The bound on the quiet reaction time's p99 under the rig's emulated CPU (target on
/// hardware: 5 ms).
const REACTION_P99_LIMIT_MS: f64 = 1000.0;
/// Bound on the quiet replugs' udev add to outdated report (identify included), p99.
const OUTDATED_REPORT_P99_LIMIT_MS: f64 = 5000.0;
/// The window with nothing at all to wake the daemon (Moonraker stopped), and the wake-ups
/// allowed in it (none are expected; the allowance is for the kernel's own, such as a
/// migration between CPUs counted as an involuntary switch).
const QUIET_WINDOW_SECS: u64 = 20;
const QUIET_WAKEUP_LIMIT: u64 = 2;
/// The idle daemon's CPU time over 60 s, the scheduler's exact figure (utime + stime are
/// sampled at each tick, and under TCG they read 0.1 s above it). The debug build measured
/// 0.35-0.41 s here with the CAN status code (0.23 s by ticks before it; the release build
/// 0.05 s): a busy loop or a timer would take several times this bound.
const IDLE_CPU_LIMIT_SECS: f64 = 0.75;
/// How far VmRSS at CYCLES may exceed its highest at the earlier checkpoints: a bound for a
/// gross leak only. Measured in four runs of 1000 cycles each, the last 250 added -3.9, +0.5,
/// +0.5 and +2.0 MiB over the earlier high: too coarse for a slow leak, which the live heap's
/// bound below catches.
const RSS_GROWTH_LIMIT_KIB: u64 = 8192;
/// How far the live heap (glibc's bytes in live allocations, C's included, at the idle thread
/// count) at CYCLES may exceed its highest at the earlier checkpoints. The buffers are full
/// after about 170 cycles (the heap grew about 2 KiB a cycle until then: a boxed board per
/// slot); a leak of 512 bytes per board event would add 258 KiB over the last 84 cycles.
const HEAP_GROWTH_LIMIT_KIB: u64 = 256;

/// CLOCK_MONOTONIC in seconds (udev's and `udevadm monitor`'s clock).
fn monotonic() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given.
    assert_eq!(unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) }, 0);
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// One request to the board simulator's control socket (what `boardctl` does, without
/// starting a process per request).
fn sim(req: serde_json::Value) -> serde_json::Value {
    let sock = rig_state_dir().join("boardsim.sock");
    let mut s = UnixStream::connect(&sock).unwrap_or_else(|e| panic!("connect to {}: {e}", sock.display()));
    s.write_all(format!("{req}\n").as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    let resp: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
    assert_eq!(resp["ok"], true, "boardsim {req}: {resp}");
    resp
}

/// A udev event on a tty, as `udevadm monitor` received it.
#[derive(Debug, Clone)]
struct UdevEvent {
    /// `udevadm monitor`'s receipt, CLOCK_MONOTONIC seconds.
    at: f64,
    action: String,
    devpath: String,
    serial: Option<String>,
    /// `USEC_INITIALIZED`: when udevd began handling the device (before its rules ran).
    initialized: Option<f64>,
}

/// `udevadm monitor --udev --subsystem-match=tty --property`: the ground truth, independent of
/// kflash's own udev code. Events of the soaked boards go to a channel per board.
struct UdevMonitor {
    child: Child,
}

impl UdevMonitor {
    fn start(boards: &[(&str, &str, &str)]) -> (UdevMonitor, BTreeMap<String, mpsc::Receiver<UdevEvent>>) {
        let mut child = Command::new("udevadm")
            .args(["monitor", "--udev", "--subsystem-match=tty", "--property"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start udevadm monitor");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines().map_while(Result::ok);
        // It prints its header once it listens.
        for line in lines.by_ref() {
            if line.starts_with("UDEV - the event which udev sends out after rule processing") {
                break;
            }
        }
        let mut senders = BTreeMap::new();
        let mut receivers = BTreeMap::new();
        for b in boards {
            let (tx, rx) = mpsc::channel();
            senders.insert(b.2.to_string(), tx);
            receivers.insert(b.0.to_string(), rx);
        }
        std::thread::spawn(move || {
            // The board of each tty seen added, by devpath (a remove is matched by its devpath).
            let mut serial_of: BTreeMap<String, String> = BTreeMap::new();
            let mut at = None;
            let mut props = BTreeMap::new();
            for line in lines {
                if let Some(rest) = line.strip_prefix("UDEV  [") {
                    at = rest.split(']').next().and_then(|t| t.trim().parse::<f64>().ok());
                    props.clear();
                } else if let Some((k, v)) = line.split_once('=') {
                    props.insert(k.to_string(), v.to_string());
                } else if line.is_empty() && at.is_some() {
                    let ev = UdevEvent {
                        at: at.take().unwrap(),
                        action: props.get("ACTION").cloned().unwrap_or_default(),
                        devpath: props.get("DEVPATH").cloned().unwrap_or_default(),
                        serial: props.get("ID_SERIAL_SHORT").cloned(),
                        initialized: props.get("USEC_INITIALIZED").and_then(|u| u.parse::<f64>().ok()).map(|u| u / 1e6),
                    };
                    let serial = match ev.action.as_str() {
                        "add" => {
                            if let Some(s) = &ev.serial {
                                serial_of.insert(ev.devpath.clone(), s.clone());
                            }
                            ev.serial.clone()
                        }
                        "remove" => serial_of.remove(&ev.devpath).or(ev.serial.clone()),
                        _ => None,
                    };
                    if let Some(tx) = serial.and_then(|s| senders.get(&s)) {
                        let _ = tx.send(ev);
                    }
                }
            }
        });
        (UdevMonitor { child }, receivers)
    }
}

impl Drop for UdevMonitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The next udev event of a board, which must be `action`, within 60 s.
fn expect_udev(rx: &mpsc::Receiver<UdevEvent>, board: &str, action: &str) -> UdevEvent {
    let ev = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| panic!("no udev {action} of {board}"));
    assert_eq!(ev.action, action, "{board}: {ev:?}");
    ev
}

/// How a cycle takes a board off the bus and back.
#[derive(Debug, Clone, Copy)]
enum Unplug {
    /// The host deauthorizes the board's USB device (sysfs `authorized` 0, then 1): its
    /// interfaces and tty go away and come back, without a new enumeration of the device.
    Authorized,
    /// The simulator unbinds the board's gadget from its UDC and binds it again (a cable
    /// pulled and put back: disconnect, then a full enumeration).
    Gadget,
}

/// The sysfs `authorized` switch of the USB device behind a board's Klipper tty.
fn authorized_switch(board: (&str, &str, &str)) -> PathBuf {
    let tty = std::fs::canonicalize(by_id(board, "Klipper")).unwrap();
    let name = tty.file_name().unwrap().to_str().unwrap().to_string();
    // /sys/class/tty/ttyACMn/device is the interface; its parent the USB device.
    let intf = std::fs::canonicalize(format!("/sys/class/tty/{name}/device")).unwrap();
    intf.parent().unwrap().join("authorized")
}

/// `cycles` unplug/plug cycles of one board, each step waiting for udev's event of it (not
/// for the daemon); returns the udev events.
fn cycle(
    board: (&'static str, &str, &str),
    rx: &mpsc::Receiver<UdevEvent>,
    cycles: usize,
    how: Unplug,
) -> Vec<UdevEvent> {
    let mut seen = Vec::with_capacity(cycles * 2);
    let mut plug = Plug::new(board, how);
    for _ in 0..cycles {
        plug.set(false);
        seen.push(expect_udev(rx, board.0, "remove"));
        plug.set(true);
        seen.push(expect_udev(rx, board.0, "add"));
    }
    seen
}

/// Plugs one board in and out.
struct Plug {
    board: &'static str,
    how: Unplug,
    switch: PathBuf,
}

impl Plug {
    fn new(board: (&'static str, &str, &str), how: Unplug) -> Plug {
        Plug { board: board.0, how, switch: authorized_switch(board) }
    }

    fn set(&mut self, on: bool) {
        match self.how {
            Unplug::Authorized => std::fs::write(&self.switch, if on { "1" } else { "0" })
                .unwrap_or_else(|e| panic!("write {}: {e}", self.switch.display())),
            Unplug::Gadget => {
                sim(serde_json::json!({"cmd": if on { "plug" } else { "unplug" }, "board": self.board}));
            }
        }
    }
}

/// A `subscribe` client: every line with the CLOCK_MONOTONIC of its receipt.
struct Subscription {
    lines: mpsc::Receiver<(f64, serde_json::Value)>,
    /// Everything received so far.
    got: Vec<(f64, serde_json::Value)>,
    /// The latest status of each board.
    latest: BTreeMap<String, serde_json::Value>,
    /// Connection changes of each board so far.
    changes: BTreeMap<String, usize>,
    _stream: UnixStream,
}

impl Subscription {
    fn new(socket: &Path) -> Subscription {
        let mut stream = UnixStream::connect(socket).unwrap();
        stream.write_all(b"{\"request\":\"subscribe\"}\n").unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in reader.lines().map_while(Result::ok) {
                let at = monotonic();
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                if tx.send((at, v)).is_err() {
                    break;
                }
            }
        });
        let mut sub = Subscription {
            lines: rx,
            got: Vec::new(),
            latest: BTreeMap::new(),
            changes: BTreeMap::new(),
            _stream: stream,
        };
        let first = sub.lines.recv_timeout(Duration::from_secs(10)).expect("the status first");
        assert_eq!(first.1["reply"], "status", "{}", first.1);
        sub.push(first);
        sub
    }

    fn push(&mut self, line: (f64, serde_json::Value)) {
        let v = &line.1;
        if v["reply"] == "status" {
            for b in v["status"]["boards"].as_array().into_iter().flatten() {
                self.latest.insert(b["key"].as_str().unwrap_or("?").to_string(), b.clone());
            }
        } else if v["notice"]["notice"] == "board" {
            let s = &v["notice"]["status"];
            let key = s["key"].as_str().unwrap_or("?").to_string();
            if self.latest.get(&key).is_some_and(|old| old["connected"] != s["connected"]) {
                *self.changes.entry(key.clone()).or_default() += 1;
            }
            self.latest.insert(key, s.clone());
        }
        self.got.push(line);
    }

    /// The `board` statuses of `key`: the one in the first status, then every notice's.
    fn statuses(&self, key: &str) -> Vec<(f64, serde_json::Value)> {
        let mut out = Vec::new();
        for (at, v) in &self.got {
            if v["reply"] == "status" {
                if let Some(b) = v["status"]["boards"].as_array().into_iter().flatten().find(|b| b["key"] == key) {
                    out.push((*at, b.clone()));
                }
            } else if v["notice"]["notice"] == "board" && v["notice"]["status"]["key"] == key {
                out.push((*at, v["notice"]["status"].clone()));
            }
        }
        out
    }

    /// Read until the daemon has caught up with `cycles` cycles of every soaked board (two
    /// connection changes each) and each is settled, within `secs`. (Settled alone is not
    /// enough: a daemon behind udev may look settled between two of its queued events.)
    fn caught_up(&mut self, cycles: usize, secs: u64) -> Result<(), String> {
        let keys: Vec<&str> = SOAKED.iter().map(|b| b.0).collect();
        self.until_boards(&keys, secs, |sub, k| {
            sub.changes.get(k).copied().unwrap_or(0) == 2 * cycles && sub.latest.get(k).is_some_and(settled)
        })
    }

    /// Read until the latest status of each of `keys` satisfies `done`, within `secs`.
    fn until_boards(
        &mut self,
        keys: &[&str],
        secs: u64,
        done: impl Fn(&Subscription, &str) -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if keys.iter().all(|k| done(self, k)) {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => self.push(l),
                Err(_) => {
                    return Err(format!(
                        "the boards did not settle within {secs} s; connection changes {:?}; last statuses: {:#?}",
                        self.changes, self.latest
                    ))
                }
            }
        }
    }

    /// Take what has arrived without waiting.
    fn drain(&mut self) {
        while let Ok(l) = self.lines.try_recv() {
            self.push(l);
        }
    }
}

/// A board settled after a plug: connected in Klipper, its version read from the board.
fn settled(s: &serde_json::Value) -> bool {
    s["connected"] == true && s["mode"] == "klipper" && s["state"] == "outdated" && s["version_source"] == "identify"
}

/// Connection changes in a board's statuses: (appeared, went away).
fn connection_changes(statuses: &[(f64, serde_json::Value)]) -> (Vec<f64>, Vec<f64>) {
    let (mut appeared, mut gone) = (Vec::new(), Vec::new());
    for w in statuses.windows(2) {
        match (w[0].1["connected"].as_bool(), w[1].1["connected"].as_bool()) {
            (Some(false), Some(true)) => appeared.push(w[1].0),
            (Some(true), Some(false)) => gone.push(w[1].0),
            _ => {}
        }
    }
    (appeared, gone)
}

/// The daemon's memory from `/proc/PID/status`, KiB.
struct Memory {
    rss: u64,
    hwm: u64,
    anon: u64,
    /// The daemon's threads (each keeps its stack's touched pages).
    threads: u64,
    file: u64,
    /// The daemon's live heap (its `status`: glibc's count of bytes in live allocations,
    /// Rust's and C's), and what the allocator keeps free; KiB.
    heap: u64,
    heap_free: u64,
}

impl Memory {
    fn of(d: &Daemon, rig: &FlashRig) -> Memory {
        let pid = d.pid();
        let f = |k| proc_status_kib(pid, k);
        let status = d.status(rig);
        let heap = |k: &str| status["memory"][k].as_u64().unwrap_or_else(|| panic!("no memory.{k} in {status}")) / 1024;
        Memory {
            rss: f("VmRSS"),
            hwm: f("VmHWM"),
            anon: f("RssAnon"),
            file: f("RssFile"),
            threads: f("Threads"),
            heap: heap("heap_in_use"),
            heap_free: heap("heap_free"),
        }
    }
}

impl std::fmt::Display for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "VmRSS {} KiB (anon {}, file {}), VmHWM {} KiB, {} threads; heap in use {} KiB, free {} KiB",
            self.rss, self.anon, self.file, self.hwm, self.threads, self.heap, self.heap_free
        )
    }
}

/// The daemon's resident memory summed per mapped file (anonymous mappings as `[anon]`,
/// heap and stacks under their own names), largest first: where the resident set is.
fn resident_by_mapping(pid: u32) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut by: BTreeMap<String, [u64; 3]> = BTreeMap::new();
    let mut current = String::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            current = words.nth(4).map(|n| n.rsplit('/').next().unwrap_or(n).to_string()).unwrap_or("[anon]".into());
            continue;
        }
        let slot = match first {
            "Rss:" => 0,
            "Pss:" => 1,
            "Anonymous:" => 2,
            _ => continue,
        };
        by.entry(current.clone()).or_default()[slot] += words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    }
    let mut rows: Vec<_> = by.into_iter().filter(|(_, v)| v[0] > 0).collect();
    rows.sort_by_key(|(_, v)| std::cmp::Reverse(v[0]));
    rows.iter().map(|(n, v)| format!("{n} {}/{}/{}", v[0], v[1], v[2])).collect::<Vec<_>>().join(", ")
}

/// `/proc/PID/status` fields in KiB (VmRSS, VmHWM), or counts (Threads).
fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = text.lines().find(|l| l.starts_with(&format!("{field}:"))).unwrap_or_else(|| panic!("{text}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The daemon's memory once its blocking pool's extra threads are gone again (tokio keeps an
/// idle one 10 s): a thread's cache of freed blocks counts as in use, so the live heap is
/// compared at the idle thread count. Polled: a thread's exit has no event to wait on.
fn settled_memory(d: &Daemon, rig: &FlashRig, threads: u64) -> Memory {
    let deadline = Instant::now() + Duration::from_secs(30);
    while proc_status_kib(d.pid(), "Threads") > threads && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
    }
    Memory::of(d, rig)
}

/// utime + stime of the process (all its threads), in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command (which may hold spaces) in parentheses.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15; `after` starts at field 3.
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// p50, p99 and max of `samples` (seconds), in milliseconds.
fn percentiles(samples: &mut [f64]) -> (f64, f64, f64) {
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let at = |q: f64| samples[((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1] * 1e3;
    (at(0.50), at(0.99), samples[samples.len() - 1] * 1e3)
}

struct Daemon {
    process: Background,
    socket: PathBuf,
}

impl Daemon {
    /// Klippy on octopus only, the soaked boards plugged and registered, and the daemon
    /// started with all three identified.
    fn start_with_soaked_boards() -> (FlashRig, Daemon) {
        reset_boards();
        klipper_ready_on(&[("mcu", OCTOPUS.0)]);
        boardctl(&["plug", MMB.0]);
        boardctl(&["wait-ready"]);
        settle();
        let rig = FlashRig::new(SOAKED[0], SOAKED[0].1, &[]);
        for b in &SOAKED[1..] {
            ok(&rig.kflash(&["add", "--device", &by_id(*b, "Klipper"), "--name", b.0, "--key", b.0]));
        }
        let socket = rig.state.join("daemon.sock");
        let mut cmd = rig.command(&["daemon", "--socket", socket.to_str().unwrap()]);
        // Why a version was not read is logged at debug: one line per identify.
        cmd.env("RUST_LOG", "kflash=info,kflash::daemon=debug");
        let mut process = Background::spawn(cmd);
        process.wait_for_line("kflash daemon ready", 60);
        (rig, Daemon { process, socket })
    }

    fn pid(&self) -> u32 {
        self.process.pid()
    }

    fn status(&self, rig: &FlashRig) -> serde_json::Value {
        let out = rig.command(&["status", "--json"]).env("KFLASH_SOCKET", &self.socket).output().unwrap();
        serde_json::from_str(&ok(&out)).unwrap()
    }

    /// Fail the scenario with `why`, then the daemon's log.
    fn fail(&mut self, why: &str) -> ! {
        eprintln!("{why}");
        // Panics with everything the daemon printed so far.
        self.process.wait_for_line("(a line the daemon never prints: show its log)", 2);
        unreachable!()
    }

    fn stop(self) {
        self.process.signal("TERM");
        let (status, stderr) = self.process.finish(30);
        assert!(status.success(), "{status}: {stderr}");
    }
}

/// Run `cycles` cycles on the three boards at once; the udev events of each board.
fn soak(
    udev: &mut BTreeMap<String, mpsc::Receiver<UdevEvent>>,
    cycles: usize,
    how: Unplug,
) -> BTreeMap<String, Vec<UdevEvent>> {
    std::thread::scope(|s| {
        let runs: Vec<_> = udev
            .iter_mut()
            .map(|(name, rx)| {
                let board = *SOAKED.iter().find(|b| b.0 == name).unwrap();
                (name.clone(), s.spawn(move || cycle(board, rx, cycles, how)))
            })
            .collect();
        runs.into_iter().map(|(name, h)| (name, h.join().expect("a cycling thread panicked"))).collect()
    })
}

#[test]
#[ignore = "runs inside the USB rig"]
fn a_thousand_plug_cycles_of_three_boards_miss_nothing_and_leak_nothing() {
    in_rig();
    let _clean = LeaveRigClean;
    let (rig, mut d) = Daemon::start_with_soaked_boards();
    let (_monitor, mut udev) = UdevMonitor::start(&SOAKED);
    let mut sub = Subscription::new(&d.socket);
    sub.caught_up(0, 60).unwrap_or_else(|e| d.fail(&e));
    idle(&rig, &mut d, &mut sub);
    let idle_threads = proc_status_kib(d.pid(), "Threads");
    let t = Instant::now();

    // Memory sampled at checkpoints, each once the daemon has caught up.
    let mut events: BTreeMap<String, Vec<UdevEvent>> = BTreeMap::new();
    let mut mem_at = Vec::new();
    let mut done = 0;
    let cycles: usize = std::env::var("KFLASH_SOAK_CYCLES").ok().and_then(|c| c.parse().ok()).unwrap_or(CYCLES);
    for checkpoint in [EARLY[0], EARLY[1], WARMUP, CYCLES].map(|c| c * cycles / CYCLES) {
        for (name, more) in soak(&mut udev, checkpoint - done, SOAK_UNPLUG) {
            events.entry(name).or_default().extend(more);
        }
        done = checkpoint;
        sub.caught_up(done, 120).unwrap_or_else(|e| d.fail(&e));
        let mem = settled_memory(&d, &rig, idle_threads);
        eprintln!(
            "{done} cycles of 3 boards at once after {:.1} s ({:.0} ms per cycle per board): daemon {mem}",
            t.elapsed().as_secs_f64(),
            t.elapsed().as_secs_f64() * 1e3 / done as f64
        );
        mem_at.push(mem);
    }
    // The allocator's footprint moves up and down by a few MiB between checkpoints (measured:
    // 33.8, 34.7, 38.1, 34.1 MiB); a leak climbs to a new high at every one. So the end may
    // not exceed the highest of the earlier checkpoints by more than the bound.
    let end = &mem_at[mem_at.len() - 1];
    let high = mem_at[..mem_at.len() - 1].iter().map(|m| m.rss).max().expect("earlier checkpoints");
    let growth = end.rss as i64 - high as i64;
    eprintln!(
        "daemon VmRSS after {done} cycles {} KiB, highest at the earlier checkpoints {high} KiB: {growth:+} KiB",
        end.rss
    );
    let heap_high = mem_at[..mem_at.len() - 1].iter().map(|m| m.heap).max().expect("earlier checkpoints");
    let heap_growth = end.heap as i64 - heap_high as i64;
    eprintln!(
        "daemon live heap after {done} cycles {} KiB, highest at the earlier checkpoints {heap_high} KiB: \
         {heap_growth:+} KiB",
        end.heap
    );

    // Nothing missed, nothing twice: per board one appearance per udev add and one
    // disappearance per udev remove, and never the same status twice in a row.
    sub.drain();
    let lagged: Vec<_> = sub.got.iter().filter(|(_, v)| v["reply"] == "lagged").collect();
    assert!(lagged.is_empty(), "the subscriber lagged: {lagged:?}");
    let (mut on_add, mut on_remove) = (Vec::new(), Vec::new());
    for b in &SOAKED {
        let statuses = sub.statuses(b.0);
        let (appeared, gone) = connection_changes(&statuses);
        let adds: Vec<f64> = events[b.0].iter().filter(|e| e.action == "add").map(|e| e.at).collect();
        let removes: Vec<f64> = events[b.0].iter().filter(|e| e.action == "remove").map(|e| e.at).collect();
        eprintln!(
            "{}: udev {} adds, {} removes; daemon {} board notices, {} appearances, {} disappearances",
            b.0,
            adds.len(),
            removes.len(),
            statuses.len() - 1,
            appeared.len(),
            gone.len()
        );
        assert_eq!((adds.len(), removes.len()), (cycles, cycles), "{}: udev saw every cycle", b.0);
        assert_eq!((appeared.len(), gone.len()), (cycles, cycles), "{}: a connection change per udev event", b.0);
        let twice: Vec<_> = statuses.windows(2).filter(|w| w[0].1 == w[1].1).map(|w| &w[1]).collect();
        assert!(twice.is_empty(), "{}: the same status twice in a row: {twice:?}", b.0);
        on_add.extend(adds.iter().zip(&appeared).map(|(u, n)| n - u));
        on_remove.extend(removes.iter().zip(&gone).map(|(u, n)| n - u));
    }
    for (what, samples) in [("appeared", &mut on_add), ("went away", &mut on_remove)] {
        let (p50, p99, max) = percentiles(samples);
        eprintln!(
            "under the soak's load, udevadm monitor's receipt of the udev event to the subscriber's receipt of the \
             notice that a board {what} ({} samples): p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms, min {:.1} ms",
            samples.len(),
            samples[0] * 1e3
        );
    }

    // Reaction time in quiet conditions: one board really unplugged and plugged (its gadget
    // unbound and bound), the next step only once the daemon has said it all.
    let (board, rx) = (SOAKED[0], &udev[SOAKED[0].0]);
    let mut plug = Plug::new(board, Unplug::Gadget);
    let (mut from_udev, mut from_init, mut outdated) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..QUIET_CYCLES {
        for on in [false, true] {
            let from = sub.got.len();
            plug.set(on);
            let ev = expect_udev(rx, board.0, if on { "add" } else { "remove" });
            sub.until_boards(&[board.0], 60, |sub, k| {
                sub.latest.get(k).is_some_and(|s| if on { settled(s) } else { s["connected"] == false })
            })
            .unwrap_or_else(|e| d.fail(&e));
            // When the subscriber got the first notice of this step whose board status passes `is`.
            let first = |is: &dyn Fn(&serde_json::Value) -> bool, what: &str| {
                sub.got[from..]
                    .iter()
                    .find(|(_, v)| v["notice"]["status"]["key"] == board.0 && is(&v["notice"]["status"]))
                    .unwrap_or_else(|| panic!("{what}"))
                    .0
            };
            let at = first(&|s| s["connected"] == on, "the connection change");
            from_udev.push(at - ev.at);
            if on {
                from_init.push(at - ev.initialized.expect("USEC_INITIALIZED on an add"));
                // Step 7's "reports an outdated board within 1 s of it appearing": the notice
                // with the version the daemon read from the board itself.
                outdated.push(first(&settled, "the outdated report") - ev.at);
            }
        }
    }
    for (what, samples) in [
        ("udevadm monitor's receipt of the udev event (add or remove)", &mut from_udev),
        ("USEC_INITIALIZED (udevd began the add; its rules' time included)", &mut from_init),
        (
            "udevadm monitor's receipt of the add, to the outdated report (identify included; target 1 s),",
            &mut outdated,
        ),
    ] {
        let (p50, p99, max) = percentiles(samples);
        eprintln!(
            "quiet reaction, {what} to the subscriber's receipt of the notice ({} samples): p50 {p50:.1} ms, p99 \
             {p99:.1} ms, max {max:.1} ms, min {:.1} ms",
            samples.len(),
            samples[0] * 1e3
        );
    }
    let (_, p99, _) = percentiles(&mut from_udev);
    assert!(p99 < REACTION_P99_LIMIT_MS, "reaction p99 {p99:.1} ms");
    let (_, p99, _) = percentiles(&mut outdated);
    // A stall bound, as rig_daemon's single sample: the 1 s target is reported above, and
    // under emulation a loaded machine can take longer (one CI run took 1.47 s once).
    assert!(p99 < OUTDATED_REPORT_P99_LIMIT_MS, "outdated report p99 {p99:.1} ms");

    // The final state, through `kflash status --json`.
    let s = d.status(&rig);
    for b in &SOAKED {
        let st = s["boards"].as_array().unwrap().iter().find(|x| x["key"] == b.0).unwrap_or_else(|| panic!("{s}"));
        let last: Vec<_> = sub.statuses(b.0).into_iter().rev().take(6).collect();
        assert!(settled(st), "{}: {st}\nits last statuses, newest first: {last:#?}", b.0);
    }
    assert!(
        heap_growth < HEAP_GROWTH_LIMIT_KIB as i64,
        "the daemon's live heap at {done} cycles is {heap_growth} KiB above its highest at the earlier checkpoints"
    );
    assert!(
        growth < RSS_GROWTH_LIMIT_KIB as i64,
        "VmRSS at {done} cycles is {growth} KiB above its highest at the earlier checkpoints"
    );
    d.stop();
}

/// With the three boards connected and identified and nothing happening, for 60 s: the
/// daemon's CPU time, wake-ups and notices, and its memory.
fn idle(rig: &FlashRig, d: &mut Daemon, sub: &mut Subscription) {
    let (cpu0, sched0, wake0, n0) = (cpu_secs(d.pid()), sched_cpu_secs(d.pid()), wakeups(d.pid()), sub.got.len());
    // The measurement window itself: nothing is awaited, the daemon is watched being idle.
    std::thread::sleep(Duration::from_secs(60));
    sub.drain();
    let (cpu, wake, notices) = (cpu_secs(d.pid()) - cpu0, wakeups(d.pid()) - wake0, sub.got.len() - n0);
    let sched = sched_cpu_secs(d.pid()) - sched0;
    let mem = Memory::of(d, rig);
    eprintln!(
        "idle 60 s with 3 boards connected, Klippy and Moonraker running: daemon CPU (utime + stime) {cpu:.2} s, \
         (schedstat) {sched:.3} s, {wake} context switches (wake-ups), {notices} notices; {mem}"
    );
    eprintln!(
        "idle daemon's resident memory by mapping (KiB; Rss / Pss / Anonymous): {}",
        resident_by_mapping(d.pid())
    );
    assert_eq!(notices, 0, "notices while nothing happened: {:?}", &sub.got[n0..]);
    assert!(sched < IDLE_CPU_LIMIT_SECS, "the idle daemon used {sched:.3} s of CPU in 60 s (schedstat)");

    // The wake-ups above are Moonraker's: it pushes `notify_proc_stat_update` to every
    // websocket client once a second (its proc_stats component), agents included. Without
    // Moonraker the daemon has no timer left to wake it.
    let stop = run("systemctl", &["stop", "moonraker"]);
    assert!(stop.status.success(), "systemctl stop moonraker: {}", text(&stop.stderr));
    d.process.wait_for_line("Moonraker connection lost", 30);
    let (cpu0, wake0) = (sched_cpu_secs(d.pid()), wakeups(d.pid()));
    std::thread::sleep(Duration::from_secs(QUIET_WINDOW_SECS));
    let (cpu, wake) = (sched_cpu_secs(d.pid()) - cpu0, wakeups(d.pid()) - wake0);
    eprintln!("idle {QUIET_WINDOW_SECS} s with Moonraker stopped: daemon CPU (schedstat) {cpu:.4} s, {wake} wake-ups");
    // The daemon may have reached the Moonraker that was stopping (and said so): only a line
    // stamped after this start counts (the log's RFC 3339 UTC stamps sort as strings).
    let since = text(&run("date", &["-u", "+%Y-%m-%dT%H:%M:%S.%6NZ"]).stdout).trim().to_string();
    let start = run("systemctl", &["start", "moonraker"]);
    assert!(start.status.success(), "systemctl start moonraker: {}", text(&start.stderr));
    while d.process.wait_for_line("identified to Moonraker as agent", 120).as_str() < since.as_str() {}
    assert!(wake <= QUIET_WAKEUP_LIMIT, "{wake} wake-ups in {QUIET_WINDOW_SECS} s with nothing to wake the daemon");
}
