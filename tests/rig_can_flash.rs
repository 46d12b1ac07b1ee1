//! `kflash flash` of a CAN toolhead on the guest kernel's CAN stack: simulated nodes
//! (`kflash-boardsim can-serve`) on a vcan interface, registered with `kflash add
//! --canbus-uuid`, built by the real make, flashed through the same orchestrator as a USB
//! board (print gate, Klipper stopped and started, bootloader request by UUID, Katapult over
//! CAN, back in Klipper, identify over CAN), and each CAN fault named with what to do.

mod rig_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use rig_support::*;

const EBB_UUID: &str = "0a1b2c3d4e5f";
const SB_UUID: &str = "00000000beef";
const MCU: &str = "stm32g0b1xx";

/// A kflash config dir with the CAN node registered and configured for CAN at 1 Mbit/s.
struct CanFlash {
    _tmp: tempfile::TempDir,
    cfg: PathBuf,
    state: PathBuf,
    cache: PathBuf,
}

impl CanFlash {
    fn new(interface: &str, uuid: &str) -> CanFlash {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = tmp.path().join("cfg");
        let state = tmp.path().join("state");
        let cache = tmp.path().join("cache");
        std::fs::create_dir_all(&cfg).unwrap();
        std::fs::write(
            cfg.join("settings.toml"),
            format!(
                "klipper_dir = \"{}\"\nservice_command = \"sudo -n systemctl\"\n[timeouts]\nbootloader_secs = 5\nreconnect_secs = 10\n",
                klipper_dir().display()
            ),
        )
        .unwrap();
        let f = CanFlash { _tmp: tmp, cfg, state, cache };
        f.add_node("ebb36", "EBB36", interface, uuid);
        f
    }

    /// Register a CAN node as `key` and configure it for CAN at 1 Mbit/s.
    fn add_node(&self, key: &str, name: &str, interface: &str, uuid: &str) {
        let out = self.kflash(&[
            "add",
            "--canbus-uuid",
            uuid,
            "--can-interface",
            interface,
            "--name",
            name,
            "--key",
            key,
            "--mcu",
            MCU,
            "--json",
        ]);
        let entry: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
        assert_eq!((entry["canbus_uuid"].as_str(), entry["can_interface"].as_str()), (Some(uuid), Some(interface)));
        self.configure(key, "1000000");
    }

    fn configure(&self, key: &str, bitrate: &str) {
        let config = self.cfg.join(format!("configs/{key}.config"));
        let _ = std::fs::remove_file(&config);
        let st = Command::new("make")
            .arg("-C")
            .arg(klipper_dir())
            .arg(format!("KCONFIG_CONFIG={}", config.display()))
            .arg(format!("OUT={}/", self.cfg.join(format!("menuconfig-{key}")).display()))
            .arg("menuconfig")
            .env("RIG_MENUCONFIG_MCU", MCU)
            .env("RIG_MENUCONFIG_SET", format!("CONFIG_STM32_MMENU_CANBUS_PB0_PB1=y CONFIG_CANBUS_FREQUENCY={bitrate}"))
            .output()
            .unwrap();
        assert!(st.status.success(), "{}", text(&st.stderr));
        let config = std::fs::read_to_string(&config).unwrap();
        assert!(config.contains(&format!("CONFIG_CANBUS_FREQUENCY={bitrate}")), "{config}");
    }

    fn kflash(&self, args: &[&str]) -> Output {
        Command::new(kflash_bin())
            .arg("--config-dir")
            .arg(&self.cfg)
            .args(args)
            .env("KFLASH_STATE_DIR", &self.state)
            .env("KFLASH_CACHE_DIR", &self.cache)
            .stdin(Stdio::null())
            .output()
            .expect("run kflash")
    }

    fn history(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.state.join("history.jsonl")).unwrap_or_default();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }
}

fn stderr(o: &Output) -> String {
    text(&o.stderr)
}

fn ebb_node(version: &str) -> String {
    format!("ebb,{EBB_UUID},{MCU},{version}")
}

/// The failed run's JSON error (`kind`, `message`, `help`, `exit_code`; on stdout with --json).
fn error_doc(out: &Output) -> serde_json::Value {
    assert!(!out.status.success(), "should fail: {}", text(&out.stdout));
    let doc: serde_json::Value = serde_json::from_str(&text(&out.stdout))
        .unwrap_or_else(|e| panic!("{e}: {} / {}", text(&out.stdout), stderr(out)));
    eprintln!("{}", stderr(out));
    doc["error"].clone()
}

fn exists(p: &Path) -> bool {
    p.exists()
}

/// printer.cfg back to the USB board alone once the CAN node's bus is gone (Klippy would stay
/// in error on a missing interface); restarted, not waited for.
struct KlippyOnUsbOnly;

impl Drop for KlippyOnUsbOnly {
    fn drop(&mut self) {
        write_mcus_json(&[("mcu", OCTOPUS.0)]);
        let _ = Command::new("systemctl").args(["restart", "klipper"]).output();
    }
}

#[test]
#[ignore = "runs inside the USB rig"]
fn a_can_toolhead_is_flashed_end_to_end_with_klipper_stopped_and_restarted() {
    let _clean = begin(&[("mcu", OCTOPUS.0)]);
    let bus = VcanBus::start("vcan-kf2", &[&ebb_node("v0.12.0-old"), &format!("sb,{SB_UUID},{MCU},v0.12.0-old")], &[]);
    // The real Klippy talks to the simulated toolhead over vcan (printer.cfg: canbus_uuid,
    // canbus_interface): level (c) is Klippy's own view of the node.
    let can_mcu = format!("can:{}:{EBB_UUID}", bus.name);
    let _klippy_back = KlippyOnUsbOnly;
    write_mcus_json(&[("mcu", OCTOPUS.0), ("mcu ebb36", &can_mcu)]);
    restart_klipper_and_wait_ready();
    let before = moonraker_get("/printer/objects/query?mcu%20ebb36");
    assert_eq!(before["result"]["status"]["mcu ebb36"]["mcu_version"], "v0.12.0-old", "{before}");
    let f = CanFlash::new(bus.name, EBB_UUID);
    let services = ServiceLog::start();
    let t = std::time::Instant::now();
    let out = f.kflash(&["flash", "ebb36", "--yes", "--json", "--events"]);
    let wall = t.elapsed().as_secs_f64();
    let summary: serde_json::Value =
        serde_json::from_str(&ok(&out)).unwrap_or_else(|e| panic!("{e}: {}", stderr(&out)));
    let version = klipper_tree_version();
    assert_eq!(summary["version_after"], version.as_str(), "identified over CAN: {summary}");
    services.assert_klipper_stopped_and_restarted();
    assert!(klipper_is_active());
    // The simulated node went through Katapult and booted the image written.
    let events = bus.events();
    assert!(events.contains(r#"{"event":"EnteredKatapult","node":"ebb"}"#), "{events}");
    assert!(
        events.contains(r#"{"event":"Booted { app: Klipper, uuid: CanUuid(0a1b2c3d4e5f) }","node":"ebb"}"#),
        "{events}"
    );
    assert!(!events.contains(r#"{"event":"EnteredKatapult","node":"sb"}"#), "the other node untouched: {events}");
    let log = stderr(&out);
    for line in [
        "\"event\":\"can-interface-checked\"",
        "\"event\":\"can-bootloader-requested\"",
        "\"event\":\"written\"",
        "\"event\":\"identified\"",
    ] {
        assert!(log.contains(line), "{line}: {log}");
    }
    assert!(log.contains(r#""event":"klippy-reports","version":""#), "level (c) through Moonraker: {log}");
    let after = moonraker_get("/printer/objects/query?mcu%20ebb36");
    assert_eq!(after["result"]["status"]["mcu ebb36"]["mcu_version"], version.as_str(), "{after}");
    let h = f.history();
    assert_eq!((h.len(), h[0]["result"].as_str()), (1, Some("ok")), "{h:?}");
    eprintln!("CAN flash: wall {wall:.1} s, timings {}", summary["timings"]);
}

#[test]
#[ignore = "runs inside the USB rig"]
fn the_interface_is_checked_before_klipper_is_stopped() {
    let _clean = begin(&[("mcu", OCTOPUS.0)]);
    let bus = VcanBus::start("vcan-kf3", &[&ebb_node("v0.12.0-old")], &[]);
    let f = CanFlash::new(bus.name, EBB_UUID);
    let services = ServiceLog::start();

    let out = run("ip", &["link", "set", bus.name, "txqueuelen", "10"]);
    assert!(out.status.success());
    let doc = error_doc(&f.kflash(&["flash", "ebb36", "--yes", "--json"]));
    assert!(doc["message"].as_str().unwrap().contains("txqueuelen is 10"), "{doc}");
    assert!(doc["help"].as_str().unwrap().contains("sudo ip link set vcan-kf3 txqueuelen 128"), "{doc}");

    assert!(run("ip", &["link", "set", bus.name, "txqueuelen", "128"]).status.success());
    assert!(run("ip", &["link", "set", "down", bus.name]).status.success());
    let doc = error_doc(&f.kflash(&["flash", "ebb36", "--yes", "--json"]));
    assert_eq!(doc["message"], "CAN interface vcan-kf3 is down", "{doc}");
    assert!(doc["help"].as_str().unwrap().contains("sudo ip link set vcan-kf3 up type can bitrate 1000000"), "{doc}");
    assert_eq!(doc["kind"], "can-interface");

    let f2 = CanFlash::new("vcan-none", EBB_UUID);
    assert!(!exists(Path::new("/sys/class/net/vcan-none")));
    let doc = error_doc(&f2.kflash(&["flash", "ebb36", "--yes", "--json"]));
    assert_eq!(doc["message"], "CAN interface vcan-none does not exist", "{doc}");
    assert!(services.verbs("klipper").is_empty(), "Klipper never stopped: {:?}", services.entries());
    assert!(!bus.events().contains("EnteredKatapult"));
}

#[test]
#[ignore = "runs inside the USB rig"]
fn a_node_that_never_reaches_katapult_says_what_to_check() {
    let _clean = begin(&[("mcu", OCTOPUS.0)]);
    let bus = VcanBus::start("vcan-kf4", &[&ebb_node("v0.12.0-old")], &["ebb:never-katapult"]);
    let f = CanFlash::new(bus.name, EBB_UUID);
    let services = ServiceLog::start();
    let doc = error_doc(&f.kflash(&["flash", "ebb36", "--yes", "--json"]));
    let (error, help) = (doc["message"].as_str().unwrap(), doc["help"].as_str().unwrap());
    assert!(error.contains("CAN node 0a1b2c3d4e5f on vcan-kf4 did not reach Katapult"), "{doc}");
    assert!(error.contains("still answers as Klipper"), "{doc}");
    assert!(help.contains("Katapult built for CAN") && help.contains("power-cycle"), "{doc}");
    services.assert_klipper_stopped_and_restarted();
}

#[test]
#[ignore = "runs inside the USB rig"]
fn a_bus_off_during_the_write_leaves_the_node_in_katapult_and_says_so() {
    let _clean = begin(&[("mcu", OCTOPUS.0)]);
    let bus = VcanBus::start("vcan-kf5", &[&ebb_node("v0.12.0-old")], &["ebb:bus-off-after=5"]);
    let f = CanFlash::new(bus.name, EBB_UUID);
    let services = ServiceLog::start();
    let doc = error_doc(&f.kflash(&["flash", "ebb36", "--yes", "--json"]));
    let (error, help) = (doc["message"].as_str().unwrap(), doc["help"].as_str().unwrap());
    assert!(error.contains("stopped answering during SEND_BLOCK"), "{doc}");
    assert!(help.contains("stays in Katapult") && help.contains("bus-off"), "{doc}");
    assert!(bus.events().contains("BusOff"), "{}", bus.events());
    services.assert_klipper_stopped_and_restarted();
}

#[test]
#[ignore = "runs inside the USB rig"]
fn a_node_back_under_a_new_uuid_is_named_with_how_to_update_it() {
    let _clean = begin(&[("mcu", OCTOPUS.0)]);
    let bus = VcanBus::start("vcan-kf6", &[&ebb_node("v0.12.0-old")], &["ebb:uuid-after-flash=112233445566"]);
    let f = CanFlash::new(bus.name, EBB_UUID);
    let services = ServiceLog::start();
    let doc = error_doc(&f.kflash(&["flash", "ebb36", "--yes", "--json"]));
    let (error, help) = (doc["message"].as_str().unwrap(), doc["help"].as_str().unwrap());
    assert!(error.contains("came back running Klipper under a new UUID: 112233445566"), "{doc}");
    assert!(help.contains("canbus_uuid: 112233445566") && help.contains("kflash set KEY --canbus-uuid 112233445566"));
    services.assert_klipper_stopped_and_restarted();

    // What the help says works: the registry takes the new UUID and the next flash passes.
    ok(&f.kflash(&["set", "ebb36", "--canbus-uuid", "112233445566"]));
    let out = f.kflash(&["flash", "ebb36", "--yes", "--force", "--json"]);
    let summary: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(summary["version_after"], klipper_tree_version().as_str());
}

#[test]
#[ignore = "runs inside the USB rig"]
fn two_nodes_answering_one_query_are_named() {
    let _clean = begin(&[("mcu", OCTOPUS.0)]);
    // The other node sits unassigned in Katapult: it answers every query kflash sends while
    // it awaits the toolhead, and the toolhead is knocked off the bus by the collision.
    let bus = VcanBus::start(
        "vcan-kf7",
        &[&ebb_node("v0.12.0-old"), &format!("sb,{SB_UUID},{MCU}")],
        &["ebb:collide-on-query"],
    );
    let f = CanFlash::new(bus.name, EBB_UUID);
    let doc = error_doc(&f.kflash(&["flash", "ebb36", "--yes", "--json"]));
    let (error, help) = (doc["message"].as_str().unwrap(), doc["help"].as_str().unwrap());
    assert!(error.contains("did not answer queries at all"), "{doc}");
    assert!(error.contains("00000000beef Katapult") && error.contains("bus-off"), "{doc}");
    assert!(help.contains("only this node unassigned"), "{doc}");
}

#[test]
#[ignore = "runs inside the USB rig"]
fn dry_run_plans_the_can_node_and_touches_nothing() {
    let _clean = begin(&[("mcu", OCTOPUS.0)]);
    let bus = VcanBus::start("vcan-kf8", &[&ebb_node("v0.12.0-old")], &[]);
    let f = CanFlash::new(bus.name, EBB_UUID);
    let services = ServiceLog::start();
    let out = f.kflash(&["flash-all", "--dry-run", "--json"]);
    let plan: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap_or_else(|e| panic!("{e}: {}", stderr(&out)));
    let boards = plan["boards"].as_array().unwrap();
    assert_eq!(boards.len(), 1, "{plan}");
    assert_eq!((boards[0]["key"].as_str(), boards[0]["mode"].as_str()), (Some("ebb36"), Some("klipper")), "{plan}");
    assert!(services.verbs("klipper").is_empty());
    assert!(!bus.events().contains("EnteredKatapult"));
}

#[test]
#[ignore = "runs inside the USB rig"]
fn devices_can_queries_with_klipper_stopped_and_never_during_a_print() {
    let _clean = begin(&[("mcu", OCTOPUS.0)]);
    let bus = VcanBus::start("vcan-kf9", &[&ebb_node("v0.12.0-old"), &format!("sb,{SB_UUID},{MCU}")], &[]);
    let f = CanFlash::new(bus.name, EBB_UUID);

    // A print runs: the query is refused before Klipper is touched, even with --yes.
    klipper_ready_on(&[("mcu", OCTOPUS.0)]);
    let print = RealPrint::start("benchy.gcode", 4000);
    let services = ServiceLog::start();
    let out = f.kflash(&["devices", "--can", "--yes"]);
    assert_eq!(out.status.code(), Some(10), "{}", stderr(&out));
    assert!(stderr(&out).contains("printing"), "{}", stderr(&out));
    assert!(services.verbs("klipper").is_empty(), "{:?}", services.entries());
    assert!(!bus.events().contains("QueryAnswered"), "no query went out: {}", bus.events());
    print.cancel();
    drop(print);

    let services = ServiceLog::start();
    let out = f.kflash(&["devices", "--can", "--yes", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap_or_else(|e| panic!("{e}: {}", stderr(&out)));
    services.assert_klipper_stopped_and_restarted();
    assert!(v["interfaces"].as_array().unwrap().iter().any(|i| i == bus.name), "{v}");
    let mut on_bus: Vec<String> = v["queried"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["interface"] == bus.name)
        .map(|n| format!("{} {} {}", n["uuid"].as_str().unwrap(), n["application"], n["registered"]))
        .collect();
    on_bus.sort();
    assert_eq!(on_bus, [r#"00000000beef "Katapult" null"#, r#"0a1b2c3d4e5f "Klipper" "ebb36""#], "{v}");
    assert_eq!(v["configured"], serde_json::json!([]), "printer.cfg names no CAN node: {v}");
}

#[test]
#[ignore = "runs inside the USB rig"]
fn flash_all_flashes_two_toolheads_on_one_bus_inside_one_klipper_stop() {
    let _clean = begin(&[("mcu", OCTOPUS.0)]);
    let bus = VcanBus::start("vcan-kfa", &[&ebb_node("v0.12.0-old"), &format!("sb,{SB_UUID},{MCU},v0.12.0-old")], &[]);
    let f = CanFlash::new(bus.name, EBB_UUID);
    f.add_node("sb2209", "SB2209", bus.name, SB_UUID);
    let services = ServiceLog::start();
    let out = f.kflash(&["flash-all", "--yes", "--all", "--json"]);
    let report: serde_json::Value =
        serde_json::from_str(&text(&out.stdout)).unwrap_or_else(|e| panic!("{e}: {}", stderr(&out)));
    assert!(out.status.success(), "{report}\n{}", stderr(&out));
    let version = klipper_tree_version();
    let boards = report["boards"].as_array().unwrap();
    assert_eq!(boards.len(), 2, "{report}");
    for b in boards {
        assert_eq!(
            (b["flash"].as_str(), b["version_after"].as_str()),
            (Some("flashed"), Some(version.as_str())),
            "{b}"
        );
    }
    assert_eq!(services.verbs("klipper"), ["stop", "start"], "one stop for both");
    let events = bus.events();
    for node in ["ebb", "sb"] {
        let booted = format!(r#"{{"event":"EnteredKatapult","node":"{node}"}}"#);
        assert!(events.contains(&booted), "{node}: {events}");
    }
    eprintln!("flash-all of two CAN toolheads: Klipper down {} s", report["klipper_downtime_secs"]);
}
