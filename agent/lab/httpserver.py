"""A tiny HTTP/1.1 keep-alive server for lab pods, standard library only.

Routes: `/status/<code>` answers with that status, `/bytes/<n>` with n bytes of body,
`/whoami` with the client's source IP as this server sees it, anything else 200 "ok".
Run: `python -m agent.lab.httpserver --port 8080 [--host 0.0.0.0]`; prints "listening".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from dataclasses import dataclass
from http import HTTPStatus

MAX_HEAD_BYTES = 64 * 1024
MAX_GENERATED_BYTES = 1 << 30
IDLE_TIMEOUT_SECONDS = 60.0
_CHUNK = b"x" * 65536


class BadRequest(Exception):
    """The peer sent something that is not an HTTP/1.x request this server accepts."""


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    version: str
    headers: dict[str, str]


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """Read one request (its body is read and discarded); None at a clean end of stream."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as error:
        if error.partial.strip():
            raise BadRequest("truncated request head") from error
        return None
    except asyncio.LimitOverrunError as error:
        raise BadRequest("request head too large") from error
    request = parse_head(head[:-4].decode("latin-1"))
    if "transfer-encoding" in request.headers:
        raise BadRequest("only Content-Length request bodies are supported")
    remaining = _number(request.headers.get("content-length", "0"))
    if remaining is None:
        raise BadRequest("bad Content-Length")
    while remaining > 0:
        chunk = await reader.read(min(remaining, 65536))
        if not chunk:
            raise BadRequest("truncated body")
        remaining -= len(chunk)
    return request


def parse_head(text: str) -> Request:
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[1].startswith("/") or parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
        raise BadRequest("bad request line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise BadRequest("bad header line")
        headers[name.lower()] = value.strip()
    return Request(parts[0], parts[1].split("?", 1)[0], parts[2], headers)


def _number(text: str) -> int | None:
    """A non-negative decimal of at most 18 ASCII digits, else None."""
    if text.isascii() and text.isdigit() and len(text) <= 18:
        return int(text)
    return None


def route(path: str, client_ip: str) -> tuple[int, bytes | int]:
    """Status and body (bytes, or a count of filler bytes) for a path."""
    prefix, _, argument = path[1:].partition("/")
    number = _number(argument)
    if prefix == "status" and number is not None and 200 <= number <= 599:
        return number, b"" if number in (204, 304) else f"{number}\n".encode()
    if prefix == "bytes" and number is not None and number <= MAX_GENERATED_BYTES:
        return 200, number
    if path == "/whoami":
        return 200, f"{client_ip}\n".encode()
    if prefix in ("status", "bytes"):
        return 400, b"bad argument\n"
    return 200, b"ok\n"


async def respond(
    writer: asyncio.StreamWriter, status: int, body: bytes | int, keep_alive: bool, head_only: bool
) -> None:
    length = body if isinstance(body, int) else len(body)
    lines = [
        f"HTTP/1.1 {status} {_reason(status)}",
        "Content-Type: text/plain",
        f"Connection: {'keep-alive' if keep_alive else 'close'}",
    ]
    if status not in (204, 304):
        lines.append(f"Content-Length: {length}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    if not head_only and isinstance(body, bytes):
        writer.write(body)
    elif not head_only:
        for offset in range(0, length, len(_CHUNK)):
            writer.write(_CHUNK[: min(len(_CHUNK), length - offset)])
            await writer.drain()
    await writer.drain()


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def wants_keep_alive(request: Request) -> bool:
    connection = request.headers.get("connection", "").lower()
    if request.version == "HTTP/1.1":
        return "close" not in connection
    return "keep-alive" in connection


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    peer = writer.get_extra_info("peername")
    client_ip = str(peer[0]).removeprefix("::ffff:") if peer else "unknown"
    try:
        while True:
            try:
                request = await asyncio.wait_for(read_request(reader), IDLE_TIMEOUT_SECONDS)
            except BadRequest:
                await respond(writer, 400, b"bad request\n", keep_alive=False, head_only=False)
                break
            if request is None:
                break
            keep_alive = wants_keep_alive(request)
            status, body = route(request.path, client_ip)
            await respond(writer, status, body, keep_alive, request.method == "HEAD")
            if not keep_alive:
                break
    except (ConnectionError, TimeoutError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def serve(host: str, port: int) -> None:
    server = await asyncio.start_server(handle, host, port, limit=MAX_HEAD_BYTES, reuse_address=True)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8080)
    options = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(options.host, options.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
