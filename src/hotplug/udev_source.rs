//! The real device source: a udev netlink monitor (tty devices and whole USB devices) on a
//! dedicated thread. libudev objects must stay on the thread that made them (libudev(3) on
//! Debian 12), so that thread owns the monitor and the enumerator, and only owned
//! [`DeviceRecord`]s leave it.

use std::path::Path;

use futures::StreamExt;
use tokio::sync::mpsc;

use super::source::{DeviceSource, RescanRequest, Sink, SourceMessage};
use crate::error::{Error, Result};
use crate::identity::DeviceRecord;

/// libudev's monitor is disabled silently without a running udevd; this file tells.
const UDEV_CONTROL: &str = "/run/udev/control";

#[derive(Debug, Default)]
pub struct UdevSource {
    _private: (),
}

impl UdevSource {
    pub fn new() -> UdevSource {
        UdevSource::default()
    }
}

impl DeviceSource for UdevSource {
    fn start(self, sink: impl Sink) -> Result<mpsc::UnboundedSender<RescanRequest>> {
        if !Path::new(UDEV_CONTROL).exists() {
            return Err(Error::Udev(format!(
                "{UDEV_CONTROL} does not exist, so systemd-udevd is not running and no device events would arrive"
            )));
        }
        let (rescan_tx, rescan_rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        std::thread::Builder::new()
            .name("kflash-udev".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("cannot start the udev thread's runtime: {e}")));
                        return;
                    }
                };
                rt.block_on(run(sink, rescan_rx, ready_tx));
            })
            .map_err(|e| Error::Udev(format!("cannot start the udev thread: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(rescan_tx),
            Ok(Err(why)) => Err(Error::Udev(why)),
            Err(_) => Err(Error::Udev("the udev thread stopped while starting".into())),
        }
    }
}

/// Reads the monitor and hands each record to the sink on this thread: the snapshot and the
/// board event are ready the moment the uevent is read, without waking another thread first
/// (a cross-thread wake was a third of kflash's latency after udev's event, measured in the rig).
async fn run(
    mut sink: impl Sink,
    mut rescan: mpsc::UnboundedReceiver<RescanRequest>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) {
    // Listen first, enumerate second: anything that changes in between is queued in the
    // socket and reconciled by syspath.
    let mut monitor = match open_monitor() {
        Ok(m) => m,
        Err(e) => {
            let _ = ready.send(Err(format!("cannot open the udev monitor: {e}")));
            return;
        }
    };
    match enumerate() {
        Ok(devices) => {
            sink.deliver(SourceMessage::Enumerated { devices, ack: None });
            let _ = ready.send(Ok(()));
        }
        Err(e) => {
            let _ = ready.send(Err(format!("cannot enumerate devices: {e}")));
            return;
        }
    }
    loop {
        tokio::select! {
            ev = monitor.next() => match ev {
                Some(Ok(ev)) => {
                    if let Some(msg) = message_for(&ev) {
                        sink.deliver(msg);
                    }
                }
                Some(Err(e)) => {
                    sink.deliver(SourceMessage::Failed(format!("udev monitor error: {e}")));
                    return;
                }
                None => {
                    sink.deliver(SourceMessage::Failed("udev monitor closed".into()));
                    return;
                }
            },
            req = rescan.recv() => match req {
                Some(ack) => match enumerate() {
                    Ok(devices) => sink.deliver(SourceMessage::Enumerated { devices, ack: Some(ack) }),
                    Err(e) => tracing::warn!("re-enumeration failed: {e}"),
                },
                // The Hotplug is gone.
                None => return,
            },
        }
    }
}

fn open_monitor() -> std::io::Result<tokio_udev::AsyncMonitorSocket> {
    let socket = tokio_udev::MonitorBuilder::new()?
        .match_subsystem("tty")?
        .match_subsystem_devtype("usb", "usb_device")?
        .listen()?;
    tokio_udev::AsyncMonitorSocket::new(socket)
}

fn enumerate() -> std::io::Result<Vec<DeviceRecord>> {
    let mut out = Vec::new();
    let mut ttys = udev::Enumerator::new()?;
    ttys.match_subsystem("tty")?;
    ttys.match_is_initialized()?;
    out.extend(ttys.scan_devices()?.map(|d| record(&d)));
    let mut usb = udev::Enumerator::new()?;
    usb.match_subsystem("usb")?;
    usb.match_property("DEVTYPE", "usb_device")?;
    usb.match_is_initialized()?;
    out.extend(usb.scan_devices()?.map(|d| record(&d)));
    Ok(out)
}

fn message_for(ev: &udev::Event) -> Option<SourceMessage> {
    match ev.event_type() {
        udev::EventType::Add => Some(SourceMessage::Added(record(&ev.device()))),
        udev::EventType::Change => Some(SourceMessage::Changed(record(&ev.device()))),
        udev::EventType::Remove => {
            Some(SourceMessage::Removed { syspath: ev.syspath().to_string_lossy().into_owned() })
        }
        _ => None,
    }
}

fn record(d: &udev::Device) -> DeviceRecord {
    DeviceRecord {
        syspath: d.syspath().to_string_lossy().into_owned(),
        subsystem: d.subsystem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
        devnode: d.devnode().map(|p| p.to_string_lossy().into_owned()),
        properties: d
            .properties()
            .map(|p| (p.name().to_string_lossy().into_owned(), p.value().to_string_lossy().into_owned()))
            .collect(),
    }
}
