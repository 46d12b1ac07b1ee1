//! The Klipper guard with real processes: the rig's systemctl stand-in (run through its
//! sudo stand-in) records every stop and start, and a child process (this test binary
//! re-run as `guard_child`) holds the guard while it is killed with each signal.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kflash::app::flash::Reporter;
use kflash::moonraker::Moonraker;
use kflash::safety::{clear_to_stop_klipper, Clearance, GateOptions, PrintCheck};
use kflash::service::{
    recover_stale_stop, FlashLock, KlipperGuard, ServiceError, ServiceManager, ShutdownSignals, STOP_MARKER_FILE,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const REASON: &str = "flash of octopus";

/// Says yes to the gate's question.
struct Yes;

impl Reporter for Yes {
    fn event(&mut self, _: &kflash::event::Event) {}
    fn confirm(&mut self, _: &str) -> futures::future::LocalBoxFuture<'static, bool> {
        Box::pin(async { true })
    }
}

/// The guard needs the print-safety gate's clearance: ask the real gate, with nothing
/// listening at the Moonraker URL (a printer host without Moonraker) and a yes.
async fn cleared() -> Clearance {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mr = Moonraker::new(&format!("http://127.0.0.1:{port}"), None, Duration::from_secs(5));
    let clearance = clear_to_stop_klipper(&mr, GateOptions::default(), None, &mut Yes).await.unwrap();
    assert_eq!(clearance.check(), PrintCheck::MoonrakerDown);
    clearance
}

/// A rig state directory with a `klipper` unit, and a kflash state directory.
struct Rig {
    _dir: tempfile::TempDir,
    rig_state: PathBuf,
    state: PathBuf,
}

fn standin(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/rig/standins/bin").join(name)
}

impl Rig {
    fn new(klipper: &str) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let rig = Rig { rig_state: dir.path().join("rig"), state: dir.path().join("kflash"), _dir: dir };
        let out = Command::new(standin("systemctl"))
            .args(["rig-register", "klipper", klipper])
            .env("KFLASH_RIG_STATE", &rig.rig_state)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        rig
    }

    /// `env KFLASH_RIG_STATE=… sudo -n systemctl`, the shape of the real `service_command`.
    fn command(&self) -> Vec<String> {
        vec![
            "env".into(),
            format!("KFLASH_RIG_STATE={}", self.rig_state.display()),
            standin("sudo").display().to_string(),
            "-n".into(),
            standin("systemctl").display().to_string(),
        ]
    }

    fn manager(&self) -> ServiceManager {
        ServiceManager::new(self.command(), "klipper", Duration::from_secs(20))
    }

    /// `(time, verb)` of every logged stop/start of klipper.
    fn log(&self) -> Vec<(f64, String)> {
        let text = std::fs::read_to_string(self.rig_state.join("systemctl.log")).unwrap_or_default();
        text.lines()
            .map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                assert_eq!(w[2], "klipper", "{l}");
                (w[0].parse().unwrap(), w[1].to_string())
            })
            .collect()
    }

    fn verbs(&self) -> Vec<String> {
        self.log().into_iter().map(|(_, v)| v).collect()
    }

    fn klipper_active(&self) -> bool {
        std::fs::read_to_string(self.rig_state.join("services/klipper")).unwrap().trim() == "active"
    }

    fn marker(&self) -> PathBuf {
        self.state.join(STOP_MARKER_FILE)
    }

    fn fault(&self, name: &str) {
        std::fs::create_dir_all(self.rig_state.join("faults")).unwrap();
        std::fs::write(self.rig_state.join("faults").join(name), "").unwrap();
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

#[tokio::test]
async fn stop_and_restart_records_both_and_reports_downtime() {
    let rig = Rig::new("active");
    let guard = KlipperGuard::stop(rig.manager(), &rig.state, REASON, cleared().await).await.unwrap();
    assert!(guard.was_active() && guard.note().is_none());
    assert!(!rig.klipper_active());
    let marker: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(rig.marker()).unwrap()).unwrap();
    assert_eq!(marker["pid"], std::process::id());
    assert_eq!(marker["reason"], REASON);
    assert_eq!(marker["service"], "klipper");
    assert_eq!(marker["command"][4], standin("systemctl").display().to_string());

    let report = guard.restart().await.unwrap();
    assert!(report.started);
    assert!(rig.klipper_active());
    assert!(!rig.marker().exists(), "marker removed after a successful start");
    let log = rig.log();
    assert_eq!(rig.verbs(), ["stop", "start"]);
    let logged_downtime = log[1].0 - log[0].0;
    assert!(
        report.downtime.as_secs_f64() + 0.05 >= logged_downtime,
        "downtime {:?} covers stop → start ({logged_downtime} s)",
        report.downtime
    );
    assert!(report.summary("klipper").starts_with("started klipper again after"));
}

async fn flash_that_fails(rig: &Rig) -> Result<(), ServiceError> {
    let _guard = KlipperGuard::stop(rig.manager(), &rig.state, REASON, cleared().await).await?;
    assert!(!rig.klipper_active());
    Err(ServiceError::Timeout { command: "flashtool".into(), secs: 1.0 })?;
    unreachable!()
}

#[tokio::test]
async fn early_return_with_question_mark_restarts() {
    let rig = Rig::new("active");
    assert!(flash_that_fails(&rig).await.is_err());
    assert!(rig.klipper_active());
    assert_eq!(rig.verbs(), ["stop", "start"]);
    assert!(!rig.marker().exists());
}

#[test]
fn panic_while_holding_the_guard_restarts() {
    let rig = Rig::new("active");
    let (manager, state) = (rig.manager(), rig.state.clone());
    let result = std::thread::spawn(move || {
        rt().block_on(async {
            let _guard = KlipperGuard::stop(manager, &state, REASON, cleared().await).await.unwrap();
            panic!("flash blew up");
        })
    })
    .join();
    assert!(result.is_err(), "the thread panicked");
    assert!(rig.klipper_active());
    assert_eq!(rig.verbs(), ["stop", "start"]);
    assert!(!rig.marker().exists());
}

#[tokio::test]
async fn dropped_future_restarts() {
    let rig = Rig::new("active");
    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel();
    let flash = async {
        let _guard = KlipperGuard::stop(rig.manager(), &rig.state, REASON, cleared().await).await.unwrap();
        stopped_tx.send(()).unwrap();
        std::future::pending::<()>().await;
    };
    // Stands in for Ctrl-C: the other branch wins once Klipper is stopped.
    tokio::select! {
        _ = flash => unreachable!(),
        _ = stopped_rx => {}
    }
    assert!(rig.klipper_active());
    assert_eq!(rig.verbs(), ["stop", "start"]);
    assert!(!rig.marker().exists());
}

#[tokio::test]
async fn inactive_service_is_not_started_afterwards() {
    let rig = Rig::new("inactive");
    let guard = KlipperGuard::stop(rig.manager(), &rig.state, REASON, cleared().await).await.unwrap();
    assert!(!guard.was_active());
    assert!(guard.note().unwrap().contains("will be left stopped"), "{:?}", guard.note());
    assert!(!rig.marker().exists(), "no marker: nothing for a later run to start");
    let report = guard.restart().await.unwrap();
    assert!(!report.started);
    assert!(report.summary("klipper").contains("not running before kflash"));
    assert!(!rig.klipper_active());
    assert!(rig.verbs().is_empty(), "{:?}", rig.verbs());

    // Dropped instead of restarted: still not started.
    drop(KlipperGuard::stop(rig.manager(), &rig.state, REASON, cleared().await).await.unwrap());
    assert!(!rig.klipper_active());
}

#[tokio::test]
async fn stop_failure_is_an_error_and_leaves_no_marker() {
    let rig = Rig::new("active");
    rig.fault("systemctl-stop-fails");
    let err = KlipperGuard::stop(rig.manager(), &rig.state, REASON, cleared().await).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("systemctl stop klipper` failed (exit status 1)"), "{text}");
    assert!(text.contains("Job for klipper.service failed"), "stderr is carried: {text}");
    assert!(err.help().unwrap().contains("systemctl status"), "{:?}", err.help());
    assert!(!rig.marker().exists());
    assert!(rig.klipper_active());
    assert_eq!(rig.verbs(), ["stop-failed"], "still active, so not started again");
}

#[tokio::test]
async fn start_failure_keeps_the_marker_and_says_how_to_start() {
    let rig = Rig::new("active");
    let guard = KlipperGuard::stop(rig.manager(), &rig.state, REASON, cleared().await).await.unwrap();
    rig.fault("systemctl-start-fails");
    let err = guard.restart().await.unwrap_err();
    assert!(matches!(err, ServiceError::NotRestarted { .. }), "{err:?}");
    assert!(err.to_string().starts_with("Klipper (klipper) could not be started again: "), "{err}");
    let help = err.help().unwrap();
    assert!(help.contains("systemctl start klipper") && help.contains("next kflash run"), "{help}");
    assert!(rig.marker().exists(), "kept so the next run retries");
    assert_eq!(rig.verbs(), ["stop", "start-failed"], "drop does not retry");
    // This process wrote the marker and is alive: recovery is not ours to do.
    assert!(recover_stale_stop(&rig.manager(), &rig.state).await.is_none());
}

#[tokio::test]
async fn missing_program_is_a_spawn_error() {
    let rig = Rig::new("active");
    let manager = ServiceManager::new(vec!["/nonexistent/systemctl".into()], "klipper", Duration::from_secs(5));
    let err = KlipperGuard::stop(manager, &rig.state, REASON, cleared().await).await.unwrap_err();
    assert!(err.to_string().starts_with("could not run `/nonexistent/systemctl is-active klipper`"), "{err}");
    assert!(err.help().unwrap().contains("service_command"));
    assert!(!rig.marker().exists());
}

#[tokio::test]
async fn slow_command_times_out() {
    let rig = Rig::new("active");
    std::fs::create_dir_all(rig.rig_state.join("faults")).unwrap();
    std::fs::write(rig.rig_state.join("faults/systemctl-stop-delay"), "5").unwrap();
    let manager = ServiceManager { timeout: Duration::from_millis(1500), ..rig.manager() };
    let err = KlipperGuard::stop(manager, &rig.state, REASON, cleared().await).await.unwrap_err();
    assert!(matches!(err, ServiceError::Timeout { .. }), "{err:?}");
    assert!(err.to_string().ends_with("systemctl stop klipper` did not finish within 1.5 s"), "{err}");
}

#[tokio::test]
async fn a_stop_left_by_a_dead_kflash_is_started_even_though_klipper_is_inactive() {
    let rig = Rig::new("inactive");
    write_dead_marker(&rig);
    let guard = KlipperGuard::stop(rig.manager(), &rig.state, REASON, cleared().await).await.unwrap();
    assert!(guard.was_active(), "inactive only because of the dead kflash");
    guard.restart().await.unwrap();
    assert!(rig.klipper_active());
    assert!(!rig.marker().exists());
}

fn write_dead_marker(rig: &Rig) -> u32 {
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    std::fs::create_dir_all(&rig.state).unwrap();
    let marker = serde_json::json!({
        "pid": pid, "time": "2024-05-01T12:03:04+00:00", "service": "klipper",
        "command": rig.command(), "reason": "flash of nitehawk",
    });
    std::fs::write(rig.marker(), marker.to_string()).unwrap();
    pid
}

#[tokio::test]
async fn recover_starts_klipper_after_a_dead_kflash_and_says_why() {
    let rig = Rig::new("inactive");
    assert!(recover_stale_stop(&rig.manager(), &rig.state).await.is_none(), "no marker, nothing to do");
    let pid = write_dead_marker(&rig);
    let msg = recover_stale_stop(&rig.manager(), &rig.state).await.unwrap().unwrap();
    assert!(
        msg.starts_with(&format!("klipper was left stopped by kflash (pid {pid}, stopped at 2024-05-01 ")),
        "{msg}"
    );
    assert!(msg.ends_with("for flash of nitehawk, which never finished); started it again"), "{msg}");
    assert!(rig.klipper_active());
    assert!(!rig.marker().exists());
    assert!(recover_stale_stop(&rig.manager(), &rig.state).await.is_none());
}

// ---- a separate kflash process holding the guard -----------------------------------

/// Not a test on its own: run by [`spawn_guard_child`] as a separate process that takes
/// the flash lock, stops Klipper and waits, the way the orchestrator does, until a signal.
#[test]
fn guard_child() {
    let Ok(state) = std::env::var("KFLASH_TEST_GUARD_STATE") else { return };
    let command: Vec<String> = serde_json::from_str(&std::env::var("KFLASH_TEST_GUARD_COMMAND").unwrap()).unwrap();
    rt().block_on(async {
        // Signals first: no moment with Klipper stopped and the default (dying) handlers.
        let mut signals = ShutdownSignals::install().unwrap();
        let state = PathBuf::from(state);
        let flash = async {
            let _lock = FlashLock::acquire(&state, "flash of octopus").unwrap();
            let manager = ServiceManager::new(command, "klipper", Duration::from_secs(20));
            let _guard = KlipperGuard::stop(manager, &state, REASON, cleared().await).await.unwrap();
            println!("GUARD-READY");
            // Bounded, so a test that never sends its signal fails instead of hanging.
            tokio::time::sleep(Duration::from_secs(60)).await;
            panic!("no signal within 60 s");
        };
        tokio::select! {
            biased;
            sig = signals.recv() => println!("GOT {sig}"),
            _ = flash => {}
        }
    });
}

fn spawn_guard_child(rig: &Rig) -> (Child, std::io::Lines<std::io::BufReader<std::process::ChildStdout>>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["guard_child", "--exact", "--nocapture", "--test-threads=1"])
        .env("KFLASH_TEST_GUARD_STATE", &rig.state)
        .env("KFLASH_TEST_GUARD_COMMAND", serde_json::to_string(&rig.command()).unwrap())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        match lines.next() {
            // libtest prints "test guard_child ... " before it.
            Some(Ok(l)) if l.ends_with("GUARD-READY") => break,
            Some(_) => {}
            None => panic!("guard child exited before stopping Klipper: {:?}", child.wait()),
        }
    }
    (child, lines)
}

#[test]
fn each_shutdown_signal_restarts_klipper() {
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        let rig = Rig::new("active");
        let (mut child, mut lines) = spawn_guard_child(&rig);
        assert!(!rig.klipper_active());
        assert!(rig.marker().exists());
        kill(Pid::from_raw(child.id() as i32), sig).unwrap();
        let status = child.wait().unwrap();
        assert!(status.success(), "{sig}: {status:?}");
        let said: Vec<String> = lines.by_ref().map_while(Result::ok).collect();
        assert!(said.iter().any(|l| *l == format!("GOT {sig}")), "{sig}: {said:?}");
        assert!(rig.klipper_active(), "{sig}: Klipper started again");
        assert_eq!(rig.verbs(), ["stop", "start"], "{sig}");
        assert!(!rig.marker().exists(), "{sig}");
    }
}

#[test]
fn kill_9_leaves_the_marker_and_the_next_run_recovers() {
    let rig = Rig::new("active");
    let (mut child, _lines) = spawn_guard_child(&rig);
    let pid = child.id();
    let rt = rt();
    assert!(
        rt.block_on(recover_stale_stop(&rig.manager(), &rig.state)).is_none(),
        "the kflash holding Klipper stopped is alive: leave it alone"
    );
    let err = rt
        .block_on(async { KlipperGuard::stop(rig.manager(), &rig.state, "flash of ebb", cleared().await).await })
        .unwrap_err();
    assert!(matches!(err, ServiceError::StoppedByOther { pid: p, .. } if p == pid), "{err:?}");

    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    child.wait().unwrap();
    assert!(!rig.klipper_active(), "nobody could restart it");
    assert!(rig.marker().exists());

    let msg = rt.block_on(recover_stale_stop(&rig.manager(), &rig.state)).unwrap().unwrap();
    assert!(msg.starts_with(&format!("klipper was left stopped by kflash (pid {pid}, stopped at ")), "{msg}");
    assert!(msg.contains("for flash of octopus, which never finished"), "{msg}");
    assert!(rig.klipper_active());
    assert!(!rig.marker().exists());
    assert_eq!(rig.verbs(), ["stop", "start"]);
}

#[test]
fn second_flash_lock_is_refused_with_the_holders_pid() {
    let rig = Rig::new("active");
    let (mut child, _lines) = spawn_guard_child(&rig);
    let err = FlashLock::acquire(&rig.state, "flash of ebb").unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with(&format!("another kflash (pid {}) has been busy with flash of octopus since ", child.id())),
        "{text}"
    );
    assert_eq!(err.help().unwrap(), "wait for the other kflash to finish");

    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    child.wait().unwrap();
    let lock = FlashLock::acquire(&rig.state, "flash of ebb").expect("released when its holder exits");
    // Also exclusive within one process (a second open file description).
    assert!(matches!(FlashLock::acquire(&rig.state, "x"), Err(ServiceError::Locked { .. })));
    drop(lock);
    FlashLock::acquire(&rig.state, "flash of ebb").expect("released on drop");
}
