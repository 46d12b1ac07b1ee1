//! The link's task: wait for the socket, connect, identify, register, then serve one
//! connection until it ends; repeat until told to stop.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch};

use super::codec::{encode, FrameDecoder};
use super::socket_watch::SocketWatch;
use super::types::{Answer, CallSource, KlippyState, LinkError, LinkEvent, MethodCall};
use super::{Command, LinkConfig};

pub(crate) struct Link {
    pub config: LinkConfig,
    pub commands: mpsc::Receiver<Command>,
    pub events: mpsc::Sender<LinkEvent>,
    pub calls: mpsc::Sender<MethodCall>,
    pub klippy: watch::Sender<KlippyState>,
    /// This connection's id, and how many set-up answers (registrations, `server.info`)
    /// are still due before it counts as connected.
    pub setup: Option<(Option<i64>, usize)>,
    /// False once every [`super::LinkHandle`] is dropped (the channel would then be ready
    /// at once, forever).
    pub commands_open: bool,
}

/// Moonraker binds its socket, then listens: a connect right after the creation event can
/// land in between and be refused. Only then, a few quick retries (about 0.5 s in all)
/// follow that one event; otherwise the link waits for the next event.
const AFTER_CREATE_RETRIES: [u64; 7] = [2, 4, 8, 16, 32, 64, 128];

/// What a request of our own is for, so its answer goes to the right place.
enum Pending {
    Identify,
    Register(String),
    ServerInfo,
    Refresh(oneshot::Sender<Result<KlippyState, LinkError>>),
    Owner(String, oneshot::Sender<Result<Value, LinkError>>),
}

enum End {
    Stop,
    Lost(String),
}

fn stopping(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow() || stop.has_changed().is_err()
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

impl Link {
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut watch = match SocketWatch::new(&self.config.socket) {
            Ok(w) => Some(w),
            Err(e) => {
                // Without inotify the link cannot know when Moonraker is back; it still
                // tries once now, and says so.
                self.event(LinkEvent::Problem(format!(
                    "cannot watch {} for Moonraker's socket ({e}); kflash connects to Moonraker only if it is already up",
                    self.config.socket.display()
                )));
                None
            }
        };
        let mut session = 0u64;
        loop {
            let stream = match self.connect(watch.as_mut(), &mut stop).await {
                Some(s) => s,
                None => return,
            };
            session += 1;
            self.setup = None;
            let end = self.serve(stream, session, &mut stop).await;
            self.klippy.send_replace(KlippyState::Unknown);
            match end {
                End::Stop => return,
                End::Lost(reason) => {
                    tracing::info!("Moonraker connection lost: {reason}");
                    self.event(LinkEvent::Disconnected { reason });
                }
            }
        }
    }

    fn event(&self, event: LinkEvent) {
        if let Err(e) = self.events.try_send(event) {
            tracing::warn!("Moonraker link event not delivered (owner not reading): {e}");
        }
    }

    /// Connect now, or after the socket's next creation. Requests arriving meanwhile are
    /// refused at once. `None` when told to stop.
    async fn connect(
        &mut self,
        mut watch: Option<&mut SocketWatch>,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<UnixStream> {
        let socket = self.config.socket.clone();
        let mut after_event = false;
        loop {
            if stopping(stop) {
                return None;
            }
            match UnixStream::connect(&socket).await {
                Ok(s) => return Some(s),
                Err(e) => tracing::debug!("Moonraker socket {}: {e}", socket.display()),
            }
            if std::mem::take(&mut after_event) {
                for ms in AFTER_CREATE_RETRIES {
                    tokio::select! {
                        _ = stopped(stop) => return None,
                        _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
                    }
                    if let Ok(s) = UnixStream::connect(&socket).await {
                        return Some(s);
                    }
                }
            }
            let Some(w) = watch.as_deref_mut() else {
                stopped(stop).await;
                return None;
            };
            loop {
                tokio::select! {
                    _ = stopped(stop) => return None,
                    changed = w.changed() => {
                        if let Err(e) = changed {
                            tracing::warn!("watching {}: {e}", socket.display());
                            self.event(LinkEvent::Problem(format!("watching {} failed: {e}", socket.display())));
                            stopped(stop).await;
                            return None;
                        }
                        after_event = true;
                        break;
                    }
                    cmd = self.commands.recv(), if self.commands_open => match cmd {
                        Some(Command::Call { reply, .. }) => { let _ = reply.send(Err(LinkError::NotConnected)); }
                        Some(Command::RefreshKlippy { reply }) => { let _ = reply.send(Err(LinkError::NotConnected)); }
                        // The handles are gone; the task still runs until stopped.
                        None => self.commands_open = false,
                    },
                }
            }
        }
    }

    async fn serve(&mut self, stream: UnixStream, session: u64, stop: &mut watch::Receiver<bool>) -> End {
        let (mut reader, mut writer) = stream.into_split();
        let mut decoder = FrameDecoder::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut pending: HashMap<u64, Pending> = HashMap::new();
        let mut next_id = 1u64;
        let (answers_tx, mut answers_rx) = mpsc::unbounded_channel::<Answer>();

        let identify = json!({
            "client_name": self.config.client_name,
            "version": self.config.version,
            "type": "agent",
            "url": self.config.url,
        });
        let mut out: Vec<Value> =
            vec![request(&mut next_id, &mut pending, "server.connection.identify", identify, Pending::Identify)];
        loop {
            for msg in out.drain(..) {
                let bytes = encode(&msg);
                tokio::select! {
                    _ = stopped(stop) => return End::Stop,
                    w = writer.write_all(&bytes) => if let Err(e) = w {
                        fail_pending(pending);
                        return End::Lost(format!("write failed: {e}"));
                    },
                }
            }
            tokio::select! {
                _ = stopped(stop) => { fail_pending(pending); return End::Stop; }
                read = reader.read(&mut buf) => {
                    let n = match read {
                        Ok(0) => { fail_pending(pending); return End::Lost("Moonraker closed the connection".into()); }
                        Ok(n) => n,
                        Err(e) => { fail_pending(pending); return End::Lost(format!("read failed: {e}")); }
                    };
                    for frame in decoder.push(&buf[..n]) {
                        match frame {
                            Ok(msg) => self.incoming(msg, session, &answers_tx, &mut pending, &mut next_id, &mut out),
                            Err(e) => tracing::warn!("skipping a malformed message from Moonraker: {e}"),
                        }
                    }
                }
                Some(answer) = answers_rx.recv() => {
                    if answer.session == session {
                        out.push(match answer.result {
                            Ok(result) => json!({"jsonrpc": "2.0", "id": answer.id, "result": result}),
                            Err(e) => json!({"jsonrpc": "2.0", "id": answer.id, "error": {"code": e.code, "message": e.message}}),
                        });
                    }
                }
                cmd = self.commands.recv(), if self.commands_open => match cmd {
                    Some(Command::Call { method, params, reply }) => {
                        let what = Pending::Owner(method.clone(), reply);
                        out.push(request(&mut next_id, &mut pending, &method, params, what));
                    }
                    Some(Command::RefreshKlippy { reply }) => {
                        out.push(request(&mut next_id, &mut pending, "server.info", json!({}), Pending::Refresh(reply)));
                    }
                    None => self.commands_open = false,
                },
            }
        }
    }

    /// One message from Moonraker: an answer to one of ours, a push, or a call for the owner.
    fn incoming(
        &mut self,
        msg: Value,
        session: u64,
        answers: &mpsc::UnboundedSender<Answer>,
        pending: &mut HashMap<u64, Pending>,
        next_id: &mut u64,
        out: &mut Vec<Value>,
    ) {
        let Some(obj) = msg.as_object() else {
            tracing::warn!("skipping a message from Moonraker that is not an object: {msg}");
            return;
        };
        if let Some(method) = obj.get("method") {
            let Some(method) = method.as_str() else {
                tracing::warn!("skipping a message from Moonraker with a non-string method: {msg}");
                return;
            };
            if let Some(state) = super::KlippyState::from_notification(method) {
                self.klippy_state(state);
            } else if method.starts_with("notify_") {
                // Other broadcasts (proc stats once a second, gcode responses, agent events):
                // not for us, and not copied.
            } else {
                let params = obj.get("params").cloned().unwrap_or(Value::Null);
                self.call_for_owner(method, params, obj.get("id").cloned(), session, answers, out);
            }
            return;
        }
        let Some(id) = obj.get("id").and_then(Value::as_u64) else {
            tracing::warn!("skipping a message from Moonraker that is neither a call nor an answer: {msg}");
            return;
        };
        let Some(what) = pending.remove(&id) else {
            tracing::warn!("skipping an answer from Moonraker to unknown request {id}");
            return;
        };
        let result = match (obj.get("result"), obj.get("error")) {
            (Some(r), _) => Ok(r.clone()),
            (None, Some(e)) => Err((
                e.get("code").and_then(Value::as_i64).unwrap_or(0),
                e.get("message").and_then(Value::as_str).unwrap_or("no message").to_string(),
            )),
            (None, None) => Err((0, format!("malformed answer {msg}"))),
        };
        match what {
            Pending::Owner(method, reply) => {
                let _ = reply.send(result.map_err(|(code, message)| LinkError::Refused { method, code, message }));
            }
            Pending::Identify => match result {
                Ok(r) => {
                    let connection_id = r.get("connection_id").and_then(Value::as_i64);
                    tracing::info!("identified to Moonraker as agent {}", self.config.client_name);
                    self.setup = Some((connection_id, self.config.remote_methods.len() + 1));
                    for m in self.config.remote_methods.clone() {
                        let params = json!({ "method_name": m });
                        out.push(request(
                            next_id,
                            pending,
                            "connection.register_remote_method",
                            params,
                            Pending::Register(m),
                        ));
                    }
                    out.push(request(next_id, pending, "server.info", json!({}), Pending::ServerInfo));
                }
                Err((_, message)) => {
                    tracing::error!("Moonraker refused kflash as an agent: {message}");
                    self.event(LinkEvent::Problem(format!("Moonraker refused kflash as an agent: {message}")));
                }
            },
            Pending::Register(m) => {
                if let Err((_, message)) = result {
                    tracing::warn!("Moonraker refused remote method {m}: {message}");
                    self.event(LinkEvent::Problem(format!("Moonraker refused remote method {m}: {message}")));
                }
                self.setup_step();
            }
            Pending::Refresh(reply) => {
                let _ = reply.send(match result {
                    Ok(info) => {
                        let state = info.get("klippy_state").and_then(Value::as_str).unwrap_or("");
                        let state = KlippyState::from_server_info(state);
                        self.klippy_state(state);
                        Ok(state)
                    }
                    Err((code, message)) => Err(LinkError::Refused { method: "server.info".into(), code, message }),
                });
            }
            Pending::ServerInfo => {
                match result {
                    Ok(info) => {
                        let state = info.get("klippy_state").and_then(Value::as_str).unwrap_or("");
                        self.klippy_state(KlippyState::from_server_info(state));
                    }
                    Err((_, message)) => tracing::warn!("Moonraker's server.info failed: {message}"),
                }
                self.setup_step();
            }
        }
    }

    /// One set-up answer in; the last one makes the connection count as connected.
    fn setup_step(&mut self) {
        if let Some((id, left)) = self.setup.as_mut() {
            *left -= 1;
            if *left == 0 {
                let connection_id = *id;
                self.setup = None;
                self.event(LinkEvent::Connected { connection_id });
            }
        }
    }

    fn klippy_state(&self, state: KlippyState) {
        if self.klippy.send_replace(state) != state {
            self.event(LinkEvent::Klippy(state));
        } else if state == KlippyState::Ready {
            // Ready again after a restart Moonraker reported as ready both times.
            self.event(LinkEvent::Klippy(state));
        }
    }

    fn call_for_owner(
        &self,
        method: &str,
        params: Value,
        id: Option<Value>,
        session: u64,
        answers: &mpsc::UnboundedSender<Answer>,
        out: &mut Vec<Value>,
    ) {
        let source = if id.is_some() { CallSource::ExtensionRequest } else { CallSource::KlipperMacro };
        let call = MethodCall {
            method: method.to_string(),
            params,
            source,
            reply: id.map(|id| (session, id, answers.clone())),
        };
        if let Err(e) = self.calls.try_send(call) {
            // Answered here, at once, rather than through the dropped call's channel.
            let mut call = e.into_inner();
            tracing::warn!("call to {} refused: the owner is not taking calls", call.method);
            if let Some((_, id, _)) = call.reply.take() {
                out.push(json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32000, "message": "kflash is busy; try again"}}));
            }
        }
    }
}

fn request(
    next_id: &mut u64,
    pending: &mut HashMap<u64, Pending>,
    method: &str,
    params: Value,
    what: Pending,
) -> Value {
    let id = *next_id;
    *next_id += 1;
    pending.insert(id, what);
    json!({"jsonrpc": "2.0", "method": method, "params": params, "id": id})
}

fn fail_pending(pending: HashMap<u64, Pending>) {
    for (_, p) in pending {
        match p {
            Pending::Owner(_, reply) => drop(reply.send(Err(LinkError::Lost))),
            Pending::Refresh(reply) => drop(reply.send(Err(LinkError::Lost))),
            _ => {}
        }
    }
}
