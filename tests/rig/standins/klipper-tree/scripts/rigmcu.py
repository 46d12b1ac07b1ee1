# MCU facts for the kflash test-rig stand-in of a Klipper tree.
#
# Written for the kflash rig (not Klipper code). The values follow Klipper's
# src/<arch>/Kconfig defaults and DECL_CONSTANTs closely enough for tests:
# CONFIG_MCU strings, CLOCK_FREQ, bootloader-offset choices and the
# FLASH_APPLICATION_ADDRESS each choice gives. The Moonraker stand-in imports
# this module too, so `mcu_constants` it serves match the built klipper.dict.

BUILD_VERSIONS = ("gcc: (15:13.2.rel1-2) 13.2.1 20231009 "
                  "binutils: (2.42-1+18) 2.42")
INITIAL_SP = 0x20020000
DEFAULT_MCU = "stm32h723xx"


def _stm32(chip, mach_family, clock, flash_size, starts, default_start,
           clock_ref, ram_size=0x20000):
    return {
        "arch": "stm32", "board_directory": "stm32", "arch_symbol": "MACH_STM32",
        "mach": ["MACH_STM32" + chip] + mach_family,
        "clock": clock, "flash_size": flash_size, "flash_boot": 0x8000000,
        "ram_start": 0x20000000, "ram_size": ram_size,
        "flash_prefix": "STM32_FLASH_START_", "flash_starts": starts,
        "flash_default": default_start,
        "clock_ref": clock_ref,
        "usb_pins": "PA11,PA12", "can_pins": "PD0,PD1",
    }


_STM32_STARTS_H7 = {"20000": 0x8020000, "0000": 0x8000000}
_STM32_STARTS_F4 = {"8000": 0x8008000, "C000": 0x800C000, "10000": 0x8010000,
                    "4000": 0x8004000, "0000": 0x8000000}
_STM32_STARTS_F1 = {"2000": 0x8002000, "7000": 0x8007000, "800": 0x8000800,
                    "1000": 0x8001000, "0000": 0x8000000}
_STM32_STARTS_G0 = {"2000": 0x8002000, "1000": 0x8001000, "0000": 0x8000000}

MCUS = {
    "stm32h723xx": _stm32("H723", ["MACH_STM32H7"], 520000000, 0x40000,
                          _STM32_STARTS_H7, "20000", "25M"),
    "stm32h743xx": _stm32("H743", ["MACH_STM32H7"], 400000000, 0x200000,
                          _STM32_STARTS_H7, "20000", "25M"),
    "stm32f446xx": _stm32("F446", ["MACH_STM32F4"], 180000000, 0x80000,
                          _STM32_STARTS_F4, "8000", "12M"),
    "stm32f407xx": _stm32("F407", ["MACH_STM32F4", "MACH_STM32F4x5"],
                          168000000, 0x80000, _STM32_STARTS_F4, "8000", "8M"),
    "stm32f401xc": _stm32("F401", ["MACH_STM32F4"], 84000000, 0x40000,
                          _STM32_STARTS_F4, "8000", "25M"),
    "stm32f103xe": _stm32("F103", ["MACH_STM32F1"], 72000000, 0x10000,
                          _STM32_STARTS_F1, "2000", "8M", ram_size=0x5000),
    "stm32g0b1xx": _stm32("G0B1", ["MACH_STM32G0"], 64000000, 0x20000,
                          _STM32_STARTS_G0, "2000", "8M", ram_size=0x24000),
    "rp2040": {
        "arch": "rp2040", "board_directory": "rp2040", "arch_symbol": "MACH_RPXXXX",
        "mach": ["MACH_RP2040"], "clock": 12000000, "flash_size": 0x200000,
        "flash_boot": 0x10000100, "ram_start": 0x20000000, "ram_size": 0x42000,
        "flash_prefix": "RPXXXX_FLASH_START_",
        "flash_starts": {"4000": 0x10004000, "0100": 0x10000100},
        "flash_default": "4000", "clock_ref": None,
        "usb_pins": None, "can_pins": "gpio4,gpio5",
    },
    "rp2350": {
        "arch": "rp2040", "board_directory": "rp2040", "arch_symbol": "MACH_RPXXXX",
        "mach": ["MACH_RP2350"], "clock": 150000000, "flash_size": 0x200000,
        "flash_boot": 0x10000000, "ram_start": 0x20000000, "ram_size": 0x82000,
        "flash_prefix": "RPXXXX_FLASH_START_",
        "flash_starts": {"4000": 0x10004000, "0000": 0x10000000},
        "flash_default": "4000", "clock_ref": None,
        "usb_pins": None, "can_pins": "gpio4,gpio5",
    },
}

ARCH_SYMBOLS = sorted({m["arch_symbol"] for m in MCUS.values()})
MACH_SYMBOLS = sorted({s for m in MCUS.values() for s in m["mach"]})
TRANSPORTS = ["USBSERIAL", "USBCANBUS", "CANSERIAL", "SERIAL"]


def lookup(mcu):
    """Facts for a CONFIG_MCU string. Unknown stm32*/rp* names get a generic
    entry of that family so the rig never crashes on a new board type."""
    if mcu in MCUS:
        return MCUS[mcu]
    base = dict(MCUS["rp2040" if mcu.startswith("rp") else "stm32f446xx"])
    base["mach"] = []
    return base


def mcu_for_mach(symbols):
    """CONFIG_MCU for the first chip symbol (e.g. MACH_STM32H723) that is set."""
    for name, m in MCUS.items():
        if m["mach"][0] in symbols:
            return name
    return None


def constants(mcu, clock=None, transport="USBSERIAL", canbus_frequency=1000000,
              serial_baud=250000):
    """The `config` part of klipper.dict / `mcu_constants` in Klippy (rigdict.py builds it
    from rigdecls.json)."""
    import rigdict
    m = lookup(mcu)
    return rigdict.build(mcu, int(clock if clock is not None else m["clock"]), transport=transport,
                         serial_baud=serial_baud, canbus_frequency=canbus_frequency)["config"]
