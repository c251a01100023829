"""The issuer's load decisions, sans-IO: how many connections it holds, and how often one source may ask.

Nothing here touches a socket or reads a clock: the listener (listener.py) and the HTTPS shell
(issuer_server.py) pass the time and the counts in, so every decision has a table test.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

# A refusal or timeout, by stage: the `reason` label of pinion_issuer_connections_refused_total.
REFUSAL_REASONS = ("too_many_connections", "too_many_handshakes", "silent", "handshake_timeout",
                   "handshake_failed", "read_timeout")


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    """What one listener may hold at once, and for how long.

    `max_connections` counts every accepted socket, whatever its stage. Until a client sends its
    first byte the listener holds only the socket and one waiting task (a few KiB), so the cap can
    be generous; `max_tls` bounds the connections that hold TLS state (asyncio allocates a 256 KiB
    read buffer per TLS connection: that, not the socket, is what 400 idle connections cost before).
    `handshake_timeout` runs from accept to a finished handshake, waiting for a TLS slot included;
    `read_timeout` from there to a complete request.
    """

    max_connections: int = 1024
    max_tls: int = 64
    handshake_timeout: float = 5.0  # agents are in the same cluster: a handshake takes milliseconds
    read_timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.max_connections < 1 or not 1 <= self.max_tls <= self.max_connections:
            raise ValueError("need 1 <= max_tls <= max_connections, "
                             f"got {self.max_tls}/{self.max_connections}")
        if self.handshake_timeout <= 0 or self.read_timeout <= 0:
            raise ValueError("timeouts must be positive")


def admit_connection(held: int, limits: ListenerLimits) -> str | None:
    """None to accept one more socket while `held` are open; else the refusal's reason.

    Over the cap the socket is accepted and reset at once, before any TLS state exists: the accept
    loop keeps draining the kernel's queue (a full backlog would stall every agent's SYN for
    seconds, attacker and agent alike), each refusal is counted, and the agent's retry finds a slot
    as soon as the deadlines below free one.
    """
    return "too_many_connections" if held >= limits.max_connections else None


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
