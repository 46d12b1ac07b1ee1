//! Device discovery, owned by one module: a source (udev, or a script in tests) feeds a
//! [`Snapshot`]; [`Hotplug`] offers the current boards, a stream of board events, and
//! [`Hotplug::wait_for`] — a future that resolves the moment a matching board is present.
//! Nothing here sleeps or polls: every wait is an event or a deadline.

mod snapshot;
mod source;
mod udev_source;

use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, oneshot};
use tokio::time::Instant;

pub use snapshot::{Action, Board, BoardEvent, KeyResolver, Snapshot};
pub use source::{DeviceSource, RescanRequest, Script, ScriptedSource, Sink, SourceMessage};
pub use udev_source::UdevSource;

use crate::error::{Error, Result};

/// Events buffered per subscriber before it is told it lagged.
const EVENT_BUFFER: usize = 1024;

struct Shared {
    snapshot: Snapshot,
    /// `None` once the source has ended; subscribers then see the stream close.
    events: Option<broadcast::Sender<BoardEvent>>,
    failure: Option<String>,
}

impl Shared {
    /// A receiver of every later event; `None` once the source has ended.
    fn listen(&self) -> Option<broadcast::Receiver<BoardEvent>> {
        self.events.as_ref().map(|tx| tx.subscribe())
    }

    fn armed(&self) -> Armed {
        self.listen().map_or(Armed::Ended, Armed::Listening)
    }
}

/// The shared state, also after a panic elsewhere while it was held: every change to it is
/// complete before anything that could panic runs (the resolver is guarded on its own).
fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A receiver that reports the stream closed at once, for a source that has ended.
fn closed() -> broadcast::Receiver<BoardEvent> {
    broadcast::channel(1).1
}

/// A running discovery service. Dropping it stops the source.
pub struct Hotplug {
    shared: Arc<Mutex<Shared>>,
    /// Dropping it tells the source to stop.
    rescan: tokio::sync::mpsc::UnboundedSender<RescanRequest>,
}

impl Hotplug {
    /// Start `source` and wait for its initial enumeration; from then on the source applies
    /// its events on its own thread as they come.
    pub async fn start(source: impl DeviceSource, resolve: KeyResolver) -> Result<Hotplug> {
        let (tx, _) = broadcast::channel(EVENT_BUFFER);
        let shared = Arc::new(Mutex::new(Shared { snapshot: Snapshot::new(resolve), events: Some(tx), failure: None }));
        let (first_tx, first_rx) = oneshot::channel();
        let rescan = source.start(Apply { shared: shared.clone(), first: Some(first_tx) })?;
        match first_rx.await {
            Ok(Ok(())) => Ok(Hotplug { shared, rescan }),
            Ok(Err(why)) => Err(Error::Udev(why)),
            Err(_) => Err(Error::Udev("device source ended before enumerating".into())),
        }
    }

    /// Start on the real udev monitor.
    pub async fn start_udev(resolve: KeyResolver) -> Result<Hotplug> {
        Hotplug::start(UdevSource::new(), resolve).await
    }

    /// The boards present now.
    pub fn snapshot(&self) -> Vec<Board> {
        lock(&self.shared).snapshot.boards().cloned().collect()
    }

    /// Every board event from now on. The stream ends if the source dies.
    pub fn subscribe(&self) -> broadcast::Receiver<BoardEvent> {
        lock(&self.shared).listen().unwrap_or_else(closed)
    }

    /// The boards present now and every event after that moment, taken atomically: a board
    /// is either in the list or arrives as an event, never neither nor both.
    pub fn subscribe_with_snapshot(&self) -> (Vec<Board>, broadcast::Receiver<BoardEvent>) {
        let s = lock(&self.shared);
        let boards = s.snapshot.boards().cloned().collect();
        (boards, s.listen().unwrap_or_else(closed))
    }

    /// Why the source stopped, if it did.
    pub fn failure(&self) -> Option<String> {
        lock(&self.shared).failure.clone()
    }

    /// Resolve with the first board matching `matcher`: at once if one is present, else on
    /// the event that brings one. At `deadline` the source re-enumerates once (uevents can
    /// be dropped silently under load) before giving up with [`Error::Timeout`].
    pub async fn wait_for(&self, what: &str, matcher: impl Fn(&Board) -> bool, deadline: Instant) -> Result<Board> {
        self.arm(what, matcher).until(deadline).await
    }

    /// Start waiting *now*: look at the snapshot and subscribe, before the caller does what
    /// should make the board appear (a reboot request), so its event cannot be missed.
    pub fn arm<M: Fn(&Board) -> bool>(&self, what: &str, matcher: M) -> Waiter<'_, M> {
        // Look and subscribe under one lock: the source applies and broadcasts under the
        // same lock, so no event can slip between the look and the subscription.
        let s = lock(&self.shared);
        let state = match s.snapshot.find(&matcher) {
            Some(b) => Armed::Found(Box::new(b)),
            None => s.armed(),
        };
        Waiter { hotplug: self, what: what.to_string(), matcher, state, armed_at: Instant::now(), events_only: false }
    }

    /// Like [`Hotplug::arm`], but only a future event counts, not what is present now: for
    /// "the board re-enumerates" while the old device is still listed.
    pub fn arm_next<M: Fn(&Board) -> bool>(&self, what: &str, matcher: M) -> Waiter<'_, M> {
        let state = lock(&self.shared).armed();
        Waiter { hotplug: self, what: what.to_string(), matcher, state, armed_at: Instant::now(), events_only: true }
    }

    /// Resolve keys with `resolve` from now on (a reloaded registry), present boards included;
    /// boards whose key changed are sent as `Changed` events. The source keeps running.
    pub fn set_resolver(&self, resolve: KeyResolver) {
        let mut s = lock(&self.shared);
        let events = s.snapshot.set_resolver(resolve);
        if let Some(tx) = &s.events {
            for ev in events {
                let _ = tx.send(ev);
            }
        }
    }

    /// Ask the source for a fresh enumeration and wait until it is applied (bounded, in
    /// case the source is gone).
    pub async fn rescan_now(&self) {
        let (tx, rx) = oneshot::channel();
        if self.rescan.send(tx).is_ok() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), rx).await;
        }
    }

    fn ended(&self) -> Error {
        Error::Udev(self.failure().unwrap_or_else(|| "the device event stream ended".into()))
    }
}

enum Armed {
    Found(Box<Board>),
    Listening(broadcast::Receiver<BoardEvent>),
    Ended,
}

/// A wait armed by [`Hotplug::arm`].
pub struct Waiter<'a, M> {
    hotplug: &'a Hotplug,
    what: String,
    matcher: M,
    state: Armed,
    armed_at: Instant,
    /// Only events count; a rescan at the deadline cannot tell old from new.
    events_only: bool,
}

impl<M: Fn(&Board) -> bool> Waiter<'_, M> {
    /// The matching board, as soon as it is present; a timeout error at `deadline`.
    pub async fn until(self, deadline: Instant) -> Result<Board> {
        let Waiter { hotplug, what, matcher, state, armed_at, events_only } = self;
        let mut rx = match state {
            Armed::Found(b) => return Ok(*b),
            Armed::Ended => return Err(hotplug.ended()),
            Armed::Listening(rx) => rx,
        };
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Ok(ev)) if ev.action != Action::Removed && matcher(&ev.board) => return Ok(*ev.board),
                Ok(Ok(_)) => {}
                // Missed events: the snapshot has the truth, unless only new events count.
                Ok(Err(broadcast::error::RecvError::Lagged(_))) if !events_only => {
                    if let Some(b) = lock(&hotplug.shared).snapshot.find(&matcher) {
                        return Ok(b);
                    }
                }
                Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
                Ok(Err(broadcast::error::RecvError::Closed)) => return Err(hotplug.ended()),
                Err(_) => {
                    if !events_only {
                        hotplug.rescan_now().await;
                        if let Some(b) = lock(&hotplug.shared).snapshot.find(&matcher) {
                            tracing::warn!("{what} was found only by re-enumerating; a udev event was lost");
                            return Ok(b);
                        }
                    }
                    return Err(Error::Timeout { what, secs: (Instant::now() - armed_at).as_secs_f64() });
                }
            }
        }
    }
}

/// The source's sink: applies each message to the snapshot and broadcasts the board events,
/// under the lock [`Hotplug::arm`] looks and subscribes under. Dropped when the source ends,
/// which ends the event stream.
struct Apply {
    shared: Arc<Mutex<Shared>>,
    /// Told the outcome of the first message, which must be an enumeration.
    first: Option<oneshot::Sender<std::result::Result<(), String>>>,
}

impl Sink for Apply {
    fn deliver(&mut self, msg: SourceMessage) {
        if !matches!(msg, SourceMessage::Enumerated { .. } | SourceMessage::Failed(_)) {
            if let Some(first) = self.first.take() {
                let _ = first.send(Err(format!("device source began with {msg:?} instead of an enumeration")));
                lock(&self.shared).events = None;
                return;
            }
        }
        let mut s = lock(&self.shared);
        if s.events.is_none() {
            return;
        }
        let (events, ack) = match msg {
            SourceMessage::Enumerated { devices, ack } => (s.snapshot.reconcile(&devices), ack),
            SourceMessage::Added(rec) | SourceMessage::Changed(rec) => {
                (s.snapshot.upsert(&rec).into_iter().collect(), None)
            }
            SourceMessage::Removed { syspath } => (s.snapshot.remove(&syspath).into_iter().collect(), None),
            SourceMessage::Failed(why) => {
                tracing::error!("device source failed: {why}");
                s.failure = Some(why.clone());
                s.events = None;
                if let Some(first) = self.first.take() {
                    let _ = first.send(Err(why));
                }
                return;
            }
        };
        if let Some(tx) = &s.events {
            for ev in events {
                tracing::debug!(action = ev.action.as_str(), syspath = %ev.board.identity.syspath, "board event");
                let _ = tx.send(ev);
            }
        }
        drop(s);
        if let Some(first) = self.first.take() {
            let _ = first.send(Ok(()));
        }
        if let Some(a) = ack {
            let _ = a.send(());
        }
    }
}

impl Drop for Apply {
    fn drop(&mut self) {
        if let Ok(mut s) = self.shared.lock() {
            s.events = None;
        }
    }
}

#[cfg(test)]
mod tests;
