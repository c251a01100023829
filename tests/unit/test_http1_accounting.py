"""HTTP/1.x request accounting playbooks: exact bytes in, with explicit times; exact Records out."""

from __future__ import annotations

from agent.core.accounting import Record
from agent.core.http1 import Http1Observer


def request(method: str = "GET", path: str = "/", headers: str = "", body: bytes = b"") -> bytes:
    length = f"Content-Length: {len(body)}\r\n" if body else ""
    return f"{method} {path} HTTP/1.1\r\nHost: svc\r\n{headers}{length}\r\n".encode() + body


def response(status: int, body: bytes = b"", headers: str = "", reason: str = "X") -> bytes:
    return f"HTTP/1.1 {status} {reason}\r\n{headers}Content-Length: {len(body)}\r\n\r\n".encode() + body


def ok(status: int, latency_ms: float, method: str = "GET") -> Record:
    return Record("success", status, None, latency_ms, method)


def test_keep_alive_three_requests_only_5xx_fails() -> None:
    observer = Http1Observer()
    assert observer.client_bytes(request(), 10.0) == []
    assert observer.take_started() == 1
    assert observer.server_bytes(response(200, b"hello"), 10.25) == [ok(200, 250.0)]
    assert observer.client_bytes(request("POST", "/x", body=b"{}"), 11.0) == []
    assert observer.server_bytes(response(500, b"oops"), 11.5) == [
        Record("failure", 500, None, 500.0, "POST")
    ]
    assert observer.client_bytes(request(path="/missing"), 12.0) == []
    assert observer.server_bytes(response(404), 12.125) == [ok(404, 125.0)]
    assert observer.take_started() == 2
    assert observer.closed(13.0, reset=False) == []
    assert not observer.take_started()


def test_pipelined_requests_match_responses_in_order() -> None:
    observer = Http1Observer()
    observer.client_bytes(request(path="/a") + request(path="/b"), 1.0)
    observer.client_bytes(request("HEAD", "/c") + request("DELETE", "/d"), 1.5)
    assert observer.take_started() == 4
    assert observer.server_bytes(response(200, b"a") + response(503, b"b")[:20], 2.0) == [ok(200, 1000.0)]
    rest = response(503, b"b")[20:] + response(200, headers="Content-Length: 10\r\n")[:-2]
    # the HEAD response announces a length it never sends; the DELETE response follows at once
    rest = response(503, b"b")[20:] + b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n" + response(204)
    assert observer.server_bytes(rest, 2.5) == [
        Record("failure", 503, None, 1500.0, "GET"),  # its headers completed at 2.5
        ok(200, 1000.0, "HEAD"),
        ok(204, 1000.0, "DELETE"),
    ]


def test_chunked_request_and_response() -> None:
    observer = Http1Observer()
    body = b"5\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\n"
    head = b"POST /upload HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
    observer.client_bytes(head + body[:9], 1.0)
    assert observer.take_started() == 1
    observer.client_bytes(body[9:] + request(path="/next"), 1.25)
    assert observer.take_started() == 1
    chunked = b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
    assert observer.server_bytes(chunked, 2.0) == []
    assert observer.server_bytes(b"0\r\n\r\n" + response(200), 2.5) == [
        ok(201, 1000.0, "POST"),
        ok(200, 1250.0),
    ]


def test_invalid_chunk_size_gives_up_and_fails_requests_in_flight() -> None:
    observer = Http1Observer()
    observer.client_bytes(request(), 1.0)
    assert observer.server_bytes(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 2.0) == [
        Record("failure", 200, None, 1000.0, "GET", "protocol_error")
    ]
    assert observer.opaque
    assert observer.client_bytes(request(), 3.0) == []
    assert observer.closed(4.0, reset=True) == []


def test_expect_100_continue_latency_is_to_the_final_response() -> None:
    observer = Http1Observer()
    head = b"PUT /blob HTTP/1.1\r\nHost: svc\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"
    observer.client_bytes(head, 1.0)
    assert observer.take_started() == 1
    assert observer.server_bytes(b"HTTP/1.1 100 Continue\r\n\r\n", 1.125) == []
    observer.client_bytes(b"data", 1.25)
    assert observer.server_bytes(response(200), 1.5) == [ok(200, 500.0, "PUT")]


def test_head_response_has_no_body_even_with_content_length() -> None:
    observer = Http1Observer()
    observer.client_bytes(request("HEAD"), 1.0)
    assert observer.server_bytes(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r", 1.5) == []
    assert observer.server_bytes(b"\n", 1.75) == [ok(200, 750.0, "HEAD")]
    observer.client_bytes(request(), 2.0)
    assert observer.server_bytes(response(200, b"x" * 10), 2.5) == [ok(200, 500.0)]


def test_204_and_304_have_no_body() -> None:
    observer = Http1Observer()
    observer.client_bytes(request() + request(), 1.0)
    no_body = b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n"
    assert observer.server_bytes(no_body, 1.5) == [ok(204, 500.0), ok(304, 500.0)]
    assert not observer.opaque


def test_response_delimited_by_connection_close() -> None:
    observer = Http1Observer()
    observer.client_bytes(request(), 1.0)
    assert observer.server_bytes(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nsome", 1.5) == []
    assert observer.server_bytes(b" body", 1.75) == []
    assert observer.closed(2.0, reset=False) == [ok(200, 500.0)]
    assert observer.closed(3.0, reset=False) == []


def test_http10_response_without_length_reset_midway_fails() -> None:
    observer = Http1Observer()
    observer.client_bytes(request(), 1.0)
    observer.server_bytes(b"HTTP/1.0 200 OK\r\n\r\npartial", 1.5)
    assert observer.closed(2.0, reset=True) == [Record("failure", 200, None, 500.0, "GET", "reset")]


def test_reset_mid_response_is_a_failure_with_the_status_seen() -> None:
    observer = Http1Observer()
    observer.client_bytes(request() + request(path="/2"), 1.0)
    observer.server_bytes(response(200, b"0123456789")[:-4], 1.5)
    assert observer.closed(2.0, reset=True) == [
        Record("failure", 200, None, 500.0, "GET", "reset"),
        Record("failure", None, None, None, "GET", "reset"),
    ]


def test_close_before_any_response() -> None:
    observer = Http1Observer()
    observer.client_bytes(request("POST", body=b"abc"), 1.0)
    observer.client_bytes(b"GET / HTTP/1.1\r\nHo", 1.0)  # a request still arriving is not counted
    assert observer.take_started() == 1
    assert observer.closed(5.0, reset=False) == [Record("failure", None, None, None, "POST", "closed")]


def test_upgrade_101_counts_as_success_then_bytes_are_opaque() -> None:
    observer = Http1Observer()
    upgrade = request(path="/ws", headers="Upgrade: websocket\r\nConnection: Upgrade\r\n")
    observer.client_bytes(upgrade + b"\x81\x85early", 1.0)
    assert observer.take_started() == 1
    switching = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    assert observer.server_bytes(switching + b"\x81\x05hello", 1.25) == [ok(101, 250.0)]
    assert observer.opaque
    assert observer.client_bytes(b"\x88\x80garbage GET / HTTP/1.1\r\n\r\n", 2.0) == []
    assert observer.server_bytes(b"HTTP/1.1 500 X\r\n\r\n", 2.0) == []
    assert observer.take_started() == 0
    assert observer.closed(3.0, reset=True) == []


def test_refused_upgrade_resumes_http_with_held_bytes() -> None:
    observer = Http1Observer()
    upgrade = request(path="/", headers="Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n")
    observer.client_bytes(upgrade + request(path="/after")[:10], 1.0)
    observer.client_bytes(request(path="/after")[10:], 1.125)
    assert observer.take_started() == 1
    assert observer.server_bytes(response(200, b"no upgrade") + response(200), 1.5) == [
        ok(200, 500.0),
        ok(200, 0.0),  # the held request starts when it is released
    ]
    assert observer.take_started() == 1


def test_connect_tunnel_is_opaque_after_2xx() -> None:
    observer = Http1Observer()
    observer.client_bytes(b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n", 1.0)
    established = b"HTTP/1.1 200 Connection Established\r\n\r\n\x00\x00\x00\x08"
    assert observer.server_bytes(established, 1.5) == [ok(200, 500.0, "CONNECT")]
    assert observer.opaque


def test_malformed_request_line_gives_up_without_raising() -> None:
    observer = Http1Observer()
    observer.client_bytes(request(), 1.0)
    assert observer.client_bytes(b"GET /\x00 HTTP/1.1\r\n\r\n", 1.5) == [
        Record("failure", None, None, None, "GET", "protocol_error")
    ]
    assert observer.opaque
    assert observer.take_started() == 1


def test_huge_headers_give_up_at_the_cap() -> None:
    observer = Http1Observer(max_header_bytes=64 * 1024)
    observer.client_bytes(b"GET / HTTP/1.1\r\nX-Big: ", 1.0)
    filler = b"a" * 8192
    for _ in range(7):
        observer.client_bytes(filler, 1.0)
    assert not observer.opaque
    for _ in range(2):
        observer.client_bytes(filler, 1.0)
    assert observer.opaque  # a megabyte would have been refused long before
    assert observer.take_started() == 0
    assert observer.closed(2.0, reset=False) == []


def test_many_small_requests_in_one_chunk_do_not_trip_the_header_cap() -> None:
    observer = Http1Observer(max_header_bytes=1024)
    burst = request() * 200
    observer.client_bytes(burst, 1.0)
    assert observer.take_started() == 200
    assert not observer.opaque


def test_server_answers_an_oversized_head_before_it_ends() -> None:
    observer = Http1Observer()
    observer.client_bytes(b"GET / HTTP/1.1\r\nCookie: " + b"c" * 10000, 1.0)
    observer.client_bytes(b"c" * 10000, 1.25)
    assert observer.take_started() == 0
    too_large = b"HTTP/1.1 431 Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    assert observer.server_bytes(too_large, 1.5) == [ok(431, 500.0)]
    assert observer.take_started() == 1
    observer.client_bytes(b"c\r\n\r\n", 1.75)  # the rest of that head: not a second request
    assert observer.take_started() == 0


def test_response_without_request_gives_up() -> None:
    observer = Http1Observer()
    assert observer.server_bytes(response(408), 1.0) == []
    assert observer.opaque


def test_split_at_every_byte_boundary_gives_identical_records() -> None:
    client = (
        request(path="/a")
        + b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n"
        + request("HEAD", "/h")
        + request(path="/z")
    )
    server = (
        response(200, b"hello")
        + b"HTTP/1.1 100 Continue\r\n\r\n"
        + b"HTTP/1.1 502 Bad\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        + b"HTTP/1.1 200 OK\r\nContent-Length: 77\r\n\r\n"
        + response(404, b"\r\n\r\nbody with blank lines")
    )
    expected = [
        ok(200, 1000.0),
        Record("failure", 502, None, 1000.0, "POST"),
        ok(200, 1000.0, "HEAD"),
        ok(404, 1000.0),
    ]
    for cut in range(len(client) + 1):
        observer = Http1Observer()
        observer.client_bytes(client[:cut], 1.0)
        observer.client_bytes(client[cut:], 1.0)
        assert observer.take_started() == 4
        assert observer.server_bytes(server, 2.0) == expected, cut
    for cut in range(len(server) + 1):
        observer = Http1Observer()
        observer.client_bytes(client, 1.0)
        records = observer.server_bytes(server[:cut], 2.0) + observer.server_bytes(server[cut:], 2.0)
        assert records == expected, cut
        assert observer.closed(3.0, reset=False) == []


def test_the_connections_authority_is_its_first_requests_host() -> None:
    observer = Http1Observer()
    assert observer.authority == ""
    head = b"GET / HTTP/1.1\r\nAccept: */*\r\nHOST:  Web.Shop.svc.cluster.local:8080 \r\n\r\n"
    observer.client_bytes(head[:20], 1.0)  # the Host line not there yet
    observer.client_bytes(head[20:], 1.0)
    assert observer.authority == "web.shop.svc.cluster.local:8080"
    observer.client_bytes(b"GET / HTTP/1.1\r\nHost: other\r\n\r\n", 2.0)  # later requests: kept
    assert observer.authority == "web.shop.svc.cluster.local:8080"


def test_a_host_that_is_no_host_name_gives_no_authority() -> None:
    for host in (b"evil\"name", b"a" * 300, b"x y", b""):
        observer = Http1Observer()
        observer.client_bytes(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n", 1.0)
        assert observer.authority == "", host
