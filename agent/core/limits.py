"""Admission limits for listeners untrusted peers reach: per-source token buckets and the
gate in front of the 15008 TLS handshake. Pure decisions with an injected clock; the I/O
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
Memory is bounded too: at most `max_sources` sources are remembered; a full table
forgets the sources whose buckets have refilled (they are indistinguishable from new
ones), then, if all are busy, the oldest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

SOURCE_LIMIT: Final = "source_limit"
RATE_LIMITED: Final = "rate_limited"


class TokenBuckets:
    """One token bucket per key (a client address), `rate` tokens a second up to `burst`."""

    __slots__ = ("_buckets", "burst", "max_keys", "rate")

    def __init__(self, rate: float, burst: float, max_keys: int = 4096) -> None:
        if rate <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate must be > 0, burst >= 1, max_keys >= 1")
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at), oldest first

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, now: float) -> bool:
        """Spend one token of `key`'s bucket; False when it is empty (nothing is spent)."""
        tokens = self.tokens(key, now)
        if tokens < 1:
            return False
        self._buckets.pop(key, None)
        if len(self._buckets) >= self.max_keys:
            self._forget(now)
        self._buckets[key] = (tokens - 1, now)
        return True

    def tokens(self, key: str, now: float) -> float:
        tokens, at = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + max(0.0, now - at) * self.rate)

    def retry_after(self, key: str, now: float) -> float:
        """Seconds until `key` has a token again (0 if it has one now)."""
        return max(0.0, (1 - self.tokens(key, now)) / self.rate)

    def _forget(self, now: float) -> None:
        full = [key for key, (tokens, at) in self._buckets.items()
                if tokens + (now - at) * self.rate >= self.burst]
        for key in full:
            del self._buckets[key]
        if len(self._buckets) >= self.max_keys:  # every one is busy: the oldest goes
            del self._buckets[next(iter(self._buckets))]


@dataclass(frozen=True, slots=True)
class HandshakeLimits:
    total: int = 64  # handshakes in progress on the whole agent: beyond, stop accepting
    per_source: int = 8  # in progress from one address: a peer agent needs one per pod pair
    rate: float = 20.0  # new handshakes a second from one address (sustained)...
    burst: float = 64.0  # ...after this many at once (a node's pods re-dialling after a restart)
    max_sources: int = 4096


class HandshakeGate:
    """Counts handshakes in progress, in total and per source, and rates them per source."""

    __slots__ = ("_buckets", "_by_source", "limits", "pending")

    def __init__(self, limits: HandshakeLimits = HandshakeLimits()) -> None:
        self.limits = limits
        self.pending = 0
        self._by_source: dict[str, int] = {}
        self._buckets = TokenBuckets(limits.rate, limits.burst, limits.max_sources)

    @property
    def full(self) -> bool:
        """Stop accepting: the agent has `total` handshakes in progress."""
        return self.pending >= self.limits.total

    def admit(self, source: str, now: float) -> str | None:
        """None: start the handshake (call `done` when it ends); else why it is refused."""
        if self._by_source.get(source, 0) >= self.limits.per_source:
            return SOURCE_LIMIT
        if not self._buckets.take(source, now):
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
