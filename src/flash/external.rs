//! The flash methods that run someone else's tool: Klipper's `make flash` and Katapult's
//! `scripts/flashtool.py`. kflash has already put the board into Katapult and checked its
//! MCU and application start, so the tool is only asked to write.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use super::error::FlashError;
use crate::kconfig::kconfig_arg;

/// Lines of tool output kept for the error message.
const TAIL: usize = 15;

/// What flashtool prints once the image is written, verified and started; exit status 0
/// alone is not proof (older versions exit 0 after some failures).
pub const FLASHTOOL_SUCCESS: &str = "Programming Complete";

async fn run(
    program: &str,
    cmd: &mut tokio::process::Command,
    timeout: Duration,
) -> Result<(bool, String), FlashError> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let child = cmd.spawn().map_err(|e| FlashError::Tool(format!("cannot run {program}: {e}")))?;
    let out = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| {
            FlashError::Tool(format!("{program} did not finish within {} s (timeouts.flash_secs)", timeout.as_secs()))
        })?
        .map_err(|e| FlashError::Tool(format!("{program}: {e}")))?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), text))
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    crate::firmware::build::indented_tail(&lines, TAIL)
}

/// `python3 <katapult_dir>/scripts/flashtool.py -d <device> -f <image>`.
pub async fn flashtool(katapult_dir: &Path, device: &str, image: &Path, timeout: Duration) -> Result<(), FlashError> {
    let script = katapult_dir.join("scripts").join("flashtool.py");
    if !script.is_file() {
        return Err(FlashError::Tool(format!(
            "Katapult's flashtool is not at {}; set katapult_dir (`kflash settings set katapult_dir PATH`) or use --method katapult",
            script.display()
        )));
    }
    let mut cmd = tokio::process::Command::new("python3");
    cmd.arg(&script).arg("-d").arg(device).arg("-f").arg(image);
    let (ok, output) = run("flashtool.py", &mut cmd, timeout).await?;
    flashtool_verdict(ok, &output)
}

/// Success needs exit 0 *and* "Programming Complete".
pub fn flashtool_verdict(exit_ok: bool, output: &str) -> Result<(), FlashError> {
    if exit_ok && output.contains(FLASHTOOL_SUCCESS) {
        return Ok(());
    }
    let why = if exit_ok { "exited 0 without \"Programming Complete\"" } else { "failed" };
    Err(FlashError::Tool(format!("flashtool.py {why}; its last lines:\n{}", tail(output))))
}

/// `make -C <klipper> KCONFIG_CONFIG=<config> OUT=<out>/ FLASH_DEVICE=<device> flash`.
pub async fn make_flash(
    klipper_dir: &Path,
    config: &Path,
    out_dir: &Path,
    device: &str,
    timeout: Duration,
) -> Result<(), FlashError> {
    let mut out = out_dir.display().to_string();
    if !out.ends_with('/') {
        out.push('/');
    }
    let mut cmd = tokio::process::Command::new("make");
    cmd.arg("-C")
        .arg(klipper_dir)
        .arg(kconfig_arg(config))
        .arg(format!("OUT={out}"))
        .arg(format!("FLASH_DEVICE={device}"))
        .arg("flash");
    let (ok, output) = run("make flash", &mut cmd, timeout).await?;
    if ok {
        Ok(())
    } else {
        Err(FlashError::Tool(format!("make flash failed; its last lines:\n{}", tail(&output))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flashtool_success_needs_programming_complete() {
        let good = "Connecting to Serial Device /dev/serial/by-path/x\nFlashing '/c/klipper.bin'...\nWrite complete: 3 pages\nVerification Complete: SHA = 1234\nProgramming Complete\n";
        assert!(flashtool_verdict(true, good).is_ok());
        let silent = "Connecting to Serial Device /dev/serial/by-path/x\nError sending command [CONNECT] to Device\n";
        let e = flashtool_verdict(true, silent).unwrap_err().to_string();
        assert!(e.contains("exited 0 without") && e.contains("Error sending command [CONNECT]"), "{e}");
        let e = flashtool_verdict(false, good).unwrap_err().to_string();
        assert!(e.contains("flashtool.py failed"), "{e}");
    }

    #[test]
    fn output_tail_keeps_the_last_lines() {
        let text: String = (0..40).map(|i| format!("line {i}\n")).collect();
        let t = tail(&text);
        assert!(t.contains("line 39") && t.contains("line 25") && !t.contains("line 24"));
    }
}
