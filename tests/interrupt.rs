//! Ctrl-C is answered at once, on a real terminal: at a question, and while another kflash
//! holds the build lock. The time from the keystroke to the exit is printed; the assertion
//! bound is loose (a loaded CI machine), the failure it catches is "waits for Enter" or
//! "waits for the other build".

mod host;
mod pty;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use pty::PtyChild;

/// A config dir with one board and the stand-in Klipper tree, configured for `nitehawk`.
fn setup(root: &Path) {
    let tree = host::stand_in_tree(root);
    let cfg = host::config_dir(root, &tree);
    host::menuconfig(&tree, &cfg, "nitehawk", "rp2040");
}

fn kflash(root: &Path, args: &[&str]) -> Command {
    let mut cmd = host::kflash(root, args);
    cmd.env("TERM", "dumb");
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
    setup(root.path());
    let dir = root.path().join("cfg");
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

/// A flash handed over to a daemon: Ctrl-C at the daemon's question sends a cancel (not an
/// answer), and a second Ctrl-C leaves at once when the daemon does not give its last word.
/// The daemon here is a stand-in on the socket: a hung daemon is a fault the real one cannot
/// be made to produce.
#[test]
fn ctrl_c_twice_leaves_a_handed_over_run_whose_daemon_does_not_answer() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;
    let root = tempfile::tempdir().unwrap();
    setup(root.path());
    let socket = root.path().join("kflash.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let daemon = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut w = stream.try_clone().unwrap();
        let mut lines = BufReader::new(stream).lines();
        let request = lines.next().unwrap().unwrap();
        w.write_all(b"{\"reply\":\"accepted\",\"run\":\"flash nitehawk\"}\n").unwrap();
        w.write_all(b"{\"reply\":\"question\",\"text\":\"Moonraker is unreachable. Flash anyway?\"}\n").unwrap();
        // What the client sends next; then hang, holding the connection open.
        let next = lines.next().unwrap().unwrap();
        let _ = lines.next();
        (request, next)
    });
    let mut cmd = kflash(root.path(), &["flash", "nitehawk"]);
    cmd.env("KFLASH_SOCKET", &socket);
    let mut flash = PtyChild::spawn(cmd);
    flash.expect("Flash anyway?", Duration::from_secs(20));
    flash.type_bytes(b"\x03");
    flash.expect("again to leave at once", Duration::from_secs(10));
    let (took, status) = flash.ctrl_c(Duration::from_secs(10));
    assert_interrupted("a handed-over run", took, status, &flash.output());
    let (request, next) = daemon.join().unwrap();
    assert!(request.contains("\"request\":\"flash\""), "{request}");
    assert_eq!(next, "{\"cancel\":true}", "the first Ctrl-C cancels the run instead of answering");
}
