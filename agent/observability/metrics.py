"""The node endpoint's metrics: Linkerd's TCP and HTTP schema per pod, plus the agent's
own health. Per-pod series are rendered at scrape time from plain counters."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from agent.core.telemetry import LATENCY_BUCKETS_MS, HttpCounters, PeerLabels, TcpLabels, Telemetry

_BOUNDS = [*(str(b) for b in LATENCY_BUCKETS_MS), "+Inf"]


class TcpCollector(Collector):
    """Renders Telemetry at scrape time; expires deleted pods' series first."""

    def __init__(self, telemetry: Telemetry) -> None:
        self._telemetry = telemetry

    def collect(self) -> Iterator[Metric]:
        self._telemetry.refresh()
        self._telemetry.expire()
        opened = CounterMetricFamily("tcp_open", "Connections opened")
        current = GaugeMetricFamily("tcp_open_connections", "Connections open now")
        read = CounterMetricFamily("tcp_read_bytes", "Bytes read from the peer")
        wrote = CounterMetricFamily("tcp_write_bytes", "Bytes written to the peer")
        closed = CounterMetricFamily("tcp_close", "Connections closed")
        for labels, counters in self._telemetry.series():
            values = tcp_label_values(labels)
            opened.add_sample("tcp_open_total", values, counters.open_total)
            current.add_sample("tcp_open_connections", values, counters.open_connections)
            read.add_sample("tcp_read_bytes_total", values, counters.read_bytes)
            wrote.add_sample("tcp_write_bytes_total", values, counters.write_bytes)
            closed.add_sample("tcp_close_total", {**values, "classification": "success"},
                              counters.close_success)
            closed.add_sample("tcp_close_total", {**values, "classification": "failure"},
                              counters.close_failure)
        yield from (opened, current, read, wrote, closed)
        yield from _http_families(self._telemetry)


def _http_families(telemetry: Telemetry) -> Iterator[Metric]:
    requests = CounterMetricFamily("request", "HTTP requests started")
    responses = CounterMetricFamily("response", "HTTP responses (or failures) by outcome")
    latency = HistogramMetricFamily("response_latency_ms", "Time from request start to "
                                    "response headers, in milliseconds")
    for labels, counters in telemetry.http_series():
        values = _with_peer(_own({"direction": labels.direction, "namespace": labels.namespace,
                                  "pod": labels.pod}, labels.owner_kind, labels.owner_name),
                            labels.peer_labels)
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
    return _with_peer(_own({"direction": labels.direction, "namespace": labels.namespace,
                            "pod": labels.pod, "peer": labels.peer}, labels.owner_kind, labels.owner_name),
                      labels.peer_labels)


def _own(values: dict[str, str], kind: str, name: str) -> dict[str, str]:
    """The pod's workload as Linkerd labels it: deployment="web" (nothing when unknown)."""
    if kind and kind not in values:
        values[kind] = name
    return values


def _with_peer(values: dict[str, str], peer: PeerLabels) -> dict[str, str]:
    """Add tls and whatever the mesh knows of the peer; unknown (empty) labels stay out."""
    values["tls"] = peer.tls
    for name in ("client_id", "server_id", "dst_namespace", "dst_pod", "dst_service"):
        value = getattr(peer, name)
        if value:
            values[name] = value
    if peer.dst_owner_kind:
        values["dst_" + peer.dst_owner_kind] = peer.dst_owner_name
    return values


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
    """The agent's own counters (not per connection: these may use prometheus_client types)."""

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
        self.state_damaged = Counter("pinion_state_files_damaged", "State files found damaged "
                                     "at start and set aside (renamed *.damaged)", ("store",),
                                     registry=registry)


def _tasks_alive() -> float:
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:  # scraped with no running loop (tests)
        return 0.0


def build_registry(telemetry: Telemetry) -> tuple[CollectorRegistry, AgentMetrics]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TcpCollector(telemetry))
    ProcessCollector(registry=registry)
    return registry, AgentMetrics(registry)
