//! The board registry and global settings: `boards.toml` and `settings.toml` in kflash's
//! config directory, plus one cached Kconfig file per board under `configs/`.

pub mod import;
pub mod slug;
pub mod store;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::can::CanUuid;
use crate::error::{Error, Result};
use crate::identity::BoardIdentity;
use crate::locator::Locator;

pub const BOARDS_FILE: &str = "boards.toml";
pub const SETTINGS_FILE: &str = "settings.toml";
pub const CONFIGS_DIR: &str = "configs";

/// How a board is flashed. `Default` defers to `settings.default_flash_method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FlashMethod {
    #[default]
    Default,
    /// kflash speaks Katapult's protocol itself.
    Katapult,
    /// Klipper's `make flash FLASH_DEVICE=…`.
    MakeFlash,
    /// Katapult's own `scripts/flashtool.py`.
    Flashtool,
}

impl FlashMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            FlashMethod::Default => "default",
            FlashMethod::Katapult => "katapult",
            FlashMethod::MakeFlash => "make-flash",
            FlashMethod::Flashtool => "flashtool",
        }
    }

    pub fn parse(s: &str) -> Result<FlashMethod> {
        match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "default" => Ok(FlashMethod::Default),
            "katapult" => Ok(FlashMethod::Katapult),
            "make-flash" => Ok(FlashMethod::MakeFlash),
            "flashtool" => Ok(FlashMethod::Flashtool),
            other => Err(Error::InvalidInput(format!(
                "unknown flash method '{other}': expected katapult, make-flash, flashtool or default"
            ))),
        }
    }
}

/// One registered board.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoardEntry {
    /// The slug; it is the table name in boards.toml, not a field.
    #[serde(skip)]
    pub key: String,
    pub name: String,
    /// MCU as in the firmware's `CONFIG_MCU`, e.g. `stm32h723xx`.
    pub mcu: String,
    /// USB serial (chip id) of the board: the preferred identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// A glob over the by-id file name, as kalico-flash's `serial_pattern`; matches in
    /// Klipper, Katapult and CanBoot mode alike.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_pattern: Option<String>,
    #[serde(default)]
    pub flash_method: FlashMethod,
    /// `false` excludes the board from flash-all.
    #[serde(default = "yes")]
    pub flashable: bool,
    /// Klipper's `canbus_uuid` for a board on a CAN bus (a toolhead), or the CAN node of a
    /// USB-to-CAN bridge (which also has a USB `serial`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canbus_uuid: Option<CanUuid>,
    /// The CAN interface the node sits on; `None` means [`DEFAULT_CAN_INTERFACE`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub can_interface: Option<String>,
}

/// The CAN interface of a node that names none, as in Klipper's `[mcu] canbus_interface`.
pub const DEFAULT_CAN_INTERFACE: &str = "can0";

fn yes() -> bool {
    true
}

impl BoardEntry {
    /// Does this connected device belong to this entry? Chip-id serial + MCU when the entry
    /// has a serial, else the by-id glob in every mode's spelling.
    pub fn matches(&self, id: &BoardIdentity) -> bool {
        if !id.mode.is_eligible() {
            return false;
        }
        if let Some(serial) = &self.serial {
            return id.serial.as_deref() == Some(serial.as_str())
                && id.mcu.as_deref().is_some_and(|m| mcu_compatible(&self.mcu, m));
        }
        match (&self.serial_pattern, id.by_id_name()) {
            (Some(pattern), Some(name)) => pattern_variants(pattern).iter().any(|p| glob_match(p, name)),
            _ => false,
        }
    }

    /// Where to find the board: its USB device, or its node on a CAN bus. A USB-to-CAN bridge
    /// has both a USB serial and a UUID; it is flashed over USB, so it is located by USB.
    pub fn locator(&self) -> Locator {
        match (&self.serial, &self.serial_pattern, &self.canbus_uuid) {
            (None, None, Some(uuid)) => Locator::Can { interface: self.can_interface().to_string(), uuid: *uuid },
            _ => Locator::Usb { serial: self.serial.clone(), serial_pattern: self.serial_pattern.clone() },
        }
    }

    /// The CAN interface this board's node is on (or, for a bridge, provides).
    pub fn can_interface(&self) -> &str {
        self.can_interface.as_deref().unwrap_or(DEFAULT_CAN_INTERFACE)
    }

    /// A USB board that is also a CAN node: Klipper's USB-to-CAN bridge, which provides
    /// [`BoardEntry::can_interface`] for the CAN boards behind it.
    pub fn is_can_bridge(&self) -> bool {
        self.canbus_uuid.is_some() && (self.serial.is_some() || self.serial_pattern.is_some())
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if !slug::is_valid_key(&self.key) {
            return Err(format!(
                "board key '{}' must be lower-case letters, digits, '-' or '_' (at most {} characters)",
                self.key,
                slug::MAX_KEY_LEN
            ));
        }
        if self.name.trim().is_empty() {
            return Err(format!("board '{}' has an empty name", self.key));
        }
        if self.mcu.trim().is_empty() {
            return Err(format!("board '{}' has an empty mcu", self.key));
        }
        if self.serial.is_none() && self.serial_pattern.is_none() && self.canbus_uuid.is_none() {
            return Err(format!(
                "board '{}' needs `serial` or `serial_pattern` (USB) or `canbus_uuid` (CAN) to be recognised",
                self.key
            ));
        }
        if let Some(i) = &self.can_interface {
            crate::locator::check_interface_name(i).map_err(|m| format!("board '{}': {m}", self.key))?;
        }
        if let Some(p) = &self.serial_pattern {
            glob::Pattern::new(p)
                .map_err(|e| format!("board '{}': serial_pattern '{p}' is not a valid glob: {e}", self.key))?;
        }
        Ok(())
    }
}

/// MCU names match when one is a prefix of the other, case-insensitively, so kalico-flash's
/// shortened `stm32h723` still matches the firmware's `stm32h723xx`.
pub fn mcu_compatible(a: &str, b: &str) -> bool {
    let (a, b) = (a.to_ascii_lowercase(), b.to_ascii_lowercase());
    !a.is_empty() && !b.is_empty() && (a.starts_with(&b) || b.starts_with(&a))
}

/// A by-id pattern in the spellings of every mode, so a board registered while running
/// Klipper is still found in its bootloader.
fn pattern_variants(pattern: &str) -> Vec<String> {
    const PREFIXES: [&str; 3] = ["usb-Klipper_", "usb-katapult_", "usb-CanBoot_"];
    let lower = pattern.to_ascii_lowercase();
    match PREFIXES.iter().find(|p| lower.starts_with(&p.to_ascii_lowercase())) {
        Some(p) => PREFIXES.iter().map(|q| format!("{q}{}", &pattern[p.len()..])).collect(),
        None => vec![pattern.to_string()],
    }
}

fn glob_match(pattern: &str, name: &str) -> bool {
    glob::Pattern::new(pattern).is_ok_and(|p| p.matches(name))
}

/// kalico-flash's pattern for a by-id name: drop `-ifNN` and append `*`.
pub fn serial_pattern_for(by_id_name: &str) -> String {
    let base = match by_id_name.rfind("-if") {
        Some(i) if by_id_name[i + 3..].bytes().all(|b| b.is_ascii_digit()) => &by_id_name[..i],
        _ => by_id_name,
    };
    format!("{base}*")
}

/// A by-id glob that must never be registered or flashed (kalico-flash's `blocked_devices`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockedPattern {
    pub pattern: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Deadlines for the slow steps, in seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    pub build_secs: u64,
    /// From the 1200-baud request to the board showing up in its bootloader.
    pub bootloader_secs: u64,
    /// From the end of flashing to the board showing up running Klipper again.
    pub reconnect_secs: u64,
    pub flash_secs: u64,
    pub service_secs: u64,
    pub moonraker_secs: u64,
    pub klippy_ready_secs: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            build_secs: 600,
            bootloader_secs: 10,
            reconnect_secs: 30,
            flash_secs: 120,
            service_secs: 30,
            moonraker_secs: 5,
            klippy_ready_secs: 60,
        }
    }
}

/// Global settings (`settings.toml`). Every field has a default, so an empty or missing
/// file is valid; unknown fields are refused so typos do not go unnoticed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub klipper_dir: String,
    pub katapult_dir: String,
    pub moonraker_url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moonraker_api_key: Option<String>,
    /// Moonraker's Unix socket (`<printer_data>/comms/moonraker.sock`): the agent
    /// connection of `kflash daemon` (no authentication needed on the printer host).
    pub moonraker_socket: String,
    pub klipper_service: String,
    /// How to run systemctl; the service name and `stop`/`start` are appended.
    pub service_command: String,
    /// `make -jN`; 0 means one job per CPU.
    pub build_jobs: u32,
    pub default_flash_method: FlashMethod,
    pub allow_flash_fallback: bool,
    /// `kflash daemon`: re-flash a registered board found stuck in Katapult with its cached
    /// image for the host's version, through the print gate. Off unless asked for.
    pub auto_recover: bool,
    pub blocked: Vec<BlockedPattern>,
    pub timeouts: Timeouts,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            klipper_dir: "~/klipper".into(),
            katapult_dir: "~/katapult".into(),
            moonraker_url: "http://localhost:7125".into(),
            moonraker_api_key: None,
            moonraker_socket: "~/printer_data/comms/moonraker.sock".into(),
            klipper_service: "klipper".into(),
            service_command: "sudo -n systemctl".into(),
            build_jobs: 0,
            default_flash_method: FlashMethod::Katapult,
            allow_flash_fallback: true,
            auto_recover: false,
            blocked: Vec::new(),
            timeouts: Timeouts::default(),
        }
    }
}

impl Settings {
    pub fn klipper_dir(&self) -> PathBuf {
        expand_home(&self.klipper_dir)
    }

    pub fn katapult_dir(&self) -> PathBuf {
        expand_home(&self.katapult_dir)
    }

    pub fn moonraker_socket(&self) -> PathBuf {
        expand_home(&self.moonraker_socket)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if self.default_flash_method == FlashMethod::Default {
            return Err("default_flash_method must be katapult, make-flash or flashtool".into());
        }
        if !(self.moonraker_url.starts_with("http://") || self.moonraker_url.starts_with("https://")) {
            return Err(format!("moonraker_url '{}' must start with http:// or https://", self.moonraker_url));
        }
        if self.klipper_service.trim().is_empty() {
            return Err("klipper_service must not be empty".into());
        }
        if self.service_command.split_whitespace().next().is_none() {
            return Err("service_command must not be empty".into());
        }
        for b in &self.blocked {
            glob::Pattern::new(&b.pattern)
                .map_err(|e| format!("blocked pattern '{}' is not a valid glob: {e}", b.pattern))?;
        }
        Ok(())
    }

    /// Why a by-id name is blocked, if it is. Beacon probes are always blocked: they enumerate
    /// as serial devices but are not Klipper MCUs.
    pub fn blocked_reason(&self, by_id_name: &str) -> Option<String> {
        let name = by_id_name.to_ascii_lowercase();
        if glob_match("usb-beacon_*", &name) {
            return Some("Beacon probe (not a Klipper MCU)".into());
        }
        self.blocked
            .iter()
            .find(|b| glob_match(&b.pattern.to_ascii_lowercase(), &name))
            .map(|b| b.reason.clone().unwrap_or_else(|| format!("matches blocked pattern {}", b.pattern)))
    }

    /// Set one setting from text, e.g. `timeouts.build_secs` = `900`. The new value goes
    /// through the same parsing and validation as the file, so a bad value is refused.
    pub fn with_value(&self, dotted_key: &str, raw: &str) -> Result<Settings> {
        let mut table = toml::Value::try_from(self).map_err(|e| Error::InvalidInput(e.to_string()))?;
        let value = parse_setting_value(raw);
        let mut cursor = &mut table;
        let parts: Vec<&str> = dotted_key.split('.').collect();
        for (i, part) in parts.iter().enumerate() {
            let t =
                cursor.as_table_mut().ok_or_else(|| Error::InvalidInput(format!("'{dotted_key}' is not a setting")))?;
            if i + 1 == parts.len() {
                t.insert(part.to_string(), value.clone());
                break;
            }
            cursor = t.get_mut(*part).ok_or_else(|| Error::InvalidInput(format!("unknown setting '{dotted_key}'")))?;
        }
        let text = toml::to_string(&table).map_err(|e| Error::InvalidInput(e.to_string()))?;
        let parsed: Settings = toml::from_str(&text)
            .map_err(|e| Error::InvalidInput(format!("cannot set {dotted_key} = {raw}: {}", e.message().trim())))?;
        parsed.validate().map_err(Error::InvalidInput)?;
        Ok(parsed)
    }

    pub fn without_value(&self, dotted_key: &str) -> Result<Settings> {
        match dotted_key {
            "moonraker_api_key" => Ok(Settings { moonraker_api_key: None, ..self.clone() }),
            _ => Err(Error::InvalidInput(format!("'{dotted_key}' cannot be unset; set it to a value instead"))),
        }
    }
}

/// Setting values are TOML literals when they parse as one (numbers, booleans), else strings.
fn parse_setting_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

pub fn expand_home(p: &str) -> PathBuf {
    match p.strip_prefix("~/").or(if p == "~" { Some("") } else { None }) {
        Some(rest) => home_dir().join(rest),
        None => PathBuf::from(p),
    }
}

fn home_dir() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).or_else(dirs::home_dir).unwrap_or_else(|| PathBuf::from("/"))
}

/// `--config-dir`, else `$KFLASH_CONFIG_DIR`, else `$XDG_CONFIG_HOME/kflash` (when absolute),
/// else `~/.config/kflash`.
pub fn default_config_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KFLASH_CONFIG_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    xdg_dir("XDG_CONFIG_HOME", ".config").join("kflash")
}

/// `$XDG_STATE_HOME/kflash`, else `~/.local/state/kflash`.
pub fn default_state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KFLASH_STATE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    xdg_dir("XDG_STATE_HOME", ".local/state").join("kflash")
}

/// `$XDG_CACHE_HOME/kflash`, else `~/.cache/kflash`: build trees and the firmware cache.
pub fn default_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KFLASH_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    xdg_dir("XDG_CACHE_HOME", ".cache").join("kflash")
}

fn xdg_dir(var: &str, fallback: &str) -> PathBuf {
    match std::env::var_os(var).map(PathBuf::from) {
        Some(p) if p.is_absolute() => p,
        _ => home_dir().join(fallback),
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BoardsFile {
    #[serde(default)]
    boards: BTreeMap<String, BoardEntry>,
    /// Boards whose firmware config was seeded from a board profile (key -> profile name)
    /// and not yet reviewed in menuconfig: flash and flash-all refuse them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    unreviewed_configs: BTreeMap<String, String>,
}

const BOARDS_HEADER: &str = "# kflash board registry. Edit with `kflash add|set|remove`, or by hand.\n\n";
const SETTINGS_HEADER: &str = "# kflash settings. Edit with `kflash settings set KEY VALUE`, or by hand.\n\n";

/// The loaded registry: boards and settings from one config directory.
#[derive(Debug, Clone)]
pub struct Registry {
    dir: PathBuf,
    boards: BTreeMap<String, BoardEntry>,
    unreviewed: BTreeMap<String, String>,
    pub settings: Settings,
}

impl Registry {
    /// Load both files; missing files mean an empty registry and default settings. Any parse
    /// or validation error stops here, before anything could be written.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Registry> {
        let dir = dir.into();
        let boards_path = dir.join(BOARDS_FILE);
        let file = store::load_toml::<BoardsFile>(&boards_path)?.unwrap_or_default();
        let mut boards = file.boards;
        for (key, b) in boards.iter_mut() {
            b.key = key.clone();
            b.validate().map_err(|m| Error::FileInvalid { path: boards_path.clone(), message: m })?;
        }
        check_unique_names(boards.values())
            .map_err(|m| Error::FileInvalid { path: boards_path.clone(), message: m })?;
        let settings_path = dir.join(SETTINGS_FILE);
        let settings = store::load_toml::<Settings>(&settings_path)?.unwrap_or_default();
        settings.validate().map_err(|m| Error::FileInvalid { path: settings_path, message: m })?;
        // A mark for a board that is no longer registered means nothing; it goes at the next save.
        let unreviewed = file.unreviewed_configs.into_iter().filter(|(k, _)| boards.contains_key(k)).collect();
        Ok(Registry { dir, boards, unreviewed, settings })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn boards(&self) -> impl Iterator<Item = &BoardEntry> {
        self.boards.values()
    }

    pub fn get(&self, key: &str) -> Result<&BoardEntry> {
        self.boards.get(key).ok_or_else(|| Error::UnknownBoard(key.to_string()))
    }

    /// A fresh key for a display name.
    pub fn key_for_name(&self, name: &str) -> Result<String> {
        slug::unique_key(name, |k| self.boards.contains_key(k))
            .ok_or_else(|| Error::InvalidInput(format!("'{name}' has no letters or digits to make a board key from")))
    }

    /// Register a board (in memory; call [`Registry::save_boards`]).
    pub fn add(&mut self, entry: BoardEntry) -> Result<()> {
        entry.validate().map_err(Error::InvalidInput)?;
        if self.boards.contains_key(&entry.key) {
            return Err(Error::BoardConflict(format!("a board with key '{}' is already registered", entry.key)));
        }
        if let Some(other) = self.boards.values().find(|b| b.name.eq_ignore_ascii_case(&entry.name)) {
            return Err(Error::BoardConflict(format!(
                "the name '{}' is already used by board '{}'",
                entry.name, other.key
            )));
        }
        if let Some(serial) = &entry.serial {
            if let Some(other) =
                self.boards.values().find(|b| b.serial.as_ref() == Some(serial) && mcu_compatible(&b.mcu, &entry.mcu))
            {
                return Err(Error::BoardConflict(format!(
                    "the {} with serial {serial} is already registered as '{}'",
                    entry.mcu, other.key
                )));
            }
        }
        if let (Some(uuid), Locator::Can { interface, .. }) = (&entry.canbus_uuid, entry.locator()) {
            if let Some(other) =
                self.boards.values().find(|b| b.locator().is_can() && b.canbus_uuid.as_ref() == Some(uuid))
            {
                return Err(Error::BoardConflict(format!(
                    "CAN node {uuid} is already registered as '{}' (on {interface})",
                    other.key
                )));
            }
        }
        self.boards.insert(entry.key.clone(), entry);
        Ok(())
    }

    pub fn remove(&mut self, key: &str) -> Result<BoardEntry> {
        self.unreviewed.remove(key);
        self.boards.remove(key).ok_or_else(|| Error::UnknownBoard(key.to_string()))
    }

    /// The profile a board's config was seeded from, while nobody has reviewed it in
    /// menuconfig; `None` for a reviewed (or hand-made) config.
    pub fn unreviewed_profile(&self, key: &str) -> Option<&str> {
        self.unreviewed.get(key).map(String::as_str)
    }

    /// Mark a board's config as seeded from `profile` and not reviewed (in memory; call
    /// [`Registry::save_boards`]).
    pub fn mark_unreviewed(&mut self, key: &str, profile: &str) -> Result<()> {
        self.get(key)?;
        self.unreviewed.insert(key.to_string(), profile.to_string());
        Ok(())
    }

    /// Mark a board's config as reviewed; true if it was not before.
    pub fn mark_reviewed(&mut self, key: &str) -> bool {
        self.unreviewed.remove(key).is_some()
    }

    /// Change a board; the result must still be valid and names still unique.
    pub fn update(&mut self, key: &str, change: impl FnOnce(&mut BoardEntry)) -> Result<&BoardEntry> {
        let mut entry = self.get(key)?.clone();
        change(&mut entry);
        entry.key = key.to_string();
        entry.validate().map_err(Error::InvalidInput)?;
        if let Some(other) = self.boards.values().find(|b| b.key != key && b.name.eq_ignore_ascii_case(&entry.name)) {
            return Err(Error::BoardConflict(format!(
                "the name '{}' is already used by board '{}'",
                entry.name, other.key
            )));
        }
        self.boards.insert(key.to_string(), entry);
        Ok(&self.boards[key])
    }

    pub fn save_boards(&self) -> Result<()> {
        let file = BoardsFile { boards: self.boards.clone(), unreviewed_configs: self.unreviewed.clone() };
        store::save_toml(&self.dir.join(BOARDS_FILE), BOARDS_HEADER, &file)
    }

    pub fn save_settings(&self) -> Result<()> {
        store::save_toml(&self.dir.join(SETTINGS_FILE), SETTINGS_HEADER, &self.settings)
    }

    /// Where a board's cached firmware config (Kconfig `.config`) lives.
    pub fn config_path(&self, key: &str) -> PathBuf {
        self.dir.join(CONFIGS_DIR).join(format!("{key}.config"))
    }
}

fn check_unique_names<'a>(boards: impl Iterator<Item = &'a BoardEntry>) -> std::result::Result<(), String> {
    let mut seen: BTreeMap<String, &str> = BTreeMap::new();
    for b in boards {
        if let Some(first) = seen.insert(b.name.to_lowercase(), &b.key) {
            return Err(format!("boards '{first}' and '{}' have the same name '{}'", b.key, b.name));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
