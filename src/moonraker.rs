//! A small Moonraker HTTP client: is the printer busy, which MCUs does Klippy know (with
//! their firmware versions and configured serial ports), and is Klippy ready again after
//! a flash.
//!
//! Every answer is `{"result": …}`; every error is the HTTP status plus
//! `{"error": {"code", "message"}}`. Each failure becomes a [`MoonrakerError`] saying what
//! happened, with [`MoonrakerError::help`] saying what to do.
//!
//! Only Moonraker's own answer counts as Moonraker's word: an error status whose body is
//! not Moonraker's error envelope (a bare 404 from another web server, a proxy's HTML page)
//! is [`MoonrakerError::NotMoonraker`], never "Klippy is not connected". `https://` URLs
//! work through rustls with the system's CA store (or `SSL_CERT_FILE`).

use std::future::Future;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;
use tokio::time::Instant;

use crate::identity::ByIdName;
use crate::registry::Settings;

#[derive(Debug, thiserror::Error)]
pub enum MoonrakerError {
    /// `refused`: nothing listens there (connection refused), so Moonraker is not running.
    #[error("Moonraker is not reachable at {url}: {detail}")]
    Unreachable { url: String, detail: String, refused: bool },

    /// An error status without Moonraker's JSON error body: something else answers there.
    #[error("{url} answered {path} with HTTP {status} and {body}, not Moonraker's JSON")]
    NotMoonraker { url: String, path: String, status: u16, body: String },

    #[error("Moonraker at {url} did not answer {path} within {secs:.1} s")]
    Timeout { url: String, path: String, secs: f64 },

    #[error("Moonraker refused the request{} ({status} {message})", if *.key_sent { " with the configured API key" } else { "" })]
    Unauthorized { status: u16, message: String, key_sent: bool },

    #[error("Klippy is not connected to Moonraker: {message}")]
    KlippyNotConnected { message: String },

    #[error("Moonraker answered {path} with HTTP {status}: {message}")]
    Http { path: String, status: u16, message: String },

    #[error("Moonraker answered with invalid JSON from {path}: {detail}")]
    InvalidJson { path: String, detail: String },

    #[error("Moonraker's answer from {path} is missing {what}")]
    MissingField { path: String, what: String },

    #[error("Klippy is in state {state}{}{}", first_line_suffix(.message), diagnosis_suffix(.diagnosis))]
    KlippyNotReady {
        state: String,
        message: String,
        waited_secs: f64,
        /// Which MCU Klippy is stuck on and why, when kflash could tell ([`Moonraker::mcu_diagnosis`]).
        diagnosis: Option<String>,
    },

    /// Moonraker answers for itself (`/server/info`) but a request it forwards to Klippy
    /// hangs: its connection to Klippy went stale, or Klippy hangs. Seen with the real
    /// Moonraker after Klippy restarted on an exception: `/server/info` said `error` while
    /// Klippy was ready, and every `/printer/*` request hung for over 100 s. So the state it
    /// reports may be old news, and says nothing about a print.
    #[error(
        "Moonraker says Klippy is {state}, but {path} (answered by Klippy through Moonraker) did not answer \
         within {secs:.1} s: Moonraker's connection to Klippy is stale, or Klippy hangs"
    )]
    KlippyUnresponsive { state: String, path: String, secs: f64 },
}

/// Klippy stopped in `error` or `shutdown`: it stays there until a (firmware) restart.
fn is_halted(e: &MoonrakerError) -> bool {
    matches!(e, MoonrakerError::KlippyNotReady { state, .. } if state == "error" || state == "shutdown")
}

/// The first non-empty line of one of Klippy's multi-line state messages.
pub fn first_line(message: &str) -> Option<&str> {
    message.lines().map(str::trim).find(|l| !l.is_empty())
}

fn diagnosis_suffix(diagnosis: &Option<String>) -> String {
    diagnosis.as_deref().map(|d| format!("; {d}")).unwrap_or_default()
}

fn first_line_suffix(message: &str) -> String {
    match first_line(message) {
        Some(line) => format!(": {line}"),
        None => String::new(),
    }
}

impl MoonrakerError {
    /// What the user should do about it.
    pub fn help(&self) -> Option<String> {
        Some(match self {
            MoonrakerError::NotMoonraker { .. } => {
                "moonraker_url does not point at Moonraker (or a proxy in front of it \
                 has no Moonraker behind it): check moonraker_url (`kflash settings set moonraker_url \
                 http://localhost:7125`) and try `curl <moonraker_url>/server/info`"
                    .into()
            }
            MoonrakerError::Unreachable { .. } => "check that Moonraker runs (`systemctl status moonraker`) and that \
                 moonraker_url is right (`kflash settings set moonraker_url http://localhost:7125`)"
                .into(),
            MoonrakerError::Timeout { .. } => "Moonraker is slow or hung: check `systemctl status moonraker` and \
                 moonraker.log; raise `timeouts.moonraker_secs` if it is just slow"
                .into(),
            MoonrakerError::Unauthorized { key_sent: false, .. } => {
                "set moonraker_api_key with `kflash settings set moonraker_api_key KEY` (Mainsail/Fluidd show the \
                 key; or `~/moonraker/scripts/fetch-apikey.sh`), or add this host to `trusted_clients` in \
                 moonraker.conf's [authorization] section"
                    .into()
            }
            MoonrakerError::Unauthorized { key_sent: true, .. } => {
                "moonraker_api_key is wrong: set the current key with `kflash settings set moonraker_api_key KEY`"
                    .into()
            }
            MoonrakerError::KlippyNotConnected { .. } => {
                "check that Klipper runs (`systemctl status klipper`) and read klippy.log".into()
            }
            MoonrakerError::Http { .. } => "read moonraker.log for the cause".into(),
            MoonrakerError::InvalidJson { .. } | MoonrakerError::MissingField { .. } => {
                "moonraker_url may point at something that is not Moonraker: try `curl <moonraker_url>/server/info`"
                    .into()
            }
            MoonrakerError::KlippyUnresponsive { .. } => "restart Moonraker (`sudo systemctl restart moonraker`) and \
                 check that `curl <moonraker_url>/printer/info` answers; if it still hangs, Klippy itself hangs: \
                 read klippy.log, make sure nothing is printing, and restart Klipper"
                .into(),
            MoonrakerError::KlippyNotReady { diagnosis: Some(_), .. } => "check that board's USB cable and power \
                 (`kflash devices` lists what is connected), power-cycle it if it hangs; Klippy keeps trying for 90 s \
                 after it starts, after that run FIRMWARE_RESTART (from Mainsail/Fluidd or the console); klippy.log \
                 has the details"
                .into(),
            MoonrakerError::KlippyNotReady { state, waited_secs, .. } => match state.as_str() {
                "startup" => format!(
                    "Klippy was still starting after {waited_secs:.0} s: read klippy.log, or raise \
                     `timeouts.klippy_ready_secs`"
                ),
                "disconnected" => "Klipper is not running or not talking to Moonraker: check \
                     `systemctl status klipper` and klippy.log"
                    .into(),
                _ => "read klippy.log; once the cause is fixed run FIRMWARE_RESTART (from Mainsail/Fluidd or the \
                     console)"
                    .into(),
            },
        })
    }

    /// Nothing listens at the URL (connection refused): Moonraker is not running. The one
    /// failure that says something about the printer (no Moonraker, no print through it);
    /// a refusal, a hang or a stranger's answer says nothing.
    pub fn nothing_listens(&self) -> bool {
        matches!(self, MoonrakerError::Unreachable { refused: true, .. })
    }

    /// A request Moonraker forwards to Klippy (`/printer/…`) timed out although Moonraker
    /// itself just answered `/server/info` with `klippy_state`: the stale connection.
    pub fn behind_moonraker(self, klippy_state: &str) -> MoonrakerError {
        match self {
            MoonrakerError::Timeout { path, secs, .. } if path.starts_with("/printer/") => {
                MoonrakerError::KlippyUnresponsive { state: klippy_state.to_string(), path, secs }
            }
            other => other,
        }
    }

    /// Worth retrying while waiting for Klippy: Moonraker or Klippy may just be restarting.
    fn is_transient(&self) -> bool {
        match self {
            MoonrakerError::Unreachable { .. }
            | MoonrakerError::Timeout { .. }
            | MoonrakerError::KlippyUnresponsive { .. }
            | MoonrakerError::KlippyNotConnected { .. }
            | MoonrakerError::KlippyNotReady { .. } => true,
            MoonrakerError::Http { status, .. } => *status >= 500,
            _ => false,
        }
    }
}

/// `print_stats` + `virtual_sdcard`.
#[derive(Debug, Clone, PartialEq)]
pub struct PrintStatus {
    /// `standby | printing | paused | complete | cancelled | error`.
    pub state: String,
    pub filename: Option<String>,
    /// 0.0 … 1.0.
    pub progress: f64,
}

impl PrintStatus {
    /// Moonraker's own rule (file_manager.py): printing or paused is busy.
    pub fn is_busy(&self) -> bool {
        matches!(self.state.as_str(), "printing" | "paused")
    }

    /// "printing benchy.gcode (42%)", "paused (7%)", "standby".
    pub fn describe(&self) -> String {
        if !self.is_busy() {
            return self.state.clone();
        }
        let percent = (self.progress * 100.0).floor() as i64;
        match &self.filename {
            Some(f) => format!("{} {f} ({percent}%)", self.state),
            None => format!("{} ({percent}%)", self.state),
        }
    }
}

/// `/printer/info`: Klippy's host side.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PrinterInfo {
    pub state: String,
    #[serde(default)]
    pub state_message: String,
    #[serde(default)]
    pub software_version: Option<String>,
    /// `Kalico` on Kalico; Klipper does not send it.
    #[serde(default)]
    pub app: Option<String>,
    #[serde(default)]
    pub hostname: Option<String>,
}

/// `/server/info`: Moonraker's view of Klippy.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ServerInfo {
    pub klippy_connected: bool,
    /// `disconnected | startup | ready | error | shutdown`.
    pub klippy_state: String,
    #[serde(default)]
    pub moonraker_version: Option<String>,
}

/// One MCU Klippy knows, e.g. object `mcu toolhead`, name `toolhead`.
#[derive(Debug, Clone, PartialEq)]
pub struct McuStatus {
    /// The printer object: `mcu` or `mcu <name>`.
    pub object: String,
    /// `mcu` for `[mcu]`, `<name>` for `[mcu <name>]` (as in Klippy's messages).
    pub name: String,
    /// `None` when the MCU never identified (Klippy in `startup` or `error`).
    pub mcu_version: Option<String>,
    /// `mcu_constants.MCU`, e.g. `stm32h723xx`.
    pub mcu: Option<String>,
    /// Kalico reports the firmware's app per MCU.
    pub app: Option<String>,
    /// The section's `serial:` from printer.cfg.
    pub serial: Option<String>,
    /// The section's `canbus_uuid:`, for CAN nodes.
    pub canbus_uuid: Option<String>,
}

/// A Moonraker HTTP client. Requests carry `X-Api-Key` when a key is set.
#[derive(Debug, Clone)]
pub struct Moonraker {
    url: String,
    api_key: Option<String>,
    timeout: Duration,
    client: reqwest::Client,
}

impl Moonraker {
    /// `url` like `http://localhost:7125`; `timeout` bounds every request.
    pub fn new(url: &str, api_key: Option<String>, timeout: Duration) -> Moonraker {
        let client = reqwest::Client::builder()
            .connect_timeout(timeout)
            // Moonraker is on this host or its LAN; an HTTP_PROXY meant for the internet
            // must not capture it.
            .no_proxy()
            .build()
            .unwrap_or_default();
        Moonraker { url: url.trim_end_matches('/').to_string(), api_key, timeout, client }
    }

    pub fn from_settings(settings: &Settings) -> Moonraker {
        Moonraker::new(
            &settings.moonraker_url,
            settings.moonraker_api_key.clone(),
            Duration::from_secs(settings.timeouts.moonraker_secs),
        )
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub async fn print_status(&self) -> Result<PrintStatus, MoonrakerError> {
        let path = "/printer/objects/query?print_stats&virtual_sdcard";
        let result = self.get(path).await?;
        let status = field(&result, "status", path)?;
        // No [virtual_sdcard] means no print_stats: Moonraker cannot be printing a file.
        let stats = status.get("print_stats");
        let text = |key: &str| stats.and_then(|s| s.get(key)).and_then(Value::as_str);
        Ok(PrintStatus {
            state: text("state").unwrap_or("standby").to_string(),
            filename: text("filename").filter(|f| !f.is_empty()).map(String::from),
            progress: status.pointer("/virtual_sdcard/progress").and_then(Value::as_f64).unwrap_or(0.0),
        })
    }

    pub async fn printer_info(&self) -> Result<PrinterInfo, MoonrakerError> {
        self.get_as("/printer/info").await
    }

    pub async fn server_info(&self) -> Result<ServerInfo, MoonrakerError> {
        self.get_as("/server/info").await
    }

    /// Every `[mcu]` / `[mcu <name>]` with version, chip and configured serial, from
    /// `/printer/objects/list` and one `/printer/objects/query`.
    pub async fn mcus(&self) -> Result<Vec<McuStatus>, MoonrakerError> {
        let list_path = "/printer/objects/list";
        let list = self.get(list_path).await?;
        let objects =
            field(&list, "objects", list_path)?.as_array().ok_or_else(|| missing(list_path, "objects (a list)"))?;
        let names: Vec<&str> =
            objects.iter().filter_map(Value::as_str).filter(|o| *o == "mcu" || o.starts_with("mcu ")).collect();
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let mut query: Vec<String> = names.iter().map(|n| encode_component(n)).collect();
        query.push("configfile=config,settings".into());
        let path = format!("/printer/objects/query?{}", query.join("&"));
        let result = self.get(&path).await?;
        let status = field(&result, "status", &path)?;
        Ok(names.iter().map(|n| mcu_status(n, status)).collect())
    }

    /// One option of a printer.cfg section as Klippy read it (`settings` carries defaults, e.g.
    /// `canbus_interface: can0`); `None` when the section or option is not there.
    pub async fn config_option(&self, section: &str, key: &str) -> Result<Option<String>, MoonrakerError> {
        let path = "/printer/objects/query?configfile=config,settings";
        let result = self.get(path).await?;
        let status = field(&result, "status", path)?;
        Ok(config_option(status, section, key).map(|v| v.as_str().map(String::from).unwrap_or_else(|| v.to_string())))
    }

    /// Wait until Klippy is `ready`, or return its last state at `deadline`
    /// ("Klippy is in state error: mcu 'mcu': Unable to connect").
    ///
    /// This one polls: over HTTP Moonraker has no push for Klippy's state (only the
    /// websocket / Unix socket send `notify_klippy_ready`), and Moonraker's own docs
    /// recommend polling `server.info` at startup. The interval starts at 250 ms and
    /// grows to 1 s; no request runs past the deadline.
    pub async fn wait_klippy_ready(&self, deadline: Instant) -> Result<ServerInfo, MoonrakerError> {
        self.wait_klippy(deadline, false).await
    }

    /// Wait until Klippy has settled after a start: `ready`, or stuck in `error` /
    /// `shutdown` (returned as [`MoonrakerError::KlippyNotReady`] at once, not at the
    /// deadline, so the caller can act on the message).
    pub async fn wait_klippy_settled(&self, deadline: Instant) -> Result<ServerInfo, MoonrakerError> {
        self.wait_klippy(deadline, true).await
    }

    /// Poll until Klippy is ready; with `settle`, also end as soon as it is halted. When it
    /// is stuck connecting to an MCU, the error says which one and why if kflash can tell.
    async fn wait_klippy(&self, deadline: Instant, settle: bool) -> Result<ServerInfo, MoonrakerError> {
        let started = Instant::now();
        let settled = poll_until(deadline, || async {
            match self.ready_probe().await? {
                Probe::NotYet(e) if settle && is_halted(&e) => Ok(Probe::Done(Err(e))),
                Probe::NotYet(e) => Ok(Probe::NotYet(e)),
                Probe::Done(info) => Ok(Probe::Done(Ok(info))),
            }
        })
        .await;
        match settled.and_then(|r| r) {
            Err(MoonrakerError::KlippyNotReady { state, message, .. }) => {
                let waited_secs = started.elapsed().as_secs_f64();
                let diagnosis = match stuck_connecting(&state, &message) {
                    true => self.mcu_diagnosis().await,
                    false => None,
                };
                Err(MoonrakerError::KlippyNotReady { state, message, waited_secs, diagnosis })
            }
            other => other,
        }
    }

    /// Which MCU Klippy has not connected to, and whether its serial port exists on this
    /// host (kflash runs on the Klipper host). Klippy connects to the MCUs one after the
    /// other and an MCU reports `mcu_version` once it identified, so the first without one
    /// is the one Klippy is stuck on. `None` when Moonraker cannot tell (within 3 s).
    pub async fn mcu_diagnosis(&self) -> Option<String> {
        let mcus = tokio::time::timeout(DIAGNOSIS_TIME, self.mcus()).await.ok()?.ok()?;
        unconnected_mcu(&mcus, |path| std::path::Path::new(path).exists())
    }

    /// `FIRMWARE_RESTART`: Klippy resets every MCU and reconnects (the way out of a shutdown).
    pub async fn firmware_restart(&self) -> Result<(), MoonrakerError> {
        self.request(reqwest::Method::POST, "/printer/firmware_restart").await.map(|_| ())
    }

    /// One look at Klippy: ready, or why not (with `/printer/info`'s message when Klippy
    /// is connected, since `/server/info` has only the state).
    async fn ready_probe(&self) -> Result<Probe<ServerInfo>, MoonrakerError> {
        let info = self.server_info().await?;
        if info.klippy_state == "ready" {
            return Ok(Probe::Done(info));
        }
        let message = match info.klippy_connected {
            true => match self.printer_info().await {
                Ok(p) => p.state_message,
                Err(e @ MoonrakerError::Timeout { .. }) => return Err(e.behind_moonraker(&info.klippy_state)),
                Err(_) => String::new(),
            },
            false => String::new(),
        };
        Ok(Probe::NotYet(MoonrakerError::KlippyNotReady {
            state: info.klippy_state,
            message,
            waited_secs: 0.0,
            diagnosis: None,
        }))
    }

    async fn get_as<T: DeserializeOwned>(&self, path: &str) -> Result<T, MoonrakerError> {
        let result = self.get(path).await?;
        serde_json::from_value(result).map_err(|e| missing(path, &e.to_string()))
    }

    /// GET `path` and return the `result` of the envelope.
    async fn get(&self, path: &str) -> Result<Value, MoonrakerError> {
        self.request(reqwest::Method::GET, path).await
    }

    async fn request(&self, method: reqwest::Method, path: &str) -> Result<Value, MoonrakerError> {
        let mut request = self.client.request(method, format!("{}{path}", self.url)).timeout(self.timeout);
        if let Some(key) = &self.api_key {
            request = request.header("X-Api-Key", key);
        }
        let response = request.send().await.map_err(|e| self.transport_error(path, e))?;
        let status = response.status();
        let content_type =
            response.headers().get(reqwest::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(String::from);
        let body = response.bytes().await.map_err(|e| self.transport_error(path, e))?;
        if !status.is_success() {
            return Err(self.status_error(path, status, content_type.as_deref(), &body));
        }
        let mut json: Value = serde_json::from_slice(&body)
            .map_err(|e| MoonrakerError::InvalidJson { path: endpoint(path), detail: invalid_json_detail(&body, e) })?;
        json.get_mut("result").map(Value::take).ok_or_else(|| missing(path, "\"result\""))
    }

    fn transport_error(&self, path: &str, e: reqwest::Error) -> MoonrakerError {
        if e.is_timeout() {
            return MoonrakerError::Timeout {
                url: self.url.clone(),
                path: endpoint(path),
                secs: self.timeout.as_secs_f64(),
            };
        }
        MoonrakerError::Unreachable { url: self.url.clone(), detail: error_chain(&e), refused: is_refused(&e) }
    }

    fn status_error(
        &self,
        path: &str,
        status: reqwest::StatusCode,
        content_type: Option<&str>,
        body: &[u8],
    ) -> MoonrakerError {
        let code = status.as_u16();
        let reason = || status.canonical_reason().unwrap_or("no reason given").to_string();
        // A refusal is a refusal whoever sends it (Moonraker, or a proxy in front of it).
        if code == 401 || code == 403 {
            let message = envelope_message(body).unwrap_or_else(reason);
            return MoonrakerError::Unauthorized { status: code, message, key_sent: self.api_key.is_some() };
        }
        let Some(message) = envelope_message(body) else {
            return MoonrakerError::NotMoonraker {
                url: self.url.clone(),
                path: endpoint(path),
                status: code,
                body: describe_body(content_type, body),
            };
        };
        match code {
            503 => MoonrakerError::KlippyNotConnected { message },
            // Klippy's endpoints are registered when Klippy first connects (Moonraker's
            // klippy_connection.py), so until then Moonraker answers them "Not Found".
            404 if path.starts_with("/printer/") => MoonrakerError::KlippyNotConnected {
                message: format!(
                    "Klippy has not connected since Moonraker started ({} is 404 Not Found)",
                    endpoint(path)
                ),
            },
            code => MoonrakerError::Http { path: endpoint(path), status: code, message },
        }
    }
}

/// Was the connection refused (nothing listens)? reqwest wraps the `io::Error`.
fn is_refused(e: &(dyn std::error::Error + 'static)) -> bool {
    causes(e).any(|err| {
        err.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
    })
}

/// `e` and its sources, outermost first.
fn causes<'a>(e: &'a (dyn std::error::Error + 'static)) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |e| e.source())
}

/// "an empty body", "a text/html body (<html><head><title>404…)".
fn describe_body(content_type: Option<&str>, body: &[u8]) -> String {
    if body.is_empty() {
        return "an empty body".into();
    }
    let text = String::from_utf8_lossy(body);
    let mut start: String = text.split_whitespace().collect::<Vec<_>>().join(" ").chars().take(60).collect();
    if text.chars().count() > 60 {
        start.push('…');
    }
    match content_type.and_then(|c| c.split(';').next()).map(str::trim).filter(|c| !c.is_empty()) {
        Some(ct) => format!("a {ct} body ({start})"),
        None => format!("a body ({start})"),
    }
}

/// Moonraker's error envelope `{"error": {"code": 404, "message": "..."}}`, if the body is
/// that (application.py's `write_error`).
fn envelope_message(body: &[u8]) -> Option<String> {
    let json: Value = serde_json::from_slice(body).ok()?;
    json.pointer("/error/code").filter(|c| c.is_i64() || c.is_u64())?;
    json.pointer("/error/message").and_then(Value::as_str).map(String::from)
}

fn invalid_json_detail(body: &[u8], e: serde_json::Error) -> String {
    if body.is_empty() {
        return "the body is empty".into();
    }
    format!("{e}")
}

/// The path without the query, for messages.
fn endpoint(path: &str) -> String {
    path.split('?').next().unwrap_or(path).to_string()
}

fn missing(path: &str, what: &str) -> MoonrakerError {
    MoonrakerError::MissingField { path: endpoint(path), what: what.to_string() }
}

fn field<'a>(value: &'a Value, key: &str, path: &str) -> Result<&'a Value, MoonrakerError> {
    value.get(key).ok_or_else(|| missing(path, &format!("\"{key}\"")))
}

/// reqwest's top-level message is generic ("error sending request"); the cause
/// ("Connection refused") is at the bottom of the chain.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    causes(e).last().map(|root| root.to_string()).unwrap_or_default()
}

/// Percent-encode a query component: object names such as `mcu toolhead` have spaces.
fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn mcu_status(object: &str, status: &Value) -> McuStatus {
    let mcu = status.get(object);
    let text = |v: Option<&Value>| v.and_then(Value::as_str).map(String::from);
    let config_value = |key: &str| text(config_option(status, object, key));
    McuStatus {
        object: object.to_string(),
        name: object.strip_prefix("mcu ").unwrap_or(object).to_string(),
        mcu_version: text(mcu.and_then(|m| m.get("mcu_version"))),
        mcu: text(mcu.and_then(|m| m.pointer("/mcu_constants/MCU"))),
        app: text(mcu.and_then(|m| m.get("app"))),
        serial: config_value("serial"),
        canbus_uuid: config_value("canbus_uuid"),
    }
}

/// An option of a config section: the raw `config` keeps the section's case; the parsed
/// `settings` has lower-cased section names.
fn config_option<'a>(status: &'a Value, section: &str, key: &str) -> Option<&'a Value> {
    let configfile = status.get("configfile")?;
    configfile
        .pointer(&format!("/config/{}/{key}", json_pointer_escape(section)))
        .or_else(|| configfile.pointer(&format!("/settings/{}/{key}", json_pointer_escape(&section.to_lowercase()))))
}

fn json_pointer_escape(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

/// How long the look at the MCUs after a failed wait may take.
const DIAGNOSIS_TIME: Duration = Duration::from_secs(3);

/// Klippy is still connecting to its MCUs (`startup`), or gave up on one ("mcu 'mcu':
/// Unable to connect", after 90 s of retries).
fn stuck_connecting(state: &str, message: &str) -> bool {
    state == "startup" || (state == "error" && message.contains("Unable to connect"))
}

/// The first MCU without a version (see [`Moonraker::mcu_diagnosis`]), said with what its
/// configured port tells: `exists` looks a path up on this host.
pub fn unconnected_mcu(mcus: &[McuStatus], exists: impl Fn(&str) -> bool) -> Option<String> {
    let m = mcus.iter().find(|m| m.mcu_version.is_none())?;
    let section = &m.object;
    Some(match (m.serial.as_deref(), m.canbus_uuid.as_deref()) {
        (Some(port), _) if !exists(port) => format!(
            "Klippy has not connected to [{section}]: its serial {port} does not exist, so the board is unplugged \
             or not running Klipper"
        ),
        (Some(port), _) => format!(
            "Klippy has not connected to [{section}]: its serial {port} exists, but the board does not answer \
             Klippy (it may hang)"
        ),
        (None, Some(uuid)) => {
            format!("Klippy has not connected to [{section}]: canbus_uuid {uuid} does not answer on the CAN bus")
        }
        (None, None) => format!("Klippy has not connected to [{section}]"),
    })
}

/// The MCU printer.cfg configures on this device: by its by-id link, by-path link or USB
/// serial (see [`mcu_for_serial`]).
pub fn mcu_for_board<'a>(mcus: &'a [McuStatus], id: &crate::identity::BoardIdentity) -> Option<&'a McuStatus> {
    [id.by_id.as_deref(), id.by_path.as_deref(), id.serial.as_deref()]
        .into_iter()
        .flatten()
        .find_map(|d| mcu_for_serial(mcus, d))
}

/// The MCU printer.cfg configures with this `canbus_uuid:` (Klippy accepts any case).
pub fn mcu_for_canbus_uuid<'a>(mcus: &'a [McuStatus], uuid: &crate::can::CanUuid) -> Option<&'a McuStatus> {
    mcus.iter().find(|m| m.canbus_uuid.as_deref().and_then(|u| u.trim().parse().ok()).as_ref() == Some(uuid))
}

/// The MCU whose configured `serial:` is `device`: a by-id path (matched exactly), a
/// by-path or other path (matched exactly, or as the same device file), or a bare chip-id
/// serial (matched against the serial inside a configured by-id name). Never matched by
/// chip type: two boards with the same chip must not be confused.
pub fn mcu_for_serial<'a>(mcus: &'a [McuStatus], device: &str) -> Option<&'a McuStatus> {
    let device = device.trim();
    if device.is_empty() {
        return None;
    }
    let configured = || mcus.iter().filter_map(|m| m.serial.as_deref().map(|s| (m, s)));
    if let Some((m, _)) = configured().find(|(_, s)| *s == device) {
        return Some(m);
    }
    if let Some(serial) = chip_serial(device) {
        // Unique match only: an ambiguous serial must not pick one board at random.
        let mut hits = configured().filter(|(_, s)| chip_serial(s).as_deref() == Some(serial.as_str()));
        if let (Some((m, _)), None) = (hits.next(), hits.next()) {
            return Some(m);
        }
    }
    // /dev/ttyACM0 in printer.cfg vs a by-id link given to us (or the reverse).
    let real = std::fs::canonicalize(device).ok()?;
    configured().find(|(_, s)| std::fs::canonicalize(s).ok().as_ref() == Some(&real)).map(|(m, _)| m)
}

/// The chip-id serial in a by-id name (`…/usb-Klipper_stm32h723xx_SERIAL-if00` in any
/// mode's spelling), or `device` itself when it is a bare serial.
fn chip_serial(device: &str) -> Option<String> {
    if !device.contains('/') && !device.starts_with("usb-") {
        return Some(device.to_string());
    }
    let name = device.rsplit('/').next()?;
    name.starts_with("usb-").then(|| ByIdName::parse(name)).flatten()?.serial
}

// ---- polling with a deadline ---------------------------------------------------------

/// One probe's answer: done, or not yet (with the error to report if time runs out).
enum Probe<T> {
    Done(T),
    NotYet(MoonrakerError),
}

const FIRST_INTERVAL: Duration = Duration::from_millis(250);
const MAX_INTERVAL: Duration = Duration::from_secs(1);
/// Time left for the final probe before the deadline.
const LAST_LOOK: Duration = Duration::from_millis(250);

/// Run `probe` until it is done or `deadline` passes, waiting 250 ms, 500 ms, then 1 s
/// between probes, with a last probe 250 ms before the deadline. Transient errors are retried; others end the wait at once. At the
/// deadline the last "not yet" (or transient error) is returned.
async fn poll_until<T, F, Fut>(deadline: Instant, mut probe: F) -> Result<T, MoonrakerError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Probe<T>, MoonrakerError>>,
{
    let mut interval = FIRST_INTERVAL;
    let mut last = None;
    loop {
        match tokio::time::timeout_at(deadline, probe()).await {
            Ok(Ok(Probe::Done(value))) => return Ok(value),
            Ok(Ok(Probe::NotYet(why))) => last = Some(why),
            Ok(Err(e)) if e.is_transient() => last = Some(e),
            Ok(Err(e)) => return Err(e),
            Err(_) => break, // the deadline cut a probe short
        }
        // The last look is taken shortly before the deadline, not skipped.
        let last_look = deadline.checked_sub(LAST_LOOK).unwrap_or(deadline);
        let next = (Instant::now() + interval).min(last_look);
        if next <= Instant::now() {
            break;
        }
        tokio::time::sleep_until(next).await;
        interval = (interval * 2).min(MAX_INTERVAL);
    }
    Err(last.unwrap_or(MoonrakerError::KlippyNotReady {
        state: "unknown".into(),
        message: "Moonraker did not answer before the deadline".into(),
        waited_secs: 0.0,
        diagnosis: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn not_ready(state: &str) -> MoonrakerError {
        MoonrakerError::KlippyNotReady {
            state: state.into(),
            message: String::new(),
            waited_secs: 0.0,
            diagnosis: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn poll_backs_off_250_500_then_1000_ms() {
        let start = Instant::now();
        let calls = Cell::new(0);
        let result = poll_until(start + Duration::from_secs(60), || {
            calls.set(calls.get() + 1);
            let n = calls.get();
            async move { Ok(if n == 5 { Probe::Done(n) } else { Probe::NotYet(not_ready("startup")) }) }
        })
        .await;
        assert_eq!(result.unwrap(), 5);
        assert_eq!(start.elapsed(), Duration::from_millis(250 + 500 + 1000 + 1000));
    }

    #[tokio::test(start_paused = true)]
    async fn poll_returns_the_last_state_at_the_deadline() {
        let start = Instant::now();
        let calls = Cell::new(0);
        let err = poll_until(start + Duration::from_secs(5), || {
            calls.set(calls.get() + 1);
            let state = if calls.get() < 3 { "startup" } else { "error" };
            async move { Ok::<Probe<()>, _>(Probe::NotYet(not_ready(state))) }
        })
        .await
        .unwrap_err();
        assert!(matches!(&err, MoonrakerError::KlippyNotReady { state, .. } if state == "error"), "{err:?}");
        // Probes at 0, .25, .75, 1.75, 2.75, 3.75 and a last one at 4.75 (deadline - 250 ms).
        assert_eq!(calls.get(), 7);
        assert_eq!(start.elapsed(), Duration::from_millis(4750));
    }

    #[tokio::test(start_paused = true)]
    async fn the_last_probe_is_moved_before_the_deadline() {
        let start = Instant::now();
        let calls = Cell::new(0);
        let result = poll_until(start + Duration::from_millis(1500), || {
            calls.set(calls.get() + 1);
            async { Ok::<Probe<()>, _>(Probe::NotYet(not_ready("startup"))) }
        })
        .await;
        assert!(result.is_err());
        // 0, .25, .75, then 1.25 instead of 1.75.
        assert_eq!((calls.get(), start.elapsed()), (4, Duration::from_millis(1250)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_probe_is_cut_at_the_deadline() {
        let start = Instant::now();
        let calls = Cell::new(0);
        let err = poll_until(start + Duration::from_secs(3), || {
            calls.set(calls.get() + 1);
            let first = calls.get() == 1;
            async move {
                if first {
                    Ok::<Probe<()>, _>(Probe::NotYet(not_ready("startup")))
                } else {
                    std::future::pending().await
                }
            }
        })
        .await
        .unwrap_err();
        assert_eq!(start.elapsed(), Duration::from_secs(3));
        assert!(matches!(&err, MoonrakerError::KlippyNotReady { state, .. } if state == "startup"), "{err:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lasting_error_ends_the_wait_at_once() {
        let err = poll_until(Instant::now() + Duration::from_secs(30), || async {
            Err::<Probe<()>, _>(MoonrakerError::Unauthorized {
                status: 401,
                message: "Unauthorized".into(),
                key_sent: false,
            })
        })
        .await
        .unwrap_err();
        assert!(matches!(err, MoonrakerError::Unauthorized { .. }));
    }

    #[test]
    fn describe_print_status() {
        let p = |state: &str, file: Option<&str>, progress| PrintStatus {
            state: state.into(),
            filename: file.map(String::from),
            progress,
        };
        assert_eq!(p("printing", Some("benchy.gcode"), 0.429).describe(), "printing benchy.gcode (42%)");
        assert_eq!(p("paused", None, 0.07).describe(), "paused (7%)");
        assert_eq!(p("complete", Some("benchy.gcode"), 1.0).describe(), "complete");
        assert!(p("paused", None, 0.0).is_busy() && !p("cancelled", None, 0.0).is_busy());
    }

    #[test]
    fn encodes_object_names() {
        assert_eq!(encode_component("mcu EBB Can"), "mcu%20EBB%20Can");
        assert_eq!(encode_component("mcu a&b=c"), "mcu%20a%26b%3Dc");
    }

    fn mcu(object: &str, serial: Option<&str>) -> McuStatus {
        McuStatus {
            object: object.into(),
            name: object.strip_prefix("mcu ").unwrap_or(object).into(),
            mcu_version: None,
            mcu: Some("stm32h723xx".into()),
            app: None,
            serial: serial.map(String::from),
            canbus_uuid: None,
        }
    }

    #[test]
    fn maps_by_serial_never_by_chip() {
        let mcus = [
            mcu("mcu", Some("/dev/serial/by-id/usb-Klipper_stm32h723xx_AAA111-if00")),
            mcu("mcu spider", Some("/dev/serial/by-id/usb-Klipper_stm32h723xx_BBB222-if00")),
            mcu("mcu nhk", Some("/dev/serial/by-path/platform-xhci-hcd.0-usb-0:1.2:1.0")),
            mcu("mcu ebb", None),
        ];
        let name = |d: &str| mcu_for_serial(&mcus, d).map(|m| m.name.as_str());
        assert_eq!(name("/dev/serial/by-id/usb-Klipper_stm32h723xx_BBB222-if00"), Some("spider"));
        assert_eq!(name("AAA111"), Some("mcu"));
        assert_eq!(name("BBB222"), Some("spider"));
        assert_eq!(name("/dev/serial/by-id/usb-katapult_stm32h723xx_BBB222-if00"), Some("spider"), "any mode");
        assert_eq!(name("/dev/serial/by-path/platform-xhci-hcd.0-usb-0:1.2:1.0"), Some("nhk"));
        assert_eq!(name("stm32h723xx"), None);
        assert_eq!(name("AAA11"), None, "a prefix of a serial is not the serial");
        assert_eq!(name(""), None);
    }

    #[test]
    fn mcu_status_reads_config_and_settings() {
        let status = serde_json::json!({
            "mcu": {"mcu_version": "v1", "mcu_constants": {"MCU": "stm32h723xx"}},
            "mcu EBBCan": {"mcu_version": "v2", "mcu_constants": {"MCU": "stm32g0b1xx"}, "app": "Kalico"},
            "mcu nhk": {},
            "configfile": {
                "config": {"mcu": {"serial": "/dev/serial/by-id/x"}, "mcu EBBCan": {"canbus_uuid": "aabbccddeeff"}},
                "settings": {"mcu nhk": {"serial": "/dev/ttyACM1"}}
            }
        });
        let m = mcu_status("mcu", &status);
        assert_eq!(
            (m.name.as_str(), m.mcu_version.as_deref(), m.serial.as_deref()),
            ("mcu", Some("v1"), Some("/dev/serial/by-id/x"))
        );
        let e = mcu_status("mcu EBBCan", &status);
        assert_eq!(
            (e.name.as_str(), e.app.as_deref(), e.canbus_uuid.as_deref()),
            ("EBBCan", Some("Kalico"), Some("aabbccddeeff"))
        );
        let n = mcu_status("mcu nhk", &status);
        assert_eq!((n.mcu_version, n.mcu, n.serial.as_deref()), (None, None, Some("/dev/ttyACM1")));
    }

    #[test]
    fn the_first_mcu_without_a_version_is_where_klippy_is_stuck() {
        let plugged = "/dev/serial/by-id/usb-Klipper_stm32h723xx_AAA111-if00";
        let gone = "/dev/serial/by-id/usb-Klipper_stm32f446xx_BBB222-if00";
        let with = |object: &str, version: Option<&str>, serial: &str| McuStatus {
            mcu_version: version.map(String::from),
            ..mcu(object, Some(serial))
        };
        let exists = |p: &str| p == plugged;
        // Identified ones are skipped; [mcu ebb] waits behind [mcu] and is not named.
        let stuck = [with("mcu", None, plugged), with("mcu ebb", None, gone)];
        let said = unconnected_mcu(&stuck, exists).unwrap();
        assert!(said.starts_with("Klippy has not connected to [mcu]: its serial"), "{said}");
        assert!(said.contains("exists, but the board does not answer Klippy (it may hang)"), "{said}");
        let unplugged = [with("mcu", Some("v1"), plugged), with("mcu ebb", None, gone)];
        assert_eq!(
            unconnected_mcu(&unplugged, exists).unwrap(),
            format!(
                "Klippy has not connected to [mcu ebb]: its serial {gone} does not exist, so the board is unplugged \
                 or not running Klipper"
            )
        );
        let can = McuStatus { canbus_uuid: Some("aabbccddeeff".into()), ..mcu("mcu tool", None) };
        assert!(unconnected_mcu(&[can], exists).unwrap().contains("canbus_uuid aabbccddeeff does not answer"));
        assert_eq!(unconnected_mcu(&[with("mcu", Some("v1"), plugged)], exists), None, "all connected");
    }

    #[test]
    fn a_hung_klippy_request_behind_an_answering_moonraker_is_the_stale_connection() {
        let timeout = |path: &str| MoonrakerError::Timeout { url: "http://x".into(), path: path.into(), secs: 5.0 };
        let e = timeout("/printer/objects/query").behind_moonraker("error");
        assert!(matches!(&e, MoonrakerError::KlippyUnresponsive { state, .. } if state == "error"), "{e:?}");
        assert!(e.to_string().contains("Moonraker's connection to Klippy is stale, or Klippy hangs"), "{e}");
        assert!(e.help().unwrap().contains("restart Moonraker"), "{:?}", e.help());
        assert!(e.is_transient(), "a wait for Klippy goes on: Moonraker may reconnect");
        // Moonraker's own endpoint hanging is Moonraker hanging.
        assert!(matches!(timeout("/server/info").behind_moonraker("ready"), MoonrakerError::Timeout { .. }));
    }

    #[test]
    fn not_ready_message_is_its_first_line() {
        let e = MoonrakerError::KlippyNotReady {
            state: "error".into(),
            message: "mcu 'mcu': Unable to connect\nOnce the underlying issue is corrected, ...\n".into(),
            waited_secs: 60.0,
            diagnosis: None,
        };
        assert_eq!(e.to_string(), "Klippy is in state error: mcu 'mcu': Unable to connect");
        assert!(e.help().unwrap().contains("FIRMWARE_RESTART"));
        assert_eq!(not_ready("disconnected").to_string(), "Klippy is in state disconnected");
    }
}
