//! Klipper's CAN "admin" protocol (Klipper docs/CANBUS_protocol.md, src/generic/canserial.c;
//! Katapult's canserial.c): host commands broadcast on 0x3f0, node answers on 0x3f1, and the
//! mapping from a node id to the pair of CAN ids its byte stream uses. Sans-IO: frames in and out.

use super::frame::CanFrame;
use super::uuid::{CanUuid, UUID_LEN};

/// Host → every node.
pub const ADMIN_ID: u16 = 0x3f0;
/// Every node → host.
pub const ADMIN_RESP_ID: u16 = 0x3f1;

const CMD_QUERY_UNASSIGNED: u8 = 0x00;
const CMD_SET_KLIPPER_NODEID: u8 = 0x01;
const CMD_REQUEST_BOOTLOADER: u8 = 0x02;
const CMD_SET_KATAPULT_NODEID: u8 = 0x11;
const CMD_CLEAR_KATAPULT_NODEID: u8 = 0x12;
const RESP_NEED_NODEID: u8 = 0x20;

/// A node id as assigned by the host. Its byte stream runs host→node on `0x100 + 2n` and
/// node→host on `0x101 + 2n`. Klippy assigns from 4 upward; Katapult's flashtool uses 128.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u8);

impl NodeId {
    /// The id Katapult's flashtool gives the node it flashes.
    pub const KATAPULT_FLASH: NodeId = NodeId(128);

    /// CAN id of frames the host sends to this node.
    pub fn host_to_node(self) -> u16 {
        0x100 + 2 * u16::from(self.0)
    }

    /// CAN id of frames this node sends to the host.
    pub fn node_to_host(self) -> u16 {
        self.host_to_node() + 1
    }

    /// The node whose host→node id this is, if it is one.
    pub fn from_host_to_node(can_id: u16) -> Option<NodeId> {
        let n = can_id.checked_sub(0x100)?;
        (n.is_multiple_of(2) && n / 2 <= u16::from(u8::MAX)).then_some(NodeId((n / 2) as u8))
    }
}

/// Which firmware answered a query: the last byte of the answer is the command that firmware
/// expects for its node id (0x01 Klipper, 0x11 Katapult).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CanApp {
    Klipper,
    Katapult,
    Unknown(u8),
}

impl CanApp {
    pub fn from_byte(b: u8) -> CanApp {
        match b {
            CMD_SET_KLIPPER_NODEID => CanApp::Klipper,
            CMD_SET_KATAPULT_NODEID => CanApp::Katapult,
            other => CanApp::Unknown(other),
        }
    }

    pub fn byte(self) -> u8 {
        match self {
            CanApp::Klipper => CMD_SET_KLIPPER_NODEID,
            CanApp::Katapult => CMD_SET_KATAPULT_NODEID,
            CanApp::Unknown(b) => b,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CanApp::Klipper => "Klipper",
            CanApp::Katapult => "Katapult",
            CanApp::Unknown(_) => "unknown",
        }
    }
}

/// A command the host broadcasts on [`ADMIN_ID`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminCommand {
    /// Every node without a node id answers with its UUID.
    QueryUnassigned,
    /// Klipper firmware: take `node` if the UUID is yours.
    SetKlipperNodeId { uuid: CanUuid, node: NodeId },
    /// Klipper firmware: reboot into the bootloader if the UUID is yours (works assigned or not).
    RequestBootloader { uuid: CanUuid },
    /// Katapult: take `node` if the UUID is yours.
    SetKatapultNodeId { uuid: CanUuid, node: NodeId },
    /// Katapult: every Katapult node forgets its node id.
    ClearKatapultNodeIds,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    #[error("admin frame on id {0:#x}, expected {ADMIN_ID:#x} or {ADMIN_RESP_ID:#x}")]
    WrongId(u16),
    #[error("empty admin frame")]
    Empty,
    #[error("admin command {cmd:#04x} needs {need} bytes, got {got}")]
    Short { cmd: u8, need: usize, got: usize },
    #[error("unknown admin code {0:#04x}")]
    Unknown(u8),
}

fn uuid_at(data: &[u8]) -> CanUuid {
    let mut u = [0u8; UUID_LEN];
    u.copy_from_slice(&data[1..1 + UUID_LEN]);
    CanUuid(u)
}

fn need(data: &[u8], n: usize) -> Result<(), AdminError> {
    if data.len() < n {
        return Err(AdminError::Short { cmd: data[0], need: n, got: data.len() });
    }
    Ok(())
}

impl AdminCommand {
    pub fn to_frame(&self) -> CanFrame {
        let mut buf = Vec::with_capacity(8);
        let mut with_uuid = |cmd: u8, uuid: &CanUuid, node: Option<NodeId>| {
            buf.push(cmd);
            buf.extend_from_slice(uuid.bytes());
            buf.extend(node.map(|n| n.0));
        };
        match self {
            AdminCommand::QueryUnassigned => buf.push(CMD_QUERY_UNASSIGNED),
            AdminCommand::SetKlipperNodeId { uuid, node } => with_uuid(CMD_SET_KLIPPER_NODEID, uuid, Some(*node)),
            AdminCommand::RequestBootloader { uuid } => with_uuid(CMD_REQUEST_BOOTLOADER, uuid, None),
            AdminCommand::SetKatapultNodeId { uuid, node } => with_uuid(CMD_SET_KATAPULT_NODEID, uuid, Some(*node)),
            AdminCommand::ClearKatapultNodeIds => buf.push(CMD_CLEAR_KATAPULT_NODEID),
        }
        CanFrame::new(ADMIN_ID, &buf).expect("admin commands fit one frame")
    }

    /// Decode as a node does (the simulator's side).
    pub fn from_frame(frame: &CanFrame) -> Result<AdminCommand, AdminError> {
        if frame.id() != ADMIN_ID {
            return Err(AdminError::WrongId(frame.id()));
        }
        let d = frame.data();
        let cmd = *d.first().ok_or(AdminError::Empty)?;
        Ok(match cmd {
            CMD_QUERY_UNASSIGNED => AdminCommand::QueryUnassigned,
            CMD_CLEAR_KATAPULT_NODEID => AdminCommand::ClearKatapultNodeIds,
            CMD_REQUEST_BOOTLOADER => {
                need(d, 1 + UUID_LEN)?;
                AdminCommand::RequestBootloader { uuid: uuid_at(d) }
            }
            CMD_SET_KLIPPER_NODEID | CMD_SET_KATAPULT_NODEID => {
                need(d, 2 + UUID_LEN)?;
                let (uuid, node) = (uuid_at(d), NodeId(d[1 + UUID_LEN]));
                if cmd == CMD_SET_KLIPPER_NODEID {
                    AdminCommand::SetKlipperNodeId { uuid, node }
                } else {
                    AdminCommand::SetKatapultNodeId { uuid, node }
                }
            }
            other => return Err(AdminError::Unknown(other)),
        })
    }
}

/// A node's answer on [`ADMIN_RESP_ID`]: "I have no node id; here is my UUID and firmware".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminReply {
    pub uuid: CanUuid,
    pub app: CanApp,
}

impl AdminReply {
    pub fn to_frame(&self) -> CanFrame {
        let mut buf = [0u8; 8];
        buf[0] = RESP_NEED_NODEID;
        buf[1..7].copy_from_slice(self.uuid.bytes());
        buf[7] = self.app.byte();
        CanFrame::new(ADMIN_RESP_ID, &buf).expect("8 bytes")
    }

    pub fn from_frame(frame: &CanFrame) -> Result<AdminReply, AdminError> {
        if frame.id() != ADMIN_RESP_ID {
            return Err(AdminError::WrongId(frame.id()));
        }
        let d = frame.data();
        let code = *d.first().ok_or(AdminError::Empty)?;
        if code != RESP_NEED_NODEID {
            return Err(AdminError::Unknown(code));
        }
        // Old firmware sent 7 bytes, without the application byte.
        need(d, 1 + UUID_LEN)?;
        let app = d.get(1 + UUID_LEN).map_or(CanApp::Unknown(0), |b| CanApp::from_byte(*b));
        Ok(AdminReply { uuid: uuid_at(d), app })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const U: CanUuid = CanUuid([0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff]);

    #[test]
    fn node_ids_map_to_can_id_pairs() {
        // flashtool's node 128 listens on 0x200 and answers on 0x201; Klippy's first node is 4.
        assert_eq!((NodeId(128).host_to_node(), NodeId(128).node_to_host()), (0x200, 0x201));
        assert_eq!((NodeId(4).host_to_node(), NodeId(4).node_to_host()), (0x108, 0x109));
        assert_eq!((NodeId(0).host_to_node(), NodeId(255).node_to_host()), (0x100, 0x2ff));
        assert_eq!(NodeId::from_host_to_node(0x108), Some(NodeId(4)));
        assert_eq!(NodeId::from_host_to_node(0x109), None);
        assert_eq!(NodeId::from_host_to_node(0x0ff), None);
        assert_eq!(NodeId::from_host_to_node(0x300), None);
    }

    #[test]
    fn command_bytes_match_klipper_and_katapult() {
        let bytes = |c: AdminCommand| {
            let f = c.to_frame();
            assert_eq!(f.id(), 0x3f0);
            f.data().to_vec()
        };
        assert_eq!(bytes(AdminCommand::QueryUnassigned), [0x00]);
        assert_eq!(bytes(AdminCommand::ClearKatapultNodeIds), [0x12]);
        assert_eq!(bytes(AdminCommand::RequestBootloader { uuid: U }), [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff]);
        assert_eq!(
            bytes(AdminCommand::SetKlipperNodeId { uuid: U, node: NodeId(4) }),
            [0x01, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff, 4]
        );
        assert_eq!(
            bytes(AdminCommand::SetKatapultNodeId { uuid: U, node: NodeId::KATAPULT_FLASH }),
            [0x11, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff, 0x80]
        );
    }

    #[test]
    fn query_answers_name_the_firmware() {
        let f = CanFrame::new(0x3f1, &[0x20, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff, 0x01]).unwrap();
        assert_eq!(AdminReply::from_frame(&f), Ok(AdminReply { uuid: U, app: CanApp::Klipper }));
        let f = CanFrame::new(0x3f1, &[0x20, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff, 0x11]).unwrap();
        assert_eq!(AdminReply::from_frame(&f).unwrap().app, CanApp::Katapult);
        let f = CanFrame::new(0x3f1, &[0x20, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff]).unwrap();
        assert_eq!(AdminReply::from_frame(&f).unwrap().app, CanApp::Unknown(0));
        let short = CanFrame::new(0x3f1, &[0x20, 0xaa]).unwrap();
        assert_eq!(AdminReply::from_frame(&short), Err(AdminError::Short { cmd: 0x20, need: 7, got: 2 }));
        let wrong = CanFrame::new(0x3f0, &[0x20]).unwrap();
        assert_eq!(AdminReply::from_frame(&wrong), Err(AdminError::WrongId(0x3f0)));
        assert_eq!(
            AdminReply { uuid: U, app: CanApp::Katapult }.to_frame().data(),
            [0x20, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff, 0x11]
        );
    }

    #[test]
    fn nodes_reject_truncated_commands() {
        let f = CanFrame::new(0x3f0, &[0x01, 1, 2, 3, 4, 5, 6]).unwrap();
        assert_eq!(AdminCommand::from_frame(&f), Err(AdminError::Short { cmd: 1, need: 8, got: 7 }));
        let f = CanFrame::new(0x3f0, &[0x02, 1, 2]).unwrap();
        assert!(AdminCommand::from_frame(&f).is_err());
        assert_eq!(AdminCommand::from_frame(&CanFrame::new(0x3f0, &[]).unwrap()), Err(AdminError::Empty));
        assert_eq!(AdminCommand::from_frame(&CanFrame::new(0x3f0, &[0x42]).unwrap()), Err(AdminError::Unknown(0x42)));
    }

    fn any_command() -> impl Strategy<Value = AdminCommand> {
        let uuid = any::<[u8; 6]>().prop_map(CanUuid);
        prop_oneof![
            Just(AdminCommand::QueryUnassigned),
            Just(AdminCommand::ClearKatapultNodeIds),
            uuid.clone().prop_map(|uuid| AdminCommand::RequestBootloader { uuid }),
            (uuid.clone(), any::<u8>()).prop_map(|(uuid, n)| AdminCommand::SetKlipperNodeId { uuid, node: NodeId(n) }),
            (uuid, any::<u8>()).prop_map(|(uuid, n)| AdminCommand::SetKatapultNodeId { uuid, node: NodeId(n) }),
        ]
    }

    proptest! {
        #[test]
        fn commands_round_trip(cmd in any_command()) {
            prop_assert_eq!(AdminCommand::from_frame(&cmd.to_frame()), Ok(cmd));
        }

        #[test]
        fn replies_round_trip(bytes in any::<[u8; 6]>(), app in any::<u8>()) {
            let r = AdminReply { uuid: CanUuid(bytes), app: CanApp::from_byte(app) };
            prop_assert_eq!(AdminReply::from_frame(&r.to_frame()), Ok(r));
            prop_assert_eq!(r.app.byte(), app);
        }

        #[test]
        fn node_id_round_trip(n in any::<u8>()) {
            let id = NodeId(n);
            prop_assert_eq!(NodeId::from_host_to_node(id.host_to_node()), Some(id));
            prop_assert!(id.node_to_host() < ADMIN_ID);
        }
    }
}
