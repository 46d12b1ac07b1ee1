//! `kflash flash KEY`: the orchestrator ([`crate::orchestrator`]) run with one board.
//!
//! ```text
//! (lock) → Safety → Build → version check → Safety again → StopKlipper → Bootloader → Write → Reconnect
//!        → Identify → StartKlipper → Moonraker
//! ```
//!
//! The machine decides the order; [`super::flash_effects`] does the I/O. This module is the
//! setup around it (the flash lock for the whole run, the plan, the cancel) and the outcome:
//! the summary, or the error of the step that failed. Klipper is started by the run itself,
//! also when it is cancelled (Ctrl-C, SIGTERM, SIGHUP); if the run is dropped instead, or
//! panics, dropping the [`crate::service::KlipperGuard`] starts it.

use std::future::Future;
use std::path::PathBuf;
use std::time::Instant as StdInstant;

use futures::future::LocalBoxFuture;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::flash_effects::{BoardWork, FlashEffects, SharedReporter};
use crate::error::{Error, Result};
use crate::event::{Event, EventKind};
use crate::history::{FlashRecord, FlashResult};
use crate::hotplug::{Board, Hotplug};
use crate::orchestrator::driver::drive;
use crate::orchestrator::{BoardState, Machine, PlannedBoard, Policy};
use crate::registry::{BoardEntry, FlashMethod, Registry};
use crate::service::FlashLock;

/// The front end of a run: it draws the event stream and answers questions.
pub trait Reporter: Send {
    /// The run's structured event stream ([`crate::event::Event`]): everything that happens,
    /// from every layer. Front ends draw it ([`crate::event::words`] has the lines).
    fn event(&mut self, event: &Event);
    /// Ask a yes/no question; `--yes` answers yes, no terminal answers no. A future, so a
    /// signal can cancel the wait for an answer (the library never reads stdin itself); it
    /// owns what it needs, so the reporter goes on drawing the run's progress meanwhile.
    fn confirm(&mut self, question: &str) -> LocalBoxFuture<'static, bool>;
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
    /// make's `-j` per build (a share of the cores when several build at once).
    pub jobs: Option<u32>,
    /// The Klipper tree's fingerprint, taken once for the run.
    pub tree: Option<std::sync::Arc<crate::firmware::TreeStamp>>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Timings {
    pub build: Option<f64>,
    pub bootloader: Option<f64>,
    pub write: Option<f64>,
    pub reconnect: Option<f64>,
    pub identify: Option<f64>,
    pub klipper_downtime: Option<f64>,
    pub total: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
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

/// Flash one registered board end to end: the orchestrator's run with one board. Every
/// attempt is recorded in the flash history (also a refused, failed or cancelled one).
/// `cancel` (a signal, by name) cancels the run: Klipper is started again if it was stopped,
/// the attempt is recorded, and the result is [`Error::Interrupted`].
pub async fn flash_one(
    reg: &Registry,
    key: &str,
    hp: &Hotplug,
    opts: &FlashOptions,
    rep: &mut dyn Reporter,
    cancel: impl Future<Output = &'static str>,
) -> Result<FlashSummary> {
    let started = StdInstant::now();
    let entry = reg.get(key)?.clone();
    // A config seeded from a profile is flashed only after someone has looked at it.
    if let Some(profile) = reg.unreviewed_profile(key) {
        return Err(Error::ConfigUnreviewed { key: key.to_string(), profile: profile.to_string() });
    }
    let method = method_for(reg, &entry, opts.method);
    let state_dir = opts.state_dir.clone().unwrap_or_else(crate::registry::default_state_dir);
    let reason = format!("flash of {key}");
    // First, so a second kflash is refused before it builds or looks for the board; held
    // until the run is over.
    let _lock = match FlashLock::acquire(&state_dir, &reason) {
        Ok(lock) => lock,
        Err(e) => {
            let e = Error::from(e);
            let mut r = FlashRecord::new(&entry.key, &entry.name, &entry.mcu, method.as_str(), FlashResult::Failed);
            r.error = Some(e.to_string());
            if let Err(h) = crate::history::append(&state_dir, &r) {
                rep.event(&Event::run(EventKind::HistoryNotWritten { error: h.to_string() }));
            }
            return Err(e);
        }
    };

    let rep = SharedReporter::new(rep);
    let boards = vec![BoardWork::new(entry.clone(), method)];
    let effects = FlashEffects::new(reg, hp, opts, state_dir, reason, &rep, boards);
    let plan = vec![PlannedBoard {
        key: key.to_string(),
        in_bootloader: false,
        methods: methods_for(&entry, method, reg.settings.allow_flash_fallback),
        after: vec![],
    }];
    let policy = Policy { flash_current: opts.force, ..Policy::new(&reg.settings.timeouts) };
    let (machine, first) = Machine::new(plan, policy, Instant::now().into_std());
    let cancel = async {
        let signal = cancel.await;
        effects.interrupted.set(Some(signal));
    };
    let machine = drive(machine, first, &effects, cancel).await;

    let report = machine.reports().into_iter().next().expect("one board was planned");
    let passed = report.state.passed() && effects.interrupted.get().is_none();
    if !passed {
        return Err(effects.take_failure(key, &report.state));
    }
    let work = effects.take_board(key).expect("the planned board");
    let built = work.built.expect("a board that passed was built");
    let skipped = (report.state == BoardState::UpToDate).then(|| {
        format!("it already runs {}; use --force to flash it anyway", work.version_before.as_deref().unwrap_or("?"))
    });
    let timings = Timings {
        klipper_downtime: effects.klipper_downtime.get(),
        total: started.elapsed().as_secs_f64(),
        ..work.timings
    };
    Ok(FlashSummary {
        board: key.to_string(),
        method: report.method.unwrap_or(method),
        version_before: work.version_before,
        version_after: report.version_after,
        firmware_sha256: built.firmware.sha256.clone(),
        cached_build: built.cached,
        skipped,
        timings,
    })
}

/// The methods to try for this board: over CAN only the chosen one (kflash's own Katapult
/// writer; another is refused before Klipper stops), else [`method_order`].
pub fn methods_for(entry: &BoardEntry, chosen: FlashMethod, allow_fallback: bool) -> Vec<FlashMethod> {
    if entry.locator().is_can() {
        vec![chosen]
    } else {
        method_order(chosen, allow_fallback)
    }
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
