"""The tunnel's TLS records through `DirectSSLObject` (uvloop's SSL protocol calling `_ssl`'s
read/write/pending directly, read asked for one record at most): two real tunnel sessions
over loopback TCP with the agents' own mTLS contexts, megabytes both ways on several
streams, identities checked as mesh.py checks them, the record methods really the C ones;
and what `RecordRead` is for: no fresh mmap'd pages per record read."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest
import uvloop

from agent.dataplane.mesh import verify_identity
from agent.dataplane.tunnel import (
    RECORD_PLAINTEXT_MAX,
    DirectSSLObject,
    RecordRead,
    TunnelSession,
    direct_records,
)
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
        for name in ("write", "pending"):
            method = getattr(ssl_object, name)
            assert type(method).__name__ == "builtin_function_or_method", name
            assert method.__self__ is ssl_object._sslobj, name
        assert isinstance(ssl_object.read, RecordRead)  # _ssl's read, asked for one record at most
        assert ssl_object.read._read.__self__ is ssl_object._sslobj
    assert verify_identity(client_transport.get_extra_info("ssl_object"), "cluster.local") == str(WEB)
    assert verify_identity(server_transport.get_extra_info("ssl_object"), "cluster.local") == str(CART)

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


def test_record_read_asks_for_one_record_at_most() -> None:
    asked: list[tuple[Any, ...]] = []

    def inner(*args: Any) -> bytes:
        asked.append(args)
        return b"x"

    read = RecordRead(inner)
    buffer = bytearray(8)
    assert read(262144) == b"x"  # uvloop's SSL_READ_MAX_SIZE
    assert read(100) == b"x"
    assert read(RECORD_PLAINTEXT_MAX + 1, buffer) == b"x"
    assert read(8, buffer) == b"x"
    assert read() == b"x"  # _ssl's own default size
    assert asked == [(RECORD_PLAINTEXT_MAX,), (100,), (RECORD_PLAINTEXT_MAX, buffer), (8, buffer),
                     (1024,)]


# One process: a uvloop TLS pair with the agents' contexts, 1 KiB each way per exchange, as a
# paced request crosses the tunnel; minor page faults counted over the exchanges only.
_FAULTS = r"""
import asyncio, json, resource, socket, ssl, sys
import uvloop
sys.path.insert(0, sys.argv[1])
from agent.dataplane.tunnel import direct_records

EXCHANGES = 2000

class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
    def data_received(self, data):
        self.transport.write(data)

class Client(asyncio.Protocol):
    def __init__(self, done):
        self.done, self.left, self.got = done, EXCHANGES, 0
    def connection_made(self, transport):
        self.transport = transport
    def data_received(self, data):
        self.got += len(data)
        if self.got == 1024:
            self.got = 0
            self.left -= 1
            if self.left == 0:
                self.done.set_result(None)
            else:
                self.transport.write(b"q" * 1024)

async def main(direct):
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(sys.argv[2], sys.argv[3])
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_context.check_hostname = False
    client_context.verify_mode = ssl.CERT_NONE
    if direct:
        direct_records(server_context)
        direct_records(client_context)
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    one = socket.create_connection(listener.getsockname())
    other, _ = listener.accept()
    server = loop.create_task(loop.connect_accepted_socket(Echo, other, ssl=server_context))
    done = loop.create_future()
    transport, client = await loop.create_connection(lambda: Client(done), sock=one,
                                                     ssl=client_context, server_hostname="")
    await server
    transport.write(b"q" * 1024)  # a warm-up exchange's worth, then measure the rest
    await asyncio.sleep(0.05)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    await done
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    print(json.dumps({"faults": after - before, "records": 2 * EXCHANGES}))

uvloop.run(main(sys.argv[4] == "direct"))
"""


def _faults_per_record(mode: str, key: Path, certificate: Path) -> float:
    root = str(Path(__file__).resolve().parents[2])
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}  # as deploy/daemonset.yaml
    run = subprocess.run([sys.executable, "-c", _FAULTS, root, str(certificate), str(key), mode],
                         capture_output=True, text=True, timeout=120, env=environment, check=True)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    return float(result["faults"]) / float(result["records"])


def test_reading_records_maps_no_fresh_pages(tmp_path: Path) -> None:
    """uvloop reads a record with `read(262144)`; `_ssl` allocates that before reading, which
    is above the DaemonSet's mmap threshold: a fresh mapping (and its page fault, and an
    mremap and munmap) per record. `RecordRead` asks for 16 KiB: the heap serves it."""
    key, certificate = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                    str(certificate), "-days", "1", "-subj", "/CN=records"],
                   check=True, capture_output=True)
    plain = _faults_per_record("plain", key, certificate)
    direct = _faults_per_record("direct", key, certificate)
    # the control: 0.7-1.3 faults per record on this glibc (one fresh page, most reads)
    assert plain >= 0.3, f"the plain SSL objects' reads no longer map pages ({plain:.2f} per record)"
    assert direct < 0.05, f"{direct:.2f} page faults per record read through DirectSSLObject"
