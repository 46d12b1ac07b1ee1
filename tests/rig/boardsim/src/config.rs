//! The boards file (TOML). See ../README.md for the format.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::faults::{parse_u32, Fault};
use crate::firmware::{profile_for, McuProfile, PageLayout};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Klipper,
    Katapult,
    Dfu,
}

impl Mode {
    pub fn as_str(&self) -> &'static str {
        match self {
            Mode::Klipper => "klipper",
            Mode::Katapult => "katapult",
            Mode::Dfu => "dfu",
        }
    }

    pub fn parse(s: &str) -> Result<Mode> {
        Ok(match s {
            "klipper" => Mode::Klipper,
            "katapult" => Mode::Katapult,
            "dfu" => Mode::Dfu,
            other => bail!("unknown mode '{other}' (klipper, katapult or dfu)"),
        })
    }
}

/// A u32 written as a TOML integer (`0x8020000` is valid TOML) or a string.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Addr {
    Int(i64),
    Str(String),
}

impl Addr {
    fn get(self, what: &str) -> Result<u32> {
        match self {
            Addr::Int(i) => u32::try_from(i).with_context(|| format!("{what}: {i} is not a 32-bit address")),
            Addr::Str(s) => parse_u32(&s).map_err(|e| anyhow::anyhow!("{what}: {e}")),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimings {
    reboot_delay_ms: Option<u64>,
    block_latency_ms: Option<u64>,
    complete_delay_ms: Option<u64>,
    flash_time_scale: Option<f64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    version: Option<String>,
    app: Option<String>,
    katapult_version: Option<String>,
    #[serde(default)]
    timings: RawTimings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBoard {
    name: String,
    mcu: String,
    serial: String,
    mode: Option<Mode>,
    plugged: Option<bool>,
    version: Option<String>,
    app: Option<String>,
    app_start: Option<Addr>,
    katapult_version: Option<String>,
    katapult_serial: Option<String>,
    udc: Option<usize>,
    page_size: Option<u32>,
    flash_size: Option<u32>,
    empty_flash: Option<bool>,
    image: Option<PathBuf>,
    #[serde(default)]
    faults: Vec<String>,
    #[serde(default)]
    timings: RawTimings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default)]
    board: Vec<RawBoard>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timings {
    pub reboot_delay_ms: u64,
    /// Fixed extra delay of every SEND_BLOCK ack (on top of the modelled flash time).
    pub block_latency_ms: u64,
    pub complete_delay_ms: u64,
    /// Multiplies the modelled flash erase / program times (firmware.rs, datasheet typ
    /// figures); 1 = realistic (default), 0 = off.
    pub flash_time_scale: f64,
}

/// One board, with every default filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct BoardConfig {
    pub name: String,
    pub mcu: String,
    /// Klipper's USB serial (chip id or a custom string).
    pub serial: String,
    /// Katapult's USB serial (defaults to `serial`).
    pub katapult_serial: String,
    pub mode: Mode,
    pub plugged: bool,
    pub version: String,
    pub app: String,
    pub app_start: u32,
    pub katapult_version: String,
    /// dummy_udc index.
    pub udc: usize,
    pub profile: McuProfile,
    pub empty_flash: bool,
    /// Initial firmware image loaded at app_start instead of a generated stand-in.
    pub image: Option<PathBuf>,
    pub faults: Vec<Fault>,
    pub timings: Timings,
}

pub const DEFAULT_VERSION: &str = "v0.12.0-300-gdeadbeef";
pub const DEFAULT_KATAPULT_VERSION: &str = "v0.0.1-109-g902f335";

/// Parse a boards file; relative `image` paths are resolved against `base_dir`.
pub fn parse_boards(text: &str, base_dir: &Path) -> Result<Vec<BoardConfig>> {
    let raw: RawFile = toml::from_str(text).context("invalid boards file")?;
    if raw.board.is_empty() {
        bail!("the boards file defines no [[board]]");
    }
    let d = &raw.defaults;
    let mut out: Vec<BoardConfig> = Vec::new();
    for (i, b) in raw.board.into_iter().enumerate() {
        let what = format!("board '{}'", b.name);
        if b.name.is_empty()
            || b.name.len() > 32
            || !b.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            bail!("board name '{}' must be 1-32 characters of A-Z a-z 0-9 - _", b.name);
        }
        if out.iter().any(|o| o.name == b.name) {
            bail!("board name '{}' is used twice", b.name);
        }
        for (field, v) in [("mcu", &b.mcu), ("serial", &b.serial)] {
            if v.is_empty() || v.len() > 126 || v.chars().any(|c| c.is_whitespace() || c.is_control()) {
                bail!("{what}: {field} '{v}' must be non-empty without whitespace");
            }
        }
        let mut profile = profile_for(&b.mcu).with_context(|| {
            format!("{what}: unknown MCU family '{}' (known: stm32f0/f1/f2/f4/g0/g4/h7, rp2040, rp2350)", b.mcu)
        })?;
        if let Some(p) = b.page_size {
            if p == 0 || !p.is_power_of_two() || p < 64 {
                bail!("{what}: page_size {p} must be a power of two >= 64");
            }
            profile.pages = PageLayout::Uniform(p);
        }
        if let Some(s) = b.flash_size {
            profile.flash_size = s;
        }
        let app_start = match b.app_start {
            Some(a) => a.get(&format!("{what}: app_start"))?,
            None => profile.app_start,
        };
        if app_start % 64 != 0
            || (app_start as u64) < profile.flash_base as u64
            || app_start as u64 >= profile.flash_base as u64 + profile.flash_size as u64
        {
            bail!("{what}: app_start {app_start:#x} is not a 64-byte aligned address inside flash");
        }
        let app = b.app.or_else(|| d.app.clone()).unwrap_or_else(|| "Klipper".into());
        if app != "Klipper" && app != "Kalico" {
            bail!("{what}: app must be \"Klipper\" or \"Kalico\", not '{app}'");
        }
        let mut faults = Vec::new();
        for f in &b.faults {
            faults.push(Fault::parse(f).map_err(|e| anyhow::anyhow!("{what}: {e}"))?);
        }
        let t = |own: Option<u64>, def: Option<u64>, dflt: u64| own.or(def).unwrap_or(dflt);
        let timings = Timings {
            reboot_delay_ms: t(b.timings.reboot_delay_ms, d.timings.reboot_delay_ms, 1400),
            block_latency_ms: t(b.timings.block_latency_ms, d.timings.block_latency_ms, 0),
            complete_delay_ms: t(b.timings.complete_delay_ms, d.timings.complete_delay_ms, 100),
            flash_time_scale: b.timings.flash_time_scale.or(d.timings.flash_time_scale).unwrap_or(1.0),
        };
        if !(0.0..=100.0).contains(&timings.flash_time_scale) {
            bail!("{what}: flash_time_scale {} must be 0 (off) .. 100", timings.flash_time_scale);
        }
        let mode = b.mode.unwrap_or(Mode::Klipper);
        let image = b.image.map(|p| if p.is_relative() { base_dir.join(p) } else { p });
        out.push(BoardConfig {
            katapult_serial: b.katapult_serial.unwrap_or_else(|| b.serial.clone()),
            name: b.name,
            mcu: b.mcu,
            serial: b.serial,
            mode,
            plugged: b.plugged.unwrap_or(true),
            version: b.version.or_else(|| d.version.clone()).unwrap_or_else(|| DEFAULT_VERSION.into()),
            app,
            app_start,
            katapult_version: b
                .katapult_version
                .or_else(|| d.katapult_version.clone())
                .unwrap_or_else(|| DEFAULT_KATAPULT_VERSION.into()),
            udc: b.udc.unwrap_or(i),
            profile,
            empty_flash: b.empty_flash.unwrap_or(false),
            image,
            faults,
            timings,
        });
    }
    for (i, a) in out.iter().enumerate() {
        if let Some(b) = out[i + 1..].iter().find(|b| b.udc == a.udc) {
            bail!("boards '{}' and '{}' both use dummy_udc.{}", a.name, b.name, a.udc);
        }
    }
    Ok(out)
}

pub fn load_boards(path: &Path) -> Result<Vec<BoardConfig>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read boards file {}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse_boards(&text, base).with_context(|| format!("boards file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_file_parses() {
        let text = include_str!("../../boards/default.toml");
        let b = parse_boards(text, Path::new("/x")).unwrap();
        assert_eq!(b.len(), 4);
        assert_eq!(b[0].name, "octopus");
        assert_eq!(b[0].app_start, 0x0802_0000);
        assert_eq!(b[1].app_start, 0x1000_4000);
        assert_eq!(b[2].app_start, 0x0800_8000);
        assert_eq!(b[3].serial, "mmb_cubic");
        assert!(!b[3].plugged);
        assert_eq!(b.iter().map(|b| b.udc).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
        assert_eq!(b[0].timings.reboot_delay_ms, 1400);
        assert_eq!(b[0].timings.complete_delay_ms, 100);
        assert_eq!(b[0].timings.flash_time_scale, 1.0, "realistic flash timing by default");
    }

    #[test]
    fn full_board() {
        let text = r#"
            [defaults]
            version = "v1"
            timings = { reboot_delay_ms = 200 }
            [[board]]
            name = "a"
            mcu = "stm32g0b1xx"
            serial = "ABC"
            mode = "katapult"
            plugged = true
            app = "Kalico"
            app_start = "0x8004000"
            katapult_version = "kv"
            udc = 2
            page_size = 4096
            empty_flash = true
            image = "img/klipper.bin"
            faults = ["corrupt-crc=2", "ignore-touch"]
            timings = { block_latency_ms = 5, flash_time_scale = 0.5 }
        "#;
        let b = &parse_boards(text, Path::new("/base")).unwrap()[0];
        assert_eq!(b.mode, Mode::Katapult);
        assert_eq!(b.version, "v1");
        assert_eq!(b.app, "Kalico");
        assert_eq!(b.app_start, 0x0800_4000);
        assert_eq!(b.udc, 2);
        assert_eq!(b.profile.pages, PageLayout::Uniform(4096));
        assert_eq!(b.image.as_deref(), Some(Path::new("/base/img/klipper.bin")));
        assert_eq!(b.faults, vec![Fault::CorruptCrc(2), Fault::IgnoreTouch]);
        assert_eq!(
            b.timings,
            Timings { reboot_delay_ms: 200, block_latency_ms: 5, complete_delay_ms: 100, flash_time_scale: 0.5 }
        );
        // hex integer form
        let text = "[[board]]\nname='x'\nmcu='rp2040'\nserial='S'\napp_start=0x10008000\n";
        assert_eq!(parse_boards(text, Path::new("/")).unwrap()[0].app_start, 0x1000_8000);
    }

    #[test]
    fn errors() {
        let e = |t: &str| format!("{:#}", parse_boards(t, Path::new("/")).unwrap_err());
        assert!(e("").contains("no [[board]]"));
        assert!(e("[[board]]\nname='a'\nmcu='avr'\nserial='s'").contains("unknown MCU"));
        assert!(e("[[board]]\nname='a b'\nmcu='rp2040'\nserial='s'").contains("board name"));
        assert!(e("[[board]]\nname='a'\nmcu='rp2040'\nserial='s'\ncolour=1").contains("unknown field"));
        assert!(e("[[board]]\nname='a'\nmcu='rp2040'\nserial='s'\nfaults=['nope']").contains("unknown fault"));
        assert!(e("[[board]]\nname='a'\nmcu='rp2040'\nserial='s'\napp_start=5").contains("app_start"));
        assert!(e("[[board]]\nname='a'\nmcu='rp2040'\nserial='s'\napp='x'").contains("app must be"));
        assert!(e("[[board]]\nname='a'\nmcu='rp2040'\nserial='s'\ntimings={flash_time_scale=-1}")
            .contains("flash_time_scale"));
        let dup = "[[board]]\nname='a'\nmcu='rp2040'\nserial='s'\n[[board]]\nname='b'\nmcu='rp2040'\nserial='t'\nudc=0";
        assert!(e(dup).contains("both use dummy_udc.0"));
    }
}
