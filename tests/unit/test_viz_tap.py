"""`pinion tap` output as `linkerd viz tap` prints it (req/rsp/end lines, -o wide, -o json),
and `pinion top`'s route table: folded by (source, destination, method, path), busiest first."""

from __future__ import annotations

import json
from typing import Any

from agent.viz.tap import RouteTable, TapQuery, json_line, tap_lines, top_table

EVENT: dict[str, Any] = {
    "kind": "request", "direction": "inbound", "namespace": "shop", "pod": "web-1",
    "owner_kind": "deployment", "owner_name": "web", "src": "10.42.0.7:51234",
    "dst": "10.42.1.5:8080", "src_namespace": "shop", "src_pod": "cli-1", "src_owner_kind": "",
    "src_owner_name": "", "dst_namespace": "shop", "dst_pod": "web-1",
    "dst_owner_kind": "deployment", "dst_owner_name": "web", "tls": "true", "identity": "",
    "method": "GET", "authority": "web:8080", "path": "/items", "status": 200,
    "grpc_status": None, "classification": "success", "error": None, "latency_ms": 1.25,
    "duration_ms": 1.5, "request_bytes": 0, "response_bytes": 42}


def test_default_output_is_linkerds_req_rsp_end_lines() -> None:
    assert tap_lines(EVENT, 3, wide=False) == [
        "req id=3:0 proxy=in  src=10.42.0.7:51234 dst=10.42.1.5:8080 tls=true :method=GET "
        ":authority=web:8080 :path=/items",
        "rsp id=3:0 proxy=in  src=10.42.0.7:51234 dst=10.42.1.5:8080 tls=true :status=200 latency=1250µs",
        "end id=3:0 proxy=in  src=10.42.0.7:51234 dst=10.42.1.5:8080 tls=true duration=250µs "
        "response-length=42B"]


def test_wide_output_names_resources_and_grpc_ends_with_its_status_name() -> None:
    event = EVENT | {"direction": "outbound", "grpc_status": 14, "tls": "disabled"}
    req, _, end = tap_lines(event, 1, wide=True)
    assert req.startswith("req id=1:0 proxy=out ") and "tls=not_provided_by_remote" in req
    assert req.endswith(" src_pod=cli-1 src_ns=shop dst_res=deployment/web dst_ns=shop")
    assert " grpc-status=Unavailable duration=250µs" in end


def test_a_request_without_a_response_ends_with_its_error() -> None:
    event = EVENT | {"status": None, "latency_ms": None, "error": "reset", "duration_ms": None}
    lines = tap_lines(event, 1, wide=False)
    assert [line[:3] for line in lines] == ["req", "end"] and "reset-error=reset" in lines[1]


def test_json_output_has_the_contract_fields() -> None:
    decoded = json.loads(json_line(EVENT))
    for key in ("direction", "namespace", "pod", "method", "authority", "path", "status",
                "grpc_status", "latency_ms", "tls", "src", "dst"):
        assert key in decoded
    assert "kind" not in decoded


def test_top_folds_routes_busiest_first_with_best_worst_last_and_success() -> None:
    table = RouteTable()
    for latency, path, ok in [(2.0, "/a", True), (1.0, "/b", True), (5.0, "/a", False),
                              (3.0, "/a", True)]:
        table.add(EVENT | {"path": path, "latency_ms": latency,
                           "classification": "success" if ok else "failure"})
    busiest = table.busiest()
    assert [(r.path, r.count, r.best, r.worst, r.last) for r in busiest] == [
        ("/a", 3, 2.0, 5.0, 3.0), ("/b", 1, 1.0, 1.0, 1.0)]
    lines = top_table(busiest).splitlines()
    assert lines[0].split() == ["Source", "Destination", "Method", "Path", "Count", "Best",
                                "Worst", "Last", "Success", "Rate"]
    assert lines[1].split()[:5] == ["cli-1", "web-1", "GET", "/a", "3"]
    assert lines[1].split()[-1] == "66.67%"


def test_the_route_table_is_bounded() -> None:
    table = RouteTable(limit=2)
    for i in range(5):
        table.add(EVENT | {"path": f"/id/{i}"})
    assert len(table.routes) == 2


def test_the_query_carries_only_the_filters_given() -> None:
    assert TapQuery("deploy/web", "shop", path="/api").query() == \
        "resource=deploy%2Fweb&namespace=shop&path=%2Fapi&max_rps=100"
