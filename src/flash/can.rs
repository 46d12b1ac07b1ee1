//! Flashing a node on a CAN bus, step by step as the orchestrator asks (the USB steps are in
//! [`super::usb`]): request the bootloader by UUID and await Katapult's answer to a query;
//! write through Katapult over CAN (GET_CANBUS_ID first, then the same checks and read-back as
//! over USB); await the node back in Klipper, noticing a node that came back under another
//! UUID; identify it. Every wait is a deadline on the socket's frames.

use std::time::Duration;

use tokio::time::Instant;

use super::katapult::{Expectation, FlashReport, KatapultSession, Policy};
use super::FlashError;
use crate::can::link::{
    await_app_watching, identify_klipper_node, open_katapult, request_bootloader, CanLink, Sightings,
};
use crate::can::socket::SocketCan;
use crate::can::{AdminReply, CanApp, CanError, CanUuid, NodeId};
use crate::error::{Error, Result};
use crate::event::Progress;
use crate::protocol::klipper::DataDictionary;

/// How often a waiting host asks the bus who is unassigned.
pub const QUERY_EVERY: Duration = Duration::from_millis(250);

/// The Klipper node id kflash gives a node to identify it while Klippy is stopped: far above
/// the ids Klippy hands out (4, 5, … in printer.cfg order), below Katapult's 128.
pub const IDENTIFY_NODE: NodeId = NodeId(127);

/// Query rounds a newcomer must be seen, with our UUID silent, before it counts as our node
/// under a new UUID.
const NEWCOMER_ROUNDS: u32 = 3;

/// A node on a bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanTarget {
    pub interface: String,
    pub uuid: CanUuid,
}

impl CanTarget {
    /// How the events name it where a USB board has a device node.
    pub fn describe(&self) -> String {
        format!("{} uuid {}", self.interface, self.uuid)
    }

    fn open(&self) -> Result<SocketCan> {
        SocketCan::open(&self.interface).map_err(|e| self.io(e))
    }

    fn io(&self, e: impl std::fmt::Display) -> Error {
        CanError::Io { interface: self.interface.clone(), message: e.to_string() }.into()
    }
}

fn others(s: &Sightings) -> Vec<String> {
    s.others.iter().map(|r| format!("{} {}", r.uuid, r.app.name())).collect()
}

/// Ask the node for its bootloader and await Katapult's answer. A node already waiting in
/// Katapult (an interrupted flash) answers at once. Returns the other nodes seen, so a node
/// that later turns up under a new UUID can be told from them.
pub async fn enter_bootloader(t: &CanTarget, deadline: Instant) -> Result<Vec<AdminReply>> {
    let started = Instant::now();
    let mut socket = t.open()?;
    request_bootloader(&mut socket, t.uuid).await.map_err(|e| t.io(e))?;
    let (reached, seen) = await_app_watching(&mut socket, t.uuid, CanApp::Katapult, QUERY_EVERY, deadline, |_| false)
        .await
        .map_err(|e| t.io(e))?;
    if reached {
        return Ok(seen.others);
    }
    Err(CanError::NeverKatapult {
        uuid: t.uuid,
        interface: t.interface.clone(),
        secs: started.elapsed().as_secs_f64(),
        seen: seen.ours,
        others: others(&seen),
    }
    .into())
}

/// Write `image` into the node waiting in Katapult: give it flashtool's node id, check it is
/// the node meant (GET_CANBUS_ID), then Katapult's own checks, write, read back, COMPLETE.
pub async fn write(
    t: &CanTarget,
    image: &[u8],
    expect: &Expectation,
    progress: &mut dyn Progress,
) -> Result<FlashReport> {
    let socket = t.open()?;
    let link = open_katapult(socket, t.uuid, NodeId::KATAPULT_FLASH).await.map_err(|e| t.io(e))?;
    let mut session = KatapultSession::new(link, Policy::default());
    let lost = |session: &KatapultSession<CanLink<SocketCan>>, e: FlashError| -> Error {
        let (during, detail) = match &e {
            FlashError::NoResponse { command, last, .. } => (command.to_string(), format!("no answer ({last})")),
            FlashError::DeviceGone(command) => (command.to_string(), "the CAN socket failed".to_string()),
            _ => return e.into(),
        };
        let detail = match session.link().last_error() {
            Some(why) => format!("{detail}; {why}"),
            None => detail,
        };
        CanError::LostMidWrite { uuid: t.uuid, interface: t.interface.clone(), during, detail }.into()
    };
    let reported = match session.canbus_id().await {
        Ok(r) => r,
        Err(e) => return Err(lost(&session, e)),
    };
    if reported != t.uuid {
        return Err(CanError::WrongNode { uuid: t.uuid, reported, interface: t.interface.clone() }.into());
    }
    match session.flash(image, expect, progress).await {
        Ok(report) => Ok(report),
        Err(e) => Err(lost(&session, e)),
    }
}

/// After a refusal: start the installed application again (CONNECT, COMPLETE) and await it.
pub async fn send_to_application(t: &CanTarget, deadline: Instant) -> Result<()> {
    let socket = t.open()?;
    let link = open_katapult(socket, t.uuid, NodeId::KATAPULT_FLASH).await.map_err(|e| t.io(e))?;
    let mut session = KatapultSession::new(link, Policy::default());
    session.start_application().await?;
    await_application(t, &[], deadline).await
}

/// Await the node back running Klipper. `known` are the nodes seen before the flash; one that
/// was not, answering as Klipper while our UUID stays silent, is our node under a new UUID.
pub async fn await_application(t: &CanTarget, known: &[AdminReply], deadline: Instant) -> Result<()> {
    let started = Instant::now();
    let mut socket = t.open()?;
    let newcomer = |s: &Sightings| -> Option<CanUuid> {
        s.others.iter().find(|o| o.app == CanApp::Klipper && !known.iter().any(|k| k.uuid == o.uuid)).map(|o| o.uuid)
    };
    let mut first_seen: Option<u32> = None;
    let (reached, seen) = await_app_watching(&mut socket, t.uuid, CanApp::Klipper, QUERY_EVERY, deadline, |s| {
        // Ours answering as Klipper ends the wait before this is asked.
        match (newcomer(s), first_seen) {
            (Some(_), None) => {
                first_seen = Some(s.rounds);
                false
            }
            (Some(_), Some(at)) => s.rounds - at + 1 >= NEWCOMER_ROUNDS,
            (None, _) => false,
        }
    })
    .await
    .map_err(|e| t.io(e))?;
    if reached {
        return Ok(());
    }
    if let Some(new) = newcomer(&seen) {
        return Err(CanError::UuidChanged { old: t.uuid, new, interface: t.interface.clone() }.into());
    }
    Err(CanError::NotBack {
        uuid: t.uuid,
        interface: t.interface.clone(),
        secs: started.elapsed().as_secs_f64(),
        seen: seen.ours,
        others: others(&seen),
    }
    .into())
}

/// Identify the node running Klipper (Klippy is stopped, so kflash may give it a node id).
pub async fn identify(t: &CanTarget, deadline: Instant) -> Result<DataDictionary> {
    let socket = t.open()?;
    Ok(identify_klipper_node(socket, t.uuid, IDENTIFY_NODE, deadline).await?)
}
