"""Tables fit 80 columns, number formats, and who-talks-to-whom edges from series labels."""

from __future__ import annotations

from agent.viz.edges import Edge, edges, short_identity, spiffe_namespace_account
from agent.viz.render import (
    Column,
    linkerd_bytes,
    linkerd_millis,
    linkerd_percent,
    linkerd_rps,
    linkerd_table,
    millis,
    percent,
    rate,
    render_table,
)
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


def _open(pod: str, deployment: str, dst: str, value: float = 1.0, **labels: str) -> Sample:
    return Sample("tcp_open_connections", {"direction": "outbound", "peer": "dst", "namespace": "shop",
                                           "pod": pod, "deployment": deployment, "dst_namespace": "shop",
                                           "dst_deployment": dst, **labels}, value)


def test_edges_are_pairs_with_a_connection_open_now_and_say_why_not_secured() -> None:
    samples = [_open("web-1", "web", "api", tls="true", server_id="spiffe://cluster.local/ns/shop/sa/api"),
               _open("web-2", "web", "api", tls="true", server_id="spiffe://cluster.local/ns/shop/sa/api"),
               _open("web-1", "web", "legacy", tls="no_identity",
                     no_tls_reason="not_provided_by_service_discovery"),
               _open("web-1", "web", "gone", value=0.0),  # nothing open now: no edge
               Sample("tcp_open_connections", {"direction": "outbound", "peer": "src", "namespace": "shop",
                                               "pod": "web-1", "deployment": "web", "tls": "no_identity",
                                               "no_tls_reason": "loopback"}, 3.0)]
    identities = {("shop", "web-1"): "spiffe://cluster.local/ns/shop/sa/web"}

    found = edges(samples, "deployment", None, identities)

    assert found == [
        Edge("web", "shop", "api", "shop", "spiffe://cluster.local/ns/shop/sa/web",
             "spiffe://cluster.local/ns/shop/sa/api"),
        Edge("web", "shop", "legacy", "shop", "spiffe://cluster.local/ns/shop/sa/web",
             no_tls_reason="not_provided_by_service_discovery")]
    assert [e.secured for e in found] == [True, False]
    assert found[1].message == "Not Provided By Service Discovery"
    assert edges(samples, "deployment", "other", identities) == []
    assert short_identity("spiffe://cluster.local/ns/shop/sa/web") == "web.shop"
    assert short_identity("web.emojivoto.serviceaccount.identity.linkerd.cluster.local") == "web.emojivoto"
    assert spiffe_namespace_account("web.default.serviceaccount.identity.linkerd.cluster.local") is None


# --- golden text: the layout `linkerd viz` prints (Go tabwriter, AlignRight, padding 3) ------------

def test_stat_rows_print_as_linkerd_viz_stat_prints_them() -> None:
    headers = ["NAME", "MESHED", "SUCCESS", "RPS", "LATENCY_P50", "LATENCY_P95", "LATENCY_P99", "TCP_CONN"]
    row = ["emoji", "1/2", linkerd_percent(1.0), linkerd_rps(2.0), *[linkerd_millis(123.4)] * 3, "123"]
    assert linkerd_table(headers, [row]) == (
        "NAME    MESHED   SUCCESS      RPS   LATENCY_P50   LATENCY_P95   LATENCY_P99   TCP_CONN\n"
        "emoji      1/2   100.00%   2.0rps         123ms         123ms         123ms        123\n")


def test_pod_rows_have_a_status_and_namespaces_are_left_aligned_too() -> None:
    headers = ["NAME", "STATUS", "MESHED", "SUCCESS", "RPS", "LATENCY_P50", "LATENCY_P95", "LATENCY_P99",
               "TCP_CONN"]
    row = ["emoji", "Running", "1/1", "100.00%", "2.0rps", "123ms", "123ms", "123ms", "123"]
    assert linkerd_table(headers, [row]) == (
        "NAME     STATUS   MESHED   SUCCESS      RPS   LATENCY_P50   LATENCY_P95   LATENCY_P99   TCP_CONN\n"
        "emoji   Running      1/1   100.00%   2.0rps         123ms         123ms         123ms        123\n")
    all_ns = linkerd_table(["NAMESPACE", "NAME", "MESHED"], [["emojivoto1", "emoji", "1/2"],
                                                             ["ns", "web", "10/10"]], left=2)
    assert all_ns == ("NAMESPACE    NAME    MESHED\n"
                      "emojivoto1   emoji      1/2\n"
                      "ns           web      10/10\n")


def test_wide_rows_add_byte_rates_and_an_idle_row_is_dashes() -> None:
    headers = ["NAME", "MESHED", "SUCCESS", "RPS", "LATENCY_P50", "LATENCY_P95", "LATENCY_P99", "TCP_CONN",
               "READ_BYTES/SEC", "WRITE_BYTES/SEC"]
    rows = [["emoji", "1/2", "100.00%", "2.0rps", "123ms", "123ms", "123ms", "123", linkerd_bytes(2.0),
             linkerd_bytes(2.04)], ["idle", "1/1", *["-"] * 8]]
    assert linkerd_table(headers, rows) == (
        "NAME    MESHED   SUCCESS      RPS   LATENCY_P50   LATENCY_P95   LATENCY_P99   TCP_CONN   "
        "READ_BYTES/SEC   WRITE_BYTES/SEC\n"
        "emoji      1/2   100.00%   2.0rps         123ms         123ms         123ms        123           "
        "2.0B/s            2.0B/s\n"
        "idle       1/1         -        -             -             -             -          -           "
        "     -                 -\n")


def test_latency_is_whole_milliseconds_rounded_half_up_as_go_does() -> None:
    assert [linkerd_millis(v) for v in (0.4, 0.5, 2.5, 8.75, None)] == ["0ms", "1ms", "3ms", "9ms", "0ms"]
    assert (linkerd_percent(0.912449), linkerd_percent(None)) == ("91.24%", "-")
    assert linkerd_rps(12.94) == "12.9rps"
