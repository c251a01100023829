"""Foundation benchmark: what the Pinion agent costs, next to the same lab without it.

One run builds a two-node lab, starts a real agent per node and measures side by side,
interleaved: (1) CNI ADD/DEL latency with and without pinion-cni in the chain, (2) the
agents' memory, (3) keep-alive HTTP to nginx through the agents vs direct, both saturating
(wrk) and paced at 1,000 req/s (the small client at the end of this file, which the run
starts inside a pod as `--paced-client URL`). It prints a markdown report on stdout;
`--json PATH` also saves every raw sample.

    sudo .venv/bin/python bench/foundation.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import secrets
import signal
import statistics
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from agent.lab.agents import PLUGIN, LabAgent
from agent.lab.cni import CniRuntime
from agent.lab.topology import Lab, Node, Pod, stop_processes

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024
# Meshed, but port 80 relayed as opaque TCP: what the HTTP accounting costs, side by side.
OPAQUE_HTTP = {"PINION_OPAQUE_PORTS": "80"}
OPT_OUT = {"PINION_MESH": "disabled"}
# What containerd/k3s (systemd services) give CNI plugins (pinion-cni, a static binary, needs
# nothing on it; `bridge` and `host-local` are found through CNI_PATH).
RUNTIME_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Settings:
    """How much to measure: the full run or a quick smoke run."""

    cni_pods: int
    wrk_seconds: int
    rounds: int
    rss_pods: int = 20
    connections: int = 16
    paced_seconds: float = 5.0
    paced_rate: int = 1000
    warmup_pairs: int = 2
    settle_seconds: float = 2.0

    @classmethod
    def of(cls, quick: bool) -> Settings:
        if quick:
            return cls(cni_pods=10, wrk_seconds=5, rounds=1, paced_seconds=3.0)
        return cls(cni_pods=40, wrk_seconds=10, rounds=3)


# ---------------------------------------------------------------- small helpers


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (with fewer than 100 samples, p99 is the slowest one)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def run_quiet(argv: Sequence[str], env: dict[str, str] | None = None) -> str:
    """Run a host command; its stdout+stderr as text, whatever the exit code."""
    done = subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=30, env=env)
    return (done.stdout + done.stderr).strip()


def timed(argv: Sequence[str], count: int, env: dict[str, str] | None = None) -> float:
    """Median wall time in seconds of running argv `count` times."""
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        subprocess.run(list(argv), capture_output=True, check=False, timeout=30, env=env)
        samples.append(time.perf_counter() - started)
    return median(samples)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15 of stat


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak RSS) of a process, in MiB."""
    wanted = {"VmRSS": "rss", "VmHWM": "peak"}
    found: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in wanted:
            found[wanted[key]] = int(value.split()[0]) * 1024 / MIB
    return found


def agent_pid(agent: LabAgent) -> int:
    assert agent.process is not None, "agent not started"
    return agent.process.pid


# ---------------------------------------------------------------- machine facts


def machine_facts() -> dict[str, str]:
    cpu_model = next((line.split(":", 1)[1].strip() for line in
                      Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "?")
    return {
        "date": datetime.date.today().isoformat(),
        "pinion commit": pinion_commit(),
        "cpus (nproc)": str(len(os.sched_getaffinity(0))),
        "cpu model": cpu_model,
        "kernel": platform.release(),
        "python": f"{platform.python_version()} ({sys.executable})",
        "uvloop in the agent": uvloop_state(),
        "pinion-cni": plugin_kind(),
        "nginx": run_quiet(["nginx", "-v"]).replace("nginx version: ", ""),
        "wrk": run_quiet(["wrk", "-v"]).splitlines()[0].split(" [")[0],
        "load average at start": load_average(),
    }


def pinion_commit() -> str:
    """HEAD of the checkout that runs (agent + plugin), and whether they differ from it."""
    repo = str(PLUGIN.parents[1])
    head = run_quiet(["git", "-C", repo, "rev-parse", "--short", "HEAD"])
    dirty = run_quiet(["git", "-C", repo, "status", "--porcelain", "--", "agent", "cni"])
    return f"{head} (agent/ or cni/ modified)" if dirty else head


def plugin_kind() -> str:
    """What runs as pinion-cni: the static binary (`make cni`), or a script and its interpreter."""
    head = PLUGIN.read_bytes()[:64] if PLUGIN.exists() else b""
    if head.startswith(b"\x7fELF"):
        return f"binary, {PLUGIN.stat().st_size:,} bytes"
    if head.startswith(b"#!"):
        return "script: " + head.split(b"\n", 1)[0].decode(errors="replace")
    return f"missing ({PLUGIN}: make cni)"


def foreign_netns(run_id: str) -> int:
    """Network namespaces of other labs on this machine: someone else is busy too."""
    netns_dir = Path("/var/run/netns")
    names = [p.name for p in netns_dir.iterdir()] if netns_dir.is_dir() else []
    return sum(not name.startswith(f"pn{run_id}-") for name in names)


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def uvloop_state() -> str:
    """The agent runs under this interpreter and uses uvloop when it imports."""
    try:
        return f"yes ({importlib.metadata.version('uvloop')})"
    except importlib.metadata.PackageNotFoundError:
        return "no (asyncio default loop)"


# ---------------------------------------------------------------- 1. CNI ADD latency


@dataclass(frozen=True)
class CniVariant:
    key: str
    label: str
    with_pinion: bool
    args: dict[str, str]
    captured: bool


CNI_VARIANTS = (
    CniVariant("without", "bridge + host-local", False, {}, False),
    CniVariant("opted_out", "+ pinion-cni, pod opted out (`PINION_MESH=disabled`)", True, OPT_OUT, False),
    CniVariant("captured", "+ pinion-cni, pod captured by the agent", True, {}, True),
)


@dataclass
class PluginChoice:
    """The lab's `extra_plugins`: whether the next conflist ends with pinion-cni."""

    agents: dict[int, LabAgent]
    with_pinion: bool = True

    def __call__(self, node: Node) -> list[dict[str, Any]]:
        return [self.agents[node.index].plugin_config()] if self.with_pinion else []


@dataclass
class CniResult:
    pods_per_variant: int
    add_seconds: dict[str, list[float]]
    del_seconds: dict[str, list[float]]
    netns_exec_seconds: float
    plugin_start_seconds: float


@contextlib.contextmanager
def scratch_netns(name: str) -> Iterator[str]:
    """A bare pod netns (lo up) for one CNI ADD/DEL; always removed."""
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, capture_output=True)
        yield f"/var/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def time_add_and_del(lab: Lab, agent: LabAgent, choice: PluginChoice, variant: CniVariant,
                     tag: str) -> tuple[float, float]:
    """One pod through the whole chain: timed ADD, untimed capture check, timed DEL."""
    node = agent.node
    choice.with_pinion = variant.with_pinion
    conflist = lab.conflist(node)
    runtime = CniRuntime(run_in_netns=node.netns, env_extra={"PATH": RUNTIME_PATH})
    container_id = secrets.token_hex(32)
    args = {"IgnoreUnknown": "1", "K8S_POD_NAMESPACE": "bench", "K8S_POD_NAME": f"cni-{tag}",
            "K8S_POD_UID": str(uuid.uuid4()), **variant.args}
    with scratch_netns(f"{node.netns}-b{tag}") as netns_path:
        started = time.perf_counter()
        result = runtime.add(conflist, container_id, netns_path, "eth0", args)
        add_seconds = time.perf_counter() - started
        captured = container_id in agent.get("/pods")[1]
        if captured != variant.captured:
            raise RuntimeError(f"{variant.key}: pod captured={captured}, expected {variant.captured}")
        started = time.perf_counter()
        runtime.delete(conflist, container_id, netns_path, "eth0", args, result)
        del_seconds = time.perf_counter() - started
    return add_seconds, del_seconds


def bench_cni(lab: Lab, agent: LabAgent, choice: PluginChoice, settings: Settings) -> CniResult:
    """ADD then DEL one pod at a time (the node holds no other pod), variants rotated."""
    result = CniResult(settings.cni_pods, {v.key: [] for v in CNI_VARIANTS},
                       {v.key: [] for v in CNI_VARIANTS},
                       timed(["ip", "netns", "exec", agent.node.netns, "true"], 10),
                       plugin_start_seconds(agent.node))
    for index in range(settings.warmup_pairs):
        for variant in CNI_VARIANTS:
            time_add_and_del(lab, agent, choice, variant, f"w{index}{variant.key[0]}")
    for index in range(settings.cni_pods):
        shift = index % len(CNI_VARIANTS)
        for variant in CNI_VARIANTS[shift:] + CNI_VARIANTS[:shift]:
            add, delete = time_add_and_del(lab, agent, choice, variant, f"{index}{variant.key[0]}")
            result.add_seconds[variant.key].append(add)
            result.del_seconds[variant.key].append(delete)
    choice.with_pinion = True
    return result


def plugin_start_seconds(node: Node) -> float:
    """pinion-cni VERSION run the way the lab runs plugins: process start, no agent talk."""
    env = {**os.environ, "PATH": RUNTIME_PATH, "CNI_COMMAND": "VERSION"}
    return timed(["ip", "netns", "exec", node.netns, str(PLUGIN)], 10, env)


# ---------------------------------------------------------------- 2. agent memory


@dataclass
class MemoryPoint:
    moment: str
    meshed_pods: dict[str, float]
    mib: dict[str, dict[str, float]]


def memory_point(moment: str, agents: dict[int, LabAgent]) -> MemoryPoint:
    return MemoryPoint(
        moment,
        {a.node.name: a.metrics().value("pinion_meshed_pods") for a in agents.values()},
        {a.node.name: memory_mib(agent_pid(a)) for a in agents.values()},
    )


def add_idle_pods(lab: Lab, node: Node, count: int, first: int = 0) -> list[Pod]:
    return [lab.add_pod(node, f"idle-{index}", namespace="bench")
            for index in range(first, first + count)]


# ---------------------------------------------------------------- 3. traffic: nginx, wrk, paced


NGINX_CONF = """\
worker_processes 1;
daemon off;
user root;
pid {site}/nginx.pid;
error_log {site}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    keepalive_timeout 65;
    keepalive_requests 1000000;
    client_body_temp_path {site}/tmp/body;
    proxy_temp_path {site}/tmp/proxy;
    fastcgi_temp_path {site}/tmp/fastcgi;
    uwsgi_temp_path {site}/tmp/uwsgi;
    scgi_temp_path {site}/tmp/scgi;
    default_type application/octet-stream;
    server {{
        listen 80 backlog=1024;
        root {site}/www;
    }}
}}
"""


def write_nginx_site(workdir: Path, name: str) -> Path:
    """nginx config + a 1 KiB file at /1k, all under the lab workdir."""
    site = workdir / f"nginx-{name}"
    (site / "www").mkdir(parents=True)
    (site / "tmp").mkdir()
    (site / "www" / "1k").write_bytes(b"x" * 1024)
    (site / "nginx.conf").write_text(NGINX_CONF.format(site=site))
    return site


def start_nginx(pod: Pod, site: Path) -> subprocess.Popen[Any]:
    log = open(site / "stderr.log", "w")  # noqa: SIM115 - the child owns it after spawn
    try:
        return pod.spawn(["nginx", "-p", str(site), "-e", str(site / "error.log"),
                          "-c", str(site / "nginx.conf")], stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


@dataclass(frozen=True)
class TrafficCase:
    key: str
    label: str
    client: Pod
    server: Pod
    baseline: str  # the direct case this one is compared with
    proxied: bool

    @property
    def url(self) -> str:
        return f"http://{self.server.ip}/1k"


def wait_until_served(case: TrafficCase, timeout: float = 15.0) -> None:
    """curl the URL from the case's client pod until nginx answers 200 (path end to end)."""
    deadline = time.monotonic() + timeout
    answer = ""
    while time.monotonic() < deadline:
        answer = case.client.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                  "--max-time", "2", case.url], check=False).stdout
        if answer == "200":
            return
        time.sleep(0.2)
    raise RuntimeError(f"{case.key}: {case.url} not served from {case.client.name} (got {answer!r})")


@dataclass
class WrkStats:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


_UNIT_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_NUMBER_UNIT = r"([\d.]+)(us|ms|s|m|h)\b"


def parse_wrk(output: str) -> WrkStats:
    """Read wrk --latency output; raise ValueError (with the output) if a figure is missing."""
    def find(pattern: str) -> re.Match[str]:
        match = re.search(pattern, output, re.MULTILINE)
        if match is None:
            raise ValueError(f"wrk output lacks /{pattern}/:\n{output}")
        return match

    def duration(match: re.Match[str], group: int) -> float:
        return float(match.group(group)) * _UNIT_SECONDS[match.group(group + 1)]

    total = find(r"^\s*(\d+) requests in " + _NUMBER_UNIT)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                              output)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = sum(int(n) for n in socket_errors.groups()) if socket_errors else 0
    return WrkStats(
        requests=int(total.group(1)),
        seconds=duration(total, 2),
        rps=float(find(r"^Requests/sec:\s+([\d.]+)").group(1)),
        p50_ms=duration(find(r"^\s*50(?:\.0+)?%\s+" + _NUMBER_UNIT), 1) * 1e3,
        p99_ms=duration(find(r"^\s*99(?:\.0+)?%\s+" + _NUMBER_UNIT), 1) * 1e3,
        errors=errors + (int(non_2xx.group(1)) if non_2xx else 0),
    )


@dataclass
class AgentUsage:
    """What both agents spent during one measurement: CPU and connections they opened."""

    cpu_seconds: float = 0.0
    connections: float = 0.0


@contextlib.contextmanager
def agent_usage(case: TrafficCase, agents: dict[int, LabAgent]) -> Iterator[AgentUsage]:
    """Count agent CPU and connections around a block; fail if the path was not as expected."""
    def snapshot() -> AgentUsage:
        return AgentUsage(sum(cpu_seconds(agent_pid(a)) for a in agents.values()),
                          sum(a.metrics().value("tcp_open_total") for a in agents.values()))

    usage, before = AgentUsage(), snapshot()
    yield usage
    after = snapshot()
    usage.cpu_seconds = after.cpu_seconds - before.cpu_seconds
    usage.connections = after.connections - before.connections
    if (usage.connections > 0) != case.proxied:
        raise RuntimeError(f"{case.key}: agents opened {usage.connections:g} connections; "
                           f"expected {'some' if case.proxied else 'none'}")


@dataclass
class WrkRun:
    case: str
    round: int
    stats: WrkStats
    usage: AgentUsage

    @property
    def cpu_per_1k_requests(self) -> float:
        return self.usage.cpu_seconds * 1000 / max(1, self.stats.requests)


def run_wrk(case: TrafficCase, agents: dict[int, LabAgent], settings: Settings, seconds: int,
            round_index: int) -> WrkRun:
    """One bounded wrk run (saturating) from the case's client pod."""
    argv = ["wrk", "-t1", f"-c{settings.connections}", f"-d{seconds}s", "--latency",
            "--timeout", "5s", case.url]
    with agent_usage(case, agents) as usage:
        done = case.client.run(argv, check=False, timeout=seconds + 30)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}{done.stderr}")
    return WrkRun(case.key, round_index, parse_wrk(done.stdout), usage)


@dataclass
class PacedRun:
    case: str
    round: int
    stats: dict[str, float]  # requests, errors, seconds, p50_ms, p99_ms
    usage: AgentUsage

    @property
    def cpu_per_1k_requests(self) -> float:
        """Equals vCPU per 1,000 req/s: (cpu / t) / (requests / t / 1000)."""
        return self.usage.cpu_seconds * 1000 / max(1, self.stats["requests"])


def run_paced(case: TrafficCase, agents: dict[int, LabAgent], settings: Settings,
              round_index: int) -> PacedRun:
    """The paced client (this file, --paced-client) from the case's client pod."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--paced-client", case.url,
            "--rate", str(settings.paced_rate), "--seconds", str(settings.paced_seconds),
            "--connections", str(settings.connections)]
    with agent_usage(case, agents) as usage:
        done = case.client.run(argv, check=False, timeout=settings.paced_seconds + 30)
    if done.returncode != 0:
        raise RuntimeError(f"paced client failed ({done.returncode}): {done.stdout}{done.stderr}")
    return PacedRun(case.key, round_index, json.loads(done.stdout), usage)


def rotated(cases: Sequence[TrafficCase], round_index: int) -> list[TrafficCase]:
    shift = round_index % len(cases)
    return [*cases[shift:], *cases[:shift]]


def bench_traffic(cases: Sequence[TrafficCase], agents: dict[int, LabAgent],
                  settings: Settings,
                  agents_of: Callable[[TrafficCase], dict[int, LabAgent]] | None = None,
                  ) -> tuple[list[WrkRun], list[PacedRun]]:
    """A 1 s warm-up per case, then rounds of wrk and paced runs, case order rotated.
    `agents_of`: the agents a case goes through (default: all of `agents`)."""
    def of(case: TrafficCase) -> dict[int, LabAgent]:
        return agents if agents_of is None else agents_of(case)

    for case in cases:
        wait_until_served(case)
        run_wrk(case, of(case), settings, 1, -1)
    saturated: list[WrkRun] = []
    paced: list[PacedRun] = []
    for round_index in range(settings.rounds):
        for case in rotated(cases, round_index):
            saturated.append(run_wrk(case, of(case), settings, settings.wrk_seconds, round_index))
            paced.append(run_paced(case, of(case), settings, round_index))
            print(f"  round {round_index + 1} {case.key}: {saturated[-1].stats.rps:,.0f} req/s; "
                  f"at {settings.paced_rate}/s p99 {paced[-1].stats['p99_ms']:.2f} ms",
                  file=sys.stderr)
    return saturated, paced


@dataclass
class TrafficLab:
    cases: list[TrafficCase]
    servers: list[subprocess.Popen[Any]] = field(default_factory=list)


def build_traffic_lab(lab: Lab, traffic: TrafficLab) -> None:
    """Direct (opted-out) and meshed client/server pods, cross-node and same-node, nginx up."""
    node0, node1 = lab.nodes[0], lab.nodes[1]
    servers = {"direct": lab.add_pod(node1, "srv-direct", args=OPT_OUT),
               "mesh": lab.add_pod(node1, "srv-mesh"),
               "opaque": lab.add_pod(node1, "srv-opaque", args=OPAQUE_HTTP)}
    for kind, pod in servers.items():
        traffic.servers.append(start_nginx(pod, write_nginx_site(lab.workdir, kind)))
    far_direct = lab.add_pod(node0, "cli-direct", args=OPT_OUT)
    far_mesh = lab.add_pod(node0, "cli-mesh")
    far_opaque = lab.add_pod(node0, "cli-opaque", args=OPAQUE_HTTP)
    near_direct = lab.add_pod(node1, "cli-near-direct", args=OPT_OUT)
    near_mesh = lab.add_pod(node1, "cli-near-mesh")
    traffic.cases.extend([
        TrafficCase("direct", "cross-node, direct (both pods opted out)", far_direct,
                    servers["direct"], "direct", False),
        TrafficCase("two_agents", "cross-node, agent0 outbound → agent1 inbound", far_mesh,
                    servers["mesh"], "direct", True),
        TrafficCase("two_agents_opaque", "cross-node, both agents, port 80 opaque (TCP only)",
                    far_opaque, servers["opaque"], "direct", True),
        TrafficCase("direct_same_node", "same node, direct (both pods opted out)", near_direct,
                    servers["direct"], "direct_same_node", False),
        TrafficCase("one_agent", "same node, agent1 outbound → agent1 inbound", near_mesh,
                    servers["mesh"], "direct_same_node", True),
    ])


# ---------------------------------------------------------------- the paced client (in a pod)


async def paced_client(url: str, rate: int, seconds: float, connections: int) -> dict[str, float]:
    """`rate` GETs per second spread over keep-alive connections; latency from send to body."""
    target = urllib.parse.urlsplit(url)
    host, port = target.hostname or "", target.port or 80
    streams = [await asyncio.open_connection(host, port) for _ in range(connections)]
    request = f"GET {target.path or '/'} HTTP/1.1\r\nHost: {target.netloc}\r\n\r\n".encode()
    first = time.perf_counter() + 0.2  # after every connection's warm-up exchange
    per_connection = int(rate * seconds) // connections
    results = await asyncio.gather(*(
        paced_connection(stream, request, first + index / rate, connections / rate, per_connection)
        for index, stream in enumerate(streams)))
    latencies = [value for values, _ in results for value in values]
    return {"requests": len(latencies), "errors": sum(errors for _, errors in results),
            "seconds": time.perf_counter() - first, "p50_ms": median(latencies) * 1e3,
            "p99_ms": percentile(latencies, 0.99) * 1e3}


async def paced_connection(stream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                           request: bytes, first: float, period: float,
                           count: int) -> tuple[list[float], int]:
    """One warm-up exchange (not counted), then `count` exchanges on a fixed schedule."""
    latencies: list[float] = []
    errors = 0
    await exchange(stream, request)
    for index in range(count):
        delay = first + index * period - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        sent = time.perf_counter()
        ok = await exchange(stream, request)
        latencies.append(time.perf_counter() - sent)
        errors += not ok
    stream[1].close()
    return latencies, errors


async def exchange(stream: tuple[asyncio.StreamReader, asyncio.StreamWriter], request: bytes) -> bool:
    """Send one GET, read the head and the Content-Length body; True for a 200."""
    reader, writer = stream
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    length = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
    await reader.readexactly(int(length.group(1)) if length else 0)
    return head.startswith(b"HTTP/1.1 200")


# ---------------------------------------------------------------- the report


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def cni_table(result: CniResult) -> list[str]:
    lines = ["| chain | ADD median ms | ADD p99 ms | DEL median ms | DEL p99 ms |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for variant in CNI_VARIANTS:
        adds, dels = result.add_seconds[variant.key], result.del_seconds[variant.key]
        lines.append(f"| {variant.label} | {ms(median(adds))} | {ms(percentile(adds, 0.99))} "
                     f"| {ms(median(dels))} | {ms(percentile(dels, 0.99))} |")
    for variant in CNI_VARIANTS[1:]:
        cells = [ms(added(samples, variant.key, p99)) for samples in (result.add_seconds,
                 result.del_seconds) for p99 in (False, True)]
        lines.append(f"| **added by Pinion**, pod {'captured' if variant.captured else 'opted out'}"
                     f" | **{cells[0]}** | {cells[1]} | {cells[2]} | {cells[3]} |")
    return lines


def added(samples: dict[str, list[float]], key: str, p99: bool) -> float:
    """Median (or p99) of a pinion variant minus the same statistic without pinion-cni."""
    def stat(values: list[float]) -> float:
        return percentile(values, 0.99) if p99 else median(values)

    return stat(samples[key]) - stat(samples["without"])


def cni_notes(result: CniResult, settings: Settings) -> list[str]:
    return [
        "",
        f"{result.pods_per_variant} pods per chain (after {settings.warmup_pairs} unmeasured "
        "warm-up rounds), one pod at a time on node0 (no other pod on the node), chain order "
        "rotated every round. p99 is nearest-rank: with fewer than 100 samples, the slowest.",
        f"Plugins run with the container runtime's PATH (`{RUNTIME_PATH}`). "
        f"Lab overhead in every plugin call: `ip netns exec <node>` costs "
        f"{ms(result.netns_exec_seconds)} ms (a real runtime calls plugins directly); "
        f"pinion-cni `VERSION` (process start only, through `ip netns exec`) takes "
        f"{ms(result.plugin_start_seconds)} ms.",
    ]


def memory_table(points: Sequence[MemoryPoint]) -> list[str]:
    nodes = list(points[0].mib)
    head = " | ".join(f"{n} pods | {n} RSS MiB | {n} peak MiB" for n in nodes)
    lines = [f"| moment | {head} |", "| --- |" + " ---: |" * (3 * len(nodes))]
    for point in points:
        cells = " | ".join(f"{point.meshed_pods[n]:g} | {point.mib[n]['rss']:.1f} | "
                           f"{point.mib[n]['peak']:.1f}" for n in nodes)
        lines.append(f"| {point.moment} | {cells} |")
    return lines


def saturated_table(cases: Sequence[TrafficCase], runs: Sequence[WrkRun]) -> list[str]:
    lines = ["| case | req/s | req/s range | p50 ms | p99 ms | vs direct | agents' CPU s per "
             "1,000 req | agents busy, vCPU | agent conns | errors |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    rps = {c.key: median([r.stats.rps for r in runs if r.case == c.key]) for c in cases}
    for case in cases:
        mine = [r for r in runs if r.case == case.key]
        lines.append(
            f"| {case.label} | {rps[case.key]:,.0f} "
            f"| {min(r.stats.rps for r in mine):,.0f}–{max(r.stats.rps for r in mine):,.0f} "
            f"| {median([r.stats.p50_ms for r in mine]):.2f} "
            f"| {median([r.stats.p99_ms for r in mine]):.2f} "
            f"| {rps[case.key] / rps[case.baseline]:.2f}× "
            f"| {median([r.cpu_per_1k_requests for r in mine]):.3f} "
            f"| {median([r.usage.cpu_seconds / r.stats.seconds for r in mine]):.2f} "
            f"| {median([r.usage.connections for r in mine]):g} "
            f"| {sum(r.stats.errors for r in mine):g} |")
    return lines


def paced_table(cases: Sequence[TrafficCase], runs: Sequence[PacedRun]) -> list[str]:
    lines = ["| case | p50 ms | p99 ms | p50 added ms | p99 added ms | agents' vCPU per "
             "1,000 req/s | requests | errors |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    p50 = {c.key: median([r.stats["p50_ms"] for r in runs if r.case == c.key]) for c in cases}
    p99 = {c.key: median([r.stats["p99_ms"] for r in runs if r.case == c.key]) for c in cases}
    for case in cases:
        mine = [r for r in runs if r.case == case.key]
        lines.append(
            f"| {case.label} | {p50[case.key]:.3f} | {p99[case.key]:.3f} "
            f"| {p50[case.key] - p50[case.baseline]:+.3f} | {p99[case.key] - p99[case.baseline]:+.3f} "
            f"| {median([r.cpu_per_1k_requests for r in mine]):.3f} "
            f"| {sum(r.stats['requests'] for r in mine):,.0f} "
            f"| {sum(r.stats['errors'] for r in mine):g} |")
    return lines


@dataclass
class Report:
    facts: dict[str, str]
    settings: Settings
    cni: CniResult | None = None
    memory: list[MemoryPoint] = field(default_factory=list)
    cases: list[TrafficCase] = field(default_factory=list)
    saturated: list[WrkRun] = field(default_factory=list)
    paced: list[PacedRun] = field(default_factory=list)

    def markdown(self) -> str:
        s = self.settings
        lines = ["# Pinion foundation benchmark", "", "| fact | value |", "| --- | --- |",
                 *(f"| {k} | {v} |" for k, v in self.facts.items()), ""]
        if self.cni is not None:
            lines += ["## CNI ADD latency", "", *cni_table(self.cni), *cni_notes(self.cni, s), ""]
        if self.memory:
            lines += ["## Agent memory (VmRSS; peak = VmHWM)", "", *memory_table(self.memory), ""]
        if self.saturated:
            lines += [f"## Keep-alive HTTP at saturation: `wrk -t1 -c{s.connections} "
                      f"-d{s.wrk_seconds}s --latency` → nginx 1 KiB; medians of {s.rounds} "
                      "interleaved rounds", "", *saturated_table(self.cases, self.saturated), ""]
        if self.paced:
            lines += [f"## Keep-alive HTTP at {s.paced_rate:,} req/s over {s.connections} "
                      f"connections ({s.paced_seconds:g} s per run, paced client); medians of "
                      f"{s.rounds} interleaved rounds", "", *paced_table(self.cases, self.paced), ""]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        def runs(items: Sequence[WrkRun | PacedRun]) -> list[dict[str, Any]]:
            return [{**dataclasses.asdict(r), "cpu_per_1k_requests": r.cpu_per_1k_requests}
                    for r in items]

        return {"facts": self.facts, "settings": dataclasses.asdict(self.settings),
                "cni": dataclasses.asdict(self.cni) if self.cni else None,
                "memory": [dataclasses.asdict(p) for p in self.memory],
                "saturated": runs(self.saturated), "paced": runs(self.paced)}


# ---------------------------------------------------------------- the run


def settle(settings: Settings) -> None:
    time.sleep(settings.settle_seconds)


def measure(lab: Lab, agents: dict[int, LabAgent], choice: PluginChoice, report: Report) -> None:
    """The whole sequence, in one lab: memory idle, CNI, memory with pods, traffic, memory."""
    settings = report.settings
    others = [foreign_netns(lab.run_id)]
    settle(settings)
    report.memory.append(memory_point("idle, just started", agents))
    print("measuring CNI ADD/DEL …", file=sys.stderr)
    report.cni = bench_cni(lab, agents[0], choice, settings)
    settle(settings)
    report.memory.append(memory_point(f"idle, after {3 * settings.cni_pods} CNI ADD/DEL", agents))
    add_idle_pods(lab, lab.nodes[0], settings.rss_pods)
    settle(settings)
    report.memory.append(memory_point(f"{settings.rss_pods} meshed idle pods on node0", agents))
    add_idle_pods(lab, lab.nodes[0], 50 - settings.rss_pods, first=settings.rss_pods)
    settle(settings)
    report.memory.append(memory_point("50 meshed idle pods on node0", agents))
    traffic = TrafficLab([])
    try:
        build_traffic_lab(lab, traffic)
        others.append(foreign_netns(lab.run_id))
        print("measuring traffic …", file=sys.stderr)
        report.saturated, report.paced = bench_traffic(traffic.cases, agents, settings)
        report.cases = traffic.cases
        settle(settings)
        report.memory.append(memory_point("after the traffic runs", agents))
        others.append(foreign_netns(lab.run_id))
    finally:
        stop_processes(traffic.servers)
        report.facts["other labs' netns (start / traffic / end)"] = " / ".join(map(str, others))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="10 pods per chain, 5 s wrk and 3 s paced runs, 1 round")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write raw samples here")
    paced = parser.add_argument_group("paced client (what the benchmark runs inside a pod)")
    paced.add_argument("--paced-client", metavar="URL", help="run only the paced client")
    paced.add_argument("--rate", type=int, default=1000)
    paced.add_argument("--seconds", type=float, default=5.0)
    paced.add_argument("--connections", type=int, default=16)
    args = parser.parse_args(argv)
    if args.paced_client is None and os.geteuid() != 0:
        parser.error("needs root (network namespaces, netfilter, cgroups)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.paced_client is not None:
        print(json.dumps(asyncio.run(paced_client(args.paced_client, args.rate, args.seconds,
                                                  args.connections))))
        return 0
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # so every `finally` below still runs
    report = Report(machine_facts(), Settings.of(args.quick))
    agents: dict[int, LabAgent] = {}
    choice = PluginChoice(agents)
    with Lab(nodes=2, extra_plugins=choice) as lab:  # closing stops the agents by PID
        print(f"lab {lab.run_id}: namespaces pn{lab.run_id}-*", file=sys.stderr)
        for node in lab.nodes:
            agents[node.index] = LabAgent(lab, node).start()
        measure(lab, agents, choice, report)
    report.facts["load average at end"] = load_average()
    print(report.markdown())
    if args.json is not None:
        args.json.write_text(json.dumps(report.to_json(), indent=2))
    return 0


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
