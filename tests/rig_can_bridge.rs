//! The simulated USB-to-CAN bridge as a real gs_usb device: `kflash-boardsim gs-usb-bridge`
//! presents 1d50:606f through FunctionFS on the UDC of a board unplugged meanwhile, the guest's own `gs_usb`
//! driver binds to it and creates a CAN interface, and the toolheads simulated on a vcan
//! "wire" behind it are reached through that interface: udev, the driver, SocketCAN and the
//! bit timing the driver computes are the real ones.

mod rig_support;

use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rig_support::*;

const EBB_UUID: &str = "0a1b2c3d4e5f";
const MCU: &str = "stm32g0b1xx";
const WIRE: &str = "vcan-wire";

/// The wire with its toolheads, and the bridge in front of it (in the USB port of the
/// cubic, unplugged meanwhile); all removed on drop, then the boards reset.
struct Rig {
    _clean: LeaveRigClean,
    /// The toolheads' wire (dropped after the bridge, which is killed first).
    _wire: VcanBus,
    bridge: Child,
    events: mpsc::Receiver<serde_json::Value>,
    /// Every event received so far.
    seen: Vec<serde_json::Value>,
}

impl Rig {
    fn start(nodes: &[&str]) -> Rig {
        in_rig();
        let clean = LeaveRigClean;
        // The cubic starts unplugged in the default boards file; any earlier scenario's
        // plug is undone by the reset at the end.
        if board_json(MMB.0)["plugged"] != false {
            boardctl(&["unplug", MMB.0]);
        }
        settle();
        let wire = VcanBus::start(WIRE, nodes, &[]);
        let udc = free_udc();
        let mut bridge = Command::new("kflash-boardsim")
            .args(["gs-usb-bridge", "--udc", &udc, "--wire", WIRE])
            .stdout(Stdio::piped())
            .spawn()
            .expect("kflash-boardsim gs-usb-bridge");
        let events = json_lines(bridge.stdout.take().unwrap());
        let mut rig = Rig { _clean: clean, _wire: wire, bridge, events, seen: Vec::new() };
        rig.expect("ready", 30);
        rig
    }

    /// The next bridge event named `name` (others are skipped), within `secs`.
    fn expect(&mut self, name: &str, secs: u64) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let got = self.events.recv_timeout(left);
            if let Ok(v) = &got {
                eprintln!("bridge: {v}");
                self.seen.push(v.clone());
            }
            match got {
                Ok(v) if v["event"] == name => return v,
                Ok(v) if v["event"] == "bridge-error" => panic!("the bridge failed: {v}"),
                Ok(_) => {}
                Err(e) => panic!(
                    "no '{name}' event from the bridge within {secs} s ({e}); the kernel's last words:\n{}",
                    dmesg_tail(30)
                ),
            }
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        // SIGTERM: the bridge unplugs itself and removes its gadget.
        let _ = run("kill", &["-TERM", &self.bridge.id().to_string()]);
        let _ = self.bridge.wait();
    }
}

#[test]
#[ignore = "runs inside the USB rig"]
fn the_real_gs_usb_driver_brings_up_the_bridge_and_reaches_the_toolheads_behind_it() {
    let mut rig =
        Rig::start(&[&format!("ebb,{EBB_UUID},{MCU},v0.12.0-old"), &format!("sb,00000000beef,{MCU},v0.12.0-old")]);
    rig.expect("bridge-usb", 30);
    settle();
    let ifaces = gs_usb_interfaces();
    assert_eq!(ifaces.len(), 1, "one CAN interface from gs_usb: {ifaces:?}\n{}", dmesg_tail(30));
    let can = &ifaces[0];
    let out = run("ip", &["link", "set", can, "type", "can", "bitrate", "1000000"]);
    assert!(out.status.success(), "ip link set {can} type can bitrate 1000000: {}", text(&out.stderr));
    eprintln!("{}", text(&run("ip", &["-details", "link", "show", can]).stdout));
    let out = run("ip", &["link", "set", can, "up"]);
    assert!(out.status.success(), "ip link set {can} up: {}", text(&out.stderr));
    assert_eq!(rig.expect("bridge-channel", 10)["state"], "started");
    // The driver sends the bit timing at `type can bitrate`, or (stable kernels since 2026:
    // "gs_usb: always configure bitrates") when the interface goes up.
    let timings: Vec<_> = rig.seen.iter().filter(|v| v["event"] == "bridge-bittiming").collect();
    assert_eq!(timings.last().map(|v| v["bitrate"].clone()), Some(1_000_000.into()), "{:?}", rig.seen);

    // kflash's CAN code through the driver: a query, Katapult over CAN, identify.
    let t = Instant::now();
    let out = VcanBus::probe(can, EBB_UUID, MCU, "v0.13.0-new");
    let v: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    eprintln!("32 KiB through the gs_usb bridge in {:.1} s: {v}", t.elapsed().as_secs_f64());
    assert_eq!(v["version"], "v0.13.0-new", "{v}");
    // The bridge's own node (its UUID the hash of its USB serial) answers the query too.
    let own = kflash::can::bridge::uuid_from_usb_serial("0e1d2c3b4a59").unwrap().to_string();
    let mut expected =
        vec!["00000000beef Klipper".to_string(), "0a1b2c3d4e5f Klipper".into(), format!("{own} Klipper")];
    expected.sort();
    assert_eq!(v["unassigned_nodes"], serde_json::json!(expected), "{v}");

    // Down: the driver stops the channel.
    let out = run("ip", &["link", "set", can, "down"]);
    assert!(out.status.success());
    assert_eq!(rig.expect("bridge-channel", 10)["state"], "stopped");
}
