"""HTTP/1.1 framing for the Kubernetes client: request bytes, response heads, bodies, event lines.

Only what an API server sends is handled: a status line and headers, then a body framed by
Content-Length, chunked transfer coding, or the end of the connection. Every size is bounded;
framing errors raise ProtocolError, a ConnectionError, so callers treat them as transport failures.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

__all__ = [
    "BodyReader",
    "LineSplitter",
    "LineTooLong",
    "ProtocolError",
    "ResponseHead",
    "StaleConnection",
    "encode_request",
    "read_response_head",
]

MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100


class ProtocolError(ConnectionError):
    """The server's bytes are not HTTP/1.1 as this client reads it."""


class StaleConnection(ConnectionError):
    """The connection ended before a single byte of the response: safe to retry on a new one."""


class LineTooLong(Exception):
    """A line (one watch event) exceeds the bound; nothing past the bound was kept."""


@dataclass(frozen=True)
class ResponseHead:
    status: int
    reason: str
    version: str
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "

    @property
    def keep_alive(self) -> bool:
        connection = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in connection
        return "close" not in connection


def encode_request(method: str, target: str, headers: dict[str, str], body: bytes | None) -> bytes:
    lines = [f"{method} {target} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if body is not None or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body or b'')}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def parse_head(raw: bytes) -> ResponseHead:
    """The status line and headers of `raw` (everything up to and including the blank line)."""
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    fields = [line for line in lines[1:] if line]
    if len(fields) > MAX_HEADERS:
        raise ProtocolError(f"more than {MAX_HEADERS} response headers")
    for line in fields:
        name, colon, value = line.partition(":")
        if not colon:
            raise ProtocolError(f"malformed header line {line[:80]!r}")
        key = name.strip().lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    return ResponseHead(int(parts[1]), parts[2] if len(parts) > 2 else "", parts[0], headers)


async def read_response_head(reader: asyncio.StreamReader) -> ResponseHead:
    """Read one response head, skipping 1xx interim responses."""
    while True:
        try:
            raw = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as error:
            if not error.partial:
                raise StaleConnection("the connection closed before a response") from error
            raise ProtocolError("the connection closed inside a response head") from error
        except asyncio.LimitOverrunError as error:
            raise ProtocolError("response head too long") from error
        if len(raw) > MAX_HEAD_BYTES:
            raise ProtocolError("response head too long")
        head = parse_head(raw)
        if not 100 <= head.status < 200:
            return head


class BodyReader:
    """Pieces of one response body, whatever its framing; next_piece() returns b"" at its end.

    A body that ends early (the peer closed or reset the connection) raises ProtocolError: a
    truncated watch stream is a transport failure, not a server's orderly end.
    """

    def __init__(self, reader: asyncio.StreamReader, head: ResponseHead, *, max_piece: int,
                 method: str = "GET") -> None:
        self._reader = reader
        self._max_piece = max_piece
        self._chunked = "chunked" in head.headers.get("transfer-encoding", "").lower()
        self._remaining: int | None = None  # Content-Length left; None = chunked or until close
        self._done = False
        if method == "HEAD" or head.status in (204, 304):
            self._done = True
        elif not self._chunked and "content-length" in head.headers:
            try:
                self._remaining = int(head.headers["content-length"])
            except ValueError as error:
                raise ProtocolError("malformed Content-Length") from error
        self.until_close = not self._done and not self._chunked and self._remaining is None

    async def next_piece(self) -> bytes:
        if self._done:
            return b""
        try:
            if self._chunked:
                return await self._next_chunk()
            if self._remaining is not None:
                return await self._next_counted()
            return await self._next_until_close()
        except asyncio.IncompleteReadError as error:
            raise ProtocolError("the connection closed inside a response body") from error
        except asyncio.LimitOverrunError as error:
            raise ProtocolError("chunk header too long") from error

    async def read_all(self, limit: int) -> bytes:
        pieces: list[bytes] = []
        size = 0
        while piece := await self.next_piece():
            size += len(piece)
            if size > limit:
                raise ProtocolError(f"response body larger than {limit} bytes")
            pieces.append(piece)
        return b"".join(pieces)

    async def _next_chunk(self) -> bytes:
        line = await self._reader.readuntil(b"\r\n")
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError as error:
            raise ProtocolError(f"malformed chunk size {line[:40]!r}") from error
        if size == 0:
            while await self._reader.readuntil(b"\r\n") != b"\r\n":
                pass  # trailer fields: none that matter here
            self._done = True
            return b""
        if size > self._max_piece:
            raise ProtocolError(f"chunk of {size} bytes is over the {self._max_piece}-byte bound")
        data = await self._reader.readexactly(size)
        if await self._reader.readexactly(2) != b"\r\n":
            raise ProtocolError("chunk not followed by CRLF")
        return data

    async def _next_counted(self) -> bytes:
        assert self._remaining is not None
        if self._remaining == 0:
            self._done = True
            return b""
        data = await self._reader.read(min(self._remaining, 1 << 16))
        if not data:
            raise ProtocolError("the connection closed inside a response body")
        self._remaining -= len(data)
        return data

    async def _next_until_close(self) -> bytes:
        data = await self._reader.read(1 << 16)
        if not data:
            self._done = True
        return data


class LineSplitter:
    """Splits a byte stream into newline-terminated lines, never holding more than `max_line` bytes."""

    def __init__(self, max_line: int) -> None:
        self._max_line = max_line
        self._partial: list[bytes] = []
        self._partial_size = 0

    def feed(self, data: bytes) -> list[bytes]:
        lines: list[bytes] = []
        start = 0
        while (end := data.find(b"\n", start)) != -1:
            self._check(end - start)
            lines.append(b"".join([*self._partial, data[start:end]]))
            self._partial.clear()
            self._partial_size = 0
            start = end + 1
        if start < len(data):
            self._check(len(data) - start)
            self._partial.append(data[start:])
            self._partial_size += len(data) - start
        return lines

    def finish(self) -> bytes:
        """What is left after the last newline (a final line without one)."""
        rest = b"".join(self._partial)
        self._partial.clear()
        self._partial_size = 0
        return rest

    def _check(self, more: int) -> None:
        if self._partial_size + more > self._max_line:
            self._partial.clear()
            self._partial_size = 0
            raise LineTooLong(f"a line longer than {self._max_line} bytes")
