"""What tap costs per request: the agents' CPU per 1,000 requests at a paced 1,000 req/s,
with main's agent (no tap code) and this checkout's agent with no tap, one tap and 20 taps.

Run as root: `.venv/bin/python bench/tap.py [--rounds 3] [--seconds 5]`. One two-node lab
(nftables capture, uvloop), nginx in a meshed server pod on node1, the paced client of
bench/foundation.py in a meshed client pod on node0: every request crosses both agents.
main's agent is `git archive main` unpacked in a temporary directory and started with
PYTHONPATH pointing there; both agents are restarted between main and this checkout
(pods are re-adopted from the state dir). Taps are raw sockets on node1 reading and
dropping everything their agent sends (at max_rps=1000 every request goes to every tap;
`linkerd viz tap`'s default, 100/s, is measured too). Cases rotate from round to round;
figures are medians over rounds. Prints a markdown table; removes everything it made.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.lab.agents import LabAgent, start_agents, stop_agents
from agent.lab.topology import Lab
from bench.foundation import (
    Settings,
    TrafficCase,
    load_average,
    machine_facts,
    pinion_commit,
    run_paced,
    start_nginx,
    wait_until_served,
    write_nginx_site,
)

REPO = Path(__file__).resolve().parents[1]

READING_TAPS = """\
import selectors, socket, sys
host, port, resource, count, rate = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
selector = selectors.DefaultSelector()
for _ in range(count):
    s = socket.create_connection((host, port))
    s.sendall(f"GET /tap?resource={resource}&max_rps={rate} HTTP/1.1\\r\\nHost: a\\r\\n\\r\\n".encode())
    selector.register(s, selectors.EVENT_READ)
print("tapping", flush=True)
while True:
    for key, _ in selector.select():
        if not key.fileobj.recv(1 << 20):
            selector.unregister(key.fileobj)
"""


class MainAgent(LabAgent):
    """The agent of branch main, from an exported tree."""

    def __init__(self, *args: Any, tree: Path, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tree = tree

    def start(self, wait: bool = True) -> LabAgent:
        log = open(self.log_path, "a")  # noqa: SIM115 - the child owns it after spawn
        env = dict(os.environ, PYTHONPATH=str(self.tree))
        self.process = self.node.spawn(self.argv(), stdout=log, stderr=subprocess.STDOUT,
                                       cwd=str(self.tree), env=env)
        log.close()
        if wait:
            self.wait_ready()
        return self


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    main: bool
    taps: int = 0
    tap_rps: int = 1000


CASES = (Case("main", "main's agent (no tap code)", True),
         Case("no_tap", "this branch, no tap open", False),
         Case("one_tap", "this branch, 1 tap (max_rps 1000: every request)", False, 1),
         Case("twenty_taps", "this branch, 20 taps (max_rps 1000: every request to each)", False, 20),
         Case("twenty_default", "this branch, 20 taps at the default max_rps 100", False, 20, 100))


def export_main(into: Path) -> Path:
    tree = into / "main"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "main"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def open_taps(lab: Lab, agent: LabAgent, resource: str, count: int,
              rate: int) -> subprocess.Popen[str]:
    host, port = agent.admin
    taps = lab.nodes[1].spawn([sys.executable, "-c", READING_TAPS, host, str(port), resource,
                               str(count), str(rate)], stdout=subprocess.PIPE, text=True)
    assert taps.stdout is not None and taps.stdout.readline().strip() == "tapping"
    deadline = time.monotonic() + 10
    while agent.metrics().value("pinion_tap_open") < count:
        if time.monotonic() > deadline:
            raise RuntimeError("taps did not open")
        time.sleep(0.05)
    return taps


def measure(args: argparse.Namespace) -> dict[str, list[dict[str, float]]]:
    settings = Settings(cni_pods=0, wrk_seconds=0, rounds=args.rounds,
                        paced_seconds=args.seconds, paced_rate=1000)
    results: dict[str, list[dict[str, float]]] = {case.key: [] for case in CASES}
    scratch = Path(tempfile.mkdtemp(prefix="pinion-bench-tap-"))
    agents: list[LabAgent] = []
    try:
        tree = export_main(scratch)
        with Lab(nodes=2, extra_plugins=lambda node: [agents[node.index].plugin_config()]) as lab:
            branch = [LabAgent(lab, node) for node in lab.nodes]
            main = [MainAgent(lab, node, tree=tree) for node in lab.nodes]
            agents[:] = branch
            start_agents(agents)
            server, client = lab.add_pod(lab.nodes[1], "web"), lab.add_pod(lab.nodes[0], "cli")
            start_nginx(server, write_nginx_site(lab.workdir, "web"))
            traffic = TrafficCase("meshed", "cross-node", client, server, "meshed", True)
            wait_until_served(traffic)
            for index in range(args.rounds):
                for group in ([CASES[0]], list(CASES[1:])) if index % 2 == 0 else \
                        (list(CASES[1:]), [CASES[0]]):
                    stop_agents(agents)
                    agents[:] = main if group[0].main else branch
                    start_agents(agents)
                    wait_until_served(traffic)
                    order = group[index % len(group):] + group[:index % len(group)]
                    for case in order:
                        results[case.key].append(run_case(lab, agents, traffic, case, settings,
                                                          index))
            stop_agents(agents)
    finally:
        stop_agents(agents)
        shutil.rmtree(scratch, ignore_errors=True)
    return results


def run_case(lab: Lab, agents: list[LabAgent], traffic: TrafficCase, case: Case,
             settings: Settings, index: int) -> dict[str, float]:
    taps = open_taps(lab, agents[1], f"pod/{traffic.server.name}", case.taps, case.tap_rps) \
        if case.taps else None
    try:
        run_paced(traffic, dict(enumerate(agents)), settings, index)  # warm-up, not counted
        run = run_paced(traffic, dict(enumerate(agents)), settings, index)
    finally:
        if taps is not None:
            taps.kill()
            taps.wait()
    return {"cpu_per_1k": run.cpu_per_1k_requests, "p50_ms": run.stats["p50_ms"],
            "p99_ms": run.stats["p99_ms"], "requests": run.stats["requests"]}


def report(results: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> str:
    facts = machine_facts()
    lines = [f"Tap cost, {time.strftime('%Y-%m-%d %H:%M')} UTC, pinion {pinion_commit()}, "
             f"{facts.get('cpus (nproc)')} vCPU, load average at the end {load_average()}; "
             f"paced 1,000 req/s, 16 connections, {args.seconds:g} s per run, medians of "
             f"{args.rounds} rounds", "",
             "| case | agents' CPU µs per request (each round) | vs main | p50 ms | p99 ms |",
             "| --- | --- | --- | --- | --- |"]
    base = statistics.median(r["cpu_per_1k"] for r in results["main"])
    for case in CASES:
        runs = results[case.key]
        cpu = statistics.median(r["cpu_per_1k"] for r in runs)
        spread = ", ".join(f"{r['cpu_per_1k'] * 1000:.0f}" for r in runs)
        lines.append(f"| {case.label} | {cpu * 1000:.0f} ({spread}) "
                     f"| {100 * (cpu - base) / base:+.1f} % | "
                     f"{statistics.median(r['p50_ms'] for r in runs):.2f} | "
                     f"{statistics.median(r['p99_ms'] for r in runs):.2f} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- in-process: the hot path alone

REQUEST = b"GET /1k HTTP/1.1\r\nHost: 10.42.1.2\r\nUser-Agent: paced\r\nAccept: */*\r\n\r\n"
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 1024\r\nConnection: keep-alive\r\nAccept-Ranges: bytes\r\n\r\n"
            + b"x" * 1024)


def main_http1(scratch: Path) -> Any:
    """main's agent/core/http1.py, loaded beside this checkout's as module `main_http1` (its
    imports resolve to this checkout's accounting, whose Record only gained a default field)."""
    import importlib.util

    tree = export_main(scratch)
    spec = importlib.util.spec_from_file_location("main_http1", tree / "agent/core/http1.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def micro(count: int = 10_000) -> str:
    """µs per request of what tap adds on the agent's thread, without a lab: the HTTP/1
    observer with the switch off and on, and publishing one event to 0, 1 and 20 taps
    (matching, rate, queue, serialising; the writers' batching is not in it)."""
    from agent.core.http1 import Http1Observer
    from agent.core.tap import Resource, TapFilter, TapHub, TapSwitch

    def observer(on: bool | None) -> float:
        """µs per request; on=None: main's observer."""
        switch = TapSwitch()
        switch.on = bool(on)
        watched = main_module.Http1Observer() if on is None else Http1Observer(tap=switch)
        started = time.perf_counter()
        for _ in range(count):
            watched.client_bytes(REQUEST, 0.0)
            watched.server_bytes(RESPONSE, 0.001)
        return (time.perf_counter() - started) / count * 1e6

    fields = {key: "" for key in ("kind", "direction", "namespace", "pod", "owner_kind",
                                  "owner_name", "src", "dst", "src_namespace", "src_pod",
                                  "src_owner_kind", "src_owner_name", "dst_namespace", "dst_pod",
                                  "dst_owner_kind", "dst_owner_name", "tls", "identity",
                                  "method", "authority", "path", "classification")}
    fields |= {"namespace": "default", "pod": "web", "status": 200, "grpc_status": None,
               "error": None, "latency_ms": 0.512, "duration_ms": 0.601, "request_bytes": 0,
               "response_bytes": 1024, "ts": time.time()}

    def publish(taps: int) -> float:
        hub = TapHub(time.monotonic, max_taps=taps or 1)
        opened = [hub.open(TapFilter(Resource.parse("pod/web", "default")), 5000, lambda: None)
                  for _ in range(taps)]
        started = time.perf_counter()
        for _ in range(count):
            hub.publish(dict(fields))
            for subscription in opened:
                subscription.queue.clear()
        return (time.perf_counter() - started) / count * 1e6

    scratch = Path(tempfile.mkdtemp(prefix="pinion-bench-tap-"))
    try:
        main_module = main_http1(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    samples: dict[bool | None, list[float]] = {None: [], False: [], True: []}
    for _ in range(15):  # interleaved, so the machine's moods hit all three alike
        for on in samples:
            samples[on].append(observer(on))
    rows = [("HTTP/1 observer of main (no tap code)", statistics.median(samples[None])),
            ("HTTP/1 observer, request + 1 KiB response, no tap open", statistics.median(samples[False])),
            ("HTTP/1 observer, request + 1 KiB response, a tap open", statistics.median(samples[True])),
            ("publish one finished request, no tap wants it", publish(0)),
            ("publish one finished request to 1 tap", publish(1)),
            ("publish one finished request to 20 taps", publish(20))]
    return "\n".join(["| in-process, one thread (observer: median of 15 interleaved runs) | µs per request |",
                      "| --- | --- |"]
                     + [f"| {label} | {value:.2f} |" for label, value in rows]) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--micro", action="store_true", help="only the in-process figures")
    args = parser.parse_args()
    if args.micro:
        print(micro())
        return 0
    if os.geteuid() != 0:
        print("bench/tap.py must run as root (it builds network namespaces)", file=sys.stderr)
        return 2
    print(report(measure(args), args))
    print(micro())
    return 0


if __name__ == "__main__":
    sys.exit(main())
