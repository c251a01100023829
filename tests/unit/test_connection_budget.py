"""The agent's connection budget: counted by the pods' relay sets, runs out at its limit or
under memory pressure, comes back with hysteresis, and is sized from the memory cgroup."""

from __future__ import annotations

from pathlib import Path

from agent.core.telemetry import Telemetry
from agent.dataplane.budget import (
    CONNECTION_BYTES,
    DEFAULT_MAX_CONNECTIONS,
    ConnectionBudget,
    RelaySet,
    out_of_budget,
    sized_for,
)
from agent.dataplane.context import PodContext
from agent.dataplane.netns import NetNs
from agent.dataplane.relay import Relay
from agent.memory import CgroupCpu, CgroupMemory

MIB = 1024 * 1024


class Calls:
    def __init__(self) -> None:
        self.log: list[str] = []

    def pause(self) -> None:
        self.log.append("pause")

    def resume(self) -> None:
        self.log.append("resume")


def budget_with(limit: int) -> tuple[ConnectionBudget, Calls]:
    budget, calls = ConnectionBudget(limit), Calls()
    budget.when_exhausted(calls.pause, calls.resume)
    return budget, calls


def test_relay_sets_count_each_relay_once_and_the_budget_runs_out_at_its_limit() -> None:
    budget, calls = budget_with(8)  # back at 6 (three quarters)
    pods = [RelaySet(budget), RelaySet(budget)]
    relays = [object() for _ in range(8)]
    for index, relay in enumerate(relays):
        pods[index % 2].add(relay)
        pods[index % 2].add(relay)  # twice: counted once
    assert budget.live == 8 and budget.exhausted and calls.log == ["pause"]
    assert out_of_budget(pods[0]) and not out_of_budget(set())
    pods[0].discard(relays[0])  # 7 > 6: still out
    pods[0].discard(relays[0])  # not a member any more: nothing
    assert budget.live == 7 and budget.exhausted and calls.log == ["pause"]
    pods[1].discard(relays[1])  # 6: back
    assert not budget.exhausted and calls.log == ["pause", "resume"]
    assert budget.pauses == 1 and not out_of_budget(pods[0])


class Owner:
    """A relay's proxy, as far as a relay that only opens and ends needs one."""

    def __init__(self) -> None:
        self.telemetry = Telemetry(lambda: 0.0, 60.0)

    def accepted(self, relay: Relay) -> None:
        pass


def test_a_relay_counted_closed_gives_its_connection_back_to_the_budget() -> None:
    """The relay (compiled by mypyc: agent/core/compiled.py) calls its pod's RelaySet's own
    discard: typed as a plain set, the compiled relay called set.discard and every connection
    stayed counted until the agent refused all new ones."""
    budget, calls = budget_with(2)
    netns = NetNs.current()
    try:
        pod = PodContext("shop", "front-1", netns, frozenset((15001,)), relays=RelaySet(budget))
        for _ in range(5):  # more connections, one after another, than the budget holds at once
            relay = Relay(Owner(), pod, "outbound", 64 * 1024)
            pod.relays.add(relay)
            assert budget.live == 1
            relay.finish()
            assert budget.live == 0 and not pod.relays
        assert calls.log == []
    finally:
        netns.close()


def test_memory_pressure_runs_it_out_whatever_the_count() -> None:
    budget, calls = budget_with(100)
    pod = RelaySet(budget)
    pod.add(object())
    budget.under_pressure(True)
    assert budget.exhausted and calls.log == ["pause"]
    budget.under_pressure(True)  # no change, no call
    assert calls.log == ["pause"]
    budget.under_pressure(False)
    assert not budget.exhausted and calls.log == ["pause", "resume"]


def test_the_count_does_not_end_pressure_and_pressure_does_not_end_the_count() -> None:
    budget, calls = budget_with(2)
    pod = RelaySet(budget)
    a, b = object(), object()
    pod.add(a)
    pod.add(b)  # out by count
    budget.under_pressure(True)
    pod.discard(a)
    pod.discard(b)  # count back under, but memory still short: stays out
    assert budget.exhausted
    budget.under_pressure(False)
    assert not budget.exhausted and calls.log == ["pause", "resume"]


def test_it_is_sized_from_the_memory_limit() -> None:
    assert sized_for(None, 25 * MIB) == DEFAULT_MAX_CONNECTIONS
    at_48 = sized_for(48 * MIB, 25 * MIB)
    assert 250 <= at_48 <= 350  # bench/overload.py: up to ~40 KiB each, ~25 MiB before any
    assert at_48 == (int(48 * MIB * 0.85) - 25 * MIB - 4 * MIB) // CONNECTION_BYTES
    assert sized_for(256 * MIB, 25 * MIB) > 4000
    assert sized_for(30 * MIB, 29 * MIB) == 64  # never nothing at all
    assert sized_for(64 * 1024 * MIB, 25 * MIB) == 16384


def test_cgroup_memory_reads_v2_and_v1_layouts(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    (v2 / "kubepods" / "agent").mkdir(parents=True)
    (v2 / "kubepods" / "agent" / "memory.current").write_text("26214400\n")
    (v2 / "kubepods" / "agent" / "memory.max").write_text("50331648\n")
    proc = tmp_path / "cgroup-v2"
    proc.write_text("0::/kubepods/agent\n")
    memory = CgroupMemory(str(proc), str(v2))
    assert (memory.usage(), memory.limit) == (26214400, 50331648)

    (v2 / "kubepods" / "agent" / "memory.max").write_text("max\n")
    assert CgroupMemory(str(proc), str(v2)).limit is None

    v1 = tmp_path / "v1"
    (v1 / "memory" / "pinion").mkdir(parents=True)
    (v1 / "memory" / "pinion" / "memory.usage_in_bytes").write_text("1000\n")
    (v1 / "memory" / "pinion" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    proc1 = tmp_path / "cgroup-v1"
    proc1.write_text("12:pids:/x\n9:memory:/pinion\n1:name=systemd:/y\n0::/z\n")
    memory = CgroupMemory(str(proc1), str(v1))
    assert memory.usage() == 1000 and memory.limit is None  # v1's "no limit"
    (v1 / "memory" / "pinion" / "memory.limit_in_bytes").write_text("50331648\n")
    assert CgroupMemory(str(proc1), str(v1)).limit == 50331648

    nowhere = CgroupMemory(str(tmp_path / "missing"), str(v1))
    assert (nowhere.usage(), nowhere.limit) == (0, None)


def test_memory_pressure_shrinks_it_to_what_fit_and_room_grows_it_back() -> None:
    budget, _ = budget_with(1000)
    pod = RelaySet(budget)
    relays = [object() for _ in range(500)]
    for relay in relays:
        pod.add(relay)
    budget.shrink()  # memory ran short at 500 open
    assert (budget.limit, budget.resume_at) == (400, 300)
    budget.under_pressure(True)
    for relay in relays[:250]:
        pod.discard(relay)
    budget.under_pressure(False)  # 250 <= 300: back
    assert not budget.exhausted
    for _ in range(100):
        budget.grow()
    assert budget.limit == budget.ceiling == 1000  # never past where it started
    for relay in relays[250:314]:
        pod.discard(relay)
    budget.shrink()  # 186 open: never under the floor, and never up
    assert budget.limit == 148


def test_a_loop_running_late_brings_it_down_to_what_is_open() -> None:
    """A CPU that cannot keep up: connections held beyond what it serves only wait (and
    cost memory), so the budget is halved to what is open, once a second at most, never for
    a single late tick, never below the floor; room grows it back."""
    budget, _ = budget_with(1000)
    pod = RelaySet(budget)
    for relay in [object() for _ in range(300)]:
        pod.add(relay)
    budget.loop_lag(0.2, now=10.0)  # one late tick: a scrape, a pod added
    budget.loop_lag(0.0, now=10.1)
    budget.loop_lag(0.2, now=10.2)
    budget.loop_lag(0.2, now=10.3)
    assert budget.limit == 1000 and not budget.cpu_busy
    budget.loop_lag(0.2, now=10.4)  # the third late tick running
    assert budget.cpu_busy and budget.limit == 150  # halved to what is open
    budget.loop_lag(0.2, now=10.5)
    assert budget.limit == 150  # once a second
    pod.add(object())  # 301 open, over the new limit: out of budget
    assert budget.exhausted
    budget.loop_lag(0.0, now=11.6)
    assert not budget.cpu_busy and budget.limit == 150
    for _ in range(100):
        budget.grow()
    assert budget.limit == 1000


def test_a_late_loop_with_few_connections_open_leaves_the_budget_alone() -> None:
    budget, _ = budget_with(1000)
    pod = RelaySet(budget)
    for relay in [object() for _ in range(40)]:
        pod.add(relay)
    for tick in range(10):
        budget.loop_lag(0.5, now=float(tick))
    assert budget.cpu_busy and budget.limit == 1000  # under the floor: nothing to shed


class Conn:
    """A relay as the budget sees it: when it was accepted (time.monotonic())."""

    def __init__(self, started: float) -> None:
        self.started = started


def test_while_the_cpu_is_the_limit_young_connections_are_paced_by_what_it_serves() -> None:
    """Little's law: an agent completing 1,500 connections a second needs ~150 open (0.1 s
    each) to serve them; more only wait inside it. So while its CPU is (or lately was) the
    limit, the budget allows the young ones the rate * TARGET_WAIT (at least the floor),
    plus every long-lived one; and it is the memory-sized limit again once the CPU has had
    room for PACE_HOLD_SECONDS."""
    budget, calls = budget_with(1000)
    pod = RelaySet(budget)
    long_lived = [Conn(1.0) for _ in range(40)]  # a pool opened long before
    for conn in long_lived:
        pod.add(conn)
    budget.loop_lag(0.0, now=100.0)  # the first tick starts the rate window
    for tick in range(1, 11):  # one second of a busy loop, 1,500 completions in it
        for _ in range(150):
            conn = Conn(100.0 + tick / 10)
            pod.add(conn)
            pod.discard(conn)
        budget.loop_lag(0.2, now=100.0 + tick / 10)
    assert budget.cpu_busy and budget.served_rate == 1500.0
    assert budget.young == 0 and budget.paced == 40 + 150  # the long-lived ones, and 150
    assert budget.allowed == 190 and budget.resume_at == 142 and budget.limit == 1000
    young = [Conn(101.2) for _ in range(150)]
    for conn in young:
        pod.add(conn)
    assert budget.young == 150 and budget.exhausted and calls.log == ["pause"]
    for conn in young[:40]:
        pod.discard(conn)  # 150 open: still out
    assert budget.exhausted
    for conn in young[40:48]:
        pod.discard(conn)  # 142 open: back
    assert not budget.exhausted and calls.log == ["pause", "resume"]
    # The rate falls (nothing completes): the pace fades a tenth a second, never under
    # the floor; the young ones of 101 s are long-lived (settled) after SETTLE_SECONDS.
    budget.loop_lag(0.0, now=102.1)
    assert budget.served_rate == 1350.0 and budget.young == 102 and budget.paced == 40 + 135
    budget.loop_lag(0.0, now=107.2)
    assert budget.young == 0 and budget.paced == 142 + 121  # all settled, and 121 paced
    for tick in range(1, 20):
        budget.loop_lag(0.0, now=107.2 + tick)
    assert budget.paced == 142 + 64  # the floor
    budget.loop_lag(0.0, now=140.0)  # the CPU last late 30 s ago and more: no pace
    assert budget.paced == budget.allowed == 1000 and budget.resume_at == 750


def test_the_pace_never_applies_when_the_cpu_was_never_the_limit() -> None:
    budget, calls = budget_with(300)
    pod = RelaySet(budget)
    budget.loop_lag(0.0, now=0.0)
    for second in range(1, 4):
        for _ in range(10):  # a slow backend: few complete, many stay open
            pod.add(Conn(float(second)))
        budget.loop_lag(0.0, now=float(second))
    assert budget.paced == budget.allowed == 300 and budget.young == 30
    assert not budget.exhausted and calls.log == []


def test_a_cpu_cgroup_out_of_its_quota_paces_it_even_with_the_loop_on_time() -> None:
    """A few clients in a closed loop keep a throttled agent's loop on time (it runs at the
    start of each CFS period), so the lag alone does not see that its CPU is the limit."""
    budget, _ = budget_with(1000)
    pod = RelaySet(budget)
    budget.loop_lag(0.0, now=10.0)
    for tick in range(1, 11):
        for _ in range(40):
            conn = Conn(10.0 + tick / 10)
            pod.add(conn)
            pod.discard(conn)
        budget.loop_lag(0.0, now=10.0 + tick / 10)
    assert budget.served_rate == 400.0 and budget.paced == 1000  # on time: not paced
    budget.cpu_throttled(11.05)
    for tick in range(11, 21):
        budget.loop_lag(0.0, now=10.0 + tick / 10)
    assert not budget.cpu_busy and budget.paced == budget.allowed == 64  # the floor (360/s)


def test_cgroup_cpu_reads_the_throttled_periods_v2_and_v1(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    (v2 / "kubepods" / "agent").mkdir(parents=True)
    (v2 / "kubepods" / "agent" / "cpu.stat").write_text(
        "usage_usec 100\nuser_usec 60\nsystem_usec 40\nnr_periods 12\nnr_throttled 5\n"
        "throttled_usec 900\n")
    proc = tmp_path / "cgroup-v2"
    proc.write_text("0::/kubepods/agent\n")
    assert CgroupCpu(str(proc), str(v2)).throttled() == 5

    v1 = tmp_path / "v1"
    (v1 / "cpu,cpuacct" / "pinion").mkdir(parents=True)
    (v1 / "cpu,cpuacct" / "pinion" / "cpu.stat").write_text(
        "nr_periods 40\nnr_throttled 7\nthrottled_time 123\n")
    proc1 = tmp_path / "cgroup-v1"
    proc1.write_text("12:pids:/x\n4:cpu,cpuacct:/pinion\n1:name=systemd:/y\n0::/z\n")
    assert CgroupCpu(str(proc1), str(v1)).throttled() == 7

    assert CgroupCpu(str(tmp_path / "missing"), str(v1)).throttled() == 0  # no cgroup: never
