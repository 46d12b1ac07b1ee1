//! Host self-test of the rig's printer-host stand-ins (tests/rig/standins/selftest.py):
//! real `make`/`git` runs on stand-in Klipper/Kalico trees, the systemctl/sudo stand-ins on a
//! temporary state directory, and the Moonraker stand-in over real HTTP and a real Unix
//! socket. Needs python3 (3.11, standard library only), git and GNU make on PATH.
use std::process::Command;

#[test]
fn printer_host_standins_selftest() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/rig/standins/selftest.py");
    let out = Command::new("python3")
        .arg(script)
        .env_remove("KFLASH_RIG_STATE")
        .env_remove("KFLASH_RIG_BOARDS_JSON")
        .output()
        .expect("python3 must be on PATH to run tests/rig/standins/selftest.py");
    assert!(
        out.status.success(),
        "tests/rig/standins/selftest.py failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
