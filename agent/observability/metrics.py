"""The node endpoint's metrics: Linkerd's TCP and HTTP schema per pod, plus the agent's
own health. Per-pod series are rendered at scrape time from plain counters."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Protocol

from agent.core.telemetry import (
    LATENCY_BUCKETS_MS,
    LOOPBACK,
    NO_TLS_FROM_REMOTE,
    NOT_PROVIDED_BY_SERVICE_DISCOVERY,
    HttpCounters,
    PeerLabels,
    TcpCounters,
    TcpLabels,
    Telemetry,
    workload_label,
)
from agent.observability.exposition import (
    Collector,
    CollectorRegistry,
    Counter,
    CounterMetricFamily,
    Gauge,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    ProcessCollector,
)

_BOUNDS = [*(str(b) for b in LATENCY_BUCKETS_MS), "+Inf"]


class TcpCollector(Collector):
    """Renders Telemetry at scrape time; expires deleted pods' series first.

    TCP series come in Linkerd's two kinds (linkerd2-proxy app/core/src/transport/labels.rs):
    peer="src" is the connection the proxy accepted, peer="dst" the one it made. Pinion keeps
    one set of counters per relayed pair, so a dst series is its src series seen from the
    other socket: what the relay read from one side it wrote to the other (read and write
    swap). Outbound, the destination (dst_*, server_id or no_tls_reason) labels the dst
    series; the src side is the pod's own hop to the agent (tls="no_identity",
    no_tls_reason="loopback"), as Linkerd's is. Inbound it is the other way round."""

    def __init__(self, telemetry: Telemetry) -> None:
        self._telemetry = telemetry

    def collect(self) -> Iterator[Metric]:
        self._telemetry.refresh()
        self._telemetry.expire()
        opened = CounterMetricFamily("tcp_open", "Total count of opened connections")
        current = GaugeMetricFamily("tcp_open_connections", "Number of currently-open connections")
        read = CounterMetricFamily("tcp_read_bytes", "Total count of bytes read from peers")
        wrote = CounterMetricFamily("tcp_write_bytes", "Total count of bytes written to peers")
        closed = CounterMetricFamily("tcp_close", "Total count of closed connections")
        for values, counters, swapped in _tcp_rows(self._telemetry):
            read_bytes, write_bytes = counters.read_bytes, counters.write_bytes
            if swapped:
                read_bytes, write_bytes = write_bytes, read_bytes
            opened.add_sample("tcp_open_total", values, counters.open_total)
            current.add_sample("tcp_open_connections", values, counters.open_connections)
            read.add_sample("tcp_read_bytes_total", values, read_bytes)
            wrote.add_sample("tcp_write_bytes_total", values, write_bytes)
            closed.add_sample("tcp_close_total", {**values, "errno": ""}, counters.close_success)
            for errno_name, count in sorted((counters.close_errno or {}).items()):
                closed.add_sample("tcp_close_total", {**values, "errno": errno_name}, count)
        yield from (opened, current, read, wrote, closed)
        yield from _http_families(self._telemetry)


def _tcp_rows(telemetry: Telemetry) -> Iterator[tuple[dict[str, str], TcpCounters, bool]]:
    """(labels, counters, read/write swapped) per exposed series: each counted series once
    with its peer's labels, and once more summed into its proxy-local side."""
    local: dict[tuple[tuple[str, str], ...], TcpCounters] = {}
    for labels, counters in telemetry.series():
        peer_side = "src" if labels.direction == "inbound" else "dst"
        yield _peer_side(labels, peer_side), counters, peer_side == "dst"
        values = _own({"direction": labels.direction, "namespace": labels.namespace,
                       "pod": labels.pod, "peer": "dst" if peer_side == "src" else "src",
                       "tls": "no_identity", "no_tls_reason": LOOPBACK},
                      labels.owner_kind, labels.owner_name)
        key = tuple(values.items())
        total = local.get(key)
        if total is None:
            total = local[key] = TcpCounters()
        _add(total, counters)
    for key, counters in local.items():
        yield dict(key), counters, key[3][1] == "dst"  # ("peer", value) is the 4th label


def _peer_side(labels: TcpLabels, peer: str) -> dict[str, str]:
    return _with_peer(_own({"direction": labels.direction, "namespace": labels.namespace,
                            "pod": labels.pod, "peer": peer}, labels.owner_kind, labels.owner_name),
                      labels.peer_labels, labels.direction)


def _add(total: TcpCounters, counters: TcpCounters) -> None:
    total.open_total += counters.open_total
    total.open_connections += counters.open_connections
    total.read_bytes += counters.read_bytes
    total.write_bytes += counters.write_bytes
    total.close_success += counters.close_success
    total.close_failure += counters.close_failure
    for errno_name, count in (counters.close_errno or {}).items():
        by_errno = total.close_errno if total.close_errno is not None else {}
        by_errno[errno_name] = by_errno.get(errno_name, 0) + count
        total.close_errno = by_errno


def _http_families(telemetry: Telemetry) -> Iterator[Metric]:
    requests = CounterMetricFamily("request", "Total count of HTTP requests")
    responses = CounterMetricFamily("response", "Total count of HTTP responses")
    latency = HistogramMetricFamily("response_latency_ms", "Elapsed times between a request's "
                                    "headers being received and its response stream completing")
    for labels, counters in telemetry.http_series():
        values = _own({"direction": labels.direction, "namespace": labels.namespace,
                       "pod": labels.pod}, labels.owner_kind, labels.owner_name)
        if labels.authority:
            values["authority"] = labels.authority
        values = _with_peer(values, labels.peer_labels, labels.direction)
        requests.add_sample("request_total", values, counters.requests)
        for (classification, status, grpc), count in sorted(counters.responses.items()):
            responses.add_sample("response_total", {**values, "classification": classification,
                                                    "status_code": status, "grpc_status": grpc}, count)
        for bound, cumulative in _cumulative(counters):
            latency.add_sample("response_latency_ms_bucket", {**values, "le": bound}, cumulative)
        latency.add_sample("response_latency_ms_count", values, counters.latency_count)
        latency.add_sample("response_latency_ms_sum", values, counters.latency_sum)
    yield from (requests, responses, latency)


def _cumulative(counters: HttpCounters) -> list[tuple[str, float]]:
    total, buckets = 0, list[tuple[str, float]]()
    for bound, count in zip(_BOUNDS, counters.latency_buckets, strict=True):
        total += count
        buckets.append((bound, total))
    return buckets


def tcp_label_values(labels: TcpLabels) -> dict[str, str]:
    """The labels of a series' peer side (inbound: peer="src"; outbound: peer="dst")."""
    return _peer_side(labels, "src" if labels.direction == "inbound" else "dst")


def _own(values: dict[str, str], kind: str, name: str) -> dict[str, str]:
    """The pod's workload as Linkerd labels it: deployment="web", k8s_job="backup" (nothing
    when unknown)."""
    label = workload_label(kind)
    if label and label not in values:
        values[label] = name
    return values


def _with_peer(values: dict[str, str], peer: PeerLabels, direction: str) -> dict[str, str]:
    """Add tls as Linkerd's proxy does — tls="true" with the peer's identity, or
    tls="no_identity" with no_tls_reason — and what the mesh knows of the destination."""
    values["tls"] = peer.tls
    if peer.tls != "true":
        values["no_tls_reason"] = (NO_TLS_FROM_REMOTE if direction == "inbound"
                                   else NOT_PROVIDED_BY_SERVICE_DISCOVERY)
    for name in ("client_id", "server_id", "dst_namespace", "dst_pod", "dst_service",
                 "dst_target_cluster", "dst_target_service"):
        value = getattr(peer, name)
        if value:
            values[name] = value
    if peer.dst_owner_kind:
        values["dst_" + workload_label(peer.dst_owner_kind)] = peer.dst_owner_name
    return values


class PodStartCollector(Collector):
    """process_start_time_seconds, as Linkerd's dashboards fill their variables from it
    (`label_values(process_start_time_seconds{deployment!=""}, namespace)`): the agent's own
    process (no pod labels: the scrape's target labels name it), and one series per served pod
    — when this agent began serving it, the moment a Linkerd pod's proxy would have started —
    with its namespace, pod and workload labels."""

    def __init__(self, telemetry: Telemetry, process: ProcessCollector) -> None:
        self._telemetry = telemetry
        self._process = process

    def collect(self) -> Iterator[Metric]:
        for family in self._process.collect():
            if family.name == "process_start_time_seconds":
                for (namespace, pod), (kind, name, started) in self._telemetry.pods():
                    family.add_sample("process_start_time_seconds",
                                      _own({"namespace": namespace, "pod": pod}, kind, name), started)
            yield family


class IdentitySource(Protocol):
    issued: int
    renewals: int
    renewal_failures: int

    def expiry(self) -> dict[str, float]: ...


class IdentityCollector(Collector):
    """Workload certificates: when each identity's certificate expires, issues and renewals."""

    def __init__(self, identities: IdentitySource) -> None:
        self._identities = identities

    def collect(self) -> Iterator[Metric]:
        expiry = GaugeMetricFamily("pinion_identity_certificate_expiry_timestamp_seconds",
                                   "When the current certificate of each local identity expires "
                                   "(the earliest among its pods)", labels=("identity",))
        for identity, not_after in sorted(self._identities.expiry().items()):
            expiry.add_metric([identity], not_after)
        issued = CounterMetricFamily("pinion_identity_certificates_issued",
                                     "Workload certificates issued (first and renewed)")
        issued.add_metric([], self._identities.issued)
        renewals = CounterMetricFamily("pinion_identity_renewals", "Certificate renewals by result",
                                       labels=("result",))
        renewals.add_metric(["success"], self._identities.renewals)
        renewals.add_metric(["failure"], self._identities.renewal_failures)
        yield from (expiry, issued, renewals)


class EbpfCollector(Collector):
    """The kernel memory of each eBPF map, read at scrape time: charged to the agent's memory
    cgroup though no RSS shows it."""

    def __init__(self, map_bytes: Callable[[], dict[str, int]]) -> None:
        self._map_bytes = map_bytes

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("pinion_ebpf_map_bytes", "Kernel memory held by each eBPF "
                                   "map (charged to the agent's memory cgroup)", labels=("map",))
        for name, size in sorted(self._map_bytes().items()):
            family.add_metric([name], size)
        yield family


class AdminMetrics:
    """The admin endpoint's connections: open now, and closed unanswered by reason
    (over_capacity, head_timeout, head_too_large, send_timeout; agent/observability/admin.py)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.connections = Gauge("pinion_admin_connections", "Admin endpoint connections open now",
                                 registry=registry)
        self.refused = Counter("pinion_admin_connections_refused", "Admin endpoint connections "
                               "closed without an answer", ("reason",), registry=registry)


class AgentMetrics:
    """The agent's own counters (not per connection: updated where they happen)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.meshed_pods = Gauge("pinion_meshed_pods", "Pods captured by this agent",
                                 registry=registry)
        self.cni_requests = Counter("pinion_cni_requests", "CNI requests handled",
                                    ("command", "result"), registry=registry)
        self.proxy_errors = Counter("pinion_proxy_errors", "Connections refused or failed "
                                    "before relaying", ("direction", "reason"), registry=registry)
        self.tunnel_connections = Gauge("pinion_tunnel_connections", "mTLS mesh tunnel "
                                        "connections open now (each carries many streams)",
                                        ("direction",), registry=registry)
        self.handshake_failures = Counter("pinion_tunnel_handshake_failures", "mTLS handshakes "
                                          "(or identity checks) of the mesh tunnel that failed, "
                                          "or connections refused before one (source_limit, "
                                          "rate_limited)", ("direction", "reason"), registry=registry)
        self.handshakes_in_progress = Gauge("pinion_tunnel_handshakes_in_progress", "Inbound "
                                            "connections on 15008 before their session: waiting "
                                            "for a first byte, or tls (admitted to TLS: in a "
                                            "handshake or waiting for a slot)",
                                            ("stage",), registry=registry)
        self.event_loop_tasks = Gauge("pinion_event_loop_tasks", "asyncio tasks alive in the "
                                      "agent (a leak shows here first)", registry=registry)
        self.event_loop_tasks.set_function(_tasks_alive)
        self.admin = AdminMetrics(registry)
        self.relay_idle_resets = Counter("pinion_relay_idle_resets", "Relayed connections reset "
                                         "after no byte moved either way for their pod's idle "
                                         "timeout", registry=registry)
        self.streams_moved = Counter("pinion_tunnel_streams_moved", "Outbound tunnel streams "
                                     "the destination's agent refused (going away) or lost "
                                     "before accepting, carried to a new connection",
                                     registry=registry)
        self.drain_resets = Counter("pinion_drain_resets", "Connections still open when a "
                                    "drain (SIGTERM) ended, reset", registry=registry)
        self.budget_pauses = Counter("pinion_connection_budget_exhausted", "Times the "
                                   "agent's connection budget (--max-connections) ran out and "
                                   "it stopped accepting until a quarter were done",
                                   registry=registry)
        self.accepting = Gauge("pinion_accepting", "1 while the agent accepts new connections, "
                               "0 while its connection budget is out (backpressure)",
                               registry=registry)
        self.budget = Gauge("pinion_connection_budget", "The connection budget: limit (what "
                            "the agent holds at most now: lowered under memory pressure or "
                            "while its CPU cannot keep up, grown back with room; at most "
                            "paced), paced (while the CPU is the limit: what it completes a "
                            "second × 0.1 s, plus connections open over 5 s), ceiling "
                            "(where it started, --max-connections or sized from the memory "
                            "limit), open (connections it holds)", ("kind",), registry=registry)
        self.memory = Gauge("pinion_memory_bytes", "The agent's memory by part: cgroup_usage "
                            "and cgroup_limit (0 = none; at 80 % it stops taking new "
                            "connections), rss, relay_buffers and tunnel_buffers (bytes held "
                            "for connections now); eBPF maps: pinion_ebpf_map_bytes",
                            ("part",), registry=registry)
        self.state_damaged = Counter("pinion_state_files_damaged", "State files found damaged "
                                     "at start and set aside (renamed *.damaged)", ("store",),
                                     registry=registry)


def _tasks_alive() -> float:
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:  # scraped with no running loop (tests)
        return 0.0


def build_registry(telemetry: Telemetry) -> tuple[CollectorRegistry, AgentMetrics]:
    registry = CollectorRegistry()
    registry.register(TcpCollector(telemetry))
    registry.register(PodStartCollector(telemetry, ProcessCollector(registry=None)))
    return registry, AgentMetrics(registry)
