# Data dictionary of the kflash test-rig Klipper stand-in (rig code, not Klipper's).
#
# Builds the dictionary a real build of that MCU would carry from the declarations in
# rigdecls.json (see its "about"), with Klipper's rules for ids:
# * message ids: identify_response 0 and identify 1, then every command in declaration
#   order, then every response; the encoded ids 96..127 are sent as one VLQ byte and so
#   appear as -32..-1 in the dictionary (ids of 128 and more take two bytes);
# * static_string_id: the shutdown messages in declaration order from 2.
# kflash-boardsim builds the same dictionary in Rust (tests/rig/boardsim/src/firmware.rs);
# its tests compare the two byte for byte.
import json
import os

DECLS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rigdecls.json")
DEFAULT_MESSAGES = {"identify_response offset=%u data=%.*s": 0, "identify offset=%u count=%c": 1}
STATIC_STRING_MIN = 2


def load_modules():
    with open(DECLS) as f:
        return json.load(f)["modules"]


def arch_of(mcu):
    return "rp2040" if mcu.startswith("rp") else "stm32"


def module_applies(mod, mcu, transport):
    when = mod.get("when", {})
    if "arch" in when and when["arch"] != arch_of(mcu):
        return False
    if "mcu" in when and not any(mcu.startswith(p) for p in when["mcu"]):
        return False
    if "transport" in when and transport not in when["transport"]:
        return False
    return True


def msgid_of(encoded):
    """Klipper's data-dictionary id of an encoded message id."""
    return encoded - 128 if 96 <= encoded < 128 else encoded


def build(mcu, clock, transport="USBSERIAL", serial_baud=250000, canbus_frequency=1000000):
    """commands, responses, constants, enumerations for one build."""
    subst = {"@MCU@": mcu, "@CLOCK_FREQ@": int(clock), "@SERIAL_BAUD@": int(serial_baud),
             "@CANBUS_FREQUENCY@": int(canbus_frequency)}
    commands, responses, constants, enums, strings = [], [], {}, {}, []
    for mod in load_modules():
        if not module_applies(mod, mcu, transport):
            continue
        commands += [c[0] for c in mod.get("commands", []) if c[0] not in commands]
        responses += [r for r in mod.get("responses", []) if r not in responses]
        for k, v in mod.get("constants", {}).items():
            constants[k] = subst.get(v, v) if isinstance(v, str) else v
        for name, vals in mod.get("enumerations", {}).items():
            enums.setdefault(name, {}).update(vals)
        strings += [s for s in mod.get("static_strings", []) if s not in strings]
    encoded = dict(DEFAULT_MESSAGES)
    next_id = max(encoded.values())
    for msg in commands + responses:
        if msg not in encoded:
            next_id += 1
            encoded[msg] = next_id
    enums["static_string_id"] = {s: i + STATIC_STRING_MIN for i, s in enumerate(strings)}
    cmd_set = set(commands)
    return {
        "commands": {m: msgid_of(e) for m, e in encoded.items() if m in cmd_set},
        "responses": {m: msgid_of(e) for m, e in encoded.items() if m not in cmd_set},
        "config": constants,
        "enumerations": enums,
    }


def dictionary(app, version, build_versions, mcu, clock, **kw):
    """The whole data dictionary as compact JSON text with sorted keys (klipper.dict)."""
    data = build(mcu, clock, **kw)
    data.update({"app": app, "build_versions": build_versions, "license": "GNU GPLv3",
                 "version": version})
    return json.dumps(data, separators=(",", ":"), sort_keys=True)
