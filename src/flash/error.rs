//! What can go wrong between "stop Klipper" and "the board runs the new firmware".

#[derive(Debug, thiserror::Error)]
pub enum FlashError {
    #[error(
        "the bootloader on this board is for {bootloader}, but the firmware is built for {config}: refusing to write"
    )]
    WrongMcu { bootloader: String, config: String },

    #[error("Katapult starts the application at {bootloader:#x}, but the firmware is built for {config:#x}: refusing to write")]
    WrongAppStart { bootloader: u32, config: u32 },

    #[error("the board's config has no CONFIG_FLASH_APPLICATION_ADDRESS, so the bootloader offset cannot be checked")]
    NoAppAddress,

    #[error(
        "the image embeds a data dictionary for {image}, but the bootloader is for {bootloader}: refusing to write"
    )]
    ImageMcu { image: String, bootloader: String },

    #[error("Katapult reports a block size of {0}, which is not a sane value")]
    BadBlockSize(u32),

    #[error("no valid answer to {command} after {tries} tries (last problem: {last})")]
    NoResponse { command: &'static str, tries: u32, last: String },

    #[error("Katapult acknowledged block {got:#x} while {sent:#x} was sent")]
    AddressMismatch { sent: u32, got: u32 },

    #[error("read-back of block {addr:#x} differs from what was written")]
    ReadBack { addr: u32 },

    #[error("the board went away during {0}")]
    DeviceGone(&'static str),

    #[error("serial I/O on {path} failed: {message}")]
    Io { path: String, message: String },

    #[error("the board did not enter its bootloader: {0}")]
    NoBootloader(String),

    /// It ignored the bootloader request and does not answer Klipper's identify either: a
    /// hung firmware (the tty is there, nothing answers).
    #[error(
        "the board does not answer: it ignored the 1200-baud request for {secs:.1} s, and Klipper's identify got \
         no answer within {probe_secs:.0} s either, so its firmware hangs"
    )]
    Hung { secs: f64, probe_secs: f64 },

    #[error("the board came back as {name} ({vid_pid}), not Katapult")]
    RomBootloader { name: String, vid_pid: String },

    #[error("the board did not come back running Klipper: {0}")]
    NotBack(String),

    #[error("the board runs {running}, not the flashed {expected}")]
    VersionMismatch { expected: String, running: String },

    /// Level (c) failed after a good flash: the board itself reported the new version
    /// (level b), but Klippy did not get ready, or Moonraker could not say what it runs.
    #[error("the board runs the flashed {version} (it said so itself), but Klipper did not confirm it: {cause}")]
    KlipperUnconfirmed { version: String, cause: std::sync::Arc<crate::moonraker::MoonrakerError> },

    #[error("could not read the running firmware's identify data: {0}")]
    Identify(String),

    #[error("{0}")]
    Tool(String),
}

impl FlashError {
    /// kflash refused to write because the bootloader, config or image disagree: nothing was
    /// written, and no other method may try.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            FlashError::WrongMcu { .. }
                | FlashError::WrongAppStart { .. }
                | FlashError::ImageMcu { .. }
                | FlashError::NoAppAddress
        )
    }

    pub fn help(&self) -> String {
        match self {
            FlashError::WrongMcu { .. } | FlashError::ImageMcu { .. } => {
                "nothing was written; check that the board's registration and `kflash config KEY` are for this board".into()
            }
            FlashError::WrongAppStart { bootloader, .. } => format!(
                "nothing was written; in `kflash config KEY` set the bootloader offset so the application starts at {bootloader:#x}"
            ),
            FlashError::NoAppAddress => "run `kflash config KEY` and choose the bootloader offset your Katapult uses".into(),
            FlashError::BadBlockSize(_) | FlashError::NoResponse { .. } | FlashError::AddressMismatch { .. } | FlashError::ReadBack { .. } => {
                "the new image was not started: the board stays in Katapult, ready for `kflash flash KEY` to try again".into()
            }
            FlashError::DeviceGone(_) => "check the USB cable; if the board stays in Katapult, run `kflash flash KEY` again".into(),
            FlashError::Io { .. } => "check that no other program (Klipper, a terminal) holds the port".into(),
            FlashError::NoBootloader(_) => {
                "the board may lack Katapult (`kflash katapult-check KEY`), or try method make-flash; power-cycle it if it is stuck".into()
            }
            FlashError::Hung { .. } => "nothing was written; power-cycle the board (unplug its USB cable, or switch \
                 the printer off and on), then run `kflash flash KEY` again"
                .into(),
            FlashError::RomBootloader { .. } => {
                "the board has no working Katapult: flash it with the chip's own tool (dfu-util / picotool) or install Katapult; power-cycle it to leave the ROM bootloader".into()
            }
            FlashError::NotBack(_) => {
                "`kflash watch` shows what the board does; if it is just slow raise timeouts.reconnect_secs, else power-cycle it and run `kflash flash KEY` again".into()
            }
            FlashError::VersionMismatch { .. } => "flash again with `kflash flash KEY --force`; if it persists, the write did not take".into(),
            FlashError::KlipperUnconfirmed { cause, .. } => format!(
                "the flash itself is done and Klipper was started again; {}",
                cause.help().unwrap_or_else(|| "read klippy.log".into())
            ),
            FlashError::Identify(_) => "check that nothing else holds the board's tty, and that it runs Klipper".into(),
            FlashError::Tool(_) => "read the tool's output above".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::moonraker::MoonrakerError;

    /// Level (c) failing after a good flash is a verification failure (exit 7), not "Moonraker
    /// could not be asked" (exit 9), and says the flash itself is done.
    #[test]
    fn klipper_not_confirming_a_good_flash_is_exit_7() {
        let cause = MoonrakerError::KlippyNotReady {
            state: "startup".into(),
            message: "Printer is not ready\nThe klippy host software is attempting to connect.".into(),
            waited_secs: 30.0,
            diagnosis: Some("Klippy has not connected to [mcu]: its serial /dev/x does not exist, so …".into()),
        };
        let e = crate::Error::from(FlashError::KlipperUnconfirmed { version: "v1".into(), cause: cause.into() });
        assert_eq!((e.exit_code(), e.kind()), (7, "flash"));
        assert_eq!(
            e.to_string(),
            "the board runs the flashed v1 (it said so itself), but Klipper did not confirm it: Klippy is in state \
             startup: Printer is not ready; Klippy has not connected to [mcu]: its serial /dev/x does not exist, so …"
        );
        let help = e.help().unwrap();
        assert!(help.starts_with("the flash itself is done and Klipper was started again; check that board"), "{help}");
    }
}
