//! The simulated USB-to-CAN bridge's side of the guest: a UDC to present it on, the CAN
//! interfaces the real gs_usb driver made, the kernel's last words, kflash's JSON lines.

use std::io::{BufRead, BufReader};
use std::process::ChildStdout;
use std::sync::mpsc;

use super::{run, text};

/// A free UDC: one no configfs gadget is bound to (the unplugged board's).
pub fn free_udc() -> String {
    let used: Vec<String> = std::fs::read_dir("/sys/kernel/config/usb_gadget")
        .map(|rd| rd.flatten().filter_map(|g| std::fs::read_to_string(g.path().join("UDC")).ok()).collect())
        .unwrap_or_default();
    let mut udcs: Vec<String> = std::fs::read_dir("/sys/class/udc")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    udcs.sort_by_key(|u| u.rsplit('.').next().and_then(|n| n.parse::<u32>().ok()));
    udcs.into_iter()
        .rev()
        .find(|u| !used.iter().any(|x| x.trim() == u))
        .unwrap_or_else(|| panic!("no free UDC (bound: {used:?})"))
}

/// The kernel log's last `n` lines (what a failed bridge step shows).
pub fn dmesg_tail(n: usize) -> String {
    let all = text(&run("dmesg", &[]).stdout);
    let lines: Vec<&str> = all.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The CAN interfaces the gs_usb driver has created.
pub fn gs_usb_interfaces() -> Vec<String> {
    std::fs::read_dir("/sys/class/net")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path().join("device/driver"))
                .is_ok_and(|d| d.file_name().is_some_and(|n| n == "gs_usb"))
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// kflash's `--json` lines as they come, parsed (other lines passed over).
pub fn json_lines(out: ChildStdout) -> mpsc::Receiver<serde_json::Value> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&line) {
                let _ = tx.send(v);
            }
        }
    });
    rx
}
