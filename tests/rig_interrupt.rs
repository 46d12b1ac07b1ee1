//! Ctrl-C typed at `kflash flash`'s question on a real terminal is answered at once: with
//! Moonraker down, flash asks whether to go on without the print-safety check; Ctrl-C there
//! exits 130 with a message, and Klipper was never stopped. (Before, the question read
//! stdin on the runtime's thread and Ctrl-C waited for Enter.)

mod pty;
mod rig_support;

use std::process::Command;
use std::time::Duration;

use pty::PtyChild;
use rig_support::*;

#[test]
#[ignore = "runs inside the USB rig"]
fn ctrl_c_at_the_flash_question_exits_130_at_once() {
    in_rig();
    reset_boards();
    let rig = FlashRig::new(EBB, EBB.1, &[]);
    // Build first, so the question is the only thing the flash waits on.
    ok(&rig.kflash(&["build", EBB.0]));
    let stop = Command::new("systemctl").args(["stop", "moonraker"]).output().unwrap();
    assert!(stop.status.success());
    let log = ServiceLog::start();

    let mut flash = rig.command(&["flash", EBB.0, "--force"]);
    flash.env("TERM", "dumb");
    let mut flash = PtyChild::spawn(flash);
    flash.expect("[y/N]", Duration::from_secs(60));
    let (took, status) = flash.ctrl_c(Duration::from_secs(10));
    let out = flash.output();
    println!("Ctrl-C at the question answered in {:.1} ms", took.as_secs_f64() * 1000.0);

    let start = Command::new("systemctl").args(["start", "moonraker"]).output().unwrap();
    assert!(start.status.success());
    assert_eq!(status.code(), Some(130), "{out}");
    assert!(out.contains("interrupted by SIGINT"), "{out}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert!(log.verbs("klipper").is_empty(), "Klipper untouched: {:?}", log.entries());
    assert!(klipper_is_active());
}
