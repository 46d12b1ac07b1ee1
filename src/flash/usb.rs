//! The USB side of a flash, as hotplug futures: ask for the bootloader and await the same
//! board re-enumerating in it; await it coming back running Klipper; reset it through sysfs.

use std::path::{Path, PathBuf};

use tokio::time::Instant;

use super::error::FlashError;
use super::serial::request_bootloader;
use crate::error::Error;
use crate::hotplug::{Board, Hotplug};
use crate::identity::{BoardIdentity, Mode};

/// How long a board that ignored the bootloader request gets to answer identify (a live
/// one answers in well under a second, 1.3 s seen under emulation).
const HUNG_PROBE: std::time::Duration = std::time::Duration::from_secs(5);

/// Put a board running Klipper into its bootloader with the 1200-baud request and resolve
/// when the same board (by chip id + MCU, else USB port) shows up in Katapult. A board
/// already in Katapult is returned as is.
pub async fn enter_bootloader(hp: &Hotplug, board: &Board, deadline: Instant) -> Result<Board, FlashError> {
    if board.identity.mode == Mode::Katapult {
        return Ok(board.clone());
    }
    let devnode = board
        .identity
        .devnode
        .clone()
        .ok_or_else(|| FlashError::NoBootloader("the board has no device node".into()))?;
    let original = board.identity.clone();
    // Arm before touching: the board can be back before this task runs again.
    let waiter = hp.arm("the board in its bootloader", move |b| {
        b.identity.same_board(&original) && matches!(b.identity.mode, Mode::Katapult | Mode::RomBootloader)
    });
    request_bootloader(Path::new(&devnode)).map_err(|e| FlashError::Io {
        path: devnode.clone(),
        message: format!("1200-baud bootloader request failed: {e}"),
    })?;
    let found = match waiter.until(deadline).await {
        Ok(b) => b,
        Err(Error::Timeout { secs, .. }) => {
            // Tell "ignored the request" from "left and never came back".
            let still = hp
                .snapshot()
                .into_iter()
                .any(|b| b.identity.same_board(&board.identity) && b.identity.mode == Mode::Klipper);
            // A board that ignores the request may be one whose firmware hangs: ask it what
            // it runs, as Klippy does; no answer tells the two apart.
            if still && super::identify::read_identify(Path::new(&devnode), Instant::now() + HUNG_PROBE).await.is_err()
            {
                return Err(FlashError::Hung { secs, probe_secs: HUNG_PROBE.as_secs_f64() });
            }
            return Err(FlashError::NoBootloader(if still {
                format!("it is still running Klipper {secs:.1} s after the 1200-baud request (it ignored it)")
            } else {
                format!("it disconnected after the 1200-baud request and did not come back within {secs:.1} s")
            }));
        }
        Err(other) => return Err(FlashError::NoBootloader(other.to_string())),
    };
    match found.identity.mode {
        Mode::Katapult => Ok(found),
        _ => Err(rom_bootloader(&found.identity)),
    }
}

fn rom_bootloader(id: &BoardIdentity) -> FlashError {
    FlashError::RomBootloader {
        name: id.rom_bootloader.unwrap_or("a ROM bootloader").to_string(),
        vid_pid: format!("{}:{}", id.vendor_id.as_deref().unwrap_or("?"), id.product_id.as_deref().unwrap_or("?")),
    }
}

/// Resolve when the board shows up running Klipper again. If it re-enumerates in Katapult or
/// a ROM bootloader instead (the new image did not start), fail at once rather than at the
/// deadline.
pub async fn await_application(hp: &Hotplug, board: &BoardIdentity, deadline: Instant) -> Result<Board, FlashError> {
    let (a, b) = (board.clone(), board.clone());
    let klipper =
        hp.arm("the board running Klipper", move |x| x.identity.same_board(&a) && x.identity.mode == Mode::Klipper);
    // Only a *new* appearance counts: the bootloader it is leaving may still be listed.
    let elsewhere = hp.arm_next("the board back in a bootloader", move |x| {
        x.identity.same_board(&b) && matches!(x.identity.mode, Mode::Katapult | Mode::RomBootloader)
    });
    let started = Instant::now();
    tokio::select! {
        r = klipper.until(deadline) => match r {
            Ok(b) => Ok(b),
            Err(Error::Timeout { secs, .. }) => Err(FlashError::NotBack(format!("it has not re-enumerated within {secs:.1} s"))),
            Err(other) => Err(FlashError::NotBack(other.to_string())),
        },
        Ok(b) = elsewhere.until(deadline) => Err(FlashError::NotBack(match b.identity.mode {
            Mode::Katapult => format!(
                "it came back in Katapult after {:.1} s: the new image did not start",
                started.elapsed().as_secs_f64()
            ),
            _ => format!("it came back in {}", b.identity.rom_bootloader.unwrap_or("a ROM bootloader")),
        })),
    }
}

/// The sysfs `authorized` switch of the USB device a board sits on.
pub fn authorized_path(board: &BoardIdentity) -> Option<PathBuf> {
    let dev = board.usb_device.as_deref()?;
    let dev =
        if dev.starts_with("/sys/") { PathBuf::from(dev) } else { Path::new("/sys").join(dev.trim_start_matches('/')) };
    Some(dev.join("authorized"))
}

/// De-authorize and re-authorize the board's USB device: the kernel drops it and enumerates
/// it again, as if re-plugged. Recovers a board that ignored a bootloader request.
pub fn usb_reset(board: &BoardIdentity) -> Result<(), FlashError> {
    let path = authorized_path(board).ok_or_else(|| FlashError::Tool("the board's USB device is unknown".into()))?;
    let io = |e: std::io::Error| FlashError::Io { path: path.display().to_string(), message: e.to_string() };
    std::fs::write(&path, "0").map_err(io)?;
    std::fs::write(&path, "1").map_err(io)?;
    Ok(())
}
