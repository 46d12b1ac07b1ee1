use super::*;
use crate::identity::{BoardIdentity, DeviceRecord};
use crate::locator::Locator;

fn entry(key: &str, name: &str, serial: &str) -> BoardEntry {
    BoardEntry {
        key: key.into(),
        name: name.into(),
        mcu: "stm32h723xx".into(),
        serial: Some(serial.into()),
        serial_pattern: None,
        flash_method: FlashMethod::Default,
        flashable: true,
        canbus_uuid: None,
        can_interface: None,
    }
}

fn identity(vendor: &str, pid: &str, mcu: &str, serial: &str) -> BoardIdentity {
    let props = [
        ("ID_BUS", "usb".to_string()),
        ("ID_USB_VENDOR", vendor.to_string()),
        ("ID_USB_VENDOR_ID", "1d50".to_string()),
        ("ID_USB_MODEL_ID", pid.to_string()),
        ("ID_USB_MODEL", mcu.to_string()),
        ("ID_USB_SERIAL_SHORT", serial.to_string()),
        ("DEVLINKS", format!("/dev/serial/by-id/usb-{vendor}_{mcu}_{serial}-if00")),
    ];
    BoardIdentity::from_record(&DeviceRecord {
        syspath: "/sys/devices/platform/dummy_hcd.0/usb1/1-1/1-1:1.0/tty/ttyACM0".into(),
        subsystem: "tty".into(),
        devnode: Some("/dev/ttyACM0".into()),
        properties: props.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
    })
    .unwrap()
}

#[test]
fn round_trip_boards_and_settings() {
    let dir = tempfile::tempdir().unwrap();
    let mut reg = Registry::open(dir.path()).unwrap();
    assert_eq!(reg.boards().count(), 0);
    assert_eq!(reg.settings, Settings::default());

    let mut b = entry("octopus", "Octopus Pro", "29001A001151313531383332");
    b.flash_method = FlashMethod::MakeFlash;
    b.flashable = false;
    reg.add(b.clone()).unwrap();
    let mut p = entry("nhk", "Nitehawk", "x");
    p.serial = None;
    p.mcu = "rp2040".into();
    p.serial_pattern = Some("usb-Klipper_rp2040_E661640843545B2E*".into());
    reg.add(p.clone()).unwrap();
    reg.settings = reg.settings.with_value("timeouts.build_secs", "900").unwrap();
    reg.settings = reg.settings.with_value("moonraker_api_key", "abc123").unwrap();
    reg.save_boards().unwrap();
    reg.save_settings().unwrap();

    let again = Registry::open(dir.path()).unwrap();
    assert_eq!(again.get("octopus").unwrap(), &b);
    assert_eq!(again.get("nhk").unwrap(), &p);
    assert_eq!(again.settings.timeouts.build_secs, 900);
    assert_eq!(again.settings.moonraker_api_key.as_deref(), Some("abc123"));
    assert_eq!(again.settings, reg.settings);
}

#[test]
fn corrupt_file_names_line_and_column_and_is_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(BOARDS_FILE);
    let text = "[boards.octopus]\nname = \"Octopus\"\nmcu = stm32h723xx\n";
    std::fs::write(&path, text).unwrap();
    let err = Registry::open(dir.path()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.starts_with(&format!("{}:3:7:", path.display())), "{msg}");
    assert!(err.help().unwrap().contains("will not rewrite"));
    assert_eq!(err.exit_code(), crate::error::exit::CONFIG);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
}

#[test]
fn unknown_key_is_refused_with_expected_fields() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(BOARDS_FILE);
    let text = "[boards.octopus]\nname = \"Octopus\"\nmcu = \"stm32h723xx\"\nserial = \"1\"\ncolour = \"red\"\n";
    std::fs::write(&path, text).unwrap();
    let msg = Registry::open(dir.path()).unwrap_err().to_string();
    assert!(msg.contains(":5:1:"), "{msg}");
    assert!(msg.contains("unknown field `colour`"), "{msg}");
    assert!(msg.contains("serial_pattern"), "lists what is expected: {msg}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);

    let spath = dir.path().join(SETTINGS_FILE);
    std::fs::write(&path, "").unwrap();
    std::fs::write(&spath, "klipper_dri = \"/x\"\n").unwrap();
    let msg = Registry::open(dir.path()).unwrap_err().to_string();
    assert!(msg.contains("settings.toml:1:1: unknown field `klipper_dri`"), "{msg}");
}

#[test]
fn invalid_entries_are_refused_on_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(BOARDS_FILE);
    std::fs::write(&path, "[boards.Bad]\nname = \"x\"\nmcu = \"rp2040\"\nserial = \"1\"\n").unwrap();
    let msg = Registry::open(dir.path()).unwrap_err().to_string();
    assert!(msg.contains("board key 'Bad'"), "{msg}");
    std::fs::write(&path, "[boards.a]\nname = \"x\"\nmcu = \"rp2040\"\n").unwrap();
    let msg = Registry::open(dir.path()).unwrap_err().to_string();
    assert!(msg.contains("needs `serial` or `serial_pattern`"), "{msg}");
    std::fs::write(&path, "[boards.a]\nname = \"X\"\nmcu = \"rp2040\"\nserial=\"1\"\n[boards.b]\nname = \"x\"\nmcu = \"rp2040\"\nserial=\"2\"\n").unwrap();
    let msg = Registry::open(dir.path()).unwrap_err().to_string();
    assert!(msg.contains("same name"), "{msg}");
}

#[test]
fn settings_values_are_validated() {
    let s = Settings::default();
    assert!(s.with_value("timeouts.build_secs", "abc").is_err());
    assert!(s.with_value("nonsense", "1").is_err());
    assert!(s.with_value("moonraker_url", "localhost:7125").is_err());
    assert!(s.with_value("default_flash_method", "default").is_err());
    let s2 = s.with_value("default_flash_method", "make-flash").unwrap();
    assert_eq!(s2.default_flash_method, FlashMethod::MakeFlash);
    let s3 = s.with_value("klipper_dir", "/home/pi/kalico").unwrap();
    assert_eq!(s3.klipper_dir(), PathBuf::from("/home/pi/kalico"));
}

#[test]
fn add_refuses_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let mut reg = Registry::open(dir.path()).unwrap();
    reg.add(entry("a", "Octopus", "1")).unwrap();
    assert!(matches!(reg.add(entry("a", "Other", "2")), Err(Error::BoardConflict(_))));
    assert!(matches!(reg.add(entry("b", "octopus", "2")), Err(Error::BoardConflict(_))));
    assert!(matches!(reg.add(entry("c", "Third", "1")), Err(Error::BoardConflict(_))));
    assert_eq!(reg.key_for_name("A").unwrap(), "a-2");
}

#[test]
fn entries_match_in_every_mode() {
    let by_serial = entry("octopus", "Octopus", "29001A001151313531383332");
    assert!(by_serial.matches(&identity("Klipper", "614e", "stm32h723xx", "29001A001151313531383332")));
    assert!(by_serial.matches(&identity("katapult", "6177", "stm32h723xx", "29001A001151313531383332")));
    assert!(!by_serial.matches(&identity("Klipper", "614e", "stm32h723xx", "0D0031000A51333234383230")));
    assert!(!by_serial.matches(&identity("Klipper", "614e", "rp2040", "29001A001151313531383332")));

    let mut by_pattern = entry("nhk", "Nitehawk", "");
    by_pattern.serial = None;
    by_pattern.mcu = "rp2040".into();
    by_pattern.serial_pattern = Some("usb-Klipper_rp2040_E661640843545B2E*".into());
    assert!(by_pattern.matches(&identity("Klipper", "614e", "rp2040", "E661640843545B2E")));
    assert!(by_pattern.matches(&identity("katapult", "6177", "rp2040", "E661640843545B2E")));
    assert!(by_pattern.matches(&identity("CanBoot", "6177", "rp2040", "E661640843545B2E")));
    assert!(!by_pattern.matches(&identity("Klipper", "614e", "rp2040", "AAAA")));
}

#[test]
fn mcu_prefix_match_is_bidirectional() {
    assert!(mcu_compatible("stm32h723", "stm32h723xx"));
    assert!(mcu_compatible("STM32H723XX", "stm32h723"));
    assert!(!mcu_compatible("stm32h723xx", "stm32f446xx"));
    assert!(!mcu_compatible("", "rp2040"));
}

#[test]
fn serial_pattern_like_the_original() {
    assert_eq!(
        serial_pattern_for("usb-Klipper_stm32h723xx_29001A001151313531383332-if00"),
        "usb-Klipper_stm32h723xx_29001A001151313531383332*"
    );
}

#[test]
fn blocked_devices() {
    let mut s = Settings::default();
    assert!(s.blocked_reason("usb-Beacon_Beacon_RevH_FC2690EC5157355854202020FF0A1A3B-if00").is_some());
    assert!(s.blocked_reason("usb-Klipper_rp2040_X-if00").is_none());
    s.blocked.push(BlockedPattern { pattern: "usb-Klipper_rp2040_*".into(), reason: Some("toolhead".into()) });
    assert_eq!(s.blocked_reason("usb-Klipper_rp2040_X-if00").as_deref(), Some("toolhead"));
}

const DEVICES_JSON: &str = r#"{
  "blocked_devices": ["usb-foo_*", {"pattern": "usb-bar_*", "reason": "a bar"}],
  "devices": {
    "octopus-pro-v1-1": {"flash_method": null, "flashable": true, "mcu": "stm32h723",
      "name": "Octopus Pro v1.1", "serial_pattern": "usb-Klipper_stm32h723xx_29001A001151313531383332*"},
    "nitehawk": {"flash_method": "make_flash", "flashable": false, "mcu": "rp2040",
      "name": "Nitehawk", "serial_pattern": "usb-Klipper_rp2040_E661640843545B2E*"},
    "broken": {"mcu": "rp2040", "serial_pattern": "usb-Klipper_rp2040_1*"}
  },
  "global": {"allow_flash_fallback": false, "default_flash_method": "katapult",
    "katapult_dir": "~/katapult", "klipper_dir": "~/kalico", "return_delay": 5.0,
    "skip_menuconfig": false, "stagger_delay": 2.0}
}"#;

#[test]
fn import_from_kalico_flash() {
    let src = tempfile::tempdir().unwrap();
    let json = src.path().join("kflash").join("devices.json");
    std::fs::create_dir_all(json.parent().unwrap()).unwrap();
    std::fs::write(&json, DEVICES_JSON).unwrap();
    let configs = src.path().join("configs");
    std::fs::create_dir_all(configs.join("octopus-pro-v1-1")).unwrap();
    std::fs::write(configs.join("octopus-pro-v1-1/.config"), "CONFIG_MCU=\"stm32h723xx\"\n").unwrap();

    assert_eq!(import::resolve_source(src.path()).as_deref(), Some(json.as_path()));

    let dir = tempfile::tempdir().unwrap();
    let mut reg = Registry::open(dir.path()).unwrap();
    let report = import::import_kalico_flash(&mut reg, &json, &configs, false).unwrap();
    assert_eq!(report.boards, vec!["nitehawk".to_string(), "octopus-pro-v1-1".to_string()]);
    assert!(report.skipped.iter().any(|s| s.starts_with("board 'broken': no name")), "{:?}", report.skipped);
    assert!(report.skipped.iter().any(|s| s.contains("stagger_delay")), "{:?}", report.skipped);
    assert_eq!(report.configs.len(), 1);

    let reg = Registry::open(dir.path()).unwrap();
    let o = reg.get("octopus-pro-v1-1").unwrap();
    assert_eq!(o.mcu, "stm32h723xx", "full MCU recovered from the pattern");
    assert_eq!(o.serial.as_deref(), Some("29001A001151313531383332"));
    let n = reg.get("nitehawk").unwrap();
    assert_eq!((n.flash_method, n.flashable), (FlashMethod::MakeFlash, false));
    assert_eq!(reg.settings.klipper_dir, "~/kalico");
    assert!(!reg.settings.allow_flash_fallback);
    assert_eq!(reg.settings.blocked.len(), 2);
    assert_eq!(std::fs::read_to_string(reg.config_path("octopus-pro-v1-1")).unwrap(), "CONFIG_MCU=\"stm32h723xx\"\n");

    // A second import takes nothing twice.
    let mut reg = reg;
    let again = import::import_kalico_flash(&mut reg, &json, &configs, false).unwrap();
    assert!(again.boards.is_empty());
    assert!(again.skipped.iter().any(|s| s.contains("already registered")));
}

#[test]
fn import_of_corrupt_json_writes_nothing() {
    let src = tempfile::tempdir().unwrap();
    let json = src.path().join("devices.json");
    std::fs::write(&json, "{\"devices\": {").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut reg = Registry::open(dir.path()).unwrap();
    let err = import::import_kalico_flash(&mut reg, &json, src.path(), false).unwrap_err();
    assert!(err.to_string().contains("devices.json:1:"), "{err}");
    assert!(!dir.path().join(BOARDS_FILE).exists());
}

#[test]
fn unreviewed_marks_round_trip_and_old_files_still_load() {
    let dir = tempfile::tempdir().unwrap();
    // A boards.toml from before profiles: no table for the marks, every config reviewed.
    std::fs::write(
        dir.path().join(BOARDS_FILE),
        "[boards.octopus]\nname = \"Octopus\"\nmcu = \"stm32h723xx\"\nserial = \"1\"\n",
    )
    .unwrap();
    let mut reg = Registry::open(dir.path()).unwrap();
    assert_eq!(reg.unreviewed_profile("octopus"), None);
    assert!(reg.mark_unreviewed("ghost", "p").is_err(), "only a registered board is marked");
    reg.mark_unreviewed("octopus", "btt-octopus-pro-h723").unwrap();
    reg.save_boards().unwrap();
    let text = std::fs::read_to_string(dir.path().join(BOARDS_FILE)).unwrap();
    assert!(text.contains("[unreviewed_configs]\noctopus = \"btt-octopus-pro-h723\""), "{text}");
    let mut reg = Registry::open(dir.path()).unwrap();
    assert_eq!(reg.unreviewed_profile("octopus"), Some("btt-octopus-pro-h723"));
    assert!(reg.mark_reviewed("octopus"));
    assert!(!reg.mark_reviewed("octopus"), "already reviewed");
    reg.save_boards().unwrap();
    let text = std::fs::read_to_string(dir.path().join(BOARDS_FILE)).unwrap();
    assert!(!text.contains("unreviewed"), "an empty table is not written: {text}");
}

#[test]
fn removing_a_board_drops_its_mark_and_a_stale_mark_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(BOARDS_FILE),
        "[boards.a]\nname = \"A\"\nmcu = \"rp2040\"\nserial = \"1\"\n[boards.b]\nname = \"B\"\nmcu = \"rp2040\"\nserial = \"2\"\n\n[unreviewed_configs]\na = \"rp2040-pico\"\nb = \"rp2040-pico\"\ngone = \"rp2040-pico\"\n",
    )
    .unwrap();
    let mut reg = Registry::open(dir.path()).unwrap();
    assert_eq!(reg.unreviewed_profile("gone"), None);
    reg.remove("a").unwrap();
    assert_eq!(reg.unreviewed_profile("a"), None);
    reg.save_boards().unwrap();
    let text = std::fs::read_to_string(dir.path().join(BOARDS_FILE)).unwrap();
    assert!(text.contains("[unreviewed_configs]\nb = \"rp2040-pico\"\n") && !text.contains("gone"), "{text}");
    // The marks table is checked like the rest of the file.
    std::fs::write(dir.path().join(BOARDS_FILE), "[unreviewed_configs]\na = 1\n").unwrap();
    assert!(Registry::open(dir.path()).is_err());
}

fn can_entry(key: &str, name: &str, uuid: &str) -> BoardEntry {
    BoardEntry {
        key: key.into(),
        name: name.into(),
        mcu: "stm32g0b1xx".into(),
        serial: None,
        serial_pattern: None,
        flash_method: FlashMethod::Default,
        flashable: true,
        canbus_uuid: Some(uuid.parse().unwrap()),
        can_interface: None,
    }
}

#[test]
fn can_boards_round_trip_and_are_located_on_their_bus() {
    let dir = tempfile::tempdir().unwrap();
    let mut reg = Registry::open(dir.path()).unwrap();
    let ebb = can_entry("ebb", "EBB36", "0a1b2c3d4e5f");
    let mut sb = can_entry("sb2209", "SB2209", "00000000beef");
    sb.can_interface = Some("can1".into());
    // A USB-to-CAN bridge: a USB board whose own CAN node has the UUID hashed from its serial.
    let mut bridge = entry("octopus", "Octopus", "2D0028000B51333234383230");
    bridge.canbus_uuid = crate::can::bridge::uuid_from_usb_serial("2D0028000B51333234383230");
    for b in [&ebb, &sb, &bridge] {
        reg.add(b.clone()).unwrap();
    }
    reg.save_boards().unwrap();
    let text = std::fs::read_to_string(dir.path().join(BOARDS_FILE)).unwrap();
    assert!(text.contains("canbus_uuid = \"0a1b2c3d4e5f\""), "{text}");
    assert!(text.contains("canbus_uuid = \"00000000beef\""), "leading zeros kept: {text}");
    assert!(text.contains("can_interface = \"can1\""), "{text}");
    assert_eq!(text.matches("can_interface").count(), 1, "the default interface is not written: {text}");

    let again = Registry::open(dir.path()).unwrap();
    assert_eq!(again.get("ebb").unwrap(), &ebb);
    assert_eq!(again.get("sb2209").unwrap(), &sb);
    assert_eq!(again.get("octopus").unwrap(), &bridge);
    assert_eq!(
        again.get("ebb").unwrap().locator(),
        Locator::Can { interface: "can0".into(), uuid: "0a1b2c3d4e5f".parse().unwrap() }
    );
    assert_eq!(again.get("sb2209").unwrap().locator().to_string(), "CAN can1 uuid 00000000beef");
    let b = again.get("octopus").unwrap();
    assert!(matches!(b.locator(), Locator::Usb { .. }), "a bridge is flashed over USB");
    assert!(b.is_can_bridge() && !again.get("ebb").unwrap().is_can_bridge());
    assert_eq!(b.canbus_uuid.unwrap().to_string(), "f3f4159b80a6");
    // A CAN node never matches a USB device.
    assert!(!again.get("ebb").unwrap().matches(&identity("Klipper", "614e", "stm32g0b1xx", "0a1b2c3d4e5f")));
}

#[test]
fn an_old_boards_file_loads_and_saves_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let old = format!(
        "{BOARDS_HEADER}[boards.octopus]\nname = \"Octopus Pro\"\nmcu = \"stm32h723xx\"\nserial = \"29001A001151313531383332\"\nflash_method = \"make-flash\"\nflashable = false\n"
    );
    std::fs::write(dir.path().join(BOARDS_FILE), &old).unwrap();
    let reg = Registry::open(dir.path()).unwrap();
    let b = reg.get("octopus").unwrap();
    assert_eq!((b.canbus_uuid, b.can_interface.as_deref(), b.can_interface()), (None, None, "can0"));
    reg.save_boards().unwrap();
    assert_eq!(std::fs::read_to_string(dir.path().join(BOARDS_FILE)).unwrap(), old);
}

#[test]
fn bad_can_fields_are_refused_on_load() {
    for (body, says) in [
        ("canbus_uuid = \"12345\"", "12 hex digits"),
        ("canbus_uuid = \"0a1b2c3d4e5f\"\ncan_interface = \"can 0\"", "not a network interface name"),
        ("", "canbus_uuid"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let text = format!("[boards.ebb]\nname = \"EBB\"\nmcu = \"stm32g0b1xx\"\n{body}\n");
        std::fs::write(dir.path().join(BOARDS_FILE), &text).unwrap();
        let err = Registry::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains(says), "{body}: {err}");
        assert_eq!(std::fs::read_to_string(dir.path().join(BOARDS_FILE)).unwrap(), text, "left untouched");
    }
}
