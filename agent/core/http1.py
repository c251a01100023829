"""HTTP/1.x request accounting over a relayed connection, sans-IO, using httptools (llhttp).

Two llhttp parsers, one per direction, follow message framing (Content-Length, chunked,
keep-alive, pipelining) in C. Only three callbacks per message are registered — begin,
headers complete, message complete — and no header/url/body callbacks, so llhttp never
hands header or body bytes to Python and retains nothing: memory per connection is constant
whatever the peers send.

Request/response pairing is by order (HTTP/1 pipelining). A request *starts* when its headers
are complete; latency runs to the first final (non-1xx) response headers: a `100 Continue`
is informational, as in hyper (which Linkerd uses) where 1xx never reach the proxy's
metrics. The Record is emitted when the response message completes, so a connection that
dies mid-body yields a failure (with the status it had). Special cases:

- HEAD: llhttp cannot be told a response has no body, so while a HEAD is outstanding the
  server bytes are fed in pieces ending at each `CRLF CRLF`; when the HEAD response's
  headers complete, that parser is replaced by a fresh one.
- 101 Switching Protocols, or 2xx to CONNECT: the request is a success at the response
  headers and the connection becomes opaque (WebSocket, h2c, tunnels are not followed).
  Client bytes after an upgrade request are held (bounded) until the response says whether
  the upgrade happened; a refused upgrade resumes HTTP parsing with them.
- A response read until the connection closes (no length): a clean close completes it with
  its status; this can also count a truncated `Connection: close` response as complete,
  which llhttp's API (no EOF signal, no Content-Length accessor) cannot tell apart.
- A response with no request waiting: if a request's headers are being received it starts
  now (servers answer oversize heads with 431 before they end); otherwise the observer gives
  up.

Giving up (parser error, a head over `max_header_bytes`, held bytes over that cap, more than
`max_pending` requests waiting):
the observer turns opaque — it stops parsing and the proxy keeps relaying untouched — and
every request in flight ends as a failure with error "protocol_error". No exception ever
leaves this module's public methods.
"""

from __future__ import annotations

import functools
from collections import deque
from typing import TYPE_CHECKING, Final, Protocol

import httptools  # untyped (mypy config ignores missing imports); used through _Parser below

from agent.core.accounting import (
    CLOSED,
    PROTOCOL_ERROR,
    RESET,
    Observer,
    Record,
    classify,
    host_in,
)
from agent.core.tap import NEVER, RequestDetail, TapSwitch, clean, split_target

if TYPE_CHECKING:
    from agent.core.counters import HttpCounters

MAX_HEADER_BYTES: Final = 64 * 1024  # per message head; also caps bytes held after Upgrade
MAX_PENDING: Final = 4096  # pipelined requests awaiting responses
_HEAD_END: Final = b"\r\n\r\n"


class _Parser(Protocol):
    """The part of httptools.HttpRequestParser / HttpResponseParser this module uses."""

    def feed_data(self, data: bytes | memoryview) -> None: ...

    def should_keep_alive(self) -> bool: ...


class _RequestParser(_Parser, Protocol):
    def get_method(self) -> bytes: ...


class _ResponseParser(_Parser, Protocol):
    def get_status_code(self) -> int: ...


class _Pending:
    """A started request waiting for (the end of) its response."""

    __slots__ = ("detail", "head", "latency_ms", "may_end_at_eof", "method", "start", "status")

    def __init__(self, method: str, start: float, detail: RequestDetail | None = None) -> None:
        self.detail = detail
        self.method = method
        self.head = method == "HEAD"
        self.start = start
        self.status: int | None = None
        self.latency_ms: float | None = None
        self.may_end_at_eof = False


class _Callbacks:
    """The only callbacks llhttp sees; header/url/body ones are absent on purpose (speed)."""

    __slots__ = ("on_headers_complete", "on_message_begin", "on_message_complete")

    def __init__(self, *callbacks: object) -> None:
        self.on_message_begin, self.on_headers_complete, self.on_message_complete = callbacks


class _TapRequestCallbacks(_Callbacks):
    """While a tap is open: also the URL, the Host header and the body's length."""

    __slots__ = ("on_body", "on_header", "on_url")

    def __init__(self, *callbacks: object) -> None:
        super().__init__(*callbacks[:3])
        self.on_url, self.on_header, self.on_body = callbacks[3:]


class _TapResponseCallbacks(_Callbacks):
    """While a tap is open: also the response body's length."""

    __slots__ = ("on_body",)

    def __init__(self, *callbacks: object) -> None:
        super().__init__(*callbacks[:3])
        self.on_body = callbacks[3]


class Http1Observer:
    """Accounts the requests of one HTTP/1.x connection (see the module docstring)."""

    __slots__ = (
        "_authority",
        "_client_held",
        "_closing",
        "_grpc_failures",
        "_head_outstanding",
        "_head_swap",
        "_held_bytes",
        "_max_header_bytes",
        "_max_pending",
        "_muted",
        "_now",
        "_opaque",
        "_out",
        "_pending",
        "_req_answered_early",
        "_req_began_at",
        "_req_head_bytes",
        "_req_heads",
        "_req_idle",
        "_req_in_head",
        "_request_parser",
        "_resp_head_bytes",
        "_resp_heads",
        "_resp_idle",
        "_resp_in_head",
        "_resp_informational",
        "_response_parser",
        "_server_tail",
        "_started",
        "_tap",
        "_tap_host",
        "_tap_request",
        "_tap_response",
        "_tap_url",
    )

    def __init__(
        self,
        max_header_bytes: int = MAX_HEADER_BYTES,
        max_pending: int = MAX_PENDING,
        grpc_failures: frozenset[int] | None = None,
        tap: TapSwitch = NEVER,
    ) -> None:
        self._max_header_bytes = max_header_bytes
        self._max_pending = max_pending
        self._grpc_failures = grpc_failures
        # Tap: parsers with URL/Host/body callbacks while a tap is open, swapped in and out
        # only between messages (`_req_idle`, `_resp_idle`); see agent/core/tap.py.
        self._tap = tap
        self._tap_request = self._tap_response = False
        self._tap_url = self._tap_host = b""
        self._req_idle = self._resp_idle = True
        self._request_parser: _RequestParser | None = self._new_request_parser()
        self._response_parser: _ResponseParser | None = self._new_response_parser()
        self._pending: deque[_Pending] = deque()
        self._out: list[Record] = []
        self._now = 0.0
        self._started = 0
        self._opaque = False
        # Head-size accounting: bytes of feeds spent wholly inside one message head.
        self._req_in_head = self._resp_in_head = False
        self._req_heads = self._resp_heads = 0  # heads completed so far
        self._req_head_bytes = self._resp_head_bytes = 0
        self._req_answered_early = False
        self._req_began_at = 0.0
        self._resp_informational = False
        # HEAD handling: number outstanding, "replace the parser now", last 3 server bytes.
        self._head_outstanding = 0
        self._head_swap = False
        self._server_tail = b""
        # After an upgrade request: client bytes held until the response (None: not held).
        self._client_held: list[bytes] | None = None
        self._held_bytes = 0
        self._muted = False  # `adopt` feeding a synthetic head: callbacks do nothing
        self._closing = False  # a message either way said the connection ends after it
        self._authority = ""  # the first request's Host (a label value), looked for until its head ends

    @classmethod
    def adopt(
        cls,
        pending: list[tuple[str, float, int | None, float | None, bool]],
        request_state: bytes,
        response_state: bytes,
        max_header_bytes: int = MAX_HEADER_BYTES,
        max_pending: int = MAX_PENDING,
        grpc_failures: frozenset[int] | None = None,
        authority: str = "",
        request_heads: int = 0,
        tap: TapSwitch = NEVER,
    ) -> Http1Observer:
        """An observer in the state this one would have after the messages another observer
        (the compiled fast path, `agent.core._http1fast`) already followed, at a boundary of
        complete heads: `pending` = (method, start, status, latency_ms, may_end_at_eof) of
        the requests awaiting (the end of) their responses (the last: that response, its
        head read, ends the connection, so a close ends it too); `request_state` / `response_state` = bytes
        that bring a fresh parser to where the body being read in that direction is (a head
        of the same framing, then what of a chunked body was read), b"" between messages;
        `authority` = what `host_in` found in the chunks of the first request head, and
        `request_heads` = how many request heads were complete (once one is, Host is no
        longer looked for); `tap`: the pod's tap switch (the fast path hands a connection
        over when a tap opens, so the requests that start then are tapped)."""
        observer = cls(max_header_bytes, max_pending, grpc_failures, tap)
        observer._authority = authority
        observer._req_heads = request_heads
        for method, start, status, latency_ms, may_end_at_eof in pending:
            request = _Pending(method, start)
            request.status, request.latency_ms = status, latency_ms
            request.may_end_at_eof = may_end_at_eof
            observer._pending.append(request)
        observer._muted = True  # the parsers reach the middle of those bodies
        if request_state:
            observer._feed_request(request_state)
        if response_state:
            observer._feed_response(response_state)
        observer._muted = False
        return observer

    # --- the Observer interface -------------------------------------------------------

    @property
    def opaque(self) -> bool:
        return self._opaque

    @property
    def authority(self) -> str:
        return self._authority

    def take_started(self) -> int:
        started, self._started = self._started, 0
        return started

    @property
    def at_rest(self) -> bool:
        """Between messages: every request answered in full, no next one begun. Closing the
        connection now loses nothing (what a server does to an idle keep-alive connection)."""
        return not (self._opaque or self._pending or self._req_in_head
                    or self._client_held is not None)

    @property
    def keeps_alive(self) -> bool:
        """At rest, both parsers between messages (a request body can still be arriving
        after its response), and no message either way ended the connection (`Connection:
        close`, HTTP/1.0 without keep-alive, a body read to the close), no HEAD or early
        answer outstanding: a fresh parser reads the next messages as these parsers would."""
        return (self.at_rest and self._req_idle and self._resp_idle and not self._closing
                and self._request_parser is not None
                and self._response_parser is not None and not self._head_outstanding
                and not self._req_answered_early)

    def client_bytes(self, data: bytes, now: float) -> list[Record]:
        if self._opaque:
            return []
        self._now = now
        if not self._req_heads and not self._authority:
            self._authority = host_in(data)  # one search per chunk of the first head only
        if self._client_held is not None:
            self._hold(data)
        else:
            self._feed_request(data)
        return self._take_out()

    def server_bytes(self, data: bytes, now: float) -> list[Record]:
        if self._opaque:
            return []
        self._now = now
        if self._head_outstanding:
            self._feed_response_around_head(data)
        else:
            self._feed_response(data)
        return self._take_out()

    def closed(self, now: float, reset: bool) -> list[Record]:
        if self._opaque:
            return self._take_out()
        self._now = now
        pending = self._pending
        if pending and not reset and pending[0].may_end_at_eof:
            self._finish(pending.popleft(), None)  # a response delimited by the close
        self._give_up(RESET if reset else CLOSED)
        return self._take_out()

    def abandon(self, error: str) -> list[Record]:
        """Stop observing; every request in flight ends as a failure with `error`."""
        if not self._opaque:
            self._give_up(error)
        return self._take_out()

    # --- feeding the parsers ----------------------------------------------------------

    def _feed_request(self, data: bytes | memoryview) -> None:
        parser = self._request_parser
        if parser is None:
            return
        if self._tap.on is not self._tap_request and self._req_idle:
            parser = self._request_parser = self._new_request_parser()
        in_head, heads = self._req_in_head, self._req_heads
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._client_held = []
            self._hold(data[upgrade.args[0] :])
            return
        except httptools.HttpParserError:
            self._give_up(PROTOCOL_ERROR)
            return
        if in_head and self._req_in_head and heads == self._req_heads:
            self._req_head_bytes += len(data)
            if self._req_head_bytes > self._max_header_bytes:
                self._give_up(PROTOCOL_ERROR)

    def _hold(self, data: bytes | memoryview) -> None:
        held = self._client_held
        if held is None or not data:
            return
        self._held_bytes += len(data)
        if self._held_bytes > self._max_header_bytes:
            self._give_up(PROTOCOL_ERROR)
        else:
            held.append(bytes(data))

    def _release_held(self) -> None:
        held, self._client_held, self._held_bytes = self._client_held, None, 0
        for data in held or ():
            if self._client_held is not None or self._opaque:
                self._hold(data)
            else:
                self._feed_request(data)

    def _feed_response(self, data: bytes | memoryview) -> None:
        parser = self._response_parser
        if parser is None:
            return
        if self._tap.on is not self._tap_response and self._resp_idle:
            parser = self._response_parser = self._new_response_parser()
        in_head, heads = self._resp_in_head, self._resp_heads
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            return  # the 101 was handled in its headers callback: the observer is opaque
        except httptools.HttpParserError:
            if not self._opaque:
                self._give_up(PROTOCOL_ERROR)
            return
        if in_head and self._resp_in_head and heads == self._resp_heads:
            self._resp_head_bytes += len(data)
            if self._resp_head_bytes > self._max_header_bytes:
                self._give_up(PROTOCOL_ERROR)

    def _feed_response_around_head(self, data: bytes) -> None:
        """Feed in pieces ending at each CRLF CRLF, so a HEAD response's head can be cut off."""
        view = memoryview(data)
        tail = self._server_tail
        joined = tail + data if tail else data
        start, search = 0, 0
        while self._head_outstanding and not self._opaque:
            found = joined.find(_HEAD_END, search)
            if found < 0:
                break
            search = found + 1
            end = found + 4 - len(tail)
            if end <= start:
                continue
            self._feed_response(view[start:end])
            start = end
            if self._head_swap:
                self._head_swap = False
                self._response_parser = self._new_response_parser()
                self._resp_in_head = False
                self._resp_idle = True
        if start < len(data) and not self._opaque:
            self._feed_response(view[start:])
        self._server_tail = joined[-3:] if self._head_outstanding else b""

    def _new_request_parser(self) -> _RequestParser:
        self._tap_request = self._tap.on
        callbacks = (
            _TapRequestCallbacks(self._tap_req_begin, self._req_headers, self._req_complete,
                                 self._tap_req_url, self._tap_req_header, self._tap_req_body)
            if self._tap_request
            else _Callbacks(self._req_begin, self._req_headers, self._req_complete)
        )
        parser: _RequestParser = httptools.HttpRequestParser(callbacks)
        return parser

    def _new_response_parser(self) -> _ResponseParser:
        self._tap_response = self._tap.on
        callbacks = (
            _TapResponseCallbacks(self._resp_begin, self._resp_headers, self._resp_complete,
                                  self._tap_resp_body)
            if self._tap_response
            else _Callbacks(self._resp_begin, self._resp_headers, self._resp_complete)
        )
        parser: _ResponseParser = httptools.HttpResponseParser(callbacks)
        return parser

    # --- llhttp callbacks (they must not raise) ---------------------------------------

    def _req_begin(self) -> None:
        self._req_idle = False  # adopt's synthetic head too: the parser is inside a message
        if self._muted:
            return
        self._req_began_at = self._now
        self._req_in_head = True
        self._req_head_bytes = 0

    def _tap_req_begin(self) -> None:
        self._tap_url = self._tap_host = b""
        self._req_begin()

    def _tap_req_url(self, url: bytes) -> None:
        if len(self._tap_url) < 4096:  # a URL comes in pieces when it spans reads
            self._tap_url += url

    def _tap_req_header(self, name: bytes, value: bytes) -> None:
        if len(name) == 4 and name.lower() == b"host":
            self._tap_host = value

    def _tap_req_body(self, body: bytes) -> None:
        if self._pending and self._pending[-1].detail is not None:
            self._pending[-1].detail.request_bytes += len(body)

    def _tap_resp_body(self, body: bytes) -> None:
        if self._pending and self._pending[0].detail is not None:
            self._pending[0].detail.response_bytes += len(body)

    def _req_headers(self) -> None:
        parser = self._request_parser
        if parser is not None and not parser.should_keep_alive():
            self._closing = True  # (adopt's synthetic heads too: they carry what was seen)
        if self._muted:
            return
        self._req_in_head = False
        self._req_heads += 1
        if self._req_answered_early:
            self._req_answered_early = False  # started when its response came (see below)
        elif not self._opaque:
            self._start_request()

    def _req_complete(self) -> None:
        self._req_idle = True  # between messages: the tap may swap the parser here

    def _start_request(self, began_at: float | None = None) -> None:
        parser = self._request_parser
        method = parser.get_method().decode("ascii", "replace") if parser is not None else "?"
        detail = None
        if self._tap_request:
            authority, path = split_target(clean(self._tap_url))
            detail = RequestDetail(clean(self._tap_host) or authority, path)
        pending = _Pending(method, self._now if began_at is None else began_at, detail)
        if pending.head:
            self._head_outstanding += 1
        self._pending.append(pending)
        self._started += 1
        if len(self._pending) > self._max_pending:
            self._give_up(PROTOCOL_ERROR)

    def _resp_begin(self) -> None:
        self._resp_idle = False
        if self._muted:
            return
        self._resp_in_head = True
        self._resp_head_bytes = 0

    def _resp_headers(self) -> None:
        parser = self._response_parser
        if parser is not None and not parser.should_keep_alive():
            self._closing = True
        if self._muted:
            return
        self._resp_in_head = False
        self._resp_heads += 1
        if self._opaque:
            return
        parser = self._response_parser
        status = parser.get_status_code() if parser is not None else 0
        self._resp_informational = 100 <= status < 200 and status != 101
        if self._resp_informational:
            return
        if not self._pending:
            if not self._req_in_head:
                self._give_up(PROTOCOL_ERROR)  # a response nobody asked for
                return
            self._start_request(self._req_began_at)  # answered a head still arriving (431)
            self._req_answered_early = True
        pending = self._pending[0]
        pending.status = status
        pending.latency_ms = (self._now - pending.start) * 1000.0
        if status == 101 or (pending.method == "CONNECT" and 200 <= status < 300):
            self._finish(self._pending.popleft(), None)
            self._give_up(PROTOCOL_ERROR)  # the bytes that follow are not HTTP; nothing is pending
        elif pending.head:
            self._finish(self._pending.popleft(), None)
            self._head_outstanding -= 1
            self._head_swap = True
        else:
            pending.may_end_at_eof = parser is not None and not parser.should_keep_alive()
            if self._client_held is not None:
                self._release_held()  # the upgrade was refused: back to HTTP

    def _resp_complete(self) -> None:
        self._resp_idle = True
        if self._resp_informational:
            self._resp_informational = False
            return
        if not self._opaque and self._pending and self._pending[0].status is not None:
            self._finish(self._pending.popleft(), None)

    # --- records ----------------------------------------------------------------------

    def _finish(self, pending: _Pending, error: str | None) -> None:
        if pending.detail is not None:
            pending.detail.end_ms = (self._now - pending.start) * 1000.0
        self._out.append(
            Record(
                classification=classify(pending.status, None, error, self._grpc_failures),
                status_code=pending.status,
                grpc_status=None,
                latency_ms=pending.latency_ms,
                method=pending.method,
                error=error,
                detail=pending.detail,
            )
        )

    def _give_up(self, error: str) -> None:
        self._opaque = True
        self._request_parser = self._response_parser = None  # also breaks reference cycles
        self._client_held = None
        pending, self._pending = self._pending, deque()
        for request in pending:
            self._finish(request, error)

    def _take_out(self) -> list[Record]:
        out = self._out
        if not out:
            return []
        self._out = []
        return out


_Http1Fast: type[_http1fast.Http1Fast] | None
try:  # the compiled fast path (csrc/http1fast.c), built by `pip install`; see http1_observer
    from agent.core import _http1fast

    _Http1Fast = _http1fast.Http1Fast
except ImportError:  # pragma: no cover - a checkout used without building it
    _Http1Fast = None


def http1_observer(
    max_header_bytes: int = MAX_HEADER_BYTES,
    max_pending: int = MAX_PENDING,
    grpc_failures: frozenset[int] | None = None,
    tap: TapSwitch = NEVER,
) -> Observer:
    """The observer the proxy uses for an HTTP/1 connection: the compiled fast path when it is
    built (it accounts messages of the common shape itself and hands the connection to an
    `Http1Observer`, via `Http1Observer.adopt`, at the first message it does not take), else
    `Http1Observer` from the start. Both count the same (tests/unit/test_http1_fast.py)."""
    if _Http1Fast is None:
        return Http1Observer(max_header_bytes, max_pending, grpc_failures, tap)
    if tap is NEVER:
        return _Http1Fast(Http1Observer.adopt, max_header_bytes, max_pending, grpc_failures)
    # While a tap of the pod is open, requests that start are handed to the Python observer
    # (which taps them); the fast path checks the switch before each request head.
    return _Http1Fast(functools.partial(Http1Observer.adopt, tap=tap), max_header_bytes,
                      max_pending, grpc_failures, tap)


def count_fast(observer: Observer, counters: HttpCounters) -> _http1fast.Http1Fast | None:
    """Hand the connection's series to the compiled fast path, if `observer` is one that has
    not handed over: from now on it counts the requests that start and end on it into the
    series' tally (made here on first use) instead of returning Records (issue #16), and the
    proxy may feed it directly (`feed_client`/`feed_server`). None for any other observer."""
    if _Http1Fast is None or not isinstance(observer, _Http1Fast) or observer.delegated:
        return None
    tally = counters.tally
    if not isinstance(tally, _http1fast.Tally):
        tally = counters.tally = _http1fast.Tally()
    observer.count_into(tally)
    return observer


def reusable_after_hand_over(observer: Observer) -> bool:
    """A compiled fast path that handed its connection to the Python observer (for a tap of
    the pod, or a message it does not take: a head cut across reads, HEAD, 1xx, ...) whose
    Python observer is now where a fresh fast path could go on from (`keeps_alive`)."""
    if _Http1Fast is None or not isinstance(observer, _Http1Fast):
        return False
    delegate = observer.delegate
    return isinstance(delegate, Http1Observer) and delegate.keeps_alive


def http1_at_rest(observer: Observer) -> bool:
    """`at_rest` of an HTTP/1 observer, compiled or not (the fast path answers it itself,
    or by its Python delegate once it handed over); False for any other observer."""
    if isinstance(observer, Http1Observer):
        return observer.at_rest
    return _Http1Fast is not None and isinstance(observer, _Http1Fast) and observer.at_rest
