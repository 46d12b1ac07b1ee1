//! Real `make` runs against the stand-in Klipper tree (a git repo with a version tag whose
//! Makefile honours OUT= and KCONFIG_CONFIG= like Klipper's): out-of-tree builds, versions
//! from klipper.dict, and the firmware cache.

use std::path::{Path, PathBuf};
use std::process::Command;

use kflash::firmware::{self, BuildOptions};
use kflash::registry::{BoardEntry, FlashMethod, Registry};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

struct Setup {
    _root: tempfile::TempDir,
    tree: PathBuf,
    reg: Registry,
    opts: BuildOptions,
}

fn setup(mcu: &str) -> Setup {
    let root = tempfile::tempdir().unwrap();
    let tree = root.path().join("klipper");
    let st = Command::new(repo().join("tests/rig/standins/make-klipper-tree")).arg(&tree).output().unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let cfg_dir = root.path().join("cfg");
    std::fs::create_dir_all(cfg_dir.join("configs")).unwrap();
    std::fs::write(cfg_dir.join("settings.toml"), format!("klipper_dir = \"{}\"\nbuild_jobs = 2\n", tree.display()))
        .unwrap();
    let mut reg = Registry::open(&cfg_dir).unwrap();
    reg.add(BoardEntry {
        key: "nitehawk".into(),
        name: "Nitehawk".into(),
        mcu: mcu.into(),
        serial: Some("E661640843545B2E".into()),
        serial_pattern: None,
        flash_method: FlashMethod::Default,
        flashable: true,
        canbus_uuid: None,
        can_interface: None,
    })
    .unwrap();
    // The stand-in's menuconfig writes a realistic config for RIG_MENUCONFIG_MCU.
    let st = Command::new("make")
        .arg("-C")
        .arg(&tree)
        .arg(format!("KCONFIG_CONFIG={}", reg.config_path("nitehawk").display()))
        .arg(format!("OUT={}/", root.path().join("menuconfig-out").display()))
        .arg("menuconfig")
        .env("RIG_MENUCONFIG_MCU", mcu)
        .output()
        .unwrap();
    assert!(st.status.success());
    let opts = BuildOptions {
        rebuild: false,
        cache_only: false,
        cache_dir: Some(root.path().join("cache")),
        state_dir: Some(root.path().join("state")),
        ..Default::default()
    };
    Setup { _root: root, tree, reg, opts }
}

fn git_describe(tree: &Path) -> String {
    let o = Command::new("git")
        .arg("-C")
        .arg(tree)
        .args(["describe", "--always", "--tags", "--long", "--dirty"])
        .output()
        .unwrap();
    String::from_utf8(o.stdout).unwrap().trim().to_string()
}

#[tokio::test]
async fn builds_out_of_tree_then_hits_the_cache() {
    let s = setup("rp2040");
    let board = s.reg.get("nitehawk").unwrap().clone();
    let first = firmware::firmware_for(&s.reg, &board, &s.opts, &mut ()).await.unwrap();
    assert!(!first.cached);
    assert_eq!(first.firmware.version, git_describe(&s.tree));
    assert!(first.firmware.version.starts_with("v0.13.0-"), "{}", first.firmware.version);
    assert_eq!(first.firmware.mcu, "rp2040");
    assert_eq!(first.firmware.image.file_name().unwrap(), "klipper.bin");
    let status = Command::new("git").arg("-C").arg(&s.tree).args(["status", "--porcelain"]).output().unwrap();
    assert!(status.stdout.is_empty(), "the tree is untouched: {}", String::from_utf8_lossy(&status.stdout));

    let second = firmware::firmware_for(&s.reg, &board, &BuildOptions { cache_only: true, ..s.opts.clone() }, &mut ())
        .await
        .unwrap();
    assert!(second.cached, "same inputs: cache hit");
    assert_eq!(second.firmware.sha256, first.firmware.sha256);

    // A changed config is a different build.
    let path = s.reg.config_path("nitehawk");
    let text =
        std::fs::read_to_string(&path).unwrap().replace("CONFIG_WANT_SENSORS=y", "# CONFIG_WANT_SENSORS is not set");
    std::fs::write(&path, text).unwrap();
    let third = firmware::firmware_for(&s.reg, &board, &s.opts, &mut ()).await.unwrap();
    assert!(!third.cached);
    assert_ne!(third.key.digest, first.key.digest);

    // A new commit in the tree is a different build with a new version.
    std::fs::write(s.tree.join("src/new.c"), "int x;\n").unwrap();
    let err = firmware::firmware_for(&s.reg, &board, &BuildOptions { cache_only: true, ..s.opts.clone() }, &mut ())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no cached firmware"), "--no-build never builds: {err}");
    let dirty = firmware::firmware_for(&s.reg, &board, &s.opts, &mut ()).await.unwrap();
    assert!(!dirty.cached, "an untracked file makes the tree dirty");
    assert!(dirty.key.tree_changes.is_some());
    let forced = firmware::firmware_for(&s.reg, &board, &BuildOptions { rebuild: true, ..s.opts.clone() }, &mut ())
        .await
        .unwrap();
    assert!(!forced.cached);
}

#[tokio::test]
async fn a_board_without_config_is_refused() {
    let s = setup("rp2040");
    std::fs::remove_file(s.reg.config_path("nitehawk")).unwrap();
    let board = s.reg.get("nitehawk").unwrap().clone();
    let err = firmware::firmware_for(&s.reg, &board, &s.opts, &mut ()).await.unwrap_err();
    assert!(matches!(err, kflash::Error::NoBoardConfig { .. }), "{err}");
    assert!(err.help().unwrap().contains("run `kflash config nitehawk`"), "{err}");
    assert_eq!(err.exit_code(), kflash::error::exit::CONFIG);
}

#[tokio::test]
async fn config_for_another_mcu_is_refused_before_building() {
    let s = setup("rp2040");
    let mut board = s.reg.get("nitehawk").unwrap().clone();
    board.mcu = "stm32h723xx".into();
    let err = firmware::firmware_for(&s.reg, &board, &s.opts, &mut ()).await.unwrap_err();
    assert!(matches!(err, kflash::Error::McuMismatch { .. }), "{err}");
    assert!(!s.opts.cache_dir.as_ref().unwrap().join("build").exists(), "make never ran");
}

#[tokio::test]
async fn a_failing_build_reports_the_tail_of_its_output() {
    let s = setup("rp2040");
    std::fs::write(
        s.tree.join("Makefile"),
        "all:\n\t@for i in $$(seq 1 60); do echo compiling step $$i; done\n\t@echo 'src/foo.c:3: error: expected ;' >&2\n\t@false\nolddefconfig:\n",
    )
    .unwrap();
    let board = s.reg.get("nitehawk").unwrap().clone();
    let err = firmware::firmware_for(&s.reg, &board, &s.opts, &mut ()).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("the build failed") && msg.contains("src/foo.c:3: error: expected ;"), "{msg}");
    assert_eq!(err.exit_code(), kflash::error::exit::TOOL);
    // The exact command, runnable by hand, and the whole log with its path in the message.
    let cache = s.opts.cache_dir.clone().unwrap();
    let command = format!(
        "make -C {} KCONFIG_CONFIG={} OUT={}/ -j2",
        s.tree.display(),
        cache.join("build/nitehawk.config").display(),
        cache.join("build/nitehawk").display()
    );
    assert!(msg.contains(&format!("command: {command}")), "{msg}");
    let log = cache.join("build/nitehawk.log");
    assert!(msg.contains(&format!("full log: {}", log.display())), "{msg}");
    assert!(err.help().unwrap().contains(&log.display().to_string()), "{:?}", err.help());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("compiling step 1\n") && text.contains("compiling step 60\n"), "{text}");
    assert!(!msg.contains("compiling step 1\n"), "only the tail is shown: {msg}");
    let rerun = Command::new("sh").arg("-c").arg(&command).output().unwrap();
    assert!(String::from_utf8_lossy(&rerun.stderr).contains("src/foo.c:3: error"), "the command runs by hand");
}

/// Whether a second `BuildLock::acquire` finishes while `first` is held (it is given 300 ms;
/// when it does not, the first is dropped and the second must then get the lock).
async fn second_waits(state: &Path, tree: &Path, first_out: &str, second_out: &str) -> bool {
    use kflash::firmware::BuildLock;
    let first = BuildLock::acquire(state, tree, &tree.join(first_out), &mut ()).await.unwrap();
    let (state2, tree2, out2) = (state.to_path_buf(), tree.to_path_buf(), tree.join(second_out));
    let second = tokio::spawn(async move { BuildLock::acquire(&state2, &tree2, &out2, &mut ()).await.unwrap().waited });
    let mut second = std::pin::pin!(second);
    let early = tokio::time::timeout(std::time::Duration::from_millis(300), &mut second).await;
    drop(first);
    let (waited, reported) = match early {
        Ok(done) => (false, done.unwrap()),
        Err(_) => {
            (true, tokio::time::timeout(std::time::Duration::from_secs(10), second).await.expect("released").unwrap())
        }
    };
    assert_eq!(reported, waited, "BuildLock::waited says whether it waited");
    waited
}

#[tokio::test]
async fn builds_take_turns_per_build_directory_and_per_kalico_tree() {
    let state = tempfile::tempdir().unwrap();
    let trees = tempfile::tempdir().unwrap();
    let klipper = trees.path().join("klipper");
    std::fs::create_dir_all(&klipper).unwrap();
    std::fs::write(klipper.join("Makefile"), "OUT=out/\n").unwrap();
    assert!(second_waits(state.path(), &klipper, "build/a", "build/a").await, "one board's builds take turns");
    assert!(!second_waits(state.path(), &klipper, "build/a", "build/b").await, "two boards build at once");
    // Kalico's make rewrites src/extras/ in the tree on every run: its builds take turns.
    let kalico = trees.path().join("kalico");
    std::fs::create_dir_all(&kalico).unwrap();
    std::fs::write(kalico.join("Makefile"), "OUT=out/\n$(shell ./scripts/find-firmware-extras.sh)\n").unwrap();
    assert!(second_waits(state.path(), &kalico, "build/a", "build/b").await, "a Kalico tree's builds take turns");
    // Another tree is independent.
    let first = kflash::firmware::BuildLock::acquire(state.path(), &kalico, &kalico.join("a"), &mut ()).await.unwrap();
    let same_out = kalico.join("a");
    let other = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        kflash::firmware::BuildLock::acquire(state.path(), &klipper, &same_out, &mut ()),
    )
    .await
    .expect("another tree")
    .unwrap();
    drop(other);
    drop(first);
}

#[tokio::test]
async fn no_build_never_rewrites_the_config() {
    let s = setup("rp2040");
    let board = s.reg.get("nitehawk").unwrap().clone();
    firmware::firmware_for(&s.reg, &board, &s.opts, &mut ()).await.unwrap();
    let kc = s.tree.join("src/Kconfig");
    std::fs::write(&kc, std::fs::read_to_string(&kc).unwrap() + "\nconfig WANT_NEW\n    bool \"new\"\n    default y\n")
        .unwrap();
    let path = s.reg.config_path("nitehawk");
    let before = std::fs::read(&path).unwrap();
    let err = firmware::firmware_for(&s.reg, &board, &BuildOptions { cache_only: true, ..s.opts.clone() }, &mut ())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("would change the config of 'nitehawk'"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), before, "--no-build changes nothing");
    firmware::firmware_for(&s.reg, &board, &s.opts, &mut ()).await.unwrap();
    assert!(std::fs::read_to_string(&path).unwrap().contains("CONFIG_WANT_NEW=y"), "a build applies it");
}

/// The tree's stamp says what `git describe --dirty` says (so cache keys are unchanged), and
/// it does not refresh .git/index as describe does.
#[tokio::test]
async fn tree_stamp_matches_git_describe_dirty_without_writing_the_index() {
    let s = setup("rp2040");
    let stamp = |t: &Path| {
        let t = t.to_path_buf();
        async move { kflash::firmware::TreeStamp::compute(&t).await }
    };
    let clean = stamp(&s.tree).await;
    assert_eq!((clean.tree.as_str(), clean.tree_changes.as_deref()), (git_describe(&s.tree).as_str(), None));
    std::fs::write(s.tree.join("src/untracked.c"), "int u;\n").unwrap();
    let untracked = stamp(&s.tree).await;
    assert_eq!(untracked.tree, git_describe(&s.tree), "untracked files do not make describe dirty");
    assert!(untracked.tree_changes.is_some(), "but they change the key");
    let makefile = s.tree.join("Makefile");
    std::fs::write(&makefile, std::fs::read_to_string(&makefile).unwrap() + "\n# edited\n").unwrap();
    let index = s.tree.join(".git/index");
    let before = std::fs::metadata(&index).unwrap().modified().unwrap();
    let dirty = stamp(&s.tree).await;
    assert_eq!(std::fs::metadata(&index).unwrap().modified().unwrap(), before, ".git/index untouched");
    assert!(dirty.tree.ends_with("-dirty"), "{}", dirty.tree);
    assert_eq!(dirty.tree, git_describe(&s.tree));
    assert_ne!(dirty.tree_changes, untracked.tree_changes);
}
