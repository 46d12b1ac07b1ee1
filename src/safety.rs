//! The print-safety gate: the one way to get permission to stop Klipper.
//!
//! [`clear_to_stop_klipper`] asks Moonraker about the printer and returns a [`Clearance`]
//! or a refusal; [`crate::service::KlipperGuard::stop`] takes the clearance, and only this
//! module can make one. Every path that stops Klipper (flash, katapult-check, later
//! flash-all, the daemon and the dashboard) goes through here.
//!
//! | Moonraker says | decision |
//! |---|---|
//! | Klippy ready (or starting), `print_stats` printing/paused | refuse: [`Error::PrinterBusy`] (exit 10) |
//! | Klippy ready, not printing | clear |
//! | Klippy not connected (`/server/info`, or its 503 error body) | clear, with a note: nothing can print |
//! | Klippy `shutdown`/`error`, stale printing/paused `print_stats` | nothing moves: show the stale state and ask (`--yes` answers) |
//! | Klippy `shutdown`/`error`, not printing | clear, with a note |
//! | nothing listens at `moonraker_url` (connection refused) | warn and ask (`--yes` answers) |
//! | 401/403, a timeout, an answer that is not Moonraker's | refuse (exit 9); only `--skip-print-check` passes |
//! | `/server/info` answers but the print query hangs (a stale connection; whatever state it says) | refuse (exit 9); only `--skip-print-check` passes |
//!
//! `--yes` answers questions; it never passes a check that could not be answered.

use serde::{Deserialize, Serialize};

use crate::app::flash::Reporter;
use crate::error::{Error, Result};
use crate::event::{Event, EventKind};
use crate::moonraker::{first_line, Moonraker, MoonrakerError, PrintStatus};

/// How the print check came out, for the user and the flash history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PrintCheck {
    /// Moonraker answered: Klippy is ready (or starting) and nothing is printing.
    Idle,
    /// Moonraker says Klippy is not connected: nothing can be printing.
    KlippyDisconnected,
    /// Klippy is shut down or in error: nothing moves (a stale print state was confirmed).
    KlippyHalted,
    /// Nothing listens at `moonraker_url`; the user chose to go on.
    MoonrakerDown,
    /// The check could not be answered and `--skip-print-check` passed it.
    Skipped,
}

impl PrintCheck {
    pub fn as_str(self) -> &'static str {
        match self {
            PrintCheck::Idle => "idle",
            PrintCheck::KlippyDisconnected => "klippy-disconnected",
            PrintCheck::KlippyHalted => "klippy-halted",
            PrintCheck::MoonrakerDown => "moonraker-down",
            PrintCheck::Skipped => "skipped",
        }
    }
}

/// Permission to stop Klipper, from [`clear_to_stop_klipper`]. It cannot be made anywhere
/// else (the field is private), and [`crate::service::KlipperGuard::stop`] consumes one.
#[derive(Debug)]
pub struct Clearance {
    check: PrintCheck,
}

impl Clearance {
    pub fn check(&self) -> PrintCheck {
        self.check
    }
}

/// What the caller allows the gate.
#[derive(Debug, Clone, Copy, Default)]
pub struct GateOptions {
    /// `--skip-print-check`: go on when the print state cannot be asked (401/403, a hang,
    /// a server that is not Moonraker). A known print still refuses.
    pub skip_print_check: bool,
}

/// A refusal of the gate (a known print is [`Error::PrinterBusy`]).
#[derive(Debug, thiserror::Error)]
pub enum SafetyError {
    #[error("{cause}; so kflash cannot tell whether the printer is printing, and did not stop Klipper")]
    Unanswered { cause: MoonrakerError },

    #[error("{cause}; the print state is unknown and going on was not confirmed")]
    MoonrakerDownNotConfirmed { cause: MoonrakerError },

    #[error("Klippy is {state} and print_stats still says {print}; flashing was not confirmed")]
    HaltedNotConfirmed { state: String, print: String },
}

impl SafetyError {
    pub fn help(&self) -> Option<String> {
        Some(match self {
            SafetyError::Unanswered { cause } => format!(
                "{}; if you are sure nothing is printing, `--skip-print-check` flashes without the check \
                 (the history records that)",
                cause.help().unwrap_or_else(|| "check moonraker_url and moonraker_api_key".into())
            ),
            SafetyError::MoonrakerDownNotConfirmed { .. } => "start Moonraker (`systemctl start moonraker`) or fix \
                 moonraker_url; or pass --yes to go on without the print check"
                .into(),
            SafetyError::HaltedNotConfirmed { .. } => "nothing moves while Klippy is shut down and that print cannot \
                 be resumed (Moonraker refuses to cancel it now): pass --yes to flash anyway, or run \
                 FIRMWARE_RESTART first"
                .into(),
        })
    }

    pub fn exit_code(&self) -> i32 {
        match self {
            SafetyError::Unanswered { .. } | SafetyError::MoonrakerDownNotConfirmed { .. } => {
                crate::error::exit::MOONRAKER
            }
            SafetyError::HaltedNotConfirmed { .. } => crate::error::exit::BUSY,
        }
    }
}

/// Ask Moonraker whether Klipper may be stopped now. `previous` is an earlier clearance of
/// the same run (the re-check right before the stop): a question it already answered is
/// not asked again, but a print that started meanwhile still refuses.
pub async fn clear_to_stop_klipper(
    mr: &Moonraker,
    opts: GateOptions,
    previous: Option<&Clearance>,
    rep: &mut dyn Reporter,
) -> Result<Clearance> {
    let answered = previous.map(|c| c.check);
    rep.event(&Event::run(EventKind::PrintCheckStarted { url: mr.url().to_string(), again: previous.is_some() }));
    let info = match mr.server_info().await {
        Ok(info) => info,
        Err(e) => return not_answered(e, opts, answered, rep).await,
    };
    if !info.klippy_connected || info.klippy_state == "disconnected" {
        return Ok(klippy_disconnected(&format!("klippy_state {}", info.klippy_state), rep));
    }
    let print = match mr.print_status().await {
        Ok(p) => Some(p),
        // Moonraker's own 503 body: Klippy went away since /server/info.
        Err(MoonrakerError::KlippyNotConnected { message }) => return Ok(klippy_disconnected(&message, rep)),
        // Moonraker answered, but the query it forwards to Klippy hangs: its word on Klippy's
        // state may be stale (it said `error` while Klippy was ready), so nothing is known.
        Err(e @ MoonrakerError::Timeout { .. }) => {
            return not_answered(e.behind_moonraker(&info.klippy_state), opts, answered, rep).await
        }
        // Klippy is not ready: it may not answer object queries, and nothing moves.
        Err(_) if info.klippy_state != "ready" => None,
        Err(e) => return not_answered(e, opts, answered, rep).await,
    };
    match info.klippy_state.as_str() {
        "ready" | "startup" => match print {
            Some(p) if p.is_busy() => Err(Error::PrinterBusy(p.describe())),
            _ => {
                let idle = EventKind::PrinterIdle {
                    print_state: print.map(|p| p.describe()),
                    klippy_starting: info.klippy_state != "ready",
                };
                rep.event(&Event::run(idle));
                Ok(Clearance { check: PrintCheck::Idle })
            }
        },
        state => halted(mr, state, print, answered, rep).await,
    }
}

fn klippy_disconnected(why: &str, rep: &mut dyn Reporter) -> Clearance {
    rep.event(&Event::run(EventKind::KlippyDisconnected { reason: why.to_string() }));
    Clearance { check: PrintCheck::KlippyDisconnected }
}

/// Klippy is `shutdown` or `error`: the MCUs are halted, nothing moves. After an emergency
/// stop `print_stats` keeps saying `paused` forever; show it and ask.
async fn halted(
    mr: &Moonraker,
    state: &str,
    print: Option<PrintStatus>,
    answered: Option<PrintCheck>,
    rep: &mut dyn Reporter,
) -> Result<Clearance> {
    let message = mr.printer_info().await.ok().and_then(|p| first_line(&p.state_message).map(String::from));
    let Some(p) = print.filter(PrintStatus::is_busy) else {
        rep.event(&Event::run(EventKind::KlippyHalted { state: state.to_string(), message }));
        return Ok(Clearance { check: PrintCheck::KlippyHalted });
    };
    if answered == Some(PrintCheck::KlippyHalted) {
        // The same halt the first check showed and the user confirmed: not said twice.
        return Ok(Clearance { check: PrintCheck::KlippyHalted });
    }
    rep.event(&Event::run(EventKind::HaltedWithPrint { state: state.to_string(), message, print: p.describe() }));
    if rep.confirm("Flash anyway?").await {
        Ok(Clearance { check: PrintCheck::KlippyHalted })
    } else {
        Err(SafetyError::HaltedNotConfirmed { state: state.to_string(), print: p.describe() }.into())
    }
}

/// Moonraker did not answer the question. Only "nothing listens" says something about the
/// printer (no Moonraker, so no print through it): warn and ask. Anything else refuses,
/// unless `--skip-print-check`.
async fn not_answered(
    e: MoonrakerError,
    opts: GateOptions,
    answered: Option<PrintCheck>,
    rep: &mut dyn Reporter,
) -> Result<Clearance> {
    if opts.skip_print_check {
        rep.event(&Event::run(EventKind::PrintCheckSkipped { error: e.to_string() }));
        return Ok(Clearance { check: PrintCheck::Skipped });
    }
    if !e.nothing_listens() {
        return Err(SafetyError::Unanswered { cause: e }.into());
    }
    if answered == Some(PrintCheck::MoonrakerDown) {
        // Still down, as the first check found and the user accepted: not said twice.
        return Ok(Clearance { check: PrintCheck::MoonrakerDown });
    }
    rep.event(&Event::run(EventKind::MoonrakerDown { error: e.to_string() }));
    if rep.confirm("Continue without the print-safety check?").await {
        Ok(Clearance { check: PrintCheck::MoonrakerDown })
    } else {
        Err(SafetyError::MoonrakerDownNotConfirmed { cause: e }.into())
    }
}
