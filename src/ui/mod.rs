//! Drawing progress for the terminal: the library reports, this module prints.

pub mod batch;

use std::io::{IsTerminal, Write};

use kflash::app::flash::{FlashSummary, Report, Reporter};
use kflash::firmware::BuildProgress;
use kflash::flash::katapult::FlashEvent;

/// Counts compiler lines on one status line while make runs.
pub struct BuildSpinner {
    lines: usize,
    live: bool,
}

impl BuildSpinner {
    pub fn new(enabled: bool) -> Self {
        BuildSpinner { lines: 0, live: enabled && std::io::stderr().is_terminal() }
    }

    pub fn finish(&mut self) {
        if self.live && self.lines > 0 {
            eprint!("\r\x1b[K");
        }
    }
}

impl BuildProgress for BuildSpinner {
    fn line(&mut self, _line: &str) {
        self.lines += 1;
        if self.live {
            const FRAMES: [char; 4] = ['|', '/', '-', '\\'];
            eprint!("\r  building {} ({} lines of output)", FRAMES[self.lines % 4], self.lines);
        }
    }

    fn note(&mut self, text: &str) {
        if self.live && self.lines > 0 {
            eprint!("\r\x1b[K");
        }
        eprintln!("kflash: {text}");
    }
}

/// Prints phases as `[Phase] message`, and a progress bar while blocks are written.
pub struct FlashReporter {
    yes: bool,
    live: bool,
    spinner: BuildSpinner,
    last_percent: usize,
}

impl FlashReporter {
    pub fn new(yes: bool, json: bool) -> Self {
        FlashReporter {
            yes,
            live: !json && std::io::stderr().is_terminal(),
            spinner: BuildSpinner::new(!json),
            last_percent: 101,
        }
    }

    fn bar(&mut self, what: &str, done: usize, total: usize) {
        let percent = done * 100 / total.max(1);
        if self.live {
            let filled = percent / 5;
            eprint!("\r  {what} [{}{}] {percent:3}% ({done}/{total})", "#".repeat(filled), ".".repeat(20 - filled));
            if done == total {
                eprintln!();
            }
        } else if percent / 25 != self.last_percent / 25 || done == total {
            eprintln!("  {what} {percent}% ({done}/{total} blocks)");
        }
        self.last_percent = if done == total { 101 } else { percent };
    }
}

impl Reporter for FlashReporter {
    fn report(&mut self, r: Report) {
        match r {
            Report::Begin(p, msg) => eprintln!("[{}] {msg}...", p.label()),
            Report::Done(p, msg, took) => {
                self.spinner.finish();
                if took.as_millis() > 0 {
                    eprintln!("[{}] {msg} ({:.1} s)", p.label(), took.as_secs_f64());
                } else {
                    eprintln!("[{}] {msg}", p.label());
                }
            }
            Report::Warning(w) => eprintln!("[!!] {w}"),
            Report::BuildLine(l) => self.spinner.line(&l),
            Report::Flash(FlashEvent::Connected(info)) => eprintln!(
                "  Katapult {} on {}, application at {:#x}, {}-byte blocks",
                info.version.as_deref().unwrap_or("(version unknown)"),
                info.mcu,
                info.app_start,
                info.block_size
            ),
            Report::Flash(FlashEvent::Written { done, total }) => self.bar("writing  ", done, total),
            Report::Flash(FlashEvent::Verified { done, total }) => self.bar("verifying", done, total),
            Report::Flash(FlashEvent::EndOfFile { .. }) | Report::Flash(FlashEvent::Completed) => {}
            // One board per run here: its key needs no saying.
            Report::Board(_, r) => self.report(*r),
        }
    }

    fn confirm(&mut self, question: &str) -> futures::future::LocalBoxFuture<'static, bool> {
        if self.yes {
            eprintln!("{question} yes (--yes)");
            return Box::pin(async { true });
        }
        if !std::io::stdin().is_terminal() {
            eprintln!("{question} no (not a terminal; pass --yes to continue)");
            return Box::pin(async { false });
        }
        Box::pin(confirm_async(question.to_string()))
    }
}

pub fn print_flash_summary(s: &FlashSummary) {
    if let Some(why) = &s.skipped {
        println!("{}: skipped — {why}", s.board);
        return;
    }
    let t = &s.timings;
    let f = |v: Option<f64>| v.map(|x| format!("{x:.1} s")).unwrap_or_else(|| "-".into());
    println!(
        "{}: flashed {} via {} — verified running it.",
        s.board,
        s.version_after.as_deref().unwrap_or("?"),
        s.method.as_str()
    );
    println!(
        "  build {}{}, bootloader {}, write {}, reconnect {}, identify {}; Klipper down {}; total {:.1} s",
        f(t.build),
        if s.cached_build { " (cached)" } else { "" },
        f(t.bootloader),
        f(t.write),
        f(t.reconnect),
        f(t.identify),
        f(t.klipper_downtime),
        t.total
    );
}

/// Prompt until `parse` accepts the answer (three tries); an empty answer takes `default`.
/// Prompts go to stderr so stdout stays the command's data.
pub fn ask_until<T>(
    question: &str,
    default: Option<&str>,
    parse: impl Fn(&str) -> Result<T, String>,
) -> kflash::Result<T> {
    use std::io::BufRead;
    for _ in 0..3 {
        match default {
            Some(d) => eprint!("{question} [{d}]: "),
            None => eprint!("{question}: "),
        }
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        let read =
            std::io::stdin().lock().read_line(&mut line).map_err(|e| kflash::Error::io("read", "standard input", e))?;
        if read == 0 {
            return Err(kflash::Error::InvalidInput("no answer: standard input is closed".into()));
        }
        let answer = match line.trim() {
            "" => default.unwrap_or(""),
            s => s,
        };
        match parse(answer) {
            Ok(v) => return Ok(v),
            Err(why) => eprintln!("  {why}"),
        }
    }
    Err(kflash::Error::InvalidInput(format!("no valid answer to '{question}'")))
}

/// A yes/no question whose default is no.
pub fn confirm(question: &str) -> kflash::Result<bool> {
    ask_until(&format!("{question} [y/N]"), Some("n"), |s| match s.to_ascii_lowercase().as_str() {
        "y" | "yes" => Ok(true),
        "n" | "no" => Ok(false),
        _ => Err("answer y or n".into()),
    })
}

/// Run a prompt (any code that reads stdin) on a thread of its own and await its answer, so
/// the runtime keeps answering signals while the user thinks: dropping the future (Ctrl-C)
/// abandons the read at once, and the process exits without waiting for the thread.
pub async fn prompt<T: Send + 'static>(ask: impl FnOnce() -> kflash::Result<T> + Send + 'static) -> kflash::Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(ask());
    });
    rx.await.unwrap_or_else(|_| Err(kflash::Error::InvalidInput("the question was not answered".into())))
}

/// [`confirm`] through [`prompt`]; an unreadable answer is no.
pub async fn confirm_async(question: String) -> bool {
    prompt(move || confirm(&question)).await.unwrap_or(false)
}

/// A yes/no question with a default (Enter takes it), asked on the terminal with dialoguer,
/// on a thread of its own so a signal still ends the wait; an unreadable answer is the default.
pub async fn confirm_default(question: String, default: bool) -> bool {
    prompt(move || {
        dialoguer::Confirm::new()
            .with_prompt(question)
            .default(default)
            .interact_on(&dialoguer::console::Term::stderr())
            .map_err(|e| kflash::Error::InvalidInput(format!("no answer: {e}")))
    })
    .await
    .unwrap_or(default)
}
