"""The compiled counters (mypyc, agent/core/compiled.py) behave exactly as their Python source:
the same random sequence of connections, bytes, closes and finished requests over many label
sets, counted by each build through its own Telemetry, gives the same scrape. And the point of
compiling them: a burst of requests into series that exist allocates nothing that outlives
it on the compiled build (a counter updated mid-burst leaves no new int or float behind to
pin an allocator arena, issue #21), where the Python build leaves objects in every series."""

from __future__ import annotations

import os
import tracemalloc
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.core import compiled
from agent.core.accounting import Record
from agent.observability.exposition import CollectorRegistry, generate_latest

from .counters_builds import Build, process_build, python_build

if not os.environ.get("CI") and not compiled.is_compiled(process_build().counters):
    pytest.skip("the counters are not compiled here (pip install -e . builds them)",
                allow_module_level=True)

COMPILED = process_build()
PYTHON = python_build()
EXAMPLES = int(os.environ.get("PINION_DIFF_EXAMPLES", "300"))


def test_the_builds_compared_are_the_compiled_one_and_the_python_one() -> None:
    assert compiled.is_compiled(COMPILED.counters) and not compiled.is_compiled(PYTHON.counters)
    assert PYTHON.telemetry.HttpCounters is PYTHON.counters.HttpCounters
    assert COMPILED.telemetry.HttpCounters is COMPILED.counters.HttpCounters
    assert PYTHON.counters.HttpCounters is not COMPILED.counters.HttpCounters


def scrape(build: Build, telemetry: Any) -> str:
    registry = CollectorRegistry()
    registry.register(build.metrics.TcpCollector(telemetry))
    return generate_latest(registry).decode()


PODS = ("web", "db", "api")
PEERS = ("", "spiffe://cluster.local/ns/default/sa/a", "spiffe://cluster.local/ns/default/sa/b")
series = st.tuples(st.sampled_from(["inbound", "outbound"]), st.sampled_from(PODS),
                   st.sampled_from(PEERS), st.sampled_from(["", "", "web:80", "db.svc:5432"]))
operations = st.lists(st.one_of(
    st.tuples(st.just("open"), series),
    st.tuples(st.just("read"), st.integers(0, 9), st.integers(0, 2**40)),
    st.tuples(st.just("wrote"), st.integers(0, 9), st.integers(0, 70000)),
    st.tuples(st.just("close"), st.integers(0, 9), st.booleans(),
              st.sampled_from(["", "ECONNRESET", "EPIPE", "ETIMEDOUT"])),
    st.tuples(st.just("started"), series, st.integers(0, 3)),
    st.tuples(st.just("finished"), series, st.sampled_from(["success", "failure"]),
              st.one_of(st.none(), st.sampled_from([200, 200, 204, 404, 503, 99, 600]),
                        st.integers(-5, 1000)),
              st.one_of(st.none(), st.sampled_from([0, 0, 2, 14, 17, -1]), st.integers(-3, 300)),
              st.one_of(st.none(), st.sampled_from([0.2, 0.2, 1.0, 3.5, 50000.0, 70000.0]),
                        st.floats(0, 1e6, allow_nan=False))),
    st.tuples(st.just("elsewhere"), series, st.integers(0, 5), st.integers(0, 5), st.integers(0, 2**33)),
), max_size=120)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=operations)
def test_the_same_traffic_gives_the_same_scrape_on_both_builds(steps: list[tuple[Any, ...]]) -> None:
    ends = []
    for build in (COMPILED, PYTHON):
        telemetry = build.telemetry.Telemetry(lambda: 0.0, 60.0)
        ends.append((build, telemetry, list[Any]()))
    for index, step in enumerate(steps):
        for build, telemetry, records in ends:
            labels = build.telemetry
            name, *args = step
            if name in ("open", "started", "finished", "elsewhere"):
                direction, pod, peer, authority = args[0]
                peer_labels = labels.PeerLabels(tls="true" if peer else "no_identity", client_id=peer)
                tcp = labels.TcpLabels(direction, "default", pod, peer_labels)
                http = labels.HttpLabels(direction, "default", pod, peer_labels, authority=authority)
            if name == "open":
                records.append(telemetry.open(tcp))
            elif name in ("read", "wrote", "close") and records:
                record = records[args[0] % len(records)]
                if name == "read":
                    record.read(args[1])
                elif name == "wrote":
                    record.wrote(args[1])
                else:
                    record.close(args[1], args[2])
            elif name == "started":
                telemetry.http(http).requests += args[1]
            elif name == "finished":
                telemetry.http(http).record(Record(*args[1:]))
            elif name == "elsewhere":
                opened, closed, nbytes = args[1:]
                telemetry.counted_elsewhere(tcp, opened + closed, closed, nbytes, nbytes // 3)
        if index % 10 == 9 or index == len(steps) - 1:
            first, second = (scrape(build, telemetry) for build, telemetry, _ in ends)
            assert first == second


def burst(build: Build, labels_count: int, requests: int) -> int:
    """Blocks allocated while `requests` requests (a connection each: opened, bytes both ways,
    closed; a request started and finished, a round over the series of successes, a round
    of failures) were counted into `labels_count` series that already exist, and still alive
    after it."""
    telemetry = build.telemetry.Telemetry(lambda: 0.0, 60.0)
    module = build.telemetry
    tcp = [module.TcpLabels("inbound", "default", f"pod-{index}") for index in range(labels_count)]
    http = [module.HttpLabels("inbound", "default", f"pod-{index}") for index in range(labels_count)]
    ok = [Record("success", 200, None, 0.4 + (index % 7)) for index in range(16)]
    failed = Record("failure", 503, None, 12.0)

    def count(index: int) -> None:
        record = telemetry.open(tcp[index % labels_count])
        record.read(41)
        record.wrote(1350)
        record.close(False)
        counters = telemetry.http(http[index % labels_count])
        counters.requests += 1
        counters.record(failed if index // labels_count % 2 else ok[index % 16])

    # the series exist, each with both kinds of response (a series' first response of a kind
    # makes its key once, as a new series does)
    for index in range(labels_count * 2):
        count(index)
    tracemalloc.start()
    try:
        for index in range(requests):
            count(index)
        snapshot = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    return sum(stat.count for stat in snapshot.statistics("filename"))


def test_a_burst_leaves_no_object_behind_on_the_compiled_build() -> None:
    """20,000 requests over 200 series: every counter's value changed, many above 256 (the
    small ints CPython shares)."""
    compiled_left = burst(COMPILED, 200, 20_000)
    python_left = burst(PYTHON, 200, 20_000)
    assert compiled_left <= 10, compiled_left  # tracemalloc's own bookkeeping at most
    assert python_left >= 200 * 3, python_left  # read, write bytes and the latency sum per series
