"""The node's admin endpoint: GET /metrics (Prometheus text), /ready, /live, /pods (JSON)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            503: "Service Unavailable"}


class AdminServer:
    def __init__(self, host: str, port: int, registry: CollectorRegistry,
                 pods_view: Callable[[], list[dict[str, Any]]]) -> None:
        self._host, self._port = host, port
        self._registry = registry
        self._pods_view = pods_view
        self.ready = False
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self._host, self._port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            status, ctype, body = self._route(head.split(b"\r\n", 1)[0])
            writer.write(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n" % (status, _REASONS[status].encode(),
                                                         ctype.encode(), len(body)) + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass
        finally:
            writer.close()

    def _route(self, request_line: bytes) -> tuple[int, str, bytes]:
        parts = request_line.split()
        if len(parts) != 3:
            return 400, "text/plain", b"bad request\n"
        method, path = parts[0], parts[1].split(b"?", 1)[0]
        if method != b"GET":
            return 405, "text/plain", b"only GET\n"
        if path == b"/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self._registry)
        if path == b"/ready":
            return (200, "text/plain", b"ready\n") if self.ready else (503, "text/plain",
                                                                      b"not ready\n")
        if path == b"/live":
            return 200, "text/plain", b"live\n"
        if path == b"/pods":
            return 200, "application/json", json.dumps(self._pods_view()).encode()
        return 404, "text/plain", b"not found\n"
