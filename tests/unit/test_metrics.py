"""The node endpoint's metrics, rendered as Prometheus scrapes them: Linkerd's TCP schema
per pod (tcp_open_total, tcp_open_connections, tcp_read_bytes_total, tcp_write_bytes_total,
tcp_close_total{errno}, each as peer="src" and peer="dst"), per-pod process_start_time_seconds,
plus the agent's own counters."""

from __future__ import annotations

from agent.core.telemetry import PLAINTEXT, HttpLabels, PeerLabels, TcpLabels, Telemetry
from agent.observability.exposition import CollectorRegistry, generate_latest
from agent.observability.metrics import build_registry

GRACE = 300.0
WEB = ('direction="inbound",namespace="default",no_tls_reason="no_tls_from_remote",peer="src",'
       'pod="web",tls="no_identity"')
WEB_APP = ('direction="inbound",namespace="default",no_tls_reason="loopback",peer="dst",'
           'pod="web",tls="no_identity"')


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
    connection.close(failed=True, errno_name="ECONNRESET")

    # peer="src": the client's connection; peer="dst": the agent's hop to the app (bytes swap)
    assert scrape(registry) == [
        "# HELP tcp_open_total Total count of opened connections",
        "# TYPE tcp_open_total counter",
        f"tcp_open_total{{{WEB}}} 1.0",
        f"tcp_open_total{{{WEB_APP}}} 1.0",
        "# HELP tcp_open_connections Number of currently-open connections",
        "# TYPE tcp_open_connections gauge",
        f"tcp_open_connections{{{WEB}}} 0.0",
        f"tcp_open_connections{{{WEB_APP}}} 0.0",
        "# HELP tcp_read_bytes_total Total count of bytes read from peers",
        "# TYPE tcp_read_bytes_total counter",
        f"tcp_read_bytes_total{{{WEB}}} 10.0",
        f"tcp_read_bytes_total{{{WEB_APP}}} 20.0",
        "# HELP tcp_write_bytes_total Total count of bytes written to peers",
        "# TYPE tcp_write_bytes_total counter",
        f"tcp_write_bytes_total{{{WEB}}} 20.0",
        f"tcp_write_bytes_total{{{WEB_APP}}} 10.0",
        "# HELP tcp_close_total Total count of closed connections",
        "# TYPE tcp_close_total counter",
        f'tcp_close_total{{{_with(WEB, errno="")}}} 0.0',
        f'tcp_close_total{{{_with(WEB, errno="ECONNRESET")}}} 1.0',
        f'tcp_close_total{{{_with(WEB_APP, errno="")}}} 0.0',
        f'tcp_close_total{{{_with(WEB_APP, errno="ECONNRESET")}}} 1.0',
    ]


def _with(labels: str, **extra: str) -> str:
    """The label text with `extra` added, in the exposition's (sorted) order."""
    pairs = dict(pair.split("=", 1) for pair in labels.split(","))
    pairs.update({name: f'"{value}"' for name, value in extra.items()})
    return ",".join(f"{name}={pairs[name]}" for name in sorted(pairs))


def test_an_open_connection_shows_in_the_gauge_until_it_closes() -> None:
    telemetry = Telemetry(FakeClock(), GRACE)
    registry, _ = build_registry(telemetry)
    connection = telemetry.open(TcpLabels("inbound", "default", "web"))

    assert f"tcp_open_connections{{{WEB}}} 1.0" in scrape(registry)
    connection.close(failed=False)
    assert f"tcp_open_connections{{{WEB}}} 0.0" in scrape(registry)
    assert f'tcp_close_total{{{_with(WEB, errno="")}}} 1.0' in scrape(registry)


def test_a_failure_without_an_os_error_is_the_agents_abort() -> None:
    telemetry = Telemetry(FakeClock(), GRACE)
    registry, _ = build_registry(telemetry)
    telemetry.open(TcpLabels("inbound", "default", "web")).close(failed=True)

    assert f'tcp_close_total{{{_with(WEB, errno="ECONNABORTED")}}} 1.0' in scrape(registry)


def test_outbound_the_destination_labels_the_dst_side_and_the_src_side_is_the_pods_hop() -> None:
    telemetry = Telemetry(FakeClock(), GRACE)
    registry, _ = build_registry(telemetry)
    db = PeerLabels(tls="true", server_id="spiffe://cluster.local/ns/data/sa/db", dst_namespace="data",
                    dst_pod="db-0", dst_owner_kind="statefulset", dst_owner_name="db")
    for peer in (db, PLAINTEXT):  # over the tunnel, then to an unmeshed destination
        connection = telemetry.open(TcpLabels("outbound", "shop", "backup-x1", peer, owner_kind="job",
                                              owner_name="backup"))
        connection.read(3)
        connection.wrote(5)

    lines = [line for line in scrape(registry, "tcp_read_bytes_total") if not line.startswith("#")]
    assert lines == [
        'tcp_read_bytes_total{direction="outbound",dst_namespace="data",dst_pod="db-0",'
        'dst_statefulset="db",k8s_job="backup",namespace="shop",peer="dst",pod="backup-x1",'
        'server_id="spiffe://cluster.local/ns/data/sa/db",tls="true"} 5.0',
        'tcp_read_bytes_total{direction="outbound",k8s_job="backup",namespace="shop",'
        'no_tls_reason="not_provided_by_service_discovery",peer="dst",pod="backup-x1",'
        'tls="no_identity"} 5.0',
        # both connections, from the pod's side: what the pod wrote, summed
        'tcp_read_bytes_total{direction="outbound",k8s_job="backup",namespace="shop",'
        'no_tls_reason="loopback",peer="src",pod="backup-x1",tls="no_identity"} 6.0',
    ]


def test_each_served_pod_has_its_own_process_start_time_with_its_workload() -> None:
    clock = FakeClock()
    telemetry = Telemetry(clock, GRACE)
    registry, _ = build_registry(telemetry)
    telemetry.pod_added("shop", "web-5d8f7-abcde", "deployment", "web", 1_700_000_000.0)
    telemetry.pod_added("shop", "backup-x1", "job", "backup", 1_700_000_100.0)

    starts = [line for line in scrape(registry, "process_start_time_seconds")
              if not line.startswith("#")]
    assert starts[0].startswith("process_start_time_seconds ")  # the agent's own process
    assert starts[1:] == [
        'process_start_time_seconds{deployment="web",namespace="shop",pod="web-5d8f7-abcde"} 1.7e+09',
        'process_start_time_seconds{k8s_job="backup",namespace="shop",pod="backup-x1"} 1.7000001e+09',
    ]
    telemetry.pod_removed("shop", "backup-x1")
    clock.now += GRACE
    assert not any("backup" in line for line in scrape(registry, "process_start_time_seconds"))


def test_http_series_carry_the_authority_and_linkerds_tls_labels() -> None:
    telemetry = Telemetry(FakeClock(), GRACE)
    registry, _ = build_registry(telemetry)
    labels = HttpLabels("inbound", "shop", "web", owner_kind="deployment", owner_name="web",
                        authority="web.shop.svc.cluster.local:8080")
    telemetry.http(labels).requests += 2

    assert [line for line in scrape(registry, "request_total") if not line.startswith("#")] == [
        'request_total{authority="web.shop.svc.cluster.local:8080",deployment="web",'
        'direction="inbound",namespace="shop",no_tls_reason="no_tls_from_remote",pod="web",'
        'tls="no_identity"} 2.0']


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
        "pinion_connection_budget_exhausted_total 0.0",
        "pinion_accepting 0.0",  # no function set here: the agent sets it
    ]


def test_each_registry_is_its_own_so_tests_and_agents_do_not_share_state() -> None:
    first, first_metrics = build_registry(Telemetry(FakeClock(), GRACE))
    second, _ = build_registry(Telemetry(FakeClock(), GRACE))

    first_metrics.meshed_pods.set(5)

    assert "pinion_meshed_pods 5.0" in scrape(first, "pinion_")
    assert "pinion_meshed_pods 0.0" in scrape(second, "pinion_")
