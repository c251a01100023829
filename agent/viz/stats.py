"""Golden metrics from scraped samples: counter deltas over a window, rates, Prometheus'
histogram_quantile, grouping pods into workloads, and pod-to-pod edges. Pure: no I/O."""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

REQUESTS = "request_total"
RESPONSES = "response_total"
LATENCY_BUCKETS = "response_latency_ms_bucket"
TCP_OPEN_CONNECTIONS = "tcp_open_connections"
INBOUND, OUTBOUND = "inbound", "outbound"
LOOPBACK = "loopback"  # no_tls_reason of the agent's own hop to the pod (TCP peer="dst" inbound)
READ_BYTES, WRITE_BYTES = "tcp_read_bytes_total", "tcp_write_bytes_total"
_COUNTERS_IN_WINDOW = frozenset({REQUESTS, RESPONSES, LATENCY_BUCKETS, READ_BYTES, WRITE_BYTES})

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class Sample:
    """One scraped series value: metric name, labels, value."""

    name: str
    labels: Mapping[str, str]
    value: float


class PodKey(NamedTuple):
    namespace: str
    name: str


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile over classic buckets: (upper bound `le`, cumulative count).

    Interpolates linearly inside the bucket holding rank q*count, with 0 as the lower bound
    of the first bucket; a rank in the +Inf bucket gives the highest finite bound. Returns
    NaN when there are no observations, fewer than two buckets, no +Inf bucket or q is NaN;
    -Inf for q < 0, +Inf for q > 1 (as promql/quantile.go's bucketQuantile)."""
    if math.isnan(q):
        return math.nan
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    ordered = _coalesce(sorted(buckets))
    if not ordered or not math.isinf(ordered[-1][0]) or ordered[-1][0] < 0:
        return math.nan
    counts = _monotonic(_without_precision_errors([count for _, count in ordered]))
    bounds = [bound for bound, _ in ordered]
    if len(bounds) < 2 or counts[-1] == 0:
        return math.nan
    rank = q * counts[-1]
    index = bisect.bisect_left(counts, rank, 0, len(counts) - 1)
    if index == len(counts) - 1:
        return bounds[-2]
    if index == 0 and bounds[0] <= 0:
        return bounds[0]
    start, count = 0.0, counts[index]
    if index > 0:
        start, count, rank = bounds[index - 1], count - counts[index - 1], rank - counts[index - 1]
    if count == 0:  # only when q == 0 and the first bucket is empty: Go's 0/0
        return math.nan
    return start + (bounds[index] - start) * (rank / count)


def _coalesce(ordered: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Buckets with the same upper bound are one bucket (their counts add)."""
    merged: list[tuple[float, float]] = []
    for bound, count in ordered:
        if merged and merged[-1][0] == bound:
            merged[-1] = (bound, merged[-1][1] + count)
        else:
            merged.append((bound, count))
    return merged


def _without_precision_errors(counts: list[float], tolerance: float = 1e-12) -> list[float]:
    fixed, previous = list(counts), counts[0] if counts else 0.0
    for index in range(1, len(fixed)):
        delta = abs(fixed[index] - previous)
        if delta == 0:
            continue
        if delta / fixed[index] <= tolerance:
            fixed[index] = previous
        else:
            previous = fixed[index]
    return fixed


def _monotonic(counts: list[float]) -> list[float]:
    """The envelope: a bucket never counts fewer than the one below it."""
    envelope: list[float] = []
    for count in counts:
        envelope.append(max(count, envelope[-1]) if envelope else count)
    return envelope


def counter_delta(before: float | None, after: float) -> float:
    """Increase of a counter between two scrapes; a drop means it was reset (as Prometheus)."""
    if before is None or after < before:
        return after
    return after - before


def _series_key(sample: Sample) -> tuple[str, tuple[tuple[str, str], ...]]:
    return sample.name, tuple(sorted(sample.labels.items()))


def window_deltas(before: Iterable[Sample], after: Iterable[Sample]) -> list[Sample]:
    """Request/response/latency counters' increase from `before` to `after`. A series that
    only `after` has was created inside the window, so all of its count is."""
    previous = {_series_key(s): s.value for s in before if s.name in _COUNTERS_IN_WINDOW}
    return [Sample(s.name, s.labels, counter_delta(previous.get(_series_key(s)), s.value))
            for s in after if s.name in _COUNTERS_IN_WINDOW]


@dataclass
class Golden:
    """Golden metrics of one pod (or workload, or pod+direction) over a window."""

    rps: float = 0.0
    successes: float = 0.0
    responses: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)
    tcp_open_connections: float = 0.0
    observed: bool = False     # some request/response/latency series was in the window
    response_rps: float = 0.0  # responses per second: what `linkerd viz stat` calls RPS
    read_bps: float = 0.0      # TCP bytes per second read from / written to the peers
    write_bps: float = 0.0

    def merge(self, other: Golden) -> None:
        self.observed = self.observed or other.observed
        self.rps += other.rps
        self.response_rps += other.response_rps
        self.read_bps += other.read_bps
        self.write_bps += other.write_bps
        self.successes += other.successes
        self.responses += other.responses
        self.tcp_open_connections += other.tcp_open_connections
        for bound, count in other.buckets.items():
            self.buckets[bound] = self.buckets.get(bound, 0.0) + count

    @property
    def success_rate(self) -> float | None:
        return self.successes / self.responses if self.responses > 0 else None

    def latency_ms(self, q: float) -> float | None:
        value = histogram_quantile(q, self.buckets.items())
        return None if math.isnan(value) else value


def _add_window_sample(golden: Golden, sample: Sample, elapsed: float) -> None:
    if sample.name == READ_BYTES:
        golden.read_bps += sample.value / elapsed
        return
    if sample.name == WRITE_BYTES:
        golden.write_bps += sample.value / elapsed
        return
    golden.observed = True
    if sample.name == REQUESTS:
        golden.rps += sample.value / elapsed
    elif sample.name == RESPONSES:
        golden.responses += sample.value
        golden.response_rps += sample.value / elapsed
        if sample.labels.get("classification") == "success":
            golden.successes += sample.value
    elif sample.name == LATENCY_BUCKETS and "le" in sample.labels:
        bound = float(sample.labels["le"])
        golden.buckets[bound] = golden.buckets.get(bound, 0.0) + sample.value


def golden_by(deltas: Iterable[Sample], current: Iterable[Sample], elapsed: float,
              key: Callable[[Sample], K | None]) -> dict[K, Golden]:
    """Fold one agent's window deltas (rates use `elapsed` seconds) and current gauges into
    Golden records, one per key; samples whose key is None are left out."""
    if elapsed <= 0:
        raise ValueError(f"the window must be positive, not {elapsed}")
    result: dict[K, Golden] = {}
    for sample in deltas:
        if (found := key(sample)) is not None:
            _add_window_sample(result.setdefault(found, Golden()), sample, elapsed)
    for sample in current:  # each connection once: its peer's side, not the local hop
        if (sample.name == TCP_OPEN_CONNECTIONS and sample.labels.get("no_tls_reason") != LOOPBACK
                and (found := key(sample)) is not None):
            result.setdefault(found, Golden()).tcp_open_connections += sample.value
    return result


def pod_of(sample: Sample) -> PodKey | None:
    namespace, pod = sample.labels.get("namespace"), sample.labels.get("pod")
    return PodKey(namespace, pod) if namespace is not None and pod else None


def pod_direction(sample: Sample) -> tuple[str, str, str] | None:
    """Key for `top`: (namespace, pod, direction)."""
    pod, direction = pod_of(sample), sample.labels.get("direction")
    return (pod.namespace, pod.name, direction) if pod is not None and direction else None


def merge_into(total: dict[K, Golden], part: Mapping[K, Golden]) -> dict[K, Golden]:
    for found, golden in part.items():
        total.setdefault(found, Golden()).merge(golden)
    return total


# Kubernetes names a Deployment's pods <deployment>-<pod-template-hash>-<5 random chars>, both
# parts drawn from its "safe" alphabet (no vowels, no 0/1/3). The hash is a uint32 printed in
# decimal and re-encoded, so 6 to 10 characters in practice.
_SAFE = "[bcdfghjklmnpqrstvwxz2456789]"
_DEPLOYMENT_POD = re.compile(rf"^(?P<owner>.+)-{_SAFE}{{6,10}}-{_SAFE}{{5}}$")


def owner_name(pod: str) -> str:
    """The Deployment a pod belongs to, guessed from its name; a pod without that shape
    (StatefulSet, DaemonSet, bare pod) is its own owner. Used for pods of no known owner
    (standalone mode); in Kubernetes mode the workload labels say it."""
    match = _DEPLOYMENT_POD.match(pod)
    return match.group("owner") if match else pod


def busiest_first(golden: Mapping[K, Golden]) -> list[tuple[K, Golden]]:
    return sorted(golden.items(), key=lambda item: (-item[1].rps, str(item[0])))


def pods_in(samples: Iterable[Sample]) -> set[PodKey]:
    return {pod for sample in samples if (pod := pod_of(sample)) is not None}


def meshed_pods(entries: Iterable[Mapping[str, object]]) -> set[PodKey]:
    """Pods listed by agents' GET /pods."""
    return {PodKey(str(entry.get("namespace", "")), str(entry["name"]))
            for entry in entries if entry.get("name")}

