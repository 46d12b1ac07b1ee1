//! One classic CAN 2.0A data frame: an 11-bit id and up to 8 bytes. Klipper uses no other kind.

use std::fmt;

/// Highest standard (11-bit) identifier.
pub const MAX_STANDARD_ID: u16 = 0x7ff;
/// Payload bytes in one classic CAN frame.
pub const MAX_DATA: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("CAN id {0:#x} is not a standard 11-bit id")]
    BadId(u32),
    #[error("a CAN frame carries at most 8 bytes, not {0}")]
    TooLong(usize),
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CanFrame {
    id: u16,
    len: u8,
    data: [u8; MAX_DATA],
}

impl CanFrame {
    pub fn new(id: u16, data: &[u8]) -> Result<CanFrame, FrameError> {
        if id > MAX_STANDARD_ID {
            return Err(FrameError::BadId(id.into()));
        }
        if data.len() > MAX_DATA {
            return Err(FrameError::TooLong(data.len()));
        }
        let mut buf = [0u8; MAX_DATA];
        buf[..data.len()].copy_from_slice(data);
        Ok(CanFrame { id, len: data.len() as u8, data: buf })
    }

    pub fn id(&self) -> u16 {
        self.id
    }

    pub fn data(&self) -> &[u8] {
        &self.data[..self.len as usize]
    }
}

impl fmt::Debug for CanFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:03x}#", self.id)?;
        for b in self.data() {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_extended_ids_and_long_payloads() {
        assert_eq!(CanFrame::new(0x800, &[]), Err(FrameError::BadId(0x800)));
        assert_eq!(CanFrame::new(0x3f0, &[0; 9]), Err(FrameError::TooLong(9)));
        let f = CanFrame::new(0x7ff, &[1, 2, 3]).unwrap();
        assert_eq!((f.id(), f.data()), (0x7ff, &[1u8, 2, 3][..]));
        assert_eq!(format!("{f:?}"), "7ff#010203");
    }
}
