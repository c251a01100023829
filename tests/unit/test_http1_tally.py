"""Counting without the Python round trips (issue #16): once a connection's first request has
found its series, the compiled HTTP/1 observer counts the requests that start and end on it
into the series' `Tally` (C), and the relay feeds it directly, one C call per chunk, with no
Record and no Python call per request. What a scrape shows must not change: the tally counts
a response under the code and a latency under the bucket the counters use, and a relay counts
any conversation (fast-path messages, every shape that hands over to the Python observer,
garbage, resets, taps opening) exactly as the pure-Python observer does."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core import http1
from agent.core.accounting import Record
from agent.core.counters import LATENCY_BUCKETS_MS, HttpCounters
from agent.core.detect import MAX_TAKE_BACKS, ConnectionObserver
from agent.core.tap import Resource, TapFilter
from agent.dataplane import relay as relay_module
from agent.dataplane.context import PodContext
from agent.dataplane.netns import NetNs
from agent.dataplane.relay import Relay
from agent.observability.exposition import generate_latest
from agent.observability.metrics import build_registry

from .test_http1_fast import conversation, message, request_line, status_line
from .test_relay import Pipe, Proxy

if not os.environ.get("CI"):  # in CI the extension must be there: `make venv` builds it
    pytest.importorskip("agent.core._http1fast", reason="not built: pip install -e . builds it")
from agent.core._http1fast import Http1Fast, Tally

GET = b"GET /1k.bin HTTP/1.1\r\nHost: web.shop:8080\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody"
FAILED = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"

# latencies on and around every bucket bound, and far beyond the last
latencies = st.one_of(
    st.none(),
    st.sampled_from([float(b) for b in LATENCY_BUCKETS_MS] + [0.0, 1e9]),
    st.sampled_from(LATENCY_BUCKETS_MS).map(lambda b: float(b) + 1e-9),
    st.floats(0.0, 60000.0, allow_nan=False),
)
statuses = st.one_of(st.none(), st.integers(100, 599), st.sampled_from([1, 99, 600, 999]))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(statuses, st.booleans(), latencies), max_size=60))
def test_the_tally_counts_what_the_counters_count(
        requests: list[tuple[int | None, bool, float | None]]) -> None:
    """Response codes (status, other status, none; success or failure) and latency buckets
    (bisect_left over the bounds) as counters.py makes them: the same scrape either way."""
    counted, tallied = HttpCounters(), HttpCounters()
    tally = tallied.tally = Tally()
    for status, failed, latency in requests:
        counted.count("failure" if failed else "success", status, None, latency)
        tally.count(status, failed, latency)
    assert tallied.responses == counted.responses
    assert tallied.latency_buckets == counted.latency_buckets
    assert tallied.latency_count == counted.latency_count
    assert repr(tallied.latency_sum) == repr(counted.latency_sum)  # summed in the same order


def test_what_the_counters_count_adds_to_the_tally() -> None:
    counters = HttpCounters()
    counters.requests += 2
    counters.count("success", 200, None, 3.0)
    tally = counters.tally = Tally()
    tally.count(200, False, 7.0)
    tally.count(None, True, None)
    counters.start(1)
    counters.requests += 1  # the setter keeps `requests` the total, whatever the tally holds
    assert counters.requests == 4
    assert counters.responses == {("success", "200", ""): 2, ("failure", "", ""): 1}
    assert counters.latency_count == 2 and counters.latency_sum == 10.0
    assert counters.latency_buckets[LATENCY_BUCKETS_MS.index(3)] == 1
    assert counters.latency_buckets[LATENCY_BUCKETS_MS.index(10)] == 1


def test_a_tally_refuses_what_no_request_ends_with() -> None:
    with pytest.raises(ValueError):
        Tally().count(0, False, None)
    with pytest.raises(ValueError):
        Tally().count(200, False, -1.0)
    with pytest.raises(TypeError):
        http1.http1_observer().count_into(HttpCounters())  # type: ignore[arg-type, union-attr]


# ------------------------------------------------------------- a relay, both ways

class Clock:
    """`time.monotonic` for the relay: every reading 1.5 ms after the one before. Patched on
    the time module itself: the compiled relay holds the module, not a name to patch."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        self.now += 0.0015
        return self.now


class Relayed:
    """One relayed connection over in-memory pipes, counted in its own telemetry."""

    def __init__(self, netns: NetNs, proxy: Proxy | None = None) -> None:
        self.proxy = proxy or Proxy()
        pod = PodContext("shop", "web", netns, frozenset((15001, 15006, 15008)))
        self.relay = Relay(self.proxy, pod, "inbound", 64 * 1024)
        self.client = Pipe(self.relay.client)
        self.relay.client.connection_made(self.client)  # type: ignore[arg-type]
        self.relay.open_record(self.relay.peer_labels)
        self.upstream = Pipe(self.relay.upstream)
        self.relay.upstream.connection_made(self.upstream)  # type: ignore[arg-type]

    def run(self, steps: list[tuple[bool, bytes]], reset: bool) -> None:
        for from_client, data in steps:
            (self.client if from_client else self.upstream).send(data)
        self.client.lose(ConnectionResetError() if reset else None)

    def scrape(self) -> list[str]:
        registry, _ = build_registry(self.proxy.telemetry)
        return [line for line in generate_latest(registry).decode().splitlines()
                if line.startswith(("request_total", "response_"))]


def both_ways(netns: NetNs, monkeypatch: pytest.MonkeyPatch, steps: list[tuple[bool, bytes]],
              reset: bool) -> tuple[Relayed, Relayed]:
    """The same conversation through a relay on the compiled path and on the Python observer."""
    with monkeypatch.context() as patch:
        patch.setattr(time, "monotonic", Clock())
        fast = Relayed(netns)
        fast.run(steps, reset)
    with monkeypatch.context() as patch:
        patch.setattr(time, "monotonic", Clock())
        patch.setattr(http1, "_Http1Fast", None)
        python = Relayed(netns)
        python.run(steps, reset)
    return fast, python


def same_scrape(one: list[str], other: list[str]) -> bool:
    """Equal lines; a latency sum to the last bits only when one store summed all of it (a
    connection handed over mid-way has part of its latencies in the tally, summed apart)."""
    if len(one) != len(other):
        return False
    for mine, theirs in zip(one, other, strict=True):
        if mine.startswith("response_latency_ms_sum"):
            (label, value), (other_label, other_value) = mine.rsplit(" ", 1), theirs.rsplit(" ", 1)
            if label != other_label or abs(float(value) - float(other_value)) > 1e-9 * abs(float(value)):
                return False
        elif mine != theirs:
            return False
    return True


@st.composite
def relayed_conversation(draw: st.DrawFn) -> list[tuple[bool, bytes]]:
    """test_http1_fast's conversations, with the server's bytes held back until the client's
    first head is through: a server that speaks first makes the connection opaque before any
    observer sees HTTP (detect.py), which would leave most examples nothing to compare."""
    steps = draw(conversation())
    ordered: list[tuple[bool, bytes]] = []
    held: list[tuple[bool, bytes]] = []
    client = b""
    for index, (from_client, data) in enumerate(steps):
        if from_client:
            ordered.append((from_client, data))
            client += data
            if b"\r\n\r\n" in client:
                return ordered + held + steps[index + 1:]
        else:
            held.append((from_client, data))
    return ordered + held


@st.composite
def keep_alive_conversation(draw: st.DrawFn) -> list[tuple[bool, bytes]]:
    """Requests each in one read, answered in order, responses cut in up to two reads, now and
    then two requests pipelined: mostly the fast path's own ground, with every shape of
    message test_http1_fast draws, so hand-overs and give-ups come in the middle of it."""
    requests = draw(st.lists(message(request_line), min_size=1, max_size=8))
    responses = draw(st.lists(message(status_line), max_size=8))
    steps: list[tuple[bool, bytes]] = []
    for index, request in enumerate(requests):
        if steps and steps[-1][0] and draw(st.integers(0, 4)) == 0:
            steps[-1] = (True, steps[-1][1] + request)  # pipelined behind the one before
        else:
            steps.append((True, request))
        if index < len(responses):
            response = responses[index]
            cut = draw(st.integers(0, len(response)))
            steps += [(False, piece) for piece in (response[:cut], response[cut:]) if piece]
    return steps


@settings(max_examples=int(os.environ.get("PINION_DIFF_EXAMPLES", "300")), deadline=None)
@given(st.one_of(relayed_conversation(), keep_alive_conversation()), st.booleans())
def test_a_relay_counts_the_same_on_the_fast_path_and_in_python(
        steps: list[tuple[bool, bytes]], reset: bool) -> None:
    monkeypatch, netns = pytest.MonkeyPatch(), NetNs.current()
    try:
        fast, python = both_ways(netns, monkeypatch, steps, reset)
        assert same_scrape(fast.scrape(), python.scrape())
    finally:
        monkeypatch.undo()
        netns.close()


def spy_on_feeds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ConnectionObserver's feeds, each call named in the list returned (the relay may be
    compiled, the observer is not: it can be spied on)."""
    fed: list[str] = []
    for side in ("feed_client", "feed_server"):
        original = getattr(ConnectionObserver, side)

        def spy(self: ConnectionObserver, data: bytes, now: float, side: str = side,
                original: Any = original) -> Any:
            fed.append(side)
            return original(self, data, now)

        monkeypatch.setattr(ConnectionObserver, side, spy)
    return fed


def test_keep_alive_requests_reach_python_once_per_connection(
        netns: NetNs, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first request finds the series (the Python observer sees its head); every later
    chunk is one C call that counts into the series' tally and returns None: no Record, no
    started count, no Python observer (spied on: the relay may be compiled, the observer is
    not)."""
    fed = spy_on_feeds(monkeypatch)
    monkeypatch.setattr(time, "monotonic", Clock())
    relayed = Relayed(netns)
    relayed.run([(True, GET), (False, OK)] * 50 + [(True, GET), (False, FAILED)], reset=False)
    monkeypatch.undo()
    assert fed == ["feed_client"]  # the first head only
    [(_, http)] = list(relayed.proxy.telemetry.http_series())
    assert isinstance(http.tally, Tally)
    assert http.requests == 51 and http.latency_count == 51
    assert http.responses == {("success", "200", ""): 50, ("failure", "503", ""): 1}
    assert http.latency_buckets[LATENCY_BUCKETS_MS.index(2)] == 51  # 1.5 ms each


def test_connections_of_one_series_share_its_tally(netns: NetNs) -> None:
    proxy = Proxy()
    for _ in range(3):
        relayed = Relayed(netns, proxy)
        relayed.run([(True, GET), (False, OK), (True, GET), (False, OK)], reset=False)
    [(_, http)] = list(proxy.telemetry.http_series())
    assert http.requests == 6 and http.responses == {("success", "200", ""): 6}


def test_a_hand_over_ends_the_direct_feed_and_counts_go_on(netns: NetNs) -> None:
    """HEAD is the Python observer's: the compiled path hands over, the relay feeds through
    the ConnectionObserver again, and the series counts every request once."""
    relayed = Relayed(netns)
    relayed.client.send(GET)
    relayed.upstream.send(OK)
    assert relayed.relay.fast is not None
    relayed.client.send(b"HEAD / HTTP/1.1\r\n\r\n")
    assert relayed.relay.fast is None
    relayed.upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n")
    relayed.client.send(GET)
    relayed.upstream.send(OK)
    [(_, http)] = list(relayed.proxy.telemetry.http_series())
    assert http.requests == 3 and http.responses == {("success", "200", ""): 3}


def test_a_tap_opened_mid_connection_sees_the_next_request(netns: NetNs) -> None:
    """Taps keep working: with the pod tapped, the next request head hands the connection to
    the Python observer, whose Record (with its detail) the relay publishes."""
    relayed = Relayed(netns)
    relayed.client.send(GET)
    relayed.upstream.send(OK)
    assert relayed.relay.fast is not None
    published: list[Record] = []
    relay_module.publish_tapped, original = (lambda relay, record: published.append(record),
                                             relay_module.publish_tapped)
    try:
        relayed.proxy.telemetry.tap.open(TapFilter(Resource("pod", "web", "shop")), 100.0,
                                         lambda: None)
        relayed.client.send(b"GET /tapped HTTP/1.1\r\nHost: web\r\n\r\n")
        relayed.upstream.send(OK)
    finally:
        relay_module.publish_tapped = original
    assert [(r.status_code, r.detail.path if r.detail else None) for r in published] == [(200, "/tapped")]
    [(_, http)] = list(relayed.proxy.telemetry.http_series())
    assert http.requests == 2 and http.responses == {("success", "200", ""): 2}


def test_a_connection_tapped_comes_back_to_the_fast_path_once_the_tap_closes(
        netns: NetNs, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tap hands a keep-alive connection to the Python observer; once the tap is closed,
    the connection goes back to a fresh fast path between two messages, and its requests
    no longer reach Python (spied on), counted as before."""
    fed = spy_on_feeds(monkeypatch)
    published: list[Record] = []
    monkeypatch.setattr(relay_module, "publish_tapped", lambda relay, record: published.append(record))
    monkeypatch.setattr(time, "monotonic", Clock())
    relayed = Relayed(netns)
    relayed.client.send(GET)
    relayed.upstream.send(OK)
    hub = relayed.proxy.telemetry.tap
    tap = hub.open(TapFilter(Resource("pod", "web", "shop")), 100.0, lambda: None)
    relayed.client.send(b"GET /tapped HTTP/1.1\r\nHost: web\r\n\r\n")
    relayed.upstream.send(OK)
    relayed.client.send(b"GET /tapped-too HTTP/1.1\r\nHost: web\r\n\r\n")
    relayed.upstream.send(OK)
    assert relayed.relay.fast is None  # the tap is open: Python keeps the connection
    hub.close(tap)
    relayed.client.send(GET)  # started in Python (the tap's parser is swapped out here)
    relayed.upstream.send(OK)  # ... and at its end, between messages: back to the fast path
    observer = relayed.relay.observer
    assert relayed.relay.fast is not None and observer is not None and observer.taken_back == 1
    fed.clear()
    for _ in range(20):
        relayed.client.send(GET)
        relayed.upstream.send(OK)
    assert fed == []
    assert [r.detail.path if r.detail else None for r in published] == ["/tapped", "/tapped-too"]
    [(_, http)] = list(relayed.proxy.telemetry.http_series())
    assert http.requests == 24 and http.responses == {("success", "200", ""): 24}


HEAD = b"HEAD /1k.bin HTTP/1.1\r\nHost: web.shop:8080\r\n\r\n"
HEAD_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 1024\r\n\r\n"  # no body: it answers a HEAD


def test_a_message_the_fast_path_does_not_take_hands_over_once_not_for_good(
        netns: NetNs, monkeypatch: pytest.MonkeyPatch) -> None:
    """A HEAD (the fast path leaves it to Python) in a keep-alive connection: the GETs after
    it are back on the fast path; a connection whose every other message leaves it is taken
    back MAX_TAKE_BACKS times, then stays with Python; the counts are those of the Python
    observer alone throughout."""
    monkeypatch.setattr(time, "monotonic", Clock())
    relayed = Relayed(netns)
    relayed.client.send(GET)
    relayed.upstream.send(OK)
    relayed.client.send(HEAD)
    relayed.upstream.send(HEAD_OK)
    observer = relayed.relay.observer
    assert relayed.relay.fast is not None and observer is not None and observer.taken_back == 1
    for _ in range(MAX_TAKE_BACKS + 5):
        relayed.client.send(HEAD)
        relayed.upstream.send(HEAD_OK)
        relayed.client.send(GET)
        relayed.upstream.send(OK)
    assert observer.taken_back == MAX_TAKE_BACKS and relayed.relay.fast is None
    [(_, http)] = list(relayed.proxy.telemetry.http_series())
    total = 2 + 2 * (MAX_TAKE_BACKS + 5)
    assert http.requests == total and http.responses == {("success", "200", ""): total}


@pytest.mark.parametrize("closing", [
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 4\r\n\r\nbody",
    b"HTTP/1.0 200 OK\r\nContent-Length: 4\r\n\r\nbody",
])
def test_a_connection_that_said_close_is_not_taken_back(netns: NetNs, closing: bytes) -> None:
    relayed = Relayed(netns)
    relayed.client.send(GET)
    relayed.upstream.send(OK)
    relayed.client.send(HEAD)  # handed over
    relayed.upstream.send(HEAD_OK)
    relayed.client.send(GET)
    relayed.upstream.send(closing[:5])  # a head cut across reads: handed over again
    relayed.upstream.send(closing[5:])
    observer = relayed.relay.observer
    assert relayed.relay.fast is None and observer is not None and observer.taken_back == 1


class Broken:
    """A direct feed with a bug."""

    def feed_client(self, data: bytes, now: float) -> Any:
        raise RuntimeError("bug")

    feed_server = feed_client


def test_a_direct_feed_that_raises_ends_its_requests_as_failures(netns: NetNs) -> None:
    """The last line of defence ConnectionObserver gives the other observers: the connection
    turns opaque, its requests in flight end as failures, the bytes keep flowing."""
    relayed = Relayed(netns)
    relayed.client.send(GET)
    assert isinstance(relayed.relay.fast, Http1Fast)
    relayed.relay.fast = Broken()
    relayed.client.send(GET)
    assert relayed.relay.observer is None and relayed.relay.fast is None
    relayed.upstream.send(OK)
    assert bytes(relayed.upstream.received) == GET + GET and bytes(relayed.client.received) == OK
    [(_, http)] = list(relayed.proxy.telemetry.http_series())
    assert http.requests == 1
    assert http.responses == {("failure", "", ""): 1}  # the first, in flight: protocol_error


def test_a_telemetry_without_the_extension_never_makes_a_tally(
        netns: NetNs, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http1, "_Http1Fast", None)
    relayed = Relayed(netns)
    relayed.run([(True, GET), (False, OK)], reset=False)
    [(_, http)] = list(relayed.proxy.telemetry.http_series())
    assert http.tally is None and relayed.relay.fast is None and http.requests == 1
