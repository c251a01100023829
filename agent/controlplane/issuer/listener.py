"""A TCP (optionally TLS) listener that holds a bounded number of connections, each for a bounded time.

`asyncio.start_server(ssl=...)` wraps every accepted socket in TLS at once, and asyncio's TLS
transport allocates a 256 KiB read buffer: 400 idle connections took the issuer from 37 to
150 MiB. This listener runs its own accept loop instead (as the data plane's TunnelAcceptor does):

1. accept; over `max_connections` held, reset the socket at once (limits.admit_connection says why);
2. wait, holding only the socket, until the client sends its first byte;
3. take one of `max_tls` TLS slots, then handshake;
4. hand the streams to the handler, which owns the request deadline and the reply.

Steps 2-3 share one deadline (`handshake_timeout`). The TLS slot is given back only when the
transport has really closed (asyncio would otherwise wait up to 30 s for a peer's close_notify
with the buffer still allocated), so TLS state never exceeds `max_tls` connections. Every refusal
and timeout is counted in `pinion_issuer_connections_refused_total{listener,reason}` and logged at
debug level, with one summary line per reason at most every LOG_INTERVAL seconds (a flood must not
become a log flood).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections import Counter as Tally
from collections.abc import Awaitable, Callable
from typing import Any

from agent.controlplane.issuer.limits import REFUSAL_REASONS, ListenerLimits, admit_connection
from agent.dataplane.slots import SourceSlots
from agent.dataplane.sockets import arm_reset, close_handed_over, first_bytes, socket_identity
from agent.observability.exposition import CollectorRegistry, Counter

log = logging.getLogger(__name__)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, str], Awaitable[None]]
LOG_INTERVAL = 10.0
CLOSE_TIMEOUT = 1.0  # for the TLS close_notify exchange once the reply is out; then reset
BACKLOG = 512


def connection_refusals(registry: CollectorRegistry, listeners: tuple[str, ...]) -> Counter:
    """pinion_issuer_connections_refused_total{listener,reason}, every series present from the start."""
    refusals = Counter("pinion_issuer_connections_refused",
                       "Connections reset or timed out before a complete request, by listener and reason",
                       ["listener", "reason"], registry=registry)
    for listener in listeners:
        for reason in REFUSAL_REASONS:
            refusals.labels(listener, reason)
    return refusals


class BoundedListener:
    """Serves `handler` on one listening socket within `limits`; `context` None means plain TCP."""

    def __init__(self, name: str, handler: Handler, limits: ListenerLimits, refusals: Counter, *,
                 context: ssl.SSLContext | None = None, stream_limit: int = 64 * 1024) -> None:
        self.name = name
        self._handler = handler
        self._limits = limits
        self._refusals = refusals
        self._context = context
        self._stream_limit = stream_limit
        self._tls_slots = asyncio.Semaphore(limits.max_tls)
        self._held_by_source: dict[str, int] = {}  # address -> connections it holds
        self._source_slots = SourceSlots(limits.max_tls_per_source)
        self._connections: set[asyncio.Task[None]] = set()
        self._socket: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._unlogged: Tally[str] = Tally()
        self._logged_at = 0.0

    @property
    def held(self) -> int:
        """Connections accepted and not yet finished, whatever their stage."""
        return len(self._connections)

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen; returns the address bound (port 0 picks one)."""
        self._socket = _listening_socket(host, port)
        self._accepting = asyncio.get_running_loop().create_task(self._accept_forever(self._socket))
        bound = self._socket.getsockname()
        return bound[0], bound[1]

    async def close(self) -> None:
        """Stop accepting, end every connection, and wait until all are gone."""
        tasks = [task for task in (self._accepting, *self._connections) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._socket is not None:
            self._socket.close()

    def refused(self, peer: str, reason: str) -> None:
        """Count and (debug-)log one connection that ended without a complete request."""
        self._refusals.labels(self.name, reason).inc()
        log.debug("%s: %s: connection refused: %s", self.name, peer, reason)
        self._unlogged[reason] += 1
        now = time.monotonic()
        if now - self._logged_at >= LOG_INTERVAL:
            summary = ", ".join(f"{count} {reason}" for reason, count in sorted(self._unlogged.items()))
            log.info("%s: connections refused since the last report: %s (holding %d)", self.name, summary,
                     self.held)
            self._unlogged.clear()
            self._logged_at = now

    async def _accept_forever(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, address = await loop.sock_accept(listening)
            except OSError as exc:  # e.g. EMFILE: wait for connections to finish, do not spin
                log.warning("%s: accept failed: %s", self.name, exc)
                await asyncio.sleep(0.1)
                continue
            peer, source = _peer(address), str(address[0])
            held = self._held_by_source.get(source, 0)
            reason = admit_connection(self.held, self._limits, held)
            if reason is not None:
                _reset(sock)
                self.refused(peer, reason)
                continue
            self._held_by_source[source] = held + 1
            task = loop.create_task(self._connection(sock, peer, source))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _connection(self, sock: socket.socket, peer: str, source: str) -> None:
        """One accepted socket, start to end; whatever happens, the socket is closed on return."""
        writer: asyncio.StreamWriter | None = None
        has_slot = False
        stage = "silent"
        handed = socket_identity(sock)
        try:
            async with asyncio.timeout(self._limits.handshake_timeout):
                if not await first_bytes(sock):
                    self.refused(peer, "silent")  # closed (or reset) without a byte
                    return
                stage = "too_many_handshakes"
                await self._source_slots.acquire(source)  # its own first: not everyone's
                try:
                    await self._tls_slots.acquire()
                except BaseException:
                    self._source_slots.release(source)
                    raise
                has_slot = True
                stage = "handshake_timeout"
                reader, writer = await self._open(sock)
            stage = ""
            await self._handler(reader, writer, peer)
        except TimeoutError:
            self.refused(peer, stage or "read_timeout")
        except (OSError, ssl.SSLError) as exc:
            if stage:  # after the handshake, the handler has seen and logged its own failures
                self.refused(peer, "handshake_failed")
                log.debug("%s: %s: handshake failed: %s", self.name, peer, exc)
        except Exception:  # a bug in the handler must cost one connection, not the listener
            log.exception("%s: %s: the handler failed", self.name, peer)
        finally:
            if writer is None:  # unless the event loop closed it (TLS failed) and its number is reused
                close_handed_over(sock, handed, reset=True)
            else:
                await _close(writer)
            if has_slot:
                self._tls_slots.release()
                self._source_slots.release(source)
            left = self._held_by_source[source] - 1
            if left:
                self._held_by_source[source] = left
            else:
                del self._held_by_source[source]

    async def _open(self, sock: socket.socket) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The streams over `sock`, after the TLS handshake if there is a context."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=self._stream_limit)
        protocol = asyncio.StreamReaderProtocol(reader)
        tls: dict[str, Any] = {}
        if self._context is not None:
            tls = {"ssl": self._context, "ssl_handshake_timeout": self._limits.handshake_timeout,
                   "ssl_shutdown_timeout": CLOSE_TIMEOUT}
        try:
            transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock, **tls)
        except BaseException as exc:
            # exception -> traceback -> asyncio's frame -> its waiter -> exception is a cycle that keeps
            # the failed TLS transport's 256 KiB buffer alive until a garbage collection: break it now.
            exc.__traceback__ = None
            raise
        return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


def _listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listening = socket.socket(family, socket.SOCK_STREAM)
    try:
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.bind((host, port))
        listening.listen(BACKLOG)
        listening.setblocking(False)
    except OSError:
        listening.close()
        raise
    return listening


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close, allowing CLOSE_TIMEOUT for a TLS close_notify exchange, then reset."""
    writer.close()
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await writer.wait_closed()
    except (TimeoutError, OSError, ssl.SSLError):
        writer.transport.abort()
    except asyncio.CancelledError:
        writer.transport.abort()
        raise


def _reset(sock: socket.socket) -> None:
    """Close with a RST (SO_LINGER 0): nothing lingers in TIME_WAIT or FIN_WAIT on the issuer's side."""
    arm_reset(sock)
    sock.close()


def _peer(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return "?"
