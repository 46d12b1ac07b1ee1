//! Kconfig migration: after a Klipper update the tree's Kconfig may add, drop or change
//! options of a board's saved config. Klipper's Makefile would silently rewrite the config in
//! place (olddefconfig, leaving `<file>.old`) during the build. kflash runs olddefconfig on a
//! private copy first (`KCONFIG_CONFIG=` the copy, `OUT=` a temporary directory, so neither the
//! tree nor the board's config is touched), shows what would change, refuses changes to
//! critical settings and otherwise updates the board's config atomically, keeping the previous
//! one.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::kconfig::{self, assignments};
use crate::registry::store;

/// One option whose value olddefconfig changed. `None` is "not set".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Changed {
    pub key: String,
    pub old: Option<String>,
    pub new: Option<String>,
}

/// What olddefconfig would do to a board's config.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Migration {
    /// New options, with the default they get.
    pub added: Vec<(String, Option<String>)>,
    /// Options the Kconfig no longer has, with the value they had.
    pub removed: Vec<(String, Option<String>)>,
    /// Options whose value changes.
    pub changed: Vec<Changed>,
    /// Kconfig's own warnings (e.g. `the value '0xZZZZ' is invalid ... assignment ignored`).
    pub warnings: Vec<String>,
    /// The critical options among the above (see [`kconfig::is_critical`]).
    pub critical: Vec<String>,
    /// The config olddefconfig wrote.
    #[serde(skip)]
    pub migrated: Vec<u8>,
    /// The config as it was.
    #[serde(skip)]
    pub original: Vec<u8>,
    /// Where the previous config was kept when the migration was applied.
    pub previous: Option<PathBuf>,
}

impl Migration {
    /// True when olddefconfig rewrote the file (even if only its layout changed).
    pub fn rewrites(&self) -> bool {
        self.migrated != self.original
    }

    /// What a build tells the user when the config was updated: a heading, the changes and
    /// where the previous config is kept. Empty when nothing was rewritten.
    pub fn report_lines(&self) -> Vec<String> {
        if !self.rewrites() {
            return Vec::new();
        }
        let mut lines = vec!["the Klipper tree's Kconfig updated the board's config:".to_string()];
        lines.extend(self.describe().into_iter().map(|l| format!("  {l}")));
        if let Some(prev) = &self.previous {
            lines.push(format!("  (the previous config is kept at {})", prev.display()));
        }
        lines
    }

    /// The changes as lines for a person: `+ CONFIG_X=y (new)`, `- CONFIG_Y=y (removed)`,
    /// `~ CONFIG_Z: a -> b`, critical ones marked.
    pub fn describe(&self) -> Vec<String> {
        let show = |v: &Option<String>| {
            v.clone().map(|v| if v.is_empty() { "\"\"".into() } else { v }).unwrap_or("not set".into())
        };
        let mark = |k: &str| if self.critical.iter().any(|c| c == k) { "  [critical]" } else { "" };
        let mut lines = Vec::new();
        for (k, v) in &self.added {
            lines.push(format!("+ {k}={} (new option, default){}", show(v), mark(k)));
        }
        for (k, v) in &self.removed {
            lines.push(format!("- {k}={} (option removed){}", show(v), mark(k)));
        }
        for c in &self.changed {
            lines.push(format!("~ {}: {} -> {}{}", c.key, show(&c.old), show(&c.new), mark(&c.key)));
        }
        lines
    }
}

/// Bool "not set" and absent mean the same to Kconfig.
fn effective(v: Option<&Option<String>>) -> Option<&str> {
    match v {
        None | Some(None) => None,
        Some(Some(v)) if v == "n" => None,
        Some(Some(v)) => Some(v.as_str()),
    }
}

/// The structured difference between two `.config` texts.
pub fn diff(original: &str, migrated: &str) -> Migration {
    let old = assignments(original);
    let new = assignments(migrated);
    let old_map: std::collections::HashMap<_, _> = old.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let new_map: std::collections::HashMap<_, _> = new.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut m = Migration::default();
    for (k, v) in &new {
        match old_map.get(k.as_str()) {
            None => m.added.push((k.clone(), v.clone())),
            Some(o) if effective(Some(o)) != effective(Some(v)) => {
                m.changed.push(Changed { key: k.clone(), old: (*o).clone(), new: v.clone() })
            }
            Some(_) => {}
        }
    }
    for (k, v) in &old {
        if !new_map.contains_key(k.as_str()) {
            m.removed.push((k.clone(), v.clone()));
        }
    }
    let mut critical: Vec<String> = Vec::new();
    let mut flag = |k: &str, before: Option<&str>, after: Option<&str>| {
        if kconfig::is_critical(k) && before != after && !critical.iter().any(|c| c == k) {
            critical.push(k.to_string());
        }
    };
    for (k, v) in &m.added {
        flag(k, None, effective(Some(v)));
    }
    for (k, v) in &m.removed {
        flag(k, effective(Some(v)), None);
    }
    for c in &m.changed {
        flag(&c.key, effective(Some(&c.old)), effective(Some(&c.new)));
    }
    m.critical = critical;
    m.original = original.as_bytes().to_vec();
    m.migrated = migrated.as_bytes().to_vec();
    m
}

/// Run the tree's olddefconfig on a copy of `config` and report what it would change. Neither
/// the tree nor `config` is written.
pub async fn check(klipper: &Path, config: &Path, timeout: Duration) -> Result<Migration> {
    run_check(klipper, config, timeout, false).await
}

/// [`check`] for a dry run: Python is also told not to cache bytecode in the tree. (A Kalico
/// tree's make still regenerates `src/extras/` in the tree, with the same content, on any run.)
pub async fn check_read_only(klipper: &Path, config: &Path, timeout: Duration) -> Result<Migration> {
    run_check(klipper, config, timeout, true).await
}

async fn run_check(klipper: &Path, config: &Path, timeout: Duration, read_only: bool) -> Result<Migration> {
    let original = std::fs::read_to_string(config).map_err(|e| Error::io("read", config, e))?;
    let tmp = tempfile::Builder::new()
        .prefix("kflash-olddefconfig-")
        .tempdir()
        .map_err(|e| Error::io("create a temporary directory in", std::env::temp_dir(), e))?;
    let copy = tmp.path().join("board.config");
    std::fs::write(&copy, &original).map_err(|e| Error::io("write", &copy, e))?;
    let mut cmd = tokio::process::Command::new("make");
    cmd.arg("-C")
        .arg(klipper)
        .arg(kconfig::kconfig_arg(&copy))
        .arg(kconfig::out_arg(&tmp.path().join("out")))
        .arg("olddefconfig")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if read_only {
        cmd.env("PYTHONDONTWRITEBYTECODE", "1");
    }
    let output = match tokio::time::timeout(timeout, cmd.output()).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => {
            return Err(Error::Tool { program: "make".into(), message: format!("cannot start make olddefconfig: {e}") })
        }
        Err(_) => {
            return Err(Error::Tool {
                program: "make olddefconfig".into(),
                message: format!("did not finish within {} s", timeout.as_secs()),
            })
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let copy_name = copy.display().to_string();
    let real_name = config.display().to_string();
    if !output.status.success() {
        let text = format!("{stdout}{stderr}").replace(&copy_name, &real_name);
        let lines: Vec<&str> = text.lines().collect();
        return Err(Error::Tool {
            program: "make olddefconfig".into(),
            message: format!(
                "checking {} against the tree's Kconfig failed ({}); last lines:\n{}",
                config.display(),
                output.status,
                super::build::indented_tail(&lines, 20)
            ),
        });
    }
    let migrated = std::fs::read_to_string(&copy).map_err(|e| Error::io("read", &copy, e))?;
    let mut m = diff(&original, &migrated);
    m.warnings = stderr
        .lines()
        .chain(stdout.lines())
        .filter(|l| l.contains("warning:"))
        .map(|l| l.replace(&copy_name, &real_name))
        .collect();
    Ok(m)
}

/// Apply a checked migration to the board's config: refuse when a critical setting would
/// change; otherwise keep the previous file at `<config>.prev` and replace the config
/// atomically. Nothing is written when olddefconfig changes nothing.
pub fn apply(key: &str, config: &Path, m: &mut Migration) -> Result<()> {
    if !m.rewrites() {
        return Ok(());
    }
    if let Some(refused) = refusal(key, config, m) {
        return Err(refused);
    }
    // The file must still be what was checked.
    let now = std::fs::read(config).map_err(|e| Error::io("read", config, e))?;
    if now != m.original {
        return Err(Error::Tool {
            program: "kflash".into(),
            message: format!("{} changed while it was being checked; run the command again", config.display()),
        });
    }
    let previous = previous_path(config);
    store::write_atomic(&previous, &m.original)?;
    store::write_atomic(config, &m.migrated)?;
    m.previous = Some(previous);
    Ok(())
}

/// A digest of the files that decide what olddefconfig does: the Makefile, every `Kconfig*`
/// under `src/`, and `lib/kconfiglib/`. With the config's own hash it tells whether a check
/// can be skipped because nothing it depends on changed. Contents, not mtimes: they are small
/// (about 200 KiB in Klipper), and Kalico regenerates `src/extras/Kconfig` on every make run.
pub fn kconfig_stamp(klipper: &Path) -> String {
    let mut entries = Vec::new();
    let mut stack = vec![klipper.join("Makefile"), klipper.join("src"), klipper.join("lib/kconfiglib")];
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::metadata(&path) else { continue };
        if meta.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&path) {
                stack.extend(rd.flatten().map(|e| e.path()));
            }
            continue;
        }
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let wanted =
            path.starts_with(klipper.join("lib/kconfiglib")) || name == "Makefile" || name.starts_with("Kconfig");
        if wanted && !name.ends_with(".pyc") && !name.ends_with(".tmp") {
            let content = std::fs::read(&path).unwrap_or_default();
            entries.push(format!("{}\0{}", path.display(), super::build::sha256_hex(&content)));
        }
    }
    entries.sort();
    super::build::sha256_hex(entries.join("\n").as_bytes())
}

/// The error [`apply`] gives for a migration that changes critical settings.
pub fn refusal(key: &str, config: &Path, m: &Migration) -> Option<Error> {
    if !m.rewrites() || m.critical.is_empty() {
        return None;
    }
    let mut lines = m.describe();
    lines.extend(m.warnings.iter().map(|w| format!("Kconfig {w}")));
    Some(Error::ConfigMigration {
        key: key.to_string(),
        path: config.to_path_buf(),
        changes: lines.iter().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n"),
    })
}

/// `<key>.config` → `<key>.config.prev`.
pub fn previous_path(config: &Path) -> PathBuf {
    let mut name = config.file_name().unwrap_or_default().to_os_string();
    name.push(".prev");
    config.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_classifies_added_removed_changed_and_critical() {
        let old = "CONFIG_MCU=\"stm32h723xx\"\nCONFIG_WANT_LIS2DW=y\n# CONFIG_WANT_X is not set\nCONFIG_STACK_SIZE=zz\nCONFIG_USB_SERIAL_NUMBER=\"abc\"\n";
        let new = "CONFIG_MCU=\"stm32h723xx\"\nCONFIG_WANT_NEW=y\nCONFIG_WANT_X=n\nCONFIG_STACK_SIZE=512\nCONFIG_USB_SERIAL_NUMBER=\"12345\"\n# CONFIG_STM32_CANBUS_PB0_PB1 is not set\n";
        let m = diff(old, new);
        assert_eq!(
            m.added,
            vec![("CONFIG_WANT_NEW".into(), Some("y".into())), ("CONFIG_STM32_CANBUS_PB0_PB1".into(), None)]
        );
        assert_eq!(m.removed, vec![("CONFIG_WANT_LIS2DW".into(), Some("y".into()))]);
        assert_eq!(m.changed.len(), 2, "{:?}", m.changed);
        assert_eq!(m.critical, vec!["CONFIG_USB_SERIAL_NUMBER".to_string()], "a new unset choice is not a change");
        assert!(m.rewrites());
        assert!(m.describe().iter().any(|l| l.contains("CONFIG_USB_SERIAL_NUMBER: abc -> 12345  [critical]")));
    }

    #[test]
    fn previous_config_sits_next_to_it() {
        assert_eq!(previous_path(Path::new("/c/configs/a.config")), Path::new("/c/configs/a.config.prev"));
    }
}
