#!/usr/bin/env python3
"""User and system CPU per request of the proxies at side_by_side.py's paced load, and
(optionally) py-spy profiles of both agents under it: where a paced request's CPU goes.

side_by_side.py (in ../shared/bench, not part of this repository) gives CPU per request of
each proxy pair; this script reuses its lab, pods, nginx, peers and paced client and adds
the split the question needs: /proc/<pid>/task/*/stat utime and stime of every thread of
both ends, per request, for haproxy, pinion and pinion-opaque, the configurations
interleaved. With --pyspy DIR it then profiles both agents (`py-spy record --native`, raw
collapsed stacks, one file per agent) during one more paced pinion run. With --perf DIR it
samples, by time (`perf record -e cpu-clock`: this VM has no hardware counters, and time is
what the paced ratio measures, cold caches included), both agents during one more paced
pinion run and both haproxy ends during one more paced haproxy run: `perf report -i
DIR/pinion.data --sort dso,sym` then shows where a paced request's user time goes.

    cd /tmp && flock /tmp/pinion-bench.lock python3 <checkout>/bench/paced_split.py \\
        --checkout <checkout> [--rounds 2] [--duration 4] [--pyspy DIR --pyspy-seconds 20]
        [--perf DIR]

Root only (network namespaces); about 15 s per configuration and round.
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time

import hops  # beside this script
import tracing

CONFIGS = ("haproxy", "pinion", "pinion-opaque")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", required=True)
    parser.add_argument("--sbs", default=os.environ.get("SBS_DIR", "/work/shared/bench"),
                        help="the directory of side_by_side.py and lab.py")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=int, default=4, help="seconds per paced run")
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--load", choices=("paced", "newconn"), default="paced",
                        help="what the CPU split and the profiles run: side_by_side.py's paced "
                        "client, or its ab with a new connection per request (--ab-n of them)")
    parser.add_argument("--conns", type=int, default=16,
                        help="connections: the paced client's, or ab's concurrency (-c)")
    parser.add_argument("--ab-n", type=int, default=5000)
    parser.add_argument("--pyspy", help="write py-spy profiles of both agents here")
    parser.add_argument("--pyspy-seconds", type=int, default=20)
    parser.add_argument("--pyspy-bin", default="py-spy")
    parser.add_argument("--perf", help="write perf cpu-clock samples of pinion and haproxy here")
    parser.add_argument("--perf-callgraph", action="store_true",
                        help="with --perf: record call graphs (perf script then shows who called "
                             "what: the Python, mypyc and uvloop callers of the kernel's time)")
    parser.add_argument("--hops", help="write packet captures (tcpdump) of one more paced run "
                        "of pinion and of haproxy here, and print where a request's time goes, "
                        "hop by hop (bench/hops.py)")
    parser.add_argument("--sched", help="write `perf sched record` of one more paced run of "
                        "pinion and of haproxy here, and print the scheduling delay (woken to "
                        "running) of the client, the proxies and the server")
    parser.add_argument("--strace", help="write syscall counts (strace -c) of pinion and haproxy "
                        "during one more paced run each here, and print them per request")
    args = parser.parse_args()
    sys.path.insert(0, args.sbs)
    import lab  # found at run time, beside side_by_side.py
    import side_by_side as sbs

    checkout = os.path.abspath(args.checkout)
    os.environ["LAB_PINION_ROOT"] = checkout
    lab.PINION_ROOT = checkout
    os.environ["PATH"] = sbs.RUNTIME_PATH
    os.environ.pop("PYTHONPATH", None)
    lab.TEARDOWN_BUDGET = 60.0
    settings = sbs.Settings(rounds=1, duration=args.duration, rate=args.rate, conns=args.conns,
                            ab_n=args.ab_n, pods=1, cni_n=1, quick=True)
    settings.warm_s, settings.warm_ab = 1, 100

    def ticks(pids: list[int]) -> tuple[int, int]:
        user = system = 0
        for pid in pids:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
                user, system = user + int(fields[11]), system + int(fields[12])
        return user, system

    class Split(sbs.Bench):
        def run(self) -> None:
            with sbs.BenchLab("split") as L:
                self.L = L
                self.setup()
                self.warmup()
                per = {c: ([], []) for c in CONFIGS}
                for r in range(args.rounds):
                    for cfg in sbs.rotated(CONFIGS, r):
                        pids = [p.pid for p in self.procs_of(cfg)]
                        u0, s0 = ticks(pids)
                        self.measure(cfg, args.load, r + 1)
                        u1, s1 = ticks(pids)
                        n = self.rows[-1].get("n") or 1
                        us = 1e6 / os.sysconf("SC_CLK_TCK") / n
                        per[cfg][0].append((u1 - u0) * us)
                        per[cfg][1].append((s1 - s0) * us)
                what = (f"paced {args.rate:.0f} req/s over 16 connections, {args.duration} s runs"
                        if args.load == "paced" else f"ab -n {args.ab_n} -c 16, a new connection each")
                print(f"{what}, {args.rounds} rounds; CPU µs per request, both ends (median, runs)\n")
                print("| config | user | system | total | user runs | system runs |")
                print("|---|---:|---:|---:|---|---|")
                for cfg in CONFIGS:
                    user, system = per[cfg]
                    total = statistics.median([a + b for a, b in zip(user, system, strict=True)])
                    runs = [", ".join(f"{v:.0f}" for v in values) for values in (user, system)]
                    print(f"| {cfg} | {statistics.median(user):.0f} | {statistics.median(system):.0f} | "
                          f"{total:.0f} | {runs[0]} | {runs[1]} |")
                if args.pyspy:
                    self.profile()
                if args.perf:
                    self.sample()
                if args.strace:
                    self.syscalls()
                if args.hops:
                    self.hops()
                if args.sched:
                    self.sched()

        def sample(self) -> None:
            os.makedirs(args.perf, exist_ok=True)
            for cfg in ("pinion", "haproxy"):
                pids = ",".join(str(p.pid) for p in self.procs_of(cfg))
                # call graphs (DWARF unwinding: no frame pointers here) at a tenth of the rate
                callgraph = (["-F", "2000", "--call-graph", "dwarf,16384"] if args.perf_callgraph
                             else ["-F", "20000"])
                perf = subprocess.Popen(
                    ["perf", "record", "-q", "-e", "cpu-clock", *callgraph, "-p", pids,
                     "-o", os.path.join(args.perf, f"{cfg}.data")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(0.5)
                self.measure(cfg, args.load, 98)
                perf.send_signal(signal.SIGINT)
                perf.wait(timeout=60)

        def hops(self) -> None:
            """One more paced run of pinion and of haproxy under `tcpdump -i any` in the client's
            pod, both nodes and the server's pod (tcpdump wakes about once a second: it costs the
            run little), then bench/hops.py's table."""
            nodes = {"node1": self.L.nodes["n1"].netns, "node2": self.L.nodes["n2"].netns}
            plans = {"pinion": (self.cli_mesh.netns, self.web_mesh.netns, {80, 15001}, 15008),
                     "haproxy": (self.cli_plain.netns, self.web_plain.netns, {sbs.HA_CLI}, sbs.HA_SRV)}
            results = {}
            for cfg, (client, server, client_ports, tls_port) in plans.items():
                results[cfg] = hops.captured_run(
                    args.hops, cfg, {"client": client, **nodes, "server": server},
                    lambda cfg=cfg: self.measure(cfg, "paced", 96), client_ports, tls_port, 80)
            print(f"\nhop by hop, one paced run each ({args.rate:.0f} req/s, 16 connections), from "
                  "packet captures; requests alone in flight (bench/hops.py)\n")
            print(hops.table(results))

        def sched(self) -> None:
            """How long each process of a paced run waits for a CPU once woken (`perf sched
            timehist`'s "sch delay"): with one request in flight a wait is that request's."""
            os.makedirs(args.sched, exist_ok=True)
            print(f"\nscheduling delay, woken to running, one paced run each ({args.rate:.0f} req/s), "
                  "perf sched timehist; µs\n")
            print("| config | process | wake-ups | p50 | p90 | p99 | p99.9 |")
            print("|---|---|---:|---:|---:|---:|---:|")
            for cfg in ("pinion", "haproxy"):
                data = os.path.join(args.sched, f"{cfg}.data")
                record = subprocess.Popen(["perf", "sched", "record", "-a", "-o", data],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1.0)
                self.measure(cfg, "paced", 95)
                record.send_signal(signal.SIGINT)
                record.wait(timeout=60)
                out = subprocess.run(["perf", "sched", "timehist", "-i", data], text=True,
                                     capture_output=True, timeout=300).stdout
                delays: dict[str, list[float]] = {}
                for line in out.splitlines():
                    fields = line.split()
                    # time cpu task[tid/pid] wait sch-delay run
                    if len(fields) >= 6 and fields[0][0].isdigit() and "[" in fields[2]:
                        try:
                            delay = float(fields[4]) * 1000  # ms -> µs
                        except ValueError:
                            continue
                        name = fields[2].split("[")[0]
                        delays.setdefault(name, []).append(delay)
                for name, values in sorted(delays.items(), key=lambda kv: -len(kv[1]))[:6]:
                    values.sort()
                    at = [values[min(len(values) - 1, int(p * len(values)))]
                          for p in (0.5, 0.9, 0.99, 0.999)]
                    print(f"| {cfg} | {name} | {len(values)} | " + " | ".join(f"{v:.0f}" for v in at)
                          + " |")

        def syscalls(self) -> None:
            """Syscalls per request of both ends (strace slows what it traces: these runs
            count calls, their CPU is not measured)."""
            os.makedirs(args.strace, exist_ok=True)
            counts: dict[str, dict[str, float]] = {}
            for cfg in ("pinion", "haproxy"):
                calls = tracing.strace_calls(
                    [proc.pid for proc in self.procs_of(cfg)], os.path.join(args.strace, f"{cfg}.txt"),
                    lambda cfg=cfg: self.measure(cfg, args.load, 97))
                n = self.rows[-1].get("n") or 1
                for name, count in calls.items():
                    counts.setdefault(name, {})[cfg] = count / n
            print(f"\nsyscalls per request, both ends (strace -c during one {args.load} run each)\n")
            print("| syscall | pinion | haproxy |")
            print("|---|---:|---:|")
            for name, per in sorted(counts.items(), key=lambda kv: -max(kv[1].values())):
                print(f"| {name} | {per.get('pinion', 0):.2f} | {per.get('haproxy', 0):.2f} |")

        def profile(self) -> None:
            self.s.duration = args.pyspy_seconds
            agents = {self.L.nodes[name].agent.pid: os.path.join(args.pyspy, f"{name}.raw")
                      for name in ("n1", "n2")}
            tracing.pyspy(args.pyspy_bin, agents, args.pyspy_seconds, 250,
                          lambda: self.measure("pinion", args.load, 99))

    bench = Split(settings, checkout, "paced_split")

    def interrupted(number: int, _frame: object) -> None:
        raise lab.Interrupted(f"interrupted by {signal.Signals(number).name}")

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, interrupted)
    bench.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
