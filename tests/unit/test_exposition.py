"""agent/observability/exposition.py renders what prometheus_client renders, byte for byte,
for the agent's whole registry and for any family (a property test); its counters and
gauges behave as prometheus_client's; and no Pinion process imports prometheus_client (the
reason the module exists: ~3 MiB of RSS in every agent)."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Iterable
from typing import Any

import prometheus_client
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.metrics_core import Metric as ClientMetric

from agent.core.telemetry import HttpLabels, PeerLabels, TcpLabels, Telemetry
from agent.observability import exposition
from agent.observability.exposition import (
    CollectorRegistry,
    Counter,
    CounterMetricFamily,
    Gauge,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    ProcessCollector,
    generate_latest,
)
from agent.observability.metrics import EbpfCollector, IdentityCollector, build_registry


class _Replay:
    """prometheus_client's view of the same families: its own Metric objects."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> list[ClientMetric]:
        replayed = []
        for family in self._families:
            metric = ClientMetric(family.name, family.documentation, family.type)
            for sample in family.samples:
                metric.add_sample(sample.name, dict(sample.labels), sample.value)
            replayed.append(metric)
        return replayed


def _both(families: Iterable[Metric]) -> tuple[bytes, bytes]:
    kept = list(families)
    registry = CollectorRegistry()

    class Fixed(exposition.Collector):
        def collect(self) -> list[Metric]:
            return kept

    registry.register(Fixed())
    return generate_latest(registry), prometheus_client.generate_latest(_Replay(kept))  # type: ignore[arg-type]


class _Identities:
    issued = 7
    renewals = 3
    renewal_failures = 1

    def expiry(self) -> dict[str, float]:
        return {"spiffe://cluster.local/ns/shop/sa/web": 1_800_000_000.5}


def test_the_agents_whole_registry_renders_as_prometheus_client_renders_it() -> None:
    telemetry = Telemetry(lambda: 10.0, 300.0)
    registry, metrics = build_registry(telemetry)
    registry.register(IdentityCollector(_Identities()))
    registry.register(EbpfCollector(lambda: {"pods": 1 << 20, "connections": 123456789}))
    db = PeerLabels(tls="true", server_id="spiffe://cluster.local/ns/data/sa/db",
                    dst_namespace="data", dst_pod="db-0", dst_owner_kind="statefulset",
                    dst_owner_name="db")
    connection = telemetry.open(TcpLabels("outbound", "shop", "web-1", db, owner_kind="deployment",
                                          owner_name="web"))
    connection.read(1 << 40)
    connection.wrote(3)
    connection.close(failed=True, errno_name="ECONNRESET")
    telemetry.open(TcpLabels("inbound", "shop", "web-1"))
    http = telemetry.http(HttpLabels("inbound", "shop", "web-1", authority='we"ird\\host\n:80'))
    http.requests += 12345678
    telemetry.pod_added("shop", "web-1", "deployment", "web", 1_700_000_000.25)
    metrics.meshed_pods.set(2)
    metrics.cni_requests.labels("add", "ok").inc()
    metrics.proxy_errors.labels(direction="inbound", reason="denied").inc(2.5)
    metrics.tunnel_connections.labels("inbound").inc()
    metrics.tunnel_connections.labels("inbound").dec(3)
    metrics.budget.labels("limit").set_function(lambda: 1e21)
    metrics.memory.labels("rss").set(float("nan"))

    ours, theirs = _both(registry.collect())
    assert ours == theirs
    text = ours.decode()
    assert 'authority="we\\"ird\\\\host\\n:80"' in text
    assert "tcp_read_bytes_total{" in text and "1.099511627776e+12" in text
    assert 'pinion_connection_budget{kind="limit"} 1e+21' in text
    assert "_created" not in text


_names = st.from_regex(r"[a-zA-Z_:][a-zA-Z0-9_:]{0,20}", fullmatch=True)
_labels = st.from_regex(r"[a-zA-Z][a-zA-Z0-9_]{0,10}", fullmatch=True)
_values = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**60, 2**60))


@st.composite
def _families(draw: Any) -> list[Metric]:
    families: list[Metric] = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["counter", "gauge", "histogram"]))
        name = draw(_names)
        documentation = draw(st.text(max_size=30))
        labels = draw(st.lists(_labels, max_size=3, unique=True))
        family: Metric
        if kind == "counter":
            family = CounterMetricFamily(name, documentation, labels=labels)
        elif kind == "gauge":
            family = GaugeMetricFamily(name, documentation, labels=labels)
        else:
            family = HistogramMetricFamily(name, documentation)
        for _ in range(draw(st.integers(0, 3))):
            values = [draw(st.text(max_size=12)) for _ in labels]
            if isinstance(family, HistogramMetricFamily):
                family.add_sample(family.name + "_bucket", {**dict(zip(labels, values, strict=True)),
                                                            "le": "+Inf"}, draw(_values))
            else:
                family.add_metric(values, draw(_values))
        families.append(family)
    return families


@settings(max_examples=300, deadline=None)
@given(_families())
def test_any_family_renders_as_prometheus_client_renders_it(families: list[Metric]) -> None:
    ours, theirs = _both(families)
    assert ours == theirs


def _client_scrape(registry: prometheus_client.CollectorRegistry) -> list[str]:
    return [line for line in prometheus_client.generate_latest(registry).decode().splitlines()
            if "_created" not in line]


def test_counters_and_gauges_behave_as_prometheus_clients() -> None:
    ours, theirs = CollectorRegistry(), prometheus_client.CollectorRegistry()
    for registry, counter_type, gauge_type in ((ours, Counter, Gauge),
                                              (theirs, prometheus_client.Counter,
                                               prometheus_client.Gauge)):
        plain = counter_type("things_total", "Things", registry=registry)  # type: ignore[operator]
        plain.inc()
        plain.inc(2.5)
        by = counter_type("refusals", "Refusals by reason", ["listener", "reason"],
                          registry=registry)  # type: ignore[operator]
        by.labels("issuer", "timeout").inc()
        by.labels(listener="admin", reason="rate").inc(4)
        by.labels("issuer", "timeout").inc()
        level = gauge_type("level", "A level", registry=registry)  # type: ignore[operator]
        level.set(5)
        level.dec(7)
        called = gauge_type("called", "From a function", ["kind"], registry=registry)  # type: ignore[operator]
        called.labels("a").set_function(lambda: 42)
        called.labels("b").inc()
        gauge_type("untouched", "Never set", ["kind"], registry=registry)  # type: ignore[operator]
    assert generate_latest(ours).decode().splitlines() == _client_scrape(theirs)
    assert ours.get_sample_value("refusals_total", {"listener": "issuer", "reason": "timeout"}) == 2
    assert ours.get_sample_value("refusals_total", {"listener": "nobody", "reason": "x"}) is None
    assert ours.get_sample_value("level") == -2


def test_misuse_is_a_clear_error() -> None:
    registry = CollectorRegistry()
    counter = Counter("ops", "Operations", ["kind"], registry=registry)
    with pytest.raises(ValueError, match="only go up"):
        counter.labels("a").inc(-1)
    with pytest.raises(ValueError, match="1 label values expected"):
        counter.labels("a", "b")
    with pytest.raises(ValueError, match="labels"):
        counter.labels(other="a")
    with pytest.raises(ValueError, match="call labels"):
        counter.inc()
    with pytest.raises(ValueError, match="has no labels"):
        Gauge("plain", "Plain").labels("x")
    with pytest.raises(ValueError, match="duplicated"):
        Counter("ops_total", "Again", registry=registry)
    with pytest.raises(ValueError, match="invalid metric name"):
        Gauge("9lives", "Bad")
    with pytest.raises(ValueError, match="invalid label name"):
        GaugeMetricFamily("ok", "Bad label", labels=["__reserved"])
    with pytest.raises(ValueError, match="2 label values expected"):
        GaugeMetricFamily("ok", "Two", labels=["a", "b"]).add_metric(["x"], 1)


def test_process_metrics_are_prometheus_clients_families_of_this_process() -> None:
    ours = {family.name: family for family in ProcessCollector().collect()}
    theirs = {family.name: family
              for family in prometheus_client.ProcessCollector(registry=None).collect()}
    assert {(name, f.type, f.documentation) for name, f in ours.items()} == \
        {(name, f.type, f.documentation) for name, f in theirs.items()}
    for name in ("process_start_time_seconds", "process_max_fds"):
        assert ours[name].samples[0].value == theirs[name].samples[0].value
    for name in ("process_resident_memory_bytes", "process_open_fds", "process_cpu_seconds"):
        assert math.isclose(ours[name].samples[0].value, theirs[name].samples[0].value,
                            rel_tol=0.5), name
    assert [s.name for s in ours["process_cpu_seconds"].samples] == ["process_cpu_seconds_total"]


@pytest.mark.parametrize("command", [
    "from agent import cli; cli._parser('agent'); import agent.app",
    "from agent import cli; cli._parser('issuer'); import agent.controlplane.issuer.server",
    "from agent import cli; cli._parser('multicluster');"
    " import agent.controlplane.multicluster.gateway",
])
def test_no_pinion_process_imports_prometheus_client(command: str) -> None:
    probe = subprocess.run([sys.executable, "-c", command + "; import sys;"
                            " print(sorted(m for m in sys.modules if m.startswith('prometheus')))"],
                           capture_output=True, text=True, check=True, timeout=60)
    assert probe.stdout.strip() == "[]", probe.stderr


def test_the_agent_command_builds_no_viz_parser() -> None:
    probe = subprocess.run([sys.executable, "-c",
                            "import sys; from agent import cli; cli._parser('agent');"
                            " print(sorted(m for m in sys.modules if m.startswith('agent.viz')))"],
                           capture_output=True, text=True, check=True, timeout=60)
    assert probe.stdout.strip() == "[]", probe.stderr
