"""bench/hotpath.py's cases run without valgrind too, and each checks it did the work it
counts: the relay cases that every byte reached the other side (a relay whose sides were
not connected the way the relay expects held them instead: session 10 found the script
counting that), the HTTP/2 cases that every request was counted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
from hotpath import CASES  # noqa: E402


@pytest.mark.parametrize("case", CASES)
def test_each_case_does_the_work_it_counts(case: str) -> None:
    environment = dict(os.environ, PYTHONPATH=str(REPO))
    environment.pop("PINION_PURE_PYTHON", None)
    if case == "tunnel-framing-python":  # the case checks it runs the Python modules
        environment["PINION_PURE_PYTHON"] = "1"
    run = subprocess.run([sys.executable, str(REPO / "bench" / "hotpath.py"), "--case", case,
                          "--requests", "40", "--prepare", "40"], capture_output=True,
                         text=True, timeout=120, env=environment, cwd=REPO)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]


def test_a_relay_that_holds_the_bytes_fails_the_run(tmp_path: Path) -> None:
    """The check is real: a relay that passes nothing on makes the case refuse to report."""
    shim = tmp_path / "sitecustomize.py"
    shim.write_text("import hotpath\nhotpath._Sink.write = lambda self, data: None\n")
    path = os.pathsep.join((str(tmp_path), str(REPO / "bench"), str(REPO)))
    environment = dict(os.environ, PYTHONPATH=path)
    run = subprocess.run([sys.executable, "-c", "import sys, hotpath; "
                          "sys.argv = ['hotpath', '--case', 'relay-opaque', '--requests', '10']; "
                          "hotpath.main()"], capture_output=True, text=True, timeout=120,
                         env=environment, cwd=REPO)
    assert run.returncode != 0
    assert "the relay passed on 0 bytes" in run.stdout + run.stderr
