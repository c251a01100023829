"""Per-request cost of the agent's hot-path pieces, in-process, counted in instructions.

The side-by-side lab (../shared/bench/side_by_side.py) gives the figures that matter, but on
a shared 2-vCPU machine they move by tens of percent from run to run. This script gives the
repeatable part: the real classes of the data path driven with the bytes of one benchmark
request (wrk's GET, nginx's 1 KiB response), and valgrind's callgrind counting the
instructions one more request costs (the difference between two request counts, so start-up
and import cost cancel out).

Cases:
  relay-http1-python    one relayed keep-alive connection, HTTP/1 observed by the llhttp-based
                        Python observer (both sides' data_received: counters, observer, records)
  relay-http1-compiled  the same with the compiled fast path (agent.core._http1fast)
  relay-opaque          the same connection declared opaque: no observation at all
  tunnel-framing-python    the mesh tunnel's framing for that request and response, both ends
                        (send_data, data_to_send, receive_data, acknowledge; no TLS), the
                        Python modules (PINION_PURE_PYTHON=1)
  tunnel-framing-compiled  the same with the mypyc build of agent.core.tunnel(_frames)
  newconn-http1         a new relay per request, as `ab` makes them (issue #16's new
                        connections/s): ab's HTTP/1.0 request, nginx's `Connection: close`
                        answer, the server's FIN, the close counted; the relay's own
                        set-up, labels and series lookups, observer and close accounting
  newconn-opaque        the same connection on a port declared opaque
  relay-h2              one relayed HTTP/2 connection, h2load's requests and nginx h2c's 1 KiB
                        answers as they were read on loopback (bench/h2transcripts.py: HEADERS,
                        DATA, SETTINGS, WINDOW_UPDATE), observed by agent.core.http2
  relay-grpc            the same with a grpcio unary echo (1 KiB message, trailers, window
                        updates), observed by agent.core.http2
  relay-h2-opaque       relay-h2's connection on a port declared opaque (no observer)
                        (the h2 cases build the bytes of as many requests as the larger run
                        feeds in both runs, so building them cancels out)

    python bench/hotpath.py                      # callgrind table (about 1 minute)
    python bench/hotpath.py --case C --requests N  # one run, no valgrind (what is counted)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Any, cast

REQUEST = (b"GET /1k.bin HTTP/1.1\r\nHost: 10.42.2.3\r\n\r\n")  # what wrk sends
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 06 Dec 2026 08:00:00 GMT\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Length: 1024\r\n"
            b"Last-Modified: Sun, 06 Dec 2026 07:00:00 GMT\r\nConnection: keep-alive\r\n"
            b"ETag: \"6752a000-400\"\r\nAccept-Ranges: bytes\r\n\r\n" + b"x" * 1024)
AB_REQUEST = b"GET /1k HTTP/1.0\r\nHost: 10.42.2.3\r\nUser-Agent: ApacheBench/2.3\r\nAccept: */*\r\n\r\n"
CLOSING_RESPONSE = RESPONSE.replace(b"Connection: keep-alive", b"Connection: close")
PURE_PYTHON_ENV = "PINION_PURE_PYTHON"  # agent.core.compiled: the Python tunnel modules
CASES = ("relay-http1-python", "relay-http1-compiled", "relay-opaque", "tunnel-framing-python",
         "tunnel-framing-compiled", "newconn-http1", "newconn-opaque", "relay-h2", "relay-grpc",
         "relay-h2-opaque", "relay-http1-after-head")
# relay-http1-after-head: the compiled path's keep-alive requests after one HEAD (which it
# leaves to the Python observer) earlier in the connection
HEAD_REQUEST = REQUEST.replace(b"GET", b"HEAD", 1)
HEAD_RESPONSE = RESPONSE[: RESPONSE.index(b"\r\n\r\n") + 4]  # a HEAD's answer has no body


class _Sink:
    """The transport a relay writes to: takes the bytes (counted), never pushes back."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return False

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def close(self) -> None:
        pass


def _sinks(relay: Any) -> _Sink:
    """Both sides of `relay` connected to one sink, as `_Side.connection_made` would (the
    transport, and its write and is_closing bound), without the proxy's accept."""
    sink = _Sink()
    for side in (relay.client, relay.upstream):
        side.transport = sink
        if hasattr(side, "send"):  # trees since a7835e4 bind them
            side.send, side.closing = sink.write, sink.is_closing
    return sink


def _relayed(case: str, sink: _Sink, expected: int) -> None:
    if sink.written != expected:
        sys.exit(f"{case}: the relay passed on {sink.written} bytes of {expected}")


def relay_loop(case: str, requests: int) -> None:
    from agent.core import http1
    from agent.core.telemetry import PLAINTEXT, Telemetry
    from agent.dataplane.context import PodContext
    from agent.dataplane.relay import Relay

    if case == "relay-http1-python":
        http1._Http1Fast = None  # the observer factory falls back to Http1Observer
    elif case in ("relay-http1-compiled", "relay-http1-after-head") and http1._Http1Fast is None:
        sys.exit("agent.core._http1fast is not built (pip install -e .)")

    class Owner:
        telemetry = Telemetry(time.monotonic, 60.0)

        def accepted(self, relay: Relay) -> None:
            pass

    pod = PodContext("bench", "web", cast(Any, None), frozenset({80}))
    relay = Relay(Owner(), pod, "inbound", 64 * 1024)
    sink = _sinks(relay)
    relay.open_record(PLAINTEXT)
    if case == "relay-opaque":
        relay.observer = None
    before = 0
    if case == "relay-http1-after-head":
        for request, response in ((REQUEST, RESPONSE), (HEAD_REQUEST, HEAD_RESPONSE)):
            relay.client.data_received(request)
            relay.upstream.data_received(response)
            before += len(request) + len(response)
    for _ in range(requests):
        relay.client.data_received(REQUEST)
        relay.upstream.data_received(RESPONSE)
    _relayed(case, sink, before + requests * (len(REQUEST) + len(RESPONSE)))


def h2_relay_loop(case: str, requests: int, prepare: int) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from h2transcripts import CONVERSATIONS, conversation

    from agent.core.telemetry import PLAINTEXT, Telemetry
    from agent.dataplane.context import PodContext
    from agent.dataplane.relay import Relay

    class Owner:
        telemetry = Telemetry(time.monotonic, 60.0)

        def accepted(self, relay: Relay) -> None:
            pass

    name = "grpc-unary" if case == "relay-grpc" else "h2load-nginx"
    setup, reads = conversation(name, max(requests, prepare))
    reads = reads[: len(reads) * requests // max(requests, prepare)]
    expected = requests + CONVERSATIONS[name][3]
    pod = PodContext("bench", "web", cast(Any, None), frozenset({80}))
    relay = Relay(Owner(), pod, "inbound", 64 * 1024)
    sink = _sinks(relay)
    relay.open_record(PLAINTEXT)
    if case == "relay-h2-opaque":
        relay.observer = None
    for from_client, data in setup + reads:
        (relay.client if from_client else relay.upstream).data_received(data)
    _relayed(case, sink, sum(len(data) for _, data in setup + reads))
    http = relay.http
    if case != "relay-h2-opaque" and (http is None or http.requests != expected):
        sys.exit(f"{case}: the observer counted {http and http.requests} requests of {expected}")


def newconn_loop(case: str, connections: int) -> None:
    from agent.core.telemetry import PLAINTEXT, Telemetry
    from agent.dataplane.context import PodContext
    from agent.dataplane.relay import Relay

    class Owner:
        telemetry = Telemetry(time.monotonic, 60.0)

        def accepted(self, relay: Relay) -> None:
            pass

    opaque = frozenset({80}) if case == "newconn-opaque" else frozenset()
    pod = PodContext("bench", "web", cast(Any, None), frozenset({15001, 15006, 15008}), opaque)
    owner = Owner()
    for _ in range(connections):
        relay = Relay(owner, pod, "inbound", 64 * 1024)
        sink = _sinks(relay)
        if opaque:
            relay.observer = None  # what the proxies do for a port declared opaque
        relay.open_record(PLAINTEXT)
        relay.client.data_received(AB_REQUEST)
        relay.upstream.data_received(CLOSING_RESPONSE)
        _relayed(case, sink, len(AB_REQUEST) + len(CLOSING_RESPONSE))
        relay.upstream.eof = True
        relay.half_closed(relay.upstream)
        relay.finish()


def tunnel_loop(case: str, requests: int) -> None:
    from agent.core import compiled, tunnel
    from agent.core.tunnel import Connection, DataReceived

    if compiled.is_compiled(tunnel) != (case == "tunnel-framing-compiled"):
        sys.exit(f"{case}: agent.core.tunnel is the {compiled.tunnel_build()} build "
                 "(not built, or built from other sources: pip install -e .)")

    client, server = Connection("client"), Connection("server")
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    stream = client.open_stream(80, {"pod": "cli"})
    server.receive_data(client.data_to_send())
    server.accept_stream(stream)
    client.receive_data(server.data_to_send())
    for _ in range(requests):
        client.send_data(stream, REQUEST)
        for event in server.receive_data(client.data_to_send()):
            if isinstance(event, DataReceived):
                server.acknowledge(stream, len(event.data))
        server.send_data(stream, RESPONSE)
        for event in client.receive_data(server.data_to_send()):
            if isinstance(event, DataReceived):
                client.acknowledge(stream, len(event.data))
        server.receive_data(client.data_to_send())  # window updates, when due
        client.receive_data(server.data_to_send())


def run_case(case: str, requests: int, prepare: int = 0) -> None:
    if case.startswith("tunnel-framing"):
        tunnel_loop(case, requests)
    elif case.startswith("newconn-"):
        newconn_loop(case, requests)
    elif case in ("relay-h2", "relay-grpc", "relay-h2-opaque"):
        h2_relay_loop(case, requests, prepare)
    else:
        relay_loop(case, requests)


def instructions(case: str, requests: int, prepare: int) -> int:
    environment = dict(os.environ)
    environment.pop(PURE_PYTHON_ENV, None)
    # str hashes (dict and set layouts, hence probe lengths) vary with the seed: ±0.7 k
    # instructions between otherwise equal runs. One seed makes counts comparable.
    environment["PYTHONHASHSEED"] = "0"
    if case == "tunnel-framing-python":
        environment[PURE_PYTHON_ENV] = "1"
    run = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                          sys.executable, __file__, "--case", case, "--requests", str(requests),
                          "--prepare", str(prepare)],
                         capture_output=True, text=True, timeout=600, check=True, env=environment)
    found = re.search(r"Collected\s*:\s*(\d+)", run.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count from callgrind:\n{run.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=CASES)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--base", type=int, default=200, help="requests of the baseline run")
    parser.add_argument("--prepare", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES),
                        help="the cases of the callgrind table (default: all)")
    args = parser.parse_args()
    if args.case:
        run_case(args.case, args.requests, args.prepare)
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is needed (apt-get install valgrind)")
    print(f"instructions per request (callgrind, {args.requests} - {args.base} requests), "
          f"python {sys.version.split()[0]}\n")
    print("| case | instructions per request |")
    print("|---|---:|")
    for case in args.cases:
        low = instructions(case, args.base, args.requests)
        high = instructions(case, args.requests, args.requests)
        print(f"| {case} | {(high - low) / (args.requests - args.base):,.0f} |", flush=True)

if __name__ == "__main__":
    main()
