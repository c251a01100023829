"""An agent relaying many short HTTP/1 connections leaves no TIME_WAIT sockets of its own.

When a client closes first (curl, ab, h2load, most HTTP/1 clients after their last
response), the agent's socket to the pod's app used to send the next FIN, and so sat in
TIME_WAIT for 60 s: ~240 B of kernel memory charged to the agent's memory cgroup per
connection (12,000 of them after a 20 s burst in bench/overload.py; 14 MiB at a steady
1,000 new connections/s). Between messages the agent now closes that idle socket with RST:
nothing is lost, nothing is counted as failed, and no TIME_WAIT is left."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.identity.files import init_identity_dir
from agent.lab.topology import Pod
from tests.netns.conftest import eventually, running_mesh

CONNECTIONS = 30
APP_PORT = 8080


def _agent_time_wait(pod: Pod) -> list[str]:
    """TIME_WAIT sockets in the pod's netns not on the app's port: the agent's side."""
    out = pod.run(["ss", "-Htn", "state", "time-wait"]).stdout
    return [line for line in out.splitlines()
            if line.split() and not line.split()[2].endswith(f":{APP_PORT}")]


@pytest.mark.parametrize("tls", [True, False], ids=["mtls", "plaintext"])
def test_short_http1_connections_leave_no_time_wait_at_the_agent(tmp_path: Path, tls: bool) -> None:
    identity = None
    if tls:
        identity = tmp_path / "identity"
        init_identity_dir(identity, trust_domain="cluster.local")
    args = ["--identity-dir", str(identity)] if identity is not None else []
    with running_mesh("nftables", args, identity_dir=identity) as mesh:
        client, server = mesh.pod(0, "curl"), mesh.pod(1, "web")
        mesh.serve(server, "agent.lab.httpserver", "--port", str(APP_PORT))
        url = f"http://{server.ip}:{APP_PORT}/bytes/100"
        # a new curl per request: a new connection each, closed by curl after its response
        loop = (f"for i in $(seq {CONNECTIONS}); do curl -sS --max-time 10 -o /dev/null "
                f"-w '%{{http_code}}\\n' {url}; done")
        argv = ["sh", "-c", loop]
        codes = client.run(argv, timeout=60).stdout.split()
        assert codes == ["200"] * CONNECTIONS
        inbound = mesh.agents[1]
        assert eventually(lambda: inbound.metrics().value(
            "tcp_close_total", pod=server.name, direction="inbound", peer="src") == CONNECTIONS, 10)
        metrics = inbound.metrics()
        assert metrics.value("tcp_close_total", pod=server.name, direction="inbound",
                             classification="failure") == 0
        assert metrics.value("response_total", pod=server.name, direction="inbound",
                             classification="success") == CONNECTIONS
        assert _agent_time_wait(server) == []
        # the app's own sockets saw an RST, not a FIN: none of them is in TIME_WAIT either
        server_side = server.run(["ss", "-Htn", "state", "time-wait"]).stdout.split("\n")
        assert len([line for line in server_side if line.strip()]) == 0
