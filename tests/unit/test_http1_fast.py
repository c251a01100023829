"""The compiled HTTP/1 fast path (agent.core._http1fast) counts exactly what the llhttp-based
Python observer counts: every scenario of the HTTP/1 accounting tests runs on both, and a
differential property test drives both with the same generated conversations — heads of the
fast path's shape and of every shape it hands over (HEAD, 1xx, 204, Upgrade, Connection,
odd spacing), Content-Length and chunked bodies (hex case, leading zeros, extensions,
trailers) split anywhere, byte flips, resets — comparing the records, the started counts,
`opaque`, `authority` and `at_rest` after every step."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core import accounting, http1
from agent.core.accounting import GRPC_FAILURE_LINKERD
from agent.core.detect import ConnectionObserver, Protocol, observer_for
from agent.core.http1 import Http1Observer, http1_at_rest, http1_observer

from . import test_http1_accounting, test_http1_accounting_properties

if not os.environ.get("CI"):  # in CI the extension must be there: `make venv` builds it
    pytest.importorskip("agent.core._http1fast", reason="not built: pip install -e . builds it")
from agent.core._http1fast import Http1Fast, host_in, scan_request, scan_response


def fast_observer(max_header_bytes: int = http1.MAX_HEADER_BYTES, max_pending: int = http1.MAX_PENDING,
                  grpc_failures: frozenset[int] | None = None) -> Http1Fast:
    return Http1Fast(Http1Observer.adopt, max_header_bytes, max_pending, grpc_failures)


def test_the_agent_uses_the_compiled_path() -> None:
    assert isinstance(http1_observer(), Http1Fast)
    assert isinstance(observer_for(Protocol.HTTP1), Http1Fast)


def test_the_grpc_rule_reaches_the_python_observer_at_a_hand_over(monkeypatch: pytest.MonkeyPatch) -> None:
    """detect.observer_for gives HTTP/1 the agent's gRPC rule (Linkerd's): the compiled path
    passes it to the Python observer it hands over to."""
    seen: list[frozenset[int] | None] = []
    original = Http1Observer.adopt

    def spy(*args: Any) -> Http1Observer:
        observer = original(*args)
        seen.append(observer._grpc_failures)
        return observer

    monkeypatch.setattr(Http1Observer, "adopt", spy)
    for observer in (observer_for(Protocol.HTTP1), http1_observer(),
                     http1_observer(grpc_failures=frozenset({2}))):
        assert isinstance(observer, Http1Fast)
        observer.client_bytes(b"HEAD / HTTP/1.1\r\n\r\n", 1.0)  # HEAD is handed over
        assert observer.delegated
    assert seen == [GRPC_FAILURE_LINKERD, None, frozenset({2})]


# ------------------------------------------------ every existing scenario, on the fast path

def scenarios(module: Any) -> list[Callable[[], None]]:
    return [f for name, f in inspect.getmembers(module, inspect.isfunction)
            if name.startswith("test_") and not inspect.signature(f).parameters]


@pytest.mark.parametrize("scenario", scenarios(test_http1_accounting), ids=lambda f: f.__name__)
def test_accounting_scenarios_on_the_fast_path(scenario: Callable[[], None],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(test_http1_accounting, "Http1Observer", fast_observer)
    scenario()


def test_valid_exchanges_property_on_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(test_http1_accounting_properties, "Http1Observer", fast_observer)
    test_http1_accounting_properties.test_valid_exchanges_give_one_record_per_request()


# ------------------------------------------------------------- the fast path really runs

def test_common_messages_stay_on_the_fast_path_bodies_split_anywhere() -> None:
    observer = fast_observer()
    assert observer.client_bytes(b"GET /a?b=1 HTTP/1.1\r\nHost: svc\r\nUser-Agent: x y\r\n\r\n"
                                 b"POST /b HTTP/1.1\r\nContent-Length: 5\r\n\r\nhe", 1.0) == []
    assert observer.client_bytes(b"llo", 1.5) == []
    assert observer.take_started() == 2
    records = observer.server_bytes(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 503 x\r\n"
                                    b"Content-Length: 3\r\n\r\nn", 3.0)
    assert [(r.method, r.status_code, r.classification, r.latency_ms) for r in records] == \
        [("GET", 200, "success", 2000.0)]
    (last,) = observer.server_bytes(b"o!", 4.0)
    assert (last.method, last.status_code, last.classification, last.latency_ms) == \
        ("POST", 503, "failure", 2000.0)
    assert not observer.delegated and not observer.opaque


def test_chunked_bodies_stay_on_the_fast_path_split_anywhere() -> None:
    observer = fast_observer()
    observer.client_bytes(b"POST /u HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n", 1.0)
    observer.client_bytes(b"0\r\n\r\nGET / HTTP/1.1\r\n\r\n", 1.0)
    assert observer.take_started() == 2
    assert observer.server_bytes(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", 2.0) == []
    body = b"00A\r\n0123456789\r\n0\r\n\r\n"  # every chunked state ends a read once
    records = [record for at in range(len(body)) for record in observer.server_bytes(body[at:at + 1], 2.0)]
    assert [(r.method, r.status_code) for r in records] == [("POST", 200)]
    assert not observer.delegated


def test_a_chunk_extension_hands_over_mid_body() -> None:
    observer = fast_observer()
    observer.client_bytes(b"GET / HTTP/1.1\r\n\r\nPOST /u HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                          b"3;ext=1\r\nabc\r\n0\r\n\r\n", 1.0)
    assert observer.delegated and observer.take_started() == 2
    records = observer.server_bytes(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
                                    b"HTTP/1.1 201 OK\r\nContent-Length: 0\r\n\r\n", 2.0)
    assert [(r.method, r.status_code) for r in records] == [("GET", 200), ("POST", 201)]


def test_the_scanner_declines_what_it_does_not_take() -> None:
    assert scan_request(b"GET /x HTTP/1.1\r\nContent-Length: 12\r\n\r\n") == (39, 12, "GET")
    assert scan_response(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n") == (45, 0, 404)
    assert scan_response(b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 1\r\n\r\n") \
        == (62, 1, 200)  # what nginx sends
    # HTTP/1.0 and "Connection: close" (ab, health checkers): taken; nothing may follow them
    assert scan_request(b"GET /x HTTP/1.0\r\n\r\n") == (19, 0, "GET")
    assert scan_request(b"GET /x HTTP/1.1\r\nConnection: close\r\n\r\n") == (38, 0, "GET")
    assert scan_request(b"POST /x HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n") \
        == (63, 1, "POST")
    assert scan_response(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n") \
        == (57, 1, 200)
    for head in (b"GET /x HTTP/1.1\r\nHost: a\r\n",  # not complete
                 b"HEAD /x HTTP/1.1\r\n\r\n", b"GET x HTTP/1.1\r\n\r\n", b"GET /x HTTP/1.2\r\n\r\n",
                 b"POST /x HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                 b"GET /x HTTP/1.1\r\nConnection: close\r\nConnection: keep-alive\r\n\r\n",
                 b"GET /x HTTP/1.1\r\nConnection: close\r\nConnection: close\r\n\r\n",
                 b"GET /x HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\n\r\n",
                 b"GET /x HTTP/1.1\r\ncontent-length: 1\r\nContent-Length: 1\r\n\r\n",
                 b"GET /x HTTP/1.1\r\nContent-Length: +1\r\n\r\n", b"GET /x HTTP/1.1\r\nA: b \r\n\r\n",
                 b"GET /x HTTP/1.1\r\n folded\r\n\r\n", b"GET /x HTTP/1.1\nA: b\n\n",
                 b"GET /x HTTP/1.1\r\nUpgrade: h2c\r\n\r\n", b"GET /\xff HTTP/1.1\r\n\r\n",
                 b"GET /x HTTP/1.1\r\n" + b"A: " + b"b" * 9000 + b"\r\n\r\n"):
        assert scan_request(head) is None, head
    assert scan_request(b"PUT /x HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n") == (47, 0, "PUT")
    assert scan_response(b"HTTP/1.1 204 No Content\r\n\r\n") == (27, 0, 204)  # never a body
    assert scan_response(b"HTTP/1.1 304 Same\r\nContent-Length: 9\r\n\r\n") == (40, 0, 304)
    for head in (b"HTTP/1.1 200 OK\r\n\r\n",  # no length: the body runs to the close
                 b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                 b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\n",
                 b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                 b"HTTP/1.1 100 Continue\r\n\r\n",
                 b"HTTP/1.1 101 Up\r\n\r\n", b"HTTP/1.0 200 OK\r\n\r\n", b"HTTP/1.1 200\r\n\r\n",
                 b"HTTP/1.1 600 X\r\n\r\n",
                 b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n",  # to the close, again
                 b"HTTP/1.1 200 OK\r\nConnection: Close, TE\r\nContent-Length: 1\r\n\r\n"):
        assert scan_response(head) is None, head


# ------------------------------------------------------------------- the differential

fields = st.sampled_from([
    "Host: svc", "User-Agent: curl/8.0 (x)", "Accept: */*", "X-Empty:", "x-tab:\tv", "A: b ",
    "Connection: close", "Connection: keep-alive", "connection: Keep-Alive", "Connection: upgrade",
    "Keep-Alive: timeout=5", "Upgrade: websocket",
    "Expect: 100-continue", "Proxy-Connection: close", "content-length: 2", "Bad Name: x",
    # Host: the connection's authority label (valid, invalid, odd spacing, too long)
    "host:Web.Shop.svc:8080", "HOST \t: [::1]:80", "Host: 10.1.2.3", "Host: a_b", "Host: a b",
    "Host: x:123456", "Host: " + "h" * 254, "Host: " + "h" * 253,
])
request_line = st.sampled_from([
    "GET / HTTP/1.1", "GET /a/b?c=d&e=%20 HTTP/1.1", "POST /p HTTP/1.1", "PUT /x HTTP/1.1",
    "DELETE /x HTTP/1.1", "OPTIONS /o HTTP/1.1", "PATCH /y HTTP/1.1", "HEAD /h HTTP/1.1",
    "CONNECT svc:443 HTTP/1.1", "GET / HTTP/1.0", "GET /#f HTTP/1.1", "get / HTTP/1.1", "GET  / HTTP/1.1",
])
status_line = st.sampled_from([
    "HTTP/1.1 200 OK", "HTTP/1.1 201 ", "HTTP/1.1 404 Not Found", "HTTP/1.1 500 Boom", "HTTP/1.1 503 x",
    "HTTP/1.1 100 Continue", "HTTP/1.1 101 Switching", "HTTP/1.1 204 No Content", "HTTP/1.1 304 Same",
    "HTTP/1.0 200 OK", "HTTP/1.1 200", "HTTP/1.1 431 Too Big",
])


@st.composite
def message(draw: st.DrawFn, first_line: st.SearchStrategy[str]) -> bytes:
    head = draw(first_line) + "\r\n" + "".join(f + "\r\n" for f in draw(st.lists(fields, max_size=3)))
    body = b"b" * draw(st.integers(0, 70))
    framing = draw(st.sampled_from(["length", "length", "chunked", "none"]))
    if framing == "length":
        return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    if framing == "chunked":
        chunks, rest = b"", body
        while rest:
            size = draw(st.integers(1, len(rest)))
            digits = draw(st.sampled_from(["{:x}", "{:X}", "{:04x}"])).format(size)
            extension = draw(st.sampled_from(["", "", "", ";e=1", " "]))
            chunks += f"{digits}{extension}\r\n".encode() + rest[:size] + b"\r\n"
            rest = rest[size:]
        last = draw(st.sampled_from(["0\r\n\r\n", "0\r\n\r\n", "000\r\n\r\n", "0\r\nX-T: 1\r\n\r\n"]))
        return (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + chunks + last.encode()
    return (head + "\r\n").encode()


@st.composite
def conversation(draw: st.DrawFn) -> list[tuple[bool, bytes]]:
    """(from_client, bytes) steps: requests and responses in order, cut anywhere, some flipped."""
    client = b"".join(draw(st.lists(message(request_line), min_size=1, max_size=5)))
    server = b"".join(draw(st.lists(message(status_line), max_size=5)))
    if draw(st.booleans()) and server:  # one byte of garbage somewhere
        at = draw(st.integers(0, len(server) - 1))
        server = server[:at] + bytes([draw(st.integers(0, 255))]) + server[at + 1:]
    steps: list[tuple[bool, bytes]] = []
    sent = {True: 0, False: 0}
    data = {True: client, False: server}
    while sent[True] < len(client) or sent[False] < len(server):
        side = draw(st.booleans())
        if sent[side] >= len(data[side]):
            side = not side
        size = draw(st.integers(1, 200))
        steps.append((side, data[side][sent[side]:sent[side] + size]))
        sent[side] += size
    return steps


def run(observer: Http1Observer | Http1Fast, steps: list[tuple[bool, bytes]], reset: bool) -> list[object]:
    trace: list[object] = []
    for t, (from_client, data) in enumerate(steps):
        feed = observer.client_bytes if from_client else observer.server_bytes
        trace.append((feed(data, float(t)), observer.take_started(), observer.opaque,
                      observer.authority, observer.at_rest))
        assert http1_at_rest(observer) == observer.at_rest
    trace.append((observer.closed(float(len(steps)), reset), observer.take_started(), observer.opaque,
                  observer.authority, observer.at_rest))
    return trace


@settings(max_examples=int(os.environ.get("PINION_DIFF_EXAMPLES", "400")), deadline=None)
@given(conversation(), st.booleans(), st.integers(1, 8))
def test_fast_and_python_observers_count_the_same(steps: list[tuple[bool, bytes]], reset: bool,
                                                  max_pending: int) -> None:
    expected = run(Http1Observer(max_pending=max_pending), steps, reset)
    assert run(fast_observer(max_pending=max_pending), steps, reset) == expected


AB_REQUEST = b"GET /1k HTTP/1.0\r\nHost: 10.42.2.3\r\nUser-Agent: ApacheBench/2.3\r\nAccept: */*\r\n\r\n"
CLOSING_RESPONSE = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 4\r\n\r\nbody"


@pytest.mark.parametrize("steps", [
    [(True, AB_REQUEST), (False, CLOSING_RESPONSE)],  # ab against nginx: all on the fast path
    [(True, AB_REQUEST), (False, CLOSING_RESPONSE[:-2])],  # cut short by the close: it ends there
    [(True, AB_REQUEST), (False, CLOSING_RESPONSE[:40]), (False, CLOSING_RESPONSE[40:-1])],
    [(True, AB_REQUEST + b"\r\n"), (False, CLOSING_RESPONSE + b"\r\n")],  # CR LF after: llhttp skips
    [(True, AB_REQUEST + AB_REQUEST), (False, CLOSING_RESPONSE)],  # nothing after an HTTP/1.0 request
    [(True, AB_REQUEST), (False, CLOSING_RESPONSE + b"HTTP/1.1 200 OK\r\n")],  # nor a closing response
    [(True, b"GET / HTTP/1.1\r\n\r\n"), (False, CLOSING_RESPONSE[:59]),
     (True, b"HEAD / HTTP/1.1\r\n\r\n")],  # handed over in a closing body: it may end at the close
    [(True, b"GET / HTTP/1.1\r\n\r\n"), (False, CLOSING_RESPONSE[:45])],  # handed over in its head
    [(True, b"POST / HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nab"),
     (False, b"HTTP/1.1 204 No Content\r\n\r\n"), (True, AB_REQUEST), (False, CLOSING_RESPONSE)],
])
@pytest.mark.parametrize("reset", [False, True])
def test_messages_that_end_the_connection_count_the_same(steps: list[tuple[bool, bytes]],
                                                         reset: bool) -> None:
    """HTTP/1.0 requests and "Connection: close" (ab's shape: a connection per request) stay on
    the compiled path; bytes after such a message go to llhttp, which refuses them (CR LF
    aside), and a closing response cut short by a close (not a reset) counts as ended."""
    fast = fast_observer()
    assert run(fast, steps, reset) == run(Http1Observer(), steps, reset)


def test_ab_against_nginx_never_leaves_the_compiled_path() -> None:
    fast = fast_observer()
    fast.client_bytes(AB_REQUEST, 1.0)
    records = fast.server_bytes(CLOSING_RESPONSE, 1.25)
    assert [(r.status_code, r.latency_ms, r.classification) for r in records] == [(200, 250.0, "success")]
    assert fast.at_rest and fast.authority == "10.42.2.3" and not fast.delegated
    assert fast.closed(2.0, reset=False) == [] and not fast.delegated


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=120)), max_size=20), st.booleans(),
       st.sampled_from([b"", b"GET / HTTP/1.1\r\nContent-Length: 3\r\n\r\n", b"GET / HTTP/1.1\r\nHost: a"]))
def test_byte_soup_counts_the_same(steps: list[tuple[bool, bytes]], reset: bool, first: bytes) -> None:
    prefix = [(True, first)] if first else []
    assert run(fast_observer(), prefix + steps, reset) == run(Http1Observer(), prefix + steps, reset)


def test_an_answer_to_a_head_still_arriving_names_the_last_method_on_both_paths() -> None:
    """Found by the differential at 10,000 examples: a response that answers a request head
    of which only "G" arrived counts it under the method llhttp still holds, the previous
    request's; a hand-over must leave that method, not its synthetic head's, in the parser."""
    for first in (b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nb\r\n0\r\nX-T: 1\r\n\r\nG",
                  b"PUT / HTTP/1.1\r\nContent-Length: 1\r\n\r\nbHEAD / HTTP/1.1\r\n\r\nG"):
        steps = [(True, first), (False, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n" * 3),
                 (True, b"ET / HTTP/1.1\r\n\r\n")]
        observer = fast_observer()
        assert run(observer, steps, False) == run(Http1Observer(), steps, False)
        assert observer.delegated


# ------------------------------------------------------------------- authority, at rest

host_pieces = st.sampled_from([
    b"\r\n", b"\r", b"\n", b"Host", b"hOsT", b"host", b"HOST", b"Hos", b":", b" ", b"\t", b"a", b"Z",
    b"[", b"]", b"::1", b"8080", b":80", b"_", b".", b"-", b"9", b"f", b"\xff", b"\x00", b"~",
    b"GET / HTTP/1.1", b"x" * 300, b"y" * 250, b"1" * 6, b"e" * 44,
])


@settings(max_examples=1500, deadline=None)
@given(st.lists(host_pieces, max_size=30))
def test_the_c_host_finder_finds_what_the_python_one_finds(pieces: list[bytes]) -> None:
    data = b"".join(pieces)
    assert host_in(data) == accounting.host_in(data), data


def test_the_c_host_finder_cases() -> None:
    cases = {
        b"GET / HTTP/1.1\r\nHost: Web.Shop:8080\r\n\r\n": "web.shop:8080",
        b"GET / HTTP/1.1\r\nhost \t:\t10.0.0.1 \t\r\n": "10.0.0.1",
        b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n": "[::1]:80",
        b"GET / HTTP/1.1\r\nHost: [::1]x\r\n": "",
        b"GET / HTTP/1.1\r\nHost: [1]\r\n": "",
        b"GET / HTTP/1.1\r\nHost: [" + b"1" * 45 + b"]\r\n": "[" + "1" * 45 + "]",
        b"GET / HTTP/1.1\r\nHost: [" + b"1" * 46 + b"]\r\n": "",
        b"GET / HTTP/1.1\r\nHost: a:\r\n": "",
        b"GET / HTTP/1.1\r\nHost: a:123456\r\n": "",
        b"GET / HTTP/1.1\r\nHost: a:12345\r\n": "a:12345",
        b"GET / HTTP/1.1\r\nHost: -a\r\n": "",
        b"GET / HTTP/1.1\r\nHost: " + b"a" * 253 + b"\r\n": "a" * 253,
        b"GET / HTTP/1.1\r\nHost: " + b"a" * 254 + b"\r\n": "",
        b"GET / HTTP/1.1\r\nHost: " + b"a" * 301 + b"\r\nHost: b\r\n": "b",
        b"GET / HTTP/1.1\r\nHost: a b\r\nHost: c\r\n": "c",  # the first line does not match
        b"GET / HTTP/1.1\r\nHost: a_b\r\nHost: c\r\n": "",  # it matches, and is no label
        b"GET / HTTP/1.1\r\nX-Host: a\r\n": "",
        b"GET / HTTP/1.1\r\nHost: a": "",  # the line is not complete in this chunk
        b"Host: a\r\n": "",
        b"": "",
    }
    for data, label in cases.items():
        assert accounting.host_in(data) == label, data  # the reference
        assert host_in(data) == label, data


def test_authority_on_the_fast_path_and_after_a_hand_over() -> None:
    observer = fast_observer()
    assert observer.authority == "" and observer.at_rest
    observer.client_bytes(b"GET / HTTP/1.1\r\nHost: a_b\r\n\r\n", 1.0)  # no label, and no more looking
    observer.client_bytes(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n", 1.0)
    assert observer.authority == "" and not observer.delegated
    observer = fast_observer()
    observer.client_bytes(b"GET / HTTP/1.1\r\nHost: Web:80\r\n\r\n"
                          b"HEAD / HTTP/1.1\r\nHost: other\r\n\r\n", 1.0)
    assert observer.delegated and observer.authority == "web:80"
    observer = fast_observer()  # the first head handed over, its Host line cut: Python looks on
    observer.client_bytes(b"HEAD / HTTP/1.1\r\nHo", 1.0)
    observer.client_bytes(b"\r\nHost: later\r\n\r\n", 1.0)
    assert observer.delegated and observer.authority == "later"


def test_at_rest_on_the_fast_path_and_after_a_hand_over() -> None:
    for observer in (fast_observer(), Http1Observer()):
        states = [observer.at_rest]
        observer.client_bytes(b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\nab", 1.0)
        states.append(observer.at_rest)  # a request awaits its response
        observer.server_bytes(b"HTTP/1.1 413 Too Big\r\nContent-Length: 0\r\n\r\n", 2.0)
        states.append(observer.at_rest)  # answered in full (its body is still coming)
        observer.client_bytes(b"cd", 3.0)
        states.append(observer.at_rest)
        observer.client_bytes(b"GET / HTTP/1.1\r\n\r\n", 4.0)
        observer.server_bytes(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab", 5.0)
        states.append(observer.at_rest)  # mid response body
        observer.server_bytes(b"cd", 6.0)
        states.append(observer.at_rest)
        observer.client_bytes(b"HEAD / HTTP/1.1\r\n\r\nGET / HT", 7.0)  # handed over, mid head
        states.append(observer.at_rest)
        observer.client_bytes(b"TP/1.1\r\n\r\n", 7.0)
        observer.server_bytes(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n"
                              b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 8.0)
        states.append(observer.at_rest)
        observer.closed(9.0, reset=False)
        states.append(observer.at_rest)  # opaque
        assert states == [True, False, True, True, False, True, False, True, False], type(observer)
        assert isinstance(observer, Http1Observer) or observer.delegated


def test_the_connection_observer_asks_either_http1_observer_if_at_rest(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.core import detect

    for make in (http1_observer, Http1Observer):
        monkeypatch.setattr(detect, "observer_for", lambda protocol, *_, make=make: make())
        connection = ConnectionObserver()
        assert not connection.at_rest  # nothing read yet: its request may wait in the kernel
        connection.client_bytes(b"GET / HTTP/1.1\r\nHost: Svc:8080\r\n\r\n", 1.0)
        assert not connection.at_rest and connection.authority == "svc:8080"
        connection.server_bytes(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 2.0)
        assert connection.at_rest, make
        connection.client_bytes(b"HEAD / HTTP/1.1\r\n\r\n", 3.0)
        assert not connection.at_rest
        connection.server_bytes(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", 4.0)
        assert connection.at_rest, make


def test_abandon_on_both_paths() -> None:
    for observer in (fast_observer(), Http1Observer()):
        observer.client_bytes(b"GET / HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n", 1.0)
        observer.server_bytes(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc", 2.0)
        records = observer.abandon("protocol_error")
        assert [(r.method, r.status_code, r.error) for r in records] == \
            [("GET", 200, "protocol_error"), ("GET", None, "protocol_error")]
        assert observer.opaque and observer.client_bytes(b"GET / HTTP/1.1\r\n\r\n", 3.0) == []


def test_the_lab_servers_and_curls_heads_take_the_fast_path() -> None:
    """The golden-metrics tests in tests/netns (curl -> agent.lab.httpserver) run on it."""
    import asyncio

    from agent.lab import httpserver

    class Writer:
        def __init__(self) -> None:
            self.data = b""

        def write(self, data: bytes) -> None:
            self.data += data

        async def drain(self) -> None:
            pass

    writer = Writer()
    asyncio.run(httpserver.respond(writer, 500, b"boom", keep_alive=True, head_only=False))  # type: ignore[arg-type]
    assert scan_response(writer.data) == (len(writer.data) - 4, 4, 500)
    curl = b"GET /ok HTTP/1.1\r\nHost: 10.42.2.3:8080\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n"
    assert scan_request(curl) == (len(curl), 0, "GET")


def test_every_byte_the_scanner_takes_in_a_head_llhttp_takes_too() -> None:
    """In the request target, a header name, a header value and the reason phrase: a byte
    the scanner accepts must never be one llhttp (strict, as httptools runs it) rejects."""
    import httptools

    class Done:
        complete = 0

        def on_message_complete(self) -> None:
            self.complete += 1

    def llhttp_takes(parser_type: type, data: bytes) -> bool:
        done = Done()
        try:
            parser_type(done).feed_data(data)
        except httptools.HttpParserError:
            return False
        return done.complete == 1

    for byte in (bytes([value]) for value in range(256)):
        for request in (b"GET /a" + byte + b"b HTTP/1.1\r\n\r\n",
                        b"GET / HTTP/1.1\r\nA" + byte + b"b: v\r\n\r\n",
                        b"GET / HTTP/1.1\r\nA: x" + byte + b"y\r\n\r\n"):
            if scan_request(request) is not None:
                assert llhttp_takes(httptools.HttpRequestParser, request), request
        response = b"HTTP/1.1 200 O" + byte + b"K\r\nContent-Length: 0\r\n\r\n"
        if scan_response(response) is not None:
            assert llhttp_takes(httptools.HttpResponseParser, response), response
