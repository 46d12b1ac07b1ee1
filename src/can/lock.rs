//! One CAN operation per interface at a time, across kflash processes and within one: a flock
//! on `<state dir>/can-<interface>.lock`. A flash holds it from the bootloader request until
//! the node is back and identified, so no query is broadcast while a node is mid-flash (a
//! query makes every unassigned node answer at once, and Katapult nodes are unassigned).

use std::path::{Path, PathBuf};

use nix::fcntl::Flock;

use crate::error::Result;

pub fn lock_path(state_dir: &Path, interface: &str) -> PathBuf {
    state_dir.join(format!("can-{interface}.lock"))
}

/// The interface's turn; released on drop.
pub struct InterfaceLock {
    _lock: Flock<std::fs::File>,
    pub interface: String,
}

impl InterfaceLock {
    /// Await the interface's turn; `waiting` is told when another operation holds it. The wait
    /// is cancellable (drop the future).
    pub async fn acquire(state_dir: &Path, interface: &str, waiting: impl FnOnce()) -> Result<InterfaceLock> {
        let (lock, _waited) = crate::firmware::lock::exclusive(&lock_path(state_dir, interface), waiting).await?;
        Ok(InterfaceLock { _lock: lock, interface: interface.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_second_operation_waits_for_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let first = InterfaceLock::acquire(dir.path(), "can0", || panic!("nothing held it")).await.unwrap();
        let told = std::cell::Cell::new(false);
        let second = InterfaceLock::acquire(dir.path(), "can0", || told.set(true));
        tokio::pin!(second);
        assert!(tokio::time::timeout(Duration::from_millis(200), &mut second).await.is_err(), "it waits");
        // Another interface is free meanwhile.
        drop(InterfaceLock::acquire(dir.path(), "can1", || panic!("can1 is free")).await.unwrap());
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(5), second).await.expect("released").unwrap();
        assert_eq!(second.interface, "can0");
        assert!(told.get());
    }
}
