//! The dashboard's state, sans IO: fed [`Input`]s (board views, Klippy's and the printer's
//! state, the daemon, a run's events and questions, keys, resizes), it returns an
//! [`Outcome`]: whether to draw again and what the runner should do. No clock, no terminal:
//! the snapshot tests drive it directly.

use std::collections::{BTreeMap, VecDeque};

use crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use kflash::daemon::status::FirmwareState;
use kflash::event::{words, Event, EventKind};
use kflash::orchestrator::BoardState;

use super::view::{BoardsView, HostView};

/// Lines the log pane keeps (a build prints thousands).
const LOG_LINES: usize = 400;

/// Something the dashboard is told.
#[derive(Debug, Clone)]
pub enum Input {
    /// The boards and the host line, after a hotplug change, a Klippy change or a registry edit.
    Boards(BoardsView),
    Host(HostView),
    Key(KeyEvent),
    Resize,
    /// A run began (the runner started it): its title.
    RunStarted(String),
    RunEvent(Event),
    /// The run asks; answer with [`Action::Answer`].
    Question(String),
    /// The run ended: the summary lines (the CLI's), and whether it failed.
    RunEnded {
        lines: Vec<String>,
        failed: bool,
    },
    /// Something the runner wants said in the message line (an edit saved, a failure).
    Message(String),
}

/// What the runner should do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Flash(String),
    FlashAll,
    Add,
    Edit(String),
    Menuconfig(String),
    Remove(String),
    Settings,
    /// The answer to the run's question.
    Answer(bool),
    /// Cancel the run under way (Klipper is started again by the run).
    Cancel,
    Quit,
}

/// What an input did.
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    pub redraw: bool,
    pub action: Option<Action>,
}

impl Outcome {
    fn none() -> Outcome {
        Outcome::default()
    }

    fn redraw() -> Outcome {
        Outcome { redraw: true, action: None }
    }

    fn act(action: Action) -> Outcome {
        Outcome { redraw: true, action: Some(action) }
    }
}

/// A yes/no question on screen.
#[derive(Debug, Clone, PartialEq)]
pub struct Dialog {
    pub text: String,
    pub purpose: Purpose,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Purpose {
    /// The run's own question.
    RunQuestion,
    /// Esc or Ctrl-C during a run.
    CancelRun,
    Remove(String),
}

/// The phases of a board's flash, as the checklist shows them.
pub const PHASES: [&str; 6] = ["build", "bootloader", "write", "reconnect", "verify", "done"];

/// One board of the run under way.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BoardRun {
    pub state: Option<BoardState>,
    /// Index into [`PHASES`] of the phase under way (or reached).
    pub phase: usize,
    pub build_lines: usize,
    pub write: Option<(usize, usize)>,
    pub read_back: Option<(usize, usize)>,
    /// A terminal state: flashed, up to date, skipped, failed.
    pub finished: bool,
    pub failed: bool,
}

/// The run under way (or just ended, until a key dismisses it).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunView {
    pub title: String,
    pub boards: BTreeMap<String, BoardRun>,
    pub log: VecDeque<String>,
    /// The summary (the CLI's lines), once the run ended.
    pub summary: Option<Vec<String>>,
    pub failed: bool,
    /// Cancel asked for (and sent).
    pub cancelling: bool,
    /// Someone else's run (the daemon's, for a console macro or another `kflash`), seen on
    /// the daemon's stream: shown, never cancelled from here, dismissed by any key.
    pub observed: bool,
}

impl RunView {
    pub fn ended(&self) -> bool {
        self.summary.is_some()
    }

    fn log(&mut self, line: String) {
        if self.log.len() == LOG_LINES {
            self.log.pop_front();
        }
        self.log.push_back(line);
    }

    fn event(&mut self, ev: &Event) {
        let key = ev.board.clone();
        if self.observed && ev.kind == (EventKind::Run { state: kflash::orchestrator::RunState::Done }) {
            let lines = self
                .boards
                .iter()
                .map(|(k, b)| {
                    format!("{k}: {}", b.state.as_ref().map(crate::ui::batch::state_text).unwrap_or_default())
                })
                .collect();
            self.failed = self.boards.values().any(|b| b.failed);
            self.summary = Some(lines);
        }
        if let Some(key) = &key {
            let b = self.boards.entry(key.clone()).or_default();
            match &ev.kind {
                EventKind::Board { state } => {
                    if let Some(p) = phase_of(state) {
                        b.phase = p;
                    }
                    b.finished = state.is_terminal();
                    b.failed = matches!(state, BoardState::Failed { .. } | BoardState::LeftInBootloader { .. });
                    b.state = Some(state.clone());
                }
                EventKind::BuildOutput { line } => {
                    b.build_lines += 1;
                    let line = format!("{key} | {line}");
                    self.log(line);
                    return;
                }
                EventKind::WriteProgress { done, total } => {
                    b.write = Some((*done, *total));
                    return;
                }
                EventKind::ReadBackProgress { done, total } => {
                    b.read_back = Some((*done, *total));
                    return;
                }
                _ => {}
            }
        }
        if let EventKind::Board { state } = &ev.kind {
            let text = crate::ui::batch::state_text(state);
            self.log(format!("{} -> {text}", key.as_deref().unwrap_or("run")));
            return;
        }
        for line in words::describe(&ev.kind) {
            match &key {
                Some(k) => self.log(format!("{k} | {line}")),
                None => self.log(line.to_string()),
            }
        }
    }
}

/// Where a board state sits in the checklist.
fn phase_of(state: &BoardState) -> Option<usize> {
    Some(match state {
        BoardState::Queued | BoardState::Building => 0,
        BoardState::Built | BoardState::AwaitingBootloader | BoardState::CheckingTarget => 1,
        BoardState::Writing { .. } => 2,
        BoardState::AwaitingApplication => 3,
        BoardState::Identifying => 4,
        BoardState::Flashed { .. } | BoardState::UpToDate => 5,
        _ => return None,
    })
}

/// Everything on screen.
#[derive(Debug, Clone)]
pub struct State {
    pub boards: Option<BoardsView>,
    pub host: HostView,
    /// The highlighted registered board.
    pub cursor: usize,
    pub details: bool,
    pub message: Option<String>,
    pub dialog: Option<Dialog>,
    pub run: Option<RunView>,
    /// Colours and styles (off under `NO_COLOR`).
    pub color: bool,
}

impl State {
    pub fn new(color: bool) -> State {
        State {
            boards: None,
            host: HostView::default(),
            cursor: 0,
            details: false,
            message: None,
            dialog: None,
            run: None,
            color,
        }
    }

    /// A run of this dashboard is under way (not just ended).
    pub fn running(&self) -> bool {
        self.run.as_ref().is_some_and(|r| !r.ended() && !r.observed)
    }

    pub fn selected(&self) -> Option<&super::view::BoardRow> {
        self.boards.as_ref().and_then(|b| b.boards.get(self.cursor))
    }

    fn board_count(&self) -> usize {
        self.boards.as_ref().map_or(0, |b| b.boards.len())
    }

    pub fn input(&mut self, input: Input) -> Outcome {
        match input {
            Input::Boards(view) => {
                // Keep the cursor on the same board when rows come and go.
                let key = self.selected().map(|b| b.key.clone());
                self.boards = Some(view);
                if let Some(i) = key.and_then(|k| self.boards.as_ref()?.boards.iter().position(|b| b.key == k)) {
                    self.cursor = i;
                }
                self.cursor = self.cursor.min(self.board_count().saturating_sub(1));
                Outcome::redraw()
            }
            Input::Host(host) if host == self.host => Outcome::none(),
            Input::Host(host) => {
                self.host = host;
                Outcome::redraw()
            }
            Input::Resize => Outcome::redraw(),
            Input::Message(m) => {
                self.message = Some(m);
                Outcome::redraw()
            }
            Input::RunStarted(title) => {
                self.run = Some(RunView { title, ..Default::default() });
                self.message = None;
                Outcome::redraw()
            }
            Input::RunEvent(ev) => {
                match &mut self.run {
                    Some(run) => run.event(&ev),
                    // Someone else's run (the daemon's): shown the same way.
                    None => {
                        let mut run = RunView {
                            title: "A run of the kflash daemon (any key hides it)".into(),
                            observed: true,
                            ..Default::default()
                        };
                        run.event(&ev);
                        self.run = Some(run);
                    }
                }
                Outcome::redraw()
            }
            Input::Question(text) => {
                self.dialog = Some(Dialog { text, purpose: Purpose::RunQuestion });
                Outcome::redraw()
            }
            Input::RunEnded { lines, failed } => {
                let run = self.run.get_or_insert_with(Default::default);
                run.summary = Some(lines);
                run.failed = failed;
                // A cancel question left open is moot now.
                if matches!(self.dialog.as_ref().map(|d| &d.purpose), Some(Purpose::CancelRun | Purpose::RunQuestion)) {
                    self.dialog = None;
                }
                Outcome::redraw()
            }
            Input::Key(key) => self.key(key),
        }
    }

    fn key(&mut self, key: KeyEvent) -> Outcome {
        if key.kind == KeyEventKind::Release {
            return Outcome::none();
        }
        let ctrl_c = key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c');
        if let Some(dialog) = self.dialog.clone() {
            return self.dialog_key(dialog, key.code, ctrl_c);
        }
        if self.running() {
            return match key.code {
                KeyCode::Esc => self.ask_cancel(),
                _ if ctrl_c => self.ask_cancel(),
                KeyCode::Char('q' | 'Q') => {
                    self.message = Some("A run is under way: Esc cancels it (Klipper is started again).".into());
                    Outcome::redraw()
                }
                _ => Outcome::none(),
            };
        }
        if self.run.is_some() {
            // The summary stays until a key dismisses it; q still quits at once.
            if !matches!(key.code, KeyCode::Char('q' | 'Q')) && !ctrl_c {
                self.run = None;
                return Outcome::redraw();
            }
        }
        let selected = self.selected().cloned();
        match key.code {
            KeyCode::Char('q' | 'Q') => Outcome::act(Action::Quit),
            _ if ctrl_c => Outcome::act(Action::Quit),
            KeyCode::Esc if self.details => {
                self.details = false;
                Outcome::redraw()
            }
            KeyCode::Up | KeyCode::Char('k') => {
                self.cursor = self.cursor.saturating_sub(1);
                self.message = None;
                Outcome::redraw()
            }
            KeyCode::Down | KeyCode::Char('j') => {
                self.cursor = (self.cursor + 1).min(self.board_count().saturating_sub(1));
                self.message = None;
                Outcome::redraw()
            }
            KeyCode::Enter => {
                self.details = !self.details;
                Outcome::redraw()
            }
            KeyCode::Char('f' | 'F') => match selected {
                None => self.say("No registered board: A adds one."),
                Some(b) if b.state == FirmwareState::Missing && b.can.is_some() => self.say(&format!(
                    "{} is missing: {}.",
                    b.name,
                    b.reason.as_deref().unwrap_or("its CAN interface is not up")
                )),
                Some(b) if !b.connected && b.can.is_none() => {
                    self.say(&format!("{} is not connected: plug it in, then press F.", b.name))
                }
                Some(b) if b.ambiguous => self.say(&format!(
                    "Several connected devices match {}: register it by its USB serial (E, or `kflash set`).",
                    b.name
                )),
                Some(b) => Outcome::act(Action::Flash(b.key)),
            },
            KeyCode::Char('b' | 'B') => Outcome::act(Action::FlashAll),
            KeyCode::Char('a' | 'A') => Outcome::act(Action::Add),
            KeyCode::Char('c' | 'C') => Outcome::act(Action::Settings),
            KeyCode::Char('e' | 'E') => match selected {
                Some(b) => Outcome::act(Action::Edit(b.key)),
                None => self.say("No registered board to edit."),
            },
            KeyCode::Char('m' | 'M') => match selected {
                Some(b) => Outcome::act(Action::Menuconfig(b.key)),
                None => self.say("No registered board: A adds one."),
            },
            KeyCode::Char('r' | 'R') => match selected {
                Some(b) => {
                    self.dialog = Some(Dialog {
                        text: format!("Remove '{}' ({})? Its firmware config is kept.", b.name, b.key),
                        purpose: Purpose::Remove(b.key),
                    });
                    Outcome::redraw()
                }
                None => self.say("No registered board to remove."),
            },
            _ => Outcome::none(),
        }
    }

    fn say(&mut self, text: &str) -> Outcome {
        self.message = Some(text.to_string());
        Outcome::redraw()
    }

    fn ask_cancel(&mut self) -> Outcome {
        if self.run.as_ref().is_some_and(|r| r.cancelling) {
            return self.say("Cancelling: waiting for the run to start Klipper again.");
        }
        self.dialog = Some(Dialog {
            text: "Cancel the run? Klipper is started again either way.".into(),
            purpose: Purpose::CancelRun,
        });
        Outcome::redraw()
    }

    fn dialog_key(&mut self, dialog: Dialog, code: KeyCode, ctrl_c: bool) -> Outcome {
        let answer = match code {
            KeyCode::Char('y' | 'Y') => true,
            KeyCode::Char('n' | 'N') | KeyCode::Esc => false,
            // Ctrl-C on the cancel question is a second Ctrl-C: cancel.
            _ if ctrl_c => dialog.purpose == Purpose::CancelRun,
            _ => return Outcome::none(),
        };
        self.dialog = None;
        match dialog.purpose {
            Purpose::RunQuestion => Outcome::act(Action::Answer(answer)),
            Purpose::CancelRun if answer => {
                if let Some(run) = &mut self.run {
                    run.cancelling = true;
                }
                self.message = Some("Cancelling: the run starts Klipper again.".into());
                Outcome::act(Action::Cancel)
            }
            Purpose::CancelRun => Outcome::redraw(),
            Purpose::Remove(key) if answer => Outcome::act(Action::Remove(key)),
            Purpose::Remove(_) => self.say("Nothing removed."),
        }
    }
}
