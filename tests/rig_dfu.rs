//! ROM DFU mode of the simulated STM32 boards is a real USB DFU device (tests/rig/boardsim,
//! `dfu.rs` / `gadgetfs.rs`): Debian's `dfu-util` lists its alternate settings and reads
//! flash through the DfuSe requests. With the old SourceSink presentation `dfu-util -l`
//! found no DFU device at all.

mod rig_support;

use std::process::Output;

use rig_support::*;

/// Puts the boards back when a scenario ends, also after a failed assertion.
struct BoardsBack;
impl Drop for BoardsBack {
    fn drop(&mut self) {
        let _ = run("boardctl", &["reset"]);
    }
}

fn dfu_util(args: &[&str]) -> Output {
    run("dfu-util", args)
}

/// `boardctl reboot NAME dfu`, then the board must be enumerated as the STM32 ROM.
fn enter_dfu(board: &str) -> serde_json::Value {
    boardctl(&["reboot", board, "dfu"]);
    boardctl(&["wait-ready", "--timeout", "30"]);
    let now = board_json(board);
    assert_eq!(now["mode"], "dfu", "{now}");
    assert_eq!(now["usb"], "0483:df11", "{now}");
    assert_eq!(now["manufacturer"], "STMicroelectronics", "{now}");
    now
}

/// The `Found DFU:` lines of `dfu-util -l` for the device on bus `bus`, port 1.
fn listed(bus: u64) -> Vec<String> {
    let out = dfu_util(&["-l"]);
    assert!(out.status.success(), "dfu-util -l: {}{}", text(&out.stdout), text(&out.stderr));
    let path = format!("path=\"{bus}-1\"");
    let lines: Vec<String> = text(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("Found DFU") && l.contains(&path))
        .map(String::from)
        .collect();
    eprintln!("dfu-util -l:\n{}", lines.join("\n"));
    lines
}

/// The raw descriptors the host read (device descriptor, then the configuration).
fn host_descriptors(bus: u64) -> Vec<u8> {
    std::fs::read(format!("/sys/bus/usb/devices/{bus}-1/descriptors")).expect("descriptors in sysfs")
}

#[test]
#[ignore = "runs inside the USB rig"]
fn dfu_util_lists_the_stm32_rom_bootloader() {
    in_rig();
    let _back = BoardsBack;
    reset_boards();

    // EBB, STM32F446 (512 KiB): the F4 ROM's four memories.
    let ebb = enter_dfu(EBB.0);
    let bus = ebb["bus"].as_u64().unwrap();
    let lines = listed(bus);
    let serial = &EBB.2[..12];
    let want = [
        (3, "@Device Feature/0xFFFF0000/01*004 e"),
        (2, "@OTP Memory /0x1FFF7800/01*512 e,01*016 e"),
        (1, "@Option Bytes  /0x1FFFC000/01*016 e"),
        (0, "@Internal Flash  /0x08000000/04*016Kg,01*064Kg,03*128Kg"),
    ];
    assert_eq!(lines.len(), want.len(), "{lines:#?}");
    assert_eq!(ebb["product"], "STM32  BOOTLOADER", "the ROM's iProduct: {ebb}");
    for (line, (alt, name)) in lines.iter().zip(want) {
        assert!(line.starts_with("Found DFU: [0483:df11] ver=2200,"), "{line}");
        assert!(line.contains("cfg=1, intf=0,"), "{line}");
        assert!(line.contains(&format!("alt={alt}, name=\"{name}\", serial=\"{serial}\"")), "{line}");
    }
    // What the host's kernel read: interface class FE/01/02 and the DFU functional
    // descriptor (will detach, manifestation intolerant, up/download; 255 ms; 2048; 1.1a).
    let d = host_descriptors(bus);
    assert!(d.windows(9).any(|w| w == [9, 4, 0, 0, 0, 0xfe, 0x01, 0x02, 4]), "{d:02x?}");
    assert!(d.windows(9).any(|w| w == [9, 0x21, 0x0b, 0xff, 0x00, 0x00, 0x08, 0x1a, 0x01]), "{d:02x?}");

    // Back to the application; then the octopus (STM32H723, 1 MiB of 128 KiB sectors) takes
    // the DFU device (gadgetfs has one per system).
    boardctl(&["reboot", EBB.0]);
    boardctl(&["wait-ready", "--timeout", "30"]);
    assert_eq!(board_json(EBB.0)["mode"], "klipper");
    assert!(listed(bus).is_empty(), "the ebb left DFU mode");
    let octopus = enter_dfu(OCTOPUS.0);
    let lines = listed(octopus["bus"].as_u64().unwrap());
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert!(lines[0].contains("ver=0200") && lines[0].contains("alt=1, name=\"@Option Bytes   /0x5200201C/01*128 e\""));
    assert!(lines[1].contains("alt=0, name=\"@Internal Flash   /0x08000000/08*128Kg\""), "{}", lines[1]);
    assert!(lines[1].contains(&format!("serial=\"{}\"", &OCTOPUS.2[..12])), "{}", lines[1]);
    boardctl(&["reboot", OCTOPUS.0]);
    boardctl(&["wait-ready", "--timeout", "30"]);
    assert_eq!(board_json(OCTOPUS.0)["mode"], "klipper");
}

/// dfu-util reads the installed application through DfuSe (GETSTATUS, Set Address Pointer,
/// ABORT, UPLOAD): the bytes are the board's stand-in image at its application start.
#[test]
#[ignore = "runs inside the USB rig"]
fn dfu_util_uploads_the_installed_image() {
    in_rig();
    let _back = BoardsBack;
    reset_boards();
    let before = board_json(EBB.0);
    let version = before["version"].as_str().unwrap().to_string();
    let events = EventLog::mark("rig_dfu upload");
    enter_dfu(EBB.0);

    let dir = tempfile::tempdir().unwrap();
    let up = dir.path().join("up.bin");
    // gadgetfs's ep0 buffer holds 256 bytes: transfers of at most that (see the README).
    let out = dfu_util(&[
        "-d",
        "0483:df11",
        "-S",
        &EBB.2[..12],
        "-a",
        "0",
        "-t",
        "256",
        "-s",
        "0x08008000:1024",
        "-U",
        up.to_str().unwrap(),
    ]);
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    eprintln!("{all}");
    assert!(out.status.success(), "dfu-util -U failed: {all}");
    assert!(all.contains("state(2) = dfuIDLE, status(0) = No error condition is present"), "{all}");
    assert!(all.contains("DfuSe interface name: \"Internal Flash  \""), "{all}");
    let got = std::fs::read(&up).unwrap();
    assert_eq!(got.len(), 1024);

    let image = dir.path().join("standin.bin");
    let out = run(
        "kflash-boardsim",
        &["standin-image", "--out", image.to_str().unwrap(), "--mcu", EBB.1, "--version", &version],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let want = std::fs::read(&image).unwrap();
    assert_eq!(got[..], want[..1024], "the uploaded bytes are the installed image");

    let notes: Vec<String> =
        events.kind(EBB.0, "dfu").iter().map(|e| e["note"].as_str().unwrap_or("").to_string()).collect();
    assert!(notes.contains(&"set address pointer 0x08008000".to_string()), "{notes:?}");
    assert_eq!(notes.iter().filter(|n| n.starts_with("upload 256 bytes")).count(), 4, "{notes:?}");
    events.assert_not_written(EBB.0);

    // Reading is not writing: the board boots the same application afterwards.
    boardctl(&["reboot", EBB.0]);
    boardctl(&["wait-ready", "--timeout", "30"]);
    let after = board_json(EBB.0);
    assert_eq!((after["mode"].as_str(), after["version"].as_str()), (Some("klipper"), Some(version.as_str())));
}

/// A request the ROM rejects ends in dfuERROR, and CLRSTATUS (dfu-util does it when it finds
/// the device in error) brings it back: erase is not modelled by the simulator, so a
/// download reports an error instead of writing anything.
#[test]
#[ignore = "runs inside the USB rig"]
fn dfu_download_is_refused_without_writing() {
    in_rig();
    let _back = BoardsBack;
    reset_boards();
    let events = EventLog::mark("rig_dfu download");
    enter_dfu(EBB.0);
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.bin");
    std::fs::write(&img, vec![0x5a; 64]).unwrap();
    let out = dfu_util(&["-d", "0483:df11", "-a", "0", "-t", "256", "-s", "0x08008000", "-D", img.to_str().unwrap()]);
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    eprintln!("{all}");
    assert!(!out.status.success(), "the download must fail: {all}");
    let notes: Vec<String> =
        events.kind(EBB.0, "dfu").iter().map(|e| e["note"].as_str().unwrap_or("").to_string()).collect();
    assert!(notes.iter().any(|n| n.contains("not modelled")), "{notes:?}");
    events.assert_not_written(EBB.0);
    // A second run finds the device in dfuERROR and clears it (CLRSTATUS) first.
    let up = dir.path().join("up.bin");
    let out =
        dfu_util(&["-d", "0483:df11", "-a", "0", "-t", "256", "-s", "0x08008000:256", "-U", up.to_str().unwrap()]);
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    eprintln!("{all}");
    assert!(all.contains("DFU state(10) = dfuERROR, status(15)") && all.contains("Clearing status"), "{all}");
    assert!(all.contains("Upload done."), "{all}");
}

/// gadgetfs has one device per system: a second board in the ROM at the same time gets the
/// SourceSink presentation (vendor-specific interface), which dfu-util does not list.
#[test]
#[ignore = "runs inside the USB rig"]
fn a_second_board_in_the_rom_is_not_a_dfu_device() {
    in_rig();
    let _back = BoardsBack;
    reset_boards();
    let events = EventLog::mark("rig_dfu second");
    let ebb = enter_dfu(EBB.0);
    let octopus = enter_dfu(OCTOPUS.0);
    let connects = events.kind(OCTOPUS.0, "connect");
    assert_eq!(connects.last().unwrap()["function"], "sourcesink", "{connects:?}");
    assert_eq!(listed(ebb["bus"].as_u64().unwrap()).len(), 4);
    assert!(listed(octopus["bus"].as_u64().unwrap()).is_empty(), "SourceSink is not DFU");
    // Once the ebb leaves, the octopus's next ROM entry is a DFU device again.
    boardctl(&["reboot", EBB.0]);
    boardctl(&["reboot", OCTOPUS.0, "dfu"]);
    boardctl(&["wait-ready", "--timeout", "30"]);
    assert_eq!(listed(octopus["bus"].as_u64().unwrap()).len(), 2);
}
