//! The daemon's heap does not grow with board events. A counting allocator measures the
//! bytes the process holds live after thousands of scripted unplug/plug cycles, once the
//! buffers that keep recent events are full, and again after as many more. The rig's soak
//! measures resident memory, which cannot tell a slow leak from freed pages the allocator
//! keeps; live bytes can.

mod host;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use host::daemon::{next, request, start, Lines, EBB, OCTOPUS};
use host::tty;

/// Bytes allocated and not yet freed, by every thread of this test process.
static LIVE: AtomicIsize = AtomicIsize::new(0);

struct Counting;

// SAFETY: every call is passed on to the system allocator unchanged; only sizes are counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Cycles before the first measurement: the hotplug broadcast keeps its last 1024 board
/// events (two per cycle of each board) and the notice broadcast its last 256.
const WARMUP: usize = 1500;
/// Cycles between the two measurements.
const MEASURED: usize = 1500;
/// What the measured cycles may add: a record kept per cycle (a board is about 1 KiB) would
/// add well over a megabyte; buffers that grow to a new power of two once may add a few KiB.
const GROWTH_LIMIT: isize = 16 * 1024;

/// The next notice about the board with registry key or (unregistered) USB serial `who`,
/// skipping others.
async fn board_notice(sub: &mut Lines, who: &str) -> serde_json::Value {
    loop {
        let n = next(sub).await;
        let notice = &n["notice"];
        let about = notice["status"]["key"].as_str().or(notice["board"]["serial"].as_str());
        if about == Some(who) {
            return n;
        }
    }
}

/// Unplug and plug octopus (registered) and ebb (not registered) `n` times, each step once
/// the daemon has said it.
async fn cycle(d: &host::daemon::Daemon, sub: &mut Lines, n: usize) {
    let octopus = tty("Klipper", "614e", OCTOPUS, 0);
    let ebb = tty("Klipper", "614e", EBB, 1);
    for _ in 0..n {
        d.script.remove(&octopus.syspath);
        let gone = board_notice(sub, "octopus").await;
        assert_eq!(gone["notice"]["status"]["state"], "missing", "{gone}");
        d.script.remove(&ebb.syspath);
        d.script.add(ebb.clone());
        let unregistered = board_notice(sub, EBB.1).await;
        assert_eq!(unregistered["notice"]["notice"], "unregistered", "{unregistered}");
        d.script.add(octopus.clone());
        let back = board_notice(sub, "octopus").await;
        assert_eq!(back["notice"]["status"]["connected"], true, "{back}");
    }
}

#[tokio::test]
async fn board_events_do_not_grow_the_daemons_heap() {
    let d = start().await;
    let (mut sub, _hold) = request(&d.socket, r#"{"request":"subscribe"}"#).await;
    assert_eq!(next(&mut sub).await["reply"], "status");

    cycle(&d, &mut sub, WARMUP).await;
    let after_warmup = LIVE.load(Ordering::Relaxed);
    cycle(&d, &mut sub, MEASURED).await;
    let after = LIVE.load(Ordering::Relaxed);
    let growth = after - after_warmup;
    println!(
        "live heap after {WARMUP} cycles: {after_warmup} bytes; after {MEASURED} more: {after} bytes ({growth:+} bytes, \
         {:+.1} bytes a cycle)",
        growth as f64 / MEASURED as f64
    );
    assert!(growth < GROWTH_LIMIT, "{MEASURED} cycles of two boards added {growth} bytes of live heap");
}
