"""The gate in front of 15008's TLS handshake: which connection is refused, why, and when
the accept loops must wait. (Its token buckets are the issuer's: test_issuer_limits.py.)"""

from __future__ import annotations

from agent.core.limits import RATE_LIMITED, SOURCE_LIMIT, HandshakeGate, HandshakeLimits


def test_the_gate_refuses_a_source_over_its_share_of_handshakes_in_progress() -> None:
    gate = HandshakeGate(HandshakeLimits(total=100, per_source=2, rate=1000, burst=1000))
    assert [gate.admit("attacker", 0.0) for _ in range(3)] == [None, None, SOURCE_LIMIT]
    assert gate.admit("agent-on-node1", 0.0) is None  # others are not affected
    gate.done("attacker")
    assert gate.admit("attacker", 0.0) is None
    assert (gate.pending, gate.in_progress("attacker")) == (3, 2)


def test_the_gate_rates_each_source_and_a_refused_connection_counts_nothing() -> None:
    gate = HandshakeGate(HandshakeLimits(total=100, per_source=100, rate=2.0, burst=3))
    outcomes = []
    for _ in range(5):
        outcome = gate.admit("10.42.1.7", 0.0)
        outcomes.append(outcome)
        if outcome is None:
            gate.done("10.42.1.7")  # a finished handshake still spent its token
    assert outcomes == [None, None, None, RATE_LIMITED, RATE_LIMITED]
    assert gate.pending == 0
    assert gate.admit("10.42.1.7", 0.5) is None  # 2 a second


def test_the_gate_is_full_at_the_agent_cap_and_frees_as_handshakes_end() -> None:
    gate = HandshakeGate(HandshakeLimits(total=3, per_source=3, rate=100, burst=100))
    for source in ("a", "b", "c"):
        assert not gate.full
        assert gate.admit(source, 0.0) is None
    assert gate.full
    gate.done("b")
    assert not gate.full and gate.in_progress("b") == 0
