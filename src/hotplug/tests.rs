//! Snapshot and wait_for driven by scripted udev records, on tokio's paused clock.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::identity::{DeviceRecord, Mode};

const OCTOPUS: &str = "29001A001151313531383332";
const NITEHAWK: &str = "E661640843545B2E";

/// A CDC-ACM tty as udev reports it; `port` is the dummy_hcd instance, `acm` the tty number.
fn tty(vendor: &str, pid: &str, mcu: &str, serial: &str, port: u32, acm: u32) -> DeviceRecord {
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
    DeviceRecord {
        syspath: format!(
            "/sys/devices/platform/dummy_hcd.{port}/usb{}/{}-1/{}-1:1.0/tty/ttyACM{acm}",
            port + 1,
            port + 1,
            port + 1
        ),
        subsystem: "tty".into(),
        devnode: Some(format!("/dev/ttyACM{acm}")),
        properties: props.iter().map(|(k, v)| (k.to_string(), v.clone())).collect::<BTreeMap<_, _>>(),
    }
}

fn klipper(mcu: &str, serial: &str, port: u32, acm: u32) -> DeviceRecord {
    tty("Klipper", "614e", mcu, serial, port, acm)
}

fn katapult(mcu: &str, serial: &str, port: u32, acm: u32) -> DeviceRecord {
    tty("katapult", "6177", mcu, serial, port, acm)
}

fn resolver() -> KeyResolver {
    Arc::new(|id| match id.serial.as_deref() {
        Some(OCTOPUS) => Some("octopus".to_string()),
        _ => None,
    })
}

fn is_octopus_in(mode: Mode) -> impl Fn(&Board) -> bool {
    move |b| b.key.as_deref() == Some("octopus") && b.identity.mode == mode
}

async fn start(initial: Vec<DeviceRecord>) -> (Hotplug, Script) {
    let (source, script) = ScriptedSource::new(initial);
    (Hotplug::start(source, resolver()).await.unwrap(), script)
}

#[tokio::test(start_paused = true)]
async fn board_present_before_the_wait_resolves_at_once() {
    let (hp, _script) = start(vec![klipper("stm32h723xx", OCTOPUS, 0, 0)]).await;
    let t0 = Instant::now();
    let b = hp.wait_for("octopus", is_octopus_in(Mode::Klipper), t0 + Duration::from_secs(30)).await.unwrap();
    assert_eq!(b.identity.devnode.as_deref(), Some("/dev/ttyACM0"));
    assert_eq!(Instant::now(), t0, "no time passed");
}

#[tokio::test(start_paused = true)]
async fn board_arriving_during_the_wait_resolves_on_its_event() {
    let (hp, script) = start(vec![]).await;
    let t0 = Instant::now();
    let s = script.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1400)).await;
        s.add(katapult("stm32h723xx", OCTOPUS, 0, 1));
    });
    let b =
        hp.wait_for("octopus in Katapult", is_octopus_in(Mode::Katapult), t0 + Duration::from_secs(10)).await.unwrap();
    assert_eq!(b.identity.devnode.as_deref(), Some("/dev/ttyACM1"));
    assert_eq!(Instant::now() - t0, Duration::from_millis(1400), "resolved on the event, not later");
}

#[tokio::test(start_paused = true)]
async fn board_never_arriving_times_out_at_the_deadline() {
    let (hp, _script) = start(vec![klipper("rp2040", NITEHAWK, 1, 0)]).await;
    let t0 = Instant::now();
    let err = hp
        .wait_for("octopus in Katapult", is_octopus_in(Mode::Katapult), t0 + Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(matches!(err, crate::error::Error::Timeout { .. }), "{err}");
    assert!(err.to_string().contains("octopus in Katapult"));
    assert_eq!(Instant::now() - t0, Duration::from_secs(10));
}

#[tokio::test(start_paused = true)]
async fn other_boards_events_are_ignored() {
    let (hp, script) = start(vec![]).await;
    let t0 = Instant::now();
    let s = script.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.add(katapult("rp2040", NITEHAWK, 1, 0)); // another board in Katapult
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.add(klipper("stm32h723xx", OCTOPUS, 0, 1)); // ours, wrong mode
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.remove(&klipper("stm32h723xx", OCTOPUS, 0, 1).syspath);
        s.add(katapult("stm32h723xx", OCTOPUS, 0, 2)); // ours, right mode
    });
    let b =
        hp.wait_for("octopus in Katapult", is_octopus_in(Mode::Katapult), t0 + Duration::from_secs(10)).await.unwrap();
    assert_eq!(b.identity.devnode.as_deref(), Some("/dev/ttyACM2"));
    assert_eq!(Instant::now() - t0, Duration::from_millis(300));
}

#[tokio::test(start_paused = true)]
async fn removed_then_readded_is_seen_again() {
    let (hp, script) = start(vec![klipper("stm32h723xx", OCTOPUS, 0, 0)]).await;
    let mut events = hp.subscribe();
    script.remove(&klipper("stm32h723xx", OCTOPUS, 0, 0).syspath);
    let ev = events.recv().await.unwrap();
    assert_eq!((ev.action, ev.board.key.as_deref()), (Action::Removed, Some("octopus")));
    assert!(hp.snapshot().is_empty());

    let t0 = Instant::now();
    let s = script.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        s.add(klipper("stm32h723xx", OCTOPUS, 0, 0));
    });
    hp.wait_for("octopus", is_octopus_in(Mode::Klipper), t0 + Duration::from_secs(5)).await.unwrap();
    let ev = events.recv().await.unwrap();
    assert_eq!(ev.action, Action::Added, "same mode back is a plain add");
    assert_eq!(hp.snapshot().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn klipper_katapult_klipper_is_one_board() {
    let (hp, script) = start(vec![klipper("stm32h723xx", OCTOPUS, 0, 0), klipper("rp2040", NITEHAWK, 1, 1)]).await;
    let mut events = hp.subscribe();
    // Katapult comes back on ttyACM2 because ttyACM0 was still held open.
    script.remove(&klipper("stm32h723xx", OCTOPUS, 0, 0).syspath);
    script.add(katapult("stm32h723xx", OCTOPUS, 0, 2));
    script.remove(&katapult("stm32h723xx", OCTOPUS, 0, 2).syspath);
    script.add(klipper("stm32h723xx", OCTOPUS, 0, 0));

    let mut seen = Vec::new();
    for _ in 0..4 {
        let ev = events.recv().await.unwrap();
        seen.push((ev.action, ev.board.identity.mode, ev.previous_mode, ev.board.key.clone()));
    }
    let key = Some("octopus".to_string());
    assert_eq!(
        seen,
        vec![
            (Action::Removed, Mode::Klipper, None, key.clone()),
            (Action::ModeChanged, Mode::Katapult, Some(Mode::Klipper), key.clone()),
            (Action::Removed, Mode::Katapult, None, key.clone()),
            (Action::ModeChanged, Mode::Klipper, Some(Mode::Katapult), key.clone()),
        ]
    );
    let snap = hp.snapshot();
    assert_eq!(snap.len(), 2, "two boards, not three: {snap:?}");
    assert_eq!(snap.iter().filter(|b| b.key.as_deref() == Some("octopus")).count(), 1);
}

#[tokio::test(start_paused = true)]
async fn enumeration_duplicates_of_live_events_are_harmless() {
    // The monitor started before enumeration, so an add can arrive for a device the
    // enumeration already listed: it must not show up twice or emit an event.
    let rec = klipper("stm32h723xx", OCTOPUS, 0, 0);
    let (hp, script) = start(vec![rec.clone()]).await;
    let mut events = hp.subscribe();
    script.add(rec);
    script.add(klipper("rp2040", NITEHAWK, 1, 1));
    let ev = events.recv().await.unwrap();
    assert_eq!(ev.board.identity.serial.as_deref(), Some(NITEHAWK), "the duplicate produced no event");
    assert_eq!(hp.snapshot().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn lost_event_is_recovered_by_rescan_at_the_deadline() {
    let (hp, script) = start(vec![]).await;
    script.add_silently(katapult("stm32h723xx", OCTOPUS, 0, 0));
    let t0 = Instant::now();
    let b =
        hp.wait_for("octopus in Katapult", is_octopus_in(Mode::Katapult), t0 + Duration::from_secs(3)).await.unwrap();
    assert_eq!(b.identity.mode, Mode::Katapult);
    assert_eq!(Instant::now() - t0, Duration::from_secs(3), "found only at the deadline");
}

#[tokio::test(start_paused = true)]
async fn source_failure_ends_waits_with_the_reason() {
    let (hp, script) = start(vec![]).await;
    script.fail("netlink socket closed");
    let err = hp.wait_for("anything", |_| true, Instant::now() + Duration::from_secs(60)).await.unwrap_err();
    assert!(err.to_string().contains("netlink socket closed"), "{err}");
}

#[test]
fn snapshot_ignores_unknown_removes_and_non_boards() {
    let mut s = Snapshot::new(resolver());
    assert!(s.remove("/sys/devices/nothing").is_none());
    let ttys0 = DeviceRecord {
        syspath: "/sys/devices/platform/serial8250/tty/ttyS0".into(),
        subsystem: "tty".into(),
        devnode: Some("/dev/ttyS0".into()),
        properties: BTreeMap::new(),
    };
    assert!(s.upsert(&ttys0).is_none());
    assert_eq!(s.boards().count(), 0);
}

#[tokio::test(start_paused = true)]
async fn armed_wait_catches_a_board_that_arrives_before_it_is_awaited() {
    let (hp, script) = start(vec![klipper("stm32h723xx", OCTOPUS, 0, 0)]).await;
    let waiter = hp.arm("octopus in Katapult", is_octopus_in(Mode::Katapult));
    // The reboot happens, and is fully processed, before anyone awaits the waiter.
    script.remove(&klipper("stm32h723xx", OCTOPUS, 0, 0).syspath);
    script.add(katapult("stm32h723xx", OCTOPUS, 0, 1));
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(hp.snapshot()[0].identity.mode, Mode::Katapult, "the source has applied it");
    let t0 = Instant::now();
    let b = waiter.until(t0 + Duration::from_secs(10)).await.unwrap();
    assert_eq!(b.identity.devnode.as_deref(), Some("/dev/ttyACM1"));
    assert_eq!(Instant::now(), t0);
}

#[tokio::test(start_paused = true)]
async fn arm_next_ignores_the_board_already_present() {
    let (hp, script) = start(vec![klipper("stm32h723xx", OCTOPUS, 0, 0)]).await;
    let waiter = hp.arm_next("octopus re-enumerated", is_octopus_in(Mode::Klipper));
    let s = script.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        s.remove(&klipper("stm32h723xx", OCTOPUS, 0, 0).syspath);
        tokio::time::sleep(Duration::from_millis(500)).await;
        s.add(klipper("stm32h723xx", OCTOPUS, 0, 0));
    });
    let t0 = Instant::now();
    waiter.until(t0 + Duration::from_secs(5)).await.unwrap();
    assert_eq!(Instant::now() - t0, Duration::from_secs(1), "resolved on the re-add, not at once");
    let never = hp.arm_next("octopus re-enumerated", is_octopus_in(Mode::Klipper));
    assert!(never.until(Instant::now() + Duration::from_secs(2)).await.is_err());
}

/// A reloaded registry: the source keeps running, present boards get their new keys as
/// `Changed` events, and later events use the new resolver.
#[tokio::test(start_paused = true)]
async fn a_swapped_resolver_resolves_present_and_later_boards() {
    let (hp, script) = start(vec![klipper("rp2040", NITEHAWK, 1, 0)]).await;
    let mut events = hp.subscribe();
    assert_eq!(hp.snapshot()[0].key, None);
    hp.set_resolver(Arc::new(|id| match id.serial.as_deref() {
        Some(NITEHAWK) => Some("nitehawk".to_string()),
        Some(OCTOPUS) => Some("octopus-renamed".to_string()),
        _ => None,
    }));
    let ev = events.recv().await.unwrap();
    assert_eq!((ev.action, ev.board.key.as_deref()), (Action::Changed, Some("nitehawk")));
    script.add(klipper("stm32h723xx", OCTOPUS, 2, 1));
    let ev = events.recv().await.unwrap();
    assert_eq!((ev.action, ev.board.key.as_deref()), (Action::Added, Some("octopus-renamed")));
}

/// A resolver that panics (it runs under the hotplug's lock) leaves the device unresolved and
/// discovery working: the next board is still seen and resolved.
#[tokio::test(start_paused = true)]
async fn a_panicking_resolver_does_not_take_discovery_down() {
    let resolver: KeyResolver = Arc::new(|id| match id.serial.as_deref() {
        Some(NITEHAWK) => panic!("a resolver bug"),
        Some(OCTOPUS) => Some("octopus".to_string()),
        _ => None,
    });
    let (source, script) = ScriptedSource::new(vec![]);
    let hp = Hotplug::start(source, resolver).await.unwrap();
    let mut events = hp.subscribe();
    script.add(klipper("rp2040", NITEHAWK, 1, 0));
    let ev = events.recv().await.unwrap();
    assert_eq!((ev.action, ev.board.key), (Action::Added, None));
    script.add(klipper("stm32h723xx", OCTOPUS, 2, 1));
    let b = hp.wait_for("octopus", is_octopus_in(Mode::Klipper), Instant::now() + Duration::from_secs(1)).await;
    assert_eq!(b.unwrap().key.as_deref(), Some("octopus"));
    assert_eq!(hp.snapshot().len(), 2);
}

/// The hotplug's broadcast keeps all its slots allocated, each as large as an event: a board
/// inline made the 1024 of them 350 KiB of the idle daemon's memory.
#[test]
fn a_broadcast_event_stays_small() {
    assert!(std::mem::size_of::<BoardEvent>() <= 32, "BoardEvent is {} bytes", std::mem::size_of::<BoardEvent>());
}
