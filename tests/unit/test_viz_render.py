"""Tables fit 80 columns, number formats, and who-talks-to-whom edges from series labels."""

from __future__ import annotations

from agent.viz.edges import Edge, pod_edges, spiffe_namespace_account
from agent.viz.render import Column, millis, percent, rate, render_table
from agent.viz.stats import Sample


def test_a_narrow_table_keeps_full_headers() -> None:
    table = render_table([Column("NAME"), Column("LATENCY_P50", "P50")], [["web", "5ms"]])
    assert table == "NAME  LATENCY_P50\nweb   5ms\n"


def test_a_wide_table_switches_to_short_headers_then_truncates_names() -> None:
    columns = [Column("NAME", shrink=True), Column("MESHED"), Column("SUCCESS"), Column("RPS"),
               Column("LATENCY_P50", "P50"), Column("LATENCY_P95", "P95"),
               Column("LATENCY_P99", "P99"), Column("TCP_CONN")]
    row = ["a-very-long-deployment-name-7d4b9c8f6d-x2x9q", "1/1", "100.00%", "1234.5",
           "8.8ms", "75ms", "95ms", "12"]
    lines = render_table(columns, [row]).splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert lines[0].split() == ["NAME", "MESHED", "SUCCESS", "RPS", "P50", "P95", "P99", "TCP_CONN"]
    assert len(lines[0]) == 80
    assert lines[1].split()[0] == "a-very-long-deployment-na…"
    assert lines[1].split()[1:] == row[1:]


def test_formats() -> None:
    assert (percent(0.9), percent(None), percent(1.0)) == ("90.00%", "-", "100.00%")
    assert (rate(12.345), rate(None)) == ("12.3", "-")
    assert (millis(8.75), millis(2.0), millis(95.0), millis(None)) == ("8.8ms", "2ms", "95ms", "-")


def _outbound(pod: str, tls: str = "true", **labels: str) -> Sample:
    return Sample("request_total", {"direction": "outbound", "namespace": "default", "pod": pod,
                                    "tls": tls, **labels}, 1.0)


def test_edges_use_dst_labels_when_present() -> None:
    samples = [_outbound("web", dst_pod="api-1", dst_namespace="shop", server_id="spiffe://x/ns/shop/sa/api"),
               _outbound("web", tls="disabled", dst_pod="db-0", dst_namespace="default")]
    assert pod_edges(samples) == [
        Edge("web", "default", "api-1", "shop", "true", server_id="spiffe://x/ns/shop/sa/api"),
        Edge("web", "default", "db-0", "default", "disabled")]
    assert [e.secured for e in pod_edges(samples)] == [True, False]
    assert [e.dst for e in pod_edges(samples, namespace="shop")] == ["api-1"]


def test_without_dst_labels_only_the_source_is_known() -> None:
    edges = pod_edges([_outbound("web"), _outbound("web", tls="disabled"),
                       Sample("tcp_open_total", {"direction": "inbound", "namespace": "default",
                                                 "pod": "api", "tls": "true"}, 4.0)])
    assert edges == [Edge("web", "default", None, None, "disabled,true")]
    assert not edges[0].secured   # some of its traffic was not TLS


def test_inbound_client_ids_add_edges_from_sources_no_scraped_agent_runs() -> None:
    def inbound(client: str) -> Sample:
        return Sample("response_total", {"direction": "inbound", "namespace": "shop", "pod": "api-1",
                                         "tls": "true", "client_id": client}, 1.0)

    samples = [inbound("spiffe://cluster.local/ns/default/sa/web"),
               inbound("spiffe://cluster.local/ns/batch/sa/cron")]
    edges = pod_edges(samples, accounts={("default", "web")})
    assert edges == [Edge("sa/cron", "batch", "api-1", "shop", "true",
                          client_id="spiffe://cluster.local/ns/batch/sa/cron")]
    assert spiffe_namespace_account("web.default.serviceaccount.identity.linkerd.cluster.local") is None
