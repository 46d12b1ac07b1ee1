//! Helpers for host tests that run the `kflash` binary against the stand-in Klipper tree:
//! a config dir under a temp root, with state and cache dirs beside it.

#![allow(dead_code)]

pub mod daemon;

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The stand-in Klipper tree (a git repo with a version tag) at `root/klipper`.
pub fn stand_in_tree(root: &Path) -> PathBuf {
    let tree = root.join("klipper");
    let st = Command::new(repo().join("tests/rig/standins/make-klipper-tree")).arg(&tree).output().unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    tree
}

/// `root/cfg` with one board, `nitehawk` (rp2040), and `klipper_dir` = `tree`.
pub fn config_dir(root: &Path, tree: &Path) -> PathBuf {
    let dir = root.join("cfg");
    std::fs::create_dir_all(dir.join("configs")).unwrap();
    std::fs::write(
        dir.join("boards.toml"),
        "[boards.nitehawk]\nname = \"Nitehawk\"\nmcu = \"rp2040\"\nserial = \"E661640843545B2E\"\n",
    )
    .unwrap();
    std::fs::write(dir.join("settings.toml"), format!("klipper_dir = \"{}\"\nbuild_jobs = 1\n", tree.display()))
        .unwrap();
    dir
}

/// The stand-in's menuconfig writes a realistic config for `mcu` into the board's file.
pub fn menuconfig(tree: &Path, cfg: &Path, key: &str, mcu: &str) {
    let st = Command::new("make")
        .arg("-C")
        .arg(tree)
        .arg(format!("KCONFIG_CONFIG={}", cfg.join(format!("configs/{key}.config")).display()))
        .arg("menuconfig")
        .env("RIG_MENUCONFIG_MCU", mcu)
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
}

/// `kflash --config-dir root/cfg ARGS…` with state and cache under `root`.
pub fn kflash(root: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kflash"));
    cmd.arg("--config-dir")
        .arg(root.join("cfg"))
        .args(args)
        .env_remove("RUST_LOG")
        .env("XDG_STATE_HOME", root.join("state"))
        .env("XDG_CACHE_HOME", root.join("cache"));
    cmd
}

/// A CDC-ACM tty as udev reports it (`vendor` Klipper or katapult, `pid` 614e or 6177), on
/// dummy_hcd port `port`.
pub fn tty(vendor: &str, pid: &str, (mcu, serial): (&str, &str), port: u32) -> kflash::identity::DeviceRecord {
    let id_path = format!("platform-dummy_hcd.{port}-usb-0:1:1.0");
    let props = [
        ("ID_BUS", "usb".to_string()),
        ("ID_USB_VENDOR", vendor.to_string()),
        ("ID_USB_VENDOR_ID", "1d50".to_string()),
        ("ID_USB_MODEL", mcu.to_string()),
        ("ID_USB_MODEL_ID", pid.to_string()),
        ("ID_USB_SERIAL_SHORT", serial.to_string()),
        ("ID_PATH", id_path.clone()),
        ("DEVLINKS", format!("/dev/serial/by-id/usb-{vendor}_{mcu}_{serial}-if00 /dev/serial/by-path/{id_path}")),
    ];
    kflash::identity::DeviceRecord {
        syspath: format!(
            "/sys/devices/platform/dummy_hcd.{port}/usb{p}/{p}-1/{p}-1:1.0/tty/ttyACM{port}",
            p = port + 1
        ),
        subsystem: "tty".into(),
        devnode: Some(format!("/dev/ttyACM{port}")),
        properties: props.iter().map(|(k, v)| (k.to_string(), v.clone())).collect::<std::collections::BTreeMap<_, _>>(),
    }
}
