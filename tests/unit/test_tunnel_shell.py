"""The tunnel's I/O shell over an in-memory wire: streams behave like TCP connections to the
relay (bytes in order, half-close, reset, backpressure), without TLS or sockets."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from agent.core.tunnel_frames import DEFAULT_CONNECTION_WINDOW, DEFAULT_WINDOW
from agent.dataplane.tunnel import StreamTransport, TunnelSession, handshake_failure_reason


class Wire:
    """One direction of a connection: writes arrive at the peer session on the next tick."""

    def __init__(self, peername: tuple[str, int]) -> None:
        self.peer: TunnelSession | None = None
        self.peername = peername
        self.closed = False
        self.written = 0
        self.writes = 0

    def write(self, data: bytes) -> None:
        assert self.peer is not None and not self.closed
        self.written += len(data)
        self.writes += 1
        asyncio.get_running_loop().call_soon(self._deliver, data)

    def _deliver(self, data: bytes) -> None:
        if self.peer is not None:  # written before a close still arrives, as with TCP
            self.peer.data_received(data)

    def is_closing(self) -> bool:
        return self.closed

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high = high

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            peer = self.peer
            if peer is not None:
                asyncio.get_running_loop().call_soon(peer.connection_lost, None)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peername if name == "peername" else default


class Recorder(asyncio.Protocol):
    """A relay side stand-in: records what the stream does to it."""

    def __init__(self) -> None:
        self.transport: StreamTransport | None = None
        self.data = bytearray()
        self.eof = False
        self.lost: list[Exception | None] = []
        self.write_pauses = 0
        self.write_resumes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.eof = True
        return True

    def pause_writing(self) -> None:
        self.write_pauses += 1

    def resume_writing(self) -> None:
        self.write_resumes += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)


class Pair:
    def __init__(self, refuse: bool = False) -> None:
        self.accepted: list[tuple[int, dict[str, str], Recorder]] = []
        self.refuse = refuse
        self.client = TunnelSession("client")
        self.server = TunnelSession("server", on_stream=self._on_stream)
        to_server, to_client = Wire(("10.42.1.7", 15008)), Wire(("10.42.0.5", 40000))
        to_server.peer, to_client.peer = self.server, self.client
        self.client.connection_made(to_server)  # type: ignore[arg-type]
        self.server.connection_made(to_client)  # type: ignore[arg-type]
        self.wires = (to_server, to_client)

    def _on_stream(self, session: TunnelSession, stream_id: int, port: int, metadata: dict[str, str]) -> None:
        if self.refuse:
            session.refuse(stream_id, 8)
            return
        recorder = Recorder()
        session.attach(stream_id, recorder)
        self.accepted.append((port, metadata, recorder))

    def open(self) -> Recorder:
        recorder = Recorder()
        self.client.open_stream(recorder, 8080, {"namespace": "shop", "pod": "web-1"})
        return recorder


def in_loop(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    @functools.wraps(test)
    def run() -> None:
        asyncio.run(test())

    return run


async def settle(rounds: int = 20) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


@in_loop
async def test_a_stream_carries_bytes_both_ways_and_half_closes_like_tcp() -> None:
    pair = Pair()
    client = pair.open()
    assert client.transport is not None
    client.transport.write(b"GET / HTTP/1.1\r\n\r\n")
    client.transport.write_eof()
    await settle()
    port, metadata, server = pair.accepted[0]
    assert (port, metadata) == (8080, {"namespace": "shop", "pod": "web-1"})
    assert server.transport is not None
    assert server.transport.get_extra_info("peername") == ("10.42.0.5", 40000)
    server.transport.resume_reading()  # the relay reads once its upstream is connected
    await settle()
    assert bytes(server.data) == b"GET / HTTP/1.1\r\n\r\n" and server.eof
    assert not client.eof  # only one direction is finished

    server.transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    server.transport.write_eof()
    await settle()
    assert bytes(client.data) == b"HTTP/1.1 200 OK\r\n\r\n" and client.eof
    client.transport.close()
    server.transport.close()
    await settle()
    assert client.lost == [None] and server.lost == [None]
    assert not pair.client.streams and not pair.server.streams


@in_loop
async def test_what_streams_send_in_one_loop_iteration_leaves_in_one_write() -> None:
    pair = Pair()
    await settle()  # the prefaces
    before = pair.wires[0].writes
    streams = [pair.open() for _ in range(3)]
    for stream in streams:
        assert stream.transport is not None
        stream.transport.write(b"GET / HTTP/1.1\r\n\r\n")
        stream.transport.write_eof()
    assert pair.wires[0].writes == before  # nothing yet: written at the end of the iteration
    await asyncio.sleep(0)
    assert pair.wires[0].writes == before + 1  # three SYNs, three requests, three FINs
    await settle()
    assert [(bytes(server.data), server.eof) for _, _, server in pair.accepted] == \
        [(b"GET / HTTP/1.1\r\n\r\n", True)] * 3


@in_loop
async def test_closing_a_session_writes_what_is_queued_before_the_tls_close() -> None:
    pair = Pair()
    await settle()
    client = pair.open()
    assert client.transport is not None
    client.transport.write(b"last words")
    pair.client.close()  # same iteration: the DATA and the GOAWAY still go out, then close
    assert pair.wires[0].closed
    await settle()
    port, _, server = pair.accepted[0]
    assert (port, bytes(server.data)) == (8080, b"last words")
    assert not pair.server.available  # the GOAWAY arrived


@in_loop
async def test_a_slow_reader_stalls_its_own_stream_only_and_loses_nothing() -> None:
    pair = Pair()
    slow, fast = pair.open(), pair.open()
    await settle()
    slow_server, fast_server = pair.accepted[0][2], pair.accepted[1][2]
    assert slow_server.transport is not None and fast_server.transport is not None
    slow_server.transport.resume_reading()
    fast_server.transport.resume_reading()
    slow_server.transport.pause_reading()  # its app stopped reading

    payload = bytes(range(256)) * 4096  # 1 MiB, four windows
    assert slow.transport is not None and fast.transport is not None
    for start in range(0, len(payload), 16384):
        slow.transport.write(payload[start:start + 16384])
    fast.transport.write(b"still flowing")
    await settle()
    assert slow.write_pauses == 1  # the relay was told to stop reading its client
    assert len(slow_server.data) == 0
    assert bytes(fast_server.data) == b"still flowing"
    assert pair.wires[0].written < DEFAULT_WINDOW + 64 * 1024  # at most a window in flight

    slow_server.transport.resume_reading()
    await settle(200)
    assert bytes(slow_server.data) == payload
    assert slow.write_resumes == 1


class Stalling(Recorder):
    """A relay whose app socket is full: it takes a chunk, then asks the stream to pause."""

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        assert self.transport is not None
        self.transport.pause_reading()


@in_loop
async def test_bytes_a_relay_still_holds_stay_unacknowledged_until_it_drains() -> None:
    # A peer filling many streams whose apps never read cannot make us hold more than the
    # connection window: what a relay buffered counts until its app socket drains.
    pair = Pair()
    pair.server.streams.clear()
    clients = [pair.open() for _ in range(8)]
    await settle()
    connection = pair.server.connection
    stalled = []
    for _, _, recorder in pair.accepted:
        stalling = Stalling()
        stream = recorder.transport
        assert stream is not None
        stream.protocol = stalling
        stalling.transport = stream
        stream.resume_reading()
        stalled.append(stalling)
    for client in clients:
        assert client.transport is not None
        client.transport.write(bytes(200 * 1024))  # within each stream's 256 KiB window
    await settle(100)
    # 1.6 MiB written, 1 MiB (the connection window) received and nothing credited back:
    # the rest waits at the sender, whose relays were told to stop reading
    assert connection.connection_receive_window == 0
    assert pair.client.connection.connection_send_window == 0
    assert sum(len(stalling.data) for stalling in stalled) < DEFAULT_CONNECTION_WINDOW
    assert sum(client.write_pauses for client in clients) >= 3
    for stalling in stalled:  # the apps drain: credit flows, every byte arrives
        stalling.__class__ = Recorder
    for _ in range(50):
        for stalling in stalled:
            assert stalling.transport is not None
            stalling.transport.resume_reading()
        await settle(20)
    assert [len(stalling.data) for stalling in stalled] == [200 * 1024] * 8


@in_loop
async def test_a_peer_that_does_not_read_pauses_every_stream_at_the_output_budget() -> None:
    pair = Pair()
    await settle()
    streams = [pair.open() for _ in range(16)]
    wire = pair.wires[0]
    before = wire.writes
    for stream in streams:  # one loop iteration: 16 x 64 KiB is more than OUTPUT_HIGH
        assert stream.transport is not None
        stream.transport.write(bytes(64 * 1024))
        if wire.writes > before:  # handed to the transport at once, not at the tick's end
            break
    assert wire.writes == before + 1 and pair.client.connection.queued_data == 0
    pair.client.pause_writing()  # the TLS transport is over its high-water mark
    assert all(stream.write_pauses == 1 for stream in streams)  # every relay stops reading
    late = streams[-1]
    assert late.transport is not None
    late.transport.write(b"read before the pause")  # a chunk already in flight waits
    written = wire.written
    await settle()
    assert wire.written == written
    pair.client.resume_writing()
    await settle()
    assert wire.written > written and all(stream.write_resumes == 1 for stream in streams)


@in_loop
async def test_a_reset_reaches_the_other_end_as_a_connection_reset() -> None:
    pair = Pair()
    client = pair.open()
    await settle()
    server = pair.accepted[0][2]
    assert client.transport is not None
    client.transport.abort()
    await settle()
    assert client.lost == [None]
    assert len(server.lost) == 1 and isinstance(server.lost[0], ConnectionResetError)
    assert "CANCEL" in str(server.lost[0])


@in_loop
async def test_a_refused_stream_resets_the_client_side() -> None:
    pair = Pair(refuse=True)
    client = pair.open()
    await settle()
    assert len(client.lost) == 1 and "CONNECT_ERROR" in str(client.lost[0])
    assert not pair.client.streams


@in_loop
async def test_losing_the_tls_connection_resets_every_stream_on_it() -> None:
    pair = Pair()
    first, second = pair.open(), pair.open()
    await settle()
    pair.wires[1].close()  # the server's side of the connection goes away
    await settle()
    for recorder in (first, second):
        assert len(recorder.lost) == 1 and isinstance(recorder.lost[0], ConnectionResetError)
    assert not pair.client.available


@in_loop
async def test_garbage_from_the_peer_ends_the_session_and_its_streams() -> None:
    pair = Pair()
    client = pair.open()
    await settle()
    pair.client.data_received(b"\x07" * 12)  # version 7: not our tunnel
    await settle()
    assert len(client.lost) == 1 and "protocol error" in str(client.lost[0])
    assert pair.wires[0].closed


@pytest.mark.parametrize(("error", "reason"), [
    (TimeoutError(), "timeout"),
    (ConnectionResetError(), "eof"),
])
def test_handshake_failures_have_bounded_reasons(error: BaseException, reason: str) -> None:
    assert handshake_failure_reason(error) == reason
