"""A client stream the server never accepted never reached the destination: refused after
the server's GOAWAY (it is going away) or cut off with its connection before the ACK, the
bytes sent on it are handed to `on_refused` to be carried to another connection, instead
of a reset. Once accepted, a stream is never moved (its bytes may have been delivered)."""

from __future__ import annotations

from agent.dataplane.tunnel import REPLAY_LIMIT
from tests.unit.test_tunnel_shell import Pair, in_loop, settle


@in_loop
async def test_a_stream_refused_by_a_server_going_away_is_handed_over_with_its_bytes() -> None:
    pair = Pair()
    await settle()
    pair.server.go_away()  # the server's agent drains: no new streams
    moved: list[list[bytes]] = []
    client = pair.open()  # opened before the GOAWAY arrived
    assert client.transport is not None
    client.transport.on_refused = lambda sent: moved.append(sent) or True
    client.transport.write(b"GET / HTTP/1.1\r\n")
    client.transport.write(b"Host: web\r\n\r\n")
    await settle()
    assert moved == [[b"GET / HTTP/1.1\r\n", b"Host: web\r\n\r\n"]]
    assert client.lost == []  # the relay never saw a reset
    assert not pair.accepted  # the server took nothing


@in_loop
async def test_without_a_taker_a_refused_stream_is_reset_as_before() -> None:
    pair = Pair()
    await settle()
    pair.server.go_away()
    client = pair.open()
    assert client.transport is not None
    client.transport.on_refused = lambda sent: False  # e.g. moved too often already
    client.transport.write(b"GET / HTTP/1.1\r\n\r\n")
    await settle()
    assert len(client.lost) == 1 and isinstance(client.lost[0], ConnectionResetError)


@in_loop
async def test_a_connection_lost_before_the_ack_hands_the_stream_over() -> None:
    pair = Pair()
    client = pair.open()
    assert client.transport is not None
    moved: list[list[bytes]] = []
    client.transport.on_refused = lambda sent: moved.append(sent) or True
    client.transport.write(b"GET / HTTP/1.1\r\n\r\n")
    pair.client.connection_lost(ConnectionResetError("the server's agent was killed"))
    assert moved == [[b"GET / HTTP/1.1\r\n\r\n"]] and client.lost == []


@in_loop
async def test_an_accepted_stream_is_never_moved() -> None:
    pair = Pair()
    client = pair.open()
    assert client.transport is not None
    moved: list[list[bytes]] = []
    client.transport.on_refused = lambda sent: moved.append(sent) or True
    client.transport.write(b"GET / HTTP/1.1\r\n\r\n")
    await settle()
    _, _, server = pair.accepted[0]
    assert server.transport is not None
    server.transport.resume_reading()  # upstream connected: ACK
    await settle()
    assert client.transport.replay is None
    pair.client.connection_lost(ConnectionResetError("cut"))
    assert moved == [] and len(client.lost) == 1


@in_loop
async def test_a_stream_that_sent_too_much_to_keep_is_not_moved() -> None:
    pair = Pair()
    await settle()
    pair.server.go_away()
    client = pair.open()
    assert client.transport is not None
    moved: list[list[bytes]] = []
    client.transport.on_refused = lambda sent: moved.append(sent) or True
    client.transport.write(b"x" * (REPLAY_LIMIT + 1))
    await settle()
    assert moved == [] and len(client.lost) == 1


@in_loop
async def test_going_away_closes_an_idle_session_and_lets_open_streams_finish() -> None:
    idle = Pair()
    await settle()
    idle.server.go_away()
    await settle()
    assert idle.wires[1].closed and idle.wires[0].closed

    busy = Pair()
    client = busy.open()
    assert client.transport is not None
    client.transport.write(b"GET / HTTP/1.1\r\n\r\n")
    await settle()
    _, _, server = busy.accepted[0]
    assert server.transport is not None
    server.transport.resume_reading()
    busy.server.go_away()
    await settle()
    assert not busy.client.available  # no new streams here
    server.transport.write(b"HTTP/1.1 200 OK\r\n\r\n")  # the open one runs to completion
    await settle()
    assert bytes(client.data) == b"HTTP/1.1 200 OK\r\n\r\n"
    client.transport.close()
    server.transport.close()
    await settle()
    assert busy.wires[1].closed  # nothing left: the session closed itself


@in_loop
async def test_a_window_that_opens_for_a_stream_just_reset_is_ignored() -> None:
    """An abort resets the stream at once but tells the relay on the next tick; a window
    update in between used to send on the closed stream, and the LocalProtocolError took
    the whole TLS connection (every stream on it) down (seen under bench/overload.py)."""
    pair = Pair()
    await settle()
    client = pair.open()
    assert client.transport is not None
    client.transport.write(b"x" * (600 * 1024))  # more than the peer's window: some waits
    assert client.transport._pending
    client.transport.abort()
    client.transport.window_opened()  # must not raise
    await settle()
    assert len(client.lost) == 1 and not pair.client.connection.terminated
