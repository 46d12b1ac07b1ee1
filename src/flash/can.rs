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
    await_app_watching, identify_klipper_node, open_katapult, request_bootloader, CanLink, FrameSocket, Sightings,
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

    /// A raw socket on the node's interface.
    pub fn open(&self) -> Result<SocketCan> {
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
pub async fn enter_bootloader<S: FrameSocket>(
    mut socket: S,
    t: &CanTarget,
    deadline: Instant,
) -> Result<Vec<AdminReply>> {
    let started = Instant::now();
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
pub async fn write<S: FrameSocket>(
    socket: S,
    t: &CanTarget,
    image: &[u8],
    expect: &Expectation,
    progress: &mut dyn Progress,
) -> Result<FlashReport> {
    let link = open_katapult(socket, t.uuid, NodeId::KATAPULT_FLASH).await.map_err(|e| t.io(e))?;
    let mut session = KatapultSession::new(link, Policy::default());
    let lost = |session: &KatapultSession<CanLink<S>>, e: FlashError| -> Error {
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
pub async fn send_to_application<S: FrameSocket>(socket: S, t: &CanTarget, deadline: Instant) -> Result<()> {
    let link = open_katapult(socket, t.uuid, NodeId::KATAPULT_FLASH).await.map_err(|e| t.io(e))?;
    let mut session = KatapultSession::new(link, Policy::default());
    session.start_application().await?;
    await_application(session.into_link().into_socket(), t, &[], deadline).await
}

/// Await the node back running Klipper. `known` are the nodes seen before the flash; one that
/// was not, answering as Klipper while our UUID stays silent, is our node under a new UUID.
pub async fn await_application<S: FrameSocket>(
    mut socket: S,
    t: &CanTarget,
    known: &[AdminReply],
    deadline: Instant,
) -> Result<()> {
    let started = Instant::now();
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
pub async fn identify<S: FrameSocket>(socket: S, t: &CanTarget, deadline: Instant) -> Result<DataDictionary> {
    Ok(identify_klipper_node(socket, t.uuid, IDENTIFY_NODE, deadline).await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::can::link::fake::FakeBus;
    use crate::can::{AdminCommand, CanFrame};

    const OURS: CanUuid = CanUuid([0x0a, 0x1b, 0x2c, 0x3d, 0x4e, 0x5f]);
    const NEW: CanUuid = CanUuid([0x11, 0x22, 0x33, 0x44, 0x55, 0x66]);
    const OTHER: CanUuid = CanUuid([0, 0, 0, 0, 0xbe, 0xef]);

    fn target() -> CanTarget {
        CanTarget { interface: "can0".into(), uuid: OURS }
    }

    /// A bus whose nodes answer every query with `answers`.
    fn bus(answers: Vec<AdminReply>) -> FakeBus<impl FnMut(&CanFrame) -> Vec<CanFrame>> {
        FakeBus::new(move |f: &CanFrame| match AdminCommand::from_frame(f) {
            Ok(AdminCommand::QueryUnassigned) => answers.iter().map(|r| r.to_frame()).collect(),
            _ => vec![],
        })
    }

    fn reply(uuid: CanUuid, app: CanApp) -> AdminReply {
        AdminReply { uuid, app }
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_back_under_a_new_uuid_is_named_without_waiting_out_the_deadline() {
        let t0 = Instant::now();
        // OTHER was there before the flash; NEW was not.
        let known = [reply(OTHER, CanApp::Klipper)];
        let b = bus(vec![reply(OTHER, CanApp::Klipper), reply(NEW, CanApp::Klipper)]);
        let err = await_application(b, &target(), &known, t0 + Duration::from_secs(30)).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "CAN node 0a1b2c3d4e5f came back running Klipper under a new UUID: 112233445566 (on can0)"
        );
        assert!(err.help().unwrap().contains("kflash set KEY --canbus-uuid 112233445566"));
        assert_eq!(Instant::now() - t0, QUERY_EVERY * NEWCOMER_ROUNDS, "decided after a few rounds");
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_that_does_not_come_back_is_not_mistaken_for_a_known_one() {
        let t0 = Instant::now();
        let known = [reply(OTHER, CanApp::Klipper)];
        let b = bus(vec![reply(OTHER, CanApp::Klipper)]);
        let err = await_application(b, &target(), &known, t0 + Duration::from_secs(3)).await.unwrap_err();
        assert!(
            err.to_string().starts_with("CAN node 0a1b2c3d4e5f on can0 did not come back running Klipper"),
            "{err}"
        );
        assert_eq!(Instant::now() - t0, Duration::from_secs(3));
        // Ours answering is the end of the wait, whoever else answers.
        let b = bus(vec![reply(NEW, CanApp::Klipper), reply(OURS, CanApp::Klipper)]);
        await_application(b, &target(), &[], Instant::now() + Duration::from_secs(3)).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_node_among_answering_ones_is_said_to_collide() {
        let b = bus(vec![reply(OTHER, CanApp::Katapult)]);
        let err = enter_bootloader(b, &target(), Instant::now() + Duration::from_secs(2)).await.unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("did not reach Katapult within 2.0 s"), "{msg}");
        assert!(msg.contains("00000000beef Katapult") && msg.contains("bus-off"), "{msg}");
        assert!(err.help().unwrap().contains("only this node unassigned"));
        // Alone and silent: wiring and Katapult, no collision.
        let err = enter_bootloader(bus(vec![]), &target(), Instant::now() + Duration::from_secs(2)).await.unwrap_err();
        assert!(err.to_string().ends_with("(it did not answer queries at all)"), "{err}");
        assert!(err.help().unwrap().contains("120 Ω termination"));
        // Reaching Katapult returns the others seen meanwhile.
        let b = bus(vec![reply(OTHER, CanApp::Klipper), reply(OURS, CanApp::Katapult)]);
        let seen = enter_bootloader(b, &target(), Instant::now() + Duration::from_secs(2)).await.unwrap();
        assert_eq!(seen, [reply(OTHER, CanApp::Klipper)]);
    }
}
