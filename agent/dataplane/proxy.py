"""The shared TCP proxy: one asyncio process relaying every meshed pod's captured traffic.

A connection accepted on a pod's 15001 (outbound) or 15006 (inbound) listener is paired
with an upstream socket created inside the same pod's netns, then bytes flow both ways:
half-close is forwarded as a FIN, a reset or error as an RST, and when one side's send
buffer fills, reading from the other side pauses (no unbounded buffering)."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import socket
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

from agent.core.accounting import Record
from agent.core.detect import ConnectionObserver
from agent.core.telemetry import (
    PLAINTEXT,
    ConnectionRecord,
    HttpCounters,
    PeerLabels,
    Telemetry,
)
from agent.core.tunnel_frames import ErrorCode
from agent.dataplane.context import PodContext, Route, Router
from agent.dataplane.mesh import TunnelError
from agent.dataplane.sockets import SocketFactory, arm_reset, connect, original_destination
from agent.observability.metrics import AgentMetrics

if TYPE_CHECKING:
    from agent.dataplane.mesh import MeshClient, TunnelAcceptor
    from agent.dataplane.tunnel import TunnelSession

log = logging.getLogger(__name__)


class _Side(asyncio.Protocol):
    """One socket of a relayed pair. Reading pauses while the other side cannot keep up."""

    __slots__ = ("eof", "is_client", "relay", "transport", "write_blocked")

    def __init__(self, relay: Relay, is_client: bool) -> None:
        self.relay = relay
        self.is_client = is_client
        self.transport: asyncio.Transport | None = None
        self.eof = False
        self.write_blocked = False  # our send buffer is over the high-water mark

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a Transport (uvloop's are not subclasses: no cast() call on this path)
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=self.relay.buffer_high)  # type: ignore[attr-defined]
        self.relay.side_made(self)

    def data_received(self, data: bytes) -> None:
        self.relay.forward(self, data)

    def eof_received(self) -> bool:
        self.eof = True
        self.relay.half_closed(self)
        return True  # keep our writing half open until the other side finishes too

    def pause_writing(self) -> None:
        self.write_blocked = True
        other = self.relay.other(self)
        if other.transport is not None:
            other.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_blocked = False
        other = self.relay.other(self)
        if other.transport is not None and not other.transport.is_closing():
            other.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.side_lost(self, exc)


class Relay:
    """A client connection and its upstream: forwards bytes, FINs and RSTs, counts once."""

    __slots__ = ("buffer_high", "client", "connecting", "destination", "direction", "early",
                 "early_at", "failed", "http", "observer", "peer_labels", "pod", "proxy",
                 "record", "source", "started", "upstream")

    def __init__(self, proxy: Proxy, pod: PodContext, direction: str) -> None:
        self.proxy = proxy
        self.pod = pod
        self.direction = direction
        self.buffer_high = proxy.buffer_high
        self.client = _Side(self, is_client=True)
        self.upstream = _Side(self, is_client=False)
        self.record: ConnectionRecord | None = None  # opened once the path is chosen
        self.peer_labels: PeerLabels = PLAINTEXT
        self.connecting: asyncio.Task[None] | None = None
        self.early: list[bytes] = []  # client bytes that beat the upstream connect
        self.failed = False
        self.destination: tuple[str, int] | None = None
        self.source: tuple[str, int] | None = None  # inbound: the client the app should see
        self.early_at = 0.0  # when the first client byte came, if before the path was chosen
        self.started = time.monotonic()
        # L7: sniffs the first client bytes, then accounts HTTP/1 and HTTP/2 requests
        # without holding, changing or delaying a byte; dropped once the stream is opaque.
        self.observer: ConnectionObserver | None = ConnectionObserver()
        self.http: HttpCounters | None = None

    def other(self, side: _Side) -> _Side:
        return self.upstream if side is self.client else self.client

    def side_made(self, side: _Side) -> None:
        assert side.transport is not None
        if side is self.client:
            side.transport.pause_reading()  # nothing flows until upstream is connected
            self.proxy.accepted(self)
        else:  # uvloop may deliver a first read, even the FIN, before honouring the pause
            if self.early:
                side.transport.writelines(self.early)
                self.early.clear()
            if self.client.eof:
                self.half_closed(self.client)

    def open_record(self, peer: PeerLabels) -> None:
        """The path is chosen: count the connection under its labels (and any early bytes)."""
        self.peer_labels = peer
        record = self.record = self.proxy.telemetry.open(self.pod.labels(self.direction, peer)[0])
        if self.early:  # read before the path was chosen (no upstream yet: all still held)
            record.read(sum(map(len, self.early)))
            for data in self.early:
                observer = self.observer
                if observer is None:
                    break
                self.account(observer.client_bytes(data, self.early_at), observer)

    def forward(self, side: _Side, data: bytes) -> None:
        record, observer = self.record, self.observer
        if side is self.client:
            if record is None:  # uvloop's early read: counted once the labels are known
                self.early_at = self.early_at or time.monotonic()
            else:
                record.read(len(data))
                if observer is not None:
                    self.account(observer.client_bytes(data, time.monotonic()), observer)
            target = self.upstream.transport
        else:
            if record is not None:
                record.wrote(len(data))
            if observer is not None:
                self.account(observer.server_bytes(data, time.monotonic()), observer)
            target = self.client.transport
        if target is None:
            self.early.append(data)
            if sum(map(len, self.early)) > self.buffer_high and side.transport is not None:
                side.transport.pause_reading()  # uvloop may not honour the first pause
        elif not target.is_closing():
            target.write(data)

    def account(self, records: list[Record], observer: ConnectionObserver) -> None:
        started = observer.take_started()
        if started or records:
            http = self.http
            if http is None:
                http = self.http = self.proxy.http_counters(self)
            http.requests += started
            for record in records:
                http.record(record)
        if observer.opaque:
            self.observer = None  # in-flight requests were already ended as failures

    def half_closed(self, side: _Side) -> None:
        target = self.other(side)
        if target.transport is None or target.transport.is_closing():
            return  # no upstream yet: side.eof is kept, and side_made passes the FIN on
        if target.eof:  # both directions finished: close (flushes what is buffered)
            for each in (self.client, self.upstream):
                if each.transport is not None:
                    each.transport.close()
        elif target.transport.can_write_eof():
            target.transport.write_eof()

    def side_lost(self, side: _Side, exc: Exception | None) -> None:
        if self.connecting is not None:
            self.connecting.cancel()
        other = self.other(side)
        if exc is not None:
            self.failed = True
        if other.transport is not None and not other.transport.is_closing():
            if exc is not None:
                self.reset(other)
            else:
                other.transport.close()
        if other.transport is None or other.transport.is_closing():
            self.finish()

    def reset(self, side: _Side) -> None:
        """Close with RST, telling the peer the other end failed."""
        if side.transport is None:
            return
        sock = side.transport.get_extra_info("socket")
        if sock is not None:
            arm_reset(sock)
        side.transport.abort()

    def abort(self) -> None:
        self.failed = True
        for side in (self.client, self.upstream):
            self.reset(side)
        self.finish()

    def finish(self) -> None:
        """Exactly once per connection: the close is counted and, at debug level, logged."""
        if self.record is None:  # ended before its path was chosen
            self.open_record(self.peer_labels)
        assert self.record is not None
        if self.record.close(self.failed):
            self.pod.relays.discard(self)
            observer = self.observer
            if observer is not None:
                self.account(observer.closed(time.monotonic(), reset=self.failed), observer)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s %s/%s -> %s: %s after %.1f ms", self.direction, self.pod.namespace,
                          self.pod.name, self.destination, "failed" if self.failed else "closed",
                          (time.monotonic() - self.started) * 1000)


class Proxy:
    """Accepts on in-pod listeners and connects upstream from the same pod's netns; with a
    mesh, outbound connections to meshed pods become streams of a tunnel session, and the
    streams arriving on a pod's 15008 become inbound connections to the pod."""

    def __init__(self, sockets: SocketFactory, telemetry: Telemetry, metrics: AgentMetrics,
                 connect_timeout: float, buffer_high: int) -> None:
        self._sockets = sockets
        self.telemetry = telemetry
        self._metrics = metrics
        self._connect_timeout = connect_timeout
        self.buffer_high = buffer_high
        self.mesh: MeshClient | None = None
        self.acceptor: TunnelAcceptor | None = None
        self.router: Router | None = None  # Kubernetes mode: Service VIPs and pod labels
        self._labels_cache: dict[tuple[PeerLabels, str], PeerLabels] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def protocol_factory(self, pod: PodContext, direction: str) -> Callable[[], _Side]:
        def make() -> _Side:
            return Relay(self, pod, direction).client

        return make

    async def serve_tunnel(self, pod: PodContext, sock: socket.socket) -> Any:
        """15008: the mTLS mesh tunnel. A pod without a certificate (no identity configured
        on this agent) refuses tunnel connections with RST, counted."""
        if self.acceptor is not None and pod.identity is not None:
            return self.acceptor.serve(pod, sock)
        metrics = self._metrics

        class Refuse(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                metrics.proxy_errors.labels("inbound", "tunnel_unavailable").inc()
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    arm_reset(sock)
                cast(asyncio.Transport, transport).abort()

        return await asyncio.get_running_loop().create_server(Refuse, sock=sock)

    def tunneled(self, pod: PodContext, session: TunnelSession, stream_id: int, port: int,
                 metadata: Mapping[str, str]) -> None:
        """A stream opened on the pod's 15008: relay it to the pod's own `port`."""
        if port in pod.own_ports or pod.ip is None:
            self._metrics.proxy_errors.labels("inbound", "loop").inc()
            session.refuse(stream_id, ErrorCode.CONNECT_ERROR)
            return
        relay = Relay(self, pod, "inbound")
        # Nothing a peer sends waits in our memory acknowledged: the app's socket pauses the
        # stream as soon as it cannot take a chunk whole (the session bounds the rest).
        relay.buffer_high = 0
        relay.destination = (pod.ip, port)
        relay.source = session.peername  # the client pod's own IP, as the app should see it
        relay.peer_labels = session.labels
        if log.isEnabledFor(logging.DEBUG):
            log.debug("tunnel stream %d from %s (%s) to %s/%s:%d", stream_id, session.peer_id,
                      metadata.get("pod", "?"), pod.namespace, pod.name, port)
        session.attach(stream_id, relay.client)

    def http_counters(self, relay: Relay) -> HttpCounters:
        """The first request of a connection: find its pod's HTTP series."""
        return self.telemetry.http(relay.pod.labels(relay.direction, relay.peer_labels)[1])

    def accepted(self, relay: Relay) -> None:
        """Route a new connection. The common meshed case costs no task: a pooled tunnel
        session takes the stream at once; connecting upstream or dialing a tunnel waits in
        the relay's own task."""
        relay.pod.relays.add(relay)
        routed = self._route(relay)
        if routed is None:
            return
        destination, route = routed
        meshed = (relay.direction == "outbound" and self.mesh is not None
                  and (route is None or route.meshed))
        if meshed:
            assert self.mesh is not None
            session = self.mesh.pooled(relay.pod, destination[0],
                                       route.identity if route is not None else "")
            if session is not None:
                self._open_stream(relay, session, destination, route)
                return
        task = asyncio.get_running_loop().create_task(self._connect(relay, destination, route, meshed))
        relay.connecting = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _route(self, relay: Relay) -> tuple[tuple[str, int], Route | None] | None:
        """Where the connection goes, and whether it may (None: refused, counted)."""
        destination = relay.destination
        if destination is None:  # captured by a rule: where was it going?
            client = relay.client.transport
            assert client is not None
            destination = relay.destination = self._destination(relay, client.get_extra_info("socket"))
            if destination is None:
                return None
            if relay.direction == "inbound":
                if not relay.pod.inbound.plaintext_allowed:
                    self._refuse(relay, "policy_plaintext", "plaintext refused: the pod's inbound "
                                 "policy is mesh-only")
                    return None
                relay.source = client.get_extra_info("peername")
        if destination[1] in relay.pod.opaque_ports:
            relay.observer = None  # declared opaque: relay bytes, parse nothing
        route = None
        if relay.direction == "outbound" and self.router is not None:
            route = self.router.route(destination)  # a Service VIP becomes an endpoint
            destination = relay.destination = route.destination
            relay.peer_labels = route.labels
        return destination, route

    async def _connect(self, relay: Relay, destination: tuple[str, int], route: Route | None,
                       meshed: bool) -> None:
        if meshed:
            try:
                if await self._through_tunnel(relay, destination, route):
                    return
            except asyncio.CancelledError:
                relay.abort()
                return
        relay.open_record(relay.peer_labels)
        await self._connect_upstream(relay, destination)

    async def _through_tunnel(self, relay: Relay, destination: tuple[str, int],
                              route: Route | None) -> bool:
        """Open a tunnel stream for an outbound connection; False: the destination is not
        meshed (plain TCP). A meshed destination that fails is refused, never downgraded."""
        assert self.mesh is not None
        try:
            session = await self.mesh.session_for(relay.pod, destination[0],
                                                  route.identity if route is not None else "")
        except TunnelError as exc:
            self._refuse(relay, exc.reason, str(exc))
            return True
        finally:
            relay.connecting = None
        if session is None:
            return False
        self._open_stream(relay, session, destination, route)
        return True

    def _open_stream(self, relay: Relay, session: TunnelSession, destination: tuple[str, int],
                     route: Route | None) -> None:
        client = relay.client.transport
        if client is None or client.is_closing():
            relay.finish()
            return
        labels = session.labels
        if route is not None:  # what the registry knows of the destination, and the proof
            labels = self._tunnel_labels(route.labels, labels.server_id)
        relay.open_record(labels)
        session.open_stream(relay.upstream, destination[1], relay.pod.metadata)
        if not relay.upstream.write_blocked:
            client.resume_reading()

    def _tunnel_labels(self, route_labels: PeerLabels, server_id: str) -> PeerLabels:
        """The registry's dst_* labels with the tunnel's proof, built once per (route, server)."""
        key = (route_labels, server_id)
        labels = self._labels_cache.get(key)
        if labels is None:
            if len(self._labels_cache) >= 4096:  # bounded: pods and Services come and go
                self._labels_cache.clear()
            labels = self._labels_cache[key] = dataclasses.replace(route_labels, tls="true",
                                                                   server_id=server_id)
        return labels

    async def _connect_upstream(self, relay: Relay, destination: tuple[str, int]) -> None:
        client = relay.client.transport
        assert client is not None
        try:
            sock = self._upstream_socket(relay.pod, relay.source)
        except OSError as exc:
            self._refuse(relay, "socket", f"cannot create upstream socket: {exc}")
            return
        try:
            loop = asyncio.get_running_loop()
            await connect(loop, sock, destination, self._connect_timeout)
            await loop.create_connection(lambda: relay.upstream, sock=sock)
        except asyncio.CancelledError:
            sock.close()
            relay.abort()
            return
        except (OSError, TimeoutError) as exc:
            sock.close()
            reason = errno.errorcode.get(getattr(exc, "errno", 0) or 0, "timeout").lower()
            self._refuse(relay, reason, f"connect {destination[0]}:{destination[1]}: {exc}")
            return
        finally:
            relay.connecting = None
        if not client.is_closing() and not relay.upstream.write_blocked:
            client.resume_reading()  # else resume_writing will, once upstream drains

    def _upstream_socket(self, pod: PodContext, source: tuple[str, int] | None) -> socket.socket:
        for _ in range(3):
            try:
                return self._sockets.upstream(pod.netns, source)
            except OSError as exc:
                if source is None or exc.errno != errno.EADDRINUSE:
                    raise
        return self._sockets.upstream(pod.netns)  # keep serving, without the client's IP

    def _destination(self, relay: Relay, sock: socket.socket) -> tuple[str, int] | None:
        try:
            host, port = original_destination(sock)
        except OSError:
            self._refuse(relay, "not_redirected", "connection was not redirected to the proxy")
            return None
        if port in relay.pod.own_ports:
            self._refuse(relay, "loop", f"original destination {host}:{port} is a proxy port")
            return None
        return host, port

    def _refuse(self, relay: Relay, reason: str, detail: str) -> None:
        pod = relay.pod
        self._metrics.proxy_errors.labels(relay.direction, reason).inc()
        log.info("%s %s/%s: %s", relay.direction, pod.namespace, pod.name, detail)
        relay.abort()

    async def close(self) -> None:
        if self.mesh is not None:
            self.mesh.close_all()
        if self.acceptor is not None:
            await self.acceptor.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
