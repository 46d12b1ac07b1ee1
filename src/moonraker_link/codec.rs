//! Moonraker's Unix-socket framing, without any I/O: every message is one UTF-8 JSON
//! document followed by ETX (0x03), in both directions. Bytes go in as they arrive (a
//! read may hold part of a frame, or several); whole frames come out. A frame that is not
//! UTF-8 or not JSON is reported as an error and skipped; the stream stays in step
//! because the next frame starts after the next ETX.

use serde_json::Value;

/// The frame terminator.
pub const ETX: u8 = 0x03;

/// Moonraker's own limit for one Unix-socket message (`UNIX_BUFFER_LIMIT`, 20 MiB). A
/// longer run of bytes without ETX is not Moonraker talking: it is dropped so memory
/// stays bounded.
pub const MAX_FRAME: usize = 20 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FrameError {
    #[error("frame is not UTF-8: {0}")]
    NotUtf8(String),
    #[error("frame is not JSON: {0}")]
    NotJson(String),
    #[error("frame longer than {MAX_FRAME} bytes without ETX; {0} bytes dropped")]
    TooLong(usize),
}

/// Collects bytes and splits them into frames.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Bytes dropped from an over-long frame; the rest of it up to the next ETX is dropped too.
    discarding: Option<usize>,
}

impl FrameDecoder {
    pub fn new() -> FrameDecoder {
        FrameDecoder::default()
    }

    /// Bytes held back waiting for their ETX.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Feed bytes as read; returns every frame they complete, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Result<Value, FrameError>> {
        let mut out = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            let end = rest.iter().position(|&b| b == ETX);
            let (chunk, complete) = match end {
                Some(i) => (&rest[..i], true),
                None => (rest, false),
            };
            rest = if complete { &rest[chunk.len() + 1..] } else { &[] };
            if let Some(dropped) = self.discarding.as_mut() {
                *dropped += chunk.len();
                if complete {
                    out.push(Err(FrameError::TooLong(*dropped)));
                    self.discarding = None;
                }
                continue;
            }
            if self.buf.len() + chunk.len() > MAX_FRAME {
                self.discarding = Some(self.buf.len() + chunk.len());
                self.buf = Vec::new();
                if complete {
                    out.push(Err(FrameError::TooLong(self.discarding.take().unwrap_or_default())));
                }
                continue;
            }
            self.buf.extend_from_slice(chunk);
            if complete {
                let frame = std::mem::take(&mut self.buf);
                out.push(decode(&frame));
            }
        }
        out
    }
}

fn decode(frame: &[u8]) -> Result<Value, FrameError> {
    let text = std::str::from_utf8(frame).map_err(|e| FrameError::NotUtf8(e.to_string()))?;
    serde_json::from_str(text).map_err(|e| FrameError::NotJson(e.to_string()))
}

/// One message, ready to write.
pub fn encode(message: &Value) -> Vec<u8> {
    let mut out = serde_json::to_vec(message).unwrap_or_default();
    out.push(ETX);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn one_frame_in_one_read() {
        let mut d = FrameDecoder::new();
        assert_eq!(d.push(b"{\"a\":1}\x03"), vec![Ok(json!({"a": 1}))]);
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn a_frame_split_at_every_byte() {
        let bytes = encode(&json!({"jsonrpc": "2.0", "method": "notify_klippy_ready", "s": "Grüße"}));
        let mut d = FrameDecoder::new();
        let mut frames = Vec::new();
        for b in &bytes {
            frames.extend(d.push(std::slice::from_ref(b)));
        }
        assert_eq!(frames, vec![Ok(json!({"jsonrpc": "2.0", "method": "notify_klippy_ready", "s": "Grüße"}))]);
    }

    #[test]
    fn several_frames_and_a_partial_one_in_one_read() {
        let mut d = FrameDecoder::new();
        let frames = d.push(b"1\x03[2]\x03{\"x\":");
        assert_eq!(frames, vec![Ok(json!(1)), Ok(json!([2]))]);
        assert_eq!(d.pending(), 5);
        assert_eq!(d.push(b"3}\x03"), vec![Ok(json!({"x": 3}))]);
    }

    #[test]
    fn invalid_utf8_is_skipped_and_the_stream_stays_in_step() {
        let mut d = FrameDecoder::new();
        let frames = d.push(b"\"ok\"\x03\xff\xfe\x03{\"b\":2}\x03");
        assert_eq!(frames.len(), 3);
        assert_eq!(frames[0], Ok(json!("ok")));
        assert!(matches!(frames[1], Err(FrameError::NotUtf8(_))), "{:?}", frames[1]);
        assert_eq!(frames[2], Ok(json!({"b": 2})));
    }

    #[test]
    fn invalid_json_and_empty_frames_are_errors() {
        let mut d = FrameDecoder::new();
        let frames = d.push(b"{\"a\":\x03\x03not json\x03{\"c\":3}\x03");
        assert_eq!(frames.len(), 4);
        assert!(frames[..3].iter().all(|f| matches!(f, Err(FrameError::NotJson(_)))), "{frames:?}");
        assert_eq!(frames[3], Ok(json!({"c": 3})));
    }

    #[test]
    fn an_overlong_frame_is_dropped_without_holding_it() {
        let mut d = FrameDecoder::new();
        let big = vec![b'x'; MAX_FRAME / 2 + 1];
        assert!(d.push(&big).is_empty());
        assert!(d.push(&big).is_empty());
        assert_eq!(d.pending(), 0, "the over-long frame is not kept in memory");
        let frames = d.push(b"yy\x03{\"after\":true}\x03");
        assert_eq!(frames, vec![Err(FrameError::TooLong(2 * big.len() + 2)), Ok(json!({"after": true}))]);
    }

    #[test]
    fn encode_ends_with_etx_and_round_trips() {
        let msg = json!({"jsonrpc": "2.0", "method": "server.info", "id": 7});
        let bytes = encode(&msg);
        assert_eq!(bytes.last(), Some(&ETX));
        assert_eq!(bytes.iter().filter(|&&b| b == ETX).count(), 1, "JSON text never contains a raw 0x03");
        assert_eq!(FrameDecoder::new().push(&bytes), vec![Ok(msg)]);
    }
}
