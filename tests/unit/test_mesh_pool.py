"""The outbound tunnel pool after a burst: a second (third, fourth) connection to one peer is
opened only because the first was full; once idle it is closed after a few seconds, not a
minute, so the TLS state and buffers of a burst's connections do not outlive it. The first
keeps the pool's idle timeout (no handshake for the next request)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from agent.dataplane.mesh import MeshClient, MeshSettings


class Session:
    """What the pool looks at of a tunnel session."""

    def __init__(self, idle_for: float, streams: int = 0) -> None:
        self.idle_since = asyncio.get_running_loop().time() - idle_for
        self.streams = dict.fromkeys(range(streams))
        self.closed = False

    def close(self) -> None:
        self.closed = True


def _pool(**sessions: list[Session]) -> MeshClient:
    none = cast(Any, None)
    client = MeshClient(none, none, none, MeshSettings(idle_timeout=60.0, spare_idle_timeout=5.0))
    for destination, listed in sessions.items():
        client._sessions[("spiffe://cluster.local/ns/shop/sa/front", destination)] = cast(Any, listed)
    return client


def test_a_bursts_spare_connections_close_after_the_spare_timeout() -> None:
    async def run() -> None:
        first, spare, busy, fresh = Session(10), Session(10), Session(100, streams=1), Session(1)
        pool = _pool(web=[first, spare, busy, fresh])
        assert pool.reap_idle() == 1
        assert spare.closed and not first.closed and not busy.closed and not fresh.closed

    asyncio.run(run())


def test_the_first_connection_to_a_peer_keeps_the_idle_timeout() -> None:
    async def run() -> None:
        kept, gone = Session(59), Session(61)
        pool = _pool(a=[kept], b=[gone])
        assert pool.reap_idle() == 1
        assert gone.closed and not kept.closed

    asyncio.run(run())


def test_after_a_burst_the_first_connection_goes_too_once_its_spares_have() -> None:
    """It carried the burst: its buffers (and its peer's) keep the size the burst grew them
    to while it is open. The next request to that peer dials a fresh connection."""
    async def run() -> None:
        first, spare = Session(10), Session(10)
        pool = _pool(web=[first, spare])
        assert pool.reap_idle() == 1 and spare.closed and not first.closed
        key = ("spiffe://cluster.local/ns/shop/sa/front", "web")
        pool._sessions[key] = cast(Any, [first])  # the spare's close took it out of the pool
        assert pool.reap_idle() == 1 and first.closed
        del pool._sessions[key]
        fresh = Session(10)
        pool._sessions[key] = cast(Any, [fresh])  # a later dial: no burst seen on it
        assert pool.reap_idle() == 0 and not fresh.closed

    asyncio.run(run())


def test_the_first_connection_of_a_burst_in_use_stays() -> None:
    async def run() -> None:
        first, spare = Session(10, streams=1), Session(10)
        pool = _pool(web=[first, spare])
        pool.reap_idle()
        pool._sessions[("spiffe://cluster.local/ns/shop/sa/front", "web")] = cast(Any, [first])
        assert pool.reap_idle() == 0 and not first.closed

    asyncio.run(run())
