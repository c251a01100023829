"""Tap, sans-IO: what a finished request shows a tapping client, which taps want it, and how
much of it each tap may take.

The HTTP observers look at a request's path, authority and body sizes only while a tap is
open: they read `TapSwitch.on` once per message (HTTP/1) or stream (HTTP/2), and when it is
off they parse exactly as they do without tap. A request *started* while a tap was open ends
in a Record carrying a `RequestDetail`; the proxy turns it into a `TapEvent` (a flat dict,
serialised once however many taps take it) and hands it to `TapHub.publish`.

Every tap is bounded three ways: the hub holds at most `max_taps` subscriptions, each takes
at most `max_rps` events a second (a token bucket: the rest are counted as `limited`), and
each queue holds at most `queue_size` events until the tap's writer takes them (the rest are
counted as `dropped`). Both are counted per request of the tapped resource, before the
method/path/authority/to/from filters: the proxy asks `ready_for` first and builds no event
when no tap of the pod has room. Publishing never waits: a tapping client that stops reading
costs the tapped pods nothing but the drops.
"""

from __future__ import annotations

import json
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

DEFAULT_MAX_TAPS: Final = 32
DEFAULT_QUEUE: Final = 1000
DEFAULT_MAX_RPS: Final = 100.0  # as `linkerd viz tap --max-rps`
MAX_RPS_CAP: Final = 5000.0  # whatever a client asks for
MAX_FIELD: Final = 512  # path and authority are cut to this many characters
# One encoder for every event: json.dumps(..., separators=...) would build one per call.
_ENCODER: Final = json.JSONEncoder(separators=(",", ":"))

KINDS: Final = {"pod": "pod", "po": "pod", "pods": "pod", "deploy": "deployment",
                "deployment": "deployment", "deployments": "deployment", "ns": "namespace",
                "namespace": "namespace", "namespaces": "namespace", "ds": "daemonset",
                "daemonset": "daemonset", "sts": "statefulset", "statefulset": "statefulset"}


class TapSwitch:
    """Whether a tap of one pod is open (`on`) and which (`taps`: those whose target is the
    pod, before their other filters). The observers read `on`, only the hub writes them: a
    tap of one pod leaves every other pod's connections on the compiled fast path."""

    __slots__ = ("__weakref__", "on", "taps")

    def __init__(self) -> None:
        self.on = False
        self.taps: list[Subscription] = []


NEVER: Final = TapSwitch()  # for observers built without a hub: never on


class RequestDetail:
    """What a tap shows of one request beyond its Record: collected only while tapping."""

    __slots__ = ("authority", "end_ms", "path", "request_bytes", "response_bytes")

    def __init__(self, authority: str, path: str) -> None:
        self.authority = authority
        self.path = path
        self.request_bytes = 0
        self.response_bytes = 0
        self.end_ms: float | None = None  # request start -> end of the response


def split_target(target: str) -> tuple[str, str]:
    """(authority, path) of a request target; the query string is never kept (it may hold
    secrets), an absolute-form target gives its authority."""
    authority = ""
    if "://" in target[:16]:
        rest = target.split("://", 1)[1]
        authority, slash, path = rest.partition("/")
        target = slash + path
    path = target.split("?", 1)[0].split("#", 1)[0]
    return authority[:MAX_FIELD], path[:MAX_FIELD]


def clean(value: bytes) -> str:
    return value[:MAX_FIELD].decode("ascii", "replace")


# --- events and filters -----------------------------------------------------------------------

class TapEvent:
    """One finished request as a flat dict of JSON values; its line is built once."""

    __slots__ = ("_line", "fields", "queued")

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields
        self.queued = False  # some tap took it (not all were over their rate or full)
        self._line: bytes | None = None

    def line(self) -> bytes:
        if self._line is None:
            self._line = _ENCODER.encode(self.fields).encode() + b"\n"
        return self._line


class TapRequestError(ValueError):
    """A tap request that cannot be served as asked (the message says why)."""


@dataclass(frozen=True, slots=True)
class Resource:
    """`pod/web-1`, `deploy/web` or `ns/shop`, in a namespace (a namespace names itself)."""

    kind: str  # "pod" | "deployment" | "namespace" | "daemonset" | "statefulset"
    name: str
    namespace: str

    @classmethod
    def parse(cls, text: str, namespace: str) -> Resource:
        kind, slash, name = text.partition("/")
        found = KINDS.get(kind.lower())
        if found is None or (not slash and found != "namespace") or (slash and not name):
            raise TapRequestError(f"cannot tap {text!r}: expected pod/NAME, deploy/NAME or "
                                  "ns/NAME")
        if found == "namespace":
            name = name or namespace
            return cls(found, name, name)
        return cls(found, name, namespace)

    def text(self) -> str:
        return f"{self.kind}/{self.name}"

    def matches(self, namespace: str, pod: str, owner_kind: str, owner_name: str) -> bool:
        if namespace != self.namespace:
            return False
        if self.kind == "namespace":
            return True
        if self.kind == "pod":
            return pod == self.name
        return owner_kind == self.kind and owner_name == self.name


@dataclass(frozen=True, slots=True)
class TapFilter:
    """Which finished requests a tap wants: those of `target`'s pods, optionally only the
    outbound ones to `to` / the inbound ones from `source`, by method, path prefix, authority."""

    target: Resource
    to: Resource | None = None
    source: Resource | None = None
    method: str = ""
    path: str = ""
    authority: str = ""

    def matches(self, fields: dict[str, Any]) -> bool:
        if not self.target.matches(fields["namespace"], fields["pod"], fields["owner_kind"],
                                   fields["owner_name"]):
            return False
        if self.method and fields["method"] != self.method:
            return False
        if self.path and not str(fields["path"]).startswith(self.path):
            return False
        if self.authority and fields["authority"] != self.authority:
            return False
        if self.to is not None:
            return fields["direction"] == "outbound" and self.to.matches(
                fields["dst_namespace"], fields["dst_pod"], fields["dst_owner_kind"],
                fields["dst_owner_name"])
        if self.source is not None:
            return fields["direction"] == "inbound" and self.source.matches(
                fields["src_namespace"], fields["src_pod"], fields["src_owner_kind"],
                fields["src_owner_name"])
        return True


# --- subscriptions and the hub -----------------------------------------------------------------

class TooManyTaps(Exception):
    """The hub already holds `max_taps` taps."""


class Subscription:
    """One open tap: its filter, its token bucket and its bounded queue."""

    __slots__ = ("_tokens", "_updated", "dropped", "filter", "limited", "max_rps", "queue",
                 "queue_size", "sent", "wake")

    def __init__(self, tap_filter: TapFilter, max_rps: float, queue_size: int,
                 wake: Callable[[], None], now: float) -> None:
        self.filter = tap_filter
        self.max_rps = max_rps
        self.queue_size = queue_size
        self.queue: deque[TapEvent] = deque()
        self.wake = wake
        self.dropped = 0  # the queue was full: the tapping client did not keep up
        self.limited = 0  # over max_rps
        self.sent = 0
        self._tokens = min(max_rps, 1.0) if max_rps < 1 else max_rps
        self._updated = now

    def ready(self, now: float) -> bool:
        """Would an event be taken now (a token and room in the queue)? If not, it is counted
        as limited or dropped here, before anyone builds it."""
        if min(self.max_rps, self._tokens + (now - self._updated) * self.max_rps) < 1.0:
            self.limited += 1
            return False
        if len(self.queue) >= self.queue_size:
            self.dropped += 1
            return False
        return True

    def offer(self, event: TapEvent, now: float) -> bool:
        """Queue `event` if the rate and the queue allow; False if it was left out."""
        tokens = min(self.max_rps, self._tokens + (now - self._updated) * self.max_rps)
        self._updated = now
        if tokens < 1.0:
            self._tokens = tokens
            self.limited += 1
            return False
        self._tokens = tokens - 1.0
        if len(self.queue) >= self.queue_size:
            self.dropped += 1
            return False
        self.queue.append(event)
        event.queued = True
        if len(self.queue) == 1:
            self.wake()
        return True

    def take(self) -> list[TapEvent]:
        taken = list(self.queue)
        self.queue.clear()
        self.sent += len(taken)
        return taken


class TapHub:
    """Every open tap of this agent; `publish` is called once per tapped request."""

    def __init__(self, clock: Callable[[], float], max_taps: int = DEFAULT_MAX_TAPS,
                 queue_size: int = DEFAULT_QUEUE) -> None:
        self._clock = clock
        self.max_taps = max_taps
        self.queue_size = queue_size
        self._taps: list[Subscription] = []
        # each pod's switch (namespace, pod, owner kind, owner name), while its proxy holds it
        self._switches: weakref.WeakValueDictionary[tuple[str, str, str, str], TapSwitch] = \
            weakref.WeakValueDictionary()
        self.published = 0
        self.dropped = 0  # of taps already closed, plus `dropped` of the open ones
        self.limited = 0
        self.opened = 0

    @property
    def taps(self) -> int:
        return len(self._taps)

    def open(self, tap_filter: TapFilter, max_rps: float, wake: Callable[[], None]) -> Subscription:
        if len(self._taps) >= self.max_taps:
            raise TooManyTaps(f"this agent already serves {self.max_taps} taps")
        if not 0 < max_rps <= MAX_RPS_CAP:
            raise TapRequestError(f"max_rps must be in (0, {MAX_RPS_CAP:g}], got {max_rps:g}")
        subscription = Subscription(tap_filter, max_rps, self.queue_size, wake, self._clock())
        self._taps.append(subscription)
        self.opened += 1
        self._aim_all()
        return subscription

    def close(self, subscription: Subscription) -> None:
        if subscription in self._taps:
            self._taps.remove(subscription)
            self.dropped += subscription.dropped
            self.limited += subscription.limited
        self._aim_all()

    def switch_for(self, namespace: str, pod: str, owner_kind: str, owner_name: str) -> TapSwitch:
        """The pod's switch (one per pod identity, kept while someone holds it)."""
        key = (namespace, pod, owner_kind, owner_name)
        switch = self._switches.get(key)
        if switch is None:
            switch = self._switches[key] = TapSwitch()
            self._aim(key, switch)
        return switch

    def _aim(self, key: tuple[str, str, str, str], switch: TapSwitch) -> None:
        switch.taps = [subscription for subscription in self._taps
                       if subscription.filter.target.matches(*key)]
        switch.on = bool(switch.taps)

    def _aim_all(self) -> None:
        for key, switch in list(self._switches.items()):
            self._aim(key, switch)

    def totals(self) -> tuple[int, int]:
        """(dropped, limited) over every tap ever opened."""
        return (self.dropped + sum(t.dropped for t in self._taps),
                self.limited + sum(t.limited for t in self._taps))

    def ready_for(self, switch: TapSwitch) -> list[Subscription]:
        """The taps of the pod (its switch) with room for one more event: the proxy builds an
        event only if there is one (a busy pod's requests over every tap's rate cost none)."""
        mine = switch.taps
        if not mine:
            return mine
        self.published += 1  # a finished request of a tapped pod
        now = self._clock()
        return [subscription for subscription in mine if subscription.ready(now)]

    def publish(self, fields: dict[str, Any], taps: list[Subscription] | None = None) -> None:
        """Offer one finished request to `taps` (default: every open tap)."""
        event: TapEvent | None = None
        now = self._clock()
        for subscription in self._taps if taps is None else taps:
            if subscription.filter.matches(fields):
                event = event or TapEvent(fields)
                subscription.offer(event, now)
        if event is not None and event.queued:
            event.line()  # serialised now, once: the taps' writers then only join bytes
