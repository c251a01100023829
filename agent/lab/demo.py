"""`pinion demo`: a throwaway two-node lab that shows the mesh at work, then removes itself.

Builds two nodes (network namespaces on an underlay switch) with two meshed pods each plus one
pod that opted out, starts a real agent per node, drives HTTP traffic with curl from inside the
pods, compares what the agents counted with what curl did, and prints a per-pod table.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import secrets
import select
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import FrameType

from agent.lab.agents import REPO, LabAgent, Metrics
from agent.lab.capture import UNDERLAY_INTERFACE, UnderlayCapture
from agent.lab.topology import Lab, LabError, Pod
from agent.viz.stats import histogram_quantile

REDIRECTS = ("iptables", "nftables", "ebpf")
MAX_REQUESTS = 10_000
HTTP_PORT = 8080
CONNECTIONS_PER_FLOW = 4  # keep-alive connections each client opens to each web pod
SIDE_REQUESTS = 10  # requests of the flows that involve the non-meshed pod
FAILING_EVERY = 40  # one request in this many asks for /status/500
TRAFFIC_SECONDS = 60.0  # the whole traffic phase, all flows together
REQUEST_SECONDS = 10  # curl --max-time, per request
SERVER_START_SECONDS = 10.0

# (node index, pod name, meshed)
LAYOUT: tuple[tuple[int, str, bool], ...] = (
    (0, "client-0", True),
    (0, "web-0", True),
    (1, "client-1", True),
    (1, "web-1", True),
    (1, "legacy", False),
)
CLIENTS = ("client-0", "client-1")
SERVERS = ("web-0", "web-1", "legacy")
WEBS = ("web-0", "web-1")
NOT_MESHED = {"legacy"}
COLUMNS = (
    ("NODE", 6),
    ("POD", 9),
    ("MESHED", 7),
    ("OUT_CONN", 9),
    ("IN_CONN", 8),
    ("BYTES_OUT", 10),
    ("BYTES_IN", 10),
)


class DemoError(RuntimeError):
    """The demo saw something the mesh should not do; the message says what."""


@dataclass(frozen=True)
class Flow:
    """HTTP requests from one pod to another, spread over a few keep-alive connections."""

    source: Pod
    target: Pod
    paths: tuple[str, ...]
    connections: int
    header: str = ""  # sent with every request (meshed flows carry the secret to look for)


@dataclass
class Tally:
    """What curl saw: HTTP status counts, and connections by (pod, direction)."""

    statuses: Counter[str] = field(default_factory=Counter)
    connections: Counter[tuple[str, str]] = field(default_factory=Counter)
    served: Counter[tuple[str, str]] = field(default_factory=Counter)  # (meshed pod, status)


def say(line: str) -> None:
    print(f"• {line}", flush=True)


# ---------------------------------------------------------------- entry point


def run_demo(redirect: str = "nftables", requests: int = 200) -> int:
    """Build the lab, show the mesh, remove everything. 0 on success, 1 on failure."""
    if redirect not in REDIRECTS or not 1 <= requests <= MAX_REQUESTS:
        print(
            f"pinion demo: --redirect must be one of {', '.join(REDIRECTS)} and --requests "
            f"within 1..{MAX_REQUESTS}",
            file=sys.stderr,
        )
        return 2
    started = time.monotonic()
    run_id = secrets.token_hex(3)
    say(f"building lab {run_id}: two nodes (network namespaces pn{run_id}-*) on a switch")
    agents: dict[int, LabAgent] = {}
    lab: Lab | None = None
    outcome = 1
    with _sigterm_as_interrupt():
        try:
            lab = Lab(nodes=2, run_id=run_id, extra_plugins=lambda node: [agents[node.index].plugin_config()])
            outcome = _show(lab, agents, redirect, requests)
        except (DemoError, LabError, RuntimeError, OSError, ValueError, subprocess.SubprocessError) as error:
            print(f"✗ demo failed: {error}", flush=True)
            _print_agent_logs(agents)
        except KeyboardInterrupt:
            print("✗ interrupted: removing the lab", flush=True)
            raise
        finally:
            with _shielded():
                cleaned = _teardown(lab, agents, run_id)
    if outcome == 0 and cleaned:
        say(f"done in {time.monotonic() - started:.1f} s")
        return 0
    return 1


def _show(lab: Lab, agents: dict[int, LabAgent], redirect: str, requests: int) -> int:
    pods = _build(lab, agents, redirect)
    secret = f"x-demo-secret: {secrets.token_hex(8)}"
    capture = UnderlayCapture(lab.nodes[1], lab.workdir / "underlay.pcap")
    try:
        tally = _drive(pods, requests, secret)
    finally:
        wire = capture.stop()
    _check_wire(capture, wire, secret)
    _check_source_ip(pods, tally)
    metrics = {node.name: agents[node.index].metrics() for node in lab.nodes}
    meshed = set().union(*(_meshed_pods(agent) for agent in agents.values()))
    _print_table(pods, metrics, meshed)
    _check_counts(pods, metrics, tally)
    _print_golden(pods, metrics, tally)
    _conclude(metrics)
    return 0


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _still_cleaning(signum: int, frame: FrameType | None) -> None:
    print("  (still removing the lab; it takes a few seconds)", flush=True)


@contextlib.contextmanager
def _handling(handler: Callable[[int, FrameType | None], None], *signums: int) -> Iterator[None]:
    """Handle these signals with `handler` (main thread only) for the duration of the block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, handler) for signum in signums}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _sigterm_as_interrupt() -> contextlib.AbstractContextManager[None]:
    """SIGTERM unwinds like Ctrl-C, so the lab is still removed."""
    return _handling(_interrupt, signal.SIGTERM)


def _shielded() -> contextlib.AbstractContextManager[None]:
    """A second Ctrl-C or SIGTERM must not cut the teardown short and leave namespaces."""
    return _handling(_still_cleaning, signal.SIGINT, signal.SIGTERM)


# ---------------------------------------------------------------- building


def _build(lab: Lab, agents: dict[int, LabAgent], redirect: str) -> dict[str, Pod]:
    from agent.identity.files import init_identity_dir

    identity = lab.workdir / "identity"
    init_identity_dir(identity, trust_domain="cluster.local")
    say(f"identity: trust anchor + issuer for spiffe://cluster.local in {identity} "
        "(pinion identity init)")
    for node in lab.nodes:
        agent = agents[node.index] = LabAgent(lab, node, redirect=redirect,
                                              extra_args=["--identity-dir", str(identity)]).start()
        say(f"{node.name}: agent ready at {agent.admin[0]}:{agent.admin[1]} ({redirect} capture)")
    say("CNI chain on each node: bridge → host-local → pinion-cni (tells the agent)")
    pods: dict[str, Pod] = {}
    for node_index, name, meshed in LAYOUT:
        pods[name] = _add_pod(lab, agents[node_index], name, meshed)
    for name in SERVERS:
        _serve_http(pods[name])
    say(f"HTTP servers listening on :{HTTP_PORT} in {', '.join(SERVERS)}")
    return pods


def _add_pod(lab: Lab, agent: LabAgent, name: str, meshed: bool) -> Pod:
    args = {} if meshed else {"PINION_MESH": "disabled"}
    pod = lab.add_pod(agent.node, name, args=args)
    captured = (pod.namespace, pod.name) in _meshed_pods(agent)
    if captured != meshed:
        raise DemoError(
            f"pod {pod.name}: expected {'captured' if meshed else 'left alone'}, "
            f"but the agent's /pods says {'captured' if captured else 'not captured'}"
        )
    how = "captured by the agent" if meshed else "PINION_MESH=disabled: left uncaptured"
    say(f"{agent.node.name}: pod {pod.namespace}/{pod.name} {pod.ip}, {how}")
    return pod


def _meshed_pods(agent: LabAgent) -> set[tuple[str, str]]:
    status, body = agent.get("/pods")
    if status != 200:
        raise DemoError(f"agent on {agent.node.name}: /pods answered {status}")
    return {(entry["namespace"], entry["name"]) for entry in json.loads(body)}


def _serve_http(pod: Pod) -> None:
    server = pod.spawn(
        [sys.executable, "-m", "agent.lab.httpserver", "--port", str(HTTP_PORT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=str(REPO),
    )
    assert server.stdout is not None
    ready, _, _ = select.select([server.stdout], [], [], SERVER_START_SECONDS)
    line = server.stdout.readline() if ready else b""
    if line.strip() != b"listening":
        raise DemoError(f"the HTTP server in {pod.name} did not start")


# ---------------------------------------------------------------- traffic


def _drive(pods: dict[str, Pod], requests: int, secret: str) -> Tally:
    """Run every flow, bounded by request count and by TRAFFIC_SECONDS overall."""
    say("HTTP traffic (curl inside the pods, keep-alive):")
    deadline = time.monotonic() + TRAFFIC_SECONDS
    tally = Tally()
    for flow in _flows(pods, requests, secret):
        statuses, connections = _run_flow(flow, deadline)
        _report_flow(flow, statuses, connections)
        tally.statuses.update(statuses)
        if flow.source.name not in NOT_MESHED:
            tally.connections[(flow.source.name, "outbound")] += connections
        if flow.target.name not in NOT_MESHED:
            tally.connections[(flow.target.name, "inbound")] += connections
            for status, count in statuses.items():
                tally.served[(flow.target.name, status)] += count
    return tally


def _flows(pods: dict[str, Pod], requests: int, secret: str) -> list[Flow]:
    failing = max(1, requests // FAILING_EVERY)
    paths = ("/",) * (requests - failing) + ("/status/500",) * failing
    side = ("/",) * SIDE_REQUESTS
    connections = min(CONNECTIONS_PER_FLOW, requests)
    flows = [Flow(pods[client], pods[web], paths, connections, secret)
             for client in CLIENTS for web in WEBS]
    flows += [Flow(pods[client], pods["legacy"], side, 1) for client in CLIENTS]
    flows += [Flow(pods["legacy"], pods[web], side, 1) for web in WEBS]
    return flows


def _run_flow(flow: Flow, deadline: float) -> tuple[Counter[str], int]:
    """curl, one process per connection, all at once; statuses and connections made."""
    chunks = [flow.paths[index :: flow.connections] for index in range(flow.connections)]
    processes = [
        flow.source.spawn(
            _curl_argv(flow.target.ip, chunk, flow.header), stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True,
        )
        for chunk in chunks
    ]
    statuses: Counter[str] = Counter()
    connections = 0
    try:
        for process in processes:
            output, _ = process.communicate(timeout=max(0.1, deadline - time.monotonic()))
            for line in output.splitlines():
                status, connects = line.split()
                statuses[status] += 1
                connections += int(connects)
    except subprocess.TimeoutExpired:
        raise DemoError(f"traffic did not finish within {TRAFFIC_SECONDS:.0f} s") from None
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    expected = Counter("500" if path == "/status/500" else "200" for path in flow.paths)
    if statuses != expected:
        raise DemoError(f"{_route(flow)}: expected {_statuses(expected)}, got {_statuses(statuses)}")
    return statuses, connections


# curl inside a pod: silent, never through a proxy from the environment, bounded in time.
_CURL = ("curl", "-s", "--noproxy", "*", "--max-time", str(REQUEST_SECONDS))


def _curl_argv(ip: str, paths: Sequence[str], header: str = "") -> list[str]:
    """One curl, one keep-alive connection, one `<status> <new connections>` line per request."""
    argv = [*_CURL, "-w", "%{http_code} %{num_connects}\\n", *(("-H", header) if header else ())]
    for path in paths:
        argv += ["-o", "/dev/null", f"http://{ip}:{HTTP_PORT}{path}"]
    return argv


def _report_flow(flow: Flow, statuses: Counter[str], connections: int) -> None:
    nodes = f"{flow.source.node.name} → {flow.target.node.name}"
    volume = f"{len(flow.paths)} req / {connections} conn"
    print(f"    {_route(flow):<20} {nodes:<15} {volume:<17} {_statuses(statuses)}", flush=True)


def _route(flow: Flow) -> str:
    return f"{flow.source.name} → {flow.target.name}"


def _statuses(statuses: Counter[str]) -> str:
    return ", ".join(f"{count} × {status}" for status, count in sorted(statuses.items()))


def _check_wire(capture: UnderlayCapture, wire: bytes, secret: str) -> None:
    """What crossed between the nodes: meshed pods' bytes only as TLS on 15008."""
    tunnel = capture.count("tcp port 15008")
    plain = capture.count(f"tcp port {HTTP_PORT}")
    if tunnel == 0:
        raise DemoError("no packet of the mesh tunnel (15008) crossed between the nodes")
    if secret.encode() in wire:
        raise DemoError("a meshed pod's request header crossed the underlay in plaintext")
    if b"\x16\x03\x01" not in wire:
        raise DemoError("no TLS handshake seen on the underlay")
    say(f"between the nodes (tcpdump on node1/{UNDERLAY_INTERFACE}): {tunnel} packets of the mTLS "
        "tunnel (15008),")
    print(f"  {plain} of plain HTTP with the non-meshed legacy pod. The header every meshed")
    print(f"  request carried ('{secret.split(':')[0]}: …') appears 0 times: TLS on the wire.")


def _check_source_ip(pods: dict[str, Pod], tally: Tally) -> None:
    """A non-meshed server must see a meshed client's own pod IP, not the node's or the proxy's."""
    client, server = pods["client-0"], pods["legacy"]
    completed = client.run(
        [*_CURL, f"http://{server.ip}:{HTTP_PORT}/whoami"],
        check=False,
    )
    seen = completed.stdout.strip()
    if completed.returncode != 0 or seen != client.ip:
        raise DemoError(
            f"{server.name} saw {client.name} as {seen or 'nothing'} "
            f"(curl exit {completed.returncode}), not as {client.ip}"
        )
    tally.connections[(client.name, "outbound")] += 1
    say(f"source IP kept: {server.name} (not meshed) sees {client.name} as {seen} ({client.name}'s IP)")


# ---------------------------------------------------------------- what the agents saw


def _counter(metrics: Metrics, pod: Pod, name: str, direction: str) -> float:
    return metrics.value(name, direction=direction, namespace=pod.namespace, pod=pod.name)


def _bytes(metrics: Metrics, pod: Pod, direction: str) -> float:
    return sum(
        _counter(metrics, pod, name, direction) for name in ("tcp_read_bytes_total", "tcp_write_bytes_total")
    )


def _print_table(pods: dict[str, Pod], metrics: dict[str, Metrics], meshed: set[tuple[str, str]]) -> None:
    say("what the agents counted (GET /metrics on both nodes):")
    print(_row([title for title, _ in COLUMNS]))
    for pod in pods.values():
        node_metrics = metrics[pod.node.name]
        if (pod.namespace, pod.name) not in meshed:
            print(_row([pod.node.name, pod.name, "no", "-", "-", "-", "-"]))
            continue
        print(
            _row(
                [
                    pod.node.name,
                    pod.name,
                    "yes",
                    f"{_counter(node_metrics, pod, 'tcp_open_total', 'outbound'):.0f}",
                    f"{_counter(node_metrics, pod, 'tcp_open_total', 'inbound'):.0f}",
                    _size(_bytes(node_metrics, pod, "outbound")),
                    _size(_bytes(node_metrics, pod, "inbound")),
                ]
            )
        )
    print("  OUT: connections the pod opened, IN: connections it accepted; BYTES: both ways")


def _row(cells: Sequence[str]) -> str:
    texts = [
        cell.ljust(width) if index < 3 else cell.rjust(width)
        for index, (cell, (_, width)) in enumerate(zip(cells, COLUMNS, strict=True))
    ]
    return "  " + " ".join(texts)


def _size(count: float) -> str:
    for unit in ("B", "kB", "MB"):
        if count < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} GB"


def _check_counts(pods: dict[str, Pod], metrics: dict[str, Metrics], tally: Tally) -> None:
    """Every connection curl made must appear once on each meshed end, no more, no less."""
    wrong = []
    for (name, direction), made in sorted(tally.connections.items()):
        pod = pods[name]
        counted = _counter(metrics[pod.node.name], pod, "tcp_open_total", direction)
        if counted != made or _bytes(metrics[pod.node.name], pod, direction) <= 0:
            wrong.append(f"{name} {direction}: curl made {made}, the agent counted {counted:.0f}")
    if wrong:
        raise DemoError("the agents' counters do not match the traffic: " + "; ".join(wrong))
    outbound = sum(n for (_, direction), n in tally.connections.items() if direction == "outbound")
    inbound = sum(n for (_, direction), n in tally.connections.items() if direction == "inbound")
    say(f"counts match curl: {outbound} outbound and {inbound} inbound connections, none missed")


def _print_golden(pods: dict[str, Pod], metrics: dict[str, Metrics], tally: Tally) -> None:
    """Inbound golden metrics per serving pod, checked against what curl got back."""
    say("golden metrics the agents measured (inbound, HTTP parsed from the relayed bytes):")
    print(f"  {'POD':<9} {'NODE':<6} {'REQUESTS':>8} {'SUCCESS':>8} {'P50':>8} {'P99':>8}")
    for name in sorted({pod for pod, _ in tally.served}):
        pod = pods[name]
        node_metrics = metrics[pod.node.name]
        labels = {"direction": "inbound", "pod": name}
        sent = sum(n for (target, _), n in tally.served.items() if target == name)
        failed = tally.served[(name, "500")]
        requests = node_metrics.value("request_total", **labels)
        failures = node_metrics.value("response_total", classification="failure", **labels)
        if requests != sent or failures != failed:
            raise DemoError(f"{name}: curl sent {sent} requests ({failed} answered 500); the "
                            f"agent counted {requests:.0f} ({failures:.0f} failures)")
        p50, p99 = (_quantile(node_metrics, q, labels) for q in (0.5, 0.99))
        success = f"{100 * (requests - failures) / requests:.1f}%"
        print(f"  {name:<9} {pod.node.name:<6} {requests:>8.0f} {success:>8} {p50:>8} {p99:>8}")
    say("request and failure counts match what curl got back (the 500s are failures)")


def _quantile(node_metrics: Metrics, q: float, labels: dict[str, str]) -> str:
    buckets = [(float(s.labels["le"]), s.value) for s in node_metrics.samples
               if s.name == "response_latency_ms_bucket"
               and all(s.labels.get(k) == v for k, v in labels.items())]
    value = histogram_quantile(q, buckets)
    return "-" if math.isnan(value) else f"{value:.2f}ms"


def _conclude(metrics: dict[str, Metrics]) -> None:
    tls = sorted(
        {
            sample.labels.get("tls", "?")
            for node_metrics in metrics.values()
            for sample in node_metrics.samples
            if sample.name == "tcp_open_total" and sample.labels.get("no_tls_reason") != "loopback"
        }
    )
    say("shown: every meshed pod's TCP, same node and across nodes, went through its")
    print("  node's agent; legacy stayed outside it; client-0 kept its source IP.")
    say("shown: per-pod golden metrics (success rate, latency) from the relayed bytes;")
    print("  `pinion stat po -A --agent <node>:4191` shows them live, like linkerd viz.")
    say(f"tls labels on the agents' series: {', '.join(tls)}")
    print('  (tls="true": through the mTLS tunnel, labelled with client_id / server_id;')
    print('  tls="no_identity": plaintext, with Linkerd\'s no_tls_reason)')


# ---------------------------------------------------------------- teardown


def _teardown(lab: Lab | None, agents: dict[int, LabAgent], run_id: str) -> bool:
    """Delete pods while their agents still run, stop the agents, close the lab; say how it went."""
    problems: list[str] = []
    if lab is not None:
        for pod in reversed(list(lab.pods)):
            _attempt(problems, f"deleting pod {pod.name}", functools.partial(lab.delete_pod, pod))
    for agent in agents.values():
        code = agent.stop()
        if code not in (0, None):
            problems.append(f"agent on {agent.node.name} exited with {code}")
    if lab is not None:
        _attempt(problems, "closing the lab", lab.close)
    left = _namespaces_left(run_id)
    if left:
        problems.append(f"namespaces left: {', '.join(left)}")
    for problem in problems:
        print(f"✗ cleanup: {problem}", flush=True)
    if not problems:
        say("cleaned up: no namespaces left")
    return not problems


def _attempt(problems: list[str], what: str, action: Callable[[], object]) -> None:
    try:
        action()
    except Exception as error:  # teardown goes on whatever one step raised
        problems.append(f"{what}: {error}")


def _namespaces_left(run_id: str) -> list[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    names = [line.split()[0] for line in listing.stdout.splitlines() if line.strip()]
    return [name for name in names if name.startswith(f"pn{run_id}-")]


def _print_agent_logs(agents: dict[int, LabAgent], lines: int = 8) -> None:
    for agent in agents.values():
        tail = agent.log().splitlines()[-lines:]
        if tail:
            print(f"  last lines of the {agent.node.name} agent's log:", file=sys.stderr)
            for line in tail:
                print(f"    {line}", file=sys.stderr)
