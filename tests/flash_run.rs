//! `kflash flash KEY`'s run (the orchestrator with the real effects) on the host, for the
//! outcomes that need no board: each ends with its own step's error (kind, exit code), and
//! the history holds exactly one record saying the same, whatever ended the run. The flashes
//! themselves are proven in the rig (rig_flash, rig_faults, rig_signals, rig_safety …).

mod host;
mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kflash::app::flash::{flash_one, FlashOptions};
use kflash::history::FlashResult;
use kflash::hotplug::{Hotplug, KeyResolver, ScriptedSource};
use kflash::registry::Registry;
use kflash::safety::PrintCheck;
use support::{closed_port_url, Answers};

struct Setup {
    root: tempfile::TempDir,
    reg: Registry,
    hp: Hotplug,
}

impl Setup {
    /// One board (nitehawk), not connected; Moonraker down; a service command that cannot
    /// run, so a stop attempt would end the run with a service error.
    async fn new(with_config: bool) -> Setup {
        let root = tempfile::tempdir().unwrap();
        let tree = host::stand_in_tree(root.path());
        let cfg = host::config_dir(root.path(), &tree);
        let settings = std::fs::read_to_string(cfg.join("settings.toml")).unwrap();
        let extra =
            format!("moonraker_url = \"{}\"\nservice_command = \"/nonexistent/systemctl\"\n", closed_port_url());
        std::fs::write(cfg.join("settings.toml"), settings + &extra).unwrap();
        if with_config {
            host::menuconfig(&tree, &cfg, "nitehawk", "rp2040");
        }
        let reg = Registry::open(&cfg).unwrap();
        let resolver: KeyResolver = Arc::new(|_| None);
        let (source, _script) = ScriptedSource::new(Vec::new());
        let hp = Hotplug::start(source, resolver).await.unwrap();
        Setup { root, reg, hp }
    }

    fn state(&self) -> PathBuf {
        self.root.path().join("state")
    }

    fn opts(&self) -> FlashOptions {
        FlashOptions {
            state_dir: Some(self.state()),
            cache_dir: Some(self.root.path().join("cache")),
            ..Default::default()
        }
    }

    /// The one history record, which must say `error`.
    fn only_record(&self, error: &str) -> kflash::history::FlashRecord {
        let records = kflash::history::read(&self.state(), Some("nitehawk")).unwrap();
        assert_eq!(records.len(), 1, "{records:?}");
        let r = records.into_iter().next().unwrap();
        assert_eq!(r.result, FlashResult::Failed, "{r:?}");
        assert_eq!(r.error.as_deref(), Some(error), "{r:?}");
        r
    }
}

fn never() -> impl std::future::Future<Output = &'static str> {
    std::future::pending()
}

fn cache_is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).map(|mut d| d.next().is_none()).unwrap_or(true)
}

#[tokio::test]
async fn a_refused_print_check_ends_the_run_before_the_build() {
    let s = Setup::new(true).await;
    let mut rep = Answers::no();
    let e = flash_one(&s.reg, "nitehawk", &s.hp, &s.opts(), &mut rep, never()).await.unwrap_err();
    assert_eq!((e.kind(), e.exit_code()), ("moonraker-down", 9), "{e}");
    assert_eq!(rep.questions, ["Continue without the print-safety check?"]);
    let r = s.only_record(&e.to_string());
    assert_eq!(r.print_check, None, "no check passed: {r:?}");
    assert!(r.firmware_sha256.is_none() && r.durations.build.is_none(), "nothing was built: {r:?}");
    assert!(cache_is_empty(&s.root.path().join("cache")), "nothing was built");
}

#[tokio::test]
async fn a_missing_board_config_is_the_build_steps_own_error() {
    let s = Setup::new(false).await;
    let mut rep = Answers::yes();
    let e = flash_one(&s.reg, "nitehawk", &s.hp, &s.opts(), &mut rep, never()).await.unwrap_err();
    assert_eq!((e.kind(), e.exit_code()), ("no-board-config", 3), "{e}");
    let r = s.only_record(&e.to_string());
    assert_eq!(r.print_check, Some(PrintCheck::MoonrakerDown), "{r:?}");
    assert!(rep.text().contains("firmware for Nitehawk"), "{}", rep.text());
}

/// The board is looked for after the build (as it is plugged in then): not connected is
/// exit 4, with the build in the record, and Klipper never touched.
#[tokio::test]
async fn a_board_that_is_not_connected_fails_after_its_build() {
    let s = Setup::new(true).await;
    let mut rep = Answers::yes();
    let e = flash_one(&s.reg, "nitehawk", &s.hp, &s.opts(), &mut rep, never()).await.unwrap_err();
    assert_eq!((e.kind(), e.exit_code()), ("device-not-found", 4), "{e}\n{}", rep.text());
    let r = s.only_record(&e.to_string());
    assert!(r.firmware_sha256.is_some() && r.durations.build.is_some(), "the build is recorded: {r:?}");
    assert!(r.durations.klipper_downtime.is_none(), "{r:?}");
    assert!(!rep.text().contains("stopping"), "Klipper was not stopped: {}", rep.text());
}

/// One stream carries every layer's progress: the print gate, the build (make's own output
/// lines, the image), the board's states and the run's; board events carry the key; each is
/// a JSON object with an `event` tag and no prose.
#[tokio::test]
async fn the_run_is_told_by_one_structured_event_stream() {
    use kflash::event::EventKind;
    use kflash::orchestrator::{BoardState, Cause, RunState};
    let s = Setup::new(true).await;
    let mut rep = Answers::yes();
    flash_one(&s.reg, "nitehawk", &s.hp, &s.opts(), &mut rep, never()).await.unwrap_err();
    let kinds: Vec<&EventKind> = rep.events.iter().map(|e| &e.kind).collect();
    let board = |pred: &dyn Fn(&EventKind) -> bool| {
        rep.events.iter().filter(|e| pred(&e.kind)).all(|e| e.board.as_deref() == Some("nitehawk"))
            && rep.events.iter().any(|e| pred(&e.kind))
    };
    assert!(matches!(kinds[0], EventKind::Run { state: RunState::Preflight }), "{kinds:?}");
    assert!(kinds.iter().any(|k| matches!(k, EventKind::PrintCheckStarted { again: false, .. })), "{kinds:?}");
    assert!(kinds.iter().any(|k| matches!(k, EventKind::MoonrakerDown { .. })), "{kinds:?}");
    assert!(board(&|k| matches!(k, EventKind::BuildStarted { .. })), "{kinds:?}");
    assert!(board(&|k| matches!(k, EventKind::BuildOutput { .. })), "make's lines are events: {kinds:?}");
    // Built, but not connected: the board fails with the build step, the cause as data.
    assert!(
        board(&|k| matches!(k, EventKind::Board { state: BoardState::Failed { cause: Cause::Error { kind, .. }, .. } }
            if kind == "device-not-found")),
        "{kinds:?}"
    );
    assert!(matches!(kinds.last(), Some(EventKind::Run { state: RunState::Done })), "{kinds:?}");
    for e in &rep.events {
        let json = serde_json::to_value(e).unwrap();
        assert!(json["event"].is_string(), "{json}");
    }
}

#[tokio::test]
async fn a_signal_cancels_the_run_and_the_record_says_which() {
    let s = Setup::new(true).await;
    let mut rep = Answers::yes();
    let e = flash_one(&s.reg, "nitehawk", &s.hp, &s.opts(), &mut rep, async { "SIGTERM" }).await.unwrap_err();
    assert_eq!((e.kind(), e.exit_code()), ("interrupted", 130), "{e}");
    assert_eq!(e.to_string(), "interrupted by SIGTERM");
    s.only_record("interrupted by SIGTERM");
}

/// A second kflash is refused before anything else, and the refusal is recorded.
#[tokio::test]
async fn a_held_flash_lock_refuses_the_run() {
    let s = Setup::new(true).await;
    let _held = kflash::service::FlashLock::acquire(&s.state(), "flash of octopus").unwrap();
    let mut rep = Answers::yes();
    let e = flash_one(&s.reg, "nitehawk", &s.hp, &s.opts(), &mut rep, never()).await.unwrap_err();
    assert_eq!(e.exit_code(), 8, "{e}");
    assert!(e.to_string().contains("flash of octopus"), "{e}");
    assert!(rep.questions.is_empty() && rep.lines.is_empty(), "nothing asked or said: {:?}", rep.lines);
    s.only_record(&e.to_string());
}
