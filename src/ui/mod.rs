//! Drawing progress for the terminal: the library reports, this module prints.

pub mod batch;
pub mod dashboard;

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kflash::app::flash::FlashSummary;

/// A spinner with the count of make's output lines on one status line while make runs
/// (nothing when stderr is not a terminal, or under `--json`). "building" is said only once
/// make runs (the config check and a wait for another build's lock come first).
pub struct BuildSpinner {
    bar: Option<ProgressBar>,
    /// A terminal indicatif will not draw on (TERM=dumb): one plain line when make starts.
    plain: bool,
    what: String,
    lines: usize,
}

impl BuildSpinner {
    pub fn new(enabled: bool, what: &str) -> Self {
        let mut bar = (enabled && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(ProgressStyle::with_template("  {spinner} {msg}").expect("a valid template"));
            bar.set_message(format!("checking the config of {what}"));
            bar
        });
        let plain = bar.as_ref().is_some_and(|b| b.is_hidden());
        if plain {
            bar = None;
        }
        BuildSpinner { bar, plain, what: what.to_string(), lines: 0 }
    }

    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }

    /// make printed a line.
    pub fn line(&mut self) {
        self.lines += 1;
        if let Some(bar) = &self.bar {
            bar.set_message(format!("building {} ({} lines of output)", self.what, self.lines));
            bar.tick();
        } else if self.plain && self.lines == 1 {
            eprintln!("  building {}...", self.what);
        }
    }

    /// Something to say while the build waits or runs.
    pub fn note(&mut self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(format!("kflash: {text}")),
            None => eprintln!("kflash: {text}"),
        }
    }
}

pub fn print_flash_summary(s: &FlashSummary) {
    for line in flash_summary_lines(s) {
        println!("{line}");
    }
}

/// [`print_flash_summary`]'s lines (the dashboard draws the same).
pub fn flash_summary_lines(s: &FlashSummary) -> Vec<String> {
    if let Some(why) = &s.skipped {
        return vec![format!("{}: skipped — {why}", s.board)];
    }
    let t = &s.timings;
    let f = |v: Option<f64>| v.map(|x| format!("{x:.1} s")).unwrap_or_else(|| "-".into());
    vec![
        format!(
            "{}: flashed {} via {} — verified running it.",
            s.board,
            s.version_after.as_deref().unwrap_or("?"),
            s.method.as_str()
        ),
        format!(
            "  build {}{}, bootloader {}, write {}, reconnect {}, identify {}; Klipper down {}; total {:.1} s",
            f(t.build),
            if s.cached_build { " (cached)" } else { "" },
            f(t.bootloader),
            f(t.write),
            f(t.reconnect),
            f(t.identify),
            f(t.klipper_downtime),
            t.total
        ),
    ]
}

/// Ask on the terminal until `parse` accepts the answer; Enter takes `default`. Prompts go
/// to stderr so stdout stays the command's data.
pub fn ask_until<T>(
    question: &str,
    default: Option<&str>,
    parse: impl Fn(&str) -> Result<T, String>,
) -> kflash::Result<T> {
    let mut input = dialoguer::Input::<String>::new().with_prompt(question).allow_empty(default.is_some());
    if let Some(d) = default {
        input = input.default(d.to_string());
    }
    let answer = input
        .validate_with(|s: &String| parse(s.trim()).map(|_| ()))
        .interact_text_on(&dialoguer::console::Term::stderr())
        .map_err(|e| unanswered(question, e))?;
    parse(answer.trim()).map_err(kflash::Error::InvalidInput)
}

/// A yes/no question whose default is no.
pub fn confirm(question: &str) -> kflash::Result<bool> {
    dialoguer::Confirm::new()
        .with_prompt(question)
        .default(false)
        .interact_on(&dialoguer::console::Term::stderr())
        .map_err(|e| unanswered(question, e))
}

/// Run a prompt (any code that reads stdin) on a thread of its own and await its answer, so
/// the runtime keeps answering signals while the user thinks: dropping the future (Ctrl-C)
/// abandons the read at once, and the process exits without waiting for the thread.
///
/// The questions read the terminal in raw mode, where Ctrl-C is a key: dialoguer then raises
/// SIGINT itself and the question ends with `Interrupted`. That answer is never returned (it
/// would race the signal and could be taken as the default): the future waits for the
/// signal, which every caller's cancel answers.
pub async fn prompt<T: Send + 'static>(ask: impl FnOnce() -> kflash::Result<T> + Send + 'static) -> kflash::Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(ask());
    });
    match rx.await {
        Ok(Err(kflash::Error::Interrupted(_))) => std::future::pending().await,
        Ok(answer) => answer,
        Err(_) => Err(kflash::Error::InvalidInput("the question was not answered".into())),
    }
}

/// A failed question: Ctrl-C (a key in raw mode) is [`kflash::Error::Interrupted`].
fn unanswered(question: &str, e: dialoguer::Error) -> kflash::Error {
    match e {
        dialoguer::Error::IO(e) if e.kind() == std::io::ErrorKind::Interrupted => kflash::Error::Interrupted("SIGINT"),
        e => kflash::Error::InvalidInput(format!("no answer to '{question}': {e}")),
    }
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
            .with_prompt(&question)
            .default(default)
            .interact_on(&dialoguer::console::Term::stderr())
            .map_err(|e| unanswered(&question, e))
    })
    .await
    .unwrap_or(default)
}

/// `kflash status` as a table: one row per registered board, then what else is connected.
pub fn print_status(s: &serde_json::Value) {
    use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_string();
    let source = if s["daemon"].as_bool() == Some(true) { "the kflash daemon" } else { "checked now (no daemon)" };
    println!("Host version: {}   Klippy: {}   ({source})", text(&s["host_version"]), text(&s["klippy"]));
    if let Some(e) = s["registry_error"].as_str() {
        println!("!! boards.toml is broken, the last good registry is in use: {e}");
    }
    let mut table = Table::new();
    table.load_style(UTF8_FULL_CONDENSED);
    table.set_header(["", "board", "mode", "MCU", "version", "state"]);
    for b in s["boards"].as_array().into_iter().flatten() {
        let dot = if b["connected"].as_bool() == Some(true) { "●" } else { "○" };
        let state = match (b["state"].as_str(), b["relation"].as_str()) {
            (Some("outdated"), Some(rel)) => format!("outdated ({rel})"),
            (Some(st), _) => st.to_string(),
            _ => "-".into(),
        };
        let excluded = if b["excluded"].as_bool() == Some(true) { " (excluded)" } else { "" };
        table.add_row([
            dot.to_string(),
            format!("{}{excluded}", text(&b["key"])),
            text(&b["mode"]),
            text(&b["mcu"]),
            text(&b["version"]),
            state,
        ]);
    }
    println!("{table}");
    for b in s["unregistered"].as_array().into_iter().flatten() {
        println!(
            "Unregistered {} board {} at {}: `kflash add` registers it",
            text(&b["mode"]),
            text(&b["mcu"]),
            text(&b["devnode"])
        );
    }
    for b in s["rom_bootloaders"].as_array().into_iter().flatten() {
        println!("A board is in its ROM bootloader ({}): it runs no firmware", text(&b["rom_bootloader"]));
    }
}
