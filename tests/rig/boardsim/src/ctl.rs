//! Control protocol between `kflash-boardsim ctl` and `kflash-boardsim serve`: one JSON
//! request line, one JSON response line, over the unix socket `<state-dir>/boardsim.sock`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::Mode;

pub const SOCKET_NAME: &str = "boardsim.sock";
pub const EVENTS_NAME: &str = "events.jsonl";
pub const PID_NAME: &str = "boardsim.pid";
pub const DEFAULT_STATE_DIR: &str = "/run/kflash-rig";

/// Exit codes of `ctl`.
pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILED: i32 = 1;
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_UNREACHABLE: i32 = 3;
pub const EXIT_TIMEOUT: i32 = 4;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    WaitReady {
        timeout_ms: u64,
    },
    Status {
        board: Option<String>,
    },
    Plug {
        board: String,
        mode: Option<Mode>,
    },
    Unplug {
        board: String,
    },
    Reboot {
        board: String,
        mode: Option<Mode>,
    },
    /// `specs == ["clear"]` clears all faults.
    Fault {
        board: String,
        specs: Vec<String>,
    },
    Reset {
        wait: bool,
        timeout_ms: u64,
    },
    SetVersion {
        board: String,
        version: String,
    },
    Mark {
        text: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Set when a wait ran into its deadline.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub timeout: bool,
    #[serde(default)]
    pub result: Value,
}

impl Response {
    pub fn ok(result: Value) -> Response {
        Response { ok: true, error: None, timeout: false, result }
    }
    pub fn err(msg: impl Into<String>) -> Response {
        Response { ok: false, error: Some(msg.into()), timeout: false, result: Value::Null }
    }
    pub fn timeout(msg: impl Into<String>) -> Response {
        Response { ok: false, error: Some(msg.into()), timeout: true, result: Value::Null }
    }
}

/// Why a request could not be answered.
#[derive(Debug)]
pub enum ClientError {
    /// The serve process is not reachable (exit 3).
    Unreachable(String),
    /// A deadline passed while waiting for the socket (exit 4).
    Timeout(String),
}

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_NAME)
}

/// Send one request. With `connect_deadline`, keep retrying to connect until then (the
/// serve process may still be starting); otherwise fail at once.
pub fn call(
    state_dir: &Path,
    req: &Request,
    connect_deadline: Option<Instant>,
    read_timeout: Duration,
) -> Result<Response, ClientError> {
    let sock = socket_path(state_dir);
    let mut stream = loop {
        match UnixStream::connect(&sock) {
            Ok(s) => break s,
            Err(e) => match connect_deadline {
                Some(d) if Instant::now() < d => std::thread::sleep(Duration::from_millis(50)),
                Some(_) => {
                    return Err(ClientError::Timeout(format!(
                        "the board simulator did not open {} in time ({e}); is `kflash-boardsim serve` running? \
                         see boardsim.log in the state dir",
                        sock.display()
                    )))
                }
                None => {
                    return Err(ClientError::Unreachable(format!(
                        "cannot connect to the board simulator at {}: {e} (is `kflash-boardsim serve` running? \
                         KFLASH_RIG_STATE / --state-dir select the state dir)",
                        sock.display()
                    )))
                }
            },
        }
    };
    let io_err = |e: std::io::Error| ClientError::Unreachable(format!("talking to the board simulator: {e}"));
    stream.set_read_timeout(Some(read_timeout)).map_err(io_err)?;
    let mut line = serde_json::to_string(req).expect("requests serialize");
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io_err)?;
    let mut reader = BufReader::new(stream);
    let mut resp = String::new();
    reader.read_line(&mut resp).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => ClientError::Timeout(format!(
            "the board simulator accepted the request but did not answer within {:.0} s (is it hung? see boardsim.log)",
            read_timeout.as_secs_f64()
        )),
        _ => io_err(e),
    })?;
    if resp.trim().is_empty() {
        return Err(ClientError::Unreachable("the board simulator closed the connection without answering".into()));
    }
    serde_json::from_str(&resp)
        .map_err(|e| ClientError::Unreachable(format!("bad answer from the board simulator: {e}: {resp}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format() {
        let r = Request::Plug { board: "a".into(), mode: Some(Mode::Katapult) };
        assert_eq!(serde_json::to_string(&r).unwrap(), r#"{"cmd":"plug","board":"a","mode":"katapult"}"#);
        let r: Request = serde_json::from_str(r#"{"cmd":"wait-ready","timeout_ms":5}"#).unwrap();
        assert_eq!(r, Request::WaitReady { timeout_ms: 5 });
        let ok = serde_json::to_string(&Response::ok(Value::Null)).unwrap();
        assert_eq!(ok, r#"{"ok":true,"result":null}"#);
    }
}
