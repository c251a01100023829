"""New connections through both agents, several builds of Pinion side by side in one lab: each
`--checkout DIR` gets its own pair of nodes (client node, server node) running that checkout's
agents with mTLS (`--identity-dir`), and its own pods: an HTTP pair and a pair whose port 80 is
declared opaque (`PINION_OPAQUE_PORTS=80`). Rounds interleave every (build, case) in a rotated
order, so every build sees the same machine load; the figure that matters is both agents'
CPU seconds per 1,000 new connections (user+sys from /proc/<pid>/stat around one
`ab -n N -c 16` run), which stays steady on a shared machine where conn/s does not.

Run as root, under the bench lock:
`flock /tmp/pinion-bench.lock .venv/bin/python bench/newconn_builds.py --checkout /tmp/nc-old
 --checkout . [--rounds 5] [--requests 3000]`. An old commit as a checkout:
`git archive REV | tar -x -C /tmp/nc-REV`, then in it `python setup.py build_ext --inplace`
(when it has csrc/) and copy bpf/*.o. Markdown on stdout."""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from foundation import (
    OPAQUE_HTTP,
    cpu_seconds,
    load_average,
    machine_facts,
    start_nginx,
    stop_processes,
    write_nginx_site,
)

from agent.identity.files import init_identity_dir
from agent.lab.agents import LabAgent
from agent.lab.topology import Lab, Node, Pod

CONCURRENCY = 16
CASES = ("http", "opaque")


class BuildAgent(LabAgent):
    """A lab agent run from `checkout` (its own `agent` package, this interpreter): the
    checkout is the child's working directory, which `python -m` puts first on sys.path."""

    def __init__(self, lab: Lab, node: Node, checkout: Path, identity_dir: Path) -> None:
        super().__init__(lab, node, extra_args=["--identity-dir", str(identity_dir)])
        self.checkout = checkout

    def argv(self) -> list[str]:
        # every build sweeps at its default interval (older ones have no such flag)
        argv = super().argv()
        at = argv.index("--sweep-interval-seconds")
        return argv[:at] + argv[at + 2:]

    def start(self, wait: bool = True) -> LabAgent:
        log = open(self.log_path, "a")  # noqa: SIM115 - the child owns it after spawn
        env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
        self.process = self.node.spawn(self.argv(), stdout=log, stderr=subprocess.STDOUT,
                                       cwd=str(self.checkout), env=env)
        log.close()
        if wait:
            self.wait_ready()
        return self


@dataclass
class Build:
    name: str
    checkout: Path
    agents: list[BuildAgent]
    pods: dict[str, tuple[Pod, Pod]] = field(default_factory=dict)  # case -> (client, server)
    samples: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    sys_samples: dict[str, list[float]] = field(default_factory=dict)

    def cpu(self) -> float:
        return sum(cpu_seconds(agent.process.pid) for agent in self.agents if agent.process)

    def sys_cpu(self) -> float:
        """Kernel time (stime) of both agents: the rest of `cpu` is user space."""
        return sum(int(Path(f"/proc/{agent.process.pid}/stat").read_text().rsplit(")", 1)[1]
                       .split()[12]) / os.sysconf("SC_CLK_TCK")
                   for agent in self.agents if agent.process)


def run_ab(client: Pod, server: Pod, requests: int) -> float:
    done = client.run(["ab", "-q", "-n", str(requests), "-c", str(CONCURRENCY), "-s", "10",
                       f"http://{server.ip}/1k"], timeout=120)
    failed = re.search(r"Failed requests:\s+(\d+)", done.stdout)
    if failed is None or int(failed.group(1)) != 0:
        raise RuntimeError(f"ab reported failures:\n{done.stdout[-800:]}{done.stderr[-800:]}")
    match = re.search(r"Requests per second:\s+([\d.]+)", done.stdout)
    if match is None:
        raise RuntimeError(f"cannot parse ab output:\n{done.stdout[-800:]}")
    return float(match.group(1))


def add_pods(lab: Lab, builds: list[Build]) -> list[subprocess.Popen[bytes]]:
    nginx = []
    for build in builds:
        client_node, server_node = (agent.node for agent in build.agents)
        for case in CASES:
            args = OPAQUE_HTTP if case == "opaque" else {}
            server = lab.add_pod(server_node, f"srv-{case}", args=args)
            client = lab.add_pod(client_node, f"cli-{case}", args=args)
            build.pods[case] = (client, server)
            build.samples[case] = []
            nginx.append(start_nginx(server, write_nginx_site(lab.workdir, f"{build.name}-{case}")))
    return nginx


def measure(builds: list[Build], rounds: int, requests: int) -> list[str]:
    runs = [(build, case) for build in builds for case in CASES]
    for build, case in runs:  # warm up: tunnels open, caches filled, first-use imports done
        run_ab(*build.pods[case], 200)
    loads = [load_average()]
    for index in range(rounds):
        shift = index % len(runs)
        order = runs[shift:] + runs[:shift]
        if index % 2:
            order.reverse()
        for build, case in order:
            before, sys_before = build.cpu(), build.sys_cpu()
            rate = run_ab(*build.pods[case], requests)
            build.samples[case].append((rate, (build.cpu() - before) / requests * 1000))
            build.sys_samples.setdefault(case, []).append(
                (build.sys_cpu() - sys_before) / requests * 1000)
        loads.append(load_average())
        print(f"  round {index + 1}: " + ", ".join(
            f"{b.name}/{c} {b.samples[c][-1][0]:,.0f}/s {b.samples[c][-1][1]:.3f}s"
            for b, c in runs) + f"; load {loads[-1]}", file=sys.stderr)
    return loads


def profile(builds: list[Build], requests: int, directory: Path, py_spy: str, native: bool) -> None:
    """py-spy (raw collapsed stacks, 250 Hz; --nonblocking unless --native) on both agents of
    each build for one
    `ab` run per case: DIR/<build>-<case>-<side>.txt."""
    directory.mkdir(parents=True, exist_ok=True)
    for build in builds:
        for case in CASES:
            spies = []
            for side, agent in zip(("client", "server"), build.agents, strict=True):
                assert agent.process is not None
                out = directory / f"{build.checkout.name}-{case}-{side}.txt"
                spies.append(subprocess.Popen(
                    # --native cannot be --nonblocking: py-spy then pauses the agent per sample
                    [py_spy, "record", "-r", "250", "-f", "raw", "-o", str(out),
                     *(["--native"] if native else ["--nonblocking"]), "-p", str(agent.process.pid)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL))
            time.sleep(1.0)
            try:
                run_ab(*build.pods[case], requests)
            finally:
                for spy in spies:
                    spy.send_signal(signal.SIGINT)
                for spy in spies:
                    spy.wait(30)


def report(builds: list[Build], loads: list[str], rounds: int, requests: int) -> str:
    first = builds[0]
    base = {case: statistics.median(cpu for _, cpu in first.samples[case]) for case in CASES}
    lines = [
        f"| build | case | conn/s (median) | range | agents' CPU s per 1,000 conns (median) | "
        f"range | of it kernel (median) | CPU vs {first.name} |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for build in builds:
        for case in CASES:
            rates = [rate for rate, _ in build.samples[case]]
            cpus = [cpu for _, cpu in build.samples[case]]
            cpu = statistics.median(cpus)
            lines.append(f"| {build.name} | {case} | {statistics.median(rates):,.0f} | "
                         f"{min(rates):,.0f}–{max(rates):,.0f} | {cpu:.3f} | "
                         f"{min(cpus):.3f}–{max(cpus):.3f} | "
                         f"{statistics.median(build.sys_samples[case]):.3f} | "
                         f"{cpu / base[case]:.2f}× |")
    facts = machine_facts()
    head = [f"# New connections per build (`ab -n {requests} -c {CONCURRENCY}`, mTLS, "
            f"{rounds} interleaved rounds)", "",
            *(f"- {key}: {facts[key]}" for key in ("date", "cpus (nproc)") if key in facts),
            *(f"- {build.name}: {build.checkout}" for build in builds),
            f"- load average per round: {'; '.join(loads)}", ""]
    return "\n".join(head + lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", type=Path, action="append", required=True, metavar="DIR",
                        help="a Pinion checkout to measure (repeat; the first is the baseline)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="after the rounds, py-spy both agents of each build for one ab run")
    parser.add_argument("--py-spy", default="py-spy", help="the py-spy executable")
    parser.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    args = parser.parse_args(argv)
    for checkout in args.checkout:
        if not (checkout / "agent" / "__main__.py").is_file():
            parser.error(f"--checkout {checkout}: not a Pinion checkout")
    if not 1 <= args.rounds <= 20 or not 100 <= args.requests <= 20000:
        parser.error("--rounds within 1..20, --requests within 100..20000")
    agents: dict[int, LabAgent] = {}
    builds: list[Build] = []
    with Lab(nodes=2 * len(args.checkout),
             extra_plugins=lambda node: [agents[node.index].plugin_config()]) as lab:
        identity_dir = lab.workdir / "identity"
        init_identity_dir(identity_dir)
        nginx: list[subprocess.Popen[bytes]] = []
        try:
            for number, checkout in enumerate(args.checkout):
                pair = [BuildAgent(lab, lab.nodes[2 * number + side], checkout.resolve(), identity_dir)
                        for side in (0, 1)]
                for agent in pair:
                    agents[agent.node.index] = agent.start(wait=False)
                name = f"{number}:{checkout.resolve().name}"
                builds.append(Build(name, checkout.resolve(), pair))
            for agent in agents.values():
                agent.wait_ready()
            time.sleep(1.0)
            nginx = add_pods(lab, builds)
            time.sleep(0.5)
            loads = measure(builds, args.rounds, args.requests)
            if args.profile is not None:
                profile(builds, args.requests, args.profile, args.py_spy, args.native)
            for build in builds:
                opened = build.agents[0].metrics().value("tcp_open_total", tls="true")
                if opened == 0:
                    raise RuntimeError(f"{build.name}: nothing went through the mTLS tunnel")
        finally:
            stop_processes(nginx)
            for agent in agents.values():
                agent.stop()
    print(report(builds, loads, args.rounds, args.requests))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
