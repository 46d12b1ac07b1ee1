//! The firmware cache: one entry per board, keyed by what goes into a build — the Klipper
//! tree's `git describe --dirty` (plus a hash of the changes when dirty; for a tree that is
//! not a git checkout, a digest of the sizes and mtimes of its build inputs), the exact config
//! make is given, and the compiler version. A hit skips make entirely.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::build::{sha256_hex, Firmware};
use crate::error::{Error, Result};
use crate::kconfig::KConfig;

const ARTIFACTS: [&str; 3] = ["klipper.bin", "klipper.uf2", "klipper.dict"];

/// The inputs of a build, and their digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheKey {
    /// `git describe --always --tags --long --dirty` of the Klipper tree.
    pub tree: String,
    /// Hash of uncommitted changes when the tree is dirty.
    pub tree_changes: Option<String>,
    pub config_sha256: String,
    /// First line of the cross compiler's `--version`.
    pub toolchain: String,
    pub digest: String,
}

impl CacheKey {
    pub fn from_parts(tree: String, tree_changes: Option<String>, config_text: &[u8], toolchain: String) -> CacheKey {
        let config_sha256 = sha256_hex(config_text);
        let digest = sha256_hex(
            format!(
                "tree={tree}\nchanges={}\nconfig={config_sha256}\ntoolchain={toolchain}\n",
                tree_changes.as_deref().unwrap_or("")
            )
            .as_bytes(),
        )[..16]
            .to_string();
        CacheKey { tree, tree_changes, config_sha256, toolchain, digest }
    }

    /// The key of a build of `config_path` (the exact bytes make will be given) in `klipper`.
    pub async fn compute(klipper: &Path, config_path: &Path, config: &KConfig) -> Result<CacheKey> {
        Self::compute_with(&TreeStamp::compute(klipper).await, config_path, config).await
    }

    /// The same with the tree's fingerprint taken beforehand (once for a run of several builds).
    pub async fn compute_with(tree: &TreeStamp, config_path: &Path, config: &KConfig) -> Result<CacheKey> {
        let text = std::fs::read(config_path).map_err(|e| Error::io("read", config_path, e))?;
        Ok(Self::for_config(tree, &text, config).await)
    }

    /// The key of a build of `config_text` (a config not written anywhere yet).
    pub async fn for_config(tree: &TreeStamp, config_text: &[u8], config: &KConfig) -> CacheKey {
        let toolchain = toolchain_version(config).await;
        CacheKey::from_parts(tree.tree.clone(), tree.tree_changes.clone(), config_text, toolchain)
    }

    /// True when the tree is not a git checkout and the key is taken from its files.
    pub fn from_file_stamps(&self) -> bool {
        self.tree == NOT_GIT
    }
}

/// The Klipper tree's part of a cache key, and its Kconfig digest: taken once per run and
/// shared by every build of the run (`BuildOptions::tree`), so N builds run git once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeStamp {
    /// The tree this was taken of.
    pub klipper_dir: PathBuf,
    /// `git describe --always --tags --long --dirty`, or a note that the tree is not a git checkout.
    pub tree: String,
    /// Hash of uncommitted changes (git), or of the build inputs' sizes and mtimes (not git).
    pub tree_changes: Option<String>,
    /// [`super::migrate::kconfig_stamp`] of the tree.
    pub kconfig: String,
}

impl TreeStamp {
    /// The tree's version as Klipper's build embeds it (a dirty build adds a timestamp);
    /// `None` when the tree is not a git checkout of its own.
    pub fn version(&self) -> Option<&str> {
        (self.tree != NOT_GIT).then_some(self.tree.as_str())
    }

    pub async fn compute(klipper: &Path) -> TreeStamp {
        let kconfig = tokio::task::spawn_blocking({
            let klipper = klipper.to_path_buf();
            move || super::migrate::kconfig_stamp(&klipper)
        });
        let (tree, tree_changes) = if !is_git_tree(klipper).await {
            // No version to key on: key on the files the build reads instead.
            let stamp = tokio::task::spawn_blocking({
                let klipper = klipper.to_path_buf();
                move || content_stamp(&klipper)
            })
            .await
            .expect("stamp thread");
            (NOT_GIT.to_string(), Some(stamp))
        } else {
            // What `git describe --always --tags --long --dirty` says, without its rewrite of
            // .git/index (so a dry run writes nothing in the tree either).
            let status = git(klipper, &["status", "--porcelain", "--untracked-files=all"]).await;
            let dirty = status.as_deref().is_some_and(|s| s.lines().any(|l| !l.starts_with("??")));
            let tree = match git(klipper, &["describe", "--always", "--tags", "--long"]).await {
                Some(d) if dirty => format!("{d}-dirty"),
                Some(d) => d,
                None => "no-version".to_string(),
            };
            (tree, tree_changes(klipper, status.as_deref()).await)
        };
        TreeStamp {
            klipper_dir: klipper.to_path_buf(),
            tree,
            tree_changes,
            kconfig: kconfig.await.expect("kconfig stamp thread"),
        }
    }
}

/// `tree` of a key taken from file sizes and modification times.
const NOT_GIT: &str = "not-a-git-tree (keyed on file sizes and mtimes)";

/// A checkout of its own (a Klipper copied into some other repository is not: its version
/// would be the other repository's).
async fn is_git_tree(klipper: &Path) -> bool {
    klipper.join(".git").exists()
        && git(klipper, &["rev-parse", "--is-inside-work-tree"]).await.as_deref() == Some("true")
}

/// The top-level entries of a Klipper tree whose files go into a build (klippy/ does not,
/// except the version file used when there is no git).
const BUILD_INPUTS: [&str; 5] = ["Makefile", "src", "lib", "scripts", "klippy/.version"];

/// A digest of the path, size and modification time (ns) of every file the build reads.
/// Any edit changes a file's mtime, so an edited tree never matches an old key; a `touch`
/// costs one rebuild. Walking stats only keeps it fast on a Raspberry Pi.
pub fn content_stamp(klipper: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let mut entries: Vec<String> = Vec::new();
    let mut stack: Vec<PathBuf> = BUILD_INPUTS.iter().map(|p| klipper.join(p)).collect();
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        let rel = path.strip_prefix(klipper).unwrap_or(&path).display().to_string();
        if meta.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&path) {
                stack.extend(rd.flatten().map(|e| e.path()).filter(|p| {
                    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    !matches!(name, "__pycache__" | ".git") && !name.ends_with(".pyc")
                }));
            }
        } else {
            entries.push(format!("{rel}\0{}\0{}\0{}", meta.len(), meta.mtime(), meta.mtime_nsec()));
        }
    }
    entries.sort();
    sha256_hex(entries.join("\n").as_bytes())[..16].to_string()
}

/// A hash of everything uncommitted that could change a build: the diff against HEAD and
/// the names and contents of untracked (not ignored) files. `None` for a clean tree.
/// `git describe --dirty` alone misses untracked files.
async fn tree_changes(klipper: &Path, status: Option<&str>) -> Option<String> {
    if status?.is_empty() {
        return None;
    }
    let mut material = git(klipper, &["diff", "HEAD"]).await.unwrap_or_default();
    let untracked = git(klipper, &["ls-files", "--others", "--exclude-standard"]).await.unwrap_or_default();
    for name in untracked.lines() {
        let content = std::fs::read(klipper.join(name)).unwrap_or_default();
        material.push_str(&format!("\n{name}:{}", sha256_hex(&content)));
    }
    Some(sha256_hex(material.as_bytes())[..16].to_string())
}

async fn git(dir: &Path, args: &[&str]) -> Option<String> {
    // No optional locks: git status would otherwise refresh the tree's .git/index.
    let out = tokio::process::Command::new("git")
        .arg("--no-optional-locks")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .await
        .ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The compiler Klipper's Makefile would use for this board.
pub fn compiler_for(config: &KConfig) -> &'static str {
    match config.get("CONFIG_BOARD_DIRECTORY") {
        Some("avr") => "avr-gcc",
        Some("linux") | Some("simulator") => "gcc",
        Some("pru") => "pru-gcc",
        Some("ar100") => "or1k-linux-musl-gcc",
        _ => "arm-none-eabi-gcc",
    }
}

async fn toolchain_version(config: &KConfig) -> String {
    let cc = compiler_for(config);
    match tokio::process::Command::new(cc).arg("--version").output().await {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or(cc).to_string(),
        _ => format!("{cc}: not installed"),
    }
}

#[derive(Serialize, Deserialize)]
struct Meta {
    key: CacheKey,
    image: String,
}

pub struct FirmwareCache {
    dir: PathBuf,
}

impl FirmwareCache {
    pub fn new(dir: PathBuf) -> FirmwareCache {
        FirmwareCache { dir }
    }

    /// make's private OUT directory for a board.
    pub fn build_dir(&self, board: &str) -> PathBuf {
        self.dir.join("build").join(board)
    }

    /// The copy of the board's config that make is given (`KCONFIG_CONFIG=`).
    pub fn build_config(&self, board: &str) -> PathBuf {
        self.dir.join("build").join(format!("{board}.config"))
    }

    /// The stamp of the board's last Kconfig check that had nothing to change or say.
    pub fn kconfig_checked(&self, board: &str) -> PathBuf {
        self.dir.join("build").join(format!("{board}.kconfig-checked"))
    }

    /// The whole output of the board's last build.
    pub fn build_log(&self, board: &str) -> PathBuf {
        self.dir.join("build").join(format!("{board}.log"))
    }

    fn entry_dir(&self, board: &str) -> PathBuf {
        self.dir.join("firmware").join(board)
    }

    /// The key of the board's cache entry, whatever it is (for saying why a build is needed).
    pub fn cached_key(&self, board: &str) -> Option<CacheKey> {
        let text = std::fs::read_to_string(self.entry_dir(board).join("meta.json")).ok()?;
        serde_json::from_str::<Meta>(&text).ok().map(|m| m.key)
    }

    /// The cached firmware for these inputs, if it is there and intact.
    pub fn lookup(&self, board: &str, key: &CacheKey) -> Result<Option<Firmware>> {
        let dir = self.entry_dir(board);
        let Ok(text) = std::fs::read_to_string(dir.join("meta.json")) else { return Ok(None) };
        let Ok(meta) = serde_json::from_str::<Meta>(&text) else { return Ok(None) };
        if meta.key != *key {
            return Ok(None);
        }
        match Firmware::from_out_dir(&dir) {
            Ok(fw) => Ok(Some(fw)),
            Err(e) => {
                tracing::warn!("ignoring damaged firmware cache {}: {e}", dir.display());
                Ok(None)
            }
        }
    }

    /// Keep a fresh build as this board's cache entry (replacing the previous one whole).
    pub fn store(&self, board: &str, key: &CacheKey, out_dir: &Path) -> Result<Firmware> {
        let parent = self.dir.join("firmware");
        std::fs::create_dir_all(&parent).map_err(|e| Error::io("create directory", &parent, e))?;
        let staging = tempfile::Builder::new()
            .prefix(&format!(".{board}-"))
            .tempdir_in(&parent)
            .map_err(|e| Error::io("create a directory in", &parent, e))?;
        for name in ARTIFACTS {
            let from = out_dir.join(name);
            if from.is_file() {
                std::fs::copy(&from, staging.path().join(name)).map_err(|e| Error::io("copy", &from, e))?;
            }
        }
        let fw = Firmware::from_out_dir(staging.path())?;
        let meta = Meta { key: key.clone(), image: fw.image.file_name().unwrap().to_string_lossy().into_owned() };
        std::fs::write(staging.path().join("meta.json"), serde_json::to_vec_pretty(&meta).unwrap())
            .map_err(|e| Error::io("write", staging.path(), e))?;
        let dest = self.entry_dir(board);
        if dest.exists() {
            std::fs::remove_dir_all(&dest).map_err(|e| Error::io("replace", &dest, e))?;
        }
        let staged = staging.keep();
        std::fs::rename(&staged, &dest).map_err(|e| Error::io("rename", &staged, e))?;
        Firmware::from_out_dir(&dest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_changes_with_each_input() {
        let base = CacheKey::from_parts("v0.13.0-3-gabc".into(), None, b"CONFIG_MCU=\"x\"", "gcc 12".into());
        assert_eq!(base, CacheKey::from_parts("v0.13.0-3-gabc".into(), None, b"CONFIG_MCU=\"x\"", "gcc 12".into()));
        let variants = [
            CacheKey::from_parts("v0.13.0-4-gdef".into(), None, b"CONFIG_MCU=\"x\"", "gcc 12".into()),
            CacheKey::from_parts("v0.13.0-3-gabc-dirty".into(), Some("1".into()), b"CONFIG_MCU=\"x\"", "gcc 12".into()),
            CacheKey::from_parts("v0.13.0-3-gabc-dirty".into(), Some("2".into()), b"CONFIG_MCU=\"x\"", "gcc 12".into()),
            CacheKey::from_parts("v0.13.0-3-gabc".into(), None, b"CONFIG_MCU=\"y\"", "gcc 12".into()),
            CacheKey::from_parts("v0.13.0-3-gabc".into(), None, b"CONFIG_MCU=\"x\"", "gcc 13".into()),
        ];
        for v in &variants {
            assert_ne!(v.digest, base.digest, "{v:?}");
        }
        assert_ne!(variants[1].digest, variants[2].digest, "different uncommitted changes");
    }

    #[test]
    fn content_stamp_follows_edits_of_build_inputs_only() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("src/stm32")).unwrap();
        std::fs::create_dir_all(d.path().join("klippy")).unwrap();
        std::fs::write(d.path().join("Makefile"), "all:\n").unwrap();
        std::fs::write(d.path().join("src/stm32/gpio.c"), "int a;\n").unwrap();
        let a = content_stamp(d.path());
        assert_eq!(a, content_stamp(d.path()));
        std::fs::write(d.path().join("klippy/klippy.py"), "x\n").unwrap();
        assert_eq!(a, content_stamp(d.path()), "klippy/ is not a build input");
        std::fs::write(d.path().join("src/stm32/gpio.c"), "int b;\n").unwrap();
        let t = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        std::fs::File::options().write(true).open(d.path().join("src/stm32/gpio.c")).unwrap().set_modified(t).unwrap();
        assert_ne!(a, content_stamp(d.path()), "an edited source");
    }

    #[test]
    fn compiler_follows_board_directory() {
        assert_eq!(compiler_for(&KConfig::parse("CONFIG_BOARD_DIRECTORY=\"stm32\"")), "arm-none-eabi-gcc");
        assert_eq!(compiler_for(&KConfig::parse("CONFIG_BOARD_DIRECTORY=\"avr\"")), "avr-gcc");
        assert_eq!(compiler_for(&KConfig::parse("CONFIG_BOARD_DIRECTORY=\"linux\"")), "gcc");
    }
}
