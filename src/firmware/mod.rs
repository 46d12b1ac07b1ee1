//! Firmware for a board: build it out of tree, or take it from the cache when nothing that
//! goes into it changed (the Klipper tree's version, the board's config, the toolchain).

pub mod build;
pub mod cache;
pub mod lock;
pub mod migrate;
pub mod probe;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

pub use build::{BuildPlan, Firmware};
pub use cache::{CacheKey, FirmwareCache, TreeStamp};
pub use lock::BuildLock;
pub use migrate::Migration;
pub use probe::{probe, BuildReason, Probe};

use crate::error::{Error, Result};
use crate::event::{EventKind, Progress};
use crate::kconfig::{self, KConfig};
use crate::registry::{BoardEntry, Registry};

/// A board's firmware, built or cached.
#[derive(Debug, Clone, Serialize)]
pub struct BuildOutcome {
    pub firmware: Firmware,
    /// True when the cache had it and make did not run.
    pub cached: bool,
    pub key: CacheKey,
    /// Seconds in JSON, like every duration kflash prints.
    #[serde(serialize_with = "crate::json::serialize_secs")]
    pub elapsed: Duration,
    /// make's OUT directory for this board (what `make flash` must be given).
    pub build_dir: PathBuf,
    /// The board's config, for checks against the bootloader later.
    #[serde(skip)]
    pub config: KConfig,
    /// What the tree's Kconfig changed in the board's config before this build (applied),
    /// or had to say about it (warnings); `None` when it had nothing to change or say.
    pub migration: Option<Migration>,
    /// The whole output of the build (`None` for a cache hit).
    pub log: Option<PathBuf>,
    /// The copy of the board's config make was given; `make flash` should get this one too.
    pub built_config: PathBuf,
}

#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// Build even if the cache has this firmware.
    pub rebuild: bool,
    /// Never build: the cached firmware or an error.
    pub cache_only: bool,
    pub cache_dir: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    /// make's `-j` for this build (a share of the cores when several build at once);
    /// `None`: the settings' `build_jobs` (0 = all cores).
    pub jobs: Option<u32>,
    /// The Klipper tree's fingerprint, taken once for a run of several builds
    /// ([`TreeStamp::compute`]); `None`: this build takes it. Ignored if it is of another tree.
    pub tree: Option<Arc<TreeStamp>>,
}

impl BuildOptions {
    /// The tree's fingerprint: the one given for `klipper`, or a fresh one.
    pub async fn tree_stamp(&self, klipper: &std::path::Path) -> Arc<TreeStamp> {
        match &self.tree {
            Some(t) if t.klipper_dir == klipper => t.clone(),
            _ => Arc::new(TreeStamp::compute(klipper).await),
        }
    }
}

/// Build (or fetch from cache) the firmware for `board`.
///
/// Before anything else the board's config is checked against the tree's Kconfig (see
/// [`migrate`]): critical changes are refused, others applied to the board's config (the
/// previous one kept). make then gets a private copy of that config, never the board's file
/// itself (Klipper's Makefile would rewrite it in place when `src/Kconfig` is newer), and the
/// cache key is taken from the copy's bytes: the config that is actually built.
pub async fn firmware_for(
    reg: &Registry,
    board: &BoardEntry,
    opts: &BuildOptions,
    progress: &mut dyn Progress,
) -> Result<BuildOutcome> {
    let started = std::time::Instant::now();
    let config_path = board_config(reg, board)?;
    let klipper = reg.settings.klipper_dir();
    kconfig::check_klipper_dir(&klipper)?;

    let cache = FirmwareCache::new(opts.cache_dir.clone().unwrap_or_else(crate::registry::default_cache_dir));
    let state_dir = opts.state_dir.clone().unwrap_or_else(crate::registry::default_state_dir);
    let tree = opts.tree_stamp(&klipper).await;
    // The Kconfig check is skipped when neither the config nor the tree's Kconfig files changed
    // since a check that had nothing to change or say.
    let checked = cache.kconfig_checked(&board.key);
    let stamp = |config: &[u8]| kconfig_checked_stamp(config, &tree);
    let before = std::fs::read(&config_path).map_err(|e| Error::io("read", &config_path, e))?;
    let mut migration = None;
    if std::fs::read(&checked).ok() != Some(stamp(&before).into_bytes()) {
        let turn = lock::TreeTurn::acquire(&state_dir, &klipper, progress).await?;
        let mut m =
            migrate::check(&klipper, &config_path, Duration::from_secs(reg.settings.timeouts.build_secs)).await?;
        drop(turn);
        if opts.cache_only && m.rewrites() {
            return Err(no_build_would_migrate(&board.key, &m));
        }
        migrate::apply(&board.key, &config_path, &mut m)?;
        if m.rewrites() || !m.warnings.is_empty() {
            progress.emit(EventKind::ConfigChecked { migration: m.clone() });
        }
        if m.warnings.is_empty() {
            // Best effort: without the stamp the next build just checks again.
            let _ = crate::registry::store::write_atomic(&checked, stamp(&m.migrated).as_bytes());
        }
        migration = (m.rewrites() || !m.warnings.is_empty()).then_some(m);
    }
    let config_bytes = std::fs::read(&config_path).map_err(|e| Error::io("read", &config_path, e))?;
    let config = KConfig::parse(&String::from_utf8_lossy(&config_bytes));
    kconfig::check_mcu(board, &config_path, &config)?;

    let out_dir = cache.build_dir(&board.key);
    // The config make is given: a copy next to (not inside) OUT, so `make clean` keeps it.
    let built_config = cache.build_config(&board.key);
    write_if_changed(&built_config, &config_bytes)?;
    let key = CacheKey::compute_with(&tree, &built_config, &config).await?;
    let from_cache = |firmware, key, config, migration, built_config| BuildOutcome {
        firmware,
        cached: true,
        key,
        elapsed: started.elapsed(),
        build_dir: out_dir.clone(),
        config,
        migration,
        log: None,
        built_config,
    };
    if !opts.rebuild {
        if let Some(firmware) = cache.lookup(&board.key, &key)? {
            return Ok(from_cache(firmware, key, config, migration, built_config));
        }
    }

    if opts.cache_only {
        return Err(Error::NoCachedFirmware { key: board.key.clone() });
    }
    let build_lock = BuildLock::acquire(&state_dir, &klipper, &out_dir, progress).await?;
    // Another kflash may have built this very firmware while this one waited for the lock.
    if build_lock.waited && !opts.rebuild {
        if let Some(firmware) = cache.lookup(&board.key, &key)? {
            progress.emit(EventKind::BuildShared);
            return Ok(from_cache(firmware, key, config, migration, built_config));
        }
    }
    if out_dir.exists() {
        std::fs::remove_dir_all(&out_dir).map_err(|e| Error::io("clear", &out_dir, e))?;
    }
    let plan = BuildPlan {
        klipper_dir: klipper,
        config: built_config,
        out_dir: out_dir.clone(),
        jobs: opts.jobs.filter(|&j| j > 0).unwrap_or_else(|| jobs(reg.settings.build_jobs)),
        log: cache.build_log(&board.key),
    };
    build::run_make(&plan, Duration::from_secs(reg.settings.timeouts.build_secs), progress).await?;
    let built = Firmware::from_out_dir(&out_dir)?;
    build::check_built_mcu(&config, &built)?;
    let firmware = cache.store(&board.key, &key, &out_dir)?;
    Ok(BuildOutcome {
        firmware,
        cached: false,
        key,
        elapsed: started.elapsed(),
        build_dir: out_dir,
        config,
        migration,
        log: Some(plan.log),
        built_config: plan.config,
    })
}

/// What the Kconfig-check stamp holds: the config's hash and the tree's Kconfig digest.
fn kconfig_checked_stamp(config: &[u8], tree: &TreeStamp) -> String {
    format!("{}\n{}\n", build::sha256_hex(config), tree.kconfig)
}

/// Firmware from the cache was built from the config as it was; --no-build changes nothing.
fn no_build_would_migrate(key: &str, m: &Migration) -> Error {
    Error::InvalidInput(format!(
        "the Klipper tree's Kconfig would change the config of '{key}' ({} changes), so there is no cached firmware for it; run `kflash build {key}` to review and apply them (or drop --no-build)",
        m.describe().len(),
    ))
}

/// The board's config file, which must exist and be for the board's MCU.
pub fn board_config(reg: &Registry, board: &BoardEntry) -> Result<std::path::PathBuf> {
    let path = reg.config_path(&board.key);
    if !path.is_file() {
        return Err(Error::NoBoardConfig { key: board.key.clone(), path });
    }
    kconfig::check_mcu(board, &path, &KConfig::load(&path)?)?;
    Ok(path)
}

/// Write `bytes` to `path` unless it already holds them (an unchanged copy keeps its mtime,
/// so make's `$(OUT)autoconf.h: $(KCONFIG_CONFIG)` rule does not rebuild for nothing).
fn write_if_changed(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    if std::fs::read(path).ok().as_deref() == Some(bytes) {
        return Ok(());
    }
    crate::registry::store::write_atomic(path, bytes)
}

fn jobs(setting: u32) -> u32 {
    if setting > 0 {
        setting
    } else {
        std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1)
    }
}
