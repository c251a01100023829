"""The C transport of the tunnel's records (csrc/tlsio.c, agent.dataplane._tlsio) under
AddressSanitizer and UBSan: compiled with them into a temporary file, loaded in a child
interpreter in place of the installed one, and driven by test_tunnel_tls.py's tests of it —
sessions carrying megabytes both ways, a forged record, a peer that stops reading, abort, a
raising protocol, a wrong object — the fuzz test that feeds it records cut anywhere, with
flipped bytes and garbage (300 examples), and test_tunnel_lanes.py whole: frames cut anywhere
across records and reads into lanes and the session (300 examples), relays over sessions,
megabytes through a lane, a pod that stops reading; and test_tunnel_senders.py whole: writes of
any size both ways framed by senders, against the windows and the session's own frames (25
examples), idle credit taken back, a peer that stops reading, a reset stream."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.unit.test_http1_fast_asan import instrumented, loading

REPO = Path(__file__).resolve().parents[2]

CHILD = loading("agent.dataplane._tlsio") + textwrap.dedent("""
    import pytest
    chosen = "(c] or transport or garbage or stops_reading or abort or raises) and not pages"
    code = pytest.main(["-q", "-p", "no:cacheprovider", "tests/unit/test_tunnel_tls.py",
                        "-k", chosen])
    code = code or pytest.main(["-q", "-p", "no:cacheprovider", "tests/unit/test_tunnel_lanes.py",
                                "tests/unit/test_tunnel_senders.py"])
    from agent.dataplane import tls, tunnel
    assert tls.TLS_TRANSPORT is module.TlsTransport, "the instrumented build is not the one in use"
    assert tunnel._LANE is module.Lane, "the instrumented build's lanes are not the ones in use"
    assert tunnel._SENDER is module.Sender, "the instrumented build's senders are not the ones in use"
    print("instrumented run ok" if code == 0 else f"pytest exit {code}")
""")


# The instrumented child runs three test files with 600+ hypothesis examples: ~2 minutes on
# a 2-vCPU VM (119 s measured against the suite's 120 s default), so it gets its own bound.
@pytest.mark.timeout(600)
def test_the_c_transport_is_clean_under_asan_and_ubsan(tmp_path: Path) -> None:
    module = tmp_path / "_tlsio_asan.so"
    env = instrumented(module, ["tlsio.c"], ("ssl", "crypto"))
    env.pop("PINION_PURE_PYTHON", None)
    run = subprocess.run([sys.executable, "-c", CHILD, str(module)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-4000:]
    assert "instrumented run ok" in run.stdout, run.stdout[-3000:]
    assert " passed" in run.stdout and " failed" not in run.stdout
