//! The I/O shell around [`SimBus`]: simulated CAN nodes on a real CAN socket (vcan0 in the rig
//! guest), and the host-side probe that flashes one of them with kflash's own CAN code.
//! Every frame received goes to every node; their answers go out after the flash work they
//! model; Katapult's jump happens `complete_delay` after COMPLETE, on a timer.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use kflash::can::link::{
    await_app, await_katapult, identify_klipper_node, open_katapult, query_unassigned, request_bootloader, FrameSocket,
};
use kflash::can::{CanApp, CanUuid, NodeId};
use kflash::flash::katapult::{Expectation, KatapultSession, Policy};
use kflash::protocol::katapult::{ConnectInfo, PROTO_VERSION_1_1_0};
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::cannode::{CanEvent, CanNode, CanOutput, SimBus};
use crate::firmware::{can_dictionary_json, profile_for, standin_image};
use crate::flash::FlashMemory;

/// Katapult jumps to the application this long after acking COMPLETE (flashcmd.c).
pub const COMPLETE_DELAY: Duration = Duration::from_millis(100);

/// `NAME,UUID,MCU[,VERSION]`: a node running a stand-in Klipper of VERSION, or with empty
/// flash (so in Katapult) when VERSION is left out.
pub fn parse_node(spec: &str, faults: &[String]) -> Result<CanNode> {
    let parts: Vec<&str> = spec.split(',').map(str::trim).collect();
    let (name, uuid, mcu, version) = match parts[..] {
        [n, u, m] => (n, u, m, None),
        [n, u, m, v] => (n, u, m, Some(v)),
        _ => bail!("--node '{spec}': expected NAME,UUID,MCU[,VERSION]"),
    };
    let uuid: CanUuid = uuid.parse().with_context(|| format!("--node '{spec}'"))?;
    let p = profile_for(mcu).with_context(|| format!("--node '{spec}': unknown MCU family {mcu}"))?;
    let mut flash = FlashMemory::new(p.flash_base, p.flash_size, p.pages);
    if let Some(v) = version {
        flash.load(
            p.app_start,
            &standin_image(p.app_start, p.initial_sp, &can_dictionary_json("Klipper", v, mcu, p.clock_freq)),
        );
    }
    let proto = ((PROTO_VERSION_1_1_0 >> 16) as u8, (PROTO_VERSION_1_1_0 >> 8) as u8, PROTO_VERSION_1_1_0 as u8);
    let info = ConnectInfo {
        proto_version: proto,
        app_start: p.app_start,
        block_size: 64,
        mcu: mcu.to_string(),
        version: Some("v0.0.1-sim-can".into()),
    };
    let mut node = CanNode::new(name, uuid, flash, info, p.rules, p.timing);
    for f in faults {
        if let Some((who, spec)) = f.split_once(':') {
            if who == name {
                node.faults.set(spec).map_err(anyhow::Error::msg)?;
                // Faults that act in Katapult are armed at its start; a node already there restarts it.
                node.restart_katapult_if_running();
            }
        }
    }
    Ok(node)
}

/// Serve the bus on `socket` until the socket fails. `log` gets one JSON line per event.
pub async fn serve<S: FrameSocket>(mut socket: S, mut bus: SimBus, mut log: impl FnMut(Value)) -> Result<()> {
    let t0 = Instant::now();
    let mut jumps: Vec<(Instant, usize)> = Vec::new();
    // No jump pending: wait for frames only (a far deadline, never reached in practice).
    let idle = Duration::from_secs(365 * 24 * 3600);
    loop {
        let deadline = jumps.iter().map(|j| j.0).min().unwrap_or_else(|| Instant::now() + idle);
        let received = socket.recv(deadline).await.context("CAN socket")?;
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = jumps.into_iter().partition(|(t, _)| *t <= now);
        jumps = later;
        for (_, i) in due {
            for o in bus.nodes[i].jump(now - t0) {
                if let CanOutput::Event(e) = o {
                    log(json!({"node": bus.nodes[i].name, "event": format!("{e:?}")}));
                }
            }
        }
        let Some(frame) = received else { continue };
        for (i, outs) in bus.deliver(&frame, now - t0) {
            for o in outs {
                match o {
                    CanOutput::Frame(f) => socket.send(&f).await.context("CAN socket")?,
                    // The MCU erases / programs before it answers again.
                    CanOutput::Work(d) => tokio::time::sleep(d).await,
                    CanOutput::Event(e) => {
                        if e == CanEvent::Complete {
                            jumps.push((Instant::now() + COMPLETE_DELAY, i));
                        }
                        if !matches!(e, CanEvent::Katapult(_) | CanEvent::Klipper(_)) {
                            log(json!({"node": bus.nodes[i].name, "event": format!("{e:?}")}));
                        }
                    }
                }
            }
        }
    }
}

/// Host side, with kflash's CAN code: wait for `uuid` to answer as Klipper, request the
/// bootloader, flash `image` through Katapult over CAN, wait for Klipper again and identify
/// it. Returns timings and what the node reports.
pub async fn probe_flash<S: FrameSocket>(mut socket: S, uuid: CanUuid, image: &[u8], mcu: &str) -> Result<Value> {
    let every = Duration::from_millis(250);
    let t = Instant::now();
    await_app(&mut socket, uuid, CanApp::Klipper, every, t + Duration::from_secs(10)).await?;
    let seen_ms = t.elapsed().as_millis();
    let mut others = query_unassigned(&mut socket, Instant::now() + Duration::from_millis(200)).await?;
    // Answers arrive in arbitration order, which nobody promises.
    others.sort_by_key(|r| r.uuid);

    let t = Instant::now();
    request_bootloader(&mut socket, uuid).await?;
    await_katapult(&mut socket, uuid, every, t + Duration::from_secs(5)).await?;
    let katapult_ms = t.elapsed().as_millis();

    let t = Instant::now();
    let link = open_katapult(&mut socket, uuid, NodeId::KATAPULT_FLASH).await?;
    let mut session = KatapultSession::new(link, Policy::default());
    let reported = session.canbus_id().await?;
    if reported != uuid {
        bail!("Katapult on node 128 reports UUID {reported}, not {uuid}");
    }
    let mut events = Vec::new();
    // The stand-in images are built for the family's usual application start.
    let app_start = profile_for(mcu).map(|p| p.app_start);
    let report = session.flash(image, &Expectation { mcu: mcu.into(), app_start }, &mut events).await?;
    let flash_ms = t.elapsed().as_millis();
    drop(session);

    let t = Instant::now();
    await_app(&mut socket, uuid, CanApp::Klipper, every, t + Duration::from_secs(10)).await?;
    let back_ms = t.elapsed().as_millis();
    let dict = identify_klipper_node(&mut socket, uuid, NodeId(4), Instant::now() + Duration::from_secs(5)).await?;
    Ok(json!({
        "uuid": uuid.to_string(),
        "unassigned_nodes": others.iter().map(|r| format!("{} {}", r.uuid, r.app.name())).collect::<Vec<_>>(),
        "image_bytes": image.len(),
        "blocks": report.blocks,
        "pages": report.pages,
        "ms": {"seen": seen_ms, "to_katapult": katapult_ms, "write_and_verify": flash_ms, "back_in_klipper": back_ms},
        "version": dict.version,
        "mcu": dict.mcu,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kflash::can::CanFrame;
    use tokio::sync::mpsc;

    /// One end of an in-memory bus between two sockets.
    struct End {
        tx: mpsc::UnboundedSender<CanFrame>,
        rx: mpsc::UnboundedReceiver<CanFrame>,
    }

    fn pair() -> (End, End) {
        let (a_tx, a_rx) = mpsc::unbounded_channel();
        let (b_tx, b_rx) = mpsc::unbounded_channel();
        (End { tx: a_tx, rx: b_rx }, End { tx: b_tx, rx: a_rx })
    }

    impl FrameSocket for End {
        async fn send(&mut self, frame: &CanFrame) -> std::io::Result<()> {
            self.tx.send(*frame).map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
        }
        async fn recv(&mut self, deadline: Instant) -> std::io::Result<Option<CanFrame>> {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Err(_) => Ok(None),
                Ok(Some(f)) => Ok(Some(f)),
                Ok(None) => Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe)),
            }
        }
        fn discard_input(&mut self) {
            while self.rx.try_recv().is_ok() {}
        }
    }

    fn image(version: &str) -> Vec<u8> {
        let p = profile_for("stm32g0b1xx").unwrap();
        let mut img = standin_image(
            p.app_start,
            p.initial_sp,
            &can_dictionary_json("Klipper", version, "stm32g0b1xx", p.clock_freq),
        );
        // A realistic size: code after the dictionary, 32 KiB in all.
        img.extend((img.len()..32 * 1024).map(|i| (i * 31 % 251) as u8));
        img
    }

    #[tokio::test]
    async fn the_probe_flashes_a_served_node_and_sees_the_new_version() {
        let ebb = parse_node("ebb,0a1b2c3d4e5f,stm32g0b1xx,v0.12.0-old", &[]).unwrap();
        let other = parse_node("sb,00000000beef,stm32g0b1xx", &[]).unwrap();
        let (host, sim) = pair();
        let mut lines = Vec::new();
        let server = tokio::spawn(async move {
            let r = serve(sim, SimBus { nodes: vec![ebb, other] }, |v| lines.push(v)).await;
            (r, lines)
        });
        let uuid: CanUuid = "0a1b2c3d4e5f".parse().unwrap();
        let out = probe_flash(host, uuid, &image("v0.13.0-new"), "stm32g0b1xx").await.unwrap();
        assert_eq!(out["version"], "v0.13.0-new");
        assert_eq!(out["blocks"], 512);
        assert_eq!(out["unassigned_nodes"], json!(["00000000beef Katapult", "0a1b2c3d4e5f Klipper"]));
        // The probe's socket is gone: the server stops with an error, having logged the jump.
        let (r, lines) = server.await.unwrap();
        assert!(r.is_err());
        let events: Vec<String> = lines.iter().map(|l| l["event"].as_str().unwrap().to_string()).collect();
        assert!(events.contains(&"EnteredKatapult".to_string()), "{events:?}");
        assert!(events.iter().any(|e| e.starts_with("Booted { app: Klipper")), "{events:?}");
    }

    #[tokio::test]
    async fn a_node_that_never_reaches_katapult_fails_the_probe_with_its_name() {
        let ebb = parse_node("ebb,0a1b2c3d4e5f,stm32g0b1xx,v1", &["ebb:never-katapult".into()]).unwrap();
        let (host, sim) = pair();
        let server = tokio::spawn(serve(sim, SimBus { nodes: vec![ebb] }, |_| {}));
        let uuid: CanUuid = "0a1b2c3d4e5f".parse().unwrap();
        let err = probe_flash(host, uuid, &image("v2"), "stm32g0b1xx").await.unwrap_err();
        assert!(
            err.to_string().contains("did not answer as Katapult")
                && err.to_string().contains("still answers as Klipper"),
            "{err:#}"
        );
        server.abort();
    }

    #[test]
    fn node_specs_are_checked() {
        assert!(parse_node("ebb,0a1b2c3d4e5f", &[]).is_err());
        assert!(parse_node("ebb,xyz,stm32g0b1xx", &[]).err().unwrap().to_string().contains("--node"));
        assert!(parse_node("ebb,0a1b2c3d4e5f,z80", &[]).err().unwrap().to_string().contains("unknown MCU"));
        assert!(parse_node("ebb,0a1b2c3d4e5f,stm32g0b1xx", &["ebb:explode".into()]).is_err());
        let n = parse_node("ebb,0a1b2c3d4e5f,stm32g0b1xx", &["sb:explode".into()]).unwrap();
        assert_eq!(n.app(), Some(CanApp::Katapult), "empty flash boots Katapult");
    }
}
