"""Small TCP servers with precise behaviour, for proxy tests inside lab pods.

    python -m agent.lab.tcpserver --port P --mode MODE

Modes: `echo-after-eof` reads until the client half-closes, then sends back
"got <n> bytes" and closes; `reset` reads a little then closes with RST; `sink` accepts
and never reads (a stalled reader); `echo` echoes bytes as they come.
Prints "listening" once bound."""

from __future__ import annotations

import argparse
import contextlib
import socket
import struct
import threading


def _echo_after_eof(conn: socket.socket) -> None:
    total = 0
    while chunk := conn.recv(65536):
        total += len(chunk)
    conn.sendall(f"got {total} bytes".encode())


def _reset(conn: socket.socket) -> None:
    conn.recv(16)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _sink(conn: socket.socket) -> None:
    threading.Event().wait(120)  # hold the connection open, never read (bounded)


def _echo(conn: socket.socket) -> None:
    while chunk := conn.recv(65536):
        conn.sendall(chunk)


MODES = {"echo-after-eof": _echo_after_eof, "reset": _reset, "sink": _sink, "echo": _echo}


def _handle(conn: socket.socket, mode: str) -> None:
    with conn, contextlib.suppress(OSError):
        MODES[mode](conn)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--mode", choices=sorted(MODES), required=True)
    parser.add_argument("--rcvbuf", type=int, default=0, help="SO_RCVBUF for accepted sockets")
    args = parser.parse_args()
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if args.rcvbuf:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, args.rcvbuf)
    server.bind((args.host, args.port))
    server.listen(64)
    print("listening", flush=True)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=_handle, args=(conn, args.mode), daemon=True).start()


if __name__ == "__main__":
    main()
