"""Per-pod TCP and HTTP counters, kept as plain numbers on the hot path and rendered at
scrape time.

Every connection gets exactly one ConnectionRecord: opened once, closed once (even when
aborted), so open/close totals always balance. Every HTTP request counted as started ends
in exactly one response Record (agent/core/accounting.py). Series of a removed pod linger
for a grace period, then go, so memory stays bounded as pods come and go."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from agent.core.accounting import Record
from agent.core.tap import TapHub

# Linkerd's response_latency_ms bucket bounds (ms); +Inf is implied.
LATENCY_BUCKETS_MS: Final = (1, 2, 3, 4, 5, 10, 20, 30, 40, 50, 100, 200, 300, 400, 500,
                             1000, 2000, 3000, 4000, 5000, 10000, 20000, 30000, 40000, 50000)
_GRPC_STATUSES: Final = range(17)  # OK .. UNAUTHENTICATED; others are "other" (bounded labels)


@dataclass(frozen=True, slots=True)
class PeerLabels:
    """Who is on the other end, when the mesh knows: the verified SPIFFE ID of the client
    (inbound) or the server (outbound), and the destination pod (outbound). Empty = unknown;
    empty labels are left out of the exposition."""

    tls: str = "disabled"  # "true" over the mesh tunnel
    client_id: str = ""
    server_id: str = ""
    dst_namespace: str = ""
    dst_pod: str = ""
    dst_owner_kind: str = ""  # rendered as dst_<kind>="<name>", e.g. dst_deployment="web"
    dst_owner_name: str = ""
    dst_service: str = ""  # the Service whose virtual IP the client connected to


PLAINTEXT: Final = PeerLabels()


@dataclass(frozen=True, slots=True)
class TcpLabels:
    direction: str  # "inbound" | "outbound"
    namespace: str
    pod: str
    peer_labels: PeerLabels = PLAINTEXT
    peer: str = "src"  # counts are of the pod-side connection, as Linkerd's peer="src"
    owner_kind: str = ""  # the pod's workload, rendered as <kind>="<name>" (deployment="web")
    owner_name: str = ""


@dataclass(frozen=True, slots=True)
class HttpLabels:
    direction: str
    namespace: str
    pod: str
    peer_labels: PeerLabels = PLAINTEXT
    owner_kind: str = ""
    owner_name: str = ""


class HttpCounters:
    """request_total, response_total by (classification, status, grpc status), and the
    latency histogram (per-bucket counts; the exposition makes them cumulative)."""

    __slots__ = ("latency_buckets", "latency_count", "latency_sum", "requests", "responses")

    def __init__(self) -> None:
        self.requests = 0
        self.responses: dict[tuple[str, str, str], int] = {}
        self.latency_buckets = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        self.latency_sum = 0.0
        self.latency_count = 0

    def record(self, record: Record) -> None:
        key = (record.classification, _status_label(record.status_code),
               _grpc_label(record.grpc_status))
        self.responses[key] = self.responses.get(key, 0) + 1
        if record.latency_ms is not None:
            self.latency_buckets[bisect_left(LATENCY_BUCKETS_MS, record.latency_ms)] += 1
            self.latency_sum += record.latency_ms
            self.latency_count += 1


def _status_label(status: int | None) -> str:
    if status is None:
        return ""
    return str(status) if 100 <= status <= 599 else "other"


def _grpc_label(status: int | None) -> str:
    if status is None:
        return ""
    return str(status) if status in _GRPC_STATUSES else "other"


class TcpCounters:
    __slots__ = ("close_failure", "close_success", "open_connections", "open_total",
                 "read_bytes", "write_bytes")

    def __init__(self) -> None:
        self.open_total = 0
        self.open_connections = 0
        self.read_bytes = 0
        self.write_bytes = 0
        self.close_success = 0
        self.close_failure = 0


class ConnectionRecord:
    """One connection's share of the counters; `close` counts once, whatever calls it."""

    __slots__ = ("_closed", "counters")

    def __init__(self, counters: TcpCounters) -> None:
        self.counters = counters
        self._closed = False
        counters.open_total += 1
        counters.open_connections += 1

    def read(self, nbytes: int) -> None:
        self.counters.read_bytes += nbytes

    def wrote(self, nbytes: int) -> None:
        self.counters.write_bytes += nbytes

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, failed: bool) -> bool:
        """Returns True the first time only."""
        if self._closed:
            return False
        self._closed = True
        self.counters.open_connections -= 1
        if failed:
            self.counters.close_failure += 1
        else:
            self.counters.close_success += 1
        return True


class Telemetry:
    def __init__(self, clock: Callable[[], float], grace_seconds: float) -> None:
        self._clock = clock
        self._grace = grace_seconds
        self._series: dict[TcpLabels, TcpCounters] = {}
        self._http: dict[HttpLabels, HttpCounters] = {}
        self._expiry: dict[tuple[str, str], float] = {}
        self._refreshers: list[Callable[[], None]] = []
        self.tap = TapHub(clock)  # open taps: the proxies publish finished requests to it

    def on_scrape(self, refresh: Callable[[], None]) -> None:
        """Call `refresh` before every scrape (to pull counts kept elsewhere, e.g. in-kernel)."""
        self._refreshers.append(refresh)

    def refresh(self) -> None:
        for refresh in self._refreshers:
            refresh()

    def counted_elsewhere(self, labels: TcpLabels, opened: int, closed: int, read_bytes: int,
                          write_bytes: int) -> None:
        """Add connections the proxy never saw (counted in the kernel) to the same series:
        `opened` new connections, `closed` of them done (as successes), and their bytes."""
        counters = self._series.get(labels)
        if counters is None:
            counters = self._series[labels] = TcpCounters()
        counters.open_total += opened
        counters.open_connections += opened - closed
        counters.close_success += closed
        counters.read_bytes += read_bytes
        counters.write_bytes += write_bytes

    def http(self, labels: HttpLabels) -> HttpCounters:
        counters = self._http.get(labels)
        if counters is None:
            counters = self._http[labels] = HttpCounters()
        return counters

    def open(self, labels: TcpLabels) -> ConnectionRecord:
        counters = self._series.get(labels)
        if counters is None:
            counters = self._series[labels] = TcpCounters()
        return ConnectionRecord(counters)

    def pod_added(self, namespace: str, pod: str) -> None:
        self._expiry.pop((namespace, pod), None)

    def pod_removed(self, namespace: str, pod: str) -> None:
        self._expiry[(namespace, pod)] = self._clock() + self._grace

    def expire(self) -> int:
        """Drop the series of pods removed longer than the grace period ago."""
        now = self._clock()
        due = {key for key, deadline in self._expiry.items() if deadline <= now}
        if not due:
            return 0
        doomed = [labels for labels in self._series if (labels.namespace, labels.pod) in due]
        for labels in doomed:
            del self._series[labels]
        for http_labels in [h for h in self._http if (h.namespace, h.pod) in due]:
            del self._http[http_labels]
        for key in due:
            del self._expiry[key]
        return len(doomed)

    def series(self) -> Iterator[tuple[TcpLabels, TcpCounters]]:
        return iter(list(self._series.items()))

    def http_series(self) -> Iterator[tuple[HttpLabels, HttpCounters]]:
        return iter(list(self._http.items()))

    def __len__(self) -> int:
        return len(self._series) + len(self._http)
