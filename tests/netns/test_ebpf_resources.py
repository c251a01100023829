"""What eBPF capture costs the node in kernel memory: maps sized for the node (not for the
object's ceilings), that memory reported on /metrics, and nothing left pinned when `auto`
loads the programs but then cannot use them (here: the agent's own cgroup cannot be found)."""

from __future__ import annotations

import json
import subprocess

import pytest

from agent.lab.agents import LabAgent
from agent.lab.topology import Lab


def test_a_fallback_from_ebpf_unpins_what_it_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    agents: list[LabAgent] = []
    with Lab(nodes=1, extra_plugins=lambda node: [agents[0].plugin_config()]) as lab:
        monkeypatch.setenv("PINION_POD_UID", "no-such-pod")  # the agent's pod cannot be found
        agent = LabAgent(lab, lab.nodes[0], redirect="auto")
        agents.append(agent)
        try:
            agent.start()
            pod = lab.add_pod(lab.nodes[0], "web")
            assert json.loads(agent.get("/pods")[1])[0]["backend"] == "nftables"
            assert "not ebpf" in agent.log() and "no-such-pod" in agent.log()
            pinned = [p.name for p in agent.bpf_dir.rglob("*")] if agent.bpf_dir.exists() else []
            assert pinned == [], pinned
            assert pod.ip
        finally:
            agent.stop()


def test_the_maps_are_sized_for_the_node_and_their_memory_is_reported() -> None:
    agents: list[LabAgent] = []
    with Lab(nodes=1, extra_plugins=lambda node: [agents[0].plugin_config()]) as lab:
        agent = LabAgent(lab, lab.nodes[0], redirect="ebpf", extra_args=["--bpf-max-pods", "64"])
        agents.append(agent)
        try:
            agent.start()
            lab.add_pod(lab.nodes[0], "web")
            sizes = {path.name: _max_entries(path) for path in agent.bpf_dir.rglob("*")
                     if path.name in ("pod_config", "skip_ports", "by_cookie", "by_port", "stats")}
            assert sizes == {"pod_config": 64, "stats": 64, "skip_ports": 64 * 16,
                             "by_cookie": 8192, "by_port": 8192}
            reported = {s.labels["map"]: s.value for s in agent.metrics().samples
                        if s.name == "pinion_ebpf_map_bytes"}
            assert set(reported) == {"pod_config", "skip_ports", "skip_cidrs", "by_cookie", "by_port",
                                     "stats"}
            # the object's ceilings (1,024 pods, 65,536 connects) held ~12 MiB
            assert 0 < sum(reported.values()) < 2.5 * 1024 * 1024, reported
        finally:
            agent.stop()


def _max_entries(pin: object) -> int:
    shown = subprocess.run(["bpftool", "-j", "map", "show", "pinned", str(pin)], capture_output=True,
                           text=True, check=True).stdout
    return int(json.loads(shown)["max_entries"])
