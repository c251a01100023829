"""The issuer's load decisions, sans-IO: how many connections it holds (how often one source may
ask is `agent.core.limits.SourceRateLimiter`, shared with the data plane).

Nothing here touches a socket or reads a clock: the listener (listener.py) and the HTTPS shell
(issuer_server.py) pass the time and the counts in, so every decision has a table test.
"""

from __future__ import annotations

from dataclasses import dataclass

# A refusal or timeout, by stage: the `reason` label of pinion_issuer_connections_refused_total.
REFUSAL_REASONS = ("too_many_connections", "too_many_from_source", "too_many_handshakes", "silent",
                   "handshake_timeout", "handshake_failed", "read_timeout")


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    """What one listener may hold at once, and for how long.

    `max_connections` counts every accepted socket, whatever its stage. Until a client sends its
    first byte the listener holds only the socket and one waiting task (a few KiB), so the cap can
    be generous; `max_tls` bounds the connections that hold TLS state (asyncio allocates a 256 KiB
    read buffer per TLS connection: that, not the socket, is what 400 idle connections cost before).
    `handshake_timeout` runs from accept to a finished handshake, waiting for a TLS slot included;
    `read_timeout` from there to a complete request. One source address holds at most
    `max_per_source` connections and `max_tls_per_source` TLS slots (more of its connections
    wait for one of its own slots): one client cannot take the slots every agent needs.
    """

    max_connections: int = 1024
    max_tls: int = 64
    max_per_source: int = 64  # an agent asks for a node's pods: a few at once, never hundreds
    max_tls_per_source: int = 8
    handshake_timeout: float = 5.0  # agents are in the same cluster: a handshake takes milliseconds
    read_timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.max_connections < 1 or not 1 <= self.max_tls <= self.max_connections:
            raise ValueError("need 1 <= max_tls <= max_connections, "
                             f"got {self.max_tls}/{self.max_connections}")
        if self.max_per_source < 1 or self.max_tls_per_source < 1:
            raise ValueError("per-source limits must be at least 1")
        if self.handshake_timeout <= 0 or self.read_timeout <= 0:
            raise ValueError("timeouts must be positive")


def admit_connection(held: int, limits: ListenerLimits, held_by_source: int = 0) -> str | None:
    """None to accept one more socket while `held` are open (`held_by_source` of them from its
    source address); else the refusal's reason.

    Over the cap the socket is accepted and reset at once, before any TLS state exists: the accept
    loop keeps draining the kernel's queue (a full backlog would stall every agent's SYN for
    seconds, attacker and agent alike), each refusal is counted, and the agent's retry finds a slot
    as soon as the deadlines below free one.
    """
    if held >= limits.max_connections:
        return "too_many_connections"
    return "too_many_from_source" if held_by_source >= limits.max_per_source else None
