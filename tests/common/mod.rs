//! Helpers shared by the binary-level tests.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// Two registered boards, as `boards.toml`.
pub const BOARDS: &str = r#"[boards.octopus]
name = "Octopus Pro"
mcu = "stm32h723xx"
serial = "29001A001151313531383332"

[boards.nitehawk]
name = "Nitehawk"
mcu = "rp2040"
serial = "E661640843545B2E"
"#;

/// Run kflash with a pseudo-terminal as stdin and stdout (menuconfig needs one) and `env` set;
/// stdout in the result is what was written to the terminal.
pub fn kflash_tty(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    use std::io::Read;
    use std::os::fd::{AsFd, OwnedFd};
    let pty = nix::pty::openpty(None, None).expect("openpty");
    let slave = |fd: &OwnedFd| std::process::Stdio::from(fd.as_fd().try_clone_to_owned().unwrap());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kflash"));
    cmd.arg("--config-dir").arg(dir).args(args).env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .stdin(slave(&pty.slave))
        .stdout(slave(&pty.slave))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run kflash");
    // The master reads EOF (EIO) only once no one holds the slave: not the Command either.
    drop(cmd);
    drop(pty.slave);
    let mut master = std::fs::File::from(pty.master);
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        out
    });
    let mut out = child.wait_with_output().expect("wait for kflash");
    out.stdout = reader.join().unwrap();
    out
}

/// Run kflash without a terminal, with `env` set.
pub fn kflash_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kflash"));
    cmd.arg("--config-dir").arg(dir).args(args).env_remove("RUST_LOG").stdin(std::process::Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run kflash")
}

pub fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}
