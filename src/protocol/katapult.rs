//! Katapult bootloader framing (see ../shared/reference/katapult-klipper-moonraker-can.md §1.5).
//!
//! Sans-IO codec for the framed protocol Katapult speaks on USB-serial, UART and CAN:
//!
//! ```text
//! 0x01 0x88 | cmd | len_words | payload (len_words * 4 bytes) | crc16 LE | 0x99 0x03
//! ```
//!
//! The CRC is CRC-16/MCRF4XX (Klipper's `crc16_ccitt`) over `cmd`, `len_words` and the
//! payload. All integers are little-endian. The same framing is used in both directions;
//! in a response the `cmd` byte is the ack type (0xa0 ACK, 0xf1 NACK, 0xf2 command error,
//! 0xf3 busy) and an ACK payload starts with the acknowledged command as a u32.
//!
//! Both sides of the link are covered: the host encodes [`Command`]s and decodes
//! [`Response`]s, a device (the test rig's simulator) decodes [`Command`]s and encodes
//! [`Response`]s. [`FrameDecoder`] is fed arbitrary byte chunks and yields frames or
//! framing errors, resynchronising on the next 0x01 byte like the firmware does.

use crc::{Crc, CRC_16_MCRF4XX};

/// First two bytes of every frame.
pub const FRAME_HEADER: [u8; 2] = [0x01, 0x88];
/// Last two bytes of every frame.
pub const FRAME_TRAILER: [u8; 2] = [0x99, 0x03];
/// Header (2) + cmd + len_words + crc (2) + trailer (2).
pub const FRAME_OVERHEAD: usize = 8;
/// Largest payload a frame can describe (`len_words` is one byte).
pub const MAX_PAYLOAD_LEN: usize = 255 * 4;
/// Largest possible frame.
pub const MAX_FRAME_LEN: usize = MAX_PAYLOAD_LEN + FRAME_OVERHEAD;
/// Largest frame the firmware accepts (`MESSAGE_MAX` in katapult src/command.h).
pub const DEVICE_MAX_FRAME_LEN: usize = 128;

/// Command codes (host → device).
pub const CMD_CONNECT: u8 = 0x11;
pub const CMD_SEND_BLOCK: u8 = 0x12;
pub const CMD_SEND_EOF: u8 = 0x13;
pub const CMD_REQUEST_BLOCK: u8 = 0x14;
pub const CMD_COMPLETE: u8 = 0x15;
pub const CMD_GET_CANBUS_ID: u8 = 0x16;
/// flashtool's "prime" command: deliberately unknown, answered with a command error.
pub const CMD_PRIME: u8 = 0x90;

/// Response codes (device → host).
pub const RESP_ACK: u8 = 0xa0;
pub const RESP_NACK: u8 = 0xf1;
pub const RESP_COMMAND_ERROR: u8 = 0xf2;
pub const RESP_BUSY: u8 = 0xf3;

/// Protocol version reported by current Katapult builds (1.1.0).
pub const PROTO_VERSION_1_1_0: u32 = 0x0001_0100;

const CRC16: Crc<u16> = Crc::<u16>::new(&CRC_16_MCRF4XX);

/// CRC-16/MCRF4XX (reflected 0x8408, init 0xFFFF, no final XOR) as used by Katapult and Klipper.
pub fn crc16(data: &[u8]) -> u16 {
    CRC16.checksum(data)
}

/// Why a byte sequence is not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame does not start with 01 88 (got {0:02x?})")]
    BadHeader(Vec<u8>),
    #[error("frame length {len} exceeds the maximum of {max} bytes")]
    TooLong { len: usize, max: usize },
    #[error("frame trailer is {0:02x?}, expected 99 03")]
    BadTrailer([u8; 2]),
    #[error("frame CRC mismatch: frame says {found:#06x}, computed {computed:#06x}")]
    BadCrc { found: u16, computed: u16 },
    #[error("frame is {got} bytes, its header says {expected}")]
    LengthMismatch { expected: usize, got: usize },
    #[error("frame is truncated ({0} bytes)")]
    Truncated(usize),
    #[error("payload length {0} is not a multiple of 4")]
    PayloadNotWordAligned(usize),
    #[error("payload length {0} exceeds {MAX_PAYLOAD_LEN} bytes")]
    PayloadTooLong(usize),
}

/// Why a well-formed frame does not carry a valid command or response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KatapultError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("{what}: payload is {got} bytes, need at least {need}")]
    ShortPayload { what: &'static str, need: usize, got: usize },
    #[error("unexpected response code {0:#04x}")]
    UnknownResponse(u8),
    #[error("expected an ACK for command {expected:#04x}, got one for {got:#04x}")]
    WrongAck { expected: u8, got: u8 },
    #[error("device answered with {0}")]
    NotAck(&'static str),
    #[error("{0} is not valid UTF-8")]
    BadString(&'static str),
}

/// One frame: the command / response code and its payload (a multiple of 4 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub cmd: u8,
    pub payload: Vec<u8>,
}

impl Frame {
    /// A frame; fails when the payload is not word aligned or too long.
    pub fn new(cmd: u8, payload: Vec<u8>) -> Result<Self, FrameError> {
        if !payload.len().is_multiple_of(4) {
            return Err(FrameError::PayloadNotWordAligned(payload.len()));
        }
        if payload.len() > MAX_PAYLOAD_LEN {
            return Err(FrameError::PayloadTooLong(payload.len()));
        }
        Ok(Frame { cmd, payload })
    }

    /// Total encoded length.
    pub fn encoded_len(&self) -> usize {
        self.payload.len() + FRAME_OVERHEAD
    }

    /// Encode with a correct CRC.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.extend_from_slice(&FRAME_HEADER);
        out.push(self.cmd);
        out.push((self.payload.len() / 4) as u8);
        out.extend_from_slice(&self.payload);
        let crc = crc16(&out[2..]);
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&FRAME_TRAILER);
        out
    }

    /// Decode exactly one complete frame (no leading or trailing bytes).
    pub fn decode(bytes: &[u8]) -> Result<Frame, FrameError> {
        if bytes.len() < 4 {
            return Err(FrameError::Truncated(bytes.len()));
        }
        if bytes[..2] != FRAME_HEADER {
            return Err(FrameError::BadHeader(bytes[..2].to_vec()));
        }
        let expected = bytes[3] as usize * 4 + FRAME_OVERHEAD;
        if bytes.len() != expected {
            return Err(FrameError::LengthMismatch { expected, got: bytes.len() });
        }
        check_body(bytes)
    }
}

/// Check trailer and CRC of a frame whose length is already known to be right.
fn check_body(bytes: &[u8]) -> Result<Frame, FrameError> {
    let n = bytes.len();
    if bytes[n - 2..] != FRAME_TRAILER {
        return Err(FrameError::BadTrailer([bytes[n - 2], bytes[n - 1]]));
    }
    let found = u16::from_le_bytes([bytes[n - 4], bytes[n - 3]]);
    let computed = crc16(&bytes[2..n - 4]);
    if found != computed {
        return Err(FrameError::BadCrc { found, computed });
    }
    Ok(Frame { cmd: bytes[2], payload: bytes[4..n - 4].to_vec() })
}

/// Streaming frame decoder. Feed it byte chunks with [`push`](Self::push) and pull frames
/// with [`next_frame`](Self::next_frame) (or use [`feed`](Self::feed) for both).
///
/// Resync rules (katapult src/command.c `command_find_block`): a frame must start at
/// `01 88`; any header, length, trailer or CRC problem yields **one** error, after which
/// bytes are discarded (at least one, then up to the next 0x01) without further errors
/// until a candidate frame start is found again. Whether to answer an error with a NACK
/// (the firmware only NACKs once until a valid frame arrives) is up to the caller.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    need_sync: bool,
    max_len: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    /// A decoder accepting frames up to [`MAX_FRAME_LEN`] (host side).
    pub fn new() -> Self {
        Self::with_max_len(MAX_FRAME_LEN)
    }

    /// A decoder rejecting frames longer than `max_len` (a device uses
    /// [`DEVICE_MAX_FRAME_LEN`]).
    pub fn with_max_len(max_len: usize) -> Self {
        FrameDecoder { buf: Vec::new(), need_sync: false, max_len: max_len.max(FRAME_OVERHEAD) }
    }

    /// Append received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered but not yet consumed.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Drop everything buffered (e.g. after a reconnect).
    pub fn clear(&mut self) {
        self.buf.clear();
        self.need_sync = false;
    }

    /// Next decoded frame or framing error; `None` when more bytes are needed.
    pub fn next_frame(&mut self) -> Option<Result<Frame, FrameError>> {
        if self.need_sync {
            match self.buf.iter().position(|&b| b == FRAME_HEADER[0]) {
                Some(p) => {
                    self.buf.drain(..p);
                    self.need_sync = false;
                }
                None => {
                    self.buf.clear();
                    return None;
                }
            }
        }
        if self.buf.is_empty() {
            return None;
        }
        // Check the header as soon as its bytes are there, so garbage is reported without
        // waiting for a full minimum-size frame.
        if self.buf[0] != FRAME_HEADER[0] {
            let err = FrameError::BadHeader(self.buf[..self.buf.len().min(2)].to_vec());
            return Some(Err(self.resync(err)));
        }
        if self.buf.len() < 2 {
            return None;
        }
        if self.buf[1] != FRAME_HEADER[1] {
            let err = FrameError::BadHeader(self.buf[..2].to_vec());
            return Some(Err(self.resync(err)));
        }
        if self.buf.len() < 4 {
            return None;
        }
        let len = self.buf[3] as usize * 4 + FRAME_OVERHEAD;
        if len > self.max_len {
            return Some(Err(self.resync(FrameError::TooLong { len, max: self.max_len })));
        }
        if self.buf.len() < len {
            return None;
        }
        match check_body(&self.buf[..len]) {
            Ok(frame) => {
                self.buf.drain(..len);
                Some(Ok(frame))
            }
            Err(e) => Some(Err(self.resync(e))),
        }
    }

    /// Push bytes and return everything that can be decoded now.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Result<Frame, FrameError>> {
        self.push(bytes);
        let mut out = Vec::new();
        while let Some(item) = self.next_frame() {
            out.push(item);
        }
        out
    }

    fn resync(&mut self, err: FrameError) -> FrameError {
        self.buf.drain(..1);
        self.need_sync = true;
        err
    }
}

fn le32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn need(what: &'static str, payload: &[u8], n: usize) -> Result<(), KatapultError> {
    if payload.len() < n {
        Err(KatapultError::ShortPayload { what, need: n, got: payload.len() })
    } else {
        Ok(())
    }
}

/// Pad to a multiple of 4 with NUL bytes.
fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// A host → device command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Connect,
    /// Write one block (`data` must be exactly the device's block size).
    SendBlock {
        addr: u32,
        data: Vec<u8>,
    },
    SendEof,
    RequestBlock {
        addr: u32,
    },
    Complete,
    GetCanbusId,
    /// Any other command code (e.g. flashtool's 0x90 prime); the payload is dropped.
    Unknown(u8),
}

impl Command {
    /// The command code.
    pub fn code(&self) -> u8 {
        match self {
            Command::Connect => CMD_CONNECT,
            Command::SendBlock { .. } => CMD_SEND_BLOCK,
            Command::SendEof => CMD_SEND_EOF,
            Command::RequestBlock { .. } => CMD_REQUEST_BLOCK,
            Command::Complete => CMD_COMPLETE,
            Command::GetCanbusId => CMD_GET_CANBUS_ID,
            Command::Unknown(c) => *c,
        }
    }

    /// The command as a frame. Fails only for a SEND_BLOCK whose data is not word aligned
    /// or too long.
    pub fn to_frame(&self) -> Result<Frame, FrameError> {
        let payload = match self {
            Command::SendBlock { addr, data } => {
                let mut p = addr.to_le_bytes().to_vec();
                p.extend_from_slice(data);
                p
            }
            Command::RequestBlock { addr } => addr.to_le_bytes().to_vec(),
            _ => Vec::new(),
        };
        Frame::new(self.code(), payload)
    }

    /// Encode to bytes (see [`to_frame`](Self::to_frame)).
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        Ok(self.to_frame()?.encode())
    }

    /// Interpret a received frame as a command. SEND_BLOCK / REQUEST_BLOCK without an
    /// address word are errors (a device answers them with a command error); checking the
    /// block length against the block size is left to the device.
    pub fn from_frame(frame: &Frame) -> Result<Command, KatapultError> {
        let p = &frame.payload;
        Ok(match frame.cmd {
            CMD_CONNECT => Command::Connect,
            CMD_SEND_BLOCK => {
                need("SEND_BLOCK", p, 4)?;
                Command::SendBlock { addr: le32(p, 0), data: p[4..].to_vec() }
            }
            CMD_SEND_EOF => Command::SendEof,
            CMD_REQUEST_BLOCK => {
                need("REQUEST_BLOCK", p, 4)?;
                Command::RequestBlock { addr: le32(p, 0) }
            }
            CMD_COMPLETE => Command::Complete,
            CMD_GET_CANBUS_ID => Command::GetCanbusId,
            other => Command::Unknown(other),
        })
    }
}

/// The CONNECT acknowledgement: what the bootloader says about itself.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConnectInfo {
    /// (major, minor, patch); current Katapult reports (1, 1, 0).
    pub proto_version: (u8, u8, u8),
    pub app_start: u32,
    pub block_size: u32,
    /// `CONFIG_MCU` of the bootloader build, e.g. `stm32h723xx`.
    pub mcu: String,
    /// Katapult's `git describe`; `None` for protocol < 1.1.0 or builds that omit it.
    pub version: Option<String>,
}

impl ConnectInfo {
    /// Protocol version as the u32 on the wire.
    pub fn proto_word(&self) -> u32 {
        let (a, b, c) = self.proto_version;
        (a as u32) << 16 | (b as u32) << 8 | c as u32
    }

    /// Parse the ACK payload that follows the acknowledged-command word.
    pub fn parse(body: &[u8]) -> Result<ConnectInfo, KatapultError> {
        need("CONNECT ack", body, 12)?;
        let proto_version = (body[2], body[1], body[0]);
        let app_start = le32(body, 4);
        let block_size = le32(body, 8);
        let rest = &body[12..];
        let (mcu, version) = if proto_version >= (1, 1, 0) {
            // MCU (NUL padded), one zero word, version (NUL padded): split at the first NUL
            // and strip every NUL around the version.
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            let ver = trim_nuls(&rest[end..]);
            (&rest[..end], if ver.is_empty() { None } else { Some(ver) })
        } else {
            (trim_nuls(rest), None)
        };
        let mcu = std::str::from_utf8(mcu).map_err(|_| KatapultError::BadString("MCU name"))?;
        let version = match version {
            Some(v) => {
                Some(std::str::from_utf8(v).map_err(|_| KatapultError::BadString("Katapult version"))?.to_string())
            }
            None => None,
        };
        Ok(ConnectInfo { proto_version, app_start, block_size, mcu: mcu.to_string(), version })
    }

    /// The ACK payload after the acknowledged-command word, laid out like the firmware does:
    /// proto, app start, block size, MCU padded to a word, one zero word (proto ≥ 1.1.0),
    /// version padded to a word.
    pub fn encode_body(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&self.proto_word().to_le_bytes());
        out.extend_from_slice(&self.app_start.to_le_bytes());
        out.extend_from_slice(&self.block_size.to_le_bytes());
        out.extend_from_slice(self.mcu.as_bytes());
        pad4(&mut out);
        if self.proto_version >= (1, 1, 0) {
            out.extend_from_slice(&[0; 4]);
            if let Some(v) = &self.version {
                out.extend_from_slice(v.as_bytes());
                pad4(&mut out);
            }
        }
        out
    }
}

fn trim_nuls(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|&c| c != 0).unwrap_or(b.len());
    let end = b.iter().rposition(|&c| c != 0).map_or(start, |p| p + 1);
    &b[start..end]
}

/// A device → host response frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// `cmd` is the acknowledged command; `payload` follows the acked-command word.
    Ack { cmd: u8, payload: Vec<u8> },
    /// 0xf1: the device saw a framing or CRC error.
    Nack,
    /// 0xf2: unknown command, bad arguments or a failed flash operation.
    CommandError,
    /// 0xf3: busy (flashtool waits 1.5 s and retries).
    Busy,
}

/// The typed content of an ACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckData {
    Connect(ConnectInfo),
    SendBlock {
        addr: u32,
    },
    SendEof {
        page_count: u32,
    },
    RequestBlock {
        addr: u32,
        data: Vec<u8>,
    },
    Complete,
    CanbusId([u8; 6]),
    /// An ACK for a command this codec does not know.
    Other {
        cmd: u8,
        payload: Vec<u8>,
    },
}

impl Response {
    /// Interpret a received frame as a response.
    pub fn from_frame(frame: &Frame) -> Result<Response, KatapultError> {
        match frame.cmd {
            RESP_ACK => {
                need("ACK", &frame.payload, 4)?;
                let acked = le32(&frame.payload, 0);
                Ok(Response::Ack { cmd: (acked & 0xff) as u8, payload: frame.payload[4..].to_vec() })
            }
            RESP_NACK => Ok(Response::Nack),
            RESP_COMMAND_ERROR => Ok(Response::CommandError),
            RESP_BUSY => Ok(Response::Busy),
            other => Err(KatapultError::UnknownResponse(other)),
        }
    }

    /// Decode exactly one complete response frame.
    pub fn decode(bytes: &[u8]) -> Result<Response, KatapultError> {
        Response::from_frame(&Frame::decode(bytes)?)
    }

    /// The response as a frame. Error frames have an empty payload (len_words 0).
    pub fn to_frame(&self) -> Result<Frame, FrameError> {
        match self {
            Response::Ack { cmd, payload } => {
                let mut p = (*cmd as u32).to_le_bytes().to_vec();
                p.extend_from_slice(payload);
                Frame::new(RESP_ACK, p)
            }
            Response::Nack => Frame::new(RESP_NACK, Vec::new()),
            Response::CommandError => Frame::new(RESP_COMMAND_ERROR, Vec::new()),
            Response::Busy => Frame::new(RESP_BUSY, Vec::new()),
        }
    }

    /// Encode to bytes.
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        Ok(self.to_frame()?.encode())
    }

    /// Build an ACK from typed data.
    pub fn ack(data: &AckData) -> Response {
        let (cmd, payload) = match data {
            AckData::Connect(info) => (CMD_CONNECT, info.encode_body()),
            AckData::SendBlock { addr } => (CMD_SEND_BLOCK, addr.to_le_bytes().to_vec()),
            AckData::SendEof { page_count } => (CMD_SEND_EOF, page_count.to_le_bytes().to_vec()),
            AckData::RequestBlock { addr, data } => {
                let mut p = addr.to_le_bytes().to_vec();
                p.extend_from_slice(data);
                (CMD_REQUEST_BLOCK, p)
            }
            AckData::Complete => (CMD_COMPLETE, Vec::new()),
            AckData::CanbusId(uuid) => {
                let mut p = uuid.to_vec();
                p.extend_from_slice(&[0, 0]);
                (CMD_GET_CANBUS_ID, p)
            }
            AckData::Other { cmd, payload } => (*cmd, payload.clone()),
        };
        Response::Ack { cmd, payload }
    }

    /// Typed view of an ACK. NACK / command error / busy become [`KatapultError::NotAck`].
    pub fn ack_data(&self) -> Result<AckData, KatapultError> {
        let (cmd, p) = match self {
            Response::Ack { cmd, payload } => (*cmd, payload),
            Response::Nack => return Err(KatapultError::NotAck("NACK (0xf1)")),
            Response::CommandError => return Err(KatapultError::NotAck("command error (0xf2)")),
            Response::Busy => return Err(KatapultError::NotAck("busy (0xf3)")),
        };
        Ok(match cmd {
            CMD_CONNECT => AckData::Connect(ConnectInfo::parse(p)?),
            CMD_SEND_BLOCK => {
                need("SEND_BLOCK ack", p, 4)?;
                AckData::SendBlock { addr: le32(p, 0) }
            }
            CMD_SEND_EOF => {
                need("SEND_EOF ack", p, 4)?;
                AckData::SendEof { page_count: le32(p, 0) }
            }
            CMD_REQUEST_BLOCK => {
                need("REQUEST_BLOCK ack", p, 4)?;
                AckData::RequestBlock { addr: le32(p, 0), data: p[4..].to_vec() }
            }
            CMD_COMPLETE => AckData::Complete,
            CMD_GET_CANBUS_ID => {
                need("GET_CANBUS_ID ack", p, 6)?;
                let mut id = [0u8; 6];
                id.copy_from_slice(&p[..6]);
                AckData::CanbusId(id)
            }
            other => AckData::Other { cmd: other, payload: p.clone() },
        })
    }

    /// Typed view of an ACK that must acknowledge `expected`.
    pub fn expect_ack(&self, expected: u8) -> Result<AckData, KatapultError> {
        if let Response::Ack { cmd, .. } = self {
            if *cmd != expected {
                return Err(KatapultError::WrongAck { expected, got: *cmd });
            }
        }
        self.ack_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parse a hex string with arbitrary whitespace and `|` separators.
    fn hex(s: &str) -> Vec<u8> {
        let digits: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
        assert!(digits.len().is_multiple_of(2), "odd hex string");
        (0..digits.len()).step_by(2).map(|i| u8::from_str_radix(&digits[i..i + 2], 16).unwrap()).collect()
    }

    fn h723_info() -> ConnectInfo {
        ConnectInfo {
            proto_version: (1, 1, 0),
            app_start: 0x0802_0000,
            block_size: 64,
            mcu: "stm32h723xx".into(),
            version: Some("v0.0.1-109-g902f335".into()),
        }
    }

    // Worked examples from the reference, §1.5, verbatim.
    const CONNECT_REQ: &str = "01 88 11 00 f1 7c 99 03";
    const CONNECT_ACK: &str = "01 88 a0 0d | 11 00 00 00 | 00 01 01 00 | 00 00 02 08 | 40 00 00 00 |
          73 74 6d 33 32 68 37 32 33 78 78 00 | 00 00 00 00 |
          76 30 2e 30 2e 31 2d 31 30 39 2d 67 39 30 32 66 33 33 35 00 | 47 7f | 99 03";
    const SEND_BLOCK_ACK: &str = "01 88 a0 02 12 00 00 00 00 00 02 08 d1 e6 99 03";
    const SEND_EOF_REQ: &str = "01 88 13 00 41 4f 99 03";
    const SEND_EOF_ACK: &str = "01 88 a0 02 13 00 00 00 01 00 00 00 2d c4 99 03";
    const REQUEST_BLOCK_REQ: &str = "01 88 14 01 00 00 02 08 d0 ee 99 03";
    const COMPLETE_REQ: &str = "01 88 15 00 91 1b 99 03";
    const COMPLETE_ACK: &str = "01 88 a0 01 15 00 00 00 00 2e 99 03";
    const GET_CANBUS_ID_REQ: &str = "01 88 16 00 f9 31 99 03";
    const GET_CANBUS_ID_ACK: &str = "01 88 a0 03 16 00 00 00 aa bb cc dd ee ff 00 00 fd 7d 99 03";
    const PRIME_REQ: &str = "01 88 90 00 e5 e9 99 03";
    const NACK: &str = "01 88 f1 00 68 95 99 03";
    const CMD_ERROR: &str = "01 88 f2 00 00 bf 99 03";
    const BUSY: &str = "01 88 f3 00 d8 a6 99 03";

    #[test]
    fn crc_check_value() {
        assert_eq!(crc16(b"123456789"), 0x6F91);
    }

    #[test]
    fn connect_request() {
        assert_eq!(Command::Connect.encode().unwrap(), hex(CONNECT_REQ));
        let f = Frame::decode(&hex(CONNECT_REQ)).unwrap();
        assert_eq!(Command::from_frame(&f).unwrap(), Command::Connect);
    }

    #[test]
    fn connect_ack_60_bytes() {
        let bytes = hex(CONNECT_ACK);
        assert_eq!(bytes.len(), 60);
        let enc = Response::ack(&AckData::Connect(h723_info())).encode().unwrap();
        assert_eq!(enc, bytes);
        let resp = Response::decode(&bytes).unwrap();
        assert_eq!(resp.expect_ack(CMD_CONNECT).unwrap(), AckData::Connect(h723_info()));
    }

    #[test]
    fn connect_ack_parse_variants() {
        // MCU name already a multiple of 4 ("rp2040" is not; "lpc1769x" is 8): the zero
        // word is the only separator.
        let info = ConnectInfo { mcu: "lpc1769x".into(), ..h723_info() };
        let body = info.encode_body();
        assert_eq!(ConnectInfo::parse(&body).unwrap(), info);
        // No version.
        let info = ConnectInfo { version: None, mcu: "rp2040".into(), ..h723_info() };
        assert_eq!(ConnectInfo::parse(&info.encode_body()).unwrap(), info);
        // Old CanBoot (proto 1.0.0): MCU only.
        let info = ConnectInfo { proto_version: (1, 0, 0), version: None, ..h723_info() };
        let body = info.encode_body();
        assert_eq!(body.len(), 12 + 12);
        assert_eq!(ConnectInfo::parse(&body).unwrap(), info);
        assert!(matches!(ConnectInfo::parse(&[0; 8]), Err(KatapultError::ShortPayload { .. })));
    }

    #[test]
    fn send_block_request_and_ack() {
        let data: Vec<u8> = (0..64u8).collect();
        let req = Command::SendBlock { addr: 0x0802_0000, data: data.clone() }.encode().unwrap();
        assert_eq!(req.len(), 76);
        assert_eq!(req[..8], hex("01 88 12 11 00 00 02 08")[..]);
        assert_eq!(req[8..72], data[..]);
        assert_eq!(req[74..], [0x99, 0x03]);
        let f = Frame::decode(&req).unwrap();
        assert_eq!(Command::from_frame(&f).unwrap(), Command::SendBlock { addr: 0x0802_0000, data });

        let ack = hex(SEND_BLOCK_ACK);
        assert_eq!(Response::ack(&AckData::SendBlock { addr: 0x0802_0000 }).encode().unwrap(), ack);
        assert_eq!(
            Response::decode(&ack).unwrap().expect_ack(CMD_SEND_BLOCK).unwrap(),
            AckData::SendBlock { addr: 0x0802_0000 }
        );
    }

    #[test]
    fn send_eof() {
        assert_eq!(Command::SendEof.encode().unwrap(), hex(SEND_EOF_REQ));
        let ack = hex(SEND_EOF_ACK);
        assert_eq!(Response::ack(&AckData::SendEof { page_count: 1 }).encode().unwrap(), ack);
        assert_eq!(Response::decode(&ack).unwrap().ack_data().unwrap(), AckData::SendEof { page_count: 1 });
    }

    #[test]
    fn request_block() {
        let req = hex(REQUEST_BLOCK_REQ);
        assert_eq!(Command::RequestBlock { addr: 0x0802_0000 }.encode().unwrap(), req);
        let f = Frame::decode(&req).unwrap();
        assert_eq!(Command::from_frame(&f).unwrap(), Command::RequestBlock { addr: 0x0802_0000 });
        // ACK: 01 88 a0 12 | 14 00 00 00 | 00 00 02 08 | <64 bytes> | crc | 99 03 (80 bytes)
        let data = vec![0xffu8; 64];
        let ack = Response::ack(&AckData::RequestBlock { addr: 0x0802_0000, data: data.clone() }).encode().unwrap();
        assert_eq!(ack.len(), 80);
        assert_eq!(ack[..12], hex("01 88 a0 12 14 00 00 00 00 00 02 08")[..]);
        assert_eq!(
            Response::decode(&ack).unwrap().ack_data().unwrap(),
            AckData::RequestBlock { addr: 0x0802_0000, data }
        );
    }

    #[test]
    fn complete() {
        assert_eq!(Command::Complete.encode().unwrap(), hex(COMPLETE_REQ));
        let ack = hex(COMPLETE_ACK);
        assert_eq!(Response::ack(&AckData::Complete).encode().unwrap(), ack);
        assert_eq!(Response::decode(&ack).unwrap().ack_data().unwrap(), AckData::Complete);
    }

    #[test]
    fn get_canbus_id() {
        assert_eq!(Command::GetCanbusId.encode().unwrap(), hex(GET_CANBUS_ID_REQ));
        let ack = hex(GET_CANBUS_ID_ACK);
        let id = [0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff];
        assert_eq!(Response::ack(&AckData::CanbusId(id)).encode().unwrap(), ack);
        assert_eq!(Response::decode(&ack).unwrap().ack_data().unwrap(), AckData::CanbusId(id));
    }

    #[test]
    fn prime_and_error_frames() {
        assert_eq!(Command::Unknown(CMD_PRIME).encode().unwrap(), hex(PRIME_REQ));
        let f = Frame::decode(&hex(PRIME_REQ)).unwrap();
        assert_eq!(Command::from_frame(&f).unwrap(), Command::Unknown(0x90));
        assert_eq!(Response::Nack.encode().unwrap(), hex(NACK));
        assert_eq!(Response::CommandError.encode().unwrap(), hex(CMD_ERROR));
        assert_eq!(Response::Busy.encode().unwrap(), hex(BUSY));
        assert_eq!(Response::decode(&hex(NACK)).unwrap(), Response::Nack);
        assert_eq!(Response::decode(&hex(CMD_ERROR)).unwrap(), Response::CommandError);
        assert_eq!(Response::decode(&hex(BUSY)).unwrap(), Response::Busy);
        assert!(matches!(Response::decode(&hex(CMD_ERROR)).unwrap().ack_data(), Err(KatapultError::NotAck(_))));
    }

    #[test]
    fn wrong_ack_is_reported() {
        let r = Response::decode(&hex(SEND_EOF_ACK)).unwrap();
        assert_eq!(
            r.expect_ack(CMD_CONNECT),
            Err(KatapultError::WrongAck { expected: CMD_CONNECT, got: CMD_SEND_EOF })
        );
    }

    #[test]
    fn missing_address_is_an_error() {
        let f = Frame::new(CMD_REQUEST_BLOCK, vec![]).unwrap();
        assert!(matches!(Command::from_frame(&f), Err(KatapultError::ShortPayload { .. })));
    }

    #[test]
    fn frame_new_validates() {
        assert_eq!(Frame::new(1, vec![0; 3]), Err(FrameError::PayloadNotWordAligned(3)));
        assert_eq!(Frame::new(1, vec![0; 1024]), Err(FrameError::PayloadTooLong(1024)));
    }

    #[test]
    fn decoder_byte_by_byte() {
        let mut d = FrameDecoder::new();
        let bytes = hex(CONNECT_ACK);
        let mut got = Vec::new();
        for b in &bytes {
            got.extend(d.feed(&[*b]));
        }
        assert_eq!(got.len(), 1);
        let f = got.pop().unwrap().unwrap();
        assert_eq!(f.cmd, RESP_ACK);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn decoder_several_frames_in_one_chunk() {
        let mut d = FrameDecoder::new();
        let mut bytes = hex(CONNECT_REQ);
        bytes.extend(hex(SEND_EOF_REQ));
        bytes.extend(hex(COMPLETE_REQ)[..5].to_vec());
        let out = d.feed(&bytes);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].as_ref().unwrap().cmd, CMD_CONNECT);
        assert_eq!(out[1].as_ref().unwrap().cmd, CMD_SEND_EOF);
        let out = d.feed(&hex(COMPLETE_REQ)[5..]);
        assert_eq!(out, vec![Ok(Frame { cmd: CMD_COMPLETE, payload: vec![] })]);
    }

    #[test]
    fn decoder_garbage_then_frame_one_error() {
        let mut d = FrameDecoder::new();
        let mut bytes = vec![0x55, 0x66, 0x77];
        bytes.extend(hex(CONNECT_REQ));
        let out = d.feed(&bytes);
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(matches!(out[0], Err(FrameError::BadHeader(_))));
        assert_eq!(out[1].as_ref().unwrap().cmd, CMD_CONNECT);
    }

    #[test]
    fn decoder_bad_crc_resyncs() {
        let mut d = FrameDecoder::new();
        let mut bad = hex(CONNECT_REQ);
        bad[4] ^= 0xff;
        let mut bytes = bad.clone();
        bytes.extend(hex(SEND_EOF_REQ));
        let out = d.feed(&bytes);
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(matches!(out[0], Err(FrameError::BadCrc { .. })));
        assert_eq!(out[1].as_ref().unwrap().cmd, CMD_SEND_EOF);
        // Bad trailer
        let mut bad = hex(COMPLETE_REQ);
        bad[7] = 0;
        let out = d.feed(&bad);
        assert_eq!(out, vec![Err(FrameError::BadTrailer([0x99, 0]))]);
        let out = d.feed(&hex(COMPLETE_REQ));
        assert_eq!(out, vec![Ok(Frame { cmd: CMD_COMPLETE, payload: vec![] })]);
    }

    #[test]
    fn decoder_too_long_for_device() {
        let mut d = FrameDecoder::with_max_len(DEVICE_MAX_FRAME_LEN);
        let big = Command::SendBlock { addr: 0, data: vec![0; 256] }.encode().unwrap();
        let mut bytes = big;
        bytes.extend(hex(CONNECT_REQ));
        let out = d.feed(&bytes);
        assert!(matches!(out[0], Err(FrameError::TooLong { len: 268, max: 128 })));
        // The payload of the oversized frame contains no 0x01, so the next frame is found.
        assert_eq!(out.last().unwrap().as_ref().unwrap().cmd, CMD_CONNECT);
        assert_eq!(out.iter().filter(|r| r.is_err()).count(), 1);
    }

    #[test]
    fn decode_exact_rejects_length_mismatch() {
        let mut b = hex(CONNECT_REQ);
        b.push(0);
        assert!(matches!(Frame::decode(&b), Err(FrameError::LengthMismatch { .. })));
    }
}
