//! Output contracts of the `kflash` binary: the README's exit codes, JSON errors under
//! `--json` (one object on stdout, same exit code), durations in seconds, and
//! `settings show --json`.

use std::path::Path;
use std::process::Output;

use serde_json::Value;

mod host;
use host::stand_in_tree;

fn kflash(root: &Path, args: &[&str]) -> Output {
    host::kflash(root, args).output().expect("run kflash")
}

fn setup(root: &Path, tree: &Path) {
    host::config_dir(root, tree);
}

/// The one JSON error object on stdout, checked against the exit code and stderr's text.
fn json_error(out: &Output, code: i32, kind: &str) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let v: Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{stdout}"));
    let err = &v["error"];
    assert_eq!(err["kind"], kind, "{v}");
    assert_eq!(err["exit_code"], code, "{v}");
    let message = err["message"].as_str().expect("message");
    assert!(stderr.contains(&format!("error: {message}")), "stderr says the same: {stderr}");
    assert!(err["help"].as_str().is_some_and(|h| !h.is_empty()), "a help line: {v}");
    v
}

#[test]
fn json_errors_are_json_on_stdout_with_the_exit_code() {
    let root = tempfile::tempdir().unwrap();
    setup(root.path(), &root.path().join("klipper"));
    let out = kflash(root.path(), &["build", "nosuch", "--json"]);
    json_error(&out, 4, "unknown-board");
    let out = kflash(root.path(), &["history", "--json"]);
    assert!(out.status.success());
    let out = kflash(root.path(), &["flash", "nosuch", "--json"]);
    json_error(&out, 4, "unknown-board");
    // Without --json nothing goes to stdout.
    let out = kflash(root.path(), &["build", "nosuch"]);
    assert_eq!((out.status.code(), out.stdout.len()), (Some(4), 0));
}

#[test]
fn a_missing_board_config_is_exit_3_not_a_usage_error() {
    let root = tempfile::tempdir().unwrap();
    let tree = stand_in_tree(root.path());
    setup(root.path(), &tree);
    let out = kflash(root.path(), &["build", "nitehawk", "--json"]);
    let v = json_error(&out, 3, "no-board-config");
    assert!(v["error"]["help"].as_str().unwrap().contains("kflash config nitehawk"), "{v}");
}

#[test]
fn a_missing_klipper_dir_is_exit_3_not_a_usage_error() {
    let root = tempfile::tempdir().unwrap();
    setup(root.path(), &root.path().join("no-such-klipper"));
    std::fs::write(root.path().join("cfg/configs/nitehawk.config"), "CONFIG_MCU=\"rp2040\"\n").unwrap();
    let out = kflash(root.path(), &["build", "nitehawk", "--json"]);
    let v = json_error(&out, 3, "not-klipper-tree");
    assert!(v["error"]["help"].as_str().unwrap().contains("klipper_dir"), "{v}");
}

#[test]
fn build_json_durations_are_seconds() {
    let root = tempfile::tempdir().unwrap();
    let tree = stand_in_tree(root.path());
    setup(root.path(), &tree);
    host::menuconfig(&tree, &root.path().join("cfg"), "nitehawk", "rp2040");
    let out = kflash(root.path(), &["build", "nitehawk", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let elapsed = &v["elapsed"];
    assert!(elapsed.is_f64() && elapsed.as_f64().unwrap() > 0.0, "elapsed is seconds: {elapsed}");
}

#[test]
fn settings_show_json_in_either_order() {
    let root = tempfile::tempdir().unwrap();
    setup(root.path(), Path::new("/opt/klipper"));
    for args in [&["settings", "show", "--json"][..], &["settings", "--json", "show"], &["settings", "--json"]] {
        let out = kflash(root.path(), args);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        assert_eq!(v["klipper_dir"], "/opt/klipper", "{args:?}");
        assert_eq!(v["timeouts"]["build_secs"], 600, "{args:?}");
    }
    let out = kflash(root.path(), &["settings", "set", "build_jobs", "3", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["build_jobs"], 3);
}
