"""Per-pod TCP counters: every connection is opened once and closed exactly once, and a
removed pod's series go away after the grace period (and only its series)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from agent.core.telemetry import HttpLabels, PeerLabels, TcpCounters, TcpLabels, Telemetry

GRACE = 300.0
WEB_IN = TcpLabels("inbound", "default", "web")
WEB_OUT = TcpLabels("outbound", "default", "web")
DB_IN = TcpLabels("inbound", "default", "db")


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_telemetry() -> tuple[Telemetry, FakeClock]:
    clock = FakeClock()
    return Telemetry(clock, GRACE), clock


def counters_of(telemetry: Telemetry) -> dict[TcpLabels, TcpCounters]:
    return dict(telemetry.series())


# ---------------------------------------------------------------- one connection


def test_a_connection_counts_as_opened_and_open_until_it_closes() -> None:
    telemetry, _ = make_telemetry()

    connection = telemetry.open(WEB_IN)

    counters = counters_of(telemetry)[WEB_IN]
    assert (counters.open_total, counters.open_connections) == (1, 1)
    assert not connection.closed


def test_closing_twice_counts_once_and_the_second_close_says_so() -> None:
    telemetry, _ = make_telemetry()
    connection = telemetry.open(WEB_IN)

    assert connection.close(failed=True) is True
    assert connection.close(failed=False) is False  # e.g. an abort racing a normal close

    counters = counters_of(telemetry)[WEB_IN]
    assert connection.closed
    assert (counters.open_total, counters.open_connections) == (1, 0)
    assert (counters.close_success, counters.close_failure) == (0, 1)


def test_bytes_accumulate_in_each_direction() -> None:
    telemetry, _ = make_telemetry()
    connection = telemetry.open(WEB_IN)

    connection.read(10)
    connection.read(5)
    connection.wrote(20)
    connection.close(failed=False)

    counters = counters_of(telemetry)[WEB_IN]
    assert (counters.read_bytes, counters.write_bytes) == (15, 20)
    assert (counters.close_success, counters.close_failure) == (1, 0)


def test_connections_with_the_same_labels_share_a_series_and_balance() -> None:
    telemetry, _ = make_telemetry()
    first, second, third = (telemetry.open(WEB_IN) for _ in range(3))

    first.close(failed=False)
    second.close(failed=True)

    counters = counters_of(telemetry)[WEB_IN]
    assert len(telemetry) == 1
    assert (counters.open_total, counters.open_connections) == (3, 1)
    third.close(failed=False)
    assert counters.open_connections == 0
    assert counters.close_success + counters.close_failure == counters.open_total


def test_inbound_and_outbound_are_separate_series() -> None:
    telemetry, _ = make_telemetry()

    telemetry.open(WEB_IN).read(1)
    telemetry.open(WEB_OUT).read(2)

    series = counters_of(telemetry)
    assert (series[WEB_IN].read_bytes, series[WEB_OUT].read_bytes) == (1, 2)


# ---------------------------------------------------------------- pods coming and going


def test_a_removed_pod_keeps_its_series_through_the_grace_period() -> None:
    telemetry, clock = make_telemetry()
    telemetry.open(WEB_IN).close(failed=False)

    telemetry.pod_removed("default", "web")
    clock.advance(GRACE - 1)

    assert telemetry.expire() == 0
    assert WEB_IN in counters_of(telemetry)


def test_after_the_grace_period_only_the_removed_pods_series_go() -> None:
    telemetry, clock = make_telemetry()
    for labels in (WEB_IN, WEB_OUT, DB_IN):
        telemetry.open(labels)

    telemetry.pod_removed("default", "web")
    clock.advance(GRACE)

    assert telemetry.expire() == 2
    assert set(counters_of(telemetry)) == {DB_IN}
    assert telemetry.expire() == 0  # nothing left due


def test_a_pod_of_the_same_name_in_another_namespace_is_not_expired() -> None:
    telemetry, clock = make_telemetry()
    other_web = TcpLabels("inbound", "shop", "web")
    telemetry.open(WEB_IN)
    telemetry.open(other_web)

    telemetry.pod_removed("default", "web")
    clock.advance(GRACE + 1)
    telemetry.expire()

    assert set(counters_of(telemetry)) == {other_web}


def test_a_pod_added_again_before_the_grace_period_ends_keeps_its_series() -> None:
    telemetry, clock = make_telemetry()
    telemetry.open(WEB_IN).close(failed=False)

    telemetry.pod_removed("default", "web")
    clock.advance(GRACE / 2)
    telemetry.pod_added("default", "web")  # e.g. a new sandbox of the same pod
    clock.advance(GRACE * 10)

    assert telemetry.expire() == 0
    assert counters_of(telemetry)[WEB_IN].open_total == 1


def test_a_pod_added_again_after_expiry_starts_from_zero() -> None:
    telemetry, clock = make_telemetry()
    telemetry.open(WEB_IN).close(failed=False)
    telemetry.pod_removed("default", "web")
    clock.advance(GRACE)
    telemetry.expire()

    telemetry.pod_added("default", "web")
    telemetry.open(WEB_IN)

    assert counters_of(telemetry)[WEB_IN].open_total == 1


# ---------------------------------------------------------------- any sequence of events

PODS = ("web", "db", "cache")


@dataclass(frozen=True)
class Open:
    labels: TcpLabels


@dataclass(frozen=True)
class Read:
    connection: int
    nbytes: int


@dataclass(frozen=True)
class Wrote:
    connection: int
    nbytes: int


@dataclass(frozen=True)
class Close:
    connection: int
    failed: bool


labels_strategy = st.builds(TcpLabels, direction=st.sampled_from(["inbound", "outbound"]),
                            namespace=st.just("default"), pod=st.sampled_from(PODS))
index = st.integers(min_value=0, max_value=50)
nbytes = st.integers(min_value=0, max_value=1 << 20)
operations = st.lists(st.one_of(
    st.builds(Open, labels_strategy),
    st.builds(Read, index, nbytes),
    st.builds(Wrote, index, nbytes),
    st.builds(Close, index, st.booleans()),
), max_size=80)


@given(operations)
def test_any_sequence_of_events_balances_and_expires_to_nothing(
        ops: list[Open | Read | Wrote | Close]) -> None:
    telemetry, clock = make_telemetry()
    connections = []
    opened = closed = failed = read = written = 0
    for op in ops:
        if isinstance(op, Open):
            connections.append(telemetry.open(op.labels))
            opened += 1
        elif not connections:
            continue
        elif isinstance(op, Read):
            connections[op.connection % len(connections)].read(op.nbytes)
            read += op.nbytes
        elif isinstance(op, Wrote):
            connections[op.connection % len(connections)].wrote(op.nbytes)
            written += op.nbytes
        elif connections[op.connection % len(connections)].close(op.failed):
            closed += 1
            failed += op.failed

    all_counters = [counters for _, counters in telemetry.series()]
    assert sum(c.open_total for c in all_counters) == opened
    assert sum(c.open_connections for c in all_counters) == opened - closed
    assert sum(c.close_failure for c in all_counters) == failed
    assert sum(c.close_success for c in all_counters) == closed - failed
    assert sum(c.read_bytes for c in all_counters) == read
    assert sum(c.write_bytes for c in all_counters) == written
    assert all(c.open_connections >= 0 for c in all_counters)

    for pod in PODS:
        telemetry.pod_removed("default", pod)
    clock.advance(GRACE + 0.001)
    telemetry.expire()
    assert len(telemetry) == 0


def test_label_sets_hashed_once_are_still_keys_by_value() -> None:
    """Label sets carry their hash from when they are made (they are dict keys several times
    per new connection): equal ones are one key, a replaced field makes another."""
    peer = PeerLabels(tls="true", client_id="spiffe://cluster.local/ns/a/sa/b")
    twin = PeerLabels(tls="true", client_id="spiffe://cluster.local/ns/a/sa/b")
    series = {TcpLabels("inbound", "shop", "web", peer): 1, HttpLabels("inbound", "shop", "web", peer): 2}

    assert twin == peer and hash(twin) == hash(peer) and twin is not peer
    assert series[TcpLabels("inbound", "shop", "web", twin)] == 1
    assert series[HttpLabels("inbound", "shop", "web", twin)] == 2
    other = dataclasses.replace(HttpLabels("inbound", "shop", "web", twin), authority="web.shop")
    assert other not in series and hash(other) != hash(HttpLabels("inbound", "shop", "web", twin))
    assert "_hash" not in repr(peer)
