#!/usr/bin/env python3
# Holds ttys open like a running Klipper host does (kflash rig, see ../README.md).
# ttyholder.py TTY...: opens every tty that exists (O_RDWR|O_NOCTTY|O_NONBLOCK),
# prints one line "READY <opened>/<asked>" on stdout, then waits for SIGTERM.
import os
import signal
import sys

fds = []
for path in sys.argv[1:]:
    try:
        fds.append(os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK))
    except OSError as e:
        sys.stderr.write("ttyholder: %s: %s\n" % (path, e))
sys.stdout.write("READY %d/%d\n" % (len(fds), len(sys.argv) - 1))
sys.stdout.flush()
os.close(1)
os.open(os.devnull, os.O_WRONLY)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    signal.pause()
