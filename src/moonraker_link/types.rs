//! What the Moonraker link hands its owner and takes from it.

use serde::Serialize;
use serde_json::Value;
use tokio::sync::mpsc;

/// Klippy's state as Moonraker reports it: asked once per connection (`server.info`), then
/// kept current by Moonraker's pushes (`notify_klippy_ready`, `notify_klippy_shutdown`,
/// `notify_klippy_disconnected`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KlippyState {
    /// No connection to Moonraker, so nothing is known.
    Unknown,
    Disconnected,
    Startup,
    Ready,
    Shutdown,
    Error,
}

impl KlippyState {
    /// `server.info`'s `klippy_state`.
    pub fn from_server_info(state: &str) -> KlippyState {
        match state {
            "ready" => KlippyState::Ready,
            "startup" => KlippyState::Startup,
            "shutdown" => KlippyState::Shutdown,
            "error" => KlippyState::Error,
            "disconnected" => KlippyState::Disconnected,
            _ => KlippyState::Unknown,
        }
    }

    /// A push notification's method name.
    pub fn from_notification(method: &str) -> Option<KlippyState> {
        match method {
            "notify_klippy_ready" => Some(KlippyState::Ready),
            "notify_klippy_shutdown" => Some(KlippyState::Shutdown),
            "notify_klippy_disconnected" => Some(KlippyState::Disconnected),
            _ => None,
        }
    }
}

/// What happened on the link, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum LinkEvent {
    /// Identified as the `kflash` agent, remote methods registered (a refused one is
    /// reported as [`LinkEvent::Problem`] first) and Klippy's state known (its
    /// [`LinkEvent::Klippy`] comes first); `connection_id` is Moonraker's id for it.
    Connected { connection_id: Option<i64> },
    /// The connection is gone (Moonraker stopped or restarted); the link waits for the
    /// socket to come back.
    Disconnected { reason: String },
    /// Klippy's state changed (or was learnt on connecting).
    Klippy(KlippyState),
    /// Something Moonraker refused (identify, a method registration), with its message.
    Problem(String),
}

/// Where a call came from. Klipper's `action_call_remote_method` carries no id and takes no
/// answer; a front end's `server.extensions.request` does.
#[derive(Debug, Clone, PartialEq)]
pub enum CallSource {
    /// A `printer.cfg` macro through Klippy (`action_call_remote_method`): no answer possible.
    KlipperMacro,
    /// Relayed by Moonraker from a client (`/server/extensions/request`): answer expected.
    ExtensionRequest,
}

/// An error answer to a call, as JSON-RPC's `{code, message}`.
#[derive(Debug, Clone, PartialEq)]
pub struct CallError {
    pub code: i64,
    pub message: String,
}

impl CallError {
    /// A failure of the method itself (JSON-RPC's server-error range).
    pub fn failed(message: impl Into<String>) -> CallError {
        CallError { code: -32000, message: message.into() }
    }

    pub fn unknown_method(method: &str) -> CallError {
        CallError { code: -32601, message: format!("kflash has no method '{method}'") }
    }
}

pub(crate) struct Answer {
    pub session: u64,
    pub id: Value,
    pub result: Result<Value, CallError>,
}

/// A method call for the owner to carry out. Answer it with [`MethodCall::answer`]; a
/// call dropped unanswered gets an error answer so the caller never hangs.
#[derive(Debug)]
pub struct MethodCall {
    pub method: String,
    /// The arguments: an object (keyword arguments), an array, or `Null` when none came.
    pub params: Value,
    pub source: CallSource,
    pub(crate) reply: Option<(u64, Value, mpsc::UnboundedSender<Answer>)>,
}

impl MethodCall {
    /// Send the answer (nothing is sent for a macro's call, which takes none). A `Null`
    /// result is sent as `"ok"`, because Moonraker takes a null result for an error.
    pub fn answer(mut self, result: Result<Value, CallError>) {
        if let Some((session, id, tx)) = self.reply.take() {
            let result = result.map(|v| if v.is_null() { Value::from("ok") } else { v });
            let _ = tx.send(Answer { session, id, result });
        }
    }

    pub fn expects_answer(&self) -> bool {
        self.reply.is_some()
    }
}

impl Drop for MethodCall {
    fn drop(&mut self) {
        if let Some((session, id, tx)) = self.reply.take() {
            let _ = tx.send(Answer {
                session,
                id,
                result: Err(CallError::failed(format!("kflash dropped the call to {} without answering", self.method))),
            });
        }
    }
}

/// A board's state change, sent to every Moonraker client as an agent event
/// (`notify_agent_event` with `{"agent": "kflash", "event": <name>, "data": <this>}`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BoardEvent {
    /// The board runs another version than the host's Klipper tree.
    Outdated {
        board: String,
        host_version: String,
        board_version: String,
        /// Commits between them, when both are on one history.
        #[serde(skip_serializing_if = "Option::is_none")]
        commits_apart: Option<u64>,
    },
    /// The board sits in its bootloader (`katapult` or a ROM bootloader such as `dfu`).
    StuckInBootloader { board: String, bootloader: String },
    /// The board was flashed and now runs `version`.
    Flashed { board: String, version: String },
}

impl BoardEvent {
    /// The event's name in Moonraker's notification.
    pub fn name(&self) -> &'static str {
        match self {
            BoardEvent::Outdated { .. } => "board_outdated",
            BoardEvent::StuckInBootloader { .. } => "board_in_bootloader",
            BoardEvent::Flashed { .. } => "board_flashed",
        }
    }
}

/// Why a request over the link failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LinkError {
    #[error("not connected to Moonraker (its socket is not there or refuses); kflash keeps trying when it appears")]
    NotConnected,
    #[error("the connection to Moonraker closed before it answered")]
    Lost,
    #[error("Moonraker refused {method}: {message} (code {code})")]
    Refused { method: String, code: i64, message: String },
    #[error("the Moonraker link has stopped")]
    Stopped,
}
