"""HTTP/2 (prior knowledge, cleartext) request accounting over a relayed connection, sans-IO.

Frames are cut by their 9-byte headers; only the payloads that matter are collected (HEADERS,
CONTINUATION, PUSH_PROMISE, SETTINGS, RST_STREAM, the first 8 bytes of GOAWAY). DATA and
every other frame are skipped by length without copying. Header blocks are decoded with one
`hpack.Decoder` per direction, in byte-stream order, so the dynamic tables stay in step with
the peers' — every block is decoded, even ones we do not need (request trailers, pushes).
Blocks are decoded, or found in memos, by `agent.core.hpack_blocks.HeaderBlocks`.

A request starts with the client's HEADERS on a new stream (odd id above every earlier one).
Latency runs to the first non-1xx response HEADERS (`:status`). The Record is emitted at the
response's END_STREAM (on DATA or trailing HEADERS), with `grpc-status` from the trailers or
from a trailers-only response. RST_STREAM (either side) on a stream still open, GOAWAY from
the server above its last_stream_id, and the connection closing all end open streams as
failures ("reset", "refused", "closed"). A reset after the response ended changes nothing.

SETTINGS from one peer bound the *other* peer's frames and header tables: HEADER_TABLE_SIZE
sets the decoder's allowed maximum for blocks coming the other way, MAX_FRAME_SIZE the frame
length limit of the other direction. As an observer, not an endpoint, we are lenient and
keep the largest value ever advertised (a lowered setting applies only once ACKed, a race
an endpoint sorts out and we need not).

Bogus input — a frame over the length limit, a broken HPACK block, CONTINUATION out of
place, a header block over `max_header_bytes`, more than `max_streams` open streams, a wrong
client preface — makes the observer give up: opaque from then on, open streams end as
failures ("protocol_error"). Nothing raises out; memory is bounded by those caps.
Not followed: h2c via HTTP/1.1 Upgrade (that connection is opaque after the 101), pushes.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Final

from agent.core.accounting import (
    CLOSED,
    PROTOCOL_ERROR,
    REFUSED,
    RESET,
    Record,
    authority_label,
    classify,
    parse_grpc_status,
)
from agent.core.hpack_blocks import HeaderBlocks, Headers
from agent.core.tap import NEVER, RequestDetail, TapSwitch, clean, split_target

if TYPE_CHECKING:
    from agent.core.counters import HttpCounters

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# An encoded header block (HEADERS + CONTINUATIONs). hpack costs ~0.9 us per byte of
# literal-heavy input (measured): 8 KiB bounds one block to ~7 ms of a single-threaded
# agent, far above real compressed blocks (hundreds of bytes; a few KiB with cookies).
# Larger blocks make the connection opaque: relayed and counted as TCP, not decoded.
MAX_HEADER_BYTES: Final = 8 * 1024
MAX_HEADER_LIST: Final = 256 * 1024  # the decoded header list of one block
MAX_TABLE_SIZE: Final = 64 * 1024  # hpack dynamic table, whatever the peers advertise
MAX_STREAMS: Final = 4096  # open streams per connection

_FRAME_HEADER: Final = struct.Struct(">BHBBI")  # length (24 bits), type, flags, stream id
_DEFAULT_MAX_FRAME: Final = 16_384
_LARGEST_MAX_FRAME: Final = (1 << 24) - 1
_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PUSH_PROMISE, _GOAWAY, _CONTINUATION = 0, 1, 3, 4, 5, 7, 9
_COLLECTED: Final = frozenset((_HEADERS, _CONTINUATION, _PUSH_PROMISE, _SETTINGS, _RST_STREAM, _GOAWAY))
_PASSED_OVER: Final = frozenset(range(256)) - _COLLECTED - {_DATA}
# Each frame type's kind, indexed by the type: 1 for the types passed over unseen. Indexing
# `bytes` is native when compiled; a frozenset membership test is a generic call (issue #16).
_SKIPPED: Final = bytes([1 if ftype in _PASSED_OVER else 0 for ftype in range(256)])
_END_STREAM, _ACK, _END_HEADERS, _PADDED, _PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
_SETTINGS_HEADER_TABLE_SIZE, _SETTINGS_MAX_FRAME_SIZE = 1, 5


class _Stream:
    __slots__ = ("detail", "grpc_status", "latency_ms", "method", "start", "status")

    def __init__(self, method: str | None, start: float, detail: RequestDetail | None = None) -> None:
        self.detail = detail
        self.method = method
        self.start = start
        self.status: int | None = None
        self.latency_ms: float | None = None
        self.grpc_status: int | None = None


class _Direction:
    """Frame reassembly for one byte stream (client->server or server->client)."""

    __slots__ = (
        "block",
        "block_flags",
        "block_push",
        "block_stream",
        "blocks",
        "frame",
        "from_client",
        "max_frame",
        "partial",
        "preface_left",
        "skip",
    )

    def __init__(self, from_client: bool) -> None:
        self.from_client = from_client
        self.preface_left = len(PREFACE) if from_client else 0
        self.blocks = HeaderBlocks(MAX_HEADER_LIST)  # this direction's HPACK state and memos
        self.max_frame = _DEFAULT_MAX_FRAME  # set by the *other* peer's SETTINGS
        self.skip = 0  # payload bytes still to pass over
        self.partial: bytearray | None = None  # a frame header or payload being collected
        self.frame: tuple[int, int, int, int] | None = None  # (type, flags, stream, length)
        self.block: bytearray | None = None  # a header block awaiting CONTINUATION
        self.block_stream = 0
        self.block_flags = 0
        self.block_push = False


class Http2Observer:
    """Accounts the requests (streams) of one HTTP/2 connection (see module docstring)."""

    __slots__ = (
        "_authority",
        "_client",
        "_counters",
        "_grpc_failures",
        "_highest_stream",
        "_max_header_bytes",
        "_max_streams",
        "_now",
        "_opaque",
        "_out",
        "_server",
        "_started",
        "_streams",
        "_tap",
    )

    def __init__(
        self,
        max_header_bytes: int = MAX_HEADER_BYTES,
        max_streams: int = MAX_STREAMS,
        grpc_failures: frozenset[int] | None = None,
        tap: TapSwitch = NEVER,
    ) -> None:
        self._tap = tap  # while on, new streams keep :path/:authority and DATA lengths
        self._max_header_bytes = max_header_bytes
        self._max_streams = max_streams
        self._grpc_failures = grpc_failures
        self._client = _Direction(from_client=True)
        self._server = _Direction(from_client=False)
        self._streams: dict[int, _Stream] = {}
        self._highest_stream = 0
        self._out: list[Record] = []
        self._now = 0.0
        self._started = 0
        self._opaque = False
        self._authority = ""  # the first request's :authority (a label value)
        # The connection's series, once handed over (`count_into`): requests counted there
        # as they start and end, not returned (issue #16).
        self._counters: HttpCounters | None = None

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

    def client_bytes(self, data: bytes, now: float) -> list[Record]:
        return self._take_out() if self._fed(self._client, data, now) else []

    def server_bytes(self, data: bytes, now: float) -> list[Record]:
        return self._take_out() if self._fed(self._server, data, now) else []

    def count_into(self, counters: HttpCounters) -> None:
        """From now on count into `counters` (the connection's series): a request that starts
        is counted there at once (`take_started` no longer sees it), one that ends without a
        tap's detail too (no Record); only tapped requests still end in Records. The proxy
        feeds `feed_client`/`feed_server` directly then (agent.core.detect.DirectFeed)."""
        self._counters = counters

    def feed_client(self, data: bytes, now: float) -> list[Record] | None:
        """`client_bytes` fed directly: None when there is nothing for the proxy to do (no
        Record, no uncounted start, not opaque), else what `client_bytes` returns."""
        return self._answer() if self._fed(self._client, data, now) else []

    def feed_server(self, data: bytes, now: float) -> list[Record] | None:
        """`server_bytes` fed directly, answered as `feed_client`."""
        return self._answer() if self._fed(self._server, data, now) else []

    def _fed(self, d: _Direction, data: bytes, now: float) -> bool:
        """`data` of one direction walked at `now`; False: opaque, nothing is looked at."""
        if self._opaque:
            return False
        self._now = now
        self._feed(d, data)
        return True

    def _answer(self) -> list[Record] | None:
        if self._out or self._started or self._opaque:
            return self._take_out()
        return None

    def closed(self, now: float, reset: bool) -> list[Record]:
        if not self._opaque:
            self._now = now
            self._give_up(RESET if reset else CLOSED)
        return self._take_out()

    def abandon(self, error: str) -> list[Record]:
        if not self._opaque:
            self._give_up(error)
        return self._take_out()

    # --- frames -----------------------------------------------------------------------

    def _feed(self, d: _Direction, data: bytes) -> None:
        pos, size = 0, len(data)
        if d.preface_left:
            pos = self._skip_preface(d, data)
        while pos < size and not self._opaque:
            if d.skip:
                taken = min(d.skip, size - pos)
                d.skip -= taken
                pos += taken
            elif d.partial is not None:
                pos = self._collect(d, data, pos)
            elif size - pos < 9:
                d.partial = bytearray(data[pos:])
                return
            else:  # the 9-byte header read by index: compiled, native ints (issue #16)
                length = data[pos] << 16 | data[pos + 1] << 8 | data[pos + 2]
                ftype = data[pos + 3]
                flags = data[pos + 4]
                stream = (data[pos + 5] & 0x7F) << 24 | data[pos + 6] << 16 | data[pos + 7] << 8 \
                    | data[pos + 8]
                pos += 9
                if _SKIPPED[ftype] and d.block is None and length <= d.max_frame:
                    need = None  # WINDOW_UPDATE, PING, PRIORITY, extensions: nothing to count
                    d.skip = length
                else:
                    need = self._begin_frame(d, ftype, flags, stream, length)
                if need is None:  # skipped by length (or given up): as much of it as is here
                    skip = d.skip
                    if skip:
                        taken = skip if skip <= size - pos else size - pos
                        d.skip = skip - taken
                        pos += taken
                elif size - pos >= need:
                    assert d.frame is not None
                    self._end_frame(d, d.frame, data[pos : pos + need])
                    pos += need
                else:
                    d.partial = bytearray(data[pos:])
                    pos = size

    def _skip_preface(self, d: _Direction, data: bytes) -> int:
        done = len(PREFACE) - d.preface_left
        taken = min(d.preface_left, len(data))
        if data[:taken] != PREFACE[done : done + taken]:
            self._give_up(PROTOCOL_ERROR)
        d.preface_left -= taken
        return taken

    def _collect(self, d: _Direction, data: bytes, pos: int) -> int:
        """Add to a partial frame header or payload; handle it once complete."""
        partial = d.partial
        assert partial is not None
        frame = d.frame
        need = 9 if frame is None else self._payload_need(frame)
        taken = min(need - len(partial), len(data) - pos)
        partial += data[pos : pos + taken]
        pos += taken
        if len(partial) < need:
            return pos
        d.partial = None
        if frame is not None:
            self._end_frame(d, frame, bytes(partial))
            return pos
        high, low, ftype, flags, stream = _FRAME_HEADER.unpack_from(partial)
        payload_need = self._begin_frame(d, ftype, flags, stream & 0x7FFF_FFFF, high << 16 | low)
        if payload_need == 0 and d.frame is not None:
            self._end_frame(d, d.frame, b"")
        elif payload_need is not None:
            d.partial = bytearray()  # collect its payload next
        return pos

    @staticmethod
    def _payload_need(frame: tuple[int, int, int, int]) -> int:
        ftype, _, _, length = frame
        return min(length, 8) if ftype == _GOAWAY else length

    def _begin_frame(self, d: _Direction, ftype: int, flags: int, stream: int, length: int) -> int | None:
        """A frame header: return the payload bytes to collect, or None (payload skipped)."""
        interrupts_block = d.block is not None and (ftype != _CONTINUATION or stream != d.block_stream)
        if length > d.max_frame or interrupts_block:
            self._give_up(PROTOCOL_ERROR)
            return None
        if ftype == _DATA:
            if self._tap.on:
                self._tap_data(d, stream, length)
            if flags & _END_STREAM and not d.from_client:
                self._response_ended(stream)
            d.skip = length
            return None
        if ftype in _COLLECTED:
            if ftype == _CONTINUATION and d.block is None:
                self._give_up(PROTOCOL_ERROR)
                return None
            if length > self._max_header_bytes:
                self._give_up(PROTOCOL_ERROR)
                return None
            d.frame = (ftype, flags, stream, length)
            return length if ftype != _GOAWAY else min(length, 8)
        d.skip = length  # PRIORITY, PING, WINDOW_UPDATE, extensions: nothing to count
        return None

    def _end_frame(self, d: _Direction, frame: tuple[int, int, int, int], payload: bytes) -> None:
        ftype, flags, stream, length = frame
        d.frame = None
        if ftype == _HEADERS and flags & (_END_HEADERS | _PADDED | _PRIORITY) == _END_HEADERS:
            self._header_block(d, stream, flags, False, payload)  # the whole block, as it is
        elif ftype in (_HEADERS, _PUSH_PROMISE):
            self._headers_frame(d, ftype, flags, stream, payload)
        elif ftype == _CONTINUATION:
            self._continuation(d, flags, payload)
        elif ftype == _SETTINGS:
            self._settings(d, flags, payload)
        elif ftype == _RST_STREAM:
            self._stream_failed(stream, RESET)
        elif ftype == _GOAWAY:
            d.skip = length - len(payload)  # the debug data
            if not d.from_client and len(payload) == 8:
                last_stream = int.from_bytes(payload[:4], "big") & 0x7FFF_FFFF
                for refused in [s for s in self._streams if s > last_stream]:
                    self._stream_failed(refused, REFUSED)

    def _headers_frame(self, d: _Direction, ftype: int, flags: int, stream: int, payload: bytes) -> None:
        start, end = 0, len(payload)
        if flags & _PADDED:
            if not payload:
                self._give_up(PROTOCOL_ERROR)
                return
            start, end = 1, end - payload[0]
        if ftype == _PUSH_PROMISE:
            start += 4  # promised stream id
        elif flags & _PRIORITY:
            start += 5  # stream dependency + weight
        if start > end:
            self._give_up(PROTOCOL_ERROR)
            return
        fragment = payload[start:end]
        push = ftype == _PUSH_PROMISE
        if flags & _END_HEADERS:
            self._header_block(d, stream, flags, push, fragment)
        else:
            d.block, d.block_stream, d.block_flags, d.block_push = bytearray(fragment), stream, flags, push

    def _continuation(self, d: _Direction, flags: int, payload: bytes) -> None:
        block = d.block
        assert block is not None
        block += payload
        if len(block) > self._max_header_bytes:
            self._give_up(PROTOCOL_ERROR)
        elif flags & _END_HEADERS:
            d.block = None
            self._header_block(d, d.block_stream, d.block_flags, d.block_push, bytes(block))

    def _settings(self, d: _Direction, flags: int, payload: bytes) -> None:
        if flags & _ACK:
            return
        if len(payload) % 6:
            self._give_up(PROTOCOL_ERROR)
            return
        other = self._server if d.from_client else self._client
        for setting, value in struct.iter_unpack(">HI", payload):
            if setting == _SETTINGS_HEADER_TABLE_SIZE:
                decoder = other.blocks.decoder
                decoder.max_allowed_table_size = max(decoder.max_allowed_table_size,
                                                     min(value, MAX_TABLE_SIZE))
            elif setting == _SETTINGS_MAX_FRAME_SIZE:
                other.max_frame = max(other.max_frame, min(value, _LARGEST_MAX_FRAME))

    # --- header blocks and streams ----------------------------------------------------

    def _header_block(self, d: _Direction, stream: int, flags: int, push: bool, block: bytes) -> None:
        headers = d.blocks.decode(block)
        if headers is None:
            self._give_up(PROTOCOL_ERROR)
            return
        if push:
            return  # server push: decoded only to keep the table in step
        if d.from_client:
            if stream > self._highest_stream and stream & 1:
                self._request_started(stream, headers)
            return  # otherwise request trailers, or a stream we no longer track
        state = self._streams.get(stream)
        if state is not None:
            self._response_headers(stream, state, flags, headers)

    def _request_started(self, stream: int, headers: Headers) -> None:
        if len(self._streams) >= self._max_streams:
            self._give_up(PROTOCOL_ERROR)
            return
        method = None
        for name, value in headers:  # pseudo-headers come first (RFC 9113 8.3)
            if name == b":method":
                method = value.decode("ascii", "replace")
            elif not name.startswith(b":"):
                break
            elif name == b":authority" and not self._authority:
                self._authority = authority_label(value)
        self._highest_stream = stream
        detail = _tap_detail(headers) if self._tap.on else None
        self._streams[stream] = _Stream(method, self._now, detail)
        counters = self._counters
        if counters is None:
            self._started += 1
        else:
            counters.start(1)

    def _tap_data(self, d: _Direction, stream: int, length: int) -> None:
        state = self._streams.get(stream)
        if state is not None and state.detail is not None:
            if d.from_client:
                state.detail.request_bytes += length
            else:
                state.detail.response_bytes += length

    def _response_headers(self, stream: int, state: _Stream, flags: int, headers: Headers) -> None:
        for name, value in headers:
            if name == b":status":
                status = _status(value)
                if state.status is None and status is not None:
                    if 100 <= status < 200 and not flags & _END_STREAM:
                        return  # informational: the final headers are still to come
                    state.status = status
                    state.latency_ms = (self._now - state.start) * 1000.0
            elif name == b"grpc-status":
                state.grpc_status = parse_grpc_status(value)
        if state.latency_ms is None:
            state.latency_ms = (self._now - state.start) * 1000.0  # headers without :status
        if flags & _END_STREAM:
            self._response_ended(stream)

    def _response_ended(self, stream: int) -> None:
        state = self._streams.pop(stream, None)
        if state is not None:
            self._finish(state, None)

    def _stream_failed(self, stream: int, error: str) -> None:
        state = self._streams.pop(stream, None)
        if state is not None:
            self._finish(state, error)

    def _finish(self, state: _Stream, error: str | None) -> None:
        classification = classify(state.status, state.grpc_status, error, self._grpc_failures)
        detail = state.detail
        counters = self._counters
        if detail is None and counters is not None:
            counters.count(classification, state.status, state.grpc_status, state.latency_ms)
            return
        if detail is not None:
            detail.end_ms = (self._now - state.start) * 1000.0
        self._out.append(
            Record(
                classification=classification,
                status_code=state.status,
                grpc_status=state.grpc_status,
                latency_ms=state.latency_ms,
                method=state.method,
                error=error,
                detail=detail,
            )
        )

    def _give_up(self, error: str) -> None:
        self._opaque = True
        streams, self._streams = self._streams, {}
        for state in streams.values():
            self._finish(state, error)

    def _take_out(self) -> list[Record]:
        out = self._out
        if not out:
            return []
        self._out = []
        return out


def _status(value: bytes) -> int | None:
    """A `:status` value: three digits, read as a number without `int()` (no parse of a new
    str: compiled, three native subtractions); None for anything else."""
    if len(value) != 3:
        return None
    hundreds, tens, units = value[0] - 48, value[1] - 48, value[2] - 48
    if 0 <= hundreds <= 9 and 0 <= tens <= 9 and 0 <= units <= 9:
        return hundreds * 100 + tens * 10 + units
    return None


def _tap_detail(headers: Headers) -> RequestDetail:
    """:authority (or Host) and :path of a request, for a tap; never other header values."""
    authority = path = b""
    for name, value in headers:
        if name == b":path":
            path = value
        elif name == b":authority" or (name == b"host" and not authority):
            authority = value
    return RequestDetail(clean(authority), split_target(clean(path))[1])
