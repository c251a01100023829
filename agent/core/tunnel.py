"""Mesh-tunnel connection: the sans-IO state machine for one TLS connection between agents.

Bytes from the peer go in (`receive_data`) and come out as events; API calls
(`open_stream`, `send_data`, ...) queue frames for `data_to_send`. No I/O, clock or
thread here: the I/O shell owns the TLS socket, calls `data_to_send()` after every call
and writes what it returns. The wire format is specified in `agent.core.tunnel_frames`.

Choices, in brief:

- Only the client opens streams (odd ids, increasing). The server accepts each one
  explicitly (`accept_stream`, which sends ACK) once its upstream connect succeeded, or
  refuses it with `reset_stream(id, ErrorCode.CONNECT_ERROR)`. The client may send
  before the ACK; the server may not send (nor FIN) before accepting.
- Stream states idle -> open -> half-closed local/remote -> closed live in the single
  `_TRANSITIONS` table. A closed stream is forgotten at once; the last
  `RESET_MEMORY` ids we reset are remembered so the peer's frames in flight for them
  are dropped silently.
- Frames for streams that are not live: for an id that was never opened, a connection
  error (PROTOCOL_ERROR); for an id closed and already forgotten, WINDOW_UPDATE and RST
  are ignored (they race legitimately) and DATA is answered once with RST
  STREAM_CLOSED (as HTTP/2 does), never killing the connection.
- A SYN over `max_streams`, or after either side's GOAWAY, is refused with RST
  REFUSED_STREAM: the client may retry it on another connection.
- Flow control: each side grants `initial_window` per stream in its preface, and
  `connection_window` for all streams together right after it (as HTTP/2 does); the
  application reports consumed bytes with `acknowledge`, and credit goes back in one
  WINDOW_UPDATE once half a window is due (stream and connection alike). `send_data`
  takes what both windows allow and returns the count; `WindowOpened` says when to retry.
- Any peer error becomes: GOAWAY(code) queued, a `ConnectionTerminated` event, all
  streams dropped, later input ignored. `receive_data` itself never raises. A GOAWAY
  NO_ERROR from either side only stops new streams; open ones run to completion.

Memory stays bounded whatever the peer sends: unparsed input is at most one frame
(12 + 65536 bytes), live streams at most `max_streams`, all of them together receiving at
most `connection_window` unacknowledged bytes (each at most `initial_window`), and the
output produced in reply to peer input is at most one 12-byte frame per frame received (a
shell that stops reading while its writes are pending therefore bounds it too), and the
open headers remembered for reuse at most `HEADER_MEMORY` of at most `HEADER_MEMORY_BYTES`
each.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from types import MappingProxyType
from typing import Final, Literal, TypeVar

from agent.core.tunnel_frames import (
    ACK,
    DATA,
    DEFAULT_CONNECTION_WINDOW,
    DEFAULT_WINDOW,
    FIN,
    GOAWAY,
    HEADER,
    HEADER_SIZE,
    INITIAL_CONNECTION_WINDOW,
    MAX_FRAME_PAYLOAD,
    MAX_OPEN_HEADER,
    MAX_STREAM_ID,
    MAX_WINDOW,
    PING,
    RST,
    SYN,
    VERSION,
    WINDOW_UPDATE,
    ConnectionTerminated,
    DataReceived,
    ErrorCode,
    Event,
    LocalProtocolError,
    PingReceived,
    PongReceived,
    ProtocolError,
    RemoteProtocolError,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowOpened,
    decode_open_header,
    describe_code,
    encode_open_header,
    pack_header,
)

__all__ = [  # the public API; the wire format is in tunnel_frames
    "Connection", "ConnectionTerminated", "DataReceived", "ErrorCode", "Event",
    "LocalProtocolError", "PingReceived", "PongReceived", "ProtocolError", "RemoteProtocolError",
    "StreamAccepted", "StreamEnded", "StreamOpened", "StreamReset", "StreamState", "WindowOpened",
]

Role = Literal["client", "server"]
_K = TypeVar("_K")
_V = TypeVar("_V")
RESET_MEMORY: Final = 256
# Open headers seen lately, encoded and decoded: a pod sends the same metadata with every
# stream, so each is built and checked once. Bounded (entries and size), cleared when full.
HEADER_MEMORY: Final = 32
HEADER_MEMORY_BYTES: Final = 512
_U32: Final = 2**32 - 1


# ---------------------------------------------------------------------- stream states


class StreamState(Enum):
    IDLE = "idle"
    OPEN = "open"
    HALF_CLOSED_LOCAL = "half-closed (local)"
    HALF_CLOSED_REMOTE = "half-closed (remote)"
    CLOSED = "closed"

    __hash__ = object.__hash__  # members are singletons; Enum's own hash is Python code


class _Action(Enum):
    SEND_SYN = "send SYN"
    RECV_SYN = "receive SYN"
    SEND_DATA = "send DATA"
    RECV_DATA = "receive DATA"
    SEND_FIN = "send FIN"
    RECV_FIN = "receive FIN"
    SEND_RST = "send RST"
    RECV_RST = "receive RST"

    __hash__ = object.__hash__


_S, _A = StreamState, _Action
_TRANSITIONS: Final[dict[tuple[StreamState, _Action], StreamState]] = {
    (_S.IDLE, _A.SEND_SYN): _S.OPEN,
    (_S.IDLE, _A.RECV_SYN): _S.OPEN,
    (_S.OPEN, _A.SEND_DATA): _S.OPEN,
    (_S.OPEN, _A.RECV_DATA): _S.OPEN,
    (_S.OPEN, _A.SEND_FIN): _S.HALF_CLOSED_LOCAL,
    (_S.OPEN, _A.RECV_FIN): _S.HALF_CLOSED_REMOTE,
    (_S.HALF_CLOSED_LOCAL, _A.RECV_DATA): _S.HALF_CLOSED_LOCAL,
    (_S.HALF_CLOSED_LOCAL, _A.RECV_FIN): _S.CLOSED,
    (_S.HALF_CLOSED_REMOTE, _A.SEND_DATA): _S.HALF_CLOSED_REMOTE,
    (_S.HALF_CLOSED_REMOTE, _A.SEND_FIN): _S.CLOSED,
    **{
        (state, action): _S.CLOSED
        for state in (_S.OPEN, _S.HALF_CLOSED_LOCAL, _S.HALF_CLOSED_REMOTE)
        for action in (_A.SEND_RST, _A.RECV_RST)
    },
}
_PEER_MAY_SEND: Final = frozenset({_S.OPEN, _S.HALF_CLOSED_LOCAL})
_WE_MAY_SEND: Final = frozenset({_S.OPEN, _S.HALF_CLOSED_REMOTE})
# The members the per-frame path names, as module constants: `Enum.MEMBER` from compiled code
# is a getattr through EnumType.__getattr__ (Python 3.11), ~0.9 k instructions each; a Final
# name is a C static (issue #16: six per request).
_CLOSED: Final = StreamState.CLOSED
_SEND_DATA: Final = _Action.SEND_DATA
_RECV_DATA: Final = _Action.RECV_DATA
_PACK_HEADER: Final = HEADER.pack  # bound once: a method call looks `pack` up each time


class _Stream:
    __slots__ = ("accepted", "blocked", "credit_due", "receive_window", "send_window", "state",
                 "unacknowledged")

    def __init__(self, send_window: int, receive_window: int, accepted: bool) -> None:
        self.state = StreamState.IDLE
        self.send_window = send_window  # bytes we may still send
        self.receive_window = receive_window  # bytes the peer may still send
        self.unacknowledged = 0  # delivered to the application, not yet acknowledged
        self.credit_due = 0  # acknowledged, not yet returned in a WINDOW_UPDATE
        self.accepted = accepted
        self.blocked = False  # a send fell short: report WindowOpened


# -------------------------------------------------------------------------- connection


class Connection:
    """One end of a tunnel connection. See the module docstring for the rules."""

    def __init__(self, role: Role, initial_window: int = DEFAULT_WINDOW, max_streams: int = 256,
                 connection_window: int = DEFAULT_CONNECTION_WINDOW) -> None:
        if role not in ("client", "server"):
            raise ValueError(f"role must be 'client' or 'server', not {role!r}")
        if not 1 <= initial_window <= MAX_WINDOW:
            raise ValueError(f"initial_window must be in 1..{MAX_WINDOW}")
        if not INITIAL_CONNECTION_WINDOW <= connection_window <= MAX_WINDOW:
            raise ValueError(f"connection_window must be in {INITIAL_CONNECTION_WINDOW}..{MAX_WINDOW}")
        if max_streams < 1:
            raise ValueError("max_streams must be at least 1")
        self.role: Final = role
        self.initial_window: Final = initial_window
        self.max_streams: Final = max_streams
        self.connection_window: Final = connection_window
        self.error: RemoteProtocolError | None = None  # why we terminated, if we did
        self._client = role == "client"
        self._streams: dict[int, _Stream] = {}
        self._recently_reset: dict[int, None] = {}  # insertion-ordered set
        self._next_stream_id = 1
        self._last_peer_stream_id = 0
        self._peer_window: int | None = None  # the peer's preface, once received
        self._update_threshold = max(1, initial_window // 2)
        # the connection's windows: what the peer may still send us on all streams together,
        # what we may still send it, and consumed bytes not yet credited back
        self._connection_receive = connection_window
        self._connection_send = INITIAL_CONNECTION_WINDOW
        self._connection_credit_due = 0
        self._connection_threshold = connection_window // 2
        self._inbound = bytearray()
        self._outbound: list[bytes] = [pack_header(WINDOW_UPDATE, 0, 0, initial_window)]
        self._queued_data = 0  # stream bytes in _outbound
        self._granted = 0  # send credit handed out by `grant` and not returned
        if connection_window > INITIAL_CONNECTION_WINDOW:  # our real budget, at once
            self._outbound.append(pack_header(WINDOW_UPDATE, 0, 0,
                                              connection_window - INITIAL_CONNECTION_WINDOW))
        self._sent_goaway = False
        self._peer_goaway = False
        self._terminated = False
        self._next_ping = 0
        self._encoded_headers: dict[tuple[int, tuple[tuple[str, str], ...]], bytes] = {}
        self._decoded_headers: dict[bytes, tuple[int, Mapping[str, str]]] = {}

    # ------------------------------------------------------------------ inspection

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    @property
    def going_away(self) -> bool:
        """Either side sent GOAWAY: no new streams."""
        return self._sent_goaway or self._peer_goaway

    @property
    def terminated(self) -> bool:
        return self._terminated

    @property
    def finished(self) -> bool:
        """Nothing left to do: terminated, or going away with no stream left."""
        return self._terminated or (self.going_away and not self._streams)

    @property
    def buffered_input(self) -> int:
        """Bytes received but not yet parsed: always less than one frame."""
        return len(self._inbound)

    def stream_state(self, stream_id: int) -> StreamState:
        stream = self._streams.get(stream_id)
        if stream is not None:
            return stream.state
        return StreamState.CLOSED if self._was_opened(stream_id) else StreamState.IDLE

    def window(self, stream_id: int) -> int:
        """How many bytes `send_data` would take now (0 for a stream that is not live)."""
        stream = self._streams.get(stream_id)
        return 0 if stream is None else min(stream.send_window, self._connection_send)

    @property
    def connection_send_window(self) -> int:
        """Bytes we may still send on all streams together."""
        return self._connection_send

    @property
    def connection_receive_window(self) -> int:
        """Bytes the peer may still send us on all streams together."""
        return self._connection_receive

    # ----------------------------------------------------------------------- output

    @property
    def queued_data(self) -> int:
        """Stream bytes queued for the peer and not yet taken by `data_to_send`."""
        return self._queued_data

    @property
    def has_output(self) -> bool:
        """Some frame is queued for the peer (`data_to_send` would return bytes)."""
        return bool(self._outbound)

    def data_to_send(self) -> bytes:
        """Everything queued for the peer since the last call."""
        outbound = self._outbound
        if not outbound:
            return b""
        self._queued_data = 0
        data = outbound[0] if len(outbound) == 1 else b"".join(outbound)
        outbound.clear()
        return data

    # ------------------------------------------------------------------ application

    def open_stream(self, port: int, metadata: Mapping[str, str]) -> int:
        """Client: open a stream to the original destination `port`; returns its id."""
        self._check_alive()
        if not self._client:
            raise LocalProtocolError("only the client opens streams")
        if self.going_away:
            raise LocalProtocolError("the connection is going away: open a new one")
        if len(self._streams) >= self.max_streams:
            raise LocalProtocolError(f"already {len(self._streams)} streams (max_streams)")
        stream_id = self._next_stream_id
        if stream_id > MAX_STREAM_ID:
            raise LocalProtocolError("stream ids exhausted: open a new connection")
        key = (port, tuple(metadata.items()))
        open_header = self._encoded_headers.get(key)
        if open_header is None:
            open_header = encode_open_header(port, metadata)
            _remember(self._encoded_headers, key, open_header)
        stream = _Stream(self._peer_window or 0, self.initial_window, accepted=False)
        self._transition(stream_id, stream, _A.SEND_SYN)
        self._streams[stream_id] = stream
        self._next_stream_id += 2
        self._outbound += (pack_header(DATA, SYN, stream_id, len(open_header)), open_header)
        return stream_id

    def accept_stream(self, stream_id: int) -> None:
        """Server: accept a stream from `StreamOpened` (sends ACK with any credit due)."""
        stream = self._live_stream(stream_id)
        if self._client or stream.accepted:
            raise LocalProtocolError(f"stream {stream_id} is not waiting to be accepted")
        stream.accepted = True
        credit, stream.credit_due = stream.credit_due, 0
        stream.receive_window += credit
        self._outbound.append(pack_header(WINDOW_UPDATE, ACK, stream_id, credit))

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview) -> int:
        """Queue as much of `data` as the peer's window takes; returns that count.

        When it returns less than len(data), retry the rest after `WindowOpened`."""
        stream = self._sending_stream(stream_id, _SEND_DATA)
        size = len(data)
        allowed = min(stream.send_window, self._connection_send)
        if size > allowed:
            stream.blocked = True
            size = allowed
        if size == 0:
            return 0
        stream.send_window -= size
        self._connection_send -= size
        self._queued_data += size
        # Keep no reference to a caller's mutable buffer; a whole `bytes` is not copied.
        payload = data[:size] if type(data) is bytes else bytes(memoryview(data)[:size])
        outbound = self._outbound
        if size <= MAX_FRAME_PAYLOAD:
            outbound += (_PACK_HEADER(VERSION, DATA, 0, stream_id, size), payload)
            return size
        for start in range(0, size, MAX_FRAME_PAYLOAD):
            chunk = payload[start : start + MAX_FRAME_PAYLOAD]
            outbound += (_PACK_HEADER(VERSION, DATA, 0, stream_id, len(chunk)), chunk)
        return size

    def grant(self, stream_id: int, most: int) -> int:
        """Hand the I/O shell up to `most` bytes of the stream's and the connection's send
        windows, to frame DATA itself: counted as sent from now on (`give_back` says what it
        did not send). At most a quarter of the connection's window left goes to one grant,
        and none to a stream that may not send: 0."""
        stream = self._streams.get(stream_id)
        if (self._terminated or stream is None or stream.state not in _WE_MAY_SEND
                or (not stream.accepted and not self._client)):
            return 0
        credit = min(most, stream.send_window, self._connection_send // 4)
        if credit <= 0:
            return 0
        stream.send_window -= credit
        self._connection_send -= credit
        self._granted += credit
        return credit

    def give_back(self, stream_id: int, unused: int, sent: int) -> None:
        """The I/O shell is done with its grants on the stream: it sent `sent` bytes of them,
        the windows have the `unused` rest again."""
        if unused < 0 or sent < 0 or unused + sent > self._granted:
            raise LocalProtocolError(f"giving back {unused} and {sent} sent bytes, "
                                     f"{self._granted} are granted")
        self._granted -= unused + sent
        self._connection_send += unused
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream.send_window += unused

    @property
    def granted(self) -> int:
        """Send credit handed out by `grant` and not accounted for by `give_back`."""
        return self._granted

    def end_stream(self, stream_id: int) -> None:
        """Half-close: we send no more bytes on this stream (FIN)."""
        self._sending_stream(stream_id, _A.SEND_FIN)
        self._transition(stream_id, self._streams[stream_id], _A.SEND_FIN)
        self._outbound.append(pack_header(DATA, FIN, stream_id, 0))

    def reset_stream(self, stream_id: int, error_code: int = ErrorCode.CANCEL) -> None:
        """Abort a stream (RST). A no-op for a stream that is already closed."""
        self._check_alive()
        if not 0 <= error_code <= _U32:
            raise LocalProtocolError(f"error code {error_code} does not fit 32 bits")
        stream = self._streams.get(stream_id)
        if stream is None:
            if self._was_opened(stream_id):
                return
            raise LocalProtocolError(f"stream {stream_id} was never opened")
        self._transition(stream_id, stream, _A.SEND_RST)
        self._send_reset(stream_id, error_code)

    def acknowledge(self, stream_id: int, nbytes: int) -> None:
        """The application consumed `nbytes` received on the stream: return credit."""
        self._check_alive()
        stream = self._streams.get(stream_id)
        if stream is None:
            if self._was_opened(stream_id):
                return  # closed meanwhile: nobody needs the credit
            raise LocalProtocolError(f"stream {stream_id} was never opened")
        if not 0 <= nbytes <= stream.unacknowledged:
            raise LocalProtocolError(
                f"acknowledging {nbytes} bytes, {stream.unacknowledged} are unacknowledged")
        stream.unacknowledged -= nbytes
        self._credit_connection(nbytes)
        if stream.state not in _PEER_MAY_SEND:
            return
        stream.credit_due += nbytes
        if stream.credit_due >= self._update_threshold and stream.accepted:
            credit, stream.credit_due = stream.credit_due, 0
            stream.receive_window += credit
            self._outbound.append(pack_header(WINDOW_UPDATE, 0, stream_id, credit))

    def lane_received(self, stream_id: int, nbytes: int, consumed: int) -> bool:
        """`nbytes` of DATA (frames without flags) on the stream, delivered by the I/O shell
        itself since the last call, `consumed` of them already passed on: counted against the
        windows as `receive_data` counts them, and acknowledged (`acknowledge(consumed)`).
        False: the peer broke a window — the connection failed as `receive_data` would fail
        it (GOAWAY FLOW_CONTROL_ERROR queued, `error`)."""
        if self._terminated:
            return False
        try:
            self._take_connection_window(nbytes)
            stream = self._streams.get(stream_id)
            if stream is None:  # closed meanwhile: nobody will consume them
                self._credit_connection(nbytes)
                return True
            self._take_stream_window(stream_id, stream, nbytes)
        except RemoteProtocolError as error:
            self._fail(error, [])
            return False
        if consumed:
            self.acknowledge(stream_id, consumed)
        return True

    def ping(self, opaque: int | None = None) -> int:
        """Queue a PING; the peer's reply arrives as `PongReceived(opaque)`."""
        self._check_alive()
        if opaque is None:
            opaque = self._next_ping
            self._next_ping = (self._next_ping + 1) & _U32
        elif not 0 <= opaque <= _U32:
            raise LocalProtocolError(f"ping value {opaque} does not fit 32 bits")
        self._outbound.append(pack_header(PING, SYN, 0, opaque))
        return opaque

    def goaway(self, error_code: int = ErrorCode.NO_ERROR) -> None:
        """NO_ERROR: no new streams, let open ones finish. Other codes: end everything."""
        self._check_alive()
        if not 0 <= error_code <= _U32:
            raise LocalProtocolError(f"error code {error_code} does not fit 32 bits")
        if error_code == ErrorCode.NO_ERROR and self._sent_goaway:
            return
        self._sent_goaway = True
        self._outbound.append(pack_header(GOAWAY, 0, 0, error_code))
        if error_code != ErrorCode.NO_ERROR:
            self._terminate()

    # ------------------------------------------------------------------------ input

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes from the peer, split anywhere; returns the events they complete."""
        events: list[Event] = []
        if self._terminated or not data:
            return events
        inbound = self._inbound
        source: bytes
        if inbound:
            inbound += data
            if self._waits_for_payload(inbound):
                return events  # copied below only once the frame is whole
            source = bytes(inbound)
        else:
            source = data if type(data) is bytes else bytes(data)
        failure: RemoteProtocolError | None = None
        try:
            consumed = self._parse(source, events)
        except RemoteProtocolError as error:
            failure, consumed = error, 0
        if failure is not None:
            self._fail(failure, events)
        elif inbound and not self._terminated:
            del inbound[:consumed]
        elif consumed < len(source) and not self._terminated:
            inbound += source[consumed:]  # the start of a frame: less than one frame
        return events

    def _waits_for_payload(self, inbound: bytearray) -> bool:
        """`inbound` is the start of a well-formed DATA frame whose payload is not all here
        (what `_parse` would wait for too, without an error to raise first)."""
        if len(inbound) < HEADER_SIZE or inbound[0] != VERSION or inbound[1] != DATA \
                or self._peer_window is None:
            return False
        length = inbound[8] << 24 | inbound[9] << 16 | inbound[10] << 8 | inbound[11]
        limit = MAX_OPEN_HEADER if inbound[3] & SYN else MAX_FRAME_PAYLOAD
        return length <= limit and len(inbound) < HEADER_SIZE + length

    def _parse(self, data: bytes, events: list[Event]) -> int:
        """Handle every complete frame in `data`; returns how many bytes were used. The
        header (`HEADER`: >BBHII) is read byte by byte: compiled, each index and shift is
        native, where `struct` builds a tuple of objects per frame (issue #16)."""
        pos, end = 0, len(data)
        while end - pos >= HEADER_SIZE and not self._terminated:
            version = data[pos]
            frame_type = data[pos + 1]
            flags = data[pos + 2] << 8 | data[pos + 3]
            stream_id = (data[pos + 4] << 24 | data[pos + 5] << 16 | data[pos + 6] << 8
                         | data[pos + 7])
            length = (data[pos + 8] << 24 | data[pos + 9] << 16 | data[pos + 10] << 8
                      | data[pos + 11])
            if version != VERSION:
                raise RemoteProtocolError(f"unsupported tunnel version {version}")
            if self._peer_window is None and (frame_type != WINDOW_UPDATE or stream_id != 0):
                raise RemoteProtocolError("expected the connection preface (WINDOW_UPDATE on stream 0)")
            if frame_type != DATA:
                pos += HEADER_SIZE
                self._on_control(frame_type, flags, stream_id, length, events)
                continue
            limit = MAX_OPEN_HEADER if flags & SYN else MAX_FRAME_PAYLOAD
            if length > limit:
                raise RemoteProtocolError(f"DATA frame of {length} bytes, at most {limit}",
                                          ErrorCode.FRAME_SIZE_ERROR)
            stop = pos + HEADER_SIZE + length
            if stop > end:
                break
            payload = data[pos + HEADER_SIZE : stop] if length else b""
            pos = stop
            self._on_data(flags, stream_id, payload, events)
        return pos

    def _on_data(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if flags & ~(SYN | FIN) or stream_id == 0:
            raise RemoteProtocolError(f"DATA with flags {flags:#x} on stream {stream_id}")
        if flags & SYN:
            self._on_open(stream_id, payload, events)
        else:
            if payload:  # every stream's DATA counts against the connection window
                self._take_connection_window(len(payload))
            stream = self._streams.get(stream_id)
            if stream is None:
                self._credit_connection(len(payload))  # nobody will consume it
                if stream_id in self._recently_reset:
                    return
                if not self._was_opened(stream_id):
                    raise RemoteProtocolError(f"DATA on stream {stream_id}, which was never opened")
                self._send_reset(stream_id, ErrorCode.STREAM_CLOSED)  # closed and forgotten
                return
            if self._client and not stream.accepted:
                raise RemoteProtocolError(f"DATA on stream {stream_id} before ACK")
            self._transition(stream_id, stream, _RECV_DATA)
            if payload:
                self._take_stream_window(stream_id, stream, len(payload))
                events.append(DataReceived(stream_id, payload))
        if flags & FIN and stream_id in self._streams:
            self._transition(stream_id, self._streams[stream_id], _A.RECV_FIN)
            events.append(StreamEnded(stream_id))

    def _on_open(self, stream_id: int, open_header: bytes, events: list[Event]) -> None:
        if self._client:
            raise RemoteProtocolError("the server opened a stream; only the client may")
        if stream_id % 2 == 0:
            raise RemoteProtocolError(f"SYN on even stream id {stream_id}; client ids are odd")
        if stream_id in self._streams:
            raise RemoteProtocolError(f"SYN reuses live stream id {stream_id}")
        if stream_id <= self._last_peer_stream_id:
            raise RemoteProtocolError(f"SYN on stream {stream_id}, ids must increase")
        self._last_peer_stream_id = stream_id
        decoded = self._decoded_headers.get(open_header)
        if decoded is None:
            port, metadata = decode_open_header(open_header)
            decoded = port, MappingProxyType(metadata)  # shared by the streams that repeat it
            if len(open_header) <= HEADER_MEMORY_BYTES:
                _remember(self._decoded_headers, open_header, decoded)
        port, shared_metadata = decoded
        if self.going_away or len(self._streams) >= self.max_streams:
            self._send_reset(stream_id, ErrorCode.REFUSED_STREAM)
            return
        stream = _Stream(self._peer_window or 0, self.initial_window, accepted=False)
        self._transition(stream_id, stream, _A.RECV_SYN)
        self._streams[stream_id] = stream
        events.append(StreamOpened(stream_id, port, shared_metadata))

    def _on_control(self, frame_type: int, flags: int, stream_id: int, value: int,
                    events: list[Event]) -> None:
        if frame_type == WINDOW_UPDATE:
            if stream_id == 0:
                self._on_preface(flags, value, events)
            elif flags == RST:
                self._on_reset(stream_id, value, events)
            elif flags & ~ACK:
                raise RemoteProtocolError(f"WINDOW_UPDATE with flags {flags:#x}")
            else:
                self._on_window_update(stream_id, flags, value, events)
        elif frame_type == PING:
            if stream_id != 0 or flags not in (SYN, ACK):
                raise RemoteProtocolError(f"PING with flags {flags:#x} on stream {stream_id}")
            if flags == SYN:
                self._outbound.append(pack_header(PING, ACK, 0, value))
                events.append(PingReceived(value))
            else:
                events.append(PongReceived(value))
        elif frame_type == GOAWAY:
            if stream_id != 0 or flags:
                raise RemoteProtocolError(f"GOAWAY with flags {flags:#x} on stream {stream_id}")
            self._on_goaway(value, events)
        else:
            raise RemoteProtocolError(f"unknown frame type {frame_type}")

    def _on_preface(self, flags: int, window: int, events: list[Event]) -> None:
        if flags:
            raise RemoteProtocolError(f"WINDOW_UPDATE with flags {flags:#x} on stream 0")
        if self._peer_window is not None:
            self._on_connection_credit(window, events)
            return
        if window > MAX_WINDOW:
            raise RemoteProtocolError(f"initial window {window} is over 2**31-1",
                                      ErrorCode.FLOW_CONTROL_ERROR)
        self._peer_window = window
        for stream_id, stream in self._streams.items():  # opened before the preface came
            stream.send_window += window
            if stream.blocked and window:
                stream.blocked = False
                events.append(WindowOpened(stream_id))

    def _on_connection_credit(self, credit: int, events: list[Event]) -> None:
        if self._connection_send + credit > MAX_WINDOW:
            raise RemoteProtocolError("connection window over 2**31-1", ErrorCode.FLOW_CONTROL_ERROR)
        self._connection_send += credit
        if not credit:
            return
        for stream_id, stream in self._streams.items():  # streams the connection held back
            if stream.blocked and stream.send_window:
                stream.blocked = False
                events.append(WindowOpened(stream_id))

    def _on_window_update(self, stream_id: int, flags: int, credit: int, events: list[Event]) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            if stream_id in self._recently_reset or self._was_opened(stream_id):
                return  # credit for a stream closed meanwhile
            raise RemoteProtocolError(f"WINDOW_UPDATE on stream {stream_id}, which was never opened")
        if flags & ACK:
            if not self._client or stream.accepted:
                raise RemoteProtocolError(f"unexpected ACK on stream {stream_id}")
            stream.accepted = True
            events.append(StreamAccepted(stream_id))
        elif self._client and not stream.accepted:
            raise RemoteProtocolError(f"WINDOW_UPDATE on stream {stream_id} before ACK")
        if credit:
            if stream.send_window + credit > MAX_WINDOW:
                raise RemoteProtocolError(f"window of stream {stream_id} over 2**31-1",
                                          ErrorCode.FLOW_CONTROL_ERROR)
            stream.send_window += credit
            if stream.blocked and self._connection_send:
                stream.blocked = False
                events.append(WindowOpened(stream_id))

    def _on_reset(self, stream_id: int, error_code: int, events: list[Event]) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            if stream_id in self._recently_reset or self._was_opened(stream_id):
                return  # both sides reset at once, or a late refusal
            raise RemoteProtocolError(f"RST on stream {stream_id}, which was never opened")
        self._transition(stream_id, stream, _A.RECV_RST)
        events.append(StreamReset(stream_id, error_code))

    def _on_goaway(self, error_code: int, events: list[Event]) -> None:
        if error_code == ErrorCode.NO_ERROR:
            if not self._peer_goaway:
                self._peer_goaway = True
                events.append(ConnectionTerminated(error_code, "peer is going away", by_peer=True))
            return
        self._peer_goaway = True
        self._terminate()
        events.append(ConnectionTerminated(error_code, f"peer sent GOAWAY {describe_code(error_code)}",
                                           by_peer=True))

    # -------------------------------------------------------------------- internals

    def _transition(self, stream_id: int, stream: _Stream, action: _Action) -> None:
        new_state = _TRANSITIONS.get((stream.state, action))
        if new_state is None:
            error = LocalProtocolError if action.name.startswith("SEND") else RemoteProtocolError
            raise error(f"cannot {action.value} on stream {stream_id} in state {stream.state.value}")
        stream.state = new_state
        if new_state is _CLOSED:
            del self._streams[stream_id]
            if stream.unacknowledged:  # never to be consumed: the connection gets it back
                self._credit_connection(stream.unacknowledged)
                stream.unacknowledged = 0

    def _take_connection_window(self, nbytes: int) -> None:
        """`nbytes` of DATA came: out of what the peer may still send on the connection."""
        if nbytes > self._connection_receive:
            raise RemoteProtocolError(f"{nbytes} bytes on the connection, window "
                                      f"{self._connection_receive}", ErrorCode.FLOW_CONTROL_ERROR)
        self._connection_receive -= nbytes

    def _take_stream_window(self, stream_id: int, stream: _Stream, nbytes: int) -> None:
        """`nbytes` of DATA came on the stream: out of its window, delivered unacknowledged."""
        if nbytes > stream.receive_window:
            raise RemoteProtocolError(f"{nbytes} bytes on stream {stream_id}, window "
                                      f"{stream.receive_window}", ErrorCode.FLOW_CONTROL_ERROR)
        stream.receive_window -= nbytes
        stream.unacknowledged += nbytes

    def _credit_connection(self, nbytes: int) -> None:
        """Consumed (or dropped) bytes: credit the peer in one WINDOW_UPDATE once half the
        connection window is due."""
        due = self._connection_credit_due + nbytes
        if due >= self._connection_threshold and not self._terminated:
            self._connection_receive += due
            self._outbound.append(pack_header(WINDOW_UPDATE, 0, 0, due))
            due = 0
        self._connection_credit_due = due

    def _sending_stream(self, stream_id: int, action: _Action) -> _Stream:
        """The live stream, checked for `action` without changing its state."""
        stream = self._live_stream(stream_id)
        if not stream.accepted and not self._client:
            raise LocalProtocolError(f"accept stream {stream_id} before sending on it")
        if (stream.state, action) not in _TRANSITIONS:
            raise LocalProtocolError(f"cannot {action.value} on stream {stream_id} in state "
                                     f"{stream.state.value}")
        return stream

    def _live_stream(self, stream_id: int) -> _Stream:
        self._check_alive()
        stream = self._streams.get(stream_id)
        if stream is None:
            status = "closed" if self._was_opened(stream_id) else "never opened"
            raise LocalProtocolError(f"stream {stream_id} is {status}")
        return stream

    def _was_opened(self, stream_id: int) -> bool:
        if stream_id <= 0 or stream_id % 2 == 0:
            return False
        if self._client:
            return stream_id < self._next_stream_id
        return stream_id <= self._last_peer_stream_id

    def _send_reset(self, stream_id: int, error_code: int) -> None:
        """RST the stream and drop what the peer still has in flight for it."""
        self._outbound.append(pack_header(WINDOW_UPDATE, RST, stream_id, error_code))
        recently_reset = self._recently_reset
        recently_reset[stream_id] = None
        if len(recently_reset) > RESET_MEMORY:
            del recently_reset[next(iter(recently_reset))]

    def _check_alive(self) -> None:
        if self._terminated:
            raise LocalProtocolError("the connection is terminated")

    def _terminate(self) -> None:
        self._terminated = True
        self._streams.clear()
        self._recently_reset.clear()
        self._inbound = bytearray()

    def _fail(self, error: RemoteProtocolError, events: list[Event]) -> None:
        self.error = error
        self._outbound.append(pack_header(GOAWAY, 0, 0, error.error_code))
        self._terminate()
        events.append(ConnectionTerminated(error.error_code, str(error), by_peer=False))


def _remember(memory: dict[_K, _V], key: _K, value: _V) -> None:
    if len(memory) >= HEADER_MEMORY:
        memory.clear()
    memory[key] = value
