"""Protocol detection from first bytes, and the sniffing ConnectionObserver."""

from __future__ import annotations

import pytest

from agent.core.accounting import Record
from agent.core.detect import DETECT_LIMIT, H2_PREFACE, ConnectionObserver, Protocol, detect

GET = b"GET /index.html HTTP/1.1\r\nHost: web\r\n\r\n"
CLIENT_HELLO = bytes.fromhex("16030100f8010000f40303") + bytes(32)


@pytest.mark.parametrize(
    ("first_bytes", "expected"),
    [
        (b"", None),
        (b"G", None),
        (b"GE", None),
        (b"GET", None),
        (b"GET ", None),
        (b"GET /", None),
        (b"GET / ", None),
        (b"GET / HTTP/1", None),
        (b"GET / HTTP/1.1", None),
        (b"GET / HTTP/1.1\r", None),
        (b"GET / HTTP/1.1\r\n", Protocol.HTTP1),
        (GET, Protocol.HTTP1),
        (b"POST /api HTTP/1.0\r\nContent-Length: 0\r\n\r\n", Protocol.HTTP1),
        (b"DELETE /x?y=1 HTTP/1.1\r\n", Protocol.HTTP1),
        (b"CONNECT example.org:443 HTTP/1.1\r\n", Protocol.HTTP1),
        (b"P", None),  # POST, PUT, PATCH or the HTTP/2 preface
        (b"PRI * HTTP/2.0\r\n", None),
        (H2_PREFACE[:23], None),
        (H2_PREFACE, Protocol.HTTP2),
        (H2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00", Protocol.HTTP2),
        (b"PRI * HTTP/2.0\r\n\r\nXX", Protocol.OPAQUE),
        (CLIENT_HELLO, Protocol.OPAQUE),
        (b"\x16", Protocol.OPAQUE),
        (b"\x00\x00\x00\x01", Protocol.OPAQUE),  # binary protocol
        (b"get / HTTP/1.1\r\n", Protocol.OPAQUE),  # methods are upper case
        (b"PING\r\n", Protocol.OPAQUE),  # redis inline command
        (b"GET / HTTP/2.0\r\n", Protocol.OPAQUE),
        (b"GET  / HTTP/1.1\r\n", Protocol.OPAQUE),
        (b"GET / HTTP/1.1\n", Protocol.OPAQUE),
        (b"GET /" + b"a" * 100, Protocol.HTTP1),  # still a request line at the limit
    ],
)
def test_detect(first_bytes: bytes, expected: Protocol | None) -> None:
    assert detect(first_bytes) is expected


def test_decides_within_the_limit() -> None:
    long_target = b"GET /" + b"a" * DETECT_LIMIT
    assert detect(long_target[: DETECT_LIMIT - 1]) is None
    assert detect(long_target[:DETECT_LIMIT]) is Protocol.HTTP1
    assert detect(b"A" * 24) is None
    assert detect(b"A" * 25) is Protocol.OPAQUE  # methods are at most 24 characters


def test_every_prefix_of_a_request_line_waits_then_decides() -> None:
    line = b"OPTIONS * HTTP/1.1\r\n"
    for end in range(1, len(line)):
        assert detect(line[:end]) is None, line[:end]
    assert detect(line) is Protocol.HTTP1


def test_connection_observer_sniffs_across_chunks_then_delegates() -> None:
    observer = ConnectionObserver()
    assert observer.client_bytes(b"GE", 1.0) == []
    assert observer.protocol is None
    assert observer.client_bytes(GET[2:], 1.0) == []
    assert observer.protocol is Protocol.HTTP1
    assert observer.take_started() == 1
    records = observer.server_bytes(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 1.5)
    assert records == [Record("success", 200, None, 500.0, "GET")]


def test_server_speaking_first_makes_the_connection_opaque() -> None:
    observer = ConnectionObserver()
    assert observer.server_bytes(b"220 smtp.example ESMTP\r\n", 1.0) == []
    assert observer.protocol is Protocol.OPAQUE
    assert observer.opaque
    assert observer.client_bytes(GET, 1.0) == []
    assert observer.take_started() == 0
    assert observer.closed(2.0, reset=False) == []


def test_tls_is_opaque() -> None:
    observer = ConnectionObserver()
    assert observer.client_bytes(CLIENT_HELLO, 1.0) == []
    assert observer.protocol is Protocol.OPAQUE
    assert observer.opaque


def test_http2_is_delegated() -> None:
    observer = ConnectionObserver()
    assert observer.client_bytes(H2_PREFACE[:10], 1.0) == []
    assert observer.client_bytes(H2_PREFACE[10:] + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00", 1.0) == []
    assert observer.protocol is Protocol.HTTP2
    assert not observer.opaque


def test_a_crashing_observer_is_contained() -> None:
    class Broken:
        opaque = False

        def client_bytes(self, data: bytes, now: float) -> list[Record]:
            raise RuntimeError("bug")

        def take_started(self) -> int:
            return 2

        def abandon(self, error: str) -> list[Record]:
            return [Record("failure", None, None, None, "GET", error)] * 2

    observer = ConnectionObserver()
    observer.client_bytes(GET, 1.0)
    observer.take_started()
    observer._inner = Broken()  # type: ignore[assignment]
    records = observer.client_bytes(GET, 2.0)
    assert records == [Record("failure", None, None, None, "GET", "protocol_error")] * 2
    assert observer.take_started() == 2
    assert observer.opaque
    assert observer.client_bytes(GET, 3.0) == []


SERVER_SETTINGS = b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00\x64"


@pytest.mark.parametrize("split", [1, 4, 9, len(SERVER_SETTINGS)])
def test_an_http2_server_may_speak_first_with_its_settings(split: int) -> None:
    """On the server's node the server's SETTINGS can beat the client's preface to us."""
    observer = ConnectionObserver()
    assert observer.server_bytes(SERVER_SETTINGS[:split], 0.0) == []
    assert observer.server_bytes(SERVER_SETTINGS[split:], 0.0) == []
    assert observer.protocol is None

    observer.client_bytes(H2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00", 0.0)

    assert observer.protocol is Protocol.HTTP2 and not observer.opaque


@pytest.mark.parametrize("banner", [b"220 mail.example ESMTP\r\n", b"\x00\x00\x06\x01\x00\x00\x00",
                                    b"\x00\x00\x06\x04\x00\x00\x00\x00\x01"])
def test_any_other_server_first_bytes_make_the_connection_opaque(banner: bytes) -> None:
    observer = ConnectionObserver()
    observer.server_bytes(banner, 0.0)
    observer.client_bytes(b"GET / HTTP/1.1\r\n\r\n", 0.0)
    assert observer.protocol is Protocol.OPAQUE


def test_early_server_bytes_are_bounded() -> None:
    observer = ConnectionObserver()
    observer.server_bytes(b"\x00\x40\x00\x04\x00\x00\x00\x00\x00" + b"\x00" * 8000, 0.0)
    assert observer.protocol is Protocol.OPAQUE
