//! A `kflash daemon` loop on the host with scripted board events (no udev): octopus
//! registered and connected, ebb connected but not registered, Moonraker unreachable.

use std::path::{Path, PathBuf};

use kflash::daemon::{serve, Control, DaemonOptions};
use kflash::hotplug::{Hotplug, Script, ScriptedSource};
use kflash::registry::Registry;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use super::tty;

pub const OCTOPUS: (&str, &str) = ("stm32h723xx", "29001A001151313531383332");
pub const EBB: (&str, &str) = ("stm32f446xx", "1D0041000B50534E4E313020");

/// A loopback URL where nothing listens.
fn closed_port_url() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    format!("http://127.0.0.1:{port}")
}

pub struct Daemon {
    pub root: tempfile::TempDir,
    pub cfg: PathBuf,
    pub socket: PathBuf,
    pub script: Script,
    pub control: mpsc::Sender<Control>,
    pub task: tokio::task::JoinHandle<kflash::error::Result<()>>,
}

/// octopus registered and connected (running Klipper), ebb connected but not registered;
/// Moonraker unreachable.
pub async fn start() -> Daemon {
    let root = tempfile::tempdir().unwrap();
    let tree = super::stand_in_tree(root.path());
    let cfg = super::config_dir(root.path(), &tree);
    std::fs::write(
        cfg.join("boards.toml"),
        format!("[boards.octopus]\nname = \"Octopus\"\nmcu = \"{}\"\nserial = \"{}\"\n", OCTOPUS.0, OCTOPUS.1),
    )
    .unwrap();
    let settings = std::fs::read_to_string(cfg.join("settings.toml")).unwrap();
    // Nothing listens at either of Moonraker's addresses.
    let extra = format!(
        "moonraker_url = \"{}\"\nmoonraker_socket = \"{}\"\n",
        closed_port_url(),
        root.path().join("comms/moonraker.sock").display()
    );
    std::fs::write(cfg.join("settings.toml"), settings + &extra).unwrap();
    let reg = Registry::open(&cfg).unwrap();
    let (source, script) =
        ScriptedSource::new(vec![tty("Klipper", "614e", OCTOPUS, 0), tty("Klipper", "614e", EBB, 1)]);
    let hp = Hotplug::start(source, kflash::app::boards::resolver(&reg)).await.unwrap();
    let socket = root.path().join("run/kflash.sock");
    let opts =
        DaemonOptions { config_dir: cfg.clone(), state_dir: root.path().join("state"), socket: Some(socket.clone()) };
    let (control, rx) = mpsc::channel(4);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(serve(opts, reg, hp, rx, move || {
        let _ = ready_tx.send(());
    }));
    ready_rx.await.expect("the daemon says it is ready");
    Daemon { root, cfg, socket, script, control, task }
}

pub type Lines = tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>;

/// Send one request; the reply lines, and the write half (a subscription ends when the
/// client hangs up, so it is kept).
pub async fn request(socket: &Path, line: &str) -> (Lines, tokio::net::unix::OwnedWriteHalf) {
    let stream = UnixStream::connect(socket).await.unwrap();
    let (r, mut w) = stream.into_split();
    w.write_all(format!("{line}\n").as_bytes()).await.unwrap();
    (BufReader::new(r).lines(), w)
}

pub async fn next(lines: &mut Lines) -> serde_json::Value {
    let line = tokio::time::timeout(std::time::Duration::from_secs(10), lines.next_line())
        .await
        .expect("a reply within the deadline")
        .unwrap()
        .expect("a line");
    serde_json::from_str(&line).unwrap()
}

pub async fn status(socket: &Path) -> serde_json::Value {
    let (mut lines, _) = request(socket, r#"{"request":"status"}"#).await;
    let reply = next(&mut lines).await;
    assert_eq!(reply["reply"], "status", "{reply}");
    reply["status"].clone()
}
