//! Which builds must take turns, across kflash processes and within one.
//!
//! A Klipper build with `OUT=<dir>/ KCONFIG_CONFIG=<file>` writes only into OUT and the
//! config file (olddefconfig when `src/Kconfig` is newer, plus `<file>.old`). The rest is
//! read-only or safe to share: Python's bytecode caches (`lib/kconfiglib/__pycache__`,
//! `klippy/__pycache__`) are written atomically (temp file + rename), and `git describe
//! --dirty` only refreshes `.git/index` when it gets `index.lock`, skipping it otherwise.
//! So two builds of different boards (different OUT dirs and config copies) run at once,
//! while two builds into one OUT dir take turns ([`BuildLock`]).
//!
//! Kalico is the exception: its Makefile runs `scripts/find-firmware-extras.sh` on every make
//! parse, which rewrites `src/extras/{Kconfig,Makefile}` in the tree through truncating
//! redirects, so a concurrent make could read them half written. In such a tree every make
//! run (builds and the Kconfig check) also takes the tree's turn ([`TreeTurn`]).

use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use super::build::sha256_hex;
use crate::error::{Error, Result};
use crate::event::{EventKind, Progress};

/// True when the tree's make rewrites files inside the tree on every run (Kalico).
pub fn make_writes_in_tree(klipper: &Path) -> bool {
    std::fs::read_to_string(klipper.join("Makefile")).is_ok_and(|m| m.contains("find-firmware-extras"))
}

fn short_hash(p: &Path) -> String {
    sha256_hex(p.display().to_string().as_bytes())[..12].to_string()
}

/// The lock file of a build directory (one per tree and OUT dir).
pub fn out_lock_path(state_dir: &Path, tree: &Path, out_dir: &Path) -> PathBuf {
    state_dir.join(format!("build-{}-{}.lock", short_hash(tree), short_hash(out_dir)))
}

/// The lock file of a tree whose make writes in it (the name older kflash used for every tree).
pub fn tree_lock_path(state_dir: &Path, tree: &Path) -> PathBuf {
    state_dir.join(format!("build-{}.lock", short_hash(tree)))
}

/// Take an exclusive flock on `path` (created if needed); `waiting` is told when another
/// holder makes this wait. Returns the lock and whether it waited. The wait is cancellable:
/// dropping the future abandons the waiting thread, whose lock is then released at once.
pub(crate) async fn exclusive(path: &Path, waiting: impl FnOnce()) -> Result<(Flock<std::fs::File>, bool)> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("create directory", dir, e))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| Error::io("open", path, e))?;
    lock_file(file, path, waiting).await
}

async fn lock_file(file: std::fs::File, path: &Path, waiting: impl FnOnce()) -> Result<(Flock<std::fs::File>, bool)> {
    let file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => return Ok((lock, false)),
        Err((file, nix::errno::Errno::EWOULDBLOCK)) => file,
        Err((_, e)) => return Err(Error::io("lock", path, e.into())),
    };
    waiting();
    // A blocking flock on a thread of its own (not spawn_blocking: the runtime would wait
    // for it at exit); the wait ends when the other holder releases the lock.
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(Flock::lock(file, FlockArg::LockExclusive));
    });
    let lock = rx
        .await
        .map_err(|_| Error::io("lock", path, std::io::Error::other("the lock thread ended")))?
        .map_err(|(_, e)| Error::io("lock", path, e.into()))?;
    Ok((lock, true))
}

/// The turn of a tree whose make writes in it; `None` held for other trees.
pub struct TreeTurn {
    _lock: Option<Flock<std::fs::File>>,
    /// Another build held the turn first.
    pub waited: bool,
}

impl TreeTurn {
    /// Wait for the tree's turn if its make writes in the tree (Kalico); at once otherwise.
    pub async fn acquire(state_dir: &Path, tree: &Path, progress: &mut dyn Progress) -> Result<TreeTurn> {
        if !make_writes_in_tree(tree) {
            return Ok(TreeTurn { _lock: None, waited: false });
        }
        let (lock, waited) = exclusive(&tree_lock_path(state_dir, tree), || waiting_note(tree, progress)).await?;
        Ok(TreeTurn { _lock: Some(lock), waited })
    }

    /// [`TreeTurn::acquire`] for a dry run, which creates no file: without a lock file no
    /// kflash has built in the tree with this state directory, and nothing is waited for.
    pub async fn acquire_existing(state_dir: &Path, tree: &Path, progress: &mut dyn Progress) -> Result<TreeTurn> {
        let path = tree_lock_path(state_dir, tree);
        if !make_writes_in_tree(tree) {
            return Ok(TreeTurn { _lock: None, waited: false });
        }
        let file = match std::fs::OpenOptions::new().write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(TreeTurn { _lock: None, waited: false }),
            Err(e) => return Err(Error::io("open", &path, e)),
        };
        let (lock, waited) = lock_file(file, &path, || waiting_note(tree, progress)).await?;
        Ok(TreeTurn { _lock: Some(lock), waited })
    }
}

fn waiting_note(tree: &Path, progress: &mut dyn Progress) {
    progress.emit(EventKind::BuildWaiting { tree: tree.to_path_buf(), out_dir: None })
}

/// Held for the whole make run of one build directory.
pub struct BuildLock {
    // Dropped in this order: the tree's turn first, then the build directory.
    _tree: TreeTurn,
    _out: Flock<std::fs::File>,
    /// Another build held a lock first: what it built may be in the cache now.
    pub waited: bool,
}

impl BuildLock {
    /// Lock `out_dir` of `tree` (always in this order: the build directory, then the tree's
    /// turn when its make writes in it), telling `progress` when another build holds either.
    pub async fn acquire(
        state_dir: &Path,
        tree: &Path,
        out_dir: &Path,
        progress: &mut dyn Progress,
    ) -> Result<BuildLock> {
        let (out, out_waited) = exclusive(&out_lock_path(state_dir, tree, out_dir), || {
            progress.emit(EventKind::BuildWaiting { tree: tree.to_path_buf(), out_dir: Some(out_dir.to_path_buf()) })
        })
        .await?;
        let tree_turn = TreeTurn::acquire(state_dir, tree, progress).await?;
        Ok(BuildLock { waited: out_waited || tree_turn.waited, _tree: tree_turn, _out: out })
    }
}
