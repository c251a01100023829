"""Tap, sans-IO: the observers keep a request's path, authority and sizes only while a tap is
open (and switch parsers only between messages); the hub filters, rate-limits and bounds."""

from __future__ import annotations

import gc
from typing import Any

import pytest

from agent.core.http1 import Http1Observer
from agent.core.http2 import Http2Observer
from agent.core.tap import (
    Resource,
    TapFilter,
    TapHub,
    TapRequestError,
    TapSwitch,
    TooManyTaps,
    split_target,
)
from tests.unit.test_http2_accounting import DATA, END_STREAM, Peers, frame, start


def request(path: str = "/a?secret=1", body: bytes = b"", host: str = "web.shop:8080") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def response(status: int = 200, body: bytes = b"hello") -> bytes:
    return f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


def test_http1_without_a_tap_keeps_nothing_more() -> None:
    observer = Http1Observer(tap=TapSwitch())
    observer.client_bytes(request(), 0.0)
    [record] = observer.server_bytes(response(), 0.002)
    assert record.detail is None and record.method == "POST" and record.status_code == 200


def test_http1_with_a_tap_keeps_path_authority_and_sizes_never_the_query() -> None:
    switch = TapSwitch()
    switch.on = True
    observer = Http1Observer(tap=switch)
    observer.client_bytes(request(body=b"12345678"), 0.0)
    answer = response(body=b"xyz")
    assert observer.server_bytes(answer[:-2], 0.004) == []  # headers, and a byte of the body
    [record] = observer.server_bytes(answer[-2:], 0.010)
    assert record.detail is not None
    assert (record.detail.path, record.detail.authority) == ("/a", "web.shop:8080")
    assert (record.detail.request_bytes, record.detail.response_bytes) == (8, 3)
    assert record.latency_ms == pytest.approx(4.0) and record.detail.end_ms == pytest.approx(10.0)


def test_http1_tap_opened_mid_connection_applies_from_the_next_request() -> None:
    switch = TapSwitch()
    observer = Http1Observer(tap=switch)
    observer.client_bytes(request("/first"), 0.0)
    switch.on = True  # the tap opens while /first is in flight
    [first] = observer.server_bytes(response(), 0.001)
    observer.client_bytes(request("/second"), 0.002)
    [second] = observer.server_bytes(response(), 0.003)
    switch.on = False
    observer.client_bytes(request("/third"), 0.004)
    [third] = observer.server_bytes(response(), 0.005)
    assert first.detail is None and third.detail is None
    assert second.detail is not None and second.detail.path == "/second"


def test_http1_pipelined_requests_each_get_their_own_detail() -> None:
    switch = TapSwitch()
    switch.on = True
    observer = Http1Observer(tap=switch)
    observer.client_bytes(request("/p1") + request("/p2", host="other"), 0.0)
    records = observer.server_bytes(response(200) + response(503), 0.001)
    assert [(r.detail.path, r.detail.authority, r.status_code) for r in records if r.detail] == [
        ("/p1", "web.shop:8080", 200), ("/p2", "other", 503)]


def test_absolute_form_targets_give_their_authority() -> None:
    assert split_target("http://api:80/v1/x?q=1") == ("api:80", "/v1/x")
    assert split_target("/plain#frag") == ("", "/plain")


def test_http2_with_a_tap_keeps_path_authority_and_data_lengths() -> None:
    switch = TapSwitch()
    observer = Http2Observer(tap=switch)
    peers = Peers()
    start(observer)
    switch.on = True
    observer.client_bytes(peers.request(1, path="/pkg.Svc/Call?x", end_stream=False)
                          + frame(DATA, END_STREAM, 1, b"abcd"), 0.0)
    observer.server_bytes(peers.response(1, 200) + frame(DATA, 0, 1, b"123456"), 0.002)
    [record] = observer.server_bytes(peers.trailers(1, 14), 0.005)
    assert record.detail is not None
    assert (record.detail.path, record.detail.authority) == ("/pkg.Svc/Call", "svc")
    assert (record.detail.request_bytes, record.detail.response_bytes) == (4, 6)
    assert record.grpc_status == 14 and record.detail.end_ms == pytest.approx(5.0)


def fields(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "direction": "inbound", "namespace": "shop", "pod": "web-1", "owner_kind": "deployment",
        "owner_name": "web", "method": "GET", "path": "/api/items", "authority": "web",
        "src_namespace": "shop", "src_pod": "client-1", "src_owner_kind": "", "src_owner_name": "",
        "dst_namespace": "", "dst_pod": "", "dst_owner_kind": "", "dst_owner_name": ""}
    return base | overrides


def test_filters_select_by_resource_direction_method_path_and_authority() -> None:
    web = Resource.parse("deploy/web", "shop")
    assert TapFilter(web).matches(fields())
    assert not TapFilter(Resource.parse("deploy/web", "other")).matches(fields())
    assert TapFilter(Resource.parse("pod/web-1", "shop")).matches(fields())
    assert TapFilter(Resource.parse("ns/shop", "default")).matches(fields())
    assert not TapFilter(web, method="POST").matches(fields())
    assert TapFilter(web, path="/api").matches(fields()) and not TapFilter(web, path="/x").matches(fields())
    assert not TapFilter(web, authority="api").matches(fields())
    assert TapFilter(web, source=Resource.parse("pod/client-1", "shop")).matches(fields())
    assert not TapFilter(web, to=Resource.parse("pod/client-1", "shop")).matches(fields())
    outbound = fields(direction="outbound", dst_namespace="shop", dst_pod="db-0")
    assert TapFilter(web, to=Resource.parse("pod/db-0", "shop")).matches(outbound)


@pytest.mark.parametrize("text", ["web", "svc/web", "pod/", "deploy"])
def test_bad_resources_are_refused_with_a_reason(text: str) -> None:
    with pytest.raises(TapRequestError, match="expected pod/NAME"):
        Resource.parse(text, "default")


def test_each_tap_is_rate_limited_and_its_queue_bounded() -> None:
    now = [0.0]
    hub = TapHub(lambda: now[0], max_taps=2, queue_size=3)
    woken: list[int] = []
    web = hub.switch_for("shop", "web-1", "deployment", "web")
    slow = hub.open(TapFilter(Resource.parse("ns/shop", "shop")), 1000.0, lambda: woken.append(1))
    limited = hub.open(TapFilter(Resource.parse("ns/shop", "shop")), 2.0, lambda: None)
    assert web.on and web.taps == [slow, limited]
    with pytest.raises(TooManyTaps):
        hub.open(TapFilter(Resource.parse("ns/shop", "shop")), 1.0, lambda: None)
    for _ in range(10):
        hub.publish(fields())
    assert (len(slow.queue), slow.dropped, slow.limited) == (3, 7, 0)
    assert (len(limited.queue), limited.limited) == (2, 8)
    assert woken == [1]  # woken when its queue stops being empty, not per event
    assert len(slow.take()) == 3 and slow.sent == 3
    now[0] = 1.0  # a second later, two more tokens
    for _ in range(3):
        hub.publish(fields())
    assert len(limited.queue) == 3 and limited.limited == 9
    hub.close(slow)
    hub.close(limited)
    assert limited.dropped == 1  # two new tokens, but room for one more in its queue
    assert not web.on and web.taps == [] and hub.totals() == (8, 9)


def test_each_pods_switch_is_on_exactly_while_a_tap_targets_it() -> None:
    """A tap of one pod turns on that pod's switch only: the other pods' connections stay
    on the compiled fast path. Switches made before or after the tap agree; one nobody
    holds any more is forgotten."""
    hub = TapHub(lambda: 0.0)
    web = hub.switch_for("shop", "web-1", "deployment", "web")
    api = hub.switch_for("shop", "api-0", "statefulset", "api")
    assert hub.switch_for("shop", "web-1", "deployment", "web") is web
    deploy = hub.open(TapFilter(Resource.parse("deploy/web", "shop")), 10.0, lambda: None)
    assert (web.on, api.on) == (True, False) and web.taps == [deploy]
    other = hub.switch_for("other", "web-1", "deployment", "web")  # same names elsewhere
    web2 = hub.switch_for("shop", "web-2", "deployment", "web")  # made while tapped
    assert (other.on, web2.on) == (False, True)
    namespace = hub.open(TapFilter(Resource.parse("ns/shop", "shop")), 10.0, lambda: None)
    assert api.on and api.taps == [namespace] and web.taps == [deploy, namespace]
    hub.close(deploy)
    assert web.taps == [namespace] and web2.on
    hub.close(namespace)
    assert not any(switch.on for switch in (web, api, other, web2))
    assert hub.ready_for(web) == [] and hub.published == 0
    del api
    gc.collect()
    assert ("shop", "api-0", "statefulset", "api") not in hub._switches


def test_the_proxy_builds_no_event_when_no_tap_of_the_pod_has_room() -> None:
    now = [0.0]
    hub = TapHub(lambda: now[0], queue_size=1)
    web = hub.open(TapFilter(Resource.parse("pod/web-1", "shop")), 1.0, lambda: None)
    other = hub.open(TapFilter(Resource.parse("pod/api-0", "shop")), 100.0, lambda: None)
    pod = hub.switch_for("shop", "web-1", "deployment", "web")
    assert hub.ready_for(pod) == [web]
    hub.publish(fields(), [web])
    assert len(web.queue) == 1
    now[0] = 5.0  # tokens again, but the queue is full: counted as dropped, nothing to build
    assert hub.ready_for(pod) == []
    web.take()
    hub.publish(fields(), hub.ready_for(pod))
    assert hub.ready_for(pod) == []  # no token left this second
    assert (web.dropped, web.limited, web.sent) == (1, 1, 1)
    assert other.limited == other.dropped == 0 and not other.queue  # not its pod


@pytest.mark.parametrize("compiled", [False, True])
def test_the_agents_http1_observer_taps_from_the_next_request_on_either_path(compiled: bool) -> None:
    """`http1_observer`: the compiled fast path (agent.core._http1fast) checks the pod's tap
    switch before each request head and hands the connection to the Python observer, which
    taps, once it is on; the same as the Python observer alone."""
    from agent.core import http1

    if compiled and http1._Http1Fast is None:
        pytest.fail("the compiled fast path is not built (pip install -e . / make venv)")
    switch = TapSwitch()
    observer = http1.http1_observer(tap=switch) if compiled else Http1Observer(tap=switch)
    assert type(observer).__name__ == ("Http1Fast" if compiled else "Http1Observer")
    observer.client_bytes(request("/before"), 0.0)
    [before] = observer.server_bytes(response(), 0.001)
    assert before.detail is None  # no tap yet
    switch.on = True
    observer.client_bytes(request("/after"), 0.002)
    [after] = observer.server_bytes(response(), 0.004)
    assert after.detail is not None and after.detail.path == "/after"
    switch.on = False
    observer.client_bytes(request("/closed"), 0.005)
    [closed] = observer.server_bytes(response(), 0.006)
    assert closed.detail is None
