"""The HTTP counters count what the exposition says: responses by (classification, status
label, gRPC status label) and latencies by Linkerd's bucket bounds, as a plain model of them
(a dict of label tuples and bisect, what the counters were before they were compiled) counts
them, whatever the order of the responses. Runs on the build this process imports
(test_counters_build.py reruns it on the Python module)."""

from __future__ import annotations

from bisect import bisect_left

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core.accounting import Record
from agent.core.counters import (
    LATENCY_BUCKETS_MS,
    HttpCounters,
    latency_bucket,
    response_code,
    response_labels,
)


def status_label(status: int | None) -> str:
    if status is None:
        return ""
    return str(status) if 100 <= status <= 599 else "other"


def grpc_label(status: int | None) -> str:
    if status is None:
        return ""
    return str(status) if 0 <= status <= 16 else "other"


class Model:
    """The counters as they were in Python: a dict per label tuple, a list of buckets."""

    def __init__(self) -> None:
        self.responses: dict[tuple[str, str, str], int] = {}
        self.buckets = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        self.latency_sum, self.latency_count = 0.0, 0

    def record(self, record: Record) -> None:
        key = (record.classification, status_label(record.status_code), grpc_label(record.grpc_status))
        self.responses[key] = self.responses.get(key, 0) + 1
        if record.latency_ms is not None:
            self.buckets[bisect_left(LATENCY_BUCKETS_MS, record.latency_ms)] += 1
            self.latency_sum += record.latency_ms
            self.latency_count += 1


statuses = st.one_of(st.none(), st.sampled_from([200, 200, 200, 204, 404, 503, 100, 599, 600, 99, 0, -1]),
                     st.integers(-(2**40), 2**40))
grpc_statuses = st.one_of(st.none(), st.sampled_from([0, 0, 2, 14, 16, 17, -1, 255]), st.integers(-999, 999))
bounds = [float(bound) for bound in LATENCY_BUCKETS_MS]
latencies = st.one_of(st.none(), st.sampled_from([0.0, 0.3, 0.3, 1.0, 1.0000001, 4.999, 50000.0, 50000.5]),
                      st.sampled_from(bounds), st.floats(0, 1e6, allow_nan=False),
                      st.floats(allow_nan=False))  # -inf, inf, negative, huge
records = st.builds(Record, classification=st.sampled_from(["success", "failure"]),
                    status_code=statuses, grpc_status=grpc_statuses, latency_ms=latencies)


@given(st.lists(records, max_size=80))
def test_responses_and_latencies_are_counted_as_the_plain_model_counts_them(sequence: list[Record]) -> None:
    counters, model = HttpCounters(), Model()
    for record in sequence:
        counters.record(record)
        model.record(record)
        assert counters.responses == model.responses  # a run still open is counted too
    assert counters.latency_buckets == model.buckets
    # repr: inf + -inf is nan in both, and nan is not equal to itself
    assert repr(counters.latency_sum) == repr(model.latency_sum)
    assert counters.latency_count == model.latency_count


@given(st.sampled_from(["success", "failure"]), statuses, grpc_statuses)
def test_a_response_code_names_its_labels(classification: str, status: int | None, grpc: int | None) -> None:
    assert response_labels(response_code(classification, status, grpc)) == (
        classification, status_label(status), grpc_label(grpc))


@given(st.floats(allow_nan=False))
def test_a_latency_falls_in_the_bucket_bisect_finds(latency: float) -> None:
    assert latency_bucket(latency) == bisect_left(LATENCY_BUCKETS_MS, latency)


def test_a_classification_is_a_success_or_a_failure() -> None:
    with pytest.raises(ValueError, match="success or a failure"):
        HttpCounters().count("maybe", 200, None, 1.0)


def test_requests_are_a_plain_number_the_relay_adds_to() -> None:
    counters = HttpCounters()
    counters.requests += 3
    counters.requests += 2**62  # beyond a tagged int: still exact
    assert counters.requests == 2**62 + 3
    assert counters.responses == {} and counters.latency_buckets == [0] * 26
