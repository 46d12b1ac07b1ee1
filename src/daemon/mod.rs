//! `kflash daemon`: the background service. It watches the boards (udev events) and Klippy
//! (Moonraker), learns what each board runs, and answers `kflash status` on its socket. It
//! does nothing while nothing happens: no timers, no rescans; every wake-up is an event.
//!
//! - [`status`]: what it knows, as a sans-IO tracker that says what changed;
//! - [`socket`]: the JSON-lines status surface;
//! - [`holders`]: whether a process holds a tty (Klipper's), so the daemon never talks to a
//!   board Klipper is using;
//! - [`memory`]: its own resident and live-heap size, reported in `status`;
//! - [`outbox`]: agent events for Moonraker, the newest per board, each sent with a deadline;
//! - [`refresh`]: questions about Klippy after a board appears, one at a time, coalesced.
//!
//! One loop owns the state (mini-redis style): board events, Klippy updates, identify
//! results, socket questions and signals come to it on channels. SIGHUP reloads the registry
//! and settings (the hotplug's key resolver is swapped; discovery keeps running); a broken
//! registry keeps the last good one in use. SIGTERM and SIGINT stop it cleanly. The udev
//! source failing ends it with an error, so systemd restarts it.

pub mod holders;
pub mod memory;
pub mod outbox;
pub mod refresh;
pub mod runs;
pub mod socket;
pub mod status;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::hotplug::{Board, Hotplug};
use crate::moonraker::{McuStatus, Moonraker};
use crate::moonraker_link::{self, BoardEvent, CallError, LinkConfig, LinkEvent, LinkHandle, MethodCall};
use crate::registry::Registry;
use socket::Ask;
use status::{KlippyState, Notice, Tracker};

/// The remote methods the daemon offers printer.cfg macros and front ends.
pub const STATUS_METHOD: &str = "kflash_status";
pub const FLASH_ALL_METHOD: &str = "kflash_flash_all";

/// How long identify may take on a board that just appeared.
const IDENTIFY_DEADLINE: Duration = Duration::from_secs(5);
/// Run events buffered per subscriber before it is told it lagged (a build's output is many).
const RUN_EVENT_BUFFER: usize = 1024;
/// Notices buffered per subscriber before it is told it lagged.
const NOTICE_BUFFER: usize = 256;

pub struct DaemonOptions {
    pub config_dir: PathBuf,
    pub state_dir: PathBuf,
    /// Where to listen (default: [`socket::bind_path`]).
    pub socket: Option<PathBuf>,
}

/// What Moonraker said about Klippy, for the loop.
#[derive(Debug)]
pub struct KlippyUpdate {
    pub state: KlippyState,
    /// What Klippy reports about its MCUs, when it is ready.
    pub mcus: Vec<McuStatus>,
    /// Klippy's `state_message` in shutdown or error (it may name an MCU it lost).
    pub message: Option<String>,
}

/// Ask Moonraker once: Klippy's state and, when ready, its MCUs. Unreachable is `Unknown`.
pub async fn ask_klippy(mr: &Moonraker) -> KlippyUpdate {
    let state = match mr.server_info().await {
        Ok(info) if !info.klippy_connected => KlippyState::Disconnected,
        Ok(info) => KlippyState::from_server_info(&info.klippy_state),
        Err(e) => {
            tracing::info!("Moonraker: {e}");
            KlippyState::Unknown
        }
    };
    let mcus = match state {
        KlippyState::Ready => mr.mcus().await.unwrap_or_else(|e| {
            tracing::warn!("Moonraker did not list Klippy's MCUs: {e}");
            Vec::new()
        }),
        _ => Vec::new(),
    };
    let message = match state {
        KlippyState::Shutdown | KlippyState::Error => mr.printer_info().await.ok().map(|i| i.state_message),
        _ => None,
    };
    KlippyUpdate { state, mcus, message }
}

/// The CAN interfaces' state now, read from sysfs.
pub fn read_links(interfaces: &[String]) -> Vec<(String, crate::can::presence::Link)> {
    interfaces.iter().map(|i| (i.clone(), crate::can::presence::read_link(i))).collect()
}

/// The kernel's link changes, or nothing ever if they cannot be watched (said once).
pub async fn next_links(
    watch: &mut Option<crate::can::linkwatch::LinkWatch>,
) -> std::io::Result<Vec<(String, crate::can::presence::Link)>> {
    match watch {
        Some(w) => w.next().await,
        None => std::future::pending().await,
    }
}

/// The host tree's version (`git describe`), `None` when it is not a git checkout.
async fn host_version(reg: &Registry) -> Option<String> {
    crate::firmware::TreeStamp::compute(&reg.settings.klipper_dir()).await.version().map(String::from)
}

/// The status once, without a daemon: the boards now, Klippy's view, and identify on the
/// boards nobody holds. For `kflash status` when no daemon runs.
pub async fn status_once(reg: &Registry, hp: &Hotplug, state_dir: &Path) -> status::Status {
    let entries = reg.boards().cloned().collect();
    let mut tracker = Tracker::new(entries, host_version(reg).await, hp.snapshot());
    let k = ask_klippy(&Moonraker::from_settings(&reg.settings)).await;
    tracker.klippy_state(k.state, k.mcus);
    tracker.klippy_message(k.message);
    let links = read_links(&tracker.can_interfaces());
    tracker.links(links);
    for board in tracker.unknown_versions() {
        let Some(appearance) = tracker.appearance(&board.identity.syspath) else { continue };
        if let Some(Ok(version)) = identify_if_free(&board, state_dir).await {
            tracker.identified(&board.identity.syspath, appearance, version);
        }
    }
    let mut s = tracker.status();
    s.daemon = false;
    s
}

/// Read the board's version itself, unless a process holds its tty (Klipper) or another
/// kflash is flashing (its lock is held for the moment of the read). `None`: not asked.
/// Also the dashboard's, when no daemon runs.
pub async fn identify_if_free(board: &Board, state_dir: &Path) -> Option<std::result::Result<String, String>> {
    let devnode = board.identity.devnode.clone()?;
    match holders::tty_in_use(Path::new(&devnode)) {
        Ok(false) => {}
        Ok(true) => {
            tracing::debug!(%devnode, "a process holds the tty: not identifying");
            return None;
        }
        Err(e) => {
            tracing::debug!(%devnode, "cannot tell who holds the tty ({e}): not identifying");
            return None;
        }
    }
    let key = board.key.clone().unwrap_or_default();
    let Ok(_lock) = crate::service::FlashLock::acquire(state_dir, &format!("reading the version of {key}")) else {
        tracing::debug!(%devnode, "another kflash holds the flash lock: not identifying");
        return None;
    };
    let read = crate::flash::identify::read_identify(Path::new(&devnode), Instant::now() + IDENTIFY_DEADLINE).await;
    Some(read.map(|d| d.version).map_err(|e| e.to_string()))
}

/// The agent event a notice is worth, for Moonraker's front ends.
fn agent_event(n: &Notice, host: Option<&str>) -> Option<BoardEvent> {
    let Notice::Board { status: s } = n else { return None };
    match s.state {
        status::FirmwareState::Outdated => {
            let (host, board) = (host?.to_string(), s.version.clone()?);
            let commits_apart = match crate::version::relation(&host, &board) {
                crate::version::Relation::Behind(n) | crate::version::Relation::Ahead(n) => Some(n as u64),
                _ => None,
            };
            Some(BoardEvent::Outdated { board: s.key.clone(), host_version: host, board_version: board, commits_apart })
        }
        status::FirmwareState::Bootloader => Some(BoardEvent::StuckInBootloader {
            board: s.key.clone(),
            bootloader: s.mode.map(|m| m.as_str().to_string()).unwrap_or_default(),
        }),
        _ => None,
    }
}

/// Log a notice for the journal.
fn log_notice(n: &Notice) {
    use status::FirmwareState as F;
    match n {
        Notice::Board { status: s } => match s.state {
            F::Outdated => tracing::warn!(
                board = %s.key,
                version = s.version.as_deref().unwrap_or("?"),
                relation = s.relation.as_deref().unwrap_or(""),
                "{}",
                s.summary()
            ),
            F::Bootloader => tracing::warn!(board = %s.key, "{}", s.summary()),
            F::Current | F::Unknown | F::Missing => tracing::info!(board = %s.key, "{}", s.summary()),
        },
        Notice::Unregistered { board } => tracing::warn!(
            devnode = board.identity.devnode.as_deref().unwrap_or("?"),
            "an unregistered {} board appeared ({}); register it with `kflash add`",
            board.identity.mode,
            board.identity.mcu.as_deref().unwrap_or("?")
        ),
        Notice::RomBootloader { board } => tracing::warn!(
            "a board is in its ROM bootloader ({}); it runs no firmware until it is flashed",
            board.identity.rom_bootloader.unwrap_or("ROM bootloader")
        ),
        Notice::SameIdentity { key, devnodes } => tracing::warn!(
            board = %key,
            "{} connected devices match board '{key}' ({}); register it by its USB serial",
            devnodes.len(),
            devnodes.join(", ")
        ),
        Notice::MissingButNeeded { key } => {
            tracing::warn!(board = %key, "board '{key}' went away, and printer.cfg uses it")
        }
    }
}

/// The daemon's loop and what it owns.
struct Daemon {
    dir: PathBuf,
    state_dir: PathBuf,
    reg: Registry,
    hp: std::sync::Arc<Hotplug>,
    /// The run under way: what it is, and the end of its thread.
    run: Option<(String, tokio::sync::oneshot::Receiver<runs::LastWord>)>,
    /// Every run's events, for subscribers.
    run_events: broadcast::Sender<std::sync::Arc<crate::event::Event>>,
    /// What each board of the run under way read back after its write.
    read_back: BTreeMap<String, String>,
    /// Boards auto-recovery took on while they stay in Katapult.
    recovering: BTreeSet<String>,
    /// Tells a run the daemon is stopping.
    stopping: tokio::sync::watch::Sender<bool>,
    tracker: Tracker,
    /// Shared, as the run events are: a broadcast buffer's slots are all allocated.
    notices: broadcast::Sender<std::sync::Arc<Notice>>,
    identified_tx: mpsc::Sender<(String, u64, std::result::Result<String, String>)>,
    /// Identifies take turns (each holds the flash lock while it reads).
    identify_turn: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// Boards being identified: syspath → the appearance asked about.
    identifying: BTreeMap<String, u64>,
    mr: Moonraker,
    klippy_tx: mpsc::Sender<KlippyUpdate>,
    /// The Moonraker agent connection, and Klippy's state as it pushes it.
    link: LinkHandle,
    pushed: tokio::sync::watch::Receiver<KlippyState>,
    /// Agent events for Moonraker, the newest per board ([`outbox`]).
    outbox: outbox::Outbox,
    /// Questions to Moonraker about Klippy after a board appears ([`refresh`]).
    refresh: refresh::KlippyRefresh,
}

impl Daemon {
    fn tell(&mut self, notices: Vec<Notice>) {
        for n in notices {
            self.maybe_recover(&n);
            log_notice(&n);
            if let Some(event) = agent_event(&n, self.tracker.host_version_str()) {
                self.outbox.push(event);
            }
            // No subscriber is fine.
            let _ = self.notices.send(std::sync::Arc::new(n));
        }
    }

    /// What Moonraker said about Klippy (an answer to our own question): taken unless the
    /// link's pushes say Klippy has moved on since.
    fn klippy_update(&mut self, update: KlippyUpdate) {
        let pushed = *self.pushed.borrow();
        if pushed != KlippyState::Unknown && pushed != update.state {
            tracing::debug!(?update.state, ?pushed, "a stale answer about Klippy: ignored");
            return;
        }
        let mut n = self.tracker.klippy_state(update.state, update.mcus);
        n.extend(self.tracker.klippy_message(update.message));
        self.tell(n);
        self.identify_unknown();
    }

    fn link_event(&mut self, event: LinkEvent) {
        match event {
            LinkEvent::Connected { .. } => tracing::info!("connected to Moonraker as the kflash agent"),
            LinkEvent::Disconnected { reason } => {
                tracing::info!("Moonraker went away ({reason}); watching USB meanwhile");
                let n = self.tracker.klippy_state(KlippyState::Unknown, Vec::new());
                self.tell(n);
            }
            LinkEvent::Problem(p) => tracing::warn!("Moonraker: {p}"),
            // Ready: what Klippy read from its MCUs is asked for; the rest says it all.
            LinkEvent::Klippy(KlippyState::Ready) => self.ask_klippy(),
            LinkEvent::Klippy(state) => {
                let n = self.tracker.klippy_state(state, Vec::new());
                self.tell(n);
                self.identify_unknown();
                if matches!(state, KlippyState::Shutdown | KlippyState::Error) {
                    // Its message may name a CAN node it lost.
                    self.ask_klippy();
                }
            }
        }
    }

    /// A printer.cfg macro or a front end called one of the daemon's methods.
    fn method_call(&mut self, call: MethodCall) {
        match call.method.as_str() {
            STATUS_METHOD => {
                let status = self.tracker.status();
                if call.expects_answer() {
                    call.answer(serde_json::to_value(&status).map_err(|e| CallError::failed(e.to_string())));
                } else {
                    let (link, text) = (self.link.clone(), status.console_lines().join("\n"));
                    tokio::spawn(async move {
                        if let Err(e) = link.respond(&text).await {
                            tracing::warn!("the status could not be shown in the printer's console: {e}");
                        }
                    });
                }
            }
            FLASH_ALL_METHOD => {
                if call.expects_answer() {
                    // A front end's request: it cannot answer the run's questions or see its
                    // progress here; the printer's console can.
                    call.answer(Err(CallError::failed(
                        "call kflash_flash_all from a printer.cfg macro (action_call_remote_method), or run `kflash flash-all` on the printer's host",
                    )));
                    return;
                }
                if let Some((what, _)) = &self.run {
                    let text = format!("kflash: busy: {what} is running; try again when it has ended");
                    let link = self.link.clone();
                    tokio::spawn(async move {
                        let _ = link.respond(&text).await;
                    });
                    return;
                }
                tracing::info!("flash-all asked from the printer's console");
                let run = runs::for_console(self.run_context(), self.link.clone());
                self.run = Some(("a flash-all asked from the printer's console".into(), run));
            }
            other => {
                let other = other.to_string();
                call.answer(Err(CallError::unknown_method(&other)));
            }
        }
    }

    fn run_context(&self) -> runs::RunContext {
        runs::RunContext {
            reg: self.reg.clone(),
            config_dir: self.dir.clone(),
            state_dir: self.state_dir.clone(),
            hp: self.hp.clone(),
            events: self.run_events.clone(),
            stop: self.stopping.subscribe(),
        }
    }

    /// A socket client hands over a flash or flash-all: taken unless one is under way.
    async fn ask_run(&mut self, request: socket::RunRequest, client: socket::RunClient) {
        if let Some((what, _)) = &self.run {
            let message =
                format!("kflash is busy: {what} is running in the kflash daemon; wait for it to end (`kflash status`)");
            tracing::info!(uid = client.uid, "a run was refused: {message}");
            let _ = client.replies.send(socket::Reply::Busy { message });
            return;
        }
        // The run takes the registry as it is on disk now, as the CLI would (a board added
        // with `kflash add` a moment ago, without a SIGHUP); a broken file refuses the run.
        match Registry::open(&self.dir) {
            Ok(reg) if !same_registry(&reg, &self.reg) => self.reload().await,
            Ok(_) => {}
            Err(e) => {
                let _ = client.replies.send(socket::Reply::Failed { error: socket::ErrorDoc::from(&e) });
                return;
            }
        }
        let what = runs::describe(&request);
        tracing::info!(uid = client.uid, "{what} handed over through the socket");
        let _ = client.replies.send(socket::Reply::Accepted { run: what.clone() });
        let run = runs::for_client(self.run_context(), request, client);
        self.run = Some((what, run));
    }

    /// `auto_recover`: a registered board seen stuck in Katapult is re-flashed, once per time
    /// it appears there, when no other run is under way.
    fn maybe_recover(&mut self, n: &Notice) {
        let Notice::Board { status: s } = n else { return };
        if !s.connected || s.mode != Some(crate::identity::Mode::Katapult) {
            // Out of Katapult (or gone): the next time it is stuck counts again.
            self.recovering.remove(&s.key);
            return;
        }
        if !self.reg.settings.auto_recover || s.excluded || self.run.is_some() || self.recovering.contains(&s.key) {
            return;
        }
        // A kflash of its own (not through the daemon) may have put it there on purpose.
        if crate::service::FlashLock::acquire(&self.state_dir, "a look at the flash lock").is_err() {
            tracing::debug!(board = %s.key, "in Katapult while another kflash holds the flash lock: left alone");
            return;
        }
        self.recovering.insert(s.key.clone());
        tracing::warn!(board = %s.key, "{} is stuck in Katapult: re-flashing it (auto_recover)", s.name);
        let what = format!("the auto-recovery of {}", s.key);
        let run = runs::recover(self.run_context(), s.key.clone());
        self.run = Some((what, run));
    }

    /// A run's event, seen by the daemon itself: a board flashed and verified is announced to
    /// Moonraker's front ends (`board_flashed`) with the version it read back.
    fn run_event(&mut self, event: crate::event::Event) {
        use crate::event::EventKind;
        let Some(key) = event.board else { return };
        match event.kind {
            EventKind::Identified { version, .. } => {
                self.read_back.insert(key, version);
            }
            EventKind::Board { state: crate::orchestrator::BoardState::Flashed { view } }
                if view != crate::orchestrator::KlipperView::Pending =>
            {
                let Some(version) = self.read_back.remove(&key) else { return };
                self.outbox.push(BoardEvent::Flashed { board: key, version });
            }
            _ => {}
        }
    }

    /// A run ended: versions learnt while it held the flash lock can be asked for now.
    fn run_ended(&mut self, last: runs::LastWord) {
        if let Some((what, _)) = self.run.take() {
            tracing::info!("{what} ended");
        }
        if let Some((client, reply)) = last {
            let _ = client.send(reply);
        }
        self.ask_klippy();
        self.identify_unknown();
    }

    /// Identify the registered boards whose version is unknown, each once at a time.
    fn identify_unknown(&mut self) {
        if self.run.is_some() {
            // The run holds the flash lock; asked again when it ends.
            return;
        }
        for board in self.tracker.unknown_versions() {
            let syspath = board.identity.syspath.clone();
            let Some(appearance) = self.tracker.appearance(&syspath) else { continue };
            // One at a time per device: a newer appearance is asked when this one answers.
            if self.identifying.contains_key(&syspath) {
                continue;
            }
            self.identifying.insert(syspath.clone(), appearance);
            let (tx, state_dir) = (self.identified_tx.clone(), self.state_dir.clone());
            let one_at_a_time = self.identify_turn.clone();
            tokio::spawn(async move {
                // Each identify takes the flash lock for its moment; two at once would refuse
                // each other (found by the soak: boards left unknown at start).
                let _turn = one_at_a_time.lock().await;
                let result = identify_if_free(&board, &state_dir).await;
                let answer = result.unwrap_or_else(|| Err("not asked".into()));
                let _ = tx.send((syspath, appearance, answer)).await;
            });
        }
    }

    /// Ask Moonraker about Klippy, off the loop.
    fn ask_klippy(&self) {
        let (mr, tx) = (self.mr.clone(), self.klippy_tx.clone());
        tokio::spawn(async move {
            let _ = tx.send(ask_klippy(&mr).await).await;
        });
    }

    async fn reload(&mut self) {
        match Registry::open(&self.dir) {
            Ok(reg) => {
                self.hp.set_resolver(crate::app::boards::resolver(&reg));
                let entries = reg.boards().cloned().collect();
                self.mr = Moonraker::from_settings(&reg.settings);
                self.reg = reg;
                let mut n = self.tracker.registry(entries, self.hp.snapshot());
                n.extend(self.tracker.links(read_links(&self.tracker.can_interfaces())));
                self.tell(n);
                let v = host_version(&self.reg).await;
                let n = self.tracker.host_version(v);
                self.tell(n);
                tracing::info!("registry and settings reloaded ({} boards)", self.reg.boards().count());
                self.ask_klippy();
                self.identify_unknown();
            }
            Err(e) => {
                tracing::error!("the registry could not be reloaded, the last good one stays in use: {e}");
                let n = self.tracker.registry_broken(e.to_string());
                self.tell(n);
            }
        }
    }
}

fn same_registry(a: &Registry, b: &Registry) -> bool {
    a.settings == b.settings && a.boards().eq(b.boards())
}

/// The run under way, to the end (only polled when there is one).
async fn run_of(run: &mut Option<(String, tokio::sync::oneshot::Receiver<runs::LastWord>)>) -> runs::LastWord {
    match run {
        // Err: the thread ended without a word (a panic); over all the same.
        Some((_, over)) => over.await.unwrap_or(None),
        None => std::future::pending().await,
    }
}

/// What the daemon is told from outside its loop (signals, in `kflash daemon`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// SIGHUP: reload the registry and settings.
    Reload,
    /// SIGTERM/SIGINT: stop cleanly.
    Stop(&'static str),
}

/// `kflash daemon`: signals become [`Control`]s, discovery is udev, and systemd is told
/// when the daemon is ready. Runs until SIGTERM/SIGINT (Ok) or until discovery fails (Err).
pub async fn run(opts: DaemonOptions) -> Result<()> {
    let mut signals = crate::service::ShutdownSignals::install().map_err(|e| Error::io("install", "signals", e))?;
    let reg = Registry::open(&opts.config_dir)?;
    let manager = crate::service::ServiceManager::from_settings(&reg.settings);
    match crate::service::recover_stale_stop(&manager, &opts.state_dir).await {
        Some(Ok(msg)) => tracing::warn!("{msg}"),
        Some(Err(e)) => {
            tracing::error!("Klipper was left stopped by an interrupted kflash and could not be started: {e}")
        }
        None => {}
    }
    let hp = Hotplug::start_udev(crate::app::boards::resolver(&reg)).await?;
    let (control_tx, control) = mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let c = match signals.recv().await {
                "SIGHUP" => Control::Reload,
                other => Control::Stop(other),
            };
            if control_tx.send(c).await.is_err() {
                return;
            }
        }
    });
    let ready = || {
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    };
    let result = serve(opts, reg, hp, control, ready).await;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    result
}

/// The daemon's loop over a started discovery: until [`Control::Stop`] (Ok) or until
/// discovery fails (Err). `ready` is called after the first enumeration and the first
/// contact attempt with Moonraker, with the socket listening.
pub async fn serve(
    opts: DaemonOptions,
    reg: Registry,
    hp: Hotplug,
    mut control: mpsc::Receiver<Control>,
    ready: impl FnOnce(),
) -> Result<()> {
    let (boards, mut events) = hp.subscribe_with_snapshot();
    let entries = reg.boards().cloned().collect();
    let mut tracker = Tracker::new(entries, host_version(&reg).await, boards);
    // Subscribed before the first read, so no change falls in between.
    let mut link_watch = match crate::can::linkwatch::LinkWatch::open() {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!("CAN interfaces cannot be watched ({e}); CAN nodes show Klippy's view only");
            None
        }
    };
    tracker.links(read_links(&tracker.can_interfaces()));

    let path = opts.socket.clone().unwrap_or_else(|| socket::bind_path(&opts.state_dir));
    let listener = socket::bind(&path).await.map_err(|e| Error::io("listen on", &path, e))?;
    let (ask_tx, mut asks) = mpsc::channel::<Ask>(64);
    let server = tokio::spawn(socket::serve(listener, ask_tx));

    let (identified_tx, mut identified) = mpsc::channel(64);
    let (klippy_tx, mut klippy) = mpsc::channel(16);
    let mr = Moonraker::from_settings(&reg.settings);
    let config = LinkConfig::new(reg.settings.moonraker_socket(), &[STATUS_METHOD, FLASH_ALL_METHOD]);
    let (link, mut inbox, link_task) = moonraker_link::spawn(config);
    let outbox = outbox::Outbox::default();
    let sender = tokio::spawn(outbox.clone().send_over(link.clone()));
    let refresh = refresh::KlippyRefresh::default();
    let asker = tokio::spawn(refresh.clone().ask_over(link.clone()));
    let mut d = Daemon {
        dir: opts.config_dir.clone(),
        state_dir: opts.state_dir.clone(),
        reg,
        hp: std::sync::Arc::new(hp),
        tracker,
        notices: broadcast::channel(NOTICE_BUFFER).0,
        identified_tx,
        identifying: BTreeMap::new(),
        identify_turn: Default::default(),
        mr,
        klippy_tx,
        link,
        pushed: inbox.klippy.clone(),
        outbox,
        refresh,
        run: None,
        recovering: BTreeSet::new(),
        read_back: BTreeMap::new(),
        run_events: broadcast::channel(RUN_EVENT_BUFFER).0,
        stopping: tokio::sync::watch::channel(false).0,
    };
    // The first contact with Moonraker, then ready.
    let first = ask_klippy(&d.mr).await;
    let mut n = d.tracker.klippy_state(first.state, first.mcus);
    n.extend(d.tracker.klippy_message(first.message));
    d.tell(n);
    d.identify_unknown();
    ready();
    tracing::info!(socket = %path.display(), boards = d.reg.boards().count(), "kflash daemon ready");

    let mut own_view = d.run_events.subscribe();
    let result = loop {
        tokio::select! {
            Ok(event) = own_view.recv() => d.run_event(std::sync::Arc::unwrap_or_clone(event)),
            ev = events.recv() => match ev {
                Ok(ev) => {
                    let n = d.tracker.board_event(&ev);
                    d.tell(n);
                    if ev.board.key.is_some() && ev.action != crate::hotplug::Action::Removed {
                        // Klippy's errors at its start are not pushed: ask (answered as a push).
                        d.refresh.want();
                    }
                    d.identify_unknown();
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "board events were missed; taking the boards as they are now");
                    let entries = d.reg.boards().cloned().collect();
                    let n = d.tracker.registry(entries, d.hp.snapshot());
                    d.tell(n);
                }
                Err(broadcast::error::RecvError::Closed) => {
                    break Err(Error::Udev(d.hp.failure().unwrap_or_else(|| "the udev event stream ended".into())));
                }
            },
            Some((syspath, appearance, answer)) = identified.recv() => {
                d.identifying.remove(&syspath);
                match answer {
                    Ok(version) => {
                        let n = d.tracker.identified(&syspath, appearance, version);
                        d.tell(n);
                    }
                    Err(why) => tracing::debug!(%syspath, "no version from identify: {why}"),
                }
                // The device left and came back while it was asked: its new appearance is
                // asked now (not before: two identifies on one tty would garble each other).
                if d.tracker.appearance(&syspath).is_some_and(|now| now != appearance) {
                    d.identify_unknown();
                }
            }
            Some(update) = klippy.recv() => d.klippy_update(update),
            changes = next_links(&mut link_watch) => {
                let changes = match changes {
                    Ok(changes) => changes,
                    // Changes were dropped while nobody read: the state now says it all.
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => read_links(&d.tracker.can_interfaces()),
                    Err(e) => {
                        tracing::warn!("CAN interfaces can no longer be watched ({e}); CAN nodes show Klippy's view only");
                        link_watch = None;
                        read_links(&d.tracker.can_interfaces())
                    }
                };
                let n = d.tracker.links(changes);
                d.tell(n);
            }
            Some(event) = inbox.events.recv() => d.link_event(event),
            Some(call) = inbox.calls.recv() => d.method_call(call),
            Some(ask) = asks.recv() => match ask {
                Ask::Status(tx) => {
                    let status = status::Status { memory: memory::MemoryUse::now(), ..d.tracker.status() };
                    let _ = tx.send(status);
                }
                Ask::Subscribe(tx) => {
                    let _ = tx.send((d.tracker.status(), d.notices.subscribe(), d.run_events.subscribe()));
                }
                Ask::Run(request, client) => d.ask_run(request, client).await,
            },
            last = run_of(&mut d.run), if d.run.is_some() => d.run_ended(last),
            c = control.recv() => match c {
                Some(Control::Reload) => d.reload().await,
                Some(Control::Stop(why)) => {
                    tracing::info!("{why}: stopping");
                    if let Some((what, run)) = d.run.take() {
                        // Cancelled like a Ctrl-C: Klipper is started again before the end.
                        tracing::warn!("{what} is cancelled because the daemon stops");
                        let _ = d.stopping.send(true);
                        if let Ok(Some((client, reply))) = run.await {
                            let _ = client.send(reply);
                        }
                    }
                    break Ok(());
                }
                None => break Ok(()),
            },
        }
    };
    server.abort();
    sender.abort();
    asker.abort();
    let _ = std::fs::remove_file(&path);
    link_task.shutdown().await;
    result
}
