//! Board profiles on the host: `add --profile` seeds a config through the tree's olddefconfig
//! and marks it unreviewed; a profile for another MCU is refused with nothing written; a
//! setting the tree's Kconfig drops is refused; flash-all's plan leaves the unreviewed board
//! out and `flash` refuses it; `kflash config` (menuconfig on a terminal) marks it reviewed.
//! Against the stand-in Klipper tree; the last test checks every shipped profile against a
//! real Klipper checkout (`KFLASH_REAL_KLIPPER_TREE`).

mod common;
mod host;
mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use host::tty;
use kflash::app::boards::AddRequest;
use kflash::app::flash::{flash_one, FlashOptions};
use kflash::app::flash_all::{plan, LeftOut};
use kflash::app::seed;
use kflash::hotplug::{Board, Hotplug, KeyResolver, ScriptedSource};
use kflash::kconfig::KConfig;
use kflash::profiles::{self, Profile};
use kflash::registry::Registry;

const OCTOPUS: (&str, &str) = ("stm32h723xx", "29001A001151313531383332");
const PICO: (&str, &str) = ("rp2040", "E66138935F2D3A2C");

struct Setup {
    root: tempfile::TempDir,
    tree: PathBuf,
    cfg: PathBuf,
    hp: Hotplug,
}

/// The stand-in tree, the config dir with `nitehawk` (not connected), Moonraker down, and an
/// STM32H723 and an RP2040 board connected, both unregistered.
async fn setup() -> Setup {
    let root = tempfile::tempdir().unwrap();
    let tree = host::stand_in_tree(root.path());
    let cfg = host::config_dir(root.path(), &tree);
    let settings = std::fs::read_to_string(cfg.join("settings.toml")).unwrap();
    let extra =
        format!("moonraker_url = \"{}\"\nservice_command = \"/nonexistent/systemctl\"\n", support::closed_port_url());
    std::fs::write(cfg.join("settings.toml"), settings + &extra).unwrap();
    let resolver: KeyResolver = Arc::new(|_| None);
    let (source, _script) =
        ScriptedSource::new(vec![tty("Klipper", "614e", OCTOPUS, 0), tty("Klipper", "614e", PICO, 1)]);
    let hp = Hotplug::start(source, resolver).await.unwrap();
    Setup { root, tree, cfg, hp }
}

impl Setup {
    fn reg(&self) -> Registry {
        Registry::open(&self.cfg).unwrap()
    }

    fn board(&self, serial: &str) -> Board {
        self.hp.snapshot().into_iter().find(|b| b.identity.serial.as_deref() == Some(serial)).unwrap()
    }

    fn configs(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.cfg.join("configs"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// Register the STM32H723 board as `octopus` with the Octopus Pro H723 profile.
    async fn add_octopus(&self) -> seed::SeededBoard {
        let mut reg = self.reg();
        let req = AddRequest { name: "Octopus".into(), key: Some("octopus".into()), ..Default::default() };
        let profile = profiles::find("btt-octopus-pro-h723").unwrap();
        seed::add_with_profile(&mut reg, &self.board(OCTOPUS.1), &req, &profile).await.unwrap()
    }
}

#[tokio::test]
async fn add_with_a_profile_seeds_the_boards_config_through_olddefconfig_marked_unreviewed() {
    let s = setup().await;
    let seeded = s.add_octopus().await;
    assert_eq!(seeded.config, s.cfg.join("configs/octopus.config"));
    assert_eq!((seeded.entry.mcu.as_str(), seeded.entry.serial.as_deref()), (OCTOPUS.0, Some(OCTOPUS.1)));
    // A complete config from the tree's Kconfig, with the profile's settings in it.
    let text = std::fs::read_to_string(&seeded.config).unwrap();
    assert!(text.starts_with("#\n# Automatically generated file; DO NOT EDIT."), "{text}");
    let cfg = KConfig::parse(&text);
    assert_eq!(cfg.mcu(), Some("stm32h723xx"));
    assert_eq!(cfg.application_address(), Some(0x0802_0000), "128KiB bootloader offset");
    assert_eq!(cfg.get("CONFIG_CLOCK_REF_FREQ"), Some("25000000"));
    assert_eq!(cfg.get("CONFIG_STM32_USB_PA11_PA12"), Some("y"));
    assert_eq!(cfg.get("CONFIG_USBSERIAL"), Some("y"));
    // Marked in boards.toml, so every reader of the registry sees it.
    let reg = s.reg();
    assert_eq!(reg.unreviewed_profile("octopus"), Some("btt-octopus-pro-h723"));
    assert_eq!(reg.unreviewed_profile("nitehawk"), None);
    let view = kflash::app::boards::devices_view(&reg, &s.hp.snapshot());
    let rows: Vec<_> = view.registered.iter().map(|r| (r.key.as_str(), r.config_unreviewed.as_deref())).collect();
    assert_eq!(rows, [("nitehawk", None), ("octopus", Some("btt-octopus-pro-h723"))]);
    let boards = std::fs::read_to_string(s.cfg.join("boards.toml")).unwrap();
    assert!(boards.contains("[unreviewed_configs]\noctopus = \"btt-octopus-pro-h723\""), "{boards}");
    // Nothing in the tree was touched (olddefconfig ran with a private OUT=).
    assert!(!s.tree.join("out").exists() && !s.tree.join(".config").exists());
}

#[tokio::test]
async fn a_profile_for_another_mcu_is_refused_and_nothing_is_written() {
    let s = setup().await;
    let boards_before = std::fs::read(s.cfg.join("boards.toml")).unwrap();
    let mut reg = s.reg();
    let req = AddRequest { name: "Pico".into(), ..Default::default() };
    let profile = profiles::find("btt-octopus-pro-h723").unwrap();
    let e = seed::add_with_profile(&mut reg, &s.board(PICO.1), &req, &profile).await.unwrap_err();
    assert_eq!(e.kind(), "profile-mismatch");
    assert_eq!(e.exit_code(), kflash::error::exit::CONFIG);
    assert!(e.to_string().contains("stm32h723xx") && e.to_string().contains("rp2040"), "{e}");
    assert!(e.help().unwrap().contains("kflash profiles"));
    assert_eq!(std::fs::read(s.cfg.join("boards.toml")).unwrap(), boards_before);
    assert!(s.configs().is_empty(), "{:?}", s.configs());
    assert!(reg.get("pico").is_err(), "not registered in memory either");
}

#[tokio::test]
async fn a_setting_the_trees_kconfig_drops_is_refused_and_nothing_is_written() {
    let s = setup().await;
    // A typo'd bootloader offset: Kconfig drops the unknown symbol and picks its default.
    let typo = Profile::parse(
        "typo",
        "# title: T\n# mcu: stm32h723xx\n# source: https://example.org\n# bootloader: b\nCONFIG_MACH_STM32=y\nCONFIG_MACH_STM32H723=y\nCONFIG_STM32_FLASH_START_200000=y\n",
    )
    .unwrap();
    let mut reg = s.reg();
    let req = AddRequest { name: "Octopus".into(), ..Default::default() };
    let e = seed::add_with_profile(&mut reg, &s.board(OCTOPUS.1), &req, &typo).await.unwrap_err();
    assert_eq!(e.kind(), "tool");
    assert!(e.to_string().contains("dropped CONFIG_STM32_FLASH_START_200000=y"), "{e}");
    assert!(s.configs().is_empty());
    assert!(s.reg().get("octopus").is_err());
}

#[tokio::test]
async fn flash_all_leaves_out_and_flash_refuses_the_unreviewed_board() {
    let s = setup().await;
    s.add_octopus().await;
    let reg = s.reg();
    let p = plan(&reg, &s.hp, true).await.unwrap();
    assert!(p.boards.is_empty(), "{p:?}");
    let left = p.left_out.iter().find(|l| l.key == "octopus").expect("octopus left out");
    assert_eq!(left.why, LeftOut::Unreviewed { profile: "btt-octopus-pro-h723".into() });
    let json = serde_json::to_value(&p).unwrap();
    let entry = json["left_out"].as_array().unwrap().iter().find(|l| l["key"] == "octopus").unwrap().clone();
    assert_eq!((entry["why"].as_str(), entry["profile"].as_str()), (Some("unreviewed"), Some("btt-octopus-pro-h723")));

    let opts = FlashOptions {
        state_dir: Some(s.root.path().join("state")),
        cache_dir: Some(s.root.path().join("cache")),
        ..Default::default()
    };
    let mut rep = support::Answers::no();
    let e = flash_one(&reg, "octopus", &s.hp, &opts, &mut rep, std::future::pending()).await.unwrap_err();
    assert_eq!(e.kind(), "config-unreviewed");
    assert!(e.help().unwrap().contains("kflash config octopus"), "{:?}", e.help());
    assert!(!s.root.path().join("cache").exists(), "nothing was built");
}

#[tokio::test]
async fn kflash_config_on_a_terminal_marks_the_seeded_config_reviewed() {
    let s = setup().await;
    s.add_octopus().await;
    let show = common::kflash_env(&s.cfg, &["config", "octopus", "--show"], &[]);
    let (out, _) = common::text(&show);
    assert!(out.contains("bootloader offset  application at 0x8020000 (128 KiB bootloader offset)"), "{out}");
    assert!(out.contains("reviewed           no: seeded from the profile 'btt-octopus-pro-h723'"), "{out}");
    // Not on a terminal: menuconfig does not run, the mark stays.
    let o = common::kflash_env(&s.cfg, &["config", "octopus"], &[]);
    assert!(!o.status.success());
    assert_eq!(s.reg().unreviewed_profile("octopus"), Some("btt-octopus-pro-h723"));
    // The stand-in menuconfig keeps the config as it is (the user leaves without changes).
    let o = common::kflash_tty(&s.cfg, &["config", "octopus"], &[]);
    let (out, err) = common::text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("Reviewed: the config seeded from the profile 'btt-octopus-pro-h723'"), "{out}");
    assert_eq!(s.reg().unreviewed_profile("octopus"), None);
    let boards = std::fs::read_to_string(s.cfg.join("boards.toml")).unwrap();
    assert!(!boards.contains("unreviewed"), "{boards}");
    let p = plan(&s.reg(), &s.hp, true).await.unwrap();
    assert_eq!(p.boards.iter().map(|b| b.key.as_str()).collect::<Vec<_>>(), ["octopus"]);
}

#[test]
fn the_profiles_command_lists_every_profile_and_add_refuses_an_unknown_one_first() {
    let root = tempfile::tempdir().unwrap();
    let o = common::kflash_env(root.path(), &["profiles", "--json"], &[]);
    assert!(o.status.success());
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let names: Vec<&str> = list.as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    for want in [
        "btt-octopus-f446",
        "btt-octopus-pro-h723",
        "btt-manta-m8p-h723",
        "btt-skr-mini-e3-v3",
        "btt-ebb-can",
        "btt-ebb-usb",
        "btt-sb2209-sb2240-can",
        "ldo-nitehawk-36",
        "mellow-fly-sht36-v2",
        "fysetc-spider",
        "rp2040-pico",
        "linux-host",
    ] {
        assert!(names.contains(&want), "{want} in {names:?}");
    }
    assert!(list[0]["sources"][0].as_str().unwrap().starts_with("https://"));
    let o = common::kflash_env(root.path(), &["profiles"], &[]);
    let (out, _) = common::text(&o);
    assert!(o.status.success());
    assert!(out.contains("btt-octopus-pro-h723     stm32h723xx  BIGTREETECH Octopus Pro v1.1 (STM32H723)\n    bootloader: 128KiB offset"), "{out}");
    assert_eq!(
        out.matches("    source: https://").count(),
        list.as_array().unwrap().iter().map(|p| p["sources"].as_array().unwrap().len()).sum::<usize>()
    );
    let o =
        common::kflash_env(root.path(), &["add", "--profile", "nope", "--device", "/dev/ttyACM0", "--name", "X"], &[]);
    let (_, err) = common::text(&o);
    assert_eq!(o.status.code(), Some(kflash::error::exit::USAGE), "{err}");
    assert!(err.contains("there is no board profile 'nope'"), "{err}");
    assert!(!root.path().join("boards.toml").exists(), "nothing written");
}

/// Every shipped profile through a REAL Klipper tree's olddefconfig: a typo'd or misplaced
/// symbol is silently dropped by Kconfig, and this catches it. Needs a Klipper checkout:
/// `KFLASH_REAL_KLIPPER_TREE=~/klipper cargo test --test profiles -- --ignored`.
#[tokio::test]
#[ignore = "needs a real Klipper checkout in KFLASH_REAL_KLIPPER_TREE"]
async fn every_profile_survives_the_real_klipper_kconfig() {
    let tree = std::env::var_os("KFLASH_REAL_KLIPPER_TREE")
        .map(PathBuf::from)
        .expect("set KFLASH_REAL_KLIPPER_TREE to a Klipper checkout");
    assert!(tree.join("src/stm32/Kconfig").is_file(), "{} is not a Klipper tree", tree.display());
    let mut failures = Vec::new();
    for p in profiles::all() {
        match seed::seed_config(Path::new(&tree), &p, Duration::from_secs(120)).await {
            Ok(config) => {
                let cfg = KConfig::parse(&String::from_utf8_lossy(&config));
                assert_eq!(seed::config_mcu(&cfg).as_deref(), Some(p.mcu.as_str()), "{}", p.name);
            }
            Err(e) => failures.push(format!("{}: {e}", p.name)),
        }
    }
    assert!(failures.is_empty(), "profiles the real Kconfig does not accept:\n{}", failures.join("\n"));
}
