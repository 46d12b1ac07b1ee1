//! kflash-boardsim: simulated Klipper / Katapult boards as real USB gadgets for the kflash
//! test rig. See ../README.md.

mod bridgesim;
mod cannode;
mod canserve;
mod config;
mod ctl;
mod dfu;
mod events;
mod faults;
mod ffs;
mod firmware;
mod flash;
mod gadget;
mod gadgetfs;
mod gsusb;
mod klipperdev;
mod pty;
mod server;
mod tty;
mod usbmon;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use kflash::protocol::katapult::{AckData, Command as KCommand, FrameDecoder, Response as KResponse};
use kflash::protocol::klipper::{IdentifyClient, IdentifyProgress};
use serde_json::{json, Value};

use crate::config::Mode;

/// `println!` that ignores a closed stdout (`| grep -q`, `| head`).
macro_rules! outln {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}
use crate::ctl::{ClientError, Request};

#[derive(Parser)]
#[command(name = "kflash-boardsim", about = "Simulated Klipper/Katapult USB boards for the kflash test rig")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create one USB gadget per board and simulate them until SIGTERM/SIGINT.
    Serve {
        /// Boards file (TOML).
        #[arg(long)]
        boards: PathBuf,
        /// State directory (control socket, event log).
        #[arg(long, env = "KFLASH_RIG_STATE", default_value = ctl::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Control a running simulator (the rig's `boardctl`).
    Ctl {
        #[arg(long, env = "KFLASH_RIG_STATE", default_value = ctl::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        #[command(subcommand)]
        cmd: CtlCmd,
    },
    /// Host side: read the data dictionary from a Klipper board's tty and print it as JSON.
    ProbeIdentify {
        /// e.g. /dev/serial/by-id/usb-Klipper_…-if00
        device: PathBuf,
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
        /// Print the whole dictionary, not just version/app/mcu/config.
        #[arg(long)]
        full: bool,
    },
    /// Host side: send Katapult CONNECT to a tty and print the answer as JSON.
    ProbeKatapult {
        device: PathBuf,
        #[arg(long, default_value_t = 5.0)]
        timeout: f64,
    },
    /// Write the simulator's stand-in firmware image (klipper.bin from the application
    /// address, with the realistic data dictionary) to a file.
    StandinImage {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "stm32h723xx")]
        mcu: String,
        #[arg(long, default_value = "v0.13.0-0-gdeadbeef")]
        version: String,
        #[arg(long, default_value = "Klipper")]
        app: String,
    },
    /// Simulate CAN nodes (toolheads) on a CAN interface (e.g. vcan0) until killed; prints
    /// one JSON line per event.
    CanServe {
        #[arg(long)]
        interface: String,
        /// NAME,UUID,MCU[,VERSION] (no VERSION: empty flash, the node sits in Katapult).
        #[arg(long = "node", required = true)]
        nodes: Vec<String>,
        /// NAME:SPEC, e.g. ebb:never-katapult, ebb:bus-off-after=10, ebb:uuid-after-flash=UUID.
        #[arg(long = "fault")]
        faults: Vec<String>,
    },
    /// A USB-to-CAN bridge as a real gs_usb device (1d50:606f, FunctionFS) on UDC, relaying
    /// the host's CAN interface to WIRE (the vcan the simulated toolheads are on) until
    /// SIGTERM/SIGINT; prints one JSON line per event.
    GsUsbBridge {
        /// A free UDC, e.g. dummy_udc.4.
        #[arg(long)]
        udc: String,
        #[arg(long)]
        wire: String,
        #[arg(long, default_value = "0e1d2c3b4a59")]
        serial: String,
        #[arg(long, default_value = "stm32h723xx")]
        product: String,
        /// The version of Klipper the bridge runs at start (its own CAN node reports it).
        #[arg(long, default_value = "v0.12.0-old")]
        version: String,
        /// `rom-dfu`: a bootloader request lands in the ROM's DFU instead of Katapult.
        #[arg(long = "fault")]
        faults: Vec<String>,
    },
    /// Host side, with kflash's CAN code: flash IMAGE into the node UUID on INTERFACE through
    /// Katapult over CAN, then identify it; prints timings and the new version as JSON.
    CanProbe {
        #[arg(long)]
        interface: String,
        #[arg(long)]
        uuid: String,
        #[arg(long)]
        image: PathBuf,
        #[arg(long)]
        mcu: String,
    },
    /// Host side, with kflash's Katapult code: write IMAGE through the Katapult already running
    /// on DEVICE (a board put there with `ctl`), read it back and complete; prints the timing
    /// as JSON. `can-probe`'s write over USB, for the same image's time on both.
    UsbProbe {
        #[arg(long)]
        device: PathBuf,
        #[arg(long)]
        image: PathBuf,
        #[arg(long)]
        mcu: String,
    },
    /// Serve one Klipper-mode board on a host pty (no USB): LINK becomes a symlink to the pty
    /// slave for Klippy's `serial:`. The image is re-read at every boot (after `reset`).
    Pty {
        /// Symlink to create (replaced if it exists).
        #[arg(long)]
        link: PathBuf,
        /// Firmware image (klipper.bin from the application address); default: the
        /// simulator's stand-in image for --mcu/--version/--app.
        #[arg(long)]
        image: Option<PathBuf>,
        #[arg(long, default_value = "stm32h723xx")]
        mcu: String,
        #[arg(long, default_value = "v0.13.0-0-gdeadbeef")]
        version: String,
        #[arg(long, default_value = "Klipper")]
        app: String,
        /// How long a `reset` keeps the port away.
        #[arg(long, default_value_t = 1400)]
        reboot_delay_ms: u64,
    },
}

#[derive(Subcommand)]
enum CtlCmd {
    /// Wait until every board's host side matches its state (enumerated with a tty and a
    /// by-id link, or gone when unplugged).
    WaitReady {
        #[arg(long, default_value_t = 60.0)]
        timeout: f64,
    },
    /// Show the boards.
    Status {
        board: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Plug a board in (power-on boot: the application if valid, else Katapult).
    Plug { board: String, mode: Option<String> },
    /// Unplug a board.
    Unplug { board: String },
    /// Reboot a board (default: into its application; or klipper|katapult|dfu).
    Reboot { board: String, mode: Option<String> },
    /// Set faults (SPEC...) or `clear` them.
    Fault {
        board: String,
        #[arg(required = true)]
        specs: Vec<String>,
    },
    /// Restore every board to the boards file's initial state and wait until ready.
    Reset {
        #[arg(long)]
        no_wait: bool,
        #[arg(long, default_value_t = 60.0)]
        timeout: f64,
    },
    /// Change the version of the firmware installed on a board.
    SetVersion { board: String, version: String },
    /// Write a marker line into the event log.
    Mark { text: String },
}

fn parse_mode(s: Option<String>) -> Result<Option<Mode>, String> {
    s.map(|m| Mode::parse(&m).map_err(|e| e.to_string())).transpose()
}

fn ctl_main(state_dir: &Path, cmd: CtlCmd) -> ExitCode {
    let (req, wait_secs, human): (Request, Option<f64>, Option<bool>) = match cmd {
        CtlCmd::WaitReady { timeout } => {
            (Request::WaitReady { timeout_ms: (timeout * 1000.0) as u64 }, Some(timeout), None)
        }
        CtlCmd::Status { board, json } => (Request::Status { board }, None, Some(!json)),
        CtlCmd::Plug { board, mode } => match parse_mode(mode) {
            Ok(mode) => (Request::Plug { board, mode }, None, None),
            Err(e) => return usage(&e),
        },
        CtlCmd::Unplug { board } => (Request::Unplug { board }, None, None),
        CtlCmd::Reboot { board, mode } => match parse_mode(mode) {
            Ok(mode) => (Request::Reboot { board, mode }, None, None),
            Err(e) => return usage(&e),
        },
        CtlCmd::Fault { board, specs } => (Request::Fault { board, specs }, None, None),
        CtlCmd::Reset { no_wait, timeout } => (
            Request::Reset { wait: !no_wait, timeout_ms: (timeout * 1000.0) as u64 },
            (!no_wait).then_some(timeout),
            None,
        ),
        CtlCmd::SetVersion { board, version } => (Request::SetVersion { board, version }, None, None),
        CtlCmd::Mark { text } => (Request::Mark { text }, None, None),
    };
    // wait-ready may run before `serve` has created its socket: retry until the deadline.
    let is_wait_ready = matches!(req, Request::WaitReady { .. });
    let start = Instant::now();
    let connect_deadline = is_wait_ready.then(|| start + Duration::from_secs_f64(wait_secs.unwrap_or(60.0)));
    let read_timeout = Duration::from_secs_f64(wait_secs.unwrap_or(0.0) + 30.0);
    let mut req = req;
    if let (Request::WaitReady { timeout_ms }, Some(d)) = (&mut req, connect_deadline) {
        // Whatever was spent waiting for the socket comes off the server-side wait.
        let _ = d;
        *timeout_ms = timeout_ms.saturating_sub(start.elapsed().as_millis() as u64);
    }
    let resp = match ctl::call(state_dir, &req, connect_deadline, read_timeout) {
        Ok(r) => r,
        Err(ClientError::Unreachable(e)) => {
            eprintln!("boardctl: {e}");
            return ExitCode::from(ctl::EXIT_UNREACHABLE as u8);
        }
        Err(ClientError::Timeout(e)) => {
            eprintln!("boardctl: {e}");
            return ExitCode::from(ctl::EXIT_TIMEOUT as u8);
        }
    };
    if !resp.ok {
        eprintln!("boardctl: {}", resp.error.as_deref().unwrap_or("failed"));
        return ExitCode::from(if resp.timeout { ctl::EXIT_TIMEOUT } else { ctl::EXIT_FAILED } as u8);
    }
    match human {
        Some(true) => print_status_table(&resp.result),
        Some(false) => outln!("{}", serde_json::to_string_pretty(&resp.result).unwrap_or_default()),
        None => {
            if !resp.result.is_null() {
                outln!("{}", resp.result);
            }
        }
    }
    ExitCode::from(ctl::EXIT_OK as u8)
}

/// Print a line to stdout; a closed pipe (`| grep -q`) is not an error.
fn print_out(text: &str) {
    outln!("{text}");
}

fn usage(msg: &str) -> ExitCode {
    eprintln!("boardctl: {msg}");
    ExitCode::from(ctl::EXIT_USAGE as u8)
}

fn print_status_table(v: &Value) {
    let Some(list) = v.as_array() else { return };
    let s = |b: &Value, k: &str| match &b[k] {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    outln!(
        "{:<10} {:<9} {:<7} {:<12} {:<26} {:<24} {:<11} {:<6} {:<13} FAULTS",
        "NAME",
        "MODE",
        "PLUGGED",
        "MCU",
        "SERIAL",
        "VERSION",
        "APP_START",
        "BLOCKS",
        "HOST_TTY"
    );
    for b in list {
        let faults: Vec<String> = b["faults"]
            .as_array()
            .map(|a| a.iter().filter_map(|f| f.as_str().map(String::from)).collect())
            .unwrap_or_default();
        let mut mode = s(b, "mode");
        if let Some(t) = b["rebooting_to"].as_str() {
            mode = format!("{mode}->{t}");
        }
        outln!(
            "{:<10} {:<9} {:<7} {:<12} {:<26} {:<24} {:<11} {:<6} {:<13} {}",
            s(b, "name"),
            mode,
            s(b, "plugged"),
            s(b, "mcu"),
            s(b, "serial"),
            s(b, "version"),
            s(b, "app_start"),
            s(b, "blocks_written"),
            s(b, "host_tty"),
            faults.join(",")
        );
    }
}

/// A subcommand's result as the process status; the error on stderr.
fn exit_code(command: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kflash-boardsim {command}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn probe_identify(dev: &Path, timeout: f64, full: bool) -> anyhow::Result<Value> {
    // 250000 baud: anything but 1200 (which would ask the board to reboot on close).
    let tty = tty::Tty::new(tty::open_raw(dev, Some(libc::B230400))?)?;
    let mut client = IdentifyClient::new();
    tty.write_all(&client.start()).await?;
    let deadline = Instant::now() + Duration::from_secs_f64(timeout);
    let mut buf = vec![0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            anyhow::bail!("no complete identify answer within {timeout} s ({} bytes received)", client.received());
        }
        let step = match tokio::time::timeout(left.min(Duration::from_millis(500)), tty.read(&mut buf)).await {
            Ok(Ok(0)) => anyhow::bail!("{} closed (board disconnected?)", dev.display()),
            Ok(Ok(n)) => client.feed(&buf[..n])?,
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => IdentifyProgress::Send(client.on_timeout()?),
        };
        match step {
            IdentifyProgress::Send(b) => tty.write_all(&b).await?,
            IdentifyProgress::Pending => {}
            IdentifyProgress::Done(d) => {
                return Ok(if full {
                    d.json()
                } else {
                    json!({"version": d.version, "app": d.app, "mcu": d.mcu,
                           "build_versions": d.build_versions, "config": d.config})
                });
            }
        }
    }
}

async fn probe_katapult(dev: &Path, timeout: f64) -> anyhow::Result<Value> {
    let tty = tty::Tty::new(tty::open_raw(dev, Some(libc::B230400))?)?;
    let mut dec = FrameDecoder::new();
    let deadline = Instant::now() + Duration::from_secs_f64(timeout);
    let mut buf = vec![0u8; 1024];
    tty.write_all(&KCommand::Connect.encode()?).await?;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let n = match tokio::time::timeout(left, tty.read(&mut buf)).await {
            Err(_) => anyhow::bail!("no CONNECT answer within {timeout} s"),
            Ok(r) => r?,
        };
        if n == 0 {
            anyhow::bail!("{} closed", dev.display());
        }
        for item in dec.feed(&buf[..n]) {
            let Ok(frame) = item else { continue };
            let resp = KResponse::from_frame(&frame)?;
            if let AckData::Connect(i) = resp.expect_ack(kflash::protocol::katapult::CMD_CONNECT)? {
                return Ok(json!({
                    "proto_version": format!("{}.{}.{}", i.proto_version.0, i.proto_version.1, i.proto_version.2),
                    "app_start": format!("{:#x}", i.app_start),
                    "block_size": i.block_size,
                    "mcu": i.mcu,
                    "version": i.version,
                }));
            }
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime")
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { ctl::EXIT_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code as u8);
        }
    };
    match cli.cmd {
        Cmd::Serve { boards, state_dir } => match runtime().block_on(server::serve(&boards, &state_dir)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("kflash-boardsim serve: {e:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::Ctl { state_dir, cmd } => ctl_main(&state_dir, cmd),
        Cmd::ProbeIdentify { device, timeout, full } => {
            match runtime().block_on(probe_identify(&device, timeout, full)) {
                Ok(v) => {
                    print_out(&serde_json::to_string_pretty(&v).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("probe-identify {}: {e:#}", device.display());
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::StandinImage { out, mcu, version, app } => {
            let image = pty::ImageSource::Standin { app, version, mcu }.load();
            exit_code("standin-image", image.and_then(|img| std::fs::write(&out, img).map_err(Into::into)))
        }
        Cmd::Pty { link, image, mcu, version, app, reboot_delay_ms } => {
            let source = match image {
                Some(p) => pty::ImageSource::File(p),
                None => pty::ImageSource::Standin { app, version, mcu },
            };
            exit_code("pty", pty::run(source, &link, Duration::from_millis(reboot_delay_ms)))
        }
        Cmd::CanServe { interface, nodes, faults } => {
            let run = async {
                let nodes =
                    nodes.iter().map(|n| canserve::parse_node(n, &faults)).collect::<anyhow::Result<Vec<_>>>()?;
                let socket = kflash::can::socket::SocketCan::open(&interface)?;
                outln!("{}", json!({"event": "ready", "interface": interface}));
                canserve::serve(socket, cannode::SimBus { nodes }, |v| outln!("{v}")).await
            };
            match runtime().block_on(run) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("kflash-boardsim can-serve: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::GsUsbBridge { udc, wire, serial, product, version, faults } => {
            let rom_dfu = match faults.iter().map(String::as_str).collect::<Vec<_>>()[..] {
                [] => false,
                ["rom-dfu"] => true,
                _ => return usage(&format!("unknown bridge faults {faults:?} (known: rom-dfu)")),
            };
            let usb = ffs::BridgeUsb { udc, manufacturer: "Klipper".into(), product, serial };
            let log: ffs::Log = std::sync::Arc::new(|v| outln!("{v}"));
            let spec = bridgesim::BridgeSpec { usb, wire, version, rom_dfu };
            exit_code("gs-usb-bridge", runtime().block_on(bridgesim::run(spec, log)))
        }
        Cmd::CanProbe { interface, uuid, image, mcu } => {
            let run = async {
                let uuid: kflash::can::CanUuid = uuid.parse()?;
                let bytes = std::fs::read(&image).with_context(|| format!("cannot read {}", image.display()))?;
                let socket = kflash::can::socket::SocketCan::open(&interface)?;
                canserve::probe_flash(socket, uuid, &bytes, &mcu).await
            };
            match runtime().block_on(run) {
                Ok(v) => {
                    outln!("{v}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("kflash-boardsim can-probe: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::UsbProbe { device, image, mcu } => {
            let run = async {
                use kflash::flash::katapult::{Expectation, KatapultSession};
                let bytes = std::fs::read(&image).with_context(|| format!("cannot read {}", image.display()))?;
                let t = Instant::now();
                let mut session = KatapultSession::open(device.to_str())?;
                let app_start = firmware::profile_for(&mcu).map(|p| p.app_start);
                let mut events = Vec::new();
                let report = session.flash(&bytes, &Expectation { mcu, app_start }, &mut events).await?;
                anyhow::Ok(json!({
                    "device": device.display().to_string(),
                    "image_bytes": bytes.len(),
                    "blocks": report.blocks,
                    "pages": report.pages,
                    "ms": {"write_and_verify": t.elapsed().as_millis()},
                }))
            };
            match runtime().block_on(run) {
                Ok(v) => {
                    outln!("{v}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("kflash-boardsim usb-probe: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::ProbeKatapult { device, timeout } => match runtime().block_on(probe_katapult(&device, timeout)) {
            Ok(v) => {
                print_out(&serde_json::to_string_pretty(&v).unwrap_or_default());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("probe-katapult {}: {e:#}", device.display());
                ExitCode::FAILURE
            }
        },
    }
}
