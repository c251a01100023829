"""Connecting upstream sockets without the event loop's sock_connect, on loopback, with both
event loops the agent runs on. Connected, refused, timed-out and cancelled connects all
leave no writer registered, so the caller may close the socket at once."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import pytest

from agent.dataplane.sockets import connect

uvloop = pytest.importorskip("uvloop")
LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture(params=sorted(LOOPS))
def loop(request: pytest.FixtureRequest) -> Iterator[asyncio.AbstractEventLoop]:
    event_loop = LOOPS[request.param]()
    yield event_loop
    event_loop.close()


@contextlib.contextmanager
def listener(backlog: int = 16) -> Iterator[tuple[str, int]]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(backlog)
    try:
        yield server.getsockname()
    finally:
        server.close()


@contextlib.contextmanager
def unanswered() -> Iterator[tuple[str, int]]:
    """A listener whose accept queue is full: the kernel drops further SYNs."""
    with listener(backlog=0) as address:
        fillers = [client() for _ in range(4)]
        try:
            for filler in fillers:
                filler.connect_ex(address)
            yield address
        finally:
            for filler in fillers:
                filler.close()


def client() -> socket.socket:
    return socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)


def test_a_listening_peer_is_connected(loop: asyncio.AbstractEventLoop) -> None:
    with listener() as address, client() as sock:
        loop.run_until_complete(connect(loop, sock, address, 1.0))
        assert sock.getpeername() == address
        assert not loop.remove_writer(sock.fileno())


def test_a_closed_port_is_refused(loop: asyncio.AbstractEventLoop) -> None:
    with listener() as address:
        pass
    with client() as sock, pytest.raises(ConnectionRefusedError):
        loop.run_until_complete(connect(loop, sock, address, 1.0))


def test_no_answer_times_out_and_leaves_no_writer(loop: asyncio.AbstractEventLoop) -> None:
    with unanswered() as address, client() as sock:
        with pytest.raises(TimeoutError, match=r"no answer in 0\.2 s"):
            loop.run_until_complete(connect(loop, sock, address, 0.2))
        assert not loop.remove_writer(sock.fileno())


def test_a_cancelled_connect_leaves_no_writer(loop: asyncio.AbstractEventLoop) -> None:
    async def cancel_while_waiting(sock: socket.socket, address: tuple[str, int]) -> None:
        task = asyncio.ensure_future(connect(loop, sock, address, 30.0))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not loop.remove_writer(sock.fileno())

    with unanswered() as address, client() as sock:
        loop.run_until_complete(cancel_while_waiting(sock, address))
