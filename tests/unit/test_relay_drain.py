"""A draining agent (SIGTERM) ends each relay at its next clean point: an HTTP/1 connection
right after the response in flight, or at once between requests, with a graceful close
both ways; HTTP/2 and opaque connections have no such point and are left running. And an
HTTP/1 server's FIN between messages closes the client's connection whole."""

from __future__ import annotations

from agent.dataplane.netns import NetNs
from tests.unit.test_relay import Connection, netns  # noqa: F401 - the fixture

REQUEST = b"GET /a HTTP/1.1\r\nHost: web\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


def test_draining_between_requests_closes_at_once(netns: NetNs) -> None:  # noqa: F811
    connection = Connection(netns)
    upstream = connection.connect_upstream()
    connection.client.send(REQUEST)
    upstream.send(RESPONSE)
    assert not connection.relay.mid_request()
    connection.relay.drain()
    assert connection.client.closed and upstream.closed
    assert not connection.client.reset and not upstream.reset
    assert bytes(connection.client.received) == RESPONSE


def test_draining_mid_request_closes_right_after_the_response(netns: NetNs) -> None:  # noqa: F811
    connection = Connection(netns)
    upstream = connection.connect_upstream()
    connection.client.send(REQUEST)
    assert connection.relay.mid_request()
    connection.relay.drain()
    assert not connection.client.closed and not upstream.closed  # the response is owed
    upstream.send(RESPONSE[:20])
    assert not connection.client.closed  # only part of it
    upstream.send(RESPONSE[20:])
    assert connection.client.closed and upstream.closed and not connection.client.reset
    assert bytes(connection.client.received) == RESPONSE
    connection.client.lose()
    upstream.lose()
    counters = connection.proxy.counters()
    assert (counters.close_success, counters.close_failure) == (1, 0)


def test_draining_a_connection_not_read_yet_waits_for_its_request(netns: NetNs) -> None:  # noqa: F811
    """Accepted just before the drain: its request may be in the kernel, unread (the client
    side is not read until the upstream is connected). Closing it would lose that request."""
    connection = Connection(netns)
    upstream = connection.connect_upstream()
    connection.relay.drain()
    assert not connection.client.closed and not upstream.closed
    connection.client.send(REQUEST)
    upstream.send(RESPONSE)  # then it ends after its response, as any HTTP/1 connection
    assert connection.client.closed and upstream.closed
    assert bytes(connection.client.received) == RESPONSE


def test_draining_leaves_opaque_and_http2_connections_running(netns: NetNs) -> None:  # noqa: F811
    opaque = Connection(netns)
    upstream = opaque.connect_upstream()
    opaque.client.send(b"\x16\x03\x01 not http at all")
    opaque.relay.drain()
    assert not opaque.client.closed and not upstream.closed
    assert not opaque.relay.mid_request()  # quiet ones may be reset when the drain ends

    h2 = Connection(netns)
    upstream2 = h2.connect_upstream()
    h2.client.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    h2.relay.drain()
    assert not h2.client.closed and not upstream2.closed


def test_an_http1_servers_fin_between_messages_closes_the_client_whole(netns: NetNs) -> None:  # noqa: F811
    connection = Connection(netns)
    upstream = connection.connect_upstream()
    connection.client.send(REQUEST)
    upstream.send(RESPONSE)
    upstream.send_fin()
    assert connection.client.closed and not connection.client.eof_sent  # closed, not half


def test_a_fin_mid_response_is_still_only_a_half_close(netns: NetNs) -> None:  # noqa: F811
    connection = Connection(netns)
    upstream = connection.connect_upstream()
    connection.client.send(REQUEST)
    upstream.send(b"HTTP/1.1 200 OK\r\n\r\nbody until the close")
    upstream.send_fin()
    assert connection.client.eof_sent and not connection.client.closed
