//! Katapult's byte stream over a CAN bus: a [`Link`] for the existing Katapult session,
//! generic over a [`FrameSocket`] so tests can feed frames, plus the admin steps that reach a
//! node's bootloader (request it, wait for Katapult to answer a query, give it a node id).
//! Every wait is a deadline on the socket's next frame; nothing sleeps.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::time::Duration;

use tokio::time::Instant;

use super::admin::{AdminCommand, AdminReply, CanApp, NodeId, ADMIN_RESP_ID};
use super::frame::CanFrame;
use super::stream::CanStream;
use super::uuid::CanUuid;
use crate::flash::katapult::Link;

/// A CAN socket as kflash needs it: send a frame, await the next one until a deadline.
pub trait FrameSocket {
    fn send(&mut self, frame: &CanFrame) -> impl Future<Output = io::Result<()>>;
    /// The next frame received by `deadline`; `Ok(None)` when none came.
    fn recv(&mut self, deadline: Instant) -> impl Future<Output = io::Result<Option<CanFrame>>>;
    /// Drop frames already received but not yet read (before a retry).
    fn discard_input(&mut self);
}

impl<S: FrameSocket> FrameSocket for &mut S {
    fn send(&mut self, frame: &CanFrame) -> impl Future<Output = io::Result<()>> {
        (**self).send(frame)
    }
    fn recv(&mut self, deadline: Instant) -> impl Future<Output = io::Result<Option<CanFrame>>> {
        (**self).recv(deadline)
    }
    fn discard_input(&mut self) {
        (**self).discard_input()
    }
}

/// The host's end of one node's stream, carried over `S`.
pub struct CanLink<S> {
    socket: S,
    stream: CanStream,
    pending: VecDeque<u8>,
    /// The last socket error (a bus-off says so here), for the message after a failed write.
    last_error: Option<String>,
}

impl<S: FrameSocket> CanLink<S> {
    pub fn new(socket: S, node: NodeId) -> Self {
        CanLink { socket, stream: CanStream::host(node), pending: VecDeque::new(), last_error: None }
    }

    pub fn into_socket(self) -> S {
        self.socket
    }

    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }
}

impl<S: FrameSocket> Link for CanLink<S> {
    async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        for frame in self.stream.frames(bytes) {
            if let Err(e) = self.socket.send(&frame).await {
                self.last_error = Some(e.to_string());
                return Err(e);
            }
        }
        Ok(())
    }

    async fn recv(&mut self, buf: &mut [u8], deadline: Instant) -> io::Result<usize> {
        // Frames for other ids (other nodes, admin traffic) are skipped, never returned as
        // "nothing came": Ok(0) means the deadline passed.
        while self.pending.is_empty() {
            let received = self.socket.recv(deadline).await.inspect_err(|e| self.last_error = Some(e.to_string()));
            match received? {
                None => return Ok(0),
                Some(frame) => self.pending.extend(self.stream.accept(&frame).unwrap_or_default()),
            }
        }
        let n = buf.len().min(self.pending.len());
        for (b, p) in buf.iter_mut().zip(self.pending.drain(..n)) {
            *b = p;
        }
        Ok(n)
    }

    fn discard_input(&mut self) {
        self.pending.clear();
        self.socket.discard_input();
    }
}

/// Broadcast a query for unassigned nodes and collect every answer until `deadline`.
/// Several nodes may answer; the same UUID is reported once.
pub async fn query_unassigned<S: FrameSocket>(socket: &mut S, deadline: Instant) -> io::Result<Vec<AdminReply>> {
    // Late answers to an earlier query are not answers to this one.
    socket.discard_input();
    socket.send(&AdminCommand::QueryUnassigned.to_frame()).await?;
    let mut found: Vec<AdminReply> = Vec::new();
    listen_replies(socket, deadline, |r| {
        if !found.iter().any(|f| f.uuid == r.uuid) {
            found.push(*r);
        }
        false
    })
    .await?;
    Ok(found)
}

/// Hand each query answer to `stop` until it returns true (then `Ok(true)`) or `deadline`.
async fn listen_replies<S: FrameSocket>(
    socket: &mut S,
    deadline: Instant,
    mut stop: impl FnMut(&AdminReply) -> bool,
) -> io::Result<bool> {
    while let Some(frame) = socket.recv(deadline).await? {
        if frame.id() != ADMIN_RESP_ID {
            continue;
        }
        match AdminReply::from_frame(&frame) {
            Ok(r) if stop(&r) => return Ok(true),
            Ok(_) => {}
            Err(e) => tracing::debug!("ignoring admin answer {frame:?}: {e}"),
        }
    }
    Ok(false)
}

/// How a node was (not) reached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReachError {
    #[error("CAN node {uuid} did not answer as {} within {waited:?}{}", .want.name(), seen_note(.seen))]
    NotAnswering { uuid: CanUuid, want: CanApp, waited: Duration, seen: Option<CanApp> },
}

fn seen_note(seen: &Option<CanApp>) -> String {
    match seen {
        Some(app) => format!(" (it still answers as {})", app.name()),
        None => " (it did not answer queries at all)".into(),
    }
}

/// Ask a node running Klipper to reboot into its bootloader. Klipper obeys this whether or
/// not it has a node id; a node already in Katapult ignores it.
pub async fn request_bootloader<S: FrameSocket>(socket: &mut S, uuid: CanUuid) -> io::Result<()> {
    socket.send(&AdminCommand::RequestBootloader { uuid }.to_frame()).await
}

/// Wait until `uuid` answers a query as Katapult (after a bootloader request).
pub async fn await_katapult<S: FrameSocket>(
    socket: &mut S,
    uuid: CanUuid,
    every: Duration,
    deadline: Instant,
) -> Result<(), AwaitError> {
    await_app(socket, uuid, CanApp::Katapult, every, deadline).await
}

/// Wait until `uuid` answers a query as `want`. A node announces nothing when it starts, so
/// the host asks: every `every`, clear Katapult node ids (so a Katapult node answers again)
/// and query; the answer frames are awaited with a deadline. Gives up at `deadline`.
pub async fn await_app<S: FrameSocket>(
    socket: &mut S,
    uuid: CanUuid,
    want: CanApp,
    every: Duration,
    deadline: Instant,
) -> Result<(), AwaitError> {
    let started = Instant::now();
    let mut seen = None;
    while Instant::now() < deadline {
        socket.send(&AdminCommand::ClearKatapultNodeIds.to_frame()).await?;
        socket.send(&AdminCommand::QueryUnassigned.to_frame()).await?;
        let round = (Instant::now() + every).min(deadline);
        let reached = listen_replies(socket, round, |r| {
            if r.uuid != uuid {
                return false;
            }
            seen = Some(r.app);
            r.app == want
        })
        .await?;
        if reached {
            return Ok(());
        }
    }
    Err(ReachError::NotAnswering { uuid, want, waited: deadline.saturating_duration_since(started), seen }.into())
}

/// What the queries of a wait saw: our node's last answer, and every other node that answered
/// (its latest application), in the order first seen.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sightings {
    pub ours: Option<CanApp>,
    pub others: Vec<AdminReply>,
    /// Query rounds done.
    pub rounds: u32,
}

impl Sightings {
    fn saw(&mut self, r: &AdminReply, uuid: CanUuid) {
        if r.uuid == uuid {
            self.ours = Some(r.app);
        } else if let Some(o) = self.others.iter_mut().find(|o| o.uuid == r.uuid) {
            o.app = r.app;
        } else {
            self.others.push(*r);
        }
    }
}

/// [`await_app`] that also reports who else answered, and lets `give_up` end the wait after
/// any round (e.g. when another UUID turns up where ours was expected). `Ok((true, _))`: `uuid`
/// answered as `want`.
pub async fn await_app_watching<S: FrameSocket>(
    socket: &mut S,
    uuid: CanUuid,
    want: CanApp,
    every: Duration,
    deadline: Instant,
    mut give_up: impl FnMut(&Sightings) -> bool,
) -> io::Result<(bool, Sightings)> {
    let mut seen = Sightings::default();
    while Instant::now() < deadline {
        socket.send(&AdminCommand::ClearKatapultNodeIds.to_frame()).await?;
        socket.send(&AdminCommand::QueryUnassigned.to_frame()).await?;
        let round = (Instant::now() + every).min(deadline);
        let reached = listen_replies(socket, round, |r| {
            seen.saw(r, uuid);
            r.uuid == uuid && r.app == want
        })
        .await?;
        seen.rounds += 1;
        if reached {
            return Ok((true, seen));
        }
        if give_up(&seen) {
            break;
        }
    }
    Ok((false, seen))
}

/// What can stop [`await_katapult`].
#[derive(Debug, thiserror::Error)]
pub enum AwaitError {
    #[error("CAN bus: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Reach(#[from] ReachError),
}

/// Give the node in Katapult a node id and return the link to it (flashtool uses node 128).
pub async fn open_katapult<S: FrameSocket>(mut socket: S, uuid: CanUuid, node: NodeId) -> io::Result<CanLink<S>> {
    socket.send(&AdminCommand::SetKatapultNodeId { uuid, node }.to_frame()).await?;
    Ok(CanLink::new(socket, node))
}

/// Identify a node running Klipper, for verification: give it Klipper node id `node` and run
/// the identify exchange on its stream. Only while Klippy is stopped: Klippy assigns node ids
/// itself, and two hosts must not hand out the same one.
pub async fn identify_klipper_node<S: FrameSocket>(
    mut socket: S,
    uuid: CanUuid,
    node: NodeId,
    deadline: Instant,
) -> Result<crate::protocol::klipper::DataDictionary, crate::flash::error::FlashError> {
    let what = format!("CAN node {uuid}");
    socket
        .send(&AdminCommand::SetKlipperNodeId { uuid, node }.to_frame())
        .await
        .map_err(|e| crate::flash::error::FlashError::Io { path: what.clone(), message: e.to_string() })?;
    let mut link = CanLink::new(socket, node);
    crate::flash::identify::identify_over(&mut link, &what, deadline).await
}

#[cfg(test)]
pub(crate) mod fake {
    //! A scripted bus for tests: frames the host sent, and a responder that answers them.
    use super::*;

    pub struct FakeBus<F: FnMut(&CanFrame) -> Vec<CanFrame>> {
        pub sent: Vec<CanFrame>,
        pub inbox: VecDeque<CanFrame>,
        pub respond: F,
    }

    impl<F: FnMut(&CanFrame) -> Vec<CanFrame>> FakeBus<F> {
        pub fn new(respond: F) -> Self {
            FakeBus { sent: Vec::new(), inbox: VecDeque::new(), respond }
        }
    }

    impl<F: FnMut(&CanFrame) -> Vec<CanFrame>> FrameSocket for FakeBus<F> {
        async fn send(&mut self, frame: &CanFrame) -> io::Result<()> {
            self.sent.push(*frame);
            let answers = (self.respond)(frame);
            self.inbox.extend(answers);
            Ok(())
        }
        async fn recv(&mut self, deadline: Instant) -> io::Result<Option<CanFrame>> {
            match self.inbox.pop_front() {
                Some(f) => Ok(Some(f)),
                None => {
                    tokio::time::sleep_until(deadline).await;
                    Ok(None)
                }
            }
        }
        fn discard_input(&mut self) {
            self.inbox.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeBus;
    use super::*;

    const U: CanUuid = CanUuid([1, 2, 3, 4, 5, 6]);
    const OTHER: CanUuid = CanUuid([9, 9, 9, 9, 9, 9]);

    fn reply(uuid: CanUuid, app: CanApp) -> CanFrame {
        AdminReply { uuid, app }.to_frame()
    }

    #[tokio::test(start_paused = true)]
    async fn query_collects_every_answer_until_the_deadline() {
        let mut bus = FakeBus::new(|f: &CanFrame| {
            if AdminCommand::from_frame(f) == Ok(AdminCommand::QueryUnassigned) {
                // Two nodes, one answering twice, plus unrelated traffic.
                vec![
                    reply(U, CanApp::Klipper),
                    CanFrame::new(0x109, &[1]).unwrap(),
                    reply(OTHER, CanApp::Katapult),
                    reply(U, CanApp::Klipper),
                ]
            } else {
                vec![]
            }
        });
        let t0 = Instant::now();
        let found = query_unassigned(&mut bus, t0 + Duration::from_millis(500)).await.unwrap();
        assert_eq!(
            found,
            [AdminReply { uuid: U, app: CanApp::Klipper }, AdminReply { uuid: OTHER, app: CanApp::Katapult }]
        );
        assert_eq!(Instant::now() - t0, Duration::from_millis(500), "listens until the deadline");
        assert_eq!(bus.sent, [AdminCommand::QueryUnassigned.to_frame()]);
    }

    #[tokio::test(start_paused = true)]
    async fn katapult_is_awaited_by_queries_until_it_answers() {
        // The node answers as Klipper to the first two queries, then as Katapult.
        let mut queries = 0;
        let mut bus = FakeBus::new(move |f: &CanFrame| match AdminCommand::from_frame(f) {
            Ok(AdminCommand::QueryUnassigned) => {
                queries += 1;
                vec![reply(U, if queries <= 2 { CanApp::Klipper } else { CanApp::Katapult })]
            }
            _ => vec![],
        });
        let t0 = Instant::now();
        request_bootloader(&mut bus, U).await.unwrap();
        await_katapult(&mut bus, U, Duration::from_millis(250), t0 + Duration::from_secs(5)).await.unwrap();
        // Answered within the third round: two full rounds of 250 ms passed.
        assert_eq!(Instant::now() - t0, Duration::from_millis(500));
        let cmds: Vec<_> = bus.sent.iter().map(|f| AdminCommand::from_frame(f).unwrap()).collect();
        assert_eq!(cmds[0], AdminCommand::RequestBootloader { uuid: U });
        assert_eq!(&cmds[1..3], [AdminCommand::ClearKatapultNodeIds, AdminCommand::QueryUnassigned]);
        assert_eq!(cmds.len(), 7);
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_that_never_reaches_katapult_is_named() {
        let mut bus = FakeBus::new(|f: &CanFrame| match AdminCommand::from_frame(f) {
            Ok(AdminCommand::QueryUnassigned) => vec![reply(U, CanApp::Klipper)],
            _ => vec![],
        });
        let t0 = Instant::now();
        let err =
            await_katapult(&mut bus, U, Duration::from_millis(250), t0 + Duration::from_secs(2)).await.unwrap_err();
        assert_eq!(Instant::now() - t0, Duration::from_secs(2));
        let msg = err.to_string();
        assert!(msg.contains("010203040506") && msg.contains("still answers as Klipper"), "{msg}");

        let mut silent = FakeBus::new(|_: &CanFrame| vec![]);
        let err = await_katapult(&mut silent, U, Duration::from_millis(250), Instant::now() + Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("did not answer queries at all"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn link_carries_bytes_in_frames_and_skips_other_ids() {
        let node = NodeId::KATAPULT_FLASH;
        let mut bus = FakeBus::new(move |f: &CanFrame| {
            if f.id() == node.host_to_node() && f.data().len() < 8 {
                // After the last frame of a request: noise, then a 10-byte answer in two frames.
                vec![
                    CanFrame::new(0x109, &[0xee; 8]).unwrap(),
                    CanFrame::new(0x201, &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap(),
                    reply(OTHER, CanApp::Klipper),
                    CanFrame::new(0x201, &[9, 10]).unwrap(),
                ]
            } else {
                vec![]
            }
        });
        let mut link = open_katapult(&mut bus, U, node).await.unwrap();
        link.send(&[0x55; 12]).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut buf = [0u8; 6];
        assert_eq!(link.recv(&mut buf, deadline).await.unwrap(), 6);
        assert_eq!(buf, [1, 2, 3, 4, 5, 6]);
        let mut rest = Vec::new();
        while rest.len() < 4 {
            let n = link.recv(&mut buf, deadline).await.unwrap();
            assert!(n > 0, "answer bytes lost");
            rest.extend_from_slice(&buf[..n]);
        }
        assert_eq!(rest, [7, 8, 9, 10]);
        // Nothing more: the deadline passes and recv says so with 0.
        assert_eq!(link.recv(&mut buf, deadline).await.unwrap(), 0);
        assert_eq!(Instant::now(), deadline);
        drop(link);
        let ids: Vec<(u16, usize)> = bus.sent.iter().map(|f| (f.id(), f.data().len())).collect();
        assert_eq!(ids, [(0x3f0, 8), (0x200, 8), (0x200, 4)]);
        assert_eq!(
            AdminCommand::from_frame(&bus.sent[0]),
            Ok(AdminCommand::SetKatapultNodeId { uuid: U, node: NodeId(128) })
        );
    }
}
