"""Per-pod TCP counters, kept as plain integers on the hot path and rendered at scrape time.

Every connection gets exactly one ConnectionRecord: opened once, closed once (even when
aborted), so open/close totals always balance. Series of a removed pod linger for a grace
period, then go, so memory stays bounded as pods come and go."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TcpLabels:
    direction: str  # "inbound" | "outbound"
    namespace: str
    pod: str
    tls: str = "disabled"
    peer: str = "src"  # counts are of the pod-side connection, as Linkerd's peer="src"


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


class TcpTelemetry:
    def __init__(self, clock: Callable[[], float], grace_seconds: float) -> None:
        self._clock = clock
        self._grace = grace_seconds
        self._series: dict[TcpLabels, TcpCounters] = {}
        self._expiry: dict[tuple[str, str], float] = {}

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
        for key in due:
            del self._expiry[key]
        return len(doomed)

    def series(self) -> Iterator[tuple[TcpLabels, TcpCounters]]:
        return iter(list(self._series.items()))

    def __len__(self) -> int:
        return len(self._series)
