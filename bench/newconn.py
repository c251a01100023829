"""New connections per second through the agents, the peers' way: `ab -n 5000 -c 16`
(one TCP connection per request, no keep-alive) to nginx, direct vs through both agents,
interleaved in one lab. Run as root: `.venv/bin/python bench/newconn.py [--rounds N]`.

Every client connection costs each agent an accept, an upstream socket made in the pod's
netns, a connect and a relay; with mTLS (#3) a new client connection must not cost a
handshake, so this plaintext figure is the ceiling the tunnel has to live under."""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from foundation import (
    OPT_OUT,
    cpu_seconds,
    machine_facts,
    start_nginx,
    stop_processes,
    write_nginx_site,
)

from agent.lab.agents import LabAgent
from agent.lab.topology import Lab, Pod

REQUESTS, CONCURRENCY = 5000, 16


def run_ab(client: Pod, server: Pod) -> float:
    done = client.run(["ab", "-q", "-n", str(REQUESTS), "-c", str(CONCURRENCY), "-s", "10",
                       f"http://{server.ip}/1k"], timeout=120)
    failed = re.search(r"Failed requests:\s+(\d+)", done.stdout)
    if failed is None or int(failed.group(1)) != 0:
        raise RuntimeError(f"ab reported failures:\n{done.stdout[-800:]}")
    match = re.search(r"Requests per second:\s+([\d.]+)", done.stdout)
    if match is None:
        raise RuntimeError(f"cannot parse ab output:\n{done.stdout[-800:]}")
    return float(match.group(1))


def measure(lab: Lab, agents: list[LabAgent], rounds: int) -> dict[str, list[tuple[float, float]]]:
    node0, node1 = lab.nodes
    servers = {"direct": lab.add_pod(node1, "srv-direct", args=OPT_OUT),
               "mesh": lab.add_pod(node1, "srv-mesh")}
    clients = {"direct": lab.add_pod(node0, "cli-direct", args=OPT_OUT),
               "mesh": lab.add_pod(node0, "cli-mesh")}
    nginx = [start_nginx(pod, write_nginx_site(lab.workdir, kind)) for kind, pod in servers.items()]
    results: dict[str, list[tuple[float, float]]] = {"direct": [], "mesh": []}
    try:
        for index in range(rounds):
            for case in (("direct", "mesh") if index % 2 == 0 else ("mesh", "direct")):
                cpu_before = sum(cpu_seconds(a.process.pid) for a in agents if a.process)
                rate = run_ab(clients[case], servers[case])
                cpu = sum(cpu_seconds(a.process.pid) for a in agents if a.process) - cpu_before
                results[case].append((rate, cpu / REQUESTS * 1000))
                print(f"  round {index + 1} {case}: {rate:,.0f} conn/s", file=sys.stderr)
    finally:
        stop_processes(nginx)
    return results


def report(results: dict[str, list[tuple[float, float]]], facts: dict[str, str]) -> str:
    lines = ["# New connections per second (`ab -n 5000 -c 16`, no keep-alive)", "",
             *(f"- {key}: {value}" for key, value in facts.items()), "",
             "| case | conn/s (median) | range | vs direct | agents' CPU s per 1,000 conns |",
             "| --- | ---: | ---: | ---: | ---: |"]
    direct = statistics.median(rate for rate, _ in results["direct"])
    labels = {"direct": "cross-node, direct (both pods opted out)",
              "mesh": "cross-node, agent0 outbound → agent1 inbound"}
    for case, samples in results.items():
        rates = [rate for rate, _ in samples]
        cpu = statistics.median(c for _, c in samples)
        lines.append(f"| {labels[case]} | {statistics.median(rates):,.0f} | "
                     f"{min(rates):,.0f}–{max(rates):,.0f} | "
                     f"{statistics.median(rates) / direct:.2f}× | {cpu:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    agents: list[LabAgent] = []
    with Lab(nodes=2, extra_plugins=lambda node: [agents[node.index].plugin_config()]) as lab:
        try:
            agents += [LabAgent(lab, node).start() for node in lab.nodes]
            results = measure(lab, agents, args.rounds)
        finally:
            for agent in agents:
                agent.stop()
    print(report(results, {k: v for k, v in machine_facts().items()
                           if k in ("date", "pinion commit", "cpus (nproc)", "uvloop in the agent")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
