//! Board profiles: small Kconfig fragments (`profiles/*.config` in the repository, built into
//! the binary) that seed a new board's firmware config for a popular board: MCU, bootloader
//! offset, clock and communication interface. Each file names its sources and the bootloader
//! choice it makes in a comment header:
//!
//! ```text
//! # title: BIGTREETECH Octopus Pro v1.1 (STM32H723)
//! # mcu: stm32h723xx
//! # source: https://…
//! # bootloader: 128KiB offset, …
//! # note: …
//! CONFIG_MACH_STM32=y
//! ```

use serde::Serialize;

use crate::error::{Error, Result};

/// The shipped profiles: (name, file text). The name is the file name without `.config`.
const SHIPPED: &[(&str, &str)] = &[
    ("btt-ebb-can", include_str!("../profiles/btt-ebb-can.config")),
    ("btt-ebb-usb", include_str!("../profiles/btt-ebb-usb.config")),
    ("btt-manta-m8p-g0b1", include_str!("../profiles/btt-manta-m8p-g0b1.config")),
    ("btt-manta-m8p-h723", include_str!("../profiles/btt-manta-m8p-h723.config")),
    ("btt-octopus-f446", include_str!("../profiles/btt-octopus-f446.config")),
    ("btt-octopus-pro-f446", include_str!("../profiles/btt-octopus-pro-f446.config")),
    ("btt-octopus-pro-h723", include_str!("../profiles/btt-octopus-pro-h723.config")),
    ("btt-sb2209-sb2240-can", include_str!("../profiles/btt-sb2209-sb2240-can.config")),
    ("btt-skr-mini-e3-v3", include_str!("../profiles/btt-skr-mini-e3-v3.config")),
    ("fysetc-spider", include_str!("../profiles/fysetc-spider.config")),
    ("ldo-nitehawk-36", include_str!("../profiles/ldo-nitehawk-36.config")),
    ("linux-host", include_str!("../profiles/linux-host.config")),
    ("mellow-fly-sht36-v2", include_str!("../profiles/mellow-fly-sht36-v2.config")),
    ("rp2040-pico", include_str!("../profiles/rp2040-pico.config")),
];

/// One board profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Profile {
    pub name: String,
    pub title: String,
    /// `CONFIG_MCU` the fragment selects, e.g. `stm32h723xx`.
    pub mcu: String,
    /// Where the settings come from.
    pub sources: Vec<String>,
    /// The bootloader offset chosen and the alternative.
    pub bootloader: String,
    pub notes: Vec<String>,
    /// The `CONFIG_X=value` assignments, in file order (values as written, quotes kept).
    pub settings: Vec<(String, String)>,
}

impl Profile {
    /// Parse a profile file. Every assignment must be `CONFIG_…=value`; title, mcu, a source
    /// and a bootloader line are required.
    pub fn parse(name: &str, text: &str) -> std::result::Result<Profile, String> {
        let (mut title, mut mcu, mut bootloader) = (None, None, None);
        let (mut sources, mut notes, mut settings) = (Vec::new(), Vec::new(), Vec::new());
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix('#') {
                let Some((field, value)) = comment.split_once(':') else { continue };
                let value = value.trim().to_string();
                match field.trim() {
                    "title" => title = Some(value),
                    "mcu" => mcu = Some(value),
                    "source" => sources.push(value),
                    "bootloader" => bootloader = Some(value),
                    "note" => notes.push(value),
                    _ => {}
                }
                continue;
            }
            match line.split_once('=') {
                Some((k, v)) if k.starts_with("CONFIG_") && !v.is_empty() && !k.contains(char::is_whitespace) => {
                    settings.push((k.to_string(), v.to_string()))
                }
                _ => return Err(format!("profile {name}, line {}: not a CONFIG_X=value line: {line}", n + 1)),
            }
        }
        let need = |v: Option<String>, what: &str| v.ok_or_else(|| format!("profile {name} has no '# {what}:' line"));
        let profile = Profile {
            name: name.to_string(),
            title: need(title, "title")?,
            mcu: need(mcu, "mcu")?,
            bootloader: need(bootloader, "bootloader")?,
            sources,
            notes,
            settings,
        };
        if profile.sources.is_empty() {
            return Err(format!("profile {name} cites no '# source:'"));
        }
        if profile.settings.is_empty() {
            return Err(format!("profile {name} sets nothing"));
        }
        Ok(profile)
    }

    /// The fragment handed to olddefconfig: the assignments only.
    pub fn fragment(&self) -> String {
        self.settings.iter().map(|(k, v)| format!("{k}={v}\n")).collect()
    }
}

/// Every shipped profile, sorted by name.
pub fn all() -> Vec<Profile> {
    SHIPPED.iter().map(|(name, text)| Profile::parse(name, text).expect("a shipped profile parses")).collect()
}

/// The shipped profile called `name`.
pub fn find(name: &str) -> Result<Profile> {
    all()
        .into_iter()
        .find(|p| p.name == name)
        .ok_or_else(|| Error::InvalidInput(format!("there is no board profile '{name}'; `kflash profiles` lists them")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_profile_parses_and_cites_a_source() {
        let all = all();
        assert!(all.len() >= 14, "{} profiles", all.len());
        for p in &all {
            assert!(p.sources.iter().all(|s| s.starts_with("https://")), "{}: {:?}", p.name, p.sources);
            assert!(p.settings.iter().any(|(k, _)| k.starts_with("CONFIG_MACH_")), "{} selects no chip", p.name);
        }
        let names: Vec<&str> = all.iter().map(|p| p.name.as_str()).collect();
        assert!(names.windows(2).all(|w| w[0] < w[1]), "names are unique and sorted: {names:?}");
    }

    #[test]
    fn parses_the_header_and_the_settings() {
        let text = "# kflash board profile\n# title: Test board\n# mcu: stm32h723xx\n# source: https://a\n# source: https://b\n# bootloader: 128KiB\n# note: one\n\nCONFIG_MACH_STM32=y\nCONFIG_CANBUS_FREQUENCY=500000\n";
        let p = Profile::parse("t", text).unwrap();
        assert_eq!(p.title, "Test board");
        assert_eq!(p.mcu, "stm32h723xx");
        assert_eq!(p.sources, ["https://a", "https://b"]);
        assert_eq!(p.notes, ["one"]);
        assert_eq!(p.fragment(), "CONFIG_MACH_STM32=y\nCONFIG_CANBUS_FREQUENCY=500000\n");
    }

    #[test]
    fn refuses_a_broken_profile() {
        let head = "# title: T\n# mcu: rp2040\n# source: https://a\n# bootloader: none\n";
        assert!(Profile::parse("t", &format!("{head}MACH_RP2040=y\n")).unwrap_err().contains("line 5"));
        assert!(Profile::parse("t", &format!("{head}CONFIG_X =y\n")).is_err());
        assert!(Profile::parse("t", head).unwrap_err().contains("sets nothing"));
        assert!(Profile::parse("t", "# mcu: rp2040\n# source: https://a\n# bootloader: x\nCONFIG_A=y\n")
            .unwrap_err()
            .contains("title"));
        assert!(Profile::parse("t", "# title: T\n# mcu: rp2040\n# bootloader: x\nCONFIG_A=y\n")
            .unwrap_err()
            .contains("source"));
    }

    #[test]
    fn find_names_the_listing_command_for_an_unknown_profile() {
        assert_eq!(find("btt-octopus-pro-h723").unwrap().mcu, "stm32h723xx");
        assert!(find("nope").unwrap_err().to_string().contains("kflash profiles"));
    }
}
