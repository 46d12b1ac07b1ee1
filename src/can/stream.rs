//! A node's byte stream in CAN frames: Klipper and Katapult send a plain byte stream split
//! into frames of at most 8 bytes, with no alignment to messages, on the node's pair of ids
//! (see [`NodeId`]). Sans-IO: bytes → frames for sending, frames → bytes on receipt.

use super::admin::NodeId;
use super::frame::{CanFrame, MAX_DATA};

/// One end of a node's stream: which id we send on, which id we listen to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CanStream {
    tx_id: u16,
    rx_id: u16,
}

impl CanStream {
    /// The host's end: send on the node's host→node id, read its node→host id.
    pub fn host(node: NodeId) -> CanStream {
        CanStream { tx_id: node.host_to_node(), rx_id: node.node_to_host() }
    }

    /// The node's end (a simulated board).
    pub fn node(node: NodeId) -> CanStream {
        CanStream { tx_id: node.node_to_host(), rx_id: node.host_to_node() }
    }

    pub fn tx_id(&self) -> u16 {
        self.tx_id
    }

    pub fn rx_id(&self) -> u16 {
        self.rx_id
    }

    /// `bytes` as full 8-byte frames and one shorter last frame, in order.
    pub fn frames(&self, bytes: &[u8]) -> Vec<CanFrame> {
        bytes.chunks(MAX_DATA).map(|c| CanFrame::new(self.tx_id, c).expect("chunk fits a frame")).collect()
    }

    /// The stream bytes a received frame carries, or `None` when the frame is not ours.
    pub fn accept<'a>(&self, frame: &'a CanFrame) -> Option<&'a [u8]> {
        (frame.id() == self.rx_id).then(|| frame.data())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn splits_into_eight_byte_frames_on_the_node_id() {
        let s = CanStream::host(NodeId::KATAPULT_FLASH);
        // A CONNECT request is 8 bytes: exactly one frame.
        let connect = [0x01, 0x88, 0x11, 0x00, 0xf1, 0x7c, 0x99, 0x03];
        let f = s.frames(&connect);
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].id(), f[0].data()), (0x200, &connect[..]));
        // A SEND_BLOCK request is 76 bytes: nine full frames and one of 4.
        let f = s.frames(&[0xab; 76]);
        assert_eq!(f.iter().map(|f| f.data().len()).collect::<Vec<_>>(), [8, 8, 8, 8, 8, 8, 8, 8, 8, 4]);
        assert!(f.iter().all(|f| f.id() == 0x200));
        assert!(s.frames(&[]).is_empty());
    }

    #[test]
    fn takes_only_the_nodes_answers() {
        let host = CanStream::host(NodeId(4));
        let node = CanStream::node(NodeId(4));
        let answer = CanFrame::new(0x109, &[1, 2, 3]).unwrap();
        assert_eq!(host.accept(&answer), Some(&[1u8, 2, 3][..]));
        // Our own request, another node's answer and admin traffic are not ours.
        for id in [0x108, 0x10b, 0x3f1] {
            assert_eq!(host.accept(&CanFrame::new(id, &[9]).unwrap()), None, "{id:#x}");
        }
        assert_eq!((node.tx_id(), node.rx_id()), (0x109, 0x108));
    }

    proptest! {
        #[test]
        fn bytes_survive_the_frames(bytes in proptest::collection::vec(any::<u8>(), 0..300), n in any::<u8>()) {
            let (host, node) = (CanStream::host(NodeId(n)), CanStream::node(NodeId(n)));
            let frames = host.frames(&bytes);
            prop_assert_eq!(frames.len(), bytes.len().div_ceil(8));
            let got: Vec<u8> = frames.iter().flat_map(|f| node.accept(f).unwrap().to_vec()).collect();
            prop_assert_eq!(got, bytes);
        }
    }
}
