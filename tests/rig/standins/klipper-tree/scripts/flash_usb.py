#!/usr/bin/env python3
# `make flash` helper of the kflash test-rig Klipper stand-in tree (rig code).
#
# Not Klipper's scripts/flash_usb.py: an independent implementation with its command
# line, messages and exit codes, for USB boards whose Klipper hands over to Katapult:
#   flash_usb.py -t MCU -d DEVICE [-s START] [--no-sudo] FIRMWARE
# It resolves DEVICE (its /dev/serial/by-path name and sysfs USB device), requests the
# bootloader (1200 baud, DTR dropped), waits until the same USB port shows a device
# again, and when that is Katapult (1d50:6177) runs
#   python3 lib/katapult/flashtool.py -d <by-path name or tty> -f FIRMWARE
# from the current directory (make runs it in the tree). dfu-util, hid-flash,
# rp2040_flash and bossac do not exist in the rig: a board that comes back as
# anything but Katapult fails the way a failing tool would.
# See tests/rig/standins/README.md in the kflash repository.
import sys
sys.dont_write_bytecode = True
import optparse
import os
import re
import struct
import subprocess
import time

KATAPULT_ID = "1d50:6177"
VIDPID = re.compile(r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{4}$")
# How long the stand-in waits for the board to leave after the touch, then to come back.
# (The real script waits 0.2 s and then for the path to exist, up to 4 s; a simulated
# board in the rig's QEMU guest can take seconds to react when the machine is busy.)
GONE_TIMEOUT = float(os.environ.get("RIG_FLASH_LEAVE_WAIT") or 10.0)
BACK_TIMEOUT = float(os.environ.get("RIG_FLASH_WAIT") or 15.0)


class error(Exception):
    pass


def request_bootloader(device):
    """The 1200-baud touch: DTR up, 1200 baud, DTR down."""
    import fcntl
    import termios
    try:
        fd = os.open(device, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError:
        return
    try:
        dtr = struct.pack("I", termios.TIOCM_DTR)
        fcntl.ioctl(fd, termios.TIOCMBIS, dtr)
        attrs = termios.tcgetattr(fd)
        attrs[4] = attrs[5] = termios.B1200
        sys.stderr.write("Entering bootloader on %s\n" % device)
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
        fcntl.ioctl(fd, termios.TIOCMBIC, dtr)
    except (OSError, termios.error):
        pass
    finally:
        os.close(fd)


def tty_and_by_path(device):
    """(tty, /dev/serial/by-path name of it, or the tty when there is none)."""
    tty = os.path.realpath(device)
    folder = "/dev/serial/by-path/"
    if not os.path.isdir(folder):
        raise error("Unable to find serial 'by-path' folder")
    for name in sorted(os.listdir(folder)):
        if os.path.realpath(folder + name) == tty:
            return tty, folder + name
    return tty, tty


def usb_location(device):
    """(bus path such as 1-1, sysfs interface directory) of a USB tty."""
    name = os.path.basename(os.path.realpath(device))
    try:
        link = os.readlink("/sys/class/tty/" + name)
    except OSError:
        raise error("Unable to find tty device")
    m = re.search(r"/usb\d+/(?:.*/)?(\d+-[0-9.]+):\d+\.\d+/", link)
    if m is None:
        raise error("Unable to find tty usb device")
    return m.group(1), os.path.realpath("/sys/class/tty/%s/device" % name)


def read_attr(usbdir, name):
    try:
        with open(os.path.join(usbdir, name)) as f:
            return f.read().strip().lower()
    except OSError:
        return None


def usb_id(usbdir):
    vid, pid = read_attr(usbdir, "idVendor"), read_attr(usbdir, "idProduct")
    return "%s:%s" % (vid, pid) if vid and pid else None


def usb_state(usbdir):
    """(device number, vid:pid) of the device on a USB port, None when there is none.
    Every enumeration gets a new device number."""
    devnum, ident = read_attr(usbdir, "devnum"), usb_id(usbdir)
    return (devnum, ident) if devnum and ident else None


def wait_reconnect(ifdir, old):
    """After the touch: wait until the board has left (Katapult ignores the touch, so
    not for a board already in Katapult), then until the port shows a newly enumerated
    device: Katapult once its tty exists, anything else at once."""
    usbdir = os.path.dirname(ifdir)
    expect_new = False
    if old is not None and old[1] != KATAPULT_ID:
        deadline = time.time() + GONE_TIMEOUT
        while time.time() < deadline:
            if usb_state(usbdir) != old:
                expect_new = True
                break
            time.sleep(0.1)
    deadline = time.time() + BACK_TIMEOUT
    while time.time() < deadline:
        now = usb_state(usbdir)
        if (now is not None and (not expect_new or now[0] != old[0])
                and (now[1] != KATAPULT_ID or new_tty(ifdir))):
            break
        time.sleep(0.1)
    if os.path.exists(ifdir):
        sys.stderr.write("Device reconnect on %s\n" % ifdir)
        time.sleep(0.1)


def new_tty(ifdir):
    try:
        names = os.listdir(os.path.join(ifdir, "tty"))
    except OSError:
        return None
    return "/dev/" + names[0] if names and os.path.exists("/dev/" + names[0]) else None


def katapult_device(ifdir, bypath, tty):
    """The path to give flashtool: the by-path name once udev points it at the new tty,
    else the tty itself."""
    now = new_tty(ifdir)
    if bypath == tty or now is None:
        return now or bypath
    deadline = time.time() + 5.0
    while time.time() < deadline:
        if os.path.realpath(bypath) == now:
            return bypath
        time.sleep(0.1)
    return now


def run_flashtool(device, binfile):
    args = [sys.executable, "lib/katapult/flashtool.py", "-d", device, "-f", binfile]
    sys.stderr.write(" ".join(args) + "\n\n")
    sys.stderr.flush()
    if subprocess.call(args) != 0:
        sys.stderr.write("Error running flashtool.py\n")
        sys.exit(-1)


def missing_tool(args, sudo):
    """The ROM-bootloader tools Klipper would run next are not part of the rig."""
    if sudo:
        args = ["sudo"] + args
    sys.stderr.write(" ".join(args) + "\n\n")
    sys.stderr.write("Klipper stand-in: %s is not available in the kflash rig\n"
                     % os.path.basename(args[1] if sudo else args[0]))
    raise error("Error running %s" % os.path.basename(args[1] if sudo else args[0]))


def touch_and_flash(device, binfile, tool_args, sudo):
    """Bootloader request, then Katapult's flashtool or (not in the rig) the ROM tool."""
    if VIDPID.match(device.strip()):
        missing_tool(tool_args(["-d", "," + device.strip()], None), sudo)
    tty, bypath = tty_and_by_path(device)
    buspath, ifdir = usb_location(device)
    old = usb_state(os.path.dirname(ifdir))
    request_bootloader(device)
    wait_reconnect(ifdir, old)
    now = usb_id(os.path.dirname(ifdir))
    if now == KATAPULT_ID:
        run_flashtool(katapult_device(ifdir, bypath, tty), binfile)
    else:
        sys.stderr.write("Klipper stand-in: the board came back as %s, not Katapult (%s)\n"
                         % (now or "nothing", KATAPULT_ID))
        missing_tool(tool_args(["-p", buspath], buspath), sudo)


def dfu_util(extra, binfile):
    """tool_args for touch_and_flash: (dfu-util selector, USB bus path) -> command."""
    def args(select, _buspath):
        return ["dfu-util"] + select + extra + ["-D", binfile]
    return args


STM32_HELP = """
Failed to flash to %s: %s

If the device is already in bootloader mode it can be flashed with the
following command:
  make flash FLASH_DEVICE=%s

"""


def flash_stm32(opts, binfile, hid_start, dfu_flags, rom_id):
    try:
        if opts.start == hid_start:
            tool = lambda _sel, _bus: ["lib/hidflash/hid-flash", binfile]  # noqa: E731
        else:
            tool = dfu_util(dfu_flags(opts), binfile)
        touch_and_flash(opts.device, binfile, tool, opts.sudo)
    except error as e:
        sys.stderr.write(STM32_HELP % (opts.device, e, rom_id))
        sys.exit(-1)


def flash_stm32f1(opts, binfile):
    flash_stm32(opts, binfile, 0x8000800, lambda o: ["-R", "-a", "2"], "1eaf:0003")


def flash_stm32f4(opts, binfile):
    flash_stm32(opts, binfile, 0x8004000,
                lambda o: ["-R", "-a", "0", "-s", "0x%x:leave" % (o.start or 0)], "0483:df11")


def flash_rp2(opts, binfile):
    rom_id = "2e8a:000f" if opts.mcutype == "rp2350" else "2e8a:0003"

    def tool(_sel, buspath):
        return ["lib/rp2040_flash/rp2040_flash", binfile] + ([buspath] if buspath else [])
    try:
        if opts.device.lower() == rom_id:
            missing_tool(tool(None, None), opts.sudo)
        touch_and_flash(opts.device, binfile, tool, opts.sudo)
    except error as e:
        sys.stderr.write(STM32_HELP % (opts.device, e, rom_id))
        sys.exit(-1)


def flash_lpc176x(opts, binfile):
    try:
        touch_and_flash(opts.device, binfile, dfu_util([], binfile), opts.sudo)
    except error as e:
        sys.stderr.write(STM32_HELP % (opts.device, e, "1d50:6015"))
        sys.exit(-1)


def flash_other(opts, binfile):
    try:
        missing_tool(["lib/bossac/bin/bossac", "-U", "-p", opts.device, "-w", binfile, "-v"],
                     False)
    except error as e:
        sys.stderr.write("Failed to flash to %s: %s\n" % (opts.device, e))
        sys.exit(-1)


HANDLERS = [
    ("sam3", flash_other), ("sam4", flash_other), ("same70", flash_other),
    ("samd", flash_other), ("same5", flash_other), ("lpc176", flash_lpc176x),
    ("stm32f103", flash_stm32f1), ("stm32f4", flash_stm32f4), ("stm32f042", flash_stm32f4),
    ("stm32f070", flash_stm32f4), ("stm32f072", flash_stm32f4), ("stm32g0b1", flash_stm32f4),
    ("stm32f7", flash_stm32f4), ("stm32h7", flash_stm32f4), ("stm32l4", flash_stm32f4),
    ("stm32g4", flash_stm32f4), ("rp2", flash_rp2),
]


def main():
    op = optparse.OptionParser("%prog [options] -t <type> -d <device> <klipper.bin>")
    op.add_option("-t", "--type", type="string", dest="mcutype", help="micro-controller type")
    op.add_option("-d", "--device", type="string", dest="device", help="serial port device")
    op.add_option("-s", "--start", type="int", dest="start", help="start address in flash")
    op.add_option("--no-sudo", action="store_false", dest="sudo", default=True,
                  help="do not run sudo")
    opts, args = op.parse_args()
    if len(args) != 1:
        op.error("Incorrect number of arguments")
    handler = next((h for prefix, h in HANDLERS
                    if opts.mcutype and opts.mcutype.startswith(prefix)), None)
    if handler is None:
        op.error("USB flashing is not supported for MCU '%s'" % (opts.mcutype,))
    if not opts.device:
        sys.stderr.write("\nPlease specify FLASH_DEVICE\n\n")
        sys.exit(-1)
    handler(opts, args[0])


if __name__ == "__main__":
    main()
