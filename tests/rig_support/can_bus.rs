//! Simulated CAN toolheads for the rig's CAN scenarios: a vcan interface with
//! `kflash-boardsim can-serve` on it, and kflash's own CAN code run against them.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use super::{in_rig, run, text};

/// A vcan interface (UP, txqueuelen 128) with simulated nodes on it, started once the
/// simulator says it is ready; its event lines are kept as they come. Removed on drop.
pub struct VcanBus {
    pub name: &'static str,
    serve: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl VcanBus {
    /// `nodes`: NAME,UUID,MCU[,VERSION]; `faults`: NAME:SPEC (see `kflash-boardsim can-serve`).
    pub fn start(name: &'static str, nodes: &[&str], faults: &[&str]) -> VcanBus {
        in_rig();
        let _ = run("ip", &["link", "del", name]);
        for args in [
            &["link", "add", "dev", name, "type", "vcan"][..],
            &["link", "set", name, "txqueuelen", "128"],
            &["link", "set", "up", name],
        ] {
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
        let mut serve = cmd.stdout(Stdio::piped()).spawn().expect("kflash-boardsim can-serve");
        let out = serve.stdout.take().expect("piped");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let kept = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                kept.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        let bus = VcanBus { name, serve, lines };
        // Its socket is bound before it says so: nothing is sent on the bus before that.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) if line.contains("\"ready\"") => break,
                Ok(_) => {}
                Err(e) => panic!("can-serve on {name} never said it was ready ({e}): {}", bus.events()),
            }
        }
        bus
    }

    /// The simulator's event lines so far.
    pub fn events(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Flash a 32 KiB stand-in image of `version` into `uuid` on `interface` (this bus, or a
    /// gs_usb interface in front of it) with kflash's CAN code (`kflash-boardsim can-probe`).
    pub fn probe(interface: &str, uuid: &str, mcu: &str, version: &str) -> Output {
        let dir = tempfile::tempdir().unwrap();
        let image = standin_image_32k(dir.path(), mcu, version);
        run(
            "kflash-boardsim",
            &["can-probe", "--interface", interface, "--uuid", uuid, "--image", image.to_str().unwrap(), "--mcu", mcu],
        )
    }
}

impl Drop for VcanBus {
    fn drop(&mut self) {
        let _ = self.serve.kill();
        let _ = self.serve.wait();
        let _ = run("ip", &["link", "del", self.name]);
    }
}

/// The simulator's stand-in Klipper image of `version`, padded to 32 KiB, in `dir`.
pub fn standin_image_32k(dir: &Path, mcu: &str, version: &str) -> std::path::PathBuf {
    let image = dir.join("klipper.bin");
    let out = run(
        "kflash-boardsim",
        &["standin-image", "--out", image.to_str().unwrap(), "--mcu", mcu, "--version", version],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut bytes = std::fs::read(&image).unwrap();
    bytes.extend((bytes.len()..32 * 1024).map(|i| (i * 31 % 251) as u8));
    std::fs::write(&image, &bytes).unwrap();
    image
}
