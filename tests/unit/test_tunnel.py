"""The mesh tunnel's framing and stream state machine, told as stories: bytes in, exact
events and exact bytes out. No sockets; a client and a server Connection are wired to
each other in memory where a story needs both ends."""

from __future__ import annotations

import struct
import time
from collections.abc import Callable

import pytest

from agent.core.tunnel import (
    HEADER_MEMORY,
    HEADER_MEMORY_BYTES,
    RESET_MEMORY,
    Connection,
    ConnectionTerminated,
    DataReceived,
    ErrorCode,
    Event,
    LocalProtocolError,
    PingReceived,
    PongReceived,
    RemoteProtocolError,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamReset,
    StreamState,
    WindowOpened,
)
from agent.core.tunnel_frames import (
    ACK,
    DATA,
    DEFAULT_CONNECTION_WINDOW,
    FIN,
    GOAWAY,
    INITIAL_CONNECTION_WINDOW,
    MAX_FRAME_PAYLOAD,
    PING,
    RST,
    SYN,
    VERSION,
    WINDOW_UPDATE,
    encode_open_header,
)

KIB = 1024
WEB = {"namespace": "shop", "pod": "web-7d9f", "service_account": "web"}


# ------------------------------------------------------------------ frame builders


def frame(frame_type: int, flags: int, stream_id: int, length: int, payload: bytes = b"",
          version: int = VERSION) -> bytes:
    return struct.pack(">BBHII", version, frame_type, flags, stream_id, length) + payload


def preface(window: int = 256 * KIB) -> bytes:
    return frame(WINDOW_UPDATE, 0, 0, window)


def opening(window: int = 256 * KIB, connection_window: int = DEFAULT_CONNECTION_WINDOW) -> bytes:
    """What an agent sends first: its preface, then the rest of its connection window."""
    extra = connection_window - INITIAL_CONNECTION_WINDOW
    return preface(window) + (frame(WINDOW_UPDATE, 0, 0, extra) if extra else b"")


def syn(stream_id: int, port: int = 8080, metadata: dict[str, str] | None = None, flags: int = SYN) -> bytes:
    header = encode_open_header(port, WEB if metadata is None else metadata)
    return frame(DATA, flags, stream_id, len(header), header)


def raw_syn(stream_id: int, open_header: bytes) -> bytes:
    return frame(DATA, SYN, stream_id, len(open_header), open_header)


def data(stream_id: int, payload: bytes, flags: int = 0) -> bytes:
    return frame(DATA, flags, stream_id, len(payload), payload)


def fin(stream_id: int) -> bytes:
    return frame(DATA, FIN, stream_id, 0)


def credit(stream_id: int, nbytes: int, flags: int = 0) -> bytes:
    return frame(WINDOW_UPDATE, flags, stream_id, nbytes)


def ack(stream_id: int, nbytes: int = 0) -> bytes:
    return credit(stream_id, nbytes, ACK)


def rst(stream_id: int, code: int) -> bytes:
    return frame(WINDOW_UPDATE, RST, stream_id, code)


def goaway(code: int) -> bytes:
    return frame(GOAWAY, 0, 0, code)


# --------------------------------------------------------------------------- helpers


def server_after_preface(**options: int) -> Connection:
    server = Connection("server", **options)
    assert server.data_to_send() == opening(server.initial_window, server.connection_window)
    assert server.receive_data(opening()) == []
    return server


def client_after_preface(window: int = 256 * KIB, **options: int) -> Connection:
    client = Connection("client", **options)
    client.data_to_send()
    assert client.receive_data(opening(window)) == []
    return client


def server_with_stream(stream_id: int = 1, **options: int) -> Connection:
    server = server_after_preface(**options)
    [opened] = server.receive_data(syn(stream_id))
    assert isinstance(opened, StreamOpened)
    server.accept_stream(stream_id)
    assert server.data_to_send() == ack(stream_id)
    return server


def client_with_stream(window: int = 256 * KIB, **options: int) -> Connection:
    client = client_after_preface(window, **options)
    assert client.open_stream(8080, WEB) == 1
    client.data_to_send()
    assert client.receive_data(ack(1)) == [StreamAccepted(1)]
    return client


def assert_terminated(connection: Connection, events: list[Event], code: ErrorCode) -> None:
    """The peer's garbage ended the connection cleanly: one GOAWAY out, one event."""
    assert isinstance(events[-1], ConnectionTerminated)
    assert (events[-1].error_code, events[-1].by_peer) == (code, False)
    assert connection.data_to_send() == goaway(code)
    assert connection.terminated and connection.stream_count == 0 and connection.buffered_input == 0
    assert isinstance(connection.error, RemoteProtocolError)
    assert connection.receive_data(data(1, b"more") + preface()) == []  # later input is ignored
    assert connection.data_to_send() == b""
    with pytest.raises(LocalProtocolError):
        connection.ping()


class Pair:
    """A client and a server Connection wired to each other in memory."""

    def __init__(self, client_window: int = 256 * KIB, server_window: int = 256 * KIB,
                 max_streams: int = 256, server_connection_window: int = DEFAULT_CONNECTION_WINDOW) -> None:
        self.client = Connection("client", initial_window=client_window)
        self.server = Connection("server", initial_window=server_window, max_streams=max_streams,
                                 connection_window=server_connection_window)
        assert self.to_server() == [] and self.to_client() == []

    def to_server(self) -> list[Event]:
        return self.server.receive_data(self.client.data_to_send())

    def to_client(self) -> list[Event]:
        return self.client.receive_data(self.server.data_to_send())

    def open(self, port: int = 8080, metadata: dict[str, str] | None = None) -> int:
        stream_id = self.client.open_stream(port, WEB if metadata is None else metadata)
        assert self.to_server() == [StreamOpened(stream_id, port, WEB if metadata is None else metadata)]
        self.server.accept_stream(stream_id)
        assert self.to_client() == [StreamAccepted(stream_id)]
        return stream_id


# ------------------------------------------------------------------------ wire format


def test_each_side_starts_with_a_preface_then_grants_its_connection_window() -> None:
    assert Connection("client", initial_window=64 * KIB).data_to_send() == bytes.fromhex(
        "02 01 0000 00000000 00010000"  # WINDOW_UPDATE on stream 0: 64 KiB per stream
        "02 01 0000 00000000 000f0000")  # then connection credit: 64 KiB + 960 KiB = 1 MiB
    assert Connection("server", connection_window=INITIAL_CONNECTION_WINDOW).data_to_send() == \
        bytes.fromhex("02 01 0000 00000000 00040000")  # the initial 64 KiB: nothing to add


def test_opening_a_stream_sends_the_open_header_with_port_and_metadata() -> None:
    client = client_after_preface()
    assert client.open_stream(8080, {"ns": "web"}) == 1
    assert client.data_to_send() == bytes.fromhex(
        "02 00 0001 00000001 0000000b"  # DATA|SYN, stream 1, 11 bytes
        "1f90 01"  # port 8080, one entry
        "02 6e73 0003 776562")  # "ns" = "web"
    assert client.open_stream(443, {}) == 3
    assert client.data_to_send() == bytes.fromhex("02 00 0001 00000003 00000003 01bb 00")


def test_frames_of_every_kind_have_their_exact_bytes() -> None:
    client = client_with_stream()
    assert client.send_data(1, b"hi") == 2
    client.end_stream(1)
    assert client.ping(7) == 7
    assert client.data_to_send() == bytes.fromhex(
        "02 00 0000 00000001 00000002 6869"  # DATA "hi"
        "02 00 0004 00000001 00000000"  # DATA|FIN
        "02 02 0001 00000000 00000007")  # PING|SYN 7
    client.reset_stream(1, ErrorCode.CANCEL)
    client.goaway()
    assert client.data_to_send() == bytes.fromhex(
        "02 01 0008 00000001 00000007"  # WINDOW_UPDATE|RST, CANCEL
        "02 03 0000 00000000 00000000")  # GOAWAY NO_ERROR


def test_a_send_larger_than_a_frame_is_split_into_maximal_frames() -> None:
    client = client_with_stream()
    payload = bytes(range(256)) * 520  # 133120 bytes: 64 KiB + 64 KiB + 2048
    assert client.send_data(1, payload) == len(payload)
    assert client.data_to_send() == (data(1, payload[:MAX_FRAME_PAYLOAD])
                                     + data(1, payload[MAX_FRAME_PAYLOAD:2 * MAX_FRAME_PAYLOAD])
                                     + data(1, payload[2 * MAX_FRAME_PAYLOAD:]))


# --------------------------------------------------------------------- stream stories


def test_server_sees_the_stream_with_its_metadata_accepts_it_and_exchanges_bytes() -> None:
    server = server_after_preface()
    assert server.receive_data(syn(1) + data(1, b"GET / HTTP/1.1\r\n")) == [
        StreamOpened(1, 8080, WEB), DataReceived(1, b"GET / HTTP/1.1\r\n")]
    with pytest.raises(LocalProtocolError, match="accept"):
        server.send_data(1, b"too early")
    server.accept_stream(1)
    assert server.send_data(1, b"HTTP/1.1 200 OK\r\n") == 17
    assert server.data_to_send() == ack(1) + data(1, b"HTTP/1.1 200 OK\r\n")
    assert server.stream_state(1) is StreamState.OPEN


def test_client_may_send_before_the_ack_and_learns_of_the_acceptance() -> None:
    client = client_after_preface()
    stream_id = client.open_stream(8080, WEB)
    assert client.send_data(stream_id, b"early") == 5
    assert client.data_to_send() == syn(1) + data(1, b"early")
    assert client.receive_data(ack(1) + data(1, b"reply")) == [StreamAccepted(1), DataReceived(1, b"reply")]


def test_server_refuses_a_stream_whose_destination_does_not_answer() -> None:
    pair = Pair()
    stream_id = pair.client.open_stream(9999, WEB)
    pair.client.send_data(stream_id, b"hello?")
    assert pair.to_server() == [StreamOpened(1, 9999, WEB), DataReceived(1, b"hello?")]
    pair.server.reset_stream(1, ErrorCode.CONNECT_ERROR)
    assert pair.server.data_to_send() == rst(1, ErrorCode.CONNECT_ERROR)
    assert pair.client.receive_data(rst(1, ErrorCode.CONNECT_ERROR)) == [
        StreamReset(1, ErrorCode.CONNECT_ERROR)]
    assert pair.client.stream_count == pair.server.stream_count == 0


def test_client_half_closes_first_and_the_server_keeps_sending() -> None:
    pair = Pair()
    stream_id = pair.open()
    pair.client.send_data(stream_id, b"request")
    pair.client.end_stream(stream_id)
    assert pair.client.stream_state(stream_id) is StreamState.HALF_CLOSED_LOCAL
    assert pair.to_server() == [DataReceived(1, b"request"), StreamEnded(1)]
    assert pair.server.stream_state(stream_id) is StreamState.HALF_CLOSED_REMOTE
    with pytest.raises(LocalProtocolError, match="send DATA"):
        pair.client.send_data(stream_id, b"after FIN")
    pair.server.send_data(stream_id, b"response, part 1")
    pair.server.send_data(stream_id, b"part 2")
    pair.server.end_stream(stream_id)
    assert pair.server.stream_state(stream_id) is StreamState.CLOSED
    assert pair.to_client() == [
        DataReceived(1, b"response, part 1"), DataReceived(1, b"part 2"), StreamEnded(1)]
    assert pair.client.stream_state(stream_id) is StreamState.CLOSED
    assert pair.client.stream_count == pair.server.stream_count == 0  # closed streams are forgotten


def test_server_half_closes_first_and_the_client_keeps_sending() -> None:
    pair = Pair()
    stream_id = pair.open()
    pair.server.send_data(stream_id, b"banner")
    pair.server.end_stream(stream_id)
    assert pair.to_client() == [DataReceived(1, b"banner"), StreamEnded(1)]
    pair.client.send_data(stream_id, b"upload")
    pair.client.end_stream(stream_id)
    assert pair.to_server() == [DataReceived(1, b"upload"), StreamEnded(1)]
    assert pair.client.stream_count == pair.server.stream_count == 0


def test_open_and_half_close_at_once_then_the_reply() -> None:
    server = server_after_preface()
    assert server.receive_data(syn(1, flags=SYN | FIN)) == [StreamOpened(1, 8080, WEB), StreamEnded(1)]
    server.accept_stream(1)
    server.send_data(1, b"ok")
    server.end_stream(1)
    assert server.data_to_send() == ack(1) + data(1, b"ok") + fin(1)
    assert server.stream_count == 0


def test_a_reset_closes_the_stream_and_late_frames_for_it_are_ignored() -> None:
    pair = Pair()
    stream_id = pair.open()
    pair.server.send_data(stream_id, b"in flight")
    pair.client.reset_stream(stream_id)
    assert pair.client.stream_state(stream_id) is StreamState.CLOSED
    assert pair.to_client() == []  # the DATA crossed the RST: dropped, no reply
    assert pair.client.data_to_send() == rst(1, ErrorCode.CANCEL)
    assert pair.server.receive_data(rst(1, ErrorCode.CANCEL)) == [StreamReset(1, ErrorCode.CANCEL)]
    pair.client.reset_stream(stream_id)  # resetting a closed stream is harmless
    assert pair.client.data_to_send() == b""
    with pytest.raises(LocalProtocolError, match="closed"):
        pair.server.send_data(stream_id, b"x")


def test_both_ends_reset_at_once() -> None:
    pair = Pair()
    stream_id = pair.open()
    pair.client.reset_stream(stream_id)
    pair.server.reset_stream(stream_id, ErrorCode.INTERNAL_ERROR)
    assert pair.to_server() == [] and pair.to_client() == []
    assert pair.client.data_to_send() == pair.server.data_to_send() == b""


def test_ping_is_answered_with_the_same_value() -> None:
    pair = Pair()
    assert pair.client.ping() == 0 and pair.client.ping() == 1
    assert pair.to_server() == [PingReceived(0), PingReceived(1)]
    assert pair.server.data_to_send() == frame(PING, ACK, 0, 0) + frame(PING, ACK, 0, 1)
    assert pair.client.receive_data(frame(PING, ACK, 0, 0) + frame(PING, ACK, 0, 1)) == [
        PongReceived(0), PongReceived(1)]
    pair.server.ping(0xFFFFFFFF)
    assert pair.to_client() == [PingReceived(0xFFFFFFFF)]
    assert pair.to_server() == [PongReceived(0xFFFFFFFF)]


def test_graceful_goaway_stops_new_streams_and_lets_open_ones_finish() -> None:
    pair = Pair()
    stream_id = pair.open()
    pair.server.goaway()
    assert pair.server.going_away and not pair.server.finished
    assert pair.to_client() == [ConnectionTerminated(0, "peer is going away", by_peer=True)]
    with pytest.raises(LocalProtocolError, match="going away"):
        pair.client.open_stream(8080, WEB)
    pair.client.send_data(stream_id, b"still flowing")
    pair.client.end_stream(stream_id)
    assert pair.to_server() == [DataReceived(1, b"still flowing"), StreamEnded(1)]
    pair.server.end_stream(stream_id)
    assert pair.to_client() == [StreamEnded(1)]
    assert pair.client.finished and pair.server.finished and not pair.server.terminated


def test_a_stream_opened_while_the_server_goes_away_is_refused_and_may_be_retried() -> None:
    pair = Pair()
    pair.server.goaway()
    pair.client.open_stream(8080, WEB)  # crosses the GOAWAY on the wire
    pair.client.send_data(1, b"optimistic")
    assert pair.to_server() == []
    assert pair.server.data_to_send() == goaway(0) + rst(1, ErrorCode.REFUSED_STREAM)
    assert pair.client.receive_data(goaway(0) + rst(1, ErrorCode.REFUSED_STREAM)) == [
        ConnectionTerminated(0, "peer is going away", by_peer=True), StreamReset(1, ErrorCode.REFUSED_STREAM)]


def test_goaway_with_an_error_ends_every_stream() -> None:
    pair = Pair()
    pair.open()
    pair.client.goaway(ErrorCode.INTERNAL_ERROR)
    assert pair.client.terminated and pair.client.stream_count == 0
    with pytest.raises(LocalProtocolError, match="terminated"):
        pair.client.send_data(1, b"x")
    assert pair.to_server() == [ConnectionTerminated(2, "peer sent GOAWAY INTERNAL_ERROR", by_peer=True)]
    assert pair.server.terminated and pair.server.stream_count == 0
    assert pair.server.receive_data(data(1, b"late")) == []
    assert pair.server.data_to_send() == b""  # no GOAWAY answers a GOAWAY


def test_an_unknown_goaway_code_is_passed_through() -> None:
    client = client_after_preface()
    assert client.receive_data(goaway(0x2A)) == [
        ConnectionTerminated(0x2A, "peer sent GOAWAY 0x2a", by_peer=True)]


# ---------------------------------------------------------------------- flow control


def test_a_sender_blocked_at_the_window_resumes_after_the_receiver_acknowledges() -> None:
    pair = Pair(server_window=1024)
    stream_id = pair.open()
    assert pair.client.window(stream_id) == 1024
    assert pair.client.send_data(stream_id, bytes(1500)) == 1024
    assert pair.client.window(stream_id) == 0
    assert pair.client.send_data(stream_id, b"more") == 0
    assert pair.to_server() == [DataReceived(1, bytes(1024))]
    pair.server.acknowledge(stream_id, 511)
    assert pair.server.data_to_send() == b""  # credit is batched until half the window is due
    pair.server.acknowledge(stream_id, 1)
    assert pair.server.data_to_send() == credit(1, 512)
    assert pair.client.receive_data(credit(1, 512)) == [WindowOpened(1)]
    assert pair.client.send_data(stream_id, bytes(476)) == 476
    assert pair.to_server() == [DataReceived(1, bytes(476))]


def test_the_connection_window_holds_back_every_stream_together() -> None:
    # one peer cannot make us hold max_streams x initial_window: all streams share 128 KiB
    pair = Pair(server_connection_window=128 * KIB)
    streams = [pair.open() for _ in range(4)]
    sent = [pair.client.send_data(stream_id, bytes(64 * KIB)) for stream_id in streams]
    assert sent == [64 * KIB, 64 * KIB, 0, 0]  # each stream window (256 KiB) had room
    assert pair.client.connection_send_window == 0
    assert len(pair.to_server()) == 2 and pair.server.connection_receive_window == 0
    pair.server.acknowledge(streams[0], 64 * KIB)  # half the connection window is due
    assert pair.to_client() == [WindowOpened(streams[2]), WindowOpened(streams[3])]
    assert pair.client.send_data(streams[2], bytes(100 * KIB)) == 64 * KIB


def test_a_peer_beyond_the_connection_window_is_a_flow_control_error() -> None:
    server = server_after_preface(connection_window=INITIAL_CONNECTION_WINDOW)
    for stream_id in (1, 3):
        server.receive_data(syn(stream_id))
        server.accept_stream(stream_id)
    assert server.receive_data(data(1, bytes(MAX_FRAME_PAYLOAD - 10))) == \
        [DataReceived(1, bytes(MAX_FRAME_PAYLOAD - 10))]
    server.data_to_send()
    events = server.receive_data(data(3, bytes(11)))  # stream 3's own window has room
    assert_terminated(server, events, ErrorCode.FLOW_CONTROL_ERROR)


def test_bytes_nobody_will_consume_still_return_connection_credit() -> None:
    pair = Pair(server_connection_window=128 * KIB)
    reset, closed = pair.open(), pair.open()
    pair.server.reset_stream(reset, ErrorCode.CANCEL)  # its bytes in flight are dropped
    assert pair.client.send_data(reset, bytes(40 * KIB)) == 40 * KIB
    pair.server.data_to_send()
    assert pair.to_server() == []
    # the peer finishes a stream whose bytes the application never read
    assert pair.client.send_data(closed, bytes(30 * KIB)) == 30 * KIB
    pair.client.end_stream(closed)
    pair.to_server()
    pair.server.end_stream(closed)
    assert pair.server.stream_state(closed) is StreamState.CLOSED
    assert pair.server.data_to_send() == credit(0, 70 * KIB) + fin(closed)  # 40 + 30 KiB back
    pair.server.acknowledge(closed, 30 * KIB)  # a late acknowledgement adds nothing
    assert pair.server.data_to_send() == b""


def test_a_slow_reader_does_not_stall_its_neighbours() -> None:
    pair = Pair(server_window=4096)
    slow, fast = pair.open(), pair.open()
    assert pair.client.send_data(slow, bytes(10_000)) == 4096  # never acknowledged
    delivered = 0
    for _ in range(50):
        assert pair.client.send_data(fast, bytes(4096)) == 4096
        for event in pair.to_server():
            if isinstance(event, DataReceived) and event.stream_id == fast:
                pair.server.acknowledge(fast, len(event.data))
                delivered += len(event.data)
        pair.to_client()
    assert delivered == 50 * 4096
    assert pair.client.window(slow) == 0


def test_credit_given_before_acceptance_rides_on_the_ack() -> None:
    server = server_after_preface(initial_window=100)
    server.receive_data(syn(1) + data(1, bytes(100)))
    server.acknowledge(1, 100)
    assert server.data_to_send() == b""
    server.accept_stream(1)
    assert server.data_to_send() == ack(1, 100)


def test_streams_opened_before_the_peer_preface_wait_for_its_window() -> None:
    client = Connection("client")
    client.data_to_send()
    stream_id = client.open_stream(8080, WEB)
    assert client.send_data(stream_id, b"hello") == 0
    assert client.receive_data(preface(64 * KIB)) == [WindowOpened(1)]
    assert client.window(stream_id) == 64 * KIB


def test_no_credit_is_returned_once_the_peer_has_finished_sending() -> None:
    server = server_with_stream(initial_window=100)
    server.receive_data(data(1, bytes(100), FIN))
    server.acknowledge(1, 100)
    assert server.data_to_send() == b""


def test_late_acknowledgements_and_credit_for_closed_streams_are_harmless() -> None:
    pair = Pair()
    stream_id = pair.open()
    pair.server.send_data(stream_id, b"bye")
    pair.server.end_stream(stream_id)
    pair.to_client()
    pair.client.end_stream(stream_id)
    pair.to_server()
    pair.client.acknowledge(stream_id, 3)
    assert pair.client.receive_data(credit(1, 3)) == []
    assert pair.client.data_to_send() == b""


def test_one_byte_at_a_time_gives_the_same_events() -> None:
    transcript = (preface() + syn(1) + data(1, b"hello") + frame(PING, SYN, 0, 9)
                  + syn(3, 443, {}) + data(3, bytes(300)) + fin(1) + rst(3, 7) + goaway(0))
    expected = [StreamOpened(1, 8080, WEB), DataReceived(1, b"hello"), PingReceived(9),
                StreamOpened(3, 443, {}), DataReceived(3, bytes(300)), StreamEnded(1),
                StreamReset(3, 7), ConnectionTerminated(0, "peer is going away", by_peer=True)]
    whole = Connection("server")
    assert whole.receive_data(transcript) == expected
    bytewise = Connection("server")
    events: list[Event] = []
    for index in range(len(transcript)):
        events += bytewise.receive_data(transcript[index : index + 1])
        assert bytewise.buffered_input < 12 + 300
    merged = [DataReceived(1, b"hello"), DataReceived(3, bytes(300))]
    assert events == expected and [e for e in events if isinstance(e, DataReceived)] == merged
    assert bytewise.data_to_send() == whole.data_to_send()


# --------------------------------------------------------------------- hostile input


@pytest.mark.parametrize(
    ("garbage", "code"),
    [
        pytest.param(frame(WINDOW_UPDATE, 0, 0, 1024, version=0),
                     ErrorCode.PROTOCOL_ERROR, id="yamux-version"),
        pytest.param(frame(WINDOW_UPDATE, 0, 0, 1024, version=1), ErrorCode.PROTOCOL_ERROR,
                     id="version-1-has-no-connection-window"),
        pytest.param(frame(WINDOW_UPDATE, 0, 0, 1024, version=3), ErrorCode.PROTOCOL_ERROR,
                     id="future-version"),
        pytest.param(frame(PING, SYN, 0, 1), ErrorCode.PROTOCOL_ERROR, id="no-preface"),
        pytest.param(b"GET / HTTP/1.1\r\n", ErrorCode.PROTOCOL_ERROR, id="http"),
        pytest.param(preface(2**31), ErrorCode.FLOW_CONTROL_ERROR, id="preface-window-too-big"),
        pytest.param(frame(WINDOW_UPDATE, ACK, 0, 1), ErrorCode.PROTOCOL_ERROR, id="preface-with-flags"),
    ],
)
def test_a_bad_first_frame_ends_the_connection(garbage: bytes, code: ErrorCode) -> None:
    server = Connection("server")
    server.data_to_send()
    assert_terminated(server, server.receive_data(garbage), code)


@pytest.mark.parametrize(
    ("garbage", "code"),
    [
        pytest.param(frame(7, 0, 0, 0), ErrorCode.PROTOCOL_ERROR, id="unknown-type"),
        pytest.param(frame(DATA, 0x10, 1, 0), ErrorCode.PROTOCOL_ERROR, id="unknown-flag"),
        pytest.param(frame(DATA, ACK, 1, 0), ErrorCode.PROTOCOL_ERROR, id="data-with-ack"),
        pytest.param(frame(DATA, 0, 0, 0), ErrorCode.PROTOCOL_ERROR, id="data-on-stream-0"),
        pytest.param(frame(WINDOW_UPDATE, FIN, 1, 0), ErrorCode.PROTOCOL_ERROR, id="update-with-fin"),
        pytest.param(frame(WINDOW_UPDATE, RST | ACK, 1, 0), ErrorCode.PROTOCOL_ERROR, id="rst-with-ack"),
        pytest.param(frame(WINDOW_UPDATE, ACK, 0, 1), ErrorCode.PROTOCOL_ERROR,
                     id="connection-credit-with-flags"),
        pytest.param(preface(2**31 - 1), ErrorCode.FLOW_CONTROL_ERROR,
                     id="connection-window-over-2^31-1"),
        pytest.param(frame(PING, SYN, 1, 0), ErrorCode.PROTOCOL_ERROR, id="ping-on-a-stream"),
        pytest.param(frame(PING, SYN | ACK, 0, 0), ErrorCode.PROTOCOL_ERROR, id="ping-syn-ack"),
        pytest.param(frame(GOAWAY, SYN, 0, 0), ErrorCode.PROTOCOL_ERROR, id="goaway-with-flags"),
        pytest.param(frame(GOAWAY, 0, 1, 0), ErrorCode.PROTOCOL_ERROR, id="goaway-on-a-stream"),
        pytest.param(data(5, b"x"), ErrorCode.PROTOCOL_ERROR, id="data-never-opened"),
        pytest.param(fin(3), ErrorCode.PROTOCOL_ERROR, id="fin-never-opened"),
        pytest.param(data(2, b"x"), ErrorCode.PROTOCOL_ERROR, id="data-even-id"),
        pytest.param(rst(9, 7), ErrorCode.PROTOCOL_ERROR, id="rst-never-opened"),
        pytest.param(credit(9, 7), ErrorCode.PROTOCOL_ERROR, id="credit-never-opened"),
        pytest.param(syn(1), ErrorCode.PROTOCOL_ERROR, id="syn-reuses-live-id"),
        pytest.param(syn(2), ErrorCode.PROTOCOL_ERROR, id="syn-even-id"),
        pytest.param(ack(1), ErrorCode.PROTOCOL_ERROR, id="ack-to-the-server"),
        pytest.param(data(1, bytes(100_001)), ErrorCode.FRAME_SIZE_ERROR, id="data-over-64k"),
        pytest.param(data(1, bytes(60_000)) * 5,
                     ErrorCode.FLOW_CONTROL_ERROR, id="data-beyond-the-window"),
        pytest.param(fin(1) + fin(1), ErrorCode.PROTOCOL_ERROR, id="fin-twice"),
        pytest.param(fin(1) + data(1, b"x"), ErrorCode.PROTOCOL_ERROR, id="data-after-fin"),
        pytest.param(credit(1, 2**31 - 256 * KIB), ErrorCode.FLOW_CONTROL_ERROR, id="window-over-2^31-1"),
    ],
)
def test_server_ends_the_connection_on_a_bad_frame(garbage: bytes, code: ErrorCode) -> None:
    server = server_with_stream(1)
    events = server.receive_data(garbage)
    assert_terminated(server, events, code)


def test_syn_with_a_smaller_id_than_a_previous_one_is_refused() -> None:
    server = server_after_preface()
    server.receive_data(syn(5))
    assert_terminated(server, server.receive_data(syn(3)), ErrorCode.PROTOCOL_ERROR)


@pytest.mark.parametrize(
    ("garbage", "code"),
    [
        pytest.param(syn(3), ErrorCode.PROTOCOL_ERROR, id="syn-to-the-client"),
        pytest.param(ack(1), ErrorCode.PROTOCOL_ERROR, id="ack-twice"),
        pytest.param(data(3, b"x"), ErrorCode.PROTOCOL_ERROR, id="data-on-an-id-not-yet-used"),
        pytest.param(credit(1, 2**31 - 256 * KIB), ErrorCode.FLOW_CONTROL_ERROR, id="window-overflow"),
    ],
)
def test_client_ends_the_connection_on_a_bad_frame(garbage: bytes, code: ErrorCode) -> None:
    client = client_with_stream()
    assert_terminated(client, client.receive_data(garbage), code)


@pytest.mark.parametrize("frame_before_ack", [data(1, b"x"), fin(1), credit(1, 10)],
                         ids=["data", "fin", "credit"])
def test_client_requires_the_ack_before_the_server_speaks_on_a_stream(frame_before_ack: bytes) -> None:
    client = client_after_preface()
    client.open_stream(8080, WEB)
    client.data_to_send()
    assert_terminated(client, client.receive_data(frame_before_ack), ErrorCode.PROTOCOL_ERROR)


def test_an_oversized_length_is_refused_from_the_header_alone() -> None:
    server = server_with_stream()
    events = server.receive_data(frame(DATA, 0, 1, 0xFFFFFFFF))  # 12 bytes: nothing of the payload
    assert_terminated(server, events, ErrorCode.FRAME_SIZE_ERROR)


def test_an_open_header_over_4_kib_is_refused_from_the_header_alone() -> None:
    server = server_after_preface()
    assert_terminated(server, server.receive_data(frame(DATA, SYN, 1, 4097)), ErrorCode.FRAME_SIZE_ERROR)


def test_a_truncated_frame_waits_for_the_rest() -> None:
    server = server_with_stream()
    whole = data(1, bytes(range(100)))
    assert server.receive_data(whole[:5]) == []
    assert server.receive_data(whole[5:62]) == []
    assert server.buffered_input == 62
    assert server.receive_data(whole[62:] + whole[:3]) == [DataReceived(1, bytes(range(100)))]
    assert server.buffered_input == 3


def _open_header(port: int, entries: list[tuple[bytes, bytes]], count: int | None = None) -> bytes:
    body = b"".join(bytes((len(k),)) + k + struct.pack(">H", len(v)) + v for k, v in entries)
    return struct.pack(">HB", port, len(entries) if count is None else count) + body


@pytest.mark.parametrize(
    "open_header",
    [
        pytest.param(_open_header(80, [(b"k%d" % i, b"v") for i in range(17)]), id="17-entries"),
        pytest.param(_open_header(80, [(b"k" * 65, b"v")]), id="key-65-bytes"),
        pytest.param(_open_header(80, [(b"", b"v")]), id="empty-key"),
        pytest.param(_open_header(80, [(b"k", b"v" * 257)]), id="value-257-bytes"),
        pytest.param(_open_header(80, [(b"k", b"\xff\xfe")]), id="not-utf8"),
        pytest.param(_open_header(80, [(b"k", b"1"), (b"k", b"2")]), id="duplicate-key"),
        pytest.param(_open_header(80, [(b"k", b"v")]) + b"!", id="trailing-bytes"),
        pytest.param(_open_header(80, [(b"k", b"v")], count=2), id="truncated-entries"),
        pytest.param(_open_header(80, [(b"k", b"v")])[:-2], id="truncated-value"),
        pytest.param(b"\x00", id="truncated-port"),
        pytest.param(_open_header(0, []), id="port-0"),
    ],
)
def test_metadata_over_the_limits_ends_the_connection(open_header: bytes) -> None:
    server = server_after_preface()
    assert_terminated(server, server.receive_data(raw_syn(1, open_header)), ErrorCode.PROTOCOL_ERROR)


def test_metadata_at_the_limits_is_accepted() -> None:
    metadata = {f"{i:02d}" + "k" * 62: "v" * 240 for i in range(16)}  # 16 x (1+64+2+240) + 3 = 4915
    with pytest.raises(LocalProtocolError, match="4096"):
        encode_open_header(80, metadata)
    metadata = {f"{i:02d}" + "k" * 62: "v" * 185 for i in range(16)}  # 16 x 252 + 3 = 4035
    server = server_after_preface()
    assert server.receive_data(raw_syn(1, encode_open_header(65535, metadata))) == [
        StreamOpened(1, 65535, metadata)]


def test_a_repeated_open_header_gives_equal_read_only_metadata_on_every_stream() -> None:
    pair = Pair()
    first, second = pair.open(), pair.open()
    assert (first, second) == (1, 3)
    pair.client.open_stream(9090, {"namespace": "shop"})
    [opened] = pair.to_server()
    assert opened == StreamOpened(5, 9090, {"namespace": "shop"})
    with pytest.raises(TypeError):
        opened.metadata["pod"] = "another"  # type: ignore[index]
    assert pair.client.open_stream(8080, WEB) == 7  # the remembered header, same bytes
    assert pair.to_server() == [StreamOpened(7, 8080, WEB)]


def test_a_peer_cycling_through_open_headers_is_remembered_within_bounds() -> None:
    server = server_after_preface(max_streams=1024)
    for index in range(3 * HEADER_MEMORY):
        metadata = {"pod": f"web-{index}"}
        stream_id = 2 * index + 1
        assert server.receive_data(syn(stream_id, 80, metadata)) == [StreamOpened(stream_id, 80, metadata)]
    assert len(server._decoded_headers) <= HEADER_MEMORY
    big = {"pod": "x" * 256, "node": "y" * 256}  # over HEADER_MEMORY_BYTES: never remembered
    assert server.receive_data(syn(1001, 80, big)) == [StreamOpened(1001, 80, big)]
    assert all(len(header) <= HEADER_MEMORY_BYTES for header in server._decoded_headers)


def test_too_many_streams_are_refused_with_rst_and_their_bytes_dropped() -> None:
    server = server_after_preface(max_streams=2)
    assert server.receive_data(syn(1) + syn(3)) == [StreamOpened(1, 8080, WEB), StreamOpened(3, 8080, WEB)]
    assert server.receive_data(syn(5) + data(5, b"optimistic") + fin(5)) == []
    assert server.data_to_send() == rst(5, ErrorCode.REFUSED_STREAM)
    assert server.stream_count == 2 and not server.terminated
    server.reset_stream(1)
    assert server.receive_data(syn(7)) == [StreamOpened(7, 8080, WEB)]


def test_data_for_a_stream_closed_long_ago_is_answered_with_one_rst() -> None:
    server = server_with_stream()
    server.receive_data(fin(1))
    server.end_stream(1)
    server.data_to_send()
    assert server.receive_data(data(1, b"zombie")) == []
    assert server.data_to_send() == rst(1, ErrorCode.STREAM_CLOSED)
    assert server.receive_data(data(1, b"zombie again") + rst(1, 0) + credit(1, 5)) == []
    assert server.data_to_send() == b"" and not server.terminated


def test_the_memory_of_reset_streams_is_bounded_and_forgetting_is_not_fatal() -> None:
    server = server_after_preface(max_streams=1)
    for stream_id in range(1, 1001, 2):
        server.receive_data(syn(stream_id))
        server.reset_stream(stream_id)
    server.data_to_send()
    oldest_remembered = 999 - 2 * (RESET_MEMORY - 1)
    assert server.receive_data(data(999, b"late") + data(oldest_remembered, b"late")) == []
    assert server.data_to_send() == b""  # remembered: silently dropped
    assert server.receive_data(data(oldest_remembered - 2, b"very late")) == []
    assert server.data_to_send() == rst(oldest_remembered - 2, ErrorCode.STREAM_CLOSED)  # no GOAWAY
    assert not server.terminated


def test_events_before_the_bad_frame_are_still_delivered() -> None:
    server = server_after_preface()
    events = server.receive_data(syn(1) + data(1, b"ok") + frame(9, 0, 0, 0) + data(1, b"lost"))
    assert events[:2] == [StreamOpened(1, 8080, WEB), DataReceived(1, b"ok")]
    assert events[2] == ConnectionTerminated(ErrorCode.PROTOCOL_ERROR, "unknown frame type 9", by_peer=False)
    assert_terminated(server, events, ErrorCode.PROTOCOL_ERROR)


# ------------------------------------------------------------------------ API misuse


def test_api_misuse_raises_local_protocol_error_and_changes_nothing() -> None:
    pair = Pair(max_streams=4)
    stream_id = pair.open()
    misuses: list[Callable[[], object]] = [
        lambda: pair.server.open_stream(80, {}),
        lambda: pair.client.accept_stream(stream_id),
        lambda: pair.server.accept_stream(stream_id),
        lambda: pair.client.send_data(7, b"never opened"),
        lambda: pair.client.send_data(2, b"even id"),
        lambda: pair.client.acknowledge(stream_id, 1),
        lambda: pair.client.acknowledge(stream_id, -1),
        lambda: pair.client.acknowledge(9, 0),
        lambda: pair.client.reset_stream(9),
        lambda: pair.client.reset_stream(stream_id, 2**32),
        lambda: pair.client.open_stream(0, {}),
        lambda: pair.client.open_stream(70000, {}),
        lambda: pair.client.open_stream(80, {f"k{i}": "" for i in range(17)}),
        lambda: pair.client.open_stream(80, {"k" * 65: ""}),
        lambda: pair.client.open_stream(80, {"k": "é" * 129}),
        lambda: pair.client.open_stream(80, {"k": "\udc80"}),
        lambda: pair.client.ping(-1),
        lambda: pair.client.goaway(2**32),
    ]
    for misuse in misuses:
        with pytest.raises(LocalProtocolError):
            misuse()
    assert pair.client.data_to_send() == pair.server.data_to_send() == b""
    assert pair.client.stream_count == pair.server.stream_count == 1
    pair.client.end_stream(stream_id)
    with pytest.raises(LocalProtocolError, match="send FIN"):
        pair.client.end_stream(stream_id)


def test_client_cannot_exceed_its_own_stream_limit() -> None:
    client = Connection("client", max_streams=1)
    client.open_stream(80, {})
    with pytest.raises(LocalProtocolError, match="max_streams"):
        client.open_stream(80, {})


def test_constructor_rejects_bad_settings() -> None:
    for kwargs in ({"initial_window": 0}, {"initial_window": 2**31}, {"max_streams": 0}):
        with pytest.raises(ValueError):
            Connection("client", **kwargs)
    with pytest.raises(ValueError):
        Connection("peer")  # type: ignore[arg-type]


# ----------------------------------------------------------------- micro-benchmark


def frames_per_second(payload_size: int, frames: int, batch: int = 8) -> float:
    """DATA frames per second through a client/server pair, both directions, with the
    receivers acknowledging everything (a helper to run by hand, not a timed test)."""
    pair = Pair()
    stream_id = pair.open()
    payload = bytes(payload_size)
    delivered = 0
    started = time.perf_counter()
    while delivered < frames:
        for _ in range(batch):
            pair.client.send_data(stream_id, payload)
            pair.server.send_data(stream_id, payload)
        for receiver, events in ((pair.server, pair.to_server()), (pair.client, pair.to_client())):
            for event in events:
                if type(event) is DataReceived:
                    receiver.acknowledge(stream_id, len(event.data))
                    delivered += 1
    return delivered / (time.perf_counter() - started)


def test_the_benchmark_helper_runs() -> None:
    assert frames_per_second(100, 200) > 0


if __name__ == "__main__":
    for size, count in ((100, 400_000), (16 * KIB, 100_000)):
        print(f"{size:>6} B DATA frames: {frames_per_second(size, count):,.0f} frames/s")
