#!/usr/bin/env python3
"""Host-side self-test of the kflash rig's printer-host stand-ins.

Real processes only: make + git on stand-in trees, the systemctl/sudo stand-ins
on a temporary state directory, and the Moonraker stand-in over real HTTP and a
real Unix socket with a static board-status file. Standard library only:

    python3 tests/rig/standins/selftest.py [-v] [TestClass[.test_name]]

Also run by `cargo test --test standins_selftest`.
"""
import sys
sys.dont_write_bytecode = True
import http.client
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
import unittest
import urllib.parse
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
SYSTEMCTL = os.path.join(HERE, "bin", "systemctl")
SUDO = os.path.join(HERE, "bin", "sudo")
MAKE_TREE = os.path.join(HERE, "make-klipper-tree")
MOONRAKER = os.path.join(HERE, "moonraker.py")
MAKE_KATAPULT = os.path.join(HERE, "make-katapult-tree")
FLASHTOOL = os.path.join(HERE, "katapult-tree", "scripts", "flashtool.py")

BOARDS = {"boards": [
    {"name": "octopus", "mcu": "stm32h723xx", "serial": "29001A001151313531383332",
     "mode": "klipper", "plugged": True, "version": "v0.13.0-3-gabc1234", "app": "Klipper"},
    {"name": "nhk", "mcu": "rp2040", "serial": "E661640843545B2E",
     "mode": "klipper", "plugged": True, "version": "v0.13.0-1-gdef5678", "app": "Klipper"},
]}


def run(cmd, env=None, check=True, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, **kw)
    if check and p.returncode != 0:
        raise AssertionError("%s failed (rc %d)\nstdout:\n%s\nstderr:\n%s"
                             % (cmd, p.returncode, p.stdout, p.stderr))
    return p


def read(path):
    with open(path) as f:
        return f.read()


def git(tree, *args):
    return run(["git", "-C", tree] + list(args)).stdout.strip()


def find_dict(image):
    """The embedded data dictionary, found like flashtool does: a zlib stream that
    decodes to JSON with an app of Klipper or Kalico."""
    pos = image.find(b"\x78\xda")
    while pos >= 0:
        try:
            data = zlib.decompressobj().decompress(image[pos:])
            obj = json.loads(data)
            if obj.get("app") in ("Klipper", "Kalico"):
                return data
        except (zlib.error, ValueError):
            pass
        pos = image.find(b"\x78\xda", pos + 1)
    return None


class Tmp(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="kflash-standins-")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def path(self, *parts):
        return os.path.join(self.tmp, *parts)


# ---------------------------------------------------------------------------
class KlipperTreeTest(Tmp):
    trees = {}

    @classmethod
    def setUpClass(cls):
        cls.base = tempfile.mkdtemp(prefix="kflash-trees-")
        for app in ("Klipper", "Kalico"):
            dest = os.path.join(cls.base, app)
            run([MAKE_TREE, dest, "--app", app, "--commits", "3"])
            cls.trees[app] = dest

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.base, True)

    def make(self, tree, *args, env_extra=None, check=True):
        env = dict(os.environ, RIG_BUILD_DELAY="0")
        env.pop("KCONFIG_CONFIG", None)
        env.update(env_extra or {})
        return run(["make", "-C", tree] + list(args), env=env, check=check)

    def configure(self, tree, cfg, mcu="stm32h723xx", sets=""):
        # OUT= too: like Klipper's, every make run remakes $(OUT)board-link.
        self.make(tree, "KCONFIG_CONFIG=" + cfg, "OUT=" + cfg + ".out/", "menuconfig",
                  env_extra={"RIG_MENUCONFIG_MCU": mcu, "RIG_MENUCONFIG_SET": sets})

    def assert_pristine(self, tree):
        self.assertEqual(run(["git", "-C", tree, "status", "--porcelain", "--ignored"]).stdout, "")

    def test_tree_history_and_describe(self):
        tree = self.trees["Klipper"]
        desc = git(tree, "describe", "--always", "--tags", "--long", "--dirty")
        self.assertRegex(desc, r"^v0\.13\.0-3-g[0-9a-f]{7,}$")
        self.assert_pristine(tree)
        # same arguments, same hashes
        again = self.path("again")
        run([MAKE_TREE, again, "--tag", "v0.13.0", "--commits", "3"])
        self.assertEqual(git(again, "rev-parse", "HEAD"), git(tree, "rev-parse", "HEAD"))
        other = self.path("other")
        out = run([MAKE_TREE, other, "--tag", "v0.12.0", "--commits", "0"]).stdout.strip()
        self.assertRegex(out, r"^v0\.12\.0-0-g[0-9a-f]+$")
        self.assertNotEqual(run([MAKE_TREE, other], check=False).returncode, 0)

    def test_out_of_tree_build(self):
        tree = self.trees["Klipper"]
        cfg, out = self.path("cfg", "octopus.config"), self.path("build", "octopus") + "/"
        self.configure(tree, cfg)
        with open(cfg) as f:
            cfg_text = f.read()
        self.assertIn('CONFIG_MCU="stm32h723xx"', cfg_text)
        self.assertIn("CONFIG_FLASH_APPLICATION_ADDRESS=0x8020000", cfg_text)
        self.assertIn("CONFIG_USBSERIAL=y", cfg_text)
        cfg_mtime = os.stat(cfg).st_mtime_ns
        p = self.make(tree, "KCONFIG_CONFIG=" + cfg, "OUT=" + out, "-j4")
        desc = git(tree, "describe", "--always", "--tags", "--long", "--dirty")
        self.assertIn("Version: %s\n" % desc, p.stdout)
        self.assert_pristine(tree)
        self.assertEqual(os.stat(cfg).st_mtime_ns, cfg_mtime)
        with open(cfg) as f:
            self.assertEqual(f.read(), cfg_text)
        self.assertFalse(os.path.exists(cfg + ".old"))

        with open(out + "klipper.dict", "rb") as f:
            raw = f.read()
        d = json.loads(raw)
        self.assertEqual(raw, json.dumps(d, separators=(",", ":"), sort_keys=True).encode())
        self.assertEqual(d["version"], desc)
        self.assertEqual(d["app"], "Klipper")
        self.assertEqual(d["license"], "GNU GPLv3")
        self.assertEqual(d["config"]["MCU"], "stm32h723xx")
        self.assertEqual(d["config"]["CLOCK_FREQ"], 520000000)
        self.assertEqual(d["commands"]["identify offset=%u count=%c"], 1)
        self.assertEqual(d["responses"]["identify_response offset=%u data=%.*s"], 0)
        # A realistic dictionary (scripts/rigdecls.json): klippy's bring-up commands and the
        # pin enumeration are there, ids are assigned as Klipper assigns them.
        self.assertGreater(len(d["commands"]), 100)
        self.assertGreaterEqual(len(d["responses"]), 25)
        self.assertEqual(d["commands"]["allocate_oids count=%c"], 2)
        for cmd in ("get_config", "finalize_config crc=%u", "get_uptime", "get_clock",
                    "emergency_stop", "reset"):
            self.assertIn(cmd, d["commands"])
        self.assertIn("config is_config=%c crc=%u is_shutdown=%c move_count=%hu", d["responses"])
        self.assertEqual(d["enumerations"]["pin"]["PA0"], [0, 16])
        self.assertEqual(d["config"]["RESERVE_PINS_USB"], "PA11,PA12")
        self.assertTrue(d["build_versions"].startswith("gcc: "))

        with open(out + "klipper.bin", "rb") as f:
            image = f.read()
        sp, reset = struct.unpack_from("<II", image)
        self.assertEqual((sp, reset), (0x20020000, 0x8020000 + 0x101))
        self.assertEqual(len(image) % 4, 0)
        self.assertGreater(len(image), 2 * 2048 + 64)
        self.assertEqual(image.count(b"\x78\xda"), 1)
        self.assertEqual(find_dict(image), raw)
        with open(out + "klipper.elf", "rb") as f:
            self.assertEqual(f.read(4), b"\x7fELF")

        # Deterministic: a second build elsewhere gives the same image.
        out2 = self.path("build", "again") + "/"
        self.make(tree, "KCONFIG_CONFIG=" + cfg, "OUT=" + out2)
        with open(out2 + "klipper.bin", "rb") as f:
            self.assertEqual(f.read(), image)
        # Incremental: nothing to do on a second run.
        p = self.make(tree, "KCONFIG_CONFIG=" + cfg, "OUT=" + out)
        self.assertNotIn("Compiling", p.stdout)
        self.make(tree, "KCONFIG_CONFIG=" + cfg, "OUT=" + out, "clean")
        self.assertFalse(os.path.exists(out))
        self.assert_pristine(tree)

    def test_clean_without_kconfig_config_creates_tree_config(self):
        # Like Klipper: the -include'd $(KCONFIG_CONFIG) has an olddefconfig rule, so
        # any make run without KCONFIG_CONFIG= creates <tree>/.config if it is missing.
        tree = self.path("t")
        run([MAKE_TREE, tree])
        out = self.path("o") + "/"
        os.makedirs(out)
        self.make(tree, "OUT=" + out, "clean")
        self.assertFalse(os.path.exists(out))
        self.assertEqual(run(["git", "-C", tree, "status", "--porcelain", "--ignored"]).stdout,
                         "!! .config\n")

    def test_any_make_run_without_out_changes_the_in_tree_build(self):
        # Like Klipper: $(OUT)board-link is an included makefile, so even menuconfig
        # creates out/ and repoints out/board at the config's board directory.
        tree = self.path("inout")
        run([MAKE_TREE, tree])
        rp, st = self.path("rp.config"), self.path("st.config")
        self.make(tree, "KCONFIG_CONFIG=" + rp, "menuconfig", env_extra={"RIG_MENUCONFIG_MCU": "rp2040"})
        self.assertEqual(os.readlink(os.path.join(tree, "out", "board")),
                         os.path.join(tree, "src", "rp2040"))
        self.make(tree, "KCONFIG_CONFIG=" + st, "menuconfig", env_extra={"RIG_MENUCONFIG_MCU": "stm32h723xx"})
        self.assertEqual(os.readlink(os.path.join(tree, "out", "board")),
                         os.path.join(tree, "src", "stm32"))
        # With OUT= elsewhere the tree's out/ is left alone.
        os.utime(st)
        self.make(tree, "KCONFIG_CONFIG=" + st, "OUT=" + self.path("elsewhere") + "/", "menuconfig")
        self.assertTrue(os.path.islink(self.path("elsewhere", "board")))

    def test_kconfig_update_migrates_in_place_with_warnings(self):
        # A config older than src/Kconfig is rewritten by olddefconfig before any goal;
        # new options get their default, removed ones are dropped, bad values warned about.
        tree = self.path("mig")
        run([MAKE_TREE, tree])
        cfg, out = self.path("mig.config"), self.path("migo") + "/"
        self.configure(tree, cfg)
        with open(cfg) as f:
            text = f.read()
        with open(cfg, "w") as f:
            f.write(text.replace("CONFIG_STACK_SIZE=512", "CONFIG_STACK_SIZE=zz"))
        kc = os.path.join(tree, "src", "Kconfig")
        with open(kc) as f:
            k = f.read().replace("config WANT_LIS2DW", "config WANT_LIS2DW_GONE")
        with open(kc, "w") as f:
            f.write(k + "\nconfig WANT_NEW_THING\n    bool \"new\"\n    default y\n")
        os.utime(cfg, (1, 1))
        p = self.make(tree, "KCONFIG_CONFIG=" + cfg, "OUT=" + out, "olddefconfig")
        self.assertIn("warning: the value 'zz' is invalid for STACK_SIZE", p.stderr)
        with open(cfg) as f:
            new = f.read()
        self.assertIn("CONFIG_WANT_NEW_THING=y", new)
        self.assertIn("CONFIG_WANT_LIS2DW_GONE=y", new)
        self.assertNotIn("CONFIG_WANT_LIS2DW=", new)
        self.assertIn("CONFIG_STACK_SIZE=512", new)
        with open(cfg + ".old") as f:
            self.assertIn("CONFIG_STACK_SIZE=zz", f.read())

    def test_missing_config_fails_clearly(self):
        tree = self.trees["Klipper"]
        cfg = self.path("nope.config")
        p = self.make(tree, "KCONFIG_CONFIG=" + cfg, "OUT=" + self.path("o") + "/", check=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("configuration file '%s' does not exist" % cfg, p.stderr)
        self.assertFalse(os.path.exists(self.path("o")))
        self.assert_pristine(tree)

    def test_dirty_tree_version_gets_timestamp(self):
        tree = self.path("dirty")
        run([MAKE_TREE, tree, "--commits", "1"])
        with open(os.path.join(tree, "README.md"), "a") as f:
            f.write("local change\n")
        cfg, out = self.path("c.config"), self.path("o") + "/"
        self.configure(tree, cfg)
        self.make(tree, "KCONFIG_CONFIG=" + cfg, "OUT=" + out)
        with open(out + "klipper.dict") as f:
            version = json.load(f)["version"]
        self.assertRegex(version, r"^v0\.13\.0-1-g[0-9a-f]+-dirty-\d{8}_\d{6}-%s$"
                         % re.escape(socket.gethostname()))

    def test_kconfig_env_klipper_ignores_kalico_honours(self):
        for app, honoured in (("Klipper", False), ("Kalico", True)):
            tree = self.path(app)
            run([MAKE_TREE, tree, "--app", app])
            cfg = self.path(app + ".config")
            self.make(tree, "menuconfig", env_extra={"KCONFIG_CONFIG": cfg})
            self.assertEqual(os.path.exists(cfg), honoured, app)
            self.assertEqual(os.path.exists(os.path.join(tree, ".config")), not honoured, app)

    def test_kalico_tree(self):
        tree = self.trees["Kalico"]
        self.assertRegex(git(tree, "describe", "--tags", "--long"), r"^v2026\.07\.00-3-g")
        cfg, out = self.path("k.config"), self.path("ko") + "/"
        self.configure(tree, cfg, mcu="stm32f446xx")
        self.make(tree, "KCONFIG_CONFIG=" + cfg, "OUT=" + out, "-j2")
        with open(out + "klipper.dict") as f:
            d = json.load(f)
        self.assertEqual(d["app"], "Kalico")
        self.assertEqual(d["config"]["MCU"], "stm32f446xx")
        with open(out + "klipper.bin", "rb") as f:
            self.assertEqual(struct.unpack_from("<II", f.read()), (0x20020000, 0x8008101))
        # Kalico rewrites git-ignored files in the tree at parse time; git stays clean.
        self.assertTrue(os.path.exists(os.path.join(tree, "src", "extras", "Kconfig")))
        self.assertEqual(run(["git", "-C", tree, "status", "--porcelain"]).stdout, "")

    def test_rp2040_bin_and_uf2(self):
        tree = self.trees["Klipper"]
        cfg, out = self.path("rp.config"), self.path("rp") + "/"
        self.configure(tree, cfg, mcu="rp2040")
        self.make(tree, "KCONFIG_CONFIG=" + cfg, "OUT=" + out)
        with open(out + "klipper.bin", "rb") as f:
            image = f.read()
        self.assertEqual(struct.unpack_from("<II", image), (0x20020000, 0x10004101))
        self.assertEqual(json.loads(find_dict(image))["config"]["MCU"], "rp2040")
        # No bootloader: klipper.uf2 instead of klipper.bin, as in Klipper.
        cfg2, out2 = self.path("rp0.config"), self.path("rp0") + "/"
        self.configure(tree, cfg2, mcu="rp2040", sets="CONFIG_RPXXXX_FLASH_START_0100=y")
        with open(cfg2) as f:
            text = f.read()
        self.assertIn("CONFIG_FLASH_APPLICATION_ADDRESS=0x10000100", text)
        self.assertIn("# CONFIG_RPXXXX_FLASH_START_4000 is not set", text)
        self.make(tree, "KCONFIG_CONFIG=" + cfg2, "OUT=" + out2)
        self.assertFalse(os.path.exists(out2 + "klipper.bin"))
        with open(out2 + "klipper.uf2", "rb") as f:
            uf2 = f.read()
        self.assertEqual(len(uf2) % 512, 0)
        magic0, magic1, flags, addr = struct.unpack_from("<IIII", uf2)
        self.assertEqual((magic0, magic1, addr), (0x0A324655, 0x9E5D5157, 0x10000000))

    def test_menuconfig_set_and_olddefconfig(self):
        tree = self.trees["Klipper"]
        cfg = self.path("m.config")
        self.configure(tree, cfg, sets='CONFIG_MCU="stm32f446xx" CONFIG_USBCANBUS=y')
        with open(cfg) as f:
            text = f.read()
        self.assertIn("CONFIG_MACH_STM32F446=y", text)
        self.assertIn("CONFIG_FLASH_APPLICATION_ADDRESS=0x8008000", text)
        self.assertIn("CONFIG_USBCANBUS=y", text)
        self.assertIn("# CONFIG_USBSERIAL is not set", text)
        self.assertIn("CONFIG_CANBUS_FREQUENCY=1000000", text)
        self.assertTrue(os.path.exists(cfg + ".old"))
        # An existing config without changes is only touched.
        p = self.make(tree, "KCONFIG_CONFIG=" + cfg, "OUT=" + self.path("od") + "/", "olddefconfig")
        self.assertIn("No change to configuration in '%s'" % cfg, p.stdout)
        # A partial config is completed by olddefconfig.
        part = self.path("part.config")
        with open(part, "w") as f:
            f.write('CONFIG_MCU="stm32g0b1xx"\n')
        p = self.make(tree, "KCONFIG_CONFIG=" + part, "OUT=" + self.path("od") + "/", "olddefconfig")
        self.assertIn("Configuration saved to '%s'" % part, p.stdout)
        with open(part) as f:
            self.assertIn("CONFIG_FLASH_APPLICATION_ADDRESS=0x8002000", f.read())
        self.assert_pristine(tree)

    def test_make_flash(self):
        tree = self.trees["Klipper"]
        cfg, out = self.path("f.config"), self.path("fo") + "/"
        self.configure(tree, cfg)
        # a device that is not a USB tty: flash_usb.py fails like Klipper's (after the build)
        p = self.make(tree, "KCONFIG_CONFIG=" + cfg, "OUT=" + out, "FLASH_DEVICE=" + self.path("nodev"),
                      "flash", check=False)
        self.assertEqual(p.returncode, 2)
        self.assertIn("Creating bin file %sklipper.bin" % out, p.stdout)
        self.assertRegex(p.stderr, r"Failed to flash to %s: Unable to find (serial 'by-path' folder|"
                         "tty device)" % re.escape(self.path("nodev")))
        self.assertIn("make flash FLASH_DEVICE=0483:df11", p.stderr)
        self.assert_pristine(tree)
        # Klipper's stm32 command line; rp2040 has no -s; no bootloader flashes the uf2
        p = self.make(tree, "-n", "KCONFIG_CONFIG=" + cfg, "OUT=" + out, "FLASH_DEVICE=/dev/x",
                      "flash")
        self.assertIn('./scripts/flash_usb.py -t "stm32h723xx" -d "/dev/x" -s "0x8020000"  %sklipper.bin'
                      % out, p.stdout)
        for sets, image in (("", "klipper.bin"), ("CONFIG_RPXXXX_FLASH_START_0100=y", "klipper.uf2")):
            rcfg, rout = self.path("rp%d.config" % len(sets)), self.path("ro%d" % len(sets)) + "/"
            self.configure(tree, rcfg, mcu="rp2040", sets=sets)
            self.make(tree, "KCONFIG_CONFIG=" + rcfg, "OUT=" + rout)
            p = self.make(tree, "-n", "KCONFIG_CONFIG=" + rcfg, "OUT=" + rout,
                          "FLASH_DEVICE=/dev/x", "NOSUDO=1", "flash")
            self.assertIn('./scripts/flash_usb.py -t "rp2040" -d "/dev/x"  --no-sudo %s%s'
                          % (rout, image), p.stdout)
        self.assert_pristine(tree)

    def test_flash_usb_cli(self):
        script = os.path.join(self.trees["Klipper"], "scripts", "flash_usb.py")
        fw = self.path("klipper.bin")
        p = run([sys.executable, script, "-t", "stm32h723xx", "-d", "/dev/x"], check=False)
        self.assertEqual(p.returncode, 2)
        self.assertIn("error: Incorrect number of arguments", p.stderr)
        p = run([sys.executable, script, "-t", "atmega2560", "-d", "/dev/x", fw], check=False)
        self.assertEqual(p.returncode, 2)
        self.assertIn("USB flashing is not supported for MCU 'atmega2560'", p.stderr)
        p = run([sys.executable, script, "-t", "rp2040", fw], check=False)
        self.assertEqual((p.returncode, p.stderr), (255, "\nPlease specify FLASH_DEVICE\n\n"))
        # a board already in its ROM bootloader would need dfu-util: not in the rig
        p = run([sys.executable, script, "-t", "stm32f446xx", "-d", "0483:df11", "-s", "0x8000000",
                 "--no-sudo", fw], check=False)
        self.assertEqual(p.returncode, 255)
        self.assertIn("dfu-util -d ,0483:df11 -R -a 0 -s 0x8000000:leave -D %s" % fw, p.stderr)
        self.assertIn("Failed to flash to 0483:df11: Error running dfu-util", p.stderr)

    def test_parallel_boards(self):
        tree = self.trees["Klipper"]
        procs = []
        for name, mcu in (("a", "stm32h723xx"), ("b", "rp2040"), ("c", "stm32f103xe")):
            cfg = self.path(name + ".config")
            self.configure(tree, cfg, mcu=mcu)
            env = dict(os.environ, RIG_BUILD_DELAY="0.01")
            procs.append((mcu, self.path(name) + "/", subprocess.Popen(
                ["make", "-C", tree, "KCONFIG_CONFIG=" + cfg, "OUT=" + self.path(name) + "/",
                 "-j2"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
        for mcu, out, p in procs:
            self.assertEqual(p.wait(), 0, p.stderr.read())
            p.stderr.close()
            with open(out + "klipper.dict") as f:
                self.assertEqual(json.load(f)["config"]["MCU"], mcu)
        self.assert_pristine(tree)


# ---------------------------------------------------------------------------
class ServicesTest(Tmp):
    def setUp(self):
        super().setUp()
        self.env = dict(os.environ, KFLASH_RIG_STATE=self.path("state"),
                        KFLASH_RIG_BOARDS_JSON=self.path("boards.json"))
        with open(self.path("boards.json"), "w") as f:
            json.dump(BOARDS, f)

    def ctl(self, *args, check=False):
        return run([SYSTEMCTL] + list(args), env=self.env, check=check)

    def log_lines(self):
        with open(self.path("state", "systemctl.log")) as f:
            return [line.split() for line in f]

    def test_unit_file_enable_disable(self):
        units = self.path("units")
        os.makedirs(units)
        with open(os.path.join(units, "kflash.service"), "w") as f:
            f.write("[Service]\nType=notify\nExecStart=/usr/local/bin/kflash daemon\n"
                    "[Install]\nWantedBy=multi-user.target\n")
        env = dict(self.env, KFLASH_RIG_UNIT_DIR=units)
        ctl = lambda *a: run([SYSTEMCTL] + list(a), env=env, check=False)  # noqa: E731
        link = os.path.join(units, "multi-user.target.wants", "kflash.service")
        self.assertEqual((ctl("is-enabled", "kflash").returncode, ctl("is-enabled", "kflash").stdout),
                         (1, "disabled\n"))
        self.assertEqual(ctl("daemon-reload").returncode, 0)
        p = ctl("enable", "--now", "kflash.service")
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("Created symlink " + link, p.stderr)
        self.assertIn("is not run", p.stderr)
        self.assertEqual(os.readlink(link), os.path.join(units, "kflash.service"))
        self.assertEqual(ctl("is-enabled", "kflash").stdout, "enabled\n")
        self.assertEqual(ctl("is-active", "kflash").returncode, 3)  # never pretends to run it
        p = ctl("disable", "--now", "kflash")
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertFalse(os.path.lexists(link))
        self.assertFalse(os.path.exists(os.path.dirname(link)))
        self.assertEqual([w[1:] for w in self.log_lines()],
                         [["daemon-reload", "-"], ["enable", "kflash"], ["start-not-run", "kflash"],
                          ["disable", "kflash"], ["stop", "kflash"]])
        self.assertEqual(ctl("enable", "nosuch").returncode, 1)

    def test_stop_start_log_and_state(self):
        self.ctl("rig-register", "klipper", "active", check=True)
        self.assertFalse(os.path.exists(self.path("state", "systemctl.log")))
        p = self.ctl("is-active", "klipper")
        self.assertEqual((p.returncode, p.stdout), (0, "active\n"))
        since0 = read(self.path("state", "services", "klipper.since"))
        self.assertEqual(self.ctl("stop", "klipper.service").returncode, 0)
        p = self.ctl("is-active", "klipper")
        self.assertEqual((p.returncode, p.stdout), (3, "inactive\n"))
        self.assertEqual(self.ctl("--quiet", "is-active", "klipper").stdout, "")
        self.assertEqual(self.ctl("status", "klipper").returncode, 3)
        self.assertEqual(run([SUDO, "-n", SYSTEMCTL, "start", "klipper"], env=self.env).returncode, 0)
        self.assertEqual(self.ctl("status", "klipper").returncode, 0)
        self.assertNotEqual(read(self.path("state", "services", "klipper.since")), since0)
        self.assertEqual(self.ctl("restart", "klipper").returncode, 0)
        self.assertEqual(self.ctl("show", "-p", "ActiveState", "--value", "klipper").stdout,
                         "active\n")
        lines = self.log_lines()
        self.assertEqual([(v, u) for _, v, u in lines],
                         [("stop", "klipper"), ("start", "klipper"), ("restart", "klipper")])
        stamps = [t for t, _, _ in lines]
        for t in stamps:
            self.assertRegex(t, r"^\d{10}\.\d{9}$")
        self.assertEqual(stamps, sorted(stamps))
        self.assertEqual(read(self.path("state", "services", "klipper")), "active\n")

    def test_faults_and_unknown_units(self):
        self.ctl("rig-register", "klipper", "active", check=True)
        os.makedirs(self.path("state", "faults"))
        open(self.path("state", "faults", "systemctl-stop-fails"), "w").close()
        p = self.ctl("stop", "klipper")
        self.assertEqual(p.returncode, 1)
        self.assertIn("Job for klipper.service failed", p.stderr)
        self.assertEqual(self.ctl("is-active", "klipper").returncode, 0)
        os.unlink(self.path("state", "faults", "systemctl-stop-fails"))
        with open(self.path("state", "faults", "systemctl-start-fails"), "w") as f:
            f.write("klipper\n")
        self.assertEqual(self.ctl("stop", "klipper").returncode, 0)
        self.assertEqual(self.ctl("start", "klipper").returncode, 1)
        self.assertEqual(self.ctl("is-active", "klipper").returncode, 3)
        self.assertEqual([v for _, v, _ in self.log_lines()], ["stop-failed", "stop", "start-failed"])
        self.assertEqual(self.ctl("stop", "nosuch").returncode, 5)
        self.assertEqual(self.ctl("status", "nosuch").returncode, 4)
        self.assertEqual(self.ctl("is-active", "nosuch").returncode, 3)

    def test_holds_ttys_switch(self):
        os.makedirs(self.path("state", "switches"))
        open(self.path("state", "switches", "holds-ttys"), "w").close()
        self.ctl("rig-register", "klipper", "active", check=True)
        holder = self.path("state", "services", "klipper.holder")
        pid = int(read(holder))
        self.assertIn(b"ttyholder.py", open("/proc/%d/cmdline" % pid, "rb").read())
        # `systemctl status PID` names the unit (Katapult's flashtool asks this way)
        st = self.ctl("status", str(pid))
        self.assertEqual(st.returncode, 0)
        self.assertEqual(st.stdout.split(maxsplit=2)[1], "klipper.service")
        st = self.ctl("status", "999999999")
        self.assertEqual(st.returncode, 1)
        self.assertIn("does not belong to any loaded unit", st.stderr)
        self.assertEqual(self.ctl("stop", "klipper").returncode, 0)
        self.assertFalse(os.path.exists(holder))
        self.assertFalse(os.path.exists("/proc/%d" % pid) and
                         open("/proc/%d/stat" % pid).read().split(") ")[1][0] != "Z")

    def test_sudo(self):
        self.assertEqual(run([SUDO, "-n", "true"]).returncode, 0)
        self.assertEqual(run([SUDO, "-n", "-u", "root", "-E", "--", "echo", "hi"]).stdout, "hi\n")
        self.assertEqual(run([SUDO, "-n", "false"], check=False).returncode, 1)
        self.assertNotEqual(run([SUDO], check=False).returncode, 0)


# ---------------------------------------------------------------------------
class Moonraker:
    """A Moonraker stand-in process on a free port."""

    def __init__(self, env, extra=()):
        self.proc = subprocess.Popen(
            [sys.executable, MOONRAKER, "--port", "0"] + list(extra),
            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            raise AssertionError("moonraker stand-in did not start: %r" % line)
        self.port = int(line.split()[1])

    def request(self, method, path, body=None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            hdrs = dict(headers or {})
            data = None
            if body is not None:
                data = json.dumps(body)
                hdrs["Content-Type"] = "application/json"
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            return resp.status, resp.read(), resp
        finally:
            conn.close()

    def get(self, path, **kw):
        status, raw, _ = self.request("GET", path, **kw)
        return status, json.loads(raw)

    def post(self, path, body=None):
        status, raw, _ = self.request("POST", path, body=body)
        return status, json.loads(raw)

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc.stdout.close()


class MoonrakerTest(Tmp):
    SERVER_INFO_KEYS = {"klippy_connected", "klippy_state", "components", "failed_components",
                        "registered_directories", "warnings", "websocket_count",
                        "moonraker_version", "missing_klippy_requirements", "api_version",
                        "api_version_string"}
    PRINTER_INFO_KEYS = {"state", "state_message", "hostname", "klipper_path", "python_path",
                         "process_id", "user_id", "group_id", "log_file", "config_file",
                         "software_version", "cpu_info"}

    @classmethod
    def setUpClass(cls):
        cls.treebase = tempfile.mkdtemp(prefix="kflash-mr-")
        cls.tree = os.path.join(cls.treebase, "klipper")
        run([MAKE_TREE, cls.tree, "--commits", "2"])
        cls.host_version = git(cls.tree, "describe", "--always", "--tags", "--long", "--dirty")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.treebase, True)

    def setUp(self):
        super().setUp()
        self.state = self.path("state")
        self.env = dict(os.environ, KFLASH_RIG_STATE=self.state)
        self.boards_file = self.path("boards.json")
        self.write_boards(BOARDS)
        self.ctl("rig-register", "klipper", "active")
        self.switch("startup-secs", "0")
        self.switch("connect-timeout", "0")

    def ctl(self, *args):
        return run([SYSTEMCTL] + list(args), env=self.env)

    def write_boards(self, boards):
        with open(self.boards_file + ".tmp", "w") as f:
            json.dump(boards, f)
        os.replace(self.boards_file + ".tmp", self.boards_file)

    def switch(self, name, text=""):
        os.makedirs(os.path.join(self.state, "moonraker"), exist_ok=True)
        with open(os.path.join(self.state, "moonraker", name), "w") as f:
            f.write(text)

    def unswitch(self, name):
        os.unlink(os.path.join(self.state, "moonraker", name))

    def start(self, *extra):
        m = Moonraker(self.env, ["--boards-json", self.boards_file, "--klipper-path", self.tree]
                      + list(extra))
        self.addCleanup(m.close)
        return m

    def assert_error(self, resp, code, message):
        status, body = resp
        self.assertEqual(status, code)
        self.assertEqual(set(body), {"error"})
        self.assertEqual(set(body["error"]), {"code", "message", "traceback"})
        self.assertEqual((body["error"]["code"], body["error"]["message"]), (code, message))

    def test_ready_shapes(self):
        m = self.start()
        status, body = m.get("/server/info")
        self.assertEqual(status, 200)
        self.assertEqual(set(body), {"result"})
        info = body["result"]
        self.assertEqual(set(info), self.SERVER_INFO_KEYS)
        self.assertEqual((info["klippy_connected"], info["klippy_state"]), (True, "ready"))
        self.assertEqual(info["api_version"], [1, 5, 0])

        status, body = m.get("/printer/info")
        self.assertEqual(set(body["result"]), self.PRINTER_INFO_KEYS)
        self.assertEqual(body["result"]["state"], "ready")
        self.assertEqual(body["result"]["state_message"], "Printer is ready")
        self.assertEqual(body["result"]["software_version"], self.host_version)
        self.assertEqual(body["result"]["klipper_path"], self.tree)

        status, body = m.get("/printer/objects/list")
        objects = body["result"]["objects"]
        self.assertEqual([o for o in objects if o == "mcu" or o.startswith("mcu ")],
                         ["mcu", "mcu nhk"])
        for o in ("webhooks", "print_stats", "virtual_sdcard", "configfile"):
            self.assertIn(o, objects)

        status, body = m.get("/printer/objects/query?webhooks&print_stats=state,filename"
                             "&virtual_sdcard=progress&mcu&mcu%20nhk=mcu_version&nosuch"
                             "&configfile=config,settings")
        self.assertEqual(status, 200)
        res = body["result"]
        self.assertEqual(set(res), {"eventtime", "status"})
        st = res["status"]
        self.assertEqual(set(st), {"webhooks", "print_stats", "virtual_sdcard", "mcu",
                                   "mcu nhk", "configfile"})
        self.assertEqual(st["webhooks"], {"state": "ready", "state_message": "Printer is ready"})
        self.assertEqual(st["print_stats"], {"state": "standby", "filename": ""})
        self.assertEqual(st["virtual_sdcard"], {"progress": 0.0})
        self.assertEqual(st["mcu nhk"], {"mcu_version": "v0.13.0-1-gdef5678"})
        mcu = st["mcu"]
        self.assertEqual(set(mcu), {"mcu_version", "mcu_build_versions", "mcu_constants",
                                    "last_stats"})
        self.assertEqual(mcu["mcu_version"], "v0.13.0-3-gabc1234")
        self.assertEqual(mcu["mcu_constants"]["MCU"], "stm32h723xx")
        self.assertEqual(mcu["mcu_constants"]["CLOCK_FREQ"], 520000000)
        self.assertIn("freq", mcu["last_stats"])
        cfg = st["configfile"]
        self.assertEqual(cfg["config"]["mcu"]["serial"],
                         "/dev/serial/by-id/usb-Klipper_stm32h723xx_29001A001151313531383332-if00")
        self.assertEqual(cfg["config"]["mcu nhk"]["serial"],
                         "/dev/serial/by-id/usb-Klipper_rp2040_E661640843545B2E-if00")
        self.assertEqual(cfg["settings"]["mcu nhk"]["baud"], 250000)

        # "+" for a space, and the POST form with a JSON body
        status, body = m.get("/printer/objects/query?mcu+nhk=mcu_constants")
        self.assertEqual(body["result"]["status"]["mcu nhk"]["mcu_constants"]["MCU"], "rp2040")
        status, body = m.post("/printer/objects/query",
                              {"objects": {"mcu": ["mcu_version"], "webhooks": None}})
        self.assertEqual(body["result"]["status"]["mcu"], {"mcu_version": "v0.13.0-3-gabc1234"})

        self.assert_error(m.get("/no/such/endpoint"), 404, "Not Found")
        self.assert_error(m.get("/printer/firmware_restart"), 405, "Method Not Allowed")
        self.assertEqual(m.post("/printer/firmware_restart"), (200, {"result": "ok"}))

    def test_versions_read_fresh_and_mapping(self):
        m = self.start()
        boards = json.loads(json.dumps(BOARDS))
        boards["boards"][0]["version"] = "v0.13.0-9-g9999999"
        self.write_boards(boards)
        self.ctl("restart", "klipper")
        self.assertEqual(m.get("/printer/objects/query?mcu=mcu_version")[1]["result"]["status"],
                         {"mcu": {"mcu_version": "v0.13.0-9-g9999999"}})
        self.switch("mcus.json", json.dumps({"mcu": "nhk", "mcu octo": "octopus"}))
        self.ctl("restart", "klipper")
        self.assertEqual(m.get("/printer/objects/list")[1]["result"]["objects"][2:4],
                         ["mcu", "mcu octo"])
        st = m.get("/printer/objects/query?mcu=mcu_version&mcu%20octo=mcu_version")[1]
        self.assertEqual(st["result"]["status"], {"mcu": {"mcu_version": "v0.13.0-1-gdef5678"},
                                                  "mcu octo": {"mcu_version": "v0.13.0-9-g9999999"}})

    def test_boardsim_status_list_shape(self):
        # kflash-boardsim prints a bare list with more fields; both shapes are accepted.
        boards = json.loads(json.dumps(BOARDS["boards"]))
        boards[0].update(product="stm32f446xx", manufacturer="Klipper", usb="1d50:614e",
                         by_id="/dev/serial/by-id/x", rebooting_to=None)
        self.write_boards(boards)
        m = self.start()
        st = m.get("/printer/objects/query?mcu=mcu_constants")[1]["result"]["status"]
        self.assertEqual(st["mcu"]["mcu_constants"]["MCU"], "stm32f446xx")
        # a board about to reboot does not count as connected
        boards[1]["rebooting_to"] = "katapult"
        self.write_boards(boards)
        self.ctl("restart", "klipper")
        self.assertEqual(m.get("/server/info")[1]["result"]["klippy_state"], "error")

    def test_klippy_follows_systemctl(self):
        m = self.start()
        self.assertEqual(m.get("/server/info")[1]["result"]["klippy_state"], "ready")
        self.ctl("stop", "klipper")
        info = m.get("/server/info")[1]["result"]
        self.assertEqual((info["klippy_connected"], info["klippy_state"]), (False, "disconnected"))
        for path in ("/printer/info", "/printer/objects/list", "/printer/objects/query?webhooks"):
            self.assert_error(m.get(path), 503, "Klippy Host not connected")
        self.assert_error(m.post("/printer/firmware_restart"), 503, "Klippy Host not connected")
        # Klippy's startup phase after a start
        self.switch("startup-secs", "60")
        self.ctl("start", "klipper")
        info = m.get("/printer/info")[1]["result"]
        self.assertEqual(info["state"], "startup")
        self.assertTrue(info["state_message"].startswith("Printer is not ready"))
        st = m.get("/printer/objects/query?mcu")[1]["result"]["status"]
        self.assertEqual(st, {"mcu": {}})
        self.switch("startup-secs", "0")
        self.assertEqual(m.get("/server/info")[1]["result"]["klippy_state"], "ready")
        # klippy-disconnected switch
        self.switch("klippy-disconnected")
        self.assertEqual(m.get("/server/info")[1]["result"]["klippy_connected"], False)
        self.assert_error(m.get("/printer/info"), 503, "Klippy Host not connected")
        self.unswitch("klippy-disconnected")
        self.assertEqual(m.get("/server/info")[1]["result"]["klippy_state"], "ready")

    def test_never_connected_gives_404(self):
        self.ctl("stop", "klipper")
        m = self.start()
        self.assertEqual(m.get("/server/info")[1]["result"]["klippy_state"], "disconnected")
        self.assert_error(m.get("/printer/info"), 404, "Not Found")
        self.assert_error(m.post("/printer/firmware_restart"), 503, "Klippy Host not connected")

    def test_mcu_error_and_shutdown(self):
        m = self.start()
        self.assertEqual(m.get("/server/info")[1]["result"]["klippy_state"], "ready")
        boards = json.loads(json.dumps(BOARDS))
        boards["boards"][1]["mode"] = "katapult"
        self.write_boards(boards)
        # ready -> shutdown when a board leaves Klipper mode
        info = m.get("/printer/info")[1]["result"]
        self.assertEqual(info["state"], "shutdown")
        self.assertTrue(info["state_message"].startswith("Lost communication with MCU 'nhk'\n"))
        self.assertEqual(m.get("/server/info")[1]["result"]["klippy_state"], "shutdown")
        # start with a board missing -> error
        self.ctl("restart", "klipper")
        info = m.get("/printer/info")[1]["result"]
        self.assertEqual(info["state"], "error")
        self.assertTrue(info["state_message"].startswith("mcu 'nhk': Unable to connect\n"))
        self.assertTrue(info["state_message"].endswith("Error configuring printer\n"))
        st = m.get("/printer/objects/query?mcu=mcu_version&mcu%20nhk&webhooks=state")[1]
        self.assertEqual(st["result"]["status"], {"mcu": {"mcu_version": "v0.13.0-3-gabc1234"},
                                                  "mcu nhk": {}, "webhooks": {"state": "error"}})
        # the error stays until a restart, even once the board is back
        self.write_boards(BOARDS)
        self.assertEqual(m.get("/server/info")[1]["result"]["klippy_state"], "error")
        self.assertEqual(m.post("/printer/firmware_restart"), (200, {"result": "ok"}))
        self.assertEqual(m.get("/server/info")[1]["result"]["klippy_state"], "ready")
        # within the connect timeout Klippy keeps trying ("startup")
        self.switch("connect-timeout", "60")
        boards["boards"][1]["mode"] = "absent"
        self.write_boards(boards)
        self.ctl("restart", "klipper")
        self.assertEqual(m.get("/server/info")[1]["result"]["klippy_state"], "startup")
        self.write_boards(BOARDS)
        self.assertEqual(m.get("/server/info")[1]["result"]["klippy_state"], "ready")

    def test_unplugged_boards_are_not_configured(self):
        boards = json.loads(json.dumps(BOARDS))
        boards["boards"][0].update(plugged=False, mode="absent")
        self.write_boards(boards)
        m = self.start()
        self.assertEqual(m.get("/server/info")[1]["result"]["klippy_state"], "ready")
        objects = m.get("/printer/objects/list")[1]["result"]["objects"]
        self.assertEqual([o for o in objects if o.startswith("mcu")], ["mcu"])
        st = m.get("/printer/objects/query?mcu=mcu_constants")[1]["result"]["status"]
        self.assertEqual(st["mcu"]["mcu_constants"]["MCU"], "rp2040")
        # named in mcus.json, an unplugged board is configured and Klippy cannot connect
        self.switch("mcus.json", json.dumps({"mcu": "octopus", "mcu nhk": "nhk"}))
        self.ctl("restart", "klipper")
        info = m.get("/printer/info")[1]["result"]
        self.assertEqual(info["state"], "error")
        self.assertTrue(info["state_message"].startswith("mcu 'mcu': Unable to connect"))

    def test_print_switches(self):
        m = self.start()
        q = "/printer/objects/query?print_stats=state,filename&virtual_sdcard=progress,is_active"
        self.switch("printing", "cube.gcode\n0.25\n")
        st = m.get(q)[1]["result"]["status"]
        self.assertEqual(st, {"print_stats": {"state": "printing", "filename": "cube.gcode"},
                              "virtual_sdcard": {"progress": 0.25, "is_active": True}})
        self.switch("paused")
        st = m.get(q)[1]["result"]["status"]
        self.assertEqual(st["print_stats"], {"state": "paused", "filename": "benchy.gcode"})
        self.assertEqual(st["virtual_sdcard"], {"progress": 0.42, "is_active": False})
        self.unswitch("paused")
        self.unswitch("printing")
        self.switch("print-state", "complete\ncube.gcode\n1.0\n")
        st = m.get(q)[1]["result"]["status"]
        self.assertEqual(st["print_stats"], {"state": "complete", "filename": "cube.gcode"})

    def test_api_key_malformed_unreachable_delay(self):
        m = self.start()
        self.switch("api-key", "sekrit\n")
        self.assert_error(m.get("/server/info"), 401, "Unauthorized")
        self.assert_error(m.get("/server/info", headers={"X-Api-Key": "wrong"}), 401,
                          "Unauthorized")
        self.assertEqual(m.get("/server/info", headers={"X-Api-Key": "sekrit"})[0], 200)
        self.assertEqual(m.get("/access/api_key", headers={"X-Api-Key": "sekrit"})[1],
                         {"result": "sekrit"})
        self.unswitch("api-key")
        for mode in ("", "truncated", "empty", "html", "no-result"):
            self.switch("malformed", mode)
            status, raw, _ = m.request("GET", "/server/info")
            if mode == "no-result":
                self.assertNotIn("result", json.loads(raw))
            else:
                self.assertRaises(ValueError, json.loads, raw)
        self.unswitch("malformed")
        self.switch("unreachable")
        with self.assertRaises((http.client.HTTPException, ConnectionError)):
            m.request("GET", "/server/info")
        self.unswitch("unreachable")
        self.switch("delay", "0.3")
        t0 = time.monotonic()
        self.assertEqual(m.get("/server/info")[0], 200)
        self.assertGreaterEqual(time.monotonic() - t0, 0.3)
        self.unswitch("delay")
        # /_rig/exit ends the process: afterwards the port refuses connections
        self.assertEqual(m.post("/_rig/exit"), (200, {"result": "ok"}))
        self.assertEqual(m.proc.wait(10), 0)
        with self.assertRaises(ConnectionRefusedError):
            m.request("GET", "/server/info")

    def test_jsonrpc_unix_socket_and_http(self):
        sock_path = self.path("comms", "moonraker.sock")
        m = self.start("--unix-socket", sock_path)
        s = socket.socket(socket.AF_UNIX)
        s.connect(sock_path)
        self.addCleanup(s.close)

        def call(msg):
            s.sendall(json.dumps(msg).encode() + b"\x03")
            buf = b""
            while not buf.endswith(b"\x03"):
                chunk = s.recv(65536)
                self.assertTrue(chunk)
                buf += chunk
            return json.loads(buf[:-1])

        r = call({"jsonrpc": "2.0", "method": "printer.objects.query", "id": 7,
                  "params": {"objects": {"mcu": ["mcu_version"]}}})
        self.assertEqual(r["id"], 7)
        self.assertEqual(r["result"]["status"], {"mcu": {"mcu_version": "v0.13.0-3-gabc1234"}})
        r = call({"jsonrpc": "2.0", "method": "server.info", "id": 8})
        self.assertEqual(r["result"]["klippy_state"], "ready")
        r = call({"jsonrpc": "2.0", "method": "no.such", "id": 9})
        self.assertEqual(r, {"jsonrpc": "2.0", "error": {"code": -32601,
                                                         "message": "Method not found"}, "id": 9})
        self.ctl("stop", "klipper")
        r = call({"jsonrpc": "2.0", "method": "printer.info", "id": 10})
        self.assertEqual(r["error"], {"code": 503, "message": "Klippy Host not connected"})
        status, body = m.post("/server/jsonrpc", {"jsonrpc": "2.0", "method": "server.info",
                                                  "id": 11})
        self.assertEqual((status, body["id"], body["result"]["klippy_connected"]), (200, 11, False))

    def test_kalico_app(self):
        tree = self.path("kalico")
        run([MAKE_TREE, tree, "--app", "Kalico"])
        m = Moonraker(self.env, ["--boards-json", self.boards_file, "--klipper-path", tree])
        self.addCleanup(m.close)
        info = m.get("/printer/info")[1]["result"]
        self.assertEqual(info["app"], "Kalico")
        self.assertRegex(info["software_version"], r"^v2026\.07\.00-3-g")
        st = m.get("/printer/objects/query?mcu=app,mcu_version")[1]["result"]["status"]
        self.assertEqual(st["mcu"], {"app": "Klipper", "mcu_version": "v0.13.0-3-gabc1234"})

    def test_machine_services(self):
        m = self.start()
        self.assertEqual(m.post("/machine/services/stop", {"service": "klipper"}),
                         (200, {"result": "ok"}))
        self.assertEqual(run([SYSTEMCTL, "is-active", "klipper"], env=self.env,
                             check=False).stdout, "inactive\n")
        self.assertEqual(m.post("/machine/services/start?service=klipper"), (200, {"result": "ok"}))
        self.assertEqual(m.get("/server/info")[1]["result"]["klippy_state"], "ready")
        self.assert_error(m.post("/machine/services/stop", {"service": "sshd"}), 400,
                          "Service 'sshd' not allowed")


# ---------------------------------------------------------------------------
def load_flashtool():
    import importlib.util
    spec = importlib.util.spec_from_file_location("rig_flashtool", FLASHTOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def hexbytes(text):
    return bytes.fromhex(text.replace("|", " "))


def crc16(data):
    crc = 0xffff
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0x8408 if crc & 1 else crc >> 1
    return crc


def kframe(cmd, payload=b""):
    body = bytes([cmd, len(payload) // 4]) + payload
    return b"\x01\x88" + body + struct.pack("<H", crc16(body)) + b"\x99\x03"


class KatapultSim:
    """A Katapult device on the master side of a pty (or one end of a socketpair):
    frames per the protocol, stm32 flash rules, and a few faults. Independent of the
    flashtool stand-in (its own CRC and framing), so the two check each other."""

    def __init__(self, fd, mcu="stm32h723xx", app_start=0x8020000, page_size=2048,
                 version="v0.0.1-109-g902f335", silent=0, busy=0, corrupt=0, mute=False):
        self.fd, self.mcu, self.app_start, self.page_size = fd, mcu, app_start, page_size
        self.version = version
        self.silent, self.busy, self.corrupt, self.mute = silent, busy, corrupt, mute
        self.flash = {}          # addr -> 64 bytes
        self.pages = set()
        self.commands = []       # command codes of the valid frames received
        self.raw = bytearray()   # every byte received
        self.stop = False
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def close(self):
        self.stop = True
        self.thread.join(5)

    def send(self, code, payload=b""):
        out = bytearray(kframe(code, payload))
        if self.corrupt:
            self.corrupt -= 1
            out[-4] ^= 0xff
        os.write(self.fd, bytes(out))

    def loop(self):
        import select
        buf = bytearray()
        nacked = False
        while not self.stop:
            r, _, _ = select.select([self.fd], [], [], 0.05)
            if not r:
                continue
            try:
                data = os.read(self.fd, 4096)
            except OSError:       # pty without an open slave
                time.sleep(0.01)
                continue
            if not data:
                time.sleep(0.01)
                continue
            self.raw += data
            buf += data
            while True:
                start = buf.find(b"\x01")
                if start < 0:
                    buf.clear()
                    break
                del buf[:start]
                if len(buf) < 4:
                    break
                size = buf[3] * 4 + 8
                if len(buf) < size:
                    break
                fr = bytes(buf[:size])
                if (fr[1] != 0x88 or fr[-2:] != b"\x99\x03"
                        or struct.unpack("<H", fr[-4:-2])[0] != crc16(fr[2:-4])):
                    del buf[:1]
                    if not nacked and not self.mute:
                        nacked = True
                        self.send(0xf1)
                    continue
                del buf[:size]
                nacked = False
                self.handle(fr[2], fr[4:-4])

    def handle(self, cmd, payload):
        self.commands.append(cmd)
        if self.mute:
            return
        if self.silent:
            self.silent -= 1
            return
        if self.busy:
            self.busy -= 1
            self.send(0xf3)
            return
        ack = struct.pack("<I", cmd)
        if cmd == 0x11:
            mcu = self.mcu.encode() + b"\0"
            mcu += b"\0" * (-len(mcu) % 4)
            ver = self.version.encode() + b"\0"
            ver += b"\0" * (-len(ver) % 4)
            self.send(0xa0, ack + struct.pack("<III", 0x00010100, self.app_start, 64)
                      + mcu + b"\0\0\0\0" + ver)
        elif cmd == 0x12 and len(payload) == 68:
            addr = struct.unpack("<I", payload[:4])[0]
            if addr < self.app_start or addr % 64:
                self.send(0xf2)
                return
            page = addr // self.page_size
            if addr % self.page_size == 0 or page not in self.pages:
                self.pages.add(page)
            self.flash[addr] = payload[4:]
            self.send(0xa0, ack + payload[:4])
        elif cmd == 0x13:
            self.send(0xa0, ack + struct.pack("<I", len(self.pages)))
        elif cmd == 0x14 and len(payload) == 4:
            addr = struct.unpack("<I", payload)[0]
            self.send(0xa0, ack + payload + self.flash.get(addr, b"\xff" * 64))
        elif cmd == 0x15:
            self.send(0xa0, ack)
        else:
            self.send(0xf2)

    def image(self):
        return b"".join(self.flash[a] for a in sorted(self.flash))


class FlashtoolTest(Tmp):
    """The stand-in Katapult flashtool: framing against the byte examples of the
    protocol, the klipper.bin MCU guard, and whole runs against a simulated Katapult
    device on a pty (a pty has no sysfs USB node, so the tool speaks the protocol
    directly, as Katapult's does for a UART)."""
    tree = None

    @classmethod
    def setUpClass(cls):
        cls.ft = load_flashtool()
        cls.base = tempfile.mkdtemp(prefix="kflash-flashtool-")
        cls.tree = os.path.join(cls.base, "klipper")
        run([MAKE_TREE, cls.tree, "--quiet"])
        env = dict(os.environ, RIG_BUILD_DELAY="0")
        env.pop("KCONFIG_CONFIG", None)
        cls.bins = {}
        for mcu in ("stm32h723xx", "rp2040"):
            cfg, out = os.path.join(cls.base, mcu + ".config"), os.path.join(cls.base, mcu) + "/"
            run(["make", "-C", cls.tree, "KCONFIG_CONFIG=" + cfg, "menuconfig"],
                env=dict(env, RIG_MENUCONFIG_MCU=mcu))
            run(["make", "-C", cls.tree, "KCONFIG_CONFIG=" + cfg, "OUT=" + out], env=env)
            cls.bins[mcu] = out + "klipper.bin"

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.base, True)

    def pty_sim(self, **kw):
        master, slave = os.openpty()
        name = os.ttyname(slave)
        os.close(slave)
        sim = KatapultSim(master, **kw)
        self.addCleanup(os.close, master)
        self.addCleanup(sim.close)
        return name, sim

    def flashtool(self, *args, scale="0.02"):
        env = dict(os.environ, KFLASH_RIG_FLASHTOOL_TIMESCALE=scale, HOME=self.tmp)
        return run([sys.executable, FLASHTOOL] + list(args), env=env, check=False, timeout=120)

    def test_framing_matches_protocol_examples(self):
        ft = self.ft
        self.assertEqual(ft.crc16(b"123456789"), 0x6F91)
        self.assertEqual(ft.frame(0x11), hexbytes("01 88 11 00 f1 7c 99 03"))
        self.assertEqual(ft.frame(0x13), hexbytes("01 88 13 00 41 4f 99 03"))
        self.assertEqual(ft.frame(0x14, hexbytes("00 00 02 08")),
                         hexbytes("01 88 14 01 00 00 02 08 d0 ee 99 03"))
        self.assertEqual(ft.frame(0x15), hexbytes("01 88 15 00 91 1b 99 03"))
        self.assertEqual(ft.frame(0x16), hexbytes("01 88 16 00 f9 31 99 03"))
        self.assertEqual(ft.frame(ft.PRIME_CMD), hexbytes("01 88 90 00 e5 e9 99 03"))
        block = ft.frame(0x12, hexbytes("00 00 02 08") + bytes(range(64)))
        self.assertEqual(len(block), 76)
        self.assertEqual(block[:8], hexbytes("01 88 12 11 00 00 02 08"))
        self.assertEqual(ft.COMMANDS, {"CONNECT": 0x11, "SEND_BLOCK": 0x12, "SEND_EOF": 0x13,
                                       "REQUEST_BLOCK": 0x14, "COMPLETE": 0x15,
                                       "GET_CANBUS_ID": 0x16})

        connect_ack = hexbytes(
            "01 88 a0 0d | 11 00 00 00 | 00 01 01 00 | 00 00 02 08 | 40 00 00 00 |"
            "73 74 6d 33 32 68 37 32 33 78 78 00 | 00 00 00 00 |"
            "76 30 2e 30 2e 31 2d 31 30 39 2d 67 39 30 32 66 33 33 35 00 | 47 7f | 99 03")
        self.assertEqual(len(connect_ack), 60)
        body, why = ft.check_response(connect_ack, 0x11)
        self.assertIsNone(why)
        info = ft.parse_connect(body)
        self.assertEqual((info["proto"], info["app_start"], info["block_size"], info["mcu"]),
                         ((1, 1, 0), 0x8020000, 64, "stm32h723xx"))
        # like Katapult's tool, the zero word stays in front of the version
        self.assertEqual(info["software"], "\0\0\0\0v0.0.1-109-g902f335")
        cases = [
            ("01 88 a0 02 12 00 00 00 00 00 02 08 d1 e6 99 03", 0x12, hexbytes("00 00 02 08"), None),
            ("01 88 a0 02 13 00 00 00 01 00 00 00 2d c4 99 03", 0x13, hexbytes("01 00 00 00"), None),
            ("01 88 a0 01 15 00 00 00 00 2e 99 03", 0x15, b"", None),
            ("01 88 a0 03 16 00 00 00 aa bb cc dd ee ff 00 00 fd 7d 99 03", 0x16,
             hexbytes("aa bb cc dd ee ff 00 00"), None),
            ("01 88 f2 00 00 bf 99 03", 0x11, None, "Received Error Response"),
            ("01 88 f1 00 68 95 99 03", 0x11, None, "Received NACK"),
            ("01 88 f3 00 d8 a6 99 03", 0x11, None, "busy"),
            ("01 88 a0 01 15 00 00 00 00 2f 99 03", 0x15, None, "Frame CRC Mismatch"),
            ("01 88 a0 01 15 00 00 00 00 2e 99 04", 0x15, None, "Invalid Trailer"),
            ("01 88 a0 01 15 00 00 00 00 2e 99 03", 0x11, None, "Acknowledged wrong command"),
        ]
        for text, cmd, want, why in cases:
            body, got_why = ft.check_response(hexbytes(text), cmd)
            self.assertEqual(body, want, text)
            if why is None:
                self.assertIsNone(got_why, text)
            else:
                self.assertTrue(got_why.startswith(why), (text, got_why))
        # the simulator in this file agrees with the byte examples too
        self.assertEqual(kframe(0xf2), hexbytes("01 88 f2 00 00 bf 99 03"))

    def test_dictionary_guard_scan_and_prime_rule(self):
        ft = self.ft
        with open(self.bins["stm32h723xx"], "rb") as f:
            image = f.read()
        d = ft.find_dictionary(image)
        self.assertEqual((d["app"], d["config"]["MCU"]), ("Klipper", "stm32h723xx"))
        kalico = zlib.compress(json.dumps({"app": "Kalico", "config": {"MCU": "rp2040"}}).encode(), 9)
        self.assertEqual(ft.find_dictionary(b"\x00" * 100 + kalico + b"\x00" * 3)["app"], "Kalico")
        self.assertIsNone(ft.find_dictionary(b"\x78\x9c" + b"\x01" * 200))
        for product, prime in (("stm32g0b1xx", True), ("stm32f103xe", True), ("stm32f072xb", True),
                               ("stm32h723xx", False), ("stm32f446xx", False),
                               ("stm32f207xx", False), ("rp2040", False), ("", False)):
            self.assertEqual(ft.needs_prime(product), prime, product)

    def test_prime_discards_first_answer(self):
        ft = self.ft
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        sim = KatapultSim(b.fileno(), mcu="stm32g0b1xx", app_start=0x8002000)
        self.addCleanup(sim.close)
        fw = self.path("fw.bin")
        with open(fw, "wb") as f:
            f.write(b"\x11" * 100)
        import io
        import contextlib
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            flasher = ft.Flasher(ft.Link(a.fileno()), fw)
            flasher.prime()
            info = flasher.connect()
            flasher.write()
            flasher.verify()
            flasher.complete()
        self.assertEqual((info["mcu"], info["app_start"]), ("stm32g0b1xx", 0x8002000))
        self.assertEqual(sim.commands, [0x90, 0x11, 0x12, 0x12, 0x13, 0x14, 0x14, 0x15])
        self.assertEqual(sim.image(), b"\x11" * 100 + b"\xff" * 28)
        self.assertIn("Write complete: 1 pages", out.getvalue())

    def test_flash_over_pty(self):
        dev, sim = self.pty_sim()
        fw = self.bins["stm32h723xx"]
        p = self.flashtool("-d", dev, "-f", fw)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        with open(fw, "rb") as f:
            image = f.read()
        padded = image + b"\xff" * (-len(image) % 64)
        blocks = len(padded) // 64
        self.assertEqual(sim.image(), padded)
        self.assertEqual(sim.commands, [0x11] + [0x12] * blocks + [0x13] + [0x14] * blocks + [0x15])
        version = json.loads(find_dict(image))["version"]
        sha = __import__("hashlib").sha1(padded).hexdigest().upper()
        lines = p.stdout.split("\n")
        # Katapult's verify bar counts blocks from 0, so whether it reaches 50 marks depends
        # on the image size.
        verify_marks, shown = 0, 0
        for i in range(blocks):
            if int(i * 64 / len(image) * 100 + .5) >= shown + 2:
                shown += 2
                verify_marks += 1
        want = [
            "Connecting to Serial Device %s, baud 250000" % dev,
            "Detected Klipper binary version %s, MCU: stm32h723xx" % version,
            "Attempting to connect to bootloader",
            "Katapult Connected",
            "Software Version: \0\0\0\0v0.0.1-109-g902f335",
            "Protocol Version: 1.1.0",
            "Block Size: 64 bytes",
            "Application Start: 0x8020000",
            "MCU type: stm32h723xx",
            "Flashing '%s'..." % os.path.realpath(fw),
            "",
            "[" + "#" * 50 + "]",
            "",
            "Write complete: %d pages" % len(sim.pages),
            "Verifying (block count = %d)..." % blocks,
            "",
            "[" + "#" * verify_marks + "]",
            "",
            "Verification Complete: SHA = %s" % sha,
            "Programming Complete",
            "",
        ]
        self.assertEqual(lines, want)
        self.assertEqual(p.stderr, "")

    def test_mcu_guard(self):
        dev, sim = self.pty_sim(mcu="stm32f446xx", app_start=0x8008000)
        p = self.flashtool("-d", dev, "-f", self.bins["stm32h723xx"])
        self.assertEqual(p.returncode, 1)
        self.assertIn("MCU type: stm32f446xx\n", p.stdout)
        self.assertNotIn("Flashing", p.stdout)
        self.assertTrue(p.stderr.startswith("ERROR:root:Flash Tool Error\nTraceback"), p.stderr)
        self.assertIn("FlashError: MCU returned by Katapult does not match MCU identified in "
                      "klipper.bin.\nKatapult MCU: stm32f446xx\nKlipper Binary MCU: stm32h723xx\n",
                      p.stderr)
        # COMPLETE is still sent (the board starts its old application), nothing written
        self.assertEqual(sim.commands, [0x11, 0x15])
        # only a file named klipper.bin is checked
        other = self.path("firmware.bin")
        shutil.copy(self.bins["stm32h723xx"], other)
        p = self.flashtool("-d", dev, "-f", other)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertNotIn("Detected Klipper binary", p.stdout)

    def test_retries_and_errors(self):
        # no answer, then a busy answer with a bad CRC, then busy, then the ack
        dev, sim = self.pty_sim(silent=1, busy=2, corrupt=1)
        fw = self.path("small.bin")
        with open(fw, "wb") as f:
            f.write(os.urandom(300))
        p = self.flashtool("-v", "-d", dev, "-f", fw)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("INFO:root:Command 'CONNECT': Received busy signal", p.stderr)
        self.assertIn("INFO:root:Command 'CONNECT': Frame CRC Mismatch", p.stderr)
        self.assertIn("INFO:root:Response for command CONNECT timed out, 4 tries remaining",
                      p.stderr)
        self.assertEqual(sim.commands[:4], [0x11] * 4)
        # a device that never answers: 5 tries, then the error (COMPLETE tried 5 times too)
        dev2, sim2 = self.pty_sim(mute=True)
        p = self.flashtool("-d", dev2, "-f", fw)
        self.assertEqual(p.returncode, 1)
        self.assertIn("FlashError: Error sending command [COMPLETE] to Device\n", p.stderr)
        self.assertIn("Error sending command [CONNECT] to Device", p.stderr)
        self.assertEqual(sim2.commands, [0x11] * 5 + [0x15] * 5)
        # -s: connect, print, no COMPLETE
        dev3, sim3 = self.pty_sim(mcu="rp2040", app_start=0x10004000)
        p = self.flashtool("-s", "-d", dev3, "-f", self.path("missing.bin"))
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("Application Start: 0x10004000\nMCU type: rp2040\nStatus Request Complete\n",
                      p.stdout)
        self.assertEqual(sim3.commands, [0x11])

    def test_cli(self):
        p = self.flashtool("-h")
        self.assertEqual(p.returncode, 0)
        for opt in ("-d", "-b", "-f", "-r", "-s", "-v", "-q", "-i", "-u"):
            self.assertRegex(p.stdout, r"\n  %s[ ,]" % opt)
        p = self.flashtool("-f", self.bins["rp2040"])
        self.assertEqual(p.returncode, 1)
        self.assertIn("CAN devices are not supported", p.stderr)
        dev, sim = self.pty_sim()
        # default firmware path ~/klipper/out/klipper.bin (HOME is the test dir)
        p = self.flashtool("-d", dev)
        self.assertEqual(p.returncode, 1)
        self.assertIn("FlashError: Invalid firmware path '%s'"
                      % self.path("klipper", "out", "klipper.bin"), p.stderr)
        self.assertIn("Connecting to Serial Device %s, baud 250000\n" % dev, p.stdout)
        p = self.flashtool("-d", self.path("nodev"), "-f", self.bins["rp2040"])
        self.assertIn("FlashError: No Serial Device found at %s" % self.path("nodev"), p.stderr)
        p = self.flashtool("-d", dev, "-b", "fast", "-f", self.bins["rp2040"])
        self.assertEqual(p.returncode, 1)
        self.assertIn("Not a valid baudrate", p.stderr)
        # a UART request: the serial bootloader string, then exit
        p = self.flashtool("-r", "-d", dev, "-b", "115200")
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(p.stdout, "Connecting to Serial Device %s, baud 115200\nRequesting serial "
                         "bootloader for device %s...\nBootloader Request Complete\n" % (dev, dev))
        self.assertIn(b"~ \x1c Request Serial Bootloader!! ~", bytes(sim.raw))
        self.assertEqual(sim.commands, [])
        # another process holds the tty
        holder = os.open(dev, os.O_RDWR | os.O_NOCTTY)
        try:
            p = self.flashtool("-d", dev, "-f", self.bins["rp2040"])
        finally:
            os.close(holder)
        self.assertEqual(p.returncode, 1)
        self.assertIn("Serial device %s in use by another program.\nProcess ID: %d\n"
                      % (dev, os.getpid()), p.stdout)
        self.assertIn("FlashError: Serial device %s in use" % dev, p.stderr)

    def test_katapult_tree_and_bundled_copy(self):
        kat = self.path("katapult")
        out = run([MAKE_KATAPULT, kat]).stdout.strip()
        self.assertRegex(out, r"^v0\.0\.1-3-g[0-9a-f]{7,}$")
        self.assertEqual(run(["git", "-C", kat, "status", "--porcelain", "--ignored"]).stdout, "")
        with open(FLASHTOOL) as f:
            src = f.read()
        self.assertEqual(read(os.path.join(kat, "scripts", "flashtool.py")), src)
        self.assertTrue(os.access(os.path.join(kat, "scripts", "flashtool.py"), os.X_OK))
        self.assertEqual(read(os.path.join(self.tree, "lib", "katapult", "flashtool.py")), src)
        again = self.path("again")
        run([MAKE_KATAPULT, again, "--quiet"])
        self.assertEqual(git(again, "rev-parse", "HEAD"), git(kat, "rev-parse", "HEAD"))
        self.assertNotEqual(run([MAKE_KATAPULT, kat], check=False).returncode, 0)


# ---------------------------------------------------------------------------
class StartScriptTest(Tmp):
    def test_start_is_idempotent(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with open(self.path("boards.json"), "w") as f:
            json.dump(BOARDS, f)
        env = dict(os.environ, HOME=self.path("home"), KFLASH_RIG_STATE=self.path("state"),
                   KFLASH_RIG_MOONRAKER_PORT=str(port),
                   KFLASH_RIG_BOARDS_JSON=self.path("boards.json"),
                   KFLASH_RIG_STANDIN_HOST="1")  # this tests the stand-ins themselves
        ctl = [SYSTEMCTL]
        self.addCleanup(run, ctl + ["stop", "moonraker"], env=env, check=False)
        run([os.path.join(HERE, "start")], env=env)
        tree = self.path("home", "klipper")
        self.assertRegex(git(tree, "describe", "--always", "--tags", "--long", "--dirty"),
                         r"^v0\.13\.0-3-g")
        kat = self.path("home", "katapult")
        self.assertRegex(git(kat, "describe", "--always", "--tags", "--long", "--dirty"),
                         r"^v0\.0\.1-3-g")
        self.assertTrue(os.access(os.path.join(kat, "scripts", "flashtool.py"), os.X_OK))
        self.assertEqual(run(ctl + ["is-active", "klipper", "moonraker"], env=env).stdout,
                         "active\nactive\n")
        pid = read(self.path("state", "moonraker", "moonraker.pid"))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/server/info")
        self.assertEqual(json.loads(conn.getresponse().read())["result"]["klippy_connected"], True)
        conn.close()
        self.assertTrue(os.path.exists(self.path("home", "printer_data", "comms",
                                                 "moonraker.sock")))
        run([os.path.join(HERE, "start")], env=env)
        self.assertEqual(read(self.path("state", "moonraker", "moonraker.pid")), pid)
        self.assertFalse(os.path.exists(self.path("state", "systemctl.log")))
        # stopping the moonraker unit makes the port refuse connections
        run(ctl + ["stop", "moonraker"], env=env)
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        run(ctl + ["start", "moonraker"], env=env)
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


if __name__ == "__main__":
    unittest.main()
