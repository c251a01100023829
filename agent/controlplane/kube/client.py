"""A small Kubernetes API client: JSON requests and watch streams over HTTP/1.1 on asyncio streams.

Standard library only (asyncio, ssl, json), so the agent pays ~1 MB for it instead of lightkube's
or the official client's tens of MB. Plain requests share a small keep-alive pool; every watch
owns one connection for its life. TLS verifies the server against the configured CA; client
certificates and bearer tokens (a token file is re-read when the kubelet rotates it) are supported.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import ssl
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

from agent.controlplane.kube.config import KubeConfig, KubeConfigError
from agent.controlplane.kube.http1 import (
    BodyReader,
    LineSplitter,
    LineTooLong,
    ProtocolError,
    ResponseHead,
    StaleConnection,
    encode_request,
    read_response_head,
)

__all__ = ["ApiError", "Gone", "KubeClient", "KubeConfig", "KubeConfigError"]

MAX_EVENT_BYTES = 16 * 1024 * 1024  # one watch event (one line); a Pod is a few KB
MAX_BODY_BYTES = 64 * 1024 * 1024  # one plain response (a list page of 500 big objects fits)
IDLE_POOL_SIZE = 4
WATCH_DEADLINE_MARGIN = 30.0  # past the server's timeoutSeconds, the stream is presumed dead
USER_AGENT = "pinion/0.1"


class ApiError(Exception):
    """The API server refused a request: HTTP status, Status.reason (e.g. "NotFound") and message."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class Gone(ApiError):
    """410: the resourceVersion is older than the server's history; list again."""


def api_error(status: int, status_object: object, fallback: str = "") -> ApiError:
    """The ApiError (Gone for 410) a Status object, or an HTTP status with a body, stands for."""
    reason, message = fallback or "Unknown", ""
    if isinstance(status_object, dict):
        status = int(status_object.get("code") or status)
        reason = str(status_object.get("reason") or reason)
        message = str(status_object.get("message") or "")
    return (Gone if status == 410 else ApiError)(status, reason, message)


@dataclass(frozen=True)
class _Endpoint:
    scheme: str
    host: str
    port: int
    prefix: str  # path prefix of the server URL, "" usually
    host_header: str

    @classmethod
    def parse(cls, server: str) -> _Endpoint:
        parts = urlsplit(server)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise KubeConfigError(f"server {server!r} is not an https:// URL")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port, parts.path.rstrip("/"), parts.netloc)


class _BearerToken:
    """The token to send: fixed, or a file re-read whenever its inode, size or mtime changes."""

    def __init__(self, token: str | None, path: str | None) -> None:
        self._token = token
        self._path = path
        self._seen: tuple[int, int, int] | None = None

    def value(self) -> str | None:
        if self._path is None:
            return self._token
        stat = os.stat(self._path)  # follows the projected volume's ..data symlink
        seen = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if seen != self._seen:
            with open(self._path, encoding="utf-8") as file:
                self._token = file.read().strip()
            self._seen = seen
        return self._token


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def usable(self) -> bool:
        return not self.reader.at_eof() and not self.writer.is_closing()

    def abort(self) -> None:
        self.writer.transport.abort()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, asyncio.TimeoutError, ssl.SSLError):
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)


class KubeClient:
    """JSON requests and watches against one API server; close() when done."""

    def __init__(self, config: KubeConfig, *, timeout: float = 10.0) -> None:
        self._config = config
        self._timeout = timeout
        self._endpoint = _Endpoint.parse(config.server)
        self._ssl = make_ssl_context(config) if self._endpoint.scheme == "https" else None
        self._token = _BearerToken(config.token, config.token_file)
        self._idle: list[_Connection] = []
        self._watching: set[_Connection] = set()
        self._closed = False

    async def request(self, method: str, path: str, *, params: dict[str, str] | None = None,
                      body: dict[str, Any] | None = None, content_type: str = "application/json",
                      ) -> dict[str, Any]:
        """One request; the decoded JSON answer. ApiError/Gone on refusal, OSError/TimeoutError on failure."""
        payload = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        headers = self._headers(content_type if payload is not None else None)
        async with asyncio.timeout(self._timeout):
            head, data = await self._exchange(method, self._target(path, params), headers, payload)
        return _decode(head, data)

    async def get_optional(self, path: str, *, params: dict[str, str] | None = None) -> dict[str, Any] | None:
        """GET one object; None when it does not exist (404). Other errors as request()."""
        try:
            return await self.request("GET", path, params=params)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def request_bytes(self, method: str, path: str, *, params: dict[str, str] | None = None) -> bytes:
        """The raw body of a successful answer (a list page, to decode item by item); errors as request()."""
        async with asyncio.timeout(self._timeout):
            head, data = await self._exchange(method, self._target(path, params), self._headers(None), None)
        if not 200 <= head.status < 300:
            _decode(head, data)  # raises ApiError for a Status
            raise ProtocolError(f"unexpected {head.status} {head.reason}")
        return data

    def watch(self, path: str, params: dict[str, str]) -> AsyncGenerator[dict[str, Any], None]:
        """Events of one watch (watch=1 is added); ends when the server ends the stream.

        An ERROR event raises Gone (code 410) or ApiError. A stream cut short raises ConnectionError.
        It is an async generator (an AsyncIterator with aclose()): leave early through
        contextlib.aclosing, or the connection stays open until the generator is finalized.
        """
        return self._watch(path, {**params, "watch": "1"})

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in self._watching:
            connection.abort()
        for connection in idle:
            await connection.close()

    def _headers(self, content_type: str | None) -> dict[str, str]:
        headers = {"Host": self._endpoint.host_header, "User-Agent": USER_AGENT, "Accept": "application/json"}
        token = self._token.value()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if content_type is not None:
            headers["Content-Type"] = content_type
        return headers

    def _target(self, path: str, params: dict[str, str] | None) -> str:
        query = f"?{urlencode(params)}" if params else ""
        return f"{self._endpoint.prefix}{path}{query}"

    async def _exchange(self, method: str, target: str, headers: dict[str, str],
                        payload: bytes | None) -> tuple[ResponseHead, bytes]:
        """Send and read one response; a reused connection found dead before any byte is retried once."""
        while True:
            connection, reused = await self._acquire()
            try:
                connection.writer.write(encode_request(method, target, headers, payload))
                await connection.writer.drain()
                head = await read_response_head(connection.reader)
                data = await BodyReader(connection.reader, head, max_piece=MAX_BODY_BYTES,
                                        method=method).read_all(MAX_BODY_BYTES)
            except (StaleConnection, BrokenPipeError, ConnectionResetError):
                connection.abort()
                if reused:
                    continue
                raise
            except BaseException:
                connection.abort()
                raise
            self._release(connection, head)
            return head, data

    async def _acquire(self) -> tuple[_Connection, bool]:
        while self._idle:
            connection = self._idle.pop()
            if connection.usable():
                return connection, True
            connection.abort()
        return await self._connect(), False

    def _release(self, connection: _Connection, head: ResponseHead) -> None:
        if head.keep_alive and not self._closed and len(self._idle) < IDLE_POOL_SIZE and connection.usable():
            self._idle.append(connection)
        else:
            connection.abort()

    async def _connect(self) -> _Connection:
        if self._closed:
            raise ConnectionError("the Kubernetes client is closed")
        endpoint = self._endpoint
        server_hostname = (self._config.tls_server_name or endpoint.host) if self._ssl else None
        reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port, ssl=self._ssl,
                                                       server_hostname=server_hostname)
        _keepalive(writer.get_extra_info("socket"))
        return _Connection(reader, writer)

    async def _watch(self, path: str, params: dict[str, str]) -> AsyncGenerator[dict[str, Any], None]:
        async with asyncio.timeout(self._timeout):
            connection = await self._connect()
        self._watching.add(connection)
        try:
            async with asyncio.timeout(self._timeout):
                request = encode_request("GET", self._target(path, params), self._headers(None), None)
                connection.writer.write(request)
                await connection.writer.drain()
                head = await read_response_head(connection.reader)
                body = BodyReader(connection.reader, head, max_piece=MAX_EVENT_BYTES)
                if head.status != 200:
                    _decode(head, await body.read_all(MAX_EVENT_BYTES))
                    raise ProtocolError(f"watch answered {head.status} {head.reason}, not 200")
            async with contextlib.aclosing(_events(body, _watch_deadline(params))) as events:
                async for event in events:
                    yield event
        finally:
            self._watching.discard(connection)
            connection.abort()


async def _events(body: BodyReader, deadline: float | None) -> AsyncGenerator[dict[str, Any], None]:
    """Decode newline-delimited watch events; reads (never the consumer) are bounded by the deadline."""
    splitter = LineSplitter(MAX_EVENT_BYTES)
    when = None if deadline is None else asyncio.get_running_loop().time() + deadline
    while True:
        async with asyncio.timeout_at(when):
            piece = await body.next_piece()
        try:
            lines = splitter.feed(piece) if piece else [splitter.finish()]
        except LineTooLong as error:
            raise ApiError(0, "EventTooLarge", str(error)) from error
        for line in lines:
            if line.strip():
                yield _event(line)
        if not piece:
            if body.until_close:
                raise ProtocolError("the watch stream ended without chunked framing")
            return


def _event(line: bytes) -> dict[str, Any]:
    try:
        event = json.loads(line)
    except ValueError as error:
        raise ProtocolError(f"watch event is not JSON: {line[:80]!r}") from error
    if not isinstance(event, dict) or "type" not in event:
        raise ProtocolError(f"watch event without a type: {line[:80]!r}")
    if event["type"] == "ERROR":
        raise api_error(500, event.get("object"), "InternalError")
    return event


def _watch_deadline(params: dict[str, str]) -> float | None:
    try:
        return float(params["timeoutSeconds"]) + WATCH_DEADLINE_MARGIN
    except (KeyError, ValueError):
        return None


def _decode(head: ResponseHead, data: bytes) -> dict[str, Any]:
    try:
        document = json.loads(data) if data.strip() else {}
    except ValueError:
        document = None
    if head.status >= 400:
        if isinstance(document, dict) and document.get("kind") == "Status":
            raise api_error(head.status, document, head.reason)
        raise ApiError(head.status, head.reason.replace(" ", "") or "Unknown",
                       data[:200].decode("utf-8", errors="replace").strip())
    if not isinstance(document, dict):
        raise ProtocolError(f"{head.status} answer is not a JSON object: {data[:80]!r}")
    return document


def make_ssl_context(config: KubeConfig) -> ssl.SSLContext:
    """Verify the server against config.ca_pem (or the system's CAs); present the client cert if any."""
    try:
        context = ssl.create_default_context(cadata=config.ca_pem.decode("ascii") if config.ca_pem else None)
        if config.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if config.client_cert_pem and config.client_key_pem:
            with _pem_files(config.client_cert_pem, config.client_key_pem) as (cert_path, key_path):
                context.load_cert_chain(cert_path, key_path)
    except (ssl.SSLError, ValueError, UnicodeDecodeError) as error:
        raise KubeConfigError(f"unusable TLS material: {error}") from error
    context.set_alpn_protocols(["http/1.1"])
    return context


@contextlib.contextmanager
def _pem_files(cert_pem: bytes, key_pem: bytes) -> Iterator[tuple[str, str]]:
    """ssl loads certificates only from paths: give it anonymous memory files (else a private temp dir)."""
    if hasattr(os, "memfd_create"):
        descriptors = [os.memfd_create(name) for name in ("kube-cert", "kube-key")]
        try:
            for descriptor, data in zip(descriptors, (cert_pem, key_pem), strict=True):
                os.write(descriptor, data)
            yield f"/proc/self/fd/{descriptors[0]}", f"/proc/self/fd/{descriptors[1]}"
        finally:
            for descriptor in descriptors:
                os.close(descriptor)
        return
    import tempfile  # only where memfd_create is missing; tempfile costs ~0.8 MB of imports

    with tempfile.TemporaryDirectory() as directory:
        paths = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
        for path, data in zip(paths, (cert_pem, key_pem), strict=True):
            with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as file:
                file.write(data)
        yield paths


def _keepalive(sock: socket.socket | None) -> None:
    """Notice a vanished API server within about a minute, even on a quiet watch."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, option):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
