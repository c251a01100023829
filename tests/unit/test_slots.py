"""One address's share of a pool: its extra users wait for one of its own slots while other
addresses go straight in, a waiter that gives up leaves nothing, and an address is forgotten
once nobody from it holds or waits for a slot."""

from __future__ import annotations

import asyncio

import pytest

from agent.dataplane.slots import SourceSlots


def test_an_address_waits_for_its_own_slots_while_others_go_in() -> None:
    async def story() -> None:
        slots = SourceSlots(per_source=2)
        await slots.acquire("attacker")
        await slots.acquire("attacker")
        third = asyncio.ensure_future(slots.acquire("attacker"))
        await asyncio.sleep(0)
        assert not third.done()  # its third waits...
        await asyncio.wait_for(slots.acquire("agent"), 0.1)  # ...another address does not
        slots.release("attacker")
        await asyncio.wait_for(third, 0.1)  # a slot of its own freed: in
        for source in ("attacker", "attacker", "agent"):
            slots.release(source)
        assert len(slots) == 0

    asyncio.run(story())


def test_a_waiter_that_gives_up_leaves_nothing_behind() -> None:
    async def story() -> None:
        slots = SourceSlots(per_source=1)
        async with slots.taken("10.42.0.9"):
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(slots.acquire("10.42.0.9"), 0.05)
            assert len(slots) == 1
        assert len(slots) == 0

    asyncio.run(story())
