"""agent.dataplane._podio.PodTransport (csrc/podio.c): a connected TCP socket as an asyncio
transport, with asyncio's semantics where the relay relies on them — bytes both ways in
order, backpressure by the high-water mark, half-close both ways, close after the buffer is
out, abort and resets, errors as connection_lost(exc), a raising protocol reported — on
asyncio's own event loop and on uvloop's (the agent's). Real loopback TCP sockets."""

from __future__ import annotations

import asyncio
import gc
import socket
import types
import weakref
from collections.abc import Callable
from typing import Any

import pytest

from agent.dataplane._podio import PodTransport as POD_TRANSPORT
from agent.dataplane.sockets import arm_reset

LOOPS = ["asyncio", "uvloop"]


class Recorder(asyncio.Protocol):
    """What the transport told its protocol, in order."""

    def __init__(self, keep_open_on_eof: bool = True) -> None:
        self.transport: Any = None
        self.events: list[str] = []
        self.received = bytearray()
        self.keep_open_on_eof = keep_open_on_eof
        self.lost: list[BaseException | None] = []
        self.raise_on_data: BaseException | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.events.append("made")

    def data_received(self, data: bytes) -> None:
        if self.raise_on_data is not None:
            raise self.raise_on_data
        self.received += data

    def eof_received(self) -> bool:
        self.events.append("eof")
        return self.keep_open_on_eof

    def pause_writing(self) -> None:
        self.events.append("pause")

    def resume_writing(self) -> None:
        self.events.append("resume")

    def connection_lost(self, exc: BaseException | None) -> None:
        self.events.append("lost")
        self.lost.append(exc)


def run_on(kind: str, scenario: Callable[[], Any]) -> Any:
    if kind == "uvloop":
        import uvloop

        return uvloop.run(scenario())
    return asyncio.run(scenario())


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(ours: non-blocking, as PlainUpstream's; the peer's: blocking with a timeout)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ours = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        ours.connect_ex(listener.getsockname())
        peer, _ = listener.accept()
    peer.settimeout(5)
    return ours, peer


def made(sock: socket.socket, protocol: Recorder) -> Any:
    """As PlainUpstream._carry: made, connection_made, then reading."""
    transport = POD_TRANSPORT(asyncio.get_running_loop(), sock, protocol)
    protocol.connection_made(transport)
    transport.start()
    return transport


async def until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("timed out waiting")


def receive_all(peer: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = peer.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


@pytest.mark.parametrize("kind", LOOPS)
def test_bytes_flow_both_ways_in_order_and_the_socket_is_the_transports(kind: str) -> None:
    ours, peer = tcp_pair()

    async def scenario() -> None:
        protocol = Recorder()
        transport = made(ours, protocol)
        assert transport.get_extra_info("socket") is ours
        assert transport.get_extra_info("peername") == peer.getsockname()
        assert transport.get_extra_info("sockname") == peer.getpeername()
        assert transport.get_extra_info("nothing", "fallback") == "fallback"
        assert ours.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        for i in range(100):
            transport.write(b"%d," % i)
        transport.writelines([b"end", b"."])
        expected = b"".join(b"%d," % i for i in range(100)) + b"end."
        assert await asyncio.to_thread(receive_all, peer, len(expected)) == expected
        peer.sendall(b"answer")
        await until(lambda: bytes(protocol.received) == b"answer")
        transport.close()
        await until(lambda: protocol.lost == [None])
        assert ours.fileno() == -1  # closed after connection_lost
        assert peer.recv(10) == b""

    run_on(kind, scenario)
    peer.close()


@pytest.mark.parametrize("kind", LOOPS)
def test_a_peer_that_does_not_read_pauses_the_protocol_until_it_drains(kind: str) -> None:
    ours, peer = tcp_pair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    payload = bytes(range(256)) * 16384  # 4 MiB: far more than both socket buffers

    async def scenario() -> None:
        protocol = Recorder()
        transport = made(ours, protocol)
        transport.set_write_buffer_limits(high=0)  # as an inbound relay's: nothing kept
        transport.write(payload)
        assert protocol.events == ["made", "pause"] and transport.get_write_buffer_size() > 0
        got = await asyncio.to_thread(receive_all, peer, len(payload))
        assert got == payload
        await until(lambda: "resume" in protocol.events)
        assert transport.get_write_buffer_size() == 0
        transport.abort()
        await until(lambda: bool(protocol.lost))

    run_on(kind, scenario)
    peer.close()


@pytest.mark.parametrize("kind", LOOPS)
def test_write_eof_sends_the_fin_after_the_buffer_and_reading_goes_on(kind: str) -> None:
    ours, peer = tcp_pair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    payload = b"x" * (2 * 1024 * 1024)

    async def scenario() -> None:
        protocol = Recorder()
        transport = made(ours, protocol)
        transport.write(payload)
        transport.write_eof()
        assert transport.can_write_eof()
        with pytest.raises(RuntimeError):
            transport.write(b"after the FIN")
        got = await asyncio.to_thread(receive_all, peer, len(payload) + 1)
        assert got == payload  # then EOF: receive_all stopped at it
        peer.sendall(b"still reading")
        await until(lambda: bytes(protocol.received) == b"still reading")
        assert not transport.is_closing()
        peer.close()
        await until(lambda: "eof" in protocol.events)  # its FIN: both halves are done now
        assert not protocol.lost  # kept open (eof_received said so) until the relay closes it
        transport.close()
        await until(lambda: protocol.lost == [None])

    run_on(kind, scenario)


@pytest.mark.parametrize("kind", LOOPS)
@pytest.mark.parametrize("keep_open", [True, False])
def test_the_peers_fin_is_eof_received_whose_answer_says_whether_to_close(
        kind: str, keep_open: bool) -> None:
    ours, peer = tcp_pair()

    async def scenario() -> None:
        protocol = Recorder(keep_open_on_eof=keep_open)
        transport = made(ours, protocol)
        peer.shutdown(socket.SHUT_WR)
        await until(lambda: "eof" in protocol.events)
        if keep_open:
            assert not transport.is_closing()
            transport.write(b"after your FIN")
            assert await asyncio.to_thread(receive_all, peer, 14) == b"after your FIN"
            transport.close()
        await until(lambda: protocol.lost == [None])
        assert protocol.events[-1] == "lost" and protocol.events.count("lost") == 1

    run_on(kind, scenario)
    peer.close()


@pytest.mark.parametrize("kind", LOOPS)
def test_close_sends_what_is_buffered_first(kind: str) -> None:
    ours, peer = tcp_pair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    payload = b"y" * (2 * 1024 * 1024)

    async def scenario() -> None:
        protocol = Recorder()
        transport = made(ours, protocol)
        transport.write(payload)
        transport.close()
        assert transport.is_closing() and not protocol.lost
        transport.write(b"dropped: closing")  # as asyncio's: ignored once closing
        got = await asyncio.to_thread(receive_all, peer, len(payload) + 100)
        assert got == payload
        await until(lambda: protocol.lost == [None])

    run_on(kind, scenario)
    peer.close()


@pytest.mark.parametrize("kind", LOOPS)
def test_an_armed_abort_resets_the_peer(kind: str) -> None:
    ours, peer = tcp_pair()

    async def scenario() -> None:
        protocol = Recorder()
        transport = made(ours, protocol)
        arm_reset(transport.get_extra_info("socket"))  # as Relay.reset does
        transport.write(b"buffered?")
        transport.abort()
        await until(lambda: protocol.lost == [None])

    run_on(kind, scenario)
    with pytest.raises(ConnectionResetError):
        while peer.recv(100):
            pass
    peer.close()


@pytest.mark.parametrize("kind", LOOPS)
def test_a_reset_by_the_peer_is_connection_lost_with_its_errno(kind: str) -> None:
    ours, peer = tcp_pair()

    async def scenario() -> BaseException | None:
        protocol = Recorder()
        made(ours, protocol)
        arm_reset(peer)
        peer.close()
        await until(lambda: bool(protocol.lost))
        return protocol.lost[0]

    exc = run_on(kind, scenario)
    assert isinstance(exc, ConnectionResetError) and exc.errno == 104


@pytest.mark.parametrize("kind", LOOPS)
def test_a_protocol_that_raises_is_reported_and_the_connection_ends(kind: str) -> None:
    ours, peer = tcp_pair()

    async def scenario() -> tuple[list[dict[str, Any]], list[BaseException | None]]:
        reported: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: reported.append(context))
        protocol = Recorder()
        protocol.raise_on_data = ValueError("a bug")
        made(ours, protocol)
        peer.sendall(b"boom")
        await until(lambda: bool(protocol.lost))
        return reported, protocol.lost

    reported, lost = run_on(kind, scenario)
    assert [type(c["exception"]) for c in reported] == [ValueError]
    assert "data_received" in reported[0]["message"]
    assert isinstance(lost[0], ValueError)
    assert peer.recv(10) == b""
    peer.close()


@pytest.mark.parametrize("kind", LOOPS)
def test_paused_reading_delivers_nothing_until_resumed(kind: str) -> None:
    ours, peer = tcp_pair()

    async def scenario() -> None:
        protocol = Recorder()
        transport = made(ours, protocol)
        transport.pause_reading()
        assert not transport.is_reading()
        peer.sendall(b"held by the kernel")
        await asyncio.sleep(0.05)
        assert protocol.received == b""
        transport.resume_reading()
        assert transport.is_reading()
        await until(lambda: bytes(protocol.received) == b"held by the kernel")
        transport.abort()
        await until(lambda: bool(protocol.lost))

    run_on(kind, scenario)
    peer.close()


@pytest.mark.parametrize("kind", LOOPS)
def test_once_lost_the_transport_lets_go_of_its_protocol_without_the_collector(kind: str) -> None:
    ours, peer = tcp_pair()

    async def scenario() -> weakref.ref[Recorder]:
        protocol = Recorder()
        transport = made(ours, protocol)
        transport.close()
        await until(lambda: bool(protocol.lost))
        # what it still holds: the loop and the (closed) socket, not its own bound callbacks
        # (transport -> method -> transport) nor the protocol (protocol -> transport -> ...)
        held = gc.get_referents(transport)
        assert protocol not in held and ours in held
        assert not [r for r in held if isinstance(r, types.BuiltinMethodType)]
        protocol.transport = None  # the relay's side drops its transport with it
        return weakref.ref(protocol)

    gc.disable()
    try:
        gone = run_on(kind, scenario)
        assert gone() is None  # freed by reference counts: no cycle was left
    finally:
        gc.enable()
    peer.close()
