"""The node endpoint's metrics: Linkerd's TCP and HTTP schema per pod, plus the agent's
own health. Per-pod series are rendered at scrape time from plain counters."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from agent.core.telemetry import LATENCY_BUCKETS_MS, HttpCounters, TcpLabels, Telemetry

_LABELS = ("direction", "namespace", "pod", "tls", "peer")
_HTTP_LABELS = ("direction", "namespace", "pod", "tls")
_BOUNDS = [*(str(b) for b in LATENCY_BUCKETS_MS), "+Inf"]


class TcpCollector(Collector):
    """Renders Telemetry at scrape time; expires deleted pods' series first."""

    def __init__(self, telemetry: Telemetry) -> None:
        self._telemetry = telemetry

    def collect(self) -> Iterator[Metric]:
        self._telemetry.expire()
        opened = CounterMetricFamily("tcp_open", "Connections opened", labels=_LABELS)
        current = GaugeMetricFamily("tcp_open_connections", "Connections open now", labels=_LABELS)
        read = CounterMetricFamily("tcp_read_bytes", "Bytes read from the peer", labels=_LABELS)
        wrote = CounterMetricFamily("tcp_write_bytes", "Bytes written to the peer", labels=_LABELS)
        closed = CounterMetricFamily("tcp_close", "Connections closed",
                                     labels=(*_LABELS, "classification"))
        for labels, counters in self._telemetry.series():
            values = _values(labels)
            opened.add_metric(values, counters.open_total)
            current.add_metric(values, counters.open_connections)
            read.add_metric(values, counters.read_bytes)
            wrote.add_metric(values, counters.write_bytes)
            closed.add_metric([*values, "success"], counters.close_success)
            closed.add_metric([*values, "failure"], counters.close_failure)
        yield from (opened, current, read, wrote, closed)
        yield from _http_families(self._telemetry)


def _http_families(telemetry: Telemetry) -> Iterator[Metric]:
    requests = CounterMetricFamily("request", "HTTP requests started", labels=_HTTP_LABELS)
    responses = CounterMetricFamily("response", "HTTP responses (or failures) by outcome",
                                    labels=(*_HTTP_LABELS, "classification", "status_code",
                                            "grpc_status"))
    latency = HistogramMetricFamily("response_latency_ms", "Time from request start to "
                                    "response headers, in milliseconds", labels=_HTTP_LABELS)
    for labels, counters in telemetry.http_series():
        values = [labels.direction, labels.namespace, labels.pod, labels.tls]
        requests.add_metric(values, counters.requests)
        for (classification, status, grpc), count in sorted(counters.responses.items()):
            responses.add_metric([*values, classification, status, grpc], count)
        latency.add_metric(values, _cumulative(counters), counters.latency_sum)
    yield from (requests, responses, latency)


def _cumulative(counters: HttpCounters) -> list[tuple[str, float]]:
    total, buckets = 0, list[tuple[str, float]]()
    for bound, count in zip(_BOUNDS, counters.latency_buckets, strict=True):
        total += count
        buckets.append((bound, total))
    return buckets


def _values(labels: TcpLabels) -> list[str]:
    return [labels.direction, labels.namespace, labels.pod, labels.tls, labels.peer]


class AgentMetrics:
    """The agent's own counters (not per connection: these may use prometheus_client types)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.meshed_pods = Gauge("pinion_meshed_pods", "Pods captured by this agent",
                                 registry=registry)
        self.cni_requests = Counter("pinion_cni_requests", "CNI requests handled",
                                    ("command", "result"), registry=registry)
        self.proxy_errors = Counter("pinion_proxy_errors", "Connections refused or failed "
                                    "before relaying", ("direction", "reason"), registry=registry)


def build_registry(telemetry: Telemetry) -> tuple[CollectorRegistry, AgentMetrics]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TcpCollector(telemetry))
    ProcessCollector(registry=registry)
    return registry, AgentMetrics(registry)
