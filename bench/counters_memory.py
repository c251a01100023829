"""What the counters (agent/core/counters.py) cost in memory, compiled by mypyc and as Python.

    python bench/counters_memory.py burst [--series N] [--requests N]
        In one process, each build counts a burst of requests (a connection each: opened,
        41 bytes read, 1,350 written, closed; a request started and finished) over N label
        sets; printed: blocks allocated during the burst and still alive (tracemalloc), the
        change of sys.getallocatedblocks() and of gc-tracked objects. Twice: into series
        that exist already (what a busy node's burst is), and into series the burst makes.

    python bench/counters_memory.py arenas [--series N] [--requests N]
        Whether the counters pin pymalloc arenas (issue #21): each build, in a fresh process,
        counts the burst into existing series while the burst holds other small objects
        (a tuple, an int, a float and a list per request, as queued work would), then drops
        them; printed: pymalloc's arenas (sys._debugmallocstats) before, at the peak and
        after, and the same burst held without counting anything.

    sudo python bench/counters_memory.py idle --tree NAME=PATH [--tree ...] [--rounds N]
        An idle agent's RSS and PSS (/proc/<pid>/smaps_rollup, 3 s after it is ready) from
        each checkout in turn (its in-place builds), one lab node (netns, removed at the end),
        the checkouts alternated round by round; each agent's log names its builds.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def builds() -> dict[str, Any]:
    """{"compiled (mypyc)": telemetry module, "python": telemetry module on Python counters}."""
    sys.path.insert(0, str(REPO))
    from agent.core import compiled, telemetry
    from tests.unit.counters_builds import python_build

    if compiled.counters_build() != "compiled (mypyc)":
        sys.exit("agent.core.counters is not compiled here (pip install -e . / setup.py build_ext --inplace)")
    return {"compiled (mypyc)": telemetry, "python": python_build().telemetry}


def burst(module: Any, series: int, requests: int, warm: bool) -> tuple[int, int, int]:
    from agent.core.accounting import Record

    telemetry = module.Telemetry(time.monotonic, 60.0)
    tcp = [module.TcpLabels("inbound", "default", f"pod-{index}") for index in range(series)]
    http = [module.HttpLabels("inbound", "default", f"pod-{index}") for index in range(series)]
    ok = [Record("success", 200, None, 0.4 + (index % 7)) for index in range(16)]
    failed = Record("failure", 503, None, 12.0)

    def count(index: int) -> None:
        record = telemetry.open(tcp[index % series])
        record.read(41)
        record.wrote(1350)
        record.close(False)
        counters = telemetry.http(http[index % series])
        counters.requests += 1
        counters.record(failed if index // series % 2 else ok[index % 16])

    if warm:
        for index in range(series * 2):
            count(index)
    gc.collect()
    blocks, objects = sys.getallocatedblocks(), len(gc.get_objects())
    tracemalloc.start()
    for index in range(requests):
        count(index)
    snapshot = tracemalloc.take_snapshot()
    tracemalloc.stop()
    gc.collect()
    left = sum(stat.count for stat in snapshot.statistics("filename"))
    return left, sys.getallocatedblocks() - blocks, len(gc.get_objects()) - objects


def arenas() -> int:
    """pymalloc's arenas allocated now (sys._debugmallocstats writes to the C stderr)."""
    with tempfile.TemporaryFile() as captured:
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        for line in captured.read().decode().splitlines():
            if line.startswith("# arenas allocated current"):
                return int(line.split("=")[1].replace(",", ""))
    raise RuntimeError("no arena count from sys._debugmallocstats")


def held_burst(module: Any, series: int, requests: int) -> tuple[int, int, int]:
    """(arenas before, at the peak, after) of a burst counted while other objects are held."""
    from agent.core.accounting import Record

    telemetry = module.Telemetry(time.monotonic, 60.0) if module is not None else None
    pods = [f"pod-{index}" for index in range(series)]
    tcp = [module.TcpLabels("inbound", "default", pod) for pod in pods] if module else []
    http = [module.HttpLabels("inbound", "default", pod) for pod in pods] if module else []
    ok = [Record("success", 200, None, 0.4 + (index % 7)) for index in range(16)]

    def count(index: int) -> None:
        if telemetry is None:
            return
        record = telemetry.open(tcp[index % series])
        record.read(41 + index % 5)
        record.wrote(1350 + index % 3)
        record.close(False)
        counters = telemetry.http(http[index % series])
        counters.requests += 1
        counters.record(ok[index % 16])

    for index in range(series * 2):
        count(index)
    gc.collect()
    before = arenas()
    held = []
    for index in range(requests):
        count(index)
        held.append((index * 1000, float(index), [index]))
    peak = arenas()
    del held
    gc.collect()
    return before, peak, arenas()


def rollup(pid: int) -> dict[str, int]:
    found = {}
    with open(f"/proc/{pid}/smaps_rollup") as lines:
        for line in lines:
            name, value, *_ = line.split()
            if name in ("Rss:", "Pss:"):
                found[name[:-1]] = int(value)
    return found


def idle(trees: dict[str, str], rounds: int) -> None:
    from agent.lab.agents import LabAgent
    from agent.lab.topology import Lab

    class TreeAgent(LabAgent):
        """An agent run from the checkout `tree` (its sources and in-place builds)."""

        def __init__(self, tree: str, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.tree = tree

        def argv(self) -> list[str]:
            command = super().argv()
            assert command[1:3] == ["-m", "agent"]
            start = (f"import sys, runpy; sys.path.insert(0, {self.tree!r}); "
                     "sys.argv[0] = 'pinion'; runpy.run_module('agent', run_name='__main__')")
            return [command[0], "-c", start, *command[3:]]

    samples: dict[str, list[dict[str, int]]] = {}
    lab = Lab(nodes=1)
    try:
        for index in range(rounds):
            for name, tree in trees.items():
                agent = TreeAgent(tree, lab, lab.nodes[0], log_name=f"agent-{index}-{name}.log")
                agent.start()
                time.sleep(3)
                assert agent.process is not None
                memory = rollup(agent.process.pid)
                said = [line.split(": ", 1)[-1].split("] ")[-1] for line in agent.log().splitlines()
                        if "tunnel framing:" in line or "counters:" in line]
                agent.stop()
                samples.setdefault(name, []).append(memory)
                print(f"round {index + 1}: {name} ({'; '.join(said)}): RSS {memory['Rss']} KiB, "
                      f"PSS {memory['Pss']} KiB", flush=True)
    finally:
        lab.close()
    for name, rows in samples.items():
        print(f"{name}: median RSS {statistics.median(r['Rss'] for r in rows):,.0f} KiB, "
              f"PSS {statistics.median(r['Pss'] for r in rows):,.0f} KiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("burst", "arenas", "idle"))
    parser.add_argument("--build", choices=("compiled", "python", "none"), help=argparse.SUPPRESS)
    parser.add_argument("--series", type=int, default=200)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--tree", action="append", default=[], help="NAME=PATH (idle)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.what == "idle":
        trees = dict(tree.split("=", 1) for tree in args.tree) or {"this": str(REPO)}
        idle(trees, max(1, min(args.rounds, 10)))
        return
    if not 1 <= args.series <= 100_000 or not 1 <= args.requests <= 10_000_000:
        sys.exit("--series 1..100000, --requests 1..10000000")
    if args.what == "arenas" and args.build:  # one build, in this fresh process
        module = None if args.build == "none" else builds()[
            "compiled (mypyc)" if args.build == "compiled" else "python"]
        print(*held_burst(module, args.series, args.requests))
        return
    if args.what == "arenas":
        print(f"{args.requests:,} requests over {args.series} label sets, each holding 4 objects "
              f"until the burst ends; python {sys.version.split()[0]}\n")
        print("| counters | arenas before | at the peak | after the held objects are dropped |")
        print("|---|---:|---:|---:|")
        for build in ("compiled", "python", "none"):
            run = subprocess.run([sys.executable, __file__, "arenas", "--build", build, "--series",
                                  str(args.series), "--requests", str(args.requests)],
                                 capture_output=True, text=True, timeout=300, check=True)
            before, peak, after = run.stdout.split()
            print(f"| {build} | {before} | {peak} | {after} |", flush=True)
        return
    print(f"{args.requests:,} requests over {args.series} label sets; python {sys.version.split()[0]}\n")
    print("| build | series | blocks alive from the burst (tracemalloc) | allocated blocks Δ "
          "| gc objects Δ |")
    print("|---|---|---:|---:|---:|")
    modules = builds()
    for warm in (True, False):
        for name, module in modules.items():
            left, blocks, objects = burst(module, args.series, args.requests, warm)
            print(f"| {name} | {'existing' if warm else 'made in the burst'} | {left:,} | {blocks:+,} "
                  f"| {objects:+,} |", flush=True)


if __name__ == "__main__":
    main()
