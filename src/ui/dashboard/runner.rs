//! The dashboard's runner: one task that waits on every source at once (the terminal's
//! keys and resizes, udev's hotplug events, Moonraker's pushes over the agent link, the
//! daemon's `subscribe` stream, a run's events and questions, signals), feeds the model,
//! draws when the model says so, and carries out what it asks. Nothing runs on a timer:
//! while nothing happens, nothing is drawn and no CPU is used.

use std::future::Future;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};

use crossterm::event::{Event as TermEvent, EventStream};
use futures::future::LocalBoxFuture;
use futures::StreamExt;
use ratatui::DefaultTerminal;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};

use kflash::app::boards;
use kflash::app::flash::{FlashOptions, Reporter};
use kflash::app::flash_all;
use kflash::daemon::socket::{self, RunConnection, RunReply};
use kflash::daemon::status::{KlippyState, Tracker};
use kflash::event::Event;
use kflash::hotplug::Hotplug;
use kflash::moonraker::Moonraker;
use kflash::moonraker_link::{self, LinkConfig, LinkEvent};
use kflash::registry::{self, FlashMethod, Registry};
use kflash::{Error, Result};

use super::model::{Action, Input, State};
use super::render::render;
use super::view::{last_flash_text, BoardsView, HostView};

/// What background tasks tell the loop.
pub(super) enum Note {
    /// Moonraker's answer about Klippy, and the print state.
    Klippy(kflash::daemon::KlippyUpdate, Option<String>),
    /// The daemon answers at this socket; its `subscribe` stream follows.
    DaemonUp(PathBuf),
    /// A line of the daemon's `subscribe` stream (`None`: the daemon hung up).
    Daemon(Option<serde_json::Value>),
    /// identify's answer for the device at a syspath, as it appeared then (`None`: not asked,
    /// its tty is held or a flash holds the lock).
    Identified(String, u64, Option<std::result::Result<String, String>>),
}

/// What a local run tells the loop.
enum RunMsg {
    Event(Event),
    Question(String, oneshot::Sender<bool>),
}

/// How a run ended: the CLI's summary lines.
struct RunEnd {
    lines: Vec<String>,
    failed: bool,
}

/// The run under way.
enum Run {
    /// Here, in this process: the run's future (it borrows nothing: it owns `Arc`s).
    Local {
        work: Pin<Box<dyn Future<Output = RunEnd>>>,
        cancel: Option<oneshot::Sender<()>>,
        answer: Option<oneshot::Sender<bool>>,
    },
    /// Handed to the daemon, as `kflash flash` does.
    Daemon(RunConnection),
}

/// The events and questions of a local run, sent to the loop.
struct DashReporter {
    tx: mpsc::UnboundedSender<RunMsg>,
}

impl Reporter for DashReporter {
    fn event(&mut self, event: &Event) {
        let _ = self.tx.send(RunMsg::Event(event.clone()));
    }

    fn confirm(&mut self, question: &str) -> LocalBoxFuture<'static, bool> {
        let (tx, rx) = oneshot::channel();
        let _ = self.tx.send(RunMsg::Question(question.to_string(), tx));
        // No answer (the dashboard went away) is no.
        Box::pin(async move { rx.await.unwrap_or(false) })
    }
}

/// Whether the dashboard holds the terminal (raw mode, alternate screen) right now.
static ON_SCREEN: AtomicBool = AtomicBool::new(false);
/// A panic that took the screen back while the dashboard went on (one caught by the
/// orchestrator's driver, or in a task): its message, said once the screen is retaken.
static CAUGHT_PANIC: Mutex<Option<String>> = Mutex::new(None);
/// Wakes the loop to take the screen back after such a panic.
static PANIC_TOOK_SCREEN: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Take the terminal: raw mode, the alternate screen, and (once per process) the panic hook
/// that gives it back. Not `ratatui::init`: that adds one more hook each time (every suspend).
fn enter() -> Result<DefaultTerminal> {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // Before the message is printed, so it lands on the main screen and stays.
            if ON_SCREEN.swap(false, Ordering::SeqCst) {
                restore();
                if let Ok(mut caught) = CAUGHT_PANIC.lock() {
                    *caught = Some(info.to_string().replace('\n', " "));
                }
                PANIC_TOOK_SCREEN.notify_one();
            }
            previous(info);
        }));
    });
    let io = |e| Error::io("set up", Path::new("the terminal"), e);
    crossterm::terminal::enable_raw_mode().map_err(io)?;
    ON_SCREEN.store(true, Ordering::SeqCst);
    crossterm::execute!(std::io::stdout(), crossterm::terminal::EnterAlternateScreen).map_err(io)?;
    ratatui::Terminal::new(ratatui::backend::CrosstermBackend::new(std::io::stdout())).map_err(io)
}

/// Leave the dashboard's screen: raw mode off, the main screen back, the cursor shown.
fn restore() {
    ON_SCREEN.store(false, Ordering::SeqCst);
    ratatui::restore();
    let _ = crossterm::execute!(std::io::stdout(), crossterm::cursor::Show);
}

/// Restores the terminal when the dashboard ends in any way: `Q`, an error return, a signal
/// (both end the loop), and a panic (the hook restores first, then this on the unwind).
struct ScreenGuard;

impl Drop for ScreenGuard {
    fn drop(&mut self) {
        restore();
    }
}

/// Take the terminal again after it was given back (a suspend, a caught panic).
fn retake(terminal: &mut DefaultTerminal) -> Result<()> {
    *terminal = enter()?;
    // The screen is cleared by hand: ratatui's `clear` asks the terminal for the cursor
    // position, and after a suspend that answer was not read in time (seen in tmux).
    crossterm::execute!(std::io::stdout(), crossterm::terminal::Clear(crossterm::terminal::ClearType::All))
        .map_err(|e| Error::io("draw on", Path::new("the terminal"), e))
}

/// Debug builds only, for the rig tests of the panic paths: `KFLASH_DASHBOARD_PANIC_KEY=P`
/// makes the key `P` panic in the dashboard's loop (with the terminal in raw mode on the
/// alternate screen and every stream open, as a bug would), `KFLASH_DASHBOARD_TASK_PANIC_KEY=T`
/// makes `T` panic in a task of its own (caught by tokio: the dashboard goes on). A release
/// build has no such code.
#[cfg(debug_assertions)]
fn panic_if_test_key(key: &crossterm::event::KeyEvent) {
    let is = |var: &str| {
        std::env::var(var).ok().and_then(|k| k.chars().next()).map(crossterm::event::KeyCode::Char) == Some(key.code)
    };
    if is("KFLASH_DASHBOARD_PANIC_KEY") {
        panic!("KFLASH_DASHBOARD_PANIC_KEY: a test panic in the dashboard's loop");
    }
    if is("KFLASH_DASHBOARD_TASK_PANIC_KEY") {
        tokio::spawn(async { panic!("KFLASH_DASHBOARD_TASK_PANIC_KEY: a test panic in a task") });
    }
}

/// `kflash dashboard`.
pub async fn run(dir: &Path) -> Result<()> {
    if !(std::io::stdin().is_terminal() && std::io::stdout().is_terminal()) {
        // Not `NeedsTerminal`: its help is about `kflash config`.
        return Err(Error::InvalidInput(
            "the dashboard needs a terminal (stdin and stdout are not one): run it in an interactive terminal \
             (over SSH: `ssh -t`); `kflash status` and `kflash devices` print the same facts"
                .into(),
        ));
    }
    let color = std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let mut dash = Dashboard::start(dir, color).await?;
    let _guard = ScreenGuard;
    let mut terminal = enter()?;
    dash.main_loop(&mut terminal).await
}

struct Dashboard {
    dir: PathBuf,
    state_dir: PathBuf,
    reg: Arc<Registry>,
    hp: Arc<Hotplug>,
    tracker: Tracker,
    board_events: Option<tokio::sync::broadcast::Receiver<kflash::hotplug::BoardEvent>>,
    state: State,
    mr: Moonraker,
    notes_tx: mpsc::UnboundedSender<Note>,
    notes: mpsc::UnboundedReceiver<Note>,
    run_tx: mpsc::UnboundedSender<RunMsg>,
    run_rx: mpsc::UnboundedReceiver<RunMsg>,
    run: Option<Run>,
    /// The daemon's socket, while its `subscribe` stream is open.
    daemon: Option<PathBuf>,
    print_state: Option<String>,
    /// A signal came: end (exit 130, as every command) once the run, if any, has started
    /// Klipper again.
    quitting: Option<&'static str>,
    /// Whether the first look for a daemon is done: until then the dashboard reads no
    /// versions itself (the daemon's reads would be refused the flash lock meanwhile).
    daemon_known: bool,
    /// identify under way: syspath → (the appearance asked about, its task).
    identifying: std::collections::BTreeMap<String, (u64, tokio::task::JoinHandle<()>)>,
    /// One identify at a time: each takes the flash lock for its moment.
    identify_turn: Arc<tokio::sync::Mutex<()>>,
}

impl Dashboard {
    async fn start(dir: &Path, color: bool) -> Result<Dashboard> {
        let reg = Registry::open(dir)?;
        let hp = Hotplug::start_udev(boards::resolver(&reg)).await?;
        let host_version =
            kflash::firmware::TreeStamp::compute(&reg.settings.klipper_dir()).await.version().map(String::from);
        // The snapshot and the events after it, taken together so no change falls in between.
        let (snapshot, board_events) = hp.subscribe_with_snapshot();
        let tracker = Tracker::new(reg.boards().cloned().collect(), host_version, snapshot);
        let (notes_tx, notes) = mpsc::unbounded_channel();
        let (run_tx, run_rx) = mpsc::unbounded_channel();
        let mr = Moonraker::from_settings(&reg.settings);
        Ok(Dashboard {
            dir: dir.to_path_buf(),
            state_dir: registry::default_state_dir(),
            reg: Arc::new(reg),
            hp: Arc::new(hp),
            tracker,
            board_events: Some(board_events),
            state: State::new(color),
            mr,
            notes_tx,
            notes,
            run_tx,
            run_rx,
            run: None,
            daemon: None,
            print_state: None,
            quitting: None,
            daemon_known: false,
            identifying: Default::default(),
            identify_turn: Default::default(),
        })
    }

    fn boards_view(&self) -> BoardsView {
        let devices = boards::devices_view(&self.reg, &self.hp.snapshot());
        BoardsView::new(&self.tracker.status(), &devices)
    }

    fn host_view(&self) -> HostView {
        let last = kflash::history::read_all(&self.state_dir).ok().and_then(|h| h.records.last().map(last_flash_text));
        HostView {
            print_state: self.print_state.clone(),
            daemon: self.daemon.as_ref().map(|p| p.display().to_string()),
            last_flash: last,
        }
    }

    /// Ask Moonraker about Klippy and the print, off the loop (an HTTP round trip).
    fn ask_klippy(&self) {
        let (mr, tx) = (self.mr.clone(), self.notes_tx.clone());
        tokio::spawn(async move {
            let update = kflash::daemon::ask_klippy(&mr).await;
            let print = match update.state {
                KlippyState::Ready => mr.print_status().await.ok().map(|p| p.state),
                _ => None,
            };
            let _ = tx.send(Note::Klippy(update, print));
        });
    }

    /// Read the versions of the registered boards nobody has told (not in printer.cfg, or
    /// Klippy not ready) from the boards themselves, as the daemon does, with its function:
    /// only a tty no process holds, under the flash lock, one board at a time. Not while the
    /// daemon runs (it reads them and its stream says so) nor during a run (it holds the lock).
    fn identify_unknown(&mut self) {
        if !self.daemon_known || self.daemon.is_some() || self.run.is_some() {
            return;
        }
        for board in self.tracker.unknown_versions() {
            let syspath = board.identity.syspath.clone();
            let Some(appearance) = self.tracker.appearance(&syspath) else { continue };
            if self.identifying.contains_key(&syspath) {
                continue;
            }
            let (tx, state_dir, turn) = (self.notes_tx.clone(), self.state_dir.clone(), self.identify_turn.clone());
            let task = tokio::spawn({
                let syspath = syspath.clone();
                async move {
                    let _turn = turn.lock().await;
                    let answer = kflash::daemon::identify_if_free(&board, &state_dir).await;
                    let _ = tx.send(Note::Identified(syspath, appearance, answer));
                }
            });
            self.identifying.insert(syspath, (appearance, task));
        }
    }

    /// Stop reading versions (a run needs the flash lock, or the daemon took over): each
    /// read is dropped, closing its tty and releasing the lock, before this returns.
    async fn stop_identifying(&mut self) {
        for (_, (_, task)) in std::mem::take(&mut self.identifying) {
            task.abort();
            let _ = task.await;
        }
    }

    /// A version the daemon learnt by identify, for a board the tracker has no version for.
    fn daemon_board(&mut self, b: &serde_json::Value) {
        let (Some(key), Some(version)) = (b["key"].as_str(), b["version"].as_str()) else { return };
        if b["version_source"].as_str() != Some("identify") {
            return;
        }
        let Some(board) = self.hp.snapshot().into_iter().find(|d| d.key.as_deref() == Some(key)) else { return };
        let syspath = board.identity.syspath.clone();
        if let Some(appearance) = self.tracker.appearance(&syspath) {
            self.tracker.identified(&syspath, appearance, version.to_string());
        }
    }

    fn feed(&mut self, input: Input, terminal: &mut DefaultTerminal) -> Result<Option<Action>> {
        let out = self.state.input(input);
        if out.redraw {
            self.draw(terminal)?;
        }
        Ok(out.action)
    }

    fn draw(&self, terminal: &mut DefaultTerminal) -> Result<()> {
        terminal.draw(|f| render(&self.state, f)).map_err(|e| Error::io("draw on", Path::new("the terminal"), e))?;
        Ok(())
    }

    fn refresh_boards(&mut self, terminal: &mut DefaultTerminal) -> Result<()> {
        let view = self.boards_view();
        self.feed(Input::Boards(view), terminal).map(drop)
    }

    fn refresh_host(&mut self, terminal: &mut DefaultTerminal) -> Result<()> {
        let view = self.host_view();
        self.feed(Input::Host(view), terminal).map(drop)
    }

    async fn main_loop(&mut self, terminal: &mut DefaultTerminal) -> Result<()> {
        let (link, mut inbox, link_task) = {
            let mut config = LinkConfig::new(self.reg.settings.moonraker_socket(), &[]);
            // Not the daemon's agent name: both may be connected at once.
            config.client_name = "kflash-dashboard".into();
            moonraker_link::spawn(config)
        };
        let _link = link;
        let daemon_task = tokio::spawn(follow_daemon(socket::candidates(&self.state_dir), self.notes_tx.clone()));
        self.ask_klippy();
        let mut board_events = self.board_events.take().expect("the loop runs once");
        // CAN nodes: their interfaces from the kernel (subscribed before the first read).
        let mut link_watch = kflash::can::linkwatch::LinkWatch::open()
            .map_err(|e| tracing::warn!("CAN interfaces cannot be watched ({e}); CAN nodes show Klippy's view only"))
            .ok();
        self.tracker.links(kflash::daemon::read_links(&self.tracker.can_interfaces()));
        self.refresh_boards(terminal)?;
        self.refresh_host(terminal)?;
        let mut keys = Some(EventStream::new());
        let mut signal = std::pin::pin!(kflash::service::shutdown_signal());
        let mut signalled = false;
        let result = loop {
            let input = tokio::select! {
                sig = &mut signal, if !signalled => {
                    signalled = true;
                    match &mut self.run {
                        None => break Err(Error::Interrupted(sig)),
                        Some(_) => {
                            // Cancel the run; it starts Klipper again; then end.
                            self.quitting = Some(sig);
                            self.cancel_run().await;
                            Input::Message(format!("{sig}: cancelling the run; the dashboard ends when Klipper runs again"))
                        }
                    }
                }
                // The screen is taken back below.
                () = PANIC_TOOK_SCREEN.notified() => Input::Resize,
                key = next_key(&mut keys) => match key {
                    Some(Ok(TermEvent::Key(k))) => {
                        #[cfg(debug_assertions)]
                        panic_if_test_key(&k);
                        Input::Key(k)
                    }
                    Some(Ok(TermEvent::Resize(..))) => Input::Resize,
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => break Err(Error::io("read", Path::new("the terminal"), e)),
                    None => break Ok(()),
                },
                ev = board_events.recv() => match ev {
                    Ok(ev) => {
                        self.tracker.board_event(&ev);
                        self.identify_unknown();
                        Input::Boards(self.boards_view())
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => Input::Boards(self.boards_view()),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        break Err(Error::Udev(self.hp.failure().unwrap_or_else(|| "the event stream ended".into())))
                    }
                },
                changes = kflash::daemon::next_links(&mut link_watch) => {
                    let changes = changes.unwrap_or_else(|e| {
                        if e.raw_os_error() != Some(libc::ENOBUFS) {
                            tracing::warn!("CAN interfaces can no longer be watched ({e})");
                            link_watch = None;
                        }
                        kflash::daemon::read_links(&self.tracker.can_interfaces())
                    });
                    self.tracker.links(changes);
                    Input::Boards(self.boards_view())
                }
                Some(ev) = inbox.events.recv() => match ev {
                    LinkEvent::Klippy(state) => {
                        self.ask_klippy();
                        // Ready: its MCUs come with the answer (taken now with none, a CAN
                        // node's version would be forgotten).
                        if state != KlippyState::Ready {
                            self.tracker.klippy_state(state, Vec::new());
                        }
                        Input::Boards(self.boards_view())
                    }
                    LinkEvent::Disconnected { .. } => {
                        self.tracker.klippy_state(KlippyState::Unknown, Vec::new());
                        self.print_state = None;
                        Input::Boards(self.boards_view())
                    }
                    _ => continue,
                },
                Some(note) = self.notes.recv() => match note {
                    Note::Klippy(update, print) => {
                        // An answer older than the link's last push is stale (as in the daemon).
                        let pushed = *inbox.klippy.borrow();
                        if pushed != KlippyState::Unknown && pushed != update.state {
                            continue;
                        }
                        self.tracker.klippy_state(update.state, update.mcus);
                        self.tracker.klippy_message(update.message);
                        self.identify_unknown();
                        self.print_state = print;
                        self.refresh_host(terminal)?;
                        Input::Boards(self.boards_view())
                    }
                    Note::DaemonUp(path) => {
                        self.daemon_known = true;
                        self.daemon = Some(path);
                        self.stop_identifying().await;
                        self.host_view_input()
                    }
                    Note::Daemon(None) => {
                        // Back to its own streams: the versions nobody told are read here again.
                        self.daemon = None;
                        self.daemon_known = true;
                        self.identify_unknown();
                        self.host_view_input()
                    }
                    Note::Identified(syspath, appearance, answer) => {
                        self.identifying.remove(&syspath);
                        match answer {
                            Some(Ok(version)) => {
                                self.tracker.identified(&syspath, appearance, version);
                            }
                            Some(Err(why)) => tracing::debug!(%syspath, "no version from identify: {why}"),
                            None => {}
                        }
                        // It left and came back while it was read: its new appearance now.
                        if self.tracker.appearance(&syspath).is_some_and(|now| now != appearance) {
                            self.identify_unknown();
                        }
                        Input::Boards(self.boards_view())
                    }
                    Note::Daemon(Some(v)) => match v["reply"].as_str() {
                        Some("status") => {
                            for b in v["status"]["boards"].as_array().cloned().unwrap_or_default() {
                                self.daemon_board(&b);
                            }
                            self.refresh_host(terminal)?;
                            Input::Boards(self.boards_view())
                        }
                        Some("notice") if v["notice"]["notice"] == "board" => {
                            self.daemon_board(&v["notice"]["status"].clone());
                            Input::Boards(self.boards_view())
                        }
                        // Another client's run (a console macro, `kflash flash`): drawn too.
                        Some("event") if self.run.is_none() => match serde_json::from_value(v["event"].clone()) {
                            Ok(ev) => Input::RunEvent(ev),
                            Err(_) => continue,
                        },
                        _ => continue,
                    },
                },
                Some(msg) = self.run_rx.recv() => match msg {
                    RunMsg::Event(ev) => Input::RunEvent(ev),
                    RunMsg::Question(text, tx) => {
                        if let Some(Run::Local { answer, .. }) = &mut self.run {
                            *answer = Some(tx);
                        }
                        Input::Question(text)
                    }
                },
                end = run_step(&mut self.run) => match end {
                    Step::Input(input) => input,
                    Step::Question(text) => Input::Question(text),
                    Step::Ended(end) => {
                        self.run = None;
                        // The events the run sent in its last poll (Klippy's confirmation of
                        // each board) are taken in before its end is drawn.
                        while let Ok(msg) = self.run_rx.try_recv() {
                            if let RunMsg::Event(ev) = msg {
                                self.state.input(Input::RunEvent(ev));
                            }
                        }
                        self.identify_unknown();
                        // What the run changed: the history, Klippy's view, the registry's seeds.
                        self.ask_klippy();
                        self.refresh_host(terminal)?;
                        Input::RunEnded { lines: end.lines, failed: end.failed }
                    }
                },
            };
            // A panic caught below (in a flash step's work, in a task) gave the screen back
            // while the dashboard goes on: take it again and say what happened.
            if let Some(text) = CAUGHT_PANIC.lock().ok().and_then(|mut c| c.take()) {
                let again = retake(terminal).and_then(|()| {
                    self.draw(terminal)?;
                    self.say(terminal, format!("a panic was caught and the dashboard goes on: {text}"))
                });
                if let Err(e) = again {
                    break Err(e);
                }
            }
            let action = match self.feed(input, terminal) {
                Ok(a) => a,
                Err(e) => break Err(e),
            };
            if let (Some(sig), None) = (self.quitting, &self.run) {
                break Err(Error::Interrupted(sig));
            }
            if let Some(action) = action {
                match self.act(action, terminal, &mut keys).await {
                    Ok(true) => break Ok(()),
                    Ok(false) => {}
                    Err(e) => break Err(e),
                }
            }
        };
        daemon_task.abort();
        self.stop_identifying().await;
        link_task.shutdown().await;
        result
    }

    fn host_view_input(&self) -> Input {
        Input::Host(self.host_view())
    }

    async fn cancel_run(&mut self) {
        match &mut self.run {
            Some(Run::Local { cancel, .. }) => {
                if let Some(tx) = cancel.take() {
                    let _ = tx.send(());
                }
            }
            Some(Run::Daemon(conn)) => {
                if let Err(e) = conn.cancel().await {
                    tracing::warn!("the cancel could not be sent to the daemon: {e}");
                }
            }
            None => {}
        }
    }

    /// Carry out what the model asked. `Ok(true)`: quit.
    async fn act(
        &mut self,
        action: Action,
        terminal: &mut DefaultTerminal,
        keys: &mut Option<EventStream>,
    ) -> Result<bool> {
        match action {
            Action::Quit => return Ok(true),
            Action::Answer(answer) => match &mut self.run {
                Some(Run::Local { answer: tx, .. }) => {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(answer);
                    }
                }
                Some(Run::Daemon(conn)) => {
                    if let Err(e) = conn.answer(answer).await {
                        self.say(terminal, format!("the answer could not be sent to the daemon: {e}"))?;
                    }
                }
                None => {}
            },
            Action::Cancel => self.cancel_run().await,
            Action::Flash(key) => self.start_flash(Some(key), terminal).await?,
            Action::FlashAll => self.start_flash(None, terminal).await?,
            Action::Remove(key) => {
                let mut reg = Registry::open(&self.dir)?;
                let said = match reg.remove(&key).and_then(|e| reg.save_boards().map(|()| e)) {
                    Ok(e) => format!(
                        "Removed '{}'. Its firmware config is kept at {}.",
                        e.name,
                        reg.config_path(&key).display()
                    ),
                    Err(e) => format!("Not removed: {e}"),
                };
                self.reload(terminal)?;
                self.say(terminal, said)?;
            }
            Action::Add => self.suspended(terminal, keys, add_flow).await?,
            Action::Menuconfig(key) => self.suspended(terminal, keys, move |dir| child(dir, &["config", &key])).await?,
            Action::Settings => self.suspended(terminal, keys, edit_settings).await?,
            Action::Edit(key) => self.suspended(terminal, keys, move |dir| edit_board(dir, &key)).await?,
        }
        Ok(false)
    }

    fn say(&mut self, terminal: &mut DefaultTerminal, text: String) -> Result<()> {
        self.feed(Input::Message(text), terminal).map(drop)
    }

    /// The registry changed on disk: read it again and redraw.
    fn reload(&mut self, terminal: &mut DefaultTerminal) -> Result<()> {
        match Registry::open(&self.dir) {
            Ok(reg) => {
                self.hp.set_resolver(boards::resolver(&reg));
                self.tracker.registry(reg.boards().cloned().collect(), self.hp.snapshot());
                self.mr = Moonraker::from_settings(&reg.settings);
                self.reg = Arc::new(reg);
                self.identify_unknown();
            }
            Err(e) => self.say(terminal, format!("boards.toml cannot be read: {e}"))?,
        }
        self.refresh_boards(terminal)
    }

    /// Leave the dashboard's screen, run `work` on the real terminal (a thread of its own, so
    /// the runtime goes on), and come back.
    async fn suspended(
        &mut self,
        terminal: &mut DefaultTerminal,
        keys: &mut Option<EventStream>,
        work: impl FnOnce(&Path) -> std::result::Result<(), String> + Send + 'static,
    ) -> Result<()> {
        // The key reader must not take the suspended program's input: it stops when dropped.
        *keys = None;
        restore();
        let dir = self.dir.clone();
        let outcome = tokio::task::spawn_blocking(move || work(&dir)).await;
        retake(terminal)?;
        self.reload(terminal)?;
        self.refresh_host(terminal)?;
        let said = match outcome {
            Ok(Ok(())) => "Back in the dashboard.".to_string(),
            Ok(Err(e)) => e,
            Err(e) => format!("the suspended step failed: {e}"),
        };
        self.say(terminal, said)?;
        *keys = Some(EventStream::new());
        Ok(())
    }

    async fn start_flash(&mut self, key: Option<String>, terminal: &mut DefaultTerminal) -> Result<()> {
        // A version read holds the flash lock the run needs.
        self.stop_identifying().await;
        let title = match &key {
            Some(k) => format!("Flashing {k}"),
            None => "Flashing all boards (kflash flash-all)".into(),
        };
        if std::env::var_os("KFLASH_NO_DAEMON").is_none_or(|v| v.is_empty() || v == "0") && self.daemon.is_some() {
            let request = match &key {
                Some(k) => socket::Request::Flash(socket::FlashRequest {
                    key: k.clone(),
                    config_dir: Some(self.dir.clone()),
                    ..Default::default()
                }),
                None => socket::Request::FlashAll(socket::FlashAllRequest {
                    // As `kflash flash-all` on a terminal: the current boards are asked about.
                    current: flash_all::CurrentBoards::Ask,
                    config_dir: Some(self.dir.clone()),
                    ..Default::default()
                }),
            };
            if let Some(Ok(conn)) = socket::hand_over(&self.state_dir, &request).await {
                self.run = Some(Run::Daemon(conn));
                self.feed(Input::RunStarted(format!("{title}, by the kflash daemon")), terminal)?;
                return Ok(());
            }
        }
        let (cancel_tx, cancel_rx) = oneshot::channel::<()>();
        let cancelled = async move {
            match cancel_rx.await {
                Ok(()) => "a cancel in the dashboard",
                // The sender is kept for the whole run; dropped means nobody cancels.
                Err(_) => std::future::pending().await,
            }
        };
        let (reg, hp) = (self.reg.clone(), self.hp.clone());
        let mut rep = DashReporter { tx: self.run_tx.clone() };
        let work: Pin<Box<dyn Future<Output = RunEnd>>> = match key {
            Some(key) => Box::pin(async move {
                let opts = FlashOptions::default();
                match kflash::app::flash::flash_one(&reg, &key, &hp, &opts, &mut rep, cancelled).await {
                    Ok(summary) => RunEnd { lines: crate::ui::flash_summary_lines(&summary), failed: false },
                    Err(e) => RunEnd { lines: error_lines(&e), failed: true },
                }
            }),
            None => Box::pin(async move {
                // `kflash flash-all`'s plan and defaults (no --skip-unconfigured, one board at a
                // time); boards that already run the host's version are asked about in a
                // dialog, as the CLI asks on a terminal and the daemon through its client.
                let mut plan = match flash_all::plan(&reg, &hp, false).await {
                    Ok(plan) => plan,
                    Err(e) => return RunEnd { lines: error_lines(&e), failed: true },
                };
                let flash_current = flash_all::settle_current(&mut plan, flash_all::CurrentBoards::Ask, &mut rep).await;
                let report = if plan.boards.is_empty() {
                    flash_all::FlashAllReport::nothing(&plan)
                } else {
                    let opts = flash_all::FlashAllOptions { flash_current, parallel: 1, ..Default::default() };
                    match flash_all::run(&reg, &hp, &plan, &opts, &mut rep, cancelled).await {
                        Ok(report) => report,
                        Err(e) => return RunEnd { lines: error_lines(&e), failed: true },
                    }
                };
                let mut lines = Vec::new();
                if plan.boards.is_empty() {
                    lines.push("Nothing to flash: every included, connected board runs the host's version.".into());
                }
                lines.extend(crate::ui::batch::summary_lines(&report));
                if let Some(e) = &report.error {
                    lines.extend(error_lines(e));
                }
                RunEnd { failed: !report.ok, lines }
            }),
        };
        self.run = Some(Run::Local { work, cancel: Some(cancel_tx), answer: None });
        self.feed(Input::RunStarted(title), terminal).map(drop)
    }
}

/// Follow the daemon: its `subscribe` stream while it answers; when none answers, or it goes
/// away, wait for one of its socket paths to be created (inotify on the socket's directory,
/// as the Moonraker link does), not on a timer. The watches start before the first connect,
/// so a daemon that binds in between is not missed.
pub(super) async fn follow_daemon(candidates: Vec<PathBuf>, tx: mpsc::UnboundedSender<Note>) {
    let mut watches: Vec<moonraker_link::SocketWatch> = candidates
        .iter()
        .filter_map(|p| {
            moonraker_link::SocketWatch::new(p)
                .inspect_err(|e| tracing::warn!("cannot watch {} for the kflash daemon: {e}", p.display()))
                .ok()
        })
        .collect();
    let mut first = true;
    loop {
        let mut answered = false;
        for path in &candidates {
            let Ok(stream) = tokio::net::UnixStream::connect(path).await else { continue };
            let (r, mut w) = stream.into_split();
            if w.write_all(b"{\"request\":\"subscribe\"}\n").await.is_err() {
                continue;
            }
            if tx.send(Note::DaemonUp(path.clone())).is_err() {
                return;
            }
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(v) = serde_json::from_str(&line) {
                    if tx.send(Note::Daemon(Some(v))).is_err() {
                        return;
                    }
                }
            }
            drop(w);
            answered = true;
            if tx.send(Note::Daemon(None)).is_err() {
                return;
            }
            break;
        }
        // No daemon at the start: the loop reads versions itself from now on.
        if std::mem::take(&mut first) && !answered && tx.send(Note::Daemon(None)).is_err() {
            return;
        }
        // Nothing answers (any more): the next creation of a socket.
        if watches.is_empty() {
            return;
        }
        let changes = watches.iter_mut().map(|w| Box::pin(w.changed()));
        if let (Err(e), ..) = futures::future::select_all(changes).await {
            tracing::warn!("watching for the kflash daemon's socket failed: {e}; a daemon started now is not seen");
            return;
        }
    }
}

/// The terminal's next event; pending while the dashboard is suspended.
async fn next_key(keys: &mut Option<EventStream>) -> Option<std::io::Result<TermEvent>> {
    match keys {
        Some(k) => k.next().await,
        None => std::future::pending().await,
    }
}

/// What a step of the run under way produced.
enum Step {
    Input(Input),
    Question(String),
    Ended(RunEnd),
}

/// The next thing the run under way says; pending when there is none.
async fn run_step(run: &mut Option<Run>) -> Step {
    match run {
        None => std::future::pending().await,
        Some(Run::Local { work, .. }) => Step::Ended(work.await),
        Some(Run::Daemon(conn)) => match conn.next().await {
            Ok(Some(RunReply::Event { event })) => Step::Input(Input::RunEvent(event)),
            Ok(Some(RunReply::Question { text })) => Step::Question(text),
            Ok(Some(RunReply::Accepted { run })) => Step::Input(Input::Message(format!(
                "{run} is carried out by the kflash daemon ({})",
                conn.socket.display()
            ))),
            Ok(Some(RunReply::Flashed { summary })) => {
                Step::Ended(RunEnd { lines: crate::ui::flash_summary_lines(&summary), failed: false })
            }
            Ok(Some(RunReply::FlashAllDone { report, error })) => {
                let mut lines = crate::ui::batch::summary_lines(&report);
                if let Some(e) = &error {
                    lines.push(format!("error: {}", e.message));
                    lines.extend(e.help.iter().map(|h| format!("  help: {h}")));
                }
                Step::Ended(RunEnd { failed: error.is_some() || !report.ok, lines })
            }
            Ok(Some(RunReply::Failed { error })) => {
                let mut lines = vec![format!("error: {}", error.message)];
                lines.extend(error.help.iter().map(|h| format!("  help: {h}")));
                Step::Ended(RunEnd { lines, failed: true })
            }
            Ok(Some(RunReply::Busy { message })) => Step::Ended(RunEnd {
                lines: vec![format!("The daemon is busy: {message}"), "  help: wait for that run to end".into()],
                failed: true,
            }),
            Ok(Some(RunReply::Error { message })) => {
                Step::Ended(RunEnd { lines: vec![format!("The daemon refused: {message}")], failed: true })
            }
            Ok(None) => Step::Ended(RunEnd {
                lines: vec![
                    "The kflash daemon hung up during the run.".into(),
                    "  help: see `journalctl -u kflash`; the daemon starts Klipper again when its run ends".into(),
                ],
                failed: true,
            }),
            Err(e) => {
                Step::Ended(RunEnd { lines: vec![format!("The daemon's reply could not be read: {e}")], failed: true })
            }
        },
    }
}

fn error_lines(e: &Error) -> Vec<String> {
    let mut lines = vec![format!("error: {e}")];
    lines.extend(e.help().map(|h| format!("  help: {h}")));
    lines
}

/// Run this kflash binary with `args` on the real terminal (the add wizard, menuconfig).
fn child(dir: &Path, args: &[&str]) -> std::result::Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the kflash binary: {e}"))?;
    let status = std::process::Command::new(exe)
        .arg("--config-dir")
        .arg(dir)
        .args(args)
        .status()
        .map_err(|e| format!("cannot run kflash {}: {e}", args.join(" ")))?;
    if status.success() {
        Ok(())
    } else {
        wait_enter();
        Err(format!("`kflash {}` ended with {status}", args.join(" ")))
    }
}

/// A: pick a board profile (or none), run the `kflash add` wizard with it, then menuconfig
/// on the new board's config (a seeded one must be reviewed before it is flashed).
fn add_flow(dir: &Path) -> std::result::Result<(), String> {
    let keys = |dir: &Path| -> Vec<String> {
        Registry::open(dir).map(|r| r.boards().map(|b| b.key.clone()).collect()).unwrap_or_default()
    };
    let before = keys(dir);
    let profiles = kflash::profiles::all();
    println!("Board profiles: a first firmware config for popular boards (`kflash profiles` lists their sources).");
    for (i, p) in profiles.iter().enumerate() {
        println!("  {:>2}) {:<24} {:<12} {}", i + 1, p.name, p.mcu, p.title);
    }
    let pick =
        crate::ui::ask_until("Profile number (Enter: none, set the config up in menuconfig)", Some(""), |s| match s {
            "" => Ok(None),
            s => match s.parse::<usize>() {
                Ok(n) if (1..=profiles.len()).contains(&n) => Ok(Some(n - 1)),
                _ => Err(format!("enter a number from 1 to {}, or nothing", profiles.len())),
            },
        })
        .map_err(|e| format!("nothing added: {e}"))?;
    let mut args = vec!["add".to_string()];
    if let Some(i) = pick {
        args.extend(["--profile".to_string(), profiles[i].name.clone()]);
    }
    child(dir, &args.iter().map(String::as_str).collect::<Vec<_>>())?;
    let Some(key) = keys(dir).into_iter().find(|k| !before.contains(k)) else { return Ok(()) };
    println!("\nNow menuconfig for {key}: review its firmware config and save it.");
    child(dir, &["config", &key])
}

fn wait_enter() {
    println!("Press Enter to go back to the dashboard.");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

/// C: the settings as `kflash settings show` prints them, then changed one at a time on the
/// real terminal, each value checked and saved as `kflash settings set` does.
fn edit_settings(dir: &Path) -> std::result::Result<(), String> {
    let mut reg = Registry::open(dir).map_err(|e| e.to_string())?;
    let mut changed = Vec::new();
    loop {
        println!("\nSettings ({}):\n", reg.dir().join("settings.toml").display());
        print!("{}", toml::to_string_pretty(&reg.settings).unwrap_or_default());
        println!();
        let key = crate::ui::ask_until("Setting to change (a dotted key as above, Enter: done)", Some(""), |s| {
            Ok(s.to_string())
        })
        .map_err(|e| format!("settings: {e}"))?;
        if key.is_empty() {
            break;
        }
        let settings = reg.settings.clone();
        let new = crate::ui::ask_until(&format!("New value for {key} (Enter: leave it)"), Some(""), |v| match v {
            "" => Ok(None),
            v => settings.with_value(&key, v).map(Some).map_err(|e| e.to_string()),
        })
        .map_err(|e| format!("settings: {e}"))?;
        let Some(new) = new else { continue };
        reg.settings = new;
        reg.save_settings().map_err(|e| format!("not saved: {e}"))?;
        changed.push(key);
    }
    if !changed.is_empty() {
        println!("Saved: {}.", changed.join(", "));
    }
    Ok(())
}

/// E: the board's name, flash method and flash-all inclusion, asked on the real terminal
/// and saved with the registry's atomic write.
fn edit_board(dir: &Path, key: &str) -> std::result::Result<(), String> {
    let mut reg = Registry::open(dir).map_err(|e| e.to_string())?;
    let entry = reg.get(key).map_err(|e| e.to_string())?.clone();
    println!("Editing {} ({}). Enter keeps a value.", entry.name, entry.key);
    let ask = || -> kflash::Result<(String, FlashMethod, bool)> {
        let name = crate::ui::ask_until("Display name", Some(&entry.name), |s| {
            if s.is_empty() {
                Err("a name is required".into())
            } else {
                Ok(s.to_string())
            }
        })?;
        let method = crate::ui::ask_until(
            "Flash method (katapult, make-flash, flashtool, default)",
            Some(entry.flash_method.as_str()),
            |s| FlashMethod::parse(s).map_err(|e| e.to_string()),
        )?;
        let include = dialoguer::Confirm::new()
            .with_prompt("Include in flash-all?")
            .default(entry.flashable)
            .interact_on(&dialoguer::console::Term::stderr())
            .map_err(|e| Error::InvalidInput(e.to_string()))?;
        Ok((name, method, include))
    };
    let (name, method, include) = ask().map_err(|e| format!("nothing changed: {e}"))?;
    reg.update(key, |b| {
        b.name = name;
        b.flash_method = method;
        b.flashable = include;
    })
    .map_err(|e| e.to_string())?;
    reg.save_boards().map_err(|e| format!("not saved: {e}"))?;
    Ok(())
}
