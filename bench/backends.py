"""The three capture backends side by side in one lab: iptables, nftables and ebpf.

Six nodes, a pair per backend (client pod on one node, nginx pod on the other, an agent
on each with that backend), plus an opted-out pair on the first two nodes as the direct
baseline. Rounds are interleaved (case order rotated) so machine drift hits all alike.
Per case: TCP connect() latency seen by the client (the capture's own cost: the connect
completes at the in-pod listener), keep-alive requests/s through both agents (wrk), new
connections/s (ab, no keep-alive), the agents' CPU per 1,000 requests/connections, and
the client-side agent's RSS. Also the RSS libbpf itself adds to a Python process.

    sudo .venv/bin/python bench/backends.py [--rounds N] [--quick]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from foundation import (
    OPT_OUT,
    cpu_seconds,
    machine_facts,
    memory_mib,
    parse_wrk,
    percentile,
    start_nginx,
    stop_processes,
    write_nginx_site,
)

from agent.lab.agents import LabAgent
from agent.lab.topology import Lab, Pod

BACKENDS = ("iptables", "nftables", "ebpf")
CONNECT_SCRIPT = """\
import socket, sys, time
host, count = sys.argv[1], int(sys.argv[2])
samples = []
for _ in range(count):
    s = socket.socket()
    started = time.perf_counter()
    s.connect((host, 80))
    samples.append(time.perf_counter() - started)
    s.close()
print(" ".join(f"{x * 1e6:.1f}" for x in samples))
"""


@dataclass
class Case:
    key: str
    client: Pod
    server: Pod
    agents: list[LabAgent]
    connect_us: list[float] = field(default_factory=list)
    wrk_rps: list[float] = field(default_factory=list)
    wrk_cpu: list[float] = field(default_factory=list)  # agents' CPU s per 1,000 requests
    ab_rate: list[float] = field(default_factory=list)
    ab_cpu: list[float] = field(default_factory=list)  # agents' CPU s per 1,000 connections
    rss_idle: float = 0.0
    rss_after: float = 0.0

    def cpu(self) -> float:
        return sum(cpu_seconds(a.process.pid) for a in self.agents if a.process)


@dataclass(frozen=True)
class Settings:
    rounds: int
    connects: int
    wrk_seconds: int
    ab_requests: int


def measure_connect(case: Case, count: int) -> None:
    done = case.client.run([sys.executable, "-c", CONNECT_SCRIPT, case.server.ip, str(count)],
                           timeout=120)
    case.connect_us += [float(x) for x in done.stdout.split()]


def measure_wrk(case: Case, seconds: int) -> None:
    before = case.cpu()
    done = case.client.run(["wrk", "-t1", "-c16", f"-d{seconds}s", "--latency", "--timeout", "5s",
                            f"http://{case.server.ip}/1k"], timeout=seconds + 30)
    stats = parse_wrk(done.stdout)
    if stats.errors:
        raise RuntimeError(f"{case.key}: wrk saw {stats.errors} errors")
    case.wrk_rps.append(stats.rps)
    case.wrk_cpu.append((case.cpu() - before) * 1000 / max(1, stats.requests))


def measure_ab(case: Case, requests: int) -> None:
    before = case.cpu()
    done = case.client.run(["ab", "-q", "-n", str(requests), "-c", "16", "-s", "10",
                            f"http://{case.server.ip}/1k"], timeout=120)
    failed = re.search(r"Failed requests:\s+(\d+)", done.stdout)
    rate = re.search(r"Requests per second:\s+([\d.]+)", done.stdout)
    if failed is None or rate is None or int(failed.group(1)):
        raise RuntimeError(f"{case.key}: ab failed:\n{done.stdout[-800:]}")
    case.ab_rate.append(float(rate.group(1)))
    case.ab_cpu.append((case.cpu() - before) * 1000 / requests)


def libbpf_rss_mib() -> tuple[float, float]:
    """VmRSS of a fresh Python before and after dlopen(libbpf.so.1) + loading our object."""
    script = ("import sys\nfrom pathlib import Path\n"
              "def rss():\n"
              "    return next(int(l.split()[1]) for l in open('/proc/self/status') "
              "if l.startswith('VmRSS'))\n"
              "import ctypes\nbefore = rss()\n"
              "lib = ctypes.CDLL('libbpf.so.1')\n"
              "lib.bpf_object__open_file.restype = ctypes.c_void_p\n"
              "lib.bpf_object__open_file.argtypes = [ctypes.c_char_p, ctypes.c_void_p]\n"
              "lib.bpf_object__load.argtypes = [ctypes.c_void_p]\n"
              "lib.bpf_object__close.argtypes = [ctypes.c_void_p]\n"
              "opened = rss()\n"
              "obj = lib.bpf_object__open_file(sys.argv[1].encode(), None)\n"
              "assert lib.bpf_object__load(obj) == 0\n"
              "loaded = rss()\n"
              "lib.bpf_object__close(obj)\n"
              "print((opened - before) / 1024, (loaded - before) / 1024)\n")
    obj = Path(__file__).resolve().parents[1] / "bpf" / "capture.o"
    done = subprocess.run([sys.executable, "-c", script, str(obj)], capture_output=True, text=True,
                          check=True, timeout=60)
    dlopen, loaded = done.stdout.split()
    return float(dlopen), float(loaded)


def build(lab: Lab, agents: list[LabAgent]) -> list[Case]:
    cases = []
    for index, backend in enumerate(BACKENDS):
        client_node, server_node = lab.nodes[2 * index], lab.nodes[2 * index + 1]
        pair = [LabAgent(lab, client_node, redirect=backend).start(),
                LabAgent(lab, server_node, redirect=backend).start()]
        agents += pair
        if backend == "ebpf" and "redirect: ebpf" not in pair[0].log():
            raise RuntimeError(f"the ebpf agent fell back:\n{pair[0].log()[-1000:]}")
        cases.append(Case(backend, lab.add_pod(client_node, f"cli-{backend}"),
                          lab.add_pod(server_node, f"srv-{backend}"), pair))
    cases.insert(0, Case("direct", lab.add_pod(lab.nodes[0], "cli-direct", args=OPT_OUT),
                         lab.add_pod(lab.nodes[1], "srv-direct", args=OPT_OUT), agents[:2]))
    return cases


def run(cases: list[Case], settings: Settings) -> None:
    for case in cases:
        measure_connect(case, 50)  # warm-up: listeners, caches, ARP
        measure_wrk(case, 1)
        case.rss_idle = memory_mib(case.agents[0].process.pid)["rss"] if case.key != "direct" else 0
    for index in range(settings.rounds):
        order = cases[index % len(cases):] + cases[:index % len(cases)]
        for case in order:
            measure_connect(case, settings.connects)
            measure_wrk(case, settings.wrk_seconds)
            measure_ab(case, settings.ab_requests)
            print(f"  round {index + 1} {case.key}: wrk {case.wrk_rps[-1]:,.0f} req/s, "
                  f"ab {case.ab_rate[-1]:,.0f} conn/s", file=sys.stderr)
    for case in cases:
        if case.key != "direct":
            case.rss_after = memory_mib(case.agents[0].process.pid)["rss"]


def report(cases: list[Case], settings: Settings, libbpf_mib: tuple[float, float]) -> str:
    facts = {k: v for k, v in machine_facts().items()
             if k in ("date", "pinion commit", "kernel", "cpus (nproc)", "cpu", "uvloop in the agent")}
    lines = ["# Capture backends side by side (`bench/backends.py`)", "",
             *(f"- {key}: {value}" for key, value in facts.items()),
             f"- {settings.rounds} interleaved rounds; per round and case {settings.connects} "
             f"connects, wrk -c16 {settings.wrk_seconds} s keep-alive, ab -n "
             f"{settings.ab_requests} -c16 (new connection per request); medians", "",
             "| case | connect p50 µs | connect p99 µs | keep-alive req/s (range) | new conn/s (range) | "
             "agents' CPU s / 1k req | agents' CPU s / 1k conns | client agent RSS MiB (idle → after) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for case in cases:
        rss = "–" if case.key == "direct" else f"{case.rss_idle:.1f} → {case.rss_after:.1f}"
        cpu_req = "–" if case.key == "direct" else f"{statistics.median(case.wrk_cpu):.3f}"
        cpu_conn = "–" if case.key == "direct" else f"{statistics.median(case.ab_cpu):.3f}"
        lines.append(f"| {case.key} | {statistics.median(case.connect_us):.0f} | "
                     f"{percentile(case.connect_us, 0.99):.0f} | "
                     f"{_spread(case.wrk_rps)} | {_spread(case.ab_rate)} | "
                     f"{cpu_req} | {cpu_conn} | {rss} |")
    lines += ["", f"libbpf in a fresh Python: dlopen(libbpf.so.1) +{libbpf_mib[0]:.1f} MiB RSS, "
              f"then opening and loading bpf/capture.o +{libbpf_mib[1]:.1f} MiB in all."]
    return "\n".join(lines) + "\n"


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}–{max(values):,.0f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one short round (smoke test)")
    args = parser.parse_args(argv)
    settings = (Settings(1, 200, 2, 500) if args.quick
                else Settings(args.rounds, 1000, 5, 3000))
    agents: list[LabAgent] = []
    nginx = []
    with Lab(nodes=6, extra_plugins=lambda node: [agents[node.index].plugin_config()]) as lab:
        try:
            cases = build(lab, agents)
            nginx = [start_nginx(c.server, write_nginx_site(lab.workdir, c.key)) for c in cases]
            time.sleep(0.5)
            run(cases, settings)
        finally:
            stop_processes(nginx)
            for agent in agents:
                agent.stop()
    print(report(cases, settings, libbpf_rss_mib()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
