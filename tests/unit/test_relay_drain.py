"""A draining agent (SIGTERM) ends each relay at its next clean point: an HTTP/1 connection
right after the response in flight, or at once between requests, with a graceful close
both ways; HTTP/2 and opaque connections have no such point and are left running. And an
HTTP/1 server's FIN between messages closes the client's connection whole; an HTTP/1
client's FIN between messages closes the pod's socket to its app with RST (no TIME_WAIT
charged to the agent)."""

from __future__ import annotations

import socket
from typing import Any

from agent.dataplane.netns import NetNs
from tests.unit.test_relay import Connection, Pipe

REQUEST = b"GET /a HTTP/1.1\r\nHost: web\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


def test_draining_between_requests_closes_at_once(netns: NetNs) -> None:
    connection = Connection(netns)
    upstream = connection.connect_upstream()
    connection.client.send(REQUEST)
    upstream.send(RESPONSE)
    assert not connection.relay.mid_request()
    connection.relay.drain()
    assert connection.client.closed and upstream.closed
    assert not connection.client.reset and not upstream.reset
    assert bytes(connection.client.received) == RESPONSE


def test_draining_mid_request_closes_right_after_the_response(netns: NetNs) -> None:
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


def test_draining_a_connection_not_read_yet_waits_for_its_request(netns: NetNs) -> None:
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


def test_draining_leaves_opaque_and_http2_connections_running(netns: NetNs) -> None:
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


def test_an_http1_servers_fin_between_messages_closes_the_client_whole(netns: NetNs) -> None:
    connection = Connection(netns)
    upstream = connection.connect_upstream()
    connection.client.send(REQUEST)
    upstream.send(RESPONSE)
    upstream.send_fin()
    assert connection.client.closed and not connection.client.eof_sent  # closed, not half


def test_a_fin_mid_response_is_still_only_a_half_close(netns: NetNs) -> None:
    connection = Connection(netns)
    upstream = connection.connect_upstream()
    connection.client.send(REQUEST)
    upstream.send(b"HTTP/1.1 200 OK\r\n\r\nbody until the close")
    upstream.send_fin()
    assert connection.client.eof_sent and not connection.client.closed


class _Socket:
    """What uvloop's transport gives as its "socket": records the options set."""

    def __init__(self) -> None:
        self.options: list[tuple[int, int, bytes]] = []

    def setsockopt(self, level: int, option: int, value: bytes) -> None:
        self.options.append((level, option, value))


class SocketPipe(Pipe):
    """A pipe over a real TCP socket's transport (one a linger can be set on)."""

    sock: _Socket

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.sock if name == "socket" else default


def _over_a_socket(connection: Connection) -> SocketPipe:
    connection.relay.open_record(connection.relay.peer_labels)
    upstream = connection.upstream = SocketPipe(connection.relay.upstream)
    upstream.sock = _Socket()
    connection.relay.upstream.connection_made(upstream)  # type: ignore[arg-type]
    connection.client.resume_reading()
    return upstream


def test_an_http1_clients_fin_between_messages_resets_the_idle_app_socket(netns: NetNs) -> None:
    """The client asked nothing more: the agent closes its socket to the pod's app with RST
    rather than FIN, so that socket does not sit in TIME_WAIT for 60 s (kernel memory
    charged to the agent's cgroup, per connection); the close is still counted a success."""
    connection = Connection(netns, direction="inbound")
    upstream = _over_a_socket(connection)
    connection.client.send(REQUEST)
    upstream.send(RESPONSE)
    connection.client.send_fin()
    linger = [value for level, option, value in upstream.sock.options
              if (level, option) == (socket.SOL_SOCKET, socket.SO_LINGER)]
    assert linger and linger[-1][:4] == (1).to_bytes(4, "little")  # l_onoff 1, l_linger 0
    assert upstream.reset and not upstream.eof_sent
    assert connection.client.closed and not connection.client.reset
    assert bytes(connection.client.received) == RESPONSE
    connection.client.lose()
    upstream.lose()
    counters = connection.proxy.counters()
    assert (counters.close_success, counters.close_failure) == (1, 0)


def test_an_http1_clients_fin_mid_request_is_passed_on_as_a_fin(netns: NetNs) -> None:
    """A request sent, then the client's FIN (allowed in HTTP/1.1): the response is owed."""
    connection = Connection(netns, direction="inbound")
    upstream = _over_a_socket(connection)
    connection.client.send(REQUEST)
    connection.client.send_fin()
    assert upstream.eof_sent and not upstream.reset and not upstream.sock.options
    upstream.send(RESPONSE)
    assert bytes(connection.client.received) == RESPONSE


def test_an_outbound_clients_fin_stays_a_fin(netns: NetNs) -> None:
    """Outbound, the upstream is a tunnel stream or a socket to another pod, maybe another
    agent's listener (which would count an RST as a failure): the FIN travels, and the
    agent at the other end applies the rule to its own socket to the app."""
    connection = Connection(netns)
    upstream = _over_a_socket(connection)
    connection.client.send(REQUEST)
    upstream.send(RESPONSE)
    connection.client.send_fin()
    assert not upstream.reset and not upstream.sock.options
    assert upstream.eof_sent or upstream.closed


def test_an_opaque_clients_fin_stays_a_half_close(netns: NetNs) -> None:
    connection = Connection(netns, direction="inbound")
    upstream = _over_a_socket(connection)
    connection.client.send(b"\x16\x03\x01 not http at all")
    connection.client.send_fin()
    assert upstream.eof_sent and not upstream.reset and not upstream.closed
