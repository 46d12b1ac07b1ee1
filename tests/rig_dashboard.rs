//! Step 8 on real USB: the dashboard, the real binary in a real terminal (tmux in the
//! guest). It sees a board appear live, flashes it with F, shows the CLI's summary, leaves
//! Klipper running, takes no CPU while idle, and gives the terminal back sane after Q, a
//! signal or a panic. B flashes flash-all's plan, C changes a setting, a daemon started later
//! is followed, and without one the dashboard reads a board's version itself.
//!
//! tmux has no event for "the pane shows X": [`Pane::wait_for`] polls `capture-pane` with
//! a short interval until a deadline. This polling is in the test only; the dashboard
//! itself waits on events.

mod rig_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rig_support::*;

/// printer.cfg uses ebb only: the octopus is flashed, and unplugging it does not shut Klippy down.
const PRINTER_CFG: [(&str, &str); 1] = [("mcu", "ebb")];

/// A tmux server of our own with one 120x40 pane running a shell.
struct Pane {
    socket: String,
}

impl Pane {
    fn start() -> Pane {
        let socket = format!("kflash-dash-{}", std::process::id());
        let pane = Pane { socket };
        // A plain interactive bash whose prompt the test knows (PS1 comes from the environment).
        let out = Command::new("tmux")
            .args(["-L", &pane.socket, "-f", "/dev/null", "new-session", "-d", "-x", "120", "-y", "40"])
            .arg("env PS1='rig-shell$ ' bash --norc --noprofile -i")
            .env("TERM", "xterm-256color")
            .output()
            .expect("tmux must be installed (tests/setup-host installs it)");
        assert!(out.status.success(), "tmux new-session: {}", text(&out.stderr));
        pane.wait_for("rig-shell$", 10);
        pane
    }

    fn tmux(&self, args: &[&str]) -> String {
        let out = Command::new("tmux").args(["-L", &self.socket]).args(args).output().unwrap();
        assert!(out.status.success(), "tmux {args:?}: {}", text(&out.stderr));
        text(&out.stdout)
    }

    fn capture(&self) -> String {
        self.tmux(&["capture-pane", "-p"])
    }

    /// Type a line into the shell.
    fn line(&self, s: &str) {
        self.tmux(&["send-keys", "-l", s]);
        self.tmux(&["send-keys", "Enter"]);
    }

    fn key(&self, k: &str) {
        self.tmux(&["send-keys", k]);
    }

    /// The screen once it contains `needle` (polled, see the module comment), or panic with
    /// the last screen after `secs`. A command line typed into the shell must not contain the
    /// needle its output is waited for (hence `echo "dashboard"-exit=$?`).
    fn wait_for(&self, needle: &str, secs: u64) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let screen = self.capture();
            if screen.contains(needle) {
                return screen;
            }
            assert!(Instant::now() < deadline, "no {needle:?} on screen within {secs} s; the screen:\n{screen}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A tmux format of the pane, e.g. `#{alternate_on}` (1 while the program is on the
    /// alternate screen), `#{cursor_flag}` (1: the cursor is shown).
    fn format(&self, f: &str) -> String {
        self.tmux(&["display-message", "-p", f]).trim().to_string()
    }

    /// `stty -a` of the pane's terminal, read from outside (the program in it keeps running).
    fn stty_of_pane_tty(&self) -> String {
        let tty = self.format("#{pane_tty}");
        text(&run("stty", &["-a", "-F", &tty]).stdout)
    }

    /// The screen once `done(screen)` holds (polled like [`Pane::wait_for`]).
    fn wait_until(&self, what: &str, secs: u64, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let screen = self.capture();
            if done(&screen) {
                return screen;
            }
            assert!(Instant::now() < deadline, "not {what} within {secs} s; the screen:\n{screen}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The pid of the pane's foreground program (the shell's child).
    fn child_pid(&self) -> u32 {
        let shell = self.tmux(&["display-message", "-p", "#{pane_pid}"]).trim().to_string();
        let out = run("pgrep", &["-P", &shell]);
        text(&out.stdout).lines().next().and_then(|l| l.trim().parse().ok()).expect("the dashboard's pid")
    }
}

impl Drop for Pane {
    fn drop(&mut self) {
        let _ = Command::new("tmux").args(["-L", &self.socket, "kill-server"]).output();
    }
}

/// utime + stime of `pid`, in clock ticks (/proc/PID/stat fields 14 and 15).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name may hold spaces: count fields after its closing parenthesis.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as u64
}

fn print_screen(title: &str, screen: &str) {
    eprintln!("==== {title} (tmux capture-pane) ====\n{screen}==== end of {title} ====");
}

#[test]
#[ignore = "runs inside the USB rig"]
fn dashboard_sees_a_board_arrive_flashes_it_with_f_and_gives_the_terminal_back() {
    let _clean = begin(&PRINTER_CFG);
    let rig = FlashRig::new(OCTOPUS, OCTOPUS.1, &[("bootloader_secs", 15), ("reconnect_secs", 20)]);
    let tmp = tempfile::tempdir().unwrap();
    let log = ServiceLog::start();
    let version = klipper_tree_version();

    // The octopus starts unplugged: the dashboard must see it arrive.
    boardctl(&["unplug", OCTOPUS.0]);
    settle();

    let pane = Pane::start();
    let stty_before = dir_file(tmp.path(), "stty-before");
    pane.line(&format!("stty -a > {}", stty_before.display()));
    pane.line(&format!(
        "KFLASH_STATE_DIR={} KFLASH_CACHE_DIR={} {} --config-dir {}; echo \"dashboard\"-exit=$?",
        rig.state.display(),
        rig.cache.display(),
        kflash_bin(),
        rig.cfg.display()
    ));
    let screen = pane.wait_for("○ octopus", 30);
    assert!(screen.contains("absent"), "{screen}");
    assert!(screen.contains("F flash"), "the keys are on screen:\n{screen}");

    // Plugged: the row turns connected, live (no key pressed, no rescan).
    boardctl(&["plug", OCTOPUS.0]);
    let screen = pane.wait_for("● octopus", 30);
    assert!(screen.contains("Klipper"), "mode shown:\n{screen}");
    assert!(screen.contains(OCTOPUS.2), "USB serial shown:\n{screen}");
    // Klippy's state arrives over Moonraker's link, then the print state asked over HTTP:
    // once both are on screen, everything the start and the plug set off is done.
    pane.wait_for("Print standby", 90);
    // The octopus is not in printer.cfg: the dashboard reads its version itself (identify).
    let idle = pane.wait_for("OUTDATED", 60);
    assert!(idle.contains("Klippy ready") && idle.contains("Print standby"), "{idle}");
    print_screen("idle dashboard", &idle);

    // Idle: nothing happens for 60 s, so nothing is drawn and no CPU is used.
    let pid = pane.child_pid();
    let (ticks0, sched0, wake0) = (cpu_ticks(pid), sched_cpu_secs(pid), wakeups(pid));
    // The measurement window itself: nothing is awaited, the dashboard is watched being idle.
    std::thread::sleep(Duration::from_secs(60));
    let (ticks, sched, wake) = (cpu_ticks(pid) - ticks0, sched_cpu_secs(pid) - sched0, wakeups(pid) - wake0);
    let secs = ticks as f64 / clock_ticks() as f64;
    eprintln!(
        "idle dashboard over 60 s: CPU (utime + stime) {ticks} ticks = {secs:.2} s ({:.3} %), (schedstat) {sched:.3} s, \
         {wake} context switches (wake-ups)",
        secs / 60.0 * 100.0
    );
    assert_eq!(pane.capture(), idle, "nothing changed, so nothing was drawn");
    // Not zero: Moonraker pushes `notify_proc_stat_update` to every connection once a second
    // (the agent link's too; read and dropped, nothing drawn). Under the rig's emulated CPU
    // that is ~0.3 s a minute; a loop that polls or redraws would take many seconds.
    assert!(secs < 1.0, "the idle dashboard used {secs:.2} s of CPU in 60 s");

    // F flashes the highlighted (only) board.
    let mark = EventLog::mark("dashboard F");
    pane.key("F");
    pane.wait_for("[>] write", 180);
    // Some blocks written, not all: the bars mid-write.
    let progress = pane.wait_until("blocks written, not all", 120, |s| {
        s.lines().any(|l| l.contains("write: ") && l.contains(" blocks") && !l.contains("write: 0/"))
    });
    print_screen("flash in progress", &progress);
    let done = pane.wait_for("verified running it", 240);
    print_screen("summary", &done);
    assert!(done.contains(&format!("octopus: flashed {version} via katapult")), "the CLI's summary:\n{done}");
    assert!(done.contains("Klipper down"), "{done}");
    assert!(mark.writes(OCTOPUS.0) > 0, "the board was written");
    log.assert_klipper_stopped_and_restarted();
    assert!(klipper_is_active(), "Klipper runs after the flash");
    assert_eq!(board_json(OCTOPUS.0)["version"], version.as_str());

    // Any key back to the boards, Q quits, the shell gets a sane terminal back.
    pane.key("x");
    pane.wait_for("F flash", 10);
    pane.key("q");
    let after = pane.wait_for("dashboard-exit=", 10);
    assert!(after.contains("dashboard-exit=0"), "{after}");
    let stty_after = dir_file(tmp.path(), "stty-after");
    pane.line(&format!("stty -a > {}", stty_after.display()));
    wait_file(&stty_after);
    let (b, a) = (std::fs::read_to_string(&stty_before).unwrap(), std::fs::read_to_string(&stty_after).unwrap());
    assert_eq!(b, a, "the terminal settings after the dashboard are those before it");
    assert!(a.contains(" icanon") && a.contains(" echo"), "cooked mode with echo:\n{a}");
    // The shell's prompt is back on the main screen (the alternate screen was left).
    let screen = pane.capture();
    assert!(screen.contains("rig-shell$ stty -a"), "{screen}");
}

fn dir_file(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// Wait for the shell to have written `path` (it writes it in one go; polled, test only).
fn wait_file(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(path).map(|m| m.len() == 0).unwrap_or(true) {
        assert!(Instant::now() < deadline, "{} was not written", path.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every way the dashboard ends gives the shell its terminal back as it was: SIGTERM and
/// SIGHUP (the SSH session gone) end it like every kflash command (exit 130), a panic in its
/// loop ends it with Rust's 101 and the panic's message on the main screen. Each time the
/// pane has left the alternate screen, shows the cursor, and `stty -a` reads as before the
/// dashboard (cooked, echo). A panic caught below the loop (in a task) takes the screen for a
/// moment; the dashboard takes it back and goes on. The panics are provoked with the
/// debug-build-only `KFLASH_DASHBOARD_PANIC_KEY` / `KFLASH_DASHBOARD_TASK_PANIC_KEY`.
#[test]
#[ignore = "runs inside the USB rig"]
fn every_exit_path_gives_the_terminal_back() {
    in_rig();
    let (_tmp, cfg) = config_dir();
    let files = tempfile::tempdir().unwrap();
    let pane = Pane::start();
    let before = files.path().join("stty-before");
    pane.line(&format!("stty -a > {}", before.display()));
    wait_file(&before);
    let before = std::fs::read_to_string(&before).unwrap();
    assert!(before.contains(" icanon") && before.contains(" echo"), "{before}");
    // A release binary (KFLASH_RIG_BIN=target/release/kflash) has no test panic: only the
    // signals then.
    let release = std::env::var("KFLASH_RIG_BIN").is_ok_and(|b| b.contains("release"));
    let mut ways = vec!["TERM", "HUP"];
    if release {
        eprintln!("note: KFLASH_RIG_BIN is a release build: the panic path needs a debug build, not tested");
    } else {
        ways.push("panic");
    }
    for (i, way) in ways.iter().enumerate() {
        pane.line(&format!(
            "KFLASH_DASHBOARD_PANIC_KEY=P KFLASH_DASHBOARD_TASK_PANIC_KEY=T {} --config-dir {} dashboard; echo \"exit-{i}\"=$?",
            kflash_bin(),
            cfg.display()
        ));
        pane.wait_for("F flash", 30);
        assert_eq!(pane.format("#{alternate_on}"), "1", "{way}: the dashboard is on the alternate screen");
        assert!(pane.stty_of_pane_tty().contains(" -icanon"), "{way}: raw mode while it runs");
        if *way == "panic" {
            // First a panic the dashboard survives: caught by tokio in a task of its own.
            pane.key("T");
            let screen = pane.wait_for("a panic was caught and the dashboard goes on", 10);
            assert!(screen.contains("F flash"), "the dashboard is drawn again:\n{screen}");
            assert_eq!(pane.format("#{alternate_on}"), "1", "the alternate screen is taken back");
            assert!(pane.stty_of_pane_tty().contains(" -icanon"), "raw mode is taken back");
            pane.key("P");
        } else {
            let pid = pane.child_pid();
            let out = run("kill", &[&format!("-{way}"), &pid.to_string()]);
            assert!(out.status.success());
        }
        let screen = pane.wait_for(&format!("exit-{i}="), 10);
        if *way == "panic" {
            assert!(screen.contains(&format!("exit-{i}=101")), "panic: {screen}");
            assert!(
                screen.contains("KFLASH_DASHBOARD_PANIC_KEY: a test panic"),
                "the panic's message stays on the main screen: {screen}"
            );
        } else {
            assert!(screen.contains(&format!("exit-{i}=130")), "SIG{way}: {screen}");
            assert!(screen.contains("interrupted"), "SIG{way}: the reason is said: {screen}");
        }
        assert_eq!(pane.format("#{alternate_on}"), "0", "{way}: back on the main screen:\n{screen}");
        assert_eq!(pane.format("#{cursor_flag}"), "1", "{way}: the cursor is shown");
        let after = files.path().join(format!("stty-after-{i}"));
        pane.line(&format!("stty -a > {}", after.display()));
        wait_file(&after);
        assert_eq!(
            before,
            std::fs::read_to_string(&after).unwrap(),
            "{way}: the terminal settings are those before the dashboard"
        );
    }
}

/// A leaves the dashboard for the profile list, the `kflash add` wizard and menuconfig on the
/// real terminal, and comes back to the dashboard with the new board on it.
#[test]
#[ignore = "runs inside the USB rig"]
fn a_adds_a_board_through_the_wizard_and_menuconfig_and_comes_back() {
    let _clean = begin(&PRINTER_CFG);
    let rig = FlashRig::new(OCTOPUS, OCTOPUS.1, &[]);
    let pane = Pane::start();
    // The stand-in's menuconfig is not interactive: it makes a config for this MCU.
    pane.line(&format!(
        "RIG_MENUCONFIG_MCU={} KFLASH_STATE_DIR={} {} --config-dir {}; echo \"dashboard\"-exit=$?",
        NITEHAWK.1,
        rig.state.display(),
        kflash_bin(),
        rig.cfg.display()
    ));
    pane.wait_for("● octopus", 30);
    pane.key("A");
    // The main screen: profiles first (none taken here), then the wizard's questions.
    pane.wait_for("Profile number", 10);
    pane.key("Enter");
    let screen = pane.wait_for("Board number", 30);
    let pick = screen
        .lines()
        .find(|l| l.contains(&format!("klipper {} serial", NITEHAWK.1)))
        .and_then(|l| l.trim().split(')').next())
        .unwrap_or_else(|| panic!("the wizard lists the nitehawk:\n{screen}"))
        .to_string();
    pane.line(&pick);
    pane.wait_for("Display name", 10);
    pane.line("nitehawk");
    pane.wait_for("MCU [", 10);
    pane.key("Enter");
    pane.wait_for("Flash method (", 10);
    pane.key("Enter");
    pane.wait_for("Exclude from flash-all?", 10);
    pane.key("n");
    // menuconfig ran on the new board's config; back in the dashboard with the board on it.
    let screen = pane.wait_for("Back in the dashboard.", 60);
    assert!(screen.contains("● nitehawk"), "{screen}");
    let cfg = rig.cfg.join("configs/nitehawk.config");
    let text = std::fs::read_to_string(&cfg).unwrap_or_else(|e| panic!("{}: {e}", cfg.display()));
    assert!(text.contains(&format!("CONFIG_MCU=\"{}\"", NITEHAWK.1)), "{text}");

    // E on the octopus (the cursor is on it): name, method and flash-all on the real terminal.
    pane.key("E");
    pane.wait_for("Display name [octopus]", 10);
    pane.line("Octopus Pro");
    pane.wait_for("Flash method (", 10);
    pane.key("Enter");
    pane.wait_for("Include in flash-all?", 10);
    pane.key("n");
    let screen = pane.wait_for("Back in the dashboard.", 20);
    let row = screen.lines().find(|l| l.contains("● octopus")).unwrap_or_else(|| panic!("{screen}"));
    assert!(row.contains("[excluded]"), "{screen}");
    let boards = std::fs::read_to_string(rig.cfg.join("boards.toml")).unwrap();
    assert!(boards.contains("Octopus Pro"), "{boards}");

    // R on the nitehawk (the row above: boards are listed by key) asks, and removes it.
    pane.key("k");
    pane.key("R");
    pane.wait_for("Remove 'nitehawk' (nitehawk)?", 10);
    pane.key("y");
    let screen = pane.wait_for("Removed 'nitehawk'", 10);
    assert!(!screen.contains("● nitehawk"), "{screen}");
    pane.key("q");
    let after = pane.wait_for("dashboard-exit=", 10);
    assert!(after.contains("dashboard-exit=0"), "{after}");
}

/// With `kflash daemon` running: the dashboard says so, shows the version the daemon read
/// from the board, and F hands the flash to the daemon (as `kflash flash` does) and draws it.
#[test]
#[ignore = "runs inside the USB rig"]
fn with_the_daemon_f_hands_the_flash_over_and_draws_it() {
    let _clean = begin(&PRINTER_CFG);
    let rig = FlashRig::new(OCTOPUS, OCTOPUS.1, &[("bootloader_secs", 15), ("reconnect_secs", 20)]);
    let socket = rig.state.join("daemon.sock");
    let mut daemon = Background::spawn(rig.command(&["daemon", "--socket", socket.to_str().unwrap()]));
    daemon.wait_for_line("kflash daemon ready", 60);
    let log = ServiceLog::start();
    let version = klipper_tree_version();
    let pane = Pane::start();
    pane.line(&format!(
        "KFLASH_SOCKET={} KFLASH_STATE_DIR={} KFLASH_CACHE_DIR={} {} --config-dir {} dashboard; echo \"dashboard\"-exit=$?",
        socket.display(),
        rig.state.display(),
        rig.cache.display(),
        kflash_bin(),
        rig.cfg.display()
    ));
    let screen = pane.wait_for("Daemon running", 30);
    assert!(screen.contains(&socket.display().to_string()), "{screen}");
    // The octopus is not in printer.cfg: only the daemon's identify knows what it runs.
    let screen = pane.wait_for("OUTDATED", 60);
    print_screen("with the daemon", &screen);
    pane.key("F");
    pane.wait_for("by the kflash daemon", 30);
    let done = pane.wait_for("verified running it", 240);
    print_screen("summary of the daemon's run", &done);
    assert!(done.contains(&format!("octopus: flashed {version} via katapult")), "{done}");
    log.assert_klipper_stopped_and_restarted();
    assert!(klipper_is_active(), "Klipper runs after the flash");
    pane.key("x");
    pane.key("q");
    let after = pane.wait_for("dashboard-exit=", 10);
    assert!(after.contains("dashboard-exit=0"), "{after}");
    daemon.signal("TERM");
}

/// Esc during a flash asks first (no: the run goes on), then yes cancels it; Klipper runs
/// again either way, and the summary says the run was interrupted.
#[test]
#[ignore = "runs inside the USB rig"]
fn esc_during_a_flash_asks_then_cancels_and_klipper_runs_again() {
    let _clean = begin(&PRINTER_CFG);
    let rig = FlashRig::new(OCTOPUS, OCTOPUS.1, &[("bootloader_secs", 15), ("reconnect_secs", 20)]);
    let log = ServiceLog::start();
    let pane = Pane::start();
    pane.line(&format!(
        "KFLASH_STATE_DIR={} KFLASH_CACHE_DIR={} {} --config-dir {}; echo \"dashboard\"-exit=$?",
        rig.state.display(),
        rig.cache.display(),
        kflash_bin(),
        rig.cfg.display()
    ));
    pane.wait_for("● octopus", 30);
    pane.key("F");
    pane.wait_for("[>] write", 180);
    pane.key("Escape");
    pane.wait_for("Cancel the run?", 10);
    pane.key("n");
    let screen = pane.wait_for("Esc / Ctrl-C cancel the run", 10);
    assert!(!screen.contains("Cancel the run?"), "no: the dialog is gone and the run goes on:\n{screen}");
    pane.key("Escape");
    pane.wait_for("Cancel the run?", 10);
    pane.key("y");
    let done = pane.wait_for("interrupted by a cancel in the dashboard", 120);
    print_screen("cancelled flash", &done);
    log.assert_klipper_stopped_and_restarted();
    assert!(klipper_is_active(), "Klipper runs after the cancel");
    pane.key("x");
    pane.key("q");
    let after = pane.wait_for("dashboard-exit=", 10);
    assert!(after.contains("dashboard-exit=0"), "{after}");
}

/// printer.cfg for B: the three boards, so Klippy reports what each runs.
const ALL_IN_PRINTER_CFG: [(&str, &str); 3] = [("mcu", "octopus"), ("mcu nitehawk", "nitehawk"), ("mcu ebb", "ebb")];

/// B flashes what `kflash flash-all` plans (the library's plan: here the CLI's `--dry-run`
/// lists three boards, one of them already current), asks about the current board in a
/// dialog as the CLI asks on a terminal (no: left out), flashes the two others inside one
/// Klipper stop, shows the CLI's summary table, and leaves Klipper running. Then C changes a
/// setting on the real terminal: a bad value is refused and asked again, a good one saved.
#[test]
#[ignore = "runs inside the USB rig"]
fn b_flashes_what_flash_all_plans_and_c_changes_a_setting() {
    let _clean = begin(&ALL_IN_PRINTER_CFG);
    let rig = FlashRig::new(OCTOPUS, OCTOPUS.1, &[("bootloader_secs", 15), ("reconnect_secs", 20)]);
    rig.add_board(NITEHAWK, NITEHAWK.1);
    rig.add_board(EBB, EBB.1);
    let version = klipper_tree_version();
    // ebb already runs the host's version, and Klippy knows it.
    boardctl(&["set-version", EBB.0, &version]);
    restart_klipper_and_wait_ready();
    let plan: serde_json::Value =
        serde_json::from_str(&ok(&rig.kflash(&["flash-all", "--dry-run", "--json"]))).unwrap();
    let planned: Vec<(&str, bool)> = plan["boards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["key"].as_str().unwrap(), b["outdated"] == false))
        .collect();
    assert_eq!(planned.len(), 3, "{plan}");
    assert_eq!(planned.iter().filter(|(_, current)| *current).map(|(k, _)| *k).collect::<Vec<_>>(), ["ebb"], "{plan}");

    let log = ServiceLog::start();
    let events = EventLog::mark("dashboard B");
    let pane = Pane::start();
    pane.line(&format!(
        "KFLASH_STATE_DIR={} KFLASH_CACHE_DIR={} {} --config-dir {}; echo \"dashboard\"-exit=$?",
        rig.state.display(),
        rig.cache.display(),
        kflash_bin(),
        rig.cfg.display()
    ));
    pane.wait_for("● nitehawk", 30);
    pane.wait_for("Print standby", 90);
    pane.key("B");
    let screen = pane.wait_for("already run", 60);
    assert!(screen.contains(&format!("ebb already run {version}. Flash them anyway?")), "{screen}");
    pane.key("n");
    let progress = pane.wait_for("[>] write", 400);
    print_screen("flash-all in progress", &progress);
    let done = pane.wait_for("Klipper was down", 600);
    print_screen("flash-all summary", &done);
    // The CLI's table (ui::batch::summary_lines): a header, and a row per flashed board.
    assert!(done.contains("Version before → after"), "{done}");
    for name in [OCTOPUS.0, NITEHAWK.0] {
        let row = done
            .lines()
            .find(|l| l.contains(&format!(" {name} ")) && l.contains("flashed"))
            .unwrap_or_else(|| panic!("no summary row for {name}:\n{done}"));
        assert!(row.contains("verified") && row.contains(&format!("→ {version}")), "{name}: {row}");
        // The checklist has Klippy's confirmation too (sent just before the run ended).
        let checklist = done.lines().find(|l| l.contains(&format!("│{name} "))).unwrap_or_else(|| panic!("{done}"));
        assert!(checklist.contains("[✓] done"), "{name}'s checklist: {checklist}");
        assert!(events.writes(name) > 0, "{name} was written");
        assert_eq!(board_json(name)["version"], version.as_str());
    }
    events.assert_not_written(EBB.0);
    assert!(!done.lines().any(|l| l.contains(" ebb ") && l.contains("flashed")), "ebb was left out:\n{done}");
    assert!(done.contains(&format!("ebb (ebb): already runs {version}")), "the CLI's left-out line:\n{done}");
    log.assert_klipper_stopped_and_restarted();
    assert!(klipper_is_active(), "Klipper runs after the flash-all");

    // C: the settings on the real terminal; a bad value is refused, a good one saved.
    pane.key("x");
    pane.wait_for("F flash", 10);
    pane.key("C");
    let screen = pane.wait_for("Setting to change", 10);
    assert!(screen.contains("build_secs"), "the settings are shown:\n{screen}");
    pane.line("timeouts.build_secs");
    pane.wait_for("New value for timeouts.build_secs", 10);
    pane.line("soon");
    pane.wait_for("cannot set timeouts.build_secs = soon", 10);
    // dialoguer keeps the refused text in the field: clear it first.
    pane.key("C-u");
    pane.line("1234");
    pane.wait_for("build_secs = 1234", 10);
    pane.key("Enter");
    let screen = pane.wait_for("Back in the dashboard.", 10);
    assert!(screen.contains("F flash"), "{screen}");
    let settings = std::fs::read_to_string(rig.cfg.join("settings.toml")).unwrap();
    assert!(settings.contains("build_secs = 1234"), "{settings}");
    pane.key("q");
    let after = pane.wait_for("dashboard-exit=", 10);
    assert!(after.contains("dashboard-exit=0"), "{after}");
}

/// Without a daemon the dashboard reads, with the daemon's own function, what a registered
/// board that printer.cfg does not name runs (Klippy cannot say: only the board's identify
/// can), so it shows OUTDATED rather than unknown. A daemon started after the dashboard is
/// noticed when its socket is created (no key pressed, no retry timer), and when it stops
/// the dashboard goes back to its own streams: a board plugged then is read by it again.
#[test]
#[ignore = "runs inside the USB rig"]
fn follows_a_daemon_started_later_and_reads_versions_itself_without_one() {
    let _clean = begin(&PRINTER_CFG);
    let rig = FlashRig::new(OCTOPUS, OCTOPUS.1, &[]);
    std::fs::create_dir_all(&rig.state).unwrap();
    let socket = rig.state.join("daemon.sock");
    let pane = Pane::start();
    pane.line(&format!(
        "KFLASH_SOCKET={} KFLASH_STATE_DIR={} KFLASH_CACHE_DIR={} {} --config-dir {} dashboard; echo \"dashboard\"-exit=$?",
        socket.display(),
        rig.state.display(),
        rig.cache.display(),
        kflash_bin(),
        rig.cfg.display()
    ));
    let outdated_row =
        |screen: &str| screen.lines().find(|l| l.contains("● octopus")).is_some_and(|l| l.contains("OUTDATED"));
    let screen = pane.wait_for("OUTDATED", 60);
    assert!(screen.contains("Daemon not running"), "{screen}");
    assert!(outdated_row(&screen), "the octopus's own identify, read by the dashboard:\n{screen}");
    print_screen("no daemon: the dashboard's own identify", &screen);

    let mut daemon = Background::spawn(rig.command(&["daemon", "--socket", socket.to_str().unwrap()]));
    daemon.wait_for_line("kflash daemon ready", 60);
    let screen = pane.wait_for(&format!("Daemon running ({})", socket.display()), 30);
    print_screen("a daemon started after the dashboard", &screen);
    daemon.signal("TERM");
    let (status, _) = daemon.finish(60);
    assert!(status.success(), "the daemon ends cleanly on SIGTERM: {status}");
    pane.wait_for("Daemon not running", 30);

    // Back on its own: a board that comes back is read by the dashboard again.
    boardctl(&["unplug", OCTOPUS.0]);
    pane.wait_for("○ octopus", 30);
    boardctl(&["plug", OCTOPUS.0]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let screen = loop {
        let screen = pane.wait_for("● octopus", 30);
        if outdated_row(&screen) {
            break screen;
        }
        assert!(Instant::now() < deadline, "the replugged octopus was not read again:\n{screen}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(screen.contains("Daemon not running"), "{screen}");

    // A second daemon is noticed too (its socket is created again).
    let mut daemon = Background::spawn(rig.command(&["daemon", "--socket", socket.to_str().unwrap()]));
    daemon.wait_for_line("kflash daemon ready", 60);
    pane.wait_for("Daemon running", 30);
    pane.key("q");
    let after = pane.wait_for("dashboard-exit=", 10);
    assert!(after.contains("dashboard-exit=0"), "{after}");
    daemon.signal("TERM");
    let _ = daemon.finish(60);
}
