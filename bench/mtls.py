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
Run as root: `.venv/bin/python bench/mtls.py [--quick]`. Markdown on stdout."""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from foundation import (
    OPT_OUT,
    Settings,
    TrafficCase,
    bench_traffic,
    cpu_seconds,
    machine_facts,
    memory_mib,
    start_nginx,
    stop_processes,
    write_nginx_site,
)
from newconn import run_ab

from agent.controlplane.identity.authority import LocalSigner
from agent.controlplane.identity.crypto import generate_key, make_csr
from agent.controlplane.identity.files import TRUST_BUNDLE, init_identity_dir
from agent.controlplane.identity.spiffe import SpiffeId
from agent.lab.agents import LabAgent
from agent.lab.topology import Lab, Pod

HANDSHAKE_PORT = 9443


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


def measure(lab: Lab, agents: dict[int, LabAgent], identity_dir: Path, settings: Settings) -> str:
    node0, node1 = lab.nodes
    srv_direct = lab.add_pod(node1, "srv-direct", args=OPT_OUT)
    srv_mesh = lab.add_pod(node1, "srv-mesh")
    cli_direct = lab.add_pod(node0, "cli-direct", args=OPT_OUT)
    cli_mesh = lab.add_pod(node0, "cli-mesh")
    nginx = [start_nginx(pod, write_nginx_site(lab.workdir, kind))
             for kind, pod in (("direct", srv_direct), ("mesh", srv_mesh))]
    cases = [TrafficCase("direct", "cross-node, direct (both pods opted out)", cli_direct, srv_direct,
                         "direct", False),
             TrafficCase("mtls", "cross-node, both agents, mTLS tunnel", cli_mesh, srv_mesh,
                         "direct", True)]
    try:
        saturated, paced = bench_traffic(cases, agents, settings)
        if agents[0].metrics().value("tcp_open_total", tls="true") == 0:
            raise RuntimeError("the meshed case did not go through the mTLS tunnel")
        new_conns: dict[str, list[tuple[float, float]]] = {"direct": [], "mtls": []}
        handshakes: list[float] = []
        for index in range(settings.rounds):
            for key, client, server in (("direct", cli_direct, srv_direct), ("mtls", cli_mesh, srv_mesh)):
                before = sum(cpu_seconds(a.process.pid) for a in agents.values() if a.process)
                rate = run_ab(client, server)
                cpu = sum(cpu_seconds(a.process.pid) for a in agents.values() if a.process) - before
                new_conns[key].append((rate, cpu))
            handshakes.append(handshake_rate(cli_direct, srv_direct, lab.workdir, identity_dir,
                                             settings.wrk_seconds // 2 or 1))
            print(f"  round {index + 1}: ab direct {new_conns['direct'][-1][0]:,.0f}, mtls "
                  f"{new_conns['mtls'][-1][0]:,.0f} conn/s; full handshakes {handshakes[-1]:,.0f}/s",
                  file=sys.stderr)
        rss = {node: memory_mib(agent.process.pid)["rss"] for node, agent in agents.items()
               if agent.process}
    finally:
        stop_processes(nginx)
    return render(saturated, paced, new_conns, handshakes, rss)


def render(saturated: list, paced: list, new_conns: dict[str, list[tuple[float, float]]],  # type: ignore[type-arg]
           handshakes: list[float], rss: dict[int, float]) -> str:
    def med(values: list[float]) -> float:
        return statistics.median(values)

    rows = ["| figure | direct | through both agents, mTLS | ratio / added |", "| --- | ---: | ---: | ---: |"]
    rps = {key: med([r.stats.rps for r in saturated if r.case == key]) for key in ("direct", "mtls")}
    rows.append(f"| keep-alive req/s (`wrk -t1 -c16`) | {rps['direct']:,.0f} | {rps['mtls']:,.0f} | "
                f"{rps['mtls'] / rps['direct']:.2f}× |")
    for label, field in (("p50", "p50_ms"), ("p99", "p99_ms")):
        values = {key: med([r.stats[field] for r in paced if r.case == key]) for key in ("direct", "mtls")}
        rows.append(f"| {label} at 1,000 req/s over 16 keep-alive conns (ms) | {values['direct']:.2f} | "
                    f"{values['mtls']:.2f} | +{values['mtls'] - values['direct']:.2f} ms |")
    cpu_1k = med([r.cpu_per_1k_requests for r in paced if r.case == "mtls"])
    rows.append(f"| both agents' vCPU per 1,000 req/s (paced) | – | {cpu_1k:.3f} | |")
    conns = {key: med([rate for rate, _ in samples]) for key, samples in new_conns.items()}
    rows.append(f"| new connections/s (`ab -n 5000 -c 16`) | {conns['direct']:,.0f} | {conns['mtls']:,.0f} | "
                f"{conns['mtls'] / conns['direct']:.2f}× |")
    cpu_conn = med([cpu for _, cpu in new_conns["mtls"]]) * 1000 / 5000
    rows.append(f"| both agents' CPU s per 1,000 new connections | – | {cpu_conn:.3f} | |")
    full = med(handshakes)
    rows.append(f"| full mTLS handshakes/s (`openssl s_time -new`, P-256 both ends) | {full:,.0f} | – | "
                f"mesh new conns = **{conns['mtls'] / full:.1f}×** this |")
    rows.append(f"| agent RSS at the end (node0 / node1) | – | "
                f"{rss.get(0, 0):.1f} / {rss.get(1, 0):.1f} MiB | |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round (smoke run)")
    args = parser.parse_args(argv)
    settings = Settings.of(args.quick)
    agents: dict[int, LabAgent] = {}
    with Lab(nodes=2, extra_plugins=lambda node: [agents[node.index].plugin_config()]) as lab:
        identity_dir = lab.workdir / "identity"
        init_identity_dir(identity_dir)
        try:
            for node in lab.nodes:
                agents[node.index] = LabAgent(
                    lab, node, extra_args=["--identity-dir", str(identity_dir)]).start()
            table = measure(lab, agents, identity_dir, settings)
        finally:
            for agent in agents.values():
                agent.stop()
    facts = machine_facts()
    print("# mTLS mesh tunnel vs direct (one lab, interleaved rounds, medians)\n")
    print("\n".join(f"- {key}: {facts[key]}" for key in ("date", "pinion commit", "cpus (nproc)",
                                                          "uvloop in the agent") if key in facts))
    print(f"- rounds: {settings.rounds}, wrk {settings.wrk_seconds} s, paced {settings.paced_seconds} s\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
