//! Two kflash builds of one board against one tree: the second waits for the first's tree
//! lock, then takes the firmware the first one built instead of building it again.

mod host;
mod pty;

use std::time::Duration;

use pty::PtyChild;

#[test]
fn a_build_that_waited_for_the_lock_uses_what_the_other_built() {
    let root = tempfile::tempdir().unwrap();
    let tree = host::stand_in_tree(root.path());
    let cfg = host::config_dir(root.path(), &tree);
    host::menuconfig(&tree, &cfg, "nitehawk", "rp2040");

    // The first build holds the lock for a few seconds (the stand-in's link step).
    let mut first = host::kflash(root.path(), &["build", "nitehawk"]);
    first.env("TERM", "dumb").env("RIG_BUILD_DELAY", "4");
    let mut first = PtyChild::spawn(first);
    first.expect("building", Duration::from_secs(60));

    let mut second = host::kflash(root.path(), &["build", "nitehawk"]);
    second.env("TERM", "dumb");
    let mut second = PtyChild::spawn(second);
    second.expect("another kflash is building in", Duration::from_secs(20));
    second.expect("the other kflash built this firmware: using it", Duration::from_secs(120));
    second.expect("from cache", Duration::from_secs(20));
    let status = second.wait(Duration::from_secs(20));
    assert!(status.success(), "second build: {status:?}\n{}", second.output());
    let status = first.wait(Duration::from_secs(60));
    assert!(status.success(), "first build: {status:?}\n{}", first.output());
}
