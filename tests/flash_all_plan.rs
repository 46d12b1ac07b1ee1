//! `flash-all`'s plan on the host, from scripted udev records: which boards, in which order,
//! which are left out and why, the one error naming every unconfigured board, and the
//! version questions' answers (`drop_current`). The runs themselves are proven in the rig
//! (tests/rig_flash_all.rs).

mod host;
mod support;

use std::sync::Arc;

use host::tty;
use kflash::app::flash_all::{plan, FlashAllPlan, LeftOut, PlanBoard, PlannedBuild, Versions};
use kflash::hotplug::{Hotplug, KeyResolver, ScriptedSource};
use kflash::identity::Mode;
use kflash::registry::{FlashMethod, Registry};

const OCTOPUS: (&str, &str) = ("stm32h723xx", "29001A001151313531383332");
const NITEHAWK: (&str, &str) = ("rp2040", "E661640843545B2E");
const EBB: (&str, &str) = ("stm32f446xx", "1D0041000B50534E4E313020");

struct Setup {
    _root: tempfile::TempDir,
    reg: Registry,
    hp: Hotplug,
}

/// octopus (Klipper) and nitehawk (in Katapult) configured; ebb connected without a config;
/// spare registered but not connected; cubic excluded. Moonraker unreachable.
async fn setup() -> Setup {
    let root = tempfile::tempdir().unwrap();
    let tree = host::stand_in_tree(root.path());
    let cfg = host::config_dir(root.path(), &tree);
    let boards = format!(
        "[boards.octopus]\nname = \"Octopus\"\nmcu = \"{}\"\nserial = \"{}\"\n\
         [boards.nitehawk]\nname = \"Nitehawk\"\nmcu = \"{}\"\nserial = \"{}\"\n\
         [boards.ebb]\nname = \"EBB\"\nmcu = \"{}\"\nserial = \"{}\"\n\
         [boards.spare]\nname = \"Spare\"\nmcu = \"rp2040\"\nserial = \"0000\"\n\
         [boards.cubic]\nname = \"Cubic\"\nmcu = \"rp2040\"\nserial = \"mmb_cubic\"\nflashable = false\n",
        OCTOPUS.0, OCTOPUS.1, NITEHAWK.0, NITEHAWK.1, EBB.0, EBB.1
    );
    std::fs::write(cfg.join("boards.toml"), boards).unwrap();
    let settings = std::fs::read_to_string(cfg.join("settings.toml")).unwrap();
    let extra = format!("moonraker_url = \"{}\"\n", support::closed_port_url());
    std::fs::write(cfg.join("settings.toml"), settings + &extra).unwrap();
    host::menuconfig(&tree, &cfg, "octopus", OCTOPUS.0);
    host::menuconfig(&tree, &cfg, "nitehawk", NITEHAWK.0);
    let reg = Registry::open(&cfg).unwrap();
    let devices = vec![
        tty("Klipper", "614e", OCTOPUS, 0),
        tty("katapult", "6177", NITEHAWK, 1),
        tty("Klipper", "614e", EBB, 2),
        tty("Klipper", "614e", ("rp2040", "mmb_cubic"), 3),
    ];
    let resolver: KeyResolver = Arc::new(|_| None);
    let (source, _script) = ScriptedSource::new(devices);
    let hp = Hotplug::start(source, resolver).await.unwrap();
    Setup { _root: root, reg, hp }
}

fn why(plan: &FlashAllPlan, key: &str) -> LeftOut {
    plan.left_out.iter().find(|l| l.key == key).unwrap_or_else(|| panic!("{key} not left out: {plan:?}")).why.clone()
}

#[tokio::test]
async fn an_unconfigured_board_refuses_the_plan_naming_it() {
    let s = setup().await;
    let err = plan(&s.reg, &s.hp, false).await.unwrap_err();
    assert_eq!(err.kind(), "boards-unconfigured");
    assert_eq!(err.exit_code(), kflash::error::exit::CONFIG);
    let text = err.to_string();
    assert!(text.contains("ebb: board 'ebb' has no firmware config yet"), "{text}");
    assert!(!text.contains("octopus") && !text.contains("spare"), "only the unconfigured board: {text}");
    assert!(err.help().unwrap().contains("--skip-unconfigured"));
}

#[tokio::test]
async fn the_plan_takes_connected_configured_boards_katapult_first() {
    let s = setup().await;
    let p = plan(&s.reg, &s.hp, true).await.unwrap();
    let keys: Vec<&str> = p.boards.iter().map(|b| b.key.as_str()).collect();
    assert_eq!(keys, ["nitehawk", "octopus"], "the board waiting in Katapult goes first: {p:?}");
    assert_eq!(p.boards[0].mode, Mode::Katapult);
    assert_eq!(p.boards[1].mode, Mode::Klipper);
    assert!(matches!(why(&p, "ebb"), LeftOut::Unconfigured { message } if message.contains("no firmware config")));
    assert_eq!(why(&p, "spare"), LeftOut::Disconnected);
    assert_eq!(why(&p, "cubic"), LeftOut::Excluded);
    assert!(matches!(p.versions, Versions::MoonrakerUnreachable { .. }), "{:?}", p.versions);
    assert!(p.boards.iter().all(|b| b.running.is_none() && b.outdated.is_none()), "unknown: flashed");
    assert!(p.host_version.as_deref().is_some_and(|v| v.starts_with('v')), "{:?}", p.host_version);
    assert!(!p.all_current() && p.current().next().is_none());

    // --dry-run's build column: nothing cached yet, so both would build; nothing is written.
    let mut p = p;
    kflash::app::flash_all::probe_builds(&s.reg, &mut p, false).await.unwrap();
    for b in &p.boards {
        assert!(matches!(&b.build, Some(PlannedBuild::Build { .. })), "{b:?}");
    }
    kflash::app::flash_all::probe_builds(&s.reg, &mut p, true).await.unwrap();
    for b in &p.boards {
        assert!(
            matches!(&b.build, Some(PlannedBuild::Fails { message }) if message.contains("no cached firmware")),
            "--no-build without a cached image: {b:?}"
        );
    }
}

fn board(key: &str, running: &str, host: &str) -> PlanBoard {
    PlanBoard {
        key: key.into(),
        name: key.into(),
        mcu: "rp2040".into(),
        mode: Mode::Klipper,
        method: FlashMethod::Katapult,
        running: Some(running.into()),
        relation: None,
        outdated: Some(running != host),
        build: None,
        behind: None,
        provides: None,
    }
}

#[test]
fn only_outdated_leaves_the_current_boards_out_with_their_version() {
    let host = "v0.13.0-3-gabc";
    let mut p = FlashAllPlan {
        host_version: Some(host.into()),
        versions: Versions::Klippy,
        boards: vec![board("a", host, host), board("b", "v0.12.0-1-gdef", host), board("c", host, host)],
        left_out: Vec::new(),
        tree: None,
    };
    assert!(!p.all_current());
    assert_eq!(p.current().map(|b| b.key.as_str()).collect::<Vec<_>>(), ["a", "c"]);
    p.drop_current();
    assert_eq!(p.boards.iter().map(|b| b.key.as_str()).collect::<Vec<_>>(), ["b"]);
    assert_eq!(why(&p, "a"), LeftOut::Current { version: host.into() });
    assert_eq!(why(&p, "c"), LeftOut::Current { version: host.into() });

    let mut all = FlashAllPlan { boards: vec![board("a", host, host)], left_out: Vec::new(), ..p };
    assert!(all.all_current());
    all.drop_current();
    assert!(all.boards.is_empty() && !all.all_current(), "nothing left to flash");
}
