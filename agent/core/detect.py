"""Protocol detection from a connection's first client bytes, and the per-connection observer
that sniffs, then hands the byte streams to the HTTP/1 or HTTP/2 observer.

`detect(first_bytes)` is pure: HTTP/1.x when the bytes are (a prefix of) a request line
`METHOD SP target SP HTTP/1.x CRLF`, HTTP/2 on the 24-byte prior-knowledge preface, OPAQUE
for everything else (TLS ClientHello 0x16 0x03.., binary protocols, text protocols). It
returns None while the answer could still change, and decides by DETECT_LIMIT bytes at most:
a request line still valid after 64 bytes (a long URL) is taken as HTTP/1, as Linkerd does
(`linkerd/proxy/http/src/detect.rs`: "if the bytes so far look like http1, we'll assume it is").

`ConnectionObserver` needs no timer because it never delays bytes: it keeps at most
DETECT_LIMIT bytes of prefix, and if the *server* speaks before the client has said enough
(server-speaks-first protocols: MySQL, SMTP, SSH), the connection is OPAQUE. A proxy that
wants to decide *before* forwarding (to route by protocol) calls `detect` itself and owns
the give-up timer (Linkerd uses ~10 s); on expiry it treats the connection as OPAQUE.
"""

from __future__ import annotations

import enum
import re
from typing import TYPE_CHECKING, Final
from typing import Protocol as Interface

from agent.core.accounting import (
    GRPC_FAILURE_LINKERD,
    PROTOCOL_ERROR,
    Observer,
    OpaqueObserver,
    Record,
)
from agent.core.http1 import count_fast, http1_at_rest, http1_observer, reusable_after_hand_over
from agent.core.http2 import Http2Observer
from agent.core.tap import NEVER, TapSwitch

if TYPE_CHECKING:
    from agent.core.counters import HttpCounters


class Protocol(enum.Enum):
    HTTP1 = "http/1"
    HTTP2 = "h2"
    OPAQUE = "opaque"


DETECT_LIMIT: Final = 64
H2_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# A complete request line; methods are upper-case tokens (llhttp knows only those).
_REQUEST_LINE: Final = re.compile(rb"[A-Z][A-Z_-]{0,23} [!-~]+ HTTP/1\.[0-9]\r\n")
# Everything a request line can look like before it is complete.
_VERSION_PREFIXES: Final = b"|".join(
    re.escape(b"HTTP/1.x\r\n"[:n]) for n in range(9, -1, -1)
).replace(b"x", b"[0-9]")
_PARTIAL_REQUEST_LINE: Final = re.compile(
    rb"[A-Z][A-Z_-]{0,23}(?: (?:[!-~]+(?: (?:" + _VERSION_PREFIXES + rb"))?)?)?"
)


def detect(first_bytes: bytes) -> Protocol | None:
    """The protocol a connection speaks, from the client's first bytes; None: need more."""
    head = first_bytes[:DETECT_LIMIT]
    if not head:
        return None
    if head.startswith(H2_PREFACE):
        return Protocol.HTTP2
    if H2_PREFACE.startswith(head):
        return None  # b"P", b"PRI * HTTP/2" ...: could still be either
    if _REQUEST_LINE.match(head):
        return Protocol.HTTP1
    if _PARTIAL_REQUEST_LINE.fullmatch(head):
        return Protocol.HTTP1 if len(head) >= DETECT_LIMIT else None
    return Protocol.OPAQUE  # TLS (0x16 0x03 ..), binary and other text protocols


EARLY_SERVER_LIMIT: Final = 4096
# HTTP/1 connections taken back to the compiled fast path (ConnectionObserver.take_back) at
# most this often each: one whose every message leaves it again stays with Python after.
MAX_TAKE_BACKS: Final = 64


def _starts_like_settings(data: bytes) -> bool:
    """An HTTP/2 frame header (as far as present) of a SETTINGS frame on stream 0."""
    header = data[:9]
    if len(header) >= 4 and header[3] != 0x4:
        return False
    return len(header) < 9 or header[5:9] == b"\x00\x00\x00\x00"


def observer_for(protocol: Protocol, tap: TapSwitch = NEVER) -> Observer:
    """The agent's observers classify gRPC as Linkerd's proxy does."""
    if protocol is Protocol.HTTP1:
        return http1_observer(grpc_failures=GRPC_FAILURE_LINKERD, tap=tap)
    if protocol is Protocol.HTTP2:
        return Http2Observer(grpc_failures=GRPC_FAILURE_LINKERD, tap=tap)
    return OpaqueObserver()


class DirectFeed(Interface):
    """An observer the proxy may feed without the ConnectionObserver in between (the compiled
    HTTP/1 fast path or the HTTP/2 observer counting into its series:
    `ConnectionObserver.count_fast`). A feed
    returns None when the proxy has nothing to do, else the Records that ended (maybe none:
    then requests started, the observer turned opaque, or it stopped counting by itself);
    the proxy then settles with the ConnectionObserver and feeds that again."""

    def feed_client(self, data: bytes, now: float) -> list[Record] | None: ...

    def feed_server(self, data: bytes, now: float) -> list[Record] | None: ...


class ConnectionObserver:
    """One connection's observer: sniffs the first client bytes, then delegates.

    The proxy calls `feed_client` / `feed_server` per chunk: one call whose answer says
    whether there is anything to take (`take_started`, the Records returned, `opaque`).

    Also the last line of defence: if a protocol observer ever raises (a bug: they are
    written not to), the connection turns opaque and its in-flight requests end as
    failures, so the relay and the exactly-once accounting both survive.
    """

    __slots__ = ("_carried_started", "_early_server", "_inner", "_prefix", "_tap", "protocol",
                 "taken_back")

    def __init__(self, tap: TapSwitch = NEVER) -> None:
        self._tap = tap
        self.taken_back = 0  # hand-overs to Python ended by `take_back`
        self._prefix = b""
        self._early_server = b""  # an HTTP/2 server's SETTINGS that beat the client preface
        self._inner: Observer | None = None
        self._carried_started = 0  # started, not yet taken, by an observer that failed
        self.protocol: Protocol | None = None

    @property
    def opaque(self) -> bool:
        return self._inner is not None and self._inner.opaque

    @property
    def authority(self) -> str:
        return "" if self._inner is None else self._inner.authority

    @property
    def at_rest(self) -> bool:
        """HTTP/1 between messages: a clean point to close at. Never for HTTP/2 or opaque
        streams (they have no such point we can see), nor before the first byte is read."""
        inner = self._inner
        if inner is None:
            # Nothing read yet is not "between requests": a connection just accepted is not
            # read until its upstream is connected, and its request may wait in the kernel.
            return False
        return http1_at_rest(inner)

    def client_bytes(self, data: bytes, now: float) -> list[Record]:
        inner = self._inner
        if inner is None:
            prefix = self._prefix + data if self._prefix else data
            protocol = detect(prefix)
            if protocol is None:
                self._prefix = prefix
                return []
            inner = self._decide(protocol)
            data = prefix
        elif inner.opaque:
            return []
        try:
            records = inner.client_bytes(data, now)
            early, self._early_server = self._early_server, b""
            if early and self.protocol is Protocol.HTTP2:
                records += inner.server_bytes(early, now)
            return records
        except Exception:
            return self._abandon()

    def server_bytes(self, data: bytes, now: float) -> list[Record]:
        inner = self._inner
        if inner is None:
            # An HTTP/2 server sends SETTINGS on accept, and on the server's node they can
            # reach us before the client's preface: keep them (bounded) and let the client
            # decide. Any other server-first bytes (SMTP, MySQL, SSH...) mean opaque.
            early = self._early_server + data
            if len(early) <= EARLY_SERVER_LIMIT and _starts_like_settings(early):
                self._early_server = early
                return []
            self._early_server = b""
            self._decide(Protocol.OPAQUE)
            return []
        if inner.opaque:
            return []
        try:
            return inner.server_bytes(data, now)
        except Exception:
            return self._abandon()

    def feed_client(self, data: bytes, now: float) -> list[Record] | None:
        """`client_bytes` for the proxy: None when there is nothing to take (no request
        started or ended, not opaque), else the Records (maybe none)."""
        return self._answer(self.client_bytes(data, now))

    def feed_server(self, data: bytes, now: float) -> list[Record] | None:
        """`server_bytes` for the proxy, answered as `feed_client`."""
        return self._answer(self.server_bytes(data, now))

    def _answer(self, records: list[Record]) -> list[Record] | None:
        inner = self._inner
        if records or inner is None:
            return records or None
        started = inner.take_started()
        if started:
            self._carried_started += started
            return records
        return records if self._carried_started or inner.opaque else None

    def count_fast(self, counters: HttpCounters) -> DirectFeed | None:
        """Once the first request's series is known: let the protocol's observer count into
        it directly — the compiled HTTP/1 fast path (agent.core.http1.count_fast), the
        HTTP/2 observer (`Http2Observer.count_into`). Returns the observer the proxy may feed
        itself until a feed returns something; None when there is none."""
        inner = self._inner
        if isinstance(inner, Http2Observer):
            if inner.opaque:
                return None
            inner.count_into(counters)
            return inner
        return None if inner is None else count_fast(inner, counters)

    def take_back(self, counters: HttpCounters) -> DirectFeed | None:
        """An HTTP/1 connection the compiled fast path handed to the Python observer (for a
        tap of its pod, or for a message the fast path does not take) goes back to a fresh
        fast path, counting into `counters`, once the Python observer is between messages
        and no tap of the pod is open: a long-lived keep-alive connection is not left on the
        slow path by one odd message or one tap. The fresh one is returned for the proxy to
        feed; None while it cannot be (mid-message, tapped, not HTTP/1, not built)."""
        inner = self._inner
        if (inner is None or self.protocol is not Protocol.HTTP1 or self._tap.on
                or self.taken_back >= MAX_TAKE_BACKS or not reusable_after_hand_over(inner)):
            return None
        fresh = observer_for(Protocol.HTTP1, self._tap)
        fast = count_fast(fresh, counters)
        if fast is None:
            return None
        self._carried_started += inner.take_started()  # none: the proxy settled them
        self._inner = fresh
        self.taken_back += 1
        return fast

    def failed(self) -> list[Record]:
        """A direct feed raised (a bug: observers are written not to): as when a feed through
        this observer raises, the connection turns opaque and its requests end as failures."""
        return self._abandon()

    def closed(self, now: float, reset: bool) -> list[Record]:
        inner = self._inner
        if inner is None:
            self._decide(Protocol.OPAQUE)
            return []
        try:
            return inner.closed(now, reset)
        except Exception:
            return self._abandon()

    def take_started(self) -> int:
        carried, self._carried_started = self._carried_started, 0
        return carried + (0 if self._inner is None else self._inner.take_started())

    def abandon(self, error: str) -> list[Record]:
        if self._inner is None:
            self._decide(Protocol.OPAQUE)
            return []
        return self._inner.abandon(error)

    def _decide(self, protocol: Protocol) -> Observer:
        self.protocol = protocol
        self._prefix = b""
        if protocol is not Protocol.HTTP2:
            self._early_server = b""
        self._inner = observer_for(protocol, self._tap)
        return self._inner

    def _abandon(self) -> list[Record]:
        inner, self._inner = self._inner, OpaqueObserver()
        try:
            assert inner is not None
            self._carried_started += inner.take_started()
            return inner.abandon(PROTOCOL_ERROR)
        except Exception:
            return []
