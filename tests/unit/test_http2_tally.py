"""HTTP/2 counted without the Python round trips (issue #16): once a connection's first
request has found its series, the HTTP/2 observer (compiled by mypyc) counts the requests that
start and end on it into that series itself, and the relay feeds it directly: no Record, no
ConnectionObserver, no `settle` per request. Only a tapped request still ends in a Record (its
detail is published). What a scrape shows must not change: the observer counts whatever it
sees — valid exchanges however cut, hostile frame soup, resets, taps opening — exactly as the
Records it returned before would have been counted."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core import counters as counters_module
from agent.core.accounting import Record
from agent.core.counters import HttpCounters, parse_grpc_status
from agent.core.detect import ConnectionObserver
from agent.core.http2 import PREFACE, Http2Observer, _status
from agent.core.tap import Resource, TapFilter
from agent.dataplane import relay as relay_module
from agent.dataplane.netns import NetNs

from .test_http1_accounting_properties import chunks
from .test_http1_tally import Clock, Relayed, same_scrape, spy_on_feeds
from .test_http2_accounting import DATA, END_STREAM, RST_STREAM, Peers, frame
from .test_http2_accounting_properties import encode_step, raw_frame, response_steps, stream_plan


def counted(counters: HttpCounters) -> tuple[Any, ...]:
    return (counters.requests, counters.responses, counters.latency_buckets,
            counters.latency_count, round(counters.latency_sum, 6))


def run(steps: list[tuple[bool, bytes]], reset: bool, hand_over: int | None,
        tap_at: int | None = None) -> tuple[HttpCounters, int]:
    """Feed an observer as the relay does: through Records (`hand_over` None), or handing it
    the series after step `hand_over` and feeding it directly from then on. Returns the
    counters and how many Records came back after the hand-over."""
    switch = type("Switch", (), {"on": False})()
    observer = Http2Observer(max_streams=16, max_header_bytes=4096, tap=switch)
    counters = HttpCounters()
    direct, after = False, 0
    for index, (from_client, data) in enumerate(steps):
        if tap_at == index:
            switch.on = True
        now = 1.0 + index * 0.0015
        if direct:
            answer = (observer.feed_client if from_client else observer.feed_server)(data, now)
            records = answer or []
            after += len(records)
        else:
            records = (observer.client_bytes if from_client else observer.server_bytes)(data, now)
        counters.start(observer.take_started())
        for record in records:
            counters.record(record)
        if hand_over == index:
            observer.count_into(counters)
            direct = True
    for record in observer.closed(99.0, reset):
        counters.record(record)
    counters.start(observer.take_started())
    return counters, after


@st.composite
def exchange(draw: st.DrawFn) -> list[tuple[bool, bytes]]:
    """A valid connection: the preface and requests, responses interleaved across streams and
    cut anywhere, now and then a reset or garbage frames among them."""
    plans = draw(st.lists(stream_plan, min_size=1, max_size=6))
    rng = random.Random(draw(st.integers(0, 2**16)))
    peers = Peers()
    steps: list[tuple[bool, bytes]] = [(True, PREFACE)]
    steps += [(True, peers.request(2 * i + 1, grpc=True)) for i in range(len(plans))]
    left = {i: response_steps(plan) for i, plan in enumerate(plans)}
    server = b""
    while left:
        i = rng.choice(sorted(left))
        server += encode_step(peers, 2 * i + 1, plans[i], left[i].pop(0))
        if not left[i]:
            del left[i]
        if draw(st.integers(0, 9)) == 0:
            server += draw(st.one_of(raw_frame, st.just(frame(RST_STREAM, 0, 1, bytes(4)))))
    cuts = draw(st.lists(st.integers(0, len(server)), max_size=8))
    steps += [(False, piece) for piece in chunks(server, cuts)]
    return steps


soup = st.lists(st.tuples(st.booleans(), st.one_of(raw_frame, st.binary(max_size=100))), max_size=30)


@settings(max_examples=300, deadline=None)
@given(st.one_of(exchange(), soup.map(lambda s: [(True, PREFACE + Peers().request(1)), *s])),
       st.booleans(), st.integers(0, 40), st.one_of(st.none(), st.integers(0, 40)))
def test_counting_directly_counts_what_the_records_count(
        steps: list[tuple[bool, bytes]], reset: bool, hand_over: int, tap_at: int | None) -> None:
    via_records, _ = run(steps, reset, None, tap_at)
    direct, _ = run(steps, reset, min(hand_over, len(steps) - 1), tap_at)
    assert counted(direct) == counted(via_records)


def test_after_the_hand_over_no_record_comes_back() -> None:
    peers = Peers()
    steps = [(True, PREFACE + peers.request(1))]
    for stream in range(1, 41, 2):
        steps += [(False, peers.response(stream)), (False, frame(DATA, END_STREAM, stream, bytes(9))),
                  (True, peers.request(stream + 2))]
    counters, after = run(steps, reset=False, hand_over=0)
    assert after == 0
    assert counters.requests == 21  # the last request is open: ended as a failure at close
    assert counters.responses == {("success", "200", ""): 20, ("failure", "", ""): 1}


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=5))
def test_status_and_grpc_status_are_read_as_int_read_them(value: bytes) -> None:
    assert _status(value) == (int(value) if value.isdigit() and len(value) == 3 else None)
    assert parse_grpc_status(value) == (int(value) if 0 < len(value) <= 3 and value.isdigit() else None)
    assert counters_module.classify(None, parse_grpc_status(value), None) == (
        "success" if parse_grpc_status(value) in (None, 0) else "failure")


# ------------------------------------------------------------------ through a relay

def h2_conversation(requests: int, peers: Peers | None = None) -> list[tuple[bool, bytes]]:
    peers = peers or Peers()
    steps: list[tuple[bool, bytes]] = [(True, PREFACE + peers.request(1))]
    for stream in range(1, 2 * requests, 2):
        steps.append((False, peers.response(stream) + frame(DATA, END_STREAM, stream, bytes(16))))
        if stream + 2 < 2 * requests:
            steps.append((True, peers.request(stream + 2)))
    return steps


def test_a_relay_feeds_the_http2_observer_directly(netns: NetNs, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ConnectionObserver sees the first request only; the relay's direct feed is the
    HTTP/2 observer, and every request is in the series."""
    fed = spy_on_feeds(monkeypatch)
    monkeypatch.setattr(time, "monotonic", Clock())
    relayed = Relayed(netns)
    relayed.run(h2_conversation(30), reset=False)
    monkeypatch.undo()
    assert fed == ["feed_client"]
    [(_, http)] = list(relayed.proxy.telemetry.http_series())
    assert http.requests == 30 and http.responses == {("success", "200", ""): 30}
    assert http.latency_count == 30


@pytest.mark.parametrize("reset", [False, True])
def test_a_relay_counts_http2_the_same_directly_and_through_records(
        netns: NetNs, monkeypatch: pytest.MonkeyPatch, reset: bool) -> None:
    peers = Peers()
    steps = h2_conversation(12, peers)
    steps += [(True, peers.request(25)), (False, frame(RST_STREAM, 0, 25, bytes(4))),
              (True, peers.request(27))]  # a reset, and one open at the end
    with monkeypatch.context() as patch:
        patch.setattr(time, "monotonic", Clock())
        direct = Relayed(netns)
        direct.run(steps, reset)
        assert isinstance(direct.relay.fast, Http2Observer) or direct.relay.observer is None
    with monkeypatch.context() as patch:
        patch.setattr(time, "monotonic", Clock())
        patch.setattr(ConnectionObserver, "count_fast", lambda self, counters: None)
        via_records = Relayed(netns)
        via_records.run(steps, reset)
    assert same_scrape(direct.scrape(), via_records.scrape())
    assert any(line.startswith('response_total{') and 'classification="failure"' in line
               for line in direct.scrape())


def test_a_tap_opened_mid_connection_sees_the_next_http2_request(netns: NetNs) -> None:
    peers = Peers()
    relayed = Relayed(netns)
    for from_client, data in h2_conversation(2, peers):
        (relayed.client if from_client else relayed.upstream).send(data)
    assert isinstance(relayed.relay.fast, Http2Observer)
    published: list[Record] = []
    relay_module.publish_tapped, original = (lambda relay, record: published.append(record),
                                             relay_module.publish_tapped)
    try:
        hub = relayed.proxy.telemetry.tap
        tap = hub.open(TapFilter(Resource("pod", "web", "shop")), 100.0, lambda: None)
        hub.open(TapFilter(Resource("pod", "other", "shop")), 100.0, lambda: None)
        relayed.client.send(peers.request(5, path="/tapped"))
        relayed.upstream.send(peers.response(5, 503) + frame(DATA, END_STREAM, 5, b"x"))
        hub.close(tap)  # a tap of another pod is open still: web's requests are not tapped
        relayed.client.send(peers.request(7))
        relayed.upstream.send(peers.response(7) + frame(DATA, END_STREAM, 7, b"x"))
    finally:
        relay_module.publish_tapped = original
    assert [(r.status_code, r.detail.path if r.detail else None) for r in published] == [(503, "/tapped")]
    [(_, http)] = list(relayed.proxy.telemetry.http_series())
    assert http.requests == 4
    assert http.responses == {("success", "200", ""): 3, ("failure", "503", ""): 1}


def test_garbage_after_the_hand_over_ends_open_requests_once(netns: NetNs) -> None:
    peers = Peers()
    relayed = Relayed(netns)
    relayed.client.send(PREFACE + peers.request(1))
    relayed.upstream.send(peers.response(1) + frame(DATA, END_STREAM, 1, b"x"))
    relayed.client.send(peers.request(3))
    assert isinstance(relayed.relay.fast, Http2Observer)
    relayed.upstream.send(frame(9, 0, 3, b"\x00"))  # CONTINUATION out of place: give up
    assert relayed.relay.observer is None and relayed.relay.fast is None
    relayed.upstream.send(peers.response(3))
    relayed.client.lose(None)
    [(_, http)] = list(relayed.proxy.telemetry.http_series())
    assert http.requests == 2
    assert http.responses == {("success", "200", ""): 1, ("failure", "", ""): 1}
