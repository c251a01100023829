"""The agents' /metrics as Prometheus itself sees it: promtool accepts the exposition, and a
real Prometheus scraping both nodes answers Linkerd's `viz stat` queries with the traffic sent."""

from __future__ import annotations

import http.client
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlencode

import pytest

from agent.lab.agents import REPO, node_socket
from agent.lab.topology import Node, Pod, stop_processes
from tests.netns.conftest import Mesh
from tests.netns.test_golden_metrics import GRPC, HTTP, HTTP1_CLIENT

pytestmark = pytest.mark.netns

PROMETHEUS_PORT = 9090
WAIT_SECONDS = 30.0
WEB_INBOUND = 'direction="inbound", namespace="default", pod="web"'
# Linkerd's own name, kept on purpose so its dashboards and queries work unchanged.
LINKERD_NAME_LINT = "response_latency_ms metric names should not contain abbreviated units"
CLIENT_OUTBOUND = 'direction="outbound", namespace="default", pod="client"'


@pytest.fixture
def backend() -> str:
    """What is checked here is the exposition, not the redirect: one backend is enough."""
    return "nftables"


def _get_mix(client: Pod, web: Pod, ok: int, failed: int, connections: int) -> dict[str, int]:
    paths = ["/status/200"] * ok + ["/status/500"] * failed
    result = client.run([sys.executable, "-c", HTTP1_CLIENT, web.ip, "8080", json.dumps(paths),
                         str(connections)], timeout=30)
    return dict(json.loads(result.stdout))


# ---------------------------------------------------------------- promtool


def test_promtool_accepts_both_agents_metrics(mesh: Mesh) -> None:
    client, web = mesh.pod(0, "client"), mesh.pod(1, "web")
    mesh.serve(web, HTTP, "--port", "8080")
    mesh.serve(web, GRPC, "--port", "50051")
    assert _get_mix(client, web, 9, 1, 2) == {"200": 9, "500": 1}
    client.run([sys.executable, "-m", "agent.lab.grpcclient", f"{web.ip}:50051", "--ok", "2",
                "--fail", "14=1"], cwd=str(REPO), timeout=30)

    for agent in mesh.agents:
        status, text = agent.get("/metrics")
        assert status == 200 and "response_latency_ms_bucket" in text
        checked = subprocess.run(["promtool", "check", "metrics"], input=text,
                                 capture_output=True, text=True, timeout=30)
        complaints = set((checked.stdout + checked.stderr).splitlines())
        print(f"promtool on {agent.node.name}: exit {checked.returncode}, {sorted(complaints)}")
        # promtool 2.42 exits 1 on a parse error, 3 on lint problems only (it has no --lint).
        assert checked.returncode in (0, 3), complaints
        assert complaints <= {LINKERD_NAME_LINT}


# ---------------------------------------------------------------- a real Prometheus


class Prometheus:
    """A Prometheus server in a node's netns, queried over a socket made in that netns."""

    def __init__(self, mesh: Mesh, node: Node, targets: list[str]) -> None:
        self.node = node
        self.address = (node.underlay_ip, PROMETHEUS_PORT)
        self.dir = mesh.lab.workdir / "prometheus"
        self.dir.mkdir()
        config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                             "evaluation_interval": "1s"},
                  "scrape_configs": [{"job_name": "pinion",
                                      "static_configs": [{"targets": targets}]}]}
        (self.dir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.log_path = self.dir / "prometheus.log"
        self.process: subprocess.Popen[Any] | None = None

    def start(self) -> None:
        with open(self.log_path, "w") as log:
            self.process = self.node.spawn(
                ["prometheus", f"--config.file={self.dir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={self.dir / 'data'}",
                 f"--web.listen-address={self.address[0]}:{self.address[1]}",
                 "--storage.tsdb.retention.time=1h", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.process is not None:
            stop_processes([self.process])

    def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        """GET /api/v1/query; the result list (vector or matrix)."""
        params = {"query": promql, **({"time": f"{at:.3f}"} if at is not None else {})}
        sock = node_socket(self.node)
        try:
            sock.settimeout(5)
            sock.connect(self.address)
            conn = http.client.HTTPConnection(*self.address, timeout=5)
            conn.sock = sock
            conn.request("GET", f"/api/v1/query?{urlencode(params)}")
            body = json.loads(conn.getresponse().read())
        finally:
            sock.close()
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def scalar(self, promql: str, at: float | None = None) -> float | None:
        """The value of a one-element vector result; None when the result is empty."""
        result = self.query(promql, at)
        if not result:
            return None
        assert len(result) == 1, result
        return float(result[0]["value"][1])

    def wait_for(self, what: str, check: Callable[[], bool]) -> None:
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"prometheus exited: {self.log_path.read_text()[-2000:]}")
            try:
                if check():
                    return
            except OSError:
                pass  # not listening yet
            time.sleep(0.2)
        raise AssertionError(f"waited {WAIT_SECONDS}s for {what}: "
                             f"{self.log_path.read_text()[-2000:]}")


@pytest.fixture
def prometheus(mesh: Mesh) -> Iterator[Prometheus]:
    targets = [f"{agent.admin[0]}:{agent.admin[1]}" for agent in mesh.agents]
    server = Prometheus(mesh, mesh.lab.nodes[0], targets)
    try:
        server.start()
        server.wait_for("both agents to be up", lambda: sorted(
            float(r["value"][1]) for r in server.query('up{job="pinion"}')) == [1.0, 1.0])
        yield server
    finally:
        server.stop()


def _samples(prometheus: Prometheus, selector: str) -> list[tuple[float, float]]:
    """The raw samples of one series over the last minute: [(timestamp, value)]."""
    result = prometheus.query(f"{selector}[1m]")
    return [(float(t), float(v)) for t, v in result[0]["values"]] if result else []


def test_prometheus_scrapes_both_agents_and_answers_linkerds_stat_queries(
        mesh: Mesh, prometheus: Prometheus) -> None:
    client, web = mesh.pod(0, "client"), mesh.pod(1, "web")
    mesh.serve(web, HTTP, "--port", "8080")
    # A first batch makes every series exist before the main one, so increase() sees it.
    assert _get_mix(client, web, 9, 1, 1) == {"200": 9, "500": 1}
    prometheus.wait_for("the first batch on both sides", lambda: [
        prometheus.scalar(f"sum(response_total{{{labels}}})")
        for labels in (WEB_INBOUND, CLIENT_OUTBOUND)] == [10, 10])

    assert _get_mix(client, web, 81, 9, 3) == {"200": 81, "500": 9}
    prometheus.wait_for("two scrapes after the traffic", lambda: [
        value for _, value in _samples(prometheus, f"request_total{{{WEB_INBOUND}}}")
    ].count(100) >= 2 and prometheus.scalar(f"sum(request_total{{{CLIENT_OUTBOUND}}})") == 100)
    first_complete = next(t for t, v in _samples(prometheus, f"request_total{{{WEB_INBOUND}}}")
                          if v == 100)

    for labels in (WEB_INBOUND, CLIENT_OUTBOUND):  # exact, as plain instant queries
        assert prometheus.scalar(f"sum(request_total{{{labels}}})") == 100
        assert prometheus.scalar(f'sum(response_total{{{labels}, classification="success"}})') == 90
        assert prometheus.scalar(f'sum(response_total{{{labels}, classification="failure"}})') == 10
        assert prometheus.scalar(f"sum(response_latency_ms_count{{{labels}}})") == 100

    # linkerd viz stat: reqQuery, then success / (success + failure).
    outcomes = {r["metric"]["classification"]: float(r["value"][1]) for r in prometheus.query(
        f"sum(increase(response_total{{{WEB_INBOUND}}}[1m])) by (pod, classification, tls)")}
    success_rate = outcomes["success"] / (outcomes["success"] + outcomes["failure"])
    volume = prometheus.scalar(f"sum(increase(request_total{{{WEB_INBOUND}}}[1m]))")
    # linkerd viz stat: latencyQuantileQuery, at the first scrape that saw the whole batch.
    p50_irate = prometheus.scalar(
        f"histogram_quantile(0.5, sum(irate(response_latency_ms_bucket{{{WEB_INBOUND}}}[1m])) "
        "by (le, pod))", at=first_complete)
    p50_rate = prometheus.scalar(
        f"histogram_quantile(0.5, sum(rate(response_latency_ms_bucket{{{WEB_INBOUND}}}[1m])) "
        "by (le))")
    print(f"success rate {success_rate}, increase(request_total) {volume}, "
          f"p50 {p50_irate} ms (irate) / {p50_rate} ms (rate)")

    assert success_rate == pytest.approx(0.9, abs=0.02)
    assert volume is not None and 90 <= volume <= 90 * 1.5  # increase() extrapolates
    for p50 in (p50_irate, p50_rate):
        assert p50 is not None and math.isfinite(p50) and p50 > 0
