"""A pod's 15001/15006 listener, served: its connections accepted in C (csrc/podio.c,
`PodAcceptor`), each a `PodTransport` whose protocol (a relay's client side) is told
`connection_made` in the accept's own call — what `loop.create_server(sock=...)` does, without
uvloop's transport per connection (made, tracked in a weak dictionary, told one loop
iteration later: issue #16's new connections). Without the C module, the event loop's server."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Sequence
from typing import Any

from agent.core.compiled import c_extension
from agent.dataplane.sockets import LISTEN_BACKLOG

log = logging.getLogger(__name__)
ACCEPT_RETRY_DELAY = 1.0  # seconds, as asyncio's servers: out of descriptors or memory, again after


# pods' 15001/15006 accepted in C (csrc/podio.c); None: the event loop's server
POD_ACCEPTOR: Any = c_extension("agent.dataplane._podio", "PodAcceptor")  # not Final: tests take it away


class PodServer:
    """A listener served by a `PodAcceptor`, with the parts of asyncio.Server pod lifecycle
    uses (`agent.dataplane.mesh.Listener`). An accept that fails for want of descriptors or
    memory stops accepting for `ACCEPT_RETRY_DELAY`, logged, as asyncio's servers do."""

    __slots__ = ("_acceptor", "_loop", "_retry", "_sock")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 factory: Callable[[], asyncio.Protocol]) -> None:
        self._loop = loop
        self._sock = sock
        self._retry: asyncio.TimerHandle | None = None
        sock.setblocking(False)  # a listener from the keeper may come blocking
        sock.listen(LISTEN_BACKLOG)
        self._acceptor = POD_ACCEPTOR(loop, sock, factory, self._failed)
        self._acceptor.start()

    @property
    def sockets(self) -> Sequence[socket.socket]:
        return (self._sock,) if self._sock.fileno() >= 0 else ()

    def is_serving(self) -> bool:
        return bool(self._acceptor.serving) or self._retry is not None

    def close(self) -> None:
        """Accept no more and close the listening socket (a keeper's or the budget's duplicate
        keeps the listener, and its backlog, alive)."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._sock.fileno() >= 0:
            self._acceptor.stop()
            self._sock.close()

    def _failed(self, exc: OSError) -> None:
        log.error("accepting on %s: %s; trying again in %.0f s", self._sock.getsockname(), exc,
                  ACCEPT_RETRY_DELAY)
        self._retry = self._loop.call_later(ACCEPT_RETRY_DELAY, self._again)

    def _again(self) -> None:
        self._retry = None
        if self._sock.fileno() >= 0:
            self._acceptor.start()


async def serve_pod(factory: Callable[[], asyncio.Protocol], sock: socket.socket) -> Any:
    """`sock` (listening) served: each connection a `factory()` protocol. A `PodServer`, or
    without the C module the event loop's own server."""
    loop = asyncio.get_running_loop()
    if POD_ACCEPTOR is not None:
        return PodServer(loop, sock, factory)
    return await loop.create_server(factory, sock=sock, backlog=LISTEN_BACKLOG)
