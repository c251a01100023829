"""Request accounting shared by the HTTP observers: the Record each request ends in, how a
response is classified, and the Observer interface the proxy drives.

The proxy relays each connection as two byte streams and hands every chunk to an Observer
*as it forwards it* (the observer never holds, changes or delays bytes). The observer answers
with Records, one per request, in the order requests finish:

    observer.client_bytes(data, now) -> list[Record]   # bytes client -> server
    observer.server_bytes(data, now) -> list[Record]   # bytes server -> client
    observer.closed(now, reset)      -> list[Record]   # once, when the relay ends
    observer.take_started()          -> int            # requests started since the last call

Exactly-once: every request counted by `take_started` ends in exactly one Record — from a
response, or with classification "failure" and an `error` when the stream was reset, the
connection closed first, the server refused it (HTTP/2 GOAWAY) or the observer gave up
parsing. A request is *started* when its headers are complete (HTTP/1) or its HEADERS frame
block is decoded (HTTP/2); a request whose headers never complete is not a request.

Classification follows the design ("Golden metrics"): failure = HTTP 5xx, a gRPC status other
than OK, or a stream error. Linkerd's proxy is narrower for gRPC (only UNKNOWN,
DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE and DATA_LOSS fail; linkerd2-proxy
`app/core/src/classify.rs`); pass `grpc_failures=GRPC_FAILURE_LINKERD` to match it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal, Protocol

if TYPE_CHECKING:
    from agent.core.tap import RequestDetail

Classification = Literal["success", "failure"]

# Why a request ended without a complete response (Record.error).
RESET: Final = "reset"  # RST_STREAM, or the TCP connection was reset
CLOSED: Final = "closed"  # the connection ended before the response did
REFUSED: Final = "refused"  # HTTP/2 GOAWAY: the server never processed this stream
PROTOCOL_ERROR: Final = "protocol_error"  # unparseable traffic: the observer gave up

# gRPC statuses Linkerd counts as failures; pass as `grpc_failures` to match it exactly.
GRPC_FAILURE_LINKERD: Final = frozenset({2, 4, 13, 14, 15})


@dataclass(frozen=True, slots=True)
class Record:
    """One finished request: what the response said, or why there was none."""

    classification: Classification
    status_code: int | None
    grpc_status: int | None
    latency_ms: float | None  # request start -> first final (non-1xx) response headers
    method: str | None = None
    error: str | None = None  # None when a response completed; else RESET, CLOSED, ...
    detail: RequestDetail | None = None  # path, authority, sizes: only while a tap is open


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


class Observer(Protocol):
    """What the proxy calls for each relayed connection (see the module docstring)."""

    @property
    def opaque(self) -> bool:
        """True once the observer stopped looking: later calls are cheap no-ops."""
        ...

    def client_bytes(self, data: bytes, now: float) -> list[Record]: ...

    def server_bytes(self, data: bytes, now: float) -> list[Record]: ...

    def closed(self, now: float, reset: bool) -> list[Record]: ...

    def take_started(self) -> int: ...

    def abandon(self, error: str) -> list[Record]:
        """Stop observing now; every request in flight ends as a failure with `error`."""
        ...


class OpaqueObserver:
    """The observer of a connection that is not HTTP: sees nothing, records nothing."""

    __slots__ = ()

    @property
    def opaque(self) -> bool:
        return True

    def client_bytes(self, data: bytes, now: float) -> list[Record]:
        return []

    def server_bytes(self, data: bytes, now: float) -> list[Record]:
        return []

    def closed(self, now: float, reset: bool) -> list[Record]:
        return []

    def take_started(self) -> int:
        return 0

    def abandon(self, error: str) -> list[Record]:
        return []


def parse_grpc_status(value: bytes) -> int | None:
    """`grpc-status` header value -> int; None when it is not a small decimal number."""
    if 0 < len(value) <= 3 and value.isdigit():
        return int(value)
    return None
