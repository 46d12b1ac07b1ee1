//! Out-of-tree firmware builds: `make -C <klipper> KCONFIG_CONFIG=<board config> OUT=<dir>/ -jN`.
//! The user's own `klipper/.config` and `klipper/out/` are never touched. Which builds must
//! take turns is [`super::lock`]'s concern.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::error::{Error, Result};
use crate::event::{EventKind, Progress};
use crate::kconfig::{kconfig_arg, KConfig};
use crate::protocol::klipper::DataDictionary;

/// Lines of build output kept for the failure report.
pub const KEPT_OUTPUT_LINES: usize = 200;
/// Lines of it shown in the error message.
const SHOWN_OUTPUT_LINES: usize = 20;

/// Lines of make's error output always shown when a build fails.
const SHOWN_ERROR_LINES: usize = 10;

/// The last `n` of `lines`, indented, for an error message quoting a tool's output.
pub(crate) fn indented_tail(lines: &[&str], n: usize) -> String {
    lines[lines.len().saturating_sub(n)..].iter().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n")
}

/// The failure's tail: the last `n` lines of the whole output, then the last lines of the
/// error output that are not among them. stdout and stderr are two pipes read as they come,
/// so a compiler's error can be taken before the compile lines still in the other pipe and
/// pushed out of the tail by them (found by a test failing under load).
fn failure_tail(all: &[&str], errors: &[&str], n: usize) -> String {
    let shown = &all[all.len().saturating_sub(n)..];
    let missing: Vec<&str> = errors.iter().copied().filter(|e| !shown.contains(e)).collect();
    let mut text = indented_tail(all, n);
    if !missing.is_empty() {
        text += "\n  and make's error output:\n";
        text += &indented_tail(&missing, SHOWN_ERROR_LINES);
    }
    text
}

/// What to build and where.
#[derive(Debug, Clone)]
pub struct BuildPlan {
    pub klipper_dir: PathBuf,
    /// The board's Kconfig file (absolute).
    pub config: PathBuf,
    /// Where make writes its output; must be private to this build.
    pub out_dir: PathBuf,
    pub jobs: u32,
    /// The whole output of the build goes here (kept after the build, failed or not).
    pub log: PathBuf,
}

impl BuildPlan {
    /// The make arguments; `OUT` must end in `/` because Klipper's targets are `$(OUT)klipper.elf`.
    pub fn make_args(&self) -> Vec<String> {
        let mut out = self.out_dir.display().to_string();
        if !out.ends_with('/') {
            out.push('/');
        }
        vec![
            "-C".into(),
            self.klipper_dir.display().to_string(),
            kconfig_arg(&self.config),
            format!("OUT={out}"),
            format!("-j{}", self.jobs.max(1)),
        ]
    }

    /// The make command as a user can paste it into a shell.
    pub fn command_line(&self) -> String {
        std::iter::once("make".to_string())
            .chain(self.make_args())
            .map(|a| shell_quote(&a))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Quote `s` for a POSIX shell (only when needed).
pub fn shell_quote(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-+=:,./@%".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// A firmware image ready to flash.
#[derive(Debug, Clone, Serialize)]
pub struct Firmware {
    /// `klipper.bin`, or `klipper.uf2` for boards without a bootloader.
    pub image: PathBuf,
    /// `version` from klipper.dict: what the board must report after flashing.
    pub version: String,
    /// `config.MCU` from klipper.dict.
    pub mcu: String,
    /// `app`: Klipper or Kalico.
    pub app: Option<String>,
    pub size: u64,
    pub sha256: String,
}

impl Firmware {
    /// Read a build output directory: the image and its data dictionary.
    pub fn from_out_dir(out: &Path) -> Result<Firmware> {
        let image =
            ["klipper.bin", "klipper.uf2"].iter().map(|n| out.join(n)).find(|p| p.is_file()).ok_or_else(|| {
                Error::Tool {
                    program: "make".into(),
                    message: format!("the build finished but {} has no klipper.bin or klipper.uf2", out.display()),
                }
            })?;
        let dict_path = out.join("klipper.dict");
        let text = std::fs::read_to_string(&dict_path).map_err(|e| Error::io("read", &dict_path, e))?;
        let dict = DataDictionary::from_json(&text).map_err(|e| Error::FileInvalid {
            path: dict_path.clone(),
            message: format!("not a Klipper data dictionary: {e}"),
        })?;
        let bytes = std::fs::read(&image).map_err(|e| Error::io("read", &image, e))?;
        Ok(Firmware {
            version: dict.version.clone(),
            mcu: dict.mcu.clone(),
            app: dict.app.clone(),
            size: bytes.len() as u64,
            sha256: sha256_hex(&bytes),
            image,
        })
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Run the build with a deadline, keeping its whole output in `plan.log`. On failure the
/// error carries the exact command, the log's path and the tail of the output.
pub async fn run_make(plan: &BuildPlan, timeout: Duration, progress: &mut dyn Progress) -> Result<Duration> {
    use std::io::Write;
    std::fs::create_dir_all(&plan.out_dir).map_err(|e| Error::io("create directory", &plan.out_dir, e))?;
    if let Some(dir) = plan.log.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("create directory", dir, e))?;
    }
    let log_file = std::fs::File::create(&plan.log).map_err(|e| Error::io("create", &plan.log, e))?;
    let mut log = std::io::BufWriter::new(log_file);
    let _ = writeln!(log, "$ {}", plan.command_line());
    let started = Instant::now();
    let mut child = tokio::process::Command::new("make")
        .args(plan.make_args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| Error::Tool { program: "make".into(), message: format!("cannot start make: {e}") })?;
    let mut out = BufReader::new(child.stdout.take().expect("piped")).lines();
    let mut err = BufReader::new(child.stderr.take().expect("piped")).lines();
    let mut tail: VecDeque<String> = VecDeque::new();
    let mut err_tail: VecDeque<String> = VecDeque::new();
    let mut keep = |l: String, from_stderr: bool, progress: &mut dyn Progress| {
        progress.emit(EventKind::BuildOutput { line: l.clone() });
        let _ = writeln!(log, "{l}");
        if from_stderr {
            if err_tail.len() == SHOWN_ERROR_LINES {
                err_tail.pop_front();
            }
            err_tail.push_back(l.clone());
        }
        if tail.len() == KEPT_OUTPUT_LINES {
            tail.pop_front();
        }
        tail.push_back(l);
    };
    let run = async {
        let (mut out_open, mut err_open) = (true, true);
        while out_open || err_open {
            tokio::select! {
                l = out.next_line(), if out_open => match l {
                    Ok(Some(l)) => keep(l, false, progress),
                    _ => out_open = false,
                },
                l = err.next_line(), if err_open => match l {
                    Ok(Some(l)) => keep(l, true, progress),
                    _ => err_open = false,
                },
            }
        }
        child.wait().await
    };
    let result = tokio::time::timeout(timeout, run).await;
    let status = match result {
        Ok(s) => s.map_err(|e| Error::Tool { program: "make".into(), message: e.to_string() }),
        Err(_) => Err(Error::Tool {
            program: "make".into(),
            message: format!(
                "the build did not finish within {} s (timeouts.build_secs); its output so far is in {}",
                timeout.as_secs(),
                plan.log.display()
            ),
        }),
    };
    let _ = match &status {
        Ok(st) => writeln!(log, "[make exited: {st}]"),
        Err(e) => writeln!(log, "[{e}]"),
    };
    log.flush().map_err(|e| Error::io("write", &plan.log, e))?;
    let status = status?;
    if !status.success() {
        let lines: Vec<&str> = tail.iter().map(String::as_str).collect();
        let errors: Vec<&str> = err_tail.iter().map(String::as_str).collect();
        return Err(Error::BuildFailed {
            status: status.to_string(),
            tail: failure_tail(&lines, &errors, SHOWN_OUTPUT_LINES),
            command: plan.command_line(),
            log: plan.log.clone(),
        });
    }
    Ok(started.elapsed())
}

/// MCU check between the board's config and what the build says it built.
pub fn check_built_mcu(cfg: &KConfig, fw: &Firmware) -> Result<()> {
    match cfg.mcu() {
        Some(m) if m == fw.mcu => Ok(()),
        other => Err(Error::Tool {
            program: "make".into(),
            message: format!("built firmware for {} but the config asks for {}", fw.mcu, other.unwrap_or("no MCU")),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_read_before_the_last_compile_lines_is_still_shown() {
        let error = "src/foo.c:3: error: expected ;";
        let steps: Vec<String> = (1..=60).map(|i| format!("compiling step {i}")).collect();
        // The error was taken from its pipe after step 10; steps 11-60 came after it.
        let mut all: Vec<&str> = steps[..10].iter().map(String::as_str).collect();
        all.push(error);
        all.extend(steps[10..].iter().map(String::as_str));
        let text = failure_tail(&all, &[error], 20);
        assert!(text.contains("compiling step 60") && !text.contains("compiling step 40\n"), "{text}");
        assert!(text.ends_with(&format!("and make's error output:\n    {error}")), "{text}");
        // In the tail already: not twice.
        let text = failure_tail(&[steps[0].as_str(), error], &[error], 20);
        assert_eq!(text.matches(error).count(), 1, "{text}");
    }

    #[test]
    fn make_command_line_is_out_of_tree() {
        let p = BuildPlan {
            klipper_dir: "/home/pi/klipper".into(),
            config: "/home/pi/.config/kflash/configs/octopus.config".into(),
            out_dir: "/home/pi/.cache/kflash/build/octopus".into(),
            jobs: 4,
            log: "/home/pi/.cache/kflash/build/octopus.log".into(),
        };
        assert_eq!(
            p.make_args(),
            [
                "-C",
                "/home/pi/klipper",
                "KCONFIG_CONFIG=/home/pi/.config/kflash/configs/octopus.config",
                "OUT=/home/pi/.cache/kflash/build/octopus/",
                "-j4"
            ]
        );
        assert_eq!(
            p.command_line(),
            "make -C /home/pi/klipper KCONFIG_CONFIG=/home/pi/.config/kflash/configs/octopus.config OUT=/home/pi/.cache/kflash/build/octopus/ -j4"
        );
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("OUT=/a/b/"), "OUT=/a/b/");
        assert_eq!(shell_quote("KCONFIG_CONFIG=/x/EBB 36.config"), "'KCONFIG_CONFIG=/x/EBB 36.config'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
