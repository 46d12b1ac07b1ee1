//! Builds of different boards against one Klipper tree run at the same time, in one kflash
//! (as flash-all runs them) and in two. The stand-in's link step waits at a rendezvous
//! (`RIG_BUILD_RENDEZVOUS`) for the other board's link step, so both builds succeed only if
//! both are in make at once; if builds took turns, the first would give up after its deadline.
//! (That two builds of one board still take turns is tests/build_lock.rs.)

mod host;

use std::path::Path;
use std::sync::Arc;

use kflash::firmware::{self, BuildOptions, Probe, TreeStamp};
use kflash::registry::Registry;

/// The stand-in tree and a config dir with two boards: nitehawk (rp2040), octopus (stm32h723).
fn two_boards(root: &Path) -> std::path::PathBuf {
    let tree = host::stand_in_tree(root);
    let cfg = host::config_dir(root, &tree);
    let boards = cfg.join("boards.toml");
    let text = std::fs::read_to_string(&boards).unwrap()
        + "\n[boards.octopus]\nname = \"Octopus\"\nmcu = \"stm32h723xx\"\nserial = \"36001F001151313339363432\"\n";
    std::fs::write(&boards, text).unwrap();
    host::menuconfig(&tree, &cfg, "nitehawk", "rp2040");
    host::menuconfig(&tree, &cfg, "octopus", "stm32h723xx");
    tree
}

#[tokio::test]
async fn two_boards_build_at_once_in_one_process() {
    let root = tempfile::tempdir().unwrap();
    let tree = two_boards(root.path());
    // Only this test's builds run in this test binary's process environment.
    std::env::set_var("RIG_BUILD_RENDEZVOUS", root.path().join("meet"));
    std::env::set_var("RIG_BUILD_RENDEZVOUS_SECS", "30");
    let reg = Registry::open(root.path().join("cfg")).unwrap();
    let stamp = Arc::new(TreeStamp::compute(&tree).await);
    let opts = BuildOptions {
        cache_dir: Some(root.path().join("cache")),
        state_dir: Some(root.path().join("state")),
        jobs: Some(1),
        tree: Some(stamp.clone()),
        ..Default::default()
    };
    let (a, b) = (reg.get("nitehawk").unwrap().clone(), reg.get("octopus").unwrap().clone());
    let (mut pa, mut pb) = ((), ());
    let (ra, rb) = tokio::join!(
        firmware::firmware_for(&reg, &a, &opts, &mut pa),
        firmware::firmware_for(&reg, &b, &opts, &mut pb)
    );
    let (ra, rb) = (ra.expect("nitehawk builds"), rb.expect("octopus builds"));
    assert!(!ra.cached && !rb.cached);
    assert_eq!((ra.firmware.mcu.as_str(), rb.firmware.mcu.as_str()), ("rp2040", "stm32h723xx"));
    assert_ne!(ra.build_dir, rb.build_dir, "each board has its own OUT dir");
    let log = std::fs::read_to_string(ra.log.as_ref().unwrap()).unwrap();
    assert!(log.contains(" -j1"), "the job budget reaches make: {log}");
    // The shared stamp keys the cache like a stamp of the build's own.
    assert_eq!(*stamp, TreeStamp::compute(&tree).await);
    let own = BuildOptions { tree: None, ..opts.clone() };
    for (entry, built) in [(&a, &ra), (&b, &rb)] {
        let probe = firmware::probe(&reg, entry, &own).await.unwrap();
        assert_eq!(probe, Probe::Cached { version: built.firmware.version.clone() });
    }
}

#[test]
fn two_kflash_processes_build_two_boards_at_once() {
    let root = tempfile::tempdir().unwrap();
    two_boards(root.path());
    let start = |key: &str| {
        let mut cmd = host::kflash(root.path(), &["build", key]);
        cmd.env("RIG_BUILD_RENDEZVOUS", root.path().join("meet"))
            .env("RIG_BUILD_RENDEZVOUS_SECS", "30")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        cmd.spawn().unwrap()
    };
    let (a, b) = (start("nitehawk"), start("octopus"));
    for (key, child) in [("nitehawk", a), ("octopus", b)] {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{key}: {:?}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
