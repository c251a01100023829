"""The counters the data path updates per chunk and per request: one TCP series' connection
counts and bytes, one HTTP series' requests, responses and latency histogram, and one
connection's share of its TCP series. Rendered at scrape time (agent/observability/metrics.py).

This module is compiled by mypyc (agent/core/compiled.py, setup.py), as the tunnel framing is,
and stays the reference and the fallback as Python. Compiled, its classes are native: `int`
and `float` attributes are stored unboxed in the object, so counting a chunk or a request
allocates no Python object — a burst leaves no new int or float behind in the counters
(issue #21) — and an update is a few machine instructions, not a dict or list store of a
fresh object (issue #16). For the same reason the latency buckets and the response counts
are C arrays (`array.array`), and a response is counted under an int code of
(classification, status, gRPC status); the label strings are made at scrape time. Measured:
docs/fastpath.md, "The counters, compiled by mypyc".

Nothing here imports the rest of the agent at run time (a Record is only read)."""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING, Final, Literal, Protocol

if TYPE_CHECKING:
    from agent.core.accounting import Record

Classification = Literal["success", "failure"]

# Linkerd's response_latency_ms bucket bounds (ms); +Inf is implied.
LATENCY_BUCKETS_MS: Final = (1, 2, 3, 4, 5, 10, 20, 30, 40, 50, 100, 200, 300, 400, 500,
                             1000, 2000, 3000, 4000, 5000, 10000, 20000, 30000, 40000, 50000)
_BOUNDS: Final[tuple[float, ...]] = tuple(float(bound) for bound in LATENCY_BUCKETS_MS)
_BUCKETS: Final = len(LATENCY_BUCKETS_MS) + 1
_INF: Final = float("inf")
_NO_LATENCY: Final = float("-inf")  # what the first bucket's range is above
# errno of a connection failure the agent itself caused (idle reset, refusal, shutdown).
AGENT_ABORTED: Final = "ECONNABORTED"

# A response's (classification, status_code, grpc_status) labels as one int, made without
# a string: status 100..599 -> 1..500, another status 501, none 0; gRPC status 0..16
# (OK .. UNAUTHENTICATED) -> 1..17, another 18 (bounded labels), none 0.
_STATUS_OTHER: Final = 501
_GRPC_OTHER: Final = 18
_GRPC_CODES: Final = 19
_NO_CODE: Final = -1


def response_code(classification: str, status: int | None, grpc_status: int | None) -> int:
    """The int a response is counted under (decoded by `response_labels`)."""
    if status is None:
        status_index = 0
    elif 100 <= status <= 599:
        status_index = status - 99
    else:
        status_index = _STATUS_OTHER
    if grpc_status is None:
        grpc_index = 0
    elif 0 <= grpc_status <= 16:
        grpc_index = grpc_status + 1
    else:
        grpc_index = _GRPC_OTHER
    if classification == "success":
        failed = 0
    elif classification == "failure":
        failed = 1
    else:
        raise ValueError(f"a response is a success or a failure, not {classification!r}")
    return (status_index * _GRPC_CODES + grpc_index) * 2 + failed


def response_labels(code: int) -> tuple[str, str, str]:
    """(classification, status_code, grpc_status) label values of a response code."""
    classification = "failure" if code % 2 else "success"
    status_index, grpc_index = divmod(code // 2, _GRPC_CODES)
    status = "" if status_index == 0 else "other" if status_index == _STATUS_OTHER else str(status_index + 99)
    grpc = "" if grpc_index == 0 else "other" if grpc_index == _GRPC_OTHER else str(grpc_index - 1)
    return classification, status, grpc


def latency_bucket(latency_ms: float) -> int:
    """The index of the first bound >= latency_ms (bisect_left over LATENCY_BUCKETS_MS);
    len(LATENCY_BUCKETS_MS) is +Inf."""
    low, high = 0, _BUCKETS - 1
    while low < high:
        middle = (low + high) // 2
        if _BOUNDS[middle] < latency_ms:
            low = middle + 1
        else:
            high = middle
    return low


def classify(
    status_code: int | None,
    grpc_status: int | None,
    error: str | None,
    grpc_failures: frozenset[int] | None = None,
) -> Classification:
    """`grpc_failures=None` is the design's rule: every gRPC status but OK (0) fails."""
    if error is not None:
        return "failure"
    if grpc_status is not None and (
        grpc_status != 0 if grpc_failures is None else grpc_status in grpc_failures
    ):
        return "failure"
    if status_code is not None and status_code >= 500:
        return "failure"
    return "success"


def parse_grpc_status(value: bytes) -> int | None:
    """`grpc-status` header value -> int; None when it is not a small decimal number."""
    if not 0 < len(value) <= 3:
        return None
    status = 0
    for byte in value:  # digits by hand: compiled, no str made and parsed per response
        if not 48 <= byte <= 57:
            return None
        status = status * 10 + byte - 48
    return status


class Tally(Protocol):
    """Counts of one series kept elsewhere (agent.core._http1fast.Tally: the HTTP/1 fast path
    counts requests there in C, without a Record or a Python call per request), added in
    when the counters are read. Responses by `response_code`, latencies by `latency_bucket`."""

    @property
    def requests(self) -> int: ...

    @property
    def latency_count(self) -> int: ...

    @property
    def latency_sum(self) -> float: ...

    def buckets(self) -> list[int]: ...

    def responses(self) -> dict[int, int]: ...


class HttpCounters:
    """request_total, response_total by (classification, status, grpc status), and the
    latency histogram (per-bucket counts; the exposition makes them cumulative).

    What `count` and `requests` count here is added to what a `tally` holds (once the HTTP/1
    fast path was handed one: `agent.core.http1.count_fast`) when the totals are read.

    Requests of one series mostly end alike (the same status, the same latency bucket): a run
    of equal responses, and of equal buckets, is counted in a plain attribute and added to
    its array slot when the run ends (an array store is a generic call, even compiled)."""

    __slots__ = ("_bucket_run", "_buckets", "_codes", "_counts", "_latency_count",
                 "_latency_sum", "_requests", "_run", "_run_above", "_run_bucket", "_run_code",
                 "_run_slot", "_run_upto", "tally")

    def __init__(self) -> None:
        self._requests: int = 0
        self._latency_sum: float = 0.0
        self._latency_count: int = 0
        self.tally: Tally | None = None
        self._buckets = array("q", bytes(8 * _BUCKETS))
        self._codes: dict[int, int] = {}  # response code -> its slot in _counts
        self._counts = array("q")
        self._run_code: int = _NO_CODE  # the current run of equal responses: code, slot, length
        self._run_slot: int = 0
        self._run: int = 0
        self._run_bucket: int = 0  # the current run of latencies in one bucket: bucket, length,
        self._bucket_run: int = 0  # and the bucket's bounds (above the one before, up to its own)
        self._run_above: float = _NO_LATENCY
        self._run_upto: float = _BOUNDS[0]

    def record(self, record: Record) -> None:
        self.count(record.classification, record.status_code, record.grpc_status, record.latency_ms)

    def count(self, classification: str, status: int | None, grpc_status: int | None,
              latency_ms: float | None) -> None:
        """One finished request (what `record` reads from a Record)."""
        code = response_code(classification, status, grpc_status)
        if code == self._run_code:
            self._run += 1
        else:
            slot = self._codes.get(code)
            if slot is None:
                slot = self._codes[code] = len(self._counts)
                self._counts.append(0)
            if self._run:
                self._counts[self._run_slot] += self._run
            self._run_code, self._run_slot, self._run = code, slot, 1
        if latency_ms is not None:
            if self._run_above < latency_ms <= self._run_upto:  # in the bucket of the run
                self._bucket_run += 1
            else:
                bucket = latency_bucket(latency_ms)
                if bucket == self._run_bucket:
                    self._bucket_run += 1
                else:
                    if self._bucket_run:
                        self._buckets[self._run_bucket] += self._bucket_run
                    self._run_bucket, self._bucket_run = bucket, 1
                    self._run_above = _BOUNDS[bucket - 1] if bucket else _NO_LATENCY
                    self._run_upto = _BOUNDS[bucket] if bucket < _BUCKETS - 1 else _INF
            self._latency_sum += latency_ms
            self._latency_count += 1

    def start(self, requests: int) -> None:
        """`requests` more requests started."""
        self._requests += requests

    @property
    def requests(self) -> int:
        """Requests started (request_total)."""
        tally = self.tally
        return self._requests if tally is None else self._requests + tally.requests

    @requests.setter
    def requests(self, total: int) -> None:
        tally = self.tally
        self._requests = total if tally is None else total - tally.requests

    @property
    def latency_count(self) -> int:
        tally = self.tally
        return self._latency_count if tally is None else self._latency_count + tally.latency_count

    @property
    def latency_sum(self) -> float:
        tally = self.tally
        return self._latency_sum if tally is None else self._latency_sum + tally.latency_sum

    @property
    def responses(self) -> dict[tuple[str, str, str], int]:
        """Responses by (classification, status_code, grpc_status) label values (a new dict)."""
        counts = self._counts.tolist()
        if self._run:
            counts[self._run_slot] += self._run
        by_code = {code: counts[slot] for code, slot in self._codes.items()}
        if self.tally is not None:
            for code, count in self.tally.responses().items():
                by_code[code] = by_code.get(code, 0) + count
        return {response_labels(code): count for code, count in by_code.items()}

    @property
    def latency_buckets(self) -> list[int]:
        """Per-bucket counts, one per bound and the last for +Inf (a new list)."""
        buckets = self._buckets.tolist()
        buckets[self._run_bucket] += self._bucket_run
        if self.tally is not None:
            buckets = [mine + theirs for mine, theirs in zip(buckets, self.tally.buckets(), strict=True)]
        return buckets


class TcpCounters:
    """One series' connection counts; failed closes by errno name (a bounded set: the
    kernel's errno names and AGENT_ABORTED), kept only once one happens."""

    __slots__ = ("close_errno", "close_failure", "close_success", "open_connections",
                 "open_total", "read_bytes", "write_bytes")

    def __init__(self) -> None:
        self.open_total: int = 0
        self.open_connections: int = 0
        self.read_bytes: int = 0
        self.write_bytes: int = 0
        self.close_success: int = 0
        self.close_failure: int = 0
        self.close_errno: dict[str, int] | None = None

    def failed_close(self, errno_name: str) -> None:
        self.close_failure += 1
        by_errno = self.close_errno
        if by_errno is None:
            by_errno = self.close_errno = {}
        by_errno[errno_name] = by_errno.get(errno_name, 0) + 1


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

    def close(self, failed: bool, errno_name: str = "") -> bool:
        """Returns True the first time only. A failure is counted under `errno_name` (e.g.
        "ECONNRESET"), AGENT_ABORTED when none is given."""
        if self._closed:
            return False
        self._closed = True
        self.counters.open_connections -= 1
        if failed:
            self.counters.failed_close(errno_name or AGENT_ABORTED)
        else:
            self.counters.close_success += 1
        return True
