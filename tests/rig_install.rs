//! `kflash install` then `kflash uninstall` in the rig guest, for real: the files land in the
//! guest's /etc and /usr/local/bin, the real udevd loads the rules and re-runs them on the
//! simulated boards, the real visudo accepts the sudoers rule; systemctl is the rig's
//! stand-in (enable/disable make the real symlinks, the service itself is never run: see
//! tests/rig/standins/README.md). Afterwards everything is as it was, down to the bytes and
//! modes, and the boards no longer carry the rules' properties.

mod rig_support;

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use rig_support::*;

/// The trees install writes into (and the manifest's directory, which must not exist).
const WATCHED: &[&str] = &["/etc", "/usr/local/bin"];
const STATE_DIR: &str = "/var/lib/kflash";

type Entry = (char, u32, u32, u32, u64, u64);

/// Every entry under the watched trees: (kind, mode, uid, gid, size, content hash). Contents
/// are hashed in full up to 4 MiB, larger files by their first 4 MiB and their size (the
/// big programs in /usr/local/bin; install's own binary is not there before or after).
fn snapshot() -> BTreeMap<PathBuf, Entry> {
    let mut out = BTreeMap::new();
    let mut stack: Vec<PathBuf> = WATCHED.iter().map(PathBuf::from).collect();
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries {
            let p = e.unwrap().path();
            let Ok(m) = std::fs::symlink_metadata(&p) else { continue };
            let mode = m.permissions().mode() & 0o7777;
            let (kind, hash) = if m.is_dir() {
                stack.push(p.clone());
                ('d', 0)
            } else if m.file_type().is_symlink() {
                ('l', fnv(std::fs::read_link(&p).unwrap().as_os_str().as_encoded_bytes()))
            } else if m.is_file() {
                let mut buf = Vec::new();
                let _ = std::fs::File::open(&p).and_then(|f| f.take(4 << 20).read_to_end(&mut buf));
                ('f', fnv(&buf))
            } else {
                ('o', 0)
            };
            out.insert(p, (kind, mode, m.uid(), m.gid(), if m.is_dir() { 0 } else { m.len() }, hash));
        }
    }
    out
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100000001b3))
}

fn diff(a: &BTreeMap<PathBuf, Entry>, b: &BTreeMap<PathBuf, Entry>) -> Vec<String> {
    let mut d = Vec::new();
    for (p, e) in a {
        match b.get(p) {
            None => d.push(format!("gone: {}", p.display())),
            Some(f) if f != e => d.push(format!("changed: {} {e:?} -> {f:?}", p.display())),
            _ => {}
        }
    }
    d.extend(b.keys().filter(|p| !a.contains_key(*p)).map(|p| format!("new: {}", p.display())));
    d
}

/// udev's properties of a device (by devnode or link), or of a sysfs path.
fn props(dev: &str) -> String {
    let arg = if dev.starts_with("/sys") { format!("--path={dev}") } else { format!("--name={dev}") };
    let out = run("udevadm", &["info", "--query=property", &arg]);
    assert!(out.status.success(), "udevadm info {dev}: {}", text(&out.stderr));
    text(&out.stdout)
}

fn prop<'a>(all: &'a str, key: &str) -> Option<&'a str> {
    all.lines().find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// The USB device (the parent with idVendor) of a tty, as a sysfs path.
fn usb_device_of(link: &str) -> String {
    let out = run("udevadm", &["info", "--query=path", &format!("--name={link}")]);
    let mut p = PathBuf::from(format!("/sys{}", text(&out.stdout).trim()));
    while !p.join("idVendor").exists() {
        assert!(p.pop(), "no USB device above {link}");
    }
    p.display().to_string()
}

/// The rules' marks on a board: (ID_MM_DEVICE_IGNORE, KFLASH_MODE, kflash in CURRENT_TAGS).
fn marks(dev: &str) -> (Option<String>, Option<String>, bool) {
    let all = props(dev);
    (
        prop(&all, "ID_MM_DEVICE_IGNORE").map(str::to_string),
        prop(&all, "KFLASH_MODE").map(str::to_string),
        prop(&all, "CURRENT_TAGS").is_some_and(|t| t.contains(":kflash:")),
    )
}

fn kflash_root(args: &[&str]) -> std::process::Output {
    Command::new(kflash_bin()).args(args).stdin(Stdio::null()).output().expect("run kflash")
}

fn unmarked() -> (Option<String>, Option<String>, bool) {
    (None, None, false)
}

fn marked(mode: &str) -> (Option<String>, Option<String>, bool) {
    (Some("1".into()), Some(mode.into()), true)
}

#[test]
#[ignore = "runs inside the USB rig"]
fn install_then_uninstall_leaves_the_file_system_as_it_was() {
    in_rig();
    // The replugs below make a running Klippy shut down, and it shuts the other boards down
    // with it: reset them and restart Klipper afterwards, as every scenario does.
    let _clean = LeaveRigClean;
    reset_boards();
    // One board in Klipper, one in Katapult.
    boardctl(&["reboot", NITEHAWK.0, "katapult"]);
    boardctl(&["wait-ready"]);
    settle();
    let klipper = by_id(OCTOPUS, "Klipper");
    let katapult = by_id(NITEHAWK, "katapult");
    let octopus_usb = usb_device_of(&klipper);
    // A hand-copied rule of the user's at install's path: install must keep it and uninstall
    // put it back, content and mode.
    let rules = Path::new("/etc/udev/rules.d/70-kflash.rules");
    assert!(!rules.exists(), "an earlier scenario left {} behind", rules.display());
    std::fs::write(rules, "# the user's own rule file, kept by kflash install\n").unwrap();
    std::fs::set_permissions(rules, std::fs::Permissions::from_mode(0o640)).unwrap();
    assert!(!Path::new(STATE_DIR).exists());
    for dev in [&klipper, &katapult, &octopus_usb] {
        assert_eq!(marks(dev), unmarked(), "{dev} is marked before install");
    }
    let before = snapshot();

    let log = ServiceLog::start();
    let out = kflash_root(&["install", "--yes", "--sudoers"]);
    let stdout = ok(&out);
    eprintln!("{stdout}{}", text(&out.stderr));
    for line in [
        "created /usr/local/bin/kflash (mode 0755)",
        "replaced /etc/udev/rules.d/70-kflash.rules (the previous file is kept in /var/lib/kflash/backup/etc/udev/rules.d/70-kflash.rules)",
        "created /etc/systemd/system/kflash.service (mode 0644)",
        "created /etc/sudoers.d/kflash (mode 0440)",
        "ran `udevadm control --reload`",
        "ran `systemctl enable --now kflash.service`",
    ] {
        assert!(stdout.contains(line), "missing '{line}' in:\n{stdout}");
    }
    // The files, the stand-in's real enable symlink, and nothing else.
    let changed = diff(&before, &snapshot());
    let mut expected = vec![
        "changed: /etc/udev/rules.d/70-kflash.rules".to_string(),
        "new: /etc/sudoers.d/kflash".into(),
        "new: /etc/systemd/system/kflash.service".into(),
        "new: /etc/systemd/system/multi-user.target.wants/kflash.service".into(),
        "new: /usr/local/bin/kflash".into(),
    ];
    let mut got: Vec<String> = changed.iter().map(|l| l.split(' ').take(2).collect::<Vec<_>>().join(" ")).collect();
    if !before.contains_key(Path::new("/etc/systemd/system/multi-user.target.wants")) {
        expected.push("new: /etc/systemd/system/multi-user.target.wants".into());
    }
    got.sort();
    expected.sort();
    assert_eq!(got, expected, "install changed:\n{}", changed.join("\n"));
    assert_eq!(
        std::fs::metadata("/usr/local/bin/kflash").unwrap().len(),
        std::fs::metadata(kflash_bin()).unwrap().len()
    );
    assert!(Path::new(STATE_DIR).join("install-manifest.json").exists());
    // The real visudo accepts the whole sudoers configuration with the rule in it.
    let v = run("visudo", &["-c"]);
    assert!(v.status.success(), "visudo -c: {}{}", text(&v.stdout), text(&v.stderr));
    // What systemctl was asked (the stand-in logs it; it does not run the service).
    assert_eq!(log.verbs("kflash"), ["enable", "start-not-run"]);
    assert_eq!(log.verbs("-"), ["daemon-reload"]);
    let en = run("systemctl", &["is-enabled", "kflash"]);
    assert_eq!((en.status.code(), text(&en.stdout)), (Some(0), "enabled\n".into()));

    // The real udevd re-ran the rules on the boards already there...
    assert_eq!(marks(&klipper), marked("klipper"));
    assert_eq!(marks(&katapult), marked("katapult"));
    assert_eq!(marks(&octopus_usb), marked("klipper"));
    // ...and applies them to a board that appears now.
    boardctl(&["reboot", OCTOPUS.0, "katapult"]);
    boardctl(&["wait-ready"]);
    settle();
    assert_eq!(marks(&by_id(OCTOPUS, "katapult")), marked("katapult"));
    boardctl(&["reboot", OCTOPUS.0, "klipper"]);
    boardctl(&["wait-ready"]);
    settle();
    assert_eq!(marks(&klipper), marked("klipper"));

    let log = ServiceLog::start();
    let out = kflash_root(&["uninstall", "--yes"]);
    let stdout = ok(&out);
    eprintln!("{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("put back the previous /etc/udev/rules.d/70-kflash.rules"), "{stdout}");
    assert_eq!(log.verbs("kflash"), ["disable", "stop"]);
    assert_eq!(log.verbs("-"), ["daemon-reload"]);
    let after = snapshot();
    assert_eq!(diff(&before, &after), Vec::<String>::new(), "uninstall left the file system changed");
    assert!(!Path::new(STATE_DIR).exists());
    assert_eq!(std::fs::read_to_string(rules).unwrap(), "# the user's own rule file, kept by kflash install\n");

    // The boards lost the rules' properties and current tag (udev's TAGS keeps a tag it once
    // set until the device goes away)...
    for dev in [&klipper, &katapult, &octopus_usb] {
        assert_eq!(marks(dev), unmarked(), "{dev} still marked after uninstall");
    }
    // ...and a board that appears now is not marked at all.
    boardctl(&["unplug", OCTOPUS.0]);
    settle();
    boardctl(&["plug", OCTOPUS.0]);
    boardctl(&["wait-ready"]);
    settle();
    let all = props(&klipper);
    assert!(!all.contains("kflash") && !all.contains("ID_MM_DEVICE_IGNORE"), "{all}");

    std::fs::remove_file(rules).unwrap();
    run("udevadm", &["control", "--reload"]);
}
