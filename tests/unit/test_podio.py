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
            transport.pause_reading()  # as the relay, when the other side's writes back up
            transport.resume_reading()
            await asyncio.sleep(0.05)
            assert protocol.events.count("eof") == 1  # the FIN is told once
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


# ---------------------------------------------------------------- PodAcceptor / PodServer


def serve(factory: Callable[[], asyncio.Protocol]) -> tuple[Any, tuple[str, int]]:
    from agent.dataplane.listening import PodServer

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    address = listener.getsockname()
    return PodServer(asyncio.get_running_loop(), listener, factory), address


@pytest.mark.parametrize("kind", LOOPS)
def test_accepted_connections_are_pod_transports_told_at_once(kind: str) -> None:
    made: list[Recorder] = []

    def factory() -> Recorder:
        protocol = Recorder()
        made.append(protocol)
        return protocol

    async def scenario() -> None:
        server, address = serve(factory)
        assert server.is_serving() and server.sockets[0].getsockname() == address
        clients = []
        for _ in range(70):  # more than one readiness callback accepts (32)
            client = socket.create_connection(address)
            client.settimeout(5)
            clients.append(client)
        await until(lambda: len(made) == 70)
        assert all(p.events[:1] == ["made"] for p in made)
        assert {type(p.transport).__name__ for p in made} == {"PodTransport"}
        for index, client in enumerate(clients):
            client.sendall(b"%d" % index)
        await until(lambda: sorted(bytes(p.received) for p in made)
                    == sorted(b"%d" % i for i in range(70)))
        for protocol in made:
            protocol.transport.write(b"back:" + bytes(protocol.received))
            protocol.transport.close()
        for index, client in enumerate(clients):
            assert await asyncio.to_thread(receive_all, client, 100) == b"back:%d" % index
            client.close()
        await until(lambda: all(p.lost == [None] for p in made))
        server.close()
        assert not server.is_serving() and not server.sockets
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(address, timeout=2)

    run_on(kind, scenario)


@pytest.mark.parametrize("kind", LOOPS)
def test_a_factory_that_raises_is_reported_and_that_connection_closed(kind: str) -> None:
    calls = []

    def factory() -> Recorder:
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("the first one fails")
        return Recorder()

    async def scenario() -> list[dict[str, Any]]:
        reported: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: reported.append(context))
        server, address = serve(factory)
        first = socket.create_connection(address)
        first.settimeout(5)
        await until(lambda: len(calls) == 1)
        assert await asyncio.to_thread(first.recv, 10) == b""  # closed, not left hanging
        second = socket.create_connection(address)
        await until(lambda: len(calls) == 2)  # still serving
        assert server.is_serving()
        second.close()
        first.close()
        server.close()
        return reported

    reported = run_on(kind, scenario)
    assert [type(c["exception"]) for c in reported] == [ValueError]
    assert "factory" in reported[0]["message"]


def test_without_the_c_module_a_listener_is_the_event_loops_server(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.dataplane import listening

    monkeypatch.setattr(listening, "POD_ACCEPTOR", None)
    made: list[Recorder] = []

    async def scenario() -> str:
        listener = socket.create_server(("127.0.0.1", 0))
        server = await listening.serve_pod(lambda: made.append(Recorder()) or made[-1], listener)
        client = socket.create_connection(listener.getsockname())
        await until(lambda: bool(made) and made[0].events[:1] == ["made"])
        client.close()
        server.close()
        return type(server).__name__

    assert run_on("asyncio", scenario) == "Server"


_OUT_OF_DESCRIPTORS = """
import asyncio, os, resource, socket, sys
from agent.dataplane import listening
listening.ACCEPT_RETRY_DELAY = 0.3

async def main():
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []
    class Echo(asyncio.Protocol):
        def connection_made(self, transport):
            accepted.append(transport)
            transport.write(b"served")
            transport.close()
    server = listening.PodServer(asyncio.get_running_loop(), listener, Echo)
    client = socket.create_connection(listener.getsockname())  # waits in the backlog
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest, hard))  # no descriptor left to accept
    await asyncio.sleep(0.2)
    print("refused while out:", len(accepted), server.is_serving(), flush=True)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    for _ in range(200):
        if accepted:
            break
        await asyncio.sleep(0.01)
    client.settimeout(2)
    print("served after:", len(accepted), client.recv(10).decode(), flush=True)
    server.close()

asyncio.run(main())
"""


def test_out_of_descriptors_accepting_stops_and_starts_again_later() -> None:
    """accept4 fails with EMFILE: logged, accepting stops (no busy loop on a listener that
    stays readable), and starts again after ACCEPT_RETRY_DELAY; the connection that waited
    in the backlog is then served. In a child process: its descriptor limit is lowered."""
    import subprocess
    import sys
    from pathlib import Path

    run = subprocess.run([sys.executable, "-c", _OUT_OF_DESCRIPTORS], capture_output=True,
                         text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert lines == ["refused while out: 0 True", "served after: 1 served"], run.stdout
    assert run.stderr.count("Too many open files") == 1, run.stderr  # once, not in a loop
