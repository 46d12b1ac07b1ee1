//! `kflash katapult-check KEY`: does this board have Katapult? Ask for the bootloader and
//! await it by event; if nothing appears, recover the board with a USB reset and await it
//! running Klipper again. Klipper is stopped around the check and started afterwards, after
//! the print-safety gate has asked Moonraker about the printer.

use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use super::flash::{find_connected, Reporter};
use crate::error::Result;
use crate::event::{Event, EventKind};
use crate::flash::katapult::KatapultSession;
use crate::flash::{usb, FlashError};
use crate::hotplug::{Board, Hotplug};
use crate::identity::Mode;
use crate::moonraker::Moonraker;
use crate::registry::Registry;
use crate::safety::{clear_to_stop_klipper, GateOptions};
use crate::service::{FlashLock, KlipperGuard, ServiceManager};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Answer {
    Yes,
    No,
    Unknown,
}

#[derive(Debug, Clone, Serialize)]
pub struct KatapultCheck {
    pub board: String,
    pub has_katapult: Answer,
    /// What was seen, in words.
    pub detail: String,
    /// Katapult's own version, when it answered.
    pub katapult_version: Option<String>,
    /// The mode the board is left in.
    pub left_in: Option<Mode>,
}

pub async fn katapult_check(
    reg: &Registry,
    key: &str,
    hp: &Hotplug,
    gate: GateOptions,
    rep: &mut dyn Reporter,
) -> Result<KatapultCheck> {
    let entry = reg.get(key)?.clone();
    let state_dir = crate::registry::default_state_dir();
    let _lock = FlashLock::acquire(&state_dir, &format!("katapult-check of {key}"))?;
    let board = find_connected(hp, &entry)?;
    let secs = |s: u64| Duration::from_secs(s);
    let t = &reg.settings.timeouts;

    if board.identity.mode == Mode::Katapult {
        return Ok(KatapultCheck {
            board: key.into(),
            has_katapult: Answer::Yes,
            detail: "the board is in Katapult right now".into(),
            katapult_version: None,
            left_in: Some(Mode::Katapult),
        });
    }

    let clearance = clear_to_stop_klipper(&Moonraker::from_settings(&reg.settings), gate, None, rep).await?;
    rep.event(&Event::run(EventKind::KlipperStopping { service: reg.settings.klipper_service.clone() }));
    let guard = KlipperGuard::stop(
        ServiceManager::from_settings(&reg.settings),
        &state_dir,
        &format!("katapult-check of {key}"),
        clearance,
    )
    .await?;
    let result = probe(
        hp,
        &board,
        Instant::now() + secs(t.bootloader_secs),
        Instant::now() + secs(t.bootloader_secs + t.reconnect_secs),
        rep,
    )
    .await;
    let restart = guard.restart().await;
    if let Ok(r) = &restart {
        let service = reg.settings.klipper_service.clone();
        let (downtime_secs, started) = (r.downtime.as_secs_f64(), r.started);
        rep.event(&Event::run(EventKind::KlipperRestarted { service, downtime_secs, started }));
    }
    let mut check = result?;
    restart?;
    check.board = key.into();
    Ok(check)
}

async fn probe(
    hp: &Hotplug,
    board: &Board,
    boot_deadline: Instant,
    back_deadline: Instant,
    rep: &mut dyn Reporter,
) -> Result<KatapultCheck> {
    let original = board.identity.clone();
    rep.event(&Event::run(EventKind::BootloaderRequested));
    match usb::enter_bootloader(hp, board, boot_deadline).await {
        Ok(boot) => {
            // It has Katapult. Send it back to the application: CONNECT, then COMPLETE.
            let info = KatapultSession::open(boot.identity.devnode.as_deref())?.start_application().await?;
            let back = usb::await_application(hp, &original, back_deadline).await;
            Ok(KatapultCheck {
                board: String::new(),
                has_katapult: Answer::Yes,
                detail: format!(
                    "Katapult {} answered (MCU {}, application at {:#x})",
                    info.version.as_deref().unwrap_or("?"),
                    info.mcu,
                    info.app_start
                ),
                katapult_version: info.version,
                left_in: Some(if back.is_ok() { Mode::Klipper } else { Mode::Katapult }),
            })
        }
        Err(e @ FlashError::RomBootloader { .. }) => Ok(KatapultCheck {
            board: String::new(),
            has_katapult: Answer::No,
            detail: format!("no Katapult: {e}"),
            katapult_version: None,
            left_in: Some(Mode::RomBootloader),
        }),
        Err(FlashError::NoBootloader(why)) => {
            rep.event(&Event::run(EventKind::UsbReset { why: why.clone() }));
            recover(hp, board, back_deadline, why).await
        }
        Err(e) => Err(e.into()),
    }
}

/// Nothing answered the bootloader request: reset the USB device and await Klipper.
async fn recover(hp: &Hotplug, board: &Board, deadline: Instant, why: String) -> Result<KatapultCheck> {
    let original = board.identity.clone();
    let waiter = hp.arm_next("the board back in Klipper after a USB reset", move |b| {
        b.identity.same_board(&original) && b.identity.mode == Mode::Klipper
    });
    if let Err(e) = usb::usb_reset(&board.identity) {
        return Ok(KatapultCheck {
            board: String::new(),
            has_katapult: Answer::Unknown,
            detail: format!("{why}; the USB reset failed too ({e}); power-cycle the board"),
            katapult_version: None,
            left_in: None,
        });
    }
    match waiter.until(deadline).await {
        Ok(_) => Ok(KatapultCheck {
            board: String::new(),
            has_katapult: Answer::No,
            detail: format!("{why}; it ignored the bootloader request and came back running Klipper after a USB reset"),
            katapult_version: None,
            left_in: Some(Mode::Klipper),
        }),
        Err(_) => Ok(KatapultCheck {
            board: String::new(),
            has_katapult: Answer::Unknown,
            detail: format!("{why}; it did not come back after a USB reset either; power-cycle the board"),
            katapult_version: None,
            left_in: None,
        }),
    }
}
