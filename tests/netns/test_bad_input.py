"""Bad input gets a clear error, leaves nothing half-applied, and other pods keep working."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time

import pytest

from agent.lab.cni import CniError
from tests.netns.conftest import Mesh, capture_rules

pytestmark = pytest.mark.netns

HTTP = "agent.lab.httpserver"


def _agent_request(mesh: Mesh, payload: bytes) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(15)
        conn.connect(str(mesh.agents[0].cni_socket))
        conn.sendall(payload)
        return dict(json.loads(conn.makefile("rb").readline()))


def _still_serving(mesh: Mesh) -> None:
    """A meshed pod added before the trouble still reaches a server through the agent."""
    client, web = mesh.lab.pods[0], mesh.lab.pods[1]
    assert mesh.http(client, f"http://{web.ip}:8080/").strip() == "ok"
    assert mesh.agents[0].get("/ready")[0] == 200


def _make_busy(mesh: Mesh) -> Mesh:
    mesh.pod(0, "client")
    mesh.serve(mesh.pod(1, "web", meshed=False), HTTP, "--port", "8080")
    return mesh


@pytest.fixture
def busy_mesh(mesh: Mesh) -> Mesh:
    """A mesh of the test's own: for tests that stop the agent or race the sweep."""
    return _make_busy(mesh)


@pytest.fixture(scope="module")
def module_busy_mesh(module_mesh: Mesh) -> Mesh:
    return _make_busy(module_mesh)


@pytest.fixture
def shared_busy_mesh(module_busy_mesh: Mesh, shared_mesh: Mesh) -> Mesh:
    """One busy mesh for the tests of input refused before any pod or rule changes: each
    still checks that the agent holds exactly the one pod and keeps serving it. Refused
    input reaches no capture backend: one (nftables) is enough."""
    return shared_mesh


@pytest.mark.parametrize("garbage", [b"{not json\n", b"[1,2]\n", b"\xff\xfe\n",
                                     b'{"command":"ADD"}\n', b'{"command":"FROB"}\n'])
def test_garbage_on_the_cni_socket_gets_an_error_and_changes_nothing(
        shared_busy_mesh: Mesh, garbage: bytes) -> None:
    reply = _agent_request(shared_busy_mesh, garbage)
    assert reply["ok"] is False and reply["code"] in (4, 6)
    assert isinstance(reply["msg"], str) and reply["msg"]
    assert len(json.loads(shared_busy_mesh.agents[0].get("/pods")[1])) == 1
    _still_serving(shared_busy_mesh)


def test_a_missing_netns_is_a_clear_cni_error(shared_busy_mesh: Mesh) -> None:
    request = {"command": "ADD", "containerId": "c0ffee", "netns": "/var/run/netns/pn-nope",
               "args": {"K8S_POD_NAMESPACE": "default", "K8S_POD_NAME": "ghost"}}
    reply = _agent_request(shared_busy_mesh, json.dumps(request).encode() + b"\n")
    assert reply["ok"] is False and reply["code"] == 3
    assert "/var/run/netns/pn-nope" in str(reply["msg"])
    _still_serving(shared_busy_mesh)


def test_an_absent_agent_fails_the_pod_closed_and_leaves_no_netns(busy_mesh: Mesh) -> None:
    busy_mesh.agents[0].stop()
    with pytest.raises(CniError) as failure:
        busy_mesh.pod(0, "late")
    assert failure.value.code == 11
    assert "not reachable" in failure.value.msg
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    ours = [line.split()[0] for line in listed.splitlines()  # this lab's (other labs may run)
            if line.startswith(f"pn{busy_mesh.lab.run_id}-")]
    assert ours and not [name for name in ours if "late" in name], ours


def test_a_pod_deleted_during_add_leaves_nothing_behind(busy_mesh: Mesh) -> None:
    """Race ADDs against the netns disappearing; whatever wins, the agent stays consistent."""
    agent = busy_mesh.agents[0]
    outcomes = []
    for attempt in range(8):
        name = f"pn{busy_mesh.lab.run_id}-race{attempt}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        try:
            killer = threading.Timer(0.002 * attempt, subprocess.run,
                                     (["ip", "netns", "del", name],))
            killer.start()
            request = {"command": "ADD", "containerId": f"race{attempt}",
                       "netns": f"/var/run/netns/{name}",
                       "args": {"K8S_POD_NAMESPACE": "default", "K8S_POD_NAME": f"race{attempt}"}}
            outcomes.append(_agent_request(busy_mesh, json.dumps(request).encode() + b"\n")["ok"])
            killer.join()
        finally:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
    # Pods whose netns is gone are released by the sweep, or were never taken.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        names = [p["name"] for p in json.loads(agent.get("/pods")[1])]
        if names == ["client"]:
            break
        time.sleep(0.2)
    assert names == ["client"], outcomes
    assert not list(agent.state_dir.glob("pods/race*.json"))
    _still_serving(busy_mesh)


def test_restarting_with_the_other_backend_never_mixes_them(busy_mesh: Mesh, backend: str) -> None:
    agent = busy_mesh.agents[0]
    client = busy_mesh.lab.pods[0]
    other = "iptables" if backend == "nftables" else "nftables"
    agent.stop()
    agent.redirect = other
    agent.start()

    rules = capture_rules(client)
    iptables_rules = [rule for rule in rules if rule.startswith("-A ")]
    assert rules and (iptables_rules == rules if other == "iptables" else iptables_rules == [])
    _still_serving(busy_mesh)


def test_plugin_rejects_malformed_cni_json_before_reaching_the_agent(shared_busy_mesh: Mesh) -> None:
    pod_env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "x1", "CNI_NETNS": "/var/run/netns/x",
               "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni", "PATH": "/usr/bin:/bin"}
    plugin = shared_busy_mesh.agents[0].plugin_config()["_path"]
    done = subprocess.run([plugin], input="{oops", env=pod_env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    assert json.loads(done.stdout)["code"] == 6
    _still_serving(shared_busy_mesh)
