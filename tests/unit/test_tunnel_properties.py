"""Properties of the mesh tunnel under random use: (a) any interleaving of API calls on a
client/server pair raises nothing but LocalProtocolError, and every stream delivers
exactly the bytes sent on it, in order; (b) arbitrary bytes fed to a server only ever
produce events, or a cleanly terminated connection, in bounded memory."""

from __future__ import annotations

import itertools
import struct
from collections import defaultdict
from collections.abc import Callable
from typing import TypeVar

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from agent.core.tunnel import (
    Connection,
    ConnectionTerminated,
    DataReceived,
    ErrorCode,
    Event,
    LocalProtocolError,
    RemoteProtocolError,
    StreamOpened,
    StreamReset,
    StreamState,
    WindowOpened,
)
from agent.core.tunnel_frames import (
    FIN,
    HEADER_SIZE,
    MAX_FRAME_PAYLOAD,
    RST,
    SYN,
    VERSION,
    encode_open_header,
)

T = TypeVar("T")
SIDES = ("client", "server")
PATTERN = bytes(range(251)) * 21
picks = st.integers(min_value=0, max_value=20)  # mostly a known stream, sometimes any id
metadata = st.dictionaries(st.text(min_size=1, max_size=4), st.text(max_size=6), max_size=3)


class TunnelPair(RuleBasedStateMachine):
    """Two well-behaved ends driven at random. Misuse may raise LocalProtocolError; neither
    end may ever see the other break the protocol. Each application sends like a real one:
    what the window does not take waits in a backlog until `WindowOpened`."""

    @initialize(client_window=st.sampled_from([7, 64, 1000, 65536]),
                server_window=st.sampled_from([7, 64, 1000, 65536]),
                max_streams=st.integers(1, 4))
    def start(self, client_window: int, server_window: int, max_streams: int) -> None:
        self.ends = {"client": Connection("client", initial_window=client_window, max_streams=max_streams),
                     "server": Connection("server", initial_window=server_window, max_streams=max_streams)}
        self.sent: dict[tuple[str, int], bytearray] = defaultdict(bytearray)  # (sender, id): taken
        self.backlog: dict[tuple[str, int], bytearray] = defaultdict(bytearray)  # not taken yet
        self.received: dict[tuple[str, int], bytearray] = defaultdict(bytearray)  # (receiver, id)
        self.unacknowledged: dict[tuple[str, int], int] = defaultdict(int)
        self.reset: set[int] = set()
        self.opened: list[int] = []  # ids the client opened
        self.auto_accept = False

    def stream(self, pick: int, side: str = "server") -> int:
        """Mostly a stream live at `side`; sometimes any opened id or a small bad one."""
        live = [i for i in self.opened if self.ends[side].stream_state(i) not in (StreamState.IDLE,
                                                                                  StreamState.CLOSED)]
        if pick < 12 and live:
            return live[pick % len(live)]
        if pick < 18 and self.opened:
            return self.opened[pick % len(self.opened)]
        return pick % 4  # 0, 2: never valid; 1, 3: maybe not opened yet

    def misuse_allowed(self, call: Callable[..., T], *args: object) -> T | None:
        try:
            return call(*args)
        except LocalProtocolError:
            return None

    def flush(self, side: str, stream_id: int) -> None:
        backlog = self.backlog[side, stream_id]
        taken = self.misuse_allowed(self.ends[side].send_data, stream_id, backlog)
        if taken is None:  # the stream is gone: so is its backlog
            backlog.clear()
            return
        assert 0 <= taken <= len(backlog)
        self.sent[side, stream_id] += backlog[:taken]
        del backlog[:taken]

    @rule(port=st.integers(1, 65535), metadata=metadata)
    def open_stream(self, port: int, metadata: dict[str, str]) -> None:
        stream_id = self.misuse_allowed(self.ends["client"].open_stream, port, metadata)
        if stream_id is not None:
            self.opened.append(stream_id)

    @rule(pick=picks)
    def accept(self, pick: int) -> None:
        self.misuse_allowed(self.ends["server"].accept_stream, self.stream(pick))

    @rule(side=st.sampled_from(SIDES), pick=picks, size=st.integers(0, 5000), offset=st.integers(0, 250))
    def send(self, side: str, pick: int, size: int, offset: int) -> None:
        stream_id = self.stream(pick, side)
        backlog = self.backlog[side, stream_id]
        waiting = bool(backlog)
        backlog += PATTERN[offset : offset + size]  # varied bytes, so reordering would show
        if not waiting:  # else the application waits for WindowOpened
            self.flush(side, stream_id)

    @rule(side=st.sampled_from(SIDES), pick=picks)
    def end(self, side: str, pick: int) -> None:
        stream_id = self.stream(pick, side)
        if not self.backlog[side, stream_id]:  # a FIN goes after the last byte
            self.misuse_allowed(self.ends[side].end_stream, stream_id)

    @rule(side=st.sampled_from(SIDES), pick=picks, code=st.sampled_from(list(ErrorCode)),
          dice=st.integers(0, 3))
    def reset_stream(self, side: str, pick: int, code: ErrorCode, dice: int) -> None:
        stream_id = self.stream(pick, side) if dice == 0 else 99  # mostly a no-op on a never-opened id
        live = self.ends[side].stream_state(stream_id) not in (StreamState.IDLE, StreamState.CLOSED)
        self.misuse_allowed(self.ends[side].reset_stream, stream_id, code)
        if live:
            self.reset.add(stream_id)

    @rule(side=st.sampled_from(SIDES), pick=picks, share=st.floats(0, 1.2))
    def acknowledge(self, side: str, pick: int, share: float) -> None:
        stream_id = self.stream(pick, side)
        nbytes = int(self.unacknowledged[side, stream_id] * share)
        try:
            self.ends[side].acknowledge(stream_id, nbytes)
        except LocalProtocolError:
            assert (nbytes > self.unacknowledged[side, stream_id]
                    or self.ends[side].stream_state(stream_id) is StreamState.IDLE)
        else:
            self.unacknowledged[side, stream_id] -= nbytes

    @rule(side=st.sampled_from(SIDES), dice=st.integers(0, 3))
    def ping(self, side: str, dice: int) -> None:
        if dice == 0:
            self.ends[side].ping()

    @rule(side=st.sampled_from(SIDES), dice=st.integers(0, 9))
    def goaway(self, side: str, dice: int) -> None:
        if dice == 0:  # rarely: it ends the story early
            self.ends[side].goaway()

    @rule(sender=st.sampled_from(SIDES), chunk=st.integers(1, 70000), auto_accept=st.booleans())
    def pump_and_accept(self, sender: str, chunk: int, auto_accept: bool) -> None:
        self.auto_accept = auto_accept
        self.pump(sender, chunk)

    def pump(self, sender: str, chunk: int) -> bool:
        receiver = "server" if sender == "client" else "client"
        wire = self.ends[sender].data_to_send()
        for start in range(0, len(wire), chunk):
            for event in self.ends[receiver].receive_data(wire[start : start + chunk]):
                self.record(receiver, event)
        return bool(wire)

    def record(self, receiver: str, event: Event) -> None:
        assert not (isinstance(event, ConnectionTerminated) and event.error_code), event
        if isinstance(event, DataReceived):
            self.received[receiver, event.stream_id] += event.data
            self.unacknowledged[receiver, event.stream_id] += len(event.data)
        elif isinstance(event, WindowOpened):
            assert self.backlog[receiver, event.stream_id]
            self.flush(receiver, event.stream_id)
        elif isinstance(event, StreamReset):
            self.reset.add(event.stream_id)
        elif isinstance(event, StreamOpened):
            assert event.stream_id in self.opened
            if self.auto_accept:  # a RST later in the same input may have closed it already
                self.misuse_allowed(self.ends["server"].accept_stream, event.stream_id)

    @invariant()
    def bytes_arrive_in_order(self) -> None:
        if not hasattr(self, "ends"):
            return
        for (receiver, stream_id), got in self.received.items():
            sender = "server" if receiver == "client" else "client"
            assert self.sent[sender, stream_id].startswith(got)
        for end in self.ends.values():
            assert not end.terminated and end.buffered_input < HEADER_SIZE + MAX_FRAME_PAYLOAD

    def teardown(self) -> None:
        """Both applications accept, read and acknowledge everything: then every backlog
        drains (nobody stalls) and every stream not reset delivers exactly what was sent."""
        if not hasattr(self, "ends"):
            return
        self.auto_accept = True
        for stream_id in self.opened:
            self.misuse_allowed(self.ends["server"].accept_stream, stream_id)
        while True:
            for (side, stream_id), count in self.unacknowledged.items():
                self.misuse_allowed(self.ends[side].acknowledge, stream_id, count)
                self.unacknowledged[side, stream_id] = 0
            if not (self.pump("client", 65536) | self.pump("server", 65536)):
                break
        for (sender, stream_id), sent in self.sent.items():
            if stream_id not in self.reset:
                receiver = "server" if sender == "client" else "client"
                assert not self.backlog[sender, stream_id], "a sender stalled"
                assert self.received[receiver, stream_id] == sent


TestTunnelPair = TunnelPair.TestCase
TestTunnelPair.settings = settings(max_examples=300, stateful_step_count=60, deadline=None,
                                   suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------- hostile bytes


def _frame(version: int, frame_type: int, flags: int, stream_id: int, length: int, payload: bytes) -> bytes:
    return struct.pack(">BBHII", version, frame_type, flags, stream_id, length) + payload


plausible_frames = st.builds(
    _frame,
    version=st.sampled_from([VERSION, VERSION, VERSION, VERSION, 0, 1]),
    frame_type=st.sampled_from([0, 0, 0, 1, 1, 2, 3, 4]),
    flags=st.sampled_from([0, 1, 2, 4, 5, 8, 3, 16]),
    stream_id=st.sampled_from([0, 1, 2, 3, 5, 7, 2**32 - 1]),
    length=st.one_of(st.integers(0, 40), st.sampled_from([4096, 4097, 65536, 65537, 2**31, 2**32 - 1])),
    payload=st.binary(max_size=60),
)
opening_frames = st.builds(
    lambda stream_id, port, meta, extra: _frame(
        VERSION, 0, 1, stream_id, len(h := encode_open_header(port, meta)) + len(extra), h + extra),
    stream_id=st.sampled_from([1, 3, 5, 7, 9]),
    port=st.integers(1, 65535),
    meta=metadata,
    extra=st.sampled_from([b"", b"", b"x"]),
)
chunks = st.lists(
    st.one_of(plausible_frames, opening_frames, st.binary(max_size=40)), max_size=30)


@settings(max_examples=1000, deadline=None)
@given(with_preface=st.booleans(), pieces=chunks, split=st.integers(1, 64))
def test_random_bytes_only_ever_produce_events_or_a_clean_termination(
        with_preface: bool, pieces: list[bytes], split: int) -> None:
    server = Connection("server", initial_window=1000, max_streams=3)
    output = len(server.data_to_send())
    wire = (_frame(VERSION, 1, 0, 0, 500, b"") if with_preface else b"") + b"".join(pieces)
    events: list[Event] = []
    for start in range(0, len(wire), split):
        events += server.receive_data(wire[start : start + split])  # never raises
        output += len(server.data_to_send())
        assert server.buffered_input < HEADER_SIZE + MAX_FRAME_PAYLOAD
        assert server.stream_count <= 3
    assert output <= HEADER_SIZE + len(wire) + HEADER_SIZE  # at most one frame out per frame in
    terminations = [e for e in events if isinstance(e, ConnectionTerminated) and e.error_code]
    if server.error is not None:
        assert isinstance(server.error, RemoteProtocolError)
        assert events[-1] == ConnectionTerminated(server.error.error_code, str(server.error), by_peer=False)
    if terminations:
        assert server.terminated and terminations == [events[-1]] and server.buffered_input == 0


@st.composite
def client_transcripts(draw: st.DrawFn) -> bytes:
    """What a well-behaved client might send: streams opened, fed, ended, reset, pings."""
    frames, next_id = [_frame(VERSION, 1, 0, 0, 100_000, b"")], 1
    live: list[int] = []
    for op in draw(st.lists(st.sampled_from(["open", "data", "data", "fin", "rst", "ping"]), max_size=25)):
        if op == "open" or not live:
            header = encode_open_header(draw(st.integers(1, 65535)), draw(metadata))
            frames.append(_frame(VERSION, 0, SYN, next_id, len(header), header))
            live.append(next_id)
            next_id += 2
        elif op == "ping":
            frames.append(_frame(VERSION, 2, SYN, 0, draw(st.integers(0, 2**32 - 1)), b""))
        else:
            stream_id = draw(st.sampled_from(live))
            payload = draw(st.binary(max_size=300)) if op == "data" else b""
            flags = {"data": 0, "fin": FIN, "rst": RST}[op]
            frames.append(_frame(VERSION, 1 if op == "rst" else 0, flags, stream_id,
                                 len(payload) if op != "rst" else 7, payload))
            if op != "data":
                live.remove(stream_id)
    return b"".join(frames)


garbled_transcripts = st.lists(st.one_of(opening_frames, plausible_frames), max_size=20).map(
    lambda pieces: _frame(VERSION, 1, 0, 0, 500, b"") + b"".join(pieces))


@settings(max_examples=500, deadline=None)
@given(wire=st.one_of(client_transcripts(), garbled_transcripts),
       cuts=st.lists(st.integers(0, 3000), max_size=12))
def test_the_same_bytes_split_anywhere_give_the_same_events(wire: bytes, cuts: list[int]) -> None:
    whole = Connection("server", max_streams=3)
    expected = whole.receive_data(wire)
    split = Connection("server", max_streams=3)
    events: list[Event] = []
    bounds = [0, *sorted(c for c in cuts if c < len(wire)), len(wire)]
    for start, stop in itertools.pairwise(bounds):
        events += split.receive_data(wire[start:stop])
    assert events == expected
    assert split.data_to_send() == whole.data_to_send()
