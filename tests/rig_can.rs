//! CAN groundwork on the guest kernel's real CAN stack: simulated toolheads
//! (`kflash-boardsim can-serve`) on a vcan interface, flashed through kflash's CAN code
//! (`kflash-boardsim can-probe`: admin queries, bootloader request, Katapult over CAN,
//! identify). kflash's own commands do not speak CAN yet; these pin the layers below them.

mod rig_support;

use std::process::{Child, Command, Stdio};

use rig_support::*;

const EBB_UUID: &str = "0a1b2c3d4e5f";
const MCU: &str = "stm32g0b1xx";

/// A vcan interface with simulated nodes on it; removed again on drop.
struct Bus {
    name: &'static str,
    serve: Child,
}

impl Bus {
    fn start(name: &'static str, nodes: &[&str], faults: &[&str]) -> Bus {
        in_rig();
        let _ = run("ip", &["link", "del", name]);
        for args in [&["link", "add", "dev", name, "type", "vcan"][..], &["link", "set", "up", name]] {
            let out = run("ip", args);
            assert!(out.status.success(), "ip {args:?}: {}", text(&out.stderr));
        }
        let mut cmd = Command::new("kflash-boardsim");
        cmd.args(["can-serve", "--interface", name]);
        for n in nodes {
            cmd.args(["--node", n]);
        }
        for f in faults {
            cmd.args(["--fault", f]);
        }
        let serve = cmd.stdout(Stdio::null()).spawn().expect("kflash-boardsim can-serve");
        Bus { name, serve }
    }

    /// Flash a 32 KiB stand-in image of `version` into `uuid` with kflash's CAN code.
    fn probe(&self, uuid: &str, version: &str) -> std::process::Output {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("klipper.bin");
        let out = run(
            "kflash-boardsim",
            &["standin-image", "--out", image.to_str().unwrap(), "--mcu", MCU, "--version", version],
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        let mut bytes = std::fs::read(&image).unwrap();
        bytes.extend((bytes.len()..32 * 1024).map(|i| (i * 31 % 251) as u8));
        std::fs::write(&image, &bytes).unwrap();
        run(
            "kflash-boardsim",
            &["can-probe", "--interface", self.name, "--uuid", uuid, "--image", image.to_str().unwrap(), "--mcu", MCU],
        )
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.serve.kill();
        let _ = self.serve.wait();
        let _ = run("ip", &["link", "del", self.name]);
    }
}

#[test]
#[ignore = "runs inside the USB rig"]
fn a_toolhead_on_vcan_is_flashed_over_can_and_identifies_with_the_new_version() {
    let bus =
        Bus::start("vcan-kf0", &[&format!("ebb,{EBB_UUID},{MCU},v0.12.0-old"), &format!("sb,00000000beef,{MCU}")], &[]);
    let out = bus.probe(EBB_UUID, "v0.13.0-new");
    let v: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    eprintln!("{v}");
    assert_eq!(v["version"], "v0.13.0-new", "{v}");
    assert_eq!((v["blocks"].as_u64(), v["image_bytes"].as_u64()), (Some(512), Some(32768)), "{v}");
    assert_eq!(v["unassigned_nodes"], serde_json::json!(["00000000beef Katapult", "0a1b2c3d4e5f Klipper"]));
}

#[test]
#[ignore = "runs inside the USB rig"]
fn a_toolhead_that_never_reaches_katapult_is_named() {
    let bus = Bus::start("vcan-kf1", &[&format!("ebb,{EBB_UUID},{MCU},v0.12.0-old")], &["ebb:never-katapult"]);
    let out = bus.probe(EBB_UUID, "v0.13.0-new");
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("CAN node 0a1b2c3d4e5f did not answer as Katapult"), "{err}");
    assert!(err.contains("still answers as Klipper"), "{err}");
}
