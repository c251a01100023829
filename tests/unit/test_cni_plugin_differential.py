"""cni/pinion-cni (C) against cni/pinion_cni_reference.py on generated input: network configs,
CNI_* environments and agent replies (or no agent at all). Both run as the runtime runs them,
one after the other against the same socket path and pending directory, and must agree on
the exit code, stdout (as parsed JSON), the request the agent received (as parsed JSON) and
the pending record left behind (as parsed JSON, its receivedAt aside).

Where the two are allowed to differ, and so what is not generated here: the C plugin reads
UTF-8 only and refuses NaN/Infinity, encoded surrogates and paths with NUL bytes with clear
errors (the reference accepts some of these or fails on them as its own bug), and its JSON
syntax errors are worded its own way (code and prefix are compared)."""

from __future__ import annotations

import json
import os
import re
import shutil
import string
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.unit.test_cni_plugin import (
    C_PLUGIN,
    CLOSE_WITHOUT_REPLY,
    PREV_RESULT_0_3_1,
    PREV_RESULT_1_0_0,
    PYTHON,
    REFERENCE,
    FakeAgent,
    require_c_plugin,
)

NO_AGENT = "no agent"

# ------------------------------------------------------------------ what is generated

JSON_SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(
    allow_nan=False, allow_infinity=False) | st.text(max_size=8)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=5), inner, max_size=3), max_leaves=8)

ADDRESS_TEXT = st.text(alphabet="0123456789abcdefABCDEF.:/%", max_size=24)
VALID_ADDRESSES = st.one_of(
    st.ip_addresses().map(str),
    st.tuples(st.ip_addresses(v=4), st.integers(0, 32)).map(lambda t: f"{t[0]}/{t[1]}"),
    st.tuples(st.ip_addresses(v=6), st.integers(0, 128)).map(lambda t: f"{t[0]}/{t[1]}"),
)
ADDRESSES = st.one_of(
    st.ip_addresses().map(str),
    st.tuples(st.ip_addresses(v=4), st.integers(0, 33)).map(lambda t: f"{t[0]}/{t[1]}"),
    st.tuples(st.ip_addresses(v=6), st.integers(0, 129)).map(lambda t: f"{t[0]}/{t[1]}"),
    st.tuples(st.ip_addresses(v=4), st.ip_addresses(v=4)).map(lambda t: f"{t[0]}/{t[1]}"),
    st.sampled_from(["10.42.0.5/24", "fd00:42::5/64", "fe80::1%eth0", "fe80::1%eth0/64",
                     "::ffff:10.0.0.1", "1:0:0:1:0:0:0:1", "10.042.0.5", "1.2.3.4/255.255.0.0",
                     "1.2.3.4/0.0.255.255", "1.2.3.4/255.0.255.0", "::", "1::", ":::", "1.2.3"]),
    ADDRESS_TEXT,
    st.integers(-1, 2**130),
    JSON_SCALARS,
)


@st.composite
def prev_results(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["generated"] * 6 + ["1.0.0", "0.3.1", "odd"]))
    if kind == "1.0.0":
        return PREV_RESULT_1_0_0
    if kind == "0.3.1":
        return PREV_RESULT_0_3_1
    if kind == "odd":
        return draw(JSON_VALUES)
    entry = st.fixed_dictionaries({"address": mostly(VALID_ADDRESSES, ADDRESSES, 4)}, optional={
                                  "gateway": mostly(VALID_ADDRESSES, ADDRESSES, 4),
                                                "interface": st.integers(0, 3)})
    entries = st.lists(mostly(entry, JSON_SCALARS), max_size=4)
    result: dict[str, Any] = {"cniVersion": "1.0.0", "ips": draw(entries)}
    if draw(st.booleans()):
        result["dns"] = draw(JSON_VALUES)
    return result


def mostly(usual: st.SearchStrategy[Any], odd: st.SearchStrategy[Any],
           one_in: int = 12) -> st.SearchStrategy[Any]:
    """`usual`, and now and then `odd`: most cases get past validation to the agent exchange."""
    return st.sampled_from(range(one_in)).flatmap(lambda pick: odd if pick == one_in - 1 else usual)


@st.composite
def configs(draw: st.DrawFn, run_dir: Path) -> dict[str, Any]:
    config: dict[str, Any] = {"name": "k8s-pod-network"}
    choices = {
        "cniVersion": mostly(st.sampled_from(["1.0.0", "0.4.0", "0.3.1", "0.3.0"]), JSON_VALUES),
        "type": mostly(st.just("pinion-cni"), JSON_VALUES),
        "failPolicy": mostly(st.sampled_from(["closed", "open"]), JSON_VALUES),
        "timeoutSeconds": mostly(st.sampled_from([0.5, 1, 3]), JSON_SCALARS | st.just(3600.0001)),
        "agentSocket": mostly(st.just(str(run_dir / "cni.sock")), st.sampled_from(
            ["", str(run_dir / "missing.sock"), str(run_dir)]) | JSON_SCALARS, 6),
        "pendingDir": mostly(st.sampled_from([str(run_dir / "pending"),
                                              str(run_dir / "a" / "b" / "pending/")]),
                             st.sampled_from([str(run_dir / "cni.sock"), ""]) | JSON_SCALARS),
        "prevResult": prev_results(),
        "extra": JSON_VALUES,
    }
    likely = {"cniVersion": 0.97, "type": 0.97, "agentSocket": 0.95, "pendingDir": 0.9,
              "timeoutSeconds": 0.8, "prevResult": 0.93}
    for key, strategy in choices.items():
        if draw(st.floats(0, 1)) < likely.get(key, 0.5):
            config[key] = draw(strategy)
    if "agentSocket" not in config:
        config["agentSocket"] = str(run_dir / "cni.sock")
    if "timeoutSeconds" not in config:
        config["timeoutSeconds"] = 1
    return config


WELL_FORMED_ARGS = st.lists(
    st.tuples(st.text(string.ascii_letters + "_é", max_size=6), st.text(
        string.ascii_letters + string.digits + "-=é\u2028 ", max_size=6)),
    max_size=5,
).map(lambda pairs: ";".join(f"{k}={v}" for k, v in pairs if k))
CNI_ARGS = mostly(WELL_FORMED_ARGS, st.text(alphabet=string.ascii_letters + ";=é", max_size=12)
                  | st.binary(max_size=8).map(lambda raw: os.fsdecode(raw.replace(b"\0", b""))), 4)


@st.composite
def environments(draw: st.DrawFn) -> dict[str, str | None]:
    return {
        "CNI_COMMAND": draw(mostly(st.sampled_from(["ADD", "ADD", "ADD", "DEL", "CHECK"]),
                                   st.sampled_from(["VERSION", "RESIZE", "add", "", None]))),
        "CNI_CONTAINERID": draw(mostly(st.sampled_from(["c0ffee01", "a.b-c_d"]),
                                       st.sampled_from([".hidden", "a/b", "é", "", None]))),
        "CNI_NETNS": draw(mostly(st.sampled_from(["/var/run/netns/cni-1", "/proc/1/ns/net"]),
                                 st.sampled_from(["", None, "/ü"]))),
        "CNI_IFNAME": draw(mostly(st.just("eth0"), st.sampled_from(["", None]))),
        "CNI_ARGS": draw(mostly(CNI_ARGS, st.none())),
    }


REPLIES = st.one_of(
    st.just({"ok": True}),
    st.just({"ok": True}),
    st.just(NO_AGENT),
    st.fixed_dictionaries({"ok": st.just(False)}, optional={
        "code": st.integers(-3, 2**70) | JSON_SCALARS, "msg": JSON_SCALARS | st.text(max_size=12),
        "details": JSON_VALUES}),
    st.binary(max_size=20).map(lambda raw: raw + b"\n"),
    JSON_VALUES.map(lambda value: json.dumps(value).encode() + b"\n"),
    st.sampled_from([CLOSE_WITHOUT_REPLY, NO_AGENT, b'{"ok": true}', b' {"ok":true} \n',
                     b'{"ok": true, "ok": false}\n', b"\xef\xbb\xbf" + b'{"ok": true}\n']),
)

# ------------------------------------------------------------------ running both


def run_once(argv: list[str], stdin: bytes, env: dict[str, str | None], run_dir: Path,
             reply: Any) -> dict[str, Any]:
    for child in run_dir.iterdir():
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    agent = None if reply == NO_AGENT else FakeAgent(run_dir / "cni.sock", reply)
    environ = {"PATH": "/usr/bin:/bin"}
    environ.update({name: value for name, value in env.items() if value is not None})
    try:
        completed = subprocess.run(argv, input=stdin, env=environ, capture_output=True, timeout=30)
    finally:
        if agent is not None:
            agent.stop()
    pending = {}
    for path in sorted(run_dir.rglob("*")):
        if path.is_file() and path.suffix in (".json", ".tmp"):
            record = json.loads(path.read_bytes())
            record.pop("receivedAt", None)
            pending[str(path.relative_to(run_dir))] = record
    return {"exit": completed.returncode, "stdout": parse_stdout(completed.stdout),
            "requests": agent.requests if agent else None, "pending": pending,
            "stderr": completed.stderr.decode(errors="replace")}


def parse_stdout(raw: bytes) -> Any:
    if not raw:
        return None
    output = json.loads(raw)
    if isinstance(output, dict) and "msg" in output:
        # pids in temporary file names; JSON syntax errors worded each its own way
        output["msg"] = re.sub(r"\.(\w+)\.\d+\.tmp", r".\1.PID.tmp", output["msg"])
        prefix = "network config on stdin is not valid JSON: "
        if output["msg"].startswith(prefix):
            output["msg"] = prefix
    return output


RUN_DIR = Path(f"/tmp/pcnid-{os.getpid()}")  # short: a Unix socket path lives in it


@pytest.fixture(scope="module")
def run_dir() -> Any:
    RUN_DIR.mkdir(mode=0o700)
    yield RUN_DIR
    shutil.rmtree(RUN_DIR, ignore_errors=True)


@settings(max_examples=int(os.environ.get("PINION_CNI_EXAMPLES", "150")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(config=configs(RUN_DIR), env=environments(), reply=REPLIES,
       layout=st.sampled_from(["compact", "indented", "utf-8"]))
def test_the_c_plugin_matches_its_reference_on_generated_input(
    run_dir: Path, config: dict[str, Any], env: dict[str, str | None], reply: Any, layout: str
) -> None:
    require_c_plugin()
    if layout == "indented":
        stdin = json.dumps(config, indent=1).encode()
    else:
        stdin = json.dumps(config, ensure_ascii=layout != "utf-8").encode("utf-8", "surrogatepass")

    python = run_once([PYTHON, str(REFERENCE)], stdin, env, run_dir, reply)
    c = run_once([str(C_PLUGIN)], stdin, env, run_dir, reply)

    output = python["stdout"]
    event(f"exit {python['exit']}, code {output.get('code') if isinstance(output, dict) else '-'}"
          f", request sent: {bool(python['requests'])}, pending: {bool(python['pending'])} "
          + (str(output.get("msg"))[:50] if isinstance(output, dict) else ""))
    for field in ("exit", "stdout", "requests", "pending"):
        assert c[field] == python[field], (
            f"{field} differs\nconfig: {stdin!r}\nenv: {env}\nreply: {reply!r}\n"
            f"python: {python}\nc: {c}")


PT_INTERP = 3  # the program header naming a dynamic loader (ld.so): absent in a static binary


def _program_headers(elf: bytes) -> set[int]:
    """The p_type of each program header of a 64-bit little-endian ELF file (x86_64,
    aarch64): read by hand, so the check needs no `file` or `readelf` (an arm64 rootfs
    has neither)."""
    assert elf[4] == 2 and elf[5] == 1, "not a 64-bit little-endian ELF"
    phoff = int.from_bytes(elf[0x20:0x28], "little")
    entsize = int.from_bytes(elf[0x36:0x38], "little")
    count = int.from_bytes(elf[0x38:0x3A], "little")
    return {int.from_bytes(elf[phoff + i * entsize:phoff + i * entsize + 4], "little")
            for i in range(count)}


def test_the_reference_runs_as_a_script_and_the_c_plugin_needs_no_interpreter() -> None:
    require_c_plugin()
    assert sys.executable  # the reference: any python3 >= 3.9
    assert C_PLUGIN.read_bytes()[:4] == b"\x7fELF"
    assert PT_INTERP not in _program_headers(C_PLUGIN.read_bytes()), \
        "pinion-cni names a dynamic loader: it would need the host's libc"
    assert PT_INTERP in _program_headers(Path("/bin/sh").resolve().read_bytes())  # the check sees one
