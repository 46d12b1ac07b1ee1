//! The daemon's status surface: a Unix socket speaking JSON lines.
//!
//! A client writes one request line, e.g. `{"request":"status"}` or
//! `{"request":"subscribe"}`, and reads [`Reply`] lines: one `status` for `status`; for
//! `subscribe`, the status and then every notice as it happens, until it hangs up.
//!
//! Access: the socket file is mode 0660 (the daemon's user and group), and every peer is
//! checked with `SO_PEERCRED`: only root and the daemon's own user are served.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::status::{Notice, Status};

/// The socket's file name.
pub const SOCKET_FILE: &str = "kflash.sock";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Subscribe,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
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
}

/// What a connection asks the daemon's loop, which owns the state.
pub enum Ask {
    Status(oneshot::Sender<Status>),
    /// The status and every notice after it, taken together so none falls in between.
    Subscribe(oneshot::Sender<(Status, broadcast::Receiver<Notice>)>),
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
    match request {
        Request::Status => {
            let (tx, rx) = oneshot::channel();
            asks.send(Ask::Status(tx)).await.map_err(|_| gone())?;
            let status = rx.await.map_err(|_| gone())?;
            send(&mut w, &Reply::Status { status }).await
        }
        Request::Subscribe => {
            let (tx, rx) = oneshot::channel();
            asks.send(Ask::Subscribe(tx)).await.map_err(|_| gone())?;
            let (status, mut notices) = rx.await.map_err(|_| gone())?;
            send(&mut w, &Reply::Status { status }).await?;
            loop {
                tokio::select! {
                    n = notices.recv() => match n {
                        Ok(notice) => send(&mut w, &Reply::Notice { notice }).await?,
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

/// The client side: ask a running daemon. `None` when no daemon answers at any candidate.
pub async fn ask_status(state_dir: &Path) -> Option<std::io::Result<serde_json::Value>> {
    for path in candidates(state_dir) {
        let Ok(stream) = UnixStream::connect(&path).await else { continue };
        return Some(read_status(stream).await);
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
