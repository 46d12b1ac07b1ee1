//! The real [`FrameSocket`]: a raw SocketCAN socket on an interface (e.g. `can0`), through the
//! `socketcan` crate's tokio support. Only classic data frames with 11-bit ids are passed on;
//! an error frame (bus-off, controller problems) becomes an I/O error naming the cause.

use std::io;

use socketcan::tokio::CanSocket;
use socketcan::{EmbeddedFrame, Frame, Id, SocketOptions, StandardId};
use tokio::time::Instant;

use super::frame::CanFrame;
use super::link::FrameSocket;

/// Error classes worth hearing about while flashing: bus-off and controller state changes.
const ERROR_MASK: u32 = libc::CAN_ERR_BUSOFF | libc::CAN_ERR_CRTL | libc::CAN_ERR_RESTARTED;

pub struct SocketCan {
    socket: CanSocket,
    interface: String,
}

impl SocketCan {
    /// Bind to `interface`. Needs no privileges; fails when the interface does not exist.
    pub fn open(interface: &str) -> io::Result<SocketCan> {
        let socket = CanSocket::open(interface)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot open CAN interface {interface}: {e}")))?;
        socket.set_error_filter(ERROR_MASK)?;
        Ok(SocketCan { socket, interface: interface.to_string() })
    }

    pub fn interface(&self) -> &str {
        &self.interface
    }
}

fn to_socketcan(frame: &CanFrame) -> io::Result<socketcan::CanFrame> {
    let id = StandardId::new(frame.id()).ok_or_else(|| io::Error::other(format!("bad CAN id {:#x}", frame.id())))?;
    socketcan::CanFrame::new(Id::Standard(id), frame.data()).ok_or_else(|| io::Error::other("CAN frame too long"))
}

/// Our frame, if this is a standard-id data frame.
fn from_socketcan(frame: &socketcan::CanFrame) -> Option<CanFrame> {
    match frame {
        socketcan::CanFrame::Data(d) if !d.is_extended() => CanFrame::new(d.raw_id() as u16, d.data()).ok(),
        _ => None,
    }
}

impl FrameSocket for SocketCan {
    async fn send(&mut self, frame: &CanFrame) -> io::Result<()> {
        self.socket.write_frame(to_socketcan(frame)?).await
    }

    async fn recv(&mut self, deadline: Instant) -> io::Result<Option<CanFrame>> {
        loop {
            let frame = match tokio::time::timeout_at(deadline, self.socket.read_frame()).await {
                Err(_elapsed) => return Ok(None),
                Ok(r) => r?,
            };
            if let socketcan::CanFrame::Error(e) = &frame {
                let cause = socketcan::CanError::from(*e);
                return Err(io::Error::other(format!("CAN interface {}: {cause}", self.interface)));
            }
            if let Some(f) = from_socketcan(&frame) {
                return Ok(Some(f));
            }
        }
    }

    fn discard_input(&mut self) {
        while self.socket.try_read_frame().is_ok() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_convert_both_ways() {
        let ours = CanFrame::new(0x3f0, &[0x02, 1, 2, 3, 4, 5, 6]).unwrap();
        let theirs = to_socketcan(&ours).unwrap();
        assert_eq!(from_socketcan(&theirs), Some(ours));
        // Extended-id frames are not Klipper's and are skipped.
        let ext = socketcan::CanFrame::new(socketcan::ExtendedId::new(0x3f0).unwrap(), &[1]).unwrap();
        assert_eq!(from_socketcan(&ext), None);
    }

    #[test]
    fn a_missing_interface_is_named() {
        let err = SocketCan::open("kflash-nonexistent0").err().expect("no such interface");
        assert!(err.to_string().contains("kflash-nonexistent0"), "{err}");
    }
}
