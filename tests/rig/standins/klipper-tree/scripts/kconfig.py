#!/usr/bin/env python3
# Minimal Kconfig stand-in for the kflash test-rig Klipper tree (not kconfiglib).
#
#   kconfig.py olddefconfig          fill in defaults, rewrite $KCONFIG_CONFIG if it changed
#   kconfig.py menuconfig            non-interactive: create a default config for
#                                    $RIG_MENUCONFIG_MCU if missing, apply
#                                    $RIG_MENUCONFIG_SET="CONFIG_X=y ...", else touch the file
#   kconfig.py genconfig HEADER      write autoconf.h for the current config
#
# Like kconfiglib: the file is $KCONFIG_CONFIG (default ".config"), an overwritten
# file is saved to <file>.old first, an unchanged file is not rewritten, symbols
# without a prompt (MCU, CLOCK_FREQ, FLASH_APPLICATION_ADDRESS, BOARD_DIRECTORY, ...)
# are always derived from the chosen chip and bootloader offset, symbols the Kconfig
# does not define are dropped, and an int/hex value that does not parse is ignored
# with kconfiglib's warning on stderr. The options with a prompt (WANT_*, INITIAL_PINS)
# are read from src/Kconfig ("config NAME", a type line, "default VALUE"), so a test
# can add or remove options the way a Klipper update does.
import sys
sys.dont_write_bytecode = True
import os
import shutil

import rigmcu

HEADER = ("#\n# Automatically generated file; DO NOT EDIT.\n"
          "# Klipper Firmware Configuration\n#\n")
ARCHES = ["MACH_AVR", "MACH_ATSAM", "MACH_ATSAMD", "MACH_LPC176X", "MACH_STM32",
          "MACH_HC32F460", "MACH_RPXXXX", "MACH_PRU", "MACH_AR100", "MACH_LINUX"]
CLOCK_REFS = ["8M", "12M", "16M", "20M", "24M", "25M", "INTERNAL"]
STRING_SYMS = {"MCU", "BOARD_DIRECTORY", "USB_SERIAL_NUMBER", "INITIAL_PINS",
               "USB_MANUFACTURER", "USB_PRODUCT"}
# Types of the modelled int/hex symbols (for kconfiglib's "invalid value" warning).
TYPES = {"CLOCK_FREQ": "int", "CLOCK_REF_FREQ": "int", "CANBUS_FREQUENCY": "int",
         "SERIAL_BAUD": "int", "STACK_SIZE": "int", "FLASH_APPLICATION_ADDRESS": "hex",
         "FLASH_SIZE": "hex", "FLASH_BOOT_ADDRESS": "hex", "RAM_START": "hex",
         "RAM_SIZE": "hex", "USB_VENDOR_ID": "hex", "USB_DEVICE_ID": "hex"}


def read_kconfig(path="src/Kconfig"):
    """[(sym, type, default raw value)] of the `config` entries in src/Kconfig."""
    out = []
    cur = None
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        words = line.split(None, 1)
        if not words:
            continue
        if words[0] in ("config", "menuconfig") and len(words) == 2:
            cur = [words[1].strip(), "bool", None]
            out.append(cur)
        elif cur is not None and words[0] in ("bool", "string", "int", "hex"):
            cur[1] = words[0]
        elif cur is not None and words[0] == "default" and len(words) == 2:
            cur[2] = words[1].strip()
    result = []
    for sym, typ, default in out:
        if default is None:
            default = '""' if typ == "string" else (None if typ == "bool" else "0")
        elif typ == "bool":
            default = "y" if default == "y" else None
        elif typ == "string" and not default.startswith('"'):
            default = '"%s"' % default
        result.append((sym, typ, default))
    return result


# Symbols with a prompt: a value in the file is kept.
WANTS = [(sym, default) for sym, _, default in read_kconfig()]
TYPES.update((sym, typ) for sym, typ, _ in read_kconfig() if typ in ("int", "hex"))


def valid(typ, v):
    try:
        int(v, 16 if typ == "hex" else 10)
        return True
    except ValueError:
        return False


def drop_invalid(vals):
    """kconfiglib ignores an int/hex assignment that does not parse, with a warning."""
    for sym in list(vals):
        typ = TYPES.get(sym)
        v = vals[sym]
        if typ and v is not None and not valid(typ, v):
            sys.stderr.write("warning: the value '%s' is invalid for %s (defined at src/Kconfig), "
                             "which has type %s -- assignment ignored\n" % (v, sym, typ))
            del vals[sym]
    return vals
CHIP_SYMS = sorted({m["mach"][0] for m in rigmcu.MCUS.values()})
# Communication interface choices (Klipper's src/*/Kconfig "Communication interface"), each
# selecting its transport. Kept only when a config sets one, so configs written without them
# (most tests' own) are rendered as before; a board profile sets one.
INTERFACES = {
    "stm32": {"STM32_USB_PA11_PA12": "USBSERIAL", "STM32_USBCANBUS_PA11_PA12": "USBCANBUS",
              "STM32_MMENU_CANBUS_PB0_PB1": "CANSERIAL", "STM32_MMENU_CANBUS_PB8_PB9": "CANSERIAL",
              "STM32_MMENU_CANBUS_PD0_PD1": "CANSERIAL"},
    "rp2040": {"RPXXXX_USB": "USBSERIAL", "RPXXXX_CANBUS": "CANSERIAL",
               "RPXXXX_USBCANBUS": "USBCANBUS"},
}
ALL_INTERFACES = {s for arch in INTERFACES.values() for s in arch}

def config_path():
    return os.environ.get("KCONFIG_CONFIG") or ".config"


def parse(text):
    """sym (without CONFIG_) -> raw value ('y', '"str"', '0x..') or None (not set)."""
    vals = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("# CONFIG_") and line.endswith(" is not set"):
            vals[line[9:-11]] = None
        elif line.startswith("CONFIG_") and "=" in line:
            k, v = line[7:].split("=", 1)
            vals[k] = v
    return vals


def unquote(v):
    return v[1:-1] if v and len(v) >= 2 and v[0] == '"' and v[-1] == '"' else v


def family(sym):
    """The choice group a symbol belongs to (setting one member clears the rest)."""
    if sym.startswith(("STM32_FLASH_START_", "RPXXXX_FLASH_START_")):
        return "flash"
    if sym in rigmcu.TRANSPORTS or sym in ALL_INTERFACES:
        return "transport"
    if sym.startswith("STM32_CLOCK_REF_"):
        return "clockref"
    if sym in CHIP_SYMS:
        return "chip"
    if sym in ARCHES:
        return "arch"
    return None


def apply_set(vals, assignments):
    for tok in assignments.split():
        if "=" not in tok:
            sys.stderr.write("kconfig stand-in: ignoring %r (want CONFIG_X=value)\n" % tok)
            continue
        k, v = tok.split("=", 1)
        k = k[7:] if k.startswith("CONFIG_") else k
        if k == "MCU":
            m = rigmcu.lookup(unquote(v))
            for s in list(vals):
                if family(s) in ("chip", "arch"):
                    del vals[s]
            vals[m["arch_symbol"]] = "y"
            if m["mach"]:
                vals[m["mach"][0]] = "y"
            vals["MCU"] = '"%s"' % unquote(v)
            continue
        if v in ("n", ""):
            vals[k] = None
            continue
        if v == "y" and family(k):
            for s in list(vals):
                if s != k and family(s) == family(k):
                    del vals[s]
        if k in STRING_SYMS and not v.startswith('"'):
            v = '"%s"' % v
        vals[k] = v
    return vals


def resolve(cur, default_mcu):
    """Canonical (sym, value) list for the config `cur`."""
    mcu = rigmcu.mcu_for_mach({k for k, v in cur.items() if v == "y"})
    if mcu is None:
        mcu = unquote(cur.get("MCU") or "") or default_mcu
    m = rigmcu.lookup(mcu)

    def pick(members, default):
        chosen = [s for s in members if cur.get(s) == "y"]
        return chosen[0] if chosen else default

    prefix = m["flash_prefix"]
    flash_members = [prefix + k for k in m["flash_starts"]]
    flash = pick(flash_members, prefix + m["flash_default"])
    app_start = m["flash_starts"][flash[len(prefix):]]
    interfaces = INTERFACES.get(m["arch"], {})
    iface = next((s for s in interfaces if cur.get(s) == "y"), None)
    transport = interfaces[iface] if iface else pick(rigmcu.TRANSPORTS, "USBSERIAL")

    out = []
    add = out.append
    add(("LOW_LEVEL_OPTIONS", cur.get("LOW_LEVEL_OPTIONS")))
    for a in ARCHES:
        add((a, "y" if a == m["arch_symbol"] else None))
    add(("BOARD_DIRECTORY", '"%s"' % m["board_directory"]))
    add(("MCU", '"%s"' % mcu))
    add(("CLOCK_FREQ", str(m["clock"])))
    add(("FLASH_SIZE", hex(m["flash_size"])))
    add(("FLASH_BOOT_ADDRESS", hex(m["flash_boot"])))
    add(("RAM_START", hex(m["ram_start"])))
    add(("RAM_SIZE", hex(m["ram_size"])))
    add(("STACK_SIZE", "512"))
    add(("FLASH_APPLICATION_ADDRESS", hex(app_start)))
    if m["arch"] == "stm32":
        add(("STM32_SELECT", "y"))
    else:
        add(("RPXXXX_SELECT", "y"))
    for chip in CHIP_SYMS:
        owner = next(x for x in rigmcu.MCUS.values() if x["mach"][0] == chip)
        if owner["arch"] == m["arch"]:
            add((chip, "y" if m["mach"] and chip == m["mach"][0] else None))
    for fam in m["mach"][1:]:
        add((fam, "y"))
    if m["arch"] == "rp2040":
        if app_start == 0x10000100:
            add(("RP2040_HAVE_STAGE2", "y"))
        if app_start == 0x10004000:
            add(("RPXXXX_HAVE_BOOTLOADER", "y"))
    for s in flash_members:
        add((s, "y" if s == flash else None))
    if m["clock_ref"]:
        ref = pick(["STM32_CLOCK_REF_" + r for r in CLOCK_REFS],
                   "STM32_CLOCK_REF_" + m["clock_ref"])
        for r in CLOCK_REFS:
            add(("STM32_CLOCK_REF_" + r, "y" if ref == "STM32_CLOCK_REF_" + r else None))
        freq = ref[len("STM32_CLOCK_REF_"):]
        add(("CLOCK_REF_FREQ", "0" if freq == "INTERNAL" else str(int(freq[:-1]) * 1000000)))
    if iface:
        for s in interfaces:
            add((s, "y" if s == iface else None))
    for t in rigmcu.TRANSPORTS:
        add((t, "y" if t == transport else None))
    if transport in ("USBSERIAL", "USBCANBUS"):
        add(("USB", "y"))
        add(("USB_VENDOR_ID", "0x1d50"))
        add(("USB_DEVICE_ID", "0x606f" if transport == "USBCANBUS" else "0x614e"))
        add(("USB_SERIAL_NUMBER_CHIPID", cur.get("USB_SERIAL_NUMBER_CHIPID", "y")))
        add(("USB_SERIAL_NUMBER", cur.get("USB_SERIAL_NUMBER", '"12345"')))
    if transport in ("USBCANBUS", "CANSERIAL"):
        add(("CANBUS", "y"))
        add(("CANBUS_FREQUENCY", cur.get("CANBUS_FREQUENCY", "1000000")))
    if transport == "SERIAL":
        add(("SERIAL_BAUD", cur.get("SERIAL_BAUD", "250000")))
    for sym, default in WANTS:
        add((sym, cur.get(sym, default)))
    for sym in ["HAVE_GPIO", "HAVE_GPIO_ADC", "HAVE_GPIO_SPI", "HAVE_GPIO_I2C",
                "HAVE_GPIO_HARD_PWM", "HAVE_STRICT_TIMING", "HAVE_CHIPID",
                "HAVE_BOOTLOADER_REQUEST", "INLINE_STEPPER_HACK"]:
        add((sym, "y"))
    # Symbols the Kconfig does not define are dropped, as kconfiglib does.
    return out


def render(pairs):
    lines = [HEADER]
    for sym, v in pairs:
        lines.append("# CONFIG_%s is not set\n" % sym if v is None else "CONFIG_%s=%s\n" % (sym, v))
    return "".join(lines)


def default_mcu():
    return os.environ.get("RIG_MENUCONFIG_MCU") or rigmcu.DEFAULT_MCU


def load(path):
    if not os.path.exists(path):
        print("Using default symbol values (no '%s')" % path)
        return {}
    print("Loaded configuration '%s'" % path)
    with open(path) as f:
        return drop_invalid(parse(f.read()))


def write(path, contents):
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == contents:
                return "No change to configuration in '%s'" % path
        try:
            shutil.copyfile(path, path + ".old")
        except OSError:
            pass
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = "%s.tmp.%d" % (path, os.getpid())
    with open(tmp, "w") as f:
        f.write(contents)
    os.replace(tmp, path)
    return "Configuration saved to '%s'" % path


def cmd_olddefconfig():
    path = config_path()
    cur = load(path)
    print(write(path, render(resolve(cur, default_mcu()))))


def cmd_menuconfig():
    path = config_path()
    print("Klipper stand-in menuconfig (non-interactive; see tests/rig/standins/README.md)")
    assignments = os.environ.get("RIG_MENUCONFIG_SET", "")
    # An empty file is a new config (menuconfig would show the defaults, saved at once here).
    if os.path.exists(path) and os.path.getsize(path) > 0 and not assignments:
        os.utime(path)
        print("Configuration left as is (touched) in '%s'" % path)
        return
    cur = apply_set(load(path), assignments)
    print(write(path, render(resolve(cur, default_mcu()))))


def cmd_genconfig(header):
    with open(config_path()) as f:
        pairs = resolve(drop_invalid(parse(f.read())), default_mcu())
    lines = ["/* Automatically generated file; DO NOT EDIT. */\n",
             "/* Klipper Firmware Configuration */\n"]
    for sym, v in pairs:
        if v is None:
            continue
        lines.append("#define CONFIG_%s %s\n" % (sym, "1" if v == "y" else v))
    tmp = header + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(lines)
    os.replace(tmp, header)


def main():
    if len(sys.argv) < 2:
        sys.exit("usage: kconfig.py olddefconfig|menuconfig|genconfig HEADER")
    cmd = sys.argv[1]
    if cmd == "olddefconfig":
        cmd_olddefconfig()
    elif cmd == "menuconfig":
        cmd_menuconfig()
    elif cmd == "genconfig" and len(sys.argv) == 3:
        cmd_genconfig(sys.argv[2])
    else:
        sys.exit("kconfig stand-in: unknown command %r" % cmd)


if __name__ == "__main__":
    main()
