"""The tunnel's TLS without uvloop's SSL protocol (agent/dataplane/tls.py): the handshake on
the raw socket with the agents' own mTLS contexts, failures labelled as uvloop's were, then
two tunnel sessions — their records carried by the C transport (`agent.dataplane._tlsio`,
csrc/tlsio.c) or, on the Python path, opened and sealed by the sessions on plain TCP
transports; every session test runs on both: megabytes both ways on several streams,
identities read from the sessions, bytes that came with the handshake's last flight,
close_notify, a record that does not open, a peer that stops reading; and no fresh mmap'd
pages per record read (what uvloop's SSL protocol cost with the DaemonSet's malloc setting)."""

from __future__ import annotations

import asyncio
import contextlib
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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.dataplane.mesh import verify_identity
from agent.dataplane.tls import TunnelTls, handshake, start_session
from agent.dataplane.tunnel import TunnelSession, handshake_failure_reason
from agent.identity.files import init_identity_dir
from agent.identity.spiffe import SpiffeId
from tests.unit.test_identity_tls import manager_for, with_pods

CART = SpiffeId("cluster.local", "shop", "cart")
# Who carries the records: the C transport (built by setup.py; CI builds it) or the sessions.
RECORDS = ("c", "python")
WEB = SpiffeId("cluster.local", "shop", "web")


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    """A client context whose certificate another CA signed."""
    path: Path = tmp_path_factory.mktemp("other-ca")
    init_identity_dir(path)
    return with_pods(manager_for(path), cart=CART).client_context("cart")


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        one = socket.create_connection(listener.getsockname())
        other, _ = listener.accept()
    for sock in (one, other):
        sock.setblocking(False)
    return one, other


def _payload(seed: int, size: int) -> bytes:
    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB, not a TLS multiple
    return (block * (size // len(block) + 1))[:size]


class Collector(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.received = bytearray()
        self.ended = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.received += data

    def eof_received(self) -> bool:
        if not self.ended.done():
            self.ended.set_result(None)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ended.done():
            self.ended.set_result(exc)


def tlsio_class(name: str) -> Any:
    """`agent.dataplane._tlsio.<name>`: built by setup.py (CI builds it), or the test fails."""
    try:
        from agent.dataplane import _tlsio
    except ImportError as exc:
        raise AssertionError(f"agent.dataplane._tlsio is not built (setup.py): {exc}") from None
    return getattr(_tlsio, name)


def _c_transport() -> Any:
    """The C transport, whatever PINION_PURE_PYTHON says (it only keeps agents off it)."""
    return tlsio_class("TlsTransport")


@pytest.fixture(params=RECORDS)
def records(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Sessions started by `start_session` carry their records in C, or in Python."""
    monkeypatch.setattr("agent.dataplane.tls.TLS_TRANSPORT",
                        _c_transport() if request.param == "c" else None)
    return str(request.param)


async def _connected(server_context: ssl.SSLContext, client_context: ssl.SSLContext,
                     served: dict[int, Collector]) -> tuple[TunnelSession, TunnelSession]:
    """Two sessions as mesh.py starts them (`start_session`: records in C, or in Python when
    the `records` fixture took the C transport away)."""
    loop = asyncio.get_running_loop()

    def on_stream(session: TunnelSession, stream_id: int, port: int, metadata: Any) -> None:
        served[stream_id] = Collector()
        session.attach(stream_id, served[stream_id])

    client_sock, server_sock = _tcp_pair()
    server_tls = loop.create_task(handshake(server_sock, server_context, True, 5.0))
    client_tls = await handshake(client_sock, client_context, False, 5.0)
    server_end = await server_tls
    server = await start_session(server_sock, server_end, lambda tls: TunnelSession(
        "server", on_stream=on_stream, tls=tls))
    client = await start_session(client_sock, client_tls,
                                 lambda tls: TunnelSession("client", tls=tls))
    return client, server


def test_sessions_seal_their_records_and_carry_megabytes_both_ways(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext], records: str) -> None:
    async def run() -> None:
        served: dict[int, Collector] = {}
        client, server = await _connected(*contexts, served)
        assert verify_identity(client.ssl_object, "cluster.local") == str(WEB)
        assert verify_identity(server.ssl_object, "cluster.local") == str(CART)
        assert client.transport is not None
        if records == "c":  # the transport carries the records: the session has no TunnelTls
            assert client.tls is None and server.tls is None
            assert type(client.transport).__name__ == "TlsTransport"
        else:
            assert client.tls is not None and client.transport.get_extra_info("ssl_object") is None
        sizes = (1, 1_000, 3 * 1024 * 1024)  # one byte, one record, many records and windows
        upstreams = [Collector() for _ in sizes]
        streams = [client.open_stream(protocol, 80, {"pod": "cart"}) for protocol in upstreams]
        for index, (stream, size) in enumerate(zip(streams, sizes, strict=True)):
            stream.write(_payload(index, size))
            stream.write_eof()
        async with asyncio.timeout(20):
            while len(served) < len(sizes) or not all(c.ended.done() for c in served.values()):
                await asyncio.sleep(0.01)
        for index, stream in enumerate(streams):
            collector = served[stream.stream_id]
            assert bytes(collector.received) == _payload(index, sizes[index])
            assert collector.transport is not None
            collector.transport.write(_payload(100 + index, sizes[index]))
            collector.transport.write_eof()
        async with asyncio.timeout(20):
            await asyncio.gather(*(upstream.ended for upstream in upstreams))
        for index, upstream in enumerate(upstreams):
            assert bytes(upstream.received) == _payload(100 + index, sizes[index])
        # closing one end: GOAWAY and close_notify go out, the other end sees the close
        ended = server.transport
        client.close()
        async with asyncio.timeout(5):
            while ended is not None and not ended.is_closing():
                await asyncio.sleep(0.01)
        if records == "python":
            assert server.tls is not None and server.tls.peer_closed
        async with asyncio.timeout(5):  # every stream of both ends is gone, nothing leaks
            while client.streams or server.streams or not server._closed:
                await asyncio.sleep(0.01)

    uvloop.run(run())


def test_a_record_that_does_not_open_ends_the_connection_and_its_streams(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext], records: str) -> None:
    async def run() -> None:
        served: dict[int, Collector] = {}
        client, server = await _connected(*contexts, served)
        upstream = Collector()
        client.open_stream(upstream, 80, {"pod": "cart"})
        async with asyncio.timeout(5):
            while not served:
                await asyncio.sleep(0.01)
        assert server.transport is not None and client.transport is not None
        # a forged application-data record (type 23, TLS 1.2 on the wire, 40 bytes), on the
        # socket itself
        os.write(client.transport.get_extra_info("socket").fileno(),
                 bytes([23, 3, 3, 0, 40]) + b"\x5a" * 40)
        async with asyncio.timeout(5):
            lost = await next(iter(served.values())).ended
        assert isinstance(lost, ssl.SSLError)
        assert server.transport.is_closing()

    uvloop.run(run())


def _in_memory(contexts: tuple[ssl.SSLContext, ssl.SSLContext],
               until: str) -> dict[str, tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]]:
    """Both ends' TLS objects and BIOs, their handshake run in memory until `until`
    ("client": the client is done, the server still waits for its Finished; "both")."""
    server_context, client_context = contexts
    ends = {}
    for name, context, server_side in (("server", server_context, True),
                                       ("client", client_context, False)):
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        ends[name] = (context.wrap_bio(incoming, outgoing, server_side=server_side), incoming,
                      outgoing)
    done: set[str] = set()
    for _ in range(10):
        for name in ("client", "server"):
            tls, _, outgoing = ends[name]
            if name not in done:
                try:
                    tls.do_handshake()
                    done.add(name)
                except ssl.SSLWantReadError:
                    pass
            ends["server" if name == "client" else "client"][1].write(outgoing.read())
            if until == "client" and "client" in done:
                return ends
        if len(done) == 2:
            return ends
    raise AssertionError("the handshake in memory did not finish")


def test_bytes_that_came_with_the_last_handshake_flight_are_opened_first(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    ends = _in_memory(contexts, until="client")
    client = TunnelTls(*ends["client"])
    ends["server"][1].write(client.seal(b"preface and first frames"))  # with the client's Finished
    server_tls, incoming, outgoing = ends["server"]
    server_tls.do_handshake()  # completes, the application record still waiting
    server = TunnelTls(server_tls, incoming, outgoing)
    assert server.has_input
    assert server.open(b"") == b"preface and first frames"
    assert not server.has_input


def _failure(server_context: ssl.SSLContext, client_context: ssl.SSLContext | None,
             client_sends: bytes = b"", timeout: float = 5.0,
             client_reads: bool = True) -> tuple[str, str]:
    """Both ends' labels (handshake_failure_reason) when a handshake fails."""
    async def run() -> tuple[str, str]:
        client_sock, server_sock = _tcp_pair()
        server = asyncio.ensure_future(handshake(server_sock, server_context, True, timeout))
        client_label = "none"
        if client_context is not None:
            try:
                tls = await handshake(client_sock, client_context, False, timeout)
                client_label = "ok"
                if client_reads:  # TLS 1.3: a client learns of its refusal on its first read
                    loop = asyncio.get_running_loop()
                    async with asyncio.timeout(2):
                        data = await loop.sock_recv(client_sock, 4096)
                    tls.open(data)
                    client_label = "eof" if not data else "opened"
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                client_label = handshake_failure_reason(exc)
        elif client_sends:
            client_sock.send(client_sends)
        try:
            await server
            server_label = "ok"
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            server_label = handshake_failure_reason(exc)
        client_sock.close()
        server_sock.close()
        return server_label, client_label

    return uvloop.run(run())


def test_failed_handshakes_are_labelled_as_before(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext], stranger: ssl.SSLContext) -> None:
    server_context, client_context = contexts
    assert _failure(server_context, stranger)[0] == "unknown_ca"
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.check_hostname, anonymous.verify_mode = False, ssl.CERT_NONE
    assert _failure(server_context, anonymous) == ("no_certificate", "no_certificate")
    assert _failure(server_context, None, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")[0] == "not_tls"
    assert _failure(server_context, None, timeout=0.2)[0] == "timeout"  # says nothing
    assert _failure(server_context, client_context, client_reads=False) == ("ok", "ok")  # control


def test_a_peer_that_closes_mid_handshake_is_an_eof(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_context, _ = contexts

    async def run() -> str:
        client_sock, server_sock = _tcp_pair()
        client_sock.close()
        try:
            await handshake(server_sock, server_context, True, 5.0)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            return handshake_failure_reason(exc)
        finally:
            server_sock.close()
        return "ok"

    assert uvloop.run(run()) == "eof"


# One process: a TLS pair, 1 KiB each way per exchange as a paced request crosses the tunnel,
# records opened and sealed by TunnelTls as the sessions do; minor page faults counted over
# the exchanges only.
_FAULTS = r"""
import asyncio, json, resource, socket, ssl, sys
import uvloop
sys.path.insert(0, sys.argv[1])
from agent.dataplane.tls import handshake, start_session

EXCHANGES = 2000

def seal(tls, data):  # None: the C transport seals and opens
    return data if tls is None else tls.seal(data)

def open_(tls, data):
    return data if tls is None else tls.open(data)

class Echo(asyncio.Protocol):
    def __init__(self, tls):
        self.tls = tls
    def connection_made(self, transport):
        self.transport = transport
    def data_received(self, data):
        self.transport.write(seal(self.tls, open_(self.tls, data)))

class Client(asyncio.Protocol):
    def __init__(self, done, tls):
        self.done, self.left, self.got, self.tls = done, EXCHANGES, 0, tls
    def connection_made(self, transport):
        self.transport = transport
    def send(self):
        data = b"q" * 1024
        self.transport.write(seal(self.tls, data))
    def data_received(self, data):
        self.got += len(open_(self.tls, data))
        if self.got == 1024:
            self.got = 0
            self.left -= 1
            if self.left == 0:
                self.done.set_result(None)
            else:
                self.send()

async def main():
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(sys.argv[2], sys.argv[3])
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_context.check_hostname = False
    client_context.verify_mode = ssl.CERT_NONE
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    one = socket.create_connection(listener.getsockname())
    other, _ = listener.accept()
    done = loop.create_future()
    one.setblocking(False)
    other.setblocking(False)
    server_tls = loop.create_task(handshake(other, server_context, True, 5.0))
    client_tls = await handshake(one, client_context, False, 5.0)
    echo_tls = await server_tls
    await start_session(other, echo_tls, Echo)
    client = await start_session(one, client_tls, lambda tls: Client(done, tls))
    client.send()  # a warm-up exchange's worth, then measure the rest
    await asyncio.sleep(0.05)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    await done
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    print(json.dumps({"faults": after - before, "records": 2 * EXCHANGES}))

uvloop.run(main())
"""


def _faults_per_record(key: Path, certificate: Path, records: str) -> float:
    root = str(Path(__file__).resolve().parents[2])
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}  # as deploy/daemonset.yaml
    environment.pop("PINION_PURE_PYTHON", None)
    if records == "python":
        environment["PINION_PURE_PYTHON"] = "1"
    run = subprocess.run([sys.executable, "-c", _FAULTS, root, str(certificate), str(key)],
                         capture_output=True, text=True, timeout=120, env=environment, check=True)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    return float(result["faults"]) / float(result["records"])


def test_reading_records_maps_no_fresh_pages(tmp_path: Path, records: str) -> None:
    """uvloop's SSL protocol read a record with `read(262144)`; `_ssl` allocates that before
    reading, above the DaemonSet's mmap threshold: a fresh mapping (an mmap, a page fault,
    an mremap and an munmap) per record — 0.7-1.3 faults per record here in session 9's
    first measurements, 0.0-0.4 later the same day (the kernel's reuse of the freed range
    varies, so uvloop's path is no reliable control). The sessions' reads fault nothing."""
    key, certificate = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                    str(certificate), "-days", "1", "-subj", "/CN=records"],
                   check=True, capture_output=True)
    tunnel = _faults_per_record(key, certificate, records)
    assert tunnel < 0.05, f"{tunnel:.2f} page faults per record opened ({records})"


class _Recorded:
    """`_ssl`'s object as TunnelTls uses it, recording the sizes asked of `read`."""

    def __init__(self, tls: ssl.SSLObject) -> None:
        self.inner: Any = tls._sslobj  # type: ignore[attr-defined]
        self.asked: list[int] = []

    def read(self, size: int) -> bytes:
        self.asked.append(size)
        data: bytes = self.inner.read(size)
        return data

    def write(self, data: bytes) -> int:
        written: int = self.inner.write(data)
        return written

    def pending(self) -> int:
        waiting: int = self.inner.pending()
        return waiting


def test_records_are_read_one_record_at_a_time(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    """What keeps the allocation per read on the heap: never more than one record's
    plaintext (16 KiB) asked of `_ssl`, whatever arrives at once."""
    ends = _in_memory(contexts, until="both")
    client = TunnelTls(*ends["client"])
    server_tls, incoming, outgoing = ends["server"]
    recorded = _Recorded(server_tls)
    server = TunnelTls(cast(ssl.SSLObject, type("Shim", (), {"_sslobj": recorded})()), incoming,
                       outgoing)
    payload = _payload(7, 200_000)  # 13 records, all in one read
    assert server.open(client.seal(payload)) == payload
    assert recorded.asked and max(recorded.asked) <= 16384


def test_a_session_with_an_ipv6_peer_comes_up() -> None:
    """IPv6 peernames are four-tuples: the compiled session once required two (TypeError in
    connection_made, the connection dropped)."""
    async def run() -> tuple[Any, ...] | None:
        loop = asyncio.get_running_loop()
        with socket.create_server(("::1", 0), family=socket.AF_INET6) as listener:
            one = socket.create_connection(listener.getsockname()[:2])
            other, _ = listener.accept()
        _, session = await loop.connect_accepted_socket(lambda: TunnelSession("server"), other)
        peername = session.peername
        session.close()
        one.close()
        return peername

    peername = uvloop.run(run())
    assert peername is not None and len(peername) == 4 and peername[0] == "::1"


# ----------------------------------------------------------- the C transport's own contract


class Endpoint(asyncio.Protocol):
    """A plaintext protocol on a TlsTransport: records what the transport tells it."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.received = bytearray()
        self.calls: list[str] = []
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.fail_on_data = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.calls.append("made")

    def data_received(self, data: bytes) -> None:
        if self.fail_on_data:
            raise RuntimeError("a protocol bug")
        self.received += data

    def eof_received(self) -> bool:
        self.calls.append("eof")
        return False

    def pause_writing(self) -> None:
        self.calls.append("pause")

    def resume_writing(self) -> None:
        self.calls.append("resume")

    def connection_lost(self, exc: Exception | None) -> None:
        self.calls.append("lost")
        self.lost.set_result(exc)


async def _transports(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> tuple[Endpoint, Endpoint]:
    transport = _c_transport()
    server_context, client_context = contexts
    client_sock, server_sock = _tcp_pair()
    loop = asyncio.get_running_loop()
    server_tls = loop.create_task(handshake(server_sock, server_context, True, 5.0))
    client_tls = await handshake(client_sock, client_context, False, 5.0)
    server_end = await server_tls
    ends = []
    for sock, tls in ((client_sock, client_tls), (server_sock, server_end)):
        end = Endpoint()
        transport(loop, sock, tls.ssl_object, end).start()
        ends.append(end)
    return ends[0], ends[1]


def test_a_peer_that_stops_reading_pauses_the_writer_and_bounds_its_buffer(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    async def run() -> None:
        writer, reader = await _transports(contexts)
        writer.transport.set_write_buffer_limits(high=256 * 1024)
        reader.transport.pause_reading()
        payload = _payload(3, 8 * 1024 * 1024)
        written, most = 0, 0
        while "pause" not in writer.calls and written < len(payload):  # as a session: stop at pause
            writer.transport.write(payload[written:written + 65536])
            written += 65536
            most = max(most, writer.transport.get_write_buffer_size())
            await asyncio.sleep(0)
        assert "pause" in writer.calls, "never paused: the peer's socket took 8 MiB"
        assert most <= 256 * 1024 + 65536 + 4096  # the mark, one write and its records' overhead
        reader.transport.resume_reading()
        async with asyncio.timeout(10):
            while "resume" not in writer.calls:
                await asyncio.sleep(0.01)
        writer.transport.write(payload[written:])  # the rest, after resume
        writer.transport.close()  # buffered bytes first, then close_notify, then the close
        async with asyncio.timeout(10):
            assert await writer.lost is None
            assert await reader.lost is None
        assert bytes(reader.received) == payload
        assert reader.calls == ["made", "eof", "lost"]  # the close_notify is the peer's EOF
        assert writer.transport.get_extra_info("socket").fileno() == -1  # closed after lost

    uvloop.run(run())


def test_abort_drops_the_buffer_and_the_peer_sees_the_connection_go(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    async def run() -> None:
        one, other = await _transports(contexts)
        other.transport.pause_reading()
        one.transport.write(_payload(4, 4 * 1024 * 1024))
        one.transport.abort()
        assert one.transport.is_closing()
        one.transport.write(b"after abort")  # ignored, as asyncio's transports do
        async with asyncio.timeout(5):
            assert await one.lost is None
        assert one.calls.count("lost") == 1
        other.transport.resume_reading()
        async with asyncio.timeout(5):
            exc = await other.lost
        # the peer reads what had arrived, then the end without a close_notify: an EOF, or a
        # reset if unread bytes were still on our side
        assert exc is None or isinstance(exc, ConnectionError)
        assert bytes(other.received) == _payload(4, 4 * 1024 * 1024)[:len(other.received)]

    uvloop.run(run())


def test_a_protocol_that_raises_is_reported_and_its_connection_ends(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    async def run() -> None:
        reported: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: reported.append(context))
        one, other = await _transports(contexts)
        other.fail_on_data = True
        one.transport.write(b"hello")
        async with asyncio.timeout(5):
            exc = await other.lost
            await one.lost  # and the peer sees the connection end
        assert isinstance(exc, RuntimeError)
        assert len(reported) == 1 and isinstance(reported[0]["exception"], RuntimeError)
        assert "data_received" in reported[0]["message"]

    uvloop.run(run())


def test_the_transport_refuses_an_object_that_is_not_sslobject() -> None:
    async def run() -> None:
        one, other = _tcp_pair()
        fake = type("Fake", (), {"_sslobj": object()})()
        with pytest.raises(TypeError):
            _c_transport()(asyncio.get_running_loop(), one, fake, Endpoint())
        one.close()
        other.close()

    uvloop.run(run())


# ------------------------------------- the C transport fed records cut anywhere, and garbage


async def _raw_peer(contexts: tuple[ssl.SSLContext, ssl.SSLContext],
                    ) -> tuple[TunnelTls, socket.socket, Endpoint]:
    """A C transport (the server end) and, facing it, a raw socket with the client's TLS in
    Python: the test writes the records it seals on the wire itself, cut where it likes."""
    server_context, client_context = contexts
    client_sock, server_sock = _tcp_pair()
    loop = asyncio.get_running_loop()
    server_tls = loop.create_task(handshake(server_sock, server_context, True, 5.0))
    client_tls = await handshake(client_sock, client_context, False, 5.0)
    end = Endpoint()
    _c_transport()(loop, server_sock, (await server_tls).ssl_object, end).start()
    return client_tls, client_sock, end


@settings(max_examples=int(os.environ.get("PINION_DIFF_EXAMPLES", "60")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.integers(1, 40_000), min_size=1, max_size=6),
       cuts=st.lists(st.integers(1, 20_000), min_size=1, max_size=12),
       flip=st.one_of(st.none(), st.floats(0.0, 0.999)),
       tail=st.binary(max_size=64))
def test_records_cut_anywhere_open_once_and_garbage_ends_the_connection(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext], sizes: list[int], cuts: list[int],
        flip: float | None, tail: bytes) -> None:
    """What a peer can put on the wire: the records of several writes, cut into arbitrary
    reads, perhaps one byte flipped, perhaps garbage after them. Whole records open to the
    same plaintext, in order, once; a flipped byte or garbage that is not a record ends the
    connection with an ssl.SSLError and nothing after it is delivered; nothing else ends it."""
    async def run() -> None:
        client_tls, sock, end = await _raw_peer(contexts)
        plaintext = b"".join(_payload(index, size) for index, size in enumerate(sizes))
        wire = b"".join(client_tls.seal(_payload(index, size)) for index, size in enumerate(sizes))
        if flip is not None:
            at = int(flip * len(wire))
            wire = wire[:at] + bytes([wire[at] ^ 0x41]) + wire[at + 1:]
        wire += tail
        loop, sent, index = asyncio.get_running_loop(), 0, 0
        while sent < len(wire) and not end.lost.done():
            piece = wire[sent:sent + cuts[index % len(cuts)]]
            index += 1
            try:
                await loop.sock_sendall(sock, piece)
            except ConnectionError:
                break
            sent += len(piece)
            await asyncio.sleep(0)  # let the transport read it alone, sometimes
        await asyncio.sleep(0.05)
        received = bytes(end.received)
        assert plaintext.startswith(received)  # in order, never twice, never invented
        if flip is None and not tail:
            async with asyncio.timeout(5):
                while len(end.received) < len(plaintext):
                    await asyncio.sleep(0.01)
            assert bytes(end.received) == plaintext and not end.lost.done()
        elif flip is not None:  # AES-GCM: no record with a flipped byte opens
            with contextlib.suppress(OSError):  # (gone already when the record failed)
                sock.shutdown(socket.SHUT_WR)  # a flipped length may wait for more: not forever
            async with asyncio.timeout(5):
                exc = await end.lost
            # the record fails (SSLError), or its flipped length outlasts the bytes sent (EOF)
            assert exc is None or isinstance(exc, ssl.SSLError | ConnectionError), exc
            assert len(end.received) < len(plaintext)
        sock.close()
        async with asyncio.timeout(5):
            await end.lost  # and a closed peer ends it too, whatever came before
        assert end.calls.count("lost") == 1

    uvloop.run(run())


def test_a_closed_transport_is_freed_without_the_garbage_collector(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    """No reference cycle outlives the connection (a flood of short tunnel connections must
    not wait for a collection to give their transports back)."""
    import gc

    async def run() -> int:
        one, other = await _transports(contexts)
        one.transport.write(b"x" * 100_000)
        one.transport.close()
        async with asyncio.timeout(5):
            await one.lost
            await other.lost
        await asyncio.sleep(0)  # the loop's handles are gone
        one.transport = other.transport = None
        return sum(type(o).__name__ == "TlsTransport" for o in gc.get_objects())

    gc.collect()
    gc.disable()
    try:
        left = uvloop.run(run())
    finally:
        gc.enable()
    assert left == 0


def test_a_c_transport_that_refuses_the_tls_object_leaves_the_records_to_python(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext], monkeypatch: pytest.MonkeyPatch) -> None:
    """An `_ssl` of another layout refuses every connection alike: the first one falls back
    to the Python records, and the C transport is not tried again (one warning, not one per
    connection)."""
    from agent.dataplane import tls as module

    tried: list[int] = []

    def refusing(*args: Any) -> Any:
        tried.append(1)
        raise TypeError("_ssl._SSLSocket's layout is not the one known")

    monkeypatch.setattr(module, "TLS_TRANSPORT", refusing)

    async def run() -> None:
        for _ in range(2):
            served: dict[int, Collector] = {}
            client, server = await _connected(*contexts, served)
            assert client.tls is not None and server.tls is not None  # the Python path
            assert verify_identity(client.ssl_object, "cluster.local") == str(WEB)
            client.close()
            server.close()

    uvloop.run(run())
    assert tried == [1] and module.TLS_TRANSPORT is None
