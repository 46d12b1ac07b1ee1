//! The Klipper firmware side of the message-block protocol (pure, no I/O): sequence
//! numbers, ack/nak and `identify`. Rules from Klipper docs/Protocol.md "Message flow":
//! every valid block in sequence is acked with an empty block carrying the next expected
//! sequence; an out-of-sequence block is answered with such an empty block (a nak) and
//! dropped; a corrupt block is nak'ed once until a valid block arrives. Responses carry
//! the next expected sequence too.

use kflash::protocol::klipper::{
    decode_vlq, BlockDecoder, IdentifyRequest, IdentifyResponse, MessageBlock, ID_IDENTIFY, MESSAGE_SEQ_MASK,
};

/// Something worth logging.
#[derive(Debug, Clone, PartialEq)]
pub enum KlipperEvent {
    Identify {
        offset: u32,
        count: u8,
        sent: usize,
    },
    /// An identify past the end of the dictionary: the host now has all of it.
    IdentifyDone {
        size: usize,
    },
    Nak {
        expected: u8,
        got: Option<u8>,
    },
    /// A command the simulator does not implement; the rest of the block was skipped.
    UnknownCommand {
        id: u32,
    },
}

#[derive(Debug, Clone)]
pub struct KlipperDevice {
    decoder: BlockDecoder,
    next_seq: u8,
    need_valid: bool,
    /// zlib-compressed data dictionary served through identify.
    dict: Vec<u8>,
}

impl KlipperDevice {
    /// A freshly booted firmware (expects sequence 0).
    pub fn new(compressed_dict: Vec<u8>) -> Self {
        KlipperDevice { decoder: BlockDecoder::new(), next_seq: 0, need_valid: false, dict: compressed_dict }
    }

    /// Replace the served dictionary (the firmware was changed behind the host's back).
    pub fn set_dictionary(&mut self, compressed_dict: Vec<u8>) {
        self.dict = compressed_dict;
    }

    /// Feed received bytes; returns the blocks to send (encoded) and events.
    pub fn feed(&mut self, bytes: &[u8]) -> (Vec<MessageBlock>, Vec<KlipperEvent>) {
        self.decoder.push(bytes);
        let mut out = Vec::new();
        let mut ev = Vec::new();
        while let Some(item) = self.decoder.next_block() {
            let block = match item {
                Err(_) => {
                    if !self.need_valid {
                        self.need_valid = true;
                        out.push(MessageBlock::ack(self.next_seq));
                        ev.push(KlipperEvent::Nak { expected: self.next_seq, got: None });
                    }
                    continue;
                }
                Ok(b) => b,
            };
            self.need_valid = false;
            if block.seq != self.next_seq {
                out.push(MessageBlock::ack(self.next_seq));
                ev.push(KlipperEvent::Nak { expected: self.next_seq, got: Some(block.seq) });
                continue;
            }
            self.next_seq = (self.next_seq + 1) & MESSAGE_SEQ_MASK;
            self.dispatch(&block.content, &mut out, &mut ev);
            out.push(MessageBlock::ack(self.next_seq));
        }
        (out, ev)
    }

    fn dispatch(&mut self, content: &[u8], out: &mut Vec<MessageBlock>, ev: &mut Vec<KlipperEvent>) {
        let mut pos = 0;
        while pos < content.len() {
            let Ok((id, _)) = decode_vlq(&content[pos..]) else {
                return;
            };
            if id != ID_IDENTIFY {
                ev.push(KlipperEvent::UnknownCommand { id });
                return;
            }
            let Ok((req, used)) = IdentifyRequest::parse(&content[pos..]) else {
                return;
            };
            pos += used;
            let resp = IdentifyResponse::for_request(&req, &self.dict);
            ev.push(KlipperEvent::Identify { offset: req.offset, count: req.count, sent: resp.data.len() });
            if resp.data.is_empty() {
                ev.push(KlipperEvent::IdentifyDone { size: self.dict.len() });
            }
            // count is at most 255 in the protocol but a block holds 59 content bytes: cut
            // the chunk so the response fits (Klipper's encoder does the same).
            let mut resp = resp;
            while resp.encode().len() > kflash::protocol::klipper::MESSAGE_PAYLOAD_MAX {
                resp.data.pop();
            }
            out.push(resp.to_block(self.next_seq).expect("response was cut to fit"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kflash::protocol::klipper::{compress_dictionary, IdentifyClient, IdentifyProgress};

    fn dict() -> Vec<u8> {
        compress_dictionary(&crate::firmware::dictionary_json("Kalico", "v2026.01.00-1-gabc", "rp2040", 12_000_000))
    }

    fn run(dev: &mut KlipperDevice, client: &mut IdentifyClient) -> kflash::protocol::klipper::DataDictionary {
        let mut to_dev = client.start();
        for _ in 0..500 {
            let (blocks, _) = dev.feed(&to_dev);
            to_dev.clear();
            let bytes: Vec<u8> = blocks.iter().flat_map(|b| b.encode()).collect();
            match client.feed(&bytes).unwrap() {
                IdentifyProgress::Send(b) => to_dev = b,
                IdentifyProgress::Done(d) => return d,
                IdentifyProgress::Pending => to_dev = client.on_timeout().unwrap(),
            }
        }
        panic!("no result");
    }

    #[test]
    fn identify_with_client_twice() {
        let mut dev = KlipperDevice::new(dict());
        let d = run(&mut dev, &mut IdentifyClient::new());
        assert_eq!(d.app.as_deref(), Some("Kalico"));
        assert_eq!(d.mcu, "rp2040");
        // A second host session: the device's sequence has moved on; the client resyncs.
        let d = run(&mut dev, &mut IdentifyClient::with_chunk_size(13));
        assert_eq!(d.version, "v2026.01.00-1-gabc");
    }

    #[test]
    fn naks() {
        let mut dev = KlipperDevice::new(dict());
        let req = IdentifyRequest { offset: 0, count: 40 };
        let (out, ev) = dev.feed(&req.to_block(5).encode());
        assert_eq!(out, vec![MessageBlock::ack(0)]);
        assert_eq!(ev, vec![KlipperEvent::Nak { expected: 0, got: Some(5) }]);
        // corrupt blocks: one nak only
        let mut bad = req.to_block(0).encode();
        bad[3] ^= 0x55;
        let mut bytes = bad.clone();
        bytes.extend(&bad);
        let (out, _) = dev.feed(&bytes);
        assert_eq!(out, vec![MessageBlock::ack(0)]);
        // valid in-sequence block: response + ack, both with seq 1
        let (out, ev) = dev.feed(&req.to_block(0).encode());
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].seq, 1);
        assert_eq!(out[1], MessageBlock::ack(1));
        assert!(matches!(ev[0], KlipperEvent::Identify { offset: 0, count: 40, sent: 40 }));
    }
}
