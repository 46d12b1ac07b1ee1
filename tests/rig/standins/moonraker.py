#!/usr/bin/env python3
"""Moonraker stand-in for the kflash test rig (Python 3.11 standard library only).

Serves the parts of Moonraker's HTTP API (and JSON-RPC over HTTP and a Unix
socket) that kflash uses, with Moonraker's shapes: `{"result": ...}` on success,
`{"error": {"code", "message", "traceback"}}` with the HTTP status on failure.
The Klippy behind it is simulated: its state follows the systemctl stand-in's
klipper service and the boards reported by `kflash-boardsim ctl status --json`.
Switch files in $KFLASH_RIG_STATE/moonraker/ inject failures. See README.md.
"""
import sys
sys.dont_write_bytecode = True
import argparse
import http.server
import json
import os
import platform
import signal
import socket
import socketserver
import struct
import subprocess
import threading
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "lib"), os.path.join(HERE, "klipper-tree", "scripts")]
import rigcommon  # noqa: E402
import rigmcu  # noqa: E402

MOONRAKER_VERSION = "v0.10.0-31-gd5ee171"
API_VERSION = [1, 5, 0]
COMPONENTS = ["secrets", "template", "klippy_connection", "jsonrpc", "internal_transport",
              "application", "websockets", "database", "dbus_manager", "file_manager",
              "authorization", "klippy_apis", "shell_command", "machine", "data_store",
              "proc_stats", "job_state", "job_queue", "history", "http_client",
              "announcements", "webcam", "extensions", "update_manager"]
ALLOWED_SERVICES = {"klipper", "moonraker", "klipper_mcu", "crowsnest", "moonraker-obico",
                    "KlipperScreen", "sonar"}
EXCLUDED_ARGS = {"_", "token", "access_token", "connection_id"}

# Klippy's state messages (klippy/klippy.py, klippy/extras/error_mcu.py).
MSG_READY = "Printer is ready"
MSG_STARTUP = ("Printer is not ready\nThe klippy host software is attempting to connect."
               "  Please\nretry in a few moments.\n")
MSG_MCU_CONNECT = ("\nOnce the underlying issue is corrected, use the\n\"FIRMWARE_RESTART\" "
                   "command to reset the firmware, reload the\nconfig, and restart the host "
                   "software.\nError configuring printer\n")
MSG_SHUTDOWN = ("\nOnce the underlying issue is corrected, use the\n\"FIRMWARE_RESTART\" "
                "command to reset the firmware, reload the\nconfig, and restart the host "
                "software.\nPrinter is shutdown\n")
MSG_CONFIG = ("\nOnce the underlying issue is corrected, use the \"RESTART\"\ncommand to "
              "reload the config and restart the host software.\nPrinter is halted\n")


# A stale connection's /printer/* requests hang (seen: over 100 s); a client gives up first.
STALE_HANG_SECS = 300

class ApiError(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


def log(msg):
    sys.stderr.write("%s moonraker-standin: %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


def to_float(text, default):
    try:
        return float(text) if text and text.strip() else default
    except ValueError:
        return default


def mcu_short_name(section):
    return section[4:] if section.startswith("mcu ") else section


# ---------------------------------------------------------------------------
# Simulated Klippy

class KlippyRun:
    """One run of Klippy, from a klipper service start (or FIRMWARE_RESTART) on.

    startup -> ready      once every configured MCU's board is plugged and in
                          Klipper mode (but not before `startup_secs`)
    startup -> error      when that has not happened after `connect_timeout`
                          ("mcu '<name>': Unable to connect")
    ready   -> shutdown   when a board leaves Klipper mode or its firmware version
                          changes ("Lost communication with MCU '<name>'")
    error and shutdown last until the next start/restart.
    The config (the [mcu ...] sections) is read once, like Klippy reads printer.cfg."""

    def __init__(self, start, host_version):
        self.start = start
        self.host_version = host_version
        self.state = "startup"
        self.message = MSG_STARTUP
        self.sections = None      # [(section, board at config time)]
        self.identified = {}      # section -> board snapshot at identify time
        self.ready_at = None
        self.process_id = 1000 + int(start * 1000) % 30000

    def update(self, now, boards, board_error, mapping_file, startup_secs, connect_timeout):
        if self.sections is None and boards is not None:
            self.sections = rigcommon.mcu_sections(boards, mapping_file)
        if self.state == "startup":
            elapsed = now - self.start
            if elapsed < startup_secs:
                return
            if not self.sections:
                if elapsed >= connect_timeout:
                    why = board_error or "no boards in the rig's board status"
                    self.fail("error", "Section 'mcu' not found in config (%s)\n%s"
                              % (why, MSG_CONFIG.lstrip("\n")))
                return
            live = self.live(boards)
            for section, board in live:
                if not rigcommon.board_in_klipper(board):
                    if elapsed >= connect_timeout:
                        self.fail("error", "mcu '%s': Unable to connect%s"
                                  % (mcu_short_name(section), MSG_MCU_CONNECT))
                    return
                self.identified[section] = dict(board)
            self.state, self.message, self.ready_at = "ready", MSG_READY, now
        elif self.state == "ready" and boards is not None:
            for section, board in self.live(boards):
                snap = self.identified.get(section)
                if (not rigcommon.board_in_klipper(board)
                        or board.get("version") != snap.get("version")):
                    self.fail("shutdown", "Lost communication with MCU '%s'%s"
                              % (mcu_short_name(section), MSG_SHUTDOWN))
                    return

    def live(self, boards):
        """Configured sections with their boards' current status (None if gone)."""
        by_name = {b.get("name"): b for b in boards or []}
        return [(sec, by_name.get(b.get("name")) if b else None) for sec, b in self.sections]

    def fail(self, state, message):
        self.state, self.message = state, message
        log("klippy %s: %s" % (state, message.splitlines()[0]))


class Disconnected:
    state = "disconnected"
    message = ""


class Rig:
    def __init__(self, args):
        self.args = args
        self.state_dir = rigcommon.state_dir()
        self.switch_dir = os.path.join(self.state_dir, "moonraker")
        self.lock = threading.Lock()
        self.run = None
        self.fw_restart_at = 0.0
        self.ever_connected = False
        self.klipper_path = os.path.abspath(os.path.expanduser(args.klipper_path))

    # -- switches ----------------------------------------------------------
    def switch(self, name):
        return rigcommon.read_text(os.path.join(self.switch_dir, name))

    def number(self, name, default):
        return to_float(self.switch(name), default)

    def mapping_file(self):
        return self.args.mcu_map or os.path.join(self.switch_dir, "mcus.json")

    # -- host facts --------------------------------------------------------
    def app(self):
        if self.args.app:
            return self.args.app
        init = rigcommon.read_text(os.path.join(self.klipper_path, "klippy", "__init__.py"))
        return "Kalico" if init and "Kalico" in init else "Klipper"

    def host_version(self):
        try:
            p = subprocess.run(["git", "-C", self.klipper_path, "describe", "--always",
                                "--tags", "--long", "--dirty"],
                               capture_output=True, text=True, timeout=10)
            if p.returncode == 0 and p.stdout.strip():
                return p.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
        v = rigcommon.read_text(os.path.join(self.klipper_path, "klippy", ".version"))
        return v.strip() if v else "?"

    # -- Klippy --------------------------------------------------------------
    def klippy(self):
        """The current Klippy run (or Disconnected) and the fresh board list."""
        with self.lock:
            if self.switch("klippy-disconnected") is not None:
                return Disconnected(), None
            _, active, since = rigcommon.service_state(self.state_dir, "klipper")
            if not active:
                self.run = None
                return Disconnected(), None
            start = max(since or 0.0, self.fw_restart_at)
            if self.run is None or self.run.start != start:
                self.run = KlippyRun(start, self.host_version())
            boards, err = rigcommon.read_boards(self.args.boards_json)
            if boards is None:
                log(err)
            self.run.update(time.time(), boards, err, self.mapping_file(),
                            self.number("startup-secs", self.args.startup_secs),
                            self.number("connect-timeout", self.args.connect_timeout))
            self.emergency_stop()
            self.ever_connected = True
            return self.run, boards

    def emergency_stop(self):
        """Switch `klippy-shutdown`: an M112 (or any shutdown) of the ready Klippy run. Like
        Klippy's invoke_shutdown it latches until the next start/restart; the switch is
        consumed so the next run comes up normally. print_stats is left as it was (the real
        one stays `paused` forever after an M112 during a print)."""
        if self.run.state != "ready":
            return
        path = os.path.join(self.switch_dir, "klippy-shutdown")
        text = self.switch("klippy-shutdown")
        if text is None:
            return
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        reason = text.strip() or "Shutdown due to M112 command"
        self.run.fail("shutdown", reason + MSG_SHUTDOWN)

    def connected_run(self, dynamic=True):
        run, boards = self.klippy()
        if isinstance(run, Disconnected):
            if dynamic and not self.ever_connected:
                # Klippy's endpoints are registered when it first connects.
                raise ApiError(404, "Not Found")
            raise ApiError(503, "Klippy Host not connected")
        return run

    def firmware_restart(self):
        self.connected_run(dynamic=False)
        with self.lock:
            self.fw_restart_at = time.time()
        return "ok"

    # -- printer objects -----------------------------------------------------
    def print_job(self):
        """(state, filename, progress) from the paused/printing/print-state switches:
        paused, printing: line 1 file name (default benchy.gcode), line 2 progress
        (default 0.42); print-state: line 1 state, line 2 file name, line 3 progress."""
        for name, state in (("paused", "paused"), ("printing", "printing")):
            text = self.switch(name)
            if text is not None:
                lines = text.splitlines() + ["", ""]
                return state, lines[0].strip() or "benchy.gcode", to_float(lines[1], 0.42)
        text = self.switch("print-state")
        if text is not None and text.strip():
            lines = text.splitlines() + ["", "", ""]
            return lines[0].strip(), lines[1].strip(), to_float(lines[2], 0.0)
        return "standby", "", 0.0

    def mcu_status(self, run, section, now):
        board = run.identified.get(section)
        if board is None:
            return {}
        consts = rigmcu.constants(rigcommon.running_mcu(board))
        status = {"mcu_version": board.get("version"),
                  "mcu_build_versions": rigmcu.BUILD_VERSIONS,
                  "mcu_constants": consts}
        if run.ready_at is not None:
            seq = 100 + int((now - run.ready_at) * 40)
            status["last_stats"] = {
                "mcu_awake": 0.002, "mcu_task_avg": 3e-06, "mcu_task_stddev": 2e-06,
                "bytes_write": 4000 + 12 * seq, "bytes_read": 9000 + 30 * seq,
                "bytes_retransmit": 0, "bytes_invalid": 0, "send_seq": seq,
                "receive_seq": seq, "retransmit_seq": 0, "srtt": 0.001, "rttvar": 0.0,
                "rto": 0.025, "ready_bytes": 0, "upcoming_bytes": 0,
                "freq": consts["CLOCK_FREQ"] + 1234}
        if self.app() == "Kalico":
            status["app"] = board.get("app", "Klipper")
        return status

    def config_sections(self, run):
        home = os.path.dirname(self.klipper_path)
        raw, settings = {}, {}
        for section, board in run.sections or []:
            serial = rigcommon.by_id_path(board or {"mcu": "unknown", "serial": "unknown"})
            raw[section] = {"serial": serial}
            settings[section.lower()] = {"serial": serial, "baud": 250000,
                                         "restart_method": None,
                                         "max_stepper_error": 2.5e-05}
        raw["printer"] = {"kinematics": "cartesian", "max_velocity": "300",
                          "max_accel": "3000"}
        settings["printer"] = {"kinematics": "cartesian", "max_velocity": 300.0,
                               "max_accel": 3000.0, "square_corner_velocity": 5.0}
        raw["virtual_sdcard"] = {"path": "~/printer_data/gcodes"}
        settings["virtual_sdcard"] = {"path": os.path.join(home, "printer_data", "gcodes"),
                                      "on_error_gcode": ""}
        for sec in ("pause_resume", "display_status"):
            raw[sec], settings[sec] = {}, {}
        return raw, settings

    def object_names(self, run):
        mcus = [sec for sec, _ in run.sections or []]
        return (["webhooks", "configfile"] + mcus +
                ["print_stats", "virtual_sdcard", "pause_resume", "display_status",
                 "idle_timeout", "toolhead", "system_stats"])

    def object_status(self, run, name, now):
        job, filename, progress = self.print_job()
        busy = job in ("printing", "paused")
        if name == "webhooks":
            return {"state": run.state, "state_message": run.message}
        if name == "configfile":
            raw, settings = self.config_sections(run)
            return {"config": raw, "settings": settings, "warnings": [],
                    "save_config_pending": False, "save_config_pending_items": {}}
        if name == "mcu" or name.startswith("mcu "):
            return self.mcu_status(run, name, now)
        if name == "print_stats":
            duration = 1234.5 if busy else 0.0
            return {"filename": filename, "total_duration": duration,
                    "print_duration": duration, "filament_used": 1500.0 if busy else 0.0,
                    "state": job, "message": "",
                    "info": {"total_layer": None, "current_layer": None}}
        if name == "virtual_sdcard":
            home = os.path.dirname(self.klipper_path)
            size = 2345678 if filename else 0
            return {"file_path": os.path.join(home, "printer_data", "gcodes", filename)
                    if filename else None,
                    "progress": progress, "is_active": job == "printing",
                    "file_position": int(size * progress), "file_size": size}
        if name == "pause_resume":
            return {"is_paused": job == "paused"}
        if name == "display_status":
            return {"progress": progress, "message": None}
        if name == "idle_timeout":
            return {"state": "Printing" if job == "printing" else "Idle",
                    "printing_time": 1234.5 if busy else 0.0}
        if name == "toolhead":
            return {"homed_axes": "xyz" if busy else "", "axis_minimum": [0.0, 0.0, 0.0, 0.0],
                    "axis_maximum": [250.0, 250.0, 230.0, 0.0], "print_time": 0.0,
                    "stalls": 0, "estimated_print_time": now - run.start,
                    "extruder": "extruder", "position": [0.0, 0.0, 0.0, 0.0],
                    "max_velocity": 300.0, "max_accel": 3000.0,
                    "minimum_cruise_ratio": 0.5, "square_corner_velocity": 5.0}
        if name == "system_stats":
            return {"sysload": round(os.getloadavg()[0], 2),
                    "cputime": round(time.process_time(), 3), "memavail": 1536000}
        return None

    # -- API methods (shared by HTTP and JSON-RPC) ----------------------------
    def server_info(self, args):
        run, _ = self.klippy()
        connected = not isinstance(run, Disconnected)
        state = run.state
        stale = self.switch("stale-klippy")
        if stale is not None:
            # Moonraker's last word from a connection that went stale (seen: `error` while
            # Klippy was ready again).
            connected, state = True, stale.strip() or "error"
        return {"klippy_connected": connected, "klippy_state": state,
                "components": COMPONENTS, "failed_components": [],
                "registered_directories": ["config", "logs", "gcodes", "config_examples", "docs"],
                "warnings": [], "websocket_count": 0, "moonraker_version": MOONRAKER_VERSION,
                "missing_klippy_requirements": [], "api_version": API_VERSION,
                "api_version_string": ".".join(str(v) for v in API_VERSION)}

    def printer_info(self, args):
        run = self.connected_run()
        home = os.path.dirname(self.klipper_path)
        info = {"state": run.state, "state_message": run.message,
                "hostname": socket.gethostname(), "klipper_path": self.klipper_path,
                "python_path": os.path.join(home, "klippy-env", "bin", "python"),
                "process_id": run.process_id, "user_id": os.getuid(), "group_id": os.getgid(),
                "log_file": os.path.join(home, "printer_data", "logs", "klippy.log"),
                "config_file": os.path.join(home, "printer_data", "config", "printer.cfg"),
                "software_version": run.host_version,
                "cpu_info": "%d core %s" % (os.cpu_count() or 1, platform.machine())}
        if self.app() == "Kalico":
            info["app"] = "Kalico"
        return info

    def objects_list(self, args):
        return {"objects": self.object_names(self.connected_run())}

    def objects_query(self, args):
        objects = args.get("objects")
        if not isinstance(objects, dict):
            raise ApiError(400, "Invalid argument 'objects'")
        run = self.connected_run()
        now = time.time()
        known = set(self.object_names(run))
        status = {}
        for name, fields in objects.items():
            if name not in known:
                continue  # Klippy omits unknown objects
            full = self.object_status(run, name, now)
            if fields is None:
                status[name] = full
            else:
                status[name] = {k: v for k, v in full.items() if k in fields}
        return {"eventtime": round(time.monotonic(), 6), "status": status}

    def service_action(self, action):
        def handler(args):
            svc = args.get("service")
            if not svc:
                raise ApiError(400, "No data for argument: service")
            if svc not in ALLOWED_SERVICES:
                raise ApiError(400, "Service '%s' not allowed" % svc)
            p = subprocess.run([os.path.join(HERE, "bin", "systemctl"), action, svc],
                               capture_output=True, text=True)
            if p.returncode != 0:
                raise ApiError(500, p.stderr.strip() or "systemctl %s failed" % action)
            return "ok"
        return handler

    def api_key(self, args):
        return (self.switch("api-key") or "").strip() or "0123456789abcdef0123456789abcdef"

    def methods(self):
        """JSON-RPC method -> (HTTP verb, HTTP path, handler, needs object parser)."""
        return {
            "server.info": ("GET", "/server/info", self.server_info, False),
            "printer.info": ("GET", "/printer/info", self.printer_info, False),
            "printer.objects.list": ("GET", "/printer/objects/list", self.objects_list, False),
            "printer.objects.query": ("GET", "/printer/objects/query", self.objects_query, True),
            "printer.firmware_restart": ("POST", "/printer/firmware_restart",
                                         lambda a: self.firmware_restart(), False),
            "printer.restart": ("POST", "/printer/restart",
                                lambda a: self.firmware_restart(), False),
            "machine.services.restart": ("POST", "/machine/services/restart",
                                         self.service_action("restart"), False),
            "machine.services.stop": ("POST", "/machine/services/stop",
                                      self.service_action("stop"), False),
            "machine.services.start": ("POST", "/machine/services/start",
                                       self.service_action("start"), False),
            "access.get_api_key": ("GET", "/access/api_key", self.api_key, False),
        }

    def jsonrpc(self, raw):
        """One JSON-RPC 2.0 request (text) -> response dict (or None for notifications)."""
        try:
            obj = json.loads(raw)
        except ValueError:
            return {"jsonrpc": "2.0", "error": {"code": -32700, "message": "Parse error"},
                    "id": None}
        req_id = obj.get("id") if isinstance(obj, dict) else None
        if not isinstance(obj, dict) or obj.get("jsonrpc") != "2.0":
            return {"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"},
                    "id": req_id}
        method = obj.get("method")
        params = obj.get("params", {})
        if method == "server.connection.identify":
            return {"jsonrpc": "2.0", "result": {"connection_id": id(obj) % 100000},
                    "id": req_id}
        entry = self.methods().get(method)
        if entry is None:
            return {"jsonrpc": "2.0", "error": {"code": -32601, "message": "Method not found"},
                    "id": req_id}
        if not isinstance(params, dict):
            return {"jsonrpc": "2.0", "error": {"code": -32602, "message": "Invalid params:"},
                    "id": req_id}
        try:
            result = entry[2](params)
        except ApiError as e:
            code = {404: -32601, 401: -32602}.get(e.code, e.code)
            return {"jsonrpc": "2.0", "error": {"code": code, "message": e.message},
                    "id": req_id}
        return None if req_id is None else {"jsonrpc": "2.0", "result": result, "id": req_id}


# ---------------------------------------------------------------------------
# HTTP

def fake_traceback(code, message):
    return ("Traceback (most recent call last):\n"
            "  File \"moonraker/components/application.py\", line 701, in "
            "_process_http_request\n    result = await self.api_defintion.request(\n"
            "tornado.web.HTTPError: HTTP %d: %s (%s)\n" % (code, message, message))


class HttpHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "TornadoServer/6.4.1"
    sys_version = ""
    rig = None  # set by serve()

    def version_string(self):
        return self.server_version

    def log_message(self, fmt, *args):
        log("%s %s" % (self.address_string(), fmt % args))

    def do_GET(self):
        self.dispatch("GET")

    def do_POST(self):
        self.dispatch("POST")

    def do_DELETE(self):
        self.dispatch("DELETE")

    def send_json(self, status, obj, reason=None):
        body = json.dumps(obj).encode()
        self.send_response(status, reason)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_error_envelope(self, code, message):
        err = {"code": code, "message": message, "traceback": fake_traceback(code, message)}
        self.send_json(code, {"error": err}, reason=message)

    def abort_connection(self):
        """Reset the TCP connection without an answer."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True

    def read_body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def dispatch(self, verb):
        rig = self.rig
        url = urllib.parse.urlsplit(self.path)
        body = self.read_body()
        if url.path.startswith("/_rig/"):
            return self.rig_control(verb, url.path)
        delay = rig.number("delay", 0.0)
        if delay:
            time.sleep(delay)  # simulated slow Moonraker
        if rig.switch("unreachable") is not None:
            return self.abort_connection()
        if rig.switch("stale-klippy") is not None and url.path.startswith("/printer/"):
            # The stale connection: the request is forwarded to a Klippy that never answers.
            time.sleep(STALE_HANG_SECS)
            return self.abort_connection()
        key = rig.switch("api-key")
        if key is not None and key.strip() and self.headers.get("X-Api-Key") != key.strip():
            return self.send_error_envelope(401, "Unauthorized")
        if rig.switch("forbidden") is not None:
            return self.send_forbidden()
        malformed = rig.switch("malformed")
        if malformed is not None:
            return self.send_malformed(malformed.strip() or "truncated")
        if url.path == "/server/jsonrpc" and verb == "POST":
            resp = rig.jsonrpc(body.decode("utf-8", "replace"))
            return self.send_json(200, resp)
        routes = [(v, h, op) for v, path, h, op in rig.methods().values() if path == url.path]
        if not routes:
            return self.send_error_envelope(404, "Not Found")
        # objects/query also takes a POST with a JSON body
        route = next((r for r in routes if r[0] == verb or (r[2] and verb == "POST")), None)
        if route is None:
            return self.send_error_envelope(405, "Method Not Allowed")
        args = {}
        if body and "json" in (self.headers.get("Content-Type") or ""):
            try:
                args = json.loads(body)
            except ValueError:
                return self.send_error_envelope(400, "Invalid JSON body")
        query = urllib.parse.parse_qsl(url.query, keep_blank_values=True)
        if route[2] and "objects" not in args:
            args = {"objects": {k: (v.split(",") if v else None)
                                for k, v in query if k not in EXCLUDED_ARGS}}
        else:
            for k, v in query:
                args.setdefault(k, v)
        try:
            result = route[1](args)
        except ApiError as e:
            return self.send_error_envelope(e.code, e.message)
        self.send_json(200, {"result": result})

    def send_forbidden(self):
        """A reverse proxy in front of Moonraker that denies this client (nginx `deny`)."""
        body = (b"<html>\r\n<head><title>403 Forbidden</title></head>\r\n<body>\r\n"
                b"<center><h1>403 Forbidden</h1></center>\r\n<hr><center>nginx/1.22.1</center>\r\n"
                b"</body>\r\n</html>\r\n")
        self.send_response(403)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_malformed(self, mode):
        if mode == "html":
            body, ctype, status = (b"<html><head><title>502 Bad Gateway</title></head><body>"
                                   b"<h1>502 Bad Gateway</h1></body></html>",
                                   "text/html", 502)
        elif mode == "empty":
            body, ctype, status = b"", "application/json; charset=UTF-8", 200
        elif mode == "no-result":
            body, ctype, status = b'{"status": "ok"}', "application/json; charset=UTF-8", 200
        else:
            body, ctype, status = (b'{"result": {"klippy_connected": true, "klippy_sta',
                                   "application/json; charset=UTF-8", 200)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def rig_control(self, verb, path):
        rig = self.rig
        if path == "/_rig/state" and verb == "GET":
            run, boards = rig.klippy()
            out = {"klippy_state": run.state, "state_message": run.message,
                   "ever_connected": rig.ever_connected, "boards": boards,
                   "pid": os.getpid()}
            if not isinstance(run, Disconnected):
                out.update(start=run.start, ready_at=run.ready_at,
                           host_version=run.host_version,
                           sections=[s for s, _ in run.sections or []],
                           identified=run.identified)
            return self.send_json(200, {"result": out})
        if path == "/_rig/exit" and verb == "POST":
            self.send_json(200, {"result": "ok"})
            self.wfile.flush()
            log("exiting on /_rig/exit")
            os._exit(0)
        return self.send_error_envelope(404, "Not Found")


class HttpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


# ---------------------------------------------------------------------------
# Unix socket (JSON-RPC, messages terminated by ETX 0x03, no authentication)

class UnixHandler(socketserver.BaseRequestHandler):
    rig = None

    def handle(self):
        buf = b""
        while True:
            try:
                data = self.request.recv(65536)
            except OSError:
                return
            if not data:
                return
            buf += data
            while b"\x03" in buf:
                msg, buf = buf.split(b"\x03", 1)
                if self.rig.switch("unreachable") is not None:
                    return
                malformed = self.rig.switch("malformed")
                if malformed is not None:
                    self.request.sendall(b'{"jsonrpc": "2.0", "resu\x03')
                    continue
                resp = self.rig.jsonrpc(msg.decode("utf-8", "replace"))
                if resp is not None:
                    self.request.sendall(json.dumps(resp).encode() + b"\x03")


class UnixServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True


# ---------------------------------------------------------------------------

def pid_running(pidfile):
    text = rigcommon.read_text(pidfile) if pidfile else None
    try:
        return text is not None and rigcommon.process_alive(int(text), "moonraker.py")
    except ValueError:
        return False


def main():
    ap = argparse.ArgumentParser(description="Moonraker stand-in for the kflash test rig")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7125, help="0 picks a free port")
    ap.add_argument("--unix-socket", help="also serve JSON-RPC on this Unix socket")
    ap.add_argument("--boards-json", help="static board status file (shape of "
                    "`kflash-boardsim ctl status --json`) instead of running kflash-boardsim")
    ap.add_argument("--mcu-map", help="JSON {section: board name}; default "
                    "$KFLASH_RIG_STATE/moonraker/mcus.json if present")
    ap.add_argument("--klipper-path", default=os.path.join(os.path.expanduser("~"), "klipper"))
    ap.add_argument("--app", choices=["Klipper", "Kalico"],
                    help="host app (default: detected from KLIPPER_PATH/klippy/__init__.py)")
    ap.add_argument("--startup-secs", type=float, default=1.0,
                    help="Klippy stays in 'startup' this long after a start")
    ap.add_argument("--connect-timeout", type=float, default=5.0,
                    help="seconds after a start before a missing MCU makes Klippy 'error'")
    ap.add_argument("--daemonize", action="store_true",
                    help="return once listening; the server keeps running in the background")
    ap.add_argument("--pidfile")
    ap.add_argument("--log", help="log file (default: stderr; with --daemonize "
                    "$KFLASH_RIG_STATE/moonraker/moonraker.log)")
    args = ap.parse_args()

    if args.daemonize and pid_running(args.pidfile):
        print("moonraker stand-in already running (pid %s)"
              % rigcommon.read_text(args.pidfile).strip())
        return 0
    rig = Rig(args)
    HttpHandler.rig = UnixHandler.rig = rig
    httpd = HttpServer((args.host, args.port), HttpHandler)
    port = httpd.server_address[1]
    usrv = None
    if args.unix_socket:
        os.makedirs(os.path.dirname(os.path.abspath(args.unix_socket)), exist_ok=True)
        try:
            os.unlink(args.unix_socket)
        except FileNotFoundError:
            pass
        usrv = UnixServer(args.unix_socket, UnixHandler)

    logfile = args.log
    if args.daemonize:
        logfile = logfile or os.path.join(rig.switch_dir, "moonraker.log")
        pid = os.fork()
        if pid:
            if args.pidfile:
                rigcommon.write_text(args.pidfile, "%d\n" % pid)
            print("READY %d" % port, flush=True)
            return 0
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
    if logfile:
        os.makedirs(os.path.dirname(os.path.abspath(logfile)), exist_ok=True)
        fd = os.open(logfile, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, 2)
        if args.daemonize:
            os.dup2(fd, 1)
    if not args.daemonize:
        if args.pidfile:
            rigcommon.write_text(args.pidfile, "%d\n" % os.getpid())
        print("READY %d" % port, flush=True)

    def stop(*_):
        raise SystemExit(0)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if usrv:
        threading.Thread(target=usrv.serve_forever, daemon=True).start()
    log("listening on %s:%d%s" % (args.host, port,
                                 " and %s" % args.unix_socket if usrv else ""))
    try:
        httpd.serve_forever(poll_interval=3600)
    finally:
        httpd.server_close()
        if usrv:
            usrv.server_close()
            try:
                os.unlink(args.unix_socket)
            except OSError:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
