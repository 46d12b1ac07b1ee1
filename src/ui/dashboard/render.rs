//! Drawing the dashboard: a pure function of the [`State`].

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Clear, Gauge, Paragraph, Wrap};
use ratatui::Frame;

use kflash::daemon::status::FirmwareState;

use super::model::{BoardRun, RunView, State, PHASES};
use super::view::{klippy_text, mode_text, BoardRow};

const KEYS: &str =
    "F flash  B flash all  A add  E edit  M menuconfig  R remove  C settings  ↑↓/jk move  Enter details  Q quit";
const RUN_KEYS: &str = "Esc / Ctrl-C cancel the run (asks first)";
const SUMMARY_KEYS: &str = "any key: back to the boards  Q quit";

/// Styles, or none under `NO_COLOR`.
struct Paint {
    color: bool,
}

impl Paint {
    fn s(&self, style: Style) -> Style {
        if self.color {
            style
        } else {
            Style::default()
        }
    }
    fn fg(&self, c: Color) -> Style {
        self.s(Style::default().fg(c))
    }
    fn bold(&self) -> Style {
        self.s(Style::default().add_modifier(Modifier::BOLD))
    }
}

pub fn render(state: &State, f: &mut Frame) {
    let p = Paint { color: state.color };
    let [status, main, message, keys] =
        Layout::vertical([Constraint::Length(4), Constraint::Min(5), Constraint::Length(1), Constraint::Length(1)])
            .areas(f.area());
    status_pane(state, &p, f, status);
    match &state.run {
        Some(run) => run_pane(run, &p, f, main),
        None if state.details => {
            let [list, details] =
                Layout::horizontal([Constraint::Percentage(60), Constraint::Percentage(40)]).areas(main);
            boards_pane(state, &p, f, list);
            details_pane(state, &p, f, details);
        }
        None => boards_pane(state, &p, f, main),
    }
    let msg = state.message.clone().unwrap_or_default();
    f.render_widget(Paragraph::new(msg).style(p.fg(Color::Yellow)), message);
    let help = match &state.run {
        Some(r) if !r.ended() && !r.observed => RUN_KEYS,
        Some(_) => SUMMARY_KEYS,
        None => KEYS,
    };
    f.render_widget(Paragraph::new(help).style(p.fg(Color::Cyan)), keys);
    if let Some(d) = &state.dialog {
        dialog(&d.text, &p, f);
    }
}

fn status_pane(state: &State, p: &Paint, f: &mut Frame, area: Rect) {
    let (host, klippy) = match &state.boards {
        Some(b) => {
            (b.host_version.clone().unwrap_or_else(|| "unknown (not a git checkout)".into()), klippy_text(b.klippy))
        }
        None => ("…".into(), "…"),
    };
    let print = state.host.print_state.clone().unwrap_or_else(|| "unknown".into());
    let daemon = match &state.host.daemon {
        Some(sock) => format!("running ({sock})"),
        None => "not running".into(),
    };
    let last = state.host.last_flash.clone().unwrap_or_else(|| "none recorded".into());
    let label = |t: &'static str| Span::styled(t, p.bold());
    let lines = vec![
        Line::from(vec![
            label("Host Klipper "),
            Span::raw(host),
            label("   Klippy "),
            Span::raw(klippy),
            label("   Print "),
            Span::raw(print),
        ]),
        Line::from(vec![label("Daemon "), Span::raw(daemon), label("   Last flash "), Span::raw(last)]),
    ];
    let block = Block::default().borders(Borders::ALL).title(" kflash ");
    f.render_widget(Paragraph::new(lines).block(block), area);
}

/// The columns before the flags and the state: marker, dot, board, mode, MCU, serial, version.
const FIXED_COLUMNS: usize = 2 + 1 + 1 + 14 + 1 + 9 + 1 + 12 + 1 + 24 + 1 + 22 + 1;

/// `width`: the pane's inner width, so that a long state gives way to the short one
/// ("OUTDATED" without how far; Enter shows it) instead of running off the screen.
fn board_line(b: &BoardRow, selected: bool, p: &Paint, width: usize) -> Line<'static> {
    let dot = if b.connected { "●" } else { "○" };
    let state_style = match b.state {
        FirmwareState::Current => p.fg(Color::Green),
        FirmwareState::Outdated | FirmwareState::Bootloader => p.fg(Color::Yellow),
        _ => Style::default(),
    };
    // Before the state: a long state ("OUTDATED (a different version)") may run off a narrow
    // screen, the flags must not.
    let mut flags = String::new();
    if b.excluded {
        flags += "[excluded] ";
    }
    if b.ambiguous {
        flags += "[ambiguous] ";
    }
    if b.unreviewed.is_some() {
        flags += "[config not reviewed] ";
    }
    let room = width.saturating_sub(FIXED_COLUMNS + flags.chars().count());
    let state = match b.state {
        FirmwareState::Current => "current".to_string(),
        FirmwareState::Outdated => {
            let full = format!("OUTDATED ({})", b.relation.as_deref().unwrap_or("another version"));
            if full.chars().count() <= room {
                full
            } else {
                "OUTDATED".to_string()
            }
        }
        FirmwareState::Unknown => "unknown".to_string(),
        FirmwareState::Bootloader => "in bootloader".to_string(),
        FirmwareState::Missing => "absent".to_string(),
    };
    let marker = if selected { "> " } else { "  " };
    let row_style = if selected { p.s(Style::default().add_modifier(Modifier::REVERSED)) } else { Style::default() };
    Line::from(vec![
        Span::styled(format!("{marker}{dot} {:<14} {:<9}", b.key, mode_text(b.mode)), row_style),
        Span::raw(format!(
            " {:<12} {:<24} {:<22} ",
            b.mcu,
            b.can.clone().or_else(|| b.serial.clone()).unwrap_or_else(|| "-".into()),
            b.version.as_deref().unwrap_or("-")
        )),
        Span::styled(flags, p.fg(Color::Magenta)),
        Span::styled(state, state_style),
    ])
}

fn boards_pane(state: &State, p: &Paint, f: &mut Frame, area: Rect) {
    let mut lines = Vec::new();
    let Some(view) = &state.boards else {
        let block = Block::default().borders(Borders::ALL).title(" Boards ");
        f.render_widget(Paragraph::new("looking for boards…").block(block), area);
        return;
    };
    if let Some(e) = &view.registry_error {
        lines.push(Line::styled(
            format!("boards.toml is broken, the last good registry is in use: {e}"),
            p.fg(Color::Red),
        ));
    }
    lines.push(Line::styled(
        format!(
            "    {:<14} {:<9} {:<12} {:<24} {:<22} {}",
            "board", "mode", "MCU", "USB serial / CAN", "version", "state"
        ),
        p.bold(),
    ));
    if view.boards.is_empty() {
        lines.push(Line::raw("  (no registered boards: A adds one)"));
    }
    for (i, b) in view.boards.iter().enumerate() {
        lines.push(board_line(b, i == state.cursor, p, area.width.saturating_sub(2) as usize));
    }
    if !view.unregistered.is_empty() {
        lines.push(Line::raw(""));
        lines.push(Line::styled("Unregistered boards (A registers one):", p.bold()));
        for d in &view.unregistered {
            lines.push(Line::raw(format!(
                "    {:<9} {:<12} {:<26} {}",
                d.mode,
                d.mcu.as_deref().unwrap_or("-"),
                d.serial.as_deref().unwrap_or("-"),
                d.name
            )));
        }
    }
    if !view.other.is_empty() {
        lines.push(Line::raw(""));
        lines.push(Line::styled("Other serial devices (not eligible):", p.bold()));
        for d in &view.other {
            lines.push(Line::raw(format!("    {:<50} {}", d.name, d.reason.as_deref().unwrap_or(""))));
        }
    }
    let block = Block::default().borders(Borders::ALL).title(" Boards ");
    f.render_widget(Paragraph::new(lines).block(block), area);
}

fn details_pane(state: &State, p: &Paint, f: &mut Frame, area: Rect) {
    let block = Block::default().borders(Borders::ALL).title(" Details ");
    let Some(b) = state.selected() else {
        f.render_widget(Paragraph::new("no board").block(block), area);
        return;
    };
    let field = |k: &'static str, v: String| Line::from(vec![Span::styled(format!("{k:<12}"), p.bold()), Span::raw(v)]);
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let mut lines = vec![
        field("name", b.name.clone()),
        field("key", b.key.clone()),
        field("MCU", b.mcu.clone()),
        field("connected", if b.connected { "yes".into() } else { "no".into() }),
        field("mode", mode_text(b.mode).into()),
        field("device", opt(&b.devnode)),
        field("USB serial", opt(&b.serial)),
        field("method", b.method.clone()),
        field("version", opt(&b.version)),
        field("against host", opt(&b.relation)),
        field("flash-all", if b.excluded { "excluded".into() } else { "included".into() }),
        field(
            "config",
            match &b.unreviewed {
                Some(profile) => format!("seeded from '{profile}', not reviewed (M)"),
                None => "-".into(),
            },
        ),
    ];
    if let Some(can) = &b.can {
        lines.insert(6, field("CAN node", can.clone()));
    }
    if let Some(why) = &b.reason {
        lines.push(field("why", why.clone()));
    }
    f.render_widget(Paragraph::new(lines).block(block).wrap(Wrap { trim: false }), area);
}

fn checklist(key: &str, b: &BoardRun, p: &Paint) -> Line<'static> {
    let mut spans = vec![Span::styled(format!("{key:<14}"), p.bold())];
    for (i, name) in PHASES.iter().enumerate() {
        let mark = if b.failed && i == b.phase {
            "[✗]"
        } else if i < b.phase || (b.finished && !b.failed && i <= b.phase) {
            "[✓]"
        } else if i == b.phase && !b.finished {
            "[>]"
        } else {
            "[ ]"
        };
        let style = match mark {
            "[✗]" => p.fg(Color::Red),
            "[✓]" => p.fg(Color::Green),
            "[>]" => p.fg(Color::Yellow),
            _ => Style::default(),
        };
        spans.push(Span::styled(format!(" {mark} {name}"), style));
    }
    if let Some(state) = &b.state {
        spans.push(Span::raw(format!("  {}", crate::ui::batch::state_text(state))));
    }
    Line::from(spans)
}

fn run_pane(run: &RunView, p: &Paint, f: &mut Frame, area: Rect) {
    let title = format!(" {} ", run.title);
    let block = Block::default().borders(Borders::ALL).title(title);
    let inner = block.inner(area);
    f.render_widget(block, area);
    // Per board: a checklist line and three bars (build, write, read-back).
    let per_board = 4u16;
    let boards_height = (run.boards.len() as u16 * per_board).min(inner.height.saturating_sub(4));
    let [boards_area, rest] = Layout::vertical([Constraint::Length(boards_height), Constraint::Min(3)]).areas(inner);
    let mut y = boards_area.y;
    for (key, b) in &run.boards {
        if y + per_board > boards_area.y + boards_area.height {
            break;
        }
        f.render_widget(Paragraph::new(checklist(key, b, p)), Rect { y, height: 1, ..boards_area });
        let bar = |label: String, ratio: f64| {
            Gauge::default().label(label).ratio(ratio.clamp(0.0, 1.0)).gauge_style(p.fg(Color::Blue)).use_unicode(true)
        };
        let row =
            |i: u16| Rect { x: boards_area.x + 2, y: y + i, width: boards_area.width.saturating_sub(2), height: 1 };
        let build = if b.phase > 0 {
            bar(format!("build: done ({} lines)", b.build_lines), 1.0)
        } else {
            bar(format!("build: {} lines of output", b.build_lines), 0.0)
        };
        f.render_widget(build, row(1));
        // Until the first block, the number of blocks is not known yet.
        let blocks = |what: &str, progress: Option<(usize, usize)>| match progress {
            Some((done, total)) => bar(format!("{what}: {done}/{total} blocks"), ratio(done, total)),
            None => bar(format!("{what}: not started"), 0.0),
        };
        f.render_widget(blocks("write", b.write), row(2));
        f.render_widget(blocks("read-back", b.read_back), row(3));
        y += per_board;
    }
    let (title, lines): (&str, Vec<Line>) = match &run.summary {
        Some(summary) => {
            let style = if run.failed { p.fg(Color::Red) } else { p.fg(Color::Green) };
            (" Summary ", summary.iter().map(|l| Line::styled(l.clone(), style)).collect())
        }
        None => {
            let height = rest.height.saturating_sub(2) as usize;
            let skip = run.log.len().saturating_sub(height);
            (" Log ", run.log.iter().skip(skip).map(|l| Line::raw(l.clone())).collect())
        }
    };
    let block = Block::default().borders(Borders::ALL).title(title);
    f.render_widget(Paragraph::new(lines).block(block), rest);
}

fn ratio(done: usize, total: usize) -> f64 {
    if total == 0 {
        0.0
    } else {
        done as f64 / total as f64
    }
}

fn dialog(text: &str, p: &Paint, f: &mut Frame) {
    let area = f.area();
    let width = (text.chars().count() as u16 + 6).clamp(30, area.width.saturating_sub(4));
    let rect = Rect {
        x: area.x + (area.width.saturating_sub(width)) / 2,
        y: area.y + area.height.saturating_sub(6) / 2,
        width,
        height: 6.min(area.height),
    };
    f.render_widget(Clear, rect);
    let block = Block::default().borders(Borders::ALL).title(" Question ").border_style(p.fg(Color::Yellow));
    let lines = vec![Line::raw(text.to_string()), Line::raw(""), Line::styled("[y] yes   [n] no", p.bold())];
    f.render_widget(Paragraph::new(lines).block(block).wrap(Wrap { trim: true }), rect);
}
