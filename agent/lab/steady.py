"""A steady HTTP client for restart tests: GET at a fixed rate until told to stop (SIGTERM) or
`--seconds` pass, then one JSON summary line on stdout.

`--mode new`: a new TCP connection per request. `--mode keepalive`: one connection reused,
as an HTTP client library keeps a pooled one. Like urllib3, Go's net/http and curl, before
reusing the connection it checks that the server has not closed it (readable at EOF: a new
connection instead), and a GET that fails on a *reused* connection before any byte of the
response came back is sent again once on a new connection (RFC 9112 §9.3.1: the server may
have closed the idle connection just as the request left). Every other error is a failure.

Each request has a 10 s timeout; latencies are kept (milliseconds, per request) so the test
can say what a restart adds."""

from __future__ import annotations

import argparse
import http.client
import json
import select
import signal
import socket
import sys
import time


def _dropped(conn: http.client.HTTPConnection) -> bool:
    sock = conn.sock
    if sock is None:
        return True
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)  # an idle HTTP/1 connection is readable only at EOF (or a reset)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("url_host")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--path", default="/")
    parser.add_argument("--mode", choices=("new", "keepalive"), default="new")
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--seconds", type=float, default=300.0)
    args = parser.parse_args()

    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    results: list[dict[str, object]] = []
    conn: http.client.HTTPConnection | None = None
    interval = 1.0 / args.rate
    started = time.monotonic()
    next_at = started
    counts = {"reconnects": 0, "retries": 0}
    print("started", flush=True)

    def fresh() -> http.client.HTTPConnection:
        return http.client.HTTPConnection(args.url_host, args.port, timeout=10)

    while not stop and time.monotonic() - started < args.seconds:
        now = time.monotonic()
        if now < next_at:
            time.sleep(next_at - now)
            continue
        next_at += interval
        begin = time.monotonic()
        error = ""
        status = 0
        if args.mode == "new" or conn is None:
            if conn is not None:
                conn.close()
            conn = fresh()
            reused = False
        elif _dropped(conn):
            conn.close()
            conn = fresh()
            counts["reconnects"] += 1
            reused = False
        else:
            reused = True
        current = conn
        for attempt in (1, 2):
            try:
                current.request("GET", args.path)
                response = current.getresponse()
                response.read()
                status = response.status
                error = "" if status == 200 else f"status {status}"
                if args.mode == "new" or response.will_close:
                    current.close()
                    current = fresh()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                current.close()
                current = fresh()
                if reused and attempt == 1:
                    counts["retries"] += 1
                    reused = False
                    continue
                error = f"{type(exc).__name__}: {exc}"
                break
            except (OSError, http.client.HTTPException) as exc:
                current.close()
                current = fresh()
                error = f"{type(exc).__name__}: {exc}"
                break
        conn = current if args.mode == "keepalive" else None
        results.append({"at": round(begin - started, 3),
                        "ms": round((time.monotonic() - begin) * 1000, 2), "error": error})
    failed = [r for r in results if r["error"]]
    latencies = sorted(float(r["ms"]) for r in results)  # type: ignore[arg-type]
    summary = {"mode": args.mode, "sent": len(results), "failed": len(failed),
               "errors": failed[:50], **counts,
               "p50_ms": latencies[len(latencies) // 2] if latencies else 0.0,
               "p99_ms": latencies[int(len(latencies) * 0.99)] if latencies else 0.0,
               "max_ms": latencies[-1] if latencies else 0.0,
               "slow": [r for r in results if float(r["ms"]) > 100][:200]}  # type: ignore[arg-type]
    sys.stdout.write(json.dumps(summary) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    socket.setdefaulttimeout(10)
    sys.exit(main())
