"""Admission limits for listeners untrusted peers reach: per-source token buckets (the
issuer's request rate, 15008's handshake rate) and the gate in front of the 15008 TLS
handshake. Pure decisions with an injected clock; the I/O
shell asks before it allocates anything for a connection and reports when it is done.

The gate answers, for a connection just accepted from `source`, either None (go ahead:
one pending handshake is now counted against the agent and the source) or the reason to
refuse it at once, before any TLS state exists:

- `source_limit`: this source already has `per_source` handshakes in progress;
- `rate_limited`: this source started more than `rate` handshakes a second (after a
  burst of `burst`), which is what keeps one client from spending the shared event
  loop's CPU on ECDSA signatures.

The agent-wide cap is not a refusal: while `pending == total` the shell stops accepting
(`full`), so the kernel's backlog, not the agent's memory, holds whoever waits.
Memory is bounded too: at most `max_sources` sources are remembered, the least recently
seen forgotten first.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

SOURCE_LIMIT: Final = "source_limit"
RATE_LIMITED: Final = "rate_limited"


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A token bucket per source: `burst` requests at once, then `per_second` on average.

    The default lets one node's agent sign a CSR for each of 200 pods restarting at once without
    waiting, and a further 100 pods within 20 s; an agent renews a handful of certificates an hour
    otherwise. A flood from one address costs one cheap refusal per request beyond that, and no
    TokenReview. `max_sources` bounds the memory: the least recently seen source is forgotten
    first (forgetting one only gives it a full bucket again, never less than it had).
    """

    burst: float = 200.0
    per_second: float = 5.0
    max_sources: int = 4096

    def __post_init__(self) -> None:
        if not (self.burst >= 1 and self.per_second > 0 and self.max_sources >= 1):
            raise ValueError(f"need burst >= 1, per_second > 0 and max_sources >= 1, got {self}")


@dataclass(frozen=True, slots=True)
class RateDecision:
    allowed: bool
    retry_after: int = 0  # whole seconds until one token is back (the Retry-After header); 0 if allowed


class SourceRateLimiter:
    """Token buckets keyed by source address, at most `max_sources` of them (least recently used out)."""

    def __init__(self, limit: RateLimit = RateLimit()) -> None:
        self.limit = limit
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # source -> (tokens, at)

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, source: str, now: float) -> RateDecision:
        """Spend one token of `source`'s bucket at time `now` (monotonic seconds), if it has one."""
        tokens, then = self._buckets.pop(source, (self.limit.burst, now))
        tokens = min(self.limit.burst, tokens + max(0.0, now - then) * self.limit.per_second)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[source] = (tokens, now)  # now the most recently used
        while len(self._buckets) > self.limit.max_sources:
            self._buckets.popitem(last=False)
        if allowed:
            return RateDecision(True)
        return RateDecision(False, max(1, math.ceil((1.0 - tokens) / self.limit.per_second)))


@dataclass(frozen=True, slots=True)
class HandshakeLimits:
    total: int = 64  # handshakes in progress on the whole agent: beyond, stop accepting
    per_source: int = 8  # in progress from one address: a peer agent needs one per pod pair
    rate: float = 20.0  # new handshakes a second from one address (sustained)...
    burst: float = 64.0  # ...after this many at once (a node's pods re-dialling after a restart)
    max_sources: int = 4096


class HandshakeGate:
    """Counts handshakes in progress, in total and per source, and rates them per source."""

    __slots__ = ("_by_source", "_rate", "limits", "pending")

    def __init__(self, limits: HandshakeLimits = HandshakeLimits()) -> None:
        self.limits = limits
        self.pending = 0
        self._by_source: dict[str, int] = {}
        self._rate = SourceRateLimiter(RateLimit(limits.burst, limits.rate, limits.max_sources))

    @property
    def full(self) -> bool:
        """Stop accepting: the agent has `total` handshakes in progress."""
        return self.pending >= self.limits.total

    def admit(self, source: str, now: float) -> str | None:
        """None: start the handshake (call `done` when it ends); else why it is refused."""
        if self._by_source.get(source, 0) >= self.limits.per_source:
            return SOURCE_LIMIT
        if not self._rate.take(source, now).allowed:
            return RATE_LIMITED
        self._by_source[source] = self._by_source.get(source, 0) + 1
        self.pending += 1
        return None

    def done(self, source: str) -> None:
        """The handshake admitted for `source` ended, whichever way."""
        left = self._by_source[source] - 1
        if left:
            self._by_source[source] = left
        else:
            del self._by_source[source]
        self.pending -= 1

    def in_progress(self, source: str) -> int:
        return self._by_source.get(source, 0)
