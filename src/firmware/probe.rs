//! What [`super::firmware_for`] would do for a board, found without doing it: for a dry run's
//! plan. Nothing is written or removed (not the board's config, not the cache, not the Kconfig
//! check's stamp, no lock file); the Kconfig check, when it is due, runs olddefconfig on a
//! copy in a private temporary directory with Python's bytecode caching off.

use std::time::Duration;

use serde::Serialize;

use super::{kconfig_checked_stamp, migrate, no_build_would_migrate, BuildOptions, CacheKey, FirmwareCache};
use crate::error::{Error, Result};
use crate::kconfig::{self, KConfig};
use crate::registry::{BoardEntry, Registry};

/// The cache's answer for one board.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "firmware", rename_all = "snake_case")]
pub enum Probe {
    /// make would not run: the cache has the firmware, of this version.
    Cached { version: String },
    /// make would run.
    Build { why: BuildReason },
}

/// Why a build is needed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum BuildReason {
    /// `--rebuild` was asked for.
    Rebuild,
    /// The board has no cache entry (or an unreadable one).
    NoCacheEntry,
    /// The tree's Kconfig changes the board's config before the build (`changes` options).
    ConfigMigration { changes: usize },
    /// The Klipper tree changed (version or uncommitted changes) since the cached build.
    TreeChanged,
    /// The board's config changed since the cached build.
    ConfigChanged,
    /// The compiler changed since the cached build.
    ToolchainChanged,
    /// The cache entry's key matches but its files are damaged.
    CacheDamaged,
}

impl std::fmt::Display for BuildReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BuildReason::Rebuild => write!(f, "a rebuild was asked for"),
            BuildReason::NoCacheEntry => write!(f, "no cached firmware"),
            BuildReason::ConfigMigration { changes } => {
                write!(f, "the tree's Kconfig changes the config ({changes} options)")
            }
            BuildReason::TreeChanged => write!(f, "the Klipper tree changed"),
            BuildReason::ConfigChanged => write!(f, "the config changed"),
            BuildReason::ToolchainChanged => write!(f, "the compiler changed"),
            BuildReason::CacheDamaged => write!(f, "the cached firmware is damaged"),
        }
    }
}

/// Whether `firmware_for(reg, board, opts, …)` would take the firmware from the cache, build
/// it, or fail before building (with the same error). Touches nothing.
pub async fn probe(reg: &Registry, board: &BoardEntry, opts: &BuildOptions) -> Result<Probe> {
    let config_path = super::board_config(reg, board)?;
    let klipper = reg.settings.klipper_dir();
    kconfig::check_klipper_dir(&klipper)?;

    let cache = FirmwareCache::new(opts.cache_dir.clone().unwrap_or_else(crate::registry::default_cache_dir));
    let tree = opts.tree_stamp(&klipper).await;
    let before = std::fs::read(&config_path).map_err(|e| Error::io("read", &config_path, e))?;
    let mut config_bytes = before.clone();
    let mut migrates = None;
    let stamp = std::fs::read(cache.kconfig_checked(&board.key)).ok();
    if stamp != Some(kconfig_checked_stamp(&before, &tree).into_bytes()) {
        let timeout = Duration::from_secs(reg.settings.timeouts.build_secs);
        let state_dir = opts.state_dir.clone().unwrap_or_else(crate::registry::default_state_dir);
        let turn = super::lock::TreeTurn::acquire_existing(&state_dir, &klipper, &mut ()).await?;
        let m = migrate::check_read_only(&klipper, &config_path, timeout).await?;
        drop(turn);
        if opts.cache_only && m.rewrites() {
            return Err(no_build_would_migrate(&board.key, &m));
        }
        if let Some(refused) = migrate::refusal(&board.key, &config_path, &m) {
            return Err(refused);
        }
        if m.rewrites() {
            migrates = Some(BuildReason::ConfigMigration { changes: m.describe().len() });
            config_bytes = m.migrated.clone();
        }
    }
    let config = KConfig::parse(&String::from_utf8_lossy(&config_bytes));
    kconfig::check_mcu(board, &config_path, &config)?;
    let key = CacheKey::for_config(&tree, &config_bytes, &config).await;

    if !opts.rebuild {
        if let Some(firmware) = cache.lookup(&board.key, &key)? {
            return Ok(Probe::Cached { version: firmware.version });
        }
    }
    if opts.cache_only {
        return Err(Error::NoCachedFirmware { key: board.key.clone() });
    }
    let why = if opts.rebuild {
        BuildReason::Rebuild
    } else if let Some(m) = migrates {
        m
    } else {
        match cache.cached_key(&board.key) {
            None => BuildReason::NoCacheEntry,
            Some(old) if old.tree != key.tree || old.tree_changes != key.tree_changes => BuildReason::TreeChanged,
            Some(old) if old.config_sha256 != key.config_sha256 => BuildReason::ConfigChanged,
            Some(old) if old.toolchain != key.toolchain => BuildReason::ToolchainChanged,
            Some(_) => BuildReason::CacheDamaged,
        }
    };
    Ok(Probe::Build { why })
}
