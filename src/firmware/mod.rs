//! Firmware for a board: build it out of tree, or take it from the cache when nothing that
//! goes into it changed (the Klipper tree's version, the board's config, the toolchain).

pub mod build;
pub mod cache;

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

pub use build::{BuildPlan, BuildProgress, Firmware};
pub use cache::{CacheKey, FirmwareCache};

use crate::error::{Error, Result};
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
}

#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// Build even if the cache has this firmware.
    pub rebuild: bool,
    /// Never build: the cached firmware or an error.
    pub cache_only: bool,
    pub cache_dir: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
}

/// Build (or fetch from cache) the firmware for `board`.
pub async fn firmware_for(
    reg: &Registry,
    board: &BoardEntry,
    opts: &BuildOptions,
    progress: &mut dyn BuildProgress,
) -> Result<BuildOutcome> {
    let started = std::time::Instant::now();
    let config_path = reg.config_path(&board.key);
    if !config_path.is_file() {
        return Err(Error::NoBoardConfig { key: board.key.clone(), path: config_path });
    }
    let config = KConfig::load(&config_path)?;
    kconfig::check_mcu(board, &config_path, &config)?;
    let klipper = reg.settings.klipper_dir();
    kconfig::check_klipper_dir(&klipper)?;

    let cache = FirmwareCache::new(opts.cache_dir.clone().unwrap_or_else(crate::registry::default_cache_dir));
    let key = CacheKey::compute(&klipper, &config_path, &config).await?;
    if !opts.rebuild {
        if let Some(firmware) = cache.lookup(&board.key, &key)? {
            return Ok(BuildOutcome {
                firmware,
                cached: true,
                key,
                elapsed: started.elapsed(),
                build_dir: cache.build_dir(&board.key),
                config,
            });
        }
    }

    if opts.cache_only {
        return Err(Error::NoCachedFirmware { key: board.key.clone() });
    }
    let state_dir = opts.state_dir.clone().unwrap_or_else(crate::registry::default_state_dir);
    let _tree_lock = cache::TreeLock::acquire(&state_dir, &klipper, progress).await?;
    let out_dir = cache.build_dir(&board.key);
    if out_dir.exists() {
        std::fs::remove_dir_all(&out_dir).map_err(|e| Error::io("clear", &out_dir, e))?;
    }
    let plan = BuildPlan {
        klipper_dir: klipper,
        config: config_path,
        out_dir: out_dir.clone(),
        jobs: jobs(reg.settings.build_jobs),
    };
    build::run_make(&plan, Duration::from_secs(reg.settings.timeouts.build_secs), progress).await?;
    let built = Firmware::from_out_dir(&out_dir)?;
    build::check_built_mcu(&config, &built)?;
    let firmware = cache.store(&board.key, &key, &out_dir)?;
    Ok(BuildOutcome { firmware, cached: false, key, elapsed: started.elapsed(), build_dir: out_dir, config })
}

fn jobs(setting: u32) -> u32 {
    if setting > 0 {
        setting
    } else {
        std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1)
    }
}
