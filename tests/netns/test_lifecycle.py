"""Pod and agent lifecycle: CHECK, uninstall, backend detection, fail-open, bursts."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from agent.lab.agents import REPO, LabAgent
from agent.lab.cni import CniError
from agent.lab.topology import Lab, Pod
from tests.netns.conftest import Mesh, after_capture, capture_rules, cgroup_programs, outbound_capture

pytestmark = pytest.mark.netns


def _pinion_rules(pod: Pod) -> str:
    return "\n".join(capture_rules(pod))


def _pod_names(agent: LabAgent) -> list[str]:
    return sorted(p["name"] for p in json.loads(agent.get("/pods")[1]))


def test_check_passes_for_a_captured_pod_and_names_what_is_missing(mesh: Mesh,
                                                                    backend: str) -> None:
    pod = mesh.pod(0, "web")
    mesh.lab.check_pod(pod)

    if backend == "ebpf":  # the outbound capture is the connect4 program on the pod's cgroup
        [connect4] = [p for p in cgroup_programs(pod.cgroup_path) if p["name"] == "pinion_connect4"]
        subprocess.run(["bpftool", "cgroup", "detach", str(pod.cgroup_path), "connect4",
                        "id", str(connect4["id"])], check=True)
    else:
        flush = (["nft", "delete", "table", "ip", "pinion"] if backend == "nftables"
                 else ["iptables-legacy", "-t", "nat", "-F", "PINION_OUTPUT"])
        subprocess.run(["ip", "netns", "exec", pod.netns, *flush], check=True)

    with pytest.raises(CniError) as failure:
        mesh.lab.check_pod(pod)
    assert "pinion/outbound-capture missing" in failure.value.msg


def test_a_repeated_add_is_harmless(mesh: Mesh) -> None:
    pod = mesh.pod(0, "web")
    before = _pinion_rules(pod)
    reply = _send(mesh.agents[0], {"command": "ADD", "containerId": pod.container_id,
                                    "netns": pod.netns_path, "ips": [pod.ip],
                                    "args": {"K8S_POD_NAMESPACE": "default",
                                             "K8S_POD_NAME": "web"}})
    assert reply == {"ok": True}
    assert _pinion_rules(pod) == before
    assert _pod_names(mesh.agents[0]) == ["web"]


# A DEL for nobody touches no backend: one is enough (conftest.after_capture).
@after_capture
def test_del_for_a_pod_never_seen_succeeds(mesh: Mesh) -> None:
    assert _send(mesh.agents[0], {"command": "DEL", "containerId": "never-seen"}) == {"ok": True}


def test_a_burst_of_adds_captures_every_pod(mesh: Mesh, backend: str) -> None:
    pods: list[Pod] = []
    errors: list[BaseException] = []

    def add(index: int) -> None:
        try:
            pods.append(mesh.pod(0, f"burst{index}"))
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert _pod_names(mesh.agents[0]) == sorted(f"burst{i}" for i in range(12))
    assert all(outbound_capture(backend) in _pinion_rules(pod) for pod in pods)


@pytest.fixture
def lone_node() -> Iterator[tuple[Lab, list[LabAgent]]]:
    agents: list[LabAgent] = []
    lab = Lab(nodes=1, extra_plugins=lambda node: [agents[0].plugin_config()])
    try:
        yield lab, agents
    finally:
        for agent in agents:
            agent.stop()
        lab.close()


def test_cleanup_on_shutdown_removes_every_rule_and_forgets_the_pods(
        lone_node: tuple[Lab, list[LabAgent]]) -> None:
    lab, agents = lone_node
    agents.append(LabAgent(lab, lab.nodes[0], extra_args=["--cleanup"]).start())
    pods = [lab.add_pod(lab.nodes[0], f"web{i}") for i in range(3)]
    assert all(_pinion_rules(pod) for pod in pods)

    assert agents[0].stop() == 0

    assert [_pinion_rules(pod) for pod in pods] == ["", "", ""]
    assert list(agents[0].state_dir.glob("pods/*.json")) == []


@pytest.mark.parametrize("node_uses_legacy", [True, False])
def test_auto_prefers_ebpf_and_its_inbound_rules_follow_the_node(
        lone_node: tuple[Lab, list[LabAgent]], node_uses_legacy: bool) -> None:
    lab, agents = lone_node
    node = lab.nodes[0]
    if node_uses_legacy:
        node.run(["iptables-legacy", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT"])
    agents.append(LabAgent(lab, node, redirect="auto").start())

    pod = lab.add_pod(node, "web")

    assert json.loads(agents[0].get("/pods")[1])[0]["backend"] == "ebpf"
    rules = _pinion_rules(pod)
    assert "pinion_connect4" in rules
    assert ("-A PINION_INBOUND" in rules) == node_uses_legacy
    assert ("pinion/inbound-capture" in rules) and "pinion/outbound-capture" not in rules


@pytest.mark.parametrize("node_uses_legacy", [True, False])
def test_auto_without_ebpf_follows_the_backend_the_node_uses(
        lone_node: tuple[Lab, list[LabAgent]], node_uses_legacy: bool) -> None:
    lab, agents = lone_node
    node = lab.nodes[0]
    if node_uses_legacy:
        node.run(["iptables-legacy", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT"])
    no_object = str(lab.workdir / "missing.o")  # as on a node where the programs cannot load
    agents.append(LabAgent(lab, node, redirect="auto", extra_args=["--bpf-object", no_object]).start())

    pod = lab.add_pod(node, "web")

    expected = "iptables" if node_uses_legacy else "nftables"
    assert json.loads(agents[0].get("/pods")[1])[0]["backend"] == expected
    assert ("-A PINION_OUTPUT" in _pinion_rules(pod)) == node_uses_legacy
    reasons = [line for line in agents[0].log().splitlines() if "redirect:" in line]
    assert len(reasons) == 1 and f"redirect: {expected}, not ebpf" in reasons[0]
    assert "missing.o" in reasons[0]


def test_fail_open_starts_the_pod_and_the_returning_agent_captures_it(
        lone_node: tuple[Lab, list[LabAgent]]) -> None:
    lab, agents = lone_node
    agent = LabAgent(lab, lab.nodes[0], fail_policy="open")
    agents.append(agent)  # not started: the agent is away when the pod comes

    pod = lab.add_pod(lab.nodes[0], "early")

    assert _pinion_rules(pod) == ""  # it started uncaptured, as fail-open allows
    assert [p.name for p in agent.pending_dir.glob("*.json")] == [f"{pod.container_id}.json"]
    agent.start()
    assert _pod_names(agent) == ["early"]
    assert "pinion/outbound-capture" in _pinion_rules(pod)
    assert list(agent.pending_dir.glob("*.json")) == []


def _send(agent: LabAgent, request: dict[str, object]) -> dict[str, object]:
    import socket

    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(15)
        conn.connect(str(agent.cni_socket))
        conn.sendall(json.dumps(request).encode() + b"\n")
        return dict(json.loads(conn.makefile("rb").readline()))


def test_sweep_releases_a_pod_whose_netns_vanished_without_del(mesh: Mesh) -> None:
    """The runtime lost the DEL: the agent notices the netns is gone and lets the pod go."""
    subprocess.run(["ip", "netns", "add", f"pn{mesh.lab.run_id}-orphan"], check=True)
    assert mesh.lab.cgroup_root is not None
    cgroup = mesh.lab.cgroup_root / "orphan"  # eBPF capture needs the pod's cgroup
    cgroup.mkdir()
    try:
        reply = _send(mesh.agents[0], {
            "command": "ADD", "containerId": "orphan",
            "netns": f"/var/run/netns/pn{mesh.lab.run_id}-orphan",
            "args": {"K8S_POD_NAMESPACE": "default", "K8S_POD_NAME": "orphan",
                     "PINION_CGROUP": str(cgroup)}})
        assert reply == {"ok": True}
    finally:
        subprocess.run(["ip", "netns", "del", f"pn{mesh.lab.run_id}-orphan"], check=True)
    deadline = time.monotonic() + 30
    while _pod_names(mesh.agents[0]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _pod_names(mesh.agents[0]) == []
    assert [p for p in cgroup_programs(cgroup) if str(p["name"]).startswith("pinion_")] == []
    cgroup.rmdir()


def test_kubelet_probes_are_not_captured(lone_node: tuple[Lab, list[LabAgent]]) -> None:
    """Probes come from the node: from the pod's gateway (cni0) by default, or from an
    address named with --probe-sources. Any other source on the node is captured."""
    lab, agents = lone_node
    node = lab.nodes[0]
    agent = LabAgent(lab, node, extra_args=["--probe-sources", "10.42.0.250"]).start()
    agents.append(agent)
    web = lab.add_pod(node, "web")
    server = web.spawn([sys.executable, "-m", "agent.lab.httpserver", "--port", "8080"],
                       stdout=subprocess.PIPE, text=True, cwd=str(REPO))
    assert server.stdout is not None and server.stdout.readline().strip() == "listening"
    node.run(["ip", "addr", "add", "10.42.0.250/24", "dev", "cni0"])
    node.run(["ip", "addr", "add", "10.42.0.251/24", "dev", "cni0"])

    def probe(source: str) -> str:
        return str(node.run(["curl", "-sS", "--max-time", "5", "--interface", source,
                             f"http://{web.ip}:8080/whoami"]).stdout).strip()

    assert probe(node.gateway_ip) == node.gateway_ip
    assert probe("10.42.0.250") == "10.42.0.250"
    assert agent.metrics().value("tcp_open_total", direction="inbound") == 0
    assert probe("10.42.0.251") == "10.42.0.251"  # not a probe source: captured
    assert agent.metrics().value("tcp_open_total", direction="inbound") == 1


def test_the_cni_socket_is_for_root_only(lone_node: tuple[Lab, list[LabAgent]]) -> None:
    lab, agents = lone_node
    agent = LabAgent(lab, lab.nodes[0])
    agent.cni_socket = agent.dir / "run" / "cni.sock"  # a directory the agent must create
    agents.append(agent.start())

    assert agent.cni_socket.is_socket()
    assert agent.cni_socket.stat().st_mode & 0o777 == 0o600
    assert agent.cni_socket.parent.stat().st_mode & 0o777 == 0o700
