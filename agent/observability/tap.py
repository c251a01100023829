"""`GET /tap` on the admin endpoint: who may tap, and the stream of tapped requests.

Tap shows URLs, so it is not open to whoever reaches the admin port. A `TapAuthorizer`
decides per request: standalone, `NodeOrToken` lets in callers on this host and holders of
the operator's token (`--tap-token-file`); in Kubernetes mode the agent asks the API
(`agent.controlplane.kube.tapauth`: TokenReview, then SubjectAccessReview for
`watch` on `<resource>/tap` in group `tap.pinion.dev`). A refused caller gets a status
(401 no or unknown credentials, 403 not allowed) and a one-line reason, and sees nothing.

An accepted tap is a close-delimited `application/x-ndjson` answer: one JSON object per
finished request (`"kind": "request"`) and, every `stats_interval`, one with
`"kind": "stats"` (events dropped because the client did not keep up, and left out over
its max_rps). Bounds: `TapHub.max_taps` open taps, `max_authorizing` authorizations in
flight (each may call the API), the hub's queue per tap, and a write buffer per tap: a
client that stops reading stops being written to, and its queue's overflow is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import parse_qs

from agent.core.tap import (
    DEFAULT_MAX_RPS,
    Resource,
    Subscription,
    TapFilter,
    TapHub,
    TapRequestError,
    TooManyTaps,
)
from agent.observability.exposition import Collector, CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)
TAP_GROUP = "tap.pinion.dev"  # the RBAC group of the `<resource>/tap` subresource
PLURALS = {"pod": "pods", "deployment": "deployments", "namespace": "namespaces",
           "daemonset": "daemonsets", "statefulset": "statefulsets"}
_MAX_VALUE = 512


@dataclass(frozen=True, slots=True)
class TapCaller:
    local: bool  # from this host (loopback, or the admin address itself)
    token: str | None  # the bearer token it sent, if any
    address: str


class TapRefused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class TapAuthorizer(Protocol):
    async def authorize(self, caller: TapCaller, target: Resource) -> str:
        """Who the caller is (for the log); raises TapRefused when it may not tap `target`."""
        ...


class NodeOrToken:
    """Standalone mode: a caller on this host, or one that holds the operator's token."""

    def __init__(self, token: str | None) -> None:
        self._token = token.encode() if token else None

    async def authorize(self, caller: TapCaller, target: Resource) -> str:
        if caller.local:
            return "this node"
        if caller.token is None:
            raise TapRefused(401, "tap needs credentials: call from the agent's own node, or "
                                  "pass the operator's tap token (pinion tap --token-file)")
        if self._token is None or not hmac.compare_digest(caller.token.encode(), self._token):
            raise TapRefused(403, "tap refused: that is not this agent's tap token")
        return "token holder"


@dataclass(frozen=True)
class TapLimits:
    max_authorizing: int = 4  # authorizations in flight (each may cost API calls)
    authorize_timeout: float = 5.0
    write_buffer: int = 256 * 1024  # bytes waiting for a slow client before we stop writing
    flush_interval: float = 0.05  # events are batched this long: fewer writes per event
    stats_interval: float = 1.0


def bearer_token(head: bytes) -> str | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip().decode("ascii", "replace")
    return None


def parse_tap_query(query: str) -> tuple[TapFilter, float]:
    """The filter and max_rps of `/tap?resource=deploy/web&namespace=shop&...`."""
    try:
        params = {key: values[-1] for key, values in
                  parse_qs(query, keep_blank_values=True, strict_parsing=bool(query),
                           max_num_fields=16).items()}
    except ValueError as exc:
        raise TapRequestError(f"bad query: {exc}") from None
    unknown = set(params) - {"resource", "namespace", "to", "to_namespace", "from",
                             "from_namespace", "method", "path", "authority", "max_rps"}
    if unknown:
        raise TapRequestError(f"unknown parameter(s): {', '.join(sorted(unknown))}")
    if any(len(value) > _MAX_VALUE for value in params.values()):
        raise TapRequestError(f"a parameter is longer than {_MAX_VALUE} characters")
    if not params.get("resource"):
        raise TapRequestError("resource is required (pod/NAME, deploy/NAME or ns/NAME)")
    namespace = params.get("namespace") or "default"
    target = Resource.parse(params["resource"], namespace)
    to = Resource.parse(params["to"], params.get("to_namespace") or namespace) \
        if params.get("to") else None
    source = Resource.parse(params["from"], params.get("from_namespace") or namespace) \
        if params.get("from") else None
    if to is not None and source is not None:
        raise TapRequestError("to and from exclude each other")
    path = params.get("path", "")
    if path and not path.startswith("/"):
        raise TapRequestError(f"path must start with '/', got {path!r}")
    try:
        max_rps = float(params.get("max_rps") or DEFAULT_MAX_RPS)
    except ValueError:
        raise TapRequestError(f"max_rps must be a number, got {params['max_rps']!r}") from None
    return TapFilter(target, to, source, params.get("method", "").upper(), path,
                     params.get("authority", "")), max_rps


class TapEndpoint:
    """Serves `/tap` connections the admin server hands over."""

    def __init__(self, hub: TapHub, authorizer: TapAuthorizer, limits: TapLimits = TapLimits()) -> None:
        self.hub = hub
        self._authorizer = authorizer
        self._limits = limits
        self._authorizing = 0
        self._writers: set[asyncio.StreamWriter] = set()  # every /tap connection, to close
        self.refused: dict[str, int] = {}

    def close(self) -> None:
        """End every tap (the agent is stopping): their clients see the stream end."""
        for writer in list(self._writers):
            writer.transport.abort()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    target: bytes, head: bytes, local: bool) -> None:
        self._writers.add(writer)
        try:
            await self._serve(reader, writer, target, head, local)
        finally:
            self._writers.discard(writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     target: bytes, head: bytes, local: bool) -> None:
        query = target.split(b"?", 1)[1].decode("ascii", "replace") if b"?" in target else ""
        peer = writer.get_extra_info("peername")
        caller = TapCaller(local, bearer_token(head), str(peer[0]) if isinstance(peer, tuple) else "")
        try:
            tap_filter, max_rps = parse_tap_query(query)
            who = await self._authorize(caller, tap_filter.target)
            subscription, flusher = self._open(tap_filter, max_rps)
        except TapRequestError as exc:
            await self._refuse(writer, 400, "bad_request", str(exc))
            return
        except TapRefused as exc:
            reason = {401: "unauthenticated", 403: "forbidden"}.get(exc.status, "unavailable")
            await self._refuse(writer, exc.status, reason, exc.message)
            return
        log.info("tap %s by %s (%s), max %g/s", tap_filter.target.text(), who, caller.address,
                 max_rps)
        try:
            await self._stream(reader, writer, flusher)
        finally:
            self.hub.close(subscription)

    async def _authorize(self, caller: TapCaller, target: Resource) -> str:
        if self._authorizing >= self._limits.max_authorizing:
            raise TapRefused(429, "too many tap requests being authorized: retry in a moment")
        self._authorizing += 1
        try:
            async with asyncio.timeout(self._limits.authorize_timeout):
                return await self._authorizer.authorize(caller, target)
        except TimeoutError:
            raise TapRefused(503, "tap authorization timed out") from None
        finally:
            self._authorizing -= 1

    def _open(self, tap_filter: TapFilter, max_rps: float) -> tuple[Subscription, _Flusher]:
        flusher = _Flusher(self._limits)
        try:
            subscription = self.hub.open(tap_filter, max_rps, flusher.wake)
        except TooManyTaps as exc:
            raise TapRefused(429, f"{exc}: retry later") from None
        flusher.subscription = subscription
        return subscription, flusher

    async def _refuse(self, writer: asyncio.StreamWriter, status: int, reason: str, message: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        phrase = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
                  429: "Too Many Requests", 503: "Service Unavailable"}.get(status, "Error")
        body = (message + "\n").encode()
        writer.write(b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n" % (status, phrase.encode(), len(body)) + body)
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(5.0):
                await writer.drain()
        writer.close()

    async def _stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      flusher: _Flusher) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                     b"Cache-Control: no-store\r\nConnection: close\r\n\r\n")
        try:
            flusher.start(writer.transport)
            await _until_eof(reader)
        finally:
            flusher.stop()
            writer.close()


class _Flusher:
    """Writes one tap's events: woken (a plain callback, no task) when its queue stops being
    empty, it writes them all at the next slot of its own phase — a burst is one write, at
    most one per `flush_interval`, and taps opened together (a dashboard's, twenty `tap`
    commands) do not all write in the same loop iteration, which would stall the data path
    there. Every `stats_interval`, the tap's drop and limit counts if they changed. A client
    that does not read: past `write_buffer` bytes unsent nothing more is written, its queue
    fills and the overflow is counted as dropped."""

    def __init__(self, limits: TapLimits) -> None:
        self._limits = limits
        self.subscription: Subscription | None = None
        self._transport: asyncio.WriteTransport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._phase = random.random() * limits.flush_interval
        self._flush_at: asyncio.TimerHandle | None = None
        self._stats_at: asyncio.TimerHandle | None = None
        self._reported = (0, 0)

    def start(self, transport: asyncio.WriteTransport) -> None:
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._stats_at = self._loop.call_later(self._limits.stats_interval, self._stats)
        if self.subscription is not None and self.subscription.queue:
            self.wake()  # events queued before the answer's head was written

    def stop(self) -> None:
        for handle in (self._flush_at, self._stats_at):
            if handle is not None:
                handle.cancel()
        self._flush_at = self._stats_at = None
        self._transport = None

    def wake(self) -> None:
        if self._flush_at is not None or self._transport is None or self._loop is None:
            return
        now, interval = self._loop.time(), self._limits.flush_interval
        self._flush_at = self._loop.call_at(now + interval - (now - self._phase) % interval,
                                            self._flush)

    def _flush(self) -> None:
        self._flush_at = None
        transport, subscription = self._transport, self.subscription
        if transport is None or subscription is None or transport.is_closing():
            return
        if transport.get_write_buffer_size() >= self._limits.write_buffer:
            self.wake()  # a slow client: look again at the next slot; the queue overflows meanwhile
            return
        events = subscription.take()
        if events:
            transport.write(b"".join(event.line() for event in events))

    def _stats(self) -> None:
        transport, subscription, loop = self._transport, self.subscription, self._loop
        if transport is None or subscription is None or loop is None:
            return
        self._stats_at = loop.call_later(self._limits.stats_interval, self._stats)
        counts = (subscription.dropped, subscription.limited)
        if counts != self._reported and not transport.is_closing() \
                and transport.get_write_buffer_size() < self._limits.write_buffer:
            self._reported = counts
            transport.write(json.dumps({"kind": "stats", "dropped": counts[0],
                                        "limited": counts[1]}).encode() + b"\n")


async def _until_eof(reader: asyncio.StreamReader) -> None:
    """A tapping client sends nothing after its request: whatever it sends is read and
    dropped (bounded), and its EOF or reset ends the tap."""
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
        while await reader.read(4096):
            pass


class TapCollector(Collector):
    """pinion_tap_* on /metrics: open taps, events published, dropped, limited, refused."""

    def __init__(self, endpoint: TapEndpoint) -> None:
        self._endpoint = endpoint

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        hub = self._endpoint.hub
        dropped, limited = hub.totals()
        yield GaugeMetricFamily("pinion_tap_open", "Taps open now", value=hub.taps)
        yield CounterMetricFamily("pinion_tap_requests", "Finished requests of tapped pods "
                                  "(once per request, however many taps)", value=hub.published)
        yield CounterMetricFamily("pinion_tap_events_dropped", "Tap events dropped: the tapping "
                                  "client did not keep up", value=dropped)
        yield CounterMetricFamily("pinion_tap_events_limited", "Tap events left out over a "
                                  "tap's max_rps", value=limited)
        refused = CounterMetricFamily("pinion_tap_refused", "Tap requests refused, by reason",
                                      labels=["reason"])
        for reason, count in sorted(self._endpoint.refused.items()):
            refused.add_metric([reason], count)
        yield refused
