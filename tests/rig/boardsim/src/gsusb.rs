//! The device side of the gs_usb protocol (what Klipper's USB-to-CAN bridge firmware and
//! candleLight speak to Linux's `gs_usb` driver), sans I/O: vendor control requests on the
//! interface configure one CAN channel, and `struct gs_host_frame` carries frames over the
//! bulk endpoints. The host's frames come back to it as echoes (that is how the driver
//! completes a transmission); frames from the bus go in with the echo id 0xffffffff.
//!
//! Classic CAN only, no hardware timestamps: the feature word is 0, so the driver uses the
//! 20-byte frame layout in both directions.

use crate::dfu::{Reply, Setup};

/// Vendor requests (`enum gs_usb_breq`).
pub const BREQ_HOST_FORMAT: u8 = 0;
pub const BREQ_BITTIMING: u8 = 1;
pub const BREQ_MODE: u8 = 2;
pub const BREQ_BERR: u8 = 3;
pub const BREQ_BT_CONST: u8 = 4;
pub const BREQ_DEVICE_CONFIG: u8 = 5;
pub const BREQ_TIMESTAMP: u8 = 6;
pub const BREQ_IDENTIFY: u8 = 7;

const MODE_RESET: u32 = 0;
const MODE_START: u32 = 1;

/// `struct gs_host_frame` with classic data and no timestamp.
pub const HOST_FRAME_LEN: usize = 20;
/// The echo id of a frame received from the bus (not an echo).
pub const RX_ECHO_ID: u32 = 0xffff_ffff;

/// The CAN clock the bridge reports (an STM32 bxCAN at 48 MHz, as candleLight does); the
/// driver computes its bit timing from it and the limits below.
pub const FCLK_CAN: u32 = 48_000_000;

/// One classic CAN frame as `gs_host_frame` carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFrame {
    pub echo_id: u32,
    /// With the kernel's EFF/RTR/ERR flag bits.
    pub can_id: u32,
    pub dlc: u8,
    pub channel: u8,
    pub flags: u8,
    pub data: [u8; 8],
}

impl HostFrame {
    pub fn rx(can_id: u32, data: &[u8]) -> HostFrame {
        let mut d = [0u8; 8];
        let n = data.len().min(8);
        d[..n].copy_from_slice(&data[..n]);
        HostFrame { echo_id: RX_ECHO_ID, can_id, dlc: n as u8, channel: 0, flags: 0, data: d }
    }

    pub fn parse(b: &[u8]) -> Option<HostFrame> {
        if b.len() < HOST_FRAME_LEN {
            return None;
        }
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut data = [0u8; 8];
        data.copy_from_slice(&b[12..20]);
        Some(HostFrame { echo_id: u32_at(0), can_id: u32_at(4), dlc: b[8], channel: b[9], flags: b[10], data })
    }

    pub fn encode(&self) -> [u8; HOST_FRAME_LEN] {
        let mut b = [0u8; HOST_FRAME_LEN];
        b[0..4].copy_from_slice(&self.echo_id.to_le_bytes());
        b[4..8].copy_from_slice(&self.can_id.to_le_bytes());
        b[8] = self.dlc;
        b[9] = self.channel;
        b[10] = self.flags;
        b[12..20].copy_from_slice(&self.data);
        b
    }

    pub fn payload(&self) -> &[u8] {
        &self.data[..(self.dlc as usize).min(8)]
    }
}

/// What a control request changed, for the event log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GsEvent {
    HostFormat(u32),
    /// The driver set the bit timing; the bitrate it gives at [`FCLK_CAN`].
    BitTiming {
        bitrate: u32,
    },
    Started,
    Stopped,
}

/// The bridge's one channel: its configuration as the driver set it.
#[derive(Debug, Clone, Default)]
pub struct GsUsbDevice {
    pub bitrate: Option<u32>,
    pub started: bool,
    pub sw_version: u32,
}

impl GsUsbDevice {
    pub fn new() -> GsUsbDevice {
        GsUsbDevice { bitrate: None, started: false, sw_version: 2 }
    }

    /// Answer one vendor control request; `data` is the OUT data stage. Anything else stalls.
    pub fn control(&mut self, s: Setup, data: &[u8]) -> (Reply, Option<GsEvent>) {
        const VENDOR_INTERFACE: u8 = 0x41;
        if s.request_type & 0x7f != VENDOR_INTERFACE {
            return (Reply::Stall, None);
        }
        let u32_at = |i: usize| data.get(i..i + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        match (s.is_in(), s.request) {
            (false, BREQ_HOST_FORMAT) => (Reply::Ack, u32_at(0).map(GsEvent::HostFormat)),
            (true, BREQ_DEVICE_CONFIG) => {
                // reserved ×3, icount (channels - 1), sw_version, hw_version.
                let mut b = vec![0, 0, 0, 0];
                b.extend(self.sw_version.to_le_bytes());
                b.extend(1u32.to_le_bytes());
                (Reply::Data(b), None)
            }
            (true, BREQ_BT_CONST) => {
                // feature, fclk_can, tseg1 min/max, tseg2 min/max, sjw_max, brp min/max/inc.
                let words: [u32; 10] = [0, FCLK_CAN, 1, 16, 1, 8, 4, 1, 1024, 1];
                (Reply::Data(words.iter().flat_map(|w| w.to_le_bytes()).collect()), None)
            }
            (false, BREQ_BITTIMING) => {
                // prop_seg, phase_seg1, phase_seg2, sjw, brp.
                let w: Option<Vec<u32>> = (0..5).map(|i| u32_at(i * 4)).collect();
                let Some(w) = w else { return (Reply::Stall, None) };
                let quanta = 1 + w[0] + w[1] + w[2];
                if w[4] == 0 || quanta == 0 {
                    return (Reply::Stall, None);
                }
                let bitrate = FCLK_CAN / (w[4] * quanta);
                self.bitrate = Some(bitrate);
                (Reply::Ack, Some(GsEvent::BitTiming { bitrate }))
            }
            (false, BREQ_MODE) => match u32_at(0) {
                Some(MODE_START) => {
                    self.started = true;
                    (Reply::Ack, Some(GsEvent::Started))
                }
                Some(MODE_RESET) => {
                    self.started = false;
                    (Reply::Ack, Some(GsEvent::Stopped))
                }
                _ => (Reply::Stall, None),
            },
            // Accepted and ignored: bus-error reporting, the identify LED.
            (false, BREQ_BERR | BREQ_IDENTIFY) => (Reply::Ack, None),
            // Not offered (feature bits 0): the driver never asks; a stall if it does.
            (_, BREQ_TIMESTAMP) => (Reply::Stall, None),
            _ => (Reply::Stall, None),
        }
    }

    /// A frame the host sent on the bulk OUT endpoint, to put on the bus and to send back
    /// unchanged as its echo. None when the channel is not started or not ours.
    pub fn host_sent(&self, bytes: &[u8]) -> Option<HostFrame> {
        let f = HostFrame::parse(bytes)?;
        (self.started && f.channel == 0).then_some(f)
    }
}

/// The interface descriptor and two bulk endpoints (IN 0x81, OUT 0x02: the numbers the 6.1
/// driver hard-codes) at one max packet size.
pub fn interface_descriptors(max_packet: u16) -> Vec<u8> {
    let mut d = vec![9, 4, 0, 0, 2, 0xff, 0xff, 0xff, 1];
    for addr in [0x81u8, 0x02] {
        d.extend([7, 5, addr, 2]);
        d.extend(max_packet.to_le_bytes());
        d.push(0);
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(request_type: u8, request: u8, length: u16) -> Setup {
        Setup { request_type, request, value: 0, index: 0, length }
    }

    #[test]
    fn host_frames_round_trip_in_the_drivers_layout() {
        let f = HostFrame { echo_id: 3, can_id: 0x3f0, dlc: 1, channel: 0, flags: 0, data: [0, 0, 0, 0, 0, 0, 0, 0] };
        let b = f.encode();
        assert_eq!(&b[..12], &[3, 0, 0, 0, 0xf0, 3, 0, 0, 1, 0, 0, 0]);
        assert_eq!(HostFrame::parse(&b), Some(f));
        assert_eq!(HostFrame::parse(&b[..19]), None);
        let rx = HostFrame::rx(0x3f1, &[0x20, 1, 2, 3, 4, 5, 6, 0x11]);
        assert_eq!(rx.echo_id, RX_ECHO_ID);
        assert_eq!(rx.payload(), &[0x20, 1, 2, 3, 4, 5, 6, 0x11]);
    }

    #[test]
    fn the_driver_probe_and_open_sequence() {
        let mut d = GsUsbDevice::new();
        let (r, e) = d.control(setup(0x41, BREQ_HOST_FORMAT, 4), &0xbeefu32.to_le_bytes());
        assert_eq!((r, e), (Reply::Ack, Some(GsEvent::HostFormat(0xbeef))));
        let Reply::Data(conf) = d.control(setup(0xc1, BREQ_DEVICE_CONFIG, 12), &[]).0 else { panic!() };
        assert_eq!((conf.len(), conf[3]), (12, 0), "one channel");
        let Reply::Data(bt) = d.control(setup(0xc1, BREQ_BT_CONST, 40), &[]).0 else { panic!() };
        assert_eq!(bt.len(), 40);
        assert_eq!(u32::from_le_bytes(bt[4..8].try_into().unwrap()), FCLK_CAN);
        // 1 Mbit/s at 48 MHz: brp 3, 16 quanta (1 + prop 6 + phase1 7 + phase2 2).
        let timing: Vec<u8> = [6u32, 7, 2, 1, 3].iter().flat_map(|w| w.to_le_bytes()).collect();
        let (r, e) = d.control(setup(0x41, BREQ_BITTIMING, 20), &timing);
        assert_eq!((r, e), (Reply::Ack, Some(GsEvent::BitTiming { bitrate: 1_000_000 })));
        assert!(d.host_sent(&HostFrame::rx(0x3f0, &[0]).encode()).is_none(), "not started: nothing goes out");
        let (r, e) = d.control(setup(0x41, BREQ_MODE, 8), &[1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!((r, e), (Reply::Ack, Some(GsEvent::Started)));
        let sent = HostFrame { echo_id: 4, ..HostFrame::rx(0x3f0, &[0]) };
        let out = d.host_sent(&sent.encode()).unwrap();
        assert_eq!((out.echo_id, out.can_id, out.payload()), (4, 0x3f0, &[0u8][..]));
        assert_eq!(d.control(setup(0x41, BREQ_MODE, 8), &[0; 8]).1, Some(GsEvent::Stopped));
        assert!(!d.started);
    }

    #[test]
    fn other_requests_stall() {
        let mut d = GsUsbDevice::new();
        assert_eq!(d.control(setup(0x40, BREQ_MODE, 8), &[1, 0, 0, 0, 0, 0, 0, 0]).0, Reply::Stall, "device recipient");
        assert_eq!(d.control(setup(0xc1, BREQ_TIMESTAMP, 4), &[]).0, Reply::Stall);
        assert_eq!(d.control(setup(0x41, BREQ_MODE, 8), &[7, 0, 0, 0, 0, 0, 0, 0]).0, Reply::Stall);
        assert_eq!(d.control(setup(0x41, BREQ_BITTIMING, 20), &[0; 20]).0, Reply::Stall, "brp 0");
    }

    #[test]
    fn descriptors_name_the_endpoints_the_driver_expects() {
        let d = interface_descriptors(512);
        assert_eq!(d.len(), 9 + 7 + 7);
        assert_eq!((d[5], d[4]), (0xff, 2), "vendor class, two endpoints");
        assert_eq!((d[11], d[18]), (0x81, 0x02));
        assert_eq!(u16::from_le_bytes([d[13], d[14]]), 512);
    }
}
