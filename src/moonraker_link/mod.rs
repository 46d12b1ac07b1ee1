//! kflash's connection to Moonraker as an agent (Moonraker `docs/external_api/extensions.md`),
//! over Moonraker's Unix socket, which speaks the same JSON-RPC 2.0 as its websocket, frames
//! each message with ETX, and needs no authentication on the printer host.
//!
//! One task owns the connection; [`spawn`] returns a [`LinkHandle`] (requests: agent events,
//! G-code, any JSON-RPC method), a [`LinkInbox`] (what Moonraker pushes: Klippy's state and
//! connection changes, and method calls for the owner to answer) and a [`LinkTask`] (stop
//! it). The task identifies as agent `kflash`, registers the owner's remote methods, asks
//! Klippy's state once, and then only reacts to what arrives. When Moonraker goes away it
//! waits for the socket to be created again (inotify) and reconnects: no timers while idle.

mod codec;
mod session;
mod socket_watch;
mod types;

#[cfg(test)]
mod link_tests;

use std::path::PathBuf;

use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, watch};

pub use codec::{encode, FrameDecoder, FrameError, ETX, MAX_FRAME};
pub use socket_watch::SocketWatch;
pub use types::{BoardEvent, CallError, CallSource, KlippyState, LinkError, LinkEvent, MethodCall};

/// The agent's name in Moonraker (`/server/extensions/list`, `server.extensions.request`'s `agent`).
pub const AGENT_NAME: &str = "kflash";

#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// `<printer_data>/comms/moonraker.sock` ([`crate::registry::Settings::moonraker_socket`]).
    pub socket: PathBuf,
    /// Remote methods to register with Klipper, callable from `printer.cfg` macros with
    /// `action_call_remote_method` (e.g. `kflash_status`). Calls arrive on [`LinkInbox::calls`].
    pub remote_methods: Vec<String>,
    pub client_name: String,
    pub version: String,
    pub url: String,
}

impl LinkConfig {
    pub fn new(socket: PathBuf, remote_methods: &[&str]) -> LinkConfig {
        LinkConfig {
            socket,
            remote_methods: remote_methods.iter().map(|m| m.to_string()).collect(),
            client_name: AGENT_NAME.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            url: env!("CARGO_PKG_HOMEPAGE").into(),
        }
    }
}

pub(crate) enum Command {
    Call { method: String, params: Value, reply: oneshot::Sender<Result<Value, LinkError>> },
    RefreshKlippy { reply: oneshot::Sender<Result<KlippyState, LinkError>> },
}

/// Requests over the link. Cheap to clone. Every request fails at once with
/// [`LinkError::NotConnected`] while Moonraker is away (nothing is queued for later); put
/// a deadline on the future (`tokio::time::timeout`) where an answer is needed in time.
#[derive(Clone)]
pub struct LinkHandle {
    commands: mpsc::Sender<Command>,
    klippy: watch::Receiver<KlippyState>,
}

impl LinkHandle {
    /// Any JSON-RPC method of Moonraker's; returns its `result`.
    pub async fn call(&self, method: &str, params: Value) -> Result<Value, LinkError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Call { method: method.to_string(), params, reply })
            .await
            .map_err(|_| LinkError::Stopped)?;
        answer.await.unwrap_or(Err(LinkError::Stopped))
    }

    /// `connection.send_event`: every other Moonraker client gets `notify_agent_event`.
    pub async fn send_event(&self, event: &BoardEvent) -> Result<(), LinkError> {
        let data = serde_json::to_value(event).unwrap_or(Value::Null);
        self.call("connection.send_event", json!({"event": event.name(), "data": data})).await.map(drop)
    }

    /// `printer.gcode.script`: run G-code in Klippy (answers when it has run).
    pub async fn gcode_script(&self, script: &str) -> Result<(), LinkError> {
        self.call("printer.gcode.script", json!({ "script": script })).await.map(drop)
    }

    /// Show `text` in the printer's console (Mainsail/Fluidd) with Klipper's `RESPOND`,
    /// one `RESPOND` per line. Needs a `[respond]` section in printer.cfg; without it
    /// Klippy refuses the unknown command and this returns [`LinkError::Refused`].
    pub async fn respond(&self, text: &str) -> Result<(), LinkError> {
        self.gcode_script(&respond_script(text)).await
    }

    /// Ask Moonraker for Klippy's state now (`server.info`) and publish it like a push.
    ///
    /// Needed because Moonraker 0.11.0 pushes only some changes: `notify_klippy_ready`,
    /// `notify_klippy_disconnected`, and `notify_klippy_shutdown` only when Klippy shuts
    /// down while Moonraker watches. A Klippy that (re)starts straight into `shutdown` or
    /// `error` (a config error, an MCU it cannot talk to) is not pushed at all. Call this
    /// on the owner's own events (a board appeared, before acting), not on a timer.
    pub async fn refresh_klippy(&self) -> Result<KlippyState, LinkError> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(Command::RefreshKlippy { reply }).await.map_err(|_| LinkError::Stopped)?;
        answer.await.unwrap_or(Err(LinkError::Stopped))
    }

    /// Klippy's state now; `changed()` on a clone waits for the next push.
    pub fn klippy(&self) -> watch::Receiver<KlippyState> {
        self.klippy.clone()
    }
}

/// `RESPOND MSG="…"` lines for `text`. Klipper splits extended G-code parameters like a
/// shell (`shlex`), so the message is double-quoted with `"` and `\` escaped. Klipper cuts
/// a line at `;` (a comment) before parsing, quotes or not, so `;` becomes `,`.
pub fn respond_script(text: &str) -> String {
    text.lines()
        .map(|line| {
            let clean: String = line
                .chars()
                .map(|c| match c {
                    ';' => ',',
                    c if c.is_control() => ' ',
                    c => c,
                })
                .collect();
            format!("RESPOND MSG=\"{}\"", clean.replace('\\', "\\\\").replace('"', "\\\""))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// What Moonraker pushes, for the owner to read.
pub struct LinkInbox {
    /// Connection changes and Klippy state changes, in order.
    pub events: mpsc::Receiver<LinkEvent>,
    /// Remote-method calls (from macros) and extension requests (from front ends).
    pub calls: mpsc::Receiver<MethodCall>,
    /// Klippy's state, [`KlippyState::Unknown`] while Moonraker is away.
    pub klippy: watch::Receiver<KlippyState>,
}

/// The running task; [`LinkTask::shutdown`] stops it (so does dropping it).
pub struct LinkTask {
    stop: watch::Sender<bool>,
    join: tokio::task::JoinHandle<()>,
}

impl LinkTask {
    /// Stop: close the connection and end the task.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.join.await;
    }
}

/// Start the link on the current tokio runtime. It connects when the socket is there and
/// keeps reconnecting for as long as it runs; Moonraker being away is not an error.
pub fn spawn(config: LinkConfig) -> (LinkHandle, LinkInbox, LinkTask) {
    let (commands_tx, commands_rx) = mpsc::channel(32);
    let (events_tx, events_rx) = mpsc::channel(256);
    let (calls_tx, calls_rx) = mpsc::channel(64);
    let (klippy_tx, klippy_rx) = watch::channel(KlippyState::Unknown);
    let (stop_tx, stop_rx) = watch::channel(false);
    let link = session::Link {
        config,
        commands: commands_rx,
        events: events_tx,
        calls: calls_tx,
        klippy: klippy_tx,
        setup: None,
        commands_open: true,
    };
    let join = tokio::spawn(link.run(stop_rx));
    (
        LinkHandle { commands: commands_tx, klippy: klippy_rx.clone() },
        LinkInbox { events: events_rx, calls: calls_rx, klippy: klippy_rx },
        LinkTask { stop: stop_tx, join },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn respond_quotes_each_line() {
        assert_eq!(
            respond_script("kflash: 2 boards\nok \"x\" a\\b; #1"),
            "RESPOND MSG=\"kflash: 2 boards\"\nRESPOND MSG=\"ok \\\"x\\\" a\\\\b, #1\""
        );
    }

    #[test]
    fn board_events_serialize_with_their_kind() {
        let e = BoardEvent::StuckInBootloader { board: "octopus".into(), bootloader: "katapult".into() };
        assert_eq!(e.name(), "board_in_bootloader");
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            json!({"kind": "stuck_in_bootloader", "board": "octopus", "bootloader": "katapult"})
        );
    }
}
