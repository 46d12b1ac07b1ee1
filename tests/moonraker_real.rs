//! The Moonraker client and the print-safety gate against the real Moonraker (PyPI
//! `moonraker==0.11.0`, installed by tests/setup-host), started on loopback per test.
//! Its Klippy socket is served by nobody (Klippy disconnected), or by
//! tests/support/fake_klippy.py, which speaks Klippy's API-server protocol in a fixed state
//! (printing, paused, shut down after an M112), since a real Klippy is not part of this step.

mod support;

use std::time::{Duration, Instant};

use kflash::moonraker::{Moonraker, MoonrakerError};
use kflash::safety::{clear_to_stop_klipper, GateOptions, PrintCheck, SafetyError};
use kflash::Error;
use support::real_moonraker::{Config, RealMoonraker};
use support::{closed_port_url, Answers, PlainWebServer};

const SKIP: GateOptions = GateOptions { skip_print_check: true };

fn client(url: &str, key: Option<&str>) -> Moonraker {
    Moonraker::new(url, key.map(String::from), Duration::from_secs(10))
}

fn trusted() -> RealMoonraker {
    RealMoonraker::start(Config { trusted: true, ..Config::default() })
}

/// The gate's refusal for a check it could not answer: exit 9 with a help line.
fn assert_unanswered(err: &Error, help_has: &str) {
    assert!(matches!(err, Error::Safety(SafetyError::Unanswered { .. })), "{err:?}");
    assert_eq!(err.exit_code(), 9, "{err}");
    let help = err.help().unwrap();
    assert!(help.contains(help_has), "{help}");
    assert!(help.contains("--skip-print-check"), "{help}");
}

#[tokio::test]
async fn klippy_disconnected_comes_from_moonrakers_own_answers() {
    let m = trusted();
    let c = client(&m.url, None);
    let info = c.server_info().await.unwrap();
    assert_eq!((info.klippy_connected, info.klippy_state.as_str()), (false, "disconnected"));
    // Klippy never connected, so Moonraker answers its endpoints with its own 404 body.
    let err = c.print_status().await.unwrap_err();
    assert!(matches!(err, MoonrakerError::KlippyNotConnected { .. }), "{err:?}");

    let mut rep = Answers::no();
    let clearance = clear_to_stop_klipper(&c, GateOptions::default(), None, &mut rep).await.unwrap();
    assert_eq!(clearance.check(), PrintCheck::KlippyDisconnected);
    assert!(rep.questions.is_empty(), "nothing to ask: {:?}", rep.questions);
    assert!(rep.text().contains("Moonraker says Klippy is not connected"), "{}", rep.text());
}

/// Item 1: a web server that is not Moonraker answers 404; that says nothing about a print.
#[tokio::test]
async fn a_bare_404_from_another_server_is_not_klippy_disconnected() {
    let web = PlainWebServer::start();
    let c = client(&web.url, None);
    let err = c.print_status().await.unwrap_err();
    assert!(matches!(err, MoonrakerError::NotMoonraker { status: 404, .. }), "{err:?}");
    assert!(err.to_string().contains("not Moonraker's JSON"), "{err}");
    assert!(err.help().unwrap().contains("moonraker_url"), "{:?}", err.help());

    let mut rep = Answers::yes();
    let err = clear_to_stop_klipper(&c, GateOptions::default(), None, &mut rep).await.unwrap_err();
    assert_unanswered(&err, "moonraker_url");
    assert!(rep.questions.is_empty(), "--yes never passes it: {:?}", rep.questions);

    let clearance = clear_to_stop_klipper(&c, SKIP, None, &mut rep).await.unwrap();
    assert_eq!(clearance.check(), PrintCheck::Skipped);
}

/// Item 2: no key, or a wrong one: 401 refuses, whatever --yes says.
#[tokio::test]
async fn unauthorized_refuses_and_names_the_api_key() {
    let m = RealMoonraker::start(Config::default());
    for (key, help) in [(None, "set moonraker_api_key"), (Some("0123456789abcdef"), "moonraker_api_key is wrong")] {
        let c = client(&m.url, key);
        let err = c.server_info().await.unwrap_err();
        assert!(matches!(err, MoonrakerError::Unauthorized { status: 401, .. }), "{err:?}");
        let mut rep = Answers::yes();
        let err = clear_to_stop_klipper(&c, GateOptions::default(), None, &mut rep).await.unwrap_err();
        assert_unanswered(&err, help);
        assert!(rep.questions.is_empty());
        assert_eq!(clear_to_stop_klipper(&c, SKIP, None, &mut rep).await.unwrap().check(), PrintCheck::Skipped);
    }
    let c = client(&m.url, Some(&m.api_key()));
    let clearance = clear_to_stop_klipper(&c, GateOptions::default(), None, &mut Answers::no()).await.unwrap();
    assert_eq!(clearance.check(), PrintCheck::KlippyDisconnected, "the right key gets Moonraker's answer");
}

/// Item 2: a hung Moonraker (the process stopped, its port still accepting) refuses at the
/// request deadline.
#[tokio::test]
async fn a_hung_moonraker_refuses_at_the_deadline() {
    let m = trusted();
    m.freeze();
    let c = Moonraker::new(&m.url, None, Duration::from_millis(800));
    let started = Instant::now();
    let mut rep = Answers::yes();
    let err = clear_to_stop_klipper(&c, GateOptions::default(), None, &mut rep).await.unwrap_err();
    let took = started.elapsed();
    m.thaw();
    assert!(took >= Duration::from_millis(700) && took < Duration::from_secs(3), "{took:?}");
    assert_unanswered(&err, "timeouts.moonraker_secs");
    assert!(err.to_string().contains("did not answer /server/info within 0.8 s"), "{err}");
    assert!(rep.questions.is_empty());
}

/// Nothing listens: Moonraker is down. That is a question (--yes answers it).
#[tokio::test]
async fn nothing_listening_is_a_question() {
    let c = client(&closed_port_url(), None);
    let err = c.server_info().await.unwrap_err();
    assert!(err.nothing_listens(), "{err:?}");

    let mut no = Answers::no();
    let err = clear_to_stop_klipper(&c, GateOptions::default(), None, &mut no).await.unwrap_err();
    assert!(matches!(err, Error::Safety(SafetyError::MoonrakerDownNotConfirmed { .. })), "{err:?}");
    assert_eq!((err.exit_code(), no.questions.len()), (9, 1));
    assert!(err.help().unwrap().contains("--yes"), "{:?}", err.help());

    let mut yes = Answers::yes();
    let first = clear_to_stop_klipper(&c, GateOptions::default(), None, &mut yes).await.unwrap();
    assert_eq!(first.check(), PrintCheck::MoonrakerDown);
    // The re-check right before the stop does not ask again.
    let again = clear_to_stop_klipper(&c, GateOptions::default(), Some(&first), &mut Answers::no()).await.unwrap();
    assert_eq!(again.check(), PrintCheck::MoonrakerDown);
}

/// A stopped Moonraker process vs a real one that has just gone: once it exits, its port
/// refuses, and the gate asks instead of refusing.
#[tokio::test]
async fn moonraker_that_went_away_refuses_connections() {
    let m = trusted();
    let url = m.url.clone();
    drop(m);
    let err = client(&url, None).server_info().await.unwrap_err();
    assert!(err.nothing_listens(), "{err:?}");
}

fn with_klippy(state: &'static str, job: &'static str) -> RealMoonraker {
    RealMoonraker::start(Config {
        trusted: true,
        klippy: Some((state, job, "benchy.gcode", 0.42)),
        ..Config::default()
    })
}

/// Through the real Moonraker: a print refuses, --yes and --skip-print-check or not.
#[tokio::test]
async fn a_print_behind_the_real_moonraker_refuses() {
    for job in ["printing", "paused"] {
        let m = with_klippy("ready", job);
        let c = client(&m.url, None);
        let info = c.server_info().await.unwrap();
        assert_eq!((info.klippy_connected, info.klippy_state.as_str()), (true, "ready"));
        for opts in [GateOptions::default(), SKIP] {
            let mut rep = Answers::yes();
            let err = clear_to_stop_klipper(&c, opts, None, &mut rep).await.unwrap_err();
            assert!(matches!(&err, Error::PrinterBusy(s) if *s == format!("{job} benchy.gcode (42%)")), "{err:?}");
            assert_eq!(err.exit_code(), 10);
            assert!(rep.questions.is_empty());
        }
    }
    let m = with_klippy("ready", "standby");
    let c = client(&m.url, None);
    let clearance = clear_to_stop_klipper(&c, GateOptions::default(), None, &mut Answers::no()).await.unwrap();
    assert_eq!(clearance.check(), PrintCheck::Idle);
}

/// Item 2 through the real Moonraker: a paused print behind a 401 refuses `--yes`.
#[tokio::test]
async fn a_paused_print_behind_a_401_refuses_yes() {
    let m =
        RealMoonraker::start(Config { klippy: Some(("ready", "paused", "benchy.gcode", 0.42)), ..Config::default() });
    let mut rep = Answers::yes();
    let err = clear_to_stop_klipper(&client(&m.url, None), GateOptions::default(), None, &mut rep).await.unwrap_err();
    assert_unanswered(&err, "moonraker_api_key");
    let err = clear_to_stop_klipper(&client(&m.url, Some(&m.api_key())), GateOptions::default(), None, &mut rep)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::PrinterBusy(_)), "with the key Moonraker tells: {err:?}");
    assert!(rep.questions.is_empty());
}

/// Item 4 through the real Moonraker: Klippy shut down by an M112, print_stats still paused.
#[tokio::test]
async fn after_an_emergency_stop_the_real_moonraker_shows_the_stale_print() {
    let m = with_klippy("shutdown", "paused");
    let c = client(&m.url, None);
    // Moonraker says `startup` until it has finished its own set-up with Klippy (on a busy
    // machine, after it subscribed): Moonraker pushes nothing to an HTTP client, so ask again.
    let t = Instant::now();
    while c.server_info().await.unwrap().klippy_state != "shutdown" {
        assert!(t.elapsed() < Duration::from_secs(10), "Moonraker never saw Klippy shutdown");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut no = Answers::no();
    let err = clear_to_stop_klipper(&c, GateOptions::default(), None, &mut no).await.unwrap_err();
    assert!(matches!(err, Error::Safety(SafetyError::HaltedNotConfirmed { .. })), "{err:?}");
    assert_eq!(no.questions, ["Flash anyway?"]);
    assert!(
        no.text().contains("Klippy is shutdown (Shutdown due to M112 command), so nothing moves; print_stats still says paused benchy.gcode (42%)"),
        "{}",
        no.text()
    );
    let clearance = clear_to_stop_klipper(&c, GateOptions::default(), None, &mut Answers::yes()).await.unwrap();
    assert_eq!(clearance.check(), PrintCheck::KlippyHalted);
}

/// The stale connection through the real Moonraker: Klippy stops answering its socket, and
/// Moonraker goes on answering `/server/info` with its last word (`shutdown` after an M112,
/// or `ready`) while the print query hangs. The gate refuses at its request deadline; it
/// used to take `shutdown` for "nothing moves" and clear the stop.
#[tokio::test]
async fn a_klippy_that_stops_answering_behind_the_real_moonraker_refuses() {
    for (state, job) in [("shutdown", "paused"), ("ready", "printing")] {
        let m = with_klippy(state, job);
        let c = Moonraker::new(&m.url, None, Duration::from_millis(1500));
        // Moonraker says `startup` until it has finished its own set-up with Klippy.
        let t = Instant::now();
        while c.server_info().await.unwrap().klippy_state != state {
            assert!(t.elapsed() < Duration::from_secs(10), "Moonraker never saw Klippy {state}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        m.freeze_klippy();
        let info = c.server_info().await.unwrap();
        assert_eq!((info.klippy_connected, info.klippy_state.as_str()), (true, state), "Moonraker's last word");
        let started = Instant::now();
        let mut rep = Answers::yes();
        let err = clear_to_stop_klipper(&c, GateOptions::default(), None, &mut rep).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5), "{state}: {:?}", started.elapsed());
        assert!(
            matches!(&err, Error::Safety(SafetyError::Unanswered { cause: MoonrakerError::KlippyUnresponsive { .. } })),
            "{state}: {err:?}"
        );
        assert_unanswered(&err, "restart Moonraker");
        assert!(rep.questions.is_empty(), "--yes does not pass it: {:?}", rep.questions);
        assert!(!rep.text().contains("nothing moves"), "{}", rep.text());
    }
}
