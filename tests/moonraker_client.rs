//! The Moonraker client against the rig's Moonraker stand-in (tests/rig/standins/moonraker.py,
//! a real HTTP server answering with Moonraker's shapes), one stand-in per test on a free
//! port, with a static board-status file and switch files for each fault.
//!
//! These run in real time: with tokio's paused clock, time would jump ahead while a
//! request waits on the stand-in's socket. The polling schedule itself is tested with
//! paused time in src/moonraker.rs.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

mod support;

use kflash::moonraker::{mcu_for_serial, Moonraker, MoonrakerError};
use kflash::safety::{clear_to_stop_klipper, GateOptions, PrintCheck, SafetyError};
use kflash::Error;
use support::Answers;
use tokio::time::Instant;

const OCTOPUS_SERIAL: &str = "29001A001151313531383332";
const SPIDER_SERIAL: &str = "3A0029000B51333031373633";

fn by_id(serial: &str) -> String {
    format!("/dev/serial/by-id/usb-Klipper_stm32h723xx_{serial}-if00")
}

/// Two boards with the same chip: `[mcu]` is the Octopus, `[mcu toolhead]` the Spider.
fn boards(spider_mode: &str) -> serde_json::Value {
    serde_json::json!({"boards": [
        {"name": "octopus", "mcu": "stm32h723xx", "serial": OCTOPUS_SERIAL, "mode": "klipper",
         "plugged": true, "version": "v0.13.0-730-g84104bbbd", "app": "Klipper"},
        {"name": "spider", "mcu": "stm32h723xx", "serial": SPIDER_SERIAL, "mode": spider_mode,
         "plugged": true, "version": "v0.12.0-114-g1234567-dirty-20260807_101500-voron", "app": "Klipper"},
    ]})
}

struct Options {
    klipper: &'static str,
    app: &'static str,
    spider_mode: &'static str,
}

const DEFAULT: Options = Options { klipper: "active", app: "Klipper", spider_mode: "klipper" };

/// A running Moonraker stand-in and its state directory; SIGTERMed on drop.
struct StandIn {
    dir: tempfile::TempDir,
    child: Child,
    url: String,
}

fn standins() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/rig/standins")
}

impl StandIn {
    fn start(opts: Options) -> StandIn {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("rig");
        let boards_file = dir.path().join("boards.json");
        std::fs::write(&boards_file, boards(opts.spider_mode).to_string()).unwrap();
        let map_file = dir.path().join("mcus.json");
        std::fs::write(&map_file, r#"{"mcu": "octopus", "mcu toolhead": "spider"}"#).unwrap();
        let out = Command::new(standins().join("bin/systemctl"))
            .args(["rig-register", "klipper", opts.klipper])
            .env("KFLASH_RIG_STATE", &state)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

        let mut child = Command::new(standins().join("moonraker.py"))
            .args(["--port", "0", "--startup-secs", "0", "--connect-timeout", "0.5", "--app", opts.app])
            .arg("--boards-json")
            .arg(&boards_file)
            .arg("--mcu-map")
            .arg(&map_file)
            .arg("--klipper-path")
            .arg(dir.path().join("klipper"))
            .arg("--log")
            .arg(dir.path().join("moonraker.log"))
            .env("KFLASH_RIG_STATE", &state)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port = line.trim().strip_prefix("READY ").unwrap_or_else(|| panic!("stand-in said {line:?}"));
        StandIn { url: format!("http://127.0.0.1:{port}"), dir, child }
    }

    fn client(&self) -> Moonraker {
        Moonraker::new(&self.url, None, Duration::from_secs(10))
    }

    fn client_with_key(&self, key: &str) -> Moonraker {
        Moonraker::new(&self.url, Some(key.into()), Duration::from_secs(10))
    }

    /// Turn a stand-in switch on (see tests/rig/standins/README.md).
    fn switch(&self, name: &str, contents: &str) {
        let dir = self.dir.path().join("rig/moonraker");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), contents).unwrap();
    }

    fn switch_off(&self, name: &str) {
        std::fs::remove_file(self.dir.path().join("rig/moonraker").join(name)).unwrap();
    }

    fn systemctl(&self, args: &[&str]) {
        let out = Command::new(standins().join("bin/systemctl"))
            .args(args)
            .env("KFLASH_RIG_STATE", self.dir.path().join("rig"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn standby_printer_is_not_busy() {
    let m = StandIn::start(DEFAULT);
    let status = m.client().print_status().await.unwrap();
    assert_eq!((status.state.as_str(), status.filename.as_deref(), status.progress), ("standby", None, 0.0));
    assert!(!status.is_busy());
    assert_eq!(status.describe(), "standby");
}

#[tokio::test]
async fn printing_and_paused_are_busy_with_file_and_progress() {
    let m = StandIn::start(DEFAULT);
    m.switch("printing", "benchy.gcode\n0.42\n");
    let status = m.client().print_status().await.unwrap();
    assert!(status.is_busy());
    assert_eq!(status.describe(), "printing benchy.gcode (42%)");

    m.switch("paused", "calibration cube.gcode\n0.07\n");
    let status = m.client().print_status().await.unwrap();
    assert!(status.is_busy());
    assert_eq!(status.describe(), "paused calibration cube.gcode (7%)");

    m.switch_off("paused");
    m.switch_off("printing");
    m.switch("print-state", "complete\nbenchy.gcode\n1.0\n");
    let status = m.client().print_status().await.unwrap();
    assert!(!status.is_busy(), "complete is not busy");
    assert_eq!(status.filename.as_deref(), Some("benchy.gcode"));
}

#[tokio::test]
async fn api_key_refused_without_it_and_accepted_with_it() {
    let m = StandIn::start(DEFAULT);
    m.switch("api-key", "0123456789abcdef\n");

    let err = m.client().server_info().await.unwrap_err();
    assert!(matches!(err, MoonrakerError::Unauthorized { status: 401, key_sent: false, .. }), "{err:?}");
    assert_eq!(err.to_string(), "Moonraker refused the request (401 Unauthorized)");
    assert!(err.help().unwrap().contains("kflash settings set moonraker_api_key KEY"), "{:?}", err.help());

    let err = m.client_with_key("wrong").print_status().await.unwrap_err();
    assert_eq!(err.to_string(), "Moonraker refused the request with the configured API key (401 Unauthorized)");
    assert!(err.help().unwrap().starts_with("moonraker_api_key is wrong"), "{:?}", err.help());

    let info = m.client_with_key("0123456789abcdef").server_info().await.unwrap();
    assert!(info.klippy_connected);
}

#[tokio::test]
async fn klippy_disconnected_is_503_with_moonrakers_message() {
    let m = StandIn::start(DEFAULT);
    m.client().printer_info().await.expect("Klippy has connected once");
    m.switch("klippy-disconnected", "");
    let c = m.client();
    let info = c.server_info().await.unwrap();
    assert_eq!((info.klippy_connected, info.klippy_state.as_str()), (false, "disconnected"));
    for err in [c.printer_info().await.unwrap_err(), c.print_status().await.unwrap_err()] {
        assert!(matches!(err, MoonrakerError::KlippyNotConnected { .. }), "{err:?}");
        assert_eq!(err.to_string(), "Klippy is not connected to Moonraker: Klippy Host not connected");
        assert!(err.help().unwrap().contains("systemctl status klipper"));
    }
}

#[tokio::test]
async fn before_klippy_ever_connected_printer_endpoints_are_not_there() {
    let m = StandIn::start(Options { klipper: "inactive", ..DEFAULT });
    let err = m.client().printer_info().await.unwrap_err();
    assert!(matches!(err, MoonrakerError::KlippyNotConnected { .. }), "{err:?}");
    assert!(
        err.to_string().contains("Klippy has not connected since Moonraker started (/printer/info is 404 Not Found)"),
        "{err}"
    );
}

#[tokio::test]
async fn malformed_answers_are_named_by_endpoint() {
    let m = StandIn::start(DEFAULT);
    let c = m.client();

    m.switch("malformed", "truncated");
    let err = c.printer_info().await.unwrap_err();
    assert!(matches!(err, MoonrakerError::InvalidJson { .. }), "{err:?}");
    assert!(err.to_string().starts_with("Moonraker answered with invalid JSON from /printer/info: "), "{err}");
    assert!(err.help().unwrap().contains("curl"));

    m.switch("malformed", "empty");
    let err = c.server_info().await.unwrap_err();
    assert_eq!(err.to_string(), "Moonraker answered with invalid JSON from /server/info: the body is empty");

    m.switch("malformed", "no-result");
    let err = c.server_info().await.unwrap_err();
    assert_eq!(err.to_string(), "Moonraker's answer from /server/info is missing \"result\"");

    m.switch("malformed", "html");
    let err = c.print_status().await.unwrap_err();
    assert!(matches!(err, MoonrakerError::NotMoonraker { status: 502, .. }), "{err:?}");
    assert!(
        err.to_string().starts_with(&format!(
            "{} answered /printer/objects/query with HTTP 502 and a text/html body (<html><head><title>502",
            m.url
        )),
        "{err}"
    );
}

#[tokio::test]
async fn closed_port_is_unreachable() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let err = Moonraker::new(&url, None, Duration::from_secs(5)).print_status().await.unwrap_err();
    assert!(matches!(err, MoonrakerError::Unreachable { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.starts_with(&format!("Moonraker is not reachable at {url}: ")), "{text}");
    assert!(text.to_lowercase().contains("connection refused"), "{text}");
    assert!(err.help().unwrap().contains("moonraker_url"));
}

#[tokio::test]
async fn dropped_connection_is_unreachable() {
    let m = StandIn::start(DEFAULT);
    m.switch("unreachable", "");
    let err = m.client().server_info().await.unwrap_err();
    assert!(matches!(err, MoonrakerError::Unreachable { .. }), "{err:?}");
}

#[tokio::test]
async fn slow_moonraker_times_out() {
    let m = StandIn::start(DEFAULT);
    m.switch("delay", "3");
    let c = Moonraker::new(&m.url, None, Duration::from_millis(400));
    let started = std::time::Instant::now();
    let err = c.server_info().await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    assert!(matches!(err, MoonrakerError::Timeout { .. }), "{err:?}");
    assert_eq!(err.to_string(), format!("Moonraker at {} did not answer /server/info within 0.4 s", m.url));
}

#[tokio::test]
async fn two_boards_with_the_same_chip_map_by_serial() {
    let m = StandIn::start(DEFAULT);
    let mcus = m.client().mcus().await.unwrap();
    let summary: Vec<_> =
        mcus.iter().map(|m| (m.object.as_str(), m.name.as_str(), m.mcu.as_deref(), m.mcu_version.as_deref())).collect();
    assert_eq!(
        summary,
        [
            ("mcu", "mcu", Some("stm32h723xx"), Some("v0.13.0-730-g84104bbbd")),
            ("mcu toolhead", "toolhead", Some("stm32h723xx"), Some("v0.12.0-114-g1234567-dirty-20260807_101500-voron")),
        ]
    );
    assert_eq!(mcus[0].serial.as_deref(), Some(by_id(OCTOPUS_SERIAL).as_str()));
    assert_eq!(mcus[1].serial.as_deref(), Some(by_id(SPIDER_SERIAL).as_str()));

    let name = |device: &str| mcu_for_serial(&mcus, device).map(|m| m.name.clone());
    assert_eq!(name(&by_id(SPIDER_SERIAL)).as_deref(), Some("toolhead"));
    assert_eq!(name(&by_id(OCTOPUS_SERIAL)).as_deref(), Some("mcu"));
    assert_eq!(name(SPIDER_SERIAL).as_deref(), Some("toolhead"));
    assert_eq!(name(OCTOPUS_SERIAL).as_deref(), Some("mcu"));
    assert_eq!(name("stm32h723xx"), None, "never by chip type");
}

#[tokio::test]
async fn printer_info_reports_the_app() {
    let klipper = StandIn::start(DEFAULT);
    let info = klipper.client().printer_info().await.unwrap();
    assert_eq!((info.state.as_str(), info.app), ("ready", None));
    assert!(info.software_version.is_some());

    let kalico = StandIn::start(Options { app: "Kalico", ..DEFAULT });
    assert_eq!(kalico.client().printer_info().await.unwrap().app.as_deref(), Some("Kalico"));
    let mcus = kalico.client().mcus().await.unwrap();
    assert_eq!(mcus[0].app.as_deref(), Some("Klipper"), "Kalico reports each MCU's app");
}

#[tokio::test]
async fn wait_klippy_ready_after_a_restart() {
    let m = StandIn::start(DEFAULT);
    m.switch("startup-secs", "1.0");
    // Timed from before the restart: the stand-in's 1 s of startup begins inside the call,
    // and under load the call itself can take most of it.
    let started = Instant::now();
    m.systemctl(&["restart", "klipper"]);
    let info = m.client().wait_klippy_ready(started + Duration::from_secs(20)).await.unwrap();
    assert_eq!(info.klippy_state, "ready");
    assert!(started.elapsed() >= Duration::from_millis(500), "it was in startup first: {:?}", started.elapsed());
}

#[tokio::test]
async fn wait_klippy_ready_gives_the_last_state_at_the_deadline() {
    // The Spider is in Katapult, so Klippy cannot connect to [mcu toolhead].
    let m = StandIn::start(Options { spider_mode: "katapult", ..DEFAULT });
    let started = Instant::now();
    let err = m.client().wait_klippy_ready(started + Duration::from_millis(1500)).await.unwrap_err();
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(1000) && waited <= Duration::from_millis(1700), "{waited:?}");
    assert!(matches!(&err, MoonrakerError::KlippyNotReady { state, .. } if state == "error"), "{err:?}");
    // The Spider's by-id link does not exist on this host: kflash says so.
    assert_eq!(
        err.to_string(),
        format!(
            "Klippy is in state error: mcu 'toolhead': Unable to connect; Klippy has not connected to \
             [mcu toolhead]: its serial {} does not exist, so the board is unplugged or not running Klipper",
            by_id(SPIDER_SERIAL)
        )
    );
    assert!(err.help().unwrap().contains("FIRMWARE_RESTART"));
    assert!(err.help().unwrap().contains("USB cable"), "{:?}", err.help());

    m.switch("klippy-disconnected", "");
    let err = m.client().wait_klippy_ready(Instant::now() + Duration::from_millis(600)).await.unwrap_err();
    assert_eq!(err.to_string(), "Klippy is in state disconnected");
    assert!(err.help().unwrap().contains("systemctl status klipper"));
}

// ---- the print-safety gate on the stand-in's print states ------------------------------

async fn gate(m: &StandIn, rep: &mut Answers) -> kflash::Result<PrintCheck> {
    clear_to_stop_klipper(&m.client(), GateOptions::default(), None, rep).await.map(|c| c.check())
}

#[tokio::test]
async fn gate_refuses_a_print_even_with_yes_and_skip() {
    let m = StandIn::start(DEFAULT);
    assert_eq!(gate(&m, &mut Answers::no()).await.unwrap(), PrintCheck::Idle);
    for (switch, said) in [("printing", "printing benchy.gcode (42%)"), ("paused", "paused benchy.gcode (42%)")] {
        m.switch(switch, "");
        let mut rep = Answers::yes();
        let err = gate(&m, &mut rep).await.unwrap_err();
        assert!(matches!(&err, Error::PrinterBusy(s) if s == said), "{err:?}");
        assert_eq!(err.exit_code(), 10);
        assert!(rep.questions.is_empty());
        let skip = GateOptions { skip_print_check: true };
        let err = clear_to_stop_klipper(&m.client(), skip, None, &mut rep).await.unwrap_err();
        assert!(matches!(err, Error::PrinterBusy(_)), "--skip-print-check never passes a known print: {err:?}");
        m.switch_off(switch);
    }
}

/// Item 4: after an emergency stop Klippy is shut down and print_stats stays paused: say
/// so, show the stale state and ask.
#[tokio::test]
async fn gate_after_an_emergency_stop_shows_the_stale_print_and_asks() {
    let m = StandIn::start(DEFAULT);
    m.switch("paused", "benchy.gcode\n0.42\n");
    m.switch("klippy-shutdown", "");
    let mut no = Answers::no();
    let err = gate(&m, &mut no).await.unwrap_err();
    assert!(matches!(err, Error::Safety(SafetyError::HaltedNotConfirmed { .. })), "{err:?}");
    assert_eq!(err.exit_code(), 10);
    assert_eq!(no.questions, ["Flash anyway?"]);
    let said = no.text();
    assert!(
        said.contains("Klippy is shutdown (Shutdown due to M112 command), so nothing moves; print_stats still says paused benchy.gcode (42%)"),
        "{said}"
    );
    let help = err.help().unwrap();
    assert!(help.contains("--yes") && !help.contains("wait for the print"), "{help}");

    let mut yes = Answers::yes();
    assert_eq!(gate(&m, &mut yes).await.unwrap(), PrintCheck::KlippyHalted);
    assert_eq!(yes.questions.len(), 1);
}

#[tokio::test]
async fn gate_klippy_disconnected_goes_on_with_a_note() {
    let m = StandIn::start(DEFAULT);
    m.switch("printing", "");
    m.switch("klippy-disconnected", "");
    let mut rep = Answers::no();
    assert_eq!(gate(&m, &mut rep).await.unwrap(), PrintCheck::KlippyDisconnected);
    assert!(rep.questions.is_empty());
}

/// Item 2: refusals (401 from Moonraker, 403 from a proxy) and a hang refuse with exit 9;
/// --yes is never asked.
#[tokio::test]
async fn gate_refuses_what_it_cannot_answer() {
    let m = StandIn::start(DEFAULT);
    m.switch("paused", "");
    for (switch, contents, help) in [
        ("api-key", "s3cret", "moonraker_api_key"),
        ("forbidden", "", "moonraker_api_key"),
        ("malformed", "html", "moonraker_url"),
    ] {
        m.switch(switch, contents);
        let mut rep = Answers::yes();
        let err = gate(&m, &mut rep).await.unwrap_err();
        assert!(matches!(err, Error::Safety(SafetyError::Unanswered { .. })), "{switch}: {err:?}");
        assert_eq!(err.exit_code(), 9);
        assert!(err.help().unwrap().contains(help), "{switch}: {:?}", err.help());
        assert!(rep.questions.is_empty());
        m.switch_off(switch);
    }
    let err = m.client().server_info().await;
    assert!(err.is_ok());

    m.switch("forbidden", "");
    let err = m.client().server_info().await.unwrap_err();
    assert!(matches!(err, MoonrakerError::Unauthorized { status: 403, .. }), "{err:?}");
    m.switch_off("forbidden");

    m.switch("delay", "30");
    let c = Moonraker::new(&m.url, None, Duration::from_millis(500));
    let err = clear_to_stop_klipper(&c, GateOptions::default(), None, &mut Answers::yes()).await.unwrap_err();
    assert!(
        matches!(&err, Error::Safety(SafetyError::Unanswered { cause: MoonrakerError::Timeout { .. } })),
        "{err:?}"
    );
}

// ---- the stale connection (stand-in switch `stale-klippy`) -------------------------------

/// Seen with the real Moonraker after Klippy restarted on an exception: `/server/info` said
/// `error` while Klippy was ready, and every `/printer/*` request hung. The gate must not
/// take `error` at its word ("nothing moves"): it refuses at the request's deadline.
#[tokio::test]
async fn gate_refuses_a_stale_connection_at_the_deadline() {
    let m = StandIn::start(DEFAULT);
    m.switch("printing", "");
    for state in ["error", "ready"] {
        m.switch("stale-klippy", state);
        let c = Moonraker::new(&m.url, None, Duration::from_millis(800));
        let info = c.server_info().await.unwrap();
        assert_eq!((info.klippy_connected, info.klippy_state.as_str()), (true, state));
        let started = std::time::Instant::now();
        let mut rep = Answers::yes();
        let err = clear_to_stop_klipper(&c, GateOptions::default(), None, &mut rep).await.unwrap_err();
        let took = started.elapsed();
        assert!(took < Duration::from_secs(3), "{state}: refused at the request deadline, not later: {took:?}");
        assert!(
            matches!(&err, Error::Safety(SafetyError::Unanswered { cause: MoonrakerError::KlippyUnresponsive { .. } })),
            "{state}: {err:?}"
        );
        assert_eq!(err.exit_code(), 9);
        assert_eq!(
            err.to_string(),
            format!(
                "Moonraker says Klippy is {state}, but /printer/objects/query (answered by Klippy through Moonraker) \
                 did not answer within 0.8 s: Moonraker's connection to Klippy is stale, or Klippy hangs; so kflash \
                 cannot tell whether the printer is printing, and did not stop Klipper"
            )
        );
        let help = err.help().unwrap();
        assert!(help.contains("restart Moonraker") && help.contains("--skip-print-check"), "{help}");
        assert!(rep.questions.is_empty(), "--yes does not pass it: {:?}", rep.questions);
        assert!(!rep.text().contains("nothing moves"), "a stale `error` is not a halt: {}", rep.text());
    }
}

/// After a flash, a stale connection is not "Klippy is in state error … FIRMWARE_RESTART":
/// the wait ends at its deadline and says the connection is stale.
#[tokio::test]
async fn wait_klippy_ready_on_a_stale_connection_says_so_at_the_deadline() {
    let m = StandIn::start(DEFAULT);
    m.switch("stale-klippy", "");
    let c = Moonraker::new(&m.url, None, Duration::from_millis(700));
    let started = Instant::now();
    let err = c.wait_klippy_ready(started + Duration::from_secs(3)).await.unwrap_err();
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(2000) && waited <= Duration::from_millis(3300), "{waited:?}");
    assert!(matches!(&err, MoonrakerError::KlippyUnresponsive { state, .. } if state == "error"), "{err:?}");
    assert!(err.to_string().contains("/printer/info"), "{err}");
    assert!(!err.help().unwrap().contains("FIRMWARE_RESTART"), "{:?}", err.help());
}
