"""The compiled tunnel framing (mypyc, agent/core/compiled.py) behaves exactly as its Python
sources: the same peer bytes, split anywhere, give the same events, the same bytes to send
and the same end state on both builds; and the same random sequence of API calls on a
client/server pair of each build gives the same results, errors, events and wire bytes."""

from __future__ import annotations

import itertools
import os
import struct
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.core import compiled

from .tunnel_builds import process_build, python_build

if not os.environ.get("CI") and not compiled.is_compiled(process_build()[1]):
    pytest.skip("the tunnel framing is not compiled here (pip install -e . builds it)",
                allow_module_level=True)

COMPILED = process_build()
PYTHON = python_build()
BUILDS = (COMPILED, PYTHON)
EXAMPLES = int(os.environ.get("PINION_DIFF_EXAMPLES", "400"))


def test_the_builds_compared_are_the_compiled_one_and_the_python_one() -> None:
    assert compiled.is_compiled(COMPILED[0]) and compiled.is_compiled(COMPILED[1])
    assert not compiled.is_compiled(PYTHON[0]) and not compiled.is_compiled(PYTHON[1])
    assert COMPILED[1].Connection is not PYTHON[1].Connection


def frame(version: int, frame_type: int, flags: int, stream_id: int, length: int,
          payload: bytes = b"") -> bytes:
    return struct.pack(">BBHII", version, frame_type, flags, stream_id, length) + payload


def open_frame(stream_id: int, port: int, metadata: dict[str, str], extra: bytes) -> bytes:
    header = struct.pack(">H", port) + PYTHON[0].encode_open_header(max(port, 1), metadata)[2:]
    return frame(2, 0, 0x1, stream_id, len(header) + len(extra), header + extra)


metadata = st.dictionaries(st.text(min_size=1, max_size=4), st.text(max_size=6), max_size=3)
plausible_frames = st.builds(
    frame,
    version=st.sampled_from([2, 2, 2, 2, 2, 2, 1, 0]),
    frame_type=st.sampled_from([0, 0, 0, 1, 1, 1, 2, 3, 4]),
    flags=st.sampled_from([0, 0, 1, 2, 4, 5, 8, 3, 16]),
    stream_id=st.sampled_from([0, 1, 2, 3, 5, 7, 2**32 - 1]),
    length=st.one_of(st.integers(0, 40), st.sampled_from([4096, 4097, 65536, 65537, 2**31, 2**32 - 1])),
    payload=st.binary(max_size=60),
)
opening_frames = st.builds(open_frame, stream_id=st.sampled_from([1, 3, 5, 7, 9]),
                           port=st.integers(0, 65535), metadata=metadata,
                           extra=st.sampled_from([b"", b"", b"", b"x"]))
prefaces = st.builds(frame, version=st.just(2), frame_type=st.just(1), flags=st.just(0),
                     stream_id=st.just(0), length=st.sampled_from([0, 7, 500, 65536, 2**31 - 1, 2**31]))


@st.composite
def client_transcripts(draw: st.DrawFn) -> list[bytes]:
    """Frames a client might send: streams opened, fed, ended, reset, pings; then, maybe, a
    few bad ones."""
    frames, next_id, live = [], 1, list[int]()
    for op in draw(st.lists(st.sampled_from(["open", "data", "data", "data", "fin", "rst", "ping",
                                             "credit"]), max_size=25)):
        if op == "open" or not live:
            frames.append(open_frame(next_id, draw(st.integers(1, 65535)), draw(metadata), b""))
            live.append(next_id)
            next_id += 2
        elif op == "ping":
            frames.append(frame(2, 2, 0x1, 0, draw(st.integers(0, 2**32 - 1))))
        elif op == "credit":
            frames.append(frame(2, 1, 0, draw(st.sampled_from([0, *live])), draw(st.integers(0, 70000))))
        else:
            stream_id = draw(st.sampled_from(live))
            payload = draw(st.binary(max_size=300)) if op == "data" else b""
            if op == "rst":
                frames.append(frame(2, 1, 0x8, stream_id, 7))
            else:
                frames.append(frame(2, 0, 0x4 if op == "fin" else 0, stream_id, len(payload), payload))
            if op != "data":
                live.remove(stream_id)
    return frames + draw(st.lists(st.one_of(plausible_frames, st.binary(max_size=20)), max_size=2))


byte_streams = st.one_of(
    client_transcripts(),
    st.lists(st.one_of(plausible_frames, opening_frames, st.binary(max_size=40)), max_size=25))


def outcome(call: Any, *args: object) -> tuple[str, str]:
    """What a call did, comparable across builds (repr of events, errors by class and text)."""
    try:
        return "ok", repr(call(*args))
    except Exception as error:
        return type(error).__name__, str(error)


def state(end: Any) -> tuple[object, ...]:
    return (end.terminated, end.finished, end.going_away, end.stream_count, end.buffered_input,
            end.queued_data, end.connection_send_window, end.connection_receive_window,
            repr(end.error), [(i, end.stream_state(i).value, end.window(i)) for i in range(12)])


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(role=st.sampled_from(["server", "client"]), window=st.sampled_from([7, 1000, 65536]),
       opened=st.integers(0, 4), preface=prefaces, pieces=byte_streams,
       cuts=st.lists(st.integers(0, 2000), max_size=10))
def test_the_same_peer_bytes_give_the_same_events_and_answers(
        role: str, window: int, opened: int, preface: bytes, pieces: list[bytes], cuts: list[int]) -> None:
    ends = [tunnel.Connection(role, initial_window=window, max_streams=3) for _, tunnel in BUILDS]
    if role == "client":  # streams the peer's ACKs, DATA and RSTs can be about
        for _ in range(opened):
            assert len({outcome(end.open_stream, 80, {"pod": "a"}) for end in ends}) == 1
    assert len({end.data_to_send() for end in ends}) == 1
    wire = preface + b"".join(pieces)
    bounds = [0, *sorted(cut for cut in cuts if cut < len(wire)), len(wire)]
    for start, stop in itertools.pairwise(bounds):
        answers = [outcome(end.receive_data, wire[start:stop]) for end in ends]
        assert answers[0] == answers[1]
        assert ends[0].data_to_send() == ends[1].data_to_send()
        assert state(ends[0]) == state(ends[1])


SIDES = ("client", "server")
ids = st.sampled_from([1, 1, 1, 1, 3, 3, 5, 0, 2, 7])  # mostly streams that get opened
operations = st.lists(st.one_of(
    st.tuples(st.just("open"), st.sampled_from([80, 80, 0, 65536]), metadata),
    st.tuples(st.just("accept"), ids),
    st.tuples(st.just("accept"), ids),
    st.tuples(st.just("send"), st.sampled_from(SIDES), ids, st.integers(0, 70000)),
    st.tuples(st.just("send"), st.sampled_from(SIDES), ids, st.integers(0, 2000)),
    st.tuples(st.just("end"), st.sampled_from(SIDES), ids),
    st.tuples(st.just("reset"), st.sampled_from(SIDES), ids, st.sampled_from([0, 4, 7, 99])),
    st.tuples(st.just("acknowledge"), st.sampled_from(SIDES), ids, st.integers(0, 70000)),
    st.tuples(st.just("acknowledge"), st.sampled_from(SIDES), ids, st.sampled_from([1, 7, 50, 1000])),
    st.tuples(st.just("ping"), st.sampled_from(SIDES)),
    st.tuples(st.just("goaway"), st.sampled_from(SIDES), st.sampled_from([0, 0, 0, 2]), st.integers(0, 5)),
    st.tuples(st.just("pump"), st.sampled_from(SIDES), st.integers(1, 70000)),
    st.tuples(st.just("pump"), st.sampled_from(SIDES), st.integers(1, 70000)),
), max_size=60)
PATTERN = bytes(range(251)) * 300
# streams 1 and 3 open and accepted, the prefaces exchanged: the random calls start from there
WARM_UP = [("open", 80, {"pod": "a"}), ("open", 81, {"pod": "a"}), ("pump", "client", 65536),
           ("accept", 1), ("accept", 3), ("pump", "server", 65536)]


def apply(tunnel: ModuleType, ends: dict[str, Any], operation: tuple[Any, ...]) -> list[object]:
    """One operation on one build's pair; what it returned or raised, and what it queued."""
    name, *args = operation
    if name == "open":
        port, meta = args
        results = [outcome(ends["client"].open_stream, port, meta)]
    elif name == "accept":
        results = [outcome(ends["server"].accept_stream, args[0])]
    elif name == "send":
        side, stream_id, size = args
        results = [outcome(ends[side].send_data, stream_id, PATTERN[:size])]
    elif name == "end":
        results = [outcome(ends[args[0]].end_stream, args[1])]
    elif name == "reset":
        results = [outcome(ends[args[0]].reset_stream, args[1], args[2])]
    elif name == "acknowledge":
        results = [outcome(ends[args[0]].acknowledge, args[1], args[2])]
    elif name == "ping":
        results = [outcome(ends[args[0]].ping)]
    elif name == "goaway":  # rarely: it ends the story early
        results = [outcome(ends[args[0]].goaway, args[1]) if args[2] == 0 else ("skipped", "")]
    else:  # pump: the sender's queued bytes into the receiver, in chunks
        sender, chunk = args
        receiver = "server" if sender == "client" else "client"
        wire = ends[sender].data_to_send()
        results = [outcome(ends[receiver].receive_data, wire[start : start + chunk])
                   for start in range(0, len(wire), chunk)]
    return [*results, state(ends["client"]), state(ends["server"])]


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(windows=st.tuples(st.sampled_from([7, 1000, 65536, 2**20]), st.sampled_from([7, 1000, 65536])),
       operations=operations)
def test_the_same_calls_on_both_builds_give_the_same_results(
        windows: tuple[int, int], operations: list[tuple[Any, ...]]) -> None:
    pairs = [{side: tunnel.Connection(side, initial_window=window, max_streams=3)
              for side, window in zip(SIDES, windows, strict=True)} for _, tunnel in BUILDS]
    for operation in [*WARM_UP, *operations]:
        compiled_result, python_result = (apply(tunnel, pair, operation)
                                          for (_, tunnel), pair in zip(BUILDS, pairs, strict=True))
        assert compiled_result == python_result, operation
    for side in SIDES:
        assert pairs[0][side].data_to_send() == pairs[1][side].data_to_send()
