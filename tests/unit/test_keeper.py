"""The socket keeper: holds listeners passed over SCM_RIGHTS, hands them back, keeps their
backlogs while no agent runs, refuses bad requests without leaking a descriptor, stays
bounded, and a new keeper takes everything over from the running one. Real Unix and TCP
sockets on loopback, the keeper's loop in a thread."""

from __future__ import annotations

import array
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.inpod.keeper import Keeper, KeeperClient, KeeperError, ListenerHold, netns_inode
from tests.support.emulation import not_under_user_mode_emulation

C_KEEPER = Path(__file__).resolve().parents[2] / "keeper" / "pinion-keeper"


class Running:
    """The Python keeper, its loop in a thread of this process."""

    def __init__(self, path: Path, max_held: int = 0, max_clients: int = 0) -> None:
        self.keeper = Keeper(path, max_held, max_clients)
        self.taken = self.keeper.take_over()
        self.keeper.bind()
        self.thread = threading.Thread(target=self.keeper.run, daemon=True)
        self.thread.start()

    def fds(self) -> int:
        return len(os.listdir("/proc/self/fd"))

    def stop(self) -> None:
        self.keeper.stop()
        self.thread.join(5)
        self.keeper.close()


class RunningC:
    """keeper/pinion-keeper (built by `make`), the same tests: the two must not differ."""

    def __init__(self, path: Path, max_held: int = 0, max_clients: int = 0) -> None:
        argv = [str(C_KEEPER), "--socket", str(path)]
        if max_held:
            argv += ["--max-held", str(max_held)]
        if max_clients:
            argv += ["--max-clients", str(max_clients)]
        before = path.stat().st_ino if path.exists() else None
        self.process = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
        assert self.process.stderr is not None
        line = self.process.stderr.readline()  # "... keeper on PATH (N sockets)", once bound
        assert "keeper on" in line, line
        assert path.stat().st_ino != before
        self.taken = int(line.rsplit("(", 1)[1].split()[0])

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(5)
        assert self.process.stderr is not None
        self.process.stderr.close()


@pytest.fixture(params=["python", "c"])
def impl(request: pytest.FixtureRequest) -> type[Running] | type[RunningC]:
    if request.param == "c" and not C_KEEPER.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{C_KEEPER} is not built (make keeper)")
        pytest.skip(f"{C_KEEPER} is not built (make keeper)")
    return Running if request.param == "python" else RunningC


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "keeper.sock"


@pytest.fixture
def running(path: Path, impl: type[Running] | type[RunningC]) -> Iterator[Running | RunningC]:
    keeper = impl(path)
    yield keeper
    keeper.stop()


def listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


def test_a_listener_outlives_its_owner_and_keeps_its_backlog(running: Running, path: Path) -> None:
    sock = listener()
    port = sock.getsockname()[1]
    with KeeperClient(path) as client:
        client.put("pod-a/15001", sock)
    sock.close()  # the agent is gone: only the keeper holds it
    waiting = socket.create_connection(("127.0.0.1", port), timeout=2)  # not refused
    waiting.sendall(b"request sent while no agent ran")
    with KeeperClient(path) as client:
        held = client.list()
    assert list(held) == ["pod-a/15001"]
    accepted, _ = held["pod-a/15001"].accept()  # the next agent accepts what waited
    assert accepted.recv(100) == b"request sent while no agent ran"
    for each in (accepted, waiting, *held.values()):
        each.close()


def test_put_replaces_and_drop_closes(running: Running, path: Path) -> None:
    first, second = listener(), listener()
    with KeeperClient(path) as client:
        client.put("pod-a/15006", first)
        client.put("pod-a/15006", second)
        first_port = first.getsockname()[1]
        first.close()
        with pytest.raises(ConnectionRefusedError):  # the keeper let go of the replaced one
            socket.create_connection(("127.0.0.1", first_port), timeout=2)
        client.drop("pod-a/15006")
        client.drop("never-held")  # nothing to do is not an error
        assert client.list() == {}
    second.close()


def test_many_listeners_come_back_in_batches(running: Running, path: Path) -> None:
    socks = [listener() for _ in range(150)]  # more than one SCM_RIGHTS message
    with KeeperClient(path) as client:
        for index, sock in enumerate(socks):
            client.put(f"pod-{index}/15001", sock)
        held = client.list()
    assert {key: s.getsockname() for key, s in held.items()} == \
        {f"pod-{i}/15001": s.getsockname() for i, s in enumerate(socks)}
    for sock in [*socks, *held.values()]:
        sock.close()


def raw(path: Path, message: bytes, fds: list[int] = ()) -> bytes:  # type: ignore[assignment]
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(2)
        sock.connect(str(path))
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        sock.sendmsg([message], ancillary)
        return sock.recv(4096)


@pytest.mark.parametrize(("message", "with_fd", "reply"), [
    (b"PUT bad key with spaces", True, b"ERR bad key"),
    (b"PUT " + b"k" * 201, True, b"ERR bad key"),
    (b"PUT pod/1", False, b"ERR PUT takes exactly one descriptor"),
    (b"DROP pod/1", True, b"ERR descriptors only with PUT"),
    (b"LIST", True, b"ERR descriptors only with PUT"),
    (b"HELLO", False, b"ERR unknown request"),
    (b"\xff\xfe\x00", False, b"ERR unknown request"),
    (b"PUT " + b"x" * 70000, False, b"ERR message or descriptors truncated"),
])
def test_bad_requests_get_an_error_and_leak_nothing(running: Running, path: Path,
                                                    message: bytes, with_fd: bool,
                                                    reply: bytes) -> None:
    sock = listener()
    before = running.fds()
    assert raw(path, message, [sock.fileno()] if with_fd else []) == reply
    with KeeperClient(path) as client:
        assert client.list() == {}  # nothing was kept
    deadline = time.monotonic() + 2  # the keeper closes its end of our connection just after
    while running.fds() != before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert running.fds() == before  # no descriptor it was sent stayed
    sock.close()


def test_the_keeper_is_bounded(path: Path, impl: type[Running] | type[RunningC]) -> None:
    keeper = impl(path, max_held=3, max_clients=2)
    socks = [listener() for _ in range(4)]
    try:
        with KeeperClient(path) as client:
            for index in range(3):
                client.put(f"pod-{index}/15001", socks[index])
            with pytest.raises(KeeperError, match="keeper full"):
                client.put("pod-3/15001", socks[3])
            client.put("pod-0/15001", socks[3])  # replacing one is not growing
            assert len(client.list()) == 3
        clients = [KeeperClient(path) for _ in range(2)]
        for each in clients:
            each.list()  # both served
        third = KeeperClient(path)
        with pytest.raises(OSError):
            third.list()  # closed at accept: over the client limit
        for each in [*clients, third]:
            each.close()
    finally:
        keeper.stop()
        for sock in socks:
            sock.close()


def test_a_new_keeper_takes_everything_over(running: Running, path: Path,
                                            impl: type[Running] | type[RunningC]) -> None:
    sock = listener()
    with KeeperClient(path) as client:
        client.put("pod-a/15008", sock)
    successor = impl(path)  # a rolling update: the next keeper starts beside this one
    try:
        assert successor.taken == 1
        running.stop()  # the old one exits: its copies close, the path stays the successor's
        assert path.exists()
        port = sock.getsockname()[1]
        sock.close()
        socket.create_connection(("127.0.0.1", port), timeout=2).close()  # still listening
        with KeeperClient(path) as client:
            assert list(client.list()) == ["pod-a/15008"]
    finally:
        successor.stop()
    assert not path.exists()  # its own path: removed at exit


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_other_users_are_not_served(running: Running, path: Path) -> None:
    os.chmod(path, 0o777)  # even if the file were open to all
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        os.close(reader)
        os.setuid(65534)
        try:
            answer = raw(path, b"LIST")
        except OSError as exc:
            answer = f"error {exc.errno}".encode()
        os.write(writer, answer or b"closed")
        os._exit(0)
    os.close(writer)
    os.waitpid(child, 0)
    answer = os.read(reader, 100)
    os.close(reader)
    assert answer == b"closed" or answer.startswith(b"error")


@not_under_user_mode_emulation("qemu-user passes through only the ioctls it knows, and not "
                               "SIOCGSKNS (ENOSYS); `make smoke-arm64` runs it on an arm64 kernel")
def test_the_agents_hold_checks_what_it_takes_back(running: Running, path: Path) -> None:
    here = netns_inode(listener())
    keep = {name: listener() for name in ("pod-a/15001", "pod-a/15006", "gone/15001")}
    with KeeperClient(path) as client:
        for key, sock in keep.items():
            client.put(key, sock)
    hold = ListenerHold(path)
    assert hold.start() == 3
    port = keep["pod-a/15001"].getsockname()[1]
    taken = hold.take("pod-a/15001", here, port)
    assert taken is not None and taken.getsockname()[1] == port
    assert hold.take("pod-a/15006", here, port) is None  # another port: not this listener
    assert hold.take("pod-a/15006", (0, 1), keep["pod-a/15006"].getsockname()[1]) is None
    assert hold.settle() == 1  # "gone/15001": nobody claimed it
    with KeeperClient(path) as client:
        assert sorted(client.list()) == ["pod-a/15001", "pod-a/15006"]
    hold.release(["pod-a/15006"])
    with KeeperClient(path) as client:
        assert sorted(client.list()) == ["pod-a/15001"]
    hold.forget_all()
    for sock in [*keep.values(), taken]:
        sock.close()


def test_a_restarted_keeper_gets_every_listener_again(path: Path,
                                                      impl: type[Running] | type[RunningC]) -> None:
    first = impl(path)
    hold = ListenerHold(path)
    hold.start()
    sock = listener()
    hold.register("pod-a/15001", sock)
    first.stop()  # the keeper's container restarted: it holds nothing now
    hold.register("pod-b/15001", listener())  # fails quietly, remembered
    assert not hold.connected
    second = impl(path)
    try:
        hold.refresh()
        assert hold.connected
        with KeeperClient(path) as client:
            assert sorted(client.list()) == ["pod-a/15001", "pod-b/15001"]
    finally:
        hold.forget_all()
        second.stop()
        sock.close()


def test_without_a_keeper_the_hold_does_nothing() -> None:
    hold = ListenerHold(None)
    assert hold.start() == 0 and not hold.connected
    sock = listener()
    hold.register("pod/1", sock)
    assert hold.take("pod/1", (0, 0), 1) is None
    hold.release(["pod/1"])
    assert hold.settle() == 0
    sock.close()


def test_an_unreachable_keeper_is_not_fatal(tmp_path: Path) -> None:
    hold = ListenerHold(tmp_path / "nobody.sock")
    assert hold.start() == 0 and not hold.connected
