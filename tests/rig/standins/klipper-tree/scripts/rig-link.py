#!/usr/bin/env python3
# "Linker" of the kflash test-rig Klipper stand-in tree (rig code); the Makefile
# cuts klipper.bin out of the ELF with tail (image at file offset 0x100).
#
#   rig-link.py link OUT/ OUT/klipper.elf OBJ...   build the firmware image, wrap it in an ELF
#                                                  (image at file offset 0x100; RIG_BUILD_DELAY
#                                                  seconds, default 0.2, stand in for compiling)
#   rig-link.py uf2 OUT/klipper.elf OUT/klipper.uf2
#
# RIG_BUILD_RENDEZVOUS=PATH (tests of parallel builds): the link step first meets one other
# build's link step at the FIFO PATH and fails if none arrives within
# RIG_BUILD_RENDEZVOUS_SECS (default 60), so two builds only both succeed if they are in
# make at the same time.
#
# Image at CONFIG_FLASH_APPLICATION_ADDRESS:
#   [u32 LE initial SP 0x20020000][u32 LE reset vector = app start + 0x101]
#   [vector table + code-like bytes derived from the sources and autoconf.h, 6 KiB in all,
#    no 0x78 byte]
#   [OUT/klipper.dict compressed with zlib level 9 (starts 78 da)][zero pad to 4 bytes]
# rp2040 builds without a bootloader (app at 0x10000100) get a 256-byte stage2 block
# in front, loaded at 0x10000000, and become klipper.uf2.
import sys
sys.dont_write_bytecode = True
import hashlib
import os
import signal
import struct
import time
import zlib

import rigmcu

CODE_SIZE = 6144
ELF_DATA_OFFSET = 0x100
UF2_FAMILY = {"rp2040": 0xe48bff56, "rp2350": 0xe48bff59}


def read_autoconf(path):
    vals = {}
    with open(path) as f:
        for line in f:
            parts = line.split(None, 2)
            if len(parts) == 3 and parts[0] == "#define":
                v = parts[2].strip()
                vals[parts[1]] = v[1:-1] if v.startswith('"') else v
    return vals


def code_bytes(seed, size):
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(seed + counter.to_bytes(4, "little")).digest()
        counter += 1
    # No 0x78 byte, so the only zlib header in the image is the dictionary's.
    return bytes(b if b != 0x78 else 0x79 for b in out[:size])


def meet(path):
    """Block until one other build reaches this point too. Whoever creates the FIFO opens it
    for reading, the other for writing; each open blocks until the other end is opened."""
    deadline = int(os.environ.get("RIG_BUILD_RENDEZVOUS_SECS") or 60)
    try:
        os.mkfifo(path)
        mode = os.O_RDONLY
    except FileExistsError:
        mode = os.O_WRONLY

    def late(*_):
        sys.exit("rig-link: no other build reached the rendezvous %s within %d s" % (path, deadline))

    signal.signal(signal.SIGALRM, late)
    signal.alarm(deadline)
    fd = os.open(path, mode)
    signal.alarm(0)
    os.close(fd)
    if mode == os.O_RDONLY:
        os.unlink(path)


def build_image(outdir, objs):
    cfg = read_autoconf(os.path.join(outdir, "autoconf.h"))
    app = int(cfg["CONFIG_FLASH_APPLICATION_ADDRESS"], 0)
    with open(os.path.join(outdir, "klipper.dict"), "rb") as f:
        datadict = f.read()
    # Each stand-in object names its source (compile_time_request.o names the .c
    # buildcommands wrote); the code bytes hash those sources and the configuration.
    h = hashlib.sha256()
    with open(os.path.join(outdir, "autoconf.h"), "rb") as f:
        h.update(f.read())
    for o in objs:
        with open(o) as f:
            src = f.read().strip()
        with open(src, "rb") as f:
            h.update(f.read())
    seed = h.digest()
    if os.environ.get("RIG_BUILD_RENDEZVOUS"):
        meet(os.environ["RIG_BUILD_RENDEZVOUS"])
    delay = float(os.environ.get("RIG_BUILD_DELAY") or 0.2)
    time.sleep(delay)  # stands in for compile time
    vectors = struct.pack("<II", rigmcu.INITIAL_SP, app + 0x101)
    handlers = b"".join(struct.pack("<I", app + 0x1a1 + 4 * (i % 7)) for i in range(46))
    body = code_bytes(seed, CODE_SIZE - len(vectors) - len(handlers))
    image = vectors + handlers + body + zlib.compress(datadict, 9)
    image += b"\0" * (-len(image) % 4)
    load = app
    if cfg.get("CONFIG_RP2040_HAVE_STAGE2") == "1":
        image = code_bytes(b"stage2" + seed, 0x100) + image
        load = app - 0x100
    return load, app + 0x101, image


def write_elf(path, load, entry, image):
    ehdr = struct.pack("<4sBBBB8sHHIIIIIHHHHHH", b"\x7fELF", 1, 1, 1, 0, b"\0" * 8,
                       2, 40, 1, entry, 52, 0, 0x05000200, 52, 32, 1, 40, 0, 0)
    phdr = struct.pack("<IIIIIIII", 1, ELF_DATA_OFFSET, load, load, len(image),
                       len(image), 5, 4)
    data = ehdr + phdr
    data += b"\0" * (ELF_DATA_OFFSET - len(data)) + image
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def read_elf(path):
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF":
        sys.exit("rig-link: %s is not an ELF file" % path)
    _, offset, load, _, size = struct.unpack_from("<IIIII", data, 52)
    return load, data[offset:offset + size]


def write_uf2(path, load, image, family):
    blocks = [image[i:i + 256] for i in range(0, len(image), 256)]
    out = bytearray()
    for n, chunk in enumerate(blocks):
        out += struct.pack("<IIIIIIII", 0x0A324655, 0x9E5D5157, 0x2000, load + 256 * n,
                           256, n, len(blocks), family)
        out += chunk.ljust(476, b"\0") + struct.pack("<I", 0x0AB16F30)
    with open(path, "wb") as f:
        f.write(out)


def main():
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "link" and len(sys.argv) >= 4:
        load, entry, image = build_image(sys.argv[2], sys.argv[4:])
        write_elf(sys.argv[3], load, entry, image)
    elif cmd == "uf2" and len(sys.argv) == 4:
        load, image = read_elf(sys.argv[2])
        cfg = read_autoconf(os.path.join(os.path.dirname(sys.argv[3]) or ".", "autoconf.h"))
        write_uf2(sys.argv[3], load, image, UF2_FAMILY.get(cfg.get("CONFIG_MCU"), 0xe48bff56))
    else:
        sys.exit("usage: rig-link.py link OUT/ ELF OBJ... | uf2 ELF UF2")


if __name__ == "__main__":
    main()
