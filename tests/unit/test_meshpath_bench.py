"""bench/meshpath.py, the instruction count of a paced request through the whole mesh path,
runs without valgrind too: every case completes its requests, and the mesh cases' relays
counted every response (the script fails otherwise), so a count it reports is of a path
that really carried and observed the requests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("case", ["direct", "mesh", "mesh-opaque"])
def test_each_case_carries_its_requests(case: str) -> None:
    environment = dict(os.environ, PYTHONPATH=str(REPO))
    run = subprocess.run([sys.executable, str(REPO / "bench" / "meshpath.py"), "--case", case,
                          "--requests", "50"], capture_output=True, text=True, timeout=60,
                         env=environment, cwd=REPO)
    assert run.returncode == 0, run.stderr


def test_a_path_that_loses_the_counts_fails_the_run(tmp_path: Path) -> None:
    """The check is real: with the observers gone the mesh case refuses to report."""
    shim = tmp_path / "sitecustomize.py"
    shim.write_text("import agent.core.detect as d\n"
                    "d.ConnectionObserver.client_bytes = lambda self, data, now: []\n"
                    "d.ConnectionObserver.server_bytes = lambda self, data, now: []\n")
    environment = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}")
    run = subprocess.run([sys.executable, str(REPO / "bench" / "meshpath.py"), "--case", "mesh",
                          "--requests", "20"], capture_output=True, text=True, timeout=60,
                         env=environment, cwd=REPO)
    assert run.returncode != 0
    assert "counted [0, 0] responses for 20 requests" in run.stderr


def test_cpu_time_reports_every_case_from_runs_that_carried_their_requests() -> None:
    environment = dict(os.environ, PYTHONPATH=str(REPO))
    run = subprocess.run([sys.executable, str(REPO / "bench" / "meshpath.py"), "--cpu-time",
                          "--requests", "6000", "--base", "600", "--rounds", "1"],
                         capture_output=True, text=True, timeout=180, env=environment, cwd=REPO)
    assert run.returncode == 0, run.stderr
    rows = {line.split("|")[1].strip(): [float(cell) for cell in line.split("|")[2:5]]
            for line in run.stdout.splitlines() if line.startswith("| ") and "µs" not in line}
    assert set(rows) == {"direct", "mesh", "mesh-opaque"}
    for case, (user, system, total) in rows.items():  # a difference of two runs: the apps
        assert abs(user + system - total) < 0.2, (case, user, system, total)  # alone can be ~0
    assert rows["mesh"][2] > 0 and rows["mesh-opaque"][2] > 0
    assert rows["mesh"][2] > rows["direct"][2]  # the agents' work is in it


def test_a_paced_run_sleeps_between_its_requests() -> None:
    """--pace: the client waits before each next request (the process goes idle in between),
    and the run still carries and counts every request."""
    environment = dict(os.environ, PYTHONPATH=str(REPO))
    started = time.monotonic()
    run = subprocess.run([sys.executable, str(REPO / "bench" / "meshpath.py"), "--case", "mesh",
                          "--requests", "60", "--pace", "0.01"], capture_output=True, text=True,
                         timeout=60, env=environment, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert time.monotonic() - started >= 59 * 0.01
