"""The issuer's admin endpoint (plain HTTP): GET /metrics, /ready, /live, on a BoundedListener.

The node agent's AdminServer (agent/observability/admin.py) serves the same paths but takes every
connection `asyncio.start_server` gives it; the issuer's port is reachable from the whole node
network, so it gets the same bounds as its TLS port: few connections, short deadlines.
"""

from __future__ import annotations

import asyncio

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from agent.controlplane.identity.limits import ListenerLimits
from agent.controlplane.identity.listener import BoundedListener

# Probes and a scraper, one request each: a handful at once is plenty.
ADMIN_LIMITS = ListenerLimits(max_connections=64, max_tls=8, handshake_timeout=5.0, read_timeout=5.0)
MAX_HEAD_BYTES = 8 * 1024
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            503: "Service Unavailable"}


class IssuerAdmin:
    """`ready` is what /ready answers; /metrics renders `registry`."""

    def __init__(self, registry: CollectorRegistry, refusals: Counter,
                 limits: ListenerLimits = ADMIN_LIMITS) -> None:
        self.ready = False
        self._registry = registry
        self._limits = limits
        self.listener = BoundedListener("admin", self._serve, limits, refusals, stream_limit=MAX_HEAD_BYTES)

    async def start(self, host: str, port: int) -> tuple[str, int]:
        return await self.listener.start(host, port)

    async def close(self) -> None:
        await self.listener.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
        try:
            async with asyncio.timeout(self._limits.read_timeout):
                head = await reader.readuntil(b"\r\n\r\n")
        except TimeoutError:
            self.listener.refused(peer, "read_timeout")
            return
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            return
        status, content_type, body = self.route(head.split(b"\r\n", 1)[0])
        writer.write(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                     % (status, _REASONS[status].encode(), content_type.encode(), len(body)) + body)
        try:
            async with asyncio.timeout(self._limits.read_timeout):
                await writer.drain()
        except (TimeoutError, ConnectionError):
            pass

    def route(self, request_line: bytes) -> tuple[int, str, bytes]:
        """Status, content type and body for one request line."""
        parts = request_line.split()
        if len(parts) != 3:
            return 400, "text/plain", b"bad request\n"
        method, path = parts[0], parts[1].split(b"?", 1)[0]
        if method != b"GET":
            return 405, "text/plain", b"only GET\n"
        if path == b"/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self._registry)
        if path == b"/ready":
            return (200, "text/plain", b"ready\n") if self.ready else (503, "text/plain", b"not ready\n")
        if path == b"/live":
            return 200, "text/plain", b"live\n"
        return 404, "text/plain", b"not found\n"
