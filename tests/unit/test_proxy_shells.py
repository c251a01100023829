"""The two proxies' asyncio shells carry out the per-connection decision: a refusal is
counted under its reason (the labels of pinion_proxy_errors_total do not change) and
resets the client; a meshed connection with a pooled tunnel session becomes a stream at
once, without a task; a tunnel stream to the proxy's own port is refused on the stream.
Fake transports and sockets: no root, no network."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Mapping
from typing import Any

import pytest

from agent.core.telemetry import PeerLabels, Telemetry
from agent.core.tunnel_frames import ErrorCode
from agent.dataplane import relay as relay_module
from agent.dataplane.context import PodContext
from agent.dataplane.inbound import InboundProxy
from agent.dataplane.netns import NetNs
from agent.dataplane.outbound import OutboundProxy
from agent.dataplane.relay import RelaySettings, _Side
from agent.model import InboundPolicy
from agent.observability.exposition import CollectorRegistry
from agent.observability.metrics import AgentMetrics, build_registry
from tests.unit.test_relay import Pipe

SETTINGS = RelaySettings(connect_timeout=1.0, buffer_high=64 * 1024)
SERVER_ID = "spiffe://cluster.local/ns/shop/sa/web"


class CapturedSocket:
    """An accepted socket as the kernel describes it: SO_ORIGINAL_DST, if redirected."""

    def __init__(self, original: tuple[str, int] | None) -> None:
        self.original = original

    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        if self.original is None:
            raise OSError(92, "not redirected")  # ENOPROTOOPT: no conntrack entry
        host, port = self.original
        return struct.pack("!HH4s8x", socket.AF_INET, port, socket.inet_aton(host))

    def setsockopt(self, *args: object) -> None:
        pass  # arm_reset: SO_LINGER


class ClientPipe(Pipe):
    def __init__(self, protocol: _Side, sock: CapturedSocket) -> None:
        super().__init__(protocol)
        self.sock = sock

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"socket": self.sock, "peername": ("10.42.1.7", 40000)}.get(name, default)


class NoSockets:
    """A socket factory whose pod netns is gone."""

    def upstream(self, netns: NetNs, source: tuple[str, int] | None = None) -> socket.socket:
        raise OSError(2, "no such namespace")


class Session:
    """A pooled tunnel session that takes every stream."""

    labels = PeerLabels(tls="true", server_id=SERVER_ID, dst_namespace="shop")
    peer_id = SERVER_ID
    peername = ("10.42.1.7", 15008)

    def __init__(self) -> None:
        self.streams: list[tuple[int, Mapping[str, str]]] = []
        self.refused: list[tuple[int, int]] = []

    def open_stream(self, protocol: asyncio.Protocol, port: int, metadata: Mapping[str, str]) -> Pipe:
        self.streams.append((port, metadata))
        pipe = Pipe(protocol)
        protocol.connection_made(pipe)  # type: ignore[arg-type]
        return pipe

    def refuse(self, stream_id: int, error_code: int) -> None:
        self.refused.append((stream_id, error_code))


class Mesh:
    def __init__(self) -> None:
        self.session = Session()

    def pooled(self, pod: PodContext, destination: str, expected: str = "") -> Session:
        return self.session


@pytest.fixture
def metrics() -> tuple[CollectorRegistry, AgentMetrics, Telemetry]:
    telemetry = Telemetry(lambda: 0.0, 60.0)
    registry, agent_metrics = build_registry(telemetry)
    return registry, agent_metrics, telemetry


def pod(netns: NetNs, **fields: Any) -> PodContext:
    return PodContext("shop", "front-1", netns, frozenset((15001, 15006, 15008)), ip="10.42.0.5",
                      identity="shop/front-1", **fields)


def accept(factory: Any, original: tuple[str, int] | None) -> ClientPipe:
    side = factory()
    client = ClientPipe(side, CapturedSocket(original))
    side.connection_made(client)
    return client


def errors(registry: CollectorRegistry, direction: str, reason: str) -> float | None:
    return registry.get_sample_value("pinion_proxy_errors_total",
                                     {"direction": direction, "reason": reason})


@pytest.mark.parametrize(("original", "reason"), [(None, "not_redirected"),
                                                  (("10.42.0.5", 15001), "loop")])
def test_outbound_refusals_are_counted_and_reset_the_client(
        netns: NetNs, metrics: Any, original: tuple[str, int] | None, reason: str) -> None:
    registry, agent_metrics, telemetry = metrics
    proxy = OutboundProxy(NoSockets(), telemetry, agent_metrics, SETTINGS)  # type: ignore[arg-type]
    client = accept(proxy.protocol_factory(pod(netns)), original)
    assert client.reset
    assert errors(registry, "outbound", reason) == 1


def test_a_mesh_only_pod_refuses_plaintext_inbound(netns: NetNs, metrics: Any) -> None:
    registry, agent_metrics, telemetry = metrics
    proxy = InboundProxy(NoSockets(), telemetry, agent_metrics, SETTINGS)  # type: ignore[arg-type]
    mesh_only = pod(netns, inbound=InboundPolicy(mode="mesh-only"))
    client = accept(proxy.protocol_factory(mesh_only), ("10.42.0.5", 8080))
    assert client.reset
    assert errors(registry, "inbound", "policy_plaintext") == 1


def test_a_pooled_tunnel_session_takes_the_stream_at_once_without_a_task(
        netns: NetNs, metrics: Any) -> None:
    _, agent_metrics, telemetry = metrics
    mesh = Mesh()
    proxy = OutboundProxy(NoSockets(), telemetry, agent_metrics, SETTINGS, mesh=mesh)  # type: ignore[arg-type]
    front = pod(netns)
    client = accept(proxy.protocol_factory(front), ("10.42.1.7", 8080))
    [relay] = front.relays
    assert relay.connecting is None  # no task: this runs outside any event loop
    assert [port for port, _ in mesh.session.streams] == [8080] and client.reading
    assert relay.peer_labels.tls == "true" and relay.peer_labels.server_id == SERVER_ID


def test_a_failed_upstream_socket_is_refused_under_socket(netns: NetNs, metrics: Any) -> None:
    registry, agent_metrics, telemetry = metrics
    proxy = OutboundProxy(NoSockets(), telemetry, agent_metrics, SETTINGS)  # type: ignore[arg-type]

    async def scenario() -> ClientPipe:
        client = accept(proxy.protocol_factory(pod(netns)), ("93.184.216.34", 443))
        for _ in range(3):  # the connect task runs, and refuses
            await asyncio.sleep(0)
        await proxy.close()
        return client

    client = asyncio.run(scenario())
    assert client.reset
    assert errors(registry, "outbound", "socket") == 1


def test_a_tunnel_stream_to_the_proxys_own_port_is_refused_on_the_stream(
        netns: NetNs, metrics: Any) -> None:
    registry, agent_metrics, telemetry = metrics
    proxy = InboundProxy(NoSockets(), telemetry, agent_metrics, SETTINGS)  # type: ignore[arg-type]
    session = Session()
    proxy.tunneled(pod(netns), session, 1, 15008, {})  # type: ignore[arg-type]
    assert session.refused == [(1, ErrorCode.CONNECT_ERROR)]
    assert errors(registry, "inbound", "loop") == 1


class RefusingMesh:
    """A meshed destination whose agent is away: no pooled session, the dial fails."""

    def pooled(self, pod: PodContext, destination: str, expected: str = "") -> None:
        return None

    async def session_for(self, pod: PodContext, destination: str, expected: str = "",
                          port: int = 0) -> None:
        from agent.dataplane.mesh import TunnelError

        raise TunnelError("tunnel_refused", f"{destination} refuses port 15008")


def test_a_refused_tunnel_is_counted_as_mtls_not_as_plaintext(netns: NetNs, metrics: Any) -> None:
    registry, agent_metrics, telemetry = metrics
    proxy = OutboundProxy(NoSockets(), telemetry, agent_metrics, SETTINGS,  # type: ignore[arg-type]
                          mesh=RefusingMesh())  # type: ignore[arg-type]

    async def scenario() -> ClientPipe:
        client = accept(proxy.protocol_factory(pod(netns)), ("10.42.1.7", 8080))
        for _ in range(3):
            await asyncio.sleep(0)
        await proxy.close()
        return client

    client = asyncio.run(scenario())
    assert client.reset and errors(registry, "outbound", "tunnel_refused") == 1
    [(labels, counters)] = list(telemetry.series())
    assert labels.peer_labels.tls == "true" and counters.close_failure == 1  # nothing left in plaintext


class LoopbackSockets:
    """Upstream sockets as the factory makes them (non-blocking TCP), in the test's netns."""

    def upstream(self, netns: NetNs, source: tuple[str, int] | None = None) -> socket.socket:
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)


def run_on(kind: str, scenario: Any) -> Any:
    """`scenario()` on asyncio's own event loop or uvloop's (the agent's)."""
    if kind == "uvloop":
        import uvloop

        return uvloop.run(scenario())
    return asyncio.run(scenario())


LOOPS = ["asyncio", "uvloop"]
# the upstream's transport: the C PodTransport (csrc/podio.c), or the event loop's own, made
# by stepping its create_connection by hand (relay._Making)
TRANSPORTS = ["podio", "loop"]


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The relay given the C transport (whatever PINION_PURE_PYTHON says: it only keeps
    agents off it), or none."""
    from agent.dataplane._podio import PodTransport  # built by make: not there is a failure

    chosen = PodTransport if request.param == "podio" else None
    monkeypatch.setattr(relay_module, "POD_TRANSPORT", chosen)
    return str(request.param)


@pytest.mark.parametrize("kind", LOOPS)
def test_a_connect_completed_at_once_makes_the_upstream_without_a_task(
        netns: NetNs, metrics: Any, kind: str, transport: str) -> None:
    _, agent_metrics, telemetry = metrics
    proxy = InboundProxy(LoopbackSockets(), telemetry, agent_metrics, SETTINGS)  # type: ignore[arg-type]
    front = pod(netns)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)

    async def scenario() -> tuple[bytes, bool]:
        client = accept(proxy.protocol_factory(front), listener.getsockname())
        [relay] = front.relays
        assert not proxy._plain._tasks
        if transport == "podio":  # made in the accept's own call: the client may send at once
            assert relay.connecting is None and client.reading
            assert type(relay.upstream.transport).__name__ == "PodTransport"
        else:  # being made by the loop: nothing flows until its transport exists
            assert relay.connecting is not None and not client.reading
            for _ in range(5):
                await asyncio.sleep(0)
            assert relay.connecting is None and client.reading
        client.send(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
        server, _ = listener.accept()
        server.settimeout(2)
        got = server.recv(100)
        server.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
        for _ in range(50):
            if client.received:
                break
            await asyncio.sleep(0.01)
        server.close()
        for _ in range(50):
            if client.closed:
                break
            await asyncio.sleep(0.01)
        return got, bytes(client.received) == b"HTTP/1.1 204 No Content\r\n\r\n"

    got, answered = run_on(kind, scenario)
    listener.close()
    assert got == b"GET / HTTP/1.1\r\nHost: web\r\n\r\n" and answered
    [(_, counters)] = list(telemetry.series())
    assert (counters.open_total, counters.close_success, counters.close_failure) == (1, 1, 0)


@pytest.mark.parametrize("kind", LOOPS)
def test_a_client_gone_while_the_loop_makes_the_upstream_resets_the_upstream(
        netns: NetNs, metrics: Any, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay_module, "POD_TRANSPORT", None)  # the loop's transport: made later
    _, agent_metrics, telemetry = metrics
    proxy = InboundProxy(LoopbackSockets(), telemetry, agent_metrics, SETTINGS)  # type: ignore[arg-type]
    front = pod(netns)
    listener = socket.create_server(("127.0.0.1", 0))

    async def scenario() -> None:
        client = accept(proxy.protocol_factory(front), listener.getsockname())
        [relay] = front.relays
        assert relay.connecting is not None
        client.lose(ConnectionResetError())  # before the loop made the upstream's transport
        for _ in range(5):
            await asyncio.sleep(0)
        assert relay.connecting is None
        upstream = relay.upstream.transport
        assert upstream is not None and upstream.is_closing()
        await asyncio.sleep(0.05)

    run_on(kind, scenario)
    server, _ = listener.accept()
    server.settimeout(2)
    with pytest.raises(ConnectionResetError):  # reset, as the client was: not a clean FIN
        server.recv(100)
    server.close()
    listener.close()
    [(_, counters)] = list(telemetry.series())
    assert (counters.close_success, counters.close_failure) == (0, 1)


@pytest.mark.parametrize("kind", LOOPS)
def test_a_connect_refused_at_once_is_counted_under_its_errno_without_a_task(
        netns: NetNs, metrics: Any, kind: str, transport: str) -> None:
    registry, agent_metrics, telemetry = metrics
    proxy = InboundProxy(LoopbackSockets(), telemetry, agent_metrics, SETTINGS)  # type: ignore[arg-type]
    front = pod(netns)
    closed = socket.create_server(("127.0.0.1", 0))
    address = closed.getsockname()
    closed.close()  # nothing listens there now: the kernel refuses within the connect call

    async def scenario() -> ClientPipe:
        client = accept(proxy.protocol_factory(front), address)
        assert not proxy._plain._tasks
        return client

    client = run_on(kind, scenario)
    assert client.reset
    assert errors(registry, "inbound", "econnrefused") == 1
    [(_, counters)] = list(telemetry.series())
    assert counters.close_failure == 1 and counters.close_errno == {"ECONNREFUSED": 1}
