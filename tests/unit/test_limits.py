"""The gate in front of 15008's TLS handshake and the token buckets behind it: which
connection is refused, why, and that nothing it remembers grows without bound."""

from __future__ import annotations

import pytest

from agent.core.limits import RATE_LIMITED, SOURCE_LIMIT, HandshakeGate, HandshakeLimits, TokenBuckets


@pytest.mark.parametrize(("rate", "burst", "takes", "expected"), [
    pytest.param(10.0, 3, [0.0, 0.0, 0.0, 0.0], [True, True, True, False], id="a-burst-then-empty"),
    pytest.param(10.0, 3, [0.0] * 3 + [0.05, 0.1], [True] * 3 + [False, True], id="refills-at-the-rate"),
    pytest.param(1.0, 2, [0.0, 0.0, 100.0, 100.0, 100.0], [True, True, True, True, False],
                 id="never-above-the-burst"),
])
def test_a_bucket_spends_a_burst_then_refills_at_its_rate(rate: float, burst: float,
                                                          takes: list[float], expected: list[bool]) -> None:
    buckets = TokenBuckets(rate, burst)
    assert [buckets.take("10.42.1.7", now) for now in takes] == expected


def test_each_source_has_its_own_bucket_and_a_refusal_spends_nothing() -> None:
    buckets = TokenBuckets(rate=1.0, burst=1)
    assert buckets.take("a", 0.0) and not buckets.take("a", 0.0) and not buckets.take("a", 0.5)
    assert buckets.take("b", 0.5)
    assert buckets.retry_after("a", 0.5) == pytest.approx(0.5)
    assert buckets.take("a", 1.0)  # the refusals at 0.0 and 0.5 did not push it further out


def test_a_flood_of_sources_is_remembered_within_bounds() -> None:
    buckets = TokenBuckets(rate=1.0, burst=2, max_keys=100)
    for index in range(10_000):  # every address of a /16, say, each once
        assert buckets.take(f"10.{index // 256}.{index % 256}.1", index * 0.001)
    assert len(buckets) <= 100
    busy = TokenBuckets(rate=1.0, burst=2, max_keys=2)
    busy.take("a", 0.0)
    busy.take("b", 0.0)
    busy.take("c", 0.0)  # both busy: the oldest is forgotten (and starts again full)
    assert len(busy) == 2 and busy.tokens("a", 0.0) == 2 and busy.tokens("b", 0.0) == 1


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
