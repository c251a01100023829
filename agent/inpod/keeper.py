"""The socket keeper: holds the pods' listening sockets while agents come and go.

A pod's 15001/15006/15008 listeners live in the pod's netns but belong to the agent's
process: when the agent exits, they close, and until the next agent listens again every
new connection the pod's capture rules send there is refused. The keeper is a tiny second
process (in the DaemonSet: its own container, so an agent's OOM kill or crash does not take
it along) that holds a duplicate of every listener, passed over a Unix socket with
SCM_RIGHTS. A listening socket with one holder left keeps its backlog: connections arriving
while no agent runs complete their handshake in the kernel and wait there, and the next
agent takes the same sockets back and accepts them. Nothing is refused, nothing is replayed.

Protocol (SOCK_SEQPACKET, one request per message, ASCII):

    PUT <key>     + one fd      hold this socket under <key> (replacing an older one)
    DROP <key>                  close what is held under <key>
    LIST                        answered by FDS messages, each "FDS <key> <key>..." with as
                                many fds, then END
    every other request is answered OK or "ERR <why>".

Keys are [A-Za-z0-9._:/-]{1,200}; the agent uses "<container id>/<port>". Only the node's
root (or the keeper's own uid) may connect; the socket file is 0600. Bounded: clients,
held sockets, message size. A keeper that starts while another one answers on its path
takes everything the old one holds first, then replaces the path: a rolling update of the
DaemonSet (maxSurge) never lets go of a listener.

This module is the keeper process (`serve`) and the agent's client (`KeeperClient`); it
imports only the standard library, so the process stays a few MiB."""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import re
import selectors
import signal
import socket
import struct
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

MAX_MESSAGE = 64 * 1024
MAX_HELD = 8192  # 3 listeners a pod: ~2,700 pods, far beyond a node's 110
MAX_CLIENTS = 16
FDS_PER_MESSAGE = 64  # SCM_MAX_FD is 253
_KEY = re.compile(r"[A-Za-z0-9._:/-]{1,200}")
_UCRED = struct.Struct("iII")


class KeeperError(OSError):
    """The keeper refused a request, or cannot be reached."""


# ------------------------------------------------------------------------------ keeper


class Keeper:
    def __init__(self, path: Path, max_held: int = 0, max_clients: int = 0) -> None:
        self.path = path
        self.max_held = max_held or MAX_HELD
        self.max_clients = max_clients or MAX_CLIENTS
        self.held: dict[str, socket.socket] = {}
        self._selector = selectors.DefaultSelector()
        self._listener: socket.socket | None = None
        self._inode = 0
        self._running = True
        self._wake, self._waker = socket.socketpair()  # stop() from a signal or a thread
        self._wake.setblocking(False)
        self._selector.register(self._wake, selectors.EVENT_READ)

    def take_over(self) -> int:
        """Take every socket a keeper already running on our path holds; how many."""
        try:
            client = KeeperClient(self.path, timeout=2.0)
        except OSError:
            return 0
        with contextlib.closing(client):
            try:
                for key, sock in client.list().items():
                    self._hold(key, sock)
            except OSError as exc:
                log.warning("keeper: could not take over from the running keeper: %s", exc)
        return len(self.held)

    def bind(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staging = self.path.with_name(self.path.name + f".{os.getpid()}")
        staging.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old_mask = os.umask(0o177)
        try:
            listener.bind(str(staging))
        finally:
            os.umask(old_mask)
        listener.listen(self.max_clients)
        self._inode = os.stat(staging).st_ino
        os.replace(staging, self.path)  # the path answers at every instant: old keeper or us
        listener.setblocking(False)
        self._listener = listener
        self._selector.register(listener, selectors.EVENT_READ)

    def stop(self) -> None:
        self._running = False
        with contextlib.suppress(OSError):
            self._waker.send(b"x")

    def run(self) -> None:
        while self._running:
            try:
                events = self._selector.select(timeout=1.0)
            except InterruptedError:
                continue
            for key, _ in events:
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._listener:
                    self._accept()
                elif sock is self._wake:
                    continue
                else:
                    self._serve_one(sock)

    def close(self) -> None:
        if self._selector.get_map() is None:
            return  # closed already
        if self._listener is not None:
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == self._inode:  # not a successor's
                    self.path.unlink()
            self._listener.close()
        for sock in self.held.values():
            sock.close()
        self.held.clear()
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self._selector.close()
        self._waker.close()

    # ----------------------------------------------------------------- internals

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            client, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        clients = len(self._selector.get_map()) - 2  # the listener and the wake-up
        if clients >= self.max_clients or not _trusted(client):
            client.close()
            return
        client.setblocking(True)
        client.settimeout(2.0)
        self._selector.register(client, selectors.EVENT_READ)

    def _serve_one(self, client: socket.socket) -> None:
        fds = array.array("i")
        try:
            message, ancillary, flags, _ = client.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(4 * 4))
        except (OSError, TimeoutError):
            self._drop_client(client)
            return
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
        received = [socket.socket(fileno=fd) for fd in fds]
        if not message:
            for sock in received:
                sock.close()
            self._drop_client(client)
            return
        try:
            reply = self._handle(client, message, received, flags)
        except (OSError, TimeoutError):
            self._drop_client(client)
            return
        finally:
            for sock in received:  # whatever was kept was duplicated
                sock.close()
        if reply is not None:
            try:
                client.send(reply)
            except (OSError, TimeoutError):
                self._drop_client(client)

    def _handle(self, client: socket.socket, message: bytes, received: list[socket.socket],
                flags: int) -> bytes | None:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            return b"ERR message or descriptors truncated"
        verb, _, argument = message.decode("ascii", "replace").partition(" ")
        if verb == "PUT":
            if not _KEY.fullmatch(argument):
                return b"ERR bad key"
            if len(received) != 1:
                return b"ERR PUT takes exactly one descriptor"
            if argument not in self.held and len(self.held) >= self.max_held:
                return b"ERR keeper full"
            self._hold(argument, received[0].dup())
            return b"OK"
        if received:
            return b"ERR descriptors only with PUT"
        if verb == "DROP":
            held = self.held.pop(argument, None)
            if held is not None:
                held.close()
            return b"OK"
        if verb == "LIST":
            items = list(self.held.items())
            for start in range(0, len(items), FDS_PER_MESSAGE):
                batch = items[start:start + FDS_PER_MESSAGE]
                names = " ".join(key for key, _ in batch).encode()
                fds = array.array("i", [sock.fileno() for _, sock in batch])
                client.sendmsg([b"FDS " + names], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            return b"END"
        return b"ERR unknown request"

    def _hold(self, key: str, sock: socket.socket) -> None:
        old = self.held.pop(key, None)
        if old is not None:
            old.close()
        self.held[key] = sock

    def _drop_client(self, client: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(client)
        client.close()


def _trusted(client: socket.socket) -> bool:
    try:
        _, uid, _ = _UCRED.unpack(client.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                    _UCRED.size))
    except OSError:
        return False
    return uid in (0, os.getuid())


def serve(path: Path, max_held: int = MAX_HELD, max_clients: int = MAX_CLIENTS) -> int:
    """The keeper process: hold sockets until SIGTERM/SIGINT."""
    keeper = Keeper(path, max_held, max_clients)
    taken = keeper.take_over()
    keeper.bind()
    signal.signal(signal.SIGTERM, lambda *_: keeper.stop())
    signal.signal(signal.SIGINT, lambda *_: keeper.stop())
    log.info("keeper on %s%s", path, f" (took {taken} sockets over)" if taken else "")
    try:
        keeper.run()
    finally:
        keeper.close()
    return 0


# ------------------------------------------------------------------------------ client


class KeeperClient:
    """The agent's connection to the keeper. Calls are local and take microseconds."""

    def __init__(self, path: Path, timeout: float = 1.0) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(path))
        except OSError:
            self._sock.close()
            raise

    def put(self, key: str, sock: socket.socket) -> None:
        fds = array.array("i", [sock.fileno()])
        self._sock.sendmsg([f"PUT {key}".encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        self._expect_ok()

    def drop(self, key: str) -> None:
        self._sock.send(f"DROP {key}".encode())
        self._expect_ok()

    def list(self) -> dict[str, socket.socket]:
        """Every socket the keeper holds, as our own duplicates."""
        self._sock.send(b"LIST")
        found: dict[str, socket.socket] = {}
        try:
            while True:
                message, ancillary, _, _ = self._sock.recvmsg(
                    MAX_MESSAGE, socket.CMSG_SPACE(FDS_PER_MESSAGE * 4))
                fds = array.array("i")
                for level, kind, data in ancillary:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
                socks = [socket.socket(fileno=fd) for fd in fds]
                if message == b"END":
                    for sock in socks:
                        sock.close()
                    return found
                if not message.startswith(b"FDS "):
                    for sock in socks:
                        sock.close()
                    raise KeeperError(errno.EPROTO, f"keeper: unexpected {message[:80]!r}")
                keys = message[4:].decode("ascii").split(" ")
                if len(keys) != len(socks):
                    for sock in socks:
                        sock.close()
                    raise KeeperError(errno.EPROTO, "keeper: keys and descriptors differ")
                found.update(zip(keys, socks, strict=True))
        except BaseException:
            for sock in found.values():
                sock.close()
            raise

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> KeeperClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _expect_ok(self) -> None:
        reply = self._sock.recv(4096)
        if reply != b"OK":
            raise KeeperError(errno.EPROTO, f"keeper: {reply.decode('ascii', 'replace') or 'closed'}")


def listener_key(container_id: str, port: int) -> str:
    return f"{container_id}/{port}"


def netns_inode(sock: socket.socket) -> tuple[int, int]:
    """(device, inode) of the network namespace a socket lives in (SIOCGSKNS)."""
    import fcntl

    fd = fcntl.ioctl(sock.fileno(), 0x894C)  # SIOCGSKNS, linux/sockios.h
    try:
        stat = os.fstat(fd)
        return stat.st_dev, stat.st_ino
    finally:
        os.close(fd)


def is_listening(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))


def close_all(socks: Iterable[socket.socket]) -> None:
    for sock in socks:
        sock.close()


class ListenerHold:
    """The agent's side of the keeper: the listeners a previous agent left are taken back
    at start (`take`), every new one is handed over as it is made (`register`), and a pod's
    are let go when the pod is released for good (`release`). Without a keeper (None) every
    call is a no-op. A keeper that went away (restarted) is found again by `refresh`, and
    gets every listener this agent holds once more."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._client: KeeperClient | None = None
        self._taken: dict[str, socket.socket] = {}
        self._registered: dict[str, socket.socket] = {}
        self.connected = False

    def start(self) -> int:
        """Connect, and take what the keeper holds; how many sockets came back."""
        if self.path is None:
            return 0
        try:
            self._client = KeeperClient(self.path)
            self._taken = self._client.list()
        except OSError as exc:
            log.warning("keeper %s: %s; pods' listeners close with this agent", self.path, exc)
            self._disconnect()
            return 0
        self.connected = True
        return len(self._taken)

    def take(self, key: str, netns: tuple[int, int], port: int) -> socket.socket | None:
        """A held listener for `key`, if it is still listening on `port` in that netns."""
        sock = self._taken.pop(key, None)
        if sock is None:
            return None
        try:
            fits = (is_listening(sock) and netns_inode(sock) == netns
                    and sock.getsockname()[1] == port)
        except OSError:
            fits = False
        if not fits:
            log.info("keeper: %s is not the pod's listener any more; making a new one", key)
            sock.close()
            return None
        sock.setblocking(False)
        self._registered[key] = sock
        return sock

    def register(self, key: str, sock: socket.socket) -> None:
        self._registered[key] = sock
        if self._client is None:
            return
        try:
            self._client.put(key, sock)
        except OSError as exc:
            log.warning("keeper %s: %s; will retry", self.path, exc)
            self._disconnect()

    def release(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._registered.pop(key, None)
            if self._client is not None:
                try:
                    self._client.drop(key)
                except OSError as exc:
                    log.warning("keeper %s: %s; will retry", self.path, exc)
                    self._disconnect()

    def settle(self) -> int:
        """After re-adoption: let go of what no pod claimed (pods gone while we were away)."""
        unclaimed, self._taken = self._taken, {}
        close_all(unclaimed.values())
        self.release(unclaimed)
        return len(unclaimed)

    def refresh(self) -> None:
        """If the keeper went away, find it again and hand it every listener we hold."""
        if self.path is None or self._client is not None:
            return
        try:
            client = KeeperClient(self.path)
            for key, sock in list(self._registered.items()):
                client.put(key, sock)
        except OSError as exc:
            log.debug("keeper %s still unreachable: %s", self.path, exc)
            return
        self._client, self.connected = client, True
        log.info("keeper %s: handed it %d listeners again", self.path, len(self._registered))

    def forget_all(self) -> None:
        """Our own references go (the keeper keeps its copies); at exit."""
        self._registered.clear()
        close_all(self._taken.values())
        self._taken.clear()
        self._disconnect()

    def _disconnect(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client, self.connected = None, False


def main(argv: list[str] | None = None) -> int:
    """`python -m agent.inpod.keeper --socket PATH`: what `pinion keeper` runs (exec'd, so the
    keeper's memory is this module's, not the CLI's)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="pinion keeper")
    parser.add_argument("--socket", type=Path, default=Path("/run/pinion/keeper.sock"))
    parser.add_argument("--max-held", type=int, default=MAX_HELD)
    parser.add_argument("--max-clients", type=int, default=MAX_CLIENTS)
    args = parser.parse_args(argv)
    if not (1 <= args.max_held <= MAX_HELD and 1 <= args.max_clients <= MAX_CLIENTS):
        parser.error(f"--max-held 1..{MAX_HELD}, --max-clients 1..{MAX_CLIENTS}")
    level = os.environ.get("PINION_LOG_LEVEL", "info").upper()
    logging.basicConfig(level=getattr(logging, level, logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(args.socket, args.max_held, args.max_clients)


if __name__ == "__main__":
    raise SystemExit(main())
