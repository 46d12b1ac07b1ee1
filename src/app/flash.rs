//! `kflash flash KEY`: the whole job for one board, as an explicit sequence of phases.
//!
//! ```text
//! (lock) → Safety → Build → version check → Safety again → StopKlipper → Bootloader → Write → Reconnect
//!        → Identify → StartKlipper → Moonraker
//! ```
//!
//! Everything between StopKlipper and StartKlipper runs inside [`stopped`], whose result is
//! returned only after Klipper has been started again; a cancelled future (Ctrl-C, SIGTERM,
//! SIGHUP) or a panic drops the [`KlipperGuard`], which starts it too.

use std::path::PathBuf;
use std::time::{Duration, Instant as StdInstant};

use serde::Serialize;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::firmware::{self, BuildOptions, BuildOutcome, BuildProgress};
use crate::flash::katapult::{check_target, Expectation, FlashEvent, KatapultSession};
use crate::flash::{external, identify, usb, FlashError};
use crate::hotplug::{Board, Hotplug};
use crate::moonraker::{mcu_for_serial, Moonraker, MoonrakerError};
use crate::registry::{BoardEntry, FlashMethod, Registry};
use crate::safety::{clear_to_stop_klipper, GateOptions, PrintCheck};
use crate::service::{FlashLock, KlipperGuard, ServiceManager};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Safety,
    Build,
    StopKlipper,
    Bootloader,
    Write,
    Reconnect,
    Identify,
    StartKlipper,
    Moonraker,
}

impl Phase {
    pub fn label(self) -> &'static str {
        match self {
            Phase::Safety => "Safety",
            Phase::Build => "Build",
            Phase::StopKlipper => "Service",
            Phase::Bootloader => "Bootloader",
            Phase::Write => "Flash",
            Phase::Reconnect => "Verify",
            Phase::Identify => "Verify",
            Phase::StartKlipper => "Service",
            Phase::Moonraker => "Verify",
        }
    }
}

/// What the flash reports while it runs; the CLI draws it.
#[derive(Debug, Clone)]
pub enum Report {
    Begin(Phase, String),
    Done(Phase, String, Duration),
    Warning(String),
    Flash(FlashEvent),
    BuildLine(String),
}

/// The caller's side: progress display and questions.
pub trait Reporter: Send {
    fn report(&mut self, r: Report);
    /// Ask a yes/no question; `--yes` answers yes, no terminal answers no. A future, so a
    /// signal can cancel the wait for an answer (the library never reads stdin itself).
    fn confirm<'a>(&'a mut self, question: &'a str) -> futures::future::BoxFuture<'a, bool>;
}

#[derive(Debug, Clone, Default)]
pub struct FlashOptions {
    /// Flash even if the board already runs the built version.
    pub force: bool,
    pub method: Option<FlashMethod>,
    /// Use the cached firmware; fail if there is none.
    pub no_build: bool,
    pub state_dir: Option<PathBuf>,
    pub cache_dir: Option<PathBuf>,
    /// `--skip-print-check`: pass a print check that cannot be answered (recorded).
    pub skip_print_check: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    pub build: Option<f64>,
    pub bootloader: Option<f64>,
    pub write: Option<f64>,
    pub reconnect: Option<f64>,
    pub identify: Option<f64>,
    pub klipper_downtime: Option<f64>,
    pub total: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FlashSummary {
    pub board: String,
    pub method: FlashMethod,
    pub version_before: Option<String>,
    pub version_after: Option<String>,
    pub firmware_sha256: String,
    pub cached_build: bool,
    /// Why nothing was flashed, when nothing was.
    pub skipped: Option<String>,
    pub timings: Timings,
}

struct Ctx<'a> {
    reg: &'a Registry,
    entry: BoardEntry,
    hp: &'a Hotplug,
    state_dir: PathBuf,
}

impl Ctx<'_> {
    fn secs(&self, f: impl Fn(&crate::registry::Timeouts) -> u64) -> Duration {
        Duration::from_secs(f(&self.reg.settings.timeouts))
    }
}

/// Resolve the flash method for a board.
pub fn method_for(reg: &Registry, entry: &BoardEntry, over: Option<FlashMethod>) -> FlashMethod {
    match over.unwrap_or(entry.flash_method) {
        FlashMethod::Default => reg.settings.default_flash_method,
        m => m,
    }
}

/// The one connected device that is this board.
pub fn find_connected(hp: &Hotplug, entry: &BoardEntry) -> Result<Board> {
    let hits: Vec<Board> = hp.snapshot().into_iter().filter(|b| entry.matches(&b.identity)).collect();
    match hits.len() {
        1 => Ok(hits.into_iter().next().unwrap()),
        0 => Err(Error::DeviceNotFound(format!("board '{}' ({}) is not connected", entry.key, entry.name))),
        n => Err(Error::DeviceNotFound(format!(
            "{n} connected devices match board '{}'; register it by USB serial (`kflash set {} --serial …`)",
            entry.key, entry.key
        ))),
    }
}

struct BuildLines<'a>(&'a mut dyn Reporter);

impl BuildProgress for BuildLines<'_> {
    fn line(&mut self, line: &str) {
        self.0.report(Report::BuildLine(line.to_string()));
    }
    fn note(&mut self, text: &str) {
        self.0.report(Report::Warning(text.to_string()));
    }

    fn config_checked(&mut self, m: &crate::firmware::Migration) {
        for w in &m.warnings {
            self.0.report(Report::Warning(format!("Kconfig {w}")));
        }
        let lines = m.report_lines();
        if !lines.is_empty() {
            self.0.report(Report::Warning(lines.join("\n   ")));
        }
    }
}

/// What an attempt got to, for the history whatever the outcome.
#[derive(Default)]
struct Attempt {
    timings: Timings,
    firmware: Option<crate::firmware::Firmware>,
    version_before: Option<String>,
    /// The method that wrote the image (differs from the chosen one after a fallback).
    method_used: Option<FlashMethod>,
    /// The last print-safety check's outcome.
    print_check: Option<PrintCheck>,
}

/// Flash one registered board end to end, and record the attempt in the flash history.
pub async fn flash_one(
    reg: &Registry,
    key: &str,
    hp: &Hotplug,
    opts: &FlashOptions,
    rep: &mut dyn Reporter,
) -> Result<FlashSummary> {
    let entry = reg.get(key)?.clone();
    let method = method_for(reg, &entry, opts.method);
    let state_dir = opts.state_dir.clone().unwrap_or_else(crate::registry::default_state_dir);
    let ctx = Ctx { reg, entry: entry.clone(), hp, state_dir };
    let mut attempt = Attempt::default();
    let result = run_flash(&ctx, method, opts, rep, &mut attempt).await;
    let record = history_record(&entry, attempt.method_used.unwrap_or(method), &attempt, &result);
    if let Err(e) = crate::history::append(&ctx.state_dir, &record) {
        rep.report(Report::Warning(format!("the flash was not recorded in the history: {e}")));
    }
    result
}

/// Record a flash that was interrupted (the flash future was dropped on a signal) so the
/// history shows every attempt.
pub fn record_interruption(reg: &Registry, key: &str, opts: &FlashOptions, why: &str) -> Result<()> {
    let entry = reg.get(key)?;
    let method = method_for(reg, entry, opts.method);
    let state_dir = opts.state_dir.clone().unwrap_or_else(crate::registry::default_state_dir);
    let mut r = crate::history::FlashRecord::new(
        &entry.key,
        &entry.name,
        &entry.mcu,
        method.as_str(),
        crate::history::FlashResult::Failed,
    );
    r.error = Some(format!("interrupted by {why}"));
    crate::history::append(&state_dir, &r)?;
    Ok(())
}

fn history_record(
    entry: &BoardEntry,
    method: FlashMethod,
    a: &Attempt,
    result: &Result<FlashSummary>,
) -> crate::history::FlashRecord {
    use crate::history::{Durations, FlashRecord, FlashResult};
    let outcome = match result {
        Ok(s) if s.skipped.is_some() => FlashResult::Skipped,
        Ok(_) => FlashResult::Ok,
        Err(_) => FlashResult::Failed,
    };
    let mut r = FlashRecord::new(&entry.key, &entry.name, &entry.mcu, method.as_str(), outcome);
    r.version_before = a.version_before.clone();
    r.version_after = result.as_ref().ok().and_then(|s| s.version_after.clone());
    r.firmware_sha256 = a.firmware.as_ref().map(|f| f.sha256.clone());
    r.firmware_size = a.firmware.as_ref().map(|f| f.size);
    r.error = result.as_ref().err().map(|e| e.to_string());
    r.print_check = a.print_check;
    let t = &a.timings;
    let sum = |xs: &[Option<f64>]| xs.iter().flatten().copied().reduce(|x, y| x + y);
    r.durations = Durations {
        build: t.build,
        bootloader: t.bootloader,
        flash: t.write,
        verify: sum(&[t.reconnect, t.identify]),
        klipper_downtime: t.klipper_downtime,
    };
    r
}

async fn run_flash(
    ctx: &Ctx<'_>,
    method: FlashMethod,
    opts: &FlashOptions,
    rep: &mut dyn Reporter,
    attempt: &mut Attempt,
) -> Result<FlashSummary> {
    let started = StdInstant::now();
    let (reg, hp, entry) = (ctx.reg, ctx.hp, &ctx.entry);
    let key = entry.key.as_str();
    // First, so a second kflash is refused before it builds or looks for the board.
    let _lock = FlashLock::acquire(&ctx.state_dir, &format!("flash of {key}"))?;

    let mr = Moonraker::from_settings(&reg.settings);
    let gate = GateOptions { skip_print_check: opts.skip_print_check };
    let first = clear_to_stop_klipper(&mr, gate, None, rep).await?;
    attempt.print_check = Some(first.check());

    // Build while Klipper still runs: the printer is down only for the flash itself.
    rep.report(Report::Begin(Phase::Build, format!("firmware for {}", entry.name)));
    let build_opts = BuildOptions {
        rebuild: false,
        cache_only: opts.no_build,
        cache_dir: opts.cache_dir.clone(),
        state_dir: Some(ctx.state_dir.clone()),
    };
    let built = firmware::firmware_for(reg, entry, &build_opts, &mut BuildLines(rep)).await?;
    rep.report(Report::Done(
        Phase::Build,
        format!(
            "{} {} ({} bytes){}",
            built.firmware.app.as_deref().unwrap_or("firmware"),
            built.firmware.version,
            built.firmware.size,
            if built.cached { ", from cache" } else { "" }
        ),
        built.elapsed,
    ));
    attempt.firmware = Some(built.firmware.clone());
    let timings = &mut attempt.timings;
    timings.build = Some(built.elapsed.as_secs_f64());

    let board = find_connected(hp, entry)?;
    if first.check() == PrintCheck::Idle {
        // Klippy's MCU versions are what it saw when it last connected; only trust them
        // while it is ready (after a shutdown or error they may be stale).
        attempt.version_before = match mr.server_info().await {
            Ok(si) if si.klippy_state == "ready" => running_version(&mr, &board).await.ok().flatten(),
            Ok(si) => {
                rep.report(Report::Warning(format!(
                    "Klippy is {}, so its view of the board's version is not trusted; flashing",
                    si.klippy_state
                )));
                None
            }
            Err(_) => None,
        };
        if let Some(v) = &attempt.version_before {
            let rel = crate::version::relation(&built.firmware.version, v);
            rep.report(Report::Done(Phase::Safety, format!("{} runs {v} ({rel})", entry.name), Duration::ZERO));
            if *v == built.firmware.version && !opts.force {
                attempt.timings.total = started.elapsed().as_secs_f64();
                return Ok(FlashSummary {
                    board: key.to_string(),
                    method,
                    version_before: Some(v.clone()),
                    version_after: Some(v.clone()),
                    firmware_sha256: built.firmware.sha256.clone(),
                    cached_build: built.cached,
                    skipped: Some(format!("it already runs {v}; use --force to flash it anyway")),
                    timings: attempt.timings.clone(),
                });
            }
        }
    }
    // Once more right before stopping Klipper: a print may have started during the build.
    let clearance = clear_to_stop_klipper(&mr, gate, Some(&first), rep).await?;
    let check = clearance.check();
    attempt.print_check = Some(check);

    rep.report(Report::Begin(Phase::StopKlipper, format!("stopping {}", reg.settings.klipper_service)));
    let manager = ServiceManager::from_settings(&reg.settings);
    let guard = KlipperGuard::stop(manager, &ctx.state_dir, &format!("flash of {key}"), clearance).await?;
    if let Some(note) = guard.note() {
        rep.report(Report::Warning(note));
    }
    rep.report(Report::Done(Phase::StopKlipper, format!("{} stopped", guard.service()), Duration::ZERO));

    let outcome = stopped(ctx, method, &board, &built, rep, timings, &mut attempt.method_used).await;

    rep.report(Report::Begin(Phase::StartKlipper, format!("starting {}", reg.settings.klipper_service)));
    let restart = guard.restart().await;
    match &restart {
        Ok(r) => {
            timings.klipper_downtime = Some(r.downtime.as_secs_f64());
            rep.report(Report::Done(Phase::StartKlipper, r.summary(&reg.settings.klipper_service), Duration::ZERO));
        }
        Err(e) => rep.report(Report::Warning(format!("{e}"))),
    }
    let version_after = outcome?;
    let started_again = restart?.started;
    match (check, started_again) {
        (PrintCheck::MoonrakerDown, _) => rep.report(Report::Warning(
            "Moonraker was unreachable, so Klipper's own view of the board was not checked".into(),
        )),
        (PrintCheck::Skipped, _) => rep.report(Report::Warning(
            "Moonraker could not be asked (--skip-print-check), so Klipper's own view of the board was not checked"
                .into(),
        )),
        (_, false) => rep.report(Report::Warning(
            "Klipper was not running before kflash and was left stopped, so its view of the board was not checked"
                .into(),
        )),
        _ => {
            let deadline = Instant::now() + ctx.secs(|t| t.klippy_ready_secs);
            verify_in_klipper(&mr, &board, &version_after, check, deadline, rep).await?
        }
    }
    timings.total = started.elapsed().as_secs_f64();
    Ok(FlashSummary {
        board: key.to_string(),
        method: attempt.method_used.unwrap_or(method),
        version_before: attempt.version_before.clone(),
        version_after: Some(version_after),
        firmware_sha256: built.firmware.sha256.clone(),
        cached_build: built.cached,
        skipped: None,
        timings: timings.clone(),
    })
}

/// The part that runs with Klipper stopped. Returns the version the board runs afterwards.
async fn stopped(
    ctx: &Ctx<'_>,
    method: FlashMethod,
    board: &Board,
    built: &BuildOutcome,
    rep: &mut dyn Reporter,
    timings: &mut Timings,
    method_used: &mut Option<FlashMethod>,
) -> Result<String> {
    let fw = &built.firmware;
    let identity = board.identity.clone();

    let t = StdInstant::now();
    rep.report(Report::Begin(Phase::Bootloader, "requesting the bootloader (1200 baud)".into()));
    let boot = usb::enter_bootloader(ctx.hp, board, Instant::now() + ctx.secs(|t| t.bootloader_secs)).await?;
    timings.bootloader = Some(t.elapsed().as_secs_f64());
    rep.report(Report::Done(
        Phase::Bootloader,
        format!("in Katapult at {}", boot.identity.devnode.as_deref().unwrap_or("?")),
        t.elapsed(),
    ));

    let t = StdInstant::now();
    *method_used = Some(write_with_fallback(ctx, method, &boot, built, rep).await?);
    timings.write = Some(t.elapsed().as_secs_f64());

    let t = StdInstant::now();
    rep.report(Report::Begin(Phase::Reconnect, "waiting for the board to come back running Klipper".into()));
    let back = usb::await_application(ctx.hp, &identity, Instant::now() + ctx.secs(|t| t.reconnect_secs)).await?;
    timings.reconnect = Some(t.elapsed().as_secs_f64());
    let devnode = back.identity.devnode.clone().unwrap_or_default();
    rep.report(Report::Done(Phase::Reconnect, format!("back in Klipper mode at {devnode}"), t.elapsed()));

    let t = StdInstant::now();
    rep.report(Report::Begin(Phase::Identify, "reading the running version (identify)".into()));
    let dict =
        identify::read_identify(std::path::Path::new(&devnode), Instant::now() + Duration::from_secs(10)).await?;
    timings.identify = Some(t.elapsed().as_secs_f64());
    if dict.version != fw.version {
        return Err(FlashError::VersionMismatch { expected: fw.version.clone(), running: dict.version }.into());
    }
    rep.report(Report::Done(Phase::Identify, format!("running {}", dict.version), t.elapsed()));
    Ok(dict.version)
}

/// The methods to try, in order: the chosen one, then (when fallback is allowed) the others
/// that need no extra software — native Katapult, then `make flash`.
pub fn method_order(chosen: FlashMethod, allow_fallback: bool) -> Vec<FlashMethod> {
    let mut order = vec![chosen];
    if allow_fallback {
        for m in [FlashMethod::Katapult, FlashMethod::MakeFlash] {
            if !order.contains(&m) {
                order.push(m);
            }
        }
    }
    order
}

/// Write with the chosen method, falling back while the board is still in Katapult. A
/// refusal (wrong MCU, wrong application start) is never retried with another method, nor
/// is a board that went away. The first method's error is the one reported.
async fn write_with_fallback(
    ctx: &Ctx<'_>,
    method: FlashMethod,
    boot: &Board,
    built: &BuildOutcome,
    rep: &mut dyn Reporter,
) -> Result<FlashMethod> {
    let refused = |e: &Error| matches!(e, Error::Flash(f) if f.is_refusal());
    if method != FlashMethod::Katapult {
        if let Err(e) = precheck(ctx, boot, built, rep).await {
            if refused(&e) {
                release_untouched(ctx, boot, rep).await;
            }
            return Err(e);
        }
    }
    let mut first_error = None;
    for (i, m) in method_order(method, ctx.reg.settings.allow_flash_fallback).into_iter().enumerate() {
        if i > 0 {
            rep.report(Report::Warning(format!("trying method {} instead", m.as_str())));
        }
        let result = match m {
            FlashMethod::Katapult | FlashMethod::Default => write_katapult(ctx, boot, built, rep).await,
            FlashMethod::MakeFlash | FlashMethod::Flashtool => write_external(ctx, m, boot, built, rep).await,
        };
        let e = match result {
            Ok(()) => return Ok(m),
            Err(e) => e,
        };
        if refused(&e) {
            release_untouched(ctx, boot, rep).await;
            return Err(e);
        }
        let gone = matches!(e, Error::Flash(FlashError::DeviceGone(_)));
        if first_error.is_some() {
            rep.report(Report::Warning(format!("method {} failed too: {e}", m.as_str())));
        } else {
            first_error = Some(e);
        }
        if gone {
            break;
        }
    }
    Err(first_error.expect("at least one method was tried"))
}

/// After a refusal nothing was written: ask Katapult to start the installed firmware again
/// and await it, so Klipper finds the board as it was. Best effort: failures are reported.
async fn release_untouched(ctx: &Ctx<'_>, boot: &Board, rep: &mut dyn Reporter) {
    let started = async {
        KatapultSession::open(boot.identity.devnode.as_deref())?.start_application().await?;
        usb::await_application(ctx.hp, &boot.identity, Instant::now() + ctx.secs(|t| t.reconnect_secs)).await
    };
    match started.await {
        Ok(_) => {
            rep.report(Report::Warning("nothing was written; the board was sent back to the firmware it had".into()))
        }
        Err(e) => {
            rep.report(Report::Warning(format!("nothing was written, but the board stays in its bootloader: {e}")))
        }
    }
}

/// For the external tools: connect to Katapult ourselves and check MCU and application start
/// before handing the board over, so no tool writes to the wrong board.
async fn precheck(ctx: &Ctx<'_>, boot: &Board, built: &BuildOutcome, rep: &mut dyn Reporter) -> Result<()> {
    let image = std::fs::read(&built.firmware.image).map_err(|e| Error::io("read", &built.firmware.image, e))?;
    let info = KatapultSession::open(boot.identity.devnode.as_deref())?.connect().await?;
    rep.report(Report::Flash(FlashEvent::Connected(info.clone())));
    check_target(&info, &expectation(ctx, built), &image)?;
    Ok(())
}

fn expectation(ctx: &Ctx<'_>, built: &BuildOutcome) -> Expectation {
    Expectation {
        mcu: built.config.mcu().unwrap_or(&ctx.entry.mcu).to_string(),
        app_start: built.config.application_address(),
    }
}

async fn write_external(
    ctx: &Ctx<'_>,
    method: FlashMethod,
    boot: &Board,
    built: &BuildOutcome,
    rep: &mut dyn Reporter,
) -> Result<()> {
    // by-path names the USB port, which survives the re-enumerations the tools cause.
    let device = boot.identity.by_path.clone().or_else(|| boot.identity.devnode.clone()).unwrap_or_default();
    let timeout = ctx.secs(|t| t.flash_secs);
    let t = StdInstant::now();
    rep.report(Report::Begin(Phase::Write, format!("running {} on {device}", method.as_str())));
    match method {
        FlashMethod::Flashtool => {
            external::flashtool(&ctx.reg.settings.katapult_dir(), &device, &built.firmware.image, timeout).await?
        }
        _ => {
            external::make_flash(
                &ctx.reg.settings.klipper_dir(),
                // The copy that was built, so make's own olddefconfig never touches the board's file.
                &built.built_config,
                &built.build_dir,
                &device,
                timeout,
            )
            .await?
        }
    }
    rep.report(Report::Done(Phase::Write, format!("{} reported success", method.as_str()), t.elapsed()));
    Ok(())
}

async fn write_katapult(ctx: &Ctx<'_>, boot: &Board, built: &BuildOutcome, rep: &mut dyn Reporter) -> Result<()> {
    let image = std::fs::read(&built.firmware.image).map_err(|e| Error::io("read", &built.firmware.image, e))?;
    let expect = expectation(ctx, built);
    let mut session = KatapultSession::open(boot.identity.devnode.as_deref())?;
    rep.report(Report::Begin(Phase::Write, format!("writing {} bytes through Katapult", image.len())));
    let t = StdInstant::now();
    let mut on_event = |e: &FlashEvent| rep.report(Report::Flash(e.clone()));
    let flash = session.flash(&image, &expect, &mut on_event);
    let report = tokio::time::timeout(ctx.secs(|t| t.flash_secs), flash).await.map_err(|_| {
        FlashError::NoResponse { command: "the flash", tries: 1, last: "timeouts.flash_secs passed".into() }
    })??;
    rep.report(Report::Done(
        Phase::Write,
        format!("{} blocks written and read back, {} pages", report.blocks, report.pages),
        t.elapsed(),
    ));
    Ok(())
}

/// What Klipper says this board runs, by the board's configured serial path (`None`: no
/// `[mcu]` section uses it, or Klippy has no version for it).
async fn running_version(mr: &Moonraker, board: &Board) -> Result<Option<String>, MoonrakerError> {
    let mcus = mr.mcus().await?;
    let id = &board.identity;
    let found = [id.by_id.as_deref(), id.by_path.as_deref(), id.serial.as_deref()]
        .into_iter()
        .flatten()
        .find_map(|d| mcu_for_serial(&mcus, d));
    Ok(found.and_then(|m| m.mcu_version.clone()))
}

/// Level (c): after Klipper is back, Klippy is ready and reports the new version for this
/// board's MCU.
///
/// After an emergency stop (the gate's `KlippyHalted`, which the user confirmed) the other
/// boards are still shut down, and a restarted Klippy stops in `error` ("Can not update MCU
/// 'mcu' config as it is shutdown"): then kflash sends the FIRMWARE_RESTART the user would.
async fn verify_in_klipper(
    mr: &Moonraker,
    board: &Board,
    version: &str,
    check: PrintCheck,
    deadline: Instant,
    rep: &mut dyn Reporter,
) -> Result<()> {
    // Klippy not ready, or Moonraker unable to say: the flash was good, the check was not had.
    let unconfirmed = |cause: MoonrakerError| -> Error {
        FlashError::KlipperUnconfirmed { version: version.to_string(), cause }.into()
    };
    let t = StdInstant::now();
    rep.report(Report::Begin(Phase::Moonraker, "waiting for Klipper to be ready".into()));
    if check == PrintCheck::KlippyHalted {
        match mr.wait_klippy_settled(deadline).await {
            Err(MoonrakerError::KlippyNotReady { state, message, .. }) if message.contains("shutdown") => {
                rep.report(Report::Warning(format!(
                    "Klippy is in state {state}: {}; the other boards are still shut down from the emergency stop, \
                     so kflash sends FIRMWARE_RESTART",
                    crate::moonraker::first_line(&message).unwrap_or("")
                )));
                mr.firmware_restart().await.map_err(unconfirmed)?;
            }
            Err(e) => return Err(unconfirmed(e)),
            Ok(_) => {}
        }
    }
    let info = mr.wait_klippy_ready(deadline).await.map_err(unconfirmed)?;
    let running = running_version(mr, board).await.map_err(|e| unconfirmed(e.behind_moonraker(&info.klippy_state)))?;
    match running {
        Some(v) if v == version => {
            rep.report(Report::Done(
                Phase::Moonraker,
                format!("Klipper is ready and reports {v} for this board"),
                t.elapsed(),
            ));
            Ok(())
        }
        Some(v) => Err(FlashError::VersionMismatch {
            expected: version.to_string(),
            running: format!("{v} according to Klipper"),
        }
        .into()),
        None => {
            rep.report(Report::Warning(
                "Klipper is ready, but no [mcu] section in printer.cfg uses this board's serial, so its version there was not checked".into(),
            ));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_order() {
        use FlashMethod::*;
        assert_eq!(method_order(Katapult, false), vec![Katapult]);
        assert_eq!(method_order(Katapult, true), vec![Katapult, MakeFlash]);
        assert_eq!(method_order(MakeFlash, true), vec![MakeFlash, Katapult]);
        assert_eq!(method_order(Flashtool, true), vec![Flashtool, Katapult, MakeFlash]);
    }
}
