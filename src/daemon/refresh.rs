//! Asking Moonraker about Klippy after a board appears, coalesced: at most one question in
//! flight and one more wanted. A task per appearance waited for its answer without bound, so
//! a flapping board and a slow or hung Moonraker grew the daemon's memory (found by the
//! soak's live-heap figure); the answer is only ever "Klippy's state now", so one question
//! after the last appearance says all the others would have.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::moonraker_link::LinkHandle;

/// How long one question may wait for Moonraker's answer.
pub const DEADLINE: Duration = Duration::from_secs(10);

#[derive(Clone, Default)]
pub struct KlippyRefresh {
    wanted: Arc<Notify>,
}

impl KlippyRefresh {
    /// Ask (again) once the question in flight, if any, is answered.
    pub fn want(&self) {
        // Notify keeps one permit: any number of wants between two questions are one.
        self.wanted.notify_one();
    }

    /// The asking task: runs until aborted (with the daemon). The answer is published by
    /// the link like a push.
    pub async fn ask_over(self, link: LinkHandle) {
        loop {
            self.wanted.notified().await;
            match tokio::time::timeout(DEADLINE, link.refresh_klippy()).await {
                Ok(Ok(state)) => tracing::debug!(?state, "Klippy's state asked after a board appeared"),
                Ok(Err(e)) => tracing::debug!("Klippy's state not asked: {e}"),
                Err(_) => tracing::debug!("Moonraker did not answer about Klippy within {} s", DEADLINE.as_secs()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn many_wants_are_one_question() {
        let r = KlippyRefresh::default();
        for _ in 0..1000 {
            r.want();
        }
        r.wanted.notified().await;
        let again = tokio::time::timeout(Duration::from_millis(50), r.wanted.notified()).await;
        assert!(again.is_err(), "a second question was wanted");
        r.want();
        tokio::time::timeout(Duration::from_secs(1), r.wanted.notified()).await.expect("a want after a question");
    }
}
