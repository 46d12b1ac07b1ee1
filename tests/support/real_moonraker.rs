//! The real Moonraker (PyPI `moonraker==0.11.0`, the upstream project's own release) on a
//! free loopback port, with a temporary data directory and a minimal moonraker.conf. Its
//! Klippy socket (`klippy_uds_address`) is a path nobody serves, so Klippy is disconnected
//! and has never connected, as on a host whose Klipper is not running; or, with
//! [`Config::klippy`], `fake_klippy.py` serves it with Klippy's API-server protocol in a
//! fixed state (ready and printing, shut down with a stale paused print, ...).
//!
//! `tests/setup-host` installs it into `tests/.venv-moonraker`; without it these tests fail
//! and say so (they never pass silently).

use std::io::{BufRead, BufReader, Lines};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

pub const VERSION: &str = "0.11.0";

pub fn venv() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/.venv-moonraker")
}

fn moonraker_bin() -> PathBuf {
    let bin = venv().join("bin/moonraker");
    assert!(
        bin.exists(),
        "the real Moonraker is not installed at {}: run tests/setup-host (it installs moonraker=={VERSION} there)",
        bin.display()
    );
    bin
}

#[derive(Debug, Clone, Default)]
pub struct Config {
    /// `trusted_clients: 127.0.0.0/8`; without it every request needs the API key (401).
    pub trusted: bool,
    /// Serve HTTPS too, with this certificate chain and key (`ssl_port`).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// A Klippy on the socket: `(klippy state, print_stats state, file, progress)`.
    pub klippy: Option<(&'static str, &'static str, &'static str, f64)>,
}

pub struct RealMoonraker {
    /// `None` while stopped (or not yet launched).
    child: Option<Child>,
    klippy: Option<Child>,
    dir: tempfile::TempDir,
    conf_path: PathBuf,
    pub url: String,
    pub ssl_port: Option<u16>,
    _lines: Option<std::thread::JoinHandle<()>>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `fake_klippy.py` serving `sock`, once it listens; its stdout lines follow.
fn spawn_klippy(
    sock: &Path,
    (state, job, file, progress): (&str, &str, &str, f64),
) -> (Child, Lines<BufReader<ChildStdout>>) {
    let mut child = Command::new(venv().join("bin/python3"))
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/fake_klippy.py"))
        .arg(sock)
        .args([state, job, file, &progress.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start fake_klippy.py");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().and_then(Result::ok).as_deref(), Some("LISTENING"), "fake_klippy.py");
    (child, lines)
}

impl RealMoonraker {
    pub fn start(config: Config) -> RealMoonraker {
        let klippy = config.klippy;
        let mut m = RealMoonraker::prepare(&config);
        let klippy = klippy.map(|k| spawn_klippy(&m.klippy_socket(), k));
        m.launch();
        // Moonraker sets Klippy's state from `info` before it subscribes.
        m.klippy = klippy.map(|(child, mut lines)| {
            assert!(lines.any(|l| l.is_ok_and(|l| l == "SUBSCRIBED")), "Moonraker never subscribed to the fake Klippy");
            child
        });
        m
    }

    /// The data directory and moonraker.conf, without starting Moonraker ([`Self::launch`]).
    /// The data directory itself does not exist until Moonraker creates it.
    pub fn prepare(config: &Config) -> RealMoonraker {
        moonraker_bin();
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let ssl_port = config.tls.as_ref().map(|_| free_port());
        let sock = dir.path().join("klippy.sock");
        let mut conf = format!("[server]\nhost: 127.0.0.1\nport: {port}\nklippy_uds_address: {}\n", sock.display());
        if let (Some((cert, key)), Some(ssl)) = (&config.tls, ssl_port) {
            conf.push_str(&format!(
                "ssl_port: {ssl}\nssl_certificate_path: {}\nssl_key_path: {}\n",
                cert.display(),
                key.display()
            ));
        }
        conf.push_str("\n[authorization]\n");
        if config.trusted {
            conf.push_str("trusted_clients:\n    127.0.0.0/8\n");
        }
        let conf_path = dir.path().join("moonraker.conf");
        std::fs::write(&conf_path, conf).unwrap();
        RealMoonraker {
            child: None,
            klippy: None,
            dir,
            conf_path,
            url: format!("http://127.0.0.1:{port}"),
            ssl_port,
            _lines: None,
        }
    }

    /// Start Moonraker (again) on the same data directory and port; returns once it listens.
    pub fn launch(&mut self) {
        assert!(self.child.is_none(), "Moonraker is already running");
        let mut child = Command::new(moonraker_bin())
            .arg("-d")
            .arg(self.dir.path().join("data"))
            .arg("-c")
            .arg(&self.conf_path)
            .arg("-n")
            .env_remove("MOONRAKER_DATA_PATH")
            .env_remove("MOONRAKER_CONFIG_PATH")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start moonraker");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let deadline = Instant::now() + Duration::from_secs(60);
        // Moonraker logs `[application.py:listen()] - …` right after its HTTP listen (and
        // right before its HTTPS listen, which follows synchronously).
        let seen = wait_for_line(&mut lines, deadline, |l| l.contains("[application.py:listen()]"));
        assert!(seen.is_some(), "moonraker exited before listening");
        if let Some(ssl) = self.ssl_port {
            // The HTTPS listen runs right after that line; if it has not yet, the next log
            // line comes after it.
            while std::net::TcpStream::connect(("127.0.0.1", ssl)).is_err() {
                assert!(Instant::now() < deadline, "moonraker's HTTPS port {ssl} never opened");
                assert!(wait_for_line(&mut lines, deadline, |_| true).is_some(), "moonraker exited");
            }
        }
        // Keep draining its log so it never blocks on a full pipe.
        self._lines = Some(std::thread::spawn(move || lines.for_each(drop)));
        self.child = Some(child);
    }

    /// Stop Moonraker with `signal` (SIGTERM: a clean stop; SIGKILL: a crash, which leaves
    /// its socket file behind) and wait for it to exit.
    pub fn stop(&mut self, signal: nix::sys::signal::Signal) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
            let _ = nix::sys::signal::kill(pid, signal);
            let _ = child.wait();
        }
        // Its log drain ends by itself at EOF.
        self._lines.take();
    }

    /// Moonraker's Unix socket, `<data>/comms/moonraker.sock`.
    pub fn socket_path(&self) -> PathBuf {
        self.dir.path().join("data/comms/moonraker.sock")
    }

    /// The socket Moonraker expects Klippy on.
    pub fn klippy_socket(&self) -> PathBuf {
        self.dir.path().join("klippy.sock")
    }

    /// Start `fake_klippy.py` on Moonraker's Klippy socket; returns once Moonraker (which
    /// finds it on its own) has connected and subscribed.
    pub fn start_klippy(&mut self, state: (&'static str, &'static str, &'static str, f64)) {
        assert!(self.klippy.is_none(), "a Klippy is already running");
        let (child, mut lines) = spawn_klippy(&self.klippy_socket(), state);
        assert!(lines.any(|l| l.is_ok_and(|l| l == "SUBSCRIBED")), "Moonraker never subscribed to the fake Klippy");
        self.klippy = Some(child);
    }

    /// Kill the fake Klippy, as Klippy exiting does: Moonraker sees its socket close.
    pub fn stop_klippy(&mut self) {
        if let Some(mut k) = self.klippy.take() {
            let _ = k.kill();
            let _ = k.wait();
        }
    }

    /// The API key, asked over Moonraker's Unix socket (which needs no authentication), as
    /// `~/moonraker/scripts/fetch-apikey.sh`-style tools do.
    pub fn api_key(&self) -> String {
        use std::io::{Read, Write};
        let sock = self.dir.path().join("data/comms/moonraker.sock");
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"{\"jsonrpc\": \"2.0\", \"method\": \"access.get_api_key\", \"id\": 1}\x03").unwrap();
        let mut reply = Vec::new();
        let mut byte = [0u8; 1];
        while s.read(&mut byte).unwrap() == 1 && byte[0] != 3 {
            reply.push(byte[0]);
        }
        let v: serde_json::Value = serde_json::from_slice(&reply).unwrap();
        v["result"].as_str().unwrap_or_else(|| panic!("no key in {v}")).to_string()
    }

    /// SIGSTOP: the process hangs; the kernel still accepts connections on its port.
    pub fn freeze(&self) {
        nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGSTOP).unwrap();
    }

    pub fn thaw(&self) {
        nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGCONT).unwrap();
    }

    fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.as_ref().expect("Moonraker is running").id() as i32)
    }

    /// SIGSTOP the fake Klippy: its socket stays open and answers nothing, so Moonraker
    /// answers `/server/info` from what it last heard while `/printer/*` hangs (the stale
    /// connection). Thawed on drop.
    pub fn freeze_klippy(&self) {
        let k = self.klippy.as_ref().expect("started with a Klippy");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(k.id() as i32), nix::sys::signal::Signal::SIGSTOP).unwrap();
    }
}

fn wait_for_line(
    lines: &mut Lines<BufReader<ChildStdout>>,
    deadline: Instant,
    want: impl Fn(&str) -> bool,
) -> Option<String> {
    for line in lines.by_ref() {
        let line = line.ok()?;
        if want(&line) {
            return Some(line);
        }
        assert!(Instant::now() < deadline, "moonraker did not start in time; last line: {line}");
    }
    None
}

impl Drop for RealMoonraker {
    fn drop(&mut self) {
        self.stop(nix::sys::signal::Signal::SIGTERM);
        if let Some(k) = &mut self.klippy {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(k.id() as i32), nix::sys::signal::Signal::SIGCONT);
            let _ = k.kill();
            let _ = k.wait();
        }
    }
}
