"""The tunnel's TLS without an SSL protocol layer: the handshake on the raw socket, then
records opened and sealed by the tunnel session itself.

uvloop's SSL protocol sits between a TCP transport and the tunnel session and moves every
record through its own state machine (a read loop, a write backlog, flow control of its own,
an app transport), each step a call between Cython, `_ssl` and Python; per paced request that
layer cost about as much as the records' cryptography (docs/fastpath.md). Here the tunnel
connection is a plain TCP transport, and the session (compiled) hands what it reads to
`TunnelTls.open` and what it writes to `TunnelTls.seal`: `_ssl`'s C methods on the same
memory BIOs uvloop used, two calls per record.

`handshake` does what uvloop did before the session saw its transport: the TLS handshake
over the socket, within a deadline, raising what uvloop raised (`ssl.SSLError` and its
subclasses from OpenSSL, `TimeoutError`, `ConnectionResetError` when the peer closes) so
`handshake_failure_reason` labels failures as before. Nothing is read past what the
handshake needs that is not kept: bytes that came with the last handshake record stay in
the incoming BIO, and the session opens them first.

`start_session` then puts the session on the socket. Where `agent.dataplane._tlsio` is built
(csrc/tlsio.c) its `TlsTransport` does the socket and the records in C, one call per
readiness (`TLS_TRANSPORT`), and the session sees a transport that speaks plaintext (as an
SSL transport); otherwise, or with `PINION_PURE_PYTHON=1`, the session runs on a plain uvloop
TCP transport and opens and seals the records itself through `TunnelTls`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any, TypeVar

from agent.core.compiled import c_extension
from agent.dataplane.sockets import readable

log = logging.getLogger(__name__)
_P = TypeVar("_P", bound=asyncio.Protocol)

RECORD_PLAINTEXT_MAX = 16384  # the most a TLS record carries (RFC 8446 5.1)
HANDSHAKE_READ = 16384  # bytes read from the socket at a time while handshaking


class TunnelTls:
    """One tunnel connection's TLS, established: `open` and `seal` records."""

    __slots__ = ("_in_write", "_incoming", "_out_read", "_outgoing", "_pending", "_read", "_write",
                 "peer_closed", "ssl_object")

    def __init__(self, ssl_object: ssl.SSLObject, incoming: ssl.MemoryBIO,
                 outgoing: ssl.MemoryBIO) -> None:
        self.ssl_object = ssl_object
        inner: Any = getattr(ssl_object, "_sslobj", ssl_object)  # _ssl's own object: C methods
        self._read = inner.read
        self._write = inner.write
        self._pending = inner.pending
        self._incoming = incoming
        self._outgoing = outgoing
        self._in_write = incoming.write
        self._out_read = outgoing.read
        self.peer_closed = False  # the peer's close_notify arrived

    @property
    def has_input(self) -> bool:
        """Bytes wait in the incoming BIO (or decrypted in OpenSSL) to be opened."""
        return bool(self._incoming.pending or self._pending())

    @property
    def has_output(self) -> bool:
        """OpenSSL wrote something of its own (a post-handshake message) to send."""
        return bool(self._outgoing.pending)

    def open(self, data: bytes) -> bytes:
        """The plaintext of every whole record in what was read so far (`data` appended to
        what waited). Raises `ssl.SSLError` on a bad record; sets `peer_closed` at the
        peer's close_notify. Asks while something is pending, as uvloop does, so a read
        that would block (an exception, costly) happens only on a partial record."""
        if data:
            self._in_write(data)
        read, pending, incoming = self._read, self._pending, self._incoming
        first = b""
        chunks: list[bytes] | None = None
        while incoming.pending or pending():
            try:
                chunk: bytes = read(RECORD_PLAINTEXT_MAX)
            except ssl.SSLWantReadError:
                break
            if not chunk:
                self.peer_closed = True
                break
            if not first:
                first = chunk
            elif chunks is None:
                chunks = [first, chunk]
            else:
                chunks.append(chunk)
        return first if chunks is None else b"".join(chunks)

    def seal(self, data: bytes) -> bytes:
        """`data` as TLS records, with anything OpenSSL had to send before them."""
        self._write(data)
        sealed: bytes = self._out_read()
        return sealed

    def output(self) -> bytes:
        """What OpenSSL wrote of its own since (a key update's answer, ...)."""
        written: bytes = self._out_read()
        return written

    def close_notify(self) -> bytes:
        """Our close_notify alert, to send before closing the connection."""
        with contextlib.suppress(ssl.SSLError, ValueError):  # waits for the peer's, or gone
            self.ssl_object.unwrap()
        written: bytes = self._out_read()
        return written


async def handshake(sock: socket.socket, context: ssl.SSLContext, server_side: bool,
                    timeout: float) -> TunnelTls:
    """The TLS handshake on `sock` (connected, non-blocking), within `timeout` seconds."""
    loop = asyncio.get_running_loop()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    ssl_object = context.wrap_bio(incoming, outgoing, server_side=server_side,
                                  server_hostname=None)
    sock.setblocking(False)
    async with asyncio.timeout(timeout):
        while True:
            try:
                ssl_object.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            except ssl.SSLError:
                _send_best_effort(sock, outgoing.read())  # our alert, if any
                raise
            written = outgoing.read()
            if written:
                await loop.sock_sendall(sock, written)
            if done:
                return TunnelTls(ssl_object, incoming, outgoing)
            data = await _receive(sock)
            if not data:
                raise ConnectionResetError("the peer closed the connection during the TLS handshake")
            incoming.write(data)


# the tunnel connection as one C transport (csrc/tlsio.c); None: TunnelTls, in Python
TLS_TRANSPORT: Any = c_extension("agent.dataplane._tlsio", "TlsTransport")  # not Final: tests take it away


def tls_transport_build() -> str:
    """What carries the tunnel's records, for the start-up log."""
    return "C (agent.dataplane._tlsio)" if TLS_TRANSPORT is not None else "python (TunnelTls)"


async def start_session(sock: socket.socket, tls: TunnelTls,
                        make: Callable[[TunnelTls | None], _P]) -> _P:
    """The protocol `make` builds, connected on `sock` after `handshake`. `make` gets the
    `TunnelTls` when the protocol must open and seal records itself (the Python path), None
    when the transport does (the C one)."""
    global TLS_TRANSPORT
    if TLS_TRANSPORT is not None:
        protocol = make(None)
        try:
            transport = TLS_TRANSPORT(asyncio.get_running_loop(), sock, tls.ssl_object, protocol)
        except TypeError as exc:  # an _ssl of another layout: so for every connection
            log.warning("tunnel TLS in C unavailable (%s): records in Python", exc)
            TLS_TRANSPORT = None
        else:
            transport.start()
            return protocol
    _, protocol = await asyncio.get_running_loop().connect_accepted_socket(lambda: make(tls), sock)
    return protocol


async def _receive(sock: socket.socket) -> bytes:
    while True:
        try:
            return sock.recv(HANDSHAKE_READ)
        except (BlockingIOError, InterruptedError):
            pass
        await readable(sock)


def _send_best_effort(sock: socket.socket, data: bytes) -> None:
    if data:
        with contextlib.suppress(OSError):
            sock.send(data)

