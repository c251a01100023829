"""HTTP/1.1 framing for the in-test API server: requests in, JSON and chunked watch events out.

Standard library only; the routing and the Kubernetes semantics live in tests/support/kubeapi.py.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from tests.support.kubestore import JsonObject, Resource, StoreError, resource_for

MAX_REQUEST_BYTES = 16 * 1024 * 1024


class BadRequest(Exception):
    """The client sent something that is not an HTTP/1.1 request this server reads."""


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"null")
        except ValueError as error:
            raise StoreError(400, "BadRequest", f"the body is not JSON: {error}") from error


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as error:
        if error.partial.strip():
            raise BadRequest("truncated request head") from error
        return None
    except asyncio.LimitOverrunError as error:
        raise BadRequest("request head too long") from error
    lines = raw.decode("latin-1").split("\r\n")
    try:
        method, target, _version = lines[0].split(" ", 2)
    except ValueError as error:
        raise BadRequest(f"bad request line {lines[0][:80]!r}") from error
    headers = {}
    for line in filter(None, lines[1:]):
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await _read_body(reader, headers)
    parts = urlsplit(target)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    return Request(method, target, parts.path, query, headers, body)


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        pieces = []
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            pieces.append(await reader.readexactly(size))
            await reader.readexactly(2)
        await reader.readuntil(b"\r\n")
        return b"".join(pieces)
    length = int(headers.get("content-length") or 0)
    if length > MAX_REQUEST_BYTES:
        raise BadRequest("request body too large")
    return await reader.readexactly(length) if length else b""


def response_head(code: int, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {code} {_REASONS.get(code, 'Status')}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


_REASONS = {200: "OK", 201: "Created", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            405: "Method Not Allowed", 409: "Conflict", 410: "Gone", 415: "Unsupported Media Type",
            422: "Unprocessable Entity", 500: "Internal Server Error"}


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def parse_resource_path(path: str) -> tuple[Resource, str | None, str | None] | None:
    """(resource, namespace, name) for /api/v1/... and /apis/<group>/<version>/... paths."""
    parts = [part for part in path.split("/") if part]
    if parts[:2] == ["api", "v1"]:
        group_version, rest = "v1", parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group_version, rest = f"{parts[1]}/{parts[2]}", parts[3:]
    else:
        return None
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    resource = resource_for(group_version, rest[0]) if 1 <= len(rest) <= 2 else None
    if resource is None or (namespace is not None and not resource.namespaced):
        return None
    return resource, namespace, rest[1] if len(rest) == 2 else None


def event_chunk(kind: str, obj: JsonObject) -> bytes:
    return chunk(json.dumps({"type": kind, "object": obj}, separators=(",", ":")).encode() + b"\n")


async def send_json(writer: asyncio.StreamWriter, code: int, document: Any) -> bool:
    body = json.dumps(document, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
    writer.write(response_head(code, headers) + body)
    await writer.drain()
    return True


def certificate_user(writer: asyncio.StreamWriter) -> str | None:
    peer = writer.get_extra_info("peercert")
    for rdn in (peer or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


