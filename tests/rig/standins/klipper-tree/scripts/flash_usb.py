#!/usr/bin/env python3
# `make flash` helper of the kflash test-rig Klipper stand-in tree (rig code).
# Same command line as Klipper's scripts/flash_usb.py; flashing is not
# implemented by the stand-in: it prints what it would do and fails.
import argparse
import sys

p = argparse.ArgumentParser()
p.add_argument("-t", "--type", dest="mcutype", required=True)
p.add_argument("-d", "--device", required=True)
p.add_argument("-s", "--start", default="0x8000000")
p.add_argument("--no-sudo", action="store_true")
p.add_argument("bin")
a = p.parse_args()
print("Klipper stand-in: would flash %s (MCU %s, start %s) to %s%s" % (
    a.bin, a.mcutype, a.start, a.device, " without sudo" if a.no_sudo else ""))
sys.stderr.write("flash not supported by the stand-in yet\n")
sys.exit(1)
