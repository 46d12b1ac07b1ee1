//! The USB side of a flash, as hotplug futures: ask for the bootloader and await the same
//! board re-enumerating in it; await it coming back running Klipper; reset it through sysfs.

use std::path::{Path, PathBuf};

use tokio::time::Instant;

use super::error::FlashError;
use super::serial::request_bootloader;
use crate::error::Error;
use crate::hotplug::{Board, Hotplug};
use crate::identity::{BoardIdentity, Mode};

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
    request_bootloader(Path::new(&devnode))
        .map_err(|e| FlashError::Io { path: devnode.clone(), message: format!("1200-baud bootloader request failed: {e}") })?;
    let found = waiter.until(deadline).await.map_err(|e| match e {
        Error::Timeout { secs, .. } => FlashError::NoBootloader(format!(
            "it did not re-enumerate in Katapult within {secs:.1} s of the 1200-baud request"
        )),
        other => FlashError::NoBootloader(other.to_string()),
    })?;
    match found.identity.mode {
        Mode::Katapult => Ok(found),
        _ => Err(rom_bootloader(&found.identity)),
    }
}

fn rom_bootloader(id: &BoardIdentity) -> FlashError {
    FlashError::NoBootloader(format!(
        "it came back as {} ({}:{}), not Katapult; flash it with the chip's own tool (dfu-util / picotool) or install Katapult",
        id.rom_bootloader.unwrap_or("a ROM bootloader"),
        id.vendor_id.as_deref().unwrap_or("?"),
        id.product_id.as_deref().unwrap_or("?")
    ))
}

/// Resolve when the board shows up running Klipper again. A board that reappears in Katapult
/// or a ROM bootloader instead is reported as such at the deadline.
pub async fn await_application(hp: &Hotplug, board: &BoardIdentity, deadline: Instant) -> Result<Board, FlashError> {
    let original = board.clone();
    let result = hp
        .wait_for("the board running Klipper", move |b| b.identity.same_board(&original) && b.identity.mode == Mode::Klipper, deadline)
        .await;
    match result {
        Ok(b) => Ok(b),
        Err(Error::Timeout { secs, .. }) => {
            let now = hp.snapshot().into_iter().find(|b| b.identity.same_board(board));
            Err(FlashError::NotBack(match now {
                Some(b) if b.identity.mode == Mode::Katapult => format!("after {secs:.1} s it is still in Katapult (the new image did not start)"),
                Some(b) if b.identity.mode == Mode::RomBootloader => format!("after {secs:.1} s it is in {}", b.identity.rom_bootloader.unwrap_or("a ROM bootloader")),
                _ => format!("it has not re-enumerated within {secs:.1} s"),
            }))
        }
        Err(other) => Err(FlashError::NotBack(other.to_string())),
    }
}

/// The sysfs `authorized` switch of the USB device a board sits on.
pub fn authorized_path(board: &BoardIdentity) -> Option<PathBuf> {
    let dev = board.usb_device.as_deref()?;
    let dev = if dev.starts_with("/sys/") { PathBuf::from(dev) } else { Path::new("/sys").join(dev.trim_start_matches('/')) };
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
