"""bench/engine_floor.py, the floor of a C engine's data path, builds and carries its
requests: the client app counts every byte of every response (the run would never end
otherwise), busy and paced; a relay refuses an object that is not `_ssl`'s."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("pace", ["0", "0.002"])
def test_requests_cross_the_c_relays(pace: str) -> None:
    run = subprocess.run([sys.executable, str(REPO / "bench" / "engine_floor.py"), "--case",
                          "c-relay", "--requests", "200" if pace == "0" else "30", "--pace", pace],
                         capture_output=True, text=True, timeout=120, cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert run.returncode == 0, run.stderr


def test_a_relay_takes_only_an_ssl_object_it_knows(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO))
    from bench import engine_floor

    engine_floor.build(str(tmp_path))
    module = engine_floor._load(str(tmp_path))
    with pytest.raises(TypeError, match="layout"):
        module.make(ssl.MemoryBIO(), 0, 1)  # a PyObject, but no SSL* where _ssl keeps it
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    tls = context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="x")
    relay = module.make(tls._sslobj, 0, 1)
    assert hasattr(relay, "on_tls_readable") and hasattr(relay, "on_plain_readable")
