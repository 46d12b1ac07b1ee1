//! The host side of Katapult against a small in-memory bootloader, on tokio's paused clock.

use std::collections::{BTreeMap, VecDeque};

use super::*;
use crate::protocol::katapult::{Command, FrameDecoder, Response, PROTO_VERSION_1_1_0};

const START: u32 = 0x0802_0000;

/// Just enough Katapult to exercise the host: a flash map, and faults.
#[derive(Default)]
struct FakeBootloader {
    mcu: String,
    app_start: u32,
    flash: BTreeMap<u32, Vec<u8>>,
    pages: u32,
    decoder: FrameDecoder,
    outbox: VecDeque<u8>,
    /// Command codes received, in order.
    log: Vec<u8>,
    corrupt_next: u32,
    busy_next: u32,
    silent: bool,
    corrupt_readback: bool,
    /// Answer GET_CANBUS_ID with this UUID (a CAN build).
    canbus_uuid: Option<[u8; 6]>,
    /// The next answers come after the tail of an earlier reply (bytes that are no frame).
    stale_tail_next: u32,
    /// The next answers are sent twice (the second is stale by the time it is read).
    repeat_next: u32,
    /// SEND_BLOCK acknowledges the block after the one sent.
    ack_later_block: bool,
}

impl FakeBootloader {
    fn new(mcu: &str, app_start: u32) -> Self {
        FakeBootloader { mcu: mcu.into(), app_start, ..Default::default() }
    }

    fn receive(&mut self, bytes: &[u8]) {
        self.decoder.push(bytes);
        while let Some(frame) = self.decoder.next_frame() {
            let resp = match frame.map_err(|_| ()).and_then(|f| Command::from_frame(&f).map_err(|_| ())) {
                Err(()) => Response::Nack,
                Ok(cmd) => {
                    self.log.push(cmd.code());
                    self.answer(cmd)
                }
            };
            if self.silent {
                continue;
            }
            let mut out = resp.encode().unwrap();
            if self.busy_next > 0 {
                self.busy_next -= 1;
                out = Response::Busy.encode().unwrap();
            } else if self.corrupt_next > 0 {
                self.corrupt_next -= 1;
                let n = out.len();
                out[n - 3] ^= 0xff; // break the CRC
            }
            if self.stale_tail_next > 0 {
                self.stale_tail_next -= 1;
                self.outbox.extend([0xd4, 0xf3, 0x5a, 0x03]); // as seen on a loaded CAN bus
            }
            if self.repeat_next > 0 {
                self.repeat_next -= 1;
                self.outbox.extend(out.iter().copied());
            }
            self.outbox.extend(out);
        }
    }

    fn answer(&mut self, cmd: Command) -> Response {
        match cmd {
            Command::Connect => Response::ack(&AckData::Connect(ConnectInfo {
                proto_version: (
                    (PROTO_VERSION_1_1_0 >> 16) as u8,
                    (PROTO_VERSION_1_1_0 >> 8) as u8,
                    PROTO_VERSION_1_1_0 as u8,
                ),
                app_start: self.app_start,
                block_size: 64,
                mcu: self.mcu.clone(),
                version: Some("v0.0.1-109-g902f335".into()),
            })),
            Command::SendBlock { addr, data } => {
                if addr % 2048 == 0 {
                    self.pages += 1;
                }
                self.flash.insert(addr, data);
                let addr = if self.ack_later_block { addr + 64 } else { addr };
                Response::ack(&AckData::SendBlock { addr })
            }
            Command::SendEof => Response::ack(&AckData::SendEof { page_count: self.pages }),
            Command::RequestBlock { addr } => {
                let mut data = self.flash.get(&addr).cloned().unwrap_or_else(|| vec![0xff; 64]);
                if self.corrupt_readback && addr == self.app_start + 64 {
                    data[0] ^= 1;
                }
                Response::ack(&AckData::RequestBlock { addr, data })
            }
            Command::Complete => Response::ack(&AckData::Complete),
            Command::GetCanbusId if self.canbus_uuid.is_some() => {
                Response::ack(&AckData::CanbusId(self.canbus_uuid.unwrap()))
            }
            _ => Response::CommandError,
        }
    }
}

impl Link for &mut FakeBootloader {
    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.receive(bytes);
        Ok(())
    }
    async fn recv(&mut self, buf: &mut [u8], deadline: Instant) -> std::io::Result<usize> {
        if self.outbox.is_empty() {
            tokio::time::sleep_until(deadline).await;
            return Ok(0);
        }
        let n = buf.len().min(self.outbox.len());
        for b in buf.iter_mut().take(n) {
            *b = self.outbox.pop_front().unwrap();
        }
        Ok(n)
    }
    fn discard_input(&mut self) {
        self.outbox.clear();
    }
}

fn image(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

fn expect(mcu: &str, start: u32) -> Expectation {
    Expectation { mcu: mcu.into(), app_start: Some(start) }
}

async fn run(
    dev: &mut FakeBootloader,
    img: &[u8],
    exp: &Expectation,
) -> (Result<FlashReport, FlashError>, Vec<EventKind>) {
    let mut events = Vec::new();
    let mut session = KatapultSession::new(dev, Policy::default());
    let r = session.flash(img, exp, &mut events).await;
    (r, events)
}

#[tokio::test(start_paused = true)]
async fn writes_reads_back_then_completes() {
    let mut dev = FakeBootloader::new("stm32h723xx", START);
    let img = image(5000); // 79 blocks, the last padded
    let (r, events) = run(&mut dev, &img, &expect("stm32h723xx", START)).await;
    let report = r.unwrap();
    assert_eq!(report.blocks, 79);
    assert_eq!(report.pages, 3);
    assert_eq!(dev.flash.len(), 79);
    let last = &dev.flash[&(START + 78 * 64)];
    assert_eq!(&last[..8], &img[78 * 64..78 * 64 + 8]);
    assert!(last[8..].iter().all(|&b| b == 0xff), "last block padded with 0xff");
    assert_eq!(*dev.log.last().unwrap(), 0x15, "COMPLETE last");
    assert_eq!(events.first().map(|e| matches!(e, EventKind::KatapultConnected { .. })), Some(true));
    assert_eq!(events.last(), Some(&EventKind::WriteCompleted));
    assert!(events.contains(&EventKind::ReadBackProgress { done: 79, total: 79 }));
}

#[tokio::test(start_paused = true)]
async fn wrong_mcu_is_refused_before_any_write() {
    let mut dev = FakeBootloader::new("stm32f446xx", START);
    let (r, _) = run(&mut dev, &image(256), &expect("stm32h723xx", START)).await;
    assert!(matches!(r, Err(FlashError::WrongMcu { .. })), "{r:?}");
    assert_eq!(dev.log, vec![0x11], "only CONNECT was sent");
}

#[tokio::test(start_paused = true)]
async fn wrong_application_start_is_refused_before_any_write() {
    let mut dev = FakeBootloader::new("stm32h723xx", 0x0800_8000);
    let (r, _) = run(&mut dev, &image(256), &expect("stm32h723xx", START)).await;
    let e = r.unwrap_err();
    assert!(matches!(e, FlashError::WrongAppStart { bootloader: 0x0800_8000, config: START }), "{e}");
    assert!(e.to_string().contains("0x8008000") && e.to_string().contains("0x8020000"));
    assert_eq!(dev.log, vec![0x11]);
}

#[tokio::test(start_paused = true)]
async fn image_built_for_another_mcu_is_refused() {
    let dict = r#"{"app":"Klipper","config":{"MCU":"rp2040"},"version":"v1"}"#;
    let mut img = vec![0u8; 64];
    img.extend(crate::protocol::klipper::compress_dictionary(dict));
    let mut dev = FakeBootloader::new("stm32h723xx", START);
    let (r, _) = run(&mut dev, &img, &expect("stm32h723xx", START)).await;
    assert!(matches!(r, Err(FlashError::ImageMcu { .. })), "{r:?}");
    assert_eq!(dev.log, vec![0x11]);
}

#[tokio::test(start_paused = true)]
async fn corrupt_and_busy_answers_are_retried() {
    let mut dev = FakeBootloader::new("stm32h723xx", START);
    dev.corrupt_next = 2;
    dev.busy_next = 1;
    let t0 = Instant::now();
    let (r, _) = run(&mut dev, &image(640), &expect("stm32h723xx", START)).await;
    assert_eq!(r.unwrap().blocks, 10);
    assert!(Instant::now() - t0 >= Duration::from_millis(1500), "backed off once for busy");
}

/// A stale tail before an answer, or an answer repeated, is passed over within the try: no
/// command is sent twice. (Before, each try ended at the first bad byte, and a stale tail
/// on every answer failed the flash after five tries.)
#[tokio::test(start_paused = true)]
async fn stale_tails_and_repeated_answers_are_passed_over_without_a_retry() {
    let mut dev = FakeBootloader::new("stm32h723xx", START);
    dev.stale_tail_next = 8;
    let t0 = Instant::now();
    let (r, _) = run(&mut dev, &image(640), &expect("stm32h723xx", START)).await;
    assert_eq!(r.unwrap().blocks, 10);
    assert_eq!(Instant::now() - t0, Duration::ZERO, "no try waited for its deadline");

    // Repeated answers: CONNECT's is read as SEND_BLOCK's (another command), the blocks'
    // by the next block (an earlier address), SEND_EOF's by the first REQUEST_BLOCK.
    let mut dev = FakeBootloader::new("stm32h723xx", START);
    dev.repeat_next = 30;
    let (r, _) = run(&mut dev, &image(640), &expect("stm32h723xx", START)).await;
    assert_eq!(r.unwrap().blocks, 10);
    let sent = |code: u8| dev.log.iter().filter(|&&c| c == code).count();
    assert_eq!((sent(0x11), sent(0x12), sent(0x13), sent(0x14), sent(0x15)), (1, 10, 1, 10, 1), "{:x?}", dev.log);
}

/// An acknowledgement for a block past the one sent is the device's fault, not a stale
/// answer: it fails the write at once.
#[tokio::test(start_paused = true)]
async fn an_answer_for_a_later_block_is_an_address_mismatch() {
    let mut dev = FakeBootloader::new("stm32h723xx", START);
    dev.ack_later_block = true;
    let (r, _) = run(&mut dev, &image(640), &expect("stm32h723xx", START)).await;
    assert!(matches!(r, Err(FlashError::AddressMismatch { sent: START, got }) if got == START + 64), "{r:?}");
}

#[tokio::test(start_paused = true)]
async fn readback_mismatch_never_sends_complete() {
    let mut dev = FakeBootloader::new("stm32h723xx", START);
    dev.corrupt_readback = true;
    let (r, _) = run(&mut dev, &image(640), &expect("stm32h723xx", START)).await;
    assert!(matches!(r, Err(FlashError::ReadBack { addr }) if addr == START + 64), "{r:?}");
    assert!(!dev.log.contains(&0x15), "no COMPLETE after a bad read-back");
}

#[tokio::test(start_paused = true)]
async fn a_silent_bootloader_times_out_after_all_tries() {
    let mut dev = FakeBootloader::new("stm32h723xx", START);
    dev.silent = true;
    let t0 = Instant::now();
    let (r, _) = run(&mut dev, &image(64), &expect("stm32h723xx", START)).await;
    assert!(matches!(r, Err(FlashError::NoResponse { command: "CONNECT", tries: 5, .. })), "{r:?}");
    assert_eq!(Instant::now() - t0, Duration::from_secs(10), "5 tries of 2 s");
}

#[test]
fn missing_app_address_is_refused() {
    let info =
        ConnectInfo { proto_version: (1, 1, 0), app_start: START, block_size: 64, mcu: "rp2040".into(), version: None };
    let r = check_target(&info, &Expectation { mcu: "rp2040".into(), app_start: None }, &[]);
    assert!(matches!(r, Err(FlashError::NoAppAddress)));
}

/// The same bootloader behind a CAN bus: the host's frames on the node's id feed it, its
/// answer bytes come back as 8-byte frames on the node's answer id, with other traffic mixed in.
mod over_can {
    use super::*;
    use crate::can::link::fake::FakeBus;
    use crate::can::link::{open_katapult, CanLink};
    use crate::can::stream::CanStream;
    use crate::can::{CanFrame, CanUuid, NodeId};

    const UUID: [u8; 6] = [0x0a, 0x1b, 0x2c, 0x3d, 0x4e, 0x5f];

    fn bus(dev: &mut FakeBootloader) -> FakeBus<impl FnMut(&CanFrame) -> Vec<CanFrame> + '_> {
        let node = CanStream::node(NodeId::KATAPULT_FLASH);
        FakeBus::new(move |f: &CanFrame| {
            let Some(bytes) = node.accept(f) else { return vec![] };
            dev.receive(bytes);
            let out: Vec<u8> = dev.outbox.drain(..).collect();
            let mut frames = node.frames(&out);
            if !frames.is_empty() {
                // Another node's traffic between the answer's frames.
                frames.insert(1.min(frames.len()), CanFrame::new(0x109, &[0xee; 8]).unwrap());
            }
            frames
        })
    }

    async fn session<S: crate::can::link::FrameSocket>(socket: S) -> KatapultSession<CanLink<S>> {
        let link = open_katapult(socket, CanUuid(UUID), NodeId::KATAPULT_FLASH).await.unwrap();
        KatapultSession::new(link, Policy::default())
    }

    #[tokio::test(start_paused = true)]
    async fn flashes_and_reads_back_through_can_frames() {
        let mut dev = FakeBootloader::new("stm32g0b1xx", 0x0800_2000);
        dev.canbus_uuid = Some(UUID);
        let img = image(32 * 1024);
        let mut fake = bus(&mut dev);
        let mut s = session(&mut fake).await;
        assert_eq!(s.canbus_id().await.unwrap(), CanUuid(UUID));
        let mut events = Vec::new();
        let report = s.flash(&img, &expect("stm32g0b1xx", 0x0800_2000), &mut events).await.unwrap();
        assert_eq!(report.blocks, 512);
        drop(s);
        // Every frame the host sent fits CAN: the admin frame, then only the node's id.
        assert!(fake.sent.iter().all(|f| f.data().len() <= 8));
        assert_eq!(fake.sent[0].id(), 0x3f0);
        assert!(fake.sent[1..].iter().all(|f| f.id() == 0x200));
        drop(fake);
        assert_eq!(dev.flash.len(), 512);
        assert_eq!(dev.flash[&0x0800_2000], img[..64]);
        assert_eq!(*dev.log.last().unwrap(), 0x15, "COMPLETE last");
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_without_can_support_fails_the_uuid_check() {
        let mut dev = FakeBootloader::new("stm32g0b1xx", 0x0800_2000);
        let mut fake = bus(&mut dev);
        let mut s = session(&mut fake).await;
        assert!(s.canbus_id().await.is_err());
    }
}
