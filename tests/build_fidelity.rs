//! The user's Klipper tree is theirs: the `kflash` binary against the stand-in Klipper tree
//! (whose Makefile, like Klipper's, remakes `$(OUT)board-link` on every run and rewrites a
//! config older than `src/Kconfig` in place). Covers the Step 4 build-fidelity items: the
//! tree and its in-tree build untouched (6), no stale firmware from a tree without git (7),
//! Kconfig migration before building (8), import of non-slug keys (10) and what `config`
//! says (11). Item 9 (the build log and command) is in tests/firmware_build.rs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::{kflash_env, kflash_tty, text, BOARDS};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

struct Rig {
    root: tempfile::TempDir,
    tree: PathBuf,
    cfg: PathBuf,
}

fn make_tree(dest: &Path) {
    let st =
        Command::new(repo().join("tests/rig/standins/make-klipper-tree")).arg(dest).arg("--quiet").output().unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
}

/// A stand-in tree and a kflash config dir pointing at it (cache and state private too).
fn rig() -> Rig {
    let root = tempfile::tempdir().unwrap();
    let tree = root.path().join("klipper");
    make_tree(&tree);
    let cfg = root.path().join("cfg");
    std::fs::create_dir_all(&cfg).unwrap();
    std::fs::write(cfg.join("boards.toml"), BOARDS).unwrap();
    std::fs::write(cfg.join("settings.toml"), format!("klipper_dir = \"{}\"\nbuild_jobs = 2\n", tree.display()))
        .unwrap();
    Rig { root, tree, cfg }
}

impl Rig {
    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("KFLASH_CACHE_DIR".into(), self.root.path().join("cache").display().to_string()),
            ("KFLASH_STATE_DIR".into(), self.root.path().join("state").display().to_string()),
        ]
    }

    fn run(&self, args: &[&str], extra: &[(&str, &str)]) -> Output {
        let env = self.env();
        let mut all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        all.extend_from_slice(extra);
        kflash_env(&self.cfg, args, &all)
    }

    fn run_tty(&self, args: &[&str], extra: &[(&str, &str)]) -> Output {
        let env = self.env();
        let mut all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        all.extend_from_slice(extra);
        kflash_tty(&self.cfg, args, &all)
    }

    fn config(&self, key: &str) -> PathBuf {
        self.cfg.join("configs").join(format!("{key}.config"))
    }

    /// The board's config as the stand-in's menuconfig makes it, without touching the tree.
    fn configure(&self, key: &str, mcu: &str) {
        let st = Command::new("make")
            .arg("-C")
            .arg(&self.tree)
            .arg(format!("KCONFIG_CONFIG={}", self.config(key).display()))
            .arg(format!("OUT={}/", self.root.path().join("setup-out").display()))
            .arg("menuconfig")
            .env("RIG_MENUCONFIG_MCU", mcu)
            .output()
            .unwrap();
        assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    }
}

fn ok(o: &Output) -> String {
    let (so, se) = text(o);
    assert!(o.status.success(), "exit {:?}\nstdout:\n{so}\nstderr:\n{se}", o.status.code());
    so
}

/// `git status --porcelain --ignored` plus every entry under out/: path, kind, symlink
/// target, size and mtime.
fn snapshot(tree: &Path) -> String {
    let st = Command::new("git").arg("-C").arg(tree).args(["status", "--porcelain", "--ignored"]).output().unwrap();
    let mut s = String::from_utf8(st.stdout).unwrap();
    let mut stack = vec![tree.join("out")];
    let mut entries = Vec::new();
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else { continue };
        let rel = p.strip_prefix(tree).unwrap().display().to_string();
        if meta.file_type().is_symlink() {
            entries.push(format!("{rel} -> {}", std::fs::read_link(&p).unwrap().display()));
        } else if meta.is_dir() {
            entries.push(format!("{rel}/"));
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else {
            entries.push(format!("{rel} {} {:?}", meta.len(), meta.modified().unwrap()));
        }
    }
    entries.sort();
    s.push_str(&entries.join("\n"));
    s
}

// ---------------------------------------------------------------- item 6

#[test]
fn every_command_leaves_the_tree_and_its_in_tree_build_alone() {
    let r = rig();
    // The user's own in-tree build, for an rp2040: klipper/.config and klipper/out/.
    for args in [&["menuconfig"][..], &[]] {
        let st = Command::new("make").arg("-C").arg(&r.tree).args(args).env("RIG_MENUCONFIG_MCU", "rp2040").output();
        assert!(st.unwrap().status.success());
    }
    assert_eq!(std::fs::read_link(r.tree.join("out/board")).unwrap(), r.tree.join("src/rp2040"));
    let before = snapshot(&r.tree);
    assert!(before.contains("!! .config") && before.contains("out/klipper.bin"), "{before}");

    let steps: [(&str, &[&str], bool); 5] = [
        ("config (new board)", &["config", "octopus"], true),
        ("config (existing)", &["config", "octopus"], true),
        ("config --show", &["config", "octopus", "--show"], false),
        ("build", &["build", "octopus"], false),
        ("build (cached)", &["build", "octopus"], false),
    ];
    for (what, args, tty) in steps {
        let env = [("RIG_MENUCONFIG_MCU", "stm32h723xx")];
        let out = if tty { r.run_tty(args, &env) } else { r.run(args, &env) };
        ok(&out);
        assert_eq!(snapshot(&r.tree), before, "`kflash {}` ({what}) changed the Klipper tree", args.join(" "));
    }
    assert!(r.config("octopus").is_file());
    // A Klipper update (here: a new option in src/Kconfig): the Kconfig check and the
    // migration run on copies too.
    let kc = r.tree.join("src/Kconfig");
    std::fs::write(&kc, std::fs::read_to_string(&kc).unwrap() + "\nconfig WANT_NEW\n    bool \"new\"\n    default y\n")
        .unwrap();
    let before = snapshot(&r.tree);
    for args in [&["build", "octopus"][..], &["build", "octopus", "--rebuild"]] {
        ok(&r.run(args, &[]));
        assert_eq!(snapshot(&r.tree), before, "`kflash {}` changed the Klipper tree", args.join(" "));
    }
    assert!(std::fs::read_to_string(r.config("octopus")).unwrap().contains("CONFIG_WANT_NEW=y"));
    // The user's next plain make still builds their rp2040 firmware.
    assert_eq!(std::fs::read_link(r.tree.join("out/board")).unwrap(), r.tree.join("src/rp2040"));
    // (`kflash flash` needs udev and a board; its build step is firmware_for, as `build`.)
}

// ---------------------------------------------------------------- item 7

#[test]
fn a_tree_without_git_is_never_served_stale() {
    let r = rig();
    // A copy of the tree without .git (a tarball or a copied checkout).
    let plain = r.root.path().join("plain");
    let st = Command::new("cp").arg("-a").arg(&r.tree).arg(&plain).status().unwrap();
    assert!(st.success());
    std::fs::remove_dir_all(plain.join(".git")).unwrap();
    std::fs::write(r.cfg.join("settings.toml"), format!("klipper_dir = \"{}\"\nbuild_jobs = 2\n", plain.display()))
        .unwrap();
    r.configure("octopus", "stm32h723xx");

    let first = ok(&r.run(&["build", "octopus", "--json"], &[]));
    let first: serde_json::Value = serde_json::from_str(&first).unwrap();
    assert_eq!(first["cached"], false);
    let again: serde_json::Value = serde_json::from_str(&ok(&r.run(&["build", "octopus", "--json"], &[]))).unwrap();
    assert_eq!(again["cached"], true, "nothing changed: the cache serves it");

    // Edit a source file (same size, so only the content and mtime differ).
    let sched = plain.join("src/sched.c");
    let text = std::fs::read_to_string(&sched).unwrap().replace("placeholder", "PLACEHOLDER");
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&sched, text).unwrap();
    let out = ok(&r.run(&["build", "octopus"], &[]));
    assert!(!out.contains("from cache"), "an edited tree must be rebuilt: {out}");
    assert!(out.contains("not a git checkout"), "{out}");
}

// ---------------------------------------------------------------- item 8

/// Make the tree's Kconfig newer than the board's config, as after a Klipper update.
fn update_kconfig(tree: &Path, config: &Path, edit: impl Fn(String) -> String) {
    let kc = tree.join("src/Kconfig");
    std::fs::write(&kc, edit(std::fs::read_to_string(&kc).unwrap())).unwrap();
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    std::fs::File::options().write(true).open(config).unwrap().set_modified(old).unwrap();
}

#[test]
fn a_kconfig_update_is_shown_and_applied_before_building() {
    let r = rig();
    r.configure("octopus", "stm32h723xx");
    let path = r.config("octopus");
    let original = std::fs::read_to_string(&path).unwrap().replace("CONFIG_STACK_SIZE=512", "CONFIG_STACK_SIZE=zz");
    std::fs::write(&path, &original).unwrap();
    update_kconfig(&r.tree, &path, |k| {
        k.replace("config WANT_LIS2DW\n", "config WANT_LIS3DH\n")
            + "\nconfig WANT_NEW_THING\n    bool \"A new option\"\n    default y\n"
    });

    let out = r.run(&["build", "octopus", "--json"], &[]);
    let (so, se) = text(&out);
    assert!(out.status.success(), "{so}{se}");
    let v: serde_json::Value = serde_json::from_str(&so).unwrap();
    let m = &v["migration"];
    assert_eq!(m["added"][0][0], "CONFIG_WANT_LIS3DH", "{m}");
    assert!(m["added"].as_array().unwrap().iter().any(|a| a[0] == "CONFIG_WANT_NEW_THING" && a[1] == "y"), "{m}");
    assert_eq!(m["removed"][0], serde_json::json!(["CONFIG_WANT_LIS2DW", "y"]), "{m}");
    assert!(m["warnings"][0].as_str().unwrap().contains("the value 'zz' is invalid for STACK_SIZE"), "{m}");
    assert_eq!(m["critical"], serde_json::json!([]));

    // Applied atomically, the previous config kept, no Klipper `.old` beside it.
    let migrated = std::fs::read_to_string(&path).unwrap();
    assert!(migrated.contains("CONFIG_WANT_NEW_THING=y") && !migrated.contains("CONFIG_WANT_LIS2DW"));
    assert!(migrated.contains("CONFIG_STACK_SIZE=512"));
    assert_eq!(std::fs::read_to_string(path.with_extension("config.prev")).unwrap(), original);
    assert!(!path.with_extension("config.old").exists(), "make never ran on the board's config");
    // The cache key is the config that was built.
    use sha2::Digest;
    let sha: String = sha2::Sha256::digest(migrated.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(v["key"]["config_sha256"], sha);

    // The text output says the same, and the next build has nothing to migrate.
    update_kconfig(&r.tree, &path, |k| k + "\nconfig WANT_OTHER\n    bool \"Other\"\n    default y\n");
    let so = ok(&r.run(&["build", "octopus"], &[]));
    assert!(so.contains("updated the board's config") && so.contains("+ CONFIG_WANT_OTHER=y (new option"), "{so}");
    assert!(so.contains(".config.prev"), "{so}");
    let so = ok(&r.run(&["build", "octopus"], &[]));
    assert!(!so.contains("updated the board's config") && so.contains("from cache"), "{so}");
}

#[test]
fn a_critical_kconfig_change_is_refused_and_nothing_is_written() {
    let r = rig();
    r.configure("octopus", "stm32h723xx");
    let path = r.config("octopus");
    let original = std::fs::read_to_string(&path)
        .unwrap()
        .replace("CONFIG_FLASH_APPLICATION_ADDRESS=0x8020000", "CONFIG_FLASH_APPLICATION_ADDRESS=0xZZZZ");
    std::fs::write(&path, &original).unwrap();
    update_kconfig(&r.tree, &path, |k| k + "\nconfig WANT_NEW_THING\n    bool \"A new option\"\n    default y\n");

    let out = r.run(&["build", "octopus"], &[]);
    let (so, se) = text(&out);
    assert_eq!(out.status.code(), Some(3), "{so}{se}");
    assert!(se.contains("would change critical settings of 'octopus'"), "{se}");
    assert!(se.contains("~ CONFIG_FLASH_APPLICATION_ADDRESS: 0xZZZZ -> 0x8020000  [critical]"), "{se}");
    assert!(se.contains("+ CONFIG_WANT_NEW_THING=y"), "{se}");
    assert!(se.contains("warning: the value '0xZZZZ' is invalid for FLASH_APPLICATION_ADDRESS"), "{se}");
    assert!(se.contains("help: run `kflash config octopus`"), "{se}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), original, "the board's config is untouched");
    assert!(!path.with_extension("config.old").exists() && !path.with_extension("config.prev").exists());
    assert!(!r.root.path().join("cache/build/octopus").exists(), "make never built");
}

// ---------------------------------------------------------------- item 10

#[test]
fn import_keeps_the_config_of_a_board_whose_key_is_not_a_slug() {
    let root = tempfile::tempdir().unwrap();
    let kf = root.path().join("kalico_flash/kflash");
    std::fs::create_dir_all(&kf).unwrap();
    std::fs::write(
        kf.join("devices.json"),
        r#"{"devices": {"EBB36 Toolhead": {"mcu": "stm32g0b1", "name": "EBB36 Toolhead",
             "serial_pattern": "usb-Klipper_stm32g0b1xx_4E0032000F50425539393020*"}}}"#,
    )
    .unwrap();
    let configs = root.path().join("kf-configs");
    std::fs::create_dir_all(configs.join("EBB36 Toolhead")).unwrap();
    std::fs::write(configs.join("EBB36 Toolhead/.config"), "CONFIG_MCU=\"stm32g0b1xx\"\n").unwrap();
    let dir = root.path().join("cfg");
    let out = kflash_env(
        &dir,
        &["import", root.path().join("kalico_flash").to_str().unwrap(), "--configs", configs.to_str().unwrap()],
        &[],
    );
    let so = ok(&out);
    assert!(so.contains("boards: ebb36-toolhead"), "{so}");
    assert!(so.contains("board 'EBB36 Toolhead' registered as ebb36-toolhead"), "{so}");
    assert!(so.contains("config of ebb36-toolhead"), "{so}");
    assert_eq!(
        std::fs::read_to_string(dir.join("configs/ebb36-toolhead.config")).unwrap(),
        "CONFIG_MCU=\"stm32g0b1xx\"\n"
    );
    assert!(!dir.join("configs/EBB36 Toolhead.config").exists());
    let show = ok(&kflash_env(&dir, &["config", "ebb36-toolhead", "--show"], &[]));
    assert!(show.contains("stm32g0b1xx") && !show.contains("not created yet"), "{show}");
}

// ---------------------------------------------------------------- item 11

#[test]
fn config_says_no_changes_when_menuconfig_saved_none() {
    let r = rig();
    r.configure("octopus", "stm32h723xx");
    let before = std::fs::read(r.config("octopus")).unwrap();
    // The stand-in's menuconfig leaves an existing config as it is (it only touches it).
    let out = r.run_tty(&["config", "octopus"], &[]);
    let so = ok(&out);
    assert!(so.contains("No changes") && !so.contains("Saved"), "{so}");
    assert_eq!(std::fs::read(r.config("octopus")).unwrap(), before);
    // A real change is saved and says so.
    let out = r.run_tty(&["config", "octopus"], &[("RIG_MENUCONFIG_SET", "CONFIG_WANT_SENSORS=n")]);
    let so = ok(&out);
    assert!(so.contains("Saved") && so.contains("MCU stm32h723xx"), "{so}");
    assert!(std::fs::read_to_string(r.config("octopus")).unwrap().contains("# CONFIG_WANT_SENSORS is not set"));
}

#[test]
fn config_without_a_terminal_says_one_is_needed() {
    let r = rig();
    r.configure("octopus", "stm32h723xx");
    let before = std::fs::read(r.config("octopus")).unwrap();
    let out = r.run(&["config", "octopus"], &[("RIG_MENUCONFIG_SET", "CONFIG_WANT_SENSORS=n")]);
    let (so, se) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{so}{se}");
    assert!(se.contains("needs a terminal"), "{se}");
    assert!(se.contains("help:") && se.contains("--show"), "{se}");
    assert!(!se.contains("Traceback") && !so.contains("Traceback"), "{se}");
    assert_eq!(std::fs::read(r.config("octopus")).unwrap(), before, "menuconfig did not run");
}

#[test]
fn config_show_prints_clock_interface_and_bootloader_offset() {
    let r = rig();
    r.configure("octopus", "stm32h723xx");
    let so = ok(&r.run(&["config", "octopus", "--show"], &[]));
    assert!(so.contains(&r.config("octopus").display().to_string()), "{so}");
    for want in ["MCU", "stm32h723xx", "clock", "520 MHz, 25 MHz crystal", "interface", "USB", "bootloader offset"] {
        assert!(so.contains(want), "{want} missing:\n{so}");
    }
    assert!(so.contains("application at 0x8020000 (128 KiB bootloader offset)"), "{so}");
}

#[test]
fn the_kconfig_check_is_skipped_only_while_nothing_it_reads_changed() {
    let r = rig();
    r.configure("octopus", "stm32h723xx");
    ok(&r.run(&["build", "octopus"], &[]));
    // Break the tree's olddefconfig: an unchanged config and Kconfig do not need it.
    let script = r.tree.join("scripts/kconfig.py");
    let source = std::fs::read_to_string(&script).unwrap();
    std::fs::write(
        &script,
        source.replace(
            "    if cmd == \"olddefconfig\":\n",
            "    if cmd == \"olddefconfig\":\n        sys.exit(\"olddefconfig broke\")\n",
        ),
    )
    .unwrap();
    // (Editing the script dirties the tree, so this is a rebuild: it succeeds only because
    // the check was skipped, and make's copy of the config is newer than src/Kconfig.)
    let so = ok(&r.run(&["build", "octopus"], &[]));
    assert!(so.contains("built in"), "{so}");
    // A changed Kconfig is checked again (and a failing check is reported, not ignored).
    let kc = r.tree.join("src/Kconfig");
    std::fs::write(&kc, std::fs::read_to_string(&kc).unwrap() + "\n").unwrap();
    let out = r.run(&["build", "octopus"], &[]);
    let (so, se) = text(&out);
    assert_eq!(out.status.code(), Some(5), "{so}{se}");
    assert!(se.contains("olddefconfig broke") && se.contains("against the tree's Kconfig failed"), "{se}");
}
