"""Damaged state cannot keep an agent down: an agent restarted over a --state-dir holding one
good pod and every kind of damaged file starts, re-adopts the good pod (whose traffic flows
again), sets the damaged files aside and reports them in /metrics and its log."""

from __future__ import annotations

import json

from agent.lab.agents import LabAgent
from tests.netns.conftest import Mesh, eventually, running_mesh

HTTP_SERVER = "agent.lab.httpserver"
DAMAGED = {
    "empty": b"",
    "truncated": b'{"namespace": "default", "na',
    "wrong-shape": b"[]",
    "null": b"null",
    "wrong-types": json.dumps({"namespace": "default", "name": "ghost", "uid": "u", "containerId": "c",
                               "netns": "/var/run/netns/none", "ips": 5}).encode(),
    "unknown-version": json.dumps({"version": 99}).encode(),
}


def restart(agent: LabAgent) -> None:
    assert agent.stop() == 0
    agent.start()


def test_an_agent_starts_over_damaged_state_and_keeps_serving_the_good_pods() -> None:
    with running_mesh("nftables") as mesh:
        check(mesh)


def check(mesh: Mesh) -> None:
    client, server = mesh.pod(0, "client"), mesh.pod(1, "server")
    mesh.serve(server, HTTP_SERVER, "--port", "8080")
    assert mesh.http(client, f"http://{server.ip}:8080/").strip() == "ok"
    agent = mesh.agents[1]
    agent.stop()
    pods = agent.state_dir / "pods"
    for name, content in DAMAGED.items():
        (pods / f"{name}.json").write_bytes(content)
    agent.start()

    assert mesh.http(client, f"http://{server.ip}:8080/").strip() == "ok"  # re-adopted
    assert agent.metrics().value("pinion_state_files_damaged_total", store="pods") == len(DAMAGED)
    assert agent.metrics().value("pinion_meshed_pods") == 1
    assert sorted(p.name for p in pods.glob("*.damaged")) == sorted(f"{n}.json.damaged" for n in DAMAGED)
    assert agent.log().count("is damaged and set aside") == len(DAMAGED)
    restart(agent)  # set aside once: the next start finds nothing to report
    assert eventually(lambda: agent.metrics().value("pinion_meshed_pods") == 1)
    assert agent.metrics().value("pinion_state_files_damaged_total", store="pods") == 0
