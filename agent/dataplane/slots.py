"""A share of a pool per client address: at most `per_source` of one address's connections
hold a slot at a time, its others wait for one of its own. So one client cannot take the
handshake slots every other client needs (15008's TLS, the issuer's). An address is
remembered only while it has a user: memory is bounded by the connections themselves."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class _Share:
    __slots__ = ("semaphore", "users")

    def __init__(self, slots: int) -> None:
        self.semaphore = asyncio.Semaphore(slots)
        self.users = 0  # holding a slot or waiting for one


class SourceSlots:
    def __init__(self, per_source: int) -> None:
        self.per_source = per_source
        self._shares: dict[str, _Share] = {}

    def __len__(self) -> int:
        """Addresses with a user now."""
        return len(self._shares)

    async def acquire(self, source: str) -> None:
        share = self._shares.get(source)
        if share is None:
            share = self._shares[source] = _Share(self.per_source)
        share.users += 1
        try:
            await share.semaphore.acquire()
        except BaseException:  # cancelled or timed out while waiting: no slot, no user
            self._leave(source, share)
            raise

    def release(self, source: str) -> None:
        share = self._shares[source]
        share.semaphore.release()
        self._leave(source, share)

    @contextlib.asynccontextmanager
    async def taken(self, source: str) -> AsyncIterator[None]:
        await self.acquire(source)
        try:
            yield
        finally:
            self.release(source)

    def _leave(self, source: str, share: _Share) -> None:
        share.users -= 1
        if not share.users:
            del self._shares[source]
