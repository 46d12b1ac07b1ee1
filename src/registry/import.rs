//! `kflash import`: take over a kalico-flash installation — its `devices.json` (boards,
//! global settings, blocked devices) and its cached per-device configs — in one step,
//! reporting exactly what was taken and what was left behind.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use super::{store, BlockedPattern, BoardEntry, FlashMethod, Registry, Settings};
use crate::error::{Error, Result};
use crate::identity::ByIdName;

#[derive(Debug, Default, Serialize)]
pub struct ImportReport {
    pub source: PathBuf,
    /// Board keys registered.
    pub boards: Vec<String>,
    /// kalico-flash keys that are not valid kflash keys → the key the board got.
    pub renamed: Vec<(String, String)>,
    /// Board key → cached config copied into kflash.
    pub configs: Vec<(String, PathBuf)>,
    /// Settings taken, as `name = value`.
    pub settings: Vec<String>,
    /// Everything not taken, with the reason.
    pub skipped: Vec<String>,
}

/// Where kalico-flash usually lives: `~/kalico_flash/kflash/devices.json` (its repo checkout).
pub fn default_sources() -> Vec<PathBuf> {
    ["kalico_flash", "kalico-flash"].iter().map(|d| super::expand_home(&format!("~/{d}/kflash/devices.json"))).collect()
}

/// kalico-flash's config cache: `$XDG_CONFIG_HOME/kalico-flash/configs/<key>/.config`.
pub fn default_configs_root() -> PathBuf {
    super::xdg_dir("XDG_CONFIG_HOME", ".config").join("kalico-flash").join("configs")
}

/// Accept the devices.json itself, the kalico-flash checkout, or its `kflash/` package dir.
pub fn resolve_source(path: &Path) -> Option<PathBuf> {
    [path.to_path_buf(), path.join("devices.json"), path.join("kflash").join("devices.json")]
        .into_iter()
        .find(|p| p.is_file())
}

/// Import into `reg` (in memory) and, unless `dry_run`, save the registry and copy configs.
pub fn import_kalico_flash(
    reg: &mut Registry,
    devices_json: &Path,
    configs_root: &Path,
    dry_run: bool,
) -> Result<ImportReport> {
    let text = std::fs::read_to_string(devices_json).map_err(|e| Error::io("read", devices_json, e))?;
    let root: Value = serde_json::from_str(&text).map_err(|e| Error::FileParse {
        path: devices_json.to_path_buf(),
        line: e.line(),
        column: e.column(),
        message: format!("not valid JSON: {e}"),
    })?;
    let mut report = ImportReport { source: devices_json.to_path_buf(), ..Default::default() };

    import_global(&mut reg.settings, &root, &mut report);
    import_blocked(&mut reg.settings, &root, &mut report);

    let devices = root.get("devices").and_then(Value::as_object).cloned().unwrap_or_default();
    let mut copies = Vec::new();
    for (key, dev) in &devices {
        match board_from_json(key, dev) {
            Ok(entry) => {
                // kalico-flash's key may not be a slug ("EBB36 Toolhead"): the board is
                // registered under its slug, and its config must follow it there.
                let new_key = entry.key.clone();
                match reg.add(entry) {
                    Ok(()) => {
                        report.boards.push(new_key.clone());
                        if new_key != *key {
                            report.renamed.push((key.clone(), new_key.clone()));
                        }
                        let cached = configs_root.join(key).join(".config");
                        if cached.is_file() {
                            let dest = reg.config_path(&new_key);
                            if dest.exists() {
                                report
                                    .skipped
                                    .push(format!("config of '{new_key}': {} already exists", dest.display()));
                            } else {
                                copies.push((new_key, cached, dest));
                            }
                        }
                    }
                    Err(e) => report.skipped.push(format!("board '{key}': {e}")),
                }
            }
            Err(why) => report.skipped.push(format!("board '{key}': {why}")),
        }
    }

    if !dry_run {
        reg.save_settings()?;
        reg.save_boards()?;
        for (key, from, dest) in copies {
            let bytes = std::fs::read(&from).map_err(|e| Error::io("read", &from, e))?;
            store::write_atomic(&dest, &bytes)?;
            report.configs.push((key, dest));
        }
    } else {
        report.configs = copies.into_iter().map(|(k, _, d)| (k, d)).collect();
    }
    Ok(report)
}

fn board_from_json(key: &str, dev: &Value) -> std::result::Result<BoardEntry, String> {
    let field = |k: &str| dev.get(k).and_then(Value::as_str).map(str::to_string);
    let name = field("name").ok_or("no name")?;
    let pattern = field("serial_pattern").ok_or("no serial_pattern")?;
    // The pattern carries the full MCU and chip id (`usb-Klipper_stm32h723xx_<id>*`); the
    // stored `mcu` is often shortened (`stm32h723`).
    let parsed = pattern.strip_suffix('*').and_then(ByIdName::parse);
    let serial = parsed.as_ref().and_then(|n| n.serial.clone()).filter(|s| !s.contains(['*', '?', '[']));
    let mcu = match (field("mcu"), parsed.as_ref().map(|n| n.model.clone())) {
        (Some(stored), Some(full)) if super::mcu_compatible(&stored, &full) => full,
        (Some(stored), _) => stored,
        (None, Some(full)) => full,
        (None, None) => return Err("no mcu".into()),
    };
    let flash_method = match dev.get("flash_method") {
        None | Some(Value::Null) => FlashMethod::Default,
        Some(Value::String(s)) => FlashMethod::parse(s).map_err(|e| e.to_string())?,
        Some(other) => return Err(format!("flash_method {other} is not a string")),
    };
    let flashable = match dev.get("flashable") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(other) => return Err(format!("flashable {other} is not true/false")),
    };
    let key = if super::slug::is_valid_key(key) {
        key.to_string()
    } else {
        super::slug::slugify(key).ok_or("key has no letters or digits")?
    };
    Ok(BoardEntry {
        key,
        name,
        mcu,
        serial,
        serial_pattern: Some(pattern),
        flash_method,
        flashable,
        canbus_uuid: None,
        can_interface: None,
    })
}

fn import_global(settings: &mut Settings, root: &Value, report: &mut ImportReport) {
    let Some(global) = root.get("global").and_then(Value::as_object) else { return };
    let defaults = Settings::default();
    for (k, v) in global {
        let taken = match (k.as_str(), v) {
            ("klipper_dir", Value::String(s)) if settings.klipper_dir == defaults.klipper_dir => {
                settings.klipper_dir = s.clone();
                true
            }
            ("katapult_dir", Value::String(s)) if settings.katapult_dir == defaults.katapult_dir => {
                settings.katapult_dir = s.clone();
                true
            }
            ("default_flash_method", Value::String(s))
                if settings.default_flash_method == defaults.default_flash_method =>
            {
                match FlashMethod::parse(s) {
                    Ok(m) if m != FlashMethod::Default => {
                        settings.default_flash_method = m;
                        true
                    }
                    _ => {
                        report.skipped.push(format!("setting {k} = {v}: not a flash method"));
                        continue;
                    }
                }
            }
            ("allow_flash_fallback", Value::Bool(b))
                if settings.allow_flash_fallback == defaults.allow_flash_fallback =>
            {
                settings.allow_flash_fallback = *b;
                true
            }
            ("klipper_dir" | "katapult_dir" | "default_flash_method" | "allow_flash_fallback", _) => {
                report.skipped.push(format!("setting {k} = {v}: kflash already has its own value"));
                continue;
            }
            _ => false,
        };
        if taken {
            report.settings.push(format!("{k} = {v}"));
        } else {
            report.skipped.push(format!("setting {k} = {v}: no equivalent in kflash"));
        }
    }
}

fn import_blocked(settings: &mut Settings, root: &Value, report: &mut ImportReport) {
    let Some(list) = root.get("blocked_devices").and_then(Value::as_array) else { return };
    for item in list {
        let (pattern, reason) = match item {
            Value::String(p) => (p.clone(), None),
            Value::Object(o) => {
                let p = o.get("pattern").or_else(|| o.get("serial_pattern")).and_then(Value::as_str);
                match p {
                    Some(p) => (p.to_string(), o.get("reason").and_then(Value::as_str).map(str::to_string)),
                    None => {
                        report.skipped.push(format!("blocked device {item}: no pattern"));
                        continue;
                    }
                }
            }
            other => {
                report.skipped.push(format!("blocked device {other}: not a pattern"));
                continue;
            }
        };
        if settings.blocked.iter().any(|b| b.pattern == pattern) {
            continue;
        }
        report.settings.push(format!("blocked {pattern}"));
        settings.blocked.push(BlockedPattern { pattern, reason });
    }
}
