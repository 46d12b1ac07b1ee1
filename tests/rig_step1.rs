//! Step 1 on real USB: `kflash watch`, `devices` and `add` against simulated boards that the
//! guest kernel enumerates through dummy_hcd and real udev. Run by tests/rig/run-scenarios.

mod rig_support;

use rig_support::*;

fn register(cfg: &std::path::Path, board: (&str, &str, &str), name: &str) {
    let dev = by_id(board, "Klipper");
    ok(&kflash(cfg, &["add", "--device", &dev, "--name", name, "--key", board.0]));
}

#[test]
#[ignore = "runs inside the USB rig"]
fn watch_sees_plugs_a_katapult_round_trip_and_an_unplug() {
    in_rig();
    reset_boards();
    let (_t, cfg) = config_dir();
    register(&cfg, OCTOPUS, "Octopus Pro");
    for b in [OCTOPUS, NITEHAWK, EBB] {
        boardctl(&["unplug", b.0]);
    }
    settle();

    let w = Watch::start(&cfg);
    for b in [OCTOPUS, NITEHAWK, EBB] {
        boardctl(&["plug", b.0]);
    }
    // Three boards appear; udev handles different devices in parallel, so any order.
    let mut added: Vec<_> = w.take(3, 30).iter().map(summary).collect();
    added.sort();
    assert_eq!(
        added,
        vec![
            ("added".into(), EBB.2.into(), "klipper".into()),
            ("added".into(), NITEHAWK.2.into(), "klipper".into()),
            ("added".into(), "octopus".into(), "klipper".into()),
        ]
    );

    boardctl(&["reboot", OCTOPUS.0, "katapult"]);
    let ev = w.take(2, 30);
    assert_eq!(summary(&ev[0]), ("removed".into(), "octopus".into(), "klipper".into()));
    assert_eq!(summary(&ev[1]), ("mode-changed".into(), "octopus".into(), "katapult".into()));
    assert_eq!(ev[1]["previous_mode"], "klipper");
    assert_eq!(ev[1]["mcu"], OCTOPUS.1);
    assert_eq!(ev[1]["serial"], OCTOPUS.2);
    assert_eq!(ev[1]["by_id"], by_id(OCTOPUS, "katapult"));
    assert_eq!(ev[1]["name"], "Octopus Pro");
    assert!(ev[1]["devnode"].as_str().unwrap().starts_with("/dev/ttyACM"));

    boardctl(&["reboot", OCTOPUS.0, "klipper"]);
    let ev = w.take(2, 30);
    assert_eq!(summary(&ev[0]), ("removed".into(), "octopus".into(), "katapult".into()));
    assert_eq!(summary(&ev[1]), ("mode-changed".into(), "octopus".into(), "klipper".into()));
    assert_eq!(ev[1]["by_id"], by_id(OCTOPUS, "Klipper"));

    boardctl(&["unplug", NITEHAWK.0]);
    let ev = w.next(30);
    assert_eq!(summary(&ev), ("removed".into(), NITEHAWK.2.into(), "klipper".into()));
    assert_eq!(ev["device"], serde_json::Value::Null);

    settle();
    let rest = w.stop();
    assert!(rest.is_empty(), "nothing duplicated or extra: {rest:?}");
}

#[test]
#[ignore = "runs inside the USB rig"]
fn board_plugged_while_watch_starts_is_not_missed() {
    in_rig();
    for delay_ms in [0u64, 5, 20, 60] {
        reset_boards();
        let (_t, cfg) = config_dir();
        let w = Watch::spawn(&cfg);
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        boardctl(&["plug", MMB.0]);
        settle();
        // The three boards already there, plus mmb either as present or as added.
        let lines = w.take(4, 30);
        let rest = w.stop();
        let all: Vec<_> = lines.iter().chain(rest.iter()).collect();
        let mmb: Vec<_> = all.iter().filter(|v| v["serial"] == MMB.2).collect();
        assert_eq!(mmb.len(), 1, "delay {delay_ms} ms: mmb seen exactly once: {all:?}");
        assert!(["present", "added"].contains(&mmb[0]["action"].as_str().unwrap()));
        assert_eq!(mmb[0]["by_id"], by_id(MMB, "Klipper"));
        assert_eq!(all.len(), 4, "delay {delay_ms} ms: {all:?}");
    }
}

#[test]
#[ignore = "runs inside the USB rig"]
fn devices_and_add_on_rig_boards() {
    in_rig();
    reset_boards();
    let (_t, cfg) = config_dir();
    let v: serde_json::Value = serde_json::from_str(&ok(&kflash(&cfg, &["devices", "--json"]))).unwrap();
    assert_eq!(v["registered"].as_array().unwrap().len(), 0);
    let serials: Vec<&str> =
        v["unregistered"].as_array().unwrap().iter().map(|b| b["serial"].as_str().unwrap()).collect();
    for b in [OCTOPUS, NITEHAWK, EBB] {
        assert!(serials.contains(&b.2), "{} listed as unregistered: {v}", b.0);
    }

    let out = ok(&kflash(&cfg, &["add", "--device", &by_id(NITEHAWK, "Klipper"), "--name", "Nitehawk 36", "--json"]));
    let entry: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(entry["mcu"], NITEHAWK.1);
    assert_eq!(entry["serial"], NITEHAWK.2);
    let boards = std::fs::read_to_string(cfg.join("boards.toml")).unwrap();
    assert!(boards.contains("[boards.nitehawk-36]"), "{boards}");

    // Adding the same board twice, or a device that is not there, fails clearly.
    let again = kflash(&cfg, &["add", "--device", &by_id(NITEHAWK, "Klipper"), "--name", "Again"]);
    assert_eq!(again.status.code(), Some(4), "{}", String::from_utf8_lossy(&again.stderr));
    let missing = kflash(&cfg, &["add", "--device", "/dev/ttyACM9", "--name", "Ghost"]);
    assert_eq!(missing.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no connected USB serial device matches"));

    let row = |v: &serde_json::Value| v["registered"][0].clone();
    let v: serde_json::Value = serde_json::from_str(&ok(&kflash(&cfg, &["devices", "--json"]))).unwrap();
    assert_eq!((row(&v)["connected"].as_bool(), row(&v)["mode"].as_str()), (Some(true), Some("klipper")));

    // Still the same registered board in its bootloader.
    boardctl(&["reboot", NITEHAWK.0, "katapult"]);
    boardctl(&["wait-ready"]);
    settle();
    let v: serde_json::Value = serde_json::from_str(&ok(&kflash(&cfg, &["devices", "--json"]))).unwrap();
    assert_eq!(row(&v)["mode"], "katapult", "{v}");
    assert!(v["unregistered"].as_array().unwrap().iter().all(|b| b["serial"] != NITEHAWK.2));

    boardctl(&["unplug", NITEHAWK.0]);
    settle();
    let v: serde_json::Value = serde_json::from_str(&ok(&kflash(&cfg, &["devices", "--json"]))).unwrap();
    assert_eq!(row(&v)["connected"], false);

    let text = ok(&kflash(&cfg, &["devices"]));
    assert!(text.contains("nitehawk-36") && text.contains("absent"), "{text}");
}

#[test]
#[ignore = "runs inside the USB rig"]
fn udev_rule_keeps_modemmanager_off_boards() {
    in_rig();
    reset_boards();
    let rule = concat!(env!("CARGO_MANIFEST_DIR"), "/udev-rules/70-kflash.rules");
    std::fs::copy(rule, "/etc/udev/rules.d/70-kflash.rules").unwrap();
    let reload = run("udevadm", &["control", "--reload"]);
    assert!(reload.status.success());
    let trig = run("udevadm", &["trigger", "--action=change", "--subsystem-match=tty"]);
    assert!(trig.status.success());
    settle();
    let prop =
        |link: &str| String::from_utf8_lossy(&run("udevadm", &["info", "--query=property", link]).stdout).into_owned();
    let klipper = prop(&by_id(OCTOPUS, "Klipper"));
    assert!(klipper.contains("ID_MM_DEVICE_IGNORE=1"), "{klipper}");
    assert!(klipper.contains("TAGS=") && klipper.contains(":kflash:"), "{klipper}");
    boardctl(&["reboot", OCTOPUS.0, "katapult"]);
    boardctl(&["wait-ready"]);
    settle();
    assert!(prop(&by_id(OCTOPUS, "katapult")).contains("ID_MM_DEVICE_IGNORE=1"));
    std::fs::remove_file("/etc/udev/rules.d/70-kflash.rules").unwrap();
    run("udevadm", &["control", "--reload"]);
}

#[test]
#[ignore = "runs inside the USB rig"]
fn add_wizard_on_a_terminal() {
    in_rig();
    reset_boards();
    let (_t, cfg) = config_dir();
    // `script` gives kflash a real terminal; the answers are typed into it line by line:
    // board number, name, MCU (default), method (default), exclude (default no).
    let cmd = format!("{} --config-dir {} add", kflash_bin(), cfg.display());
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("printf '9\\n1\\nWizard Board\\n\\n\\n\\n' | script -qec '{cmd}' /dev/null"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("Connected boards that are not registered"), "{text}");
    assert!(text.contains("enter a number from 1 to 3"), "a bad answer is asked again: {text}");
    assert!(text.contains("Registered 'Wizard Board' as wizard-board"), "{text}");
    let boards = std::fs::read_to_string(cfg.join("boards.toml")).unwrap();
    assert!(
        boards.contains("[boards.wizard-board]") && boards.contains(&format!("serial = \"{}\"", OCTOPUS.2)),
        "{boards}"
    );
}

#[test]
#[ignore = "runs inside the USB rig"]
fn add_with_a_profile_on_rig_boards() {
    in_rig();
    reset_boards();
    let (_t, cfg) = config_dir();
    std::fs::create_dir_all(&cfg).unwrap();
    std::fs::write(cfg.join("settings.toml"), format!("klipper_dir = \"{}\"\n", klipper_dir().display())).unwrap();
    let nitehawk = by_id(NITEHAWK, "Klipper");

    // A profile for another MCU than the one the board reports: refused, nothing written.
    let wrong =
        kflash(&cfg, &["add", "--device", &nitehawk, "--name", "Nitehawk", "--profile", "btt-octopus-pro-h723"]);
    let err = text(&wrong.stderr);
    assert_eq!(wrong.status.code(), Some(3), "{err}");
    assert!(
        err.contains("the board profile 'btt-octopus-pro-h723' is for stm32h723xx, but the board is an rp2040"),
        "{err}"
    );
    assert!(err.contains("help:") && err.contains("kflash profiles"), "{err}");
    assert!(!cfg.join("boards.toml").exists() && !cfg.join("configs").exists());

    // The board's own profile: registered, its config seeded by the tree's olddefconfig.
    let out = ok(&kflash(
        &cfg,
        &[
            "add",
            "--device",
            &nitehawk,
            "--name",
            "Nitehawk",
            "--key",
            "nitehawk",
            "--profile",
            "ldo-nitehawk-36",
            "--json",
        ],
    ));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((v["key"].as_str(), v["profile"].as_str()), (Some("nitehawk"), Some("ldo-nitehawk-36")), "{v}");
    assert_eq!((v["serial"].as_str(), v["config_reviewed"].as_bool()), (Some(NITEHAWK.2), Some(false)), "{v}");
    let config = std::fs::read_to_string(cfg.join("configs/nitehawk.config")).unwrap();
    for line in
        ["CONFIG_MCU=\"rp2040\"", "CONFIG_RPXXXX_FLASH_START_4000=y", "CONFIG_RPXXXX_USB=y", "CONFIG_USBSERIAL=y"]
    {
        assert!(config.lines().any(|l| l == line), "{line} in\n{config}");
    }

    let devices = ok(&kflash(&cfg, &["devices"]));
    assert!(
        devices.contains("[config from profile ldo-nitehawk-36 not reviewed: `kflash config nitehawk`]"),
        "{devices}"
    );

    // Not reviewed: flash refuses it, flash-all's plan leaves it out, both saying what to do.
    let flash = kflash(&cfg, &["flash", "nitehawk", "--yes"]);
    let err = text(&flash.stderr);
    assert_eq!(flash.status.code(), Some(3), "{err}");
    assert!(err.contains("nobody has reviewed") && err.contains("run `kflash config nitehawk`"), "{err}");
    let plan = ok(&kflash(&cfg, &["flash-all", "--dry-run"]));
    assert!(plan.contains("seeded from the board profile 'ldo-nitehawk-36' and not reviewed"), "{plan}");
    assert!(plan.contains("kflash config nitehawk"), "{plan}");
}
