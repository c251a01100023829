"""The mTLS mesh tunnel side by side with direct traffic, in one lab and one run (issue #3).

Two lab nodes, agents with `--identity-dir` (every meshed pod gets its own certificate;
pods on different nodes talk through the 15008 tunnel). Measured, interleaved by round:
- keep-alive: `wrk -t1 -c16` saturating, and a paced 1,000 req/s client (p50/p99), direct vs
  through both agents with mTLS (the same cases as bench/foundation.py);
- new connections: `ab -n 5000 -c 16` (one TCP connection per request), direct vs mesh;
- the full-handshake rate of this machine: `openssl s_time -new` (each connection a full
  TLS 1.3 handshake with ECDSA P-256 client and server certificates from the same
  identity dir) against `openssl s_server -Verify`, between the same two nodes' pods;
- agents' CPU per 1,000 requests and RSS at the end.
With `--compare DIR` (another checkout of Pinion, e.g. `git worktree add /tmp/before <rev>`),
two more nodes run that checkout's agents with their own meshed client and server pods, and
every figure gets a third column measured in the same interleaved rounds: before/after side
by side on the same loaded machine.
`--cpu-hogs N` adds N busy loops on the host for the whole run: a loaded machine on demand.
Run as root: `.venv/bin/python bench/mtls.py [--quick] [--rounds N] [--compare DIR] [--cpu-hogs N]`.
Markdown on stdout."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from foundation import (
    OPT_OUT,
    PacedRun,
    Settings,
    TrafficCase,
    WrkRun,
    bench_traffic,
    cpu_seconds,
    load_average,
    machine_facts,
    memory_mib,
    rotated,
    start_nginx,
    stop_processes,
    write_nginx_site,
)
from newconn import REQUESTS, run_ab

from agent.identity.authority import LocalSigner
from agent.identity.crypto import generate_key, make_csr
from agent.identity.files import TRUST_BUNDLE, init_identity_dir
from agent.identity.spiffe import SpiffeId
from agent.lab.agents import LabAgent
from agent.lab.topology import Lab, Node, Pod

HANDSHAKE_PORT = 9443
MESH_CASES = ("mtls", "before")  # "before": the --compare checkout's agents


class CheckoutAgent(LabAgent):
    """A lab agent run from another checkout (its own `agent` package, same interpreter)."""

    def __init__(self, lab: Lab, node: Node, checkout: Path, extra_args: list[str]) -> None:
        super().__init__(lab, node, extra_args=extra_args)
        self.checkout = checkout

    def start(self, wait: bool = True) -> LabAgent:
        log = open(self.log_path, "a")  # noqa: SIM115 - the child owns it after spawn
        env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
        self.process = self.node.spawn(self.argv(), stdout=log, stderr=subprocess.STDOUT,
                                       cwd=str(self.checkout), env=env)
        log.close()
        if wait:
            self.wait_ready()
        return self


def write_credentials(directory: Path, identity_dir: Path, name: str) -> tuple[Path, Path]:
    key = generate_key()
    who = SpiffeId("cluster.local", "bench", name)
    issued = LocalSigner.from_dir(identity_dir).sign_now(make_csr(key, str(who)), who, 3600)
    cert, key_file = directory / f"{name}.crt", directory / f"{name}.key"
    cert.write_bytes(issued.chain_pem)
    key_file.write_bytes(key.private_pem())
    return cert, key_file


def handshake_rate(client: Pod, server: Pod, workdir: Path, identity_dir: Path, seconds: int) -> float:
    """Full mTLS handshakes per second, openssl on both ends (one connection at a time)."""
    bundle = identity_dir / TRUST_BUNDLE
    server_cert, server_key = write_credentials(workdir, identity_dir, "hs-server")
    client_cert, client_key = write_credentials(workdir, identity_dir, "hs-client")
    s_server = server.spawn(["openssl", "s_server", "-quiet", "-accept", str(HANDSHAKE_PORT),
                             "-tls1_3", "-cert", str(server_cert), "-cert_chain", str(server_cert),
                             "-key", str(server_key), "-CAfile", str(bundle), "-Verify", "1",
                             "-naccept", "1000000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        done = client.run(["openssl", "s_time", "-connect", f"{server.ip}:{HANDSHAKE_PORT}", "-new",
                           "-time", str(seconds), "-cert", str(client_cert), "-key", str(client_key),
                           "-CAfile", str(bundle), "-verify", "1"], timeout=seconds + 30)
    finally:
        stop_processes([s_server])
    match = re.search(r"(\d+) connections in ([\d.]+)s", done.stdout)
    if match is None:
        raise RuntimeError(f"cannot parse s_time output:\n{done.stdout[-600:]}{done.stderr[-600:]}")
    return int(match.group(1)) / float(match.group(2))


def measure(lab: Lab, pairs: dict[str, dict[int, LabAgent]], identity_dir: Path,
            settings: Settings) -> str:
    node0, node1 = lab.nodes[0], lab.nodes[1]
    srv_direct = lab.add_pod(node1, "srv-direct", args=OPT_OUT)
    cli_direct = lab.add_pod(node0, "cli-direct", args=OPT_OUT)
    cases = [TrafficCase("direct", "cross-node, direct (both pods opted out)", cli_direct, srv_direct,
                         "direct", False)]
    servers = [srv_direct]
    for key in MESH_CASES:
        if key in pairs:
            client_node, server_node = (lab.nodes[index] for index in sorted(pairs[key]))
            server = lab.add_pod(server_node, f"srv-{key}")
            client = lab.add_pod(client_node, f"cli-{key}")
            servers.append(server)
            cases.append(TrafficCase(key, f"cross-node, both agents ({key}), mTLS tunnel", client,
                                     server, "direct", True))
    nginx = [start_nginx(pod, write_nginx_site(lab.workdir, pod.name)) for pod in servers]
    agents_of = {"direct": pairs["mtls"], **pairs}
    loads = [load_average()]
    try:
        saturated, paced = bench_traffic(cases, pairs["mtls"], settings,
                                         agents_of=lambda case: agents_of[case.key])
        loads.append(load_average())
        for key in pairs:
            if next(iter(pairs[key].values())).metrics().value("tcp_open_total", tls="true") == 0:
                raise RuntimeError(f"the {key} case did not go through the mTLS tunnel")
        new_conns: dict[str, list[tuple[float, float]]] = {case.key: [] for case in cases}
        handshakes: list[float] = []
        for index in range(settings.rounds):
            for case in rotated(cases, index):
                pids = [a.process.pid for a in agents_of[case.key].values() if a.process]
                before = sum(cpu_seconds(pid) for pid in pids)
                rate = run_ab(case.client, case.server)
                new_conns[case.key].append((rate, sum(cpu_seconds(pid) for pid in pids) - before))
            handshakes.append(handshake_rate(cli_direct, srv_direct, lab.workdir, identity_dir,
                                             settings.wrk_seconds // 2 or 1))
            loads.append(load_average())
            print(f"  round {index + 1}: ab " + ", ".join(
                f"{key} {samples[-1][0]:,.0f}" for key, samples in new_conns.items())
                + f" conn/s; full handshakes {handshakes[-1]:,.0f}/s; load {loads[-1]}",
                file=sys.stderr)
        rss = {f"{key} node{node}": memory_mib(agent.process.pid)["rss"]
               for key, pair in pairs.items() for node, agent in pair.items() if agent.process}
    finally:
        stop_processes(nginx)
    return render([case.key for case in cases], saturated, paced, new_conns, handshakes, rss, loads)


def render(keys: list[str], saturated: list[WrkRun], paced: list[PacedRun],
           new_conns: dict[str, list[tuple[float, float]]], handshakes: list[float],
           rss: dict[str, float], loads: list[str]) -> str:
    def med(values: list[float]) -> float:
        return statistics.median(values)

    meshed = [key for key in keys if key != "direct"]
    titles = {"mtls": "through both agents, mTLS", "before": "the same, --compare checkout"}
    rows = ["| figure | direct | " + " | ".join(titles[k] for k in meshed) + " | ratio / added |",
            "| --- | ---: |" + " ---: |" * len(meshed) + " ---: |"]

    def row(label: str, values: dict[str, float], fmt: str, relation: str) -> None:
        cells = " | ".join(format(values[k], fmt) if k in values else "–" for k in keys)
        rows.append(f"| {label} | {cells} | {relation} |")

    def vs_direct(values: dict[str, float], ratio: bool) -> str:
        if ratio:
            return ", ".join(f"{k} {values[k] / values['direct']:.2f}×" for k in meshed)
        return ", ".join(f"{k} {values[k] - values['direct']:+.2f} ms" for k in meshed)

    rps = {k: med([r.stats.rps for r in saturated if r.case == k]) for k in keys}
    row("keep-alive req/s (`wrk -t1 -c16`)", rps, ",.0f", vs_direct(rps, True))
    for label, field in (("p50", "p50_ms"), ("p99", "p99_ms")):
        values = {k: med([r.stats[field] for r in paced if r.case == k]) for k in keys}
        row(f"{label} at 1,000 req/s over 16 keep-alive conns (ms)", values, ".2f",
            vs_direct(values, False))
    cpu_1k = {k: med([r.cpu_per_1k_requests for r in paced if r.case == k]) for k in meshed}
    row("both agents' vCPU per 1,000 req/s (paced)", cpu_1k, ".3f", "")
    conns = {k: med([rate for rate, _ in new_conns[k]]) for k in keys}
    spread = ", ".join(f"{k} {min(r for r, _ in new_conns[k]):,.0f}–{max(r for r, _ in new_conns[k]):,.0f}"
                       for k in keys)
    row(f"new connections/s (`ab -n {REQUESTS} -c 16`)", conns, ",.0f",
        vs_direct(conns, True) + f" (ranges: {spread})")
    cpu_conn = {k: med([cpu for _, cpu in new_conns[k]]) * 1000 / REQUESTS for k in meshed}
    row("both agents' CPU s per 1,000 new connections", cpu_conn, ".3f", "")
    full = med(handshakes)
    rows.append(f"| full mTLS handshakes/s (`openssl s_time -new`, P-256 both ends) | {full:,.0f} | "
                + " | ".join("–" for _ in meshed) + " | mesh new conns = "
                + ", ".join(f"{k} **{conns[k] / full:.1f}×**" for k in meshed) + " this |")
    rows.append("| agent RSS at the end (MiB) | – | " + " | ".join(
        " / ".join(f"{value:.1f}" for name, value in rss.items() if name.startswith(k + " "))
        for k in meshed) + " | |")
    notes = [f"- handshake rate per round: {', '.join(f'{h:,.0f}' for h in handshakes)}",
             f"- load average (1/5/15 min) at start, after the keep-alive part, after each round: "
             f"{'; '.join(loads)}"]
    return "\n".join(rows) + "\n\n" + "\n".join(notes) + "\n"


def start_agents(lab: Lab, identity_dir: Path, compare: Path | None,
                 pairs: dict[str, dict[int, LabAgent]], agents: dict[int, LabAgent]) -> None:
    """Agents of this tree on nodes 0 and 1; of the --compare checkout on nodes 2 and 3."""
    extra = ["--identity-dir", str(identity_dir)]
    for node in lab.nodes:
        key = "mtls" if node.index < 2 else "before"
        agent = LabAgent(lab, node, extra_args=extra) if key == "mtls" else \
            CheckoutAgent(lab, node, compare or Path("."), extra)
        pairs.setdefault(key, {})[node.index] = agents[node.index] = agent.start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round (smoke run)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; --quick 1)")
    parser.add_argument("--compare", type=Path, metavar="DIR",
                        help="another checkout whose agents are measured side by side")
    parser.add_argument("--cpu-hogs", type=int, default=0, metavar="N",
                        help="N busy loops on the host for the whole run (a loaded machine, "
                        "reproducibly); each ends after at most 30 minutes")
    args = parser.parse_args(argv)
    if args.compare is not None and not (args.compare / "agent" / "__main__.py").is_file():
        parser.error(f"--compare {args.compare}: not a Pinion checkout")
    settings = Settings.of(args.quick)
    if args.rounds:
        settings = dataclasses.replace(settings, rounds=args.rounds)
    agents: dict[int, LabAgent] = {}
    pairs: dict[str, dict[int, LabAgent]] = {}
    nodes = 2 if args.compare is None else 4
    with Lab(nodes=nodes, extra_plugins=lambda node: [agents[node.index].plugin_config()]) as lab:
        identity_dir = lab.workdir / "identity"
        init_identity_dir(identity_dir)
        hogs = [subprocess.Popen(["timeout", "1800", "sh", "-c", "while :; do :; done"])
                for _ in range(args.cpu_hogs)]
        try:
            start_agents(lab, identity_dir, args.compare, pairs, agents)
            table = measure(lab, pairs, identity_dir, settings)
        finally:
            stop_processes(hogs)
            for agent in agents.values():
                agent.stop()
    print_report(table, settings, args.compare, args.cpu_hogs)
    return 0


def print_report(table: str, settings: Settings, compare: Path | None, hogs: int) -> None:
    facts: dict[str, Any] = machine_facts()
    print("# mTLS mesh tunnel vs direct (one lab, interleaved rounds, medians)\n")
    print("\n".join(f"- {key}: {facts[key]}" for key in ("date", "pinion commit", "cpus (nproc)",
                                                          "uvloop in the agent") if key in facts))
    if compare is not None:
        print(f"- --compare: {compare}")
    if hogs:
        print(f"- --cpu-hogs: {hogs} busy loops on the host during the whole run")
    print(f"- rounds: {settings.rounds}, wrk {settings.wrk_seconds} s, paced {settings.paced_seconds} s\n")
    print(table)


if __name__ == "__main__":
    raise SystemExit(main())
