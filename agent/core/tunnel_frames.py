"""Wire format of the Pinion mesh tunnel (frame header, codes, limits, open header), and the
events frames turn into.

The tunnel multiplexes many TCP streams over one mutually authenticated TLS connection
between two node agents. This module owns the bytes; `agent.core.tunnel` owns the state
machine. Everything below is normative: another implementation that follows it
interoperates.

Frames
------
Every frame starts with a 12-byte header, all integers big-endian (struct ">BBHII")::

    offset 0  version    u8   always 2 (not yamux's 0: the two must not mix); else rejected.
                              Version 1 had no connection-level window; the two do not mix.
    offset 1  type       u8   0 DATA, 1 WINDOW_UPDATE, 2 PING, 3 GOAWAY
    offset 2  flags      u16  0x1 SYN, 0x2 ACK, 0x4 FIN, 0x8 RST; other bits must be 0
    offset 4  stream id  u32  0 = the connection itself
    offset 8  length     u32  meaning depends on the type, see below

Only DATA frames have a payload; for the other types `length` is a value and the next
frame starts right after the header. Allowed (type, flags, stream id) combinations:

    DATA           stream != 0, flags in {0, FIN, SYN, SYN|FIN}. `length` = payload size.
                   Without SYN the payload is stream bytes: at most 65536 bytes
                   (MAX_FRAME_PAYLOAD), and counted against the stream's flow-control
                   window. With SYN the payload is the open header below (at most 4096
                   bytes, not flow-controlled). FIN half-closes the sender's direction
                   after this frame's payload.
    WINDOW_UPDATE  stream == 0, flags 0: the connection preface (the first one, see
                   below); every later one: `length` = credit added to the connection's
                   send window.
                   stream != 0, flags in {0, ACK}: `length` = credit in bytes added to the
                   stream's send window; ACK accepts a stream (server to client only).
                   stream != 0, flags RST: resets the stream; `length` = error code.
    PING           stream == 0, flags SYN (request) or ACK (reply); `length` = opaque value,
                   echoed unchanged in the reply.
    GOAWAY         stream == 0, flags 0; `length` = error code.

A DATA header whose length exceeds its limit is a connection error (FRAME_SIZE_ERROR)
as soon as the 12 header bytes are in: the payload is never buffered.

Connection preface
------------------
Each side's first frame is WINDOW_UPDATE on stream 0 with flags 0 and `length` = the
receive window (0 .. 2**31-1) it grants the peer on every stream, in place of a settings
exchange. Both sides send it at once, without waiting. Until a side has received the
peer's preface its send windows are 0: it may open streams but not send stream bytes (so
only the first stream of a new connection can wait, once, for the server's preface).

Streams
-------
Only the client (the side that made the TLS connection) opens streams. Client stream ids
are odd, start at 1 and strictly increase (a SYN that breaks this, or sent by the server,
is a PROTOCOL_ERROR); even ids are reserved. A stream opens with
DATA|SYN carrying the open header; the client may send stream bytes right after it
without waiting (they are covered by the server's preface window). The server's first
frame on a stream is WINDOW_UPDATE|ACK (accepted; `length` is extra credit, usually 0)
or WINDOW_UPDATE|RST (refused, e.g. REFUSED_STREAM when it is at its stream limit or
going away, CONNECT_ERROR when the destination port refused); any other frame before it is
a PROTOCOL_ERROR. Each direction ends with FIN; a stream whose two directions are ended,
or that was reset, is closed. Frames for a closed stream: WINDOW_UPDATE and RST are
ignored (they race legitimately), so is anything for a stream the receiver reset itself;
DATA otherwise gets RST STREAM_CLOSED. A frame for an id never opened is a PROTOCOL_ERROR.

Flow control is per stream and per connection, in each direction (as HTTP/2's): a sender
may have at most `window` bytes of DATA payload outstanding on a stream, and at most the
connection window on all streams together. The connection window starts at
INITIAL_CONNECTION_WINDOW (65536) and grows by the credit of WINDOW_UPDATE frames on
stream 0 after the preface (a receiver grants its real budget right after its preface).
The receiver returns credit with WINDOW_UPDATE as its application consumes bytes; DATA
for a stream that is closed still counts against the connection window (its receiver
returns that credit at once). A window may never exceed 2**31-1 (FLOW_CONTROL_ERROR).

Open header (payload of DATA|SYN), big-endian::

    port        u16   original destination port, 1..65535
    count       u8    number of metadata entries, 0..16
    count times:
      key_len   u8    1..64, then key_len bytes of UTF-8
      value_len u16   0..256, then value_len bytes of UTF-8

Keys are unique; no bytes may follow the last entry; the whole header is at most 4096
bytes. Usual keys: namespace, pod, workload_kind, workload_name, service_account, node.

Error codes, shared by GOAWAY and RST (unknown ones are passed on as integers): 0
NO_ERROR, 1 PROTOCOL_ERROR, 2 INTERNAL_ERROR, 3 FLOW_CONTROL_ERROR, 4 STREAM_CLOSED,
5 FRAME_SIZE_ERROR, 6 REFUSED_STREAM, 7 CANCEL, 8 CONNECT_ERROR. GOAWAY with NO_ERROR
means "no new streams; streams already open run to completion"; any other code ends the
connection and every stream on it. A receiver that finds a rule above broken sends
GOAWAY with the code and closes the connection.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Final

VERSION: Final = 2
HEADER: Final = struct.Struct(">BBHII")
HEADER_SIZE: Final = HEADER.size  # 12

MAX_FRAME_PAYLOAD: Final = 64 * 1024
MAX_OPEN_HEADER: Final = 4096
MAX_METADATA_ENTRIES: Final = 16
MAX_METADATA_KEY: Final = 64
MAX_METADATA_VALUE: Final = 256
MAX_WINDOW: Final = 2**31 - 1
MAX_STREAM_ID: Final = 2**32 - 1
DEFAULT_WINDOW: Final = 256 * 1024
INITIAL_CONNECTION_WINDOW: Final = 64 * 1024  # before the receiver's first stream-0 credit
DEFAULT_CONNECTION_WINDOW: Final = 1024 * 1024  # what an agent grants per connection


class FrameType(IntEnum):
    DATA = 0
    WINDOW_UPDATE = 1
    PING = 2
    GOAWAY = 3


class Flag(IntFlag):
    SYN = 0x1
    ACK = 0x2
    FIN = 0x4
    RST = 0x8


class ErrorCode(IntEnum):
    NO_ERROR = 0  # graceful GOAWAY
    PROTOCOL_ERROR = 1  # the peer broke a rule of this module
    INTERNAL_ERROR = 2  # the sender failed on its own
    FLOW_CONTROL_ERROR = 3  # DATA beyond the window, or a window beyond 2**31-1
    STREAM_CLOSED = 4  # DATA for a stream that is already closed
    FRAME_SIZE_ERROR = 5  # a frame longer than its type allows
    REFUSED_STREAM = 6  # stream not processed at all (limit, going away): safe to retry
    CANCEL = 7  # the application gave up on the stream
    CONNECT_ERROR = 8  # the server could not connect to the destination port


def describe_code(code: int) -> str:
    """`PROTOCOL_ERROR` for a known code, `0x2a` for one this version does not know."""
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"{code:#x}"


class ProtocolError(Exception):
    """Base class; `error_code` is what goes on the wire (GOAWAY or RST)."""

    def __init__(self, message: str, error_code: int = ErrorCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.error_code = int(error_code)


class LocalProtocolError(ProtocolError):
    """Our caller misused the API (send on a closed stream, metadata over the limits...).

    Raised before anything changed: the connection stays usable."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something this format forbids; the connection is terminated."""


# --------------------------------------------------- events (what frames become)


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """Server side: the client opened a stream to `port`; accept or reset it."""

    stream_id: int
    port: int
    metadata: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class StreamAccepted:
    """Client side: the server accepted the stream (its upstream connect succeeded)."""

    stream_id: int


class DataReceived:
    """Stream bytes; `acknowledge(stream_id, len(data))` once they are consumed.

    The one event made for every DATA frame, so not a dataclass: a frozen dataclass's
    `__init__` is the Python one `dataclasses` generates, even compiled (~3.3 k instructions,
    a third of a DATA frame's parsing). Its attributes are `Final`: read-only at run time in
    the compiled build (mypyc makes no setter), to the type checker in the Python one.
    Equality, hash and repr are a frozen dataclass's."""

    __slots__ = ("data", "stream_id")

    def __init__(self, stream_id: int, data: bytes) -> None:
        self.stream_id: Final = stream_id
        self.data: Final = data

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DataReceived):
            return NotImplemented
        return self.stream_id == other.stream_id and self.data == other.data

    def __hash__(self) -> int:
        return hash((self.stream_id, self.data))

    def __repr__(self) -> str:
        return f"DataReceived(stream_id={self.stream_id!r}, data={self.data!r})"


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer half-closed the stream: no more bytes will come from it."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The peer reset (or refused) the stream; it is closed. `error_code`: an ErrorCode."""

    stream_id: int
    error_code: int


@dataclass(frozen=True, slots=True)
class WindowOpened:
    """A stream whose `send_data` fell short may send again (`window(stream_id)` > 0)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class PingReceived:
    """The peer pinged; the reply is already queued."""

    opaque: int


@dataclass(frozen=True, slots=True)
class PongReceived:
    """Reply to one of our pings."""

    opaque: int


@dataclass(frozen=True, slots=True)
class ConnectionTerminated:
    """GOAWAY received (`by_peer`), or we found the peer at fault and sent GOAWAY.

    error_code NO_ERROR: no new streams, open streams go on. Any other code: the
    connection and all its streams are gone; close the TLS connection after writing
    `data_to_send()`."""

    error_code: int
    reason: str
    by_peer: bool


Event = (
    StreamOpened
    | StreamAccepted
    | DataReceived
    | StreamEnded
    | StreamReset
    | WindowOpened
    | PingReceived
    | PongReceived
    | ConnectionTerminated
)


# Plain ints for the per-frame hot path (IntEnum attribute lookups cost).
DATA: Final = 0
WINDOW_UPDATE: Final = 1
PING: Final = 2
GOAWAY: Final = 3
SYN: Final = 0x1
ACK: Final = 0x2
FIN: Final = 0x4
RST: Final = 0x8

_PORT_AND_COUNT = struct.Struct(">HB")
_VALUE_LEN = struct.Struct(">H")


def pack_header(frame_type: int, flags: int, stream_id: int, length: int) -> bytes:
    return HEADER.pack(VERSION, frame_type, flags, stream_id, length)


def encode_open_header(port: int, metadata: Mapping[str, str]) -> bytes:
    """The DATA|SYN payload; LocalProtocolError if the caller's values break a limit."""
    if not 1 <= port <= 65535:
        raise LocalProtocolError(f"port {port} is not in 1..65535")
    if len(metadata) > MAX_METADATA_ENTRIES:
        raise LocalProtocolError(f"{len(metadata)} metadata entries, at most {MAX_METADATA_ENTRIES}")
    parts = [_PORT_AND_COUNT.pack(port, len(metadata))]
    for key, value in metadata.items():
        try:
            raw_key, raw_value = key.encode(), value.encode()
        except UnicodeEncodeError:  # a lone surrogate
            raise LocalProtocolError(f"metadata {key!r} is not encodable as UTF-8") from None
        if not 1 <= len(raw_key) <= MAX_METADATA_KEY:
            raise LocalProtocolError(f"metadata key {key!r} must be 1..{MAX_METADATA_KEY} bytes")
        if len(raw_value) > MAX_METADATA_VALUE:
            raise LocalProtocolError(f"metadata value of {key!r} is over {MAX_METADATA_VALUE} bytes")
        parts += (bytes((len(raw_key),)), raw_key, _VALUE_LEN.pack(len(raw_value)), raw_value)
    header = b"".join(parts)
    if len(header) > MAX_OPEN_HEADER:
        raise LocalProtocolError(f"open header is {len(header)} bytes, at most {MAX_OPEN_HEADER}")
    return header


def decode_open_header(payload: bytes) -> tuple[int, dict[str, str]]:
    """(port, metadata) from a DATA|SYN payload; RemoteProtocolError if it is malformed."""
    end = len(payload)
    if end < _PORT_AND_COUNT.size:
        raise RemoteProtocolError("open header truncated")
    port, count = _PORT_AND_COUNT.unpack_from(payload, 0)
    if port == 0:
        raise RemoteProtocolError("open header names port 0")
    if count > MAX_METADATA_ENTRIES:
        raise RemoteProtocolError(f"open header has {count} entries, at most {MAX_METADATA_ENTRIES}")
    metadata: dict[str, str] = {}
    pos = _PORT_AND_COUNT.size
    for _ in range(count):
        key, pos = _read_text(payload, pos, 1, MAX_METADATA_KEY)
        value, pos = _read_text(payload, pos, 2, MAX_METADATA_VALUE)
        if key in metadata:
            raise RemoteProtocolError(f"open header repeats key {key!r}")
        metadata[key] = value
    if pos != end:
        raise RemoteProtocolError(f"{end - pos} stray bytes after the open header")
    return port, metadata


def _read_text(payload: bytes, pos: int, prefix: int, limit: int) -> tuple[str, int]:
    if pos + prefix > len(payload):
        raise RemoteProtocolError("open header truncated")
    size = payload[pos] if prefix == 1 else _VALUE_LEN.unpack_from(payload, pos)[0]
    pos += prefix
    if size > limit or (prefix == 1 and size == 0):
        raise RemoteProtocolError(f"open header field of {size} bytes (limit {limit})")
    if pos + size > len(payload):
        raise RemoteProtocolError("open header truncated")
    try:
        return payload[pos : pos + size].decode("utf-8"), pos + size
    except UnicodeDecodeError:
        raise RemoteProtocolError("open header field is not UTF-8") from None
