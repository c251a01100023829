"""Memory of an agent that cannot keep up (issue #21): one agent in a small memory cgroup and a
small CPU share, its node's meshed pods offered twice what that share serves, scraped every
5 s, then given many more pods. Per capture mode: OOM kills, the cgroup's peak, and whether
memory comes back once the traffic stops.

    sudo .venv/bin/python bench/overload.py [--modes nftables iptables ebpf] [--memory 48]
        [--cpu 0.2] [--pods 50] [--then-pods 200] [--seconds 60]

Two lab nodes, one `pinion agent --identity-dir` each (mTLS between them). The agent under test
(node 1) runs in cgroup v1 `memory` and `cpu` groups of its own (memory.limit_in_bytes,
cpu.cfs_quota_us), or v2 (memory.max, cpu.max) where that is what the host has; its `pods`
meshed nginx pods are the servers. Clients on node 0 (unlimited agent) first measure what the
limited agent serves (`ab -c 16`, a new connection per request, closed loop), then offer
twice that, open loop: `h2load --h1` creating one new connection per request at a fixed
rate, spread over ten server pods, for `seconds`. Markdown on stdout; samples in --json."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from foundation import start_nginx, write_nginx_site  # noqa: E402

from agent.identity.files import init_identity_dir  # noqa: E402
from agent.lab.agents import LabAgent, start_agents, stop_agents  # noqa: E402
from agent.lab.limits import Cgroup, LimitedAgent  # noqa: E402
from agent.lab.topology import Lab, Pod  # noqa: E402

MIB = 1024 * 1024


@dataclass
class Run:
    mode: str
    capacity_rps: float = 0.0
    offered_rps: float = 0.0
    served: int = 0
    failed: int = 0
    before_mib: float = 0.0
    before_anon_mib: float = 0.0  # of before_mib (memory.stat), in --json only
    before_kernel_mib: float = 0.0
    peak_traffic_mib: float = 0.0
    after_30s_mib: float = 0.0
    peak_pods_mib: float = 0.0
    anon_peak_mib: float = 0.0
    # The two phase peaks are the cgroup's memory.peak, reset at each phase; where the kernel
    # cannot reset it (cgroup v2 before Linux 6.12), the highest 0.5 s sample of the phase, and
    # memory.peak, since the agent started, is in whole_run_peak_mib.
    peak_from: str = "memory.peak"
    whole_run_peak_mib: float = 0.0
    oom_kills: int = 0
    agent_alive: bool = True
    samples: list[tuple[float, float, float, float]] = field(default_factory=list)  # t, all, anon, kernel
    # t, open, tasks, tunnels; open at the clients' agent
    load: list[tuple[float, float, float, float, float]] = field(default_factory=list)
    breakdown: dict[str, float] = field(default_factory=dict)


def new_connection_rps(client: Pod, url: str, requests: int = 3000) -> float:
    """What the limited agent serves with a new connection per request (`ab -c 16`, closed
    loop): the load below offers twice this."""
    out = client.run(["ab", "-q", "-n", str(requests), "-c", "16", url], timeout=300).stdout
    match = re.search(r"Requests per second:\s+([\d.]+)", out)
    return float(match.group(1)) if match else 0.0


def h2load(client: Pod, url: str, rate: int, seconds: int) -> subprocess.Popen[str]:
    total = rate * seconds
    return client.spawn(["h2load", "--h1", "-n", str(total), "-c", str(total), "-r", str(rate),
                         "-T", "10", "-N", "10", url], stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True)


def split_rate(total: float, parts: int) -> list[int]:
    """Whole connections per second for each of `parts` clients, adding up to `total` (h2load's
    -r is whole; at the emulated kernel's ~30 req/s, int(total / 10) each would lose a third)."""
    base, extra = divmod(max(1, round(total)), parts)
    return [base + (index < extra) for index in range(parts)]


def parse_h2load(out: str) -> tuple[int, int]:
    """(succeeded, not succeeded) of what h2load was asked for."""
    match = re.search(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded", out)
    if not match:
        return 0, 0
    total, succeeded = int(match.group(1)), int(match.group(2))
    return succeeded, total - succeeded


def phase_peak(cgroup: Cgroup, run: Run, reset: bool, since: float) -> float:
    """MiB: memory.peak since its reset, or the phase's highest sample where it was not."""
    if reset:
        return cgroup.peak() / MIB
    run.peak_from = "the highest 0.5 s sample (memory.peak cannot be reset here)"
    return max((sample[1] for sample in run.samples if sample[0] >= since), default=0.0)


@contextlib.contextmanager
def sampling(cgroup: Cgroup, run: Run, start: float) -> Iterator[None]:
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.5):
            with contextlib.suppress(OSError, ValueError):
                run.samples.append((round(time.monotonic() - start, 1), round(cgroup.usage() / MIB, 1),
                                    round(cgroup.anon() / MIB, 1), round(cgroup.kernel() / MIB, 1)))
                run.anon_peak_mib = max(run.anon_peak_mib, cgroup.anon() / MIB)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def scrape_every(agent: LabAgent, seconds: float, stop: threading.Event, run: Run,
                 start: float, clients: LabAgent) -> threading.Thread:
    def loop() -> None:
        while not stop.wait(seconds):
            with contextlib.suppress(Exception):
                metrics = agent.metrics()
                run.load.append((round(time.monotonic() - start, 1),
                                 metrics.value("tcp_open_connections"),
                                 metrics.value("pinion_event_loop_tasks"),
                                 metrics.value("pinion_tunnel_connections"),
                                 clients.metrics().value("tcp_open_connections")))

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def one_mode(mode: str, args: argparse.Namespace) -> Run:
    run = Run(mode)
    identity = Path(tempfile.mkdtemp(prefix="pinion-overload-")) / "identity"
    init_identity_dir(identity, trust_domain="cluster.local")
    agents: list[LabAgent] = []
    lab = Lab(nodes=2, extra_plugins=lambda node: [agents[node.index].plugin_config()])
    cgroup = Cgroup(f"pinion-overload-{lab.run_id}-{mode}", args.memory * MIB, args.cpu)
    try:
        flags = ["--identity-dir", str(identity)]
        limited = LimitedAgent(lab, lab.nodes[1], redirect=mode, extra_args=[*flags, *args.agent_args])
        limited.cgroup = cgroup
        agents += [LabAgent(lab, lab.nodes[0], redirect=mode, extra_args=flags), limited]
        start_agents(agents)
        assert limited.process is not None
        servers = []
        for index in range(args.pods):
            pod = lab.add_pod(lab.nodes[1], f"web-{index}", namespace="bench")
            start_nginx(pod, write_nginx_site(lab.workdir, f"web-{index}"))
            servers.append(pod)
        clients = [lab.add_pod(lab.nodes[0], f"load-{index}", namespace="bench") for index in range(10)]
        for client, server in zip(clients, servers, strict=False):
            deadline = time.monotonic() + 20
            while client.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5",
                              f"http://{server.ip}/1k"], check=False).stdout != "200":
                assert time.monotonic() < deadline, f"{server.ip} not served"
                time.sleep(0.2)
        time.sleep(2)
        run.capacity_rps = new_connection_rps(clients[0], f"http://{servers[0].ip}/1k",
                                              args.capacity_requests)
        time.sleep(3)
        limited.get("/metrics")
        reset = cgroup.reset_peak()
        run.before_mib = cgroup.usage() / MIB
        run.before_anon_mib, run.before_kernel_mib = cgroup.anon() / MIB, cgroup.kernel() / MIB
        if args.signal_agent:  # e.g. a heap probe's "before" (see --signal-agent)
            os.kill(limited.process.pid, getattr(signal, f"SIG{args.signal_agent}"))
        run.offered_rps = 2 * run.capacity_rps
        pairs = list(zip(clients, servers, strict=False))  # fewer than 10 when --pods is
        rates = split_rate(run.offered_rps, len(pairs))
        start = time.monotonic()
        stop = threading.Event()
        scraper = scrape_every(limited, args.scrape_seconds, stop, run, start, agents[0])
        with sampling(cgroup, run, start):
            loads = [h2load(client, f"http://{server.ip}/1k", rate, args.seconds)
                     for (client, server), rate in zip(pairs, rates, strict=True) if rate]
            for load in loads:
                out, _ = load.communicate(timeout=args.seconds + 120)
                served, failed = parse_h2load(out)
                run.served += served
                run.failed += failed
            run.peak_traffic_mib = phase_peak(cgroup, run, reset, since=0.0)
            time.sleep(30)
            run.after_30s_mib = cgroup.usage() / MIB
            if args.signal_agent:  # the probe's "after", before the breakdown's scrape
                os.kill(limited.process.pid, getattr(signal, f"SIG{args.signal_agent}"))
                time.sleep(5)
            with contextlib.suppress(Exception):
                metrics = limited.metrics()
                run.breakdown = {s.labels.get("part", s.name): s.value / MIB for s in metrics.samples
                                 if s.name.startswith("pinion_memory_")}
            stop.set()
            scraper.join()
            reset, pods_from = cgroup.reset_peak(), time.monotonic() - start
            for index in range(args.pods, args.then_pods):
                lab.add_pod(lab.nodes[1], f"idle-{index}", namespace="bench")
            limited.get("/metrics")
            time.sleep(1)  # a sample after the scrape
            run.peak_pods_mib = phase_peak(cgroup, run, reset, since=pods_from)
        run.whole_run_peak_mib = cgroup.peak() / MIB
        run.oom_kills = cgroup.oom_kills()
        run.agent_alive = limited.process.poll() is None
    except Exception:
        for agent in agents:
            print(f"--- {agent.node.name} log:\n{agent.log()[-1500:]}", file=sys.stderr)
        print(f"--- OOM kills {cgroup.oom_kills()}, peak {cgroup.peak() / MIB:.1f} MiB; "
              f"samples {run.samples[::4]}; load {run.load}", file=sys.stderr)
        raise
    finally:
        stop_agents(agents)
        lab.close()
        cgroup.remove()
        shutil.rmtree(identity.parent, ignore_errors=True)
    return run


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--modes", nargs="+", default=["nftables", "iptables", "ebpf"])
    parser.add_argument("--memory", type=int, default=48, help="MiB")
    parser.add_argument("--cpu", type=float, default=0.2, help="CPUs")
    parser.add_argument("--pods", type=int, default=50)
    parser.add_argument("--then-pods", type=int, default=200)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--scrape-seconds", type=float, default=5.0)
    parser.add_argument("--capacity-requests", type=int, default=3000,
                        help="requests of the closed-loop `ab` that measures what the agent "
                             "serves (fewer on a slow machine, e.g. the emulated arm64 kernel)")
    parser.add_argument("--agent-args", nargs="*", default=[], metavar="FLAG",
                        help="more flags for the limited agent (e.g. --max-connections=1024)")
    parser.add_argument("--signal-agent", metavar="NAME",
                        help="a signal (e.g. USR1) sent to the limited agent just before the "
                             "traffic and 30 s after it: for a probe loaded into it (a "
                             "sitecustomize on PYTHONPATH) to compare its heap at both")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces, cgroups)")
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")  # as deploy/daemonset.yaml sets it
    runs = [one_mode(mode, args) for mode in args.modes]
    print(f"One agent: {args.memory} MiB memory, {args.cpu} CPU; {args.pods} meshed nginx pods; "
          f"offered 2× what it serves for {args.seconds} s (new connection per request), "
          f"scraped every {args.scrape_seconds:g} s; then {args.then_pods} pods.\n")
    print(f"| mode | serves req/s | offered | served | failed | before MiB | peak in traffic | "
          f"30 s after | peak to {args.then_pods} pods | anon peak | OOM kills | alive |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in runs:
        print(f"| {r.mode} | {r.capacity_rps:,.1f} | {r.offered_rps:,.1f} | {r.served:,} | {r.failed:,} | "
              f"{r.before_mib:.1f} | {r.peak_traffic_mib:.1f} | {r.after_30s_mib:.1f} | "
              f"{r.peak_pods_mib:.1f} | {r.anon_peak_mib:.1f} | {r.oom_kills} | {r.agent_alive} |")
    for source in sorted({r.peak_from for r in runs} - {"memory.peak"}):
        print(f"\nPeaks in a phase: {source}; memory.peak over the whole run: "
              + ", ".join(f"{r.mode} {r.whole_run_peak_mib:.1f}" for r in runs if r.peak_from == source)
              + " MiB.")
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in runs], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
