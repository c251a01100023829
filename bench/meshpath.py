"""One paced request through the whole mesh path, in one process, counted in instructions.

`bench/hotpath.py` counts pieces (a relay, the tunnel framing) driven directly. This script
runs the path as the agents run it, on uvloop, with real sockets and real TLS:

    client app --TCP--> Relay (outbound) -> tunnel stream -> TunnelSession (client)
      ==TLS 1.3 mTLS over TCP (uvloop's SSL protocol, AES-128-GCM)==>
    TunnelSession (server) -> tunnel stream -> Relay (inbound) --TCP--> server app

The client app sends wrk's GET and waits for nginx's 1 KiB response before the next, so
every hop is one event-loop wake-up, as at a paced 1,000 req/s where each request finds the
agents idle. Both agents' work (uvloop callbacks, TLS records, tunnel shell and framing,
relays, HTTP/1 observation, counters) and the two toy apps run in this one process;
`--case direct` is the apps alone over one TCP connection, to subtract. valgrind's callgrind
counts the instructions one more request costs (two request counts, the difference), so
start-up, imports and the TLS handshake cancel out. System calls are counted as the
user-space instructions around them, not the kernel's work.

    python bench/meshpath.py                       # callgrind table (about 2 minutes)
    python bench/meshpath.py --case mesh --requests N   # one run, no valgrind
    python bench/meshpath.py --profile OUT         # one callgrind profile of the mesh case
    python bench/meshpath.py --cpu-time            # user and system CPU per request, kernel included
    python bench/meshpath.py --cpu-time --pace 0.001 --requests 5000   # idle between requests

`--cpu-time` runs each case in processes of their own (30,000 minus 3,000 requests, 3
interleaved rounds, the median) with `MALLOC_MMAP_THRESHOLD_=131072` as deploy/daemonset.yaml
sets it, and reads the processes' user and system time: what callgrind cannot see (system
calls, page faults). With `--pace S` the client waits S seconds before each next request, so
the process sleeps between requests as the agents do at a paced load; on this VM that costs
the same instructions ~4 times the CPU (caches, TLBs and branch predictors cold after each
sleep: docs/fastpath.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, cast

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.hotpath import REQUEST, RESPONSE

CASES = ("direct", "mesh", "mesh-opaque")


def _certificates(directory: str) -> dict[str, str]:
    """A CA, a server and a client certificate (ECDSA P-256), as the agents use."""
    def openssl(*argv: str) -> None:
        subprocess.run(["openssl", *argv], cwd=directory, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=bench-ca")
    for name in ("server", "client"):
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        with open(os.path.join(directory, f"{name}.ext"), "w") as ext:
            ext.write("subjectAltName=URI:spiffe://cluster.local/ns/bench/sa/" + name + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return {name: os.path.join(directory, name) for name in ("ca", "server", "client")}


def _contexts(files: dict[str, str]) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for context, own in ((server, "server"), (client, "client")):
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_cert_chain(files[own] + ".pem", files[own] + ".key")
        context.load_verify_locations(files["ca"] + ".pem")
        context.verify_mode = ssl.CERT_REQUIRED
    client.check_hostname = False
    return server, client


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair over loopback (the agents' sockets are TCP, and the tunnel
    session takes a (host, port) peername)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        one = socket.create_connection(listener.getsockname())
        other, _ = listener.accept()
    for sock in (one, other):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return one, other


class _App:
    """A toy app end: the client sends a request and waits for the whole response; the
    server answers each whole request. Plain non-blocking sockets on loop.add_reader."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, send: bytes,
                 expect: int, done: asyncio.Future[None] | None, requests: int,
                 pace: float = 0.0) -> None:
        self.loop, self.sock, self.send, self.expect = loop, sock, send, expect
        self.done, self.left, self.got, self.pace = done, requests, 0, pace
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self.readable)

    def start(self) -> None:
        self.sock.send(self.send)

    def readable(self) -> None:
        self.got += len(self.sock.recv(65536))
        while self.got >= self.expect:
            self.got -= self.expect
            if self.done is None:  # the server
                self.sock.send(self.send)
                continue
            self.left -= 1
            if self.left == 0:
                self.done.set_result(None)
                return
            if self.pace:  # the process sleeps between requests, as agents do when paced
                self.loop.call_later(self.pace, self.sock.send, self.send)
            else:
                self.sock.send(self.send)


async def _direct(requests: int, pace: float = 0.0) -> None:
    loop = asyncio.get_running_loop()
    cli, srv = _tcp_pair()
    done: asyncio.Future[None] = loop.create_future()
    client = _App(loop, cli, REQUEST, len(RESPONSE), done, requests, pace)
    _App(loop, srv, RESPONSE, len(REQUEST), None, requests)
    client.start()
    await done


async def _sessions(server_context: ssl.SSLContext, client_context: ssl.SSLContext,
                    on_stream: Any) -> Any:
    """Both ends of a tunnel connection over loopback TCP, as this tree's agents start them
    (mesh.py); returns the client session. Older trees are measured as they ran, so A/B runs
    against them compare like with like: before session 9, uvloop's SSL protocol under the
    session; in session 9, the session sealing its records on a uvloop TCP transport."""
    from agent.dataplane.tunnel import TunnelSession

    loop = asyncio.get_running_loop()
    client_sock, server_sock = _tcp_pair()
    try:
        from agent.dataplane import tls
    except ImportError:  # before session 9
        server_made = loop.create_task(loop.connect_accepted_socket(
            lambda: TunnelSession("server", on_stream=on_stream), server_sock, ssl=server_context))
        _, session = await loop.create_connection(lambda: TunnelSession("client"), sock=client_sock,
                                                  ssl=client_context, server_hostname="")
        await server_made
        return session
    server_tls = loop.create_task(tls.handshake(server_sock, server_context, True, 10.0))
    client_tls = await tls.handshake(client_sock, client_context, False, 10.0)
    server_end = await server_tls
    if not hasattr(tls, "start_session"):  # session 9
        await loop.connect_accepted_socket(
            lambda: TunnelSession("server", on_stream=on_stream, tls=server_end), server_sock)
        _, session = await loop.create_connection(lambda: TunnelSession("client", tls=client_tls),
                                                  sock=client_sock)
        return session
    await tls.start_session(server_sock, server_end, lambda records: TunnelSession(
        "server", on_stream=on_stream, tls=records))
    return await tls.start_session(client_sock, client_tls,
                                   lambda records: TunnelSession("client", tls=records))


async def _mesh(requests: int, opaque: bool, files: dict[str, str], pace: float = 0.0) -> None:
    from agent.core.telemetry import PeerLabels, Telemetry
    from agent.dataplane import tunnel as tunnel_module
    from agent.dataplane.context import PodContext
    from agent.dataplane.relay import Relay
    from agent.dataplane.tunnel import TunnelSession

    loop = asyncio.get_running_loop()
    server_context, client_context = _contexts(files)
    if hasattr(tunnel_module, "direct_records"):  # trees of session 8 and d6242f2's: their TLS objects
        tunnel_module.direct_records(server_context)
        tunnel_module.direct_records(client_context)
    telemetry = Telemetry(time.monotonic, 60.0)
    client_pod = PodContext("bench", "cli", cast(Any, None), frozenset({15001, 15006, 15008}))
    server_pod = PodContext("bench", "web", cast(Any, None), frozenset({15001, 15006, 15008}))
    done: asyncio.Future[None] = loop.create_future()
    app_server_sock, agent_upstream_sock = _tcp_pair()
    _App(loop, app_server_sock, RESPONSE, len(REQUEST), None, requests)
    upstream_ready: asyncio.Future[None] = loop.create_future()
    tasks: list[asyncio.Task[None]] = []

    class ServerOwner:
        telemetry = Telemetry(time.monotonic, 60.0)

        def accepted(self, relay: Relay) -> None:
            async def connect() -> None:
                await loop.connect_accepted_socket(lambda: relay.upstream, agent_upstream_sock)
                assert relay.client.transport is not None
                relay.client.transport.resume_reading()
                upstream_ready.set_result(None)
            tasks.append(loop.create_task(connect()))

    server_owner = ServerOwner()

    def on_stream(session: TunnelSession, stream_id: int, port: int, metadata: Any) -> None:
        relay = Relay(server_owner, server_pod, "inbound", buffer_high=0)
        relay.peer_labels = PeerLabels(tls="true", client_id="spiffe://cluster.local/ns/bench/sa/cli")
        if opaque:
            relay.observer = None
        relay.open_record(relay.peer_labels)
        session.attach(stream_id, relay.client)

    session = await _sessions(server_context, client_context, on_stream)

    class ClientOwner:
        def __init__(self) -> None:
            self.telemetry = telemetry

        def accepted(self, relay: Relay) -> None:
            relay.open_record(PeerLabels(tls="true", server_id="spiffe://cluster.local/ns/bench/sa/web"))
            session.open_stream(relay.upstream, 80, {"pod": "cli", "namespace": "bench"})
            assert relay.client.transport is not None
            relay.client.transport.resume_reading()

    relay_owner = ClientOwner()
    app_client_sock, agent_client_sock = _tcp_pair()

    def client_side() -> asyncio.Protocol:
        relay = Relay(relay_owner, client_pod, "outbound", 64 * 1024)
        if opaque:
            relay.observer = None
        return relay.client

    await loop.connect_accepted_socket(client_side, agent_client_sock)
    client = _App(loop, app_client_sock, REQUEST, len(RESPONSE), done, requests, pace)
    client.start()
    await done
    # the path ran as measured: both relays counted every request (or, opaque, none)
    counted = [sum(c.latency_count for c in t._http.values()) for t in (telemetry, server_owner.telemetry)]
    if counted != ([0, 0] if opaque else [requests, requests]):
        raise SystemExit(f"the relays counted {counted} responses for {requests} requests")


def run_case(case: str, requests: int, certs: str, pace: float = 0.0) -> None:
    import uvloop

    if case == "direct":
        uvloop.run(_direct(requests, pace))
        return
    files = {name: os.path.join(certs, name) for name in ("ca", "server", "client")}
    uvloop.run(_mesh(requests, case == "mesh-opaque", files, pace))


def instructions(case: str, requests: int, certs: str, out: str = "/dev/null") -> int:
    run = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                          sys.executable, __file__, "--case", case, "--requests", str(requests),
                          "--certs", certs],
                         capture_output=True, text=True, timeout=900, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "0"})  # see bench/hotpath.py
    found = re.search(r"Collected\s*:\s*(\d+)", run.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count from callgrind:\n{run.stderr[-2000:]}")
    return int(found.group(1))


def cpu_time(case: str, requests: int, certs: str, pace: float = 0.0) -> tuple[float, float]:
    """User and system CPU seconds of one run of `case`, in its own process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, __file__, "--case", case, "--requests", str(requests),
                    "--certs", certs, "--pace", str(pace)], check=True, timeout=900,
                   env={**os.environ, "PYTHONHASHSEED": "0", "MALLOC_MMAP_THRESHOLD_": "131072"})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime


def cpu_table(requests: int, base: int, rounds: int, certs: str, pace: float = 0.0) -> None:
    """Per request: (a run of `requests`) minus (a run of `base`), so start-up, imports and
    the handshake cancel out as in the instruction counts."""
    spent: dict[str, list[tuple[float, float]]] = {case: [] for case in CASES}
    for _ in range(rounds):
        for case in CASES:
            high, low = cpu_time(case, requests, certs, pace), cpu_time(case, base, certs, pace)
            spent[case].append(((high[0] - low[0]) / (requests - base),
                                (high[1] - low[1]) / (requests - base)))
    print(f"CPU per request (user + system, {requests} - {base} requests, median of {rounds} "
          f"interleaved runs, MALLOC_MMAP_THRESHOLD_=131072"
          + (f", {pace * 1000:g} ms idle before each request" if pace else "")
          + f"), python {sys.version.split()[0]}\n")
    print("| case | user µs | system µs | total µs |")
    print("|---|---:|---:|---:|")
    for case, runs in spent.items():
        user = statistics.median(u for u, _ in runs) * 1e6
        system = statistics.median(s for _, s in runs) * 1e6
        total = statistics.median(u + s for u, s in runs) * 1e6
        print(f"| {case} | {user:.1f} | {system:.1f} | {total:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=CASES)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--base", type=int, default=200, help="requests of the baseline run")
    parser.add_argument("--certs", help="a directory with ca/server/client .pem and .key")
    parser.add_argument("--profile", help="write a callgrind profile of the mesh case here")
    parser.add_argument("--cpu-time", action="store_true",
                        help="user and system CPU per request instead of instructions")
    parser.add_argument("--rounds", type=int, default=3, help="--cpu-time's interleaved rounds")
    parser.add_argument("--pace", type=float, default=0.0,
                        help="seconds the client waits before each next request (the process "
                             "goes idle between requests, as the agents do at a paced load)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="meshpath-") as scratch:
        certs = args.certs or scratch
        if not args.certs:
            _certificates(certs)
        if args.case:
            run_case(args.case, args.requests, certs, args.pace)
            return
        if args.cpu_time:
            requests = args.requests if args.requests != 2000 else 30000
            cpu_table(requests, args.base if args.base != 200 else requests // 10, args.rounds, certs,
                      args.pace)
            return
        if shutil.which("valgrind") is None:
            sys.exit("valgrind is needed (apt-get install valgrind)")
        if args.profile:
            instructions("mesh", args.requests, certs, args.profile)
            return
        print(f"instructions per request (callgrind, {args.requests} - {args.base} requests), "
              f"python {sys.version.split()[0]}\n")
        print("| case | instructions per request |")
        print("|---|---:|")
        for case in CASES:
            low = instructions(case, args.base, certs)
            high = instructions(case, args.requests, certs)
            print(f"| {case} | {(high - low) / (args.requests - args.base):,.0f} |", flush=True)


if __name__ == "__main__":
    main()
