"""HTTP/2 request accounting playbooks: frames built by hand (hpack.Encoder for header blocks),
fed with explicit times; exact Records out."""

from __future__ import annotations

import struct

import hpack
import pytest
from hpack.hpack import encode_integer

from agent.core.accounting import GRPC_FAILURE_LINKERD, Record
from agent.core.detect import Protocol, observer_for
from agent.core.hpack_blocks import PENDING_SLACK, HeaderBlocks
from agent.core.http2 import PREFACE, Http2Observer

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS = range(5)
PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(5, 10)
END_STREAM, END_HEADERS, PADDED, PRIORITY_FLAG, ACK = 0x1, 0x4, 0x8, 0x20, 0x1


def frame(ftype: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + stream.to_bytes(4, "big") + payload


def settings(*pairs: tuple[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in pairs))


class Peers:
    """Both ends of a connection, each with its own HPACK encoder."""

    def __init__(self) -> None:
        self.client = hpack.Encoder()
        self.server = hpack.Encoder()

    def request(self, stream: int, path: str = "/", method: str = "GET", end_stream: bool = True,
                grpc: bool = False) -> bytes:
        headers = [(":method", method), (":scheme", "http"), (":path", path), (":authority", "svc")]
        if grpc:
            headers += [("content-type", "application/grpc"), ("te", "trailers")]
        flags = END_HEADERS | (END_STREAM if end_stream else 0)
        return frame(HEADERS, flags, stream, self.client.encode(headers))

    def response(self, stream: int, status: int = 200, end_stream: bool = False, **extra: str) -> bytes:
        headers = [(":status", str(status)), *((k.replace("_", "-"), v) for k, v in extra.items())]
        flags = END_HEADERS | (END_STREAM if end_stream else 0)
        return frame(HEADERS, flags, stream, self.server.encode(headers))

    def trailers(self, stream: int, grpc_status: int) -> bytes:
        block = self.server.encode([("grpc-status", str(grpc_status)), ("grpc-message", "m")])
        return frame(HEADERS, END_HEADERS | END_STREAM, stream, block)


def start(observer: Http2Observer) -> None:
    assert observer.client_bytes(PREFACE + settings((1, 4096), (4, 65535)), 0.0) == []
    assert observer.server_bytes(settings((3, 100)) + frame(SETTINGS, ACK, 0), 0.0) == []
    assert observer.client_bytes(frame(SETTINGS, ACK, 0), 0.0) == []


def ok(status: int, latency_ms: float, method: str = "GET", grpc_status: int | None = None) -> Record:
    return Record("success", status, grpc_status, latency_ms, method)


def test_unary_200_and_503() -> None:
    peers, observer = Peers(), Http2Observer()
    start(observer)
    observer.client_bytes(peers.request(1), 1.0)
    assert observer.take_started() == 1
    assert observer.server_bytes(peers.response(1, 200), 1.25) == []
    assert observer.server_bytes(frame(DATA, END_STREAM, 1, b"x" * 100), 1.5) == [ok(200, 250.0)]
    observer.client_bytes(peers.request(3, "/again", "POST", end_stream=False), 2.0)
    observer.client_bytes(frame(DATA, END_STREAM, 3, b"{}"), 2.0)
    assert observer.server_bytes(peers.response(3, 503, end_stream=True), 2.5) == [
        Record("failure", 503, None, 500.0, "POST")
    ]
    assert observer.take_started() == 1
    assert observer.closed(3.0, reset=False) == []


def test_grpc_ok_and_unavailable_in_trailers() -> None:
    peers, observer = Peers(), Http2Observer()
    start(observer)
    observer.client_bytes(peers.request(1, "/pkg.Svc/Get", "POST", False, grpc=True), 1.0)
    observer.client_bytes(frame(DATA, END_STREAM, 1, b"\x00\x00\x00\x00\x02hi"), 1.0)
    observer.server_bytes(peers.response(1, content_type="application/grpc"), 1.125)
    observer.server_bytes(frame(DATA, 0, 1, b"\x00\x00\x00\x00\x01!"), 1.25)
    assert observer.server_bytes(peers.trailers(1, 0), 1.5) == [ok(200, 125.0, "POST", grpc_status=0)]
    observer.client_bytes(peers.request(3, "/pkg.Svc/Get", "POST", True, grpc=True), 2.0)
    observer.server_bytes(peers.response(3, content_type="application/grpc"), 2.25)
    assert observer.server_bytes(peers.trailers(3, 14), 2.5) == [
        Record("failure", 200, 14, 250.0, "POST")
    ]


def test_trailers_only_grpc_error() -> None:
    peers, observer = Peers(), Http2Observer()
    start(observer)
    observer.client_bytes(peers.request(1, "/pkg.Svc/Get", "POST", grpc=True), 1.0)
    trailers_only = peers.response(1, 200, end_stream=True, content_type="application/grpc", grpc_status="5")
    assert observer.server_bytes(trailers_only, 1.5) == [Record("failure", 200, 5, 500.0, "POST")]


def test_linkerd_grpc_classification_is_available() -> None:
    peers, observer = Peers(), Http2Observer(grpc_failures=GRPC_FAILURE_LINKERD)
    start(observer)
    observer.client_bytes(peers.request(1, grpc=True) + peers.request(3, grpc=True), 1.0)
    observer.server_bytes(peers.response(1, end_stream=True, grpc_status="5"), 1.5)  # NOT_FOUND
    records = observer.server_bytes(peers.response(3, end_stream=True, grpc_status="13"), 1.5)
    assert records == [Record("failure", 200, 13, 500.0, "GET")]


def test_rst_stream_fails_an_open_stream_but_not_a_finished_one() -> None:
    peers, observer = Peers(), Http2Observer()
    start(observer)
    observer.client_bytes(peers.request(1) + peers.request(3), 1.0)
    observer.server_bytes(peers.response(1, 200), 1.25)
    assert observer.client_bytes(frame(RST_STREAM, 0, 1, (8).to_bytes(4, "big")), 1.5) == [
        Record("failure", 200, None, 250.0, "GET", "reset")
    ]
    assert observer.server_bytes(peers.response(3, 204, end_stream=True), 2.0) == [ok(204, 1000.0)]
    assert observer.server_bytes(frame(RST_STREAM, 0, 3, bytes(4)), 2.0) == []  # NO_ERROR after end


def test_goaway_fails_streams_above_last_stream_id() -> None:
    peers, observer = Peers(), Http2Observer()
    start(observer)
    observer.client_bytes(peers.request(1) + peers.request(3) + peers.request(5), 1.0)
    goaway = frame(GOAWAY, 0, 0, (1).to_bytes(4, "big") + (0).to_bytes(4, "big") + b"draining")
    assert observer.server_bytes(goaway, 1.5) == [
        Record("failure", None, None, None, "GET", "refused"),
        Record("failure", None, None, None, "GET", "refused"),
    ]
    assert observer.server_bytes(peers.response(1, 200, end_stream=True), 2.0) == [ok(200, 1000.0)]


def test_interleaved_streams_finish_in_any_order() -> None:
    peers, observer = Peers(), Http2Observer()
    start(observer)
    observer.client_bytes(peers.request(1, "/slow") + peers.request(3, "/fast", "PUT"), 1.0)
    observer.server_bytes(peers.response(1) + frame(DATA, 0, 1, b"a" * 50), 1.25)
    observer.server_bytes(peers.response(3, 201), 1.5)
    assert observer.server_bytes(frame(DATA, END_STREAM, 3, b""), 1.75) == [ok(201, 500.0, "PUT")]
    assert observer.server_bytes(frame(DATA, END_STREAM, 1, b"b"), 2.0) == [ok(200, 250.0)]
    assert observer.take_started() == 2


def test_continuation_padding_priority_and_informational_headers() -> None:
    peers, observer = Peers(), Http2Observer()
    start(observer)
    block = peers.client.encode([(":method", "POST"), (":path", "/x"), ("x-long", "v" * 300)])
    padded = bytes([7]) + bytes(5) + block[:100] + bytes(7)  # pad length, priority, fragment, padding
    observer.client_bytes(frame(HEADERS, PADDED | PRIORITY_FLAG, 1, padded), 1.0)
    assert observer.take_started() == 0  # the block is not complete yet
    observer.client_bytes(frame(CONTINUATION, 0, 1, block[100:200]), 1.0)
    observer.client_bytes(frame(CONTINUATION, END_HEADERS, 1, block[200:]), 1.0)
    assert observer.take_started() == 1
    assert observer.server_bytes(peers.response(1, 100), 1.25) == []
    assert observer.server_bytes(peers.response(1, 200, end_stream=True), 1.5) == [ok(200, 500.0, "POST")]


def test_dynamic_table_carries_across_requests_and_table_size_settings() -> None:
    peers, observer = Peers(), Http2Observer()
    observer.client_bytes(PREFACE + settings((1, 8192)), 0.0)
    observer.server_bytes(settings((1, 8192)), 0.0)
    peers.client.header_table_size = 8192
    peers.server.header_table_size = 8192
    expected = []
    for i in range(20):
        stream = 2 * i + 1
        request = peers.request(stream, "/same/path", "PATCH")  # indexed after the first time
        observer.client_bytes(request, float(i))
        status = 500 if i % 4 == 0 else 200
        records = observer.server_bytes(peers.response(stream, status, True, x_id=f"{i}" * 40), i + 0.5)
        expected.append(Record("failure" if status == 500 else "success", status, None, 500.0, "PATCH"))
        assert records == expected[-1:]
    assert len(request) < 20  # the request block really came from the dynamic table


def test_split_at_every_byte_boundary() -> None:
    peers = Peers()
    client = PREFACE + settings((4, 65535)) + peers.request(1, grpc=True) + frame(PING, 0, 0, bytes(8))
    client += peers.request(3, end_stream=False) + frame(DATA, PADDED | END_STREAM, 3, b"\x02ab\x00\x00")
    server = settings() + peers.response(1) + frame(DATA, 0, 1, b"d" * 40) + peers.trailers(1, 14)
    server += frame(WINDOW_UPDATE, 0, 0, (1000).to_bytes(4, "big")) + peers.response(3, 502, True)
    expected = [Record("failure", 200, 14, 1000.0, "GET"), Record("failure", 502, None, 1000.0, "GET")]
    for cut in range(len(client) + 1):
        observer = Http2Observer()
        observer.client_bytes(client[:cut], 1.0)
        observer.client_bytes(client[cut:], 1.0)
        assert observer.take_started() == 2, cut
        assert observer.server_bytes(server, 2.0) == expected, cut
    for cut in range(len(server) + 1):
        observer = Http2Observer()
        observer.client_bytes(client, 1.0)
        records = observer.server_bytes(server[:cut], 2.0) + observer.server_bytes(server[cut:], 2.0)
        assert records == expected, cut


def test_close_with_open_streams_fails_them() -> None:
    peers, observer = Peers(), Http2Observer()
    start(observer)
    observer.client_bytes(peers.request(1) + peers.request(3), 1.0)
    observer.server_bytes(peers.response(1) + frame(DATA, 0, 1, b"partial"), 1.5)
    assert observer.closed(2.0, reset=True) == [
        Record("failure", 200, None, 500.0, "GET", "reset"),
        Record("failure", None, None, None, "GET", "reset"),
    ]
    assert observer.closed(2.0, reset=True) == []


def test_push_promise_is_decoded_but_not_counted() -> None:
    peers, observer = Peers(), Http2Observer()
    start(observer)
    observer.client_bytes(peers.request(1), 1.0)
    promised = peers.server.encode([(":method", "GET"), (":path", "/style.css"), (":authority", "svc")])
    push = frame(PUSH_PROMISE, END_HEADERS, 1, (2).to_bytes(4, "big") + promised)
    observer.server_bytes(push + peers.response(2, 200, end_stream=True), 1.25)
    assert observer.server_bytes(peers.response(1, 200, end_stream=True), 1.5) == [ok(200, 500.0)]
    assert observer.take_started() == 1


def test_bogus_frames_give_up_without_raising() -> None:
    cases = {
        "oversized frame": frame(DATA, 0, 1, b"")[:0] + (20000).to_bytes(3, "big") + bytes(6),
        "continuation without headers": frame(CONTINUATION, END_HEADERS, 1, b"\x82"),
        "bad hpack index": frame(HEADERS, END_HEADERS, 5, b"\xff\xff\xff\x7f"),
        "headers interrupted": frame(HEADERS, 0, 5, b"\x82") + frame(DATA, 0, 5, b""),
        "bad settings length": frame(SETTINGS, 0, 0, b"\x00\x01\x00"),
        "padding longer than payload": frame(HEADERS, END_HEADERS | PADDED, 5, b"\x09\x82"),
    }
    for name, bogus in cases.items():
        peers, observer = Peers(), Http2Observer()
        start(observer)
        observer.client_bytes(peers.request(1), 1.0)
        assert observer.client_bytes(bogus, 2.0) == [
            Record("failure", None, None, None, "GET", "protocol_error")
        ], name
        assert observer.opaque, name
        assert observer.client_bytes(peers.request(3), 3.0) == [], name
        assert observer.closed(4.0, reset=False) == [], name


def test_wrong_preface_gives_up() -> None:
    observer = Http2Observer()
    observer.client_bytes(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n", 1.0)
    assert observer.opaque


def test_large_data_frames_are_skipped_not_buffered() -> None:
    peers, observer = Peers(), Http2Observer()
    observer.client_bytes(PREFACE + settings((5, 1 << 20)), 0.0)  # client accepts 1 MiB frames
    observer.client_bytes(peers.request(1), 1.0)
    observer.server_bytes(peers.response(1), 1.0)
    observer.server_bytes(frame(DATA, 0, 1, bytes(1 << 20))[:5000], 1.0)
    assert observer._server.partial is None and observer._server.skip > 1_000_000
    observer.server_bytes(bytes((1 << 20) + 9 - 5000), 1.5)
    assert observer.server_bytes(frame(DATA, END_STREAM, 1), 2.0) == [ok(200, 0.0)]


def test_memoised_indexed_blocks_follow_dynamic_table_changes() -> None:
    peers, observer = Peers(), Http2Observer()
    start(observer)
    observer.client_bytes(b"".join(peers.request(s) for s in (1, 3, 5, 7)), 1.0)
    indexed_only = bytes([0x88, 0xBE])  # :status 200, dynamic entry 62 (the newest)

    def respond(stream: int, block: bytes) -> list[Record]:
        return observer.server_bytes(frame(HEADERS, END_HEADERS | END_STREAM, stream, block), 2.0)

    assert respond(1, peers.server.encode([(":status", "200"), ("grpc-status", "0")])) == [
        ok(200, 1000.0, grpc_status=0)
    ]
    assert respond(3, indexed_only) == [ok(200, 1000.0, grpc_status=0)]
    assert respond(5, peers.server.encode([(":status", "200"), ("grpc-status", "14")])) == [
        Record("failure", 200, 14, 1000.0, "GET")
    ]
    assert respond(7, indexed_only) == [Record("failure", 200, 14, 1000.0, "GET")]  # entry 62 moved on


def literal(name_index: int, value: bytes, indexing: bool = True) -> bytes:
    """An HPACK literal field with a static name, its value not Huffman-coded: with
    incremental indexing (0x40, as nginx sends every response header) or without (0x00)."""
    name = encode_integer(name_index, 6 if indexing else 4)
    name[0] |= 0x40 if indexing else 0x00
    return bytes(name + encode_integer(len(value), 7)) + value


def counting_decodes(direction: HeaderBlocks) -> list[bytes]:
    """The blocks hpack is asked to decode from now on, in order."""
    decoded: list[bytes] = []
    decoder = direction.decoder
    decode = decoder.decode

    def counting(block: bytes, raw: bool = False) -> object:
        decoded.append(block)
        return decode(block, raw=raw)

    decoder.decode = counting  # type: ignore[method-assign]
    return decoded


def test_blocks_that_leave_the_table_as_it_was_are_memoised_until_it_changes() -> None:
    """A response block reading the dynamic table (`:status` static, `server` entry 62) and
    adding nothing: the same bytes are decoded once; a block that adds to the table clears
    that memo, and the same bytes are decoded again."""
    peers, observer = Peers(), Http2Observer()
    start(observer)
    observer.client_bytes(b"".join(peers.request(s) for s in (1, 3, 5, 7, 9)), 1.0)
    server = observer._server.blocks

    def respond(stream: int, block: bytes) -> list[Record]:
        return observer.server_bytes(frame(HEADERS, END_HEADERS | END_STREAM, stream, block), 2.0)

    assert respond(1, b"\x88" + literal(54, b"nginx")) == [ok(200, 1000.0)]  # server into the table
    decoded = counting_decodes(server)
    reads_table = b"\x88\xbe"  # :status 200, entry 62
    assert respond(3, reads_table) == [ok(200, 1000.0)]
    assert respond(5, reads_table) == [ok(200, 1000.0)]
    assert decoded == [reads_table] and reads_table in server.memo  # decoded once
    assert respond(7, peers.server.encode([(":status", "200"), ("grpc-status", "14")])) == [
        Record("failure", 200, 14, 1000.0, "GET")]
    assert server.memo == {}  # grpc-status went into the table: nothing memoised may stand
    assert respond(9, reads_table) == [Record("failure", 200, 14, 1000.0, "GET")]  # entry 62 moved on
    assert decoded.count(reads_table) == 2


@pytest.mark.parametrize("fast_replay", [True, False], ids=["replayed", "replayed-by-hpack"])
def test_blocks_that_never_read_the_table_are_decoded_once_and_keep_it_in_step(
        fast_replay: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """nginx's responses: `:status` static, every other field a literal with a static name and
    incremental indexing, the same bytes on every response within a second (`date`), and never
    referred to. Such a block decodes the same at any table state, so it is decoded once; each
    repeat adds its entries to the table as hpack would (when a block needs the table: they
    wait till then), so a later block that does read the table (here entries 62 and 63) is
    decoded against the table the server really has. (Entries are added by the observer
    itself, or at once by hpack's `add` if hpack's table changes shape.)"""
    from agent.core import hpack_blocks

    assert hpack_blocks._FAST_REPLAY
    monkeypatch.setattr(hpack_blocks, "_FAST_REPLAY", fast_replay)
    peers, observer = Peers(), Http2Observer()
    start(observer)
    streams = range(1, 2 * 100 + 1, 2)
    observer.client_bytes(b"".join(peers.request(s) for s in streams), 1.0)
    server = observer._server.blocks
    decoded = counting_decodes(server)
    shadow = hpack.Decoder()  # decodes every block: the table the observer must be in step with
    nginx = (b"\x88" + literal(54, b"nginx/1.22.1") + literal(33, b"Sun, 06 Dec 2026 12:00:00 GMT")
             + literal(28, b"1024") + literal(31, b"application/octet-stream"))
    *repeats, last = streams
    for stream in repeats:
        records = observer.server_bytes(frame(HEADERS, END_HEADERS | END_STREAM, stream, nginx), 2.0)
        assert records == [ok(200, 1000.0)]
        shadow.decode(nginx, raw=True)
        if not fast_replay:
            assert server.decoder.header_table.dynamic_entries == shadow.header_table.dynamic_entries
    assert decoded == [nginx]
    assert list(server.lasting) == [nginx] and server.memo == {}
    if fast_replay:  # waiting, cut to what the table can hold (4,096), the table emptied
        assert server.decoder.header_table.dynamic_entries != shadow.header_table.dynamic_entries
        assert server.pending_size <= 4096 + PENDING_SLACK + 233
    server.settle()
    assert server.decoder.header_table.dynamic_entries == shadow.header_table.dynamic_entries
    assert server.decoder.header_table._current_size == shadow.header_table._current_size
    assert not server.pending
    reads_table = b"\x88\xbe\xbf"  # :status 200, the newest entry and the one before
    expected = shadow.decode(reads_table, raw=True)
    assert expected[1:] == [(b"content-type", b"application/octet-stream"), (b"content-length", b"1024")]
    assert server.decoder.decode(reads_table, raw=True) == expected
    records = observer.server_bytes(frame(HEADERS, END_HEADERS | END_STREAM, last, reads_table), 2.0)
    assert records == [ok(200, 1000.0)]


def test_a_table_resize_or_a_dynamic_name_is_not_taken_astable_free() -> None:
    from agent.core.hpack_blocks import table_free

    nginx = b"\x88" + literal(54, b"nginx") + literal(33, b"today", indexing=False)
    assert table_free(nginx, 3) == [1]
    assert table_free(b"\x3f\xe1\x1f" + nginx, 3) is None  # size update to 4096 first
    assert table_free(b"\x88\x7e\x01x", 2) is None  # literal, its name entry 62
    assert table_free(b"\x88\xbe", 2) is None  # indexed entry 62
    assert table_free(nginx, 4) is None  # not the fields hpack found: never trusted
    huffman_name = b"\x40\x82\x94\xe7\x03abc"  # new name "foo" Huffman-coded, value "abc"
    assert hpack.Decoder().decode(huffman_name, raw=True) == [(b"foo", b"abc")]
    assert table_free(huffman_name, 1) == [0]
    long_value = literal(33, bytes(255), indexing=False)  # multi-octet integers: 0f 12, 7f 80 01
    assert long_value[:5] == b"\x0f\x12\x7f\x80\x01"
    assert hpack.Decoder().decode(long_value, raw=True)[0][0] == b"date"
    assert table_free(long_value, 1) == []


def test_the_memo_keeps_the_newest_blocks_and_only_small_ones() -> None:
    from agent.core.hpack_blocks import MEMO_BLOCK, MEMO_SIZE

    peers, observer = Peers(), Http2Observer()
    start(observer)
    streams = range(1, 2 * (MEMO_SIZE + 6), 2)
    observer.client_bytes(b"".join(peers.request(s) for s in streams), 1.0)
    blocks = [peers.server.encode([(":status", "200"), hpack.NeverIndexedHeaderTuple(
        "date", f"second {n}")]) for n in range(len(streams) - 1)]
    for stream, block in zip(streams, blocks, strict=False):
        observer.server_bytes(frame(HEADERS, END_HEADERS | END_STREAM, stream, block), 2.0)
    assert list(observer._server.blocks.lasting) == blocks[-MEMO_SIZE:]
    large = b"\x88" + literal(33, bytes(MEMO_BLOCK), indexing=False)  # a date of 1 KiB
    assert observer.server_bytes(frame(HEADERS, END_HEADERS | END_STREAM, streams[-1], large), 2.0) == [
        ok(200, 1000.0)]
    assert large not in observer._server.blocks.lasting and large not in observer._server.blocks.memo


def test_the_agent_classifies_grpc_as_linkerd_does() -> None:
    """linkerd2-proxy grpc::Codes::default: UNKNOWN, DEADLINE_EXCEEDED, PERMISSION_DENIED,
    INTERNAL, UNAVAILABLE and DATA_LOSS fail; NOT_FOUND, INVALID_ARGUMENT, ... succeed."""
    assert {2, 4, 7, 13, 14, 15} == GRPC_FAILURE_LINKERD
    peers, observer = Peers(), observer_for(Protocol.HTTP2)
    assert isinstance(observer, Http2Observer)
    start(observer)
    observer.client_bytes(peers.request(1, grpc=True) + peers.request(3, grpc=True), 1.0)
    found = observer.server_bytes(peers.response(1, end_stream=True, grpc_status="5"), 1.5)
    denied = observer.server_bytes(peers.response(3, end_stream=True, grpc_status="7"), 1.5)
    assert found == [Record("success", 200, 5, 500.0, "GET")]
    assert denied == [Record("failure", 200, 7, 500.0, "GET")]
    assert observer.authority == "svc"  # the first request's :authority


def test_waiting_entries_are_cut_to_what_the_table_holds_exactly() -> None:
    """A table of 100 holds two entries of 50 (RFC 7541 4.4: size 32 + name + value), not
    three; an entry larger than the table empties it. The cut waiting list, once added, leaves
    the table hpack's own adds leave."""
    from hpack.table import HeaderTable

    from agent.core.hpack_blocks import HeaderBlocks

    fifty = [(b"a", bytes([c]) * 17) for c in b"xyz"]
    oversize = (b"big", b"v" * 80)
    for pending in (fifty, [*fifty, oversize], [oversize, *fifty[:2]], [fifty[0], oversize, fifty[1]]):
        direction = HeaderBlocks(64 * 1024)
        direction.decoder.header_table.maxsize = 100
        direction.decoder.header_table.add(b"old", b"entry")
        direction.pending = list(pending)
        direction.pending_size = sum(32 + len(n) + len(v) for n, v in pending)
        direction._cut_pending()
        reference = HeaderTable()
        reference.maxsize = 100
        for name, value in [(b"old", b"entry"), *pending]:
            reference.add(name, value)
        direction.settle()
        assert direction.decoder.header_table.dynamic_entries == reference.dynamic_entries
        assert direction.decoder.header_table._current_size == reference._current_size
        if pending is fifty:
            assert list(reference.dynamic_entries) == [fifty[2], fifty[1]]  # exactly full


def test_waiting_entries_stay_within_a_resized_table_and_the_slack() -> None:
    """After the server shrinks its table (a size update in a block), entries waiting for it
    are cut at the new size (plus the slack), not the old one: memory follows the table."""
    peers, observer = Peers(), Http2Observer()
    start(observer)
    streams = range(1, 2 * 100 + 1, 2)
    observer.client_bytes(b"".join(peers.request(s) for s in streams), 1.0)
    resize = encode_integer(256, 5)
    resize[0] |= 0x20
    nginx = b"\x88" + literal(54, b"n" * 200) + literal(28, b"1" * 200)  # entries of 238 and 246
    first, *rest = streams
    block = bytes(resize) + nginx
    records = observer.server_bytes(frame(HEADERS, END_HEADERS | END_STREAM, first, block), 2.0)
    assert records == [ok(200, 1000.0)] and observer._server.blocks.decoder.header_table_size == 256
    for stream in rest:
        observer.server_bytes(frame(HEADERS, END_HEADERS | END_STREAM, stream, nginx), 2.0)
        assert observer._server.blocks.pending_size <= 256 + PENDING_SLACK + 484
        table = observer._server.blocks.decoder.header_table
        assert table._current_size + observer._server.blocks.pending_size <= 2 * 256 + PENDING_SLACK + 484
