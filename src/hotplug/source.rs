//! The seam between discovery logic and where device records come from: the real udev
//! monitor in production, a scripted channel in tests.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

use crate::error::Result;
use crate::identity::DeviceRecord;

/// What a source reports.
#[derive(Debug)]
pub enum SourceMessage {
    /// A full enumeration: the first message, and the answer to every rescan request
    /// (`ack` fires once it has been applied).
    Enumerated {
        devices: Vec<DeviceRecord>,
        ack: Option<oneshot::Sender<()>>,
    },
    Added(DeviceRecord),
    Changed(DeviceRecord),
    Removed {
        syspath: String,
    },
    /// The source died; no more messages follow.
    Failed(String),
}

/// A request for a fresh enumeration; the sender is passed back in `Enumerated::ack`.
pub type RescanRequest = oneshot::Sender<()>;

/// Where a source delivers its messages: applied to the snapshot and broadcast on the
/// source's own thread, the moment they are read (no hop through another task).
pub trait Sink: Send + 'static {
    fn deliver(&mut self, msg: SourceMessage);
}

/// Something that lists devices and then reports changes. Implementations must start
/// listening *before* they enumerate, so nothing falls between the two; the first message
/// is an enumeration (or a failure). A source stops when the returned sender is dropped.
pub trait DeviceSource: Send + 'static {
    fn start(self, sink: impl Sink) -> Result<mpsc::UnboundedSender<RescanRequest>>;
}

/// A source driven by a test script. It keeps the list of "connected" devices so rescans
/// answer truthfully, and can change that list without an event to model a dropped uevent.
pub struct ScriptedSource {
    initial: Vec<DeviceRecord>,
    script: Script,
    rx: mpsc::UnboundedReceiver<SourceMessage>,
}

/// The test's end of a [`ScriptedSource`].
#[derive(Clone)]
pub struct Script {
    devices: Arc<Mutex<BTreeMap<String, DeviceRecord>>>,
    tx: mpsc::UnboundedSender<SourceMessage>,
}

impl ScriptedSource {
    pub fn new(initial: Vec<DeviceRecord>) -> (ScriptedSource, Script) {
        let (tx, rx) = mpsc::unbounded_channel();
        let devices = initial.iter().map(|d| (d.syspath.clone(), d.clone())).collect();
        let script = Script { devices: Arc::new(Mutex::new(devices)), tx };
        (ScriptedSource { initial, script: script.clone(), rx }, script)
    }
}

impl DeviceSource for ScriptedSource {
    fn start(self, mut sink: impl Sink) -> Result<mpsc::UnboundedSender<RescanRequest>> {
        let (rescan_tx, mut rescan_rx) = mpsc::unbounded_channel::<RescanRequest>();
        sink.deliver(SourceMessage::Enumerated { devices: self.initial, ack: None });
        let mut rx = self.rx;
        let script = self.script;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    msg = rx.recv() => match msg {
                        Some(m) => sink.deliver(m),
                        None => break,
                    },
                    req = rescan_rx.recv() => match req {
                        Some(ack) => {
                            let devices = script.devices.lock().unwrap().values().cloned().collect();
                            sink.deliver(SourceMessage::Enumerated { devices, ack: Some(ack) });
                        }
                        None => break,
                    },
                }
            }
        });
        Ok(rescan_tx)
    }
}

impl Script {
    pub fn add(&self, rec: DeviceRecord) {
        self.devices.lock().unwrap().insert(rec.syspath.clone(), rec.clone());
        let _ = self.tx.send(SourceMessage::Added(rec));
    }

    pub fn change(&self, rec: DeviceRecord) {
        self.devices.lock().unwrap().insert(rec.syspath.clone(), rec.clone());
        let _ = self.tx.send(SourceMessage::Changed(rec));
    }

    pub fn remove(&self, syspath: &str) {
        self.devices.lock().unwrap().remove(syspath);
        let _ = self.tx.send(SourceMessage::Removed { syspath: syspath.to_string() });
    }

    /// The device appears but its uevent is lost (as with a netlink ENOBUFS overflow).
    pub fn add_silently(&self, rec: DeviceRecord) {
        self.devices.lock().unwrap().insert(rec.syspath.clone(), rec);
    }

    pub fn fail(&self, why: &str) {
        let _ = self.tx.send(SourceMessage::Failed(why.to_string()));
    }
}
