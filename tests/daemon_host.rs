//! The daemon's loop and its status socket on the host, with scripted board events (udev
//! itself, identify on real ttys, signals and systemd are proven in the rig): the status,
//! a subscription's notices, a reload picking up a newly registered board, a broken
//! registry keeping the last good one, a clean stop that removes the socket, a udev failure
//! ending the daemon with an error, and a peer that is neither root nor the daemon's user
//! refused.

mod host;
mod support;

use std::path::Path;

use host::daemon::{next, request, start, status, Lines, EBB, OCTOPUS};
use host::tty;
use kflash::daemon::Control;
use tokio::io::AsyncWriteExt;

fn board<'a>(status: &'a serde_json::Value, key: &str) -> &'a serde_json::Value {
    status["boards"].as_array().unwrap().iter().find(|b| b["key"] == key).unwrap_or_else(|| panic!("{status}"))
}

#[tokio::test]
async fn status_subscription_reload_and_stop() {
    let d = start().await;
    let s = status(&d.socket).await;
    assert_eq!(s["daemon"], true);
    assert_eq!(s["host_version"], kflash_tree_version(&d.cfg));
    assert_eq!(s["klippy"], "unknown", "Moonraker is unreachable: {s}");
    let octopus = board(&s, "octopus");
    assert_eq!((&octopus["connected"], &octopus["mode"]), (&serde_json::json!(true), &serde_json::json!("klipper")));
    // Its tty does not exist on the host, so identify cannot read it: unknown, not guessed.
    assert_eq!(octopus["state"], "unknown", "{s}");
    assert_eq!(s["unregistered"][0]["serial"], EBB.1, "{s}");
    // Its own memory: what the kernel counts and glibc's live heap.
    assert!(s["memory"]["rss_kib"].as_u64().is_some_and(|k| k > 0), "{s}");
    assert!(s["memory"]["heap_in_use"].as_u64().is_some_and(|b| b > 0), "{s}");

    // A subscription: the status, then what changes.
    let (mut sub, _hold) = request(&d.socket, r#"{"request":"subscribe"}"#).await;
    assert_eq!(next(&mut sub).await["reply"], "status");
    d.script.remove(&tty("Klipper", "614e", OCTOPUS, 0).syspath);
    let n = next(&mut sub).await;
    assert_eq!((&n["notice"]["notice"], &n["notice"]["status"]["state"]), (&"board".into(), &"missing".into()), "{n}");
    d.script.add(tty("katapult", "6177", OCTOPUS, 2));
    let n = next(&mut sub).await;
    assert_eq!(n["notice"]["status"]["state"], "bootloader", "{n}");

    // ebb registered in the file, then SIGHUP's reload: the present board gets its key.
    let boards = std::fs::read_to_string(d.cfg.join("boards.toml")).unwrap()
        + &format!("[boards.ebb]\nname = \"EBB\"\nmcu = \"{}\"\nserial = \"{}\"\n", EBB.0, EBB.1);
    std::fs::write(d.cfg.join("boards.toml"), boards).unwrap();
    d.control.send(Control::Reload).await.unwrap();
    let n = next(&mut sub).await;
    assert_eq!((&n["notice"]["status"]["key"], &n["notice"]["status"]["state"]), (&"ebb".into(), &"unknown".into()));
    let s = status(&d.socket).await;
    assert!(s["unregistered"].as_array().unwrap().is_empty(), "{s}");

    // A broken edit: the last good registry stays, and the status says why.
    std::fs::write(d.cfg.join("boards.toml"), "[boards.ebb\n").unwrap();
    d.control.send(Control::Reload).await.unwrap();
    let s = status(&d.socket).await;
    assert!(s["registry_error"].as_str().is_some_and(|e| e.contains("boards.toml")), "{s}");
    assert_eq!(s["boards"].as_array().unwrap().len(), 2, "{s}");

    // A clean stop: the loop ends Ok, the subscription ends, and the socket is gone.
    d.control.send(Control::Stop("SIGTERM")).await.unwrap();
    d.task.await.unwrap().unwrap();
    assert!(sub.next_line().await.unwrap().is_none(), "the subscription ends with the daemon");
    assert!(!d.socket.exists());
    drop(d.root);
}

#[tokio::test]
async fn a_udev_failure_ends_the_daemon_with_an_error() {
    let d = start().await;
    d.script.fail("netlink socket closed");
    let e = d.task.await.unwrap().unwrap_err();
    assert_eq!(e.kind(), "udev", "{e}");
    assert!(e.to_string().contains("netlink socket closed"), "{e}");
    assert!(e.exit_code() != 0);
}

#[tokio::test]
async fn a_second_daemon_does_not_take_over_a_live_socket() {
    let d = start().await;
    let e = kflash::daemon::socket::bind(&d.socket).await.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
    assert_eq!(status(&d.socket).await["daemon"], true, "the first daemon still answers");
}

/// The socket is 0660; a peer of another user that gets past the file mode (here: made
/// 0666 on purpose) is still refused by its SO_PEERCRED uid.
#[tokio::test]
async fn other_users_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let d = start().await;
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    if !nix::unistd::geteuid().is_root() {
        eprintln!("not root: cannot act as another user; skipped");
        return;
    }
    std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    std::fs::set_permissions(d.socket.parent().unwrap(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(d.root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // It only listens: a refused peer is told so at once, before it sends anything.
    let client = "import socket,sys; s=socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(sys.argv[1]); \
                  print(s.makefile().readline(), end='')";
    let out = tokio::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", client])
        .arg(&d.socket)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["reply"], "error", "{reply}");
    assert!(reply["message"].as_str().unwrap().contains("refused"), "{reply}");
}

/// The stand-in tree's `git describe`, as the daemon reports it.
fn kflash_tree_version(cfg: &Path) -> String {
    let settings = std::fs::read_to_string(cfg.join("settings.toml")).unwrap();
    let tree = settings.lines().find_map(|l| l.strip_prefix("klipper_dir = \"")).unwrap().trim_end_matches('"');
    let out = std::process::Command::new("git")
        .args(["-C", tree, "describe", "--always", "--tags", "--long", "--dirty"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Reply lines until one whose `reply` is `want`; the ones before it are returned too.
async fn until(lines: &mut Lines, want: &str) -> (serde_json::Value, Vec<serde_json::Value>) {
    let mut before = Vec::new();
    loop {
        let reply = next(lines).await;
        if reply["reply"] == want {
            return (reply, before);
        }
        assert!(
            !matches!(reply["reply"].as_str(), Some("flashed" | "flash-all-done" | "failed" | "busy")),
            "the run ended before `{want}`: {reply}"
        );
        before.push(reply);
    }
}

/// A flash handed to the daemon: taken, its events streamed (to the client and to a
/// subscriber), its question asked over the socket; a second run meanwhile is refused as
/// busy; the answer "no" ends it refused, and then the daemon takes the next run. A cancel
/// from the client ends a run as interrupted.
#[tokio::test]
async fn flashes_are_carried_out_one_at_a_time() {
    let d = start().await;
    let (mut sub, _keep_sub) = request(&d.socket, r#"{"request":"subscribe"}"#).await;
    assert_eq!(next(&mut sub).await["reply"], "status");

    let (mut run, mut run_w) = request(&d.socket, r#"{"request":"flash","key":"octopus"}"#).await;
    let (accepted, _) = until(&mut run, "accepted").await;
    assert_eq!(accepted["run"], "a flash of octopus");
    // Moonraker is unreachable: the print gate asks whether to go on, through the client.
    let (question, events) = until(&mut run, "question").await;
    assert!(question["text"].as_str().unwrap().contains("print-safety check"), "{question}");
    assert!(events.iter().all(|e| e["reply"] == "event"), "{events:?}");
    assert!(events.iter().any(|e| e["event"]["event"] == "moonraker-down"), "{events:?}");
    assert!(events.iter().any(|e| e["event"]["event"] == "print-check-started"), "{events:?}");

    // Only one run at a time.
    let (mut second, _w2) = request(&d.socket, r#"{"request":"flash-all"}"#).await;
    let busy = next(&mut second).await;
    assert_eq!(busy["reply"], "busy", "{busy}");
    assert!(busy["message"].as_str().unwrap().contains("a flash of octopus"), "{busy}");

    // The subscriber saw the same run's events.
    let mut seen = Vec::new();
    while seen.len() < events.len() {
        let (e, _) = until(&mut sub, "event").await;
        seen.push(e["event"].clone());
    }
    assert_eq!(seen, events.iter().map(|e| e["event"].clone()).collect::<Vec<_>>());

    run_w.write_all(b"{\"answer\":false}\n").await.unwrap();
    let (failed, _) = until(&mut run, "failed").await;
    assert_eq!(failed["error"]["kind"], "moonraker-down", "{failed}");
    assert!(failed["error"]["exit_code"].as_i64().unwrap() != 0, "{failed}");

    // Free again: the next run is taken (and ends with its own error: octopus has no config).
    let (mut third, _w3) = request(&d.socket, r#"{"request":"flash-all"}"#).await;
    until(&mut third, "accepted").await;
    let (failed, _) = until(&mut third, "failed").await;
    assert_eq!(failed["error"]["kind"], "boards-unconfigured", "{failed}");

    // A cancel from the client: the run ends interrupted.
    let (mut fourth, mut w4) = request(&d.socket, r#"{"request":"flash","key":"octopus"}"#).await;
    until(&mut fourth, "question").await;
    w4.write_all(b"{\"cancel\":true}\n").await.unwrap();
    let (failed, _) = until(&mut fourth, "failed").await;
    assert_eq!(failed["error"]["kind"], "interrupted", "{failed}");

    // A run for another registry is refused with a kind the CLI knows.
    let other = serde_json::json!({"request": "flash", "key": "octopus", "config_dir": d.root.path().join("other")});
    let (mut fifth, _w5) = request(&d.socket, &other.to_string()).await;
    let (failed, _) = until(&mut fifth, "failed").await;
    assert_eq!(failed["error"]["kind"], kflash::daemon::runs::OTHER_REGISTRY, "{failed}");

    // A board registered a moment ago (no SIGHUP) is known to the run, as to the CLI.
    let boards = d.cfg.join("boards.toml");
    let before = std::fs::read_to_string(&boards).unwrap();
    std::fs::write(
        &boards,
        format!("{before}[boards.ebb]\nname = \"EBB\"\nmcu = \"{}\"\nserial = \"{}\"\n", EBB.0, EBB.1),
    )
    .unwrap();
    let (mut sixth, mut w6) = request(&d.socket, r#"{"request":"flash","key":"ebb"}"#).await;
    until(&mut sixth, "question").await;
    w6.write_all(b"{\"answer\":false}\n").await.unwrap();
    until(&mut sixth, "failed").await;
    // A broken registry refuses the run, as the CLI would.
    std::fs::write(&boards, "[boards.ebb\n").unwrap();
    let (mut seventh, _w7) = request(&d.socket, r#"{"request":"flash","key":"ebb"}"#).await;
    let (failed, _) = until(&mut seventh, "failed").await;
    assert_eq!(failed["error"]["kind"], "file-parse", "{failed}");

    d.control.send(Control::Stop("test")).await.unwrap();
    d.task.await.unwrap().unwrap();
}
