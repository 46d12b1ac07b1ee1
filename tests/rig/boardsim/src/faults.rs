//! Fault injection: parsing of fault specs and the per-board fault state.

use std::fmt;

/// One fault, as written in a boards file or given to `ctl fault`.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// The board never comes back after a reboot (it stays absent until `ctl plug`).
    NoReturn,
    /// After Katapult's COMPLETE the board comes back in Katapult instead of the app.
    ReturnKatapult,
    /// Every reboot takes this many seconds instead of `reboot_delay_ms`.
    SlowReturn(f64),
    /// The cable is pulled right after the Nth SEND_BLOCK of a Katapult session was acked
    /// (one-shot): the board processes nothing after that ack.
    DropMidTransfer(u32),
    /// A noisy cable on the Katapult link: the next N Katapult responses arrive with a wrong
    /// CRC. Only Katapult frames are hit; what is left is dropped when the board leaves
    /// Katapult (the noise belongs to that session's link).
    CorruptCrc(u32),
    /// The flash erases and programs FACTOR times slower than the datasheet's typical
    /// figures (a worn or cold part; datasheet maxima are 2-9x typ). Kept until cleared.
    SlowFlash(f64),
    /// Klipper ignores the 1200-baud bootloader request.
    IgnoreTouch,
    /// The firmware hangs (a stuck main loop): the tty stays, but nothing sent to it is read
    /// or answered, and the 1200-baud request goes unseen too (Klipper's USB requests are
    /// served by the same main loop). Kept until cleared.
    Mute,
    /// Katapult's CONNECT reports this MCU instead of the real one.
    WrongMcu(String),
    /// Katapult is built for this application start address (reported and enforced).
    WrongAppStart(u32),
    /// The bootloader request reboots into the ROM bootloader (stm32 DFU 0483:df11, rp2040
    /// BOOTSEL 2e8a:0003) instead of Katapult.
    RomDfu,
}

impl Fault {
    /// Parse `name` or `name=value`.
    pub fn parse(spec: &str) -> Result<Fault, String> {
        let spec = spec.trim();
        let (name, value) = match spec.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim())),
            None => (spec, None),
        };
        fn need<'a>(name: &str, v: Option<&'a str>) -> Result<&'a str, String> {
            v.filter(|s| !s.is_empty()).ok_or_else(|| format!("fault '{name}' needs a value ({name}=...)"))
        }
        let count = |v: Option<&str>| -> Result<u32, String> {
            let v = need(name, v)?;
            v.parse::<u32>().map_err(|_| format!("fault '{name}': '{v}' is not a non-negative integer"))
        };
        let no_value = |v: Option<&str>| match v {
            None => Ok(()),
            Some(_) => Err(format!("fault '{name}' takes no value")),
        };
        Ok(match name {
            "no-return" => no_value(value).map(|_| Fault::NoReturn)?,
            "return-katapult" => no_value(value).map(|_| Fault::ReturnKatapult)?,
            "ignore-touch" => no_value(value).map(|_| Fault::IgnoreTouch)?,
            "mute" => no_value(value).map(|_| Fault::Mute)?,
            "rom-dfu" => no_value(value).map(|_| Fault::RomDfu)?,
            "slow-return" => {
                let v = need(name, value)?;
                let secs: f64 =
                    v.parse().map_err(|_| format!("fault 'slow-return': '{v}' is not a number of seconds"))?;
                if !(0.0..=3600.0).contains(&secs) {
                    return Err(format!("fault 'slow-return': {secs} s is out of range 0..3600"));
                }
                Fault::SlowReturn(secs)
            }
            "drop-mid-transfer" => Fault::DropMidTransfer(count(value)?),
            "corrupt-crc" => Fault::CorruptCrc(count(value)?),
            "slow-flash" => {
                let v = need(name, value)?;
                let k: f64 = v.parse().map_err(|_| format!("fault 'slow-flash': '{v}' is not a number"))?;
                if !(1.0..=100.0).contains(&k) {
                    return Err(format!("fault 'slow-flash': factor {k} is out of range 1..100"));
                }
                Fault::SlowFlash(k)
            }
            "wrong-mcu" => Fault::WrongMcu(need(name, value)?.to_string()),
            "wrong-app-start" => {
                let v = need(name, value)?;
                Fault::WrongAppStart(parse_u32(v).map_err(|e| format!("fault 'wrong-app-start': {e}"))?)
            }
            other => {
                return Err(format!(
                    "unknown fault '{other}' (known: no-return, return-katapult, slow-return=SECS, \
                     drop-mid-transfer=BLOCKS, corrupt-crc=N, slow-flash=FACTOR, ignore-touch, mute, wrong-mcu=NAME, \
                     wrong-app-start=ADDR, rom-dfu)"
                ))
            }
        })
    }

    /// The spec name (without value).
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::NoReturn => "no-return",
            Fault::ReturnKatapult => "return-katapult",
            Fault::SlowReturn(_) => "slow-return",
            Fault::DropMidTransfer(_) => "drop-mid-transfer",
            Fault::CorruptCrc(_) => "corrupt-crc",
            Fault::SlowFlash(_) => "slow-flash",
            Fault::IgnoreTouch => "ignore-touch",
            Fault::Mute => "mute",
            Fault::WrongMcu(_) => "wrong-mcu",
            Fault::WrongAppStart(_) => "wrong-app-start",
            Fault::RomDfu => "rom-dfu",
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::SlowReturn(s) => write!(f, "slow-return={s}"),
            Fault::DropMidTransfer(n) => write!(f, "drop-mid-transfer={n}"),
            Fault::CorruptCrc(n) => write!(f, "corrupt-crc={n}"),
            Fault::SlowFlash(k) => write!(f, "slow-flash={k}"),
            Fault::WrongMcu(m) => write!(f, "wrong-mcu={m}"),
            Fault::WrongAppStart(a) => write!(f, "wrong-app-start={a:#x}"),
            other => f.write_str(other.kind()),
        }
    }
}

/// Parse `0x…` hex or decimal.
pub fn parse_u32(s: &str) -> Result<u32, String> {
    let s = s.trim();
    let r = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u32::from_str_radix(&h.replace('_', ""), 16)
    } else {
        s.replace('_', "").parse::<u32>()
    };
    r.map_err(|_| format!("'{s}' is not a 32-bit number (decimal or 0x hex)"))
}

/// The active faults of one board. Count-based faults are decremented as they fire and
/// disappear at zero; the others stay until cleared.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Faults {
    list: Vec<Fault>,
}

impl Faults {
    pub fn new(list: Vec<Fault>) -> Self {
        let mut f = Faults::default();
        for x in list {
            f.set(x);
        }
        f
    }

    /// Add a fault, replacing one of the same kind.
    pub fn set(&mut self, fault: Fault) {
        self.list.retain(|f| f.kind() != fault.kind());
        match fault {
            Fault::CorruptCrc(0) | Fault::DropMidTransfer(0) => {}
            f => self.list.push(f),
        }
    }

    pub fn clear(&mut self) {
        self.list.clear();
    }

    pub fn specs(&self) -> Vec<String> {
        self.list.iter().map(|f| f.to_string()).collect()
    }

    fn has(&self, kind: &str) -> bool {
        self.list.iter().any(|f| f.kind() == kind)
    }

    pub fn no_return(&self) -> bool {
        self.has("no-return")
    }
    pub fn return_katapult(&self) -> bool {
        self.has("return-katapult")
    }
    pub fn ignore_touch(&self) -> bool {
        self.has("ignore-touch")
    }
    pub fn mute(&self) -> bool {
        self.has("mute")
    }
    pub fn rom_dfu(&self) -> bool {
        self.has("rom-dfu")
    }

    pub fn slow_return(&self) -> Option<f64> {
        self.list.iter().find_map(|f| match f {
            Fault::SlowReturn(s) => Some(*s),
            _ => None,
        })
    }

    pub fn wrong_mcu(&self) -> Option<&str> {
        self.list.iter().find_map(|f| match f {
            Fault::WrongMcu(m) => Some(m.as_str()),
            _ => None,
        })
    }

    pub fn wrong_app_start(&self) -> Option<u32> {
        self.list.iter().find_map(|f| match f {
            Fault::WrongAppStart(a) => Some(*a),
            _ => None,
        })
    }

    /// How much slower than typical the flash is (1 without `slow-flash`).
    pub fn flash_slowdown(&self) -> f64 {
        self.list
            .iter()
            .find_map(|f| match f {
                Fault::SlowFlash(k) => Some(*k),
                _ => None,
            })
            .unwrap_or(1.0)
    }

    pub fn drop_after(&self) -> Option<u32> {
        self.list.iter().find_map(|f| match f {
            Fault::DropMidTransfer(n) => Some(*n),
            _ => None,
        })
    }

    /// The board leaves Katapult: the noisy Katapult link (`corrupt-crc`) goes with that
    /// session. Returns the spec that was dropped, if any.
    pub fn end_katapult_session(&mut self) -> Option<String> {
        let left = self.list.iter().find(|f| matches!(f, Fault::CorruptCrc(_)))?.to_string();
        self.consume("corrupt-crc");
        Some(left)
    }

    /// Remove a one-shot fault after it fired.
    pub fn consume(&mut self, kind: &str) {
        self.list.retain(|f| f.kind() != kind);
    }
}

impl Faults {
    /// Take one unit of `corrupt-crc`.
    pub fn take_corrupt_crc(&mut self) -> bool {
        self.take_counted(|f| matches!(f, Fault::CorruptCrc(_)))
    }

    fn take_counted(&mut self, is: impl Fn(&Fault) -> bool) -> bool {
        let Some(i) = self.list.iter().position(&is) else {
            return false;
        };
        let left = match &mut self.list[i] {
            Fault::CorruptCrc(n) => {
                *n -= 1;
                *n
            }
            _ => return false,
        };
        if left == 0 {
            self.list.remove(i);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_all() {
        assert_eq!(Fault::parse("no-return").unwrap(), Fault::NoReturn);
        assert_eq!(Fault::parse("slow-return=2.5").unwrap(), Fault::SlowReturn(2.5));
        assert_eq!(Fault::parse("slow-flash=3").unwrap(), Fault::SlowFlash(3.0));
        assert!(Fault::parse("busy=3").unwrap_err().contains("unknown fault"), "Katapult has no busy answer");
        assert!(Fault::parse("slow-flash=0.5").is_err());
        assert_eq!(Fault::parse("wrong-app-start=0x8008000").unwrap(), Fault::WrongAppStart(0x8008000));
        assert_eq!(Fault::parse("wrong-mcu=stm32f446xx").unwrap(), Fault::WrongMcu("stm32f446xx".into()));
        assert!(Fault::parse("corrupt-crc").is_err());
        assert!(Fault::parse("no-return=1").is_err());
        assert!(Fault::parse("frobnicate").unwrap_err().contains("unknown fault"));
        assert!(Fault::parse("corrupt-crc=x").is_err());
        for s in [
            "no-return",
            "return-katapult",
            "slow-return=3",
            "drop-mid-transfer=10",
            "corrupt-crc=2",
            "slow-flash=2.5",
            "ignore-touch",
            "mute",
            "wrong-mcu=rp2040",
            "wrong-app-start=0x10004000",
            "rom-dfu",
        ] {
            assert_eq!(Fault::parse(s).unwrap().to_string(), s);
        }
    }

    #[test]
    fn counted_faults() {
        let mut f = Faults::new(vec![Fault::CorruptCrc(2), Fault::IgnoreTouch]);
        assert!(f.take_corrupt_crc());
        assert_eq!(f.specs(), vec!["corrupt-crc=1", "ignore-touch"]);
        assert!(f.take_corrupt_crc());
        assert!(!f.take_corrupt_crc());
        assert_eq!(f.specs(), vec!["ignore-touch"]);
        f.set(Fault::CorruptCrc(1));
        f.set(Fault::CorruptCrc(3)); // replaces
        assert_eq!(f.specs(), vec!["ignore-touch", "corrupt-crc=3"]);
        f.set(Fault::DropMidTransfer(0)); // zero count = nothing
        assert_eq!(f.specs().len(), 2);
        assert_eq!(f.flash_slowdown(), 1.0);
        f.set(Fault::SlowFlash(4.0));
        assert_eq!(f.flash_slowdown(), 4.0);
        assert_eq!(f.end_katapult_session().as_deref(), Some("corrupt-crc=3"));
        assert_eq!(f.end_katapult_session(), None);
        assert_eq!(f.specs(), vec!["ignore-touch", "slow-flash=4"], "other faults stay");
        assert!(f.ignore_touch());
        f.clear();
        assert!(f.specs().is_empty());
    }
}
