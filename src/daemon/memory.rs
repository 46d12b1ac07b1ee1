//! The daemon's own memory, as `kflash status --json` reports it: what the kernel counts
//! (resident set) and what the allocator holds for live objects. The two differ by what
//! the allocator keeps free for reuse; only the second grows with a leak, C allocations
//! (libudev's devices) included, which a Rust-side counting allocator would not see.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MemoryUse {
    /// VmRSS from `/proc/self/status`, KiB.
    pub rss_kib: u64,
    /// Bytes in live allocations (glibc `mallinfo2`: `uordblks + hblkhd`), when known.
    pub heap_in_use: Option<u64>,
    /// Bytes the allocator holds free for reuse (`fordblks`), when known.
    pub heap_free: Option<u64>,
}

impl MemoryUse {
    pub fn now() -> Option<MemoryUse> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let rss_kib = vm_rss_kib(&status)?;
        let (heap_in_use, heap_free) = heap().unzip();
        Some(MemoryUse { rss_kib, heap_in_use, heap_free })
    }
}

/// The `VmRSS:` line of a `/proc/PID/status` text, in KiB.
pub fn vm_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn heap() -> Option<(u64, u64)> {
    // SAFETY: mallinfo2 only reads the allocator's counters (under its own locks).
    let m = unsafe { libc::mallinfo2() };
    Some(((m.uordblks + m.hblkhd) as u64, m.fordblks as u64))
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn heap() -> Option<(u64, u64)> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vm_rss_from_a_status_text() {
        let text = "Name:\tkflash\nVmHWM:\t    9000 kB\nVmRSS:\t    7956 kB\nRssAnon:\t    1592 kB\n";
        assert_eq!(vm_rss_kib(text), Some(7956));
        assert_eq!(vm_rss_kib("Name:\tkflash\n"), None);
    }

    #[test]
    fn live_heap_counts_a_live_allocation_and_not_a_freed_one() {
        let before = MemoryUse::now().unwrap();
        assert!(before.rss_kib > 0);
        let Some(base) = before.heap_in_use else { return };
        // Large beside what other tests allocate meanwhile (the counters are the process's).
        const MIB: u64 = 1024 * 1024;
        let block = vec![1u8; 16 * MIB as usize];
        let with = MemoryUse::now().unwrap().heap_in_use.unwrap();
        drop(std::hint::black_box(block));
        let after = MemoryUse::now().unwrap().heap_in_use.unwrap();
        assert!(with >= base + 15 * MIB, "{base} -> {with}");
        assert!(after + 15 * MIB <= with, "{with} -> {after}");
    }
}
