"""The relay both proxies share: a client connection and its upstream, bytes both ways.

A connection accepted on a pod's 15001 (outbound) or 15006 (inbound) listener, or a tunnel
stream, is paired with an upstream (a socket created inside the same pod's netns, or a
tunnel stream): half-close is forwarded as a FIN, a reset or error as an RST, and when one
side's send buffer fills, reading from the other side pauses (no unbounded buffering).
Every connection is counted exactly once when it ends. Which upstream, and whether at all,
is the proxies' business (`agent.dataplane.outbound`, `.inbound`); `PlainUpstream` is the
plain-TCP path both of them take."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from agent.core.accounting import Record
from agent.core.compiled import c_extension
from agent.core.detect import ConnectionObserver, DirectFeed
from agent.core.detect import Protocol as Wire
from agent.core.telemetry import (
    PLAINTEXT,
    ConnectionRecord,
    HttpCounters,
    PeerLabels,
    Telemetry,
)
from agent.dataplane.context import PodContext
from agent.dataplane.sockets import (
    SocketFactory,
    arm_reset,
    close_handed_over,
    connect,
    connect_at_once,
    socket_identity,
)
from agent.dataplane.tapping import publish_tapped
from agent.observability.metrics import AgentMetrics

log = logging.getLogger(__name__)


# the relay's connection to a pod's app as a C transport (csrc/podio.c); None: the event loop's
POD_TRANSPORT: Any = c_extension("agent.dataplane._podio", "PodTransport")  # not Final: tests take it away


@dataclass(frozen=True, slots=True)
class RelaySettings:
    """One proxy's relay settings."""

    connect_timeout: float  # upstream TCP connect
    buffer_high: int  # bytes one side may have unsent before the other stops reading


class RelayOwner(Protocol):
    """The proxy a relay belongs to, as the relay sees it."""

    @property
    def telemetry(self) -> Telemetry: ...

    def accepted(self, relay: Relay) -> None:
        """The client side is connected (and paused): choose the path, or refuse."""


class Connecting(Protocol):
    """An upstream connect in progress, as the relay sees it: the client going away cancels it
    (a task, or `_Making`)."""

    def cancel(self) -> object: ...


class _Side(asyncio.Protocol):
    """One socket of a relayed pair. Reading pauses while the other side cannot keep up."""

    __slots__ = ("closing", "data_received", "eof", "is_client", "relay", "send", "transport",
                 "write_blocked")

    def __init__(self, relay: Relay, is_client: bool) -> None:
        self.relay = relay
        self.is_client = is_client
        self.transport: asyncio.Transport | None = None
        self.eof = False
        self.write_blocked = False  # our send buffer is over the high-water mark
        # The relay's own method for this side's bytes, as this protocol's data_received:
        # uvloop's transports and tunnel streams take it once, so a chunk costs one Python
        # call to reach the relay, not two (the per-wake-up cost, issue #16).
        self.data_received = relay.from_client if is_client else relay.from_upstream  # type: ignore[method-assign]
        # The transport's write and is_closing, bound once: the relay calls them per chunk, and
        # a method call on a transport from compiled code looks the method up each time.
        self.send: Callable[[bytes], object] | None = None
        self.closing: Callable[[], bool] = _never_closing

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a Transport (uvloop's are not subclasses: no cast() call on this path)
        self.transport = transport  # type: ignore[assignment]
        self.send = transport.write  # type: ignore[attr-defined]
        self.closing = transport.is_closing
        transport.set_write_buffer_limits(high=self.relay.buffer_high)  # type: ignore[attr-defined]
        self.relay.side_made(self)

    def detach(self) -> None:
        """No transport (a tunnel stream refused: the relay dials another)."""
        self.transport = None
        self.send = None
        self.closing = _never_closing

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

    def use_sender(self, write: Callable[[bytes], object], is_closing: Callable[[], bool]) -> None:
        """This side is a tunnel stream whose writes its TLS connection frames in C
        (agent.dataplane._tlsio.Sender): the relay calls the sender's write and is_closing,
        which fall back to the stream's own when the sender cannot take a write."""
        self.send = write
        self.closing = is_closing

    # A tunnel stream's lane (agent.dataplane.tunnel): its DATA delivered from C, as
    # from_client / from_upstream would deliver it, while the relay is in steady state.

    def lane_parts(self, off: Callable[[], None]) -> tuple[Any, Callable[[bytes], object],
                                                          Callable[[], bool]] | None:
        """What a lane for this side's bytes calls — the compiled observer's feed (None when
        nothing observes), the other side's write and is_closing — or None when the relay
        needs its Python path (an observer that is not counting by itself, no upstream yet,
        draining). `off` is kept: the relay takes the lane off when that changes."""
        relay = self.relay
        other = relay.other(self)
        if relay.draining or relay.record is None or relay.early or other.send is None:
            return None
        feed = relay._feed_client if self.is_client else relay._feed_server
        if feed is None and relay.observer is not None:
            return None
        relay.lane_off = off
        return feed, other.send, other.closing

    def lane_counted(self, nbytes: int, chunks: int) -> None:
        """A lane delivered `nbytes` in `chunks` reads: the connection's bytes and activity."""
        relay = self.relay
        relay.activity += chunks
        record = relay.record
        if record is not None:
            if self.is_client:
                record.read(nbytes)
            else:
                record.wrote(nbytes)

    def lane_news(self, records: list[Record] | None) -> None:
        """A lane's feed had news (None: it raised): settled as from_client would."""
        relay = self.relay
        relay.settle(records if records is not None else relay.observer_failed())


class Relay:
    """A client connection and its upstream: forwards bytes, FINs and RSTs, counts once."""

    __slots__ = ("_fast", "_feed_client", "_feed_server", "activity", "buffer_high", "client",
                 "connecting", "destination", "direction", "draining", "early", "early_at",
                 "errno_name", "failed", "http", "idle_since", "lane_off",
                 "moves", "observer", "peer_labels", "peer_pod", "pod", "proxy", "record",
                 "seen_activity",
                 "source", "started", "upstream")

    def __init__(self, proxy: RelayOwner, pod: PodContext, direction: str,
                 buffer_high: int) -> None:
        self.proxy = proxy
        self.pod = pod
        self.direction = direction
        self.buffer_high = buffer_high
        self.client = _Side(self, is_client=True)
        self.upstream = _Side(self, is_client=False)
        self.record: ConnectionRecord | None = None  # opened once the path is chosen
        self.peer_labels: PeerLabels = PLAINTEXT
        self.connecting: Connecting | None = None
        self.early: list[bytes] = []  # client bytes that beat the upstream connect
        self.failed = False
        self.errno_name = ""  # why it failed, as tcp_close_total's errno label ("" = unknown)
        self.destination: tuple[str, int] | None = None
        self.source: tuple[Any, ...] | None = None  # inbound: the client the app should see
        self.early_at = 0.0  # when the first client byte came, if before the path was chosen
        self.started = time.monotonic()
        # bytes moving: a count, not a clock read per chunk; `reap_idle` compares it
        self.activity = self.seen_activity = 0
        self.idle_since = self.started
        # L7: sniffs the first client bytes, then accounts HTTP/1 and HTTP/2 requests
        # without holding, changing or delaying a byte; dropped once the stream is opaque.
        switch = pod.tap
        if switch is None:  # the pod's first relay: its switch (a tap of another pod is not its)
            switch = pod.tap = proxy.telemetry.tap.switch_for(pod.namespace, pod.name,
                                                              pod.owner_kind, pod.owner_name)
        self.observer: ConnectionObserver | None = ConnectionObserver(switch)
        # The compiled HTTP/1 observer once it counts into the connection's series itself: fed
        # directly, one C call per chunk, until a feed returns something to settle (issue #16).
        self._fast: DirectFeed | None = None
        self._feed_client: Callable[[bytes, float], list[Record] | None] | None = None
        self._feed_server: Callable[[bytes, float], list[Record] | None] | None = None
        self.http: HttpCounters | None = None
        self.draining = False  # the agent is stopping: close at the next clean point
        self.moves = 0  # times a refused tunnel stream was carried to another connection
        # what a tunnel stream said of its client pod: (namespace, pod, owner kind, owner name)
        self.peer_pod: tuple[str, str, str, str] | None = None
        # takes a tunnel stream's lane off (its feed or its steady state changed)
        self.lane_off: Callable[[], None] | None = None

    @property
    def fast(self) -> DirectFeed | None:
        return self._fast

    @fast.setter
    def fast(self, fast: DirectFeed | None) -> None:
        """Its feeds bound once (called per chunk; see _Side.send); a lane calling the old
        ones is taken off."""
        self.take_lane_off()
        self._fast = fast
        self._feed_client = None if fast is None else fast.feed_client
        self._feed_server = None if fast is None else fast.feed_server

    def take_lane_off(self) -> None:
        """A tunnel stream's lane calls what is changing now: its stream delivers through the
        session (and this relay's Python path) until it registers a lane again."""
        off = self.lane_off
        if off is not None:
            self.lane_off = None
            off()

    def other(self, side: _Side) -> _Side:
        return self.upstream if side is self.client else self.client

    def upstream_protocol(self) -> _Side:
        """The upstream side, as the protocol factory of a transport made for it."""
        return self.upstream

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
                records = observer.feed_client(data, self.early_at)
                if records is not None:
                    self.settle(records)

    def from_client(self, data: bytes) -> None:
        """The client side's data_received."""
        self.activity += 1
        record = self.record
        if record is None:  # uvloop's early read: counted once the labels are known
            self.early_at = self.early_at or time.monotonic()
        else:
            record.read(len(data))
            feed = self._feed_client
            if feed is not None:
                try:
                    records = feed(data, time.monotonic())
                except Exception:  # a bug: as ConnectionObserver, end its requests, go opaque
                    records = self.observer_failed()
                if records is not None:
                    self.settle(records)
            elif self.observer is not None:
                records = self.observer.feed_client(data, time.monotonic())
                if records is not None:
                    self.settle(records)
        upstream = self.upstream
        send = upstream.send
        if send is None:
            self._hold_early(self.client, data)
        elif not upstream.closing():
            send(data)

    def from_upstream(self, data: bytes) -> None:
        """The upstream side's data_received."""
        self.activity += 1
        record = self.record
        if record is not None:
            record.wrote(len(data))
        feed = self._feed_server
        if feed is not None:
            try:
                records = feed(data, time.monotonic())
            except Exception:  # a bug: as ConnectionObserver, end its requests, go opaque
                records = self.observer_failed()
            if records is not None:
                self.settle(records)
        elif self.observer is not None:
            records = self.observer.feed_server(data, time.monotonic())
            if records is not None:
                self.settle(records)
        client = self.client
        send = client.send
        if send is None:
            self._hold_early(self.upstream, data)
        elif not client.closing():
            send(data)
            if self.draining:
                self.close_if_at_rest()

    def _hold_early(self, side: _Side, data: bytes) -> None:
        self.early.append(data)
        if sum(map(len, self.early)) > self.buffer_high and side.transport is not None:
            side.transport.pause_reading()  # uvloop may not honour the first pause

    def drain(self) -> None:
        """The agent is stopping: end this connection at its next clean point, HTTP/1
        after the response in flight (or now, between requests), with a FIN both ways,
        as a server closes an idle keep-alive connection. HTTP/2 and opaque streams have
        no such point: they run on until they end or the drain deadline resets them."""
        self.draining = True
        self.take_lane_off()
        self.close_if_at_rest()

    def mid_request(self) -> bool:
        """An HTTP/1 request is in flight (its response not complete)."""
        observer = self.observer
        return observer is not None and observer.protocol is Wire.HTTP1 and not observer.at_rest

    def close_if_at_rest(self) -> None:
        observer = self.observer
        if observer is None or not observer.at_rest:
            return
        for side in (self.client, self.upstream):
            if side.transport is not None and not side.transport.is_closing():
                side.transport.close()  # the client's close cancels a connect in progress

    def settle(self, records: list[Record]) -> None:
        """The observer has news: count the requests it started and the Records it returned
        (publishing tapped ones), drop it once opaque. At the first request, with the series
        known, the compiled HTTP/1 observer is handed it and fed directly from then on; any
        later news from it (a hand-over to the Python observer, giving up) ends that."""
        observer = self.observer
        if observer is None:
            return
        self.fast = None
        started = observer.take_started()
        if started or records:
            http = self.http
            if http is None:
                # the first request of a connection: find its pod's HTTP series
                http = self.http = self.proxy.telemetry.http(self.pod.http_labels(
                    self.direction, self.peer_labels, observer.authority))
                self.fast = observer.count_fast(http)
            http.start(started)
            for record in records:
                http.record(record)
                if record.detail is not None:  # started while a tap was open
                    publish_tapped(self, record)
        if observer.opaque:
            self.observer = self.fast = None  # in-flight requests were already ended as failures
        elif self.fast is None and self.http is not None:
            # handed to Python (a tap, an odd message): back on the fast path between messages
            self.fast = observer.take_back(self.http)

    def observer_failed(self) -> list[Record]:
        """A direct feed raised: its requests end as failures, the connection turns opaque."""
        observer = self.observer
        return [] if observer is None else observer.failed()

    def half_closed(self, side: _Side) -> None:
        target = self.other(side)
        if target.transport is None or target.transport.is_closing():
            return  # no upstream yet: side.eof is kept, and side_made passes the FIN on
        # An HTTP/1 server that ends its side between messages answers nothing more (an idle
        # keep-alive connection closed, a draining agent): the client's connection is closed
        # whole, so a request it sends next fails at once instead of waiting for nothing.
        observer = self.observer
        at_rest = observer is not None and observer.at_rest
        if at_rest and side is self.client and self.direction == "inbound":
            # An HTTP/1 client that ends its side between messages asks nothing more: the
            # pod's idle connection to its app is closed with RST, as HAProxy closes idle
            # server connections. A FIN would make the agent the active closer, its socket
            # in TIME_WAIT for 60 s: ~240 B of kernel memory charged to the agent's cgroup
            # per connection, 14 MiB at 1,000 new connections/s (issue #21). Nothing is
            # lost: every request was answered in full. Inbound only: an outbound upstream
            # may be another agent's listener, which would count the RST as a failure.
            self.reset(target)
            if side.transport is not None:
                side.transport.close()
            return
        done = side is self.upstream and at_rest
        if target.eof or done:  # both directions finished: close (flushes what is buffered)
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
            self.errno_name = self.errno_name or errno_name(exc)
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
        if self.record.close(self.failed, self.errno_name):
            self.pod.relays.discard(self)
            observer = self.observer
            if observer is not None:
                self.settle(observer.closed(time.monotonic(), reset=self.failed))
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s %s/%s -> %s: %s after %.1f ms", self.direction, self.pod.namespace,
                          self.pod.name, self.destination, "failed" if self.failed else "closed",
                          (time.monotonic() - self.started) * 1000)


def _never_closing() -> bool:
    return False


def errno_name(exc: BaseException) -> str:
    """ECONNRESET, ETIMEDOUT, ...: the errno of an OS error; "" when it carries none."""
    if isinstance(exc, TimeoutError) and not getattr(exc, "errno", None):
        return "ETIMEDOUT"
    number = getattr(exc, "errno", None)
    return errno.errorcode.get(number, "") if isinstance(number, int) else ""


def reap_idle(relays: set[Relay], timeout: float, now: float) -> int:
    """Reset the relays in which no byte moved either way for `timeout` seconds (a vanished
    peer, a slowloris that stopped); returns how many. Called every sweep: a relay's idleness
    is known to within one sweep interval, at no cost per byte."""
    idle = []
    for relay in relays:
        if relay.activity != relay.seen_activity:
            relay.seen_activity, relay.idle_since = relay.activity, now
        elif now - relay.idle_since >= timeout:
            idle.append(relay)
    for relay in idle:
        relay.abort()
    return len(idle)


class PlainUpstream:
    """Plain TCP from the pod's netns to the destination, for one proxy: each connect in a
    task the relay can cancel and this object owns; a failure refuses the client, counted."""

    def __init__(self, sockets: SocketFactory, metrics: AgentMetrics, connect_timeout: float) -> None:
        self._sockets = sockets
        self._metrics = metrics
        self._connect_timeout = connect_timeout
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None  # once a connect is started

    def spawn(self, relay: Relay, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run `coroutine` as the relay's connecting task (cancelled if the client goes)."""
        task = asyncio.get_running_loop().create_task(coroutine)
        relay.connecting = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def start(self, relay: Relay, destination: tuple[str, int]) -> None:
        """Connect the relay's upstream. Within a node the kernel completes the connect inside
        the call: then the transport is made at once, with no task — a `PodTransport`
        (csrc/podio.c) in this call, or without it the event loop's `create_connection` driven
        from here (`_Making`: its first step now, its last when the transport is made) — so the
        client's first bytes reach the upstream in this loop iteration (three later through a
        task), for less work (issue #16's new connections). A connect still in progress is
        completed in the relay's task (`complete`), with its timeout."""
        try:
            sock = self._upstream_socket(relay.pod, relay.source)
        except OSError as exc:
            self.refuse(relay, "socket", f"cannot create upstream socket: {exc}")
            return
        try:
            connected = connect_at_once(sock, destination)
        except OSError as exc:
            sock.close()  # never handed to the event loop: still ours
            self._connect_failed(relay, destination, exc)
            return
        if not connected:
            self.spawn(relay, self.complete(relay, sock, destination))
            return
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        if POD_TRANSPORT is not None:
            self._carry(relay, sock, destination, loop)
            return
        handed = socket_identity(sock)
        making = _Making(self, relay, loop.create_connection(relay.upstream_protocol, sock=sock),
                         sock, handed, destination)
        relay.connecting = making
        making.step(None)

    async def connect(self, relay: Relay, destination: tuple[str, int]) -> None:
        """`start`'s work as a coroutine (a path that already runs in the relay's task)."""
        try:
            sock = self._upstream_socket(relay.pod, relay.source)
        except OSError as exc:
            self.refuse(relay, "socket", f"cannot create upstream socket: {exc}")
            return
        await self.complete(relay, sock, destination)

    async def complete(self, relay: Relay, sock: socket.socket, destination: tuple[str, int]) -> None:
        """Connect `sock` (made by `_upstream_socket`) and make the upstream's transport."""
        handed = socket_identity(sock)
        try:
            loop = asyncio.get_running_loop()
            await connect(loop, sock, destination, self._connect_timeout)
            if POD_TRANSPORT is not None:
                relay.connecting = None
                self._carry(relay, sock, destination, loop)
                return
            await loop.create_connection(relay.upstream_protocol, sock=sock)
        except asyncio.CancelledError:
            close_handed_over(sock, handed)  # uvloop may have closed it (and its number reused)
            relay.abort()
            return
        except (OSError, TimeoutError) as exc:
            close_handed_over(sock, handed)
            self._connect_failed(relay, destination, exc)
            return
        finally:
            relay.connecting = None
        self.made(relay)

    def _carry(self, relay: Relay, sock: socket.socket, destination: tuple[str, int],
               loop: asyncio.AbstractEventLoop) -> None:
        """The connected socket as the upstream's transport: a `PodTransport` (csrc/podio.c),
        made and connected here, in this call — no coroutine, no loop iteration in between."""
        try:
            transport = POD_TRANSPORT(loop, sock, relay.upstream)
        except OSError as exc:
            sock.close()  # not handed to the event loop: still ours
            self._connect_failed(relay, destination, exc)
            return
        relay.upstream.connection_made(transport)
        transport.start()
        self.made(relay)

    def made(self, relay: Relay) -> None:
        """The upstream's transport is made: the client's bytes may flow."""
        client = relay.client.transport
        if client is not None and not client.is_closing() and not relay.upstream.write_blocked:
            client.resume_reading()  # else resume_writing will, once upstream drains

    def _connect_failed(self, relay: Relay, destination: tuple[str, int], exc: BaseException) -> None:
        relay.errno_name = errno_name(exc)
        reason = errno.errorcode.get(getattr(exc, "errno", 0) or 0, "timeout").lower()
        self.refuse(relay, reason, f"connect {destination[0]}:{destination[1]}: {exc}")

    def _upstream_socket(self, pod: PodContext, source: tuple[Any, ...] | None) -> socket.socket:
        for _ in range(3):
            try:
                return self._sockets.upstream(pod.netns, source)
            except OSError as exc:
                if source is None or exc.errno != errno.EADDRINUSE:
                    raise
        return self._sockets.upstream(pod.netns)  # keep serving, without the client's IP

    def refuse(self, relay: Relay, reason: str, detail: str) -> None:
        """Reset the client: counted under `reason` (pinion_proxy_errors_total), logged."""
        pod = relay.pod
        self._metrics.proxy_errors.labels(relay.direction, reason).inc()
        log.info("%s %s/%s: %s", relay.direction, pod.namespace, pod.name, detail)
        relay.abort()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


class _Making:
    """An upstream transport being made by the event loop, without a task: `create_connection`
    (a coroutine) stepped by hand — its first step at once, the next when the future it
    waits for is done (the loop calls the transport's connection_made first). Cancelled (the
    client went away meanwhile), the relay is reset once the transport exists, as the task's
    cancellation did."""

    __slots__ = ("cancelled", "destination", "handed", "making", "owner", "relay", "sock")

    def __init__(self, owner: PlainUpstream, relay: Relay, making: Any, sock: socket.socket,
                 handed: tuple[int, int] | None, destination: tuple[str, int]) -> None:
        self.owner = owner
        self.relay = relay
        self.making = making
        self.sock = sock
        self.handed = handed
        self.destination = destination
        self.cancelled = False

    def cancel(self) -> bool:
        self.cancelled = True
        return True

    def step(self, _: object) -> None:
        relay = self.relay
        try:
            waiting = self.making.send(None)
        except StopIteration:
            relay.connecting = None
            if self.cancelled:
                relay.abort()
            else:
                self.owner.made(relay)
            return
        except (OSError, asyncio.CancelledError) as exc:
            relay.connecting = None
            close_handed_over(self.sock, self.handed)  # the loop may have closed it already
            if isinstance(exc, OSError) and not self.cancelled:
                self.owner._connect_failed(relay, self.destination, exc)
            else:
                relay.abort()
            return
        if waiting is None:  # a bare yield: step again next iteration
            asyncio.get_running_loop().call_soon(self.step, None)
        else:
            waiting.add_done_callback(self.step)


def protocol_factory(owner: RelayOwner, pod: PodContext, direction: str,
                     buffer_high: int) -> Callable[[], asyncio.Protocol]:
    """For a pod's listener: each accepted connection becomes a relay's client side."""
    def make() -> asyncio.Protocol:
        return Relay(owner, pod, direction, buffer_high).client

    return make
