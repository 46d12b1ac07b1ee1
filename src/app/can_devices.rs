//! `kflash devices --can`: the CAN nodes, from two sources.
//!
//! - printer.cfg through Moonraker: every `[mcu …]` with a `canbus_uuid` (nothing is stopped);
//! - a query on each CAN interface that is UP: only **unassigned** nodes answer, and Klippy
//!   assigns every node it uses, so the query needs Klipper stopped. It goes through the same
//!   print-safety gate as a flash (never while a print may run), holds each interface's lock
//!   while it listens, and Klipper is started again however it ends. Nodes Klippy had assigned
//!   before the stop still do not answer until they are reset: printer.cfg's list has them.

use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use super::flash::Reporter;
use crate::can::link::query_unassigned;
use crate::can::lock::InterfaceLock;
use crate::can::socket::SocketCan;
use crate::can::{CanError, CanUuid};
use crate::error::Result;
use crate::event::{Event, EventKind};
use crate::moonraker::Moonraker;
use crate::registry::Registry;
use crate::safety::{clear_to_stop_klipper, GateOptions};
use crate::service::{FlashLock, KlipperGuard, ServiceManager};

/// How long a query listens for answers (Klipper's canbus_query.py and flashtool: 2 s).
pub const QUERY_LISTEN: Duration = Duration::from_secs(2);

/// A CAN node printer.cfg names.
#[derive(Debug, Clone, Serialize)]
pub struct ConfiguredNode {
    /// `mcu` or `mcu NAME`.
    pub section: String,
    pub uuid: CanUuid,
    pub mcu: Option<String>,
    pub version: Option<String>,
    /// The registry key of the board with this UUID.
    pub registered: Option<String>,
}

/// An unassigned node that answered a query.
#[derive(Debug, Clone, Serialize)]
pub struct QueriedNode {
    pub interface: String,
    pub uuid: CanUuid,
    /// `Klipper`, `Katapult` or `unknown (0x..)`.
    pub application: String,
    pub registered: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CanDevices {
    /// From printer.cfg (`None`: Moonraker could not be asked; `moonraker_error` says why).
    pub configured: Option<Vec<ConfiguredNode>>,
    pub moonraker_error: Option<String>,
    /// The CAN interfaces that are UP (queried when `queried` is `Some`).
    pub interfaces: Vec<String>,
    pub queried: Option<Vec<QueriedNode>>,
}

/// CAN interfaces (ARPHRD_CAN) that are UP, by name.
pub fn up_can_interfaces() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/sys/class/net") else { return Vec::new() };
    let mut found: Vec<String> = dir
        .flatten()
        .filter(|e| {
            let read = |f: &str| std::fs::read_to_string(e.path().join(f)).unwrap_or_default();
            let up = u32::from_str_radix(read("flags").trim().trim_start_matches("0x"), 16).unwrap_or(0) & 1 != 0;
            read("type").trim() == "280" && up
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    found.sort();
    found
}

/// A CAN node printer.cfg names, taken to register it without stopping Klipper.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FromMoonraker {
    /// `mcu NAME` (or `mcu`).
    pub section: String,
    pub uuid: CanUuid,
    /// The section's `canbus_interface` (Klippy's default can0).
    pub interface: String,
    /// The chip, when Klippy has connected to the node.
    pub mcu: Option<String>,
}

/// The `[mcu NAME]` of printer.cfg with a `canbus_uuid`, by `NAME` or `mcu NAME`: which is
/// picked from `nodes` (pure; the error lists what printer.cfg has).
pub fn pick_configured<'a>(nodes: &'a [ConfiguredNode], wanted: &str) -> Result<&'a ConfiguredNode> {
    let wanted = wanted.trim();
    let section =
        if wanted == "mcu" || wanted.starts_with("mcu ") { wanted.to_string() } else { format!("mcu {wanted}") };
    if let Some(n) = nodes.iter().find(|n| n.section.eq_ignore_ascii_case(&section)) {
        return Ok(n);
    }
    let have: Vec<String> = nodes.iter().map(|n| format!("[{}] ({})", n.section, n.uuid)).collect();
    Err(crate::error::Error::InvalidInput(if have.is_empty() {
        format!(
            "printer.cfg has no [{section}] with a canbus_uuid (it has no CAN node at all): register the node with \
             `kflash add --canbus-uuid UUID` (find it with `kflash devices --can`)"
        )
    } else {
        format!("printer.cfg has no [{section}] with a canbus_uuid; its CAN nodes are {}", have.join(", "))
    }))
}

/// printer.cfg's CAN node `wanted` (`ebb36` or `mcu ebb36`), through Moonraker: nothing is
/// stopped and the bus is not queried.
pub async fn from_moonraker(reg: &Registry, wanted: &str) -> Result<FromMoonraker> {
    let mr = Moonraker::from_settings(&reg.settings);
    let nodes = configured(reg, &mr.mcus().await?);
    let node = pick_configured(&nodes, wanted)?;
    let interface = mr
        .config_option(&node.section, "canbus_interface")
        .await?
        .filter(|i| !i.trim().is_empty())
        .unwrap_or_else(|| crate::registry::DEFAULT_CAN_INTERFACE.to_string());
    Ok(FromMoonraker { section: node.section.clone(), uuid: node.uuid, interface, mcu: node.mcu.clone() })
}

/// The MCUs that are CAN nodes (a `canbus_uuid`), with their registry keys.
fn configured(reg: &Registry, mcus: &[crate::moonraker::McuStatus]) -> Vec<ConfiguredNode> {
    mcus.iter()
        .filter_map(|m| {
            let uuid: CanUuid = m.canbus_uuid.as_deref()?.trim().parse().ok()?;
            Some(ConfiguredNode {
                section: m.object.clone(),
                uuid,
                mcu: m.mcu.clone(),
                version: m.mcu_version.clone(),
                registered: registered(reg, &uuid),
            })
        })
        .collect()
}

fn registered(reg: &Registry, uuid: &CanUuid) -> Option<String> {
    reg.boards().find(|b| b.canbus_uuid.as_ref() == Some(uuid)).map(|b| b.key.clone())
}

/// printer.cfg's CAN nodes; with `query`, also the unassigned nodes on every UP CAN
/// interface, Klipper stopped around the query.
pub async fn can_devices(reg: &Registry, query: bool, gate: GateOptions, rep: &mut dyn Reporter) -> Result<CanDevices> {
    let mr = Moonraker::from_settings(&reg.settings);
    let (configured, moonraker_error) = match mr.mcus().await {
        Ok(mcus) => (Some(configured(reg, &mcus)), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let interfaces = up_can_interfaces();
    let mut out = CanDevices { configured, moonraker_error, interfaces, queried: None };
    if !query || out.interfaces.is_empty() {
        return Ok(out);
    }

    let state_dir = crate::registry::default_state_dir();
    let reason = "CAN query";
    let _lock = FlashLock::acquire(&state_dir, reason)?;
    let clearance = clear_to_stop_klipper(&mr, gate, None, rep).await?;
    rep.event(&Event::run(EventKind::KlipperStopping { service: reg.settings.klipper_service.clone() }));
    let guard = KlipperGuard::stop(ServiceManager::from_settings(&reg.settings), &state_dir, reason, clearance).await?;
    let queried = query_all(reg, &state_dir, &out.interfaces, rep).await;
    let restart = guard.restart().await;
    if let Ok(r) = &restart {
        let service = reg.settings.klipper_service.clone();
        let (downtime_secs, started) = (r.downtime.as_secs_f64(), r.started);
        rep.event(&Event::run(EventKind::KlipperRestarted { service, downtime_secs, started }));
    }
    out.queried = Some(queried?);
    restart?;
    Ok(out)
}

/// One query per interface, each in its interface's turn (never during another node's flash).
async fn query_all(
    reg: &Registry,
    state_dir: &std::path::Path,
    interfaces: &[String],
    rep: &mut dyn Reporter,
) -> Result<Vec<QueriedNode>> {
    let mut found = Vec::new();
    for interface in interfaces {
        let waiting = || rep.event(&Event::run(EventKind::CanInterfaceBusy { interface: interface.clone() }));
        let _turn = InterfaceLock::acquire(state_dir, interface, waiting).await?;
        let io = |e: std::io::Error| CanError::Io { interface: interface.clone(), message: e.to_string() };
        let mut socket = SocketCan::open(interface).map_err(io)?;
        let answers = query_unassigned(&mut socket, Instant::now() + QUERY_LISTEN).await.map_err(io)?;
        for a in answers {
            found.push(QueriedNode {
                interface: interface.clone(),
                uuid: a.uuid,
                application: a.app.name().to_string(),
                registered: registered(reg, &a.uuid),
            });
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(section: &str, uuid: &str) -> ConfiguredNode {
        ConfiguredNode {
            section: section.into(),
            uuid: uuid.parse().unwrap(),
            mcu: None,
            version: None,
            registered: None,
        }
    }

    #[test]
    fn a_configured_node_is_picked_by_its_name_or_section_and_a_wrong_name_lists_the_others() {
        let nodes = [node("mcu ebb36", "0a1b2c3d4e5f"), node("mcu sb2209", "00000000beef")];
        assert_eq!(pick_configured(&nodes, "ebb36").unwrap().section, "mcu ebb36");
        assert_eq!(pick_configured(&nodes, "mcu sb2209").unwrap().uuid.to_string(), "00000000beef");
        let e = pick_configured(&nodes, "toolhead").unwrap_err().to_string();
        assert!(e.contains("no [mcu toolhead]") && e.contains("[mcu ebb36] (0a1b2c3d4e5f)"), "{e}");
        let e = pick_configured(&[], "ebb36").unwrap_err().to_string();
        assert!(e.contains("kflash add --canbus-uuid"), "{e}");
    }
}
