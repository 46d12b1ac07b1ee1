//! usbmon text API (Documentation/usb/usbmon.rst, "u" format) parsing and the CDC-ACM
//! line state a Klipper firmware tracks to detect the 1200-baud bootloader request.
//!
//! A line looks like
//! `ffff8880061b2a80 3575881862 S Co:1:002:0 s 21 20 0000 0000 0007 7 = b0040000 000008`:
//! URB tag, timestamp (µs), event (S submit, C complete, E error), `<type><dir>:bus:dev:ep`,
//! then for a control submission `s` and the setup packet (bmRequestType bRequest wValue
//! wIndex wLength), the data length and `=` followed by the data as hex words.

/// CDC class requests (bmRequestType 0x21 = host-to-device, class, interface).
pub const CDC_SET_LINE_CODING: u8 = 0x20;
pub const CDC_SET_CONTROL_LINE_STATE: u8 = 0x22;
const CDC_REQTYPE_OUT: u8 = 0x21;

/// A control-OUT setup seen on the bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlSetup {
    pub event: char,
    pub bus: u32,
    pub dev: u32,
    pub request_type: u8,
    pub request: u8,
    pub value: u16,
    pub index: u16,
    pub length: u16,
    /// The data stage, when captured.
    pub data: Vec<u8>,
}

/// Parse one usbmon text line; `None` for anything that is not a control setup.
pub fn parse_line(line: &str) -> Option<ControlSetup> {
    let t: Vec<&str> = line.split_whitespace().collect();
    if t.len() < 10 {
        return None;
    }
    let event = t[2].chars().next()?;
    let mut addr = t[3].split(':');
    let kind = addr.next()?;
    if !kind.starts_with('C') {
        return None; // not a control transfer
    }
    let bus = addr.next()?.parse().ok()?;
    let dev = addr.next()?.parse().ok()?;
    if t[4] != "s" {
        return None;
    }
    let hex8 = |s: &str| u8::from_str_radix(s, 16).ok();
    let hex16 = |s: &str| u16::from_str_radix(s, 16).ok();
    let request_type = hex8(t[5])?;
    let request = hex8(t[6])?;
    let value = hex16(t[7])?;
    let index = hex16(t[8])?;
    let length = hex16(t[9])?;
    let mut data = Vec::new();
    if t.len() > 11 && t[11] == "=" {
        let declared: usize = t[10].parse().unwrap_or(0);
        for word in &t[12..] {
            let w = word.as_bytes();
            if w.len() % 2 != 0 {
                break;
            }
            for pair in w.chunks(2) {
                let s = std::str::from_utf8(pair).ok()?;
                data.push(u8::from_str_radix(s, 16).ok()?);
            }
        }
        data.truncate(declared);
    }
    Some(ControlSetup { event, bus, dev, request_type, request, value, index, length, data })
}

/// What a line-state change means for the firmware.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineEvent {
    /// Baud rate changed (SET_LINE_CODING).
    Baud(u32),
    /// DTR/RTS changed (SET_CONTROL_LINE_STATE).
    ControlLines { dtr: bool, rts: bool },
}

/// The CDC-ACM line state as Klipper's usb_cdc.c keeps it; reset at every boot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LineState {
    pub baud: u32,
    pub dtr: bool,
    pub rts: bool,
    /// Whether the bootloader request condition held after the previous request.
    pub requesting: bool,
}

impl LineState {
    /// Apply a control setup (only submissions of CDC requests matter). Returns the change
    /// and whether the bootloader request condition (baud 1200 with DTR clear) now holds;
    /// Klipper checks after both SET_LINE_CODING and SET_CONTROL_LINE_STATE. See
    /// [`newly_requesting`](Self::newly_requesting) for edge detection.
    pub fn apply(&mut self, s: &ControlSetup) -> Option<(LineEvent, bool)> {
        if s.event != 'S' || s.request_type != CDC_REQTYPE_OUT {
            return None;
        }
        let ev = match s.request {
            CDC_SET_LINE_CODING => {
                if s.data.len() < 4 {
                    return None;
                }
                self.baud = u32::from_le_bytes([s.data[0], s.data[1], s.data[2], s.data[3]]);
                LineEvent::Baud(self.baud)
            }
            CDC_SET_CONTROL_LINE_STATE => {
                self.dtr = s.value & 1 != 0;
                self.rts = s.value & 2 != 0;
                LineEvent::ControlLines { dtr: self.dtr, rts: self.rts }
            }
            _ => return None,
        };
        Some((ev, self.baud == 1200 && !self.dtr))
    }

    /// Like [`apply`](Self::apply), but the flag is true only when the condition becomes
    /// true (a close after the touch repeats DTR-clear at 1200 baud: one request, not two).
    pub fn newly_requesting(&mut self, s: &ControlSetup) -> Option<(LineEvent, bool)> {
        let (ev, now) = self.apply(s)?;
        let edge = now && !self.requesting;
        self.requesting = now;
        Some((ev, edge))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The three lines from the rig facts file (host: open, DTR set, 1200 baud, DTR clear).
    const OPEN: &str = "ffff8880061b2a80 3575881862 S Co:1:002:0 s 21 22 0003 0000 0000 0";
    const BAUD: &str = "ffff8880061b2a80 3575882001 S Co:1:002:0 s 21 20 0000 0000 0007 7 = b0040000 000008";
    const DROP: &str = "ffff8880061b2a80 3575882100 S Co:1:002:0 s 21 22 0000 0000 0000 0";

    #[test]
    fn parse_examples() {
        let s = parse_line(BAUD).unwrap();
        assert_eq!(s.event, 'S');
        assert_eq!((s.bus, s.dev), (1, 2));
        assert_eq!((s.request_type, s.request, s.value, s.index, s.length), (0x21, 0x20, 0, 0, 7));
        assert_eq!(s.data, vec![0xb0, 0x04, 0, 0, 0, 0, 8]);
        let s = parse_line(OPEN).unwrap();
        assert_eq!((s.request, s.value), (0x22, 3));
        assert!(s.data.is_empty());
        // Completions, bulk traffic and junk are not setups.
        assert!(parse_line("ffff8880061b2a80 3575882050 C Co:1:002:0 0 7 >").is_none());
        assert!(parse_line("ffff888003c7e000 3575883000 S Bo:1:002:2 -115 8 = 01881100 f17c9903").is_none());
        assert!(parse_line("garbage").is_none());
        assert!(parse_line("").is_none());
        // A GET_DESCRIPTOR (control IN) parses but is not a CDC request.
        let g = parse_line("ffff8880 1 S Ci:3:001:0 s 80 06 0100 0000 0012 18 <").unwrap();
        assert_eq!((g.bus, g.request_type, g.request), (3, 0x80, 6));
        assert!(LineState::default().apply(&g).is_none());
    }

    #[test]
    fn touch_sequence() {
        let mut st = LineState::default();
        assert_eq!(
            st.apply(&parse_line(OPEN).unwrap()),
            Some((LineEvent::ControlLines { dtr: true, rts: true }, false))
        );
        assert_eq!(st.apply(&parse_line(BAUD).unwrap()), Some((LineEvent::Baud(1200), false)));
        assert_eq!(
            st.apply(&parse_line(DROP).unwrap()),
            Some((LineEvent::ControlLines { dtr: false, rts: false }, true))
        );
        // 250000 baud then DTR drop (a normal close): no reboot.
        let mut st = LineState::default();
        let l = "x 1 S Co:1:002:0 s 21 20 0000 0000 0007 7 = 90d00300 000008";
        assert_eq!(st.apply(&parse_line(l).unwrap()), Some((LineEvent::Baud(250000), false)));
        assert!(!st.apply(&parse_line(DROP).unwrap()).unwrap().1);
        // Edge detection: the close after a touch (DTR clear again) is not a second request.
        let mut st = LineState::default();
        assert!(!st.newly_requesting(&parse_line(OPEN).unwrap()).unwrap().1);
        assert!(!st.newly_requesting(&parse_line(BAUD).unwrap()).unwrap().1);
        assert!(st.newly_requesting(&parse_line(DROP).unwrap()).unwrap().1);
        assert!(!st.newly_requesting(&parse_line(DROP).unwrap()).unwrap().1);
        assert!(!st.newly_requesting(&parse_line(OPEN).unwrap()).unwrap().1);
        assert!(st.newly_requesting(&parse_line(DROP).unwrap()).unwrap().1);
        // Completion events are ignored.
        let c = "x 1 C Co:1:002:0 s 21 20 0000 0000 0007 7 = b0040000 000008";
        assert!(st.apply(&parse_line(c).unwrap()).is_none());
    }
}
