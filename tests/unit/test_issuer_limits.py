"""The issuer's load decisions as tables: a source's token bucket over time, the bound on the sources
it remembers, the connection cap, and limits that make no sense are refused."""

from __future__ import annotations

import pytest

from agent.controlplane.issuer.limits import ListenerLimits, admit_connection
from agent.core.limits import RateDecision, RateLimit, SourceRateLimiter

A, B = "10.0.0.1", "10.0.0.2"


@pytest.mark.parametrize(("limit", "requests", "expected"), [
    # (source, time) -> decision; a burst of 3 refilled at 1/s
    (RateLimit(burst=3, per_second=1), [(A, 0), (A, 0), (A, 0)], [RateDecision(True)] * 3),
    (RateLimit(burst=3, per_second=1), [(A, 0)] * 4, [RateDecision(True)] * 3 + [RateDecision(False, 1)]),
    # one token back after a second, not before
    (RateLimit(burst=3, per_second=1), [(A, 0)] * 3 + [(A, 0.5), (A, 1.0)],
     [RateDecision(True)] * 3 + [RateDecision(False, 1), RateDecision(True)]),
    # a slow refill: Retry-After says how long, rounded up to whole seconds
    (RateLimit(burst=1, per_second=0.25), [(A, 0), (A, 0), (A, 1)],
     [RateDecision(True), RateDecision(False, 4), RateDecision(False, 3)]),
    # sources do not share a bucket
    (RateLimit(burst=1, per_second=1), [(A, 0), (A, 0), (B, 0)],
     [RateDecision(True), RateDecision(False, 1), RateDecision(True)]),
    # a long pause refills only up to the burst
    (RateLimit(burst=2, per_second=1), [(A, 0), (A, 0), (A, 1000), (A, 1000), (A, 1000)],
     [RateDecision(True)] * 4 + [RateDecision(False, 1)]),
    # a clock that steps back (it should not, it is monotonic) adds nothing
    (RateLimit(burst=1, per_second=1), [(A, 10), (A, 5)], [RateDecision(True), RateDecision(False, 1)]),
])
def test_token_bucket_per_source(limit: RateLimit, requests: list[tuple[str, float]],
                                 expected: list[RateDecision]) -> None:
    limiter = SourceRateLimiter(limit)

    assert [limiter.take(source, now) for source, now in requests] == expected


def test_the_default_lets_200_pods_on_one_node_start_at_once_and_100_more_within_20_seconds() -> None:
    limiter = SourceRateLimiter()

    assert all(limiter.take(A, 0).allowed for _ in range(200))
    assert not limiter.take(A, 0).allowed
    assert sum(limiter.take(A, 20.0).allowed for _ in range(101)) == 100


def test_a_spoofed_flood_of_sources_is_remembered_only_up_to_max_sources() -> None:
    limiter = SourceRateLimiter(RateLimit(burst=1, per_second=0.01, max_sources=100))
    limiter.take(A, 0)
    assert not limiter.take(A, 0).allowed

    for number in range(10_000):
        limiter.take(f"192.0.2.{number}", 1)

    assert len(limiter) == 100
    assert limiter.take(A, 2).allowed  # forgotten: a full bucket again, never less


def test_the_least_recently_seen_source_is_forgotten_first() -> None:
    limiter = SourceRateLimiter(RateLimit(burst=1, per_second=0.01, max_sources=2))
    limiter.take(A, 0)
    limiter.take(B, 0)
    limiter.take(A, 1)  # A is now the most recent
    limiter.take("10.0.0.3", 2)  # B goes

    assert not limiter.take(A, 3).allowed
    assert limiter.take(B, 3).allowed


@pytest.mark.parametrize(("held", "limits", "expected"), [
    (0, ListenerLimits(max_connections=2, max_tls=1), None),
    (1, ListenerLimits(max_connections=2, max_tls=1), None),
    (2, ListenerLimits(max_connections=2, max_tls=1), "too_many_connections"),
    (5000, ListenerLimits(), "too_many_connections"),
    (1023, ListenerLimits(), None),
])
def test_connections_over_the_cap_are_refused(held: int, limits: ListenerLimits,
                                              expected: str | None) -> None:
    assert admit_connection(held, limits) == expected


@pytest.mark.parametrize("arguments", [
    {"max_connections": 0}, {"max_tls": 0}, {"max_connections": 4, "max_tls": 5},
    {"handshake_timeout": 0}, {"read_timeout": -1},
])
def test_listener_limits_that_make_no_sense_are_refused(arguments: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ListenerLimits(**arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize("arguments", [{"burst": 0.5}, {"per_second": 0}, {"max_sources": 0}])
def test_rate_limits_that_make_no_sense_are_refused(arguments: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RateLimit(**arguments)  # type: ignore[arg-type]
