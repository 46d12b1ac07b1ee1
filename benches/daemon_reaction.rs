//! How fast the daemon turns a board event into a notice, natively: `cargo bench --bench
//! daemon_reaction`. The real daemon loop (`kflash::daemon::serve`, its socket, its JSON)
//! with a scripted device source; a subscriber on the socket times each unplug and plug of a
//! registered board from the moment the source delivers the record to the moment the notice
//! is read. What it leaves out is the kernel's and udevd's share (uevent, rules, netlink),
//! which no code of kflash runs; rig_daemon_soak measures the whole path from udev's event,
//! but under the rig's emulated CPU. Reports numbers against the step 7 target (p99 <= 5 ms);
//! it does not pass or fail.

#[path = "../tests/host/mod.rs"]
mod host;

use std::time::Instant;

use host::daemon::{next, request, start, Lines, OCTOPUS};

/// Unplug/plug cycles timed, after as many untimed to warm the caches and buffers.
const CYCLES: usize = 1000;
const TARGET_P99_MS: f64 = 5.0;

/// The first notice that says octopus is (`connected`) or is not connected, skipping others.
async fn connection_notice(sub: &mut Lines, connected: bool) {
    loop {
        let n = next(sub).await;
        let status = &n["notice"]["status"];
        if status["key"] == "octopus" && status["connected"] == connected {
            return;
        }
    }
}

/// Seconds from each scripted event to its notice: `cycles` unplugs and as many plugs.
async fn timed_cycles(d: &host::daemon::Daemon, sub: &mut Lines, cycles: usize) -> (Vec<f64>, Vec<f64>) {
    let octopus = host::tty("Klipper", "614e", OCTOPUS, 0);
    let (mut gone, mut back) = (Vec::with_capacity(cycles), Vec::with_capacity(cycles));
    for _ in 0..cycles {
        let t = Instant::now();
        d.script.remove(&octopus.syspath);
        connection_notice(sub, false).await;
        gone.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        d.script.add(octopus.clone());
        connection_notice(sub, true).await;
        back.push(t.elapsed().as_secs_f64());
    }
    (gone, back)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn report(what: &str, samples: &mut [f64]) -> f64 {
    samples.sort_by(f64::total_cmp);
    let ms = |s: f64| s * 1e3;
    let p99 = ms(percentile(samples, 0.99));
    println!(
        "{what} ({} samples): p50 {:.3} ms, p99 {p99:.3} ms, max {:.3} ms, min {:.3} ms",
        samples.len(),
        ms(percentile(samples, 0.5)),
        ms(samples[samples.len() - 1]),
        ms(samples[0])
    );
    p99
}

fn main() {
    // The daemon's own runtime: multi-threaded, as `kflash daemon` builds it in main.rs.
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a runtime");
    rt.block_on(async {
        let d = start().await;
        let (mut sub, _hold) = request(&d.socket, r#"{"request":"subscribe"}"#).await;
        assert_eq!(next(&mut sub).await["reply"], "status");
        timed_cycles(&d, &mut sub, CYCLES).await;
        let (mut gone, mut back) = timed_cycles(&d, &mut sub, CYCLES).await;
        println!(
            "daemon reaction, scripted device event to the subscriber's notice ({} build, after {CYCLES} warm-up \
             cycles):",
            if cfg!(debug_assertions) { "debug" } else { "release" }
        );
        let p99s = [report("  board went away", &mut gone), report("  board appeared", &mut back)];
        let worst = p99s.iter().copied().fold(0.0, f64::max);
        println!(
            "  target p99 <= {TARGET_P99_MS} ms for kflash's part: {}",
            if worst <= TARGET_P99_MS { "met" } else { "NOT met" }
        );
        d.task.abort();
    });
}
