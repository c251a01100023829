"""A socket handed to the event loop (`create_connection(sock=...)`, `connect_accepted_socket`)
whose TLS handshake fails: uvloop closes the descriptor itself but the socket object keeps its
number, and the next socket opened gets that number. Closing the object then (what the agent
did) closed — or reset — a stranger's connection, and left libuv watching a descriptor it no
longer had: EEXIST at the next registration, a TLS client reading another connection's
plaintext, and finally an abort of the whole agent (seen with 50 tunnels refused at once).
`close_handed_over` closes only what is still the same socket. Both event loops are checked:
the agent runs on uvloop, the tests of other modules on asyncio's."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import struct
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from agent.dataplane.sockets import close_handed_over, socket_identity


def run(loop_name: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    if loop_name == "uvloop":
        uvloop = pytest.importorskip("uvloop") if not os.environ.get("CI") else __import__("uvloop")
        uvloop.run(main())
    else:
        asyncio.run(main())


async def failed_handover() -> tuple[socket.socket, tuple[int, int] | None, int, socket.socket]:
    """A client socket whose TLS handshake the server reset, after the loop had it."""
    loop = asyncio.get_running_loop()
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    client = socket.socket()
    client.setblocking(False)
    await loop.sock_connect(client, server.getsockname())
    accepted, _ = await loop.sock_accept(server)
    accepted.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    accepted.close()  # RST: the handshake fails
    server.close()
    number, identity = client.fileno(), socket_identity(client)
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with pytest.raises((OSError, ssl.SSLError)):
        await loop.create_connection(asyncio.Protocol, sock=client, ssl=context,
                                     server_hostname="", ssl_handshake_timeout=5)
    return client, identity, number, server


def stranger_on(number: int) -> tuple[socket.socket, socket.socket]:
    """A connected pair whose first end holds descriptor `number` (if it is free)."""
    one, other = socket.socketpair()
    if one.fileno() != number:
        try:
            os.fstat(number)
        except OSError:  # free: put the stranger there, as the next accept() would
            os.dup2(one.fileno(), number)
            one.close()
            one = socket.socket(fileno=number)
    return one, other


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
@pytest.mark.parametrize("reset", [False, True])
def test_a_failed_handover_never_closes_the_socket_that_took_its_number(loop_name: str, reset: bool) -> None:
    async def main() -> None:
        client, identity, number, _ = await failed_handover()
        assert identity is not None
        if client.fileno() < 0:  # asyncio's loop closed the object itself: nothing to do
            close_handed_over(client, identity, reset=reset)
            return
        descriptor_closed = socket_identity(client) is None
        stranger, peer = stranger_on(number)
        try:
            if descriptor_closed:  # uvloop: the number is the stranger's now
                assert stranger.fileno() == number
            close_handed_over(client, identity, reset=reset)
            assert client.fileno() == -1  # forgotten or closed: never used again
            stranger.sendall(b"still here")  # the stranger's connection is whole
            assert peer.recv(64) == b"still here"
            peer.sendall(b"and back")
            assert stranger.recv(64) == b"and back"
        finally:
            stranger.close()
            peer.close()

    run(loop_name, main)


def test_a_socket_still_ours_is_closed_and_reset() -> None:
    one, other = socket.socketpair()
    try:
        identity = socket_identity(one)
        number = one.fileno()
        close_handed_over(one, identity, reset=True)
        assert one.fileno() == -1
        with pytest.raises(OSError):
            os.fstat(number)  # really closed, not merely forgotten
    finally:
        other.close()


def test_an_unknown_identity_forgets_rather_than_closes() -> None:
    one, other = socket.socketpair()
    number = one.fileno()
    try:
        close_handed_over(one, None)
        os.fstat(number)  # still open: not ours to close when we cannot tell
    finally:
        os.close(number)
        other.close()
