"""The socket factory: listeners and upstream sockets inside pod namespaces, marked, and
the original destination of a redirected connection. The proxy never touches namespaces."""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import errno
import os
import socket
import struct
from typing import Any

from agent.dataplane.netns import NetNs, NetnsSwitch

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP_TRANSPARENT = 19  # linux/in.h
# A pod's listeners' accept queue: what waits there while the agent is busy or its budget is
# out. Every listen() of 15001/15006 must pass it: asyncio's and uvloop's create_server(sock=)
# call listen() again with their own default, 100 (issue #21).
LISTEN_BACKLOG = 1024
_LINGER_RESET = struct.pack("ii", 1, 0)


class SocketFactory:
    def __init__(self, switch: NetnsSwitch, mark: int) -> None:
        self._switch = switch
        self._mark = mark

    def listener(self, netns: NetNs, host: str, port: int,
                 backlog: int = LISTEN_BACKLOG) -> socket.socket:
        """A listening TCP socket bound inside `netns`."""
        sock = self._switch.call(netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            set_keepalive(sock)  # every accepted socket inherits it: a vanished client is found
            sock.bind((host, port))
            sock.listen(backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def upstream(self, netns: NetNs, source: tuple[str, int] | None = None) -> socket.socket:
        """A non-blocking TCP socket in `netns` carrying the Pinion mark, so capture skips it.

        Created in the pod's namespace, its source address is the pod's own IP; or, given
        `source` (a client's address), a transparent socket that speaks as that client."""
        sock = self._switch.call(netns, _nonblocking_tcp_socket)
        try:
            if self._mark:  # 0: nothing here is captured (the multicluster gateway's own pod)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self._mark)
            # TCP_NODELAY: the event loop sets it on every transport it makes of a socket
            if source is not None:
                _bind_as(sock, source)
        except OSError:
            sock.close()
            raise
        return sock


def _nonblocking_tcp_socket() -> socket.socket:
    return socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)


def _bind_as(sock: socket.socket, client: tuple[str, int]) -> None:
    """Bind to the client's IP and a port other than the client's own: the same 4-tuple
    would be the client's original (redirected) conntrack entry, and be redirected again."""
    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((client[0], 0))
    if sock.getsockname()[1] == client[1]:  # 1 in ~28,000: pick again, explicitly
        raise OSError(98, "transparent bind chose the client's own port")


async def connect(loop: asyncio.AbstractEventLoop, sock: socket.socket, address: tuple[str, int],
                  timeout: float) -> None:
    """Connect a non-blocking socket to an IP address, or raise OSError / TimeoutError.

    Not `loop.sock_connect`: uvloop resolves even a literal IP address there, with
    `getaddrinfo` in its thread pool (a thread hand-off for every connection). The writer
    is removed before this returns or raises (also when cancelled), so the caller may close
    the socket at once."""
    if connect_at_once(sock, address):
        return
    future: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()
    loop.add_writer(fd, _settle, future, 0.0)
    timer = loop.call_later(timeout, _settle, future, timeout)
    try:
        await future
    finally:
        loop.remove_writer(fd)
        timer.cancel()
    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if code != 0:
        raise OSError(code, os.strerror(code))


def connect_at_once(sock: socket.socket, address: tuple[str, int]) -> bool:
    """Start connecting a non-blocking socket to an IP address: True if it is connected when
    this returns, False if the handshake is still in progress (wait until it is writable),
    OSError if it failed at once (ECONNREFUSED, ENETUNREACH...)."""
    code = sock.connect_ex(address)
    if code == errno.EINPROGRESS:
        # Within a node the handshake has often completed before connect() returned (the
        # kernel ran the peer's side in the same softirq): ask once more before polling.
        code = sock.connect_ex(address)
        if code == errno.EISCONN:
            return True
    if code == 0:
        return True
    if code in (errno.EINPROGRESS, errno.EALREADY):
        return False
    raise OSError(code, os.strerror(code))


def _settle(future: asyncio.Future[None], timed_out_after: float) -> None:
    if not future.done():
        if timed_out_after:
            future.set_exception(TimeoutError(f"no answer in {timed_out_after:g} s"))
        else:
            future.set_result(None)


def original_destination(sock: Any) -> tuple[str, int]:
    """Where a REDIRECTed connection was going, from conntrack (SO_ORIGINAL_DST). `sock` is a
    transport's socket: uvloop's (a PseudoSocket) makes, uses and detaches a whole Python
    `socket.socket` for every getsockopt (~5 µs of an accept's Python, issue #16), so the
    option is read through a bare `_socket.socket` on its descriptor, C calls only. An object
    without a descriptor (a test's stand-in for a redirected socket) is asked directly."""
    fileno = getattr(sock, "fileno", None)
    if fileno is None:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    else:
        bare = _socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fileno())
        try:
            raw = bare.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        finally:
            bare.detach()  # the descriptor stays the transport's
    port = struct.unpack_from("!H", raw, 2)[0]
    return socket.inet_ntoa(raw[4:8]), port


def set_keepalive(sock: socket.socket) -> None:
    """Find a dead peer (a vanished client, a half-open tunnel) within ~90 s, not hours."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


def arm_reset(sock: socket.socket) -> None:
    """Make the next close send RST instead of FIN (propagating a peer's reset)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


def socket_identity(sock: socket.socket) -> tuple[int, int] | None:
    """`sock`'s identity in the kernel (its sockfs device and inode), or None if it has no
    open descriptor: a descriptor *number* is reused as soon as it is closed, this is not."""
    try:
        status = os.fstat(sock.fileno())
    except (OSError, ValueError):
        return None
    return status.st_dev, status.st_ino


def close_handed_over(sock: socket.socket, identity: tuple[int, int] | None,
                      reset: bool = False) -> None:
    """Close `sock` after the event loop it was handed to (`create_connection(sock=...)`,
    `connect_accepted_socket`) failed with it; `identity` is `socket_identity(sock)` from
    before. uvloop has then closed the descriptor itself but leaves the socket object holding
    its number, which by now may be another connection's: closing (or arming a reset on) that
    number would cut a stranger's connection, and the event loop's watcher of the stranger's
    descriptor would go stale (EEXIST at the next registration, then an abort in libuv).
    asyncio's own loop closes the object (fileno -1) or leaves it open. So close it — with an
    RST if `reset` — only while the number is still this socket; else forget the number."""
    if sock.fileno() < 0:
        return
    if identity is None or socket_identity(sock) != identity:
        sock.detach()
        return
    if reset:
        arm_reset(sock)
    sock.close()


async def readable(sock: socket.socket) -> None:
    """Wait until `sock` (non-blocking) has something to read, or its end: a future and the
    event loop's reader, nothing read."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()
    loop.add_reader(fd, _wake, ready)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def first_bytes(sock: socket.socket) -> bool:
    """Wait until the peer sends something; False if it closed (or reset) instead. Nothing
    is read, nothing allocated but a future: what a listener does before any TLS state."""
    while True:
        await readable(sock)
        try:
            return bool(sock.recv(1, socket.MSG_PEEK))
        except (BlockingIOError, InterruptedError):
            continue  # a spurious wake-up
        except OSError:
            return False


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)
