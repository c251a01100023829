"""Golden metrics on the real kernel: a known mix of HTTP/1, HTTP/2 and gRPC traffic between
meshed pods gives exact request and response counts on both agents; hostile input and opaque
traffic are relayed, counted as TCP, and never turn into phantom requests."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.lab.agents import REPO, Metrics
from agent.lab.topology import Pod
from tests.netns.conftest import Mesh, eventually, running_mesh

pytestmark = pytest.mark.netns

HTTP = "agent.lab.httpserver"
TCP = "agent.lab.tcpserver"
GRPC = "agent.lab.grpcserver"
RSS_HEADROOM = 32 * 1024 * 1024

# GETs a JSON list of paths over N keep-alive connections; prints {status: count}.
HTTP1_CLIENT = """\
import collections, http.client, json, sys
host, port, paths, connections = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
statuses = collections.Counter()
for batch in (paths[i::connections] for i in range(connections)):
    conn = http.client.HTTPConnection(host, port, timeout=5)
    for path in batch:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        statuses[str(response.status)] += 1
    conn.close()
print(json.dumps(statuses))
"""



def _wait_listening(pod: Pod, port: int, timeout: float = 10.0) -> None:
    def listening() -> bool:
        out = pod.run(["ss", "-Hltn", f"sport = :{port}"]).stdout
        return bool(out.strip())
    assert eventually(listening, timeout), f"nothing listens on {pod.name}:{port}"


def _get_many(client: Pod, server: Pod, paths: list[str], connections: int = 4,
              port: int = 8080) -> dict[str, int]:
    result = client.run([sys.executable, "-c", HTTP1_CLIENT, server.ip, str(port),
                         json.dumps(paths), str(connections)], timeout=30)
    return dict(json.loads(result.stdout))


@pytest.fixture
def backend() -> str:
    """Counted after capture: any backend hands the agent the same connection, and
    test_capture.py runs the capture itself on all three."""
    return "nftables"


@pytest.fixture
def mesh(shared_mesh: Mesh) -> Mesh:
    """These tests count per pod, and their pods have names of their own: one mesh serves
    the module (the opaque-traffic tests, which count agent-wide, get their own)."""
    return shared_mesh


@pytest.fixture
def own_mesh(backend: str) -> Iterator[Mesh]:
    with running_mesh(backend) as running:
        yield running


def _responses(metrics: Metrics, direction: str, pod: str) -> dict[tuple[str, str, str], float]:
    """response_total of one pod and direction, by (classification, status_code, grpc_status)."""
    return {(s.labels["classification"], s.labels["status_code"], s.labels["grpc_status"]): s.value
            for s in metrics.samples if s.name == "response_total"
            and s.labels["direction"] == direction and s.labels["pod"] == pod and s.value}


def _buckets(metrics: Metrics, direction: str, pod: str) -> list[float]:
    return [s.value for s in metrics.samples if s.name == "response_latency_ms_bucket"
            and s.labels["direction"] == direction and s.labels["pod"] == pod]


def _sides(mesh: Mesh, client: str, server: str) -> list[tuple[Metrics, str, str]]:
    """Both agents' view of one exchange: (metrics, direction, pod)."""
    return [(mesh.agents[0].metrics(), "outbound", client),
            (mesh.agents[1].metrics(), "inbound", server)]


def _assert_golden(mesh: Mesh, requests: int, responses: dict[tuple[str, str, str], int],
                   client: str, server: str) -> None:
    """Exact counts on both agents, once every response has been accounted."""
    def settled() -> bool:
        return all(_responses(m, d, p) == responses for m, d, p in _sides(mesh, client, server))
    eventually(settled)
    for metrics, direction, pod in _sides(mesh, client, server):
        labels = {"direction": direction, "pod": pod}
        assert metrics.value("request_total", **labels) == requests, direction
        assert _responses(metrics, direction, pod) == responses, direction
        assert metrics.value("response_latency_ms_count", **labels) == requests, direction
        buckets = _buckets(metrics, direction, pod)
        assert len(buckets) == 26  # Linkerd's 25 bounds and +Inf
        assert buckets == sorted(buckets) and buckets[-1] == requests, direction
        assert metrics.value("response_latency_ms_sum", **labels) > 0, direction


# ---------------------------------------------------------------- HTTP/1.1


def test_http1_known_mix_is_counted_exactly_on_both_agents(mesh: Mesh) -> None:
    client, web = mesh.pod(0, "client"), mesh.pod(1, "web")
    mesh.serve(web, HTTP, "--port", "8080")
    paths = ["/status/500" if i % 10 == 9 else "/status/200" for i in range(100)]

    assert _get_many(client, web, paths) == {"200": 90, "500": 10}

    _assert_golden(mesh, 100, {("success", "200", ""): 90, ("failure", "500", ""): 10},
                   client.name, web.name)
    for agent, direction, pod in [(0, "outbound", client.name), (1, "inbound", web.name)]:
        metrics = mesh.agents[agent].metrics()
        assert metrics.value("tcp_open_total", direction=direction, pod=pod) == 4
        assert metrics.value("request_total", direction=direction, pod=pod, tls="no_identity") == 100


def test_http1_4xx_is_a_success(mesh: Mesh) -> None:
    client, web = mesh.pod(0, "client"), mesh.pod(1, "web")
    mesh.serve(web, HTTP, "--port", "8080")
    paths = ["/status/404"] * 7 + ["/status/503"] * 3 + ["/whoami"] * 5

    assert _get_many(client, web, paths, connections=2) == {"404": 7, "503": 3, "200": 5}

    _assert_golden(mesh, 15, {("success", "404", ""): 7, ("failure", "503", ""): 3,
                              ("success", "200", ""): 5}, client.name, web.name)


# ---------------------------------------------------------------- HTTP/2 (prior knowledge)


def _nghttpd(mesh: Mesh, pod: Pod, port: int = 8443) -> Path:
    """nghttpd (h2c, prior knowledge) in the pod, serving a docroot in the lab workdir."""
    docroot = mesh.lab.workdir / f"htdocs-{pod.name}"
    docroot.mkdir(exist_ok=True)
    (docroot / "hello.txt").write_bytes(b"hello from nghttpd\n" * 100)
    server = pod.spawn(["nghttpd", "--no-tls", "-d", str(docroot), str(port)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    mesh.servers.append(server)
    _wait_listening(pod, port)
    return docroot


def _h2load(client: Pod, url: str, *args: str) -> dict[str, int]:
    """Run h2load (HTTP/2 prior knowledge for http:// URLs); the status-code classes it saw."""
    result = client.run(["h2load", "--connection-active-timeout=10", *args, url], timeout=30)
    for line in result.stdout.splitlines():
        if line.startswith("status codes:"):
            counts = [part.strip().split(" ") for part in line.split(":", 1)[1].split(",")]
            return {kind: int(count) for count, kind in counts}
    raise AssertionError(result.stdout + result.stderr)


def test_http2_prior_knowledge_is_counted_exactly_on_both_agents(mesh: Mesh) -> None:
    client, web = mesh.pod(0, "client"), mesh.pod(1, "web")
    _nghttpd(mesh, web)

    seen = _h2load(client, f"http://{web.ip}:8443/hello.txt", "-n", "200", "-c", "4", "-m", "4")

    assert seen == {"2xx": 200, "3xx": 0, "4xx": 0, "5xx": 0}
    _assert_golden(mesh, 200, {("success", "200", ""): 200}, client.name, web.name)


def test_http2_404_is_a_success_with_its_status_code(mesh: Mesh) -> None:
    client, web = mesh.pod(0, "client"), mesh.pod(1, "web")
    _nghttpd(mesh, web)

    seen = _h2load(client, f"http://{web.ip}:8443/missing.txt", "-n", "30", "-c", "2", "-m", "2")

    assert seen["4xx"] == 30
    _assert_golden(mesh, 30, {("success", "404", ""): 30}, client.name, web.name)


# A raw h2c client that lets the server speak first: it connects, waits until the server's
# SETTINGS has arrived (as nghttpd, grpc-core and Go send it at once on accept), then sends
# the preface and GETs /hello.txt on streams 1, 3, 5; prints the :status of each.
H2_LATE_CLIENT = """\
import socket, struct, sys, time
import hpack
s = socket.create_connection((sys.argv[1], 8443), timeout=5)
early = s.recv(9)  # the server's SETTINGS frame header, before we said anything
assert early[3] == 4, early
time.sleep(0.2)
frame = lambda kind, flags, stream, payload=b"": (
    struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload)
encoder, decoder = hpack.Encoder(), hpack.Decoder()
out = b"PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n" + frame(4, 0, 0) + frame(4, 1, 0)
for stream in (1, 3, 5):
    block = encoder.encode([(":method", "GET"), (":scheme", "http"), (":path", "/hello.txt"),
                            (":authority", "web")])
    out += frame(1, 0x5, stream, block)  # HEADERS, END_STREAM | END_HEADERS
s.sendall(out)
statuses, open_streams, pending = {}, {1, 3, 5}, early
while open_streams:
    while len(pending) < 9 or len(pending) < 9 + int.from_bytes(pending[:3], "big"):
        chunk = s.recv(65536)
        if not chunk:
            sys.exit(f"closed with streams {sorted(open_streams)} open")
        pending += chunk
    length = int.from_bytes(pending[:3], "big")
    kind, flags, stream = pending[3], pending[4], int.from_bytes(pending[5:9], "big") & 0x7FFFFFFF
    payload, pending = pending[9:9 + length], pending[9 + length:]
    if kind == 1:
        statuses[stream] = dict(decoder.decode(payload))[":status"]
    if kind in (0, 1) and flags & 1:
        open_streams.discard(stream)
s.close()
print(" ".join(statuses[stream] for stream in (1, 3, 5)))
"""


def test_http2_is_detected_when_the_server_sends_settings_before_the_client_preface(
        mesh: Mesh) -> None:
    client, web = mesh.pod(0, "client"), mesh.pod(1, "web")
    _nghttpd(mesh, web)

    result = client.run([sys.executable, "-c", H2_LATE_CLIENT, web.ip], cwd=str(REPO), timeout=20)

    assert result.stdout.split() == ["200", "200", "200"]
    _assert_golden(mesh, 3, {("success", "200", ""): 3}, client.name, web.name)


# ---------------------------------------------------------------- gRPC


def test_grpc_status_decides_success_on_both_agents(mesh: Mesh) -> None:
    client, web = mesh.pod(0, "client"), mesh.pod(1, "web")
    mesh.serve(web, GRPC, "--port", "50051")

    result = client.run([sys.executable, "-m", "agent.lab.grpcclient", f"{web.ip}:50051",
                         "--ok", "20", "--fail", "14=5"], cwd=str(REPO), timeout=30)

    assert json.loads(result.stdout) == {"0": 20, "14": 5}
    _assert_golden(mesh, 25, {("success", "200", "0"): 20, ("failure", "200", "14"): 5},
                   client.name, web.name)


# ---------------------------------------------------------------- hostile input

# Each sends its bytes on one connection, reads what comes back for a while (bounded), and
# prints the first line of the answer (or how the connection ended).
HOSTILE_PRELUDE = """\
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
def answer():
    data = b""
    try:
        while len(data) < 65536 and (chunk := s.recv(65536)):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        return data.split(b"\\r\\n")[0].decode("latin-1") or "reset"
    return data.split(b"\\r\\n")[0].decode("latin-1") or "eof"
def send(payload):
    try:
        s.sendall(payload)
    except (BrokenPipeError, ConnectionResetError):
        pass
"""
# A valid preface and SETTINGS, HEADERS on stream 1 with a broken HPACK block, then a frame
# header claiming 16 MB on stream 3, and noise.
BOGUS_HTTP2 = (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")
               + bytes.fromhex("000005010500000001ffffffffff") + bytes.fromhex("ffffff010500000003")
               + bytes(range(256)) * 8)
HOSTILE = {
    "malformed_request_line": (8080, "send(b'GET /' + b'a' * 80 + b' HTTP/9.9\\r\\nHost: x\\r\\n\\r\\n')"),
    "megabyte_of_headers": (8080, "send(b'GET / HTTP/1.1\\r\\nHost: x\\r\\n' "
                                  "+ b''.join(b'X-Pad-%d: ' % i + b'a' * 1000 + b'\\r\\n' "
                                  "for i in range(1024)) + b'\\r\\n')"),
    "invalid_chunk_size": (8080, "send(b'POST /status/200 HTTP/1.1\\r\\nHost: x\\r\\n"
                                 "Transfer-Encoding: chunked\\r\\n\\r\\nzz\\r\\nhello\\r\\n0\\r\\n\\r\\n')"),
    "bogus_http2_frames": (8443, f"send(bytes.fromhex('{BOGUS_HTTP2.hex()}'))"),
}


def _hostile_mesh(mesh: Mesh) -> tuple[Pod, Pod, Pod, Pod]:
    """client -> web carries the normal traffic, attacker -> target the hostile input."""
    client, attacker = mesh.pod(0, "client"), mesh.pod(0, "attacker")
    web, target = mesh.pod(1, "web"), mesh.pod(1, "target")
    mesh.serve(web, HTTP, "--port", "8080")
    mesh.serve(target, HTTP, "--port", "8080")
    _nghttpd(mesh, target)
    return client, attacker, web, target


def _rss(mesh: Mesh) -> int:
    return sum(agent.rss_bytes() for agent in mesh.agents)


def _normal_traffic_is_exact(mesh: Mesh, client: Pod, web: Pod, rounds: int) -> None:
    assert _get_many(client, web, ["/status/200"] * 5, connections=1) == {"200": 5}
    _assert_golden(mesh, 5 * rounds, {("success", "200", ""): 5 * rounds}, client.name, web.name)


def _hostile_connections_are_tcp(mesh: Mesh, attacker: Pod, target: Pod, count: int) -> None:
    assert eventually(lambda: [
        mesh.agents[0].metrics().value("tcp_close_total", direction="outbound", pod=attacker.name),
        mesh.agents[1].metrics().value("tcp_close_total", direction="inbound", pod=target.name),
    ] == [count, count])
    assert mesh.agents[0].metrics().value("tcp_open_total", direction="outbound",
                                          pod=attacker.name) == count
    assert mesh.agents[1].metrics().value("tcp_open_total", direction="inbound",
                                          pod=target.name) == count


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_input_leaves_other_traffic_working_and_exact(mesh: Mesh, case: str) -> None:
    client, attacker, web, target = _hostile_mesh(mesh)
    _normal_traffic_is_exact(mesh, client, web, rounds=1)
    rss_before = _rss(mesh)
    port, attack = HOSTILE[case]

    answer = attacker.run([sys.executable, "-c", HOSTILE_PRELUDE + attack + "\nprint(answer())",
                           target.ip, str(port)], timeout=20).stdout.strip()

    attacker_side = mesh.agents[0].metrics()
    print(f"{case}: the server answered {answer!r}; attacker requests "
          f"{attacker_side.value('request_total', pod=attacker.name)}, responses "
          f"{_responses(attacker_side, 'outbound', attacker.name)}")
    _normal_traffic_is_exact(mesh, client, web, rounds=2)
    _hostile_connections_are_tcp(mesh, attacker, target, 1)
    assert _rss(mesh) - rss_before < RSS_HEADROOM
    assert all(agent.get("/ready")[0] == 200 for agent in mesh.agents)


STALLED_READER = """\
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
s.settimeout(5)
s.connect((sys.argv[1], 8080))
s.sendall(b"GET /bytes/50000000 HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
print("sent", flush=True)
time.sleep(float(sys.argv[2]))  # never read
s.close()
"""


def test_a_client_that_stops_reading_a_large_response_is_not_buffered(mesh: Mesh) -> None:
    client, attacker, web, target = _hostile_mesh(mesh)
    _normal_traffic_is_exact(mesh, client, web, rounds=1)
    rss_before = _rss(mesh)

    stalled = attacker.spawn([sys.executable, "-c", STALLED_READER, target.ip, "4"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert stalled.stdout is not None and stalled.stdout.readline().strip() == "sent"
        time.sleep(1.5)  # long enough for 50 MB to pile up somewhere if nothing pushes back
        rss_stalled = _rss(mesh)
        _normal_traffic_is_exact(mesh, client, web, rounds=2)
        assert stalled.wait(timeout=10) == 0
    finally:
        if stalled.poll() is None:
            stalled.kill()
            stalled.wait(5)

    print(f"agents' RSS grew by {(rss_stalled - rss_before) / 1e6:.1f} MB while stalled")
    assert rss_stalled - rss_before < RSS_HEADROOM
    _hostile_connections_are_tcp(mesh, attacker, target, 1)
    # The response never completed: one request, ended as a failure on both sides.
    assert eventually(lambda: all(m.value("request_total", direction=d, pod=p) == 1 and
                                   m.value("response_total", direction=d, pod=p,
                                           classification="failure") == 1
                                   for m, d, p in _sides(mesh, attacker.name, target.name)))


# ---------------------------------------------------------------- opaque traffic

OPAQUE_CLIENT = """\
import json, socket, sys
payload = bytes.fromhex(sys.argv[3])
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
banner = s.recv(len(sys.argv[4])) if sys.argv[4] else b""
s.sendall(payload)
s.shutdown(socket.SHUT_WR)
echoed = b""
while chunk := s.recv(65536):
    echoed += chunk
print(json.dumps([banner.decode(), echoed == payload, len(echoed)]))
"""
BANNER = "220 pinion-lab ESMTP ready\r\n"
BANNER_SERVER = f"""\
import socket, threading
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", 2525))
server.listen(8)
print("listening", flush=True)
def handle(conn):
    with conn:
        conn.sendall({BANNER.encode()!r})
        while chunk := conn.recv(65536):
            conn.sendall(chunk)
while True:
    conn, _ = server.accept()
    threading.Thread(target=handle, args=(conn,), daemon=True).start()
"""


def _opaque_exchange(client: Pod, server: Pod, port: int, payload: bytes,
                     banner: str) -> list[object]:
    """[banner seen, echo == payload, echo length] from the client's side."""
    result = client.run([sys.executable, "-c", OPAQUE_CLIENT, server.ip, str(port),
                         payload.hex(), banner], timeout=20)
    return list(json.loads(result.stdout))


def _no_requests_but_tcp(mesh: Mesh, nbytes: int) -> None:
    for metrics, direction, pod in _sides(mesh, "client", "server"):
        assert metrics.value("request_total") == 0  # agent-wide: hence own_mesh
        assert metrics.value("response_total") == 0
        assert metrics.value("tcp_open_total", direction=direction, pod=pod) == 1
        assert metrics.value("tcp_read_bytes_total", direction=direction, pod=pod) >= nbytes


def test_tls_looking_bytes_are_relayed_exactly_and_are_not_requests(own_mesh: Mesh) -> None:
    mesh = own_mesh
    client, server = mesh.pod(0, "client"), mesh.pod(1, "server")
    mesh.serve(server, TCP, "--port", "7443", "--mode", "echo")
    client_hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)) * 40

    assert _opaque_exchange(client, server, 7443, client_hello, "") == [
        "", True, len(client_hello)]

    _no_requests_but_tcp(mesh, len(client_hello))


def test_a_server_that_speaks_first_is_opaque_even_if_the_client_then_speaks_http(
        own_mesh: Mesh) -> None:
    mesh = own_mesh
    client, server = mesh.pod(0, "client"), mesh.pod(1, "server")
    banner_server = server.spawn([sys.executable, "-c", BANNER_SERVER], stdout=subprocess.PIPE,
                                 text=True)
    mesh.servers.append(banner_server)
    assert banner_server.stdout is not None
    assert banner_server.stdout.readline().strip() == "listening"
    looks_like_http = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 3

    seen = _opaque_exchange(client, server, 2525, looks_like_http, BANNER)

    assert seen == [BANNER, True, len(looks_like_http)]
    _no_requests_but_tcp(mesh, len(looks_like_http))
