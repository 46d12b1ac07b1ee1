//! The kernel's link changes (rtnetlink `RTMGRP_LINK`): an interface added, removed, set up
//! or down. udev says nothing about up/down, so the status learns it here, as events, with no
//! polling. The message parser is pure; only [`LinkWatch`] touches a socket.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use tokio::io::unix::AsyncFd;

use super::presence::Link;

const NLMSG_HDR: usize = 16;
const IFINFOMSG: usize = 16;
const IFLA_IFNAME: u16 = 3;

/// Every link change in one datagram of rtnetlink messages: (interface, its state now).
pub fn parse(buf: &[u8]) -> Vec<(String, Link)> {
    let mut out = Vec::new();
    let mut rest = buf;
    while rest.len() >= NLMSG_HDR {
        let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
        let kind = u16::from_ne_bytes(rest[4..6].try_into().unwrap());
        if len < NLMSG_HDR || len > rest.len() {
            break;
        }
        let body = &rest[NLMSG_HDR..len];
        if let Some(change) = link_change(kind, body) {
            out.push(change);
        }
        rest = &rest[align(len).min(rest.len())..];
    }
    out
}

fn align(n: usize) -> usize {
    (n + 3) & !3
}

fn link_change(kind: u16, body: &[u8]) -> Option<(String, Link)> {
    if (kind != libc::RTM_NEWLINK && kind != libc::RTM_DELLINK) || body.len() < IFINFOMSG {
        return None;
    }
    let flags = u32::from_ne_bytes(body[8..12].try_into().unwrap());
    let mut attrs = &body[IFINFOMSG..];
    let mut name = None;
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes(attrs[0..2].try_into().unwrap()) as usize;
        let ty = u16::from_ne_bytes(attrs[2..4].try_into().unwrap());
        if len < 4 || len > attrs.len() {
            break;
        }
        if ty == IFLA_IFNAME {
            let raw = &attrs[4..len];
            let raw = raw.split(|b| *b == 0).next().unwrap_or(raw);
            name = Some(String::from_utf8_lossy(raw).into_owned());
        }
        attrs = &attrs[align(len).min(attrs.len())..];
    }
    let link = if kind == libc::RTM_DELLINK {
        Link::Absent
    } else if flags & libc::IFF_UP as u32 != 0 {
        Link::Up
    } else {
        Link::Down
    };
    Some((name?, link))
}

/// A subscription to the kernel's link changes. Open it before reading the interfaces'
/// state, so no change falls in between.
pub struct LinkWatch {
    fd: AsyncFd<OwnedFd>,
    buf: Vec<u8>,
}

impl LinkWatch {
    pub fn open() -> io::Result<LinkWatch> {
        // SAFETY: plain socket(2); the fd is owned at once.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_ROUTE,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: an all-zero sockaddr_nl is valid; the fields that matter are set below.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = libc::RTMGRP_LINK as u32;
        // SAFETY: addr is a sockaddr_nl of the size given.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the AsyncFd owns the descriptor; it is deregistered before it is closed on drop.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| io::Error::other(e.to_string()))?;
        Ok(LinkWatch { fd, buf: vec![0; 32 * 1024] })
    }

    /// The next batch of link changes (never empty). ENOBUFS (the kernel dropped changes
    /// while nobody read) is returned as an error: the caller reads the state again.
    pub async fn next(&mut self) -> io::Result<Vec<(String, Link)>> {
        loop {
            let mut guard = self.fd.readable().await?;
            let buf = &mut self.buf;
            let read = guard.try_io(|fd| {
                // SAFETY: recv into our own buffer of its length.
                let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match read {
                Ok(Ok(n)) => {
                    let changes = parse(&self.buf[..n]);
                    if !changes.is_empty() {
                        return Ok(changes);
                    }
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u16, flags: u32, name: &str) -> Vec<u8> {
        let mut attr = Vec::new();
        let name_len = 4 + name.len() + 1;
        attr.extend((name_len as u16).to_ne_bytes());
        attr.extend(IFLA_IFNAME.to_ne_bytes());
        attr.extend(name.as_bytes());
        attr.push(0);
        while attr.len() % 4 != 0 {
            attr.push(0);
        }
        // An attribute the parser skips (IFLA_MTU).
        attr.extend(8u16.to_ne_bytes());
        attr.extend(4u16.to_ne_bytes());
        attr.extend(16u32.to_ne_bytes());
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
    fn new_and_deleted_links_are_read_with_their_state() {
        let mut buf = message(libc::RTM_NEWLINK, libc::IFF_UP as u32 | 0x40, "vcan0");
        buf.extend(message(libc::RTM_NEWLINK, 0x80, "can0"));
        buf.extend(message(libc::RTM_DELLINK, 0, "can1"));
        buf.extend(message(libc::RTM_NEWADDR, 0, "eth0"));
        assert_eq!(
            parse(&buf),
            [("vcan0".to_string(), Link::Up), ("can0".to_string(), Link::Down), ("can1".to_string(), Link::Absent)]
        );
    }

    #[test]
    fn a_truncated_datagram_yields_what_is_whole() {
        let mut buf = message(libc::RTM_NEWLINK, libc::IFF_UP as u32, "can0");
        let second = message(libc::RTM_NEWLINK, 0, "can1");
        buf.extend(&second[..second.len() - 3]);
        assert_eq!(parse(&buf), [("can0".to_string(), Link::Up)]);
        assert!(parse(&[1, 2, 3]).is_empty());
    }
}
