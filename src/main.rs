//! The `kflash` command: parse arguments, call the library, print what it returns.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use kflash::app::boards::{self, AddRequest};
use kflash::app::watch::WatchRecord;
use kflash::error::{exit, Error, Result};
use kflash::hotplug::{Board, Hotplug};
use kflash::kconfig::{self, KConfig};
use kflash::registry::{self, import, FlashMethod, Registry};

mod install_cmd;
mod ui;

#[derive(Parser)]
#[command(
    name = "kflash",
    version,
    about = "Build, flash and verify Klipper/Kalico firmware on every board, driven by udev events"
)]
struct Cli {
    /// Config directory (boards.toml, settings.toml, configs/). Default: $XDG_CONFIG_HOME/kflash.
    #[arg(long, global = true, env = "KFLASH_CONFIG_DIR", value_name = "DIR")]
    config_dir: Option<PathBuf>,
    /// More log output (-v info, -vv debug, -vvv trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The live dashboard: boards, versions, Klippy, flashing with F/B (also `kflash` alone on a terminal).
    Dashboard,
    /// List registered boards (connected or absent), unregistered boards and other serial devices.
    Devices(DevicesArgs),
    /// Register a connected board: interactive, or fully by flags.
    Add(AddArgs),
    /// List the board profiles `kflash add --profile NAME` can seed a config from.
    Profiles(JsonFlag),
    /// Unregister a board.
    Remove(RemoveArgs),
    /// Change a registered board (name, flash method, include/exclude, identity).
    Set(SetArgs),
    /// Show or change global settings.
    Settings(SettingsArgs),
    /// Edit a board's cached firmware config with `make menuconfig`.
    Config(ConfigArgs),
    /// Take over a kalico-flash installation (devices.json and cached configs).
    Import(ImportArgs),
    /// Show USB serial hotplug changes live until Ctrl-C.
    Watch(JsonFlag),
    /// Build a board's firmware out of tree (or take it from the cache).
    Build(BuildArgs),
    /// Build, flash and verify one board, with Klipper stopped only while flashing.
    Flash(FlashArgs),
    /// Build, flash and verify every registered, connected board: one Klipper stop.
    FlashAll(FlashAllArgs),
    /// Show the flash history (all boards, or one).
    History(HistoryArgs),
    /// Does this board have Katapult? Requests the bootloader with Klipper stopped.
    KatapultCheck(KatapultCheckArgs),
    /// Every registered board's firmware state (current, outdated, unknown, bootloader,
    /// missing): from the daemon when it runs, else checked once now.
    Status(JsonFlag),
    /// The background service: watches boards and Klippy, answers `kflash status`.
    Daemon(DaemonArgs),
    /// Install kflash as a service: binary, udev rules, systemd unit, optional sudoers rule.
    Install(install_cmd::InstallArgs),
    /// Undo exactly what `kflash install` changed.
    Uninstall(install_cmd::UninstallArgs),
}

#[derive(Args)]
struct DaemonArgs {
    /// Listen on this socket (default: $RUNTIME_DIRECTORY, /run/kflash, $XDG_RUNTIME_DIR or
    /// the state directory, the first that exists).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
}

#[derive(Args)]
struct KatapultCheckArgs {
    key: String,
    /// Answer yes to questions (e.g. continue when nothing listens at moonraker_url).
    #[arg(long, short = 'y')]
    yes: bool,
    /// Stop Klipper even when Moonraker cannot be asked about the print (401/403, no answer,
    /// not Moonraker). A known print still refuses.
    #[arg(long)]
    skip_print_check: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct HistoryArgs {
    key: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BuildArgs {
    key: String,
    /// Build even when the cache has this firmware.
    #[arg(long)]
    rebuild: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct FlashArgs {
    key: String,
    /// Answer yes to questions (e.g. continue when Moonraker is unreachable).
    #[arg(long, short = 'y')]
    yes: bool,
    /// Flash even if the board already runs the built version.
    #[arg(long)]
    force: bool,
    /// katapult or make-flash (default: the board's setting).
    #[arg(long, value_parser = parse_method)]
    method: Option<FlashMethod>,
    /// Do not build: use the cached firmware.
    #[arg(long)]
    no_build: bool,
    /// Stop Klipper even when Moonraker cannot be asked about the print (401/403, no answer,
    /// not Moonraker); recorded in the history. A known print still refuses.
    #[arg(long)]
    skip_print_check: bool,
    /// Print the summary as JSON (progress goes to stderr).
    #[arg(long)]
    json: bool,
    /// Progress as the structured event stream instead of lines: one JSON object per line on
    /// stderr (the stream the daemon and the dashboard draw).
    #[arg(long)]
    events: bool,
}

#[derive(Args)]
struct FlashAllArgs {
    /// Answer without asking: continue when Moonraker is unreachable, and take each version
    /// question's default (flash only the outdated boards; none when all are current).
    #[arg(long, short = 'y')]
    yes: bool,
    /// Flash every board, also those that already run the host's version.
    #[arg(long, conflicts_with = "only_outdated")]
    all: bool,
    /// Flash only the boards that do not run the host's version (unknown counts as outdated).
    #[arg(long)]
    only_outdated: bool,
    /// Flash up to N boards at once (bare: all of them). Default: one after another.
    #[arg(long, value_name = "N", num_args = 0..=1, default_missing_value = "0")]
    parallel: Option<usize>,
    /// Builds at once (default: half the build jobs, each build gets its share of the cores).
    #[arg(long, value_name = "N")]
    builds: Option<usize>,
    /// Leave out boards without a usable firmware config instead of refusing the run.
    #[arg(long)]
    skip_unconfigured: bool,
    /// Print the plan (boards, order, what is left out and why) and touch nothing.
    #[arg(long)]
    dry_run: bool,
    /// Do not build: use the cached firmware.
    #[arg(long)]
    no_build: bool,
    /// Stop Klipper even when Moonraker cannot be asked about the print (401/403, no answer,
    /// not Moonraker); recorded in the history. A known print still refuses.
    #[arg(long)]
    skip_print_check: bool,
    /// Print the plan or the final report as one JSON document (progress goes to stderr).
    #[arg(long)]
    json: bool,
    /// Progress as the structured event stream instead of lines: one JSON object per line on
    /// stderr (the stream the daemon and the dashboard draw).
    #[arg(long)]
    events: bool,
}

#[derive(Args)]
struct DevicesArgs {
    /// CAN nodes: printer.cfg's (through Moonraker), and the unassigned nodes on every CAN
    /// interface that is up, queried with Klipper stopped (after the print-safety check) and
    /// started again.
    #[arg(long)]
    can: bool,
    /// Answer yes to questions (e.g. continue when nothing listens at moonraker_url).
    #[arg(long, short = 'y', requires = "can")]
    yes: bool,
    /// Stop Klipper for the query even when Moonraker cannot be asked about the print.
    #[arg(long, requires = "can")]
    skip_print_check: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct JsonFlag {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct AddArgs {
    /// The device: devnode, /dev/serial/by-id path or name, USB serial, or syspath.
    #[arg(long, value_name = "DEVICE")]
    device: Option<String>,
    /// Display name.
    #[arg(long)]
    name: Option<String>,
    /// Registry key (default: made from the name).
    #[arg(long)]
    key: Option<String>,
    /// MCU (default: what the device reports).
    #[arg(long)]
    mcu: Option<String>,
    /// katapult, make-flash or default.
    #[arg(long, value_parser = parse_method, default_value = "default")]
    method: FlashMethod,
    /// Exclude the board from flash-all.
    #[arg(long)]
    exclude: bool,
    /// Seed the board's firmware config from this board profile (`kflash profiles`); it
    /// must be reviewed with `kflash config KEY` before the board is flashed.
    #[arg(long, value_name = "NAME")]
    profile: Option<String>,
    /// Register a CAN node by its UUID instead of a USB device (needs --name and --mcu).
    #[arg(long, value_name = "UUID", conflicts_with_all = ["device", "profile"])]
    canbus_uuid: Option<String>,
    /// The CAN node's interface (default can0).
    #[arg(long, value_name = "IFACE", requires = "canbus_uuid")]
    can_interface: Option<String>,
    /// Register the CAN node printer.cfg names `[mcu NAME]`: its canbus_uuid and
    /// canbus_interface are read through Moonraker, with Klipper running (name defaults to
    /// NAME, MCU to what Klippy reports).
    #[arg(long, value_name = "NAME", conflicts_with_all = ["device", "profile", "canbus_uuid"])]
    from_moonraker: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct RemoveArgs {
    key: String,
    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    yes: bool,
    /// Also delete the board's cached firmware config (kept by default).
    #[arg(long)]
    delete_config: bool,
}

#[derive(Args)]
struct SetArgs {
    key: String,
    #[arg(long)]
    name: Option<String>,
    /// katapult, make-flash or default.
    #[arg(long, value_parser = parse_method)]
    method: Option<FlashMethod>,
    /// Exclude from flash-all.
    #[arg(long, conflicts_with = "include")]
    exclude: bool,
    /// Include in flash-all again.
    #[arg(long)]
    include: bool,
    #[arg(long)]
    mcu: Option<String>,
    /// USB serial (chip id); an empty string removes it.
    #[arg(long)]
    serial: Option<String>,
    /// by-id glob; an empty string removes it.
    #[arg(long)]
    serial_pattern: Option<String>,
    /// CAN UUID (e.g. after a flash changed it); an empty string removes it.
    #[arg(long)]
    canbus_uuid: Option<String>,
    /// CAN interface of the node; an empty string goes back to can0.
    #[arg(long)]
    can_interface: Option<String>,
}

#[derive(Args)]
struct SettingsArgs {
    #[command(subcommand)]
    action: Option<SettingsAction>,
    /// Print JSON (accepted before or after the action: `settings show --json`).
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum SettingsAction {
    /// Show all settings (the default).
    Show,
    /// Set one setting, e.g. `klipper_dir ~/kalico` or `timeouts.build_secs 900`.
    Set { key: String, value: String },
    /// Remove an optional setting (moonraker_api_key).
    Unset { key: String },
    /// Print the config directory.
    Path,
}

#[derive(Args)]
struct ConfigArgs {
    key: String,
    /// Print the config file's path and MCU instead of running menuconfig.
    #[arg(long)]
    show: bool,
}

#[derive(Args)]
struct ImportArgs {
    /// kalico-flash's devices.json or its checkout (default: ~/kalico_flash).
    path: Option<PathBuf>,
    /// kalico-flash's config cache (default: $XDG_CONFIG_HOME/kalico-flash/configs).
    #[arg(long, value_name = "DIR")]
    configs: Option<PathBuf>,
    /// Report what would be imported, change nothing.
    #[arg(long)]
    dry_run: bool,
    #[arg(long)]
    json: bool,
}

fn parse_method(s: &str) -> std::result::Result<FlashMethod, String> {
    FlashMethod::parse(s).map_err(|e| e.to_string())
}

fn main() {
    let cli = parse_cli();
    let daemon = matches!(cli.command, Command::Daemon(_));
    init_logging(cli.verbose, daemon);
    if daemon {
        settle_allocator();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(exit::FAILURE);
        }
    };
    let json = cli.command.json();
    let code = match rt.block_on(run(cli)) {
        Ok(()) => exit::OK,
        Err(e) => {
            report_error(&e, json);
            e.exit_code()
        }
    };
    // Not a plain drop: that would wait for blocking threads (a prompt's read, a build-lock
    // wait) that an interruption abandoned.
    rt.shutdown_background();
    std::process::exit(code);
}

/// The daemon stays resident for months: tell glibc's allocator to give freed memory back.
/// By default it makes an arena per thread that allocates (up to 8 per core), and raises its
/// trim threshold as large blocks come and go, so a burst of board events leaves megabytes
/// resident that the daemon no longer uses (measured in the rig soak: 1.6 MiB anonymous idle,
/// 8-13 MiB after 1000 plug cycles, while the live heap stays under 1 MiB). Fixed thresholds
/// and one arena keep the footprint near what is live. Call before any thread starts.
fn settle_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called while the process has one thread.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// The arguments; `kflash` without a command on a terminal (stdin and stdout) opens the
/// dashboard. Anywhere else a missing command is the usage error it always was.
fn parse_cli() -> Cli {
    use clap::error::ErrorKind;
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand | ErrorKind::MissingSubcommand
            ) && std::io::stdin().is_terminal()
                && std::io::stdout().is_terminal() =>
        {
            let mut with = args.clone();
            with.push("dashboard".into());
            Cli::try_parse_from(with).unwrap_or_else(|_| e.exit())
        }
        Err(e) => e.exit(),
    }
}

/// Set once a command has printed its JSON document (with its error in it): the error is
/// then not printed to stdout a second time.
static JSON_WRITTEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `error: …` and `help: …` on stderr; under `--json` also the same as one JSON object on
/// stdout, so a script reading stdout always gets JSON.
fn report_error(e: &Error, json: bool) {
    eprintln!("error: {e}");
    let help = e.help();
    if let Some(help) = &help {
        eprintln!("  help: {help}");
    }
    if json && !JSON_WRITTEN.load(std::sync::atomic::Ordering::Relaxed) {
        let body = serde_json::json!({
            "error": { "kind": e.kind(), "message": e.to_string(), "help": help, "exit_code": e.exit_code() }
        });
        println!("{body}");
    }
}

impl Command {
    /// Whether the command was asked for JSON output.
    fn json(&self) -> bool {
        match self {
            Command::Watch(a) | Command::Status(a) | Command::Profiles(a) => a.json,
            Command::Devices(a) => a.json,
            Command::Add(a) => a.json,
            Command::Settings(a) => a.json,
            Command::Import(a) => a.json,
            Command::Build(a) => a.json,
            Command::Flash(a) => a.json,
            Command::FlashAll(a) => a.json,
            Command::History(a) => a.json,
            Command::KatapultCheck(a) => a.json,
            Command::Remove(_) | Command::Set(_) | Command::Config(_) | Command::Daemon(_) => false,
            Command::Install(_) | Command::Uninstall(_) | Command::Dashboard => false,
        }
    }
}

fn init_logging(verbose: u8, daemon: bool) {
    let level = match verbose {
        // A service says what it does; a command only what goes wrong.
        0 if daemon => "info",
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("kflash={level}")));
    // Under systemd (stderr is the journal's stream) the daemon logs to the journal itself,
    // with fields (board=…) kept as journal fields.
    if daemon && std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(journald) = tracing_journald::layer() {
            use tracing_subscriber::layer::SubscriberExt;
            use tracing_subscriber::util::SubscriberInitExt;
            tracing_subscriber::registry().with(filter).with(journald).init();
            return;
        }
    }
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal());
    // Timestamps only when asked for detail; plain warnings read like the rest of the output.
    if verbose > 0 || daemon {
        fmt.init();
    } else {
        fmt.without_time().init();
    }
}

/// Every command that waits is cancellable: Ctrl-C, SIGTERM or SIGHUP ends it at once with
/// exit 130. `watch` ends on a signal by design (exit 0); `flash` and `katapult-check` handle
/// signals themselves (restart Klipper, record the interruption).
async fn run(cli: Cli) -> Result<()> {
    let dir = cli.config_dir.clone().unwrap_or_else(registry::default_config_dir);
    if let Command::Daemon(a) = cli.command {
        // The daemon recovers an interrupted flash's stop itself, and logs it.
        let opts = kflash::daemon::DaemonOptions {
            config_dir: dir,
            state_dir: registry::default_state_dir(),
            socket: a.socket,
        };
        return kflash::daemon::run(opts).await;
    }
    recover_klipper(&dir).await;
    match cli.command {
        Command::Dashboard => ui::dashboard::runner::run(&dir).await,
        Command::Devices(a) if a.can => can_devices(&dir, a).await,
        Command::Devices(a) => interruptible(devices(&dir, a.json)).await,
        Command::Add(a) => interruptible(add(&dir, a)).await,
        Command::Profiles(a) => {
            profiles(a.json);
            Ok(())
        }
        Command::Remove(a) => interruptible(remove(&dir, a)).await,
        Command::Set(a) => set(&dir, a),
        Command::Settings(a) => settings(&dir, a),
        Command::Config(a) => config(&dir, a),
        Command::Import(a) => import_cmd(&dir, a),
        Command::Watch(a) => watch(&dir, a.json).await,
        Command::Build(a) => interruptible(build(&dir, a)).await,
        Command::Flash(a) => flash(&dir, a).await,
        Command::FlashAll(a) => flash_all(&dir, a).await,
        Command::History(a) => history(a),
        Command::KatapultCheck(a) => katapult_check(&dir, a).await,
        Command::Status(a) => interruptible(status(&dir, a.json)).await,
        Command::Daemon(_) => unreachable!("run above"),
        Command::Install(a) => install_cmd::install(cli.config_dir.clone(), a).await,
        Command::Uninstall(a) => install_cmd::uninstall(a).await,
    }
}

/// `kflash status`: the daemon's view when it runs, else a one-shot check.
async fn status(dir: &std::path::Path, json: bool) -> Result<()> {
    let state_dir = registry::default_state_dir();
    let status = match kflash::daemon::socket::ask_status(&state_dir).await {
        Some(Ok(status)) => status,
        Some(Err(e)) => {
            tracing::warn!("the kflash daemon did not answer ({e}); checking once now");
            status_once(dir, &state_dir).await?
        }
        None => status_once(dir, &state_dir).await?,
    };
    if json {
        print_json(&status);
    } else {
        ui::print_status(&status);
    }
    Ok(())
}

async fn status_once(dir: &std::path::Path, state_dir: &std::path::Path) -> Result<serde_json::Value> {
    let reg = Registry::open(dir)?;
    let hp = Hotplug::start_udev(boards::resolver(&reg)).await?;
    let status = kflash::daemon::status_once(&reg, &hp, state_dir).await;
    Ok(serde_json::to_value(status).expect("the status serializes"))
}

async fn katapult_check(dir: &std::path::Path, a: KatapultCheckArgs) -> Result<()> {
    let reg = Registry::open(dir)?;
    reg.get(&a.key)?;
    let hp = Hotplug::start_udev(boards::resolver(&reg)).await?;
    let mut reporter = ui::batch::BatchReporter::new(a.yes, a.json, &[]);
    let gate = kflash::safety::GateOptions { skip_print_check: a.skip_print_check };
    let check =
        interruptible(kflash::app::katapult_check::katapult_check(&reg, &a.key, &hp, gate, &mut reporter)).await?;
    if a.json {
        print_json(&check);
    } else {
        let answer = match check.has_katapult {
            kflash::app::katapult_check::Answer::Yes => "yes",
            kflash::app::katapult_check::Answer::No => "no",
            kflash::app::katapult_check::Answer::Unknown => "unknown",
        };
        println!("{}: Katapult {answer} — {}", check.board, check.detail);
    }
    Ok(())
}

fn history(a: HistoryArgs) -> Result<()> {
    let state = registry::default_state_dir();
    let all = kflash::history::read_all(&state)?;
    for c in &all.corrupt {
        eprintln!(
            "warning: {} line {}: {} (skipped)",
            kflash::history::history_path(&state).display(),
            c.line,
            c.message
        );
    }
    let records: Vec<_> = all.records.iter().filter(|r| a.key.as_deref().is_none_or(|k| r.board_key == k)).collect();
    if a.json {
        print_json(&records);
        return Ok(());
    }
    if records.is_empty() {
        println!("No flashes recorded{}.", a.key.as_deref().map(|k| format!(" for '{k}'")).unwrap_or_default());
    }
    for r in records {
        let result = match r.result {
            kflash::history::FlashResult::Ok => "ok",
            kflash::history::FlashResult::Failed => "FAILED",
            kflash::history::FlashResult::Skipped => "skipped",
        };
        println!(
            "{}  {:<16} {:<7} {:<10} {} -> {}{}",
            r.time,
            r.board_key,
            result,
            r.method,
            r.version_before.as_deref().unwrap_or("?"),
            r.version_after.as_deref().unwrap_or("-"),
            r.error.as_deref().map(|e| format!("  ({e})")).unwrap_or_default()
        );
    }
    Ok(())
}

/// If an earlier kflash was killed while Klipper was stopped, start Klipper and say why.
async fn recover_klipper(dir: &std::path::Path) {
    let settings = Registry::open(dir).map(|r| r.settings).unwrap_or_default();
    let manager = kflash::service::ServiceManager::from_settings(&settings);
    match kflash::service::recover_stale_stop(&manager, &registry::default_state_dir()).await {
        Some(Ok(msg)) => eprintln!("kflash: {msg}"),
        Some(Err(e)) => {
            eprintln!("kflash: Klipper was left stopped by an earlier kflash and could not be started: {e}");
            if let Some(h) = e.help() {
                eprintln!("  help: {h}");
            }
        }
        None => {}
    }
}

async fn build(dir: &std::path::Path, a: BuildArgs) -> Result<()> {
    let reg = Registry::open(dir)?;
    let board = reg.get(&a.key)?.clone();
    let opts = kflash::firmware::BuildOptions { rebuild: a.rebuild, ..Default::default() };
    let mut progress =
        BuildDraw { spinner: ui::BuildSpinner::new(!a.json, &board.key), key: board.key.clone(), json: a.json };
    let out = kflash::firmware::firmware_for(&reg, &board, &opts, &mut progress).await;
    progress.spinner.finish();
    let out = out?;
    if a.json {
        print_json(&out);
    } else {
        let how = if out.cached { "from cache (nothing changed since the last build)" } else { "built" };
        println!(
            "{}: {} {} for {}, {how} in {:.1} s",
            board.key,
            out.firmware.app.as_deref().unwrap_or("firmware"),
            out.firmware.version,
            out.firmware.mcu,
            out.elapsed.as_secs_f64()
        );
        println!(
            "  {} ({} bytes, sha256 {})",
            out.firmware.image.display(),
            out.firmware.size,
            &out.firmware.sha256[..16]
        );
        if out.key.from_file_stamps() {
            println!("  (the Klipper tree is not a git checkout: the cache is keyed on its files' sizes and times)");
        }
        if let Some(log) = &out.log {
            println!("  build log: {}", log.display());
        }
    }
    Ok(())
}

/// `kflash build`'s progress: the spinner, and what the tree's Kconfig changed in the
/// board's config (printed before make runs, so a failing build still shows it).
struct BuildDraw {
    spinner: ui::BuildSpinner,
    key: String,
    json: bool,
}

impl kflash::event::Progress for BuildDraw {
    fn emit(&mut self, kind: kflash::event::EventKind) {
        use kflash::event::EventKind;
        match kind {
            EventKind::BuildOutput { .. } => self.spinner.line(),
            EventKind::ConfigChecked { migration } => self.config_checked(&migration),
            kind => {
                for line in kflash::event::words::describe(&kind) {
                    self.spinner.note(&line.text);
                }
            }
        }
    }
}

impl BuildDraw {
    fn config_checked(&mut self, m: &kflash::firmware::Migration) {
        for w in &m.warnings {
            eprintln!("Kconfig {w}");
        }
        if !self.json {
            for (i, line) in m.report_lines().iter().enumerate() {
                match i {
                    0 => println!("{}: {line}", self.key),
                    _ => println!("{line}"),
                }
            }
        }
    }
}

async fn flash(dir: &std::path::Path, a: FlashArgs) -> Result<()> {
    let request = kflash::daemon::socket::Request::Flash(kflash::daemon::socket::FlashRequest {
        key: a.key.clone(),
        force: a.force,
        method: a.method,
        no_build: a.no_build,
        skip_print_check: a.skip_print_check,
        // The questions come back here; this reporter answers them (with --yes, and says so).
        yes: false,
        config_dir: Some(dir.to_path_buf()),
    });
    let mut reporter = ui::batch::BatchReporter::new(a.yes, a.json, std::slice::from_ref(&a.key)).with_events(a.events);
    if let Some(done) = hand_over(&request, &mut reporter).await? {
        drop(reporter);
        let HandedOver::Flashed(summary) = done else { unreachable!("a flash ends flashed or failed") };
        if a.json {
            print_json(&summary);
        } else {
            ui::print_flash_summary(&summary);
        }
        return Ok(());
    }
    let reg = Registry::open(dir)?;
    reg.get(&a.key)?;
    let hp = Hotplug::start_udev(boards::resolver(&reg)).await?;
    let opts = kflash::app::flash::FlashOptions {
        force: a.force,
        method: a.method,
        no_build: a.no_build,
        skip_print_check: a.skip_print_check,
        ..Default::default()
    };
    // A signal cancels the run, which starts Klipper again, records the attempt and ends
    // with `Error::Interrupted`. The handlers are installed when the run first waits.
    let signal = kflash::service::shutdown_signal();
    let summary = kflash::app::flash::flash_one(&reg, &a.key, &hp, &opts, &mut reporter, signal).await;
    drop(reporter);
    let summary = summary?;
    if a.json {
        print_json(&summary);
    } else {
        ui::print_flash_summary(&summary);
    }
    Ok(())
}

async fn flash_all(dir: &std::path::Path, a: FlashAllArgs) -> Result<()> {
    use kflash::app::flash_all;
    if !a.dry_run {
        use std::io::IsTerminal;
        let current = if a.all {
            flash_all::CurrentBoards::Flash
        } else if a.only_outdated || a.yes || a.json || !std::io::stdin().is_terminal() {
            flash_all::CurrentBoards::Skip
        } else {
            flash_all::CurrentBoards::Ask
        };
        let request = kflash::daemon::socket::Request::FlashAll(kflash::daemon::socket::FlashAllRequest {
            current,
            parallel: a.parallel,
            builds: a.builds.unwrap_or(0),
            skip_unconfigured: a.skip_unconfigured,
            no_build: a.no_build,
            skip_print_check: a.skip_print_check,
            yes: false,
            config_dir: Some(dir.to_path_buf()),
        });
        // The daemon's run has its own keys; the drawer learns them from the events.
        let mut rep = ui::batch::BatchReporter::new(a.yes, a.json, &[]).boards_as_they_come().with_events(a.events);
        if let Some(done) = hand_over(&request, &mut rep).await? {
            drop(rep);
            let HandedOver::FlashAll(report, error) = done else { unreachable!("a flash-all ends with its report") };
            return flash_all_outcome(&a, report, error.map(Error::Daemon));
        }
    }
    let reg = Registry::open(dir)?;
    let hp = Hotplug::start_udev(boards::resolver(&reg)).await?;
    let mut plan = interruptible(flash_all::plan(&reg, &hp, a.skip_unconfigured)).await?;
    if a.dry_run {
        interruptible(flash_all::probe_builds(&reg, &mut plan, a.no_build)).await?;
        if a.json {
            print_json(&plan);
        } else {
            ui::batch::print_plan(&plan);
        }
        return Ok(());
    }
    let flash_current = match interruptible(version_questions(&mut plan, &a)).await? {
        Some(flash_current) => flash_current,
        None => {
            plan.drop_current();
            false
        }
    };
    if plan.boards.is_empty() {
        eprintln!("kflash: nothing to flash");
    }
    let opts = flash_all::FlashAllOptions {
        flash_current,
        skip_unconfigured: a.skip_unconfigured,
        parallel: match a.parallel {
            Some(0) => plan.boards.len(),
            Some(n) => n,
            None => 1,
        },
        builds: a.builds.unwrap_or(0),
        no_build: a.no_build,
        skip_print_check: a.skip_print_check,
        ..Default::default()
    };
    let report = if plan.boards.is_empty() {
        flash_all::FlashAllReport::nothing(&plan)
    } else {
        let keys: Vec<String> = plan.boards.iter().map(|b| b.key.clone()).collect();
        let mut rep = ui::batch::BatchReporter::new(a.yes, a.json, &keys).with_events(a.events);
        let signal = kflash::service::shutdown_signal();
        let report = flash_all::run(&reg, &hp, &plan, &opts, &mut rep, signal).await?;
        drop(rep);
        report
    };
    let mut report = report;
    let error = report.error.take();
    flash_all_outcome(&a, report, error)
}

/// Print a flash-all's report (run here or by the daemon) and end with its error.
fn flash_all_outcome(
    a: &FlashAllArgs,
    mut report: kflash::app::flash_all::FlashAllReport,
    error: Option<Error>,
) -> Result<()> {
    report.error = error;
    if a.json {
        let mut doc = serde_json::to_value(&report).expect("kflash's reports always serialize");
        if let Some(e) = &report.error {
            doc["error"] = serde_json::json!({
                "kind": e.kind(), "message": e.to_string(), "help": e.help(), "exit_code": e.exit_code()
            });
        }
        print_json(&doc);
        JSON_WRITTEN.store(true, std::sync::atomic::Ordering::Relaxed);
    } else {
        ui::batch::print_summary(&report);
    }
    match report.error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// How a run handed to the daemon ended.
enum HandedOver {
    Flashed(kflash::app::flash::FlashSummary),
    FlashAll(kflash::app::flash_all::FlashAllReport, Option<kflash::daemon::socket::ErrorDoc>),
}

/// When `kflash daemon` runs, it carries out flashes, so that only one process ever holds the
/// flash lock and the Klipper guard: hand `request` over and draw its events and questions
/// as if the run were here. `None`: no daemon (or one for another registry), run it here.
/// `KFLASH_NO_DAEMON=1` runs it here regardless (the flash lock still keeps runs apart).
async fn hand_over(
    request: &kflash::daemon::socket::Request,
    rep: &mut ui::batch::BatchReporter,
) -> Result<Option<HandedOver>> {
    use kflash::app::flash::Reporter;
    use kflash::daemon::socket::{self, ErrorDoc, RunReply};
    if std::env::var_os("KFLASH_NO_DAEMON").is_some_and(|v| !v.is_empty() && v != "0") {
        return Ok(None);
    }
    let mut conn = match socket::hand_over(&registry::default_state_dir(), request).await {
        None => return Ok(None),
        Some(Ok(conn)) => conn,
        Some(Err(e)) => {
            tracing::warn!("the kflash daemon could not be asked ({e}); running here");
            return Ok(None);
        }
    };
    let daemon_error = |kind: &str, message: String, help: &str, exit_code: i32| {
        Error::Daemon(ErrorDoc { kind: kind.into(), message, help: Some(help.into()), exit_code })
    };
    let mut signals = kflash::service::ShutdownSignals::install()
        .inspect_err(|e| tracing::warn!("cannot listen for SIGINT/SIGTERM/SIGHUP: {e}"))
        .ok();
    // The first signal asks the daemon to cancel (it starts Klipper again and answers with its
    // last word); a second one leaves at once, should the daemon not answer.
    let mut cancelled = false;
    loop {
        let reply = tokio::select! {
            biased;
            sig = next_signal(&mut signals) => {
                interrupt(&mut conn, &mut cancelled, sig).await?;
                continue;
            }
            r = conn.next() => r.map_err(|e| Error::io("read from", &conn.socket, e))?,
        };
        match reply {
            None => {
                return Err(daemon_error(
                    "daemon-gone",
                    "the kflash daemon hung up during the run".into(),
                    "see `journalctl -u kflash`; the daemon starts Klipper again when a run of its own ends in any way",
                    kflash::error::exit::FAILURE,
                ))
            }
            Some(RunReply::Accepted { run }) if rep.draws_events() => {
                let line = serde_json::json!({"event": "handed-over", "run": run, "daemon": conn.socket});
                eprintln!("{line}");
            }
            Some(RunReply::Accepted { run }) => {
                eprintln!("kflash: {run} is carried out by the kflash daemon ({})", conn.socket.display())
            }
            Some(RunReply::Busy { message }) => {
                return Err(daemon_error(
                    "daemon-busy",
                    message,
                    "wait for that run to end, then run kflash again",
                    kflash::error::exit::BUSY,
                ))
            }
            Some(RunReply::Event { event }) => rep.event(&event),
            Some(RunReply::Question { text }) => {
                // A signal while the question waits cancels the run instead of answering it.
                let answer = tokio::select! {
                    biased;
                    sig = next_signal(&mut signals) => {
                        interrupt(&mut conn, &mut cancelled, sig).await?;
                        continue;
                    }
                    a = rep.confirm(&text) => a,
                };
                conn.answer(answer).await.map_err(|e| Error::io("write to", &conn.socket, e))?;
            }
            Some(RunReply::Flashed { summary }) => return Ok(Some(HandedOver::Flashed(summary))),
            Some(RunReply::FlashAllDone { report, error }) => return Ok(Some(HandedOver::FlashAll(report, error))),
            Some(RunReply::Failed { error }) if error.kind == kflash::daemon::runs::OTHER_REGISTRY => {
                eprintln!("kflash: {}; running here instead", error.message);
                return Ok(None);
            }
            Some(RunReply::Failed { error }) => return Err(Error::Daemon(error)),
            Some(RunReply::Error { message }) => {
                return Err(daemon_error(
                    "daemon-refused",
                    message,
                    "run kflash as the user the daemon runs as (or root)",
                    kflash::error::exit::USAGE,
                ))
            }
        }
    }
}

/// The next shutdown signal; never, when they could not be listened for.
async fn next_signal(signals: &mut Option<kflash::service::ShutdownSignals>) -> &'static str {
    match signals {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

/// A signal during a handed-over run: the first asks the daemon to cancel, a second (or a
/// cancel that cannot be sent) leaves at once.
async fn interrupt(
    conn: &mut kflash::daemon::socket::RunConnection,
    cancelled: &mut bool,
    sig: &'static str,
) -> Result<()> {
    if *cancelled {
        eprintln!("kflash: {sig} again: leaving now; the daemon still ends the run and starts Klipper again (see `kflash status`)");
        return Err(Error::Interrupted(sig));
    }
    eprintln!(
        "kflash: {sig}: the daemon cancels the run and starts Klipper again if it stopped it (again to leave at once)"
    );
    *cancelled = true;
    if let Err(e) = conn.cancel().await {
        tracing::warn!("the cancel could not be sent: {e}");
        return Err(Error::Interrupted(sig));
    }
    Ok(())
}

/// Settle the version questions before the run: `Some(true)` flashes current boards too,
/// `Some(false)` flashes the planned boards as they are, `None` leaves the current ones out.
async fn version_questions(plan: &mut kflash::app::flash_all::FlashAllPlan, a: &FlashAllArgs) -> Result<Option<bool>> {
    use kflash::app::flash_all;
    use std::io::IsTerminal;
    match &plan.versions {
        flash_all::Versions::Klippy => {}
        flash_all::Versions::KlippyNotReady { state } => {
            eprintln!("[!!] Klippy is {state}: what the boards run is not known, so every board is planned")
        }
        flash_all::Versions::MoonrakerUnreachable { message } => {
            eprintln!("[!!] Moonraker is unreachable ({message}): what the boards run is not known, so every board is planned")
        }
    }
    if a.all {
        return Ok(Some(true));
    }
    if a.only_outdated {
        return Ok(None);
    }
    let current: Vec<String> = plan.current().map(|b| b.key.clone()).collect();
    if current.is_empty() {
        return Ok(Some(false));
    }
    let ask = !a.yes && std::io::stdin().is_terminal() && !a.json;
    let host = plan.host_version.clone().unwrap_or_default();
    if plan.all_current() {
        let question = format!("All boards already run {host}. Flash anyway?");
        if !ask {
            eprintln!("{question} no ({}; --all flashes them anyway)", why_not_asked(a.yes));
            return Ok(None);
        }
        return Ok(if ui::confirm_default(question, false).await { Some(true) } else { None });
    }
    for b in &plan.boards {
        let state = match b.outdated {
            Some(false) => "current".to_string(),
            Some(true) => format!(
                "outdated: runs {} ({})",
                b.running.as_deref().unwrap_or("?"),
                b.relation.as_deref().unwrap_or("")
            ),
            None => "version unknown: flashed".to_string(),
        };
        eprintln!("  {:<16} {state}", b.key);
    }
    let question = "Flash only outdated boards?".to_string();
    if !ask {
        eprintln!("{question} yes ({}; --all flashes every board)", why_not_asked(a.yes));
        return Ok(None);
    }
    Ok(if ui::confirm_default(question, true).await { None } else { Some(true) })
}

fn why_not_asked(yes: bool) -> &'static str {
    if yes {
        "--yes takes the default"
    } else {
        "not a terminal: the default"
    }
}

/// Run `work` until it ends or SIGINT/SIGTERM/SIGHUP arrives. The handlers are installed
/// before `work` first runs (biased select polls them first); a signal drops `work`, and with
/// it any Klipper guard inside, which starts Klipper again.
async fn interruptible<T>(work: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::select! {
        biased;
        sig = kflash::service::shutdown_signal() => Err(Error::Interrupted(sig)),
        r = work => r,
    }
}

fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).expect("kflash's reports always serialize"));
}

async fn connected(reg: &Registry) -> Result<Vec<Board>> {
    Ok(Hotplug::start_udev(boards::resolver(reg)).await?.snapshot())
}

async fn can_devices(dir: &std::path::Path, a: DevicesArgs) -> Result<()> {
    let reg = Registry::open(dir)?;
    let interfaces = kflash::app::can_devices::up_can_interfaces();
    if !interfaces.is_empty() {
        eprintln!(
            "Querying {} needs Klipper stopped (only unassigned nodes answer): kflash checks the printer first, \
             stops Klipper for about {} s and starts it again.",
            interfaces.join(", "),
            kflash::app::can_devices::QUERY_LISTEN.as_secs() * interfaces.len() as u64
        );
    }
    let mut reporter = ui::batch::BatchReporter::new(a.yes, a.json, &[]);
    let gate = kflash::safety::GateOptions { skip_print_check: a.skip_print_check };
    let found = interruptible(kflash::app::can_devices::can_devices(&reg, true, gate, &mut reporter)).await?;
    if a.json {
        print_json(&found);
        return Ok(());
    }
    let reg_note = |k: &Option<String>| {
        k.as_ref().map(|k| format!("registered as {k}")).unwrap_or_else(|| "not registered".into())
    };
    match (&found.configured, &found.moonraker_error) {
        (Some(nodes), _) => {
            println!("CAN nodes in printer.cfg:");
            if nodes.is_empty() {
                println!("  (none)");
            }
            for n in nodes {
                println!(
                    "  [{}] canbus_uuid {} {} {} ({})",
                    n.section,
                    n.uuid,
                    n.mcu.as_deref().unwrap_or("-"),
                    n.version.as_deref().unwrap_or("-"),
                    reg_note(&n.registered)
                );
            }
        }
        (None, e) => println!("CAN nodes in printer.cfg: unknown (Moonraker: {})", e.as_deref().unwrap_or("?")),
    }
    if found.interfaces.is_empty() {
        println!("No CAN interface is up (bring one up: `sudo ip link set can0 up type can bitrate 1000000`).");
    }
    for i in &found.interfaces {
        println!("Unassigned nodes answering on {i}:");
        let nodes: Vec<_> = found.queried.iter().flatten().filter(|n| &n.interface == i).collect();
        if nodes.is_empty() {
            println!("  (none; nodes Klipper had assigned answer only after a reset)");
        }
        for n in nodes {
            println!("  {} {} ({})", n.uuid, n.application, reg_note(&n.registered));
        }
    }
    println!(
        "Register a node with `kflash add --from-moonraker NAME` (a node printer.cfg names [mcu NAME]) or \
         `kflash add --canbus-uuid UUID --can-interface IFACE --name NAME --mcu MCU`."
    );
    Ok(())
}

async fn devices(dir: &std::path::Path, json: bool) -> Result<()> {
    let reg = Registry::open(dir)?;
    let view = boards::devices_view(&reg, &connected(&reg).await?);
    if json {
        print_json(&view);
        return Ok(());
    }
    println!("Registered boards:");
    if view.registered.is_empty() {
        println!("  (none; register one with `kflash add`)");
    }
    for r in &view.registered {
        let state = match (r.connected, r.ambiguous, r.mode) {
            _ if r.can.is_some() => "CAN node (`devices --can`)".to_string(),
            (true, true, _) => "AMBIGUOUS (several devices match)".to_string(),
            (true, false, Some(m)) => format!("connected, {m}"),
            _ => "absent".to_string(),
        };
        let mut flags = if r.flashable { String::new() } else { "  [excluded]".to_string() };
        if let Some(profile) = &r.config_unreviewed {
            flags += &format!("  [config from profile {profile} not reviewed: `kflash config {}`]", r.key);
        }
        println!(
            "  {:<20} {:<24} {:<12} {:<28} {}{flags}",
            r.key,
            r.name,
            r.mcu,
            state,
            r.devnode.as_deref().or(r.can.as_deref()).unwrap_or("-")
        );
    }
    if !view.unregistered.is_empty() {
        println!("\nUnregistered boards (register with `kflash add`):");
        for b in &view.unregistered {
            let id = &b.identity;
            println!(
                "  {:<9} {:<12} {:<26} {}",
                id.mode.to_string(),
                id.mcu.as_deref().unwrap_or("-"),
                id.serial.as_deref().unwrap_or("-"),
                id.devnode.as_deref().unwrap_or("-")
            );
        }
    }
    if !view.bridges.is_empty() {
        println!("\nUSB-to-CAN bridges (gs_usb):");
        for b in &view.bridges {
            println!(
                "  {:<20} {:<12} uuid {:<14} provides {}",
                b.key.as_deref().unwrap_or("(unregistered)"),
                b.mcu.as_deref().unwrap_or("-"),
                b.canbus_uuid.as_deref().unwrap_or("? (custom serial)"),
                b.interface.as_deref().unwrap_or("no interface yet")
            );
        }
    }
    if !view.other.is_empty() {
        println!("\nOther serial devices (not eligible):");
        for o in &view.other {
            let id = &o.board.identity;
            let name = id
                .by_id_name()
                .map(str::to_string)
                .or_else(|| id.devnode.clone())
                .unwrap_or_else(|| id.syspath.clone());
            println!("  {name:<50} {}", o.reason);
        }
    }
    Ok(())
}

/// `kflash profiles`: the shipped board profiles.
fn profiles(json: bool) {
    let all = kflash::profiles::all();
    if json {
        print_json(&all);
        return;
    }
    for p in &all {
        println!("{:<24} {:<12} {}", p.name, p.mcu, p.title);
        println!("    bootloader: {}", p.bootloader);
        for source in &p.sources {
            println!("    source: {source}");
        }
    }
    println!("\nSeed a new board's config with `kflash add --profile NAME`, then review it with `kflash config KEY`.");
}

/// What `kflash add`'s flags ask for, as given (no wizard).
fn add_request(a: &AddArgs) -> AddRequest {
    AddRequest {
        name: a.name.clone().unwrap_or_default(),
        key: a.key.clone(),
        mcu: a.mcu.clone(),
        flash_method: a.method,
        exclude: a.exclude,
    }
}

async fn add(dir: &std::path::Path, a: AddArgs) -> Result<()> {
    // An unknown profile is refused before anything else.
    let profile = a.profile.as_deref().map(kflash::profiles::find).transpose()?;
    let mut reg = Registry::open(dir)?;
    let can = match (&a.canbus_uuid, &a.from_moonraker) {
        (Some(uuid), _) => {
            let uuid: kflash::can::CanUuid =
                uuid.parse().map_err(|e: kflash::can::uuid::ParseUuidError| Error::InvalidInput(e.to_string()))?;
            Some((uuid, a.can_interface.clone(), add_request(&a)))
        }
        (None, Some(section)) => {
            let node = kflash::app::can_devices::from_moonraker(&reg, section).await?;
            let mut req = add_request(&a);
            if req.name.trim().is_empty() {
                req.name = node.section.strip_prefix("mcu ").unwrap_or(&node.section).to_string();
            }
            req.mcu = req.mcu.or(node.mcu);
            if req.mcu.is_none() {
                return Err(Error::InvalidInput(format!(
                    "Klippy has not reported the chip of [{}] (it is not connected to it): give --mcu",
                    node.section
                )));
            }
            Some((node.uuid, Some(node.interface), req))
        }
        (None, None) => None,
    };
    if let Some((uuid, interface, req)) = can {
        let entry = boards::add_can_board(&mut reg, uuid, interface.as_deref(), &req)?;
        reg.save_boards()?;
        if a.json {
            let mut doc = serde_json::to_value(&entry).expect("a board entry serializes");
            doc["key"] = entry.key.clone().into();
            print_json(&doc);
        } else {
            println!(
                "Registered '{}' as {} ({}), CAN node {uuid} on {}.",
                entry.name,
                entry.key,
                entry.mcu,
                entry.can_interface()
            );
        }
        return Ok(());
    }
    let connected = connected(&reg).await?;
    let interactive = a.device.is_none() || a.name.is_none();
    let (board, req) = if interactive {
        if !std::io::stdin().is_terminal() {
            return Err(Error::InvalidInput(
                "not a terminal: give --device and --name (and optionally --key, --mcu, --method, --exclude)".into(),
            ));
        }
        let candidates = boards::add_candidates(&reg, &connected);
        let names: Vec<String> = reg.boards().map(|b| b.name.clone()).collect();
        let (device, name, key, mcu, method) =
            (a.device.clone(), a.name.clone(), a.key.clone(), a.mcu.clone(), a.method);
        let connected = connected.clone();
        ui::prompt(move || {
            add_wizard(&connected, &candidates, &names, WizardPresets { device, name, key, mcu, method })
        })
        .await?
    } else {
        let board = boards::select_device(&connected, a.device.as_deref().unwrap_or_default())?.clone();
        (board, add_request(&a))
    };
    if let Some(profile) = profile {
        let seeded = kflash::app::seed::add_with_profile(&mut reg, &board, &req, &profile).await?;
        if a.json {
            let mut doc = serde_json::to_value(&seeded.entry).expect("a board entry serializes");
            doc["key"] = seeded.entry.key.clone().into();
            doc["config"] = seeded.config.display().to_string().into();
            doc["profile"] = seeded.profile.clone().into();
            doc["config_reviewed"] = false.into();
            print_json(&doc);
        } else {
            println!(
                "Registered '{}' as {} ({}), with its firmware config seeded from the profile '{}' at {}.",
                seeded.entry.name,
                seeded.entry.key,
                seeded.entry.mcu,
                seeded.profile,
                seeded.config.display()
            );
            println!(
                "Next: `kflash config {}` to review it (flash and flash-all skip the board until then).",
                seeded.entry.key
            );
        }
        return Ok(());
    }
    let entry = boards::add_board(&mut reg, &board, &req)?;
    reg.save_boards()?;
    if a.json {
        print_json(&entry);
    } else {
        println!(
            "Registered '{}' as {} ({}, serial {}).",
            entry.name,
            entry.key,
            entry.mcu,
            entry.serial.as_deref().unwrap_or("-")
        );
        println!("Next: `kflash config {}` to set up its firmware.", entry.key);
    }
    Ok(())
}

/// What the add flags already answered.
struct WizardPresets {
    device: Option<String>,
    name: Option<String>,
    key: Option<String>,
    mcu: Option<String>,
    method: FlashMethod,
}

/// The add questions; runs on a prompt thread (see [`ui::prompt`]), so it owns its data.
fn add_wizard(
    connected: &[Board],
    candidates: &[Board],
    names: &[String],
    a: WizardPresets,
) -> Result<(Board, AddRequest)> {
    let board = match &a.device {
        Some(sel) => boards::select_device(connected, sel)?.clone(),
        None => {
            if candidates.is_empty() {
                return Err(Error::DeviceNotFound("no unregistered Klipper or Katapult board is connected".into()));
            }
            println!("Connected boards that are not registered:");
            for (i, b) in candidates.iter().enumerate() {
                let id = &b.identity;
                println!(
                    "  {}) {} {} serial {} at {}",
                    i + 1,
                    id.mode,
                    id.mcu.as_deref().unwrap_or("?"),
                    id.serial.as_deref().unwrap_or("-"),
                    id.devnode.as_deref().unwrap_or("-")
                );
            }
            let pick = if candidates.len() == 1 {
                0
            } else {
                ui::ask_until(&format!("Board number [1-{}]", candidates.len()), None, |s| match s.parse::<usize>() {
                    Ok(n) if (1..=candidates.len()).contains(&n) => Ok(n - 1),
                    _ => Err(format!("enter a number from 1 to {}", candidates.len())),
                })?
            };
            candidates[pick].clone()
        }
    };
    let reported = board.identity.mcu.clone().unwrap_or_default();
    let name = match &a.name {
        Some(n) => n.clone(),
        None => ui::ask_until("Display name", None, |s| {
            if s.is_empty() {
                return Err("a name is required".into());
            }
            if names.iter().any(|n| n.eq_ignore_ascii_case(s)) {
                return Err(format!("'{s}' is already used"));
            }
            Ok(s.to_string())
        })?,
    };
    let mcu = match &a.mcu {
        Some(m) => m.clone(),
        None => ui::ask_until("MCU", Some(&reported), |s| {
            if s.is_empty() {
                Err("an MCU is required".into())
            } else {
                Ok(s.to_string())
            }
        })?,
    };
    let method =
        ui::ask_until("Flash method (katapult, make-flash, flashtool, default)", Some(a.method.as_str()), |s| {
            FlashMethod::parse(s).map_err(|e| e.to_string())
        })?;
    let exclude = ui::confirm("Exclude from flash-all?")?;
    Ok((board, AddRequest { name, key: a.key, mcu: Some(mcu), flash_method: method, exclude }))
}

async fn remove(dir: &std::path::Path, a: RemoveArgs) -> Result<()> {
    let mut reg = Registry::open(dir)?;
    let entry = reg.get(&a.key)?.clone();
    if !a.yes {
        if !std::io::stdin().is_terminal() {
            return Err(Error::InvalidInput(format!("not a terminal: add --yes to remove '{}'", a.key)));
        }
        let question = format!("Remove '{}' ({})?", entry.name, entry.key);
        if !ui::prompt(move || ui::confirm(&question)).await? {
            println!("Nothing removed.");
            return Ok(());
        }
    }
    reg.remove(&a.key)?;
    reg.save_boards()?;
    let cfg = reg.config_path(&a.key);
    println!("Removed '{}'.", entry.name);
    if cfg.exists() {
        if a.delete_config {
            std::fs::remove_file(&cfg).map_err(|e| Error::io("delete", &cfg, e))?;
            println!("Deleted its firmware config {}.", cfg.display());
        } else {
            println!("Its firmware config is kept at {} (use --delete-config to delete it).", cfg.display());
        }
    }
    Ok(())
}

fn set(dir: &std::path::Path, a: SetArgs) -> Result<()> {
    let mut reg = Registry::open(dir)?;
    let opt = |s: Option<String>| s.map(|v| if v.is_empty() { None } else { Some(v) });
    let (serial, pattern) = (opt(a.serial), opt(a.serial_pattern));
    let uuid = match opt(a.canbus_uuid) {
        Some(Some(u)) => Some(Some(u.parse::<kflash::can::CanUuid>().map_err(|e| Error::InvalidInput(e.to_string()))?)),
        Some(None) => Some(None),
        None => None,
    };
    let interface = opt(a.can_interface);
    let entry = reg
        .update(&a.key, |b| {
            if let Some(n) = a.name {
                b.name = n;
            }
            if let Some(m) = a.method {
                b.flash_method = m;
            }
            if a.exclude {
                b.flashable = false;
            }
            if a.include {
                b.flashable = true;
            }
            if let Some(m) = a.mcu {
                b.mcu = m;
            }
            if let Some(s) = serial {
                b.serial = s;
            }
            if let Some(p) = pattern {
                b.serial_pattern = p;
            }
            if let Some(u) = uuid {
                b.canbus_uuid = u;
            }
            if let Some(i) = interface {
                b.can_interface = i;
            }
        })?
        .clone();
    reg.save_boards()?;
    println!(
        "{}: name '{}', mcu {}, method {}, {}",
        entry.key,
        entry.name,
        entry.mcu,
        entry.flash_method.as_str(),
        if entry.flashable { "included in flash-all" } else { "excluded from flash-all" }
    );
    let cfg_path = reg.config_path(&entry.key);
    if cfg_path.exists() {
        if let Err(e) = kconfig::check_mcu(&entry, &cfg_path, &KConfig::load(&cfg_path)?) {
            eprintln!("warning: {e}");
        }
    }
    Ok(())
}

fn settings(dir: &std::path::Path, a: SettingsArgs) -> Result<()> {
    let mut reg = Registry::open(dir)?;
    match a.action.unwrap_or(SettingsAction::Show) {
        SettingsAction::Show => {
            if a.json {
                print_json(&reg.settings);
            } else {
                print!("{}", toml::to_string_pretty(&reg.settings).unwrap_or_default());
            }
        }
        SettingsAction::Set { key, value } => {
            reg.settings = reg.settings.with_value(&key, &value)?;
            reg.save_settings()?;
            if a.json {
                print_json(&reg.settings);
            } else {
                println!("{key} = {value}");
            }
        }
        SettingsAction::Unset { key } => {
            reg.settings = reg.settings.without_value(&key)?;
            reg.save_settings()?;
            if a.json {
                print_json(&reg.settings);
            } else {
                println!("{key} unset");
            }
        }
        SettingsAction::Path if a.json => print_json(&serde_json::json!({ "path": reg.dir() })),
        SettingsAction::Path => println!("{}", reg.dir().display()),
    }
    Ok(())
}

fn config(dir: &std::path::Path, a: ConfigArgs) -> Result<()> {
    let reg = Registry::open(dir)?;
    if a.show {
        let summary = kflash::app::config::checked_config(&reg, &a.key)?;
        if summary.config.is_none() {
            println!("{} (not created yet; run `kflash config {}`)", summary.path.display(), a.key);
            return Ok(());
        }
        println!("{}", summary.path.display());
        for (label, value) in summary.highlights() {
            println!("  {label:<18} {value}");
        }
        if let Some(profile) = reg.unreviewed_profile(&a.key) {
            println!("  {:<18} no: seeded from the profile '{profile}'; run `kflash config {}`", "reviewed", a.key);
        }
        return Ok(());
    }
    // A config for another MCU is refused first, terminal or not.
    kflash::app::config::checked_config(&reg, &a.key)?;
    if !(std::io::stdin().is_terminal() && std::io::stdout().is_terminal()) {
        return Err(Error::NeedsTerminal(format!(
            "`kflash config {}` runs menuconfig, a full-screen editor, and needs a terminal (stdin and stdout are not one)",
            a.key
        )));
    }
    match kflash::app::config::edit_config(&reg, &a.key)? {
        kflash::app::config::Edited::Saved { path, mcu } => {
            println!("Saved {} (MCU {mcu}).", path.display());
            mark_reviewed(dir, &a.key)?;
        }
        kflash::app::config::Edited::Unchanged { path } => {
            println!("No changes: {} was left as it was.", path.display());
            mark_reviewed(dir, &a.key)?;
        }
        kflash::app::config::Edited::NothingSaved { path } => {
            println!("menuconfig saved nothing; {} was not created.", path.display())
        }
    }
    Ok(())
}

/// menuconfig saved or confirmed the config: a seeded one counts as reviewed from now on.
fn mark_reviewed(dir: &std::path::Path, key: &str) -> Result<()> {
    if let Some(profile) = kflash::app::config::mark_reviewed(dir, key)? {
        println!("Reviewed: the config seeded from the profile '{profile}' is now used by flash and flash-all.");
    }
    Ok(())
}

fn import_cmd(dir: &std::path::Path, a: ImportArgs) -> Result<()> {
    let mut reg = Registry::open(dir)?;
    let source = match &a.path {
        Some(p) => import::resolve_source(p)
            .ok_or_else(|| Error::InvalidInput(format!("no kalico-flash devices.json at {}", p.display())))?,
        None => import::default_sources().into_iter().find(|p| p.is_file()).ok_or_else(|| {
            Error::InvalidInput(
                "no kalico-flash installation found in ~/kalico_flash; give its path: `kflash import PATH`".into(),
            )
        })?,
    };
    let configs = a.configs.clone().unwrap_or_else(import::default_configs_root);
    let report = import::import_kalico_flash(&mut reg, &source, &configs, a.dry_run)?;
    if a.json {
        print_json(&report);
        return Ok(());
    }
    let verb = if a.dry_run { "Would import" } else { "Imported" };
    println!("{verb} from {}:", report.source.display());
    println!("  boards: {}", if report.boards.is_empty() { "none".into() } else { report.boards.join(", ") });
    for (old, new) in &report.renamed {
        println!("  board '{old}' registered as {new}");
    }
    for (k, p) in &report.configs {
        println!("  config of {k} → {}", p.display());
    }
    for s in &report.settings {
        println!("  setting {s}");
    }
    if !report.skipped.is_empty() {
        println!("Skipped:");
        for s in &report.skipped {
            println!("  {s}");
        }
    }
    Ok(())
}

async fn watch(dir: &std::path::Path, json: bool) -> Result<()> {
    let reg = Registry::open(dir)?;
    let names: HashMap<String, String> = reg.boards().map(|b| (b.key.clone(), b.name.clone())).collect();
    let hp = Hotplug::start_udev(boards::resolver(&reg)).await?;
    let (present, mut events) = hp.subscribe_with_snapshot();
    let emit = |r: WatchRecord| {
        let line = if json { r.json_line() } else { r.text_line() };
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    };
    // On stderr in both modes: scripts can wait for this line to know events are flowing.
    eprintln!("kflash: watching USB serial devices ({} present); Ctrl-C to stop", present.len());
    for b in &present {
        emit(WatchRecord::present(b, &names, chrono::Local::now()));
    }
    // Registered CAN nodes: their interfaces and Klippy's view (the bus is not queried).
    let mut can = match kflash::app::watch::CanWatch::start(&reg).await {
        Some((can, present)) => {
            present.into_iter().for_each(&emit);
            Some(can)
        }
        None => None,
    };
    let mut shutdown = std::pin::pin!(kflash::service::shutdown_signal());
    loop {
        tokio::select! {
            records = async { can.as_mut().expect("guarded").next().await }, if can.is_some() => {
                records.into_iter().for_each(&emit);
            }
            ev = events.recv() => match ev {
                Ok(ev) => emit(WatchRecord::from_event(&ev, &names, chrono::Local::now())),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!("{n} events were dropped because output was too slow");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    return Err(Error::Udev(hp.failure().unwrap_or_else(|| "the event stream ended".into())));
                }
            },
            _ = &mut shutdown => {
                if let Some(can) = can {
                    can.stop().await;
                }
                return Ok(());
            }
        }
    }
}
