"""bench/hops.py reads the captures it is given and attributes each request's time to the hop
it was spent in: pcap files built here (Linux cooked v2 and Ethernet links, micro- and
nanosecond stamps, a loopback segment seen twice) with requests whose every event time is
known, some alone in flight, some overlapping (left out: their events could be another's)."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import hops  # noqa: E402

CLIENT, PROXY = ("10.42.0.5", 40001), ("127.0.0.1", 15001)
TLS_OUT, TLS_PEER = ("10.42.0.5", 50000), ("10.42.1.7", 15008)
AGENT, SERVER = ("10.42.0.5", 41000), ("10.42.1.7", 80)


def _segment(src: tuple[str, int], dst: tuple[str, int], seq: int, size: int) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", src[1], dst[1], seq, 0, 5 << 4, 0x18, 65535, 0, 0)
    total = 20 + len(tcp) + size
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, 6, 0,
                     bytes(map(int, src[0].split("."))), bytes(map(int, dst[0].split("."))))
    return ip + tcp + b"x" * size


def _pcap(path: Path, segments: list[tuple[float, bytes]], link: int, nano: bool) -> None:
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    out = [struct.pack("<IHHiIII", magic, 2, 4, 0, 0, 65535, link)]
    for t, ip in segments:
        if link == hops.LINKTYPE_LINUX_SLL2:
            frame = struct.pack("!HHIHBB8s", 0x0800, 0, 1, 772, 4, 0, b"") + ip
        else:
            frame = b"\x00" * 12 + b"\x08\x00" + ip
        sec = int(t)
        frac = round((t - sec) * (1e9 if nano else 1e6))
        out.append(struct.pack("<IIII", sec, frac, len(frame), len(frame)) + frame)
    path.write_bytes(b"".join(out))


def _request(start: float, delays: list[float], client: tuple[str, int] = CLIENT
             ) -> list[tuple[str, float, bytes]]:
    """The eight events of one request on `client`'s connection, `delays` (seven, seconds)
    apart, as (capture, time, segment)."""
    t = [start]
    for delay in delays:
        t.append(t[-1] + delay)
    seq = int(start * 1e6) % 2**32
    return [("client", t[0], _segment(client, PROXY, seq, 80)),
            ("client", t[1], _segment(TLS_OUT, TLS_PEER, seq, 120)),
            ("server", t[2], _segment(TLS_OUT, TLS_PEER, seq, 120)),
            ("server", t[3], _segment(AGENT, SERVER, seq, 80)),
            ("server", t[4], _segment(SERVER, AGENT, seq, 1200)),
            ("server", t[5], _segment(TLS_PEER, TLS_OUT, seq, 1250)),
            ("client", t[6], _segment(TLS_PEER, TLS_OUT, seq, 1250)),
            ("client", t[7], _segment(PROXY, client, seq, 1200))]


@pytest.mark.parametrize("link", [hops.LINKTYPE_LINUX_SLL2, hops.LINKTYPE_ETHERNET])
@pytest.mark.parametrize("nano", [True, False])
def test_each_request_alone_is_split_into_its_seven_hops(tmp_path: Path, link: int,
                                                         nano: bool) -> None:
    alone = [_request(100.0, [50e-6, 20e-6, 60e-6, 80e-6, 40e-6, 20e-6, 55e-6]),
             _request(100.010, [70e-6, 25e-6, 65e-6, 90e-6, 300e-6, 22e-6, 61e-6])]
    # two requests in flight at once on two connections (the second starts before the first
    # is answered)
    overlapping = [_request(100.020, [50e-6] * 7),
                   _request(100.020_1, [50e-6] * 7, client=("10.42.0.5", 40002))]
    events = [e for request in alone + overlapping for e in request]
    # a window update alone on the tunnel (too small to be data) while the second request's
    # response is on its way, and a pure ACK: neither is an event
    events.append(("client", 100.010_56, _segment(TLS_PEER, TLS_OUT, 1, 35)))
    events.append(("client", 100.0051, _segment(CLIENT, PROXY, 2, 0)))
    captures = {}
    for name in ("client", "server"):
        chosen = sorted((t, ip) for capture, t, ip in events if capture == name)
        if name == "client":
            chosen.append((chosen[0][0] + 1e-6, chosen[0][1]))  # loopback: seen twice
            chosen.sort()
        _pcap(tmp_path / f"{name}.pcap", chosen, link, nano)
        captures[name] = hops.read_pcap(str(tmp_path / f"{name}.pcap"))
    assert len(captures["client"]) == 4 * 4 + 1  # the duplicate and the ACK are not segments
    found, total = hops.requests(captures["client"], captures["client"], captures["server"],
                                 captures["server"], {80, 15001}, 15008, 80)
    assert total == 4
    assert len(found) == 2
    tolerance = 2e-9 if nano else 2e-6
    assert found[0].hops == pytest.approx([50e-6, 20e-6, 60e-6, 80e-6, 40e-6, 20e-6, 55e-6],
                                          abs=tolerance)
    assert found[1].hops == pytest.approx([70e-6, 25e-6, 65e-6, 90e-6, 300e-6, 22e-6, 61e-6],
                                          abs=tolerance)
    assert found[1].total == pytest.approx(sum([70, 25, 65, 90, 300, 22, 61]) * 1e-6, abs=tolerance)
    table = hops.table({"pinion": (found, total)})
    assert "| pinion | 2 / 4 | client proxy, request |" in table
    assert "| | server proxy, response | 40 | 300 | 300 | 300 |" in table
    assert "end to end (e7-e0)" in table


def test_a_file_that_is_not_a_pcap_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.pcapng"
    path.write_bytes(b"\x0a\x0d\x0d\x0a" + b"\x00" * 40)
    with pytest.raises(ValueError, match="not a classic pcap"):
        hops.read_pcap(str(path))
