//! Agent events on their way to Moonraker, at most one waiting per board: the newest.
//!
//! Front ends want each board's latest state, and Moonraker may be slow (a Pi under load) or
//! stopped with its connection still open (SIGSTOP, a hung Python). Sending each event from a
//! task of its own made a task per board event wait there without bound: a flapping board and
//! a hung Moonraker grew the daemon's memory for as long as it lasted (found by the soak's
//! live-heap figure). Here one sender takes the waiting events when woken, sends them one at
//! a time, each with a deadline, and a newer event for a board replaces the one waiting.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::moonraker_link::{BoardEvent, LinkHandle};

/// How long one event may wait for Moonraker's answer before it is given up.
pub const SEND_DEADLINE: Duration = Duration::from_secs(10);

/// The waiting events, by board (sans-IO: push and take).
#[derive(Debug, Default)]
pub struct Pending {
    by_board: BTreeMap<String, BoardEvent>,
    /// Events replaced by a newer one before they were sent.
    pub superseded: u64,
}

impl Pending {
    pub fn push(&mut self, event: BoardEvent) {
        if self.by_board.insert(board_of(&event).to_string(), event).is_some() {
            self.superseded += 1;
        }
    }

    pub fn take(&mut self) -> Vec<BoardEvent> {
        std::mem::take(&mut self.by_board).into_values().collect()
    }

    pub fn len(&self) -> usize {
        self.by_board.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_board.is_empty()
    }
}

fn board_of(event: &BoardEvent) -> &str {
    match event {
        BoardEvent::Outdated { board, .. }
        | BoardEvent::StuckInBootloader { board, .. }
        | BoardEvent::Flashed { board, .. } => board,
    }
}

/// The daemon's side: push events; the sender task sends them.
#[derive(Clone, Default)]
pub struct Outbox {
    pending: Arc<Mutex<Pending>>,
    wake: Arc<Notify>,
}

impl Outbox {
    pub fn push(&self, event: BoardEvent) {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).push(event);
        // A permit is kept when the sender is busy: nothing pushed is left unsent.
        self.wake.notify_one();
    }

    fn take(&self) -> Vec<BoardEvent> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// The sender: runs until aborted (with the daemon).
    pub async fn send_over(self, link: LinkHandle) {
        loop {
            self.wake.notified().await;
            for event in self.take() {
                match tokio::time::timeout(SEND_DEADLINE, link.send_event(&event)).await {
                    Ok(Ok(())) => tracing::debug!("agent event {} sent: {event:?}", event.name()),
                    Ok(Err(e)) => tracing::debug!("agent event {} not sent: {e}", event.name()),
                    Err(_) => tracing::debug!(
                        "agent event {} not sent: Moonraker did not answer within {} s",
                        event.name(),
                        SEND_DEADLINE.as_secs()
                    ),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outdated(board: &str, version: &str) -> BoardEvent {
        BoardEvent::Outdated {
            board: board.into(),
            host_version: "v0.13.0".into(),
            board_version: version.into(),
            commits_apart: None,
        }
    }

    #[test]
    fn a_board_has_at_most_its_newest_event_waiting() {
        let mut p = Pending::default();
        for i in 0..1000 {
            p.push(outdated("ebb", &format!("v0.12.0-{i}")));
            p.push(BoardEvent::StuckInBootloader { board: "octopus".into(), bootloader: "katapult".into() });
        }
        assert_eq!((p.len(), p.superseded), (2, 1998));
        let sent = p.take();
        assert_eq!(sent[0], outdated("ebb", "v0.12.0-999"));
        assert!(p.is_empty());
        p.push(outdated("ebb", "v0.12.0-1000"));
        assert_eq!(p.take(), [outdated("ebb", "v0.12.0-1000")]);
    }

    #[tokio::test]
    async fn a_push_while_the_sender_is_busy_is_not_lost() {
        let outbox = Outbox::default();
        outbox.push(outdated("ebb", "a"));
        // The sender's first wait returns at once (the permit), and takes the event.
        outbox.wake.notified().await;
        assert_eq!(outbox.take().len(), 1);
        outbox.push(outdated("ebb", "b"));
        tokio::time::timeout(Duration::from_secs(1), outbox.wake.notified()).await.expect("woken");
        assert_eq!(outbox.take(), [outdated("ebb", "b")]);
    }
}
