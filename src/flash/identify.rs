//! Read what a board is running, the way Klipper's host does: the `identify` exchange over
//! its tty, yielding the firmware's data dictionary (version, app, MCU).

use std::path::Path;
use std::time::Duration;

use tokio::time::Instant;

use super::error::FlashError;
use super::serial::Tty;
use crate::protocol::klipper::{DataDictionary, IdentifyClient, IdentifyProgress};

/// How long one identify request may go unanswered before it is sent again.
const RETRANSMIT_AFTER: Duration = Duration::from_millis(500);

pub async fn read_identify(path: &Path, deadline: Instant) -> Result<DataDictionary, FlashError> {
    let io = |e: std::io::Error| FlashError::Io { path: path.display().to_string(), message: e.to_string() };
    let proto = |e: crate::protocol::klipper::KlipperError| FlashError::Identify(e.to_string());
    let tty = Tty::open(path).map_err(io)?;
    let mut client = IdentifyClient::new();
    tty.write_all(&client.start()).await.map_err(io)?;
    let mut buf = [0u8; 256];
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(FlashError::Identify(format!(
                "no complete answer from {} before the deadline",
                path.display()
            )));
        }
        let n = tty.read(&mut buf, deadline.min(now + RETRANSMIT_AFTER)).await.map_err(io)?;
        if n == 0 {
            let again = client.on_timeout().map_err(proto)?;
            tty.write_all(&again).await.map_err(io)?;
            continue;
        }
        match client.feed(&buf[..n]).map_err(proto)? {
            IdentifyProgress::Send(bytes) => tty.write_all(&bytes).await.map_err(io)?,
            IdentifyProgress::Pending => {}
            IdentifyProgress::Done(dict) => return Ok(dict),
        }
    }
}
