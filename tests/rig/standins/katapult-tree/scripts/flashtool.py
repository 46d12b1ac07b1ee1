#!/usr/bin/env python3
# Katapult flash tool -- stand-in written for the kflash test rig.
#
# Not Katapult's scripts/flashtool.py: an independent implementation (Python 3.11
# standard library only, no pyserial) of what that tool does with USB and UART
# serial devices, with its command line, printed lines and exit codes:
#   flashtool.py [-d DEVICE] [-b BAUD] [-f FIRMWARE] [-r] [-s] [-v] [-q] [-i IF] [-u UUID]
# * a USB device running Klipper (sysfs 1d50:614e or manufacturer "klipper") is asked
#   for its bootloader (1200 baud, DTR dropped), then the same USB port is polled
#   until it comes back as Katapult (1d50:6177) and that tty is used;
# * the Katapult protocol: CONNECT, SEND_BLOCK (64-byte blocks), SEND_EOF,
#   REQUEST_BLOCK (SHA1 verify), COMPLETE; frames 01 88 cmd len payload crc16 99 03.
# CAN (no -d) is not supported by the stand-in. See tests/rig/standins/README.md in
# the kflash repository.
import sys
sys.dont_write_bytecode = True
import argparse
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import pathlib
import select
import struct
import subprocess
import termios
import time
import zlib

FRAME_HEAD = b"\x01\x88"
FRAME_TAIL = b"\x99\x03"
COMMANDS = {"CONNECT": 0x11, "SEND_BLOCK": 0x12, "SEND_EOF": 0x13, "REQUEST_BLOCK": 0x14,
            "COMPLETE": 0x15, "GET_CANBUS_ID": 0x16}
PRIME_CMD = 0x90          # an unknown command: the device answers with a command error
ACK, NACK, CMD_ERROR, BUSY = 0xa0, 0xf1, 0xf2, 0xf3
USB_KATAPULT = "1d50:6177"
USB_KLIPPER = "1d50:614e"
SERIAL_REQUEST = b"~ \x1c Request Serial Bootloader!! ~"
BLOCK_SIZES = (64, 128, 256, 512)
# Knobs of the stand-in: every timeout and pause is multiplied by TIME_SCALE (tests);
# RECONNECT_POLLS is how many 0.5 s polls wait for the USB device after the 1200-baud
# request (8 = 4 s, like Katapult's tool; a busy rig may want more).
TIME_SCALE = float(os.environ.get("KFLASH_RIG_FLASHTOOL_TIMESCALE") or 1.0)
RECONNECT_POLLS = int(os.environ.get("KFLASH_RIG_FLASHTOOL_POLLS") or 8)

log = logging.getLogger()


class FlashError(Exception):
    pass


class ReadTimeout(Exception):
    pass


def say(text, end="\n"):
    sys.stdout.write(text + end)
    sys.stdout.flush()


def pause(secs):
    time.sleep(secs * TIME_SCALE)


# ---- framing -----------------------------------------------------------------

def _crc_table():
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x8408 if c & 1 else c >> 1
        table.append(c)
    return table


CRC_TABLE = _crc_table()


def crc16(data):
    """CRC-16/MCRF4XX (reflected 0x1021, init 0xffff): Klipper's crc16_ccitt."""
    crc = 0xffff
    for b in data:
        crc = (crc >> 8) ^ CRC_TABLE[(crc ^ b) & 0xff]
    return crc


def frame(cmd, payload=b""):
    if len(payload) % 4:
        raise ValueError("payload must be a multiple of 4 bytes")
    body = bytes([cmd, len(payload) // 4]) + bytes(payload)
    return FRAME_HEAD + body + struct.pack("<H", crc16(body)) + FRAME_TAIL


def check_response(data, cmd):
    """(payload, None) for a good ACK of cmd, else (None, why) -- in the order the
    checks are made: trailer, CRC, error/busy/NACK, acknowledged command."""
    words = data[3]
    if data[-2:] != FRAME_TAIL:
        return None, "Invalid Trailer Received 0x%s" % bytes(data[-2:]).hex()
    got, want = struct.unpack("<H", data[-4:-2])[0], crc16(data[2:-4])
    if got != want:
        return None, "Frame CRC Mismatch, expected: %d, received %d" % (want, got)
    if data[2] == CMD_ERROR:
        return None, "Received Error Response"
    if data[2] == BUSY:
        return None, "busy"
    if data[2] != ACK:
        return None, "Received NACK"
    acked = struct.unpack("<I", data[4:8])[0] if words else 0
    if acked != cmd:
        return None, "Acknowledged wrong command, expected: %2x, received: %2x" % (cmd, acked)
    return bytes(data[8:words * 4 + 4]) if words > 1 else b"", None


def parse_connect(payload):
    """CONNECT ack payload (after the acked command word) -> dict."""
    if len(payload) < 12:
        raise FlashError("Invalid CONNECT response")
    ver, start, block_size = struct.unpack("<4sII", payload[:12])
    proto = tuple(reversed(ver[:3]))
    info = payload[12:].rstrip(b"\0")
    software = "?"
    if proto >= (1, 1, 0):
        parts = info.split(b"\0", 1)
        mcu = parts[0].decode()
        # Like Katapult's tool: only the first NUL is a separator, so the version keeps
        # the zero word and the MCU padding as leading NUL characters.
        software = parts[1].decode() if len(parts) == 2 else None
    else:
        mcu = info.decode()
    return {"proto": proto, "app_start": start, "block_size": block_size, "mcu": mcu,
            "software": software}


def find_dictionary(image):
    """The data dictionary a Klipper image embeds (zlib JSON), searched like Katapult's
    tool: the first one whose app is Klipper, else the last JSON object found."""
    found = None
    pos = 0
    while True:
        pos = image.find(b"\x78", pos)
        if pos < 0 or pos + 1 >= len(image):
            return found
        if (image[pos] * 256 + image[pos + 1]) % 31 == 0:
            try:
                obj = json.loads(zlib.decompress(image[pos:]))
            except (zlib.error, ValueError):
                obj = None
            if isinstance(obj, dict) and obj:
                found = obj
                if obj.get("app") == "Klipper":
                    return found
        pos += 1


# ---- serial link ---------------------------------------------------------------

class Link:
    """A tty (or any fd) with a read buffer that lives across commands."""

    def __init__(self, fd):
        self.fd = fd
        self.buf = bytearray()

    def write(self, data):
        view = memoryview(bytes(data))
        deadline = time.monotonic() + 5.0 * TIME_SCALE
        while view:
            try:
                n = os.write(self.fd, view)
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise OSError(errno.ETIMEDOUT, "write timed out")
                select.select([], [self.fd], [], left)
                continue
            view = view[n:]

    def _fill(self, timeout):
        r, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if not r:
            return False
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return True
        except OSError as e:
            if e.errno != errno.EIO:
                raise
            data = b""
        if not data:       # hung up (device gone): nothing will arrive
            time.sleep(max(0.0, min(timeout, 0.05)))
            return True
        self.buf += data
        return True

    def read_until(self, sep, timeout):
        deadline = time.monotonic() + timeout * TIME_SCALE
        while True:
            i = self.buf.find(sep)
            if i >= 0:
                out = bytes(self.buf[:i + len(sep)])
                del self.buf[:i + len(sep)]
                return out
            left = deadline - time.monotonic()
            if left <= 0:
                raise ReadTimeout()
            self._fill(left)

    def drain(self, timeout):
        """What arrives within timeout (the buffer included)."""
        deadline = time.monotonic() + timeout * TIME_SCALE
        while not self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._fill(left)
        out = bytes(self.buf)
        self.buf.clear()
        return out

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


TCGETS2, TCSETS2, BOTHER, CBAUD = 0x802C542A, 0x402C542B, 0o010000, 0o010017
TERMIOS2 = struct.Struct("=IIIIB19sII")


def open_serial(device, baud):
    """Like pyserial's Serial(baudrate=baud, exclusive=True).open(): raw 8N1, DTR/RTS up."""
    try:
        rate = int(baud)
    except (TypeError, ValueError):
        raise ValueError("Not a valid baudrate: %r" % (baud,))
    try:
        fd = os.open(device, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as e:
        raise FlashError("Unable to open serial port: [Errno %s] could not open port %s: %s"
                         % (e.errno, device, e))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise FlashError("Unable to open serial port: [Errno %s] Could not exclusively lock "
                             "port %s: %s" % (e.errno, device, e))
        with contextlib.suppress(termios.error):
            a = termios.tcgetattr(fd)
            a[0] &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP |
                      termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON |
                      termios.IXOFF | termios.IXANY | termios.INPCK)
            a[1] &= ~termios.OPOST
            a[2] &= ~(termios.CSIZE | termios.PARENB | termios.CSTOPB | termios.CRTSCTS)
            a[2] |= termios.CS8 | termios.CREAD | termios.CLOCAL
            a[3] &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG |
                      termios.IEXTEN | termios.ECHOE | termios.ECHOK)
            a[6][termios.VMIN] = 0
            a[6][termios.VTIME] = 0
            std = getattr(termios, "B%d" % rate, None)
            if std is not None:
                a[4] = a[5] = std
            termios.tcsetattr(fd, termios.TCSANOW, a)
            if std is None:
                set_custom_baud(fd, rate)
        with contextlib.suppress(OSError):
            fcntl.ioctl(fd, termios.TIOCMBIS, struct.pack("I", termios.TIOCM_DTR | termios.TIOCM_RTS))
        with contextlib.suppress(termios.error):
            termios.tcflush(fd, termios.TCIFLUSH)
    except BaseException:
        os.close(fd)
        raise
    return fd


def set_custom_baud(fd, rate):
    """A rate without a Bxxx constant (250000): termios2 with BOTHER, as pyserial does."""
    buf = bytearray(TERMIOS2.size)
    try:
        fcntl.ioctl(fd, TCGETS2, buf, True)
        f = list(TERMIOS2.unpack(buf))
        f[2] = (f[2] & ~CBAUD) | BOTHER
        f[6] = f[7] = rate
        fcntl.ioctl(fd, TCSETS2, TERMIOS2.pack(*f))
    except OSError as e:
        log.info("Could not set custom baud rate %d: %s", rate, e)


# ---- USB identity through sysfs ------------------------------------------------------

def usb_device_dir(device):
    """The sysfs USB device directory (the one holding busnum and devnum) of a tty."""
    real = pathlib.Path(device).resolve()
    if not real.exists():
        return None
    node = pathlib.Path("/sys/class/tty", real.name)
    if not node.exists():
        return None
    for d in node.resolve().parents:
        if (d / "busnum").is_file() and (d / "devnum").is_file():
            return d
    return None


def usb_info(usbdir):
    def attr(name, default):
        try:
            return (usbdir / name).read_text().strip().lower()
        except OSError:
            return default
    vid, pid = attr("idVendor", None), attr("idProduct", None)
    return {"usb_id": "%s:%s" % (vid, pid) if vid is not None and pid is not None else "",
            "manufacturer": attr("manufacturer", "unknown"),
            "product": attr("product", "unknown"),
            "serial_number": attr("serial", "")}


def by_path_name(device):
    """/dev/serial/by-path link of the device, else the resolved device path."""
    real = pathlib.Path(device).resolve()
    with contextlib.suppress(OSError):
        for link in pathlib.Path("/dev/serial/by-path").iterdir():
            if link.samefile(real):
                return link
    return real


def needs_prime(product):
    """stm32 USB parts with double-buffered endpoints (not f2/f4/h7) answer the first
    command only once a second one arrives: send a throw-away command first."""
    return product.startswith("stm32") and product[5:7] not in ("f2", "f4", "h7")


# ---- the Katapult session --------------------------------------------------------------

class Flasher:
    def __init__(self, link, firmware):
        self.link = link
        self.firmware = pathlib.Path(firmware)
        self.primed = False
        self.block_size = 64
        self.app_start = 0
        self.blocks = 0
        self.file_size = 0
        self.sha = hashlib.sha1()
        self.dictionary = None
        if self.firmware.name.lower() == "klipper.bin" and self.firmware.is_file():
            self.dictionary = find_dictionary(self.firmware.read_bytes())
            if self.dictionary:
                say("Detected Klipper binary version %s, MCU: %s" % (
                    self.dictionary.get("version", ""),
                    self.dictionary.get("config", {}).get("MCU", "")))

    def prime(self):
        self.link.write(frame(PRIME_CMD))
        self.primed = True

    def _read_frame(self, timeout):
        data = bytearray()
        while True:
            data += self.link.read_until(FRAME_TAIL, timeout)
            while len(data) > 7 and data[:2] != FRAME_HEAD:
                del data[0]
            if len(data) > 7 and len(data) == data[3] * 4 + 8:
                if self.primed:      # the answer to the prime: thrown away
                    self.primed = False
                    data.clear()
                    continue
                return data

    def command(self, name, payload=b"", tries=5, timeout=2.0):
        code = COMMANDS[name]
        request = frame(code, payload)
        while tries:
            try:
                self.link.write(request)
                data = self._read_frame(timeout)
            except ReadTimeout:
                log.info("Response for command %s timed out, %d tries remaining", name, tries - 1)
            except OSError as e:
                log.info("Command '%s': device I/O error: %s", name, e)
            else:
                body, why = check_response(data, code)
                if why is None:
                    return body
                if why == "busy":
                    log.info("Command '%s': Received busy signal", name)
                    pause(1.5)
                else:
                    log.info("Command '%s': %s", name, why)
            tries -= 1
            try:
                left = self.link.drain(0.25)
            except OSError:
                left = b""
            if left:
                log.info("Read Buffer Contents: %r", left)
            pause(0.5)
        raise FlashError("Error sending command [%s] to Device" % name)

    def connect(self):
        say("Attempting to connect to bootloader")
        info = parse_connect(self.command("CONNECT"))
        self.app_start, self.block_size = info["app_start"], info["block_size"]
        if self.block_size not in BLOCK_SIZES:
            raise FlashError("Invalid Block Size: %d" % self.block_size)
        software = info["software"]
        if software is None:
            say("Katapult build not reporting software version!")
            software = "?"
        say("Katapult Connected\nSoftware Version: %s\nProtocol Version: %s\nBlock Size: %d bytes\n"
            "Application Start: 0x%4X\nMCU type: %s" % (
                software, ".".join(str(v) for v in info["proto"]), self.block_size,
                self.app_start, info["mcu"]))
        if self.dictionary is not None:
            image_mcu = self.dictionary.get("config", {}).get("MCU", "")
            if image_mcu and image_mcu != info["mcu"]:
                raise FlashError("MCU returned by Katapult does not match MCU identified in "
                                 "klipper.bin.\nKatapult MCU: %s\nKlipper Binary MCU: %s"
                                 % (info["mcu"], image_mcu))
        return info

    def write(self):
        say("Flashing '%s'..." % self.firmware)
        say("\n[", end="")
        image = self.firmware.read_bytes()
        self.file_size = len(image)
        shown = 0
        addr = self.app_start
        for off in range(0, len(image), self.block_size):
            block = image[off:off + self.block_size].ljust(self.block_size, b"\xff")
            self.sha.update(block)
            for _ in range(3):
                try:
                    body = self.command("SEND_BLOCK", struct.pack("<I", addr) + block, 3, 5.0)
                except FlashError as e:
                    raise FlashError("Flash write failed, flash address 0x%4X" % addr) from e
                got = struct.unpack("<I", body[:4])[0] if len(body) >= 4 else 0
                if got == addr:
                    break
                log.info("Block write mismatch: expected: %4X, received: %4X", addr, got)
                pause(0.1)
            else:
                raise FlashError("Flash write failed, block address 0x%4X" % got)
            addr += self.block_size
            self.blocks += 1
            if percent(self.blocks * self.block_size, self.file_size) >= shown + 2:
                shown += 2
                say("#", end="")
        body = self.command("SEND_EOF")
        pages = struct.unpack("<I", body[:4])[0] if len(body) >= 4 else 0
        say("]\n\nWrite complete: %d pages" % pages)

    def verify(self):
        say("Verifying (block count = %d)..." % self.blocks)
        say("\n[", end="")
        sha = hashlib.sha1()
        shown = 0
        for i in range(self.blocks):
            addr = self.app_start + i * self.block_size
            for _ in range(3):
                body = self.command("REQUEST_BLOCK", struct.pack("<I", addr))
                got = struct.unpack("<I", body[:4])[0] if len(body) >= 4 else None
                if got == addr:
                    break
                log.info("Block read mismatch: expected: 0x%4X, received: 0x%s", addr, got)
                pause(0.1)
            else:
                say("Error")
                raise FlashError("Block Request Error, block: %d" % i)
            sha.update(body[4:])
            if percent(i * self.block_size, self.file_size) >= shown + 2:
                shown += 2
                say("#", end="")
        got, want = sha.hexdigest().upper(), self.sha.hexdigest().upper()
        if got != want:
            raise FlashError("Checksum mismatch: Expected %s, Received %s" % (want, got))
        say("]\n\nVerification Complete: SHA = %s" % got)

    def complete(self):
        self.command("COMPLETE")


def percent(done, total):
    return int(done / float(total) * 100 + .5) if total else 100


# ---- device handling (what the real tool's SerialSocket does) ---------------------------

def holder_of(device):
    """(pid, description) of a process that has the device open, else None."""
    try:
        st = os.stat(device)
    except OSError:
        return None
    me = str(os.getpid())
    for fd_dir in pathlib.Path("/proc").glob("*/fd"):
        pid = fd_dir.parent.name
        if not pid.isdigit() or pid == me:
            continue
        with contextlib.suppress(OSError):
            for fd in fd_dir.iterdir():
                try:
                    s = fd.stat()
                except OSError:
                    continue
                if (s.st_dev, s.st_ino) == (st.st_dev, st.st_ino):
                    return pid, describe_process(pid)
    return None


def describe_process(pid):
    with contextlib.suppress(OSError):
        p = subprocess.run(["systemctl", "status", pid], capture_output=True, text=True)
        words = p.stdout.strip().split(maxsplit=2)
        if len(words) == 3:
            return "Systemd Unit Name: %s" % words[1]
    with contextlib.suppress(OSError):
        cmdline = pathlib.Path("/proc", pid, "cmdline").read_text().replace("\0", " ").strip()
        return "Command Line: %s" % cmdline
    with contextlib.suppress(OSError):
        return "Executable: %s)" % pathlib.Path("/proc", pid, "exe").resolve(strict=True)
    return "Name Unknown"


def validate_device(device):
    path = pathlib.Path(device)
    if not path.exists():
        raise FlashError("No Serial Device found at %s" % path)
    try:
        path.stat()
    except PermissionError as e:
        raise FlashError("No permission to access device %s" % path) from e
    held = holder_of(device)
    if held:
        say("Serial device %s in use by another program.\nProcess ID: %s\nProcess %s"
            % (path, held[0], held[1]))
        raise FlashError("Serial device %s in use" % path)


def request_usb_bootloader(device, args):
    """1200 baud with DTR dropped; poll the USB port for the device that comes back.
    Returns the path to use next."""
    say("Requesting USB bootloader for %s..." % device)
    usbdir = usb_device_dir(device)
    if usbdir is None:
        say("Device path %s is not a usb device" % device)
        return pathlib.Path(device)
    stable = by_path_name(device)
    before = usb_info(usbdir)["usb_id"]
    fd = None
    with contextlib.suppress(OSError):
        fd = os.open(device, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        dtr = struct.pack("I", termios.TIOCM_DTR)
        fcntl.ioctl(fd, termios.TIOCMBIS, dtr)
        a = termios.tcgetattr(fd)
        a[4] = a[5] = termios.B1200
        termios.tcsetattr(fd, termios.TCSANOW, a)
        fcntl.ioctl(fd, termios.TIOCMBIC, dtr)
    if fd is not None:
        os.close(fd)
    say("Waiting for USB Reconnect.", end="")
    for _ in range(RECONNECT_POLLS):
        pause(0.5)
        say(".", end="")
        info = usb_info(usbdir)
        if info["usb_id"] and info["usb_id"] != before:
            pause(0.5)
            say("done")
            say("Detected new USB Device: %s %s %s" % (
                info["usb_id"], info["manufacturer"], info["product"]))
            if info["manufacturer"] == "katapult" or info["usb_id"] == USB_KATAPULT:
                ttys = list(usbdir.glob("%s:*/tty/tty*" % usbdir.name))
                if len(ttys) == 1 and pathlib.Path("/dev", ttys[0].name).exists():
                    stable = pathlib.Path("/dev", ttys[0].name)
                say("Katapult detected on %s" % stable)
            else:
                args.request_bootloader = True
                say("Device is not Katapult, exiting...")
            break
    else:
        say("timed out")
    return stable


def request_serial_bootloader(device, baud):
    say("Requesting serial bootloader for device %s..." % device)
    link = Link(open_serial(device, baud))
    try:
        link.write(SERIAL_REQUEST)
        pause(1.0)
    finally:
        link.close()


def run_serial(args):
    """The real tool's SerialSocket.run(): returns the link to close (or None)."""
    firmware = pathlib.Path(args.firmware).expanduser().resolve()
    flash_req = not (args.request_bootloader or args.status)
    if flash_req and not firmware.is_file():
        raise FlashError("Invalid firmware path '%s'" % firmware)
    device = args.device
    validate_device(device)
    usbdir = usb_device_dir(device)
    info = usb_info(usbdir) if usbdir is not None else {}
    product = info.get("product", "unknown")
    if info.get("manufacturer") == "klipper" or info.get("usb_id") == USB_KLIPPER:
        say("Detected USB device running Klipper")
        device = str(request_usb_bootloader(device, args))
        if args.request_bootloader:
            return
    elif info.get("manufacturer") == "katapult" or info.get("usb_id") == USB_KATAPULT:
        say("Detected USB device running Katapult")
        if args.request_bootloader:
            return
    elif args.request_bootloader:
        request_serial_bootloader(device, args.baud)
        return
    else:
        product = ""
    link = Link(open_serial(device, args.baud))
    try:
        flasher = Flasher(link, firmware)
        try:
            if needs_prime(product):
                flasher.prime()
            flasher.connect()
            if not args.status:
                flasher.write()
                flasher.verify()
        finally:
            # Like the real tool: COMPLETE even after an error (the board then starts
            # whatever application it holds).
            if flash_req:
                flasher.complete()
    finally:
        link.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description="Katapult Flash Tool (kflash rig stand-in)")
    ap.add_argument("-d", "--device", metavar="<serial device>", help="Serial Device")
    ap.add_argument("-b", "--baud", default=250000, metavar="<baud rate>",
                    help="Serial baud rate")
    ap.add_argument("-i", "--interface", default="can0", metavar="<can interface>",
                    help="Can Interface (not supported by the stand-in)")
    ap.add_argument("-f", "--firmware", metavar="<klipper.bin>",
                    default="~/klipper/out/klipper.bin", help="Path to Klipper firmware file")
    ap.add_argument("-u", "--uuid", metavar="<uuid>", default=None,
                    help="Can device uuid (not supported by the stand-in)")
    ap.add_argument("-q", "--query", action="store_true",
                    help="Query available CAN UUIDs (CANBus Only; not supported by the stand-in)")
    ap.add_argument("-v", "--verbose", action="store_true", help="Enable verbose responses")
    ap.add_argument("-r", "--request-bootloader", action="store_true",
                    help="Requests the bootloader and exits")
    ap.add_argument("-s", "--status", action="store_true",
                    help="Connect to bootloader and print status")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if not args.verbose:
        log.setLevel(logging.ERROR)
    try:
        if args.device is None:
            raise FlashError("CAN devices are not supported by the kflash rig's Katapult "
                             "stand-in (flashtool.py needs -d <serial device>)")
        say("Connecting to Serial Device %s, baud %s" % (args.device, args.baud))
        run_serial(args)
    except Exception:
        log.exception("Flash Tool Error")
        return 1
    if args.request_bootloader:
        say("Bootloader Request Complete")
    elif args.status:
        say("Status Request Complete")
    else:
        say("Programming Complete")
    return 0


if __name__ == "__main__":
    sys.exit(main())
