//! The Klipper firmware side of the message-block protocol (pure, no I/O): sequence
//! numbers, ack/nak, and the commands Klippy uses to bring an MCU up. Rules from Klipper's
//! docs/Protocol.md and src/command.c, src/basecmd.c, src/sched.c:
//!
//! * every valid block in sequence is dispatched and then acked with an empty block carrying
//!   the next expected sequence; an out-of-sequence block is answered with such an empty block
//!   (a nak) and dropped; a corrupt block is nak'ed once until a valid block arrives. Every
//!   response is its own block and carries the next expected sequence too;
//! * commands are decoded with the data dictionary the firmware serves (ids and parameter
//!   formats), responses encoded with it; an id the dictionary does not have shuts the
//!   firmware down ("Invalid command") like the real one;
//! * `identify`, `get_uptime` / `get_clock` (a model clock at CLOCK_FREQ from the time given
//!   to [`KlipperDevice::feed`], i.e. since boot), `get_config`, `allocate_oids`,
//!   `finalize_config` (stores the CRC; `move_count` 1024), `emergency_stop` (shutdown
//!   "Command request"), `clear_shutdown`, `config_reset`, `reset` (the caller reboots the
//!   board: [`KlipperEvent::Reset`]); other known commands are accepted and do nothing;
//! * in shutdown only the commands Klipper flags HF_IN_SHUTDOWN run; any other is answered with
//!   `is_shutdown static_string_id=…`. The configuration stays until the board reboots.

use std::collections::HashMap;
use std::time::Duration;

use kflash::protocol::klipper::{
    decode_bytes, decode_vlq, encode_bytes, encode_vlq, encode_vlq_i32, BlockDecoder, DataDictionary, IdentifyRequest,
    IdentifyResponse, MessageBlock, ID_IDENTIFY, MESSAGE_PAYLOAD_MAX, MESSAGE_SEQ_MASK,
};
use serde_json::Value;

/// Commands Klipper declares with HF_IN_SHUTDOWN (they also run while shut down).
const IN_SHUTDOWN: &[&str] = &[
    "identify",
    "get_config",
    "get_clock",
    "get_uptime",
    "emergency_stop",
    "clear_shutdown",
    "config_reset",
    "reset",
    "debug_read",
    "debug_write",
    "debug_ping",
    "debug_nop",
    "get_canbus_status",
    "get_canbus_id",
];

/// `move_count` reported after `finalize_config` (Klipper allocates at most 1024 moves).
pub const MOVE_COUNT: u32 = 1024;

/// Something worth logging (or, for `Reset`, acting on).
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
    /// An id the dictionary does not declare (the firmware shut down).
    UnknownCommand {
        id: i32,
    },
    /// `finalize_config`: the host configured the board.
    Configured {
        oids: u8,
        crc: u32,
    },
    /// The firmware entered the shutdown state.
    Shutdown {
        reason: String,
    },
    /// `clear_shutdown` / `config_reset` left the shutdown state.
    ShutdownCleared,
    /// `reset`: the firmware resets itself now (the caller reboots the board). Nothing after
    /// the command is processed or acked.
    Reset,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ParamType {
    Int,
    Bytes,
}

#[derive(Debug, Clone)]
struct MsgFormat {
    name: String,
    params: Vec<(String, ParamType)>,
}

impl MsgFormat {
    fn parse(format: &str) -> MsgFormat {
        let mut words = format.split_whitespace();
        let name = words.next().unwrap_or_default().to_string();
        let params = words
            .filter_map(|w| w.split_once('='))
            .map(|(k, t)| (k.to_string(), if t.ends_with('s') { ParamType::Bytes } else { ParamType::Int }))
            .collect();
        MsgFormat { name, params }
    }
}

/// A decoded parameter.
#[derive(Debug, Clone, PartialEq)]
pub enum Arg {
    Int(u32),
    Bytes(Vec<u8>),
}

impl Arg {
    fn int(&self) -> u32 {
        match self {
            Arg::Int(v) => *v,
            Arg::Bytes(_) => 0,
        }
    }
}

/// What the firmware knows from its own data dictionary.
#[derive(Debug, Clone, Default)]
struct Protocol {
    commands: HashMap<i32, MsgFormat>,
    responses: HashMap<String, (i32, MsgFormat)>,
    static_strings: HashMap<String, u32>,
    clock_freq: u64,
}

impl Protocol {
    fn from_compressed(dict: &[u8]) -> Protocol {
        let Ok(d) = DataDictionary::from_zlib(dict) else {
            return Protocol::default();
        };
        let json = d.json();
        let ids = |key: &str| -> Vec<(String, i32)> {
            json.get(key)
                .and_then(Value::as_object)
                .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_i64()? as i32))).collect())
                .unwrap_or_default()
        };
        let commands = ids("commands").into_iter().map(|(f, id)| (id, MsgFormat::parse(&f))).collect();
        let responses = ids("responses")
            .into_iter()
            .map(|(f, id)| {
                let m = MsgFormat::parse(&f);
                (m.name.clone(), (id, m))
            })
            .collect();
        let static_strings = json
            .pointer("/enumerations/static_string_id")
            .and_then(Value::as_object)
            .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_u64()? as u32))).collect())
            .unwrap_or_default();
        let clock_freq = d.constant("CLOCK_FREQ").and_then(|c| c.parse::<f64>().ok()).unwrap_or(0.0) as u64;
        Protocol { commands, responses, static_strings, clock_freq }
    }

    /// Encode a response by name; `None` when the dictionary does not declare it.
    fn encode(&self, name: &str, args: &[Arg]) -> Option<Vec<u8>> {
        let (id, fmt) = self.responses.get(name)?;
        let mut out = Vec::new();
        encode_vlq_i32(*id, &mut out);
        for ((_, t), a) in fmt.params.iter().zip(args) {
            match (t, a) {
                (ParamType::Int, Arg::Int(v)) => encode_vlq(*v, &mut out),
                (ParamType::Bytes, Arg::Bytes(b)) => encode_bytes(b, &mut out),
                (ParamType::Int, Arg::Bytes(_)) => encode_vlq(0, &mut out),
                (ParamType::Bytes, Arg::Int(_)) => encode_bytes(&[], &mut out),
            }
        }
        Some(out)
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
struct Config {
    oids: Option<u8>,
    finalized: bool,
    crc: u32,
}

#[derive(Debug, Clone)]
pub struct KlipperDevice {
    decoder: BlockDecoder,
    next_seq: u8,
    need_valid: bool,
    /// zlib-compressed data dictionary served through identify.
    dict: Vec<u8>,
    proto: Protocol,
    config: Config,
    /// static_string_id of the shutdown reason while shut down.
    shutdown: Option<u32>,
    /// `reset` was executed: the firmware is gone until the caller reboots it.
    reset: bool,
    /// A CAN build answers `get_canbus_id` with its UUID (Klippy checks it after connecting).
    pub canbus_uuid: Option<[u8; 6]>,
}

/// Why the rest of a block is not processed.
enum Stop {
    /// The firmware shut down in the middle of the block (Klipper longjmps out of it).
    Shutdown,
    /// `reset`.
    Reset,
}

impl KlipperDevice {
    /// A freshly booted firmware (expects sequence 0, not configured).
    pub fn new(compressed_dict: Vec<u8>) -> Self {
        KlipperDevice {
            decoder: BlockDecoder::new(),
            next_seq: 0,
            need_valid: false,
            proto: Protocol::from_compressed(&compressed_dict),
            dict: compressed_dict,
            config: Config::default(),
            shutdown: None,
            reset: false,
            canbus_uuid: None,
        }
    }

    /// Replace the served dictionary (the firmware was changed behind the host's back). The
    /// running firmware keeps its message ids.
    pub fn set_dictionary(&mut self, compressed_dict: Vec<u8>) {
        self.dict = compressed_dict;
    }

    /// Configured (`finalize_config` seen since boot)?
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn is_configured(&self) -> bool {
        self.config.finalized
    }

    /// The CRC stored by `finalize_config` (0 before).
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn config_crc(&self) -> u32 {
        self.config.crc
    }

    /// Shut down?
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn is_shutdown(&self) -> bool {
        self.shutdown.is_some()
    }

    /// The firmware's clock `since_boot` after boot (64 bits).
    pub fn clock_at(&self, since_boot: Duration) -> u64 {
        (since_boot.as_nanos() * self.proto.clock_freq as u128 / 1_000_000_000) as u64
    }

    /// Feed received bytes at `since_boot` (the model clock's time); returns the blocks to
    /// send (in order) and events.
    pub fn feed(&mut self, bytes: &[u8], since_boot: Duration) -> (Vec<MessageBlock>, Vec<KlipperEvent>) {
        let mut out = Vec::new();
        let mut ev = Vec::new();
        if self.reset {
            return (out, ev);
        }
        self.decoder.push(bytes);
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
            if let Err(Stop::Reset) = self.dispatch(&block.content, since_boot, &mut out, &mut ev) {
                self.reset = true;
                self.decoder.clear();
                return (out, ev);
            }
            out.push(MessageBlock::ack(self.next_seq));
        }
        (out, ev)
    }

    fn respond(&self, name: &str, args: &[Arg], out: &mut Vec<MessageBlock>) {
        if let Some(content) = self.proto.encode(name, args) {
            if let Ok(b) = MessageBlock::new(self.next_seq, content) {
                out.push(b);
            }
        }
    }

    fn enter_shutdown(&mut self, reason: &str, now: Duration, out: &mut Vec<MessageBlock>, ev: &mut Vec<KlipperEvent>) {
        if self.shutdown.is_some() {
            return;
        }
        let id = self.proto.static_strings.get(reason).copied().unwrap_or(0);
        self.shutdown = Some(id);
        let clock = self.clock_at(now) as u32;
        self.respond("shutdown", &[Arg::Int(clock), Arg::Int(id)], out);
        ev.push(KlipperEvent::Shutdown { reason: reason.to_string() });
    }

    fn dispatch(
        &mut self,
        content: &[u8],
        now: Duration,
        out: &mut Vec<MessageBlock>,
        ev: &mut Vec<KlipperEvent>,
    ) -> Result<(), Stop> {
        let mut pos = 0;
        while pos < content.len() {
            let Ok((id, used)) = decode_vlq(&content[pos..]) else {
                self.enter_shutdown("Command parser error", now, out, ev);
                return Err(Stop::Shutdown);
            };
            if id == ID_IDENTIFY {
                // Served from the dictionary bytes even when they do not parse.
                let Ok((req, used)) = IdentifyRequest::parse(&content[pos..]) else {
                    self.enter_shutdown("Command parser error", now, out, ev);
                    return Err(Stop::Shutdown);
                };
                pos += used;
                self.identify(req, out, ev);
                continue;
            }
            let id = id as i32;
            let Some(fmt) = self.proto.commands.get(&id).cloned() else {
                ev.push(KlipperEvent::UnknownCommand { id });
                self.enter_shutdown("Invalid command", now, out, ev);
                return Err(Stop::Shutdown);
            };
            pos += used;
            let mut args = Vec::with_capacity(fmt.params.len());
            for (_, t) in &fmt.params {
                let parsed = match t {
                    ParamType::Int => decode_vlq(&content[pos..]).map(|(v, n)| (Arg::Int(v), n)),
                    ParamType::Bytes => decode_bytes(&content[pos..]).map(|(b, n)| (Arg::Bytes(b.to_vec()), n)),
                };
                let Ok((a, n)) = parsed else {
                    self.enter_shutdown("Command parser error", now, out, ev);
                    return Err(Stop::Shutdown);
                };
                pos += n;
                args.push(a);
            }
            if self.shutdown.is_some() && !IN_SHUTDOWN.contains(&fmt.name.as_str()) {
                let id = self.shutdown.unwrap_or(0);
                self.respond("is_shutdown", &[Arg::Int(id)], out);
                continue;
            }
            self.run(&fmt.name, &args, now, out, ev)?;
        }
        Ok(())
    }

    fn identify(&mut self, req: IdentifyRequest, out: &mut Vec<MessageBlock>, ev: &mut Vec<KlipperEvent>) {
        let mut resp = IdentifyResponse::for_request(&req, &self.dict);
        ev.push(KlipperEvent::Identify { offset: req.offset, count: req.count, sent: resp.data.len() });
        if resp.data.is_empty() {
            ev.push(KlipperEvent::IdentifyDone { size: self.dict.len() });
        }
        // count is at most 255 in the protocol but a block holds 59 content bytes: cut the
        // chunk so the response fits (Klipper's encoder does the same).
        while resp.encode().len() > MESSAGE_PAYLOAD_MAX {
            resp.data.pop();
        }
        out.push(resp.to_block(self.next_seq).expect("response was cut to fit"));
    }

    fn run(
        &mut self,
        name: &str,
        args: &[Arg],
        now: Duration,
        out: &mut Vec<MessageBlock>,
        ev: &mut Vec<KlipperEvent>,
    ) -> Result<(), Stop> {
        let arg = |i: usize| args.get(i).map(Arg::int).unwrap_or(0);
        match name {
            "get_uptime" => {
                let clock = self.clock_at(now);
                self.respond("uptime", &[Arg::Int((clock >> 32) as u32), Arg::Int(clock as u32)], out);
            }
            "get_clock" => {
                let clock = self.clock_at(now);
                self.respond("clock", &[Arg::Int(clock as u32)], out);
            }
            "get_config" => {
                let c = &self.config;
                let move_count = if c.finalized { MOVE_COUNT } else { 0 };
                let a = [
                    Arg::Int(c.finalized as u32),
                    Arg::Int(c.crc),
                    Arg::Int(self.shutdown.is_some() as u32),
                    Arg::Int(move_count),
                ];
                self.respond("config", &a, out);
            }
            "allocate_oids" => {
                if self.config.oids.is_some() {
                    self.enter_shutdown("oids already allocated", now, out, ev);
                    return Err(Stop::Shutdown);
                }
                self.config.oids = Some(arg(0) as u8);
            }
            "finalize_config" => {
                if self.config.finalized {
                    self.enter_shutdown("Already finalized", now, out, ev);
                    return Err(Stop::Shutdown);
                }
                self.config.finalized = true;
                self.config.crc = arg(0);
                ev.push(KlipperEvent::Configured { oids: self.config.oids.unwrap_or(0), crc: self.config.crc });
            }
            "emergency_stop" => {
                self.enter_shutdown("Command request", now, out, ev);
                return Err(Stop::Shutdown);
            }
            "clear_shutdown" => {
                if self.shutdown.is_none() {
                    self.enter_shutdown("Shutdown cleared when not shutdown", now, out, ev);
                    return Err(Stop::Shutdown);
                }
                self.shutdown = None;
                ev.push(KlipperEvent::ShutdownCleared);
            }
            "config_reset" => {
                if self.shutdown.is_none() {
                    self.enter_shutdown("config_reset only available when shutdown", now, out, ev);
                    return Err(Stop::Shutdown);
                }
                self.config = Config::default();
                self.shutdown = None;
                ev.push(KlipperEvent::ShutdownCleared);
            }
            "reset" => {
                ev.push(KlipperEvent::Reset);
                return Err(Stop::Reset);
            }
            "get_canbus_id" => {
                if let Some(uuid) = self.canbus_uuid {
                    self.respond("canbus_id", &[Arg::Bytes(uuid.to_vec())], out);
                }
            }
            "debug_ping" => {
                let data = args.first().cloned().unwrap_or(Arg::Bytes(Vec::new()));
                self.respond("pong", &[data], out);
            }
            // Everything else the dictionary declares is accepted (pins, sensors, steppers
            // are not simulated).
            _ => {}
        }
        Ok(())
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
            let (blocks, _) = dev.feed(&to_dev, Duration::ZERO);
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
        let (out, ev) = dev.feed(&req.to_block(5).encode(), Duration::ZERO);
        assert_eq!(out, vec![MessageBlock::ack(0)]);
        assert_eq!(ev, vec![KlipperEvent::Nak { expected: 0, got: Some(5) }]);
        // corrupt blocks: one nak only
        let mut bad = req.to_block(0).encode();
        bad[3] ^= 0x55;
        let mut bytes = bad.clone();
        bytes.extend(&bad);
        let (out, _) = dev.feed(&bytes, Duration::ZERO);
        assert_eq!(out, vec![MessageBlock::ack(0)]);
        // valid in-sequence block: response + ack, both with seq 1
        let (out, ev) = dev.feed(&req.to_block(0).encode(), Duration::ZERO);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].seq, 1);
        assert_eq!(out[1], MessageBlock::ack(1));
        assert!(matches!(ev[0], KlipperEvent::Identify { offset: 0, count: 40, sent: 40 }));
    }

    // ---- the bring-up exchange, driven like Klippy does it -------------------------------

    /// A host side for tests: encodes commands and decodes responses with the dictionary.
    struct Host {
        dict: serde_json::Value,
        seq: u8,
    }

    impl Host {
        fn new(dev_dict: &[u8]) -> Host {
            Host { dict: DataDictionary::from_zlib(dev_dict).unwrap().json(), seq: 0 }
        }
        fn cmd(&mut self, text: &str) -> MessageBlock {
            self.cmds(&[text])
        }
        /// Encode "name k=v ..." commands into one block.
        fn cmds(&mut self, texts: &[&str]) -> MessageBlock {
            let mut content = Vec::new();
            for text in texts {
                let name = text.split_whitespace().next().unwrap();
                let (fmt, id) = self.dict["commands"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .find(|(f, _)| f.split_whitespace().next() == Some(name))
                    .map(|(f, id)| (f.clone(), id.as_i64().unwrap() as i32))
                    .unwrap_or_else(|| panic!("no command {name}"));
                encode_vlq_i32(id, &mut content);
                let vals: HashMap<&str, &str> =
                    text.split_whitespace().skip(1).filter_map(|w| w.split_once('=')).collect();
                for p in MsgFormat::parse(&fmt).params {
                    let v = vals[p.0.as_str()];
                    match p.1 {
                        ParamType::Int => encode_vlq(v.parse::<i64>().unwrap() as u32, &mut content),
                        ParamType::Bytes => encode_bytes(v.as_bytes(), &mut content),
                    }
                }
            }
            let b = MessageBlock::new(self.seq, content).unwrap();
            self.seq = (self.seq + 1) & MESSAGE_SEQ_MASK;
            b
        }
        /// Decode a response block into (name, params).
        fn decode(&self, b: &MessageBlock) -> (String, Vec<u32>) {
            let (id, mut pos) = decode_vlq(&b.content).unwrap();
            let (fmt, _) = self.dict["responses"]
                .as_object()
                .unwrap()
                .iter()
                .find(|(_, v)| v.as_i64() == Some(id as i32 as i64))
                .expect("a declared response");
            let f = MsgFormat::parse(fmt);
            let mut vals = Vec::new();
            for (_, t) in &f.params {
                match t {
                    ParamType::Int => {
                        let (v, n) = decode_vlq(&b.content[pos..]).unwrap();
                        vals.push(v);
                        pos += n;
                    }
                    ParamType::Bytes => {
                        let (d, n) = decode_bytes(&b.content[pos..]).unwrap();
                        vals.push(d.len() as u32);
                        pos += n;
                    }
                }
            }
            assert_eq!(pos, b.content.len());
            (f.name, vals)
        }
        fn call(&mut self, dev: &mut KlipperDevice, text: &str, t: f64) -> Vec<(String, Vec<u32>)> {
            let b = self.cmd(text);
            self.send(dev, b, t)
        }
        /// Send one block at `t` seconds; returns the decoded responses (acks checked).
        fn send(&mut self, dev: &mut KlipperDevice, b: MessageBlock, t: f64) -> Vec<(String, Vec<u32>)> {
            let (out, _) = dev.feed(&b.encode(), Duration::from_secs_f64(t));
            let (acks, resp): (Vec<_>, Vec<_>) = out.into_iter().partition(|b| b.is_ack());
            assert_eq!(acks, vec![MessageBlock::ack(self.seq)], "one ack with the next sequence");
            resp.iter().inspect(|r| assert_eq!(r.seq, self.seq)).map(|r| self.decode(r)).collect()
        }
    }

    fn h723() -> Vec<u8> {
        compress_dictionary(&crate::firmware::dictionary_json("Klipper", "v0.13.0-1-gabc", "stm32h723xx", 520_000_000))
    }

    #[test]
    fn clock_follows_the_model_time() {
        let dict = h723();
        let mut dev = KlipperDevice::new(dict.clone());
        let mut host = Host::new(&dict);
        let r = host.call(&mut dev, "get_uptime", 2.0);
        assert_eq!(r, vec![("uptime".into(), vec![0, 1_040_000_000])]);
        // 10 s at 520 MHz is past 2^32: high word 1, low word wrapped.
        let r = host.call(&mut dev, "get_uptime", 10.0);
        let ticks: u64 = 5_200_000_000;
        assert_eq!(r, vec![("uptime".into(), vec![(ticks >> 32) as u32, ticks as u32])]);
        let r = host.call(&mut dev, "get_clock", 10.5);
        assert_eq!(r, vec![("clock".into(), vec![(5_460_000_000u64 & 0xffff_ffff) as u32])]);
        assert_eq!(dev.clock_at(Duration::from_millis(1)), 520_000);
    }

    #[test]
    fn configure_stays_until_reboot() {
        let dict = h723();
        let mut dev = KlipperDevice::new(dict.clone());
        let mut host = Host::new(&dict);
        let r = host.call(&mut dev, "get_config", 0.1);
        assert_eq!(r, vec![("config".into(), vec![0, 0, 0, 0])]);
        let b = host.cmds(&["allocate_oids count=3", "finalize_config crc=3912464276"]);
        assert_eq!(host.send(&mut dev, b, 0.2), vec![]);
        assert!(dev.is_configured());
        assert_eq!(dev.config_crc(), 3_912_464_276);
        let r = host.call(&mut dev, "get_config", 0.3);
        assert_eq!(r, vec![("config".into(), vec![1, 3_912_464_276, 0, MOVE_COUNT])]);
        // A new host session (Klippy restarted) starts its sequence at 0: nak'ed, then resynced
        // by the host; the configuration is still there.
        let (out, ev) =
            dev.feed(&IdentifyRequest { offset: 0, count: 40 }.to_block(0).encode(), Duration::from_secs(5));
        assert_eq!(out, vec![MessageBlock::ack(host.seq)]);
        assert!(matches!(ev[0], KlipperEvent::Nak { .. }));
        let r = host.call(&mut dev, "get_config", 5.1);
        assert_eq!(r[0].1[..2], [1, 3_912_464_276]);
        // finalize twice: shutdown "Already finalized", reported with the dictionary's id.
        let r = host.call(&mut dev, "finalize_config crc=1", 5.2);
        let sid = host.dict["enumerations"]["static_string_id"]["Already finalized"].as_u64().unwrap() as u32;
        assert_eq!(r, vec![("shutdown".into(), vec![dev.clock_at(Duration::from_secs_f64(5.2)) as u32, sid])]);
    }

    #[test]
    fn emergency_stop_shutdown_and_clear() {
        let dict = h723();
        let mut dev = KlipperDevice::new(dict.clone());
        let mut host = Host::new(&dict);
        let b = host.cmds(&["allocate_oids count=0", "finalize_config crc=7"]);
        host.send(&mut dev, b, 0.1);
        let sids = host.dict["enumerations"]["static_string_id"].clone();
        let req = sids["Command request"].as_u64().unwrap() as u32;
        let r = host.call(&mut dev, "emergency_stop", 1.0);
        assert_eq!(r, vec![("shutdown".into(), vec![520_000_000, req])]);
        assert!(dev.is_shutdown());
        // HF_IN_SHUTDOWN commands still run; others get is_shutdown.
        let r = host.call(&mut dev, "get_config", 1.1);
        assert_eq!(r, vec![("config".into(), vec![1, 7, 1, MOVE_COUNT])]);
        let r = host.call(&mut dev, "queue_digital_out oid=0 clock=5 on_ticks=1", 1.2);
        assert_eq!(r, vec![("is_shutdown".into(), vec![req])]);
        // a second emergency_stop does not report again
        assert_eq!(host.call(&mut dev, "emergency_stop", 1.3), vec![]);
        assert_eq!(host.call(&mut dev, "clear_shutdown", 1.4), vec![]);
        assert!(!dev.is_shutdown());
        let r = host.call(&mut dev, "get_config", 1.5);
        assert_eq!(r, vec![("config".into(), vec![1, 7, 0, MOVE_COUNT])]);
        // clear_shutdown when not shut down shuts down
        let r = host.call(&mut dev, "clear_shutdown", 1.6);
        let id = sids["Shutdown cleared when not shutdown"].as_u64().unwrap() as u32;
        assert_eq!(r[0], ("shutdown".into(), vec![dev.clock_at(Duration::from_secs_f64(1.6)) as u32, id]));
    }

    #[test]
    fn reset_stops_the_firmware() {
        let dict = h723();
        let mut dev = KlipperDevice::new(dict.clone());
        let mut host = Host::new(&dict);
        let b = host.cmds(&["reset", "get_clock"]);
        let (out, ev) = dev.feed(&b.encode(), Duration::from_secs(1));
        assert_eq!(out, vec![], "no answer, no ack: the MCU is resetting");
        assert_eq!(ev, vec![KlipperEvent::Reset]);
        let b = host.cmd("get_clock");
        let (out, _) = dev.feed(&b.encode(), Duration::from_secs(2));
        assert!(out.is_empty());
    }

    #[test]
    fn unknown_id_is_invalid_command() {
        let dict = h723();
        let mut dev = KlipperDevice::new(dict.clone());
        let host = Host::new(&dict);
        let (out, ev) = dev.feed(&MessageBlock::new(0, vec![0x7f, 0x01]).unwrap().encode(), Duration::from_secs(1));
        assert_eq!(ev[0], KlipperEvent::UnknownCommand { id: -1 });
        let sid = host.dict["enumerations"]["static_string_id"]["Invalid command"].as_u64().unwrap() as u32;
        assert_eq!(host.decode(&out[0]), ("shutdown".into(), vec![520_000_000, sid]));
        assert_eq!(out[1], MessageBlock::ack(1));
    }

    #[test]
    fn debug_ping_and_negative_ids() {
        let dict = h723();
        let mut dev = KlipperDevice::new(dict.clone());
        let mut host = Host::new(&dict);
        // some messages have one-byte negative ids (encoded 96..127), as in real dictionaries
        let ids: Vec<i64> = host.dict["commands"].as_object().unwrap().values().map(|v| v.as_i64().unwrap()).collect();
        assert!(ids.iter().any(|&i| i < 0));
        let r = host.call(&mut dev, "debug_ping data=hello", 0.5);
        assert_eq!(r, vec![("pong".into(), vec![5])]);
    }

    #[test]
    fn old_dictionary_without_commands_still_identifies() {
        // A dictionary with only identify: other ids shut the firmware down, identify works.
        let json = r#"{"app":"Klipper","commands":{"identify offset=%u count=%c":1},"config":{"MCU":"rp2040"},"responses":{"identify_response offset=%u data=%.*s":0},"version":"v1"}"#;
        let mut dev = KlipperDevice::new(compress_dictionary(json));
        let d = run(&mut dev, &mut IdentifyClient::new());
        assert_eq!(d.version, "v1");
    }
}
