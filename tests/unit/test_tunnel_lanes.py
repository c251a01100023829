"""Lanes (issue #16, the engine's receive side): once a tunnel stream is in steady state, the C
transport (`agent.dataplane._tlsio`) delivers its DATA frames itself — the relay's compiled
observer, then the pod's transport — and reports what it moved before the session sees any
other frame. Checked here: the transport cuts frames however records and reads split them,
keeps every byte in order and hands the session exactly the frames that are not a lane's;
relays over two real sessions engage lanes and count, acknowledge and credit exactly as the
session's own path does; a pod that stops reading takes the lane off and loses nothing; a
peer that breaks a window through a lane fails the connection."""

from __future__ import annotations

import asyncio
import os
import ssl
import struct
from typing import Any

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.core import tunnel as core
from agent.core.tunnel_frames import (
    DATA,
    DEFAULT_CONNECTION_WINDOW,
    DEFAULT_WINDOW,
    FIN,
    GOAWAY,
    PING,
    SYN,
    VERSION,
    WINDOW_UPDATE,
    encode_open_header,
)
from agent.dataplane import tunnel as tunnel_shell
from agent.dataplane.context import PodContext
from agent.dataplane.netns import NetNs
from agent.dataplane.relay import Relay
from agent.dataplane.tls import TunnelTls, handshake, start_session
from agent.dataplane.tunnel import TunnelSession
from agent.observability.exposition import generate_latest
from agent.observability.metrics import build_registry
from tests.unit.test_relay import Pipe, Proxy
from tests.unit.test_tunnel_tls import Endpoint, _c_transport, _tcp_pair, tlsio_class

HEADER = struct.Struct(">BBHII")


def _lane_class() -> Any:
    return tlsio_class("Lane")


class Logged(Endpoint):
    """An Endpoint that also logs each delivery, in order with the lanes' own entries."""

    def __init__(self, log: list[tuple[Any, ...]]) -> None:
        super().__init__()
        self.log = log

    def data_received(self, data: bytes) -> None:
        self.log.append(("session", bytes(data)))
        super().data_received(data)


async def _raw_peer(contexts: tuple[ssl.SSLContext, ssl.SSLContext], end: Endpoint,
                    ) -> tuple[TunnelTls, Any]:
    """The C transport (server end) on `end`, and facing it a raw socket with the client's
    TLS in Python: the test seals records and cuts the wire itself."""
    server_context, client_context = contexts
    client_sock, server_sock = _tcp_pair()
    loop = asyncio.get_running_loop()
    server_tls = loop.create_task(handshake(server_sock, server_context, True, 5.0))
    client_tls = await handshake(client_sock, client_context, False, 5.0)
    _c_transport()(loop, server_sock, (await server_tls).ssl_object, end).start()
    return client_tls, client_sock


def frame(ftype: int, flags: int, stream: int, payload: bytes = b"", value: int = 0) -> bytes:
    if ftype == DATA:
        return HEADER.pack(VERSION, DATA, flags, stream, len(payload)) + payload
    return HEADER.pack(VERSION, ftype, flags, stream, value)


# ------------------------------------------------------------ the transport cuts frames

frames = st.lists(st.one_of(
    st.tuples(st.just("data"), st.sampled_from([1, 3, 5]), st.integers(1, 70_000)),
    st.tuples(st.just("fin"), st.sampled_from([1, 3, 5]), st.integers(0, 300)),
    st.tuples(st.just("control"), st.sampled_from([WINDOW_UPDATE, PING, GOAWAY]), st.integers(0, 7)),
    st.tuples(st.just("syn"), st.sampled_from([7, 9]), st.integers(0, 4096)),
), min_size=1, max_size=14)


def _build(plan: list[tuple[str, int, int]]) -> list[tuple[int, bytes, bool]]:
    """(stream, the frame's bytes, whether a lane may take it) for each planned frame."""
    out = []
    for index, (kind, which, size) in enumerate(plan):
        body = bytes([index % 251]) * min(size, 65_536)
        if kind == "data":
            out.append((which, frame(DATA, 0, which, body), True))
        elif kind == "fin":
            out.append((which, frame(DATA, FIN, which, body[:size]), False))
        elif kind == "syn":
            out.append((which, frame(DATA, SYN, which, body[:size]), False))
        else:
            out.append((0, frame(which, 0, 0, value=size), False))
    return out


@settings(max_examples=int(os.environ.get("PINION_DIFF_EXAMPLES", "60")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(plan=frames, record=st.integers(1, 20_000), cuts=st.lists(st.integers(1, 30_000), min_size=1,
                                                                   max_size=8),
       off_at=st.one_of(st.none(), st.integers(0, 13)), news_at=st.one_of(st.none(), st.integers(0, 13)),
       report_at=st.sampled_from([0, 1, 5_000, 2**40]), cap=st.sampled_from([1, 100_000, 2**40]))
def test_the_transport_cuts_frames_and_keeps_their_order(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext], plan: list[tuple[str, int, int]],
        record: int, cuts: list[int], off_at: int | None, news_at: int | None, report_at: int,
        cap: int) -> None:
    """Streams 1 and 3 have lanes (5 has none). Whatever the records and reads, the session
    gets exactly the frames no active lane took, each lane's write gets its payloads, and the
    two, put back in the order they happened, are the plaintext sent; whatever the lanes'
    report thresholds, a lane reports what it moved before the session sees the next frame,
    and what it has not reported it gives `take`; a lane taken off (or whose feed has news)
    leaves its stream's next frames to the session."""
    Lane = _lane_class()

    async def run() -> None:
        log: list[tuple[Any, ...]] = []
        end = Logged(log)
        client_tls, sock = await _raw_peer(contexts, end)
        lanes: dict[int, Any] = {}
        seen = [0]

        def make(stream: int) -> Any:
            def feed(data: bytes, now: float) -> Any:
                seen[0] += 1
                return ["news"] if news_at is not None and seen[0] == news_at + 1 else None

            def write(data: bytes) -> None:
                log.append(("lane", stream, data))
                if off_at is not None and len([e for e in log if e[0] == "lane"]) == off_at + 1:
                    lanes[stream].off()
                    log.append(("off", stream))

            lane = Lane(stream, feed, write, lambda: False,
                        lambda records: log.append(("news", stream, records)),
                        lambda received, chunks, last: log.append(("synced", stream, received, chunks, last)),
                        report_at)
            lanes[stream] = lane
            return lane

        end.transport.lane_cap = cap
        for stream in (1, 3):
            end.transport.lanes[stream] = make(stream)
        built = _build(plan)
        plaintext = b"".join(data for _, data, _ in built)
        wire = b"".join(client_tls.seal(plaintext[i:i + record]) for i in range(0, len(plaintext), record))
        loop, sent, index = asyncio.get_running_loop(), 0, 0
        while sent < len(wire):
            piece = wire[sent:sent + cuts[index % len(cuts)]]
            index += 1
            await loop.sock_sendall(sock, piece)
            sent += len(piece)
            await asyncio.sleep(0)
        async with asyncio.timeout(10):
            while sum(len(e[1]) if e[0] == "session" else HEADER.size + len(e[2]) if e[0] == "lane"
                      else 0 for e in log) < len(plaintext):
                await asyncio.sleep(0.005)
        # put back together in the order things happened: the plaintext, exactly
        rebuilt = b"".join(e[1] if e[0] == "session" else frame(DATA, 0, e[1], e[2])
                           for e in log if e[0] in ("session", "lane"))
        assert rebuilt == plaintext
        # a lane only ever took flagless DATA of a laned stream, and only while active
        taken = [(e[1], e[2]) for e in log if e[0] == "lane"]
        assert all(stream in (1, 3) for stream, _ in taken)
        # every lane frame is reported, before the session's next delivery
        pending: dict[int, int] = {}
        for entry in log:
            if entry[0] == "lane":
                pending[entry[1]] = pending.get(entry[1], 0) + len(entry[2])
            elif entry[0] == "synced":
                assert pending.pop(entry[1]) == entry[2]
            elif entry[0] == "session":
                assert not pending, "the session ran before a lane reported"
        taken_back = {stream: lane.take() for stream, lane in lanes.items()}
        assert {stream: size for stream, size in pending.items() if size} == \
            {stream: size for stream, (size, _) in taken_back.items() if size}
        assert sum(e[3] for e in log if e[0] == "synced") + \
            sum(chunks for _, chunks in taken_back.values()) == len(taken)
        # off (by the write, or by news): no frame of that stream through it afterwards (the
        # chunk whose feed had news is still written: the relay writes it too)
        for stream in lanes:
            entries = [e[0] for e in log if e[0] in ("lane", "off", "news") and e[1] == stream]
            if "off" in entries:
                assert "lane" not in entries[entries.index("off") + 1:]
            if "news" in entries:
                assert entries[entries.index("news") + 1:].count("lane") <= 1
        sock.close()
        async with asyncio.timeout(5):
            await end.lost

    uvloop.run(run())


def test_a_lane_only_takes_data_that_is_whole_and_flagless(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    """A DATA frame cut across records waits in the transport until whole; SYN, FIN and empty
    DATA go to the session; a bad version hands everything left to the session, which fails."""
    Lane = _lane_class()

    async def run() -> None:
        end = Endpoint()
        client_tls, sock = await _raw_peer(contexts, end)
        got: list[bytes] = []
        end.transport.lanes[1] = Lane(1, None, got.append, lambda: False, print,
                                      lambda *counts: None)
        loop = asyncio.get_running_loop()
        whole = frame(DATA, 0, 1, b"x" * 1000)
        for piece in (whole[:5], whole[5:700], whole[700:]):  # a frame in three records
            await loop.sock_sendall(sock, client_tls.seal(piece))
            await asyncio.sleep(0.02)  # (each piece a read of its own, mostly)
        await until(lambda: got)
        assert got == [b"x" * 1000] and bytes(end.received) == b""
        other = frame(DATA, FIN, 1, b"end") + frame(DATA, 0, 1, b"") + frame(DATA, SYN, 3, b"h")
        await loop.sock_sendall(sock, client_tls.seal(other))
        await until(lambda: len(end.received) >= len(other))
        assert bytes(end.received) == other and got == [b"x" * 1000]
        bad = bytes([VERSION + 1]) + frame(DATA, 0, 1, b"y")[1:]
        await loop.sock_sendall(sock, client_tls.seal(bad + frame(DATA, 0, 1, b"z")))
        await until(lambda: len(end.received) > len(other))
        assert bytes(end.received) == other + bad + frame(DATA, 0, 1, b"z")
        assert got == [b"x" * 1000]
        sock.close()
        async with asyncio.timeout(5):
            await end.lost

    uvloop.run(run())


# ------------------------------------------------------------ relays over real sessions

REQUEST = b"GET /1k.bin HTTP/1.1\r\nHost: web.shop\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 1024\r\n\r\n" + b"x" * 1024


class Mesh:
    """An outbound relay (client pod's pipe -> tunnel stream) and an inbound one (tunnel
    stream -> server pod's pipe) over two sessions whose records the C transport carries."""

    def __init__(self, netns: NetNs, upstream_high: int = 64 * 1024,
                 initial_window: int = DEFAULT_WINDOW,
                 connection_window: int = DEFAULT_CONNECTION_WINDOW) -> None:
        """The windows: what the server end grants the client end."""
        self.netns = netns
        self.upstream_high = upstream_high
        self.windows_granted = (initial_window, connection_window)
        self.upstreams: list[Pipe] = []  # every inbound relay's server pod, in stream order
        self.outbound_proxy, self.inbound_proxy = Proxy(), Proxy()
        self.inbound: Relay | None = None
        self.upstream: Pipe | None = None
        self.client: TunnelSession | None = None
        self.server: TunnelSession | None = None

    async def start(self, contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
        loop = asyncio.get_running_loop()
        pod = PodContext("shop", "web", self.netns, frozenset((15001, 15006, 15008)))

        def on_stream(session: TunnelSession, stream_id: int, port: int, metadata: Any) -> None:
            relay = self.inbound = Relay(self.inbound_proxy, pod, "inbound", 64 * 1024)
            stream = session.attach(stream_id, relay.client)
            relay.open_record(relay.peer_labels)
            upstream = self.upstream = Pipe(relay.upstream)
            self.upstreams.append(upstream)
            relay.upstream.connection_made(upstream)  # type: ignore[arg-type]
            upstream.high = self.upstream_high  # (the relay set its own)
            stream.resume_reading()  # accepts the stream

        client_sock, server_sock = _tcp_pair()
        server_context, client_context = contexts
        server_tls = loop.create_task(handshake(server_sock, server_context, True, 5.0))
        client_tls = await handshake(client_sock, client_context, False, 5.0)
        server_end = await server_tls
        initial_window, connection_window = self.windows_granted
        self.server = await start_session(server_sock, server_end, lambda tls: TunnelSession(
            "server", on_stream=on_stream, tls=tls, initial_window=initial_window,
            connection_window=connection_window))
        self.client = await start_session(client_sock, client_tls,
                                          lambda tls: TunnelSession("client", tls=tls))
        self.outbound, self.pod = self.open()

    def open(self) -> tuple[Relay, Pipe]:
        """Another outbound relay on the client session: a new stream, a new client pod."""
        assert self.client is not None
        front = PodContext("shop", "front", self.netns, frozenset((15001, 15006, 15008)))
        outbound = Relay(self.outbound_proxy, front, "outbound", 64 * 1024)
        pod = Pipe(outbound.client)
        outbound.client.connection_made(pod)  # type: ignore[arg-type]
        outbound.open_record(outbound.peer_labels)
        self.client.open_stream(outbound.upstream, 80, {"pod": "front"})
        pod.resume_reading()
        return outbound, pod

    async def exchange(self, count: int, request: bytes = REQUEST, response: bytes = RESPONSE) -> None:
        assert self.client is not None
        for _ in range(count):
            asked = len(self.upstream.received) if self.upstream else 0
            answered = len(self.pod.received)
            self.pod.send(request)
            asked += len(request)
            await until(lambda asked=asked: self.upstream is not None
                        and len(self.upstream.received) == asked)
            assert self.upstream is not None
            self.upstream.send(response)
            answered += len(response)
            await until(lambda answered=answered: len(self.pod.received) == answered)

    def scrape(self) -> list[str]:
        tunnel_shell.sync_lanes()  # as the agent's scrape hook does (agent/app.py)
        lines = []
        for proxy in (self.outbound_proxy, self.inbound_proxy):
            registry, _ = build_registry(proxy.telemetry)
            lines += [line for line in generate_latest(registry).decode().splitlines()
                      if line.startswith(("request_total", "response_total", "tcp_"))]
        return lines

    def windows(self) -> tuple[int, ...]:
        tunnel_shell.sync_lanes()
        assert self.client is not None and self.server is not None
        return tuple(w for session in (self.client, self.server)
                     for w in (session.connection.connection_receive_window,
                               session.connection.connection_send_window))


async def until(condition: Any, seconds: float = 5.0) -> None:
    async with asyncio.timeout(seconds):
        while not condition():
            await asyncio.sleep(0.001)


def lanes_of(session: TunnelSession | None) -> dict[int, Any]:
    assert session is not None and session.lanes is not None
    return session.lanes


def test_relays_over_sessions_engage_lanes_and_count_as_the_session_does(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext], netns: NetNs,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """40 keep-alive requests: from the second one each response reaches the client pod and
    each request the server pod through a lane; the metrics, and every window of both
    connections, come out as they do with lanes turned off."""
    monkeypatch.setattr("agent.dataplane.tls.TLS_TRANSPORT", _c_transport())

    async def run(lanes: bool) -> tuple[list[str], tuple[int, ...], int]:
        monkeypatch.setattr(tunnel_shell, "LANES", lanes)
        mesh = Mesh(netns)
        await mesh.start(contexts)
        await mesh.exchange(40)
        delivered = 0
        for session in (mesh.client, mesh.server):
            if lanes:
                [lane] = lanes_of(session).values()
                delivered += lane.delivered
            else:
                assert session is not None and session.lanes is None
        scrape, windows = mesh.scrape(), mesh.windows()
        assert mesh.client is not None and mesh.server is not None
        mesh.client.close()
        await until(lambda: mesh.server is not None and mesh.server.transport is not None
                    and mesh.server.transport.is_closing())
        assert mesh.client not in tunnel_shell._LANED and mesh.server not in tunnel_shell._LANED
        return scrape, windows, delivered

    laned, windows, delivered = uvloop.run(run(True))
    assert delivered >= 2 * 38  # every request and response after the first ones
    plain, plain_windows, _ = uvloop.run(run(False))
    assert laned == plain and windows == plain_windows
    assert sum(line.startswith("request_total") and line.endswith(" 40.0") for line in laned) == 2


def test_megabytes_through_a_lane_keep_the_peer_credited(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext], netns: NetNs,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An opaque upload of 4 MiB (16 stream windows) through a lane: every byte in order, the
    credit goes back as it is consumed (the peer never stalls), nothing left unacknowledged."""
    monkeypatch.setattr("agent.dataplane.tls.TLS_TRANSPORT", _c_transport())

    async def run() -> None:
        mesh = Mesh(netns, upstream_high=1 << 30)
        await mesh.start(contexts)
        assert mesh.client is not None and mesh.server is not None
        hello = b"\x16\x03\x01 not http"  # opaque: no observer on the path
        mesh.pod.send(hello)
        await until(lambda: mesh.upstream is not None and len(mesh.upstream.received) == len(hello))
        body = bytes(range(256)) * 4096  # 1 MiB
        for _ in range(4):
            mesh.pod.send(body)
            await asyncio.sleep(0)
        total = len(hello) + 4 * len(body)
        await until(lambda: mesh.upstream is not None and len(mesh.upstream.received) == total,
                    seconds=20)
        assert mesh.upstream is not None
        assert bytes(mesh.upstream.received[len(hello):]) == body * 4
        [lane] = lanes_of(mesh.server).values()
        assert lane.delivered > 0 and lane.pending == 0
        [stream_id] = mesh.server.streams
        assert mesh.server.connection._streams[stream_id].unacknowledged == 0
        mesh.client.close()
        await asyncio.sleep(0.05)

    uvloop.run(run())


def test_a_pod_that_stops_reading_takes_the_lane_off_and_loses_nothing(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext], netns: NetNs,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The server pod's socket fills: the relay pauses the stream, the lane goes off, what
    arrives meanwhile is held (bounded by the stream's window), and once the pod reads again
    every byte arrives in order and the lane comes back."""
    monkeypatch.setattr("agent.dataplane.tls.TLS_TRANSPORT", _c_transport())

    async def run() -> None:
        mesh = Mesh(netns, upstream_high=8 * 1024)
        await mesh.start(contexts)
        assert mesh.client is not None and mesh.server is not None
        mesh.pod.send(b"\x16\x03\x01 opaque")  # 10 bytes, not HTTP
        await until(lambda: mesh.upstream is not None and len(mesh.upstream.received) == 10)
        assert mesh.upstream is not None
        mesh.upstream.drain()
        [stream_id] = mesh.server.streams
        stream = mesh.server.streams[stream_id]
        chunk = bytes(range(256)) * 16  # 4 KiB
        for index in range(3):  # each through the lane, each drained at once
            mesh.pod.send(chunk)
            expected = 10 + (index + 1) * len(chunk)
            await until(lambda expected=expected: len(mesh.upstream.received) == expected)
            mesh.upstream.drain()
        assert stream.lane is not None
        sent = 10 + 3 * len(chunk)
        for _ in range(100):  # 400 KiB the pod does not read: more than the window
            mesh.pod.send(chunk)
            sent += len(chunk)
            await asyncio.sleep(0)
        await until(lambda: mesh.upstream.write_paused)
        assert stream.lane is None and mesh.upstream.write_paused
        held = sum(map(len, stream._held))
        assert held <= mesh.server.connection.initial_window
        async with asyncio.timeout(10):
            while len(mesh.upstream.received) < sent:
                mesh.upstream.drain()
                await asyncio.sleep(0.01)
        assert bytes(mesh.upstream.received[10:]) == chunk * 103
        mesh.upstream.drain()
        mesh.pod.send(chunk)
        await until(lambda: len(mesh.upstream.received) == sent + len(chunk))
        mesh.pod.send(chunk)
        await until(lambda: len(mesh.upstream.received) == sent + 2 * len(chunk))
        assert stream.lane is not None  # back in steady state
        mesh.client.close()
        await asyncio.sleep(0.05)

    uvloop.run(run())


def test_a_lane_report_over_the_window_fails_the_connection() -> None:
    connection = core.Connection("server", initial_window=1000)
    connection.receive_data(frame(WINDOW_UPDATE, 0, 0, value=1000)
                            + frame(DATA, SYN, 1, encode_open_header(80, {})))
    connection.accept_stream(1)
    connection.data_to_send()
    assert connection.lane_received(1, 600, 600)  # passed on: credited back (over half)
    assert connection.lane_received(1, 400, 0)  # held by a paused relay: not acknowledged
    assert connection.lane_received(1, 600, 0)  # the window is spent
    assert not connection.lane_received(1, 1, 0)
    assert connection.terminated and connection.error is not None
    assert connection.error.error_code == core.ErrorCode.FLOW_CONTROL_ERROR
    assert frame(GOAWAY, 0, 0, value=core.ErrorCode.FLOW_CONTROL_ERROR) in connection.data_to_send()


def test_a_session_refused_at_admission_is_not_kept_for_its_lanes(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext], monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused sessions are a peer's to make (an identity the policy refuses): none may stay
    in the registry `sync_lanes` walks."""
    monkeypatch.setattr("agent.dataplane.tls.TLS_TRANSPORT", _c_transport())

    async def run() -> None:
        loop = asyncio.get_running_loop()
        before = set(tunnel_shell._LANED)
        for _ in range(3):
            client_sock, server_sock = _tcp_pair()
            server_tls = loop.create_task(handshake(server_sock, contexts[0], True, 5.0))
            client_tls = await handshake(client_sock, contexts[1], False, 5.0)
            server = await start_session(server_sock, await server_tls, lambda tls: TunnelSession(
                "server", admit=lambda session, transport: False, tls=tls))
            client = await start_session(client_sock, client_tls,
                                         lambda tls: TunnelSession("client", tls=tls))
            await until(lambda client=client: client.transport is not None
                        and client.transport.is_closing())
            assert server.lanes is None
        assert set(tunnel_shell._LANED) <= before

    uvloop.run(run())
