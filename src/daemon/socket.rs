//! The daemon's status surface: a Unix socket speaking JSON lines.
//!
//! A client writes one request line, e.g. `{"request":"status"}` or
//! `{"request":"subscribe"}`, and reads [`Reply`] lines: one `status` for `status`; for
//! `subscribe`, the status and then every notice and run event as it happens, until it hangs
//! up.
//!
//! `flash` and `flash-all` hand a run to the daemon, so only one process ever holds the flash
//! lock and the Klipper guard. The daemon answers `accepted` (or `busy` when a run is under
//! way), then the run's `event`s and `question`s; the client answers each question with
//! `{"answer":true|false}` and may send `{"cancel":true}` (or hang up) to cancel, which starts
//! Klipper again as any cancelled run does. The last line is `flashed`, `flash-all-done` or
//! `failed`.
//!
//! Access: the socket file is mode 0660 (the daemon's user and group), and every peer is
//! checked with `SO_PEERCRED`: only root and the daemon's own user are served.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::status::{Notice, Status};
use crate::app::flash::FlashSummary;
use crate::app::flash_all::{CurrentBoards, FlashAllReport};
use crate::event::Event;
use crate::registry::FlashMethod;

/// The socket's file name.
pub const SOCKET_FILE: &str = "kflash.sock";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Subscribe,
    Flash(FlashRequest),
    FlashAll(FlashAllRequest),
}

/// `kflash flash KEY`, carried out by the daemon.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct FlashRequest {
    pub key: String,
    pub force: bool,
    pub method: Option<FlashMethod>,
    pub no_build: bool,
    pub skip_print_check: bool,
    /// Answer the run's questions yes without asking (never overrides safety).
    pub yes: bool,
    /// The client's config directory: the daemon refuses a run for another registry.
    pub config_dir: Option<PathBuf>,
}

/// `kflash flash-all`, carried out by the daemon.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct FlashAllRequest {
    pub current: CurrentBoards,
    /// Boards flashed at once (0: all of them, 1: one after another).
    pub parallel: Option<usize>,
    pub builds: usize,
    pub skip_unconfigured: bool,
    pub no_build: bool,
    pub skip_print_check: bool,
    pub yes: bool,
    pub config_dir: Option<PathBuf>,
}

/// A client's line during a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RunInput {
    Answer { answer: bool },
    Cancel { cancel: bool },
}

/// An error as the CLI prints it with `--json`, and exits with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDoc {
    pub kind: String,
    pub message: String,
    pub help: Option<String>,
    pub exit_code: i32,
}

impl From<&crate::error::Error> for ErrorDoc {
    fn from(e: &crate::error::Error) -> ErrorDoc {
        ErrorDoc { kind: e.kind().into(), message: e.to_string(), help: e.help(), exit_code: e.exit_code() }
    }
}

#[derive(Debug, Serialize)]
#[serde(tag = "reply", rename_all = "kebab-case")]
pub enum Reply {
    Status {
        status: Status,
    },
    Notice {
        notice: Notice,
    },
    /// The subscriber fell behind and missed `missed` notices: ask for the status again.
    Lagged {
        missed: u64,
    },
    Error {
        message: String,
    },
    /// The run was taken; its events follow.
    Accepted {
        run: String,
    },
    /// Another run is under way: nothing was done.
    Busy {
        message: String,
    },
    Event {
        event: Event,
    },
    /// Answer with `{"answer":true|false}`.
    Question {
        text: String,
    },
    Flashed {
        summary: FlashSummary,
    },
    FlashAllDone {
        report: FlashAllReport,
        error: Option<ErrorDoc>,
    },
    Failed {
        error: ErrorDoc,
    },
}

impl Reply {
    /// The last line of a run.
    pub fn ends_run(&self) -> bool {
        matches!(self, Reply::Busy { .. } | Reply::Flashed { .. } | Reply::FlashAllDone { .. } | Reply::Failed { .. })
    }
}

/// A run handed to the daemon, and the way back to its client.
pub struct RunClient {
    /// Who asked, for the log.
    pub uid: u32,
    pub replies: mpsc::UnboundedSender<Reply>,
    pub answers: mpsc::UnboundedReceiver<bool>,
    /// Resolves (or is dropped) when the client cancels or hangs up.
    pub cancel: oneshot::Receiver<()>,
}

pub enum RunRequest {
    Flash(FlashRequest),
    FlashAll(FlashAllRequest),
}

impl RunRequest {
    pub fn yes(&self) -> bool {
        match self {
            RunRequest::Flash(r) => r.yes,
            RunRequest::FlashAll(r) => r.yes,
        }
    }

    pub fn config_dir(&self) -> Option<&Path> {
        match self {
            RunRequest::Flash(r) => r.config_dir.as_deref(),
            RunRequest::FlashAll(r) => r.config_dir.as_deref(),
        }
    }
}

/// A subscriber's start: the status, then the notices and run events that follow it.
pub type Subscription =
    (Status, broadcast::Receiver<std::sync::Arc<Notice>>, broadcast::Receiver<std::sync::Arc<Event>>);

/// What a connection asks the daemon's loop, which owns the state.
pub enum Ask {
    Status(oneshot::Sender<Status>),
    /// The status and every notice after it, taken together so none falls in between.
    Subscribe(oneshot::Sender<Subscription>),
    /// Carry out a flash or flash-all (or answer `busy`).
    Run(RunRequest, RunClient),
}

/// Where the daemon listens and clients look, most specific first: `$KFLASH_SOCKET`,
/// systemd's `RuntimeDirectory` (`$RUNTIME_DIRECTORY`, `/run/kflash`), the user's
/// `$XDG_RUNTIME_DIR`, and the state directory.
pub fn candidates(state_dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(p) = env("KFLASH_SOCKET") {
        return vec![p];
    }
    if let Some(d) = env("RUNTIME_DIRECTORY") {
        // systemd may list several, separated by ':'.
        if let Some(first) = d.to_string_lossy().split(':').next() {
            out.push(PathBuf::from(first).join(SOCKET_FILE));
        }
    }
    out.push(PathBuf::from("/run/kflash").join(SOCKET_FILE));
    if let Some(d) = env("XDG_RUNTIME_DIR") {
        out.push(d.join(SOCKET_FILE));
    }
    out.push(state_dir.join(SOCKET_FILE));
    out
}

/// The path the daemon binds: the first candidate whose directory exists (the state
/// directory is created).
pub fn bind_path(state_dir: &Path) -> PathBuf {
    let all = candidates(state_dir);
    all.iter()
        .find(|p| p.parent().is_some_and(|d| d.is_dir()))
        .cloned()
        .unwrap_or_else(|| all.last().cloned().expect("the state dir is always a candidate"))
}

/// Bind the socket: a stale file from a daemon that died is replaced, a live daemon's is not.
pub async fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("another kflash daemon answers at {}", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

/// Root and the daemon's own user.
fn allowed(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw()
}

/// Serve connections until `listener` is dropped (the task is aborted at shutdown).
pub async fn serve(listener: UnixListener, asks: mpsc::Sender<Ask>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("status socket: accept failed: {e}");
                continue;
            }
        };
        let asks = asks.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, asks).await {
                tracing::debug!("status socket: a connection ended: {e}");
            }
        });
    }
}

async fn send(w: &mut (impl AsyncWriteExt + Unpin), reply: &Reply) -> std::io::Result<()> {
    let mut line = serde_json::to_string(reply).expect("replies serialize");
    line.push('\n');
    w.write_all(line.as_bytes()).await
}

async fn connection(stream: UnixStream, asks: mpsc::Sender<Ask>) -> std::io::Result<()> {
    let uid = stream.peer_cred()?.uid();
    let (r, mut w) = stream.into_split();
    if !allowed(uid) {
        tracing::warn!(uid, "status socket: refused a peer that is neither root nor the daemon's user");
        let message = "refused: only root and the user the kflash daemon runs as may use its socket".into();
        return send(&mut w, &Reply::Error { message }).await;
    }
    let mut lines = BufReader::new(r).lines();
    let Some(line) = lines.next_line().await? else { return Ok(()) };
    let request: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            let message =
                format!("not a request ({e}); send {{\"request\":\"status\"}} or {{\"request\":\"subscribe\"}}");
            return send(&mut w, &Reply::Error { message }).await;
        }
    };
    let gone = || std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the daemon is stopping");
    let request = match request {
        Request::Flash(r) => return run(RunRequest::Flash(r), uid, asks, lines, w).await,
        Request::FlashAll(r) => return run(RunRequest::FlashAll(r), uid, asks, lines, w).await,
        other => other,
    };
    match request {
        Request::Status => {
            let (tx, rx) = oneshot::channel();
            asks.send(Ask::Status(tx)).await.map_err(|_| gone())?;
            let status = rx.await.map_err(|_| gone())?;
            send(&mut w, &Reply::Status { status }).await
        }
        Request::Flash(_) | Request::FlashAll(_) => unreachable!("handed over above"),
        Request::Subscribe => {
            let (tx, rx) = oneshot::channel();
            asks.send(Ask::Subscribe(tx)).await.map_err(|_| gone())?;
            let (status, mut notices, mut events) = rx.await.map_err(|_| gone())?;
            send(&mut w, &Reply::Status { status }).await?;
            loop {
                tokio::select! {
                    n = notices.recv() => match n {
                        Ok(notice) => send(&mut w, &Reply::Notice { notice: std::sync::Arc::unwrap_or_clone(notice) }).await?,
                        Err(broadcast::error::RecvError::Lagged(missed)) => send(&mut w, &Reply::Lagged { missed }).await?,
                        Err(broadcast::error::RecvError::Closed) => return Ok(()),
                    },
                    e = events.recv() => match e {
                        Ok(event) => send(&mut w, &Reply::Event { event: std::sync::Arc::unwrap_or_clone(event) }).await?,
                        Err(broadcast::error::RecvError::Lagged(missed)) => send(&mut w, &Reply::Lagged { missed }).await?,
                        Err(broadcast::error::RecvError::Closed) => return Ok(()),
                    },
                    // The client hung up (or wrote something): end the subscription.
                    l = lines.next_line() => if !matches!(l, Ok(Some(_))) { return Ok(()) },
                }
            }
        }
    }
}

/// A run handed to the daemon: its replies out, the client's answers and cancel in.
async fn run(
    request: RunRequest,
    uid: u32,
    asks: mpsc::Sender<Ask>,
    mut lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    mut w: tokio::net::unix::OwnedWriteHalf,
) -> std::io::Result<()> {
    let gone = || std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the daemon is stopping");
    let (replies, mut reply_rx) = mpsc::unbounded_channel();
    let (answer_tx, answers) = mpsc::unbounded_channel();
    let (cancel_tx, cancel) = oneshot::channel();
    let client = RunClient { uid, replies, answers, cancel };
    asks.send(Ask::Run(request, client)).await.map_err(|_| gone())?;
    let mut cancel_tx = Some(cancel_tx);
    let mut reading = true;
    loop {
        tokio::select! {
            reply = reply_rx.recv() => match reply {
                Some(reply) => {
                    send(&mut w, &reply).await?;
                    if reply.ends_run() {
                        return Ok(());
                    }
                }
                // The daemon stopped without a last word.
                None => return Err(gone()),
            },
            line = lines.next_line(), if reading => match line {
                Ok(Some(line)) => match serde_json::from_str::<RunInput>(&line) {
                    Ok(RunInput::Answer { answer }) => { let _ = answer_tx.send(answer); }
                    Ok(RunInput::Cancel { .. }) => { cancel_tx.take().map(|tx| tx.send(())); }
                    Err(e) => tracing::debug!("status socket: not a run input ({e}): {line}"),
                },
                // Done writing (perhaps a half-close): the replies still go out. A client
                // that is gone fails the next write, which drops the receiver of the
                // replies, and that cancels the run.
                _ => reading = false,
            },
        }
    }
}

/// The client side: ask a running daemon. `None` when no daemon answers at any candidate.
pub async fn ask_status(state_dir: &Path) -> Option<std::io::Result<serde_json::Value>> {
    let (stream, _) = connect(state_dir).await?;
    Some(read_status(stream).await)
}

/// The first candidate a daemon answers at.
async fn connect(state_dir: &Path) -> Option<(UnixStream, PathBuf)> {
    for path in candidates(state_dir) {
        if let Ok(stream) = UnixStream::connect(&path).await {
            return Some((stream, path));
        }
    }
    None
}

async fn read_status(stream: UnixStream) -> std::io::Result<serde_json::Value> {
    let (r, mut w) = stream.into_split();
    w.write_all(b"{\"request\":\"status\"}\n").await?;
    let mut lines = BufReader::new(r).lines();
    let line = lines
        .next_line()
        .await?
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the daemon hung up"))?;
    let reply: serde_json::Value = serde_json::from_str(&line)?;
    match reply["reply"].as_str() {
        Some("status") => Ok(reply["status"].clone()),
        _ => Err(std::io::Error::other(reply["message"].as_str().unwrap_or("an unexpected reply").to_string())),
    }
}

/// A run's replies as a client reads them.
#[derive(Debug, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case")]
pub enum RunReply {
    Accepted { run: String },
    Busy { message: String },
    Event { event: Event },
    Question { text: String },
    Flashed { summary: FlashSummary },
    FlashAllDone { report: FlashAllReport, error: Option<ErrorDoc> },
    Failed { error: ErrorDoc },
    Error { message: String },
}

/// The client's end of a run handed to the daemon.
pub struct RunConnection {
    lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    w: tokio::net::unix::OwnedWriteHalf,
    pub socket: PathBuf,
}

impl RunConnection {
    /// The next reply; `None` when the daemon hung up.
    pub async fn next(&mut self) -> std::io::Result<Option<RunReply>> {
        let Some(line) = self.lines.next_line().await? else { return Ok(None) };
        serde_json::from_str(&line)
            .map(Some)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{e}: {line}")))
    }

    pub async fn answer(&mut self, answer: bool) -> std::io::Result<()> {
        self.write(&RunInput::Answer { answer }).await
    }

    /// Cancel the run: the daemon cancels it as Ctrl-C would, and still sends the last word.
    pub async fn cancel(&mut self) -> std::io::Result<()> {
        self.write(&RunInput::Cancel { cancel: true }).await
    }

    async fn write(&mut self, input: &RunInput) -> std::io::Result<()> {
        let mut line = serde_json::to_string(input).expect("inputs serialize");
        line.push('\n');
        self.w.write_all(line.as_bytes()).await
    }
}

/// Hand a run to a running daemon: `None` when no daemon answers at any candidate.
pub async fn hand_over(state_dir: &Path, request: &Request) -> Option<std::io::Result<RunConnection>> {
    let (stream, socket) = connect(state_dir).await?;
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_string(request).expect("requests serialize");
    line.push('\n');
    Some(w.write_all(line.as_bytes()).await.map(|()| RunConnection { lines: BufReader::new(r).lines(), w, socket }))
}
