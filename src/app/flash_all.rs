//! `kflash flash-all`: every registered, connected board in one run of the orchestrator.
//!
//! [`plan`] looks and changes nothing (it is also `--dry-run`): which boards, which are left
//! out and why, what each runs by Klippy's word against the host tree's version. The caller
//! settles the questions (flash current boards too?) into [`FlashAllOptions`], then [`run`]
//! builds every board while Klipper runs, stops Klipper once, flashes (one at a time, or
//! `parallel` at once), starts Klipper once and verifies each board. The run is the same
//! machine, driver and effects as `kflash flash KEY`; this module only plans and tabulates.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::flash::{method_for, methods_for, FlashOptions, Reporter};
use super::flash_effects::{running_version, BoardWork, FlashEffects, SharedReporter, Whereabouts};
use crate::error::{Error, Result};
use crate::firmware::{BuildOptions, Probe, TreeStamp};
use crate::history::{FlashRecord, FlashResult};
use crate::hotplug::Hotplug;
use crate::identity::Mode;
use crate::moonraker::Moonraker;
use crate::orchestrator::driver::drive;
use crate::orchestrator::{BoardReport, BoardState, Cause, KlipperView, Machine, Phase, PlannedBoard, Policy};
use crate::registry::{FlashMethod, Registry};
use crate::service::FlashLock;

/// What the run may do, settled before it starts (the library never asks).
#[derive(Debug, Clone, Default)]
pub struct FlashAllOptions {
    /// Flash boards that already run the host's version too.
    pub flash_current: bool,
    /// Leave out boards without a usable config instead of refusing the whole run.
    pub skip_unconfigured: bool,
    /// Boards flashed at once (0 or 1: one after another).
    pub parallel: usize,
    /// Builds run at once (0: as many as the cores allow, see [`build_budget`]).
    pub builds: usize,
    pub no_build: bool,
    pub skip_print_check: bool,
    pub state_dir: Option<PathBuf>,
    pub cache_dir: Option<PathBuf>,
}

/// Why a registered board is not in the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "why", rename_all = "kebab-case")]
pub enum LeftOut {
    /// `flashable = false` in the registry (`kflash set KEY --exclude`).
    Excluded,
    Disconnected,
    /// More than one connected device matches the entry.
    Ambiguous {
        devices: usize,
    },
    /// No config, or one for another MCU (`--skip-unconfigured` leaves it out).
    Unconfigured {
        message: String,
    },
    /// Its config was seeded from a board profile and nobody has reviewed it in menuconfig.
    Unreviewed {
        profile: String,
    },
    /// It already runs the host's version, and current boards are not flashed.
    Current {
        version: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeftOutBoard {
    pub key: String,
    pub name: String,
    #[serde(flatten)]
    pub why: LeftOut,
}

/// One board of the plan, in flash order.
#[derive(Debug, Clone, Serialize)]
pub struct PlanBoard {
    pub key: String,
    pub name: String,
    pub mcu: String,
    /// `klipper`, or `katapult` for a board found waiting in its bootloader (flashed
    /// directly, without a bootloader request).
    pub mode: Mode,
    pub method: FlashMethod,
    /// What Klippy says it runs (`None`: unknown).
    pub running: Option<String>,
    /// `running` against the host tree's version ("3 commits behind" …).
    pub relation: Option<String>,
    /// Whether it runs something else than the host's version (`None`: unknown, so flashed).
    pub outdated: Option<bool>,
    /// What its build would do (`--dry-run` only: [`probe_builds`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub build: Option<PlannedBuild>,
    /// A CAN node: the interface it is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub behind: Option<String>,
    /// A USB-to-CAN bridge: the interface it provides (flashed after every board on it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provides: Option<String>,
}

/// What a board's build would do, found without building.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "build", rename_all = "kebab-case")]
pub enum PlannedBuild {
    /// A cache hit: make would not run.
    Cached {
        version: String,
    },
    Build {
        why: String,
    },
    /// The build would fail before make (a critical Kconfig change, `--no-build` without a
    /// cached image …).
    Fails {
        message: String,
    },
}

/// Where the running versions came from.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "source", rename_all = "kebab-case")]
pub enum Versions {
    /// Klippy is ready; its MCU versions are current.
    Klippy,
    /// Klippy is not ready: its versions may be stale, so they are not used.
    KlippyNotReady {
        state: String,
    },
    MoonrakerUnreachable {
        message: String,
    },
}

/// What a flash-all would do. Built without side effects.
#[derive(Debug, Clone, Serialize)]
pub struct FlashAllPlan {
    /// `git describe` of the Klipper tree: what a build produces (for a clean tree).
    pub host_version: Option<String>,
    pub versions: Versions,
    pub boards: Vec<PlanBoard>,
    pub left_out: Vec<LeftOutBoard>,
    /// The tree's fingerprint, taken once: the run's builds share it.
    #[serde(skip)]
    pub tree: Option<Arc<TreeStamp>>,
}

impl FlashAllPlan {
    /// Boards known to run the host's version.
    pub fn current(&self) -> impl Iterator<Item = &PlanBoard> {
        self.boards.iter().filter(|b| b.outdated == Some(false))
    }

    /// Every planned board is known to run the host's version.
    pub fn all_current(&self) -> bool {
        !self.boards.is_empty() && self.boards.iter().all(|b| b.outdated == Some(false))
    }

    /// Leave out the boards that already run the host's version (the answer "only outdated").
    pub fn drop_current(&mut self) {
        let (current, rest): (Vec<_>, Vec<_>) = self.boards.drain(..).partition(|b| b.outdated == Some(false));
        self.boards = rest;
        for b in current {
            let version = b.running.unwrap_or_default();
            self.left_out.push(LeftOutBoard { key: b.key, name: b.name, why: LeftOut::Current { version } });
        }
    }
}

/// What a flash-all does with boards that already run the host's version, when no
/// `--all` / `--only-outdated` said so on a command line that could ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CurrentBoards {
    /// Flash them too (`--all`).
    Flash,
    /// Leave them out (`--only-outdated`, and the answer when nobody can be asked).
    #[default]
    Skip,
    /// Ask through the reporter; an unanswered question leaves them out.
    Ask,
}

/// Settle what happens to the current boards of `plan`: `true` flashes them too; otherwise
/// they are left out of the plan (listed as current).
pub async fn settle_current(plan: &mut FlashAllPlan, policy: CurrentBoards, rep: &mut dyn Reporter) -> bool {
    let current: Vec<String> = plan.current().map(|b| b.key.clone()).collect();
    let flash = match policy {
        CurrentBoards::Flash => true,
        CurrentBoards::Skip => false,
        CurrentBoards::Ask if current.is_empty() => false,
        CurrentBoards::Ask => {
            let host = plan.host_version.clone().unwrap_or_default();
            let who = if plan.all_current() { "All boards".to_string() } else { current.join(", ") };
            rep.confirm(&format!("{who} already run {host}. Flash them anyway?")).await
        }
    };
    if !flash {
        plan.drop_current();
    }
    flash
}

/// Plan a flash-all: the registry's boards as connected now, and what Klippy says they run.
/// Boards without a usable config abort the plan with one error naming them all, unless
/// `skip_unconfigured`. Reads only: no build, no file written, no service touched.
pub async fn plan(reg: &Registry, hp: &Hotplug, skip_unconfigured: bool) -> Result<FlashAllPlan> {
    let mut boards = Vec::new();
    let mut left_out = Vec::new();
    let mut unconfigured = Vec::new();
    let leave = |key: &str, name: &str, why| LeftOutBoard { key: key.into(), name: name.into(), why };
    for entry in reg.boards() {
        if !entry.flashable {
            left_out.push(leave(&entry.key, &entry.name, LeftOut::Excluded));
            continue;
        }
        // A CAN node cannot be asked while Klippy holds it: planned when its interface exists
        // (the flash's preflight checks the rest before Klipper stops).
        let can = match entry.locator() {
            crate::locator::Locator::Can { interface, uuid } => Some((interface, uuid)),
            crate::locator::Locator::Usb { .. } => None,
        };
        let found: Vec<_> = match &can {
            Some((interface, _)) if std::path::Path::new("/sys/class/net").join(interface).exists() => vec![None],
            Some(_) => vec![],
            None => hp.snapshot().into_iter().filter(|b| entry.matches(&b.identity)).map(Some).collect(),
        };
        let board = match found.len() {
            0 => {
                left_out.push(leave(&entry.key, &entry.name, LeftOut::Disconnected));
                continue;
            }
            1 => found.into_iter().next().expect("one"),
            devices => {
                left_out.push(leave(&entry.key, &entry.name, LeftOut::Ambiguous { devices }));
                continue;
            }
        };
        if let Err(e) = crate::firmware::board_config(reg, entry) {
            unconfigured.push((entry.key.clone(), e));
            left_out.push(leave(&entry.key, &entry.name, LeftOut::Unconfigured { message: String::new() }));
            continue;
        }
        if let Some(profile) = reg.unreviewed_profile(&entry.key) {
            left_out.push(leave(&entry.key, &entry.name, LeftOut::Unreviewed { profile: profile.to_string() }));
            continue;
        }
        boards.push((entry.clone(), board));
    }
    if !unconfigured.is_empty() && !skip_unconfigured {
        return Err(Error::BoardsUnconfigured(unconfigured.iter().map(|(k, e)| format!("{k}: {e}")).collect()));
    }
    for (key, e) in unconfigured {
        if let Some(l) = left_out.iter_mut().find(|l| l.key == key) {
            l.why = LeftOut::Unconfigured { message: e.to_string() };
        }
    }

    let tree = Arc::new(TreeStamp::compute(&reg.settings.klipper_dir()).await);
    let host_version = tree.version().map(str::to_string);
    let mr = Moonraker::from_settings(&reg.settings);
    let versions = match mr.server_info().await {
        Ok(si) if si.klippy_state == "ready" => Versions::Klippy,
        Ok(si) => Versions::KlippyNotReady { state: si.klippy_state },
        Err(e) => Versions::MoonrakerUnreachable { message: e.to_string() },
    };
    let mut planned = Vec::new();
    for (entry, board) in boards {
        let mode = board.as_ref().map(|b| b.identity.mode).unwrap_or(Mode::Klipper);
        let bridge_uuid = entry.canbus_uuid.filter(|_| entry.is_can_bridge());
        let running = match (&versions, &board, entry.locator()) {
            (Versions::Klippy, _, crate::locator::Locator::Can { uuid, .. }) => {
                Whereabouts::Can(uuid).running_version(&mr).await.ok().flatten()
            }
            // A bridge is in printer.cfg by its CAN UUID.
            (Versions::Klippy, _, _) if bridge_uuid.is_some() && mode == Mode::Klipper => {
                Whereabouts::Can(bridge_uuid.expect("a bridge")).running_version(&mr).await.ok().flatten()
            }
            (Versions::Klippy, Some(board), _) if mode == Mode::Klipper => {
                running_version(&mr, board).await.ok().flatten()
            }
            _ => None,
        };
        let outdated = match (&running, &host_version) {
            (Some(r), Some(h)) => Some(r != h),
            _ => None,
        };
        let relation = match (&running, &host_version) {
            (Some(r), Some(h)) => Some(crate::version::relation(h, r).to_string()),
            _ => None,
        };
        planned.push(PlanBoard {
            key: entry.key.clone(),
            name: entry.name.clone(),
            mcu: entry.mcu.clone(),
            mode,
            method: method_for(reg, &entry, None),
            running,
            relation,
            outdated,
            build: None,
            behind: match entry.locator() {
                crate::locator::Locator::Can { interface, .. } => Some(interface),
                crate::locator::Locator::Usb { .. } => None,
            },
            provides: entry.is_can_bridge().then(|| entry.can_interface().to_string()),
        });
    }
    Ok(FlashAllPlan { host_version, versions, boards: order(planned), left_out, tree: Some(tree) })
}

/// For `--dry-run`: what each planned board's build would do (a cache hit and its version, a
/// build and why, or the error it would meet), found without building or writing anything.
pub async fn probe_builds(reg: &Registry, plan: &mut FlashAllPlan, no_build: bool) -> Result<()> {
    let opts = BuildOptions { cache_only: no_build, tree: plan.tree.clone(), ..Default::default() };
    for b in &mut plan.boards {
        let entry = reg.get(&b.key)?;
        b.build = Some(match crate::firmware::probe(reg, entry, &opts).await {
            Ok(Probe::Cached { version }) => PlannedBuild::Cached { version },
            Ok(Probe::Build { why }) => PlannedBuild::Build { why: why.to_string() },
            Err(e) => PlannedBuild::Fails { message: e.to_string() },
        });
    }
    Ok(())
}

/// The flash order: the registry's order, with boards found in their bootloader first (they
/// need no bootloader request, and an interrupted flash is finished soonest). A USB-to-CAN
/// bridge goes after every board behind it: its reboot takes their bus away.
fn order(mut boards: Vec<PlanBoard>) -> Vec<PlanBoard> {
    let buses: Vec<String> = boards.iter().filter_map(|b| b.behind.clone()).collect();
    let last = |b: &PlanBoard| b.provides.as_ref().is_some_and(|i| buses.contains(i));
    boards.sort_by_key(|b| (last(b), b.mode != Mode::Katapult));
    boards
}

/// The planned boards whose flash must be over before `boards[i]`'s starts.
/// - A USB-to-CAN bridge: every board behind it (its reboot takes their bus away).
/// - A CAN node: the nodes planned before it on the same interface. One CAN operation runs
///   per interface at a time (the interface lock); with `--parallel` a node queued behind
///   another's flash would otherwise spend its bootloader deadline waiting for the lock.
fn waits_for(boards: &[PlanBoard], i: usize) -> Vec<String> {
    let on = |bus: &String, among: &[PlanBoard]| {
        among.iter().filter(|o| o.behind.as_ref() == Some(bus)).map(|o| o.key.clone()).collect()
    };
    match (&boards[i].provides, &boards[i].behind) {
        (Some(bus), _) => on(bus, boards),
        (None, Some(bus)) => on(bus, &boards[..i]),
        (None, None) => vec![],
    }
}

/// How many builds run at once, and how many make jobs each gets: the cores shared out,
/// at least one job each.
pub fn build_budget(boards: usize, requested: usize, jobs_setting: u32) -> (usize, u32) {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let jobs = if jobs_setting > 0 { jobs_setting as usize } else { cores };
    let builds = if requested > 0 { requested } else { (jobs / 2).max(1) };
    let builds = builds.min(boards.max(1));
    (builds, (jobs / builds).max(1) as u32)
}

/// The outcome of a flash-all, for the table and `--json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct FlashAllReport {
    /// Every planned board passed, and Klipper runs again if it was stopped.
    pub ok: bool,
    /// From Klipper's stop to its start (`None`: Klipper was not stopped).
    pub klipper_downtime_secs: Option<f64>,
    pub host_version: Option<String>,
    pub boards: Vec<BoardRow>,
    pub left_out: Vec<LeftOutBoard>,
    /// The error the process ends with when not `ok`.
    #[serde(skip)]
    pub error: Option<Error>,
}

/// One board's line of the summary.
#[derive(Debug, Serialize, Deserialize)]
pub struct BoardRow {
    pub key: String,
    pub name: String,
    /// `cached`, `built`, `failed` or `not-built`.
    pub build: String,
    /// `flashed`, `up-to-date`, `failed`, `left-in-bootloader` or `not-flashed`.
    pub flash: String,
    /// `verified` (read back from the board, and Klipper's own view where it could be had),
    /// `unconfirmed` (the board runs it; Klipper could not say), `failed` or `not-checked`.
    pub verify: String,
    pub version_before: Option<String>,
    pub version_after: Option<String>,
    /// The board's own time inside Klipper's stop: bootloader, write, reconnect and identify.
    pub seconds: f64,
    pub build_seconds: Option<f64>,
    /// The board's state at the end (phase and cause for a failure).
    pub state: BoardState,
    /// What went wrong, and what to do about it.
    pub error: Option<String>,
    pub help: Option<String>,
}

/// Run the flash-all of `plan` under `opts`. `cancel` (a signal, by name) cancels the run:
/// Klipper is started again if it was stopped and every board gets its history record.
/// `Err` only when nothing ran (another kflash holds the flash lock); a run that failed is
/// an `Ok` report with `ok: false` and the error to end with.
pub async fn run(
    reg: &Registry,
    hp: &Hotplug,
    plan: &FlashAllPlan,
    opts: &FlashAllOptions,
    rep: &mut dyn Reporter,
    cancel: impl Future<Output = &'static str>,
) -> Result<FlashAllReport> {
    let state_dir = opts.state_dir.clone().unwrap_or_else(crate::registry::default_state_dir);
    let reason = "flash-all".to_string();
    let _lock = match FlashLock::acquire(&state_dir, &reason) {
        Ok(lock) => lock,
        Err(e) => {
            let e = Error::from(e);
            for b in &plan.boards {
                let mut r = FlashRecord::new(&b.key, &b.name, &b.mcu, b.method.as_str(), FlashResult::Failed);
                r.error = Some(e.to_string());
                let _ = crate::history::append(&state_dir, &r);
            }
            return Err(e);
        }
    };
    let (builds, jobs) = build_budget(plan.boards.len(), opts.builds, reg.settings.build_jobs);
    let flash_opts = FlashOptions {
        force: opts.flash_current,
        method: None,
        no_build: opts.no_build,
        state_dir: Some(state_dir.clone()),
        cache_dir: opts.cache_dir.clone(),
        skip_print_check: opts.skip_print_check,
        jobs: Some(jobs),
        tree: plan.tree.clone(),
    };
    let rep = SharedReporter::new(rep);
    let mut work = Vec::new();
    let mut machine_plan = Vec::new();
    for (i, b) in plan.boards.iter().enumerate() {
        let entry = reg.get(&b.key)?.clone();
        let methods = methods_for(&entry, b.method, reg.settings.allow_flash_fallback);
        work.push(BoardWork::new(entry, b.method));
        machine_plan.push(PlannedBoard {
            key: b.key.clone(),
            in_bootloader: b.mode == Mode::Katapult,
            methods,
            after: waits_for(&plan.boards, i),
        });
    }
    let effects = FlashEffects::new(reg, hp, &flash_opts, state_dir, reason, &rep, work);
    let policy = Policy {
        flash_current: opts.flash_current,
        parallel: opts.parallel.max(1),
        builds,
        ..Policy::new(&reg.settings.timeouts)
    };
    let (machine, first) = Machine::new(machine_plan, policy, Instant::now().into_std());
    let cancel = async {
        let signal = cancel.await;
        effects.interrupted.set(Some(signal));
    };
    let machine = drive(machine, first, &effects, cancel).await;

    let reports = machine.reports();
    let mut boards = Vec::new();
    let mut failed = Vec::new();
    for (r, p) in reports.iter().zip(&plan.boards) {
        let passed = r.state.passed() && effects.interrupted.get().is_none();
        let (error, help) = if passed {
            (None, None)
        } else {
            failed.push(r.key.clone());
            let (text, help) = effects.failure_info(&r.key, &r.state);
            (Some(text), help)
        };
        boards.push(row(r, p, error, help));
    }
    let error = if machine.ok() && effects.interrupted.get().is_none() {
        None
    } else if let Some(sig) = effects.interrupted.get() {
        Some(Error::Interrupted(sig))
    } else if let Some(e) = effects.take_run_error() {
        Some(e)
    } else {
        Some(Error::BoardsFailed(failed))
    };
    Ok(FlashAllReport {
        ok: error.is_none(),
        klipper_downtime_secs: machine.klipper_downtime().map(|d| d.as_secs_f64()),
        host_version: plan.host_version.clone(),
        boards,
        left_out: plan.left_out.clone(),
        error,
    })
}

impl FlashAllReport {
    /// The report of a run that had nothing to flash.
    pub fn nothing(plan: &FlashAllPlan) -> FlashAllReport {
        FlashAllReport {
            ok: true,
            klipper_downtime_secs: None,
            host_version: plan.host_version.clone(),
            boards: Vec::new(),
            left_out: plan.left_out.clone(),
            error: None,
        }
    }
}

fn row(r: &BoardReport, p: &PlanBoard, error: Option<String>, help: Option<String>) -> BoardRow {
    let build = match (&r.state, r.cached) {
        (_, Some(true)) => "cached",
        (_, Some(false)) => "built",
        (BoardState::Failed { phase: Phase::Build, .. }, None) => "failed",
        _ => "not-built",
    };
    let flash = match &r.state {
        BoardState::Flashed { .. } => "flashed",
        BoardState::UpToDate => "up-to-date",
        BoardState::LeftInBootloader { .. } => "left-in-bootloader",
        BoardState::Failed { phase, .. } if *phase >= Phase::Reconnect => "flashed",
        BoardState::Failed { phase, .. } if *phase >= Phase::Bootloader => "failed",
        _ => "not-flashed",
    };
    let verify = match &r.state {
        BoardState::Flashed { view: KlipperView::NotChecked { .. } } if !r.state.passed() => "unconfirmed",
        BoardState::Flashed { .. } => "verified",
        BoardState::Failed { phase: Phase::Reconnect | Phase::Identify | Phase::KlipperVerify, cause }
            if *cause != Cause::Cancelled =>
        {
            "failed"
        }
        _ => "not-checked",
    };
    let d = &r.durations;
    let seconds = [d.bootloader, d.flash, d.verify].iter().flatten().sum();
    BoardRow {
        key: r.key.clone(),
        name: p.name.clone(),
        build: build.to_string(),
        flash: flash.to_string(),
        verify: verify.to_string(),
        version_before: r.version_before.clone().or_else(|| p.running.clone()),
        version_after: r.version_after.clone(),
        seconds,
        build_seconds: d.build,
        state: r.state.clone(),
        error,
        help,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_budget_shares_the_cores() {
        let (builds, jobs) = build_budget(3, 2, 4);
        assert_eq!((builds, jobs), (2, 2));
        assert_eq!(build_budget(1, 3, 4), (1, 4), "never more builds than boards");
        assert_eq!(build_budget(3, 3, 2), (3, 1), "at least one job each");
        assert_eq!(build_budget(3, 0, 4).0, 2, "by default half the jobs, in builds");
    }

    fn planned(key: &str, mode: Mode, behind: Option<&str>, provides: Option<&str>) -> PlanBoard {
        PlanBoard {
            key: key.into(),
            name: key.into(),
            mcu: "stm32g0b1xx".into(),
            mode,
            method: FlashMethod::Katapult,
            running: None,
            relation: None,
            outdated: None,
            build: None,
            behind: behind.map(Into::into),
            provides: provides.map(Into::into),
        }
    }

    #[test]
    fn a_bridge_goes_after_the_boards_behind_it() {
        let keys = |b: Vec<PlanBoard>| b.into_iter().map(|b| b.key).collect::<Vec<_>>();
        let plan = vec![
            planned("u2c", Mode::Klipper, None, Some("can0")),
            planned("ebb", Mode::Klipper, Some("can0"), None),
            planned("octopus", Mode::Katapult, None, None),
            planned("sb", Mode::Klipper, Some("can0"), None),
        ];
        assert_eq!(keys(order(plan)), ["octopus", "ebb", "sb", "u2c"]);
        // Nobody behind it on this run: a bridge is just a USB board.
        let plan =
            vec![planned("u2c", Mode::Klipper, None, Some("can0")), planned("ebb", Mode::Klipper, Some("can1"), None)];
        assert_eq!(keys(order(plan)), ["u2c", "ebb"]);
    }

    #[test]
    fn nodes_on_one_interface_take_turns_and_the_bridge_waits_for_them_all() {
        let plan = order(vec![
            planned("u2c", Mode::Klipper, None, Some("can0")),
            planned("ebb", Mode::Klipper, Some("can0"), None),
            planned("octopus", Mode::Klipper, None, None),
            planned("sb", Mode::Klipper, Some("can0"), None),
            planned("probe", Mode::Klipper, Some("can1"), None),
            planned("sht", Mode::Klipper, Some("can0"), None),
        ]);
        let after = |key: &str| waits_for(&plan, plan.iter().position(|b| b.key == key).unwrap());
        assert_eq!(after("ebb"), Vec::<String>::new(), "the first node on can0 goes at once");
        assert_eq!(after("sb"), ["ebb"]);
        assert_eq!(after("sht"), ["ebb", "sb"]);
        assert_eq!(after("probe"), Vec::<String>::new(), "another interface: in parallel");
        assert_eq!(after("octopus"), Vec::<String>::new(), "a USB board: in parallel");
        assert_eq!(after("u2c"), ["ebb", "sb", "sht"]);
    }
}
