"""A scrape leaves no memory behind: with 50 meshed pods (thousands of series) the agent's RSS
after five scrapes of /metrics is where it was before the first, not a few MiB higher (the
exposition's small strings are freed, collected and trimmed back to the kernel)."""

from __future__ import annotations

import time

from agent.lab.agents import LabAgent
from agent.lab.topology import Lab

MIB = 1024 * 1024


def test_scrapes_do_not_leave_memory_behind() -> None:
    agents: list[LabAgent] = []
    with Lab(nodes=1, extra_plugins=lambda node: [agents[0].plugin_config()]) as lab:
        agent = LabAgent(lab, lab.nodes[0])
        agents.append(agent)
        try:
            agent.start()
            pods = [lab.add_pod(lab.nodes[0], f"p{index}") for index in range(50)]
            for index, pod in enumerate(pods):  # a series or two per pod pair
                neighbour = pods[(index + 1) % len(pods)]
                pod.run(["curl", "-s", "-m", "1", f"http://{neighbour.ip}:9/"], check=False)
            time.sleep(1)
            before = agent.rss_bytes()
            sizes = [len(agent.get("/metrics")[1]) for _ in range(5)]
            time.sleep(0.5)
            assert min(sizes) > 100_000  # a real exposition, not an empty one
            assert agent.rss_bytes() - before < 1 * MIB, (before, agent.rss_bytes())
        finally:
            agent.stop()
