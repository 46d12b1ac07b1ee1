//! MCU profiles (flash layout, Katapult app start) and stand-in firmware images: a vector
//! table followed by a zlib level-9 JSON data dictionary, like a real klipper.bin has.

use kflash::protocol::klipper::{
    compress_dictionary, find_embedded_dictionary, DataDictionary, IDENTIFY_FORMAT, IDENTIFY_RESPONSE_FORMAT,
};
use serde_json::{json, Map, Value};

/// How flash is divided into erase pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageLayout {
    /// Every page has this size.
    Uniform(u32),
    /// stm32f2/f4 sectors: 16 KiB below 0x08010000, 64 KiB below 0x08020000, then 128 KiB
    /// (katapult src/stm32/flash.c `flash_get_page_size`).
    Stm32F4,
}

impl PageLayout {
    /// Size of the page containing `addr`.
    pub fn page_size(&self, addr: u32) -> u32 {
        match *self {
            PageLayout::Uniform(n) => n,
            PageLayout::Stm32F4 => {
                if addr < 0x0801_0000 {
                    16 * 1024
                } else if addr < 0x0802_0000 {
                    64 * 1024
                } else {
                    128 * 1024
                }
            }
        }
    }

    /// Start of the page containing `addr` (pages are aligned to their size in every layout
    /// used here).
    pub fn page_start(&self, addr: u32) -> u32 {
        let size = self.page_size(addr);
        addr - addr % size
    }
}

/// Which of Katapult's flash drivers the MCU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteRules {
    /// katapult src/stm32/flash.c: every SEND_BLOCK is programmed at once; the first block
    /// of a page erases it; SEND_EOF counts erase pages.
    Stm32,
    /// katapult src/rp2040/flash.c: blocks are collected in a 256-byte page buffer; the
    /// buffer is written (erasing the 4 KiB sector first when the page starts one) when a
    /// block outside it arrives and at SEND_EOF; SEND_EOF counts 256-byte pages.
    Rp2040,
}

/// Typical flash timings of an MCU family (datasheet "typ" figures, not max).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlashTiming {
    /// Bytes one program operation writes (the flash's programming unit as Katapult uses it).
    pub program_unit: u32,
    /// Typical time of one program operation, in microseconds.
    pub program_us: f64,
    /// Typical erase time in milliseconds per erase-page size in bytes. A size not listed
    /// scales linearly from the first entry.
    pub erase_ms: &'static [(u32, f64)],
}

impl FlashTiming {
    /// Time to program `len` bytes.
    pub fn program(&self, len: u32) -> std::time::Duration {
        let ops = len.div_ceil(self.program_unit.max(1));
        std::time::Duration::from_secs_f64(ops as f64 * self.program_us / 1e6)
    }

    /// Time to erase one page or sector of `size` bytes.
    pub fn erase(&self, size: u32) -> std::time::Duration {
        let ms = match self.erase_ms.iter().find(|(s, _)| *s == size) {
            Some((_, ms)) => *ms,
            None => match self.erase_ms.first() {
                Some((s, ms)) => ms * size as f64 / *s as f64,
                None => 0.0,
            },
        };
        std::time::Duration::from_secs_f64(ms / 1e3)
    }
}

// Datasheet figures ("typ" column) behind the flash timing model. Program unit = what
// Katapult's driver writes per operation on that family.
//
// STM32F2/F4: DS8626 (STM32F405/407) Table "Flash memory programming" and DS10693
// (STM32F446) same table, x32 parallelism (VDD 2.7-3.6 V, Katapult writes 32-bit words):
// t_prog word 16 us; t_ERASE16KB 250 ms, t_ERASE64KB 550 ms, t_ERASE128KB 1 s (max 2 s).
// DS6329 (STM32F205/207) gives the same x32 figures.
const STM32F4_TIMING: FlashTiming = FlashTiming {
    program_unit: 4,
    program_us: 16.0,
    erase_ms: &[(16 * 1024, 250.0), (64 * 1024, 550.0), (128 * 1024, 1000.0)],
};
// STM32H7: DS13313 (STM32H723/733) Table "Flash memory programming" (x64 parallelism):
// t_prog 256-bit flash word (Katapult writes 8 words per flash word) 50 us typ;
// t_ERASE128KB sector erase 1 s typ (2 s max at x64). DS12110 (STM32H743) gives the same
// order (sector erase 1 s typ at x64).
const STM32H7_TIMING: FlashTiming =
    FlashTiming { program_unit: 32, program_us: 50.0, erase_ms: &[(128 * 1024, 1000.0)] };
// STM32G0: DS13560 (STM32G0B1) Table "Flash memory characteristics": t_prog 64-bit double
// word 85 us typ; t_ERASE page (2 KiB) 22 ms typ (40 ms max).
const STM32G0_TIMING: FlashTiming = FlashTiming { program_unit: 8, program_us: 85.0, erase_ms: &[(2048, 22.0)] };
// STM32G4: DS12288 (STM32G431) Table "Flash memory characteristics": t_prog 64-bit double
// word 81.7 us typ; t_ERASE page (2 KiB) 22 ms typ (40 ms max).
const STM32G4_TIMING: FlashTiming = FlashTiming { program_unit: 8, program_us: 81.7, erase_ms: &[(2048, 22.0)] };
// STM32F0: DS9826 (STM32F072) Table "Flash memory characteristics": t_prog 16-bit
// half-word 53.5 us typ; t_ERASE page 30 ms typ (40 ms max) -- the 1 KiB and 2 KiB pages of
// the family have the same figure.
const STM32F0_TIMING: FlashTiming =
    FlashTiming { program_unit: 2, program_us: 53.5, erase_ms: &[(1024, 30.0), (2048, 30.0)] };
// STM32F1: DS5319 (STM32F103x8/xB) Table "Flash memory characteristics": t_prog 16-bit
// half-word 52.5 us typ; t_ERASE page (1 KiB) 20 ms min / 40 ms max (no typ given; 30 ms
// used).
const STM32F1_TIMING: FlashTiming =
    FlashTiming { program_unit: 2, program_us: 52.5, erase_ms: &[(1024, 30.0), (2048, 30.0)] };
// RP2040/RP2350: external QSPI NOR flash. Winbond W25Q16JV datasheet (Raspberry Pi Pico's
// flash), section 9.6 "AC Electrical Characteristics": t_PP page program (256 B) 0.4 ms typ
// (3 ms max); t_SE sector erase (4 KiB) 45 ms typ (400 ms max).
const QSPI_NOR_TIMING: FlashTiming = FlashTiming { program_unit: 256, program_us: 400.0, erase_ms: &[(4096, 45.0)] };

/// What the simulator needs to know about an MCU family.
#[derive(Debug, Clone, PartialEq)]
pub struct McuProfile {
    pub flash_base: u32,
    pub flash_size: u32,
    pub pages: PageLayout,
    /// Katapult's flash driver for the family.
    pub rules: WriteRules,
    /// Typical program / erase times.
    pub timing: FlashTiming,
    /// Katapult's `CONFIG_LAUNCH_APP_ADDRESS` default for this family.
    pub app_start: u32,
    /// Initial stack pointer written into stand-in images.
    pub initial_sp: u32,
    /// Klipper's CLOCK_FREQ for the dictionary.
    pub clock_freq: u64,
    /// USB identity of the ROM bootloader: (vid, pid, manufacturer, product).
    pub rom_usb: (u16, u16, &'static str, &'static str),
}

// The ROM's own strings (lsusb -v of an STM32F4 in DFU mode; see dfu.rs).
const STM32_DFU: (u16, u16, &str, &str) = (0x0483, 0xdf11, "STMicroelectronics", "STM32  BOOTLOADER");
const RP2_BOOT: (u16, u16, &str, &str) = (0x2e8a, 0x0003, "Raspberry Pi", "RP2 Boot");

/// The profile for a `CONFIG_MCU` name, or `None` for an unknown family.
pub fn profile_for(mcu: &str) -> Option<McuProfile> {
    let m = mcu.to_ascii_lowercase();
    let stm32 = |size: u32, pages: PageLayout, app_start: u32, clock: u64, timing: FlashTiming| McuProfile {
        flash_base: 0x0800_0000,
        flash_size: size,
        pages,
        rules: WriteRules::Stm32,
        timing,
        app_start,
        initial_sp: 0x2002_0000,
        clock_freq: clock,
        rom_usb: STM32_DFU,
    };
    let p = if m.starts_with("stm32h7") {
        let size = if m.starts_with("stm32h723") || m.starts_with("stm32h750") { 1024 * 1024 } else { 2 * 1024 * 1024 };
        let clock = if m.starts_with("stm32h723") { 520_000_000 } else { 400_000_000 };
        stm32(size, PageLayout::Uniform(128 * 1024), 0x0802_0000, clock, STM32H7_TIMING)
    } else if m.starts_with("stm32f4") || m.starts_with("stm32f2") {
        let size = if m.starts_with("stm32f401") || m.starts_with("stm32f446") { 512 * 1024 } else { 1024 * 1024 };
        let clock = if m.starts_with("stm32f446") { 180_000_000 } else { 168_000_000 };
        stm32(size, PageLayout::Stm32F4, 0x0800_8000, clock, STM32F4_TIMING)
    } else if m.starts_with("stm32f0") {
        let page = if m.starts_with("stm32f042") { 1024 } else { 2048 };
        stm32(128 * 1024, PageLayout::Uniform(page), 0x0800_2000, 48_000_000, STM32F0_TIMING)
    } else if m.starts_with("stm32f1") {
        stm32(128 * 1024, PageLayout::Uniform(1024), 0x0800_2000, 72_000_000, STM32F1_TIMING)
    } else if m.starts_with("stm32g0") {
        stm32(512 * 1024, PageLayout::Uniform(2048), 0x0800_2000, 64_000_000, STM32G0_TIMING)
    } else if m.starts_with("stm32g4") {
        stm32(512 * 1024, PageLayout::Uniform(2048), 0x0800_2000, 150_000_000, STM32G4_TIMING)
    } else if m.starts_with("rp2040") || m.starts_with("rp2350") {
        let rom = if m.starts_with("rp2350") { (0x2e8a, 0x000f, "Raspberry Pi", "RP2350 Boot") } else { RP2_BOOT };
        McuProfile {
            flash_base: 0x1000_0000,
            flash_size: 2 * 1024 * 1024,
            // 4 KiB erase sectors; Katapult programs 256-byte pages inside them.
            pages: PageLayout::Uniform(4096),
            rules: WriteRules::Rp2040,
            timing: QSPI_NOR_TIMING,
            app_start: 0x1000_4000,
            initial_sp: 0x2004_2000,
            clock_freq: 12_000_000,
            rom_usb: rom,
        }
    } else {
        return None;
    };
    Some(p)
}

/// The declarations of the Klipper stand-in tree (what a real build's compile-time requests
/// hold, per source file); its scripts/rigdict.py builds klipper.dict from the same file.
pub const RIG_DECLS_JSON: &str = include_str!("../../standins/klipper-tree/scripts/rigdecls.json");

/// `build_versions` of stand-in images (the Arm GNU toolchain of Debian bookworm's
/// gcc-arm-none-eabi, as the stand-in tree's rigmcu.py says).
pub const BUILD_VERSIONS: &str = "gcc: (15:13.2.rel1-2) 13.2.1 20231009 binutils: (2.42-1+18) 2.42";

/// Klipper's first static_string_id (0 and 1 are reserved).
const STATIC_STRING_MIN: u64 = 2;

/// The id a message with encoded id `encoded` has in the data dictionary: ids 96..127 are
/// one VLQ byte with the sign bits set, so they read as -32..-1 (Klipper's buildcommands.py).
pub fn msgid_of_encoded(encoded: i64) -> i64 {
    if (96..128).contains(&encoded) {
        encoded - 128
    } else {
        encoded
    }
}

fn arch_of(mcu: &str) -> &'static str {
    if mcu.starts_with("rp") {
        "rp2040"
    } else {
        "stm32"
    }
}

fn module_applies(module: &Value, mcu: &str, transport: &str) -> bool {
    let Some(when) = module.get("when") else {
        return true;
    };
    let list =
        |k: &str| when.get(k).and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>());
    if let Some(arch) = when.get("arch").and_then(Value::as_str) {
        if arch != arch_of(mcu) {
            return false;
        }
    }
    if let Some(prefixes) = list("mcu") {
        if !prefixes.iter().any(|p| mcu.starts_with(p)) {
            return false;
        }
    }
    if let Some(transports) = list("transport") {
        if !transports.contains(&transport) {
            return false;
        }
    }
    true
}

/// The data dictionary a stand-in build for `mcu` carries (compact JSON, keys sorted like
/// Klipper's buildcommands.py): commands, responses, constants and enumerations from
/// [`RIG_DECLS_JSON`], message and static-string ids assigned as Klipper does. The same text
/// as the stand-in tree's `rigdict.dictionary(app, version, BUILD_VERSIONS, mcu, clock)`.
pub fn protocol_dictionary_json(app: &str, version: &str, build_versions: &str, mcu: &str, clock_freq: u64) -> String {
    transport_dictionary_json(app, version, build_versions, mcu, clock_freq, "USBSERIAL")
}

/// [`protocol_dictionary_json`] of a build for `transport` (`USBSERIAL`, `CANSERIAL`, …): a
/// CAN build declares `get_canbus_id` and the CAN constants.
pub fn transport_dictionary_json(
    app: &str,
    version: &str,
    build_versions: &str,
    mcu: &str,
    clock_freq: u64,
    transport: &str,
) -> String {
    let decls: Value = serde_json::from_str(RIG_DECLS_JSON).expect("rigdecls.json is valid JSON");
    let mut commands: Vec<String> = Vec::new();
    let mut responses: Vec<String> = Vec::new();
    let mut constants = Map::new();
    let mut enums: Map<String, Value> = Map::new();
    let mut strings: Vec<String> = Vec::new();
    let modules = decls["modules"].as_array().expect("rigdecls.json has modules");
    for m in modules.iter().filter(|m| module_applies(m, mcu, transport)) {
        for c in m.get("commands").and_then(Value::as_array).into_iter().flatten() {
            let f = c[0].as_str().expect("command format").to_string();
            if !commands.contains(&f) {
                commands.push(f);
            }
        }
        for r in m.get("responses").and_then(Value::as_array).into_iter().flatten() {
            let f = r.as_str().expect("response format").to_string();
            if !responses.contains(&f) {
                responses.push(f);
            }
        }
        for (k, v) in m.get("constants").and_then(Value::as_object).into_iter().flatten() {
            let v = match v.as_str() {
                Some("@MCU@") => json!(mcu),
                Some("@CLOCK_FREQ@") => json!(clock_freq),
                Some("@SERIAL_BAUD@") => json!(250_000),
                Some("@CANBUS_FREQUENCY@") => json!(1_000_000),
                _ => v.clone(),
            };
            constants.insert(k.clone(), v);
        }
        for (name, vals) in m.get("enumerations").and_then(Value::as_object).into_iter().flatten() {
            let e = enums.entry(name.clone()).or_insert_with(|| json!({}));
            for (k, v) in vals.as_object().into_iter().flatten() {
                e[k] = v.clone();
            }
        }
        for s in m.get("static_strings").and_then(Value::as_array).into_iter().flatten() {
            let s = s.as_str().expect("static string").to_string();
            if !strings.contains(&s) {
                strings.push(s);
            }
        }
    }
    // identify_response 0 and identify 1 are fixed; the rest follow in declaration order.
    let mut ids: Vec<(String, i64)> = vec![(IDENTIFY_RESPONSE_FORMAT.into(), 0), (IDENTIFY_FORMAT.into(), 1)];
    let mut next = 1;
    for msg in commands.iter().chain(responses.iter()) {
        if !ids.iter().any(|(m, _)| m == msg) {
            next += 1;
            ids.push((msg.clone(), next));
        }
    }
    let mut cmd_map = Map::new();
    let mut resp_map = Map::new();
    for (msg, enc) in ids {
        let target = if commands.contains(&msg) { &mut cmd_map } else { &mut resp_map };
        target.insert(msg, json!(msgid_of_encoded(enc)));
    }
    let sids: Map<String, Value> =
        strings.iter().enumerate().map(|(i, s)| (s.clone(), json!(i as u64 + STATIC_STRING_MIN))).collect();
    enums.insert("static_string_id".into(), Value::Object(sids));
    let dict = json!({
        "app": app,
        "build_versions": build_versions,
        "commands": cmd_map,
        "config": constants,
        "enumerations": enums,
        "license": "GNU GPLv3",
        "responses": resp_map,
        "version": version,
    });
    // serde_json's Map is a BTreeMap (no preserve_order), so keys come out sorted.
    serde_json::to_string(&dict).expect("a JSON value always serializes")
}

/// The data dictionary the simulator's built-in stand-in image carries (see
/// [`protocol_dictionary_json`]).
pub fn dictionary_json(app: &str, version: &str, mcu: &str, clock_freq: u64) -> String {
    protocol_dictionary_json(app, version, BUILD_VERSIONS, mcu, clock_freq)
}

/// The dictionary of a stand-in CAN toolhead build (CANSERIAL at 1 Mbit/s).
pub fn can_dictionary_json(app: &str, version: &str, mcu: &str, clock_freq: u64) -> String {
    transport_dictionary_json(app, version, BUILD_VERSIONS, mcu, clock_freq, "CANSERIAL")
}

/// A stand-in firmware image: `[initial SP][reset vector][0 x 56][zlib dictionary]`.
pub fn standin_image(app_start: u32, initial_sp: u32, dict_json: &str) -> Vec<u8> {
    let mut img = Vec::new();
    img.extend_from_slice(&initial_sp.to_le_bytes());
    img.extend_from_slice(&(app_start + 0x101).to_le_bytes());
    img.resize(64, 0);
    img.extend(compress_dictionary(dict_json));
    img
}

/// What is installed at the application address, as the bootloader sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum AppCheck {
    /// Word 0 is 0 or 0xFFFFFFFF: Katapult does not jump.
    NoApplication,
    /// Katapult would jump, but no Klipper/Kalico dictionary was found: treated as bricked.
    NoDictionary,
    /// A Klipper/Kalico application.
    Klipper {
        dictionary: DataDictionary,
        /// The exact zlib bytes from the image, served through identify.
        compressed: Vec<u8>,
    },
}

impl AppCheck {
    /// Inspect the bytes found at the application start.
    pub fn inspect(image: &[u8]) -> AppCheck {
        if image.len() < 4 {
            return AppCheck::NoApplication;
        }
        let w0 = u32::from_le_bytes([image[0], image[1], image[2], image[3]]);
        if w0 == 0 || w0 == 0xffff_ffff {
            return AppCheck::NoApplication;
        }
        match find_embedded_dictionary(image) {
            Some(e) => AppCheck::Klipper {
                compressed: image[e.offset..e.offset + e.compressed_len].to_vec(),
                dictionary: e.dictionary,
            },
            None => AppCheck::NoDictionary,
        }
    }

    pub fn is_klipper(&self) -> bool {
        matches!(self, AppCheck::Klipper { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles() {
        let h7 = profile_for("stm32h723xx").unwrap();
        assert_eq!(h7.app_start, 0x0802_0000);
        assert_eq!(h7.pages.page_size(0x0802_0040), 128 * 1024);
        let f4 = profile_for("stm32f446xx").unwrap();
        assert_eq!(f4.app_start, 0x0800_8000);
        assert_eq!(f4.pages.page_size(f4.app_start), 16 * 1024);
        assert_eq!(f4.pages.page_start(0x0801_2345), 0x0801_0000);
        assert_eq!(f4.pages.page_start(0x0804_1000), 0x0804_0000);
        assert_eq!(profile_for("stm32g0b1xx").unwrap().app_start, 0x0800_2000);
        assert_eq!(profile_for("stm32f103xe").unwrap().app_start, 0x0800_2000);
        assert_eq!(profile_for("stm32f072xb").unwrap().app_start, 0x0800_2000);
        let rp = profile_for("rp2040").unwrap();
        assert_eq!(rp.app_start, 0x1000_4000);
        assert_eq!(rp.rom_usb.1, 0x0003);
        assert!(profile_for("atmega2560").is_none());
    }

    #[test]
    fn standin_image_boots() {
        let json = dictionary_json("Klipper", "v0.12.0-300-gdeadbeef", "stm32h723xx", 520_000_000);
        assert!(json.starts_with(r#"{"app":"Klipper","build_versions":"#));
        let img = standin_image(0x0802_0000, 0x2002_0000, &json);
        match AppCheck::inspect(&img) {
            AppCheck::Klipper { dictionary, compressed } => {
                assert_eq!(dictionary.version, "v0.12.0-300-gdeadbeef");
                assert_eq!(dictionary.mcu, "stm32h723xx");
                assert_eq!(compressed[..2], [0x78, 0xda]);
                assert_eq!(DataDictionary::from_zlib(&compressed).unwrap().raw_json, json);
            }
            other => panic!("{other:?}"),
        }
        let mut blank = img.clone();
        blank[..4].copy_from_slice(&[0xff; 4]);
        assert_eq!(AppCheck::inspect(&blank), AppCheck::NoApplication);
        assert_eq!(AppCheck::inspect(&[0x00, 0x10, 0x00, 0x20, 1, 2, 3]), AppCheck::NoDictionary);
    }

    #[test]
    fn realistic_dictionary() {
        let d: Value =
            serde_json::from_str(&dictionary_json("Klipper", "v0.13.0-1-gabc", "stm32h723xx", 520_000_000)).unwrap();
        let n = |k: &str| d[k].as_object().unwrap().len();
        assert!(n("commands") > 100 && n("responses") >= 25, "{} {}", n("commands"), n("responses"));
        assert_eq!(d["commands"]["identify offset=%u count=%c"], 1);
        assert_eq!(d["responses"]["identify_response offset=%u data=%.*s"], 0);
        assert_eq!(d["commands"]["allocate_oids count=%c"], 2);
        assert_eq!(d["config"]["CLOCK_FREQ"], 520_000_000);
        assert_eq!(d["config"]["RESERVE_PINS_USB"], "PA11,PA12");
        assert_eq!(d["enumerations"]["pin"]["PA0"], json!([0, 16]));
        assert_eq!(d["enumerations"]["static_string_id"]["sentinel timer called"], 2);
        assert_eq!(d["build_versions"], BUILD_VERSIONS);
        // every id is unique and ids 96..127 appear as -32..-1
        let mut ids: Vec<i64> = ["commands", "responses"]
            .iter()
            .flat_map(|k| d[*k].as_object().unwrap().values().map(|v| v.as_i64().unwrap()))
            .collect();
        ids.sort();
        let len = ids.len();
        ids.dedup();
        assert_eq!(ids.len(), len);
        assert_eq!(ids[0], -32);
        assert!(!ids.contains(&96));
        let rp: Value = serde_json::from_str(&dictionary_json("Kalico", "v2026.01.00", "rp2040", 12_000_000)).unwrap();
        assert_eq!(rp["enumerations"]["pin"]["gpio0"], json!([0, 30]));
        assert!(rp["config"].get("RESERVE_PINS_USB").is_none());
    }

    /// The stand-in Klipper tree's rigdict.py (what its buildcommands.py embeds in klipper.bin)
    /// and this module build byte-identical dictionaries.
    #[test]
    fn same_dictionary_as_the_standin_tree() {
        let scripts = concat!(env!("CARGO_MANIFEST_DIR"), "/../standins/klipper-tree/scripts");
        for (app, mcu, clock) in [("Klipper", "stm32h723xx", 520_000_000u64), ("Kalico", "rp2040", 12_000_000)] {
            let code = format!(
                "import sys, rigdict; sys.stdout.write(rigdict.dictionary({app:?}, 'v0.13.0-3-g0123abc', {BUILD_VERSIONS:?}, {mcu:?}, {clock}))"
            );
            let out =
                match std::process::Command::new("python3").args(["-B", "-c", &code]).current_dir(scripts).output() {
                    Ok(o) => o,
                    Err(e) => {
                        eprintln!("skipped: python3 not runnable ({e})");
                        return;
                    }
                };
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let py = String::from_utf8(out.stdout).unwrap();
            assert_eq!(py, protocol_dictionary_json(app, "v0.13.0-3-g0123abc", BUILD_VERSIONS, mcu, clock));
        }
    }
}
