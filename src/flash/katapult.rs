//! Native Katapult flashing: CONNECT, check the bootloader is for this firmware, write every
//! block, read every block back, and only then COMPLETE — so a failed write leaves the board
//! in Katapult, ready for a retry, instead of jumping into half an image.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use super::error::FlashError;
use super::serial::Tty;
use crate::event::{EventKind, Progress};
use crate::protocol::katapult::{AckData, Command, ConnectInfo, FrameDecoder, KatapultError, Response};
use crate::protocol::klipper::find_embedded_dictionary;

/// Byte transport to the bootloader (the tty in production, a fake device in tests).
pub trait Link {
    fn send(&mut self, bytes: &[u8]) -> impl Future<Output = std::io::Result<()>>;
    /// Bytes received by `deadline`; `Ok(0)` when none came.
    fn recv(&mut self, buf: &mut [u8], deadline: Instant) -> impl Future<Output = std::io::Result<usize>>;
    fn discard_input(&mut self);
}

impl Link for Tty {
    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.write_all(bytes).await
    }
    async fn recv(&mut self, buf: &mut [u8], deadline: Instant) -> std::io::Result<usize> {
        self.read(buf, deadline).await
    }
    fn discard_input(&mut self) {
        Tty::discard_input(self)
    }
}

/// What the firmware was built for, to be checked against the bootloader before writing.
#[derive(Debug, Clone)]
pub struct Expectation {
    /// `CONFIG_MCU` of the board's config.
    pub mcu: String,
    /// `CONFIG_FLASH_APPLICATION_ADDRESS` of the board's config.
    pub app_start: Option<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FlashReport {
    pub bootloader: ConnectInfo,
    pub blocks: usize,
    pub pages: u32,
}

/// Retry policy, matching Katapult's own flashtool.
#[derive(Debug, Clone)]
pub struct Policy {
    pub tries: u32,
    pub reply_timeout: Duration,
    /// How long a "busy" answer asks us to wait.
    pub busy_backoff: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy { tries: 5, reply_timeout: Duration::from_secs(2), busy_backoff: Duration::from_millis(1500) }
    }
}

pub struct KatapultSession<L: Link> {
    link: L,
    decoder: FrameDecoder,
    policy: Policy,
}

enum ReadProblem {
    Timeout,
    Gone,
    Bad(String),
}

/// How one try of a command ended, when the device is still there.
enum Attempt {
    Answered(AckData),
    Busy,
    Failed(String),
}

/// The address of an acknowledged block before the one asked for: both passes go up the
/// flash in order, so it can only be a late or repeated answer to an earlier one. (An
/// address past the one asked for is the device's fault, and is reported as such.)
fn earlier_block(cmd: &Command, ack: &AckData) -> Option<u32> {
    let (want, got) = match (cmd, ack) {
        (Command::SendBlock { addr: want, .. }, AckData::SendBlock { addr: got }) => (*want, *got),
        (Command::RequestBlock { addr: want }, AckData::RequestBlock { addr: got, .. }) => (*want, *got),
        _ => return None,
    };
    (got < want).then_some(got)
}

fn name(cmd: &Command) -> &'static str {
    match cmd {
        Command::Connect => "CONNECT",
        Command::SendBlock { .. } => "SEND_BLOCK",
        Command::SendEof => "SEND_EOF",
        Command::RequestBlock { .. } => "REQUEST_BLOCK",
        Command::Complete => "COMPLETE",
        Command::GetCanbusId => "GET_CANBUS_ID",
        Command::Unknown(_) => "UNKNOWN",
    }
}

impl KatapultSession<Tty> {
    /// A session on the bootloader's tty, with flashtool's retry policy.
    pub fn open(devnode: Option<&str>) -> Result<Self, FlashError> {
        let devnode = devnode.ok_or_else(|| FlashError::Tool("the bootloader has no device node".into()))?;
        let tty = Tty::open(std::path::Path::new(devnode))
            .map_err(|e| FlashError::Io { path: devnode.to_string(), message: e.to_string() })?;
        Ok(KatapultSession::new(tty, Policy::default()))
    }
}

impl<L: Link> KatapultSession<L> {
    pub fn new(link: L, policy: Policy) -> Self {
        KatapultSession { link, decoder: FrameDecoder::new(), policy }
    }

    /// The link, e.g. to ask a CAN link why it failed.
    pub fn link(&self) -> &L {
        &self.link
    }

    pub fn into_link(self) -> L {
        self.link
    }

    /// Send one command and return its acknowledgement, retrying on timeouts, NACKs,
    /// corrupt frames and busy answers like flashtool does.
    async fn command(&mut self, cmd: &Command) -> Result<AckData, FlashError> {
        let bytes = cmd.encode().map_err(|e| FlashError::Tool(e.to_string()))?;
        let mut last = String::new();
        for attempt in 0..self.policy.tries {
            if attempt > 0 {
                self.link.discard_input();
                self.decoder.clear();
                tracing::debug!("retrying {} ({last})", name(cmd));
            }
            if self.link.send(&bytes).await.is_err() {
                return Err(FlashError::DeviceGone(name(cmd)));
            }
            match self.attempt(cmd).await? {
                Attempt::Answered(d) => return Ok(d),
                Attempt::Busy => {
                    last = "device busy".into();
                    tokio::time::sleep(self.policy.busy_backoff).await;
                }
                Attempt::Failed(why) => last = why,
            }
        }
        Err(FlashError::NoResponse { command: name(cmd), tries: self.policy.tries, last })
    }

    /// Read the answer to `cmd`, just sent, until the reply deadline. Garbled bytes and
    /// stale answers (the late tail of a reply to an earlier try, or a repeated reply to an
    /// earlier command) are passed over: the decoder finds the next frame start, and only the
    /// deadline ends the try. Otherwise one stale tail spoils every retry in turn.
    async fn attempt(&mut self, cmd: &Command) -> Result<Attempt, FlashError> {
        let deadline = Instant::now() + self.policy.reply_timeout;
        let mut passed_over: Option<String> = None;
        loop {
            let skipped = match self.read_response(deadline).await {
                Err(ReadProblem::Timeout) => {
                    let timeout = format!("no answer within {:?}", self.policy.reply_timeout);
                    return Ok(Attempt::Failed(match passed_over {
                        Some(why) => format!("{timeout} but {why}"),
                        None => timeout,
                    }));
                }
                Err(ReadProblem::Gone) => return Err(FlashError::DeviceGone(name(cmd))),
                Err(ReadProblem::Bad(why)) => why,
                Ok(Response::Busy) => return Ok(Attempt::Busy),
                Ok(Response::Nack) => return Ok(Attempt::Failed("device reported a garbled frame (NACK)".into())),
                Ok(Response::CommandError) => return Ok(Attempt::Failed("device rejected the command (0xf2)".into())),
                Ok(r) => match r.expect_ack(cmd.code()) {
                    Ok(d) => match earlier_block(cmd, &d) {
                        Some(addr) => format!("a stale answer for the earlier block at {addr:#x}"),
                        None => return Ok(Attempt::Answered(d)),
                    },
                    Err(e @ KatapultError::WrongAck { .. }) => e.to_string(),
                    Err(e) => return Ok(Attempt::Failed(e.to_string())),
                },
            };
            tracing::debug!("{}: passing over {skipped}", name(cmd));
            passed_over = Some(skipped);
        }
    }

    async fn read_response(&mut self, deadline: Instant) -> Result<Response, ReadProblem> {
        let mut buf = [0u8; 512];
        loop {
            if let Some(frame) = self.decoder.next_frame() {
                return match frame {
                    Ok(f) => Response::from_frame(&f).map_err(|e| ReadProblem::Bad(e.to_string())),
                    Err(e) => Err(ReadProblem::Bad(e.to_string())),
                };
            }
            match self.link.recv(&mut buf, deadline).await {
                Ok(0) => return Err(ReadProblem::Timeout),
                Ok(n) => self.decoder.push(&buf[..n]),
                Err(_) => return Err(ReadProblem::Gone),
            }
        }
    }

    pub async fn connect(&mut self) -> Result<ConnectInfo, FlashError> {
        match self.command(&Command::Connect).await? {
            AckData::Connect(info) => Ok(info),
            other => Err(FlashError::Tool(format!("CONNECT answered with {other:?}"))),
        }
    }

    /// The node's UUID as Katapult reports it over CAN (GET_CANBUS_ID), to check that the
    /// node that answered on our node id is the one meant, as flashtool does.
    pub async fn canbus_id(&mut self) -> Result<crate::can::CanUuid, FlashError> {
        match self.command(&Command::GetCanbusId).await? {
            AckData::CanbusId(id) => Ok(crate::can::CanUuid(id)),
            other => Err(FlashError::Tool(format!("GET_CANBUS_ID answered with {other:?}"))),
        }
    }

    /// Leave the bootloader without writing: CONNECT, then COMPLETE, which makes Katapult
    /// start the installed application.
    pub async fn start_application(&mut self) -> Result<ConnectInfo, FlashError> {
        let info = self.connect().await?;
        self.command(&Command::Complete).await?;
        Ok(info)
    }

    /// The whole job. Every check happens before the first block is written.
    pub async fn flash(
        &mut self,
        image: &[u8],
        expect: &Expectation,
        progress: &mut dyn Progress,
    ) -> Result<FlashReport, FlashError> {
        let info = self.connect().await?;
        progress.emit(EventKind::KatapultConnected { info: info.clone() });
        check_target(&info, expect, image)?;
        let bs = info.block_size as usize;
        let blocks: Vec<Vec<u8>> = image
            .chunks(bs)
            .map(|c| {
                let mut b = c.to_vec();
                b.resize(bs, 0xff);
                b
            })
            .collect();
        let total = blocks.len();
        let addr = |i: usize| info.app_start + (i * bs) as u32;

        for (i, data) in blocks.iter().enumerate() {
            let sent = addr(i);
            match self.command(&Command::SendBlock { addr: sent, data: data.clone() }).await? {
                AckData::SendBlock { addr: got } if got == sent => {}
                AckData::SendBlock { addr: got } => return Err(FlashError::AddressMismatch { sent, got }),
                other => return Err(FlashError::Tool(format!("SEND_BLOCK answered with {other:?}"))),
            }
            progress.emit(EventKind::WriteProgress { done: i + 1, total });
        }
        let pages = match self.command(&Command::SendEof).await? {
            AckData::SendEof { page_count } => page_count,
            other => return Err(FlashError::Tool(format!("SEND_EOF answered with {other:?}"))),
        };
        progress.emit(EventKind::EndOfFile { pages });

        for (i, data) in blocks.iter().enumerate() {
            let want = addr(i);
            match self.command(&Command::RequestBlock { addr: want }).await? {
                AckData::RequestBlock { addr, data: got } if addr == want && got == *data => {}
                AckData::RequestBlock { .. } => return Err(FlashError::ReadBack { addr: want }),
                other => return Err(FlashError::Tool(format!("REQUEST_BLOCK answered with {other:?}"))),
            }
            progress.emit(EventKind::ReadBackProgress { done: i + 1, total });
        }

        self.command(&Command::Complete).await?;
        progress.emit(EventKind::WriteCompleted);
        Ok(FlashReport { bootloader: info, blocks: total, pages })
    }
}

/// Refuse to write unless the bootloader, the config and the image all agree on the MCU and
/// the bootloader jumps where the image was linked to run.
pub fn check_target(info: &ConnectInfo, expect: &Expectation, image: &[u8]) -> Result<(), FlashError> {
    if !info.mcu.eq_ignore_ascii_case(&expect.mcu) {
        return Err(FlashError::WrongMcu { bootloader: info.mcu.clone(), config: expect.mcu.clone() });
    }
    match expect.app_start {
        None => return Err(FlashError::NoAppAddress),
        Some(a) if a != info.app_start => {
            return Err(FlashError::WrongAppStart { bootloader: info.app_start, config: a })
        }
        Some(_) => {}
    }
    if !matches!(info.block_size, 64 | 128 | 256 | 512) {
        return Err(FlashError::BadBlockSize(info.block_size));
    }
    if let Some(found) = find_embedded_dictionary(image) {
        if !found.dictionary.mcu.is_empty() && !found.dictionary.mcu.eq_ignore_ascii_case(&info.mcu) {
            return Err(FlashError::ImageMcu { image: found.dictionary.mcu, bootloader: info.mcu.clone() });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
