//! A simulated CAN node (a toolhead such as an EBB36), sans-IO: CAN frames in, frames,
//! modelled flash work and events out. It speaks Klipper's admin protocol (Klipper's and
//! Katapult's canserial.c), Klipper over its node ids (the same [`KlipperDevice`] as a USB
//! board, so identify serves the installed image's dictionary), and, after a bootloader
//! request, Katapult over CAN (the same [`KatapultDevice`], fed the reassembled byte stream).
//! [`SimBus`] puts several nodes on one bus, for collisions between their query answers.
//!
//! The rig's vcan / gs_usb plumbing that carries these frames comes next; until then only the
//! tests drive it.
#![cfg_attr(not(test), allow(dead_code))]

use std::time::Duration;

use kflash::can::admin::{AdminCommand, AdminReply, CanApp, NodeId, ADMIN_ID};
use kflash::can::stream::CanStream;
use kflash::can::{CanFrame, CanUuid};
use kflash::protocol::katapult::ConnectInfo;

use crate::firmware::{AppCheck, FlashTiming, WriteRules};
use crate::flash::{FlashMemory, KatapultDevice, KatapultEvent, KatapultOutput};
use crate::klipperdev::{KlipperDevice, KlipperEvent};

/// CAN-only faults, on top of what [`KatapultDevice`] and [`KlipperDevice`] model.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CanFaults {
    /// After the next flash the application comes up with this UUID (one-shot): the host's
    /// registry no longer matches it.
    pub uuid_after_flash: Option<CanUuid>,
    /// A bootloader request reboots the node, but Katapult never starts: it comes back in
    /// Klipper, without a node id.
    pub never_katapult: bool,
    /// The controller goes bus-off right after this many SEND_BLOCKs were acked (one-shot).
    pub bus_off_after_blocks: Option<u32>,
    /// The node is knocked off the bus (bus-off) when another node answers the same query.
    pub collide_on_query: bool,
}

impl CanFaults {
    /// Parse one spec: `uuid-after-flash=HEX12`, `never-katapult`, `bus-off-after=BLOCKS`,
    /// `collide-on-query`.
    pub fn set(&mut self, spec: &str) -> Result<(), String> {
        let (name, value) = match spec.trim().split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim())),
            None => (spec.trim(), None),
        };
        let need = || value.filter(|v| !v.is_empty()).ok_or_else(|| format!("CAN fault '{name}' needs a value"));
        let none = || match value {
            None => Ok(()),
            Some(_) => Err(format!("CAN fault '{name}' takes no value")),
        };
        match name {
            "uuid-after-flash" => self.uuid_after_flash = Some(need()?.parse().map_err(|e| format!("{e}"))?),
            "never-katapult" => none().map(|_| self.never_katapult = true)?,
            "bus-off-after" => {
                let v = need()?;
                self.bus_off_after_blocks =
                    Some(v.parse().map_err(|_| format!("CAN fault 'bus-off-after': '{v}' is not a block count"))?);
            }
            "collide-on-query" => none().map(|_| self.collide_on_query = true)?,
            other => {
                return Err(format!(
                    "unknown CAN fault '{other}' (known: uuid-after-flash=UUID, never-katapult, bus-off-after=BLOCKS, \
                     collide-on-query)"
                ))
            }
        }
        Ok(())
    }
}

/// What a frame made the node do.
#[derive(Debug, Clone, PartialEq)]
pub enum CanEvent {
    QueryAnswered {
        app: CanApp,
    },
    NodeIdSet(NodeId),
    NodeIdCleared,
    /// Another node was given our node id (Klipper shuts down, Katapult just forgets it).
    NodeIdConflict,
    /// The bootloader request rebooted the node into Katapult.
    EnteredKatapult,
    /// The bootloader request rebooted the node, but it came back in Klipper.
    KatapultNeverStarted,
    Katapult(KatapultEvent),
    Klipper(KlipperEvent),
    /// COMPLETE was acked: call [`CanNode::jump`] after Katapult's delay.
    Complete,
    /// After the jump: what the node runs now, and its UUID.
    Booted {
        app: CanApp,
        uuid: CanUuid,
    },
    BusOff,
}

#[derive(Debug, Clone, PartialEq)]
pub enum CanOutput {
    Frame(CanFrame),
    /// The MCU is busy (flash erase/program) this long before its next frame.
    Work(Duration),
    Event(CanEvent),
}

enum Firmware {
    Klipper(Box<KlipperDevice>),
    Katapult(Box<KatapultDevice>),
    /// No application and no Katapult answer: silent.
    Dead,
}

pub struct CanNode {
    pub name: String,
    uuid: CanUuid,
    firmware: Firmware,
    node_id: Option<NodeId>,
    pub flash: FlashMemory,
    katapult_info: ConnectInfo,
    rules: WriteRules,
    timing: FlashTiming,
    pub faults: CanFaults,
    bus_off: bool,
    /// When the running firmware booted, for Klipper's clock.
    boot_at: Duration,
}

impl CanNode {
    /// A node booting whatever is installed in `flash` at Katapult's app start.
    pub fn new(
        name: &str,
        uuid: CanUuid,
        flash: FlashMemory,
        katapult_info: ConnectInfo,
        rules: WriteRules,
        timing: FlashTiming,
    ) -> CanNode {
        let mut node = CanNode {
            name: name.to_string(),
            uuid,
            firmware: Firmware::Dead,
            node_id: None,
            flash,
            katapult_info,
            rules,
            timing,
            faults: CanFaults::default(),
            bus_off: false,
            boot_at: Duration::ZERO,
        };
        node.boot(Duration::ZERO);
        node
    }

    pub fn uuid(&self) -> CanUuid {
        self.uuid
    }

    pub fn node_id(&self) -> Option<NodeId> {
        self.node_id
    }

    pub fn app(&self) -> Option<CanApp> {
        match self.firmware {
            Firmware::Klipper(_) => Some(CanApp::Klipper),
            Firmware::Katapult(_) => Some(CanApp::Katapult),
            Firmware::Dead => None,
        }
    }

    pub fn is_bus_off(&self) -> bool {
        self.bus_off
    }

    /// The controller recovers from bus-off (the firmware's state is kept).
    pub fn recover(&mut self) {
        self.bus_off = false;
    }

    /// Reset into the installed application, or into Katapult when there is none. The node
    /// id is lost, as on any reset.
    fn boot(&mut self, now: Duration) -> CanApp {
        self.node_id = None;
        self.boot_at = now;
        let image = self.flash.image_from(self.katapult_info.app_start);
        match AppCheck::inspect(&image) {
            AppCheck::Klipper { compressed, .. } => {
                let mut dev = KlipperDevice::new(compressed);
                dev.canbus_uuid = Some(*self.uuid.bytes());
                self.firmware = Firmware::Klipper(Box::new(dev));
                CanApp::Klipper
            }
            _ => self.enter_katapult(),
        }
    }

    fn enter_katapult(&mut self) -> CanApp {
        self.node_id = None;
        let mut dev = KatapultDevice::new(self.katapult_info.clone(), self.rules, self.timing);
        dev.canbus_uuid = Some(*self.uuid.bytes());
        dev.halt_after_blocks = self.faults.bus_off_after_blocks;
        self.firmware = Firmware::Katapult(Box::new(dev));
        CanApp::Katapult
    }

    /// Restart Katapult if it is running, so faults set since its start take effect.
    pub fn restart_katapult_if_running(&mut self) {
        if matches!(self.firmware, Firmware::Katapult(_)) {
            self.enter_katapult();
        }
    }

    /// Katapult's jump after COMPLETE. The fault `uuid_after_flash` strikes here.
    pub fn jump(&mut self, now: Duration) -> Vec<CanOutput> {
        if let Some(new) = self.faults.uuid_after_flash.take() {
            self.uuid = new;
        }
        let app = self.boot(now);
        vec![CanOutput::Event(CanEvent::Booted { app, uuid: self.uuid })]
    }

    fn query_answer(&self) -> Option<CanOutput> {
        let app = self.app()?;
        (self.node_id.is_none()).then(|| CanOutput::Frame(AdminReply { uuid: self.uuid, app }.to_frame()))
    }

    /// One frame seen on the bus at `now` (since the simulation started).
    pub fn receive(&mut self, frame: &CanFrame, now: Duration) -> Vec<CanOutput> {
        if self.bus_off || matches!(self.firmware, Firmware::Dead) {
            return Vec::new();
        }
        if frame.id() == ADMIN_ID {
            return match AdminCommand::from_frame(frame) {
                Ok(cmd) => self.admin(cmd, now),
                Err(_) => Vec::new(),
            };
        }
        match self.node_id {
            Some(id) if frame.id() == id.host_to_node() => self.stream(id, frame.data(), now),
            _ => Vec::new(),
        }
    }

    fn admin(&mut self, cmd: AdminCommand, now: Duration) -> Vec<CanOutput> {
        let klipper = matches!(self.firmware, Firmware::Klipper(_));
        let mut out = Vec::new();
        match cmd {
            AdminCommand::QueryUnassigned => {
                if let Some(answer) = self.query_answer() {
                    out.push(answer);
                    out.push(CanOutput::Event(CanEvent::QueryAnswered { app: self.app().expect("answered") }));
                }
            }
            AdminCommand::SetKlipperNodeId { uuid, node } if klipper => self.set_node_id(uuid, node, &mut out),
            AdminCommand::SetKatapultNodeId { uuid, node } if !klipper => self.set_node_id(uuid, node, &mut out),
            AdminCommand::ClearKatapultNodeIds if !klipper && self.node_id.is_some() => {
                self.node_id = None;
                out.push(CanOutput::Event(CanEvent::NodeIdCleared));
            }
            AdminCommand::RequestBootloader { uuid } if klipper && uuid == self.uuid => {
                if self.faults.never_katapult {
                    self.boot(now);
                    out.push(CanOutput::Event(CanEvent::KatapultNeverStarted));
                } else {
                    self.enter_katapult();
                    out.push(CanOutput::Event(CanEvent::EnteredKatapult));
                }
            }
            _ => {}
        }
        out
    }

    /// Klipper's and Katapult's `set_nodeid`: take the id if the UUID is ours; if another
    /// node is given our id, drop it.
    fn set_node_id(&mut self, uuid: CanUuid, node: NodeId, out: &mut Vec<CanOutput>) {
        if uuid == self.uuid {
            self.node_id = Some(node);
            out.push(CanOutput::Event(CanEvent::NodeIdSet(node)));
        } else if self.node_id == Some(node) {
            self.node_id = None;
            out.push(CanOutput::Event(CanEvent::NodeIdConflict));
        }
    }

    /// Stream bytes on our node id, to whichever firmware runs; its answer goes back in
    /// 8-byte frames on our answer id.
    fn stream(&mut self, id: NodeId, bytes: &[u8], now: Duration) -> Vec<CanOutput> {
        let link = CanStream::node(id);
        let mut out = Vec::new();
        let send = |bytes: &[u8], out: &mut Vec<CanOutput>| {
            out.extend(link.frames(bytes).into_iter().map(CanOutput::Frame));
        };
        match &mut self.firmware {
            Firmware::Klipper(dev) => {
                let (blocks, events) = dev.feed(bytes, now.saturating_sub(self.boot_at));
                for b in blocks {
                    send(&b.encode(), &mut out);
                }
                out.extend(events.into_iter().map(|e| CanOutput::Event(CanEvent::Klipper(e))));
            }
            Firmware::Katapult(dev) => {
                for o in dev.feed(bytes, &mut self.flash) {
                    match o {
                        KatapultOutput::Reply(r) => send(&r.encode().expect("device replies encode"), &mut out),
                        KatapultOutput::Work(d) => out.push(CanOutput::Work(d)),
                        KatapultOutput::Event(KatapultEvent::Complete) => {
                            out.push(CanOutput::Event(CanEvent::Complete))
                        }
                        KatapultOutput::Event(e) => out.push(CanOutput::Event(CanEvent::Katapult(e))),
                    }
                }
                if dev.halted() && self.faults.bus_off_after_blocks.take().is_some() {
                    self.bus_off = true;
                    out.push(CanOutput::Event(CanEvent::BusOff));
                }
            }
            Firmware::Dead => {}
        }
        out
    }
}

/// Several nodes on one bus: every frame reaches every node (CAN is a broadcast medium).
#[derive(Default)]
pub struct SimBus {
    pub nodes: Vec<CanNode>,
}

impl SimBus {
    /// A frame from the host at `now`; returns each node's outputs, by node index.
    pub fn deliver(&mut self, frame: &CanFrame, now: Duration) -> Vec<(usize, Vec<CanOutput>)> {
        let mut all: Vec<(usize, Vec<CanOutput>)> =
            self.nodes.iter_mut().enumerate().map(|(i, n)| (i, n.receive(frame, now))).collect();
        let answering =
            |o: &Vec<CanOutput>| o.iter().any(|o| matches!(o, CanOutput::Event(CanEvent::QueryAnswered { .. })));
        let answers = all.iter().filter(|(_, o)| answering(o)).count();
        if answers > 1 {
            // Simultaneous answers collide in arbitration; a node prone to it goes bus-off
            // and its answer is lost.
            for (i, outputs) in all.iter_mut() {
                let node = &mut self.nodes[*i];
                if node.faults.collide_on_query && answering(outputs) {
                    node.bus_off = true;
                    *outputs = vec![CanOutput::Event(CanEvent::BusOff)];
                }
            }
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firmware::{dictionary_json, profile_for, standin_image};
    use kflash::protocol::katapult::{AckData, Command, FrameDecoder, Response, PROTO_VERSION_1_1_0};
    use kflash::protocol::klipper::{DataDictionary, IdentifyClient, IdentifyProgress};

    const UUID: CanUuid = CanUuid([0x0a, 0x1b, 0x2c, 0x3d, 0x4e, 0x5f]);
    const MCU: &str = "stm32g0b1xx";

    fn image(version: &str) -> Vec<u8> {
        let p = profile_for(MCU).unwrap();
        standin_image(p.app_start, p.initial_sp, &dictionary_json("Klipper", version, MCU, p.clock_freq))
    }

    fn node(installed: Option<&[u8]>) -> CanNode {
        let p = profile_for(MCU).unwrap();
        let mut flash = FlashMemory::new(p.flash_base, p.flash_size, p.pages);
        if let Some(img) = installed {
            flash.load(p.app_start, img);
        }
        let (a, b, c) =
            ((PROTO_VERSION_1_1_0 >> 16) as u8, (PROTO_VERSION_1_1_0 >> 8) as u8, PROTO_VERSION_1_1_0 as u8);
        let info = ConnectInfo {
            proto_version: (a, b, c),
            app_start: p.app_start,
            block_size: 64,
            mcu: MCU.into(),
            version: Some("v0.0.1-sim".into()),
        };
        CanNode::new("ebb", UUID, flash, info, p.rules, p.timing)
    }

    fn frames(out: &[CanOutput]) -> Vec<CanFrame> {
        out.iter().filter_map(|o| if let CanOutput::Frame(f) = o { Some(*f) } else { None }).collect()
    }

    fn events(out: &[CanOutput]) -> Vec<CanEvent> {
        out.iter().filter_map(|o| if let CanOutput::Event(e) = o { Some(e.clone()) } else { None }).collect()
    }

    fn admin(n: &mut CanNode, cmd: AdminCommand) -> Vec<CanOutput> {
        n.receive(&cmd.to_frame(), Duration::ZERO)
    }

    /// Send a byte stream on `id` and collect the node's answer bytes (checking the frames).
    fn talk(n: &mut CanNode, id: NodeId, bytes: &[u8]) -> (Vec<u8>, Vec<CanOutput>) {
        let host = CanStream::host(id);
        let mut outs = Vec::new();
        for f in host.frames(bytes) {
            outs.extend(n.receive(&f, Duration::from_secs(1)));
        }
        let answer = frames(&outs)
            .iter()
            .flat_map(|f| {
                assert!(f.data().len() <= 8);
                host.accept(f).expect("answers on the node's answer id").to_vec()
            })
            .collect();
        (answer, outs)
    }

    /// Klipper's identify over the node's ids, with the host side kflash uses on a tty; the
    /// node answers each request at once.
    fn identify(n: &mut CanNode, id: NodeId) -> DataDictionary {
        let mut client = IdentifyClient::new();
        let mut pending = client.start();
        loop {
            let (answer, _) = talk(n, id, &pending);
            match client.feed(&answer).unwrap() {
                IdentifyProgress::Send(b) => pending = b,
                IdentifyProgress::Done(d) => return d,
                IdentifyProgress::Pending => panic!("the node answered every request at once"),
            }
        }
    }

    fn katapult(n: &mut CanNode, id: NodeId, cmd: Command) -> Response {
        let (bytes, _) = talk(n, id, &cmd.encode().unwrap());
        let mut d = FrameDecoder::new();
        d.push(&bytes);
        Response::from_frame(&d.next_frame().expect("a reply").unwrap()).unwrap()
    }

    #[test]
    fn klipper_answers_queries_until_it_has_a_node_id_and_then_identifies() {
        let mut n = node(Some(&image("v0.13.0-sim")));
        let out = admin(&mut n, AdminCommand::QueryUnassigned);
        assert_eq!(frames(&out), [AdminReply { uuid: UUID, app: CanApp::Klipper }.to_frame()]);
        // Another UUID's id assignment is not ours.
        let other = CanUuid([1; 6]);
        assert!(admin(&mut n, AdminCommand::SetKlipperNodeId { uuid: other, node: NodeId(4) }).is_empty());
        // Katapult's commands mean nothing to Klipper.
        assert!(admin(&mut n, AdminCommand::SetKatapultNodeId { uuid: UUID, node: NodeId(4) }).is_empty());
        let out = admin(&mut n, AdminCommand::SetKlipperNodeId { uuid: UUID, node: NodeId(4) });
        assert_eq!(events(&out), [CanEvent::NodeIdSet(NodeId(4))]);
        assert!(admin(&mut n, AdminCommand::QueryUnassigned).is_empty(), "assigned nodes stay quiet");

        // Identify over 0x108/0x109, with the host side kflash uses on a tty.
        let dict = identify(&mut n, NodeId(4));
        assert_eq!((dict.version.as_str(), dict.mcu.as_str()), ("v0.13.0-sim", MCU));

        // A frame for another node id is not ours.
        let stray = CanStream::host(NodeId(5)).frames(&IdentifyClient::new().start());
        assert!(n.receive(&stray[0], Duration::ZERO).is_empty());
        // Another node given our id: we drop it.
        let out = admin(&mut n, AdminCommand::SetKlipperNodeId { uuid: other, node: NodeId(4) });
        assert_eq!((events(&out), n.node_id()), (vec![CanEvent::NodeIdConflict], None));
    }

    #[test]
    fn bootloader_request_then_a_flash_over_can_boots_the_new_version() {
        let mut n = node(Some(&image("v0.12.0-old")));
        assert!(admin(&mut n, AdminCommand::RequestBootloader { uuid: CanUuid([9; 6]) }).is_empty());
        let out = admin(&mut n, AdminCommand::RequestBootloader { uuid: UUID });
        assert_eq!(events(&out), [CanEvent::EnteredKatapult]);
        let out = admin(&mut n, AdminCommand::QueryUnassigned);
        assert_eq!(frames(&out), [AdminReply { uuid: UUID, app: CanApp::Katapult }.to_frame()]);
        // flashtool's sequence: clear ids, give node 128, CONNECT, GET_CANBUS_ID, blocks, EOF, COMPLETE.
        admin(&mut n, AdminCommand::ClearKatapultNodeIds);
        admin(&mut n, AdminCommand::SetKatapultNodeId { uuid: UUID, node: NodeId::KATAPULT_FLASH });
        let id = NodeId::KATAPULT_FLASH;
        let AckData::Connect(info) = katapult(&mut n, id, Command::Connect).ack_data().unwrap() else { panic!() };
        assert_eq!(info.mcu, MCU);
        assert_eq!(katapult(&mut n, id, Command::GetCanbusId).ack_data().unwrap(), AckData::CanbusId(*UUID.bytes()));
        let mut img = image("v0.13.0-new");
        img.resize(img.len().div_ceil(64) * 64, 0xff);
        for (i, block) in img.chunks(64).enumerate() {
            let addr = info.app_start + 64 * i as u32;
            let r = katapult(&mut n, id, Command::SendBlock { addr, data: block.to_vec() });
            assert_eq!(r.ack_data().unwrap(), AckData::SendBlock { addr });
        }
        assert!(matches!(katapult(&mut n, id, Command::SendEof).ack_data().unwrap(), AckData::SendEof { .. }));
        let (_, out) = talk(&mut n, id, &Command::Complete.encode().unwrap());
        assert!(events(&out).contains(&CanEvent::Complete));
        let out = n.jump(Duration::from_secs(2));
        assert_eq!(events(&out), [CanEvent::Booted { app: CanApp::Klipper, uuid: UUID }]);
        // Back in Klipper, unassigned, serving the new dictionary.
        admin(&mut n, AdminCommand::SetKlipperNodeId { uuid: UUID, node: NodeId(4) });
        let dict = identify(&mut n, NodeId(4));
        assert_eq!(dict.version, "v0.13.0-new");
    }

    #[test]
    fn empty_flash_boots_katapult_which_keeps_its_id_until_cleared() {
        let mut n = node(None);
        assert_eq!(n.app(), Some(CanApp::Katapult));
        // Klipper's commands mean nothing to Katapult.
        assert!(admin(&mut n, AdminCommand::SetKlipperNodeId { uuid: UUID, node: NodeId(4) }).is_empty());
        admin(&mut n, AdminCommand::SetKatapultNodeId { uuid: UUID, node: NodeId(128) });
        assert!(admin(&mut n, AdminCommand::QueryUnassigned).is_empty());
        assert_eq!(events(&admin(&mut n, AdminCommand::ClearKatapultNodeIds)), [CanEvent::NodeIdCleared]);
        assert_eq!(frames(&admin(&mut n, AdminCommand::QueryUnassigned)).len(), 1);
    }

    #[test]
    fn fault_uuid_changes_after_the_flash() {
        let mut n = node(None);
        let new = CanUuid([0xde, 0xad, 0xbe, 0xef, 0, 1]);
        n.faults.set(&format!("uuid-after-flash={new}")).unwrap();
        n.flash.load(n.katapult_info.app_start, &image("v1"));
        let out = n.jump(Duration::ZERO);
        assert_eq!(events(&out), [CanEvent::Booted { app: CanApp::Klipper, uuid: new }]);
        assert_eq!(
            frames(&admin(&mut n, AdminCommand::QueryUnassigned)),
            [AdminReply { uuid: new, app: CanApp::Klipper }.to_frame()]
        );
        assert!(admin(&mut n, AdminCommand::RequestBootloader { uuid: UUID }).is_empty(), "the old UUID is gone");
        // One-shot: the next boot keeps the new UUID.
        n.jump(Duration::ZERO);
        assert_eq!(n.uuid(), new);
    }

    #[test]
    fn fault_never_reaches_katapult() {
        let mut n = node(Some(&image("v1")));
        n.faults.set("never-katapult").unwrap();
        admin(&mut n, AdminCommand::SetKlipperNodeId { uuid: UUID, node: NodeId(4) });
        let out = admin(&mut n, AdminCommand::RequestBootloader { uuid: UUID });
        assert_eq!(events(&out), [CanEvent::KatapultNeverStarted]);
        assert_eq!((n.app(), n.node_id()), (Some(CanApp::Klipper), None), "rebooted into Klipper, unassigned");
        assert_eq!(
            frames(&admin(&mut n, AdminCommand::QueryUnassigned)),
            [AdminReply { uuid: UUID, app: CanApp::Klipper }.to_frame()]
        );
    }

    #[test]
    fn fault_bus_off_mid_write() {
        let mut n = node(None);
        n.faults.set("bus-off-after=3").unwrap();
        n.boot(Duration::ZERO); // the fault is armed when Katapult starts
        let id = NodeId::KATAPULT_FLASH;
        admin(&mut n, AdminCommand::SetKatapultNodeId { uuid: UUID, node: id });
        let start = n.katapult_info.app_start;
        let mut acked = 0;
        let mut saw_bus_off = false;
        for i in 0..6u32 {
            let bytes = Command::SendBlock { addr: start + 64 * i, data: vec![i as u8; 64] }.encode().unwrap();
            let (answer, out) = talk(&mut n, id, &bytes);
            acked += usize::from(!answer.is_empty());
            saw_bus_off |= events(&out).contains(&CanEvent::BusOff);
        }
        assert_eq!(acked, 3, "nothing is answered after bus-off");
        assert!(saw_bus_off && n.is_bus_off());
        assert!(admin(&mut n, AdminCommand::QueryUnassigned).is_empty());
        // Recovered, it is still Katapult, with what it had written.
        n.recover();
        assert_eq!(n.app(), Some(CanApp::Katapult));
        assert_eq!(n.flash.read(start + 128, 4), [2, 2, 2, 2]);
    }

    #[test]
    fn fault_two_nodes_answering_one_query() {
        let p = node(None);
        let mut other = node(None);
        other.uuid = CanUuid([7; 6]);
        other.name = "sb2209".into();
        let mut bus = SimBus { nodes: vec![p, other] };
        // Without the fault both answers arrive.
        let out = bus.deliver(&AdminCommand::QueryUnassigned.to_frame(), Duration::ZERO);
        assert_eq!(out.iter().map(|(_, o)| frames(o).len()).sum::<usize>(), 2);
        bus.nodes[1].faults.set("collide-on-query").unwrap();
        let out = bus.deliver(&AdminCommand::QueryUnassigned.to_frame(), Duration::ZERO);
        assert_eq!(frames(&out[0].1), [AdminReply { uuid: UUID, app: CanApp::Katapult }.to_frame()]);
        assert_eq!(out[1].1, [CanOutput::Event(CanEvent::BusOff)]);
        assert!(bus.nodes[1].is_bus_off() && !bus.nodes[0].is_bus_off());
        // Alone on the bus it would not have collided.
        bus.nodes[1].recover();
        bus.nodes[0].node_id = Some(NodeId(128));
        let out = bus.deliver(&AdminCommand::QueryUnassigned.to_frame(), Duration::ZERO);
        assert_eq!(frames(&out[1].1).len(), 1);
    }

    #[test]
    fn fault_specs_are_checked() {
        let mut f = CanFaults::default();
        assert!(f.set("uuid-after-flash=12").unwrap_err().contains("12 hex digits"));
        assert!(f.set("never-katapult=1").unwrap_err().contains("takes no value"));
        assert!(f.set("bus-off-after=x").unwrap_err().contains("block count"));
        assert!(f.set("explode").unwrap_err().contains("unknown CAN fault"));
        f.set("bus-off-after=7").unwrap();
        assert_eq!(f.bus_off_after_blocks, Some(7));
    }

    /// kflash's own host side (admin steps, CanLink, KatapultSession) against the simulated
    /// bus: the two must agree on every byte for this to pass.
    mod with_kflash_host {
        use super::*;
        use kflash::can::link::{
            await_katapult, identify_klipper_node, open_katapult, query_unassigned, request_bootloader, FrameSocket,
        };
        use kflash::flash::katapult::{Expectation, KatapultSession, Policy};
        use std::collections::VecDeque;
        use tokio::time::Instant;

        struct SimSocket {
            bus: SimBus,
            inbox: VecDeque<CanFrame>,
            t0: Instant,
        }

        impl FrameSocket for SimSocket {
            async fn send(&mut self, frame: &CanFrame) -> std::io::Result<()> {
                let now = self.t0.elapsed();
                for (i, outs) in self.bus.deliver(frame, now) {
                    for o in outs {
                        match o {
                            CanOutput::Frame(f) => self.inbox.push_back(f),
                            CanOutput::Event(CanEvent::Complete) => {
                                self.bus.nodes[i].jump(now);
                            }
                            _ => {}
                        }
                    }
                }
                Ok(())
            }
            async fn recv(&mut self, deadline: Instant) -> std::io::Result<Option<CanFrame>> {
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

        #[tokio::test]
        async fn kflash_flashes_the_simulated_node_over_can() {
            let n = node(Some(&image("v0.12.0-old")));
            let mut sock = SimSocket { bus: SimBus { nodes: vec![n] }, inbox: VecDeque::new(), t0: Instant::now() };
            let soon = || Instant::now() + Duration::from_millis(50);
            let found = query_unassigned(&mut sock, soon()).await.unwrap();
            assert_eq!(found, [AdminReply { uuid: UUID, app: CanApp::Klipper }]);
            request_bootloader(&mut sock, UUID).await.unwrap();
            await_katapult(&mut sock, UUID, Duration::from_millis(50), Instant::now() + Duration::from_secs(2))
                .await
                .unwrap();
            let link = open_katapult(&mut sock, UUID, NodeId::KATAPULT_FLASH).await.unwrap();
            let mut session = KatapultSession::new(link, Policy::default());
            assert_eq!(session.canbus_id().await.unwrap(), UUID);
            let img = image("v0.13.0-new");
            let expect = Expectation { mcu: MCU.into(), app_start: Some(profile_for(MCU).unwrap().app_start) };
            let mut events = Vec::new();
            let report = session.flash(&img, &expect, &mut events).await.unwrap();
            assert_eq!(report.blocks, img.len().div_ceil(64));
            drop(session);
            // The node jumped into the new Klipper: unassigned, it answers a query as Klipper.
            let found = query_unassigned(&mut sock, soon()).await.unwrap();
            assert_eq!(found, [AdminReply { uuid: UUID, app: CanApp::Klipper }]);
            // Verification (b): identify over CAN reports the new version.
            let deadline = Instant::now() + Duration::from_secs(2);
            let dict = identify_klipper_node(&mut sock, UUID, NodeId(4), deadline).await.unwrap();
            assert_eq!((dict.version.as_str(), dict.mcu.as_str()), ("v0.13.0-new", MCU));
            let n = &sock.bus.nodes[0];
            let installed = n.flash.image_from(n.katapult_info.app_start);
            assert_eq!(installed[..img.len()], img[..]);
        }
    }
}
