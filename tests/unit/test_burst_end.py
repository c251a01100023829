"""When the agent gives back what a burst left: once, when the connections open fall to an
eighth of the burst's top (at least the floor), never on a quiet agent, and not twice within
the spacing; the memory watch does it from the tick it already runs."""

from __future__ import annotations

import asyncio
import json

import pytest

from agent import app
from agent.dataplane.budget import MIN_CONNECTIONS, ConnectionBudget
from agent.memory import BurstEnd


def test_a_burst_is_over_when_an_eighth_of_its_top_is_left() -> None:
    burst = BurstEnd(64, spacing=10.0)
    seen = [burst.over(live, now) for live, now in
            [(0, 0.0), (30, 1.0), (200, 2.0), (120, 3.0), (26, 4.0), (25, 5.0), (3, 6.0)]]
    assert seen == [False, False, False, False, False, True, False]  # 25 <= 200 // 8, once


def test_a_quiet_agent_or_a_small_burst_gives_nothing_back() -> None:
    burst = BurstEnd(64)
    assert not any(burst.over(live, float(t)) for t, live in enumerate([0, 1, 0, 63, 0, 2, 0] * 20))


def test_the_next_burst_counts_from_what_was_left_and_waits_for_the_spacing() -> None:
    burst = BurstEnd(64, spacing=10.0)
    assert burst.over(100, 0.0) is False and burst.over(0, 1.0) is True
    assert burst.over(100, 2.0) is False
    assert burst.over(0, 5.0) is False  # over, but 4 s after the last give-back
    assert burst.over(0, 11.0) is True  # the top is remembered until it is given back
    assert burst.over(0, 30.0) is False  # nothing since


class FixedMemory:
    limit = 100 * 2**20

    def usage(self) -> int:
        return 10 * 2**20  # far from pressure


def test_the_memory_watch_gives_back_once_when_a_burst_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    given: list[bool] = []
    monkeypatch.setattr(app, "give_back_memory", lambda full=False: given.append(full))
    budget = ConnectionBudget(1000)

    async def scenario() -> None:
        watch = asyncio.create_task(app._watch_memory(FixedMemory(), FixedMemory.limit,  # type: ignore[arg-type]
                                                      budget, every=0.01))
        await asyncio.sleep(0.05)
        budget.live = MIN_CONNECTIONS * 2  # a burst
        await asyncio.sleep(0.05)
        assert given == []
        budget.live = 1  # over
        await asyncio.sleep(0.05)
        assert given == [True]  # a full collection, pools released, heap trimmed: once
        await asyncio.sleep(0.05)
        watch.cancel()

    asyncio.run(scenario())
    assert given == [True]


def test_serving_starts_with_start_up_frozen_and_a_larger_young_generation() -> None:
    """In a process of its own (freezing is for the process's life): start-up's objects are
    out of the collector's sight, the agent's own module among them, and a full collection
    walks only what was made after."""
    import subprocess
    import sys

    script = (
        "import gc, json\n"
        "from agent.memory import SERVING_THRESHOLDS, settle_for_serving\n"
        "before = len(gc.get_objects())\n"
        "settle_for_serving()\n"
        "after = len(gc.get_objects())\n"
        "print(json.dumps([gc.get_threshold() == SERVING_THRESHOLDS, gc.get_freeze_count(),"
        " before, after]))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=True)
    thresholds, frozen, before, after = json.loads(done.stdout)
    assert thresholds
    assert frozen > 1000 and after < before // 10
