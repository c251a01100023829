"""Where the mesh tunnel meets pods: the client pool that carries a pod's outbound streams
to meshed destinations, and the 15008 acceptor in every meshed pod.

Client side: one TLS connection per (source pod, destination pod IP), made from the source
pod's netns with its own certificate, shared by every stream between the two (up to the
stream limit, then a second one), closed after sitting idle. Whether a destination is
meshed is learnt by trying its 15008 once: refused = not meshed, remembered for a while,
and its traffic goes as plain TCP. A destination seen meshed is never downgraded to
plaintext while that is remembered. Server side: the TLS handshake requires a client
certificate from the trust bundle and the trust domain; the pod's policy may limit the
client identities; each stream becomes an inbound relay to the pod's own port.

Port 15008 is reachable by any pod in the cluster, certificate or not, so the server side
is bounded before TLS starts (`agent.core.limits`): connections not yet through their
handshake, per agent and per source address (a silent one holds an fd and a future, no TLS
state); TLS handshakes in progress, per agent and per source, and per second per source;
one short deadline from accept to a finished handshake; and at most
`max_peer_connections` tunnel connections per (client identity, address) into one pod (and
`max_peer_connections_node` into all of them). Each tunnel
connection holds at most its connection window of received bytes and its output budget of
bytes to send (`agent.dataplane.tunnel`), so one authenticated peer pins a few MiB at most."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import random
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

from agent.config import DEFAULT_MESH_NETWORKS
from agent.core.limits import OVER_CAPACITY, RATE_LIMITED, SOURCE_LIMIT, HandshakeGate, HandshakeLimits
from agent.core.multicluster import trust_domain_of
from agent.core.telemetry import PeerLabels
from agent.dataplane.slots import SourceSlots
from agent.dataplane.sockets import (
    LISTEN_BACKLOG,
    SocketFactory,
    arm_reset,
    close_handed_over,
    connect,
    first_bytes,
    set_keepalive,
    socket_identity,
)
from agent.dataplane.tls import TunnelTls, handshake, start_session
from agent.dataplane.tunnel import TunnelSession, handshake_failure_reason

if TYPE_CHECKING:
    from agent.dataplane.context import PodContext
    from agent.observability.metrics import AgentMetrics

log = logging.getLogger(__name__)
# A dial whose handshake the peer cut before it finished (eof: reset or closed) is tried again,
# this many times in all, after a short jittered wait: a peer agent's handshake gate refuses a
# source's connections beyond its per-source share of handshakes in progress (HandshakeLimits),
# which one client pod dialling many pods of one node at once meets; a moment later the first
# ones are done. Nothing of the client's has been sent yet, so trying again is safe.
DIAL_ATTEMPTS = 3
# At most this many of one pod's tunnel dials are between connect and the end of their TLS
# handshake at once; the others wait their turn here. A peer agent's gate refuses a source's
# connections beyond HandshakeLimits.per_source (16) before their handshake: a pod opening
# connections to 50 pods of one node at once was refused and dialled again, and under load
# its third try could be refused too (a reset to the app). Half the peer's share: the pod's
# other clients of that node, and a restarting agent's, still fit.
DIALS_PER_POD = HandshakeLimits().per_source // 2
ACCEPT_BATCH = 16  # connections a 15008 listener takes per wake-up: then the others' turn


class Identities(Protocol):
    """What the tunnel needs of the identity manager."""

    @property
    def trust_domain(self) -> str: ...

    def server_context(self, pod_key: str) -> ssl.SSLContext: ...
    def client_context(self, pod_key: str) -> ssl.SSLContext: ...


class TunnelError(Exception):
    """This connection cannot go through the mesh (and must not go in plaintext)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class MeshSettings:
    port: int = 15008
    dial_timeout: float = 1.0  # connect to 15008: a meshed pod answers at once
    handshake_timeout: float = 10.0  # ours, as the client
    accept_handshake_timeout: float = 3.0  # a peer's on our 15008: agents of the cluster, fast
    idle_timeout: float = 60.0  # close a client connection with no stream this long
    # ...or this long, for a second or later connection to one peer: opened only because
    # the first was full (a burst), it would keep its TLS state for a minute after it; and
    # for the first too once its peer had spares: its TLS buffers (uvloop's read buffer, the
    # memory BIOs, at both ends) keep the size the burst grew them to while it stays open
    spare_idle_timeout: float = 5.0
    not_meshed_ttl: float = 60.0  # remember "refused" this long
    meshed_ttl: float = 600.0  # and "meshed" this long (no downgrade meanwhile)
    networks: tuple[str, ...] = DEFAULT_MESH_NETWORKS  # others are never probed
    max_streams: int = 256
    max_peer_connections: int = 4  # per (client identity, address) on one pod's 15008...
    max_peer_connections_node: int = 256  # ...and on all this node's pods (k3s: 110 a node)
    handshakes: HandshakeLimits = field(default_factory=HandshakeLimits)
    # multicluster gateways of this cluster: they forward callers of linked clusters, whose
    # identity (not the gateway's) a pod's allow-list is checked against, stream by stream
    gateways: frozenset[str] = frozenset()


@dataclass(eq=False)
class _DialSlots:
    semaphore: asyncio.Semaphore
    users: int = 0  # dials holding or waiting for a slot: the entry goes at 0


class MeshClient:
    """Outbound: a pooled, verified tunnel session for (source pod, destination IP)."""

    def __init__(self, sockets: SocketFactory, identities: Identities, metrics: AgentMetrics,
                 settings: MeshSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self._sockets = sockets
        self._identities = identities
        self._metrics = metrics
        self._settings = settings
        self._clock = clock
        self._networks = tuple(ipaddress.IPv4Network(n) for n in settings.networks)
        self._sessions: dict[tuple[str, str], list[TunnelSession]] = {}
        self._bursts: set[tuple[str, str]] = set()  # peers seen with spares: see reap_idle
        self._dialing: dict[tuple[str, str], asyncio.Task[TunnelSession | None]] = {}
        self._dial_slots: dict[int, _DialSlots] = {}  # by id() of the pod: while it dials
        self._not_meshed: dict[str, float] = {}
        self._meshed: dict[str, float] = {}

    def pooled(self, pod: PodContext, destination: str, expected: str = "") -> TunnelSession | None:
        """An open session to `destination` that takes a new stream now (no waiting);
        with `expected`, only one whose server proved that SPIFFE ID."""
        if pod.identity is None:
            return None
        for session in self._sessions.get((pod.identity, destination), ()):
            if session.available and (not expected or session.peer_id == expected):
                return session
        return None

    async def session_for(self, pod: PodContext, destination: str,
                          expected: str = "", port: int = 0) -> TunnelSession | None:
        """A session to `destination`'s 15008, or None: not meshed, go in plaintext.
        `expected`: the SPIFFE ID the destination must prove (Kubernetes mode knows it
        from the pod registry, and never probes); "" = find out by trying 15008 once.
        `port`: another port than 15008 (a multicluster gateway's; `expected` required)."""
        if pod.identity is None:
            return None
        key = (pod.identity, destination)
        session = self.pooled(pod, destination, expected)  # the common case: one is open
        if session is not None:
            return session
        if not expected and not self._may_be_meshed(destination):
            return None
        dialing = self._dialing.get(key)
        if dialing is None:  # its own task: a client that gives up does not cancel it
            dialing = self._dialing[key] = asyncio.get_running_loop().create_task(
                self._dial(pod, key, expected, port or self._settings.port))
            dialing.add_done_callback(lambda task: self._dialed(key, task))
        return await asyncio.shield(dialing)

    def _dialed(self, key: tuple[str, str], task: asyncio.Task[TunnelSession | None]) -> None:
        if self._dialing.get(key) is task:
            del self._dialing[key]
        if not task.cancelled():
            task.exception()  # retrieved here: the waiters, if any, got it too

    def _may_be_meshed(self, destination: str) -> bool:
        until = self._not_meshed.get(destination)
        if until is not None:
            if until > self._clock():
                return False
            del self._not_meshed[destination]
        address = ipaddress.IPv4Address(destination)
        return any(address in network for network in self._networks)

    async def _dial(self, pod: PodContext, key: tuple[str, str], expected: str,
                    port: int) -> TunnelSession | None:
        """Connect to the destination's 15008 (or `port`) from the pod's netns, then TLS;
        a handshake the peer cut short is tried again (DIAL_ATTEMPTS)."""
        for attempt in range(1, DIAL_ATTEMPTS + 1):
            try:
                async with self._slot(pod):
                    return await self._dial_once(pod, key, expected, port)
            except TunnelError as exc:
                if exc.reason != "tunnel_eof" or attempt == DIAL_ATTEMPTS:
                    raise
                log.debug("%s, trying again (attempt %d of %d)", exc, attempt + 1, DIAL_ATTEMPTS)
            await asyncio.sleep(random.uniform(0.02, 0.1) * attempt)
        raise AssertionError("unreachable")

    @contextlib.asynccontextmanager
    async def _slot(self, pod: PodContext) -> AsyncIterator[None]:
        """One of the pod's DIALS_PER_POD dial slots, held until the handshake's end."""
        slots = self._dial_slots.get(id(pod))
        if slots is None:
            slots = self._dial_slots[id(pod)] = _DialSlots(asyncio.Semaphore(DIALS_PER_POD))
        slots.users += 1
        try:
            async with slots.semaphore:
                yield
        finally:
            slots.users -= 1
            if slots.users == 0:
                del self._dial_slots[id(pod)]

    async def _dial_once(self, pod: PodContext, key: tuple[str, str], expected: str,
                         port: int) -> TunnelSession | None:
        settings, loop = self._settings, asyncio.get_running_loop()
        destination = key[1]
        try:
            sock = self._sockets.upstream(pod.netns)
        except OSError as exc:
            raise TunnelError("socket", f"cannot create tunnel socket: {exc}") from None
        try:
            set_keepalive(sock)
            await connect(loop, sock, (destination, port), settings.dial_timeout)
        except ConnectionRefusedError:
            sock.close()
            if expected:
                raise TunnelError("tunnel_refused", f"{destination} is a meshed pod ({expected}) and "
                                  f"refuses port {port}: not falling back to plaintext") from None
            self._refused(destination)
            return None
        except (OSError, TimeoutError) as exc:
            sock.close()
            reason = errno.errorcode.get(getattr(exc, "errno", 0) or 0, "timeout").lower()
            raise TunnelError(f"tunnel_{reason}",
                              f"mesh tunnel to {destination}:{port}: {exc or 'timeout'}") from None
        except BaseException:
            sock.close()
            raise
        session = await self._handshake(pod, key, sock, expected)
        self._meshed[destination] = self._clock() + settings.meshed_ttl
        self._sessions.setdefault(key, []).append(session)
        pod.tunnels.add(session)
        return session

    def _refused(self, destination: str) -> None:
        if self._meshed.get(destination, 0.0) > self._clock():
            raise TunnelError("tunnel_refused", f"{destination} was meshed and now refuses "
                              f"port {self._settings.port}: not falling back to plaintext")
        self._not_meshed[destination] = self._clock() + self._settings.not_meshed_ttl
        log.debug("%s refuses the mesh tunnel: not meshed, plain TCP for %.0f s",
                  destination, self._settings.not_meshed_ttl)

    async def _handshake(self, pod: PodContext, key: tuple[str, str], sock: socket.socket,
                         expected: str) -> TunnelSession:
        settings = self._settings
        identity, destination = key

        def closed(session: TunnelSession) -> None:
            sessions = self._sessions.get(key)
            if sessions is not None and session in sessions:
                sessions.remove(session)
                if not sessions:
                    del self._sessions[key]
            pod.tunnels.discard(session)
            self._metrics.tunnel_connections.labels("outbound").dec()

        handed = socket_identity(sock)
        try:
            context = self._identities.client_context(identity)
            tls = await handshake(sock, context, False, settings.handshake_timeout)
            session = await start_session(sock, tls, lambda records: TunnelSession(
                "client", on_closed=closed, max_streams=settings.max_streams, tls=records))
        except (OSError, ssl.SSLError, TimeoutError, KeyError) as exc:
            close_handed_over(sock, handed)  # uvloop may have closed it (and its number reused)
            reason = handshake_failure_reason(exc)
            self._metrics.handshake_failures.labels("outbound", reason).inc()
            raise TunnelError(f"tunnel_{reason}", f"mesh tunnel to {destination}: TLS "
                              f"handshake failed ({reason}): {exc}") from None
        self._metrics.tunnel_connections.labels("outbound").inc()
        try:  # a remote cluster's gateway proves an ID of its own (linked) trust domain
            domain = trust_domain_of(expected) or self._identities.trust_domain
            server_id = verify_identity(session.ssl_object, domain)
            if expected and server_id != expected:
                raise IdentityRejected("unexpected_identity", f"server proved {server_id}, "
                                       f"but the pod at {destination} is {expected}")
        except IdentityRejected as exc:
            self._metrics.handshake_failures.labels("outbound", exc.reason).inc()
            session.close()
            raise TunnelError(f"tunnel_{exc.reason}", f"mesh tunnel to {destination}: {exc}") from None
        session.peer_id = server_id
        namespace = server_id.split("/ns/", 1)[1].split("/", 1)[0] if "/ns/" in server_id else ""
        session.labels = PeerLabels(tls="true", server_id=server_id, dst_namespace=namespace)
        return session

    def reap_idle(self) -> int:
        """Close client sessions without a stream for longer than the idle timeout; those
        beyond the first to a peer (a burst's) after `spare_idle_timeout`; and, once those
        are gone, the first too after `spare_idle_timeout` if its peer was seen with spares
        (it carried the burst: its TLS buffers, and its peer's, stay as large as the burst
        made them while it is open; the next request dials a fresh one)."""
        now = asyncio.get_running_loop().time()
        settings = self._settings
        idle = []
        for key, sessions in self._sessions.items():
            if len(sessions) > 1:
                self._bursts.add(key)
            # the first goes once the spares have (it is what the next request finds)
            after_burst = len(sessions) == 1 and key in self._bursts
            for index, session in enumerate(sessions):
                spare = index > 0 or after_burst
                timeout = settings.spare_idle_timeout if spare else settings.idle_timeout
                if not session.streams and now - session.idle_since > timeout:
                    idle.append(session)
                    if index == 0:  # the burst's first: the next one starts afresh
                        self._bursts.discard(key)
        for session in idle:
            session.close()
        self._bursts.intersection_update(self._sessions)  # and peers with none left
        cutoff = self._clock()
        for cache in (self._not_meshed, self._meshed):
            for destination in [d for d, until in cache.items() if until <= cutoff]:
                del cache[destination]
        return len(idle)

    def close_all(self) -> None:
        for task in list(self._dialing.values()):
            task.cancel()
        for sessions in list(self._sessions.values()):
            for session in list(sessions):
                session.close()


class IdentityRejected(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def verify_identity(ssl_object: Any, trust_domain: str, allowed: tuple[str, ...] = ()) -> str:
    """The peer's SPIFFE ID (from the connection's `ssl.SSLObject`, `TunnelSession.ssl_object`),
    checked against the trust domain and `allowed` (if any)."""
    from agent.identity.tls import IdentityError, verify_peer

    try:
        identity = verify_peer(ssl_object, trust_domain)
    except IdentityError as exc:
        raise IdentityRejected(exc.reason, str(exc)) from None
    text = str(identity)
    if allowed and text not in allowed:
        raise IdentityRejected("not_allowed", f"{text} is not in the pod's allowed clients")
    return text


class InboundStreams(Protocol):
    """The inbound proxy, as the acceptor sees it: turns an accepted stream into a relay."""

    def tunneled(self, pod: PodContext, session: TunnelSession, stream_id: int, port: int,
                 metadata: Mapping[str, str]) -> None: ...


class TunnelAcceptor:
    """Port 15008 in every meshed pod: the gate, TLS, then the pod's policy, then streams.

    The listener is served by our own accept loop, not `create_server`: nothing is
    allocated for a connection the gate refuses, each accepted socket gets the pod's
    *current* server context (certificates are renewed), and a failed handshake is counted
    by reason instead of only being logged by the event loop."""

    def __init__(self, identities: Identities, metrics: AgentMetrics, settings: MeshSettings,
                 streams: InboundStreams, clock: Callable[[], float] = time.monotonic) -> None:
        self._identities = identities
        self._metrics = metrics
        self._settings = settings
        self._streams = streams
        self._clock = clock
        self._tasks: set[asyncio.Task[None]] = set()
        self.gate = HandshakeGate(settings.handshakes)
        self._tls_slots = asyncio.Semaphore(settings.handshakes.tls)
        self._source_slots = SourceSlots(settings.handshakes.tls_per_source)  # per address
        self._peers: dict[tuple[str, str], int] = {}  # (client id, address) -> connections
        self._last_logged: dict[str, tuple[float, int]] = {}  # reason -> (when, unlogged since)

    def serve(self, pod: PodContext, listener: socket.socket) -> TunnelListener:
        server = TunnelListener(listener)
        server.watch(asyncio.get_running_loop(), lambda: self._accept_ready(pod, server))
        return server

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _accept_ready(self, pod: PodContext, server: TunnelListener) -> None:
        """The listener is readable: take what waits, a batch at most per wake-up. A reader
        callback registered once, not a future per accept: an accept loop awaiting
        `sock_accept` leaves a new future (and its handle) pending at every connection,
        and the ones left after a burst pin the heap's arenas it allocated (issue #21)."""
        listening = server.sockets[0]
        for _ in range(ACCEPT_BATCH):
            try:
                sock, address = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if not server.is_serving():
                    return
                log.warning("pod %s/%s: accepting on 15008: %s", pod.namespace, pod.name, exc)
                server.rest(0.1)  # e.g. EMFILE: do not spin
                return
            self._admit(pod, server, sock, address)

    def _admit(self, pod: PodContext, server: TunnelListener, sock: socket.socket,
               address: tuple[str, int]) -> None:
        refused = self.gate.admit(address[0], self._clock())
        if refused is not None:  # no TLS state, no task: an RST, a count
            self._refused(pod, address, refused, "before its handshake: " + self._why(refused))
            arm_reset(sock)
            sock.close()
            return
        task = self._spawn(self._handshake(pod, sock, address))
        server.connections.add(task)
        task.add_done_callback(server.connections.discard)

    async def _handshake(self, pod: PodContext, sock: socket.socket, peer: tuple[str, int]) -> None:
        started, deadline = self._clock(), self._settings.accept_handshake_timeout
        in_tls = False
        handed = socket_identity(sock)  # the event loop closes it if TLS fails
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # frames are small
            # (keepalive: inherited from the listener, SocketFactory.listener sets it)
            async with asyncio.timeout(deadline):
                # A connection that says nothing costs a future until its deadline, not the
                # TLS machinery (buffers, an SSL object) an idle flood would otherwise pin.
                if not await first_bytes(sock):
                    raise ConnectionResetError("closed before saying anything")
                refused = self.gate.start_tls(peer[0], self._clock())
                if refused is not None:
                    raise _Refused(refused)
                in_tls = True
                async with self._source_slots.taken(peer[0]), self._tls_slots:
                    await self._tls(pod, sock, max(0.1, deadline - (self._clock() - started)))
        except _Refused as exc:
            self._refused(pod, peer, exc.reason, "before TLS: " + self._why(exc.reason))
            arm_reset(sock)
            sock.close()
        except (OSError, ssl.SSLError, TimeoutError, KeyError) as exc:
            late = self._clock() - started >= 0.9 * deadline
            reason = "timeout" if late else handshake_failure_reason(exc)
            self._refused(pod, peer, reason, f"TLS handshake failed: {exc}")
            close_handed_over(sock, handed, reset=True)  # unless the event loop closed it
        except BaseException:  # cancelled: the pod is going, or the agent
            close_handed_over(sock, handed)
            raise
        finally:
            self.gate.done(peer[0], in_tls)

    async def _tls(self, pod: PodContext, sock: socket.socket, timeout: float) -> None:
        context = self._identities.server_context(pod.identity or "")
        try:
            tls = await handshake(sock, context, True, timeout)
            await start_session(sock, tls, lambda records: self._session(pod, records))
        except BaseException as exc:
            # exception -> traceback -> the event loop's frame -> its waiter -> exception: a
            # cycle that keeps a failed handshake's TLS buffers until a garbage collection
            exc.__traceback__ = None
            raise

    def _why(self, reason: str) -> str:
        limits = self.gate.limits
        return {OVER_CAPACITY: f"{limits.connections} connections are before their handshake",
                SOURCE_LIMIT: f"{limits.per_source} connections from this address are before "
                              "their handshake",
                RATE_LIMITED: f"over {limits.rate:g} TLS handshakes a second from this address",
                }.get(reason, reason)

    def _session(self, pod: PodContext, tls: TunnelTls | None = None) -> TunnelSession:
        def on_stream(session: TunnelSession, stream_id: int, port: int,
                      metadata: Mapping[str, str]) -> None:
            self._streams.tunneled(pod, session, stream_id, port, metadata)

        def admit(session: TunnelSession, transport: asyncio.BaseTransport) -> bool:
            try:
                client_id = self.client_identity(pod, session.ssl_object)
                self._count_peer(pod, client_id, session)
            except IdentityRejected as exc:
                self._refused(pod, session.peername, exc.reason, str(exc))
                return False
            session.peer_id = client_id
            session.labels = PeerLabels(tls="true", client_id=client_id)
            pod.tunnels.add(session)
            self._metrics.tunnel_connections.labels("inbound").inc()
            return True

        def closed(session: TunnelSession) -> None:
            if session in pod.tunnels:
                pod.tunnels.discard(session)
                self._metrics.tunnel_connections.labels("inbound").dec()
                self._uncount_peer(session)

        return TunnelSession("server", on_stream=on_stream, on_closed=closed, admit=admit,
                             max_streams=self._settings.max_streams, tls=tls)

    def client_identity(self, pod: PodContext, ssl_object: Any) -> str:
        """The client's proven SPIFFE ID if it may tunnel into `pod`; else IdentityRejected.
        (A multicluster gateway's callers are checked stream by stream, by inbound_stream.)"""
        client_id = verify_identity(ssl_object, self._identities.trust_domain)
        if client_id not in self._settings.gateways and not pod.inbound.admits(client_id):
            raise IdentityRejected("not_allowed", f"{client_id} is not in the pod's allowed clients")
        return client_id

    def _count_peer(self, pod: PodContext, client_id: str, session: TunnelSession) -> None:
        """A client pod needs one connection per pod pair (more only past 256 streams): at
        most `max_peer_connections` into one pod, `max_peer_connections_node` into all."""
        address = session.peername[0] if session.peername else ""
        into_pod = sum(1 for other in pod.tunnels if not other.is_client
                       and other.peer_id == client_id and other.peername is not None
                       and other.peername[0] == address)
        key = (client_id, address)
        on_node = self._peers.get(key, 0)
        if into_pod >= self._settings.max_peer_connections or \
                on_node >= self._settings.max_peer_connections_node:
            raise IdentityRejected("peer_connection_limit", f"{client_id} from {address} already "
                                   f"has {into_pod} tunnel connections into this pod, {on_node} "
                                   "into this node")
        self._peers[key] = on_node + 1

    def _uncount_peer(self, session: TunnelSession) -> None:
        key = (session.peer_id, session.peername[0] if session.peername else "")
        left = self._peers.get(key, 1) - 1
        if left > 0:
            self._peers[key] = left
        else:
            self._peers.pop(key, None)

    def _refused(self, pod: PodContext, peer: object, reason: str, detail: str) -> None:
        """Counted every time; logged at most once a second per reason (a flood of them
        must not become a flood of log lines), saying how many went unlogged meanwhile."""
        self._metrics.handshake_failures.labels("inbound", reason).inc()
        now = self._clock()
        last, unlogged = self._last_logged.get(reason, (-1.0, 0))
        if now - last < 1.0:
            self._last_logged[reason] = last, unlogged + 1
            return
        self._last_logged[reason] = now, 0
        log.info("mesh tunnel into %s/%s from %s refused: %s%s", pod.namespace, pod.name, peer,
                 detail, f" ({unlogged} more refused for {reason} in the last second)" if unlogged else "")

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


class _Refused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TunnelListener:
    """A pod's 15008 listener, with the parts of asyncio.Server the pod manager uses."""

    def __init__(self, sock: socket.socket) -> None:
        self.sockets = [sock]
        self.connections: set[asyncio.Task[None]] = set()
        self._serving = True
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: Callable[[], None] | None = None
        self._resting: asyncio.TimerHandle | None = None

    def watch(self, loop: asyncio.AbstractEventLoop, ready: Callable[[], None]) -> None:
        """`ready()` whenever a connection waits in the backlog (until `close`)."""
        self.sockets[0].setblocking(False)
        self._loop, self._ready = loop, ready
        loop.add_reader(self.sockets[0].fileno(), ready)

    def rest(self, seconds: float) -> None:
        """Stop watching for `seconds` (accepting failed: fds or memory short)."""
        if self._loop is None or self._resting is not None or not self._serving:
            return
        self._loop.remove_reader(self.sockets[0].fileno())
        self._resting = self._loop.call_later(seconds, self._wake)

    def _wake(self) -> None:
        self._resting = None
        if self._serving and self._loop is not None and self._ready is not None:
            self._loop.add_reader(self.sockets[0].fileno(), self._ready)

    def is_serving(self) -> bool:
        return self._serving

    def close(self) -> None:
        if not self._serving:
            return
        self._serving = False
        if self._resting is not None:
            self._resting.cancel()
        elif self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.sockets[0].fileno())
        self._ready = None
        for task in list(self.connections):
            task.cancel()
        self.sockets[0].close()


class Listener(Protocol):
    """A pod's listener, as pod lifecycle keeps it: an asyncio.Server or a TunnelListener."""

    @property
    def sockets(self) -> Sequence[socket.socket]: ...
    def is_serving(self) -> bool: ...
    def close(self) -> None: ...


async def serve_tunnel(acceptor: TunnelAcceptor | None, pod: PodContext, sock: socket.socket,
                       metrics: AgentMetrics) -> Listener:
    """A pod's 15008: the mTLS mesh tunnel. Without identities on this agent, or a
    certificate for the pod, it refuses tunnel connections with RST, counted."""
    if acceptor is not None and pod.identity is not None:
        return acceptor.serve(pod, sock)

    class Refuse(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            metrics.proxy_errors.labels("inbound", "tunnel_unavailable").inc()
            sock = transport.get_extra_info("socket")
            if sock is not None:
                arm_reset(sock)
            cast(asyncio.Transport, transport).abort()

    return await asyncio.get_running_loop().create_server(Refuse, sock=sock, backlog=LISTEN_BACKLOG)
