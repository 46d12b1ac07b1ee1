//! Flashing Klipper's USB-to-CAN bridge with the boards behind it: the simulated bridge is a
//! real gs_usb device (`kflash-boardsim gs-usb-bridge`, FunctionFS on the unplugged cubic's
//! UDC) with its own CAN node, the toolheads sit on a vcan "wire" behind it, the guest's
//! gs_usb driver makes can0, and the real Klippy talks to all of them through can0. The
//! bridge's reboot removes can0: kflash flashes it last, awaits it on USB in Katapult, writes
//! it, awaits gs_usb and can0 back and UP (bringing it up itself), identifies it over CAN, and
//! only then starts Klipper.

mod rig_support;

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use rig_support::*;

const EBB_UUID: &str = "0a1b2c3d4e5f";
const SB_UUID: &str = "00000000beef";
const MCU: &str = "stm32g0b1xx";
/// The bridge's chip id as USB serial; its CAN UUID is the hash Klipper computes from it.
const BRIDGE_SERIAL: &str = "2D0028000B51333234383230";
const BRIDGE_UUID: &str = "f3f4159b80a6";
const WIRE: &str = "vcan-bwire";

/// The toolheads' wire and the bridge in front of it; removed on drop (bridge first), then the
/// boards reset and printer.cfg back to the octopus alone.
struct Rig {
    // Dropped in this order, after the bridge is stopped: printer.cfg first, then the reset.
    _klippy: KlippyOnUsbOnly,
    _clean: LeaveRigClean,
    wire: VcanBus,
    bridge: Child,
    events: mpsc::Receiver<serde_json::Value>,
    seen: Vec<serde_json::Value>,
}

impl Rig {
    fn start(nodes: &[&str], bridge_faults: &[&str]) -> Rig {
        let clean = begin(&[("mcu", OCTOPUS.0)]);
        let klippy = KlippyOnUsbOnly;
        // The bridge takes the cubic's UDC: the cubic stays unplugged meanwhile.
        if board_json(MMB.0)["plugged"] != false {
            boardctl(&["unplug", MMB.0]);
        }
        settle();
        let wire = VcanBus::start(WIRE, nodes, &[]);
        let udc = free_udc();
        let mut cmd = Command::new("kflash-boardsim");
        cmd.args(["gs-usb-bridge", "--udc", &udc, "--wire", WIRE, "--serial", BRIDGE_SERIAL, "--product", MCU]);
        cmd.args(["--version", "v0.12.0-old"]);
        for f in bridge_faults {
            cmd.args(["--fault", f]);
        }
        let mut bridge = cmd.stdout(Stdio::piped()).spawn().expect("kflash-boardsim gs-usb-bridge");
        let events = json_lines(bridge.stdout.take().unwrap());
        let mut rig = Rig { _klippy: klippy, _clean: clean, wire, bridge, events, seen: Vec::new() };
        let ready = rig.expect("ready", 30);
        assert_eq!(ready["uuid"], BRIDGE_UUID, "the bridge's UUID is the hash of its serial: {ready}");
        rig.expect("bridge-usb", 30);
        rig
    }

    /// The next bridge event named `name` (others are kept), within `secs`.
    fn expect(&mut self, name: &str, secs: u64) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let got = self.events.recv_timeout(deadline.saturating_duration_since(Instant::now()));
            if let Ok(v) = &got {
                eprintln!("bridge: {v}");
                self.seen.push(v.clone());
            }
            match got {
                Ok(v) if v["event"] == name => return v,
                Ok(_) => {}
                Err(e) => panic!("no '{name}' bridge event within {secs} s ({e}); dmesg:\n{}", dmesg_tail(30)),
            }
        }
    }

    /// Every bridge event so far.
    fn drain(&mut self) -> Vec<serde_json::Value> {
        while let Ok(v) = self.events.try_recv() {
            self.seen.push(v);
        }
        self.seen.clone()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = run("kill", &["-TERM", &self.bridge.id().to_string()]);
        let _ = self.bridge.wait();
    }
}

/// printer.cfg back to the USB board alone (Klippy would stay in error on a missing can0).
struct KlippyOnUsbOnly;

impl Drop for KlippyOnUsbOnly {
    fn drop(&mut self) {
        write_mcus_json(&[("mcu", OCTOPUS.0)]);
        let _ = Command::new("systemctl").args(["restart", "klipper"]).output();
    }
}

/// can0 from the gs_usb driver, up at 1 Mbit/s with txqueuelen 128 (as the user's
/// interfaces file would have it).
fn can0_up() -> String {
    settle();
    let ifaces = gs_usb_interfaces();
    assert_eq!(ifaces, ["can0"], "one CAN interface from gs_usb\n{}", dmesg_tail(30));
    for args in [
        &["link", "set", "can0", "type", "can", "bitrate", "1000000"][..],
        &["link", "set", "can0", "txqueuelen", "128"],
        &["link", "set", "can0", "up"],
    ] {
        let out = run("ip", args);
        assert!(out.status.success(), "ip {args:?}: {}", text(&out.stderr));
    }
    "can0".into()
}

/// A kflash config dir: the bridge (registered from USB, first on purpose) and two toolheads
/// behind it, all configured for CAN at 1 Mbit/s.
struct Kflash {
    _tmp: tempfile::TempDir,
    cfg: PathBuf,
    state: PathBuf,
    cache: PathBuf,
}

impl Kflash {
    fn new() -> Kflash {
        let tmp = tempfile::tempdir().unwrap();
        let (cfg, state, cache) = (tmp.path().join("cfg"), tmp.path().join("state"), tmp.path().join("cache"));
        std::fs::create_dir_all(&cfg).unwrap();
        std::fs::write(
            cfg.join("settings.toml"),
            format!(
                "klipper_dir = \"{}\"\nservice_command = \"sudo -n systemctl\"\n[timeouts]\nbootloader_secs = 10\nreconnect_secs = 20\n",
                klipper_dir().display()
            ),
        )
        .unwrap();
        let k = Kflash { _tmp: tmp, cfg, state, cache };
        let entry: serde_json::Value = serde_json::from_str(&ok(&k.run(&[
            "add",
            "--device",
            BRIDGE_SERIAL,
            "--name",
            "U2C",
            "--key",
            "bridge",
            "--json",
        ])))
        .unwrap();
        assert_eq!(
            (entry["canbus_uuid"].as_str(), entry["can_interface"].as_str(), entry["serial"].as_str()),
            (Some(BRIDGE_UUID), Some("can0"), Some(BRIDGE_SERIAL)),
            "registered with its UUID and the interface it provides: {entry}"
        );
        k.configure("bridge", "CONFIG_STM32_USBCANBUS_PA11_PA12=y");
        for (key, name, uuid) in [("ebb36", "EBB36", EBB_UUID), ("sb2209", "SB2209", SB_UUID)] {
            let out = k.run(&[
                "add",
                "--canbus-uuid",
                uuid,
                "--can-interface",
                "can0",
                "--name",
                name,
                "--key",
                key,
                "--mcu",
                MCU,
                "--json",
            ]);
            ok(&out);
            k.configure(key, "CONFIG_STM32_MMENU_CANBUS_PB0_PB1=y");
        }
        k
    }

    fn configure(&self, key: &str, transport: &str) {
        let config = self.cfg.join(format!("configs/{key}.config"));
        let _ = std::fs::remove_file(&config);
        let st = Command::new("make")
            .arg("-C")
            .arg(klipper_dir())
            .arg(format!("KCONFIG_CONFIG={}", config.display()))
            .arg(format!("OUT={}/", self.cfg.join(format!("menuconfig-{key}")).display()))
            .arg("menuconfig")
            .env("RIG_MENUCONFIG_MCU", MCU)
            .env("RIG_MENUCONFIG_SET", format!("{transport} CONFIG_CANBUS_FREQUENCY=1000000"))
            .output()
            .unwrap();
        assert!(st.status.success(), "{}", text(&st.stderr));
        let config = std::fs::read_to_string(&config).unwrap();
        assert!(config.contains("CONFIG_CANBUS_FREQUENCY=1000000"), "{config}");
    }

    fn run(&self, args: &[&str]) -> Output {
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
}

fn node(name: &str, uuid: &str) -> String {
    format!("{name},{uuid},{MCU},v0.12.0-old")
}

/// printer.cfg with the octopus, the bridge and both toolheads (all through can0); Klippy ready.
fn klippy_on_everything() {
    let can = |uuid: &str| format!("can:can0:{uuid}");
    write_mcus_json(&[
        ("mcu", OCTOPUS.0),
        ("mcu bridge", &can(BRIDGE_UUID)),
        ("mcu ebb36", &can(EBB_UUID)),
        ("mcu sb2209", &can(SB_UUID)),
    ]);
    restart_klipper_and_wait_ready();
}

fn mcu_version(section: &str) -> serde_json::Value {
    let v = moonraker_get(&format!("/printer/objects/query?{}", section.replace(' ', "%20")));
    v["result"]["status"][section]["mcu_version"].clone()
}

/// can0's link announcements with their wall-clock time (the stand-in systemctl.log's clock),
/// from the kernel, recorded by a thread until the test ends.
fn watch_can0() -> Arc<Mutex<Vec<(f64, bool, bool)>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let kept = seen.clone();
    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            use kflash::can::presence::Link;
            let mut w = kflash::can::linkwatch::LinkWatch::open().unwrap();
            let _ = ready_tx.send(());
            while let Ok(changes) = w.next().await {
                for (_, link) in changes.into_iter().filter(|(name, _)| name == "can0") {
                    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
                    kept.lock().unwrap().push((now.as_secs_f64(), link == Link::Up, link == Link::Absent));
                }
            }
        });
    });
    ready_rx.recv().unwrap();
    seen
}

/// kflash's `--events` lines (stderr), as JSON.
fn event_stream(out: &Output) -> Vec<serde_json::Value> {
    text(&out.stderr).lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).collect()
}

fn position(events: &[serde_json::Value], board: Option<&str>, event: &str) -> usize {
    events
        .iter()
        .rposition(|e| e["event"] == event && board.is_none_or(|b| e["board"] == b))
        .unwrap_or_else(|| panic!("no {event} of {board:?} in {events:#?}"))
}

#[test]
#[ignore = "runs inside the USB rig"]
fn flash_all_flashes_the_toolheads_then_the_bridge_and_starts_klipper_once_can0_is_up() {
    let mut rig = Rig::start(&[&node("ebb", EBB_UUID), &node("sb", SB_UUID)], &[]);
    can0_up();
    klippy_on_everything();
    assert_eq!(mcu_version("mcu bridge"), "v0.12.0-old", "Klippy talks to the bridge's own node");
    assert_eq!(mcu_version("mcu ebb36"), "v0.12.0-old");
    let k = Kflash::new();

    // devices: the bridge, its UUID and the interface it provides.
    let v: serde_json::Value = serde_json::from_str(&ok(&k.run(&["devices", "--json"]))).unwrap();
    let bridges = v["bridges"].as_array().unwrap();
    assert_eq!(bridges.len(), 1, "{v}");
    assert_eq!(
        (bridges[0]["key"].as_str(), bridges[0]["canbus_uuid"].as_str(), bridges[0]["interface"].as_str()),
        (Some("bridge"), Some(BRIDGE_UUID), Some("can0")),
        "{v}"
    );

    // --dry-run: the bridge after every board behind it, nothing touched.
    let services = ServiceLog::start();
    let plan: serde_json::Value = serde_json::from_str(&ok(&k.run(&["flash-all", "--dry-run", "--json"]))).unwrap();
    let order: Vec<&str> = plan["boards"].as_array().unwrap().iter().map(|b| b["key"].as_str().unwrap()).collect();
    assert_eq!(order, ["ebb36", "sb2209", "bridge"], "{plan}");
    assert_eq!(plan["boards"][2]["provides"], "can0", "{plan}");
    assert_eq!(plan["boards"][2]["running"], "v0.12.0-old", "read from Klippy by its UUID: {plan}");
    assert!(services.verbs("klipper").is_empty());
    let human = text(&k.run(&["flash-all", "--dry-run"]).stdout);
    assert!(human.contains("bridge (U2C), USB-to-CAN bridge for can0"), "{human}");

    let can0 = watch_can0();
    let services = ServiceLog::start();
    let t = Instant::now();
    let out = k.run(&["flash-all", "--yes", "--all", "--json", "--events"]);
    let wall = t.elapsed().as_secs_f64();
    let report: serde_json::Value =
        serde_json::from_str(&text(&out.stdout)).unwrap_or_else(|e| panic!("{e}: {}", text(&out.stderr)));
    assert!(out.status.success(), "{report}\n{}", text(&out.stderr));
    let version = klipper_tree_version();
    let boards = report["boards"].as_array().unwrap();
    assert_eq!(boards.len(), 3, "{report}");
    for b in boards {
        assert_eq!(
            (b["flash"].as_str(), b["version_after"].as_str()),
            (Some("flashed"), Some(version.as_str())),
            "{b}"
        );
    }
    assert_eq!(services.verbs("klipper"), ["stop", "start"], "one stop for all three");

    // The order, from kflash's own event stream: both toolheads done before the bridge's
    // bootloader request; can0 back and up before Klipper's start.
    let ev = event_stream(&out);
    let bridge_request = position(&ev, Some("bridge"), "can-bootloader-requested");
    for key in ["ebb36", "sb2209"] {
        assert!(position(&ev, Some(key), "identified") < bridge_request, "{key} before the bridge: {ev:#?}");
    }
    let back = &ev[position(&ev, Some("bridge"), "can-interface-back")];
    assert_eq!((back["interface"].as_str(), back["by_kflash"].as_bool()), (Some("can0"), Some(true)), "{back}");
    assert_eq!(back["bitrate"], 1_000_000, "the toolheads' CONFIG_CANBUS_FREQUENCY: {back}");
    assert!(position(&ev, Some("bridge"), "identified") < position(&ev, None, "klipper-starting"), "{ev:#?}");

    // The same from the kernel and the service's log: can0 went away, came back, and was UP
    // before `systemctl start klipper`.
    let start = services.entries().into_iter().find(|e| e.verb == "start" && e.unit == "klipper").unwrap();
    let links = can0.lock().unwrap().clone();
    let removed = links.iter().position(|l| l.2).unwrap_or_else(|| panic!("can0 never went away: {links:?}"));
    let up = links[removed..].iter().find(|l| l.1).unwrap_or_else(|| panic!("can0 never came back up: {links:?}"));
    assert!(up.0 < start.ts, "can0 UP at {} , klipper started at {}: {links:?}", up.0, start.ts);
    let details = text(&run("ip", &["-details", "link", "show", "can0"]).stdout);
    assert!(details.contains("bitrate 1000000") && details.contains("qlen 128"), "{details}");

    // The bridge went through USB Katapult and booted the new image; Klippy agrees.
    let seen = rig.drain();
    let modes: Vec<&str> =
        seen.iter().filter(|e| e["event"] == "bridge-connect").filter_map(|e| e["mode"].as_str()).collect();
    assert_eq!(modes, ["katapult", "gs_usb"], "{seen:?}");
    let events = rig.wire.events();
    for n in ["ebb", "sb"] {
        assert!(events.contains(&format!(r#"{{"event":"EnteredKatapult","node":"{n}"}}"#)), "{events}");
    }
    wait_moonraker_with_klippy_ready(60);
    for section in ["mcu bridge", "mcu ebb36", "mcu sb2209"] {
        assert_eq!(mcu_version(section), version.as_str(), "{section}");
    }
    eprintln!(
        "flash-all of two toolheads and their bridge: wall {wall:.1} s, Klipper down {} s, can0 UP {:.2} s before Klipper's start",
        report["klipper_downtime_secs"],
        start.ts - up.0
    );
}

#[test]
#[ignore = "runs inside the USB rig"]
fn a_bridge_landing_in_rom_dfu_is_named_with_what_to_do_and_klipper_is_started_again() {
    let mut rig = Rig::start(&[&node("ebb", EBB_UUID)], &["rom-dfu"]);
    can0_up();
    let k = Kflash::new();
    let services = ServiceLog::start();
    let out = k.run(&["flash", "bridge", "--yes", "--json"]);
    assert!(!out.status.success(), "{}", text(&out.stdout));
    let doc: serde_json::Value =
        serde_json::from_str(&text(&out.stdout)).unwrap_or_else(|e| panic!("{e}: {}", text(&out.stderr)));
    let (message, help) = (doc["error"]["message"].as_str().unwrap(), doc["error"]["help"].as_str().unwrap());
    assert!(message.contains("the USB-to-CAN bridge landed in STM32 ROM DFU (0483:df11) instead of Katapult"), "{doc}");
    assert!(message.contains("can0"), "{doc}");
    assert!(help.contains("dfu-util") && help.contains("make flash") && help.contains("reset"), "{doc}");
    services.assert_klipper_stopped_and_restarted();
    let seen = rig.drain();
    assert!(seen.iter().any(|e| e["event"] == "bridge-connect" && e["mode"] == "rom-dfu"), "{seen:?}");
}
