"""One idle agent's memory: a one-node lab, the agent started as the lab starts it (the
checkout this interpreter imports `agent` from: put another checkout first on PYTHONPATH to
measure it), no pods, 3 s after it is ready; VmRSS, RssAnon, RssFile and PSS of its process,
the median of --samples starts per capture mode.

    sudo .venv/bin/python bench/idle_memory.py [--modes nftables iptables] [--samples 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

if not os.environ.get("PYTHONPATH"):  # else the checkout named there (the agent inherits it)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.lab.agents import LabAgent, start_agents, stop_agents
from agent.lab.topology import Lab

FIELDS = ("VmRSS", "RssAnon", "RssFile", "Pss")


def measure(pid: int) -> dict[str, float]:
    """MiB of FIELDS for one process."""
    found: dict[str, float] = {}
    for path in (f"/proc/{pid}/status", f"/proc/{pid}/smaps_rollup"):
        with open(path) as source:
            for line in source:
                key, _, value = line.partition(":")
                if key in FIELDS:
                    found[key] = int(value.split()[0]) / 1024
    return found


def one_agent(mode: str, settle: float) -> dict[str, float]:
    agents: list[LabAgent] = []
    lab = Lab(nodes=1, extra_plugins=lambda node: [agents[node.index].plugin_config()])
    try:
        agents.append(LabAgent(lab, lab.nodes[0], redirect=mode))
        start_agents(agents)
        time.sleep(settle)
        process = agents[0].process
        assert process is not None
        return measure(process.pid)
    finally:
        stop_agents(agents)
        lab.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", default=["nftables"])
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds after ready")
    args = parser.parse_args()
    import agent

    print(f"agent from {Path(agent.__file__).resolve().parent}; median of {args.samples} starts, MiB\n")
    print("| capture | " + " | ".join(FIELDS) + " |")
    print("|---|" + "---:|" * len(FIELDS))
    for mode in args.modes:
        runs = [one_agent(mode, args.settle) for _ in range(args.samples)]
        print(f"| {mode} | " + " | ".join(f"{statistics.median(run[f] for run in runs):.1f}"
                                          for f in FIELDS) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
