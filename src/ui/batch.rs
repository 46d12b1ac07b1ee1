//! Drawing a flash run (`flash`, `flash-all`, `katapult-check`): a line per board from the
//! run's event stream (an `indicatif` bar per board on a terminal, plain lines prefixed with
//! the board's key otherwise), the flash-all plan, and its summary table.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::Duration;

use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use kflash::app::flash::Reporter;
use kflash::app::flash_all::{FlashAllPlan, FlashAllReport, LeftOut, LeftOutBoard, PlannedBuild, Versions};
use kflash::event::words;
use kflash::orchestrator::{BoardState, Cause, Event, EventKind, KlipperView};

/// Draws a flash-all's progress on stderr.
pub struct BatchReporter {
    yes: bool,
    /// Bars, when stderr is a terminal.
    multi: Option<MultiProgress>,
    bars: BTreeMap<String, ProgressBar>,
    build_lines: BTreeMap<String, usize>,
    /// The last quarter printed of a write, per board (plain output).
    quarter: BTreeMap<String, usize>,
    width: usize,
    /// More than one board: lines say which board, and each board's state changes are told.
    batch: bool,
    /// `--events`: the events themselves, as JSON lines, instead of lines and bars.
    events: bool,
    /// Boards are added as their events arrive.
    lazy: bool,
}

impl BatchReporter {
    pub fn new(yes: bool, json: bool, keys: &[String]) -> Self {
        let live = !json && std::io::stderr().is_terminal();
        // A terminal indicatif will not draw on (TERM=dumb) gets plain lines.
        let multi =
            live.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())).filter(|m| !m.is_hidden());
        let width = keys.iter().map(|k| k.len()).max().unwrap_or(0);
        let mut bars = BTreeMap::new();
        if let Some(m) = &multi {
            for key in keys {
                let bar = m.add(ProgressBar::new_spinner());
                bar.set_style(spinner_style());
                bar.set_prefix(format!("{key:>width$}"));
                bar.set_message("queued");
                bars.insert(key.clone(), bar);
            }
        }
        let batch = keys.len() > 1;
        BatchReporter {
            yes,
            multi,
            bars,
            build_lines: BTreeMap::new(),
            quarter: BTreeMap::new(),
            width,
            batch,
            events: false,
            lazy: false,
        }
    }

    /// For a run whose boards are not known in advance (a flash-all the daemon plans): each
    /// board gets its bar, or its key before its lines, when its first event arrives.
    pub fn boards_as_they_come(mut self) -> Self {
        self.batch = true;
        self.lazy = true;
        self
    }

    fn add_board(&mut self, key: &str) {
        self.width = self.width.max(key.len());
        if let Some(m) = &self.multi {
            let bar = m.add(ProgressBar::new_spinner());
            bar.set_style(spinner_style());
            bar.set_prefix(format!("{key:>w$}", w = self.width));
            self.bars.insert(key.to_string(), bar);
        }
    }

    /// Draw the event stream as JSON lines on stderr, and nothing else.
    pub fn with_events(mut self, events: bool) -> Self {
        if events {
            if let Some(m) = self.multi.take() {
                m.clear().ok();
            }
            self.bars.clear();
            self.events = true;
        }
        self
    }

    /// `--events`: stderr carries only JSON lines.
    pub fn draws_events(&self) -> bool {
        self.events
    }

    /// A question's answer given without asking (`--yes`, no terminal).
    fn answered(&self, question: &str, answer: bool, why: &str) {
        if self.events {
            let q = serde_json::json!({"event": "question", "question": question, "answer": answer, "why": why});
            eprintln!("{q}");
        } else {
            self.line(format!("{question} {} ({why})", if answer { "yes" } else { "no" }));
        }
    }

    fn line(&self, text: String) {
        match &self.multi {
            // Hidden while a question is asked: println would drop the line.
            Some(m) if !m.is_hidden() => {
                let _ = m.println(text);
            }
            _ => eprintln!("{text}"),
        }
    }

    fn board_line(&self, key: &str, text: &str) {
        if self.batch {
            self.line(format!("{key:>w$} | {text}", w = self.width));
        } else {
            self.line(text.to_string());
        }
    }

    fn build_output(&mut self, key: &str) {
        let n = self.build_lines.entry(key.to_string()).or_default();
        *n += 1;
        if let Some(bar) = self.bars.get(key) {
            bar.set_message(format!("building ({n} lines of output)"));
        }
    }

    fn state(&mut self, key: &str, state: &BoardState) {
        let text = state_text(state);
        match self.bars.get(key) {
            Some(bar) => {
                if matches!(state, BoardState::Building | BoardState::AwaitingBootloader) {
                    bar.set_style(spinner_style());
                    bar.enable_steady_tick(Duration::from_millis(120));
                }
                if state.is_terminal() {
                    bar.set_style(spinner_style());
                    bar.finish_with_message(text);
                } else {
                    bar.set_message(text);
                }
            }
            None if self.batch => self.board_line(key, &format!("-> {text}")),
            None => {}
        }
    }

    fn progress(&mut self, key: &str, what: &str, done: usize, total: usize) {
        if let Some(bar) = self.bars.get(key) {
            if bar.length() != Some(total as u64) {
                bar.set_style(bar_style());
                bar.set_length(total as u64);
            }
            bar.set_position(done as u64);
            bar.set_message(what.to_string());
            return;
        }
        let quarter = done * 4 / total.max(1);
        if self.quarter.get(key) != Some(&quarter) || done == total {
            self.quarter.insert(key.to_string(), quarter);
            self.board_line(key, &format!("  {what} {}% ({done}/{total} blocks)", done * 100 / total.max(1)));
        }
    }
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{prefix} {spinner} {wide_msg}").expect("a valid template")
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {wide_msg}").expect("a valid template")
}

impl Reporter for BatchReporter {
    fn confirm(&mut self, question: &str) -> futures::future::LocalBoxFuture<'static, bool> {
        if self.yes {
            self.answered(question, true, "--yes");
            return Box::pin(async { true });
        }
        if !std::io::stdin().is_terminal() {
            self.answered(question, false, "not a terminal; pass --yes to continue");
            return Box::pin(async { false });
        }
        // The bars would draw over the question.
        if let Some(m) = &self.multi {
            m.set_draw_target(ProgressDrawTarget::hidden());
        }
        Box::pin(super::confirm_async(question.to_string()))
    }

    fn event(&mut self, event: &Event) {
        if self.events {
            match serde_json::to_string(event) {
                Ok(line) => eprintln!("{line}"),
                Err(e) => tracing::warn!("an event could not be written as JSON: {e}"),
            }
            return;
        }
        if let Some(key) = event.board.as_deref() {
            if self.lazy && !self.bars.contains_key(key) && self.multi.is_some() {
                self.add_board(key);
            }
        }
        if let Some(m) = &self.multi {
            // Drawing again after a question, if one hid the bars.
            if m.is_hidden() {
                m.set_draw_target(ProgressDrawTarget::stderr());
            }
        }
        let key = event.board.as_deref();
        match (key, &event.kind) {
            (Some(key), EventKind::Board { state }) => self.state(key, state),
            (Some(key), EventKind::BuildOutput { .. }) => self.build_output(key),
            (Some(key), EventKind::WriteProgress { done, total }) => self.progress(key, "writing", *done, *total),
            (Some(key), EventKind::ReadBackProgress { done, total }) => {
                self.progress(key, "reading back", *done, *total)
            }
            (key, kind) => {
                for line in words::describe(kind) {
                    match key {
                        Some(key) => self.board_line(key, &line.to_string()),
                        None => self.line(line.to_string()),
                    }
                }
            }
        }
    }
}

/// A board's state in a few words.
pub fn state_text(state: &BoardState) -> String {
    match state {
        BoardState::Queued => "queued".into(),
        BoardState::Building => "building".into(),
        BoardState::Built => "built; waiting for Klipper to stop".into(),
        BoardState::AwaitingBootloader => "entering the bootloader".into(),
        BoardState::CheckingTarget => "checking the MCU and application start".into(),
        BoardState::Writing { method } => format!("writing ({})", method.as_str()),
        BoardState::AwaitingApplication => "waiting for it to come back running Klipper".into(),
        BoardState::Identifying => "reading the running version".into(),
        BoardState::Releasing { .. } => "refused: sending it back to its firmware".into(),
        BoardState::Flashed { view: KlipperView::Pending } => "flashed; waiting for Klipper's view".into(),
        BoardState::Flashed { view: KlipperView::Confirmed } => "flashed, verified by the board and by Klipper".into(),
        BoardState::Flashed { view: KlipperView::NotListed } => "flashed, verified (not in printer.cfg)".into(),
        BoardState::Flashed { view: KlipperView::NotChecked { why } } => {
            format!("flashed, verified by the board (Klipper not asked: {why:?})")
        }
        BoardState::UpToDate => "already runs this version".into(),
        BoardState::Skipped { cause } => format!("skipped ({})", cause_text(cause)),
        BoardState::Failed { phase, cause } => format!("FAILED in {phase:?}: {}", cause_text(cause)),
        BoardState::LeftInBootloader { phase, cause } => {
            format!("FAILED in {phase:?}, left in its bootloader: {}", cause_text(cause))
        }
    }
}

fn cause_text(cause: &Cause) -> String {
    match cause {
        Cause::Cancelled => "cancelled".into(),
        Cause::DeadlinePassed => "no answer before the deadline".into(),
        Cause::Refused { reason } => reason.clone(),
        Cause::DeviceGone => "the board went away".into(),
        Cause::VersionMismatch { expected, running } => format!("runs {running}, not {expected}"),
        Cause::DriverFailed => "kflash's task for the step failed".into(),
        Cause::Error { message, .. } => first_line(message),
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").to_string()
}

fn left_out_text(l: &LeftOutBoard) -> String {
    let why = match &l.why {
        LeftOut::Excluded => "excluded from flash-all (`kflash set KEY --include` to include it)".to_string(),
        LeftOut::Disconnected => "not connected".to_string(),
        LeftOut::Ambiguous { devices } => format!("{devices} connected devices match it; register it by USB serial"),
        LeftOut::Unconfigured { message } => format!("no usable config: {}", first_line(message)),
        LeftOut::Unreviewed { profile } => format!(
            "its config was seeded from the board profile '{profile}' and not reviewed: run `kflash config {}` first",
            l.key
        ),
        LeftOut::Current { version } => format!("already runs {version}"),
    };
    format!("  {} ({}): {why}", l.key, l.name)
}

/// The plan, as `--dry-run` prints it.
pub fn print_plan(plan: &FlashAllPlan) {
    println!("Host Klipper tree: {}", plan.host_version.as_deref().unwrap_or("(no git version)"));
    match &plan.versions {
        Versions::Klippy => {}
        Versions::KlippyNotReady { state } => {
            println!("Klippy is {state}: the boards' running versions are not known, so every board is planned")
        }
        Versions::MoonrakerUnreachable { message } => {
            println!("Moonraker is unreachable ({message}): every board is planned")
        }
    }
    if plan.boards.is_empty() {
        println!("No board to flash.");
    } else {
        let mut t = Table::new();
        t.load_style(UTF8_FULL_CONDENSED);
        t.set_header(["#", "Board", "MCU", "Found in", "Method", "Runs", "Against the host", "Build", "Plan"]);
        for (i, b) in plan.boards.iter().enumerate() {
            let action = match (b.mode, b.outdated) {
                (kflash::identity::Mode::Katapult, _) => "flash (already in Katapult)",
                (_, Some(false)) => "flash (current)",
                _ => "flash",
            };
            t.add_row([
                (i + 1).to_string(),
                match (&b.provides, &b.behind) {
                    (Some(i), _) => format!("{} ({}), USB-to-CAN bridge for {i}", b.key, b.name),
                    (_, Some(i)) => format!("{} ({}) on {i}", b.key, b.name),
                    _ => format!("{} ({})", b.key, b.name),
                },
                b.mcu.clone(),
                b.mode.as_str().to_string(),
                b.method.as_str().to_string(),
                b.running.clone().unwrap_or_else(|| "?".into()),
                b.relation.clone().unwrap_or_else(|| "unknown".into()),
                match &b.build {
                    Some(PlannedBuild::Cached { .. }) => "cached".to_string(),
                    Some(PlannedBuild::Build { why }) => format!("build: {why}"),
                    Some(PlannedBuild::Fails { message }) => format!("FAILS: {}", first_line(message)),
                    None => "-".to_string(),
                },
                action.to_string(),
            ]);
        }
        println!("{t}");
    }
    if !plan.left_out.is_empty() {
        println!("Not in this run:");
        for l in &plan.left_out {
            println!("{}", left_out_text(l));
        }
    }
}

/// The summary table, then Klipper's downtime, what to do about failures, and the boards left out.
pub fn print_summary(r: &FlashAllReport) {
    for line in summary_lines(r) {
        println!("{line}");
    }
}

/// [`print_summary`]'s lines (the dashboard draws the same).
pub fn summary_lines(r: &FlashAllReport) -> Vec<String> {
    let mut out = Vec::new();
    let mut t = Table::new();
    t.load_style(UTF8_FULL_CONDENSED);
    t.set_header(["Board", "Build", "Flash", "Verify", "Version before → after", "Time"]);
    for b in &r.boards {
        let before = b.version_before.as_deref().unwrap_or("?");
        let after = b.version_after.as_deref().unwrap_or("-");
        let time = match (b.build_seconds, b.seconds) {
            (Some(build), s) if s > 0.0 => format!("build {build:.1} s, flash {s:.1} s"),
            (Some(build), _) => format!("build {build:.1} s"),
            (None, s) => format!("{s:.1} s"),
        };
        t.add_row([
            b.key.clone(),
            b.build.to_string(),
            b.flash.to_string(),
            b.verify.to_string(),
            format!("{before} → {after}"),
            time,
        ]);
    }
    if !r.boards.is_empty() {
        out.extend(t.to_string().lines().map(String::from));
    }
    match r.klipper_downtime_secs {
        Some(d) => out.push(format!("Klipper was down {d:.1} s.")),
        None => out.push("Klipper was not stopped.".into()),
    }
    for b in r.boards.iter().filter(|b| b.error.is_some()) {
        out.push(format!("{}: {}", b.key, b.error.as_deref().unwrap_or("")));
        if let Some(help) = &b.help {
            out.push(format!("  help: {help}"));
        }
    }
    if !r.left_out.is_empty() {
        out.push("Not in this run:".into());
        for l in &r.left_out {
            out.push(left_out_text(l));
        }
    }
    out
}
