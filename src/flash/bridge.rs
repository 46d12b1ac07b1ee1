//! The steps that are the USB-to-CAN bridge's own (the write itself is USB Katapult's): ask
//! its CAN node for the bootloader by UUID, and after the write await its CAN interface back
//! and UP. The bridge's reboot takes the interface away; whatever normally brings it up
//! (systemd-networkd, ifupdown's allow-hotplug) gets a short grace, then kflash brings it up
//! itself at the bitrate the boards behind it were built for. Every wait is a deadline on the
//! kernel's link announcements.

use std::path::Path;
use std::time::Duration;

use tokio::time::Instant;

use crate::can::link::{request_bootloader as can_request_bootloader, FrameSocket};
use crate::can::linkwatch::LinkWatch;
use crate::can::preflight::MIN_TXQUEUELEN;
use crate::can::presence::{read_link, Link};
use crate::can::{CanError, CanUuid};

/// How long something else may take to bring the interface up before kflash does it.
pub const UP_GRACE: Duration = Duration::from_secs(3);

/// Who brought the interface up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BroughtUp {
    /// Something else (systemd-networkd, ifupdown), or it never went down.
    Others,
    /// kflash, at this bitrate.
    Kflash { bitrate: u32 },
}

/// Ask the bridge's own CAN node for its bootloader (Klipper's admin message): the bridge
/// reboots and its interface goes away, so no answer is awaited on the bus.
pub async fn request_bootloader<S: FrameSocket>(mut socket: S, interface: &str, uuid: CanUuid) -> Result<(), CanError> {
    can_request_bootloader(&mut socket, uuid)
        .await
        .map_err(|e| CanError::Io { interface: interface.to_string(), message: e.to_string() })
}

/// Await `interface` present and UP; bring it up at `bitrate` (with txqueuelen 128) when
/// nothing else has within [`UP_GRACE`] of its appearance.
pub async fn await_interface_up(
    interface: &str,
    bitrate: Option<u32>,
    deadline: Instant,
) -> Result<BroughtUp, CanError> {
    let io = |e: std::io::Error| CanError::Io { interface: interface.to_string(), message: e.to_string() };
    let started = Instant::now();
    // Subscribed before the state is read: nothing in between is missed.
    let mut watch = LinkWatch::open().map_err(io)?;
    let mut present = match read_link(interface) {
        Link::Up => return Ok(BroughtUp::Others),
        Link::Down => Some(Instant::now()),
        Link::Absent => None,
    };
    // The bitrate kflash brought it up at, once it has tried.
    let mut tried: Option<u32> = None;
    loop {
        // Present and down: the grace for others, then kflash's own attempt.
        let wake = match present {
            Some(at) if tried.is_none() => (at + UP_GRACE).min(deadline),
            _ => deadline,
        };
        let changes = match tokio::time::timeout_at(wake, watch.next()).await {
            Ok(Ok(changes)) => Some(changes),
            // The kernel dropped announcements while nobody read: the state as it is now.
            Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                Some(vec![(interface.to_string(), read_link(interface))])
            }
            Ok(Err(e)) => return Err(io(e)),
            Err(_) => None,
        };
        match changes {
            Some(changes) => {
                for (_, link) in changes.into_iter().filter(|(name, _)| name == interface) {
                    match link {
                        Link::Absent => present = None,
                        Link::Up => {
                            return Ok(match tried {
                                Some(bitrate) => BroughtUp::Kflash { bitrate },
                                None => BroughtUp::Others,
                            })
                        }
                        Link::Down => present = present.or(Some(Instant::now())),
                    }
                }
            }
            None if Instant::now() >= deadline => {
                let secs = started.elapsed().as_secs_f64();
                return Err(match present {
                    None => CanError::BridgeInterfaceMissing { interface: interface.to_string(), secs },
                    Some(_) => CanError::BridgeBringUp {
                        interface: interface.to_string(),
                        bitrate,
                        message: format!("it was still down after {secs:.1} s"),
                    },
                });
            }
            None => tried = Some(bring_up(interface, bitrate)?),
        }
    }
}

/// `ip link set IFACE type can bitrate B; ip link set IFACE txqueuelen 128 up`, through
/// rtnetlink and sysfs; returns the bitrate.
fn bring_up(interface: &str, bitrate: Option<u32>) -> Result<u32, CanError> {
    let fail = |message: String| CanError::BridgeBringUp { interface: interface.to_string(), bitrate, message };
    let Some(rate) = bitrate else {
        return Err(fail("no board behind it has CONFIG_CANBUS_FREQUENCY in its config".into()));
    };
    let iface = socketcan::CanInterface::open(interface).map_err(|e| fail(e.to_string()))?;
    iface.set_bitrate(rate, None).map_err(|e| fail(format!("setting the bitrate {rate}: {e}")))?;
    std::fs::write(Path::new("/sys/class/net").join(interface).join("tx_queue_len"), MIN_TXQUEUELEN.to_string())
        .map_err(|e| fail(format!("setting txqueuelen {MIN_TXQUEUELEN}: {e}")))?;
    iface.bring_up().map_err(|e| fail(format!("bringing it up: {e}")))?;
    Ok(rate)
}
