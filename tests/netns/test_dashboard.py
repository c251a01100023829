"""`pinion dashboard` in a real headless browser (Debian's chromium), on a two-node mTLS lab
with a known traffic mix: every view loads with no console error, shows what the agents'
/metrics hold (meshed pods, a 90 % success rate, mTLS edges), and the tap view shows tapped
requests. Screenshots of each view go to $PINION_SCREENSHOTS when set (docs/ holds them)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.lab.agents import REPO
from tests.netns.conftest import Mesh, eventually
from tests.netns.test_golden_metrics import HTTP
from tests.netns.test_mesh_tunnel import tls_mesh_running
from tests.support.browser import Browser

pytestmark = pytest.mark.netns

# Steady traffic for at most `seconds` (and `limit` requests): nine OKs, then one 500.
LOAD = """\
import http.client, sys, time
host, seconds, limit = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
conn = http.client.HTTPConnection(host, 8080, timeout=5)
deadline, sent = time.monotonic() + seconds, 0
while time.monotonic() < deadline and sent < limit:
    conn.request("GET", "/status/500" if sent % 10 == 9 else f"/api/items/{sent % 3}")
    conn.getresponse().read()
    sent += 1
    time.sleep(0.02)
print(sent)
"""


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    with tls_mesh_running(tmp_path, "nftables") as running:
        yield running


def _dashboard(mesh: Mesh, *extra: str) -> tuple[subprocess.Popen[str], str]:
    agents = [arg for agent in mesh.agents for arg in ("--agent", f"{agent.admin[0]}:{agent.admin[1]}")]
    server = mesh.lab.nodes[1].spawn([sys.executable, "-m", "agent", "dashboard", "--port", "0",
                                      *agents, *extra], stdout=subprocess.PIPE, text=True,
                                     cwd=str(REPO))
    assert server.stdout is not None
    line = server.stdout.readline()
    found = re.search(r"http://127\.0\.0\.1:\d+/", line)
    assert found, line
    return server, found.group(0)


def _shoot(browser: Browser, name: str) -> None:
    target = os.environ.get("PINION_SCREENSHOTS")
    if target:
        browser.screenshot(Path(target) / f"dashboard-{name}.png")


def _cells(browser: Browser, table: str, row: str) -> list[str]:
    return list(browser.evaluate(
        f"[...document.querySelectorAll('#{table} tbody tr[data-name=\"{row}\"] td')]"
        ".map(td => td.innerText)") or [])


def test_every_view_loads_clean_and_shows_the_agents_numbers(mesh: Mesh) -> None:
    client, web = mesh.pod(0, "client"), mesh.pod(1, "web")
    mesh.serve(web, HTTP, "--port", "8080")
    load = client.spawn([sys.executable, "-c", LOAD, web.ip, "40", "1600"],
                        stdout=subprocess.PIPE, text=True)
    server, url = _dashboard(mesh)
    try:
        with Browser(spawn=mesh.lab.nodes[1].spawn) as browser:
            browser.open(url)
            browser.wait_for("document.querySelector('#namespaces tr[data-namespace=default]')")
            row = browser.evaluate("document.querySelector('#namespaces tr[data-namespace=default]')"
                                   ".innerText").split("\t")
            assert row[:2] == ["default", "2/2"], row
            _shoot(browser, "namespaces")

            browser.open(url + "namespaces/default")
            # a refresh window full of the mix: 9 of every 10 requests succeed
            browser.wait_for(f"(() => {{ const r = document.querySelector('#pods tr[data-name={web.name}]');"
                             " return r && r.children[2].innerText.endsWith('%'); })()", 30)
            cells = _cells(browser, "pods", web.name)
            assert cells[1] == "1/1"
            assert 87.0 <= float(cells[2].rstrip("%")) <= 93.0, cells
            assert float(cells[3]) > 10, cells  # RPS: ~40/s of load
            assert int(cells[7]) >= 1, cells  # its inbound connection is open
            _shoot(browser, "namespace")

            browser.open(url + "namespaces/default/edges")
            browser.wait_for("document.querySelectorAll('#edges tbody tr').length > 0")
            edges = browser.evaluate("[...document.querySelectorAll('#edges tbody tr')]"
                                     ".map(r => r.innerText)")
            assert any(e.startswith(client.name) and "✓ mTLS" in e for e in edges), edges
            assert browser.evaluate("document.querySelectorAll('svg.graph line').length") >= 1
            _shoot(browser, "edges")

            browser.open(url + f"tap?resource=pod/{web.name}&namespace=default&max_rps=1000")
            browser.wait_for("document.querySelectorAll('#tap tbody tr').length >= 20", 30)
            tapped = browser.evaluate("[...document.querySelectorAll('#tap tbody tr')]"
                                      ".map(r => [...r.children].map(td => td.innerText))")
            paths = {row[6] for row in tapped}
            assert paths <= {"/api/items/0", "/api/items/1", "/api/items/2", "/status/500"}
            assert all(row[7] == "500" for row in tapped if row[6] == "/status/500")
            assert all(row[0] == "inbound" and row[3] == "true" for row in tapped)
            _shoot(browser, "tap")

            assert browser.console_errors() == []
    finally:
        server.terminate()
        server.wait(timeout=10)
        load.kill()
        load.wait()
    assert eventually(lambda: mesh.agents[1].metrics().value("pinion_tap_open") == 0, 10)


def test_with_prometheus_the_golden_numbers_come_from_its_queries(mesh: Mesh) -> None:
    from tests.netns.test_prometheus import Prometheus

    client, web = mesh.pod(0, "client"), mesh.pod(1, "web")
    mesh.serve(web, HTTP, "--port", "8080")
    prometheus = Prometheus(mesh, mesh.lab.nodes[1],
                            [f"{a.admin[0]}:{a.admin[1]}" for a in mesh.agents])
    prometheus.start()
    load = client.spawn([sys.executable, "-c", LOAD, web.ip, "40", "1600"],
                        stdout=subprocess.PIPE, text=True)
    server, url = _dashboard(mesh, "--prometheus", f"http://{prometheus.address[0]}:"
                             f"{prometheus.address[1]}", "--prometheus-window", "10s")
    try:
        prometheus.wait_for("the web pod's inbound requests", lambda: bool(prometheus.query(
            f'rate(request_total{{direction="inbound",pod="{web.name}"}}[10s]) > 0')))
        with Browser(spawn=mesh.lab.nodes[1].spawn) as browser:
            browser.open(url + "namespaces/default")
            browser.wait_for(f"(() => {{ const r = document.querySelector('#pods tr[data-name={web.name}]');"
                             " return r && r.children[2].innerText.endsWith('%'); })()", 30)
            assert "Numbers from: prometheus http://" in browser.evaluate(
                "document.getElementById('source').innerText")
            cells = _cells(browser, "pods", web.name)
            assert 85.0 <= float(cells[2].rstrip("%")) <= 95.0, cells
            assert float(cells[3]) > 10 and cells[4].endswith("ms"), cells
            assert browser.console_errors() == []
    finally:
        server.terminate()
        server.wait(timeout=10)
        load.kill()
        load.wait()
        prometheus.stop()
