//! The link against a scripted peer on a Unix socket, for what the real Moonraker never
//! sends: malformed frames and messages, answers to nothing. (Everything Moonraker does
//! send is tested against the real one in tests/moonraker_agent.rs.)

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use super::*;

const WAIT: Duration = Duration::from_secs(10);

struct Peer {
    stream: UnixStream,
    decoder: FrameDecoder,
    queue: std::collections::VecDeque<Value>,
}

impl Peer {
    async fn accept(listener: &UnixListener) -> Peer {
        let (stream, _) = tokio::time::timeout(WAIT, listener.accept()).await.expect("the link connects").unwrap();
        Peer { stream, decoder: FrameDecoder::new(), queue: Default::default() }
    }

    async fn recv(&mut self) -> Value {
        tokio::time::timeout(WAIT, async {
            loop {
                if let Some(v) = self.queue.pop_front() {
                    return v;
                }
                let mut buf = [0u8; 4096];
                let n = self.stream.read(&mut buf).await.unwrap();
                assert!(n > 0, "the link closed the connection");
                self.queue.extend(self.decoder.push(&buf[..n]).into_iter().map(Result::unwrap));
            }
        })
        .await
        .expect("a message from the link")
    }

    async fn raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    async fn send(&mut self, v: Value) {
        self.raw(&encode(&v)).await;
    }

    /// Answer the link's next request, which must be `method`.
    async fn answer(&mut self, method: &str, result: Value) -> Value {
        let req = self.recv().await;
        assert_eq!(req["method"], method, "{req}");
        self.send(json!({"jsonrpc": "2.0", "id": req["id"], "result": result})).await;
        req
    }
}

async fn event(inbox: &mut LinkInbox) -> LinkEvent {
    tokio::time::timeout(WAIT, inbox.events.recv()).await.expect("a link event").unwrap()
}

#[tokio::test]
async fn malformed_input_is_skipped_and_the_link_carries_on() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("moonraker.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let (handle, mut inbox, task) = spawn(LinkConfig::new(socket.clone(), &["kflash_status"]));
    let mut peer = Peer::accept(&listener).await;

    let identify = peer.recv().await;
    assert_eq!(identify["method"], "server.connection.identify");
    assert_eq!(identify["params"]["type"], "agent");
    assert_eq!(identify["params"]["client_name"], "kflash");
    // Garbage of every kind, some of it split across writes, before the real answer.
    peer.raw(b"\xff\xfe\x03not json\x03[1,2]\x03{\"method\": 5}\x03{}\x03").await;
    peer.raw(b"{\"jsonrpc\": \"2.0\", \"id\": 999, \"result\": 1}\x03{\"jsonrpc\": \"2.0\", \"id\": \"x\"}\x03{\"a\":")
        .await;
    peer.raw(b"1}\x03").await;
    peer.send(json!({"jsonrpc": "2.0", "id": identify["id"], "result": {"connection_id": 7}})).await;
    let reg = peer.answer("connection.register_remote_method", json!("ok")).await;
    assert_eq!(reg["params"], json!({"method_name": "kflash_status"}));
    peer.answer("server.info", json!({"klippy_state": "ready"})).await;
    assert_eq!(event(&mut inbox).await, LinkEvent::Klippy(KlippyState::Ready));
    assert_eq!(event(&mut inbox).await, LinkEvent::Connected { connection_id: Some(7) });

    // A push with odd params still counts; an unknown notification is ignored.
    peer.send(json!({"jsonrpc": "2.0", "method": "notify_proc_stat_update", "params": "junk"})).await;
    peer.send(json!({"jsonrpc": "2.0", "method": "notify_klippy_shutdown", "params": 42})).await;
    assert_eq!(event(&mut inbox).await, LinkEvent::Klippy(KlippyState::Shutdown));

    // A call with a string id is answered with that id.
    peer.send(json!({"jsonrpc": "2.0", "method": "kflash.status", "id": "abc"})).await;
    let call = tokio::time::timeout(WAIT, inbox.calls.recv()).await.unwrap().unwrap();
    assert_eq!((call.method.as_str(), &call.params), ("kflash.status", &Value::Null));
    call.answer(Ok(json!({"boards": []})));
    assert_eq!(peer.recv().await, json!({"jsonrpc": "2.0", "id": "abc", "result": {"boards": []}}));

    // An error answer to the owner's request.
    let owner = tokio::spawn({
        let handle = handle.clone();
        async move { handle.gcode_script("M115").await }
    });
    let req = peer.recv().await;
    assert_eq!(req["params"], json!({"script": "M115"}));
    peer.send(json!({"jsonrpc": "2.0", "id": req["id"], "error": {"code": 400, "message": "Klippy not ready"}})).await;
    assert_eq!(
        owner.await.unwrap(),
        Err(LinkError::Refused {
            method: "printer.gcode.script".into(),
            code: 400,
            message: "Klippy not ready".into()
        })
    );

    // A request in flight when the peer goes: the caller hears the connection was lost.
    // (The listener goes first, so the link's reconnect attempt is refused, not queued.)
    drop(listener);
    let owner = tokio::spawn({
        let handle = handle.clone();
        async move { handle.call("server.info", json!({})).await }
    });
    peer.recv().await;
    drop(peer);
    assert_eq!(owner.await.unwrap(), Err(LinkError::Lost));
    assert!(matches!(event(&mut inbox).await, LinkEvent::Disconnected { .. }));
    assert_eq!(*handle.klippy().borrow(), KlippyState::Unknown);

    // The socket file stays but refuses (its listener closed); a new one is bound in its
    // place, as Moonraker does on start: the link connects on that creation.
    assert_eq!(handle.call("server.info", json!({})).await, Err(LinkError::NotConnected));
    std::fs::remove_file(&socket).unwrap();
    let listener = UnixListener::bind(&socket).unwrap();
    let mut peer = Peer::accept(&listener).await;
    assert_eq!(peer.recv().await["method"], "server.connection.identify");
    task.shutdown().await;
}

/// CPU time of this process's threads, in clock ticks.
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
    let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn dropped_handles_leave_the_link_idle() {
    // The link on this thread only (current-thread runtime), with every handle dropped,
    // while the socket is absent and while connected: it must sleep, not spin.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("moonraker.sock");
        let (handle, mut inbox, task) = spawn(LinkConfig::new(socket.clone(), &[]));
        drop(handle);
        let before = cpu_ticks();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let listener = UnixListener::bind(&socket).unwrap();
        let mut peer = Peer::accept(&listener).await;
        let id = peer.recv().await["id"].clone();
        peer.send(json!({"jsonrpc": "2.0", "id": id, "result": {}})).await;
        peer.answer("server.info", json!({"klippy_state": "ready"})).await;
        assert_eq!(event(&mut inbox).await, LinkEvent::Klippy(KlippyState::Ready));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let used = cpu_ticks() - before;
        assert!(used <= 10, "the link used {used} ticks of CPU in 1 s with no handles: it spins");
        task.shutdown().await;
    });
}

#[tokio::test]
async fn shutdown_ends_every_wait() {
    // Waiting for a socket that never appears.
    let dir = tempfile::tempdir().unwrap();
    let (_handle, _inbox, task) = spawn(LinkConfig::new(dir.path().join("nope/moonraker.sock"), &[]));
    tokio::time::timeout(WAIT, task.shutdown()).await.expect("shutdown while waiting for the socket");

    // Connected, waiting for an identify answer that never comes.
    let socket = dir.path().join("moonraker.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let (_handle, _inbox, task) = spawn(LinkConfig::new(socket, &[]));
    let mut peer = Peer::accept(&listener).await;
    peer.recv().await;
    tokio::time::timeout(WAIT, task.shutdown()).await.expect("shutdown while connected");
    let mut buf = [0u8; 16];
    assert_eq!(peer.stream.read(&mut buf).await.unwrap(), 0, "the link closed its connection");
}
