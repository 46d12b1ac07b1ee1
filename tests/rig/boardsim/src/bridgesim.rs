//! The USB-to-CAN bridge's whole life: Klipper's bridge firmware is itself a CAN node (its
//! UUID the hash of its USB serial, as kflash's `can::bridge` computes it), answering the
//! admin protocol and identify on the host's side of the bridge. A bootloader request for its
//! UUID reboots it: the gs_usb device goes away (can0 vanishes) and the same UDC enumerates as
//! Katapult over USB CDC-ACM (1d50:6177, the same chip-id serial). A completed Katapult write
//! boots the new image: gs_usb again, its node reporting the new version. With the fault
//! `rom-dfu` it lands in the STM32 ROM's DFU (0483:df11) instead of Katapult, and stays there.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kflash::can::{CanFrame, CanUuid};
use kflash::protocol::katapult::{ConnectInfo, Response as KResponse, CMD_SEND_BLOCK, PROTO_VERSION_1_1_0};
use serde_json::json;
use tokio::sync::mpsc;

use crate::cannode::{CanEvent, CanNode, CanOutput};
use crate::canserve::COMPLETE_DELAY;
use crate::dfu::{DfuSeDevice, RomDfu};
use crate::ffs::{Bridge, BridgeUsb, Log};
use crate::firmware::{can_dictionary_json, profile_for, standin_image, AppCheck, McuProfile};
use crate::flash::{FlashMemory, KatapultDevice, KatapultEvent, KatapultOutput};
use crate::gadget::{Function, Gadget, UsbIdentity};
use crate::gsusb::HostFrame;
use crate::tty::{open_raw, SessionEvent, Tty, TtySession};

/// What the bridge's threads and tasks tell its main loop.
pub enum Msg {
    /// The node asked for its bootloader: the firmware reboots, this flash in hand.
    Bootloader(FlashMemory),
    Tty(SessionEvent),
    /// Katapult's jump to the application, COMPLETE_DELAY after COMPLETE.
    Jump,
}

/// The bridge firmware's own CAN node, fed the frames the host sends (sans-IO but for the
/// channel that reports a reboot).
pub struct OwnNode {
    node: Option<CanNode>,
    t0: Instant,
    tx: mpsc::UnboundedSender<Msg>,
    log: Log,
}

impl OwnNode {
    /// One frame from the host: the node's answers, as frames for the host.
    pub fn host_frame(&mut self, f: &HostFrame) -> Vec<HostFrame> {
        let Some(node) = self.node.as_mut() else { return Vec::new() };
        // Klipper's admin protocol is 11-bit ids only.
        if f.can_id > 0x7ff {
            return Vec::new();
        }
        let Ok(frame) = CanFrame::new(f.can_id as u16, f.payload()) else { return Vec::new() };
        let mut replies = Vec::new();
        for o in node.receive(&frame, self.t0.elapsed()) {
            match o {
                CanOutput::Frame(r) => replies.push(HostFrame::rx(u32::from(r.id()), r.data())),
                CanOutput::Event(CanEvent::EnteredKatapult) => {
                    let node = self.node.take().expect("running");
                    (self.log)(json!({"event": "bridge-bootloader-request", "uuid": node.uuid().to_string()}));
                    let _ = self.tx.send(Msg::Bootloader(node.flash));
                    return replies;
                }
                CanOutput::Event(CanEvent::Klipper(_)) | CanOutput::Work(_) => {}
                CanOutput::Event(e) => (self.log)(json!({"event": "bridge-node", "what": format!("{e:?}")})),
            }
        }
        replies
    }
}

/// How the bridge is set up.
pub struct BridgeSpec {
    pub usb: BridgeUsb,
    pub wire: String,
    /// The version of the stand-in Klipper installed at start.
    pub version: String,
    /// Land in ROM DFU instead of Katapult on a bootloader request.
    pub rom_dfu: bool,
}

fn katapult_info(mcu: &str, p: &McuProfile) -> ConnectInfo {
    let proto = ((PROTO_VERSION_1_1_0 >> 16) as u8, (PROTO_VERSION_1_1_0 >> 8) as u8, PROTO_VERSION_1_1_0 as u8);
    ConnectInfo {
        proto_version: proto,
        app_start: p.app_start,
        block_size: 64,
        mcu: mcu.to_string(),
        version: Some("v0.0.1-sim-bridge".into()),
    }
}

fn udc_index(udc: &str) -> Result<usize> {
    udc.rsplit('.').next().and_then(|n| n.parse().ok()).with_context(|| format!("UDC '{udc}' is not dummy_udc.N"))
}

/// Katapult over USB while the bridge sits in its bootloader.
struct UsbKatapult {
    gadget: Gadget,
    session: Option<TtySession>,
    device: KatapultDevice,
    flash: FlashMemory,
}

/// Serve the bridge until SIGTERM / SIGINT.
pub async fn run(spec: BridgeSpec, log: Log) -> Result<()> {
    let mcu = spec.usb.product.clone();
    let p = profile_for(&mcu).with_context(|| format!("unknown MCU family {mcu}"))?;
    let uuid: CanUuid = kflash::can::bridge::uuid_from_usb_serial(&spec.usb.serial)
        .with_context(|| format!("serial '{}' is not a hex chip id", spec.usb.serial))?;
    let new_node = |flash: FlashMemory| CanNode::new("bridge", uuid, flash, katapult_info(&mcu, &p), p.rules, p.timing);
    let mut flash = FlashMemory::new(p.flash_base, p.flash_size, p.pages);
    flash.load(
        p.app_start,
        &standin_image(p.app_start, p.initial_sp, &can_dictionary_json("Klipper", &spec.version, &mcu, p.clock_freq)),
    );
    let (tx, mut rx) = mpsc::unbounded_channel();
    let own = Arc::new(Mutex::new(OwnNode {
        node: Some(new_node(flash)),
        t0: Instant::now(),
        tx: tx.clone(),
        log: log.clone(),
    }));
    let bridge = Bridge::plug(&spec.usb, &spec.wire, log.clone(), own.clone())?;
    log(json!({"event": "ready", "udc": spec.usb.udc, "wire": spec.wire, "uuid": uuid.to_string()}));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut katapult: Option<UsbKatapult> = None;
    let mut rom: Option<Gadget> = None;
    let result = loop {
        let msg = tokio::select! {
            _ = term.recv() => break Ok(()),
            _ = tokio::signal::ctrl_c() => break Ok(()),
            m = rx.recv() => m,
        };
        let Some(msg) = msg else { break Ok(()) };
        match msg {
            Msg::Bootloader(flash) => {
                bridge.unplug()?;
                if spec.rom_dfu {
                    rom = Some(enter_rom_dfu(&spec.usb, &mcu, &p, flash, &log)?);
                    continue;
                }
                let mut gadget = Gadget::create("bridge-katapult", udc_index(&spec.usb.udc)?)?;
                let id = UsbIdentity {
                    vid: 0x1d50,
                    pid: 0x6177,
                    device_class: 0x02,
                    manufacturer: "katapult".into(),
                    product: mcu.clone(),
                    serial: spec.usb.serial.clone(),
                    function: Function::Acm,
                };
                gadget.set_identity(&id)?;
                gadget.bind()?;
                let tty = Tty::new(open_raw(&gadget.tty, None)?)?;
                let tx = tx.clone();
                let session = TtySession::start(tty, move |ev| {
                    let _ = tx.send(Msg::Tty(ev));
                });
                log(
                    json!({"event": "bridge-connect", "mode": "katapult", "usb": id.vid_pid(), "by_id": id.by_id_name()}),
                );
                let device = KatapultDevice::new(katapult_info(&mcu, &p), p.rules, p.timing);
                katapult = Some(UsbKatapult { gadget, session: Some(session), device, flash });
            }
            Msg::Tty(SessionEvent::Data(data)) => {
                let Some(k) = katapult.as_mut() else { continue };
                let mut work = Duration::ZERO;
                for o in k.device.feed(&data, &mut k.flash) {
                    match o {
                        KatapultOutput::Work(d) => work += d,
                        KatapultOutput::Reply(r) => {
                            let mut delay = std::mem::take(&mut work);
                            if matches!(&r, KResponse::Ack { cmd, .. } if *cmd == CMD_SEND_BLOCK) {
                                delay += Duration::from_millis(1);
                            }
                            let bytes = r.encode().expect("device responses always encode");
                            if let Some(s) = &k.session {
                                s.send(bytes, delay);
                            }
                        }
                        KatapultOutput::Event(KatapultEvent::Complete) => {
                            log(json!({"event": "bridge-complete"}));
                            let tx = tx.clone();
                            tokio::spawn(async move {
                                tokio::time::sleep(COMPLETE_DELAY).await;
                                let _ = tx.send(Msg::Jump);
                            });
                        }
                        KatapultOutput::Event(KatapultEvent::Eof { pages }) => {
                            log(json!({"event": "bridge-flash-eof", "pages": pages}))
                        }
                        KatapultOutput::Event(_) => {}
                    }
                }
            }
            Msg::Tty(SessionEvent::Closed(why)) => {
                log(json!({"event": "bridge-tty-closed", "why": why}));
            }
            Msg::Jump => {
                let Some(mut k) = katapult.take() else { continue };
                if let Some(s) = k.session.take() {
                    s.close().await;
                }
                k.gadget.remove()?;
                let version = match AppCheck::inspect(&k.flash.image_from(p.app_start)) {
                    AppCheck::Klipper { dictionary, .. } => Some(dictionary.version),
                    _ => None,
                };
                let node = new_node(k.flash);
                own.lock().expect("own node").node = Some(node);
                bridge.replug()?;
                log(json!({"event": "bridge-connect", "mode": "gs_usb", "version": version}));
            }
        }
    };
    if let Some(mut k) = katapult.take() {
        if let Some(s) = k.session.take() {
            s.close().await;
        }
        let _ = k.gadget.remove();
    }
    if let Some(mut g) = rom.take() {
        let _ = g.remove();
    }
    drop(bridge);
    result
}

fn enter_rom_dfu(usb: &BridgeUsb, mcu: &str, p: &McuProfile, flash: FlashMemory, log: &Log) -> Result<Gadget> {
    let serial: String = usb.serial.chars().take(12).collect();
    let (vid, pid, manufacturer, product) = p.rom_usb;
    let desc = RomDfu::stm32(mcu, p, &serial);
    let dfu = desc.is_some() && crate::gadgetfs::available();
    let mut gadget = Gadget::create("bridge-rom", udc_index(&usb.udc)?)?;
    let id = UsbIdentity {
        vid,
        pid,
        device_class: 0,
        manufacturer: manufacturer.into(),
        product: product.into(),
        serial,
        function: if dfu { Function::RomDfu } else { Function::SourceSink },
    };
    if let (true, Some(desc)) = (dfu, desc) {
        let l = log.clone();
        gadget.prepare_rom_dfu(
            DfuSeDevice::new(desc, flash),
            Box::new(move |note| l(json!({"event": "bridge-dfu", "note": note}))),
        );
    }
    gadget.set_identity(&id)?;
    if let Some(e) = gadget.bind()? {
        log(json!({"event": "bridge-dfu", "note": format!("gadgetfs failed, SourceSink instead: {e:#}")}));
    }
    log(json!({"event": "bridge-connect", "mode": "rom-dfu", "usb": id.vid_pid()}));
    Ok(gadget)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kflash::can::admin::{AdminCommand, AdminReply, CanApp};

    fn own() -> (OwnNode, mpsc::UnboundedReceiver<Msg>, CanUuid) {
        let mcu = "stm32g0b1xx";
        let p = profile_for(mcu).unwrap();
        let uuid = kflash::can::bridge::uuid_from_usb_serial("2D0028000B51333234383230").unwrap();
        let mut flash = FlashMemory::new(p.flash_base, p.flash_size, p.pages);
        let dict = can_dictionary_json("Klipper", "v1", mcu, p.clock_freq);
        flash.load(p.app_start, &standin_image(p.app_start, p.initial_sp, &dict));
        let node = CanNode::new("bridge", uuid, flash, katapult_info(mcu, &p), p.rules, p.timing);
        let (tx, rx) = mpsc::unbounded_channel();
        (OwnNode { node: Some(node), t0: Instant::now(), tx, log: Arc::new(|_| {}) }, rx, uuid)
    }

    fn host(cmd: AdminCommand) -> HostFrame {
        let f = cmd.to_frame();
        HostFrame::rx(u32::from(f.id()), f.data())
    }

    #[test]
    fn the_bridge_answers_as_its_own_node_and_reboots_on_a_bootloader_request() {
        let (mut own, mut rx, uuid) = own();
        assert_eq!(uuid.to_string(), "f3f4159b80a6");
        let answers = own.host_frame(&host(AdminCommand::QueryUnassigned));
        assert_eq!(answers.len(), 1);
        let reply = AdminReply::from_frame(&CanFrame::new(answers[0].can_id as u16, answers[0].payload()).unwrap());
        assert_eq!(reply.unwrap(), AdminReply { uuid, app: CanApp::Klipper });
        // Another node's request is not ours.
        let other = CanUuid([1, 2, 3, 4, 5, 6]);
        assert!(own.host_frame(&host(AdminCommand::RequestBootloader { uuid: other })).is_empty());
        assert!(rx.try_recv().is_err());
        own.host_frame(&host(AdminCommand::RequestBootloader { uuid }));
        let Ok(Msg::Bootloader(flash)) = rx.try_recv() else { panic!("no reboot") };
        assert!(matches!(
            AppCheck::inspect(&flash.image_from(profile_for("stm32g0b1xx").unwrap().app_start)),
            AppCheck::Klipper { .. }
        ));
        // Rebooting: the node is gone from the bus.
        assert!(own.host_frame(&host(AdminCommand::QueryUnassigned)).is_empty());
    }
}
