"""The pod-side C transport and acceptor (csrc/podio.c, agent.dataplane._podio) under
AddressSanitizer and UBSan: compiled with them into a temporary file, loaded in a child
interpreter in place of the installed one, and driven by test_podio.py's tests — megabytes
both ways with the peer not reading, half-closes both ways, close after the buffer, armed
aborts, resets by the peer, raising protocols and factories, 70 connections accepted at once —
and test_proxy_shells.py's relays on it, on asyncio's loop and on uvloop's."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.unit.test_http1_fast_asan import instrumented, loading

REPO = Path(__file__).resolve().parents[2]

CHILD = loading("agent.dataplane._podio") + textwrap.dedent("""
    import pytest
    code = pytest.main(["-q", "-p", "no:cacheprovider", "tests/unit/test_podio.py",
                        "tests/unit/test_proxy_shells.py"])
    from agent.dataplane import listening, relay
    assert listening.POD_ACCEPTOR is module.PodAcceptor, "the instrumented acceptor is not in use"
    assert relay.POD_TRANSPORT is module.PodTransport, "the instrumented transport is not in use"
    print("instrumented run ok" if code == 0 else f"pytest exit {code}")
""")


def test_the_pod_transport_and_acceptor_are_clean_under_asan_and_ubsan(tmp_path: Path) -> None:
    module = tmp_path / "_podio_asan.so"
    env = instrumented(module, ["podio.c"])
    env.pop("PINION_PURE_PYTHON", None)
    run = subprocess.run([sys.executable, "-c", CHILD, str(module)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-4000:]
    assert "instrumented run ok" in run.stdout, run.stdout[-3000:]
    assert " passed" in run.stdout and " failed" not in run.stdout
