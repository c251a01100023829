"""The mesh tunnel's I/O shell: mutual-TLS connections between agents on port 15008, each
driving one sans-IO `agent.core.tunnel.Connection`, with every stream on them presented to
the relay as an asyncio transport. The relay cannot tell a stream from a socket.

- `TunnelSession`: one TLS connection (client or server role). It feeds the bytes it reads
  to the Connection, turns events into calls on its streams, and writes what the
  Connection queues. Losing the TLS connection resets every stream on it.
- `StreamTransport`: one stream. Writes go out as DATA within the peer's windows (the rest
  waits for WindowOpened, and the relay is told to pause); received bytes are acknowledged
  only once the relay passed them on without pausing us, so a slow reader stalls its own
  stream, never its neighbours.
- Lanes (with the C transport, `agent.dataplane._tlsio`): a stream in steady state — accepted,
  reading, its relay counting in C or observing nothing, the other side connected — is
  registered as a `Lane` on its TLS connection, and its DATA frames are delivered by the
  transport itself: the relay's compiled observer and the pod's transport's write, called
  from C, without the session, the Connection or the relay in between. What a lane moved is
  counted as above — windows, credit, the relay's bytes, acknowledged only once passed on —
  when the transport reports it (`StreamTransport.lane_synced`: before the session sees any
  other frame, and after a read once `LANE_REPORT` of a stream's window or `LANE_CAP` of the
  connection's is pending: the peer never waits for credit held there) or when it is pulled
  (`sync_lanes`: every scrape and every sweep, so metrics and idle times are exact when
  read; a lane taken off). Anything out of the steady state (a pause, news from the observer,
  a FIN, a reset, the relay draining) takes the lane off; the stream's next frames come
  through the session, which registers the lane again when it may.

Memory per connection is bounded whatever the peer does. Received: every byte still in
this process is unacknowledged (a relay that cannot pass a chunk on pauses the stream, and
that chunk is acknowledged when it resumes), so the connection window bounds them all.
To send: once the bytes queued for the TLS connection reach `OUTPUT_HIGH` they are handed
to the transport at once, the transport pauses the session, and every stream's relay stops
reading until the peer reads: a peer that never reads holds about two `OUTPUT_HIGH`.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Mapping
from typing import Any, Final, cast

from agent.core import tunnel as core
from agent.core.telemetry import PeerLabels
from agent.core.tunnel import DataReceived
from agent.core.tunnel_frames import DEFAULT_CONNECTION_WINDOW, DEFAULT_WINDOW, describe_code
from agent.dataplane.tls import TunnelTls


def _tlsio_class(name: str) -> Any:
    """`agent.dataplane._tlsio.<name>` (None when not built: no transport has lanes then)."""
    try:
        from agent.dataplane import _tlsio
    except ImportError:
        return None
    return getattr(_tlsio, name)


_LANE: Final[Any] = _tlsio_class("Lane")
_SENDER: Final[Any] = _tlsio_class("Sender")

log = logging.getLogger(__name__)
OUTPUT_HIGH = 256 * 1024  # bytes queued for one TLS connection before every stream pauses
REPLAY_LIMIT = 64 * 1024  # bytes a client stream keeps until accepted, to move if refused
# Lanes are used when the transport has them (a plain global, not Final: tests turn them off)
LANES: bool = True
# A lane reports after a read once this share of the stream's window is pending, and every
# lane of a connection once this share of the connection's window may be: with the credit
# the Connection itself holds back (half a window), the peer always has a third of its
# windows left to send in.
LANE_REPORT: Final = 16  # initial_window // 16
LANE_CAP: Final = 8  # connection_window // 8
# Senders are used when the transport has them (a plain global, not Final: tests turn them off)
SENDERS: bool = True
SENDER_GRANT: Final = 64 * 1024  # send credit handed to a sender at a time, at most
_LANED: set[TunnelSession] = set()  # sessions whose transport has lanes
_PEER_SENDS: Final = frozenset((core.StreamState.OPEN, core.StreamState.HALF_CLOSED_LOCAL))


class StreamTransport:
    """One tunnel stream, with the parts of asyncio.Transport the relay uses."""

    __slots__ = ("_closing", "_eof_sent", "_eof_wanted", "_held", "_held_eof", "_high",
                 "_lane_counted", "_lost", "_owed", "_paused", "_pending", "_pending_size",
                 "_write_paused", "accepted", "lane", "on_refused", "protocol", "replay",
                 "replay_size", "sender", "session", "stream_id")

    def __init__(self, session: TunnelSession, stream_id: int, protocol: asyncio.Protocol) -> None:
        self.session = session
        self.stream_id = stream_id
        self.protocol = protocol
        self._high = 64 * 1024
        self._pending: list[bytes] = []  # written, waiting for the peer's window
        self._pending_size = 0
        self._eof_wanted = False  # write_eof called while bytes were pending
        self._eof_sent = False
        self._closing = False
        self._lost = False
        self._paused = False  # the relay paused reading: hold bytes, hold credit
        self._held: list[bytes] = []
        self._held_eof = False
        self._owed = 0  # delivered, but the relay still holds them: acknowledged on resume
        self._write_paused = False
        self.accepted = session.is_client  # a server stream is accepted when the relay reads
        # Client: what we sent before the peer accepted the stream. Refused (GOAWAY) or cut
        # off before its ACK, the stream never reached the destination: `on_refused` may
        # carry these bytes to another connection instead of failing the client.
        self.replay: list[bytes] | None = [] if session.is_client else None
        self.replay_size = 0
        self.on_refused: Callable[[list[bytes]], bool] | None = None
        self.lane: Any = None  # a _tlsio.Lane, registered on the C transport: DATA delivered there
        self._lane_counted: Callable[[int, int], None] | None = None  # the relay's, bound once
        self.sender: Any = None  # a _tlsio.Sender once granted credit: writes framed in C

    # ---------------------------------------------------------------- transport API

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self.session.peername
        return default  # no "socket": a stream has none to reset by SO_LINGER

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = high if high is not None else self._high

    def is_closing(self) -> bool:
        return self._closing or self._lost

    def can_write_eof(self) -> bool:
        return True

    def write(self, data: bytes) -> None:
        """The sender's fallback too (no credit left, the session holding frames, the TLS
        connection paused): its credit comes back first, this write goes through the
        Connection, and the sender gets credit again if the stream may still use it."""
        self._sender_off()
        if self._closing or self._lost or not data:
            return
        replay = self.replay
        if replay is not None:
            self.replay_size += len(data)
            if self.replay_size > REPLAY_LIMIT:
                self.replay = None  # too much to keep: this stream cannot move any more
            else:
                replay.append(data)
        if not self.accepted:
            self._ensure_accepted()
        session = self.session
        if self._pending or session.write_paused:
            self._hold_output(data)
            return
        try:
            sent = self._send_data(data)
        except core.LocalProtocolError:
            return  # the stream was reset meanwhile; connection_lost is on its way
        if sent < len(data):
            self._hold_output(data[sent:])
        session.flush()
        self._grant()

    def writelines(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.write(chunk)

    def write_eof(self) -> None:
        self._sender_off()
        if self.is_closing() or self._eof_sent:
            return
        self._ensure_accepted()
        if self._pending:
            self._eof_wanted = True
            return
        self._send_fin()

    def pause_reading(self) -> None:
        self._paused = True
        self.lane_off()

    def resume_reading(self) -> None:
        self._ensure_accepted()
        if not self._paused:
            return
        self._paused = False
        owed, self._owed = self._owed, 0
        if owed and not self._lost:
            self.session.connection.acknowledge(self.stream_id, owed)
        held = self._held
        while held and not self._paused:
            self.data_received(held.pop(0))
        if self._held_eof and not self._paused:
            self._held_eof = False
            self.eof_received()
        self.session.flush()  # the credit for what was just delivered

    def close(self) -> None:
        """Graceful: our FIN once pending bytes are out; the stream ends with the peer's."""
        if self._closing or self._lost:
            return
        self.lane_off()
        self.write_eof()  # (the sender's credit back first)
        self._closing = True
        if self.session.connection.stream_state(self.stream_id) is core.StreamState.CLOSED:
            self._lose(None)

    def abort(self) -> None:
        """Reset the stream (RST); CONNECT_ERROR when a server stream was never accepted."""
        if self._lost:
            return
        self.lane_off()
        self._sender_off()
        code = core.ErrorCode.CANCEL if self.accepted else core.ErrorCode.CONNECT_ERROR
        connection = self.session.connection
        if not connection.terminated:
            connection.reset_stream(self.stream_id, code)
            self.session.flush()
        self._closing = True
        asyncio.get_running_loop().call_soon(self._lose, None)

    # ---------------------------------------------------------------- from the session

    def data_received(self, data: bytes) -> None:
        if self._lost:
            return
        if self._paused:
            self._held.append(data)
            return
        if not self._closing:
            self.protocol.data_received(data)
            if self._paused:  # the relay could not pass it all on: it is still in memory
                self._owed += len(data)
                return
        self.session.connection.acknowledge(self.stream_id, len(data))
        if self.lane is None and self.session.lanes is not None and not self._closing:
            self._register_lane()

    def eof_received(self) -> None:
        self.lane_off()
        if self._paused:
            self._held_eof = True
            return
        if not self._closing:
            self.protocol.eof_received()
        if self.session.connection.stream_state(self.stream_id) is core.StreamState.CLOSED:
            self._lose(None)

    def window_opened(self) -> None:
        """The peer's windows grew, or the session may write again: send what waits."""
        if self._lost:
            return
        pending, self._pending, self._pending_size = self._pending, [], 0
        session = self.session
        for index, data in enumerate(pending):
            try:
                sent = 0 if session.write_paused else self._send_data(data)
            except core.LocalProtocolError:
                return  # reset meanwhile (an abort whose connection_lost is on its way)
            if sent < len(data):
                rest = [data[sent:], *pending[index + 1:]]
                self._pending, self._pending_size = rest, sum(map(len, rest))
                break
        session.flush()
        if self._pending:
            return
        if self._eof_wanted:
            self._send_fin()
        if self._write_paused and not self.session.write_paused:
            self._write_paused = False
            self.protocol.resume_writing()
        self._grant()

    def pause_writing(self) -> None:
        if not self._write_paused:
            self._write_paused = True
            self.protocol.pause_writing()

    def resume_writing(self) -> None:
        if self._pending:
            self.window_opened()  # resumes the relay once what waits is out
        elif self._write_paused:
            self._write_paused = False
            self.protocol.resume_writing()

    def peer_accepted(self) -> None:
        self.replay = None  # the destination has it now: never sent twice
        self._grant()

    def reset_by_peer(self, error_code: int) -> None:
        exc = ConnectionResetError(f"stream reset by peer ({describe_code(error_code)})")
        self._lose(exc, refused=error_code == core.ErrorCode.REFUSED_STREAM)

    def _lose(self, exc: Exception | None, refused: bool = False) -> None:
        """`refused`: the peer said it did not take the stream; a lost connection says the
        same of a stream it had not accepted yet (it connects upstream before accepting)."""
        if self._lost:
            return
        self.lane_off()
        self._sender_off()
        self._lost = True
        self._held.clear()
        self._pending.clear()
        self.session.forget(self.stream_id)
        replay, self.replay = self.replay, None
        if (replay is not None and (refused or exc is not None) and self.on_refused is not None
                and not self._closing and self.on_refused(replay)):
            return  # carried over to another connection: the relay never notices
        self.protocol.connection_lost(exc)

    # ---------------------------------------------------------------- lanes

    def _register_lane(self) -> None:
        """In steady state: let the C transport deliver this stream's DATA (module docstring).
        Asked after every delivery through the session while there is no lane."""
        lanes = self.session.lanes
        parts = getattr(self.protocol, "lane_parts", None)
        connection = self.session.connection
        if (lanes is None or parts is None or self._paused or self._held or not self.accepted
                or connection.buffered_input
                or connection.stream_state(self.stream_id) not in _PEER_SENDS):
            return
        found = parts(self.lane_off)
        if found is None:
            return
        feed, write, is_closing = found
        self._lane_counted = getattr(self.protocol, "lane_counted", None)
        lane = self.lane = _LANE(self.stream_id, feed, write, is_closing, self._lane_news,
                                 self.lane_synced, connection.initial_window // LANE_REPORT)
        lanes[self.stream_id] = lane

    def lane_off(self) -> None:
        """Deliver through the session again; what the lane moved is counted now (a chunk it
        is still writing, by the transport's report after it)."""
        lane = self.lane
        if lane is not None:
            self.lane = None
            lane.off()
            lanes = self.session.lanes
            if lanes is not None and lanes.get(self.stream_id) is lane:
                del lanes[self.stream_id]
            self.lane_pull(lane)

    def lane_pull(self, lane: Any) -> None:
        """Count what `lane` delivered and has not reported (no chunk of it is in flight)."""
        received, chunks = lane.take()
        if received:
            self._lane_count(received, chunks, 0)

    def lane_synced(self, received: int, chunks: int, last: int) -> None:
        """The transport's report: `received` bytes in `chunks` DATA frames delivered on this
        stream's lane, the last of `last` bytes (owed when it left the relay paused)."""
        owed = last if self._paused and not self._closing and not self._lost else 0
        self._lane_count(received, chunks, owed)

    def _lane_count(self, received: int, chunks: int, owed: int) -> None:
        session = self.session
        connection = session.connection
        if connection.terminated:
            return  # nothing more is counted or credited on it
        if not connection.lane_received(self.stream_id, received, received - owed):
            session.lane_failed()  # the peer broke a window
            return
        self._owed += owed  # the last chunk filled the pod's buffer: acknowledged on resume
        counted = self._lane_counted
        if counted is not None:
            counted(received, chunks)
        if connection.has_output:
            session.flush()  # credit due

    def _lane_news(self, records: object) -> None:
        """The observer had news for the relay (or raised: None); the lane is off."""
        self.lane_off()
        news = getattr(self.protocol, "lane_news", None)
        if news is not None:
            news(records)

    # ---------------------------------------------------------------- senders

    def _grant(self) -> None:
        """In steady state (accepted by both ends, nothing waiting, not ending, the TLS
        connection not paused): credit for the stream's Sender, which frames the relay's
        writes in C until it runs out (module docstring)."""
        session = self.session
        if (not session.senders or self._pending or self._closing or self._lost or self._eof_wanted
                or self._eof_sent or not self.accepted or self.replay is not None
                or session.write_paused):
            return
        sender = self.sender
        if sender is None:
            use = getattr(self.protocol, "use_sender", None)
            if use is None:
                return
            sender = self.sender = _SENDER(session.transport, self.stream_id, self.write,
                                           self.is_closing)
            use(sender.write, sender.is_closing)
        credit = session.connection.grant(self.stream_id, SENDER_GRANT)
        if credit:
            sender.grant(credit)

    def _sender_off(self) -> None:
        """The sender's credit back to the windows: writes go through the Connection."""
        sender = self.sender
        if sender is not None and sender.active:
            unused, sent = sender.take()
            self.session.connection.give_back(self.stream_id, unused, sent)

    def _send_data(self, data: bytes) -> int:
        """Connection.send_data; short of the connection's window while senders hold credit,
        their credit comes back (idle streams must not keep it from this one) and it tries
        once more."""
        connection = self.session.connection
        sent = connection.send_data(self.stream_id, data)
        if sent < len(data) and connection.granted and self.session.take_credit_back():
            sent += connection.send_data(self.stream_id, data[sent:])
        return sent

    # ---------------------------------------------------------------- internals

    def _hold_output(self, data: bytes) -> None:
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size > self._high:
            self.pause_writing()

    def _send_fin(self) -> None:
        self._eof_wanted = False
        self._eof_sent = True
        try:
            self.session.connection.end_stream(self.stream_id)
        except core.LocalProtocolError:
            return
        self.session.flush()
        if self._closing and \
                self.session.connection.stream_state(self.stream_id) is core.StreamState.CLOSED:
            self._lose(None)

    def _ensure_accepted(self) -> None:
        if not self.accepted:
            self.accepted = True
            self.session.connection.accept_stream(self.stream_id)
            self.session.flush()


StreamOpenedHandler = Callable[["TunnelSession", int, int, Mapping[str, str]], None]


class TunnelSession(asyncio.Protocol):
    """One TLS connection between two agents and the streams multiplexed on it."""

    def __init__(self, role: core.Role, on_stream: StreamOpenedHandler | None = None,
                 on_closed: Callable[[TunnelSession], None] | None = None,
                 admit: Callable[[TunnelSession, asyncio.BaseTransport], bool] | None = None,
                 initial_window: int = DEFAULT_WINDOW, max_streams: int = 256,
                 connection_window: int = DEFAULT_CONNECTION_WINDOW,
                 tls: TunnelTls | None = None) -> None:
        self.connection = core.Connection(role, initial_window, max_streams, connection_window)
        # Set: the transport is plain TCP and this session opens and seals the TLS records
        # itself (agent/dataplane/tls.py); None: the transport does (the C TlsTransport).
        self.tls = tls
        self.is_client = role == "client"
        self.transport: asyncio.Transport | None = None
        # transport.write and .is_closing, bound once (a method call looks them up each time)
        self._send: Callable[[bytes], object] | None = None
        self._transport_closing: Callable[[], bool] = _not_connected
        self.peername: tuple[Any, ...] | None = None  # (host, port), or IPv6's four
        self.peer_id = ""  # the verified SPIFFE ID, once the handshake is checked
        self.labels = PeerLabels()
        self.streams: dict[int, StreamTransport] = {}
        self.write_paused = False
        self.idle_since: float = 0.0
        self._on_stream = on_stream
        self._on_closed = on_closed
        self._admit = admit
        self._closed = False
        self._flush_scheduled = False
        self._call_soon: Callable[..., Any] | None = None  # the loop's, once connected
        # the C transport's lanes (stream id -> Lane); None: no transport that has them
        self.lanes: dict[int, Any] | None = None
        self.senders = False  # the C transport frames streams' writes (_tlsio.Sender)

    # ------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._send = self.transport.write
        self._transport_closing = self.transport.is_closing
        self.transport.set_write_buffer_limits(high=OUTPUT_HIGH)
        self.peername = transport.get_extra_info("peername")
        loop = asyncio.get_running_loop()
        self._call_soon = loop.call_soon
        self.idle_since = loop.time()
        if self._admit is not None and not self._admit(self, transport):
            self._closed = True  # identity refused: not a word, not a stream
            self.transport.abort()
            return
        lanes = self.lanes = getattr(transport, "lanes", None) if LANES else None
        if lanes is not None:  # (until _shutdown: a session admitted always gets there)
            cast(Any, transport).lane_cap = self.connection.connection_window // LANE_CAP
            _LANED.add(self)
        self.senders = SENDERS and _SENDER is not None and hasattr(transport, "session_queued")
        self.flush()  # our preface
        if self.tls is not None and self.tls.has_input:  # came with the handshake's last bytes
            self.data_received(b"")

    @property
    def ssl_object(self) -> Any:
        """The connection's `ssl.SSLObject` (the peer's certificate, the cipher)."""
        if self.tls is not None:
            return self.tls.ssl_object
        return None if self.transport is None else self.transport.get_extra_info("ssl_object")

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        tls = self.tls
        if tls is not None:
            try:
                data = tls.open(data)
            except ssl.SSLError as exc:  # a record that does not open: nothing more can
                self._fatal(exc)
                return
            if tls.has_output and self.transport is not None:
                self.transport.write(tls.output())
            if tls.peer_closed:
                if data:
                    self._received(data)
                if not self._closed and not self.eof_received() and self.transport is not None:
                    self.transport.close()
                return
            if not data:
                return
        self._received(data)

    def _received(self, data: bytes) -> None:
        streams = self.streams
        for event in self.connection.receive_data(data):
            if type(event) is DataReceived:  # most events: inline, one Python call fewer
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.data_received(event.data)
                else:  # nobody reads it: give the credit back rather than stall the peer
                    self.connection.acknowledge(event.stream_id, len(event.data))
            else:
                self._dispatch(event)
        self.flush()
        if self.connection.terminated:
            self._shutdown(ConnectionResetError(self._why()))

    def eof_received(self) -> bool:
        return False  # the peer is done: close, and reset whatever streams remain

    def pause_writing(self) -> None:
        self.write_paused = True
        for stream in list(self.streams.values()):
            stream.pause_writing()

    def resume_writing(self) -> None:
        self.write_paused = False
        for stream in list(self.streams.values()):
            if self.write_paused:  # what waited filled the transport again
                break
            stream.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if isinstance(exc, ssl.SSLError):  # the C transport's bad record or fatal alert
            log.info("mesh tunnel with %s: TLS failed: %s", self.peername, exc)
        self._shutdown(exc or ConnectionResetError("mesh tunnel connection closed"))

    # ----------------------------------------------------------------- streams

    def open_stream(self, protocol: asyncio.Protocol, port: int,
                    metadata: Mapping[str, str]) -> StreamTransport:
        """Client: a new stream to `port` for `protocol` (its connection_made is called)."""
        stream_id = self.connection.open_stream(port, metadata)
        stream = self.attach(stream_id, protocol)
        self.flush()
        return stream

    def attach(self, stream_id: int, protocol: asyncio.Protocol) -> StreamTransport:
        stream = self.streams[stream_id] = StreamTransport(self, stream_id, protocol)
        protocol.connection_made(cast(asyncio.Transport, stream))
        if self.write_paused:
            stream.pause_writing()
        return stream

    def refuse(self, stream_id: int, error_code: int = core.ErrorCode.REFUSED_STREAM) -> None:
        self.connection.reset_stream(stream_id, error_code)
        self.flush()

    def forget(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)
        if not self.streams:
            self.idle_since = asyncio.get_running_loop().time()
            if self.connection.finished and not self._closed:
                self.close()

    def go_away(self) -> None:
        """This agent is stopping: no new streams on this connection either way (the peer
        opens its next ones elsewhere; any it opened meanwhile are refused, and moved);
        streams open now run to completion, then the connection closes."""
        if self._closed or self.connection.terminated:
            return
        self.connection.goaway(core.ErrorCode.NO_ERROR)
        self.flush()
        if not self.streams:
            self.close()

    @property
    def available(self) -> bool:
        """Can take a new stream now."""
        connection = self.connection
        return (not self._closed and not connection.going_away
                and connection.stream_count < connection.max_streams)

    def flush(self) -> None:
        """Write what the connection queued, at the end of this event-loop iteration: the
        frames of every stream that moved in one iteration leave in one TLS record and one
        send, instead of one each (an ACK, a response and its FIN are often three)."""
        connection = self.connection
        if connection.queued_data >= OUTPUT_HIGH:
            self._write_queued()  # now: the transport pauses every stream if the peer lags
        elif not self._flush_scheduled and connection.has_output and self._call_soon is not None:
            self._flush_scheduled = True
            if self.senders:  # senders' writes come after these frames: they go through us
                cast(Any, self.transport).session_queued = True
            self._call_soon(self._write_queued)

    def _write_queued(self) -> None:
        self._flush_scheduled = False
        if self.senders:
            cast(Any, self.transport).session_queued = False
        data = self.connection.data_to_send()
        send = self._send
        if data and send is not None and not self._transport_closing():
            tls = self.tls
            if tls is not None:
                try:
                    data = tls.seal(data)
                except ssl.SSLError as exc:
                    self._fatal(exc)
                    return
            send(data)

    def close(self, error_code: int = core.ErrorCode.NO_ERROR) -> None:
        """GOAWAY, then close the TLS connection (streams still open are reset)."""
        if self._closed:
            return
        if not self.connection.terminated:
            self.connection.goaway(error_code)
            self.flush()
        self._shutdown(ConnectionResetError("mesh tunnel connection closed by this agent"))

    # ---------------------------------------------------------------- internals

    def _dispatch(self, event: core.Event) -> None:
        """Every event but DataReceived (data_received handles those itself), most frequent
        first: every stream brings StreamEnded and StreamAccepted."""
        if isinstance(event, core.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.eof_received()
        elif isinstance(event, core.StreamAccepted):
            stream = self.streams.get(event.stream_id)
            if stream is not None:  # it could send already; now it can no longer be moved
                stream.peer_accepted()
        elif isinstance(event, core.StreamOpened):
            if self._on_stream is None:
                self.refuse(event.stream_id)
            else:
                self._on_stream(self, event.stream_id, event.port, event.metadata)
        elif isinstance(event, core.StreamReset):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.reset_by_peer(event.error_code)
        elif isinstance(event, core.WindowOpened):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.window_opened()
        elif isinstance(event, core.ConnectionTerminated):
            if event.error_code != core.ErrorCode.NO_ERROR or not event.by_peer:
                log.info("mesh tunnel with %s: %s", self.peername, event.reason)
            elif not self.streams:
                self.close()  # the peer is going away and nothing is left to finish

    def take_credit_back(self) -> bool:
        """Every sender's unused credit back to the windows: False when none held any."""
        if not self.connection.granted:
            return False
        for stream in list(self.streams.values()):
            stream._sender_off()
        return True

    def sync_lanes(self) -> None:
        """Count what every lane delivered and has not reported."""
        lanes = self.lanes
        if lanes:
            for stream_id, lane in list(lanes.items()):
                stream = self.streams.get(stream_id)
                if stream is not None:
                    stream.lane_pull(lane)

    def lane_failed(self) -> None:
        """A lane's report broke a window (the Connection failed and queued GOAWAY)."""
        log.info("mesh tunnel with %s: %s", self.peername, self._why())
        self._shutdown(ConnectionResetError(self._why()))

    def _fatal(self, exc: Exception) -> None:
        """The TLS layer failed (a bad record, a fatal alert): no more bytes either way."""
        log.info("mesh tunnel with %s: TLS failed: %s", self.peername, exc)
        if self.transport is not None:
            self.transport.abort()  # first: nothing more is sealed or sent
        self._shutdown(exc)

    def _why(self) -> str:
        error = self.connection.error
        return f"mesh tunnel protocol error: {error}" if error else "mesh tunnel ended by the peer"

    def _shutdown(self, exc: Exception) -> None:
        if self._closed:
            return
        self._closed = True
        if self.transport is not None:
            self._write_queued()  # a GOAWAY, the last frames: before the TLS close_notify
            if self.tls is not None and not self.transport.is_closing():
                self.transport.write(self.tls.close_notify())
            self.transport.close()
        for stream in list(self.streams.values()):
            stream._lose(exc)
        self.streams.clear()
        _LANED.discard(self)
        if self.lanes:
            self.lanes.clear()
        if self._on_closed is not None:
            self._on_closed(self)


def _not_connected() -> bool:
    return True


def sync_lanes() -> None:
    """Every lane's unreported bytes counted (windows, credit, the relays' bytes and activity):
    before metrics are read and before idle connections are looked for."""
    for session in list(_LANED):
        session.sync_lanes()


# ------------------------------------------------------------------- handshake errors


def handshake_failure_reason(exc: BaseException) -> str:
    """A short, bounded label for why a TLS handshake failed (a metrics label)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        if code == 10:  # X509_V_ERR_CERT_HAS_EXPIRED
            return "expired"
        if code == 9:  # X509_V_ERR_CERT_NOT_YET_VALID
            return "not_yet_valid"
        if code in (2, 18, 19, 20, 21):  # no issuer / self-signed: another trust anchor
            return "unknown_ca"
        return "bad_certificate"
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").upper()
        for marker, label in (("EXPIRED", "expired"), ("UNKNOWN_CA", "unknown_ca"),
                              ("DID_NOT_RETURN_A_CERTIFICATE", "no_certificate"),
                              ("CERTIFICATE_REQUIRED", "no_certificate"),
                              ("BAD_CERTIFICATE", "bad_certificate"),
                              ("PROTOCOL_VERSION", "protocol_version"),
                              ("NO_SHARED_CIPHER", "no_shared_cipher"),
                              ("HTTP_REQUEST", "not_tls"), ("WRONG_VERSION_NUMBER", "not_tls"),
                              ("UNSUPPORTED_PROTOCOL", "protocol_version"),
                              ("PACKET_LENGTH_TOO_LONG", "not_tls"),
                              ("RECORD_LAYER_FAILURE", "not_tls")):
            if marker in reason:
                return label
        return "tls_error"
    if isinstance(exc, TimeoutError):  # asyncio.TimeoutError is the same class since 3.11
        return "timeout"
    if isinstance(exc, ConnectionError | EOFError):
        return "eof"
    return "error"
