#!/usr/bin/env python3
# Data-dictionary generator of the kflash test-rig Klipper stand-in tree.
# Written for the rig (not Klipper's scripts/buildcommands.py); it follows the
# same command line, version rules and output format:
#
#   buildcommands.py -d OUT/klipper.dict -t "CC;AS;LD;OBJCOPY;OBJDUMP;STRIP" \
#       OUT/compile_time_request.txt OUT/compile_time_request.c
#
# * version = `git describe --always --tags --long --dirty` in the CWD (only if
#   ./.git exists; Klipper falls back to klippy/.version, then "?"); a dirty tree or a
#   missing git version appends "-YYYYMMDD_HHMMSS-<hostname>".
# * klipper.dict = compact JSON with sorted keys; compile_time_request.c carries the
#   zlib level 9 compressed dictionary like Klipper's command_identify_data[].
# * prints "Version: <version>".
# The constants come from OUT/autoconf.h (next to the .c file); commands, responses,
# constants and enumerations from the declarations in scripts/rigdecls.json, built like a
# real build of that MCU and transport would (scripts/rigdict.py: message ids and
# static_string ids assigned as Klipper assigns them).
import sys
sys.dont_write_bytecode = True
import json
import optparse
import os
import socket
import subprocess
import time
import zlib

import rigdict
import rigmcu

APP = "@APP@"

def git_version():
    if not os.path.exists(".git"):
        return ""
    try:
        out = subprocess.run(["git", "describe", "--always", "--tags", "--long", "--dirty"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ""
    return out.strip()


def file_version():
    if APP == "Kalico" or not os.path.exists("klippy/.version"):
        return ""
    with open("klippy/.version") as f:
        return f.read().strip()


def build_version(cleanbuild=True):
    version = git_version()
    if not version:
        cleanbuild = False
        version = file_version() or "?"
    elif "dirty" in version:
        cleanbuild = False
    if not cleanbuild:
        version = "%s-%s-%s" % (version, time.strftime("%Y%m%d_%H%M%S"),
                                socket.gethostname())
    return version


def read_autoconf(path):
    vals = {}
    with open(path) as f:
        for line in f:
            parts = line.split(None, 2)
            if len(parts) == 3 and parts[0] == "#define" and parts[1].startswith("CONFIG_"):
                v = parts[2].strip()
                vals[parts[1][7:]] = v[1:-1] if v.startswith('"') else v
    return vals


def transport_of(cfg):
    for t in rigmcu.TRANSPORTS:
        if cfg.get(t) == "1":
            return t
    return "USBSERIAL"


def main():
    opts = optparse.OptionParser("%prog [options] <cmd section file> <output.c>")
    opts.add_option("-d", dest="write_dictionary", help="file to write mcu protocol dictionary")
    opts.add_option("-t", "--tools", dest="tools", default="", help="list of build programs")
    opts.add_option("-v", action="store_true", dest="verbose")
    options, args = opts.parse_args()
    if len(args) != 2:
        opts.error("Incorrect arguments")
    incmdfile, outcfile = args

    cfg = read_autoconf(os.path.join(os.path.dirname(outcfile) or ".", "autoconf.h"))
    transport = transport_of(cfg)
    version = build_version()
    sys.stdout.write("Version: %s\n" % version)

    clock = cfg.get("CLOCK_FREQ") or rigmcu.lookup(cfg["MCU"])["clock"]
    data = rigdict.build(cfg["MCU"], clock, transport=transport,
                         serial_baud=cfg.get("SERIAL_BAUD", 250000),
                         canbus_frequency=cfg.get("CANBUS_FREQUENCY", 1000000))
    data.update({
        "app": APP,
        "build_versions": rigmcu.BUILD_VERSIONS,
        "license": "GNU GPLv3",
        "version": version,
    })
    datadict = json.dumps(data, separators=(",", ":"), sort_keys=True)
    if options.write_dictionary:
        with open(options.write_dictionary, "w") as f:
            f.write(datadict)

    zdata = zlib.compress(datadict.encode(), 9)
    rows = []
    for i in range(0, len(zdata), 8):
        rows.append("\n   " + "".join(" 0x%02x," % b for b in zdata[i:i + 8]))
    with open(incmdfile) as f:
        nobjs = sum(1 for _ in f)
    with open(outcfile, "w") as f:
        f.write("// Auto generated code by the kflash rig Klipper stand-in (%d objects)\n" % nobjs)
        f.write("\n// version: %s\n// build_versions: %s\n" % (version, rigmcu.BUILD_VERSIONS))
        f.write("\nconst uint8_t command_identify_data[] PROGMEM = {%s\n};\n" % "".join(rows))
        f.write("\n// Identify size = %d (%d uncompressed)\n" % (len(zdata), len(datadict)))
        f.write("const uint32_t command_identify_size PROGMEM\n"
                "    = ARRAY_SIZE(command_identify_data);\n")


if __name__ == "__main__":
    main()
