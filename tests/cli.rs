//! The `kflash` binary on commands that need no USB: registry files, import, settings and
//! `config` with a real `make` run. (USB commands run in the rig: tests/rig_*.rs.)

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::{kflash_tty, text, BOARDS};

fn kflash(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kflash"))
        .arg("--config-dir")
        .arg(dir)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run kflash")
}

/// A Klipper-like tree whose menuconfig writes $(KCONFIG_CONFIG) for the MCU in $MENU_MCU
/// and which leaves a marker so tests can tell whether make ran at all.
fn klipper_tree(root: &Path) -> PathBuf {
    let tree = root.join("klipper");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(
        tree.join("Makefile"),
        "KCONFIG_CONFIG := $(CURDIR)/.config\nmenuconfig:\n\ttouch $(CURDIR)/make-ran\n\tprintf 'CONFIG_MCU=\"%s\"\\nCONFIG_FLASH_APPLICATION_ADDRESS=0x10004000\\n' \"$$MENU_MCU\" > $(KCONFIG_CONFIG)\n",
    )
    .unwrap();
    std::fs::write(tree.join(".config"), "CONFIG_MCU=\"users-own\"\n").unwrap();
    tree
}

fn setup() -> (tempfile::TempDir, PathBuf) {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("cfg");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("boards.toml"), BOARDS).unwrap();
    let tree = klipper_tree(root.path());
    std::fs::write(dir.join("settings.toml"), format!("klipper_dir = \"{}\"\n", tree.display())).unwrap();
    (root, dir)
}

#[test]
fn config_runs_menuconfig_on_the_boards_own_file() {
    let (root, dir) = setup();
    let out = kflash_tty(&dir, &["config", "nitehawk"], &[("MENU_MCU", "rp2040")]);
    let (so, se) = text(&out);
    assert!(out.status.success(), "{so}{se}");
    assert!(so.contains("MCU rp2040"), "{so}");
    let cfg = std::fs::read_to_string(dir.join("configs/nitehawk.config")).unwrap();
    assert!(cfg.contains("CONFIG_MCU=\"rp2040\""));
    assert_eq!(
        std::fs::read_to_string(root.path().join("klipper/.config")).unwrap(),
        "CONFIG_MCU=\"users-own\"\n",
        "the user's own klipper/.config is never touched"
    );
}

#[test]
fn config_for_another_mcu_is_refused_before_make_runs() {
    let (root, dir) = setup();
    std::fs::create_dir_all(dir.join("configs")).unwrap();
    std::fs::write(dir.join("configs/nitehawk.config"), "CONFIG_MCU=\"stm32h723xx\"\n").unwrap();
    let out = kflash(&dir, &["config", "nitehawk"]);
    let (_, se) = text(&out);
    assert_eq!(out.status.code(), Some(3), "{se}");
    assert!(se.contains("board 'nitehawk' is an rp2040 but its firmware config"), "{se}");
    assert!(se.contains("help: run `kflash config nitehawk`"), "{se}");
    assert!(!root.path().join("klipper/make-ran").exists(), "make must not run");
}

#[test]
fn menuconfig_result_for_another_mcu_is_rejected_and_previous_restored() {
    let (_root, dir) = setup();
    std::fs::create_dir_all(dir.join("configs")).unwrap();
    let previous = "CONFIG_MCU=\"rp2040\"\n";
    std::fs::write(dir.join("configs/nitehawk.config"), previous).unwrap();
    let out = kflash_tty(&dir, &["config", "nitehawk"], &[("MENU_MCU", "stm32f446xx")]);
    let (_, se) = text(&out);
    assert_eq!(out.status.code(), Some(3), "{se}");
    assert_eq!(std::fs::read_to_string(dir.join("configs/nitehawk.config")).unwrap(), previous);
    let rejected = std::fs::read_to_string(dir.join("configs/nitehawk.config.rejected")).unwrap();
    assert!(rejected.contains("stm32f446xx"), "the user's edit is kept aside");
}

#[test]
fn corrupt_registry_is_reported_and_never_rewritten() {
    let (_root, dir) = setup();
    let broken = "[boards.octopus]\nname = \"Octopus\nmcu = \"x\"\n";
    std::fs::write(dir.join("boards.toml"), broken).unwrap();
    for args in [&["set", "octopus", "--name", "X"][..], &["remove", "octopus", "--yes"], &["config", "octopus"]] {
        let out = kflash(&dir, args);
        let (_, se) = text(&out);
        assert_eq!(out.status.code(), Some(3), "{args:?}: {se}");
        assert!(se.contains("boards.toml:2:"), "names file and line: {se}");
        assert!(!se.contains("panicked") && !se.contains("Error {"), "no panics or Debug dumps: {se}");
        assert_eq!(std::fs::read_to_string(dir.join("boards.toml")).unwrap(), broken);
    }
}

#[test]
fn set_and_remove() {
    let (_root, dir) = setup();
    let out = kflash(&dir, &["set", "octopus", "--name", "Main board", "--method", "make-flash", "--exclude"]);
    assert!(out.status.success(), "{:?}", text(&out));
    let boards = std::fs::read_to_string(dir.join("boards.toml")).unwrap();
    assert!(
        boards.contains("name = \"Main board\"")
            && boards.contains("flash_method = \"make-flash\"")
            && boards.contains("flashable = false"),
        "{boards}"
    );

    let out = kflash(&dir, &["set", "nitehawk", "--name", "main BOARD"]);
    assert_eq!(out.status.code(), Some(4), "duplicate names refused: {:?}", text(&out));

    let out = kflash(&dir, &["set", "octopus", "--method", "dfu"]);
    assert_eq!(out.status.code(), Some(2));

    let out = kflash(&dir, &["remove", "nitehawk"]);
    assert_eq!(out.status.code(), Some(2), "no terminal, no --yes: refused");
    std::fs::create_dir_all(dir.join("configs")).unwrap();
    std::fs::write(dir.join("configs/nitehawk.config"), "CONFIG_MCU=\"rp2040\"\n").unwrap();
    let out = kflash(&dir, &["remove", "nitehawk", "--yes"]);
    let (so, _) = text(&out);
    assert!(out.status.success());
    assert!(so.contains("kept at"), "{so}");
    assert!(dir.join("configs/nitehawk.config").exists());
    assert!(!std::fs::read_to_string(dir.join("boards.toml")).unwrap().contains("nitehawk"));

    let out = kflash(&dir, &["remove", "nitehawk", "--yes"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(text(&out).1.contains("no board with key 'nitehawk'"));
}

#[test]
fn settings_show_set_unset() {
    let (_root, dir) = setup();
    assert!(kflash(&dir, &["settings", "set", "moonraker_api_key", "s3cret"]).status.success());
    assert!(kflash(&dir, &["settings", "set", "timeouts.reconnect_secs", "45"]).status.success());
    let out = kflash(&dir, &["settings", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["moonraker_api_key"], "s3cret");
    assert_eq!(v["timeouts"]["reconnect_secs"], 45);
    let bad = kflash(&dir, &["settings", "set", "timeouts.reconnect_secs", "soon"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(kflash(&dir, &["settings", "unset", "moonraker_api_key"]).status.success());
    let v: serde_json::Value = serde_json::from_slice(&kflash(&dir, &["settings", "--json"]).stdout).unwrap();
    assert!(v.get("moonraker_api_key").is_none());
}

#[test]
fn import_a_kalico_flash_installation() {
    let root = tempfile::tempdir().unwrap();
    let kf = root.path().join("kalico_flash/kflash");
    std::fs::create_dir_all(&kf).unwrap();
    std::fs::write(
        kf.join("devices.json"),
        r#"{"devices": {"octopus-pro-v1-1": {"flash_method": null, "flashable": true, "mcu": "stm32h723",
             "name": "Octopus Pro v1.1", "serial_pattern": "usb-Klipper_stm32h723xx_29001A001151313531383332*"}},
            "global": {"klipper_dir": "~/kalico", "stagger_delay": 2.0}}"#,
    )
    .unwrap();
    let configs = root.path().join("kf-configs");
    std::fs::create_dir_all(configs.join("octopus-pro-v1-1")).unwrap();
    std::fs::write(configs.join("octopus-pro-v1-1/.config"), "CONFIG_MCU=\"stm32h723xx\"\n").unwrap();
    let dir = root.path().join("cfg");
    let out = kflash(
        &dir,
        &["import", root.path().join("kalico_flash").to_str().unwrap(), "--configs", configs.to_str().unwrap()],
    );
    let (so, se) = text(&out);
    assert!(out.status.success(), "{so}{se}");
    assert!(so.contains("boards: octopus-pro-v1-1"), "{so}");
    assert!(so.contains("setting klipper_dir = \"~/kalico\""), "{so}");
    assert!(so.contains("stagger_delay") && so.contains("Skipped"), "{so}");
    assert!(dir.join("configs/octopus-pro-v1-1.config").exists());
    let boards = std::fs::read_to_string(dir.join("boards.toml")).unwrap();
    assert!(boards.contains("serial = \"29001A001151313531383332\""), "{boards}");
}

/// `kflash` alone off a terminal is the usage error it always was (help, exit 2): the
/// dashboard opens only on a terminal, and `kflash dashboard` off one says why.
#[test]
fn bare_kflash_off_a_terminal_prints_usage_and_dashboard_needs_a_terminal() {
    let (_root, dir) = setup();
    let out = Command::new(env!("CARGO_BIN_EXE_kflash")).stdin(std::process::Stdio::null()).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let (_, err) = text(&out);
    assert!(err.contains("Usage: kflash [OPTIONS] <COMMAND>"), "{err}");
    assert!(err.contains("dashboard"), "the command list names the dashboard");
    let out = Command::new(env!("CARGO_BIN_EXE_kflash"))
        .arg("--config-dir")
        .arg(&dir)
        .arg("dashboard")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let (_, err) = text(&out);
    assert!(err.contains("the dashboard needs a terminal"), "{err}");
}

#[test]
fn a_can_node_is_added_by_uuid_and_its_uuid_changed_with_set() {
    let (_root, dir) = setup();
    let add = |extra: &[&str]| {
        let mut args = vec!["add", "--canbus-uuid", "0a1b2c3d4e5f", "--can-interface", "can1", "--name", "EBB36"];
        args.extend_from_slice(extra);
        kflash(&dir, &args)
    };
    let out = add(&[]);
    assert_eq!(out.status.code(), Some(2), "no --mcu: {}", text(&out).1);
    assert!(text(&out).1.contains("needs --mcu"), "{}", text(&out).1);

    let out = add(&["--mcu", "stm32g0b1xx", "--json"]);
    assert!(out.status.success(), "{}", text(&out).1);
    let v: serde_json::Value = serde_json::from_str(&text(&out).0).unwrap();
    assert_eq!((v["key"].as_str(), v["canbus_uuid"].as_str()), (Some("ebb36"), Some("0a1b2c3d4e5f")), "{v}");
    let boards = std::fs::read_to_string(dir.join("boards.toml")).unwrap();
    assert!(boards.contains("canbus_uuid = \"0a1b2c3d4e5f\"") && boards.contains("can_interface = \"can1\""));

    // The same node twice is refused; a bad UUID too.
    let out = kflash(&dir, &["add", "--canbus-uuid", "0A1B2C3D4E5F", "--name", "Other", "--mcu", "stm32g0b1xx"]);
    assert!(!out.status.success() && text(&out).1.contains("already registered as 'ebb36'"), "{}", text(&out).1);
    let out = kflash(&dir, &["add", "--canbus-uuid", "a1b2c3d4e5f", "--name", "Other", "--mcu", "stm32g0b1xx"]);
    assert!(!out.status.success() && text(&out).1.contains("12 hex digits"), "{}", text(&out).1);

    let out = kflash(&dir, &["set", "ebb36", "--canbus-uuid", "112233445566", "--can-interface", ""]);
    assert!(out.status.success(), "{}", text(&out).1);
    let boards = std::fs::read_to_string(dir.join("boards.toml")).unwrap();
    assert!(boards.contains("canbus_uuid = \"112233445566\"") && !boards.contains("can1"), "{boards}");
}
