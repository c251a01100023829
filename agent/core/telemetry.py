"""Per-pod TCP and HTTP series: their labels, their counters (agent/core/counters.py, compiled
by mypyc: plain numbers on the hot path) by label set, rendered at scrape time.

Every connection gets exactly one ConnectionRecord: opened once, closed once (even when
aborted), so open/close totals always balance. Every HTTP request counted as started ends
in exactly one response Record (agent/core/accounting.py). Series of a removed pod linger
for a grace period, then go, so memory stays bounded as pods come and go."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Final

from agent.core.counters import AGENT_ABORTED as AGENT_ABORTED
from agent.core.counters import LATENCY_BUCKETS_MS as LATENCY_BUCKETS_MS
from agent.core.counters import ConnectionRecord as ConnectionRecord
from agent.core.counters import HttpCounters as HttpCounters
from agent.core.counters import TcpCounters as TcpCounters
from agent.core.tap import TapHub

# Distinct `authority` label values one pod may have per direction; requests with another
# authority are counted without the label (a client must not mint unlimited series).
MAX_AUTHORITIES: Final = 16
# Why a connection has no mTLS, as linkerd2-proxy's no_tls_reason (linkerd/tls/src/{server,
# client}.rs): plaintext from a client, an unmeshed destination, the proxy's own local hop.
NO_TLS_FROM_REMOTE: Final = "no_tls_from_remote"
NOT_PROVIDED_BY_SERVICE_DISCOVERY: Final = "not_provided_by_service_discovery"
LOOPBACK: Final = "loopback"


def workload_label(kind: str) -> str:
    """The label Linkerd gives a workload kind: `deployment`, `statefulset`, ..., but a Job
    is `k8s_job` (linkerd2 pkg/k8s KindToL5DLabel), so it never collides with Prometheus'
    own `job` label."""
    return "k8s_job" if kind == "job" else kind


def _hash_once(labels: PeerLabels | TcpLabels | HttpLabels) -> None:
    """Label sets are dict keys several times per new connection (the pod's label cache, the
    series, the HTTP series): hashed once when made, not field by field at every lookup.
    Equal label sets have equal fields, so equal hashes (`_hash` itself is not compared)."""
    values = tuple(getattr(labels, name) for name in labels.__dataclass_fields__ if name != "_hash")
    object.__setattr__(labels, "_hash", hash(values))


@dataclass(frozen=True, slots=True)
class PeerLabels:
    """Who is on the other end, when the mesh knows: the verified SPIFFE ID of the client
    (inbound) or the server (outbound), and the destination pod (outbound). Empty = unknown;
    empty labels are left out of the exposition."""

    tls: str = "no_identity"  # "true" over the mesh tunnel (Linkerd's values)
    client_id: str = ""
    server_id: str = ""
    dst_namespace: str = ""
    dst_pod: str = ""
    dst_owner_kind: str = ""  # rendered as dst_<kind>="<name>", e.g. dst_deployment="web"
    dst_owner_name: str = ""
    dst_service: str = ""  # the Service whose virtual IP the client connected to
    dst_target_cluster: str = ""  # a mirrored Service's cluster (Linkerd multicluster's labels)
    dst_target_service: str = ""  # and its name there
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _hash_once(self)

    def __hash__(self) -> int:
        return self._hash


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
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _hash_once(self)

    def __hash__(self) -> int:
        return self._hash


@dataclass(frozen=True, slots=True)
class HttpLabels:
    direction: str
    namespace: str
    pod: str
    peer_labels: PeerLabels = PLAINTEXT
    owner_kind: str = ""
    owner_name: str = ""
    authority: str = ""  # the connection's first request's Host / :authority, bounded per pod
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _hash_once(self)

    def __hash__(self) -> int:
        return self._hash


class Telemetry:
    def __init__(self, clock: Callable[[], float], grace_seconds: float) -> None:
        self._clock = clock
        self._grace = grace_seconds
        self._series: dict[TcpLabels, TcpCounters] = {}
        self._http: dict[HttpLabels, HttpCounters] = {}
        self._expiry: dict[tuple[str, str], float] = {}
        # (namespace, pod) -> (owner kind, owner name, when the agent began serving it)
        self._pods: dict[tuple[str, str], tuple[str, str, float]] = {}
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

    def pod_added(self, namespace: str, pod: str, owner_kind: str = "", owner_name: str = "",
                  started: float = 0.0) -> None:
        """A pod is served from now: `started` (Unix time) is its per-pod
        process_start_time_seconds, the truthful equivalent of a Linkerd proxy's start."""
        self._expiry.pop((namespace, pod), None)
        self._pods[(namespace, pod)] = (owner_kind, owner_name, started)

    def pods(self) -> Iterator[tuple[tuple[str, str], tuple[str, str, float]]]:
        return iter(list(self._pods.items()))

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
            self._pods.pop(key, None)
        return len(doomed)

    def series(self) -> Iterator[tuple[TcpLabels, TcpCounters]]:
        return iter(list(self._series.items()))

    def http_series(self) -> Iterator[tuple[HttpLabels, HttpCounters]]:
        return iter(list(self._http.items()))

    def __len__(self) -> int:
        return len(self._series) + len(self._http)
