//! Ctrl-C is answered at once, on a real terminal: at a question, and while another kflash
//! holds the build lock. The time from the keystroke to the exit is printed; the assertion
//! bound is loose (a loaded CI machine), the failure it catches is "waits for Enter" or
//! "waits for the other build".

mod pty;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use pty::PtyChild;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A config dir with two boards and the stand-in Klipper tree, configured for `nitehawk`.
fn setup(root: &Path) -> PathBuf {
    let tree = root.join("klipper");
    let st = Command::new(repo().join("tests/rig/standins/make-klipper-tree")).arg(&tree).output().unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let dir = root.join("cfg");
    std::fs::create_dir_all(dir.join("configs")).unwrap();
    std::fs::write(
        dir.join("boards.toml"),
        "[boards.nitehawk]\nname = \"Nitehawk\"\nmcu = \"rp2040\"\nserial = \"E661640843545B2E\"\n",
    )
    .unwrap();
    std::fs::write(dir.join("settings.toml"), format!("klipper_dir = \"{}\"\nbuild_jobs = 1\n", tree.display()))
        .unwrap();
    let st = Command::new("make")
        .arg("-C")
        .arg(&tree)
        .arg(format!("KCONFIG_CONFIG={}", dir.join("configs/nitehawk.config").display()))
        .arg("menuconfig")
        .env("RIG_MENUCONFIG_MCU", "rp2040")
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    dir
}

fn kflash(root: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kflash"));
    cmd.arg("--config-dir")
        .arg(root.join("cfg"))
        .args(args)
        .env_remove("RUST_LOG")
        .env("XDG_STATE_HOME", root.join("state"))
        .env("XDG_CACHE_HOME", root.join("cache"))
        .env("TERM", "dumb");
    cmd
}

fn assert_interrupted(what: &str, took: Duration, status: std::process::ExitStatus, out: &str) {
    println!("{what}: Ctrl-C answered in {:.1} ms", took.as_secs_f64() * 1000.0);
    assert_eq!(status.code(), Some(130), "{what}: exit status {status:?}; output:\n{out}");
    assert!(out.contains("interrupted by SIGINT"), "{what}: no message; output:\n{out}");
    assert!(took < Duration::from_secs(3), "{what}: took {took:?} to answer Ctrl-C");
}

#[test]
fn ctrl_c_at_a_question_exits_130_at_once() {
    let root = tempfile::tempdir().unwrap();
    let dir = setup(root.path());
    let before = std::fs::read(dir.join("boards.toml")).unwrap();
    let mut remove = PtyChild::spawn(kflash(root.path(), &["remove", "nitehawk"]));
    remove.expect("Remove 'Nitehawk' (nitehawk)?", Duration::from_secs(20));
    let (took, status) = remove.ctrl_c(Duration::from_secs(10));
    assert_interrupted("remove", took, status, &remove.output());
    assert_eq!(std::fs::read(dir.join("boards.toml")).unwrap(), before, "nothing removed");
}

#[test]
fn ctrl_c_while_another_kflash_builds_exits_130_at_once() {
    let root = tempfile::tempdir().unwrap();
    setup(root.path());
    // The first build holds the tree's build lock for a minute (the stand-in's link step).
    let mut first = kflash(root.path(), &["build", "nitehawk"]);
    first.env("RIG_BUILD_DELAY", "60");
    let mut first = PtyChild::spawn(first);
    first.expect("building", Duration::from_secs(60));

    let mut second = PtyChild::spawn(kflash(root.path(), &["build", "nitehawk"]));
    second.expect("another kflash is building in", Duration::from_secs(20));
    let (took, status) = second.ctrl_c(Duration::from_secs(10));
    assert_interrupted("build waiting for the lock", took, status, &second.output());

    // The first one is interrupted mid-make just as promptly (make is killed with it).
    let (took, status) = first.ctrl_c(Duration::from_secs(10));
    assert_interrupted("build running make", took, status, &first.output());
}
