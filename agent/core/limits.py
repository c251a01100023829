"""Admission limits for listeners untrusted peers reach: per-source token buckets (the
issuer's request rate, 15008's handshake rate) and the gate in front of the 15008 TLS
handshake. Pure decisions with an injected clock; the I/O shell asks before it allocates
anything for a connection and reports when it is done.

A connection to 15008 goes through two stages before it is a tunnel session:

1. *accepted*, waiting for its first byte: it holds an fd and a future, nothing more.
   `admit` refuses it at once (an RST) when the agent already holds `connections` such
   connections (`over_capacity`), or its source `per_source` (`source_limit`), or its
   source has no handshake left to start for now (`rate_limited`, see 2). The accept
   loop never stops: a full kernel backlog would drop every agent's SYNs, not only the
   attacker's.
2. *in TLS*, once it has said something: the costly stage (buffers, an SSL object, an ECDSA
   signature). `start_tls` refuses it when its source started more than `rate` handshakes a
   second after a burst of `burst` (`rate_limited`: one client cannot spend the shared event
   loop's CPU). At most `tls_per_source` of one source's connections are in TLS at once
   (more wait for one of its own slots: a client pod dialling many pods of this node at
   once is served in turn, never refused), and at most `tls`
   connections are in TLS on the whole agent: the shell waits for a slot, within the
   handshake deadline.

Memory is bounded: sources are remembered only while they hold a connection, and at most
`max_sources` token buckets, the least recently seen forgotten first.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

SOURCE_LIMIT: Final = "source_limit"
RATE_LIMITED: Final = "rate_limited"
OVER_CAPACITY: Final = "over_capacity"


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

    def has_token(self, source: str, now: float) -> bool:
        """Whether `take` would allow `source` now (nothing is spent or remembered)."""
        tokens, then = self._buckets.get(source, (self.limit.burst, now))
        return min(self.limit.burst, tokens + max(0.0, now - then) * self.limit.per_second) >= 1.0

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
    connections: int = 1024  # accepted, handshake not done, on the whole agent: beyond, RST
    per_source: int = 16  # of those from one address
    tls: int = 64  # of those in TLS on the whole agent: beyond, wait for a slot
    tls_per_source: int = 4  # of those from one address (more wait): it cannot take every slot
    rate: float = 20.0  # TLS handshakes a second from one address (sustained)...
    burst: float = 64.0  # ...after this many at once (a node's pods re-dialling after a restart)
    max_sources: int = 4096


class HandshakeGate:
    """Counts connections before their handshake, in total and per source, and those in TLS;
    rates TLS per source. (One source's share of the TLS slots is the shell's SourceSlots.)"""

    __slots__ = ("_accepted", "_rate", "limits", "pending", "tls")

    def __init__(self, limits: HandshakeLimits = HandshakeLimits()) -> None:
        self.limits = limits
        self.pending = 0  # accepted, handshake not finished (both stages)
        self.tls = 0  # of those, in TLS
        self._accepted: dict[str, int] = {}
        self._rate = SourceRateLimiter(RateLimit(limits.burst, limits.rate, limits.max_sources))

    def admit(self, source: str, now: float) -> str | None:
        """A connection just accepted: None to keep it (call `done` when it ends), else why not.
        A source whose bucket is empty now is refused here already: its flood then costs an
        accept and a close each, not a task and a wait for its ClientHello."""
        if self.pending >= self.limits.connections:
            return OVER_CAPACITY
        if self._accepted.get(source, 0) >= self.limits.per_source:
            return SOURCE_LIMIT
        if not self._rate.has_token(source, now):
            return RATE_LIMITED
        _bump(self._accepted, source, 1)
        self.pending += 1
        return None

    def start_tls(self, source: str, now: float) -> str | None:
        """It said something: None to start TLS on it (once slots are free), else why not."""
        if not self._rate.take(source, now).allowed:
            return RATE_LIMITED
        self.tls += 1
        return None

    def done(self, source: str, in_tls: bool) -> None:
        """The connection admitted for `source` finished its handshake or failed."""
        _bump(self._accepted, source, -1)
        self.pending -= 1
        if in_tls:
            self.tls -= 1

    def in_progress(self, source: str) -> int:
        """Connections from `source` before their handshake now."""
        return self._accepted.get(source, 0)


def _bump(counts: dict[str, int], key: str, delta: int) -> None:
    value = counts.get(key, 0) + delta
    if value:
        counts[key] = value
    else:
        del counts[key]
