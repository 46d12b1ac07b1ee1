//! `firmware::probe` (for `flash-all --dry-run`) against the stand-in tree: in every case it
//! says what `firmware_for` then does (cache hit, build, or the same error), and it writes
//! nothing: the config, cache and state dirs and the tree (with .git) are checksummed around it.

mod host;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use kflash::firmware::{self, BuildOptions, BuildReason, Probe};
use kflash::registry::{BoardEntry, Registry};

struct Setup {
    root: tempfile::TempDir,
    tree: PathBuf,
    opts: BuildOptions,
}

impl Setup {
    fn new() -> Setup {
        let root = tempfile::tempdir().unwrap();
        let tree = host::stand_in_tree(root.path());
        let cfg = host::config_dir(root.path(), &tree);
        host::menuconfig(&tree, &cfg, "nitehawk", "rp2040");
        let opts = BuildOptions {
            cache_dir: Some(root.path().join("cache")),
            state_dir: Some(root.path().join("state")),
            ..Default::default()
        };
        Setup { root, tree, opts }
    }

    fn reg(&self) -> Registry {
        Registry::open(self.root.path().join("cfg")).unwrap()
    }

    fn board(&self) -> BoardEntry {
        self.reg().get("nitehawk").unwrap().clone()
    }

    fn config(&self) -> PathBuf {
        self.reg().config_path("nitehawk")
    }

    /// Path → (size, mtime, sha256) of every file and symlink under the config, cache and state
    /// dirs and the tree (.git included).
    fn snapshot(&self) -> BTreeMap<PathBuf, String> {
        let mut files = BTreeMap::new();
        let mut stack: Vec<PathBuf> =
            ["cfg", "cache", "state", "klipper"].iter().map(|d| self.root.path().join(d)).collect();
        while let Some(p) = stack.pop() {
            let Ok(meta) = std::fs::symlink_metadata(&p) else { continue };
            if meta.is_dir() {
                stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
                files.insert(p, "dir".to_string());
            } else {
                let content = if meta.is_file() { std::fs::read(&p).unwrap() } else { Vec::new() };
                let digest = kflash::firmware::build::sha256_hex(&content);
                files.insert(p, format!("{} {:?} {digest}", meta.len(), meta.modified().unwrap()));
            }
        }
        files
    }

    /// Probe (checking that it writes nothing), then build; both results.
    async fn probe_then_build(
        &self,
        opts: &BuildOptions,
    ) -> (kflash::Result<Probe>, kflash::Result<firmware::BuildOutcome>) {
        let (reg, board) = (self.reg(), self.board());
        let before = self.snapshot();
        let probe = firmware::probe(&reg, &board, opts).await;
        let after = self.snapshot();
        if before != after {
            let changed: Vec<_> = after.iter().filter(|(k, v)| before.get(*k) != Some(v)).map(|(k, _)| k).collect();
            let gone: Vec<_> = before.keys().filter(|k| !after.contains_key(*k)).collect();
            panic!("the probe wrote {changed:?} and removed {gone:?}");
        }
        let built = firmware::firmware_for(&reg, &board, opts, &mut ()).await;
        (probe, built)
    }

    /// Probe then build, and check they agree; the probe's answer.
    async fn agree(&self, opts: &BuildOptions) -> kflash::Result<Probe> {
        let (probe, built) = self.probe_then_build(opts).await;
        match (&probe, &built) {
            (Ok(Probe::Cached { version }), Ok(b)) => {
                assert!(b.cached, "probe said cached, the build ran make");
                assert_eq!(version, &b.firmware.version);
            }
            (Ok(Probe::Build { why }), Ok(b)) => assert!(!b.cached, "probe said build ({why}), the cache had it"),
            (Err(p), Err(b)) => assert_eq!((p.kind(), p.to_string()), (b.kind(), b.to_string())),
            _ => panic!("probe {probe:?} but firmware_for {built:?}"),
        }
        probe
    }
}

fn git(tree: &Path, args: &[&str]) {
    let st = Command::new("git")
        .arg("-C")
        .arg(tree)
        .args(["-c", "user.name=t", "-c", "user.email=t@t"])
        .args(args)
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
}

fn build(why: BuildReason) -> Probe {
    Probe::Build { why }
}

#[tokio::test]
async fn probe_agrees_with_the_build_and_writes_nothing() {
    let s = Setup::new();
    let opts = s.opts.clone();
    let no_build = BuildOptions { cache_only: true, ..opts.clone() };

    let err = s.agree(&no_build).await.unwrap_err();
    assert_eq!(err.kind(), "no-cached-firmware");
    assert_eq!(s.agree(&opts).await.unwrap(), build(BuildReason::NoCacheEntry));
    let Probe::Cached { version } = s.agree(&opts).await.unwrap() else { panic!("second run is a cache hit") };
    assert!(version.starts_with("v0.13.0-"), "{version}");
    assert!(matches!(s.agree(&no_build).await.unwrap(), Probe::Cached { .. }));
    assert_eq!(s.agree(&BuildOptions { rebuild: true, ..opts.clone() }).await.unwrap(), build(BuildReason::Rebuild));

    // A new commit in the tree.
    std::fs::write(s.tree.join("src/extra.c"), "int extra;\n").unwrap();
    git(&s.tree, &["add", "src/extra.c"]);
    git(&s.tree, &["commit", "-qm", "extra"]);
    assert_eq!(s.agree(&opts).await.unwrap(), build(BuildReason::TreeChanged));
    // Uncommitted changes.
    std::fs::write(s.tree.join("src/extra.c"), "int extra2;\n").unwrap();
    assert_eq!(s.agree(&opts).await.unwrap(), build(BuildReason::TreeChanged));
    assert!(matches!(s.agree(&opts).await.unwrap(), Probe::Cached { .. }));

    // The user changed the config.
    let config = s.config();
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("CONFIG_WANT_LIS2DW=y", "# CONFIG_WANT_LIS2DW is not set")).unwrap();
    assert_ne!(std::fs::read_to_string(&config).unwrap(), text, "the stand-in config has CONFIG_WANT_LIS2DW");
    assert_eq!(s.agree(&opts).await.unwrap(), build(BuildReason::ConfigChanged));

    // The tree's Kconfig gains an option: --no-build refuses, a build applies it.
    let kc = s.tree.join("src/Kconfig");
    let mut kconfig = std::fs::read_to_string(&kc).unwrap();
    kconfig.push_str("\nconfig WANT_NEW\n    bool \"new\"\n    default y\n");
    std::fs::write(&kc, kconfig).unwrap();
    let err = s.agree(&no_build).await.unwrap_err();
    assert!(err.to_string().contains("would change the config of 'nitehawk'"), "{err}");
    assert_eq!(s.agree(&opts).await.unwrap(), build(BuildReason::ConfigMigration { changes: 1 }));
    assert!(std::fs::read_to_string(&config).unwrap().contains("CONFIG_WANT_NEW=y"));
    assert!(matches!(s.agree(&opts).await.unwrap(), Probe::Cached { .. }));
}

#[tokio::test]
async fn probe_meets_the_errors_the_build_would() {
    let s = Setup::new();
    let opts = s.opts.clone();
    // A config for another MCU than the board's.
    let boards = s.root.path().join("cfg/boards.toml");
    let text = std::fs::read_to_string(&boards).unwrap();
    std::fs::write(&boards, text.replace("mcu = \"rp2040\"", "mcu = \"stm32h723xx\"")).unwrap();
    assert_eq!(s.agree(&opts).await.unwrap_err().kind(), "mcu-mismatch");
    std::fs::write(&boards, text).unwrap();
    // No config at all.
    std::fs::remove_file(s.config()).unwrap();
    assert_eq!(s.agree(&opts).await.unwrap_err().kind(), "no-board-config");
}
