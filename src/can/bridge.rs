//! Klipper's USB-to-CAN bridge (gs_usb, 1d50:606f): its own CAN UUID follows from its USB
//! serial. Klipper writes the chip id as upper-case hex into the USB serial
//! (`usb_fill_serial`) and hashes the same chip id into the UUID (`canserial_set_uuid`):
//! the first six bytes, in memory order, of `fasthash64(chip_id, 0xA16231A7)`.

use super::uuid::{CanUuid, UUID_LEN};

/// USB ids of Klipper's USB-to-CAN bridge firmware.
pub const BRIDGE_VID: u16 = 0x1d50;
pub const BRIDGE_PID: u16 = 0x606f;

const UUID_SEED: u64 = 0xA162_31A7;

/// fast-hash's 64-bit hash (ztanml/fast-hash), as built into Klipper's firmware.
pub fn fasthash64(buf: &[u8], seed: u64) -> u64 {
    const M: u64 = 0x8803_55f2_1e6d_1965;
    let mix = |mut h: u64| {
        h ^= h >> 23;
        h = h.wrapping_mul(0x2127_599b_f432_5c37);
        h ^ (h >> 47)
    };
    let mut h = seed ^ (buf.len() as u64).wrapping_mul(M);
    let mut words = buf.chunks_exact(8);
    for w in &mut words {
        h ^= mix(u64::from_le_bytes(w.try_into().expect("8 bytes")));
        h = h.wrapping_mul(M);
    }
    let tail = words.remainder();
    if !tail.is_empty() {
        // The tail bytes, little-endian, as fast-hash's fall-through switch reads them.
        let v = tail.iter().rev().fold(0u64, |v, b| (v << 8) | u64::from(*b));
        h ^= mix(v);
        h = h.wrapping_mul(M);
    }
    mix(h)
}

/// The UUID Klipper derives from a chip id.
pub fn uuid_from_chip_id(chip_id: &[u8]) -> CanUuid {
    let hash = fasthash64(chip_id, UUID_SEED).to_le_bytes();
    let mut u = [0u8; UUID_LEN];
    u.copy_from_slice(&hash[..UUID_LEN]);
    CanUuid(u)
}

/// The bridge's UUID from its USB serial, or `None` when the serial is not a hex chip id
/// (a firmware built with a custom `CONFIG_USB_SERIAL_NUMBER`): then only a query can tell.
pub fn uuid_from_usb_serial(serial: &str) -> Option<CanUuid> {
    let s = serial.trim();
    if s.is_empty() || !s.len().is_multiple_of(2) || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let chip_id: Vec<u8> =
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16)).collect::<Result<_, _>>().ok()?;
    Some(uuid_from_chip_id(&chip_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_example_serial_to_uuid() {
        // From the reference (computed with flashtool's convert_usbsn_to_uuid).
        let u = uuid_from_usb_serial("2D0028000B51333234383230").unwrap();
        assert_eq!(u.to_string(), "f3f4159b80a6");
        // Serial case does not matter: it is hex.
        assert_eq!(uuid_from_usb_serial("2d0028000b51333234383230"), Some(u));
    }

    #[test]
    fn fasthash_known_values() {
        // The 12-byte stm32 chip id of the example above (one full word plus a 4-byte tail),
        // and an 8-byte rp2040-sized id (no tail). Values from a Python port of fast-hash
        // written like flashtool's; the reference's serial→UUID example is the independent check.
        assert_eq!(fasthash64(&[], 0), 0);
        let stm32 = [0x2d, 0x00, 0x28, 0x00, 0x0b, 0x51, 0x33, 0x32, 0x34, 0x38, 0x32, 0x30];
        assert_eq!(fasthash64(&stm32, UUID_SEED), 0xb449_a680_9b15_f4f3);
        assert_eq!(fasthash64(&[0, 1, 2, 3, 4, 5, 6, 7], UUID_SEED), 0x7b6c_5df6_4caa_ef65);
        assert_eq!(uuid_from_chip_id(&[0, 1, 2, 3, 4, 5, 6, 7]).to_string(), "65efaa4cf65d");
        assert_eq!(fasthash64(&[0, 1, 2], 1), 0x035c_68f5_f0c6_7ba3);
    }

    #[test]
    fn non_hex_serials_have_no_uuid() {
        for s in ["", "ABC", "my-bridge-01", "2D0028000B5133323438323G"] {
            assert_eq!(uuid_from_usb_serial(s), None, "{s}");
        }
    }
}
