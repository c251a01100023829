"""Properties of HTTP/2 accounting: hostile frames never raise or grow memory past the caps;
valid exchanges, however split and interleaved, end in exactly one Record per stream."""

from __future__ import annotations

import random

import hpack
from hpack.hpack import encode_integer
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.accounting import Record
from agent.core.hpack_blocks import PENDING_SLACK
from agent.core.http2 import PREFACE, Http2Observer
from tests.unit.test_http1_accounting_properties import chunks
from tests.unit.test_http2_accounting import DATA, END_STREAM, Peers, frame

CAP = 4096

raw_frame = st.builds(
    lambda ftype, flags, stream, payload: frame(ftype, flags, stream, payload),
    st.integers(0, 12),
    st.integers(0, 255),
    st.integers(0, 9),
    st.binary(max_size=64),
)


def assert_bounded(observer: Http2Observer) -> None:
    for direction in (observer._client, observer._server):
        assert direction.partial is None or len(direction.partial) <= CAP
        assert direction.block is None or len(direction.block) <= CAP
        assert direction.blocks.decoder.header_table_size <= 64 * 1024
    assert len(observer._streams) <= 16


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.one_of(raw_frame, st.binary(max_size=100))), max_size=30),
    st.booleans(),
)
def test_frame_soup_never_raises_and_stays_bounded(steps: list[tuple[bool, bytes]], reset: bool) -> None:
    observer = Http2Observer(max_header_bytes=CAP, max_streams=16)
    peers = Peers()
    records: list[Record] = []
    records += observer.client_bytes(PREFACE + peers.request(1), 0.0)
    started = observer.take_started()
    for t, (from_client, data) in enumerate(steps):
        feed = observer.client_bytes if from_client else observer.server_bytes
        records += feed(data, float(t))
        started += observer.take_started()
        assert_bounded(observer)
    records += observer.closed(99.0, reset)
    assert len(records) == started


stream_plan = st.tuples(
    st.sampled_from([200, 204, 404, 500, 503]),
    st.sampled_from([None, 0, 2, 14]),  # grpc-status in trailers
    st.integers(0, 30),  # response DATA length
    st.booleans(),  # trailers-only
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(stream_plan, min_size=1, max_size=6),
    st.randoms(use_true_random=False),
    st.lists(st.integers(0, 5000), max_size=10),
)
def test_valid_exchanges_give_one_record_per_stream(
    plans: list[tuple[int, int | None, int, bool]], rng: random.Random, cuts: list[int]
) -> None:
    peers = Peers()
    client = PREFACE + b"".join(peers.request(2 * i + 1, grpc=True) for i in range(len(plans)))
    steps_left = {i: response_steps(plan) for i, plan in enumerate(plans)}
    server, finished = b"", []
    while steps_left:  # interleave the streams' frames at random, each stream in order
        i = rng.choice(sorted(steps_left))
        step = steps_left[i].pop(0)
        server += encode_step(peers, 2 * i + 1, plans[i], step)
        if not steps_left[i]:
            del steps_left[i]
            finished.append(i)
    observer = Http2Observer()
    observer.client_bytes(client, 1.0)
    assert observer.take_started() == len(plans)
    records: list[Record] = []
    for piece in chunks(server, cuts):
        records += observer.server_bytes(piece, 2.0)
    assert records == [expected(plans[i]) for i in finished]
    assert not observer.opaque


def response_steps(plan: tuple[int, int | None, int, bool]) -> list[str]:
    _, grpc_status, _, trailers_only = plan
    if trailers_only:
        return ["headers"]
    return ["headers", "data", "trailers"] if grpc_status is not None else ["headers", "data"]


def encode_step(peers: Peers, stream: int, plan: tuple[int, int | None, int, bool], step: str) -> bytes:
    status, grpc_status, length, trailers_only = plan
    if step == "headers":
        extra = {"grpc_status": str(grpc_status)} if trailers_only and grpc_status is not None else {}
        return peers.response(stream, status, end_stream=trailers_only, **extra)
    if step == "data":
        return frame(DATA, 0 if grpc_status is not None else END_STREAM, stream, bytes(length))
    assert grpc_status is not None
    return peers.trailers(stream, grpc_status)


def expected(plan: tuple[int, int | None, int, bool]) -> Record:
    status, grpc_status, _, _ = plan
    failed = status >= 500 or grpc_status not in (None, 0)
    return Record("failure" if failed else "success", status, grpc_status, 1000.0, "GET")


def _nginx_block(status: int, date: int) -> bytes:
    """A response block as nginx sends it: `:status`, then literals with static names and
    incremental indexing (server, date, content-length), never referring to the table."""
    fields = [(54, b"nginx/1.22.1"), (33, f"Sun, 06 Dec 2026 12:00:{date:02d} GMT".encode()),
              (28, b"1024")]
    block = bytearray(hpack.Encoder().encode([(":status", str(status))]))
    for name_index, value in fields:
        name = encode_integer(name_index, 6)
        name[0] |= 0x40
        block += name + encode_integer(len(value), 7) + value
    return bytes(block)


header_block_plan = st.one_of(
    st.tuples(st.just("nginx"), st.sampled_from([200, 404]), st.integers(0, 2)),
    st.tuples(st.just("encoder"), st.lists(st.tuples(
        st.sampled_from(["server", "x-a", "x-b", "date", "grpc-status"]),
        st.sampled_from(["", "0", "nginx", "a long value " * 3]),
        st.sampled_from(["index", "never"])), min_size=1, max_size=4), st.booleans()),
    st.tuples(st.just("resize"), st.sampled_from([0, 64, 200, 4096])),
    st.tuples(st.just("repeat"), st.integers(0, 10)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(header_block_plan, st.booleans()), max_size=60))
def test_memoised_blocks_decode_as_hpack_does_and_keep_the_table_in_step(
        plans: list[tuple[tuple, bool]]) -> None:
    """Every block through the observer's memos gives the fields a plain hpack decoder gives
    for the same byte stream, and the table, once the entries waiting for it are added, is
    the same: nginx-style blocks, an encoder that indexes and refers to its table, table
    resizes, and blocks sent again. (Looked at after some blocks only, so that entries also
    wait long, through cuts of the waiting list.)"""
    observer, shadow, encoder = Http2Observer(), hpack.Decoder(), hpack.Encoder()
    server = observer._server.blocks
    sent: list[bytes] = []
    for plan, look in plans:
        if plan[0] == "nginx":
            block = _nginx_block(plan[1], plan[2])
        elif plan[0] == "encoder":
            headers = [(n, v) if how == "index" else hpack.NeverIndexedHeaderTuple(n, v)
                       for n, v, how in plan[1]]
            block = encoder.encode([(":status", "200"), *headers], huffman=plan[2])
        elif plan[0] == "resize":
            encoder.header_table_size = plan[1]  # the next block starts with a size update
            continue
        elif sent:
            block = sent[plan[1] % len(sent)]  # the same bytes again (may mean otherwise now)
        else:
            continue
        sent.append(block)
        try:
            expected = shadow.decode(block, raw=True)
        except hpack.HPACKError:
            assert server.decode(block) is None
            return
        assert server.decode(block) == expected
        assert len(server.memo) <= 64 and len(server.lasting) <= 64
        held = server.pending_size + server.decoder.header_table._current_size
        assert held <= 2 * server.decoder.header_table_size + PENDING_SLACK + 64 * (32 + 60)
        if look:
            server.settle()
            assert server.decoder.header_table.dynamic_entries == shadow.header_table.dynamic_entries
            assert server.decoder.header_table_size == shadow.header_table_size
            assert server.decoder.header_table._current_size == shadow.header_table._current_size
