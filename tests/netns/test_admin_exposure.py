"""The admin endpoint as another node sees it: /pods names the pods and says whether capture
works, but holds no netns path, pod IP, allowed client or capture exclusion; the node
itself (a hostNetwork agent asking its own IP, as `kubectl exec` into the agent would) gets
all of it. `pinion check` from another node stays green on the public view."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys

import pytest

from agent.lab.agents import REPO, LabAgent, node_socket
from agent.lab.topology import Node
from tests.netns.conftest import Mesh

pytestmark = pytest.mark.netns

HIDDEN = ("uid", "containerId", "netns", "ips", "opaquePorts", "inboundPolicy", "allowedClients",
          "cgroup", "capture")


@pytest.fixture
def backend() -> str:
    return "nftables"


def pods_seen_from(node: Node, agent: LabAgent) -> list[dict[str, object]]:
    """GET /pods over a socket made in `node`'s netns."""
    sock = node_socket(node)
    try:
        sock.settimeout(5)
        sock.connect(agent.admin)
        connection = http.client.HTTPConnection(*agent.admin, timeout=5)
        connection.sock = sock
        connection.request("GET", "/pods")
        response = connection.getresponse()
        assert response.status == 200
        entries: list[dict[str, object]] = json.loads(response.read())
        return entries
    finally:
        sock.close()


def test_pods_in_full_on_the_node_and_public_from_another_node(mesh: Mesh) -> None:
    web = mesh.pod(0, "web", PINION_ALLOWED_CLIENTS="spiffe://cluster.local/ns/default/sa/cart")
    here, there = mesh.lab.nodes

    [local] = pods_seen_from(here, mesh.agents[0])
    [remote] = pods_seen_from(there, mesh.agents[0])

    assert local["netns"] == web.netns_path and web.ip in local["ips"]  # type: ignore[operator]
    assert (remote["namespace"], remote["name"], remote["listening"]) == (web.namespace, web.name, True)
    assert not set(HIDDEN) & set(remote), remote
    assert web.ip not in json.dumps(remote) and web.netns_path not in json.dumps(remote)


def test_pinion_check_from_another_node_is_green_on_the_public_view(mesh: Mesh) -> None:
    mesh.pod(0, "web")
    agent = mesh.agents[0]
    checked = mesh.lab.nodes[1].run(
        [sys.executable, "-m", "agent", "check", "--agent", f"{agent.admin[0]}:{agent.admin[1]}"],
        cwd=str(REPO), timeout=60, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "✓ every meshed pod is listening" in checked.stdout


def test_pinion_check_runs_from_the_node_too(mesh: Mesh) -> None:
    mesh.pod(0, "web")
    agent = mesh.agents[0]
    checked: subprocess.CompletedProcess[str] = mesh.lab.nodes[0].run(
        [sys.executable, "-m", "agent", "check", "--agent", f"{agent.admin[0]}:{agent.admin[1]}"],
        cwd=str(REPO), timeout=60, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
