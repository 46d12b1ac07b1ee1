//! Snapshot tests of the dashboard on scripted input sequences (ratatui's `TestBackend`,
//! `insta`), and its key handling.

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::backend::TestBackend;
use ratatui::Terminal;

use kflash::daemon::status::{FirmwareState, KlippyState};
use kflash::event::{Event, EventKind};
use kflash::identity::Mode;
use kflash::orchestrator::{BoardState, Cause, Phase};
use kflash::registry::FlashMethod;

use super::model::{Action, Input, Purpose, State};
use super::render::render;
use super::view::{BoardRow, BoardsView, DeviceRow, HostView};

const HOST: &str = "v0.12.0-456-gabc1234";

fn board(key: &str, mcu: &str, serial: &str) -> BoardRow {
    BoardRow {
        key: key.into(),
        name: key.to_uppercase(),
        mcu: mcu.into(),
        connected: true,
        mode: Some(Mode::Klipper),
        serial: Some(serial.into()),
        devnode: Some("/dev/ttyACM0".into()),
        method: "katapult".into(),
        version: Some(HOST.into()),
        state: FirmwareState::Current,
        relation: None,
        excluded: false,
        ambiguous: false,
        unreviewed: None,
        can: None,
        reason: None,
    }
}

fn view(boards: Vec<BoardRow>) -> BoardsView {
    BoardsView {
        host_version: Some(HOST.into()),
        klippy: KlippyState::Ready,
        boards,
        unregistered: vec![],
        other: vec![DeviceRow {
            mode: "other".into(),
            mcu: None,
            serial: Some("A10K5X".into()),
            name: "usb-FTDI_FT232R_USB_UART_A10K5X-if00-port0".into(),
            reason: Some("not a Klipper or Katapult device (0403:6001)".into()),
        }],
        registry_error: None,
    }
}

/// Two boards, the second absent and excluded.
fn idle_state() -> State {
    let mut s = State::new(false);
    let mut ebb = board("ebb", "stm32g0b1xx", "1D0041000B50534E4E313020");
    ebb.connected = false;
    ebb.mode = None;
    ebb.version = None;
    ebb.state = FirmwareState::Missing;
    ebb.excluded = true;
    s.input(Input::Boards(view(vec![board("octopus", "stm32h723xx", "29001A001151313531383332"), ebb])));
    s.input(Input::Host(HostView {
        print_state: Some("standby".into()),
        daemon: None,
        last_flash: Some("octopus ok 2026-11-30 18:02 (v0.12.0-456-gabc1234)".into()),
    }));
    s
}

fn key(c: char) -> Input {
    Input::Key(KeyEvent::new(KeyCode::Char(c), KeyModifiers::NONE))
}

fn code(c: KeyCode) -> Input {
    Input::Key(KeyEvent::new(c, KeyModifiers::NONE))
}

fn ctrl_c() -> Input {
    Input::Key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL))
}

fn draw(s: &State) -> TestBackend {
    let mut t = Terminal::new(TestBackend::new(120, 30)).unwrap();
    t.draw(|f| render(s, f)).unwrap();
    t.backend().clone()
}

fn ev(key: &str, kind: EventKind) -> Input {
    Input::RunEvent(Event::board(key, kind))
}

fn state_ev(key: &str, state: BoardState) -> Input {
    ev(key, EventKind::Board { state })
}

/// The octopus, mid-write: built, in Katapult, 96 of 240 blocks written.
fn mid_write() -> State {
    let mut s = idle_state();
    assert_eq!(s.input(key('f')).action, Some(Action::Flash("octopus".into())));
    s.input(Input::RunStarted("Flashing octopus".into()));
    s.input(state_ev("octopus", BoardState::Building));
    s.input(ev("octopus", EventKind::BuildStarted { name: "octopus".into() }));
    for l in ["  Compiling out/src/sched.o", "  Linking out/klipper.elf", "  Creating hex file out/klipper.bin"] {
        s.input(ev("octopus", EventKind::BuildOutput { line: l.into() }));
    }
    s.input(ev(
        "octopus",
        EventKind::Built { version: HOST.into(), cached: false, app: Some("Klipper".into()), size: 30720, secs: 41.2 },
    ));
    s.input(state_ev("octopus", BoardState::Built));
    s.input(Input::RunEvent(Event::run(EventKind::KlipperStopped)));
    s.input(state_ev("octopus", BoardState::AwaitingBootloader));
    s.input(state_ev("octopus", BoardState::Writing { method: FlashMethod::Katapult }));
    s.input(ev("octopus", EventKind::WriteProgress { done: 96, total: 240 }));
    s
}

#[test]
fn idle_with_boards() {
    insta::assert_snapshot!(draw(&idle_state()));
}

#[test]
fn board_plugged_appears() {
    let mut s = idle_state();
    let before = draw(&s);
    let mut v = s.boards.clone().unwrap();
    v.boards[1].connected = true;
    v.boards[1].mode = Some(Mode::Klipper);
    v.boards[1].state = FirmwareState::Unknown;
    v.unregistered.push(DeviceRow {
        mode: "klipper".into(),
        mcu: Some("rp2040".into()),
        serial: Some("E661640843545B2E".into()),
        name: "usb-Klipper_rp2040_E661640843545B2E-if00".into(),
        reason: None,
    });
    assert!(s.input(Input::Boards(v)).redraw);
    let after = draw(&s);
    assert_ne!(before, after);
    insta::assert_snapshot!(after);
}

#[test]
fn mode_changed_to_katapult() {
    let mut s = idle_state();
    let mut v = s.boards.clone().unwrap();
    v.boards[0].mode = Some(Mode::Katapult);
    v.boards[0].version = None;
    v.boards[0].state = FirmwareState::Bootloader;
    s.input(Input::Boards(v));
    insta::assert_snapshot!(draw(&s));
}

#[test]
fn outdated_board_says_how_far() {
    let mut s = idle_state();
    let mut v = s.boards.clone().unwrap();
    v.boards[0].version = Some("v0.12.0-453-g0ff1ce0".into());
    v.boards[0].state = FirmwareState::Outdated;
    v.boards[0].relation = Some("3 commits behind".into());
    s.input(Input::Boards(v));
    let screen = draw(&s);
    insta::assert_snapshot!(screen);
}

#[test]
fn flash_progress_mid_write() {
    insta::assert_snapshot!(draw(&mid_write()));
}

#[test]
fn failure_and_summary() {
    let mut s = mid_write();
    s.input(state_ev("octopus", BoardState::Failed { phase: Phase::Write, cause: Cause::DeviceGone }));
    s.input(Input::RunEnded {
        lines: vec![
            "octopus: the board went away during the write".into(),
            "  help: plug it in again; it stays in Katapult until flashed".into(),
        ],
        failed: true,
    });
    insta::assert_snapshot!(draw(&s));
    // Any key goes back to the boards.
    assert!(s.input(key('x')).redraw);
    assert!(s.run.is_none());
}

#[test]
fn question_dialog_answers_the_run() {
    let mut s = mid_write();
    s.input(Input::Question("Moonraker is unreachable at http://127.0.0.1:7125. Flash anyway?".into()));
    insta::assert_snapshot!(draw(&s));
    // Keys other than y/n/Esc do nothing while it is open.
    assert_eq!(s.input(key('f')).action, None);
    assert_eq!(s.input(key('y')).action, Some(Action::Answer(true)));
    assert!(s.dialog.is_none());
}

#[test]
fn cursor_moves_and_stays_in_range() {
    let mut s = idle_state();
    assert_eq!(s.cursor, 0);
    s.input(code(KeyCode::Down));
    assert_eq!(s.cursor, 1);
    s.input(key('j'));
    assert_eq!(s.cursor, 1, "the cursor stops at the last board");
    s.input(key('k'));
    s.input(code(KeyCode::Up));
    assert_eq!(s.cursor, 0);
    // The cursor follows its board when the rows change order.
    s.input(key('j'));
    let mut v = s.boards.clone().unwrap();
    v.boards.reverse();
    s.input(Input::Boards(v));
    assert_eq!(s.selected().unwrap().key, "ebb");
}

#[test]
fn flash_of_an_absent_board_is_refused_with_a_message() {
    let mut s = idle_state();
    s.input(key('j'));
    let out = s.input(key('F'));
    assert_eq!(out.action, None);
    assert!(out.redraw);
    let msg = s.message.clone().unwrap();
    assert!(msg.contains("EBB is not connected"), "{msg}");
    assert!(draw(&s).to_string().contains("EBB is not connected"));
}

#[test]
fn q_quits_when_idle() {
    let mut s = idle_state();
    assert_eq!(s.input(key('q')).action, Some(Action::Quit));
    assert_eq!(s.input(key('Q')).action, Some(Action::Quit));
    assert_eq!(s.input(ctrl_c()).action, Some(Action::Quit));
}

#[test]
fn esc_during_a_flash_asks_before_cancelling() {
    let mut s = mid_write();
    // q does not quit under a run.
    assert_eq!(s.input(key('q')).action, None);
    let out = s.input(code(KeyCode::Esc));
    assert_eq!(out.action, None, "Esc only asks");
    assert_eq!(s.dialog.as_ref().map(|d| d.purpose.clone()), Some(Purpose::CancelRun));
    // No: the run goes on.
    assert_eq!(s.input(key('n')).action, None);
    assert!(s.dialog.is_none());
    // Ctrl-C asks too; yes cancels.
    s.input(ctrl_c());
    assert!(s.dialog.is_some());
    assert_eq!(s.input(key('y')).action, Some(Action::Cancel));
    assert!(s.run.as_ref().unwrap().cancelling);
}

#[test]
fn remove_asks_first() {
    let mut s = idle_state();
    assert_eq!(s.input(key('r')).action, None);
    assert!(draw(&s).to_string().contains("Remove 'OCTOPUS' (octopus)?"));
    assert_eq!(s.input(key('n')).action, None);
    s.input(key('r'));
    assert_eq!(s.input(key('y')).action, Some(Action::Remove("octopus".into())));
}

#[test]
fn no_color_draws_no_styles() {
    let s = idle_state();
    let b = draw(&s);
    assert!(b.buffer().content.iter().all(|c| c.fg == ratatui::style::Color::Reset
        && c.bg == ratatui::style::Color::Reset
        && c.modifier.is_empty()));
    let mut colored = idle_state();
    colored.color = true;
    let b = draw(&colored);
    assert!(b.buffer().content.iter().any(|c| c.fg != ratatui::style::Color::Reset));
}

#[test]
fn an_unchanged_host_view_does_not_redraw() {
    let mut s = idle_state();
    let host = s.host.clone();
    assert!(!s.input(Input::Host(host)).redraw);
}

/// A udev record of a USB serial device as the rig's boards show up.
fn record(vendor: &str, pid: &str, mcu: &str, serial: &str, port: u32) -> kflash::identity::DeviceRecord {
    let id_path = format!("platform-dummy_hcd.{port}-usb-0:1:1.0");
    let props = [
        ("ID_BUS", "usb".to_string()),
        ("ID_USB_VENDOR", vendor.to_string()),
        ("ID_USB_VENDOR_ID", "1d50".to_string()),
        ("ID_USB_MODEL", mcu.to_string()),
        ("ID_USB_MODEL_ID", pid.to_string()),
        ("ID_USB_SERIAL_SHORT", serial.to_string()),
        ("ID_PATH", id_path.clone()),
        ("DEVLINKS", format!("/dev/serial/by-id/usb-{vendor}_{mcu}_{serial}-if00 /dev/serial/by-path/{id_path}")),
    ];
    kflash::identity::DeviceRecord {
        syspath: format!(
            "/sys/devices/platform/dummy_hcd.{port}/usb{p}/{p}-1/{p}-1:1.0/tty/ttyACM{port}",
            p = port + 1
        ),
        subsystem: "tty".into(),
        devnode: Some(format!("/dev/ttyACM{port}")),
        properties: props.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
    }
}

#[test]
fn the_view_joins_the_trackers_status_and_the_devices_view() {
    use kflash::app::boards::{add_board, devices_view, AddRequest};
    use kflash::daemon::status::Tracker;
    use kflash::hotplug::Board;
    use kflash::identity::BoardIdentity;

    let dir = tempfile::tempdir().unwrap();
    let mut reg = kflash::registry::Registry::open(dir.path()).unwrap();
    let ident = |r| BoardIdentity::from_record(&r).unwrap();
    let octopus = Board { identity: ident(record("Klipper", "614e", "stm32h723xx", "29001A0011", 0)), key: None };
    let req = AddRequest {
        name: "Octopus".into(),
        key: Some("octopus".into()),
        mcu: None,
        flash_method: FlashMethod::Katapult,
        exclude: false,
    };
    add_board(&mut reg, &octopus, &req).unwrap();
    let octopus = Board { key: Some("octopus".into()), ..octopus };
    let stray = Board { identity: ident(record("katapult", "6177", "rp2040", "E6616408", 1)), key: None };
    let connected = vec![octopus, stray];
    let tracker = Tracker::new(reg.boards().cloned().collect(), Some(HOST.into()), connected.clone());
    let v = BoardsView::new(&tracker.status(), &devices_view(&reg, &connected));
    assert_eq!(v.boards.len(), 1);
    let b = &v.boards[0];
    assert_eq!((b.key.as_str(), b.name.as_str(), b.mcu.as_str()), ("octopus", "Octopus", "stm32h723xx"));
    assert!(b.connected);
    assert_eq!(b.mode, Some(Mode::Klipper));
    assert_eq!(b.serial.as_deref(), Some("29001A0011"));
    assert_eq!(b.method, "katapult");
    assert_eq!(b.state, FirmwareState::Unknown, "no version known yet");
    assert_eq!(v.unregistered.len(), 1);
    assert_eq!(v.unregistered[0].mode, "katapult");
    assert_eq!(v.unregistered[0].mcu.as_deref(), Some("rp2040"));
    assert_eq!(v.host_version.as_deref(), Some(HOST));
}

#[test]
fn the_daemons_own_run_is_shown_but_not_cancelled_from_here() {
    let mut s = idle_state();
    s.input(state_ev("ebb", BoardState::Writing { method: FlashMethod::Katapult }));
    let run = s.run.clone().unwrap();
    assert!(run.observed && !s.running());
    assert!(draw(&s).to_string().contains("A run of the kflash daemon"));
    s.input(state_ev("ebb", BoardState::Flashed { view: kflash::orchestrator::KlipperView::Confirmed }));
    s.input(Input::RunEvent(Event::run(EventKind::Run { state: kflash::orchestrator::RunState::Done })));
    let summary = s.run.as_ref().unwrap().summary.clone().unwrap();
    assert_eq!(summary, vec!["ebb: flashed, verified by the board and by Klipper".to_string()]);
    // Esc does not ask to cancel someone else's run: any key hides it.
    assert_eq!(s.input(code(KeyCode::Esc)).action, None);
    assert!(s.dialog.is_none() && s.run.is_none());
}

/// The dashboard follows a daemon that starts after it, when its socket is created (in a
/// directory that did not exist at first), goes back to its own streams when it goes away,
/// and follows the next one.
#[tokio::test]
async fn a_daemon_started_later_is_followed_and_its_end_noticed() {
    use super::runner::{follow_daemon, Note};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("run/kflash.sock");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let follower = tokio::spawn(follow_daemon(vec![socket.clone()], tx));
    async fn note(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Note>) -> Note {
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv()).await;
        n.expect("a note from the daemon follower within 10 s").expect("the follower runs")
    }
    // No daemon: said once.
    assert!(matches!(note(&mut rx).await, Note::Daemon(None)));
    for round in 0..2 {
        std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let (stream, _) = tokio::time::timeout(std::time::Duration::from_secs(10), listener.accept())
            .await
            .unwrap_or_else(|_| panic!("round {round}: the new socket was not connected to"))
            .unwrap();
        match note(&mut rx).await {
            Note::DaemonUp(p) => assert_eq!(p, socket, "round {round}"),
            _ => panic!("round {round}: the daemon's socket was not followed"),
        }
        let (r, mut w) = stream.into_split();
        let mut request = String::new();
        BufReader::new(r).read_line(&mut request).await.unwrap();
        assert_eq!(request.trim(), r#"{"request":"subscribe"}"#);
        w.write_all(b"{\"reply\":\"status\",\"status\":{}}\n").await.unwrap();
        match note(&mut rx).await {
            Note::Daemon(Some(v)) => assert_eq!(v["reply"], "status"),
            _ => panic!("round {round}: the stream's line was not forwarded"),
        }
        // The daemon goes away.
        drop(w);
        drop(listener);
        std::fs::remove_file(&socket).unwrap();
        assert!(matches!(note(&mut rx).await, Note::Daemon(None)), "round {round}: its end is said");
    }
    // Nothing more happens, so nothing more is said (no retries on a timer).
    assert!(tokio::time::timeout(std::time::Duration::from_millis(300), rx.recv()).await.is_err());
    follower.abort();
}

/// A run's last board states may come after its end (they are emitted in the run future's
/// last poll): they still update the checklist.
#[test]
fn board_states_after_the_runs_end_still_update_the_checklist() {
    use kflash::orchestrator::KlipperView;
    let mut s = State::new(false);
    s.input(Input::RunStarted("Flashing all boards".into()));
    s.input(state_ev("ebb", BoardState::Flashed { view: KlipperView::Pending }));
    s.input(Input::RunEnded { lines: vec!["done".into()], failed: false });
    s.input(state_ev("ebb", BoardState::Flashed { view: KlipperView::Confirmed }));
    let b = &s.run.as_ref().unwrap().boards["ebb"];
    assert!(b.finished, "{b:?}");
    assert_eq!(b.state, Some(BoardState::Flashed { view: KlipperView::Confirmed }));
}

/// The screen's text, row by row.
fn text_of(b: &TestBackend) -> String {
    let buf = b.buffer();
    (0..buf.area.height)
        .map(|y| (0..buf.area.width).map(|x| buf[(x, y)].symbol()).collect::<String>())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn every_terminal_size_draws_and_common_ones_keep_the_essentials() {
    // A resize redraws; what it draws must fit any size, down to a window dragged to nothing.
    let (mut idle, busy) = (idle_state(), mid_write());
    assert!(idle.input(Input::Resize).redraw);
    for (w, h) in [(1, 1), (10, 3), (20, 5), (40, 10), (60, 15), (80, 24), (100, 30), (200, 60)] {
        for s in [&idle, &busy] {
            let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
            t.draw(|f| render(s, f)).unwrap_or_else(|e| panic!("{w}x{h}: {e}"));
        }
    }
    for (w, h) in [(80, 24), (120, 40)] {
        let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
        t.draw(|f| render(&idle, f)).unwrap();
        let screen = text_of(t.backend());
        assert!(screen.contains("octopus") && screen.contains("F flash"), "{w}x{h}:\n{screen}");
        t.draw(|f| render(&busy, f)).unwrap();
        let screen = text_of(t.backend());
        assert!(screen.contains("write: 96/240"), "{w}x{h}:\n{screen}");
    }
}

#[test]
fn a_state_too_long_for_the_screen_gives_way_to_the_short_one() {
    let mut s = idle_state();
    let mut v = s.boards.clone().unwrap();
    v.boards[0].version = Some("v0.12.0-300-gdeadbeef".into());
    v.boards[0].state = FirmwareState::Outdated;
    v.boards[0].relation = Some("3 commits ahead (this flash is a downgrade)".into());
    s.input(Input::Boards(v));
    let row = |w: u16| {
        let mut t = Terminal::new(TestBackend::new(w, 30)).unwrap();
        t.draw(|f| render(&s, f)).unwrap();
        text_of(t.backend()).lines().find(|l| l.contains("● octopus")).unwrap().to_string()
    };
    // 120 columns: no room for how far; the row ends with the whole word, inside the frame.
    let narrow = row(120);
    assert!(narrow.contains("OUTDATED ") && !narrow.contains("OUTDATED (") && narrow.ends_with('│'), "{narrow}");
    let wide = row(200);
    assert!(wide.contains("OUTDATED (3 commits ahead (this flash is a downgrade))"), "{wide}");
}

/// A USB board and two CAN toolheads, drawn from the tracker's real status: one toolhead
/// current by Klippy's view, the other missing once its interface went down.
#[test]
fn can_nodes_are_drawn_from_klippys_view_and_their_interface() {
    use kflash::app::boards::{add_board, add_can_board, devices_view, AddRequest};
    use kflash::can::presence::Link;
    use kflash::daemon::status::Tracker;
    use kflash::hotplug::Board;
    use kflash::identity::BoardIdentity;
    use kflash::moonraker::McuStatus;

    let dir = tempfile::tempdir().unwrap();
    let mut reg = kflash::registry::Registry::open(dir.path()).unwrap();
    let octopus = Board {
        identity: BoardIdentity::from_record(&record("Klipper", "614e", "stm32h723xx", "29001A0011", 0)).unwrap(),
        key: None,
    };
    let req = |name: &str, key: &str, mcu: Option<&str>| AddRequest {
        name: name.into(),
        key: Some(key.into()),
        mcu: mcu.map(String::from),
        flash_method: FlashMethod::Katapult,
        exclude: false,
    };
    add_board(&mut reg, &octopus, &req("Octopus", "octopus", None)).unwrap();
    let can = Some("can-tool");
    add_can_board(&mut reg, "0a1b2c3d4e5f".parse().unwrap(), can, &req("EBB36", "ebb36", Some("stm32g0b1xx"))).unwrap();
    add_can_board(&mut reg, "00000000beef".parse().unwrap(), Some("can-bed"), &req("SB2209", "sb2209", Some("rp2040")))
        .unwrap();
    let octopus = Board { key: Some("octopus".into()), ..octopus };
    let connected = vec![octopus];
    let mut tracker = Tracker::new(reg.boards().cloned().collect(), Some(HOST.into()), connected.clone());
    tracker.links(vec![("can-tool".into(), Link::Up), ("can-bed".into(), Link::Up)]);
    let mcu = |name: &str, uuid: &str, version: &str| McuStatus {
        object: format!("mcu {name}"),
        name: name.into(),
        mcu_version: Some(version.into()),
        mcu: None,
        app: None,
        serial: None,
        canbus_uuid: Some(uuid.into()),
    };
    tracker.klippy_state(
        KlippyState::Ready,
        vec![mcu("ebb36", "0a1b2c3d4e5f", HOST), mcu("sb2209", "00000000beef", "v0.12.0-450-gold")],
    );
    tracker.links(vec![("can-bed".into(), Link::Down)]);
    let mut s = State::new(false);
    s.input(Input::Boards(BoardsView::new(&tracker.status(), &devices_view(&reg, &connected))));
    let ebb = s.boards.as_ref().unwrap().boards.iter().find(|b| b.key == "ebb36").unwrap().clone();
    assert_eq!(
        (ebb.state, ebb.connected, ebb.can.as_deref()),
        (FirmwareState::Current, true, Some("can-tool 0a1b2c3d4e5f"))
    );
    // The missing toolhead is selected: F says why instead of flashing it.
    let row = s.boards.as_ref().unwrap().boards.iter().position(|b| b.key == "sb2209").unwrap();
    for _ in 0..row {
        s.input(code(KeyCode::Down));
    }
    assert_eq!(s.input(key('f')).action, None);
    assert!(s.message.as_deref().unwrap().contains("can-bed is down"), "{:?}", s.message);
    s.input(code(KeyCode::Enter));
    insta::assert_snapshot!(draw(&s));
}
