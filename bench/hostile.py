"""Hostile peers against an agent (issue #12): what each attack costs the agent, and what its
neighbours lose meanwhile, for this tree and (with `--compare DIR`) another checkout, one
scenario after the other in one run.

Each scenario gets a fresh two-node lab with mTLS (agents of one checkout), a victim pod on
node1, an unmeshed attacker pod on node0, and two other meshed pods talking across the
nodes at 200 req/s (a new connection per request) while the attack runs. The attacks are
`tests/netns/attacks.py`, the same the netns tests use:

- reset: 1,000 then 10,000 connect-and-reset on the victim's 15008 (fds, tasks, RSS);
- idle: 5,000 idle connections to 15008 from 20 source addresses plus 500 to the admin port,
  held 4 s, three rounds (peak and after-round RSS);
- flood: TLS ClientHellos from one source for 10 s, two threads (neighbours, agent CPU);
- peer: a peer with a valid certificate opening 10 connections x 256 streams to an echo
  server, 256 KiB sent on each, never reading (peak RSS).

Run as root: `.venv/bin/python bench/hostile.py [--compare DIR] [--only NAME,...]`.
Markdown on stdout. The --compare checkout speaks its own tunnel version: the peer attack
uses that checkout's `agent.core.tunnel`."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mtls

from agent.identity.files import TRUST_BUNDLE, init_identity_dir
from agent.identity.spiffe import SpiffeId
from agent.lab.agents import REPO, LabAgent
from agent.lab.topology import Lab, Pod
from tests.netns.test_hostile_peers import Watch
from tests.netns.test_mesh_tunnel import issue_files

ATTACKS = str(REPO / "tests" / "netns" / "attacks.py")
HTTP_SERVER = "agent.lab.httpserver"
MIB = 1024 * 1024


class CheckoutAgent(mtls.CheckoutAgent):
    """bench/mtls.py's agent run from a given checkout, with what the attacks measure."""

    def cpu_seconds(self) -> float:
        assert self.process is not None
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def fds(self) -> int:
        assert self.process is not None
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))


class World:
    """One lab: agents of `checkout`, the victim, the attacker, the talking neighbours."""

    def __init__(self, lab: Lab, agents: list[CheckoutAgent], checkout: Path) -> None:
        self.lab, self.agents, self.checkout = lab, agents, checkout
        self.servers: list[subprocess.Popen[str]] = []
        self.client, self.server = self.pod(0, "client"), self.pod(1, "server")
        self.victim = self.pod(1, "victim")
        self.attacker = self.pod(0, "attacker", PINION_MESH="disabled")
        self.serve(self.server, HTTP_SERVER, "--port", "8080")
        self.serve(self.victim, "agent.lab.tcpserver", "--port", "9000", "--mode", "echo")
        self.pace(100, 1).result()  # warm: the neighbours' tunnel is up

    def pod(self, node: int, name: str, **args: str) -> Pod:
        return self.lab.add_pod(self.lab.nodes[node], name, args=args)

    def serve(self, pod: Pod, module: str, *argv: str) -> None:
        process = pod.spawn([sys.executable, "-m", module, *argv], stdout=subprocess.PIPE,
                            text=True, cwd=str(REPO))
        assert process.stdout is not None and process.stdout.readline().strip() == "listening"
        self.servers.append(process)

    def attack(self, pod: Pod, *argv: str) -> Running:
        return Running(pod, self.checkout, *argv)

    def pace(self, rate: int, seconds: float) -> Running:
        return self.attack(self.client, "pace", f"http://{self.server.ip}:8080/", "--rate",
                           str(rate), "--seconds", str(seconds))

    @property
    def target(self) -> CheckoutAgent:
        return self.agents[1]


class Running:
    def __init__(self, pod: Pod, checkout: Path, *argv: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(checkout)}  # the checkout's tunnel, for `peer`
        self.process = pod.spawn([sys.executable, ATTACKS, *argv], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env)

    def first_line(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        return dict(json.loads(self.process.stdout.readline()))

    def result(self, timeout: float = 120) -> dict[str, Any]:
        self.process.wait(timeout)
        assert self.process.stdout is not None and self.process.stderr is not None
        out, err = self.process.stdout.read(), self.process.stderr.read()
        if self.process.returncode != 0 or not out.strip():
            raise RuntimeError(f"attack failed: {err[-1500:]}")
        return dict(json.loads(out.strip().splitlines()[-1]))


@contextlib.contextmanager
def world(checkout: Path) -> Iterator[World]:
    agents: list[CheckoutAgent] = []
    with Lab(nodes=2, extra_plugins=lambda node: [agents[node.index].plugin_config()]) as lab:
        identity = lab.workdir / "identity"
        init_identity_dir(identity)
        try:
            agents += [CheckoutAgent(lab, node, checkout, ["--identity-dir", str(identity)])
                       for node in lab.nodes]
            for agent in agents:
                agent.start()
            yield World(lab, agents, checkout)
        finally:
            for agent in agents:
                agent.stop()


def tasks(agent: LabAgent) -> str:
    value = agent.metrics().value("pinion_event_loop_tasks")
    return f"{value:.0f}" if "pinion_event_loop_tasks" in agent.metrics().text else "n/a"


def neighbours(traffic: dict[str, Any]) -> str:
    return f"{traffic['errors']} of {traffic['requests']} failed, p99 {traffic['p99_ms']:.1f} ms"


def reset_scenario(w: World) -> dict[str, str]:
    agent, row = w.target, {}
    w.attack(w.attacker, "reset", w.victim.ip, "15008", "--count", "50").result()
    time.sleep(0.5)
    fds, rss, before_tasks = agent.fds(), agent.rss_bytes(), tasks(agent)
    traffic, after = w.pace(200, 8), []
    for count in (1000, 10000):
        w.attack(w.attacker, "reset", w.victim.ip, "15008", "--count", str(count)).result()
        time.sleep(5)
        after.append(agent.fds())
    row["fds: baseline → 5 s after 1,000 → after 10,000 more"] = " → ".join(map(str, [fds, *after]))
    row["tasks (baseline → after)"] = f"{before_tasks} → {tasks(agent)}"
    row["RSS growth after 11,050"] = f"{(agent.rss_bytes() - rss) / MIB:+.1f} MiB"
    row["neighbours at 200 req/s"] = neighbours(traffic.result())
    return row


def idle_scenario(w: World) -> dict[str, str]:
    agent = w.target
    sources = [f"10.42.0.{200 + index}" for index in range(20)]
    for address in sources:
        w.attacker.run(["ip", "addr", "add", f"{address}/24", "dev", "eth0"])
    baseline, peaks, afters, lost = agent.rss_bytes(), [], [], []
    for _ in range(3):
        traffic, watch = w.pace(200, 10), Watch(agent)
        flood = w.attack(w.attacker, "idle", f"{w.victim.ip}:15008", "--count", "5000", "--hold",
                         "4", "--sources", ",".join(sources))
        admin = w.attack(w.attacker, "idle", f"{agent.admin[0]}:{agent.admin[1]}", "--count",
                         "500", "--hold", "4")
        flood.result()
        admin.result()
        peaks.append(watch.stop())
        lost.append(neighbours(traffic.result()))
        time.sleep(4)
        afters.append(agent.rss_bytes())
    return {"RSS baseline": f"{baseline / MIB:.1f} MiB",
            "RSS peak, rounds 1/2/3": " / ".join(f"{(p - baseline) / MIB:+.1f}" for p in peaks) + " MiB",
            "RSS after, rounds 1/2/3": " / ".join(f"{(a - baseline) / MIB:+.1f}" for a in afters) + " MiB",
            "neighbours at 200 req/s, round 1": lost[0], "round 3": lost[-1]}


def flood_scenario(w: World) -> dict[str, str]:
    agent = w.target
    cpu, traffic = agent.cpu_seconds(), w.pace(200, 11)
    flooded = w.attack(w.attacker, "flood", w.victim.ip, "15008", "--seconds", "10").result()
    used = agent.cpu_seconds() - cpu
    return {"ClientHellos sent in 10 s": f"{flooded['attempts']:,}",
            "answered by a server hello": f"{flooded['server_hello']:,}",
            "agent CPU during the flood": f"{used:.2f} s of 11 s",
            "neighbours at 200 req/s": neighbours(traffic.result())}


def peer_scenario(w: World) -> dict[str, str]:
    agent = w.target
    identity = w.lab.workdir / "identity"
    cert, key = issue_files(w.lab.workdir, identity, "peer", SpiffeId("cluster.local", "default",
                                                                      "default"), time.time(), 3600)
    baseline, watch, traffic = agent.rss_bytes(), Watch(agent), w.pace(200, 10)
    peer = w.attack(w.attacker, "tunnel", w.victim.ip, "15008", "--cert", str(cert), "--key",
                    str(key), "--bundle", str(identity / TRUST_BUNDLE), "--connections", "10",
                    "--streams", "256", "--app-port", "9000", "--hold", "6").result()
    peak = watch.stop()
    return {"tunnel connections admitted": f"{peer['connections']} of 10",
            "RSS peak growth": f"{(peak - baseline) / MIB:+.1f} MiB",
            "neighbours at 200 req/s": neighbours(traffic.result())}


SCENARIOS: dict[str, Callable[[World], dict[str, str]]] = {
    "reset": reset_scenario, "idle": idle_scenario, "flood": flood_scenario, "peer": peer_scenario}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", type=Path, metavar="DIR", help="another checkout, side by side")
    parser.add_argument("--only", default=",".join(SCENARIOS), help="scenarios, comma-separated")
    args = parser.parse_args(argv)
    checkouts = {"this tree": REPO, **({f"{args.compare}": args.compare} if args.compare else {})}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=REPO).stdout.strip()
    print(f"# Hostile peers (bench/hostile.py), {time.strftime('%Y-%m-%d')}, commit {commit}\n")
    for name in args.only.split(","):
        results: dict[str, dict[str, str]] = {}
        for label, checkout in checkouts.items():
            try:
                with world(checkout.resolve()) as w:
                    results[label] = SCENARIOS[name](w)
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                results[label] = {"failed": str(exc)[:200]}
        keys = list(dict.fromkeys(key for row in results.values() for key in row))
        print(f"## {name}\n\n| | " + " | ".join(results) + " |\n|---|" + "---|" * len(results))
        for key in keys:
            print(f"| {key} | " + " | ".join(row.get(key, "") for row in results.values()) + " |")
        print(flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
