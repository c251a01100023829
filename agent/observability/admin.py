"""The node's admin endpoint: GET /metrics (Prometheus text), /ready, /live, /pods (JSON).

Anyone who can reach the port can connect, so every connection is bounded: at most
`max_connections` at once (a newcomer over the cap closes the *oldest* one: an honest client
sends its request as soon as it connects, so the oldest is the one most likely idle or
hostile, and probes keep being answered during a flood), `head_timeout` seconds and
`max_head_bytes` bytes to receive the request head, `send_timeout` seconds to take the answer,
one request per connection. Each connection closed unanswered is counted by reason in
`pinion_admin_connections_refused_total`.

/pods in full (netns paths, pod IPs, allowed clients, capture exclusions, cgroups) is only
for callers on this host; everyone else gets `public_pod_view` of each entry: what /metrics
already tells (namespace, name, service account, owner) and whether capture works.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.memory import give_back_memory
from agent.observability.exposition import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from agent.observability.metrics import AdminMetrics
from agent.observability.tap import TapEndpoint

log = logging.getLogger(__name__)
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            503: "Service Unavailable"}

# What any caller may see of a pod: every field here is in /metrics labels already, or says
# whether capture works. An allow-list, so a field added to /pods later stays local.
PUBLIC_POD_FIELDS = ("namespace", "name", "serviceAccount", "owner", "backend", "listening")
PUBLIC_PROGRAM_FIELDS = ("program", "attach", "attached")


@dataclass(frozen=True)
class AdminLimits:
    """What one caller can hold of the admin endpoint (docs/security.md lists them)."""

    max_connections: int = 64      # fds and buffers: 64 x (~16 KiB head + transport) at most
    head_timeout: float = 3.0      # seconds from accept to the end of the request head
    max_head_bytes: int = 8192     # a request head longer than this is refused
    send_timeout: float = 10.0     # seconds to take the whole answer (/metrics may be large)


def is_local_peer(peer: object, own: object) -> bool:
    """Whether a TCP caller is on this host: from loopback, or from the address it reached
    (a connection from elsewhere cannot claim that source: our SYN-ACK to it stays here)."""
    try:
        caller = _ip(peer)
        return caller.is_loopback or caller == _ip(own)
    except (TypeError, ValueError, IndexError):
        return False  # not an IP peer (a Unix socket has no peername here): not trusted


def _ip(address: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if not isinstance(address, tuple):
        raise TypeError(address)
    ip = ipaddress.ip_address(str(address[0]).split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def public_pod_view(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of one /pods entry any caller may see (no netns, IPs, policy, cgroups)."""
    public = {key: entry[key] for key in PUBLIC_POD_FIELDS if key in entry}
    if isinstance(entry.get("programs"), list):
        public["programs"] = [{key: program[key] for key in PUBLIC_PROGRAM_FIELDS if key in program}
                              for program in entry["programs"] if isinstance(program, dict)]
    return public


class AdminServer:
    def __init__(self, host: str, port: int, registry: CollectorRegistry,
                 pods_view: Callable[[], list[dict[str, Any]]],
                 metrics: AdminMetrics | None = None, limits: AdminLimits = AdminLimits(),
                 tap: TapEndpoint | None = None) -> None:
        self._host, self._port = host, port
        self._tap = tap  # GET /tap: handed over, and off the eviction list (the hub caps taps)
        self._registry = registry
        self._pods_view = pods_view
        self._metrics = metrics if metrics is not None else AdminMetrics(registry)
        self._limits = limits
        self.ready = False
        self._server: asyncio.Server | None = None
        self._open: dict[asyncio.StreamWriter, None] = {}  # insertion order: oldest first

    async def start(self) -> None:
        # SO_REUSEPORT: during a rolling update the next agent on this node binds the same
        # port while this one drains (the DaemonSet's maxSurge); either answers.
        self._server = await asyncio.start_server(self._serve, self._host, self._port,
                                                  limit=self._limits.max_head_bytes,
                                                  reuse_port=True)

    @property
    def address(self) -> tuple[str, int]:
        """Where it listens (the port the kernel chose, when asked for port 0)."""
        assert self._server is not None and self._server.sockets
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    @property
    def open_connections(self) -> int:
        return len(self._open)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for writer in list(self._open):
            writer.transport.abort()
        if self._tap is not None:
            self._tap.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._make_room()
        self._open[writer] = None
        self._metrics.connections.inc()
        try:
            await self._answer(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the caller left (or was evicted for a newcomer)
        except Exception:  # a bug costs this one connection, and says where
            log.exception("admin endpoint: answering %s failed", writer.get_extra_info("peername"))
        finally:
            if not writer.transport.is_closing():  # every path but a whole answer: reset
                writer.transport.abort()
            self._open.pop(writer, None)
            self._metrics.connections.dec()

    def _make_room(self) -> None:
        """Over the cap, close the oldest connection rather than refuse the newest."""
        while len(self._open) >= self._limits.max_connections:
            oldest = next(iter(self._open))
            del self._open[oldest]
            self._refuse(oldest, "over_capacity")

    def _refuse(self, writer: asyncio.StreamWriter, reason: str) -> None:
        self._metrics.refused.labels(reason).inc()
        writer.transport.abort()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(self._limits.head_timeout):
                head = await reader.readuntil(b"\r\n\r\n")
        except TimeoutError:
            self._refuse(writer, "head_timeout")
            return
        except asyncio.LimitOverrunError:
            self._refuse(writer, "head_too_large")
            return
        local = is_local_peer(writer.get_extra_info("peername"), writer.get_extra_info("sockname"))
        request_line = head.split(b"\r\n", 1)[0]
        parts = request_line.split()
        if self._tap is not None and len(parts) == 3 and parts[0] == b"GET" and \
                parts[1].split(b"?", 1)[0] == b"/tap":
            self._open.pop(writer, None)
            await self._tap.serve(reader, writer, parts[1], head, local)
            return
        status, ctype, body = self._route(request_line, local)
        # No high-water mark: drain() returns only once everything is with the kernel, so
        # close() below never leaves a transport behind waiting on a peer that does not read.
        writer.transport.set_write_buffer_limits(high=0)
        writer.write(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n" % (status, _REASONS[status].encode(),
                                                     ctype.encode(), len(body)) + body)
        try:
            async with asyncio.timeout(self._limits.send_timeout):
                await writer.drain()
        except TimeoutError:
            self._refuse(writer, "send_timeout")
            return
        finally:
            if ctype == CONTENT_TYPE_LATEST:  # a scrape: thousands of small strings just freed
                del body
                give_back_memory()
        writer.close()

    def _route(self, request_line: bytes, local: bool) -> tuple[int, str, bytes]:
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
            pods = self._pods_view()
            return 200, "application/json", json.dumps(
                pods if local else [public_pod_view(pod) for pod in pods]).encode()
        return 404, "text/plain", b"not found\n"
