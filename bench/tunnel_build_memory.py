"""An idle agent's memory with the compiled tunnel framing and with the Python one.

One lab node (root: a netns and a cgroup, removed at the end), one `pinion agent` at a time,
alternately with the mypyc build and with PINION_PURE_PYTHON=1; RSS and PSS from
/proc/<pid>/smaps_rollup 3 s after the agent is ready, as each agent's log names its build.

    sudo python bench/tunnel_build_memory.py [rounds]        (~10 s per round)
"""

from __future__ import annotations

import statistics
import sys
import time

from agent.lab.agents import LabAgent
from agent.lab.topology import Lab


def rollup(pid: int) -> dict[str, int]:
    """Rss and Pss in KiB."""
    found = {}
    with open(f"/proc/{pid}/smaps_rollup") as lines:
        for line in lines:
            name, value, *_ = line.split()
            if name in ("Rss:", "Pss:"):
                found[name[:-1]] = int(value)
    return found


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    samples: dict[str, list[dict[str, int]]] = {}
    lab = Lab(nodes=1)
    try:
        for index in range(rounds):
            for pure in ("0", "1"):
                agent = LabAgent(lab, lab.nodes[0], environment={"PINION_PURE_PYTHON": pure},
                                 log_name=f"agent-{index}-{pure}.log")
                agent.start()
                time.sleep(3)
                assert agent.process is not None
                memory = rollup(agent.process.pid)
                build = [line for line in agent.log().splitlines()
                         if "tunnel framing:" in line][-1].split("tunnel framing: ")[-1]
                agent.stop()
                samples.setdefault(build, []).append(memory)
                print(f"round {index + 1}: {build}: RSS {memory['Rss']} KiB, PSS {memory['Pss']} KiB",
                      flush=True)
    finally:
        lab.close()
    for build, rows in samples.items():
        print(f"{build}: median RSS {statistics.median(r['Rss'] for r in rows):,.0f} KiB, "
              f"PSS {statistics.median(r['Pss'] for r in rows):,.0f} KiB")


if __name__ == "__main__":
    main()
