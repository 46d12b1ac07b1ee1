//! Events in words: the lines a person reads, the same for the CLI, the daemon's log and the
//! dashboard's log pane. Progress counts (make's output, blocks written) and state changes
//! have no line: front ends draw them as spinners, bars and checklists.

use std::fmt;

use super::{EventKind, NotChecked};
use crate::registry::FlashMethod;

/// The step of a flash a line belongs to, shown as its label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Safety,
    Build,
    Service,
    Bootloader,
    Flash,
    Verify,
}

impl Step {
    pub fn label(self) -> &'static str {
        match self {
            Step::Safety => "Safety",
            Step::Build => "Build",
            Step::Service => "Service",
            Step::Bootloader => "Bootloader",
            Step::Flash => "Flash",
            Step::Verify => "Verify",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tone {
    /// A step begins (drawn with a trailing "...").
    Begin,
    /// A step is done.
    Done,
    Warning,
    /// A detail of the step under way.
    Detail,
}

/// One line about an event.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub step: Option<Step>,
    pub tone: Tone,
    pub text: String,
    /// How long the step took, when it is worth saying.
    pub secs: Option<f64>,
}

impl Line {
    fn new(step: Step, tone: Tone, text: impl Into<String>) -> Line {
        Line { step: Some(step), tone, text: text.into(), secs: None }
    }

    fn warning(text: impl Into<String>) -> Line {
        Line { step: None, tone: Tone::Warning, text: text.into(), secs: None }
    }

    fn took(mut self, secs: f64) -> Line {
        self.secs = (secs > 0.0).then_some(secs);
        self
    }
}

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let label = self.step.map(Step::label).unwrap_or("");
        match self.tone {
            Tone::Begin => write!(f, "[{label}] {}...", self.text),
            Tone::Done => match self.secs {
                Some(s) => write!(f, "[{label}] {} ({s:.1} s)", self.text),
                None => write!(f, "[{label}] {}", self.text),
            },
            Tone::Warning => write!(f, "[!!] {}", self.text),
            Tone::Detail => write!(f, "  {}", self.text),
        }
    }
}

/// A message's first line, in parentheses, or nothing.
fn paren_first_line(message: &Option<String>) -> String {
    message.as_deref().and_then(crate::moonraker::first_line).map(|l| format!(" ({l})")).unwrap_or_default()
}

/// The lines an event is told with (none for counts and state changes).
pub fn describe(kind: &EventKind) -> Vec<Line> {
    use EventKind as K;
    use Step::*;
    use Tone::*;
    let one = |l: Line| vec![l];
    match kind {
        K::Run { .. }
        | K::Board { .. }
        | K::BuildOutput { .. }
        | K::WriteProgress { .. }
        | K::ReadBackProgress { .. }
        | K::EndOfFile { .. }
        | K::WriteCompleted
        | K::KlipperNotStarted { .. } => vec![],

        K::PrintCheckStarted { url, again } => one(Line::new(
            Safety,
            Begin,
            format!(
                "asking Moonraker at {url} about the printer{}",
                if *again { " again before stopping Klipper" } else { "" }
            ),
        )),
        K::PrinterIdle { print_state, klippy_starting } => one(Line::new(
            Safety,
            Done,
            format!(
                "printer is {}{}",
                print_state.as_deref().unwrap_or("not printing"),
                if *klippy_starting { " (Klippy is starting)" } else { "" }
            ),
        )),
        K::KlippyDisconnected { reason } => one(Line::new(
            Safety,
            Done,
            format!("Moonraker says Klippy is not connected ({reason}), so nothing can be printing"),
        )),
        K::KlippyHalted { state, message } => one(Line::new(
            Safety,
            Done,
            format!("Klippy is {state}{}, so nothing moves and nothing is printing", paren_first_line(message)),
        )),
        K::HaltedWithPrint { state, message, print } => one(Line::warning(format!(
            "Klippy is {state}{}, so nothing moves; print_stats still says {print} from before the {state}, and \
             that print cannot be resumed",
            paren_first_line(message)
        ))),
        K::PrintCheckSkipped { error } => one(Line::warning(format!(
            "{error}: the print state was not checked (--skip-print-check; the history records it)"
        ))),
        K::MoonrakerDown { error } => one(Line::warning(format!(
            "{error}: nothing listens there, so Moonraker is not running; the print state cannot be checked"
        ))),

        K::BuildStarted { name } => one(Line::new(Build, Begin, format!("firmware for {name}"))),
        K::BuildWaiting { tree, out_dir: Some(out) } => one(Line::warning(format!(
            "another kflash is building in {} into {}; waiting for it to finish (Ctrl-C to stop waiting)",
            tree.display(),
            out.display()
        ))),
        K::BuildWaiting { tree, out_dir: None } => one(Line::warning(format!(
            "another build is running in {} (its make rewrites src/extras/ in the tree, so builds there take \
             turns); waiting for it to finish (Ctrl-C to stop waiting)",
            tree.display()
        ))),
        K::BuildShared => one(Line::warning("the other kflash built this firmware: using it")),
        K::ConfigChecked { migration } => {
            let mut lines: Vec<Line> =
                migration.warnings.iter().map(|w| Line::warning(format!("Kconfig {w}"))).collect();
            let report = migration.report_lines();
            if !report.is_empty() {
                lines.push(Line::warning(report.join("\n   ")));
            }
            lines
        }
        K::Built { version, cached, app, size, secs } => one(Line::new(
            Build,
            Done,
            format!(
                "{} {version} ({size} bytes){}",
                app.as_deref().unwrap_or("firmware"),
                if *cached { ", from cache" } else { "" }
            ),
        )
        .took(*secs)),
        K::RunningBefore { version, built } => one(Line::new(
            Safety,
            Done,
            format!("the board runs {version} ({})", crate::version::relation(built, version)),
        )),
        K::VersionsUntrusted { klippy_state } => one(Line::warning(format!(
            "Klippy is {klippy_state}, so its view of the board's version is not trusted; flashing"
        ))),

        K::KlipperStopping { service } => one(Line::new(Service, Begin, format!("stopping {service}"))),
        K::KlipperWasStopped { service } => {
            one(Line::warning(format!("{service} was already stopped before kflash; it will be left stopped")))
        }
        K::KlipperStopped => one(Line::new(Service, Done, "Klipper stopped: flashing")),
        K::KlipperStarting { service } => one(Line::new(Service, Begin, format!("starting {service}"))),
        K::KlipperStarted { downtime_secs, running } => {
            one(Line::new(Service, Done, restarted("Klipper", *downtime_secs, *running)))
        }
        K::KlipperRestarted { service, downtime_secs, started } => {
            one(Line::new(Service, Done, restarted(service, *downtime_secs, *started)))
        }
        K::KlipperStartFailed { error } => one(Line::warning(error.clone())),

        K::CanInterfaceChecked { interface, txqueuelen, bitrate, want_bitrate, note } => {
            let queue = txqueuelen.map(|q| format!(", txqueuelen {q}")).unwrap_or_default();
            let rate = match (bitrate, note) {
                (Some(b), _) => format!(", {b} bit/s"),
                (None, Some(n)) => format!(
                    "; {n}, so {} bit/s is not checked",
                    want_bitrate.map(|w| w.to_string()).unwrap_or_else(|| "the bitrate".into())
                ),
                (None, None) => String::new(),
            };
            one(Line::new(Bootloader, Detail, format!("CAN interface {interface} is up{queue}{rate}")))
        }
        K::CanInterfaceBusy { interface } => {
            one(Line::new(Bootloader, Detail, format!("waiting for another CAN operation on {interface} to end")))
        }
        K::CanBootloaderRequested { interface, uuid } => {
            one(Line::new(Bootloader, Begin, format!("requesting the bootloader of CAN node {uuid} on {interface}")))
        }
        K::CanInterfaceBack { interface, by_kflash, bitrate, secs } => {
            let how = match (by_kflash, bitrate) {
                (true, Some(b)) => format!("brought up by kflash at {b} bit/s, txqueuelen 128"),
                (true, None) => "brought up by kflash".to_string(),
                (false, _) => "up".to_string(),
            };
            one(Line::new(Verify, Done, format!("CAN interface {interface} is back and {how}")).took(*secs))
        }
        K::BootloaderRequested => one(Line::new(Bootloader, Begin, "requesting the bootloader (1200 baud)")),
        K::InBootloader { devnode, secs } => {
            one(Line::new(Bootloader, Done, format!("in Katapult at {}", devnode.as_deref().unwrap_or("?")))
                .took(*secs))
        }
        K::UsbReset { why } => one(Line::warning(format!("{why}; resetting the board's USB port"))),
        K::KatapultConnected { info } => one(Line::new(
            Flash,
            Detail,
            format!(
                "Katapult {} on {}, application at {:#x}",
                info.version.as_deref().unwrap_or("(version unknown)"),
                info.mcu,
                info.app_start
            ),
        )),
        K::WriteStarted { method, bytes, device } => one(Line::new(
            Flash,
            Begin,
            match (method, bytes) {
                (FlashMethod::Katapult | FlashMethod::Default, Some(n)) => {
                    format!("writing {n} bytes through Katapult")
                }
                _ => format!("running {} on {}", method.as_str(), device.as_deref().unwrap_or("?")),
            },
        )),
        K::Written { method, blocks, pages, secs } => one(Line::new(
            Flash,
            Done,
            match (blocks, pages) {
                (Some(b), Some(p)) => format!("{b} blocks written and read back, {p} pages"),
                _ => format!("{} reported success", method.as_str()),
            },
        )
        .took(*secs)),
        K::MethodFallback { to, .. } => one(Line::warning(format!("trying method {} instead", to.as_str()))),
        K::MethodFailedToo { method, error } => {
            one(Line::warning(format!("method {} failed too: {error}", method.as_str())))
        }
        K::AwaitingApplication => one(Line::new(Verify, Begin, "waiting for the board to come back running Klipper")),
        K::BackInApplication { devnode, secs } => {
            one(Line::new(Verify, Done, format!("back in Klipper mode at {}", devnode.as_deref().unwrap_or("?")))
                .took(*secs))
        }
        K::SentBack => one(Line::warning("nothing was written; the board was sent back to the firmware it had")),
        K::LeftInBootloader { error } => {
            one(Line::warning(format!("nothing was written, but the board stays in its bootloader: {error}")))
        }
        K::Identifying => one(Line::new(Verify, Begin, "reading the running version (identify)")),
        K::Identified { version, secs } => one(Line::new(Verify, Done, format!("running {version}")).took(*secs)),

        K::KlippyNotChecked { why } => one(Line::warning(match why {
            NotChecked::MoonrakerDown => {
                "Moonraker was unreachable, so Klipper's own view of the board was not checked"
            }
            NotChecked::PrintCheckSkipped => {
                "Moonraker could not be asked (--skip-print-check), so Klipper's own view of the board was not checked"
            }
            NotChecked::KlipperLeftStopped => {
                "Klipper was not running before kflash and was left stopped, so its view of the board was not checked"
            }
        })),
        K::AwaitingKlippy => one(Line::new(Verify, Begin, "waiting for Klipper to be ready")),
        K::FirmwareRestart { state, message } => one(Line::warning(format!(
            "Klippy is in state {state}: {}; the other boards are still shut down from the emergency stop, so \
             kflash sends FIRMWARE_RESTART",
            message.as_deref().and_then(crate::moonraker::first_line).unwrap_or("")
        ))),
        K::KlippyReports { version, secs } => {
            one(Line::new(Verify, Done, format!("Klipper is ready and reports {version} for this board")).took(*secs))
        }
        K::NoMcuSection => one(Line::warning(
            "Klipper is ready, but no [mcu] section in printer.cfg uses this board's serial, so its version there was \
             not checked",
        )),
        K::HistoryNotWritten { error } => {
            one(Line::warning(format!("the flash was not recorded in the history: {error}")))
        }
    }
}

fn restarted(service: &str, downtime_secs: f64, started: bool) -> String {
    if started {
        format!("started {service} again after {downtime_secs:.1} s")
    } else {
        format!("left {service} stopped: it was not running before kflash")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_keep_the_words_users_and_scripts_know() {
        let l = describe(&EventKind::KlippyReports { version: "v1".into(), secs: 2.0 });
        assert_eq!(l[0].to_string(), "[Verify] Klipper is ready and reports v1 for this board (2.0 s)");
        let l = describe(&EventKind::PrintCheckStarted { url: "http://x".into(), again: true });
        assert_eq!(
            l[0].to_string(),
            "[Safety] asking Moonraker at http://x about the printer again before stopping Klipper..."
        );
        let l = describe(&EventKind::WriteStarted {
            method: FlashMethod::MakeFlash,
            bytes: None,
            device: Some("/dev/serial/by-path/p".into()),
        });
        assert_eq!(l[0].to_string(), "[Flash] running make-flash on /dev/serial/by-path/p...");
        let l =
            describe(&EventKind::RunningBefore { version: "v0.12.0-1-gaaa".into(), built: "v0.12.0-3-gbbb".into() });
        assert_eq!(l[0].to_string(), "[Safety] the board runs v0.12.0-1-gaaa (2 commits behind)");
        assert!(describe(&EventKind::WriteProgress { done: 1, total: 2 }).is_empty());
    }
}
