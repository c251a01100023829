"""The gate in front of 15008's TLS handshake: which connection is refused, why, and when
the accept loops must wait. (Its token buckets are the issuer's: test_issuer_limits.py.)"""

from __future__ import annotations

from agent.core.limits import OVER_CAPACITY, RATE_LIMITED, SOURCE_LIMIT, HandshakeGate, HandshakeLimits


def gate(**limits: float) -> HandshakeGate:
    defaults = {"connections": 100, "per_source": 100, "tls": 100, "tls_per_source": 100,
                "rate": 1000.0, "burst": 1000.0}
    return HandshakeGate(HandshakeLimits(**{**defaults, **limits}))  # type: ignore[arg-type]


def test_silent_connections_are_capped_per_source_and_per_agent_and_others_still_get_in() -> None:
    limited = gate(connections=5, per_source=2)
    assert [limited.admit("attacker", 0.0) for _ in range(3)] == [None, None, SOURCE_LIMIT]
    assert [limited.admit(f"10.42.0.{n}", 0.0) for n in range(4)] == [None, None, None, OVER_CAPACITY]
    limited.done("attacker", in_tls=False)
    assert limited.admit("agent-on-node1", 0.0) is None  # a slot freed: the next comer, whoever
    assert (limited.pending, limited.tls, limited.in_progress("attacker")) == (5, 0, 1)


def test_tls_is_rated_per_source_and_a_refusal_holds_nothing() -> None:
    limited, source = gate(tls_per_source=2, rate=2.0, burst=3), "10.42.1.7"
    outcomes = []
    for _ in range(4):  # one after the other, each finished before the next
        outcome = limited.admit(source, 0.0)
        if outcome is None:
            outcome = limited.start_tls(source, 0.0)
            limited.done(source, in_tls=outcome is None)
        outcomes.append(outcome)
    assert outcomes == [None, None, None, RATE_LIMITED]  # the 4th at accept: no task, no wait
    # two accepted on the one token of t=0.5: the first to speak spends it
    assert limited.admit(source, 0.5) is None and limited.admit(source, 0.5) is None
    assert limited.start_tls(source, 0.5) is None and limited.start_tls(source, 0.5) == RATE_LIMITED
    limited.done(source, in_tls=False)
    # a third at once in TLS is not refused: it waits for one of its source's slots (the shell)
    assert limited.admit(source, 1.0) is None and limited.start_tls(source, 1.0) is None
    assert limited.admit(source, 10.0) is None and limited.start_tls(source, 10.0) is None
    assert (limited.pending, limited.tls) == (3, 3)


def test_every_count_returns_to_zero_and_sources_are_forgotten() -> None:
    limited = gate()
    for index in range(1000):
        source = f"10.{index // 256}.{index % 256}.9"
        assert limited.admit(source, 0.0) is None
        in_tls = index % 2 == 0 and limited.start_tls(source, 0.0) is None
        limited.done(source, in_tls)
    assert (limited.pending, limited.tls) == (0, 0)
    assert limited._accepted == {}
