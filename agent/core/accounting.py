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

Classification: failure = HTTP 5xx, a stream error, or a failing gRPC status. The agent
classifies gRPC as Linkerd's proxy does (GRPC_FAILURE_LINKERD: UNKNOWN, DEADLINE_EXCEEDED,
PERMISSION_DENIED, INTERNAL, UNAVAILABLE and DATA_LOSS fail, every other status succeeds;
linkerd2-proxy `proxy/client-policy/src/grpc.rs` Codes::default, used by
`app/core/src/classify.rs`), so success rates agree with Linkerd's; `grpc_failures=None` is
the stricter rule "every status but OK fails".

Each observer also names the connection's `authority` (its first request's Host or
:authority, "" until seen or when absent), the `authority` label of its series.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

# Classifying a response is done per request on the hot path: in the compiled counters module
# (issue #16), named here too as the observers' shared vocabulary.
from agent.core.counters import Classification, classify, parse_grpc_status

if TYPE_CHECKING:
    from agent.core.tap import RequestDetail

__all__ = ["CLOSED", "GRPC_FAILURE_LINKERD", "PROTOCOL_ERROR", "REFUSED", "RESET", "Classification",
           "Observer", "OpaqueObserver", "Record", "authority_label", "classify", "host_in",
           "parse_grpc_status"]


# Why a request ended without a complete response (Record.error).
RESET: Final = "reset"  # RST_STREAM, or the TCP connection was reset
CLOSED: Final = "closed"  # the connection ended before the response did
REFUSED: Final = "refused"  # HTTP/2 GOAWAY: the server never processed this stream
PROTOCOL_ERROR: Final = "protocol_error"  # unparseable traffic: the observer gave up

# gRPC statuses Linkerd counts as failures (UNKNOWN, DEADLINE_EXCEEDED, PERMISSION_DENIED,
# INTERNAL, UNAVAILABLE, DATA_LOSS): linkerd2-proxy client-policy grpc::Codes::default.
GRPC_FAILURE_LINKERD: Final = frozenset({2, 4, 7, 13, 14, 15})


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


class Observer(Protocol):
    """What the proxy calls for each relayed connection (see the module docstring)."""

    @property
    def opaque(self) -> bool:
        """True once the observer stopped looking: later calls are cheap no-ops."""
        ...

    @property
    def authority(self) -> str:
        """The first request's Host / :authority as a label value ("" if none yet)."""
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

    @property
    def authority(self) -> str:
        return ""

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


_AUTHORITY: Final = re.compile(
    r"[a-z0-9][a-z0-9.\-]{0,252}(:[0-9]{1,5})?|\[[0-9a-f:.]{2,45}\](:[0-9]{1,5})?")
# The Host header in a chunk holding (part of) an HTTP/1 request head.
_HOST_HEADER: Final = re.compile(rb"\r\n[Hh][Oo][Ss][Tt][ \t]*:[ \t]*([!-~]{1,300})[ \t]*\r\n")


def authority_label(raw: bytes | None) -> str:
    """A request's Host / :authority as a label value: lower-cased, a host name or an IP,
    with an optional port; anything else (or longer than a DNS name) is "" (no label)."""
    if not raw or len(raw) > 300:
        return ""
    text = raw.decode("ascii", "replace").lower()
    return text if _AUTHORITY.fullmatch(text) else ""


def host_in(head_bytes: bytes) -> str:
    """The Host header of the HTTP/1 request head in `head_bytes` as a label value ("" when
    the chunk does not hold a whole Host line)."""
    found = _HOST_HEADER.search(head_bytes)
    return authority_label(found.group(1)) if found else ""
