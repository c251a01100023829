"""Hostile peers for the netns tests, run inside a lab pod (`python -m tests.netns.attacks`).

Each attack is bounded in count and time, prints one JSON line of what it did, and sends
traffic only to the lab address it is given:

    reset  HOST PORT --count N                  connect, then close with RST at once
    idle   HOST:PORT [...] --count N --hold S   N idle TCP connections spread over the
           [--sources IP,IP] [--say BYTES]      targets (and source addresses), held S s;
                                                with --say, each first sends that many
                                                bytes of a TLS ClientHello (-1: the start
                                                of an HTTP request), then stalls
    flood  HOST PORT --seconds S                TLS ClientHellos as fast as one client can
    tunnel HOST PORT --cert C --key K --bundle B --connections N --streams M --app-port P
           --hold S                             an authenticated peer that opens N tunnel
                                                connections x M streams, sends 256 KiB on
                                                each and never reads a byte back

and the victim's neighbours, whose traffic must lose nothing meanwhile:

    pace   URL --rate R --seconds S             GET on a new connection every 1/R s;
                                                prints requests, errors, p50/p99/max ms
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import selectors
import socket
import ssl
import struct
import threading
import time

_LINGER_RESET = struct.pack("ii", 1, 0)
# a TLS record header (handshake, TLS 1.0 record version, 512 bytes) and ClientHello's type
_CLIENT_HELLO_START = bytes.fromhex("16030102000100") + bytes(505)
_HTTP_START = b"GET / HTTP/1.1\r\nHost: slow\r\n"  # --say -1: a request that never ends


def _raise_fd_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def reset(host: str, port: int, count: int) -> dict[str, object]:
    connected, errors = 0, {}
    for _ in range(count):
        sock = socket.socket()
        sock.settimeout(2)
        try:
            sock.connect((host, port))
            connected += 1
        except OSError as exc:
            name = type(exc).__name__
            errors[name] = errors.get(name, 0) + 1
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        sock.close()
    return {"connected": connected, "errors": errors}


def idle(targets: list[tuple[str, int]], count: int, hold: float, sources: list[str],
         say: int = 0) -> dict[str, object]:
    _raise_fd_limit()
    selector = selectors.DefaultSelector()
    pending: dict[socket.socket, float] = {}
    opened: list[socket.socket] = []
    failed = 0
    for index in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        if sources:
            sock.bind((sources[index % len(sources)], 0))
        with contextlib.suppress(BlockingIOError):
            sock.connect(targets[index % len(targets)])
        selector.register(sock, selectors.EVENT_WRITE)
        pending[sock] = time.monotonic() + 3
        while len(pending) > 256 or (index == count - 1 and pending):
            for key, _ in selector.select(timeout=0.2):
                sock = key.fileobj  # type: ignore[assignment]
                selector.unregister(sock)
                del pending[sock]
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    opened.append(sock)
                    if say:
                        with contextlib.suppress(OSError):
                            sock.send(_CLIENT_HELLO_START[:say] if say > 0 else _HTTP_START)
                else:
                    failed += 1
                    sock.close()
            now = time.monotonic()
            for sock in [s for s, deadline in pending.items() if deadline < now]:
                selector.unregister(sock)
                del pending[sock]
                failed += 1
                sock.close()
    print(json.dumps({"opened": len(opened), "failed": failed, "holding": True}), flush=True)
    time.sleep(hold)
    closed_by_peer = 0
    for sock in opened:
        try:
            if sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b"":
                closed_by_peer += 1
        except BlockingIOError:
            pass
        except OSError:
            closed_by_peer += 1
        sock.close()
    return {"opened": len(opened), "failed": failed, "closed_by_peer": closed_by_peer}


def flood(host: str, port: int, seconds: float, threads: int = 2) -> dict[str, object]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    counts = {"attempts": 0, "server_hello": 0, "refused": 0}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def run() -> None:
        while time.monotonic() < deadline:
            outcome = "refused"
            try:
                with socket.create_connection((host, port), timeout=2) as raw, \
                        context.wrap_socket(raw) as tls:  # the server wants a certificate
                    outcome = "server_hello" if tls.version() else outcome
            except ssl.SSLError:
                outcome = "server_hello"  # it got as far as the server's answer
            except OSError:
                pass
            with lock:
                counts["attempts"] += 1
                counts[outcome] += 1

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return counts


def tunnel(host: str, port: int, cert: str, key: str, bundle: str, connections: int,
           streams: int, app_port: int, hold: float) -> dict[str, object]:
    from agent.core.tunnel import Connection, StreamAccepted, StreamReset
    from agent.core.tunnel_frames import MAX_WINDOW

    _raise_fd_limit()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(bundle)
    context.load_cert_chain(cert, key)
    payload = bytes(256 * 1024)
    stats = {"connections": 0, "refused_connections": 0, "streams_accepted": 0,
             "streams_reset": 0, "bytes_sent": 0}
    sessions: list[tuple[ssl.SSLSocket, Connection]] = []
    for _ in range(connections):
        try:
            tls = context.wrap_socket(socket.create_connection((host, port), timeout=5))
        except OSError:
            stats["refused_connections"] += 1
            continue
        # the most a peer can ask for: huge windows, so only our receiver's limits hold
        try:
            connection = Connection("client", initial_window=MAX_WINDOW, max_streams=streams,
                                    connection_window=MAX_WINDOW)
        except TypeError:  # a tunnel of before the connection window (bench/hostile.py --compare)
            connection = Connection("client", initial_window=MAX_WINDOW, max_streams=streams)
        for _ in range(streams):
            stream_id = connection.open_stream(app_port, {"pod": "attacker"})
            connection.send_data(stream_id, payload)
        tls.setblocking(False)
        sessions.append((tls, connection))
    deadline, reading_until = time.monotonic() + hold, time.monotonic() + 0.5
    pending = {id(tls): connection.data_to_send() for tls, connection in sessions}
    refused: set[int] = set()
    while time.monotonic() < deadline:
        for tls, connection in sessions:
            data = pending[id(tls)]
            if data:
                try:
                    sent = tls.send(data[:65536])
                    pending[id(tls)] = data[sent:]
                    stats["bytes_sent"] += sent
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                    pass
                except OSError:
                    pending[id(tls)] = b""
            if time.monotonic() < reading_until and id(tls) not in refused:
                try:  # read only at first: to learn whether we were let in
                    received = tls.recv(65536)
                    if not received:
                        raise ConnectionResetError("closed by the server")
                    events = connection.receive_data(received)
                    stats["streams_accepted"] += sum(isinstance(e, StreamAccepted) for e in events)
                    stats["streams_reset"] += sum(isinstance(e, StreamReset) for e in events)
                    pending[id(tls)] += connection.data_to_send()
                except (ssl.SSLWantReadError, BlockingIOError):
                    pass
                except OSError:
                    refused.add(id(tls))
                    pending[id(tls)] = b""
        time.sleep(0.01)
    stats["refused_connections"] += len(refused)
    stats["connections"] = len(sessions) - len(refused)
    for tls, _ in sessions:
        tls.close()
    return stats


def pace(url: str, rate: float, seconds: float) -> dict[str, object]:
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    latencies: list[float] = []
    errors: list[str] = []
    start, count = time.perf_counter(), int(rate * seconds)
    for index in range(count):
        delay = start + index / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        sent = time.perf_counter()
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=5)
        try:
            conn.request("GET", parts.path or "/")
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                errors.append(f"{index}: status {response.status}")
        except (OSError, http.client.HTTPException) as exc:
            errors.append(f"{index}: {type(exc).__name__}: {exc}")
        finally:
            conn.close()
        latencies.append((time.perf_counter() - sent) * 1000)
    latencies.sort()
    return {"requests": count, "errors": len(errors), "first_errors": errors[:5],
            "p50_ms": round(latencies[len(latencies) // 2], 2),
            "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1], 2),
            "max_ms": round(latencies[-1], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("reset")
    one.add_argument("host")
    one.add_argument("port", type=int)
    one.add_argument("--count", type=int, default=1000)
    many = commands.add_parser("idle")
    many.add_argument("targets", nargs="+")
    many.add_argument("--count", type=int, default=1000)
    many.add_argument("--hold", type=float, default=5)
    many.add_argument("--sources", default="")
    many.add_argument("--say", type=int, default=0)
    hellos = commands.add_parser("flood")
    hellos.add_argument("host")
    hellos.add_argument("port", type=int)
    hellos.add_argument("--seconds", type=float, default=10)
    peer = commands.add_parser("tunnel")
    peer.add_argument("host")
    peer.add_argument("port", type=int)
    for flag in ("--cert", "--key", "--bundle"):
        peer.add_argument(flag, required=True)
    peer.add_argument("--connections", type=int, default=10)
    peer.add_argument("--streams", type=int, default=256)
    peer.add_argument("--app-port", type=int, required=True)
    peer.add_argument("--hold", type=float, default=5)
    paced = commands.add_parser("pace")
    paced.add_argument("url")
    paced.add_argument("--rate", type=float, default=200)
    paced.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    result: dict[str, object]
    if args.command == "pace":
        result = pace(args.url, args.rate, args.seconds)
    elif args.command == "reset":
        result = reset(args.host, args.port, args.count)
    elif args.command == "idle":
        targets = [(t.rsplit(":", 1)[0], int(t.rsplit(":", 1)[1])) for t in args.targets]
        result = idle(targets, args.count, args.hold, [s for s in args.sources.split(",") if s],
                      args.say)
    elif args.command == "flood":
        result = flood(args.host, args.port, args.seconds)
    else:
        result = tunnel(args.host, args.port, args.cert, args.key, args.bundle, args.connections,
                        args.streams, args.app_port, args.hold)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
