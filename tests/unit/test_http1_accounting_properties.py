"""Properties of HTTP/1 accounting: hostile bytes never raise or grow memory past the caps;
valid exchanges, however split, end in exactly one Record per request."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.accounting import Record
from agent.core.detect import ConnectionObserver
from agent.core.http1 import Http1Observer

CAP = 4096


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def assert_bounded(observer: Http1Observer) -> None:
    assert observer._held_bytes <= CAP
    assert len(observer._pending) <= 64
    assert len(observer._server_tail) <= 3


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.binary(max_size=300)), max_size=30),
    st.booleans(),
)
def test_byte_soup_never_raises_and_stays_bounded(steps: list[tuple[bool, bytes]], reset: bool) -> None:
    observer = Http1Observer(max_header_bytes=CAP, max_pending=64)
    started = 0
    records: list[Record] = []
    prefix = b"GET / HTTP/1.1\r\n"  # so the soup reaches the parsers' interesting states
    records += observer.client_bytes(prefix, 0.0)
    for t, (from_client, data) in enumerate(steps):
        feed = observer.client_bytes if from_client else observer.server_bytes
        records += feed(data, float(t))
        started += observer.take_started()
        assert_bounded(observer)
    records += observer.closed(99.0, reset)
    started += observer.take_started()
    assert len(records) == started  # exactly once, even for garbage


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=8))
def test_soup_through_the_connection_observer(data: bytes, cuts: list[int]) -> None:
    observer = ConnectionObserver()
    records: list[Record] = []
    for piece in chunks(b"POST /x HTTP/1.1\r\n" + data, cuts):
        records += observer.client_bytes(piece, 1.0)
        records += observer.server_bytes(piece[::-1], 2.0)
    records += observer.closed(3.0, reset=False)
    assert len(records) == observer.take_started()


exchange = st.tuples(
    st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE"]),
    st.integers(0, 40),  # request body length
    st.booleans(),  # request body chunked
    st.sampled_from([100, 200, 201, 204, 301, 304, 404, 500, 503]),
    st.integers(0, 40),  # response body length
    st.booleans(),  # response body chunked
)


def build(exchanges: list[tuple[str, int, bool, int, int, bool]]) -> tuple[bytes, bytes, list[Record]]:
    client, server, expected = b"", b"", []
    for method, req_len, req_chunked, status, resp_len, resp_chunked in exchanges:
        client += f"{method} /r HTTP/1.1\r\nHost: svc\r\n".encode()
        client += framed(b"q" * req_len, req_chunked)
        if status == 100:
            server += b"HTTP/1.1 100 Continue\r\n\r\n"
            status = 200
        server += f"HTTP/1.1 {status} S\r\n".encode()
        if method == "HEAD" or status in (204, 304):
            server += f"Content-Length: {resp_len}\r\n\r\n".encode() if status != 204 else b"\r\n"
        else:
            server += framed(b"\r\n\r\n"[: resp_len % 5] + b"p" * resp_len, resp_chunked)
        expected.append(Record("failure" if status >= 500 else "success", status, None, 1000.0, method))
    return client, server, expected


def framed(body: bytes, chunked: bool) -> bytes:
    if chunked:
        chunk = f"{len(body):x}\r\n".encode() + body + b"\r\n" if body else b""
        return b"Transfer-Encoding: chunked\r\n\r\n" + chunk + b"0\r\n\r\n"
    return f"Content-Length: {len(body)}\r\n\r\n".encode() + body


@settings(max_examples=300, deadline=None)
@given(
    st.lists(exchange, min_size=1, max_size=8),
    st.lists(st.integers(0, 5000), max_size=10),
    st.lists(st.integers(0, 5000), max_size=10),
)
def test_valid_exchanges_give_one_record_per_request(
    exchanges: list[tuple[str, int, bool, int, int, bool]], client_cuts: list[int], server_cuts: list[int]
) -> None:
    client, server, expected = build(exchanges)
    observer = Http1Observer()
    for piece in chunks(client, client_cuts):
        assert observer.client_bytes(piece, 1.0) == []
    assert observer.take_started() == len(exchanges)
    records: list[Record] = []
    for piece in chunks(server, server_cuts):
        records += observer.server_bytes(piece, 2.0)
    assert records == expected
    assert not observer.opaque
    assert observer.closed(3.0, reset=False) == []
