"""The tunnel's TLS records through `DirectSSLObject` (uvloop's SSL protocol calling `_ssl`'s
read/write/pending directly): two real tunnel sessions over loopback TCP with the agents'
own mTLS contexts, megabytes both ways on several streams, identities checked as mesh.py
checks them, and the record methods really the C ones."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
from pathlib import Path
from typing import Any, cast

import pytest
import uvloop

from agent.dataplane.mesh import verify_identity
from agent.dataplane.tunnel import DirectSSLObject, TunnelSession, direct_records
from agent.identity.files import init_identity_dir
from agent.identity.spiffe import SpiffeId
from tests.unit.test_identity_tls import manager_for, with_pods

CART = SpiffeId("cluster.local", "shop", "cart")
WEB = SpiffeId("cluster.local", "shop", "web")


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    path: Path = tmp_path_factory.mktemp("ca")
    init_identity_dir(path)
    manager = with_pods(manager_for(path), cart=CART, web=WEB)
    return manager.server_context("web"), manager.client_context("cart")


class Collector(asyncio.Protocol):
    """A relay stand-in at the end of a stream: keeps what arrives, echoes nothing."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.received = bytearray()
        self.ended = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.resume_reading()  # as a relay does once connected: accepts the stream

    def data_received(self, data: bytes) -> None:
        self.received += data

    def eof_received(self) -> bool:
        if not self.ended.done():
            self.ended.set_result(None)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ended.done():
            self.ended.set_result(None)


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        one = socket.create_connection(listener.getsockname())
        other, _ = listener.accept()
    return one, other


def _payload(seed: int, size: int) -> bytes:
    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB, not a TLS multiple
    return (block * (size // len(block) + 1))[:size]


async def _exchange(server_context: ssl.SSLContext, client_context: ssl.SSLContext) -> None:
    loop = asyncio.get_running_loop()
    served: dict[int, Collector] = {}

    def on_stream(session: TunnelSession, stream_id: int, port: int, metadata: Any) -> None:
        served[stream_id] = Collector()
        session.attach(stream_id, served[stream_id])

    client_sock, server_sock = _tcp_pair()
    server_task = loop.create_task(loop.connect_accepted_socket(
        lambda: TunnelSession("server", on_stream=on_stream), server_sock, ssl=server_context))
    client_transport, client = await loop.create_connection(
        lambda: TunnelSession("client"), sock=client_sock, ssl=client_context, server_hostname="")
    server_transport, _ = await server_task

    # the record methods uvloop calls are _ssl's own, and the identities read as before
    for transport in (client_transport, server_transport):
        ssl_object = transport.get_extra_info("ssl_object")
        assert isinstance(ssl_object, DirectSSLObject)
        for name in ("read", "write", "pending"):
            method = getattr(ssl_object, name)
            assert type(method).__name__ == "builtin_function_or_method", name
            assert method.__self__ is ssl_object._sslobj, name
    assert verify_identity(client_transport, "cluster.local") == str(WEB)
    assert verify_identity(server_transport, "cluster.local") == str(CART)

    sizes = (1, 1_000, 3 * 1024 * 1024)  # one byte, one record, many records and windows
    upstreams = [Collector() for _ in sizes]
    streams = [client.open_stream(protocol, 80, {"pod": "cart"}) for protocol in upstreams]
    for index, (stream, size) in enumerate(zip(streams, sizes, strict=True)):
        stream.write(_payload(index, size))
        stream.write_eof()
    async with asyncio.timeout(20):
        while len(served) < len(sizes) or not all(c.ended.done() for c in served.values()):
            await asyncio.sleep(0.01)
    by_order = [served[stream.stream_id] for stream in streams]
    for index, (collector, size) in enumerate(zip(by_order, sizes, strict=True)):
        assert bytes(collector.received) == _payload(index, size)
        assert collector.transport is not None
        collector.transport.write(_payload(100 + index, size))  # and back
        collector.transport.write_eof()
    async with asyncio.timeout(20):
        await asyncio.gather(*(upstream.ended for upstream in upstreams))
    for index, (upstream, size) in enumerate(zip(upstreams, sizes, strict=True)):
        assert bytes(upstream.received) == _payload(100 + index, size)
    client.close()
    server_transport.close()


def test_records_go_straight_to_ssl_and_carry_megabytes_both_ways(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_context, client_context = contexts
    direct_records(server_context)
    direct_records(client_context)
    uvloop.run(_exchange(server_context, client_context))


def test_a_context_not_made_direct_still_makes_plain_ssl_objects(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    fresh = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    plain = fresh.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO())
    assert type(plain) is ssl.SSLObject
    assert "read" not in vars(plain)
    direct = direct_records(fresh).wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO())
    assert type(direct) is DirectSSLObject
    with pytest.raises(ssl.SSLWantReadError):  # the C read, with the C read's behaviour
        direct.read(1024)
