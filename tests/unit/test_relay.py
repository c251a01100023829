"""The relay both proxies share, over in-memory transports: bytes both ways, a FIN passed on
while the other direction keeps flowing, a reset passed on as a reset, bytes (and a FIN)
that beat the upstream connect, backpressure from a full send buffer, and exactly one close
counted per connection. No sockets, no event loop, no root."""

from __future__ import annotations

from typing import Any

import pytest

from agent.core.telemetry import TcpCounters, Telemetry
from agent.dataplane.context import PodContext
from agent.dataplane.netns import NetNs
from agent.dataplane.relay import Relay, _Side


class Pipe:
    """A transport's end as the relay sees it, and what the app at the other end got.

    `high`: the send buffer's high-water mark; bytes written stay `buffered` until the test
    `drain()`s them (the peer reads), pausing and resuming the protocol like asyncio."""

    def __init__(self, protocol: _Side) -> None:
        self.protocol = protocol
        self.received = bytearray()  # what the app at the other end has read
        self.buffered = 0
        self.high = 64 * 1024
        self.eof_sent = False
        self.closed = False
        self.reset = False
        self.reading = True
        self.write_paused = False

    # -- the transport API the relay uses
    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high = high if high is not None else self.high

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default  # no socket: a reset is an abort()

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return True

    def write(self, data: bytes) -> None:
        assert not self.closed and not self.eof_sent, "written after close or FIN"
        self.received += data
        self.buffered += len(data)
        if self.buffered > self.high and not self.write_paused:
            self.write_paused = True
            self.protocol.pause_writing()

    def writelines(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.write(chunk)

    def write_eof(self) -> None:
        self.eof_sent = True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.reset = True

    # -- what the test does as the app at the other end
    def drain(self) -> None:
        self.buffered = 0
        if self.write_paused:
            self.write_paused = False
            self.protocol.resume_writing()

    def send(self, data: bytes) -> None:
        self.protocol.data_received(data)

    def send_fin(self) -> None:
        self.protocol.eof_received()

    def lose(self, exc: Exception | None = None) -> None:
        """The connection ended (the event loop's connection_lost, after close or abort)."""
        self.closed = True
        self.protocol.connection_lost(exc)


class Proxy:
    """A relay's owner: remembers what was accepted and counts into real telemetry."""

    def __init__(self) -> None:
        self.telemetry = Telemetry(lambda: 0.0, 60.0)
        self.accepted_relays: list[Relay] = []

    def accepted(self, relay: Relay) -> None:
        self.accepted_relays.append(relay)

    def counters(self) -> TcpCounters:
        [(_, counters)] = list(self.telemetry.series())
        return counters


class Connection:
    """One relayed connection: the client's pipe, and the upstream's once connected."""

    def __init__(self, netns: NetNs, buffer_high: int = 64 * 1024,
                 direction: str = "outbound") -> None:
        self.proxy = Proxy()
        self.pod = PodContext("shop", "front-1", netns, frozenset((15001, 15006, 15008)))
        self.relay = Relay(self.proxy, self.pod, direction, buffer_high)
        self.pod.relays.add(self.relay)
        self.client = Pipe(self.relay.client)
        self.relay.client.connection_made(self.client)  # type: ignore[arg-type]
        self.upstream: Pipe | None = None

    def connect_upstream(self) -> Pipe:
        """What a proxy does once the path is chosen: count it, connect, let bytes flow."""
        self.relay.open_record(self.relay.peer_labels)
        upstream = self.upstream = Pipe(self.relay.upstream)
        self.relay.upstream.connection_made(upstream)  # type: ignore[arg-type]
        if not self.relay.upstream.write_blocked:
            self.client.resume_reading()
        return upstream


def test_accepting_pauses_the_client_until_the_upstream_is_connected(netns: NetNs) -> None:
    connection = Connection(netns)
    assert connection.proxy.accepted_relays == [connection.relay]
    assert not connection.client.reading
    connection.connect_upstream()
    assert connection.client.reading


def test_bytes_flow_both_ways_and_are_counted(netns: NetNs) -> None:
    connection = Connection(netns)
    upstream = connection.connect_upstream()
    connection.client.send(b"ping")
    upstream.send(b"pong!")
    assert bytes(upstream.received) == b"ping" and bytes(connection.client.received) == b"pong!"
    counters = connection.proxy.counters()
    assert (counters.read_bytes, counters.write_bytes) == (4, 5)


def test_a_fin_is_passed_on_and_the_other_direction_keeps_flowing(netns: NetNs) -> None:
    connection = Connection(netns)
    upstream = connection.connect_upstream()
    connection.client.send(b"request")
    connection.client.send_fin()
    assert upstream.eof_sent and not upstream.closed  # half-closed, not closed
    upstream.send(b"response, after the client's FIN")
    assert bytes(connection.client.received) == b"response, after the client's FIN"
    assert not connection.client.eof_sent
    upstream.send_fin()  # both directions finished: both closed, gracefully
    assert connection.client.closed and upstream.closed
    assert not connection.client.reset and not upstream.reset
    connection.client.lose()
    upstream.lose()
    counters = connection.proxy.counters()
    assert (counters.close_success, counters.close_failure, counters.open_connections) == (1, 0, 0)


def test_a_reset_upstream_resets_the_client(netns: NetNs) -> None:
    connection = Connection(netns)
    upstream = connection.connect_upstream()
    upstream.lose(ConnectionResetError("reset by peer"))
    assert connection.client.reset  # RST, not FIN: the client learns the upstream failed
    connection.client.lose()
    counters = connection.proxy.counters()
    assert (counters.close_success, counters.close_failure) == (0, 1)
    assert connection.relay not in connection.pod.relays


def test_a_reset_client_resets_the_upstream(netns: NetNs) -> None:
    connection = Connection(netns)
    upstream = connection.connect_upstream()
    connection.client.lose(ConnectionResetError("reset by peer"))
    assert upstream.reset
    upstream.lose()
    assert connection.proxy.counters().close_failure == 1


def test_a_graceful_close_is_passed_on_as_a_close(netns: NetNs) -> None:
    connection = Connection(netns)
    upstream = connection.connect_upstream()
    upstream.lose(None)
    assert connection.client.closed and not connection.client.reset
    connection.client.lose()
    assert connection.proxy.counters().close_success == 1


def test_bytes_that_beat_the_upstream_connect_are_held_then_sent_first(netns: NetNs) -> None:
    """uvloop may deliver a read before honouring the pause of a new connection."""
    connection = Connection(netns)
    connection.client.send(b"GET / HTTP/1.1\r\n")
    connection.client.send(b"Host: web\r\n\r\n")
    upstream = connection.connect_upstream()
    assert bytes(upstream.received) == b"GET / HTTP/1.1\r\nHost: web\r\n\r\n"
    assert connection.proxy.counters().read_bytes == 29  # counted once the labels were known
    connection.client.send(b"more")
    assert bytes(upstream.received).endswith(b"more")


def test_an_early_fin_is_passed_on_after_the_early_bytes(netns: NetNs) -> None:
    connection = Connection(netns)
    connection.client.send(b"all I have to say")
    connection.client.send_fin()
    upstream = connection.connect_upstream()
    assert bytes(upstream.received) == b"all I have to say" and upstream.eof_sent
    upstream.send(b"the answer")
    assert bytes(connection.client.received) == b"the answer"


def test_too_many_early_bytes_pause_the_client(netns: NetNs) -> None:
    connection = Connection(netns, buffer_high=8)
    connection.client.resume_reading()  # as if uvloop had not honoured the first pause
    connection.client.send(b"12345")
    assert connection.client.reading
    connection.client.send(b"67890")
    assert not connection.client.reading  # over buffer_high with nowhere to send it
    upstream = connection.connect_upstream()
    assert bytes(upstream.received) == b"1234567890"
    assert not connection.client.reading  # the upstream took them over its high-water mark
    upstream.drain()
    assert connection.client.reading


def test_a_full_upstream_pauses_reading_from_the_client_until_it_drains(netns: NetNs) -> None:
    connection = Connection(netns)
    upstream = connection.connect_upstream()
    upstream.high = 10
    connection.client.send(b"0123456789abc")  # over the upstream's high-water mark
    assert not connection.client.reading and connection.relay.upstream.write_blocked
    upstream.drain()
    assert connection.client.reading and not connection.relay.upstream.write_blocked


def test_a_full_client_pauses_reading_from_the_upstream_until_it_drains(netns: NetNs) -> None:
    connection = Connection(netns)
    upstream = connection.connect_upstream()
    connection.client.high = 4
    upstream.send(b"a large response")
    assert not upstream.reading
    connection.client.drain()
    assert upstream.reading


def test_a_connected_upstream_that_is_already_full_keeps_the_client_paused(netns: NetNs) -> None:
    connection = Connection(netns, buffer_high=4)
    connection.client.send(b"early bytes, more than the upstream takes")
    connection.connect_upstream()
    assert connection.relay.upstream.write_blocked  # so the proxy does not resume the client
    assert not connection.client.reading
    assert connection.upstream is not None
    connection.upstream.drain()
    assert connection.client.reading


def test_no_resume_for_a_client_already_closing(netns: NetNs) -> None:
    connection = Connection(netns)
    upstream = connection.connect_upstream()
    upstream.high = 2
    connection.client.send(b"abc")
    connection.client.pause_reading()
    connection.client.closed = True
    upstream.drain()
    assert not connection.client.reading


@pytest.mark.parametrize("ending", ["both lost", "client lost twice", "abort then lost",
                                    "abort twice", "finish before the path"])
def test_exactly_one_close_is_counted_however_the_connection_ends(netns: NetNs, ending: str) -> None:
    connection = Connection(netns)
    if ending == "finish before the path":  # refused before an upstream: still one record
        connection.relay.abort()
        connection.client.lose()
        counters = connection.proxy.counters()
        assert (counters.open_total, counters.close_failure, counters.open_connections) == (1, 1, 0)
        return
    upstream = connection.connect_upstream()
    if ending == "both lost":
        connection.client.lose()
        upstream.lose()
    elif ending == "client lost twice":
        connection.client.lose(ConnectionResetError())
        connection.client.lose(ConnectionResetError())
        upstream.lose()
    elif ending == "abort then lost":
        connection.relay.abort()
        connection.client.lose()
        upstream.lose()
    else:
        connection.relay.abort()
        connection.relay.abort()
    counters = connection.proxy.counters()
    assert counters.open_total == 1 and counters.open_connections == 0
    assert counters.close_success + counters.close_failure == 1


def test_http_through_the_relay_is_accounted_once_the_labels_are_known(netns: NetNs) -> None:
    connection = Connection(netns)
    connection.client.send(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")  # early: before the path
    upstream = connection.connect_upstream()
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    connection.client.lose()
    upstream.lose()
    [(_, http)] = list(connection.proxy.telemetry.http_series())
    assert http.requests == 1 and sum(http.responses.values()) == 1


def test_an_opaque_connection_is_relayed_without_http_accounting(netns: NetNs) -> None:
    connection = Connection(netns)
    connection.relay.observer = None  # what a proxy does for a declared opaque port
    upstream = connection.connect_upstream()
    connection.client.send(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert list(connection.proxy.telemetry.http_series()) == []
    assert connection.proxy.counters().read_bytes == 29


def test_a_relay_in_which_nothing_moves_for_the_idle_timeout_is_reset(netns: NetNs) -> None:
    from agent.dataplane.relay import reap_idle

    busy, quiet = Connection(netns), Connection(netns)
    busy_up, quiet_up = busy.connect_upstream(), quiet.connect_upstream()
    start = quiet.relay.started

    def reap(now: float) -> int:  # each pod's live set, as the agent's sweep does
        return reap_idle(busy.pod.relays, 60.0, now) + reap_idle(quiet.pod.relays, 60.0, now)

    assert reap(start + 30) == 0  # seen: not idle yet
    busy.client.send(b"still here")  # a byte, whichever way, restarts its clock
    assert reap(start + 61) == 1  # the quiet one: 61 s without a byte
    assert quiet.client.reset and quiet_up.reset  # both sides reset, counted as failed
    assert quiet.proxy.counters().close_failure == 1 and not quiet.pod.relays
    assert not busy.client.reset and not busy_up.reset
    assert reap(start + 100) == 0  # busy moved at +61 (seen then)
    assert reap(start + 122) == 1
