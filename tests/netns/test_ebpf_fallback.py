"""`--redirect auto` that loads the eBPF programs but then cannot use them (here: the agent's
own cgroup cannot be found) falls back to netfilter and leaves nothing pinned: the maps'
kernel memory is not kept for a backend nobody uses."""

from __future__ import annotations

import json

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
