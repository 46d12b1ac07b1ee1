//! Read what a board is running, the way Klipper's host does: the `identify` exchange over
//! its tty (or a CAN node's stream), yielding the firmware's data dictionary (version, app, MCU).

use std::path::Path;
use std::time::Duration;

use tokio::time::Instant;

use super::error::FlashError;
use super::katapult::Link;
use super::serial::Tty;
use crate::protocol::klipper::{DataDictionary, IdentifyClient, IdentifyProgress};

/// How long one identify request may go unanswered before it is sent again.
const RETRANSMIT_AFTER: Duration = Duration::from_millis(500);

pub async fn read_identify(path: &Path, deadline: Instant) -> Result<DataDictionary, FlashError> {
    let io = |e: std::io::Error| FlashError::Io { path: path.display().to_string(), message: e.to_string() };
    let mut tty = Tty::open(path).map_err(io)?;
    identify_over(&mut tty, &path.display().to_string(), deadline).await
}

/// The identify exchange over any byte link (a tty, or a CAN node's stream); `what` names
/// the board in errors.
pub async fn identify_over<L: Link>(link: &mut L, what: &str, deadline: Instant) -> Result<DataDictionary, FlashError> {
    let io = |e: std::io::Error| FlashError::Io { path: what.to_string(), message: e.to_string() };
    let proto = |e: crate::protocol::klipper::KlipperError| FlashError::Identify(e.to_string());
    let mut client = IdentifyClient::new();
    link.send(&client.start()).await.map_err(io)?;
    let mut buf = [0u8; 256];
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(FlashError::Identify(format!("no complete answer from {what} before the deadline")));
        }
        let n = link.recv(&mut buf, deadline.min(now + RETRANSMIT_AFTER)).await.map_err(io)?;
        if n == 0 {
            let again = client.on_timeout().map_err(proto)?;
            link.send(&again).await.map_err(io)?;
            continue;
        }
        match client.feed(&buf[..n]).map_err(proto)? {
            IdentifyProgress::Send(bytes) => link.send(&bytes).await.map_err(io)?,
            IdentifyProgress::Pending => {}
            IdentifyProgress::Done(dict) => return Ok(dict),
        }
    }
}
