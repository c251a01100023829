"""Senders (issue #16, the engine's send side): once a tunnel stream is in steady state, the
session hands its `Sender` (agent.dataplane._tlsio) credit out of the stream's and the
connection's send windows, and the relay's writes become DATA frames in C, sealed with every
other sender's at the end of the loop iteration. Checked here: relays over two real sessions
engage senders on both ends and send, count and credit exactly as the session's own path
does; whatever the writes, their sizes, the windows and the session's own frames in between,
every byte arrives once, in order, before the stream's FIN, and no window is ever exceeded
(the peer's Connection checks); credit an idle sender holds comes back when another stream
needs the connection's window; a peer that stops reading pauses the pod with bounded memory;
the Connection's grant rules; the Sender's fallback."""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.core import tunnel as core
from agent.core.tunnel_frames import DATA, SYN, WINDOW_UPDATE, encode_open_header
from agent.dataplane import tunnel as tunnel_shell
from agent.dataplane.netns import NetNs
from agent.dataplane.tunnel import OUTPUT_HIGH, StreamTransport, TunnelSession
from tests.unit.test_tunnel_lanes import REQUEST, Mesh, frame, until
from tests.unit.test_tunnel_tls import _c_transport, tlsio_class

OPAQUE = b"\x16\x03\x01 not http"  # the first bytes of a stream nothing observes


@pytest.fixture(autouse=True)
def c_records(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("agent.dataplane.tls.TLS_TRANSPORT", _c_transport())


def streams_of(session: TunnelSession | None) -> list[StreamTransport]:
    assert session is not None
    return list(session.streams.values())


async def closed(mesh: Mesh) -> None:
    assert mesh.client is not None
    mesh.client.close()
    await until(lambda: mesh.server is not None and mesh.server.transport is not None
                and mesh.server.transport.is_closing())


# ------------------------------------------------------------ relays over real sessions

def test_relays_over_sessions_engage_senders_and_count_as_the_session_does(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext], netns: NetNs,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """40 keep-alive requests: after the first ones each request leaves the client's agent and
    each response the server's through a sender; the metrics, and every window of both
    connections once the senders' credit is back, come out as with senders turned off."""

    async def run(senders: bool) -> tuple[list[str], tuple[int, ...], list[int]]:
        monkeypatch.setattr(tunnel_shell, "SENDERS", senders)
        mesh = Mesh(netns)
        await mesh.start(contexts)
        await mesh.exchange(40)
        frames = []
        for session in (mesh.client, mesh.server):
            [stream] = streams_of(session)
            assert session is not None and session.senders is senders
            if senders:
                assert stream.sender is not None and stream.sender.active
                frames.append(stream.sender.frames)
            else:
                assert stream.sender is None
        for session in (mesh.client, mesh.server):
            assert session is not None
            session.take_credit_back()
            assert session.connection.granted == 0
        scrape, windows = mesh.scrape(), mesh.windows()
        await closed(mesh)
        return scrape, windows, frames

    framed, windows, frames = uvloop.run(run(True))
    assert min(frames) >= 38  # every request and every response after the first two
    plain, plain_windows, _ = uvloop.run(run(False))
    assert framed == plain and windows == plain_windows
    assert sum(line.startswith("request_total") and line.endswith(" 40.0") for line in framed) == 2


steps = st.lists(st.one_of(
    st.tuples(st.just("up"), st.integers(1, 300_000)),     # the client pod writes
    st.tuples(st.just("down"), st.integers(1, 300_000)),   # the server pod writes
    st.tuples(st.just("queued"), st.sampled_from(["client", "server"])),  # the session's frames
    st.tuples(st.just("turn"), st.just(0)),                # the loop runs once
), min_size=1, max_size=12)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=steps, small=st.booleans())
def test_any_writes_arrive_whole_in_order_before_the_fin_within_the_windows(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext], netns: NetNs,
        plan: list[tuple[str, Any]], small: bool) -> None:
    """Writes of any size both ways (beyond the credit, beyond the windows: the rest waits),
    the session queueing frames of its own just before a sender's write (a PING: the sender
    hands the write to the session, after them), the loop turning or not in between: each
    pod gets every byte once and in order, the FIN after the last (a Pipe refuses a write
    after its FIN), and the peers' Connections never saw a window exceeded (they would have
    failed the connection)."""

    async def run() -> None:
        windows = (64 * 1024, 64 * 1024) if small else (256 * 1024, 1024 * 1024)
        mesh = Mesh(netns, upstream_high=1 << 30, initial_window=windows[0],
                    connection_window=windows[1])
        await mesh.start(contexts)
        assert mesh.client is not None and mesh.server is not None
        mesh.pod.high = 1 << 30
        up, down = bytearray(OPAQUE), bytearray()
        mesh.pod.send(OPAQUE)
        await until(lambda: mesh.upstream is not None and len(mesh.upstream.received) == len(up))
        upstream = mesh.upstream
        assert upstream is not None
        for index, (kind, value) in enumerate(plan):
            if kind == "up":
                chunk = bytes([index % 251]) * value
                up += chunk
                mesh.pod.send(chunk)
            elif kind == "down":
                chunk = bytes([(index + 101) % 251]) * value
                down += chunk
                upstream.send(chunk)
            elif kind == "queued":
                session = mesh.client if value == "client" else mesh.server
                session.connection.ping()
                session.flush()
            else:
                await asyncio.sleep(0)
        mesh.pod.send_fin()  # the client's FIN reaches the server pod after every byte
        await until(lambda: upstream.eof_sent, seconds=20)
        assert bytes(upstream.received) == bytes(up)
        upstream.send_fin()  # and the server's: the relays close both ends
        await until(lambda: mesh.pod.closed, seconds=20)
        assert bytes(mesh.pod.received) == bytes(down) and not mesh.pod.reset
        for session in (mesh.client, mesh.server):
            assert not session.connection.terminated
            assert session.connection.granted == 0  # a stream that sent its FIN holds none
        await closed(mesh)

    uvloop.run(run())


def test_an_idle_senders_credit_comes_back_when_another_stream_needs_the_window(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext], netns: NetNs) -> None:
    """A 64 KiB connection window: five keep-alive streams each send a request and keep their
    senders' credit (most of the window); a sixth sends 200 KiB. Its write comes up short, the
    idle senders give their credit back, and every byte arrives (the peer only credits the
    connection back once half its window was consumed: held credit would stall the stream)."""

    async def run() -> None:
        mesh = Mesh(netns, upstream_high=1 << 30, initial_window=64 * 1024,
                    connection_window=64 * 1024)
        await mesh.start(contexts)
        assert mesh.client is not None
        pods = [mesh.pod] + [mesh.open()[1] for _ in range(5)]
        for each in (len(OPAQUE), 2 * len(OPAQUE)):  # the second write goes through a sender
            for pod in pods[:5]:
                pod.send(OPAQUE)
            await until(lambda each=each: len(mesh.upstreams) == 6 and all(
                len(upstream.received) == each for upstream in mesh.upstreams[:5]))
        senders = [stream.sender for stream in streams_of(mesh.client)[:5]]
        assert all(sender is not None and sender.active for sender in senders)
        held = mesh.client.connection.granted
        assert held > 32 * 1024  # more than the sixth stream could do without
        body = bytes(range(256)) * 800  # 200 KiB
        pods[5].send(body)
        await until(lambda: len(mesh.upstreams[5].received) == len(body), seconds=10)
        assert bytes(mesh.upstreams[5].received) == body
        await closed(mesh)

    uvloop.run(run())


def test_a_peer_that_stops_reading_pauses_the_pod_with_bounded_memory(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext], netns: NetNs) -> None:
    """The server's agent stops reading its tunnel socket while the client pod writes 4 MiB:
    the sender's credit runs out, the stream holds what the windows do not take, the relay
    stops reading the pod; what this agent holds stays within the windows and the TLS
    connection's buffer. Once the peer reads again every byte arrives."""

    async def run() -> None:
        mesh = Mesh(netns, upstream_high=1 << 30)
        await mesh.start(contexts)
        assert mesh.client is not None and mesh.server is not None
        mesh.pod.send(OPAQUE)
        await until(lambda: mesh.upstream is not None and len(mesh.upstream.received) == len(OPAQUE))
        assert mesh.upstream is not None and mesh.server.transport is not None
        mesh.server.transport.pause_reading()
        [stream] = streams_of(mesh.client)
        chunk = bytes(range(256)) * 256  # 64 KiB
        sent = 0
        for _ in range(64):
            if mesh.pod.reading:  # as the event loop: no reads while the relay paused it
                mesh.pod.send(chunk)
                sent += len(chunk)
            await asyncio.sleep(0.001)
        assert not mesh.pod.reading and sent < 4 * 1024 * 1024
        transport = mesh.client.transport
        assert transport is not None
        held = transport.get_write_buffer_size() + stream._pending_size
        assert held <= 2 * OUTPUT_HIGH + len(chunk)
        assert stream.sender is not None and stream.sender.credit == 0
        mesh.server.transport.resume_reading()
        async with asyncio.timeout(20):
            while sent < 4 * 1024 * 1024:
                if mesh.pod.reading:
                    mesh.pod.send(chunk)
                    sent += len(chunk)
                await asyncio.sleep(0.001)
        await until(lambda: len(mesh.upstream.received) == len(OPAQUE) + sent, seconds=20)
        assert bytes(mesh.upstream.received[len(OPAQUE):]) == chunk * 64
        await closed(mesh)

    uvloop.run(run())


def test_a_request_after_the_senders_stream_is_reset_is_not_sent(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext], netns: NetNs) -> None:
    """The server pod resets its connection: the stream is reset, the client's sender is taken
    off with its credit given back, and a write that comes after goes nowhere."""

    async def run() -> None:
        mesh = Mesh(netns)
        await mesh.start(contexts)
        assert mesh.client is not None and mesh.server is not None
        await mesh.exchange(3)
        [stream] = streams_of(mesh.client)
        sender = stream.sender
        assert sender is not None and sender.active
        assert mesh.upstream is not None
        mesh.upstream.lose(ConnectionResetError("reset by the app"))
        await until(lambda: not mesh.client.streams)
        assert not sender.active and sender.credit == 0
        assert mesh.client.connection.granted == 0
        sender.write(REQUEST)  # the relay's last chunk, after the reset: dropped
        assert sender.frames >= 2 and mesh.client.connection.granted == 0
        await closed(mesh)

    uvloop.run(run())


def test_a_write_alone_leaves_at_once_and_a_burst_in_one_batch(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext], netns: NetNs) -> None:
    """A sender's write that follows no other within `burst_gap` is sealed and sent at once (a
    paced request waits for nothing); writes in a burst wait for the end of the loop
    iteration and leave together."""

    async def run() -> None:
        mesh = Mesh(netns)
        await mesh.start(contexts)
        assert mesh.client is not None
        await mesh.exchange(2)
        transport: Any = mesh.client.transport
        [stream] = streams_of(mesh.client)
        assert stream.sender is not None and stream.sender.active
        asked = len(mesh.upstream.received) if mesh.upstream else 0
        transport.burst_gap = 0.0  # every write alone
        mesh.pod.send(REQUEST)
        assert transport.get_write_buffer_size() == 0  # sealed and sent already
        transport.burst_gap = 3600.0  # every write in a burst
        mesh.pod.send(REQUEST)
        mesh.pod.send(REQUEST)
        assert transport.get_write_buffer_size() >= 2 * len(REQUEST)  # waiting, together
        frames = stream.sender.frames
        await asyncio.sleep(0)
        assert transport.get_write_buffer_size() == 0 and stream.sender.frames == frames
        await until(lambda: mesh.upstream is not None
                    and len(mesh.upstream.received) == asked + 3 * len(REQUEST))
        await closed(mesh)

    uvloop.run(run())


# ------------------------------------------------------------ the Connection's grants

def _server_with_stream(initial_window: int = 1000) -> core.Connection:
    connection = core.Connection("server", initial_window=initial_window)
    connection.receive_data(frame(WINDOW_UPDATE, 0, 0, value=initial_window)
                            + frame(DATA, SYN, 1, encode_open_header(80, {})))
    return connection


def test_grants_come_out_of_both_windows_and_go_back() -> None:
    connection = _server_with_stream(initial_window=100_000)
    assert connection.grant(1, 50_000) == 0  # not accepted yet: it may not send
    connection.accept_stream(1)
    connection_window = connection.connection_send_window  # 64 KiB before the peer's credit
    credit = connection.grant(1, 50_000)
    assert credit == connection_window // 4  # a quarter of the connection's window at most
    assert connection.window(1) == min(100_000, connection_window) - credit
    assert connection.connection_send_window == connection_window - credit
    assert connection.granted == credit
    assert connection.grant(1, 10) == 10  # `most`
    connection.give_back(1, credit + 10 - 100, 100)  # 100 bytes of it were sent
    assert connection.granted == 0
    assert connection.connection_send_window == connection_window - 100
    with pytest.raises(core.LocalProtocolError):
        connection.give_back(1, 1, 0)  # more than was granted
    connection.end_stream(1)
    assert connection.grant(1, 100) == 0  # after our FIN: nothing more to send


def test_a_grant_never_exceeds_the_streams_window_and_survives_its_close() -> None:
    connection = _server_with_stream(initial_window=1000)
    connection.accept_stream(1)
    assert connection.grant(1, 1 << 20) == 1000  # the peer's window for the stream
    assert connection.grant(1, 1 << 20) == 0
    connection.reset_stream(1)
    connection.give_back(1, 1000, 0)  # the stream is gone: the connection's window has it again
    assert connection.granted == 0 and connection.connection_send_window == 64 * 1024


# ------------------------------------------------------------ the Sender itself

def test_a_sender_without_credit_or_given_other_than_bytes_falls_back() -> None:
    """The stream's own write takes what the sender cannot (no credit, more than the credit,
    a bytearray); a sender that is off asks the stream whether it is closing."""
    Sender = tlsio_class("Sender")
    calls: list[Any] = []

    async def run() -> None:
        one, other = socket.socketpair()
        try:
            ssl_object = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO())
            transport = _c_transport()(asyncio.get_running_loop(), one, ssl_object, object())
            with pytest.raises(TypeError):
                Sender(object(), 1, calls.append, lambda: False)  # not a TlsTransport
            with pytest.raises(ValueError):
                Sender(transport, 1 << 32, calls.append, lambda: False)
            sender = Sender(transport, 1, calls.append, lambda: "the stream's answer")
            sender.write(b"abc")  # no credit yet
            assert calls == [b"abc"] and sender.is_closing() == "the stream's answer"
            sender.grant(2)
            assert sender.active and sender.is_closing() is False
            sender.write(b"abc")  # more than the credit
            sender.write(bytearray(b"a"))  # not bytes
            assert calls == [b"abc", b"abc", bytearray(b"a")]
            assert sender.credit == 2 and sender.frames == 0 and transport.get_write_buffer_size() == 0
            assert sender.take() == (2, 0) and not sender.active and sender.credit == 0
        finally:
            one.close()
            other.close()

    uvloop.run(run())
