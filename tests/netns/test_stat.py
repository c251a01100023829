"""`pinion stat` against real agents: the numbers match the traffic the test made."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from agent.lab.agents import REPO
from tests.netns.conftest import Mesh

pytestmark = pytest.mark.netns


@pytest.fixture
def backend() -> str:
    """The CLI only reads metrics: one capture backend is enough here."""
    return "nftables"


def _stat(mesh: Mesh, window: float) -> subprocess.CompletedProcess[str]:
    """Run the CLI where an operator would: on a node, reaching both agents' admin ports."""
    agents = [f"--agent={a.admin[0]}:{a.admin[1]}" for a in mesh.agents]
    return mesh.lab.nodes[0].run(
        [sys.executable, "-m", "agent", "stat", "pods", "-A", "--window", str(window),
         "-o", "json", *agents], cwd=str(REPO), timeout=60, check=False)


def test_stat_reports_success_rate_rps_and_latency_of_a_known_mix(mesh: Mesh) -> None:
    client, web = mesh.pod(0, "client"), mesh.pod(1, "web")
    mesh.serve(web, "agent.lab.httpserver", "--port", "8080")
    urls = [f"http://{web.ip}:8080/" + ("status/500" if i % 10 == 9 else "ok")
            for i in range(100)]

    def traffic() -> None:
        time.sleep(0.5)  # inside the stat window, which starts with the first scrape
        client.run(["curl", "-s", "-o", "/dev/null", *urls], timeout=30)

    sender = threading.Thread(target=traffic)
    sender.start()
    stat = _stat(mesh, window=4.0)
    sender.join(30)

    assert stat.returncode == 0, stat.stderr
    rows = {row["name"]: row for row in json.loads(stat.stdout)}
    assert rows["web"]["meshed"] == "1/1"
    assert rows["web"]["success"] == pytest.approx(0.9)
    assert rows["web"]["rps"] == pytest.approx(100 / 4.0, rel=0.1)
    assert 0 < rows["web"]["latency_ms_p50"] <= rows["web"]["latency_ms_p99"]
