//! CAN groundwork on the guest kernel's real CAN stack: simulated toolheads
//! (`kflash-boardsim can-serve`) on a vcan interface, flashed through kflash's CAN code
//! (`kflash-boardsim can-probe`: admin queries, bootloader request, Katapult over CAN,
//! identify). kflash's own commands do not speak CAN yet; these pin the layers below them.

mod rig_support;

use rig_support::*;

const EBB_UUID: &str = "0a1b2c3d4e5f";
const MCU: &str = "stm32g0b1xx";

#[test]
#[ignore = "runs inside the USB rig"]
fn a_toolhead_on_vcan_is_flashed_over_can_and_identifies_with_the_new_version() {
    let bus = VcanBus::start(
        "vcan-kf0",
        &[&format!("ebb,{EBB_UUID},{MCU},v0.12.0-old"), &format!("sb,00000000beef,{MCU}")],
        &[],
    );
    let out = VcanBus::probe(bus.name, EBB_UUID, MCU, "v0.13.0-new");
    let v: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    eprintln!("{v}");
    assert_eq!(v["version"], "v0.13.0-new", "{v}");
    assert_eq!((v["blocks"].as_u64(), v["image_bytes"].as_u64()), (Some(512), Some(32768)), "{v}");
    assert_eq!(v["unassigned_nodes"], serde_json::json!(["00000000beef Katapult", "0a1b2c3d4e5f Klipper"]));
}

#[test]
#[ignore = "runs inside the USB rig"]
fn a_toolhead_that_never_reaches_katapult_is_named() {
    let bus = VcanBus::start("vcan-kf1", &[&format!("ebb,{EBB_UUID},{MCU},v0.12.0-old")], &["ebb:never-katapult"]);
    let out = VcanBus::probe(bus.name, EBB_UUID, MCU, "v0.13.0-new");
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("CAN node 0a1b2c3d4e5f did not answer as Katapult"), "{err}");
    assert!(err.contains("still answers as Klipper"), "{err}");
}
