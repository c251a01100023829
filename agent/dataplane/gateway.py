"""The multicluster gateway's data plane: mTLS tunnel connections from linked clusters' agents
on one port, each stream forwarded to the local Service its open header names.

The listener is the mesh tunnel's own acceptor (`TunnelAcceptor`: the same gate before TLS,
handshake deadline, per-peer connection limit and windows), with another admission: the
client's certificate must chain to the trust bundle *and* name a linked trust domain
(`agent.core.multicluster.admit_client`). A stream is resolved like an agent resolves a
Service VIP (one ready endpoint in turn); to a meshed pod it goes as a stream of the
gateway's own tunnel to that pod, carrying the caller's proven identity (`CLIENT_KEY`) for
the pod's policy and metrics; to a pod outside the mesh, as plain TCP."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

from agent.core import multicluster
from agent.core.connections import Route
from agent.core.tunnel_frames import ErrorCode
from agent.dataplane.context import PodContext
from agent.dataplane.mesh import (
    Identities,
    IdentityRejected,
    InboundStreams,
    MeshClient,
    MeshSettings,
    TunnelAcceptor,
    TunnelError,
)
from agent.dataplane.sockets import SocketFactory, connect
from agent.dataplane.tunnel import TunnelSession

if TYPE_CHECKING:
    from agent.observability.metrics import AgentMetrics

log = logging.getLogger(__name__)


class Resolver(Protocol):
    """Where a stream for Service `<namespace>/<name>` port `port` goes: a Route, or None."""

    def resolve(self, namespace: str, name: str, port: int) -> Route | None: ...


@dataclass
class GatewayCounts:
    """What the gateway did, by outcome and target (bounded: outcomes x local Services)."""

    streams: dict[tuple[str, str], int]  # (outcome, "<ns>/<svc>") -> streams
    bytes_in: int = 0  # from linked clusters
    bytes_out: int = 0  # to them

    def count(self, outcome: str, target: str) -> None:
        if len(self.streams) >= 4096 and (outcome, target) not in self.streams:
            target = "other"
        self.streams[(outcome, target)] = self.streams.get((outcome, target), 0) + 1


class GatewayAcceptor(TunnelAcceptor):
    """The tunnel acceptor, admitting identities of linked trust domains instead of its own."""

    def __init__(self, identities: Identities, metrics: AgentMetrics, settings: MeshSettings,
                 streams: InboundStreams, linked_domains: frozenset[str]) -> None:
        super().__init__(identities, metrics, settings, streams)
        self.linked_domains = linked_domains

    def client_identity(self, pod: PodContext, ssl_object: Any) -> str:
        from agent.identity.tls import IdentityError, peer_identity

        try:  # the TLS handshake verified the chain against the bundle; now the name
            client_id = str(peer_identity(ssl_object))
        except IdentityError as exc:
            raise IdentityRejected(exc.reason, str(exc)) from None
        decision = multicluster.admit_client(client_id, self.linked_domains)
        if isinstance(decision, multicluster.Deny):
            raise IdentityRejected(decision.reason, decision.detail)
        return decision.client_id


class GatewayStreams:
    """Each stream a linked cluster's agent opens: resolved, then piped (InboundStreams)."""

    def __init__(self, resolver: Resolver, mesh: MeshClient, sockets: SocketFactory,
                 own: PodContext, counts: GatewayCounts, connect_timeout: float = 5.0,
                 max_streams: int = 4096) -> None:
        self._resolver = resolver
        self._max_streams = max_streams  # forwarded at once, all callers together: beyond, refused
        self.active = 0
        self._mesh = mesh
        self._sockets = sockets
        self._own = own  # the gateway as a workload: its identity, its netns
        self._counts = counts
        self._connect_timeout = connect_timeout
        self._tasks: set[asyncio.Task[None]] = set()

    def tunneled(self, pod: PodContext, session: TunnelSession, stream_id: int, port: int,
                 metadata: Mapping[str, str]) -> None:
        if self.active >= self._max_streams:
            self._refuse(session, stream_id, "over_capacity", "",
                         f"{self.active} streams are forwarded already (--max-streams)")
            return
        target = multicluster.stream_target(metadata)
        if isinstance(target, multicluster.Deny):
            self._refuse(session, stream_id, target.reason, "", target.detail)
            return
        namespace, name = target
        key = f"{namespace}/{name}"
        route = self._resolver.resolve(namespace, name, port)
        if route is None:
            self._refuse(session, stream_id, "no_endpoints", key,
                         f"{key}:{port} is no exported Service port with a ready endpoint here")
            return
        if route.target:  # never gateway to gateway: one hop per crossing
            self._refuse(session, stream_id, "mirrored_target", key,
                         f"{key} is itself a mirror of another cluster's Service")
            return
        front = _Pipe(self._counts, inbound=True, on_lost=self._ended)
        self.active += 1
        session.attach(stream_id, front)
        front.transport.pause_reading()  # nothing accepted until the upstream is there
        forwarded = {k: v for k, v in metadata.items() if k != multicluster.TARGET_KEY}
        forwarded[multicluster.CLIENT_KEY] = session.peer_id
        task = asyncio.get_running_loop().create_task(
            self._forward(front, route, forwarded, key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _ended(self) -> None:
        self.active -= 1

    def _refuse(self, session: TunnelSession, stream_id: int, outcome: str, key: str,
                detail: str) -> None:
        self._counts.count(outcome, key)
        log.info("gateway: stream from %s refused: %s", session.peer_id, detail)
        session.refuse(stream_id, ErrorCode.CONNECT_ERROR)

    async def _forward(self, front: _Pipe, route: Route, metadata: dict[str, str], key: str) -> None:
        back = _Pipe(self._counts, inbound=False)
        try:
            if route.meshed:
                session = await self._mesh.session_for(self._own, route.destination[0], route.identity)
                if session is None:
                    raise TunnelError("tunnel_refused", f"{route.destination[0]} is not meshed")
                session.open_stream(back, route.destination[1], metadata)
            else:
                await self._plain(back, route.destination)
        except (OSError, TimeoutError, TunnelError) as exc:
            self._counts.count("connect_error", key)
            log.info("gateway: %s at %s:%d: %s", key, *route.destination, exc)
            front.transport.abort()
            return
        except asyncio.CancelledError:
            front.transport.abort()
            raise
        self._counts.count("forwarded", key)
        _Pipe.join(front, back)

    async def _plain(self, back: _Pipe, destination: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        sock = self._sockets.upstream(self._own.netns)
        try:
            await connect(loop, sock, destination, self._connect_timeout)
        except BaseException:
            sock.close()
            raise
        await loop.create_connection(lambda: back, sock=sock)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


class _Pipe(asyncio.Protocol):
    """One side of a forwarded stream: what it reads, the other side writes; a side that
    cannot write pauses the other's reading; FIN and reset pass through."""

    def __init__(self, counts: GatewayCounts, inbound: bool,
                 on_lost: Callable[[], None] | None = None) -> None:
        self._counts = counts
        self._inbound = inbound  # the linked cluster's side
        self._on_lost = on_lost
        self.transport: asyncio.Transport = cast(asyncio.Transport, None)
        self.peer: _Pipe | None = None
        self.early: list[bytes] = []
        self.eof = False  # this side's reader ended
        self.lost = False

    @staticmethod
    def join(front: _Pipe, back: _Pipe) -> None:
        """Connect the two sides; what the upstream said or did meanwhile is passed on."""
        front.peer, back.peer = back, front
        for data in back.early:
            front.transport.write(data)
        back.early.clear()
        if back.lost:
            if back.eof:
                front.transport.close()
            else:
                front.transport.abort()
            return
        if back.eof:
            front.transport.write_eof()
        front.transport.resume_reading()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._inbound:
            self._counts.bytes_in += len(data)
        else:
            self._counts.bytes_out += len(data)
        if self.peer is None:
            self.early.append(data)
            return
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is not None and not peer.transport.is_closing():
            peer.transport.write_eof()
            if peer.eof:  # both directions ended: done
                self.transport.close()
                peer.transport.close()
        return True  # keep our writing side open (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.lost = True
        if self._on_lost is not None:
            self._on_lost()
        peer = self.peer
        if peer is None or peer.lost:
            return
        if exc is not None or not self.eof:
            peer.transport.abort()  # a reset passes through as a reset
        else:
            peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.resume_reading()

