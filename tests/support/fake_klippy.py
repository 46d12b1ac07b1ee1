#!/usr/bin/env python3
"""A minimal Klippy for the real Moonraker in tests/moonraker_real.rs: it serves Klippy's
API-server protocol on a Unix socket (JSON requests `{"id", "method", "params"}`, each
message terminated by 0x03; answers `{"id", "result"}` or `{"id", "error"}`), like
klippy/webhooks.py, with the endpoints Moonraker calls while connecting and the printer
objects kflash queries. Its state is fixed at start:

    fake_klippy.py SOCKET STATE PRINT_STATE [FILENAME PROGRESS]

STATE is Klippy's (`ready`, `shutdown`, ...); PRINT_STATE is print_stats.state. A
`shutdown` carries the message Klippy gives after an M112. Prints `SUBSCRIBED` once
Moonraker has first identified Klippy and subscribed (Moonraker knows its state by then).

`gcode/script` runs two kinds of G-code, as Klippy would with the README's printer.cfg:
`RESPOND MSG="..."` (Klipper's [respond] module) writes `echo: ...` to the connections that
subscribed to G-code output (`gcode/subscribe_output`), and the macros in MACROS stand for
the README's `[gcode_macro KFLASH_*]`, whose `action_call_remote_method(...)` sends
`{"method": <name>, "params": {...}}` (plus the registered response template) to the
connections that registered that remote method (`register_remote_method`), like
klippy/webhooks.py. Anything else is accepted and does nothing.
Standard library only; no Klipper code is copied.
"""
import json
import os
import shlex
import socket
import sys
import threading
import time

SHUTDOWN_MSG = ("Shutdown due to M112 command\nOnce the underlying issue is corrected, use the\n"
                "\"FIRMWARE_RESTART\" command to reset the firmware, reload the\nconfig, and "
                "restart the host software.\nPrinter is shutdown\n")
# printer.cfg macro -> the remote method its action_call_remote_method names (README).
MACROS = {"KFLASH_STATUS": "kflash_status", "KFLASH_FLASH_ALL": "kflash_flash_all"}
MESSAGES = {"ready": "Printer is ready", "shutdown": SHUTDOWN_MSG}
ENDPOINTS = ["list_endpoints", "info", "emergency_stop", "register_remote_method",
             "objects/list", "objects/query", "objects/subscribe", "gcode/help",
             "gcode/script", "gcode/restart", "gcode/firmware_restart",
             "gcode/subscribe_output", "pause_resume/cancel", "pause_resume/pause",
             "pause_resume/resume"]


def main():
    path, state, job = sys.argv[1], sys.argv[2], sys.argv[3]
    filename = sys.argv[4] if len(sys.argv) > 4 else ""
    progress = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
    objects = {
        "webhooks": {"state": state, "state_message": MESSAGES.get(state, "")},
        "print_stats": {"filename": filename, "total_duration": 1234.5, "print_duration": 1200.0,
                        "filament_used": 1500.0, "state": job, "message": "",
                        "info": {"total_layer": None, "current_layer": None}},
        "virtual_sdcard": {"file_path": None, "progress": progress, "is_active": job == "printing",
                           "file_position": 0, "file_size": 0},
        "pause_resume": {"is_paused": job == "paused"},
        "display_status": {"progress": progress, "message": None},
        "configfile": {"config": {"virtual_sdcard": {"path": "/tmp"}},
                       "settings": {"virtual_sdcard": {"path": "/tmp", "on_error_gcode": ""}},
                       "warnings": [], "save_config_pending": False,
                       "save_config_pending_items": {}},
        "mcu": {"mcu_version": "v0.13.0-730-g84104bbbd",
                "mcu_constants": {"MCU": "stm32h723xx", "CLOCK_FREQ": 400000000}},
    }

    def status(wanted):
        out = {}
        for name, fields in (wanted or {}).items():
            if name in objects:
                full = objects[name]
                out[name] = full if fields is None else {k: v for k, v in full.items() if k in fields}
        return {"eventtime": time.monotonic(), "status": out}

    remote_methods = {}  # name -> [(conn, response_template)]
    gcode_listeners = []  # [(conn, response_template)]
    lock = threading.Lock()

    def send(conn, template, params):
        out = {"params": params}
        out.update(template)
        try:
            conn.sendall(json.dumps(out).encode() + b"\x03")
        except OSError:
            pass

    def run_gcode(script):
        for line in script.splitlines():
            words = line.split(";", 1)[0].strip()
            if not words:
                continue
            cmd, _, rest = words.partition(" ")
            cmd = cmd.upper()
            args = {}
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                args[key.upper()] = value
            with lock:
                if cmd == "RESPOND":
                    for conn, template in gcode_listeners:
                        send(conn, template, {"response": "echo: " + args.get("MSG", "")})
                elif cmd in MACROS:
                    kwargs = {k.lower(): v for k, v in args.items()}
                    for conn, template in remote_methods.get(MACROS[cmd], []):
                        send(conn, template, kwargs)

    def answer(method, params, conn):
        if method == "gcode/script":
            run_gcode(params.get("script", ""))
            return {}
        if method == "register_remote_method":
            with lock:
                remote_methods.setdefault(params["remote_method"], []).append(
                    (conn, params.get("response_template", {})))
            return {}
        if method == "gcode/subscribe_output":
            with lock:
                gcode_listeners.append((conn, params.get("response_template", {})))
            return {}
        if method == "info":
            return {"state": state, "state_message": MESSAGES.get(state, ""),
                    "hostname": socket.gethostname(), "klipper_path": "/tmp/klipper",
                    "python_path": sys.executable, "process_id": os.getpid(),
                    "user_id": os.getuid(), "group_id": os.getgid(),
                    "log_file": "/tmp/klippy.log", "config_file": "/tmp/printer.cfg",
                    "software_version": "v0.13.0-730-g84104bbbd", "cpu_info": "test"}
        if method == "list_endpoints":
            return {"endpoints": ENDPOINTS}
        if method == "objects/list":
            return {"objects": list(objects)}
        if method in ("objects/query", "objects/subscribe"):
            return status(params.get("objects"))
        raise KeyError(method)

    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(4)
    print("LISTENING", flush=True)
    subscribed = threading.Event()

    def serve(conn):
        buf = b""
        while True:
            data = conn.recv(65536)
            if not data:
                return
            buf += data
            while b"\x03" in buf:
                raw, buf = buf.split(b"\x03", 1)
                req = json.loads(raw)
                method = req.get("method")
                try:
                    reply = {"id": req.get("id"), "result": answer(method, req.get("params") or {}, conn)}
                except KeyError:
                    reply = {"id": req.get("id"), "error": {
                        "error": "WebRequestError", "message": "No registered endpoint '%s'" % method}}
                conn.sendall(json.dumps(reply).encode() + b"\x03")
                if method == "objects/subscribe" and not subscribed.is_set():
                    subscribed.set()
                    try:
                        print("SUBSCRIBED", flush=True)
                        sys.stdout.close()  # nothing more to say; the reader may go away
                    except BrokenPipeError:
                        pass  # nobody waits for it (a Klippy restarted under a running Moonraker)

    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
