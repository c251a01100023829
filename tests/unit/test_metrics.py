"""The node endpoint's metrics, rendered as Prometheus scrapes them: Linkerd's TCP schema
per pod (tcp_open_total, tcp_open_connections, tcp_read_bytes_total, tcp_write_bytes_total,
tcp_close_total{classification}), plus the agent's own counters."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from agent.core.telemetry import TcpLabels, Telemetry
from agent.observability.metrics import build_registry

GRACE = 300.0
WEB = 'direction="inbound",namespace="default",peer="src",pod="web",tls="disabled"'


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def scrape(registry: CollectorRegistry, prefix: str = "tcp_") -> list[str]:
    """The exposition lines of the metrics named prefix* (HELP/TYPE included)."""
    lines = generate_latest(registry).decode().splitlines()
    return [line for line in lines
            if line.startswith(prefix) or line.startswith((f"# HELP {prefix}", f"# TYPE {prefix}"))]


def test_one_failed_inbound_connection_renders_in_linkerds_tcp_schema() -> None:
    telemetry = Telemetry(FakeClock(), GRACE)
    registry, _ = build_registry(telemetry)
    connection = telemetry.open(TcpLabels("inbound", "default", "web"))
    connection.read(10)
    connection.wrote(20)
    connection.close(failed=True)

    assert scrape(registry) == [
        "# HELP tcp_open_total Connections opened",
        "# TYPE tcp_open_total counter",
        f"tcp_open_total{{{WEB}}} 1.0",
        "# HELP tcp_open_connections Connections open now",
        "# TYPE tcp_open_connections gauge",
        f"tcp_open_connections{{{WEB}}} 0.0",
        "# HELP tcp_read_bytes_total Bytes read from the peer",
        "# TYPE tcp_read_bytes_total counter",
        f"tcp_read_bytes_total{{{WEB}}} 10.0",
        "# HELP tcp_write_bytes_total Bytes written to the peer",
        "# TYPE tcp_write_bytes_total counter",
        f"tcp_write_bytes_total{{{WEB}}} 20.0",
        "# HELP tcp_close_total Connections closed",
        "# TYPE tcp_close_total counter",
        f'tcp_close_total{{classification="success",{WEB}}} 0.0',
        f'tcp_close_total{{classification="failure",{WEB}}} 1.0',
    ]


def test_an_open_connection_shows_in_the_gauge_until_it_closes() -> None:
    telemetry = Telemetry(FakeClock(), GRACE)
    registry, _ = build_registry(telemetry)
    connection = telemetry.open(TcpLabels("inbound", "default", "web"))

    assert f"tcp_open_connections{{{WEB}}} 1.0" in scrape(registry)
    connection.close(failed=False)
    assert f"tcp_open_connections{{{WEB}}} 0.0" in scrape(registry)
    assert f'tcp_close_total{{classification="success",{WEB}}} 1.0' in scrape(registry)


def test_with_no_connections_only_the_metric_headers_are_rendered() -> None:
    registry, _ = build_registry(Telemetry(FakeClock(), GRACE))

    assert [line for line in scrape(registry) if not line.startswith("#")] == []


def test_a_scrape_after_the_grace_period_no_longer_shows_a_removed_pod() -> None:
    clock = FakeClock()
    telemetry = Telemetry(clock, GRACE)
    registry, _ = build_registry(telemetry)
    telemetry.open(TcpLabels("inbound", "default", "web")).close(failed=False)
    telemetry.open(TcpLabels("inbound", "default", "db")).close(failed=False)

    telemetry.pod_removed("default", "web")
    clock.now += GRACE

    samples = [line for line in scrape(registry) if not line.startswith("#")]
    assert samples
    assert not any('pod="web"' in line for line in samples)
    assert all('pod="db"' in line for line in samples)
    assert len(telemetry) == 1


def test_the_agents_own_counters_sit_beside_the_tcp_series() -> None:
    registry, metrics = build_registry(Telemetry(FakeClock(), GRACE))

    metrics.meshed_pods.set(2)
    metrics.cni_requests.labels("add", "ok").inc()
    metrics.proxy_errors.labels("outbound", "connect").inc(3)
    metrics.admin.connections.inc()
    metrics.admin.refused.labels("head_timeout").inc(4)

    assert [line for line in scrape(registry, "pinion_") if not line.startswith("#")
            and "_created" not in line] == [
        "pinion_meshed_pods 2.0",
        'pinion_cni_requests_total{command="add",result="ok"} 1.0',
        'pinion_proxy_errors_total{direction="outbound",reason="connect"} 3.0',
        "pinion_event_loop_tasks 0.0",  # no running loop here
        "pinion_admin_connections 1.0",
        'pinion_admin_connections_refused_total{reason="head_timeout"} 4.0',
        "pinion_relay_idle_resets_total 0.0",
        "pinion_tunnel_streams_moved_total 0.0",
        "pinion_drain_resets_total 0.0",
    ]


def test_each_registry_is_its_own_so_tests_and_agents_do_not_share_state() -> None:
    first, first_metrics = build_registry(Telemetry(FakeClock(), GRACE))
    second, _ = build_registry(Telemetry(FakeClock(), GRACE))

    first_metrics.meshed_pods.set(5)

    assert "pinion_meshed_pods 5.0" in scrape(first, "pinion_")
    assert "pinion_meshed_pods 0.0" in scrape(second, "pinion_")
