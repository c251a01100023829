"""The admin endpoint against hostile callers, on loopback: a caller that sends nothing, one
that sends too much, one that does not read the answer, and a flood of idle connections
(which close the oldest, so probes and scrapes keep being answered). Every connection closed
unanswered is counted; none leaves a task, an fd or a buffer behind. /pods in full only to
callers on this host."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from agent.observability.admin import AdminLimits, AdminServer, is_local_peer, public_pod_view
from agent.observability.exposition import CollectorRegistry

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20
DEFAULTS = AdminLimits()

FULL_ENTRY = {"namespace": "shop", "name": "web-0", "uid": "u-1", "containerId": "c-1",
              "netns": "/var/run/netns/cni-1", "ips": ["10.42.0.5"], "serviceAccount": "web",
              "opaquePorts": [5432], "inboundPolicy": "allow-listed",
              "allowedClients": ["spiffe://cluster.local/ns/shop/sa/cart"],
              "cgroup": "/sys/fs/cgroup/kubepods.slice/pod-u-1",
              "capture": {"excludeInboundPorts": [9100], "excludeOutboundPorts": [],
                          "excludeOutboundCidrs": [], "probeSources": []},
              "owner": {"kind": "deployment", "name": "web"}, "backend": "ebpf", "listening": True,
              "programs": [{"program": "connect4", "attach": "cgroup_inet4_connect", "id": 7,
                            "cgroup": "/sys/fs/cgroup/kubepods.slice/pod-u-1", "attached": True}]}


def refused(registry: CollectorRegistry, reason: str) -> float:
    value = registry.get_sample_value("pinion_admin_connections_refused_total", {"reason": reason})
    return value or 0.0


def serve(test: Callable[[AdminServer, CollectorRegistry], Awaitable[None]],
          limits: AdminLimits = DEFAULTS, pods: list[dict[str, Any]] | None = None) -> None:
    async def run() -> None:
        registry = CollectorRegistry()
        server = AdminServer("127.0.0.1", 0, registry, lambda: pods or [], limits=limits)
        server.ready = True
        await server.start()
        try:
            await test(server, registry)
        finally:
            await server.close()
    asyncio.run(run())


async def get(server: AdminServer, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(*server.address)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    response = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def closed_by_server(reader: asyncio.StreamReader, within: float) -> bool:
    """Whether the server closed (or reset) the connection without a word, within `within` s."""
    try:
        return await asyncio.wait_for(reader.read(), within) == b""
    except ConnectionResetError:
        return True


async def settled(server: AdminServer) -> None:
    """Until every connection's task has finished (bounded: 2 s)."""
    deadline = time.monotonic() + 2
    while server.open_connections and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)


# ---------------------------------------------------------------- one hostile caller at a time

def test_a_caller_that_sends_nothing_is_closed_at_the_head_deadline_and_counted() -> None:
    async def test(server: AdminServer, registry: CollectorRegistry) -> None:
        reader, writer = await asyncio.open_connection(*server.address)
        started = time.monotonic()
        assert await closed_by_server(reader, within=2)
        assert 0.2 <= time.monotonic() - started < 1.5
        writer.close()
        await settled(server)
        assert refused(registry, "head_timeout") == 1 and server.open_connections == 0
    serve(test, AdminLimits(head_timeout=0.3))


def test_a_head_that_trickles_in_byte_by_byte_still_meets_one_deadline() -> None:
    async def test(server: AdminServer, registry: CollectorRegistry) -> None:
        reader, writer = await asyncio.open_connection(*server.address)
        started = time.monotonic()
        # 300 bytes 20 ms apart: 6 s of trickle, each byte well inside any per-read timeout
        for byte in b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"a" * 270:
            if reader.at_eof() or time.monotonic() - started > 5:
                break
            writer.write(bytes([byte]))
            await asyncio.sleep(0.02)
        assert await closed_by_server(reader, within=2)
        # cut by the one 0.5 s deadline, long before the trickle ends (slack for a loaded box)
        assert time.monotonic() - started < 3.0
        writer.close()
        await settled(server)
        assert refused(registry, "head_timeout") == 1
    serve(test, AdminLimits(head_timeout=0.5))


def test_a_head_over_the_size_limit_is_refused_and_counted() -> None:
    async def test(server: AdminServer, registry: CollectorRegistry) -> None:
        reader, writer = await asyncio.open_connection(*server.address)
        writer.write(b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 3000)
        assert await closed_by_server(reader, within=2)
        writer.close()
        await settled(server)
        assert refused(registry, "head_too_large") == 1 and server.open_connections == 0
    serve(test, AdminLimits(max_head_bytes=1024))


def test_a_caller_that_never_reads_the_answer_is_cut_at_the_send_deadline() -> None:
    big = [{"name": "p" * 1000, "namespace": str(i)} for i in range(20_000)]  # ~20 MB of JSON

    async def test(server: AdminServer, registry: CollectorRegistry) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(server.address)
        sock.sendall(b"GET /pods HTTP/1.1\r\n\r\n")
        deadline = time.monotonic() + 3
        while refused(registry, "send_timeout") == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await settled(server)
        sock.close()
        assert refused(registry, "send_timeout") == 1 and server.open_connections == 0
        assert (await get(server, "/ready"))[0] == 200
    serve(test, AdminLimits(send_timeout=0.5), pods=big)


def test_over_the_cap_the_oldest_connection_makes_room_for_the_newest() -> None:
    async def test(server: AdminServer, registry: CollectorRegistry) -> None:
        idle = [await asyncio.open_connection(*server.address) for _ in range(4)]
        await asyncio.sleep(0.05)
        assert server.open_connections == 4
        assert (await get(server, "/ready")) == (200, b"ready\n")
        assert await closed_by_server(idle[0][0], within=1)  # the oldest went
        assert server.open_connections == 3                  # the other three are still there
        assert refused(registry, "over_capacity") == 1
        for _, writer in idle:
            writer.close()
        await settled(server)
        assert server.open_connections == 0
    serve(test, AdminLimits(max_connections=4))


def test_answered_connections_leave_no_task_and_no_connection_behind() -> None:
    async def test(server: AdminServer, registry: CollectorRegistry) -> None:
        before = len(asyncio.all_tasks())
        for _ in range(200):
            assert (await get(server, "/live"))[0] == 200
        await settled(server)
        assert len(asyncio.all_tasks()) == before and server.open_connections == 0
        assert registry.get_sample_value("pinion_admin_connections") == 0
        assert sum(refused(registry, r) for r in ("over_capacity", "head_timeout",
                                                   "head_too_large", "send_timeout")) == 0
    serve(test)


def test_a_failing_view_costs_its_connection_only() -> None:
    def broken() -> list[dict[str, Any]]:
        raise RuntimeError("a bug in the pods view")

    async def run() -> None:
        server = AdminServer("127.0.0.1", 0, CollectorRegistry(), broken)
        server.ready = True
        await server.start()
        try:
            reader, writer = await asyncio.open_connection(*server.address)
            writer.write(b"GET /pods HTTP/1.1\r\n\r\n")
            assert await closed_by_server(reader, within=2)
            writer.close()
            await settled(server)
            assert server.open_connections == 0
            assert (await get(server, "/ready"))[0] == 200
        finally:
            await server.close()
    asyncio.run(run())


# ---------------------------------------------------------------- /pods: full here, public elsewhere

@pytest.mark.parametrize(("peer", "own", "local"), [
    (("127.0.0.1", 40000), ("127.0.0.1", 4191), True),
    (("127.3.4.5", 40000), ("10.0.0.5", 4191), True),           # all of 127/8 is this host
    (("::1", 40000, 0, 0), ("::1", 4191, 0, 0), True),
    (("10.0.0.5", 40000), ("10.0.0.5", 4191), True),            # the node to its own IP
    (("::ffff:10.0.0.5", 1, 0, 0), ("10.0.0.5", 4191), True),   # v4-mapped on a dual-stack socket
    (("10.0.0.6", 40000), ("10.0.0.5", 4191), False),           # another node
    (("10.42.1.7", 40000), ("10.0.0.5", 4191), False),          # a pod, even one on this node
    (("fe80::1%eth0", 1, 0, 2), ("fe80::2%eth0", 4191, 0, 2), False),
    ("/run/pinion/admin.sock", "", False),                       # not an IP caller
    (None, ("10.0.0.5", 4191), False),
])
def test_who_is_a_caller_on_this_host(peer: object, own: object, local: bool) -> None:
    assert is_local_peer(peer, own) is local


def test_the_public_view_keeps_names_and_capture_health_and_nothing_about_the_pods_insides() -> None:
    assert public_pod_view(FULL_ENTRY) == {
        "namespace": "shop", "name": "web-0", "serviceAccount": "web",
        "owner": {"kind": "deployment", "name": "web"}, "backend": "ebpf", "listening": True,
        "programs": [{"program": "connect4", "attach": "cgroup_inet4_connect", "attached": True}]}
    assert public_pod_view({"namespace": "a", "name": "b", "someNewField": 1}) == {
        "namespace": "a", "name": "b"}  # an allow-list: fields added later stay local


def test_pods_in_full_to_a_caller_on_this_host() -> None:
    async def test(server: AdminServer, registry: CollectorRegistry) -> None:
        status, body = await get(server, "/pods")
        assert (status, json.loads(body)) == (200, [FULL_ENTRY])
    serve(test, pods=[FULL_ENTRY])


def test_pods_in_public_view_to_any_other_caller() -> None:
    server = AdminServer("127.0.0.1", 0, CollectorRegistry(), lambda: [FULL_ENTRY])
    status, _, body = server._route(b"GET /pods HTTP/1.1", local=False)
    assert (status, json.loads(body)) == (200, [public_pod_view(FULL_ENTRY)])
    for route in (b"GET /metrics HTTP/1.1", b"GET /ready HTTP/1.1", b"GET /live HTTP/1.1"):
        assert server._route(route, local=False) == server._route(route, local=True)


# ---------------------------------------------------------------- a flood, against a real process

CHILD = """
import asyncio, os, sys
from agent.observability.exposition import CollectorRegistry
from agent.observability.admin import AdminServer

def stats():
    return [{"fds": len(os.listdir("/proc/self/fd")), "tasks": len(asyncio.all_tasks()),
             "open": server.open_connections}]

async def main():
    global server
    server = AdminServer("127.0.0.1", 0, CollectorRegistry(), stats)
    server.ready = True
    await server.start()
    print(server.address[1], flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until stdin closes
    await server.close()

if sys.argv[1] == "uvloop":
    import uvloop
    uvloop.run(main())
else:
    asyncio.run(main())
"""
IDLE_CONNECTIONS = 500
CAP = DEFAULTS.max_connections


def http_get(port: int, path: str) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\n\r\n".encode())
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def child_stats(port: int) -> dict[str, int]:
    status, body = http_get(port, "/pods")
    assert status == 200
    stats: dict[str, int] = json.loads(body)[0]
    return stats


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def open_idle(port: int, count: int) -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.settimeout(5)
        sock.connect(("127.0.0.1", port))
        sockets.append(sock)
    return sockets


def wait_for_baseline(port: int, fds: int) -> float:
    """Seconds until the child's fds are back to `fds` (fails after 5 s)."""
    started = time.monotonic()
    while (now := child_stats(port))["fds"] > fds or now["open"] > 1:
        assert time.monotonic() - started < 5, f"not back to baseline: {now}"
        time.sleep(0.05)
    return time.monotonic() - started


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_500_idle_connections_hold_at_most_the_cap_and_probes_are_still_answered(loop: str) -> None:
    try:
        __import__(loop)
    except ImportError:
        if os.environ.get("CI"):  # `make venv` installs uvloop (the fast extra): missing is a bug
            raise
        pytest.skip(f"{loop} is not installed")
    child = subprocess.Popen([sys.executable, "-c", CHILD, loop], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        for sock in open_idle(port, 2 * CAP):  # warm up: every code path once, allocator pools
            sock.close()
        for path in ("/metrics", "/ready", "/pods"):
            http_get(port, path)
        wait_for_baseline(port, child_stats(port)["fds"])
        before, rss_before = child_stats(port), rss(child.pid)

        idle = open_idle(port, IDLE_CONNECTIONS)
        try:
            assert http_get(port, "/ready") == (200, b"ready\n")     # fresh connections are served
            status, metrics = http_get(port, "/metrics")
            during, rss_during = child_stats(port), rss(child.pid)
        finally:
            for sock in idle:
                sock.close()
        recovered = wait_for_baseline(port, before["fds"])

        assert status == 200 and b"# TYPE pinion_admin_connections_refused_total counter" in metrics
        assert during["open"] <= CAP and during["fds"] - before["fds"] <= CAP
        assert during["tasks"] - before["tasks"] <= CAP
        assert rss_during - rss_before <= 2 * MiB
        print(f"{loop}: {IDLE_CONNECTIONS} idle: open {during['open']}, "
              f"fds +{during['fds'] - before['fds']}, tasks +{during['tasks'] - before['tasks']}, RSS "
              f"+{(rss_during - rss_before) / 1024:.0f} KiB; back to baseline in {recovered:.2f} s")
    finally:
        assert child.stdin is not None
        child.stdin.close()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(5)
