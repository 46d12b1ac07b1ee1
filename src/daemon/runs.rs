//! The flash runs the daemon carries out, one at a time: `kflash flash` / `flash-all` handed
//! over its socket, and `kflash_flash_all` called from a printer.cfg macro. They are the
//! library's runs (step 6's orchestrator, its print gate and Klipper guard); this module only
//! connects them to their front end: the socket client (events, questions, the last word) or
//! the printer's console (a line at the start and the outcome at the end).
//!
//! A run is on a thread of its own, with its own single-threaded runtime: the library's runs
//! wait on their reporter's questions, futures that are not `Send`, and the daemon's loop
//! goes on meanwhile. A run that panics ends its thread; the Klipper guard it holds starts
//! Klipper as it unwinds.

use std::path::PathBuf;
use std::sync::Arc;

use futures::future::{FutureExt, LocalBoxFuture};
use tokio::sync::{broadcast, mpsc, oneshot, watch, Mutex};

use super::socket::{ErrorDoc, FlashAllRequest, FlashRequest, Reply, RunClient, RunRequest};
use crate::app::flash::{FlashOptions, Reporter};
use crate::app::flash_all::{self, CurrentBoards, FlashAllOptions, FlashAllReport};
use crate::error::Error;
use crate::event::Event;
use crate::hotplug::Hotplug;
use crate::moonraker_link::LinkHandle;
use crate::registry::Registry;

/// The error kind a client gets when it names another config directory than the daemon's.
pub const OTHER_REGISTRY: &str = "daemon-other-registry";

/// What a run needs from the daemon: a snapshot of its registry and its board discovery.
pub struct RunContext {
    pub reg: Registry,
    pub config_dir: PathBuf,
    pub state_dir: PathBuf,
    pub hp: Arc<Hotplug>,
    /// Subscribers see every run's events (shared: a broadcast buffer keeps every slot
    /// allocated, and a slot is as large as what it holds).
    pub events: broadcast::Sender<Arc<Event>>,
    /// Becomes true when the daemon stops: the run is cancelled (Klipper started again).
    pub stop: watch::Receiver<bool>,
}

/// What a run is, for the log and for a `busy` answer.
pub fn describe(request: &RunRequest) -> String {
    match request {
        RunRequest::Flash(r) => format!("a flash of {}", r.key),
        RunRequest::FlashAll(_) => "a flash-all".to_string(),
    }
}

/// Where a run's progress and questions go.
enum Front {
    Client {
        replies: mpsc::UnboundedSender<Reply>,
        answers: Arc<Mutex<mpsc::UnboundedReceiver<bool>>>,
        yes: bool,
    },
    Console {
        link: LinkHandle,
    },
    /// Nobody to ask or show: the journal (auto-recovery).
    Log,
}

struct DaemonReporter {
    front: Front,
    events: broadcast::Sender<Arc<Event>>,
}

impl Reporter for DaemonReporter {
    fn event(&mut self, event: &Event) {
        // No subscriber is fine.
        let _ = self.events.send(Arc::new(event.clone()));
        if let Front::Client { replies, .. } = &self.front {
            let _ = replies.send(Reply::Event { event: event.clone() });
        }
    }

    fn confirm(&mut self, question: &str) -> LocalBoxFuture<'static, bool> {
        match &self.front {
            Front::Client { yes: true, .. } => Box::pin(async { true }),
            Front::Client { replies, answers, .. } => {
                // A client that is gone answers no.
                if replies.send(Reply::Question { text: question.to_string() }).is_err() {
                    return Box::pin(async { false });
                }
                let answers = answers.clone();
                Box::pin(async move { answers.lock().await.recv().await.unwrap_or(false) })
            }
            Front::Log => {
                tracing::warn!("{question} No: nobody to ask (the daemon's own run)");
                Box::pin(async { false })
            }
            Front::Console { link } => {
                let text = format!(
                    "kflash: {question} No: a question cannot be answered from the console; run `kflash flash-all` on the printer's host"
                );
                tracing::warn!("{text}");
                Box::pin(respond(link, text).map(|()| false))
            }
        }
    }
}

fn respond(link: &LinkHandle, text: String) -> impl std::future::Future<Output = ()> + 'static {
    let link = link.clone();
    async move {
        if let Err(e) = link.respond(&text).await {
            tracing::warn!("a line could not be shown in the printer's console: {e}");
        }
    }
}

/// The run's cancel: the client's cancel or hang-up, or the daemon stopping.
async fn cancelled(
    client: Option<(oneshot::Receiver<()>, mpsc::UnboundedSender<Reply>)>,
    mut stop: watch::Receiver<bool>,
) -> &'static str {
    let stopping = async move {
        let _ = stop.wait_for(|s| *s).await;
        "the daemon stopping"
    };
    match client {
        None => stopping.await,
        Some((cancel, replies)) => tokio::select! {
            _ = cancel => "the client's cancel",
            _ = replies.closed() => "the client hanging up",
            why = stopping => why,
        },
    }
}

/// A run's last word and where it goes. The daemon's loop sends it once it has marked the
/// run over, so a client that asks again right after it is never told `busy`.
pub type LastWord = Option<(mpsc::UnboundedSender<Reply>, Reply)>;

/// Start `run` on its own thread; the receiver resolves (or fails) when it is over.
fn spawn(run: impl FnOnce() -> LocalBoxFuture<'static, LastWord> + Send + 'static) -> oneshot::Receiver<LastWord> {
    let (done, over) = oneshot::channel();
    let thread = std::thread::Builder::new().name("kflash-run".into()).spawn(move || {
        let last = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt.block_on(run()),
            Err(e) => {
                tracing::error!("a run could not start its runtime: {e}");
                None
            }
        };
        let _ = done.send(last);
    });
    if let Err(e) = thread {
        tracing::error!("a run could not start its thread: {e}");
    }
    over
}

/// A run for a socket client, ended with its last reply sent.
pub fn for_client(ctx: RunContext, request: RunRequest, client: RunClient) -> oneshot::Receiver<LastWord> {
    spawn(move || {
        Box::pin(async move {
            let RunClient { uid: _, replies, answers, cancel } = client;
            let yes = request.yes();
            if let Some(dir) = request.config_dir().filter(|d| !same_dir(d, &ctx.config_dir)) {
                let error = ErrorDoc {
                    kind: OTHER_REGISTRY.into(),
                    message: format!(
                        "the kflash daemon flashes the boards of {}, not of {}",
                        ctx.config_dir.display(),
                        dir.display()
                    ),
                    help: Some("run kflash with the daemon's --config-dir, or stop the daemon".into()),
                    exit_code: crate::error::exit::USAGE,
                };
                return Some((replies, Reply::Failed { error }));
            }
            let mut rep = DaemonReporter {
                front: Front::Client { replies: replies.clone(), answers: Arc::new(Mutex::new(answers)), yes },
                events: ctx.events.clone(),
            };
            let cancel = cancelled(Some((cancel, replies.clone())), ctx.stop.clone());
            let last = match request {
                RunRequest::Flash(r) => flash(&ctx, r, &mut rep, cancel).await,
                RunRequest::FlashAll(r) => match flash_all(&ctx, &r, &mut rep, cancel).await {
                    Ok(report) => {
                        let error = report.error.as_ref().map(ErrorDoc::from);
                        Reply::FlashAllDone { report, error }
                    }
                    Err(e) => Reply::Failed { error: ErrorDoc::from(&e) },
                },
            };
            Some((replies, last))
        })
    })
}

/// `kflash_flash_all` from the printer's console: only the outdated boards, no question
/// answered yes, the print gate as always.
pub fn for_console(ctx: RunContext, link: LinkHandle) -> oneshot::Receiver<LastWord> {
    spawn(move || {
        Box::pin(async move {
            respond(&link, "kflash: flash-all started; Klipper will stop and start again".into()).await;
            let mut rep = DaemonReporter { front: Front::Console { link: link.clone() }, events: ctx.events.clone() };
            let request = FlashAllRequest { current: CurrentBoards::Skip, ..Default::default() };
            let cancel = cancelled(None, ctx.stop.clone());
            let lines = match flash_all(&ctx, &request, &mut rep, cancel).await {
                Ok(report) => console_lines(&report),
                Err(e) => vec![format!("kflash: flash-all not run: {e}")],
            };
            for line in &lines {
                tracing::info!("{line}");
            }
            respond(&link, lines.join("\n")).await;
            None
        })
    })
}

/// Auto-recovery: `key` was found stuck in Katapult. Flash it with the cached image for the
/// host's version (never a build), through the print gate, and verify it; nobody is asked,
/// so whatever would need a question (Moonraker unreachable) leaves it alone.
pub fn recover(ctx: RunContext, key: String) -> oneshot::Receiver<LastWord> {
    spawn(move || {
        Box::pin(async move {
            let mut rep = DaemonReporter { front: Front::Log, events: ctx.events.clone() };
            let mut plan = match flash_all::plan(&ctx.reg, &ctx.hp, true).await {
                Ok(plan) => plan,
                Err(e) => {
                    tracing::warn!(board = %key, "auto-recovery not tried: {e}");
                    return None;
                }
            };
            plan.boards.retain(|b| b.key == key);
            if plan.boards.is_empty() {
                tracing::warn!(board = %key, "auto-recovery not tried: the board is not flashable now (see `kflash flash-all --dry-run`)");
                return None;
            }
            let opts = FlashAllOptions {
                flash_current: true,
                no_build: true,
                state_dir: Some(ctx.state_dir.clone()),
                ..Default::default()
            };
            let cancel = cancelled(None, ctx.stop.clone());
            match flash_all::run(&ctx.reg, &ctx.hp, &plan, &opts, &mut rep, cancel).await {
                Ok(report) if report.error.is_none() => {
                    let version = report.boards.first().and_then(|b| b.version_after.clone()).unwrap_or_default();
                    tracing::info!(board = %key, "auto-recovery: {key} was re-flashed and runs {version} again");
                }
                Ok(report) => {
                    let e = report.error.expect("checked above");
                    tracing::error!(board = %key, "auto-recovery of {key} failed: {e}; {}", e.help().unwrap_or_default());
                }
                Err(e) => tracing::error!(board = %key, "auto-recovery of {key} failed: {e}"),
            }
            None
        })
    })
}

/// What the console shows at the end of a flash-all.
pub fn console_lines(report: &FlashAllReport) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(e) = &report.error {
        out.push(format!("kflash: flash-all failed: {e}"));
        if let Some(help) = e.help() {
            out.push(format!("kflash: {help}"));
        }
    } else if report.boards.is_empty() {
        out.push("kflash: nothing to flash: every board runs the host's version".into());
    }
    // A board the run never reached (refused at the gate) has nothing to say.
    for b in report.boards.iter().filter(|b| b.flash != "not-flashed" || b.verify != "not-checked") {
        let version = b.version_after.as_deref().unwrap_or("?");
        out.push(format!("kflash: {}: {} / {} ({version})", b.key, b.flash, b.verify));
    }
    if let Some(secs) = report.klipper_downtime_secs {
        out.push(format!("kflash: Klipper was stopped for {secs:.1} s"));
    }
    out
}

fn same_dir(a: &std::path::Path, b: &std::path::Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

async fn flash(
    ctx: &RunContext,
    r: FlashRequest,
    rep: &mut DaemonReporter,
    cancel: impl std::future::Future<Output = &'static str>,
) -> Reply {
    let opts = FlashOptions {
        force: r.force,
        method: r.method,
        no_build: r.no_build,
        skip_print_check: r.skip_print_check,
        state_dir: Some(ctx.state_dir.clone()),
        ..Default::default()
    };
    match crate::app::flash::flash_one(&ctx.reg, &r.key, &ctx.hp, &opts, rep, cancel).await {
        Ok(summary) => Reply::Flashed { summary },
        Err(e) => Reply::Failed { error: ErrorDoc::from(&e) },
    }
}

async fn flash_all(
    ctx: &RunContext,
    r: &FlashAllRequest,
    rep: &mut DaemonReporter,
    cancel: impl std::future::Future<Output = &'static str>,
) -> Result<FlashAllReport, Error> {
    let mut plan = flash_all::plan(&ctx.reg, &ctx.hp, r.skip_unconfigured).await?;
    let flash_current = flash_all::settle_current(&mut plan, r.current, rep).await;
    if plan.boards.is_empty() {
        return Ok(FlashAllReport::nothing(&plan));
    }
    let opts = FlashAllOptions {
        flash_current,
        skip_unconfigured: r.skip_unconfigured,
        parallel: match r.parallel {
            Some(0) => plan.boards.len(),
            Some(n) => n,
            None => 1,
        },
        builds: r.builds,
        no_build: r.no_build,
        skip_print_check: r.skip_print_check,
        state_dir: Some(ctx.state_dir.clone()),
        ..Default::default()
    };
    flash_all::run(&ctx.reg, &ctx.hp, &plan, &opts, rep, cancel).await
}
