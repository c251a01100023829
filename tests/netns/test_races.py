"""Start-up races between the runtime, the plugin and the agent: every pod ends up captured,
or cleanly refused, and nothing leaks."""

from __future__ import annotations

import json
import subprocess
import threading
import time

import pytest

from agent.lab.cni import CniError
from agent.lab.topology import Pod
from tests.netns.conftest import Mesh, after_capture, capture_rules

pytestmark = pytest.mark.netns


def _captured(mesh: Mesh, node: int = 0) -> set[str]:
    return {p["name"] for p in json.loads(mesh.agents[node].get("/pods")[1])}


def _has_rules(pod: Pod) -> bool:
    """Outbound capture in place: the netfilter rule, or the connect4 program (ebpf)."""
    return any(marker in rule for rule in capture_rules(pod)
               for marker in ("pinion/outbound-capture", "pinion_connect4"))


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_a_pod_refused_while_the_agent_was_down_is_captured_when_the_runtime_retries(
        mesh: Mesh) -> None:
    mesh.agents[0].stop()
    with pytest.raises(CniError) as refused:
        mesh.pod(0, "web")
    assert refused.value.code == 11  # "try again later": kubelet retries the sandbox

    mesh.agents[0].start()
    pod = mesh.pod(0, "web")  # the retry

    assert _captured(mesh) == {"web"} and _has_rules(pod)


def test_an_agent_restart_during_a_burst_of_adds(mesh: Mesh) -> None:
    """Kill the agent in the middle of a burst, start it again: each ADD either succeeded
    (and the pod is captured again after the restart) or failed cleanly (no netns left)."""
    added: list[Pod] = []
    failed: list[str] = []

    def add(index: int) -> None:
        try:
            added.append(mesh.pod(0, f"burst{index}"))
        except CniError:
            failed.append(f"burst{index}")

    threads = [threading.Thread(target=add, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
        time.sleep(0.01)
    mesh.agents[0].stop(sig=9)
    for thread in threads:
        thread.join(60)
    mesh.agents[0].start()

    assert len(added) + len(failed) == 16
    assert _captured(mesh) == {pod.name for pod in added}
    assert all(_has_rules(pod) for pod in added)
    leftovers = {name for name in _netns_names() if name.startswith(f"pn{mesh.lab.run_id}-")}
    assert not {name for name in leftovers if any(name.endswith(f"-{f}") for f in failed)}


def test_two_adds_for_the_same_pod_at_once_capture_it_once(mesh: Mesh) -> None:
    pod = mesh.pod(0, "web")
    mesh.plugin("DEL", pod)  # start from an uncaptured pod that keeps its netns
    assert _captured(mesh) == set()

    results: list[subprocess.CompletedProcess[str]] = []
    threads = [threading.Thread(target=lambda: results.append(
        mesh.plugin("ADD", pod, prev_result=pod.result))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert [r.returncode for r in results] == [0, 0], [r.stdout for r in results]
    assert _captured(mesh) == {"web"} and _has_rules(pod)
    listeners = subprocess.run(["ip", "netns", "exec", pod.netns, "ss", "-Hltn"],
                               capture_output=True, text=True).stdout
    assert listeners.count(":15006 ") == 1


def test_del_after_the_netns_is_gone_succeeds_and_forgets_the_pod(mesh: Mesh) -> None:
    pod = mesh.pod(0, "web")
    subprocess.run(["ip", "netns", "del", pod.netns], check=True)

    done = mesh.plugin("DEL", pod)

    assert done.returncode == 0, done.stdout + done.stderr
    assert _captured(mesh) == set()
    assert list(mesh.agents[0].state_dir.glob("pods/*.json")) == []
    subprocess.run(["ip", "netns", "add", pod.netns], check=True)  # let the lab tidy up as usual


# What varies here is the chain and the prevResult format pinion-cni reads, not the capture
# (each backend's capture of a pod is tested above): one backend (conftest.after_capture).
@after_capture
@pytest.mark.parametrize("cni_version", ["0.4.0", "1.0.0"])
def test_portmap_in_the_chain_and_either_result_version(mesh: Mesh, cni_version: str) -> None:
    """bridge -> portmap -> pinion-cni: pinion-cni reads prevResult in both formats."""
    agents = mesh.agents
    mesh.lab._extra_plugins = lambda node: [
        {"type": "portmap", "capabilities": {"portMappings": True}},
        agents[node.index].plugin_config()]
    pod = mesh.lab.add_pod(mesh.lab.nodes[0], "web", cni_version=cni_version)

    assert pod.result["cniVersion"] == cni_version
    assert _captured(mesh) == {"web"} and _has_rules(pod)
    mesh.lab.check_pod(pod)
