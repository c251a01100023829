"""Where a request's time goes, hop by hop, from packet captures (bench/paced_split.py --hops).

One `tcpdump -i any` per network namespace a request crosses (the client's pod, both nodes,
the server's pod), all stamped by the one kernel clock. For each request, read off the wire:

    e0 the client's request leaves it             (client's pod, plaintext, client -> proxy)
    e1 the client-side proxy's TLS record leaves  (where that proxy's TLS socket is: the pod
                                                   for Pinion, the node for haproxy)
    e2 the record reaches the server-side proxy   (the server's pod for Pinion, its node for haproxy)
    e3 the request reaches the server             (server's pod, plaintext, -> server port)
    e4 the server's response leaves it            (server's pod, plaintext, server port ->)
    e5 the server-side proxy's record leaves
    e6 the record reaches the client-side proxy
    e7 the response reaches the client            (client's pod, plaintext, proxy -> client)

so that `e1-e0` is the client-side proxy's request hop (its wake-up, read, framing, sealing,
send), `e2-e1` the wire, `e3-e2` the server-side proxy's request hop, `e4-e3` the server,
and so on back. Requests are matched on the client's connection (its own port, in order);
the events on the other captures are the first of their kind after the previous one, which
is exact for a request alone in the system and is what is kept (`isolated`: no other
request's e0..e7 overlaps it): a request that queued behind another shows up in the
end-to-end figures only.

Standard library only."""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence

LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2 = 1, 113, 276
MIN_RECORD = 60  # TLS payload bigger than this carries data (not a lone WINDOW_UPDATE or ACK)


@dataclasses.dataclass(frozen=True, slots=True)
class Segment:
    t: float  # seconds, the capture's (kernel) clock
    src: str
    sport: int
    dst: str
    dport: int
    seq: int
    size: int  # TCP payload bytes


def read_pcap(path: str) -> list[Segment]:
    """TCP segments with payload of an IPv4 pcap (micro- or nanosecond; Ethernet, Linux
    cooked v1 or v2 links), each once: `-i any` shows a loopback segment twice."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 24:
        return []
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise ValueError(f"{path}: not a classic pcap file")
    nano = magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    header = {LINKTYPE_ETHERNET: 14, LINKTYPE_LINUX_SLL: 16, LINKTYPE_LINUX_SLL2: 20}.get(linktype)
    if header is None:
        raise ValueError(f"{path}: link type {linktype} not read here")
    proto_at = {LINKTYPE_ETHERNET: 12, LINKTYPE_LINUX_SLL: 14, LINKTYPE_LINUX_SLL2: 0}[linktype]
    seen: set[tuple[str, int, str, int, int, int]] = set()
    out: list[Segment] = []
    at = 24
    while at + 16 <= len(data):
        sec, frac, incl, _orig = struct.unpack(endian + "IIII", data[at:at + 16])
        frame = data[at + 16:at + 16 + incl]
        at += 16 + incl
        if len(frame) < header + 20 or frame[proto_at:proto_at + 2] != b"\x08\x00":
            continue
        ip = frame[header:]
        ihl = (ip[0] & 0x0F) * 4
        if ip[0] >> 4 != 4 or ip[9] != 6 or len(ip) < ihl + 20:
            continue
        total = struct.unpack("!H", ip[2:4])[0]
        tcp = ip[ihl:]
        sport, dport, seq = struct.unpack("!HHI", tcp[:8])
        size = total - ihl - (tcp[12] >> 4) * 4
        if size <= 0:
            continue
        src, dst = ".".join(map(str, ip[12:16])), ".".join(map(str, ip[16:20]))
        key = (src, sport, dst, dport, seq, size)
        if key in seen:
            continue
        seen.add(key)
        out.append(Segment(sec + frac / (1e9 if nano else 1e6), src, sport, dst, dport, seq, size))
    out.sort(key=lambda s: s.t)
    return out


@dataclasses.dataclass
class Request:
    events: list[float]  # e0..e7

    @property
    def hops(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.events)]

    @property
    def total(self) -> float:
        return self.events[-1] - self.events[0]


HOPS = ("client proxy, request", "wire, request", "server proxy, request", "server",
        "server proxy, response", "wire, response", "client proxy, response")


def requests(client: Sequence[Segment], tls_client: Sequence[Segment],
             tls_server: Sequence[Segment], server: Sequence[Segment],
             client_ports: Iterable[int], tls_port: int, server_port: int) -> tuple[list[Request], int]:
    """(`isolated` requests with their six events, how many requests in all). `client_ports`:
    the ports the client connects to (the proxy's, or the service's it is redirected from):
    the client's own port is the other one."""
    service = set(client_ports)
    asked: dict[int, list[float]] = {}  # client port -> request times (first segment each)
    told: dict[int, list[float]] = {}  # client port -> response times (first segment each)
    last_dir: dict[int, str] = {}
    for s in client:
        if tls_port in (s.sport, s.dport):
            continue  # the proxy's own TLS (Pinion's tunnel leaves from the client's pod)
        if s.dport in service and s.sport not in service:
            port, direction = s.sport, "req"
        elif s.sport in service and s.dport not in service:
            port, direction = s.dport, "resp"
        else:
            continue
        if last_dir.get(port) != direction:  # the first segment of a message
            (asked if direction == "req" else told).setdefault(port, []).append(s.t)
            last_dir[port] = direction
    pairs = sorted((req, resp) for port, reqs in asked.items()
                   for req, resp in zip(reqs, told.get(port, []), strict=False) if resp > req)
    sent = [s.t for s in tls_client if s.dport == tls_port and s.size > MIN_RECORD]
    arrived = [s.t for s in tls_server if s.dport == tls_port and s.size > MIN_RECORD]
    answered = [s.t for s in tls_server if s.sport == tls_port and s.size > MIN_RECORD]
    back = [s.t for s in tls_client if s.sport == tls_port and s.size > MIN_RECORD]
    to_server = [s.t for s in server if s.dport == server_port]
    from_server = [s.t for s in server if s.sport == server_port]

    def after(times: list[float], t: float) -> float:
        i = bisect.bisect_left(times, t)
        return times[i] if i < len(times) else math.inf

    found: list[Request] = []
    ended = -math.inf  # the latest end of the requests before this one
    for i, (start, end) in enumerate(pairs):
        following = pairs[i + 1][0] if i + 1 < len(pairs) else math.inf
        alone = ended < start and following > end
        ended = max(ended, end)
        if not alone:
            continue  # another request in flight: the events below could be its
        events = [start]
        for times in (sent, arrived, to_server, from_server, answered, back):
            events.append(after(times, events[-1]))
        events.append(end)
        if events[-2] <= end:
            found.append(Request(events))
    return found, len(pairs)


def pct(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))]


def table(results: dict[str, tuple[list[Request], int]]) -> str:
    """Per configuration: each hop's p50 / p90 / p99, and its mean over the slowest 1 % of
    requests (by e7-e0): which hop the tail is in."""
    lines = ["| config | requests (isolated / all) | hop | p50 µs | p90 µs | p99 µs "
             "| mean in the slowest 1 % µs |", "|---|---|---|---:|---:|---:|---:|"]
    for name, (found, total) in results.items():
        if not found:
            lines.append(f"| {name} | 0 / {total} | – | | | | |")
            continue
        slow = sorted(found, key=lambda r: r.total)[-max(1, len(found) // 100):]
        rows = [*enumerate(HOPS), (len(HOPS), "end to end (e7-e0)")]
        for k, hop in rows:
            values = [r.hops[k] if k < len(HOPS) else r.total for r in found]
            tail = [r.hops[k] if k < len(HOPS) else r.total for r in slow]
            lead = f"| {name} | {len(found)} / {total} " if k == 0 else "| | "
            lines.append(f"{lead}| {hop} | {pct(values, 50) * 1e6:.0f} | {pct(values, 90) * 1e6:.0f} "
                         f"| {pct(values, 99) * 1e6:.0f} | {sum(tail) / len(tail) * 1e6:.0f} |")
    return "\n".join(lines)


def captured_run(directory: str, name: str, namespaces: dict[str, str], run: Callable[[], object],
                 client_ports: Iterable[int], tls_port: int, server_port: int
                 ) -> tuple[list[Request], int]:
    """`run()` under `tcpdump -i any` in each of `namespaces` (role -> netns: "client" and
    "server" — the pods —, "node1" and "node2"), the pcap files kept in `directory`, then
    `requests()` of what they saw. tcpdump wakes about once a second (no -U): it costs the
    run little. The TLS ends are the pods' captures if they carry the TLS port (Pinion's
    tunnel), else the nodes' (a node-to-node proxy pair)."""
    os.makedirs(directory, exist_ok=True)
    files, dumps = {}, []
    for role, netns in namespaces.items():
        files[role] = os.path.join(directory, f"{name}-{role}.pcap")
        dumps.append(subprocess.Popen(
            ["ip", "netns", "exec", netns, "tcpdump", "-q", "-i", "any", "-s", "128", "-B", "16384",
             "--time-stamp-precision=nano", "-w", files[role], "tcp"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    try:
        time.sleep(1.0)
        run()
    finally:
        for dump in dumps:
            dump.send_signal(signal.SIGINT)
        for dump in dumps:
            _, err = dump.communicate(timeout=30)
            dropped = [line for line in err.splitlines() if "dropped by kernel" in line]
            if dropped and not dropped[0].startswith("0 "):
                print(f"{name}: tcpdump {dropped[0]}", file=sys.stderr)
    seen = {role: read_pcap(path) for role, path in files.items()}

    def carrying(*roles: str) -> list[Segment]:
        return next((seen[role] for role in roles if role in seen
                     and any(tls_port in (s.sport, s.dport) for s in seen[role])), [])

    return requests(seen["client"], carrying("client", "node1"), carrying("server", "node2"),
                    seen["server"], client_ports, tls_port, server_port)
