# Shared helpers of the kflash test-rig printer-host stand-ins (systemctl,
# Moonraker). Python 3.11 standard library only. See ../README.md.
import os
import time
# json, subprocess, select and signal are imported where used: every systemctl call
# starts Python afresh, and imports are slow in the rig guest (QEMU TCG).

HERE = os.path.dirname(os.path.abspath(__file__))
STANDINS = os.path.dirname(HERE)


def state_dir():
    return os.environ.get("KFLASH_RIG_STATE") or "/run/kflash-rig"


def read_text(path):
    """File contents, or None when the file does not exist."""
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def write_text(path, text):
    """Atomic replace, so concurrent readers never see half a file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = "%s.tmp.%d" % (path, os.getpid())
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def now_stamp():
    """`date +%s.%N` format."""
    ns = time.time_ns()
    return "%d.%09d" % (ns // 1000000000, ns % 1000000000)


# ---- services ---------------------------------------------------------------

def service_path(state, svc):
    return os.path.join(state, "services", svc)


def service_state(state, svc):
    """(known, active, since): since = time of the last inactive->active change."""
    text = read_text(service_path(state, svc))
    if text is None:
        return False, False, None
    since = read_text(service_path(state, svc) + ".since")
    try:
        since = float(since) if since else None
    except ValueError:
        since = None
    return True, text.strip() == "active", since


def set_service(state, svc, active):
    if active:
        write_text(service_path(state, svc) + ".since", now_stamp() + "\n")
    write_text(service_path(state, svc), "active\n" if active else "inactive\n")


# ---- boards -----------------------------------------------------------------

def read_boards(override=None):
    """The boards list of `kflash-boardsim ctl status --json`, read fresh.

    Source: `override` (a JSON file), else $KFLASH_RIG_BOARDS_JSON (a file), else
    the command `$KFLASH_RIG_BOARDSIM ctl status --json` (default kflash-boardsim).
    Returns (boards, error); boards is None when the source failed."""
    import json
    import subprocess
    path = override or os.environ.get("KFLASH_RIG_BOARDS_JSON")
    try:
        if path:
            with open(path) as f:
                text = f.read()
            src = path
        else:
            cmd = [os.environ.get("KFLASH_RIG_BOARDSIM") or "kflash-boardsim",
                   "ctl", "status", "--json"]
            src = " ".join(cmd)
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            if p.returncode != 0:
                return None, "%s failed (rc %d): %s" % (src, p.returncode, p.stderr.strip())
            text = p.stdout
        boards = json.loads(text)
        if isinstance(boards, dict):  # {"boards": [...]}; a bare list is accepted too
            boards = boards["boards"]
        if not isinstance(boards, list):
            raise ValueError("no list of boards")
        return boards, None
    except (OSError, ValueError, KeyError, TypeError, subprocess.TimeoutExpired) as e:
        return None, "cannot read board status from %s: %s" % (path or "kflash-boardsim", e)


def mcu_sections(boards, mapping_file=None):
    """[(section, board)] as Klippy's printer.cfg would have them. By default the
    boards that are plugged in (status `plugged`, whatever their mode) are the
    printer's MCUs: the first is [mcu], every other one [mcu <board name>]. A
    mapping file (JSON object {"mcu": "<board>", "mcu nhk": "<board>", ...}, order
    kept) names them explicitly instead, plugged or not; a mapped board missing
    from the status gives board None."""
    import json
    by_name = {b.get("name"): b for b in boards}
    text = read_text(mapping_file) if mapping_file else None
    if text is not None:
        mapping = json.loads(text)
        return [(sec, can_node(bname) or by_name.get(bname)) for sec, bname in mapping.items()]
    plugged = [b for b in boards if b.get("plugged", True) is not False]
    return [("mcu" if i == 0 else "mcu %s" % b.get("name"), b) for i, b in enumerate(plugged)]


def can_node(spec):
    """A mapping value "can:IFACE:UUID" names a CAN node (kflash-boardsim can-serve), which
    boardctl does not know: {"can_interface": IFACE, "canbus_uuid": UUID}, else None."""
    parts = spec.split(":") if isinstance(spec, str) else []
    if len(parts) == 3 and parts[0] == "can":
        return {"name": spec, "can_interface": parts[1], "canbus_uuid": parts[2]}
    return None


def by_id_path(board):
    """The udev by-id link of the board running Klipper (what printer.cfg names)."""
    return "/dev/serial/by-id/usb-Klipper_%s_%s-if00" % (board.get("mcu"), board.get("serial"))


def running_mcu(board):
    """CONFIG_MCU of the running firmware: boardsim's USB product string in Klipper
    mode (a board flashed with another chip's build shows it), else the board's MCU."""
    if board.get("mode") == "klipper" and board.get("product"):
        return board["product"]
    return board.get("mcu") or ""


def board_in_klipper(board):
    """Plugged, running Klipper and not about to reboot."""
    return (bool(board) and board.get("plugged", True) is not False
            and board.get("mode") == "klipper" and not board.get("rebooting_to"))


# ---- processes --------------------------------------------------------------

def process_alive(pid, needle=None):
    """True when pid runs (and, if given, its command line contains needle)."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            cmdline = f.read()
    except (OSError, ValueError):
        return False
    try:
        with open("/proc/%d/stat" % pid) as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
    except (OSError, IndexError):
        return False
    return needle is None or needle.encode() in cmdline


def terminate(pid, timeout=10.0):
    """SIGTERM pid and wait for it to exit (pidfd: no polling). Then SIGKILL."""
    import select
    import signal
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        if not select.select([fd], [], [], timeout)[0]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
