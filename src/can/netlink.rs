//! Network links as the kernel announces them (rtnetlink's link group): a CAN interface
//! appearing, going UP or away, as events, never a polled sysfs file. Used to await a
//! USB-to-CAN bridge's interface after its reflash.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use tokio::io::unix::AsyncFd;
use tokio::time::Instant;

const RTMGRP_LINK: u32 = 1;
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const IFLA_IFNAME: u16 = 3;
const NLMSG_HDR: usize = 16;
const IFINFOMSG: usize = 16;

/// One link announcement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkEvent {
    pub name: String,
    pub up: bool,
    pub removed: bool,
}

/// Parse one datagram of rtnetlink messages (pure, for the tests).
pub fn parse_link_messages(buf: &[u8]) -> Vec<LinkEvent> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + NLMSG_HDR <= buf.len() {
        let len = u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().expect("2 bytes"));
        if len < NLMSG_HDR || at + len > buf.len() {
            break;
        }
        let msg = &buf[at + NLMSG_HDR..at + len];
        if matches!(kind, RTM_NEWLINK | RTM_DELLINK) && msg.len() >= IFINFOMSG {
            let flags = u32::from_ne_bytes(msg[8..12].try_into().expect("4 bytes"));
            let mut a = IFINFOMSG;
            let mut name = None;
            while a + 4 <= msg.len() {
                let alen = u16::from_ne_bytes(msg[a..a + 2].try_into().expect("2 bytes")) as usize;
                let atype = u16::from_ne_bytes(msg[a + 2..a + 4].try_into().expect("2 bytes")) & 0x3fff;
                if alen < 4 || a + alen > msg.len() {
                    break;
                }
                if atype == IFLA_IFNAME {
                    let raw = &msg[a + 4..a + alen];
                    let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
                    name = Some(String::from_utf8_lossy(&raw[..end]).into_owned());
                }
                a += (alen + 3) & !3;
            }
            if let Some(name) = name {
                out.push(LinkEvent { name, up: flags & libc::IFF_UP as u32 != 0, removed: kind == RTM_DELLINK });
            }
        }
        at += (len + 3) & !3;
    }
    out
}

/// A subscription to the kernel's link announcements. Open it before looking at the current
/// state, so nothing that happens in between is missed.
pub struct LinkWatch {
    fd: AsyncFd<OwnedFd>,
    pending: std::collections::VecDeque<LinkEvent>,
}

impl LinkWatch {
    pub fn open() -> io::Result<LinkWatch> {
        // SAFETY: plain socket/bind calls on a socket we own; the address is a valid sockaddr_nl.
        unsafe {
            let fd = libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            );
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let fd = OwnedFd::from_raw_fd(fd);
            let mut addr: libc::sockaddr_nl = std::mem::zeroed();
            addr.nl_family = libc::AF_NETLINK as u16;
            addr.nl_groups = RTMGRP_LINK;
            let r = libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            );
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
            // The OwnedFd moves into the AsyncFd and stays open for its lifetime.
            Ok(LinkWatch { fd: AsyncFd::register(fd)?, pending: Default::default() })
        }
    }

    /// The next announcement, or `None` at the deadline.
    pub async fn next(&mut self, deadline: Instant) -> io::Result<Option<LinkEvent>> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Ok(Some(e));
            }
            let mut guard = match tokio::time::timeout_at(deadline, self.fd.readable()).await {
                Err(_) => return Ok(None),
                Ok(g) => g?,
            };
            let mut buf = vec![0u8; 16 * 1024];
            let read = guard.try_io(|inner| {
                // SAFETY: reading into a valid buffer from a valid fd.
                let n = unsafe { libc::recv(inner.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match read {
                Ok(Ok(n)) => self.pending.extend(parse_link_messages(&buf[..n])),
                // An overrun lost announcements: the caller's state check covers it.
                Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn newlink(kind: u16, name: &str, flags: u32) -> Vec<u8> {
        let mut attr = Vec::new();
        let raw = [name.as_bytes(), &[0]].concat();
        attr.extend(((4 + raw.len()) as u16).to_ne_bytes());
        attr.extend(IFLA_IFNAME.to_ne_bytes());
        attr.extend(&raw);
        while attr.len() % 4 != 0 {
            attr.push(0);
        }
        let mut ifi = vec![0u8; IFINFOMSG];
        ifi[8..12].copy_from_slice(&flags.to_ne_bytes());
        let len = NLMSG_HDR + ifi.len() + attr.len();
        let mut m = Vec::new();
        m.extend((len as u32).to_ne_bytes());
        m.extend(kind.to_ne_bytes());
        m.extend([0u8; 10]);
        m.extend(ifi);
        m.extend(attr);
        m
    }

    #[test]
    fn link_messages_name_the_interface_and_its_state() {
        let mut dgram = newlink(RTM_NEWLINK, "can0", 0);
        dgram.extend(newlink(RTM_NEWLINK, "can0", libc::IFF_UP as u32));
        dgram.extend(newlink(RTM_DELLINK, "can0", 0));
        dgram.extend(newlink(20, "ignored", 0));
        assert_eq!(
            parse_link_messages(&dgram),
            vec![
                LinkEvent { name: "can0".into(), up: false, removed: false },
                LinkEvent { name: "can0".into(), up: true, removed: false },
                LinkEvent { name: "can0".into(), up: false, removed: true },
            ]
        );
        assert_eq!(parse_link_messages(&dgram[..10]), vec![]);
    }
}
