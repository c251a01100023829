"""Giving memory back after a burst: what an idle agent would otherwise keep.

A relay and its two sides form a reference cycle, freed only by a garbage collection, which
an idle agent (allocating nothing) does not trigger; CPython's small-object allocator keeps
every pool a burst emptied resident while one object lives in its arena; and glibc keeps
freed heap pages unless asked to trim. After many connections end at once (an idle sweep, a
flood that stopped), one call does all three, in a few milliseconds."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable
from functools import cache


def give_back_memory(full: bool = False) -> None:
    """`full`: also the oldest generation, where connections that lived through a few
    collections (a burst that lasted seconds) end up; a full collection takes tens of ms."""
    gc.collect(2 if full else 1)  # the young generations: where a short burst's cycles are
    release_free_pools()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


# The young generation's size for an agent that serves: CPython's default (700 allocations)
# collects every few connections, and connections alive at that moment (a few ms old) are
# promoted and collected again in the older generations. At 2,000 most are gone by the
# collection (measured: issue #16, docs/benchmarks.md); the garbage it can hold is a few
# hundred KiB. The older generations keep their defaults' ratio to it.
SERVING_THRESHOLDS = (2000, 20, 20)


def settle_for_serving() -> None:
    """Start-up is over: what it made (modules, classes, configuration: ~26,000 objects) is
    collected once and moved out of the collector's sight (`gc.freeze`), so a full
    collection walks only what serving made (~9 ms → ~1 ms per full collection, measured);
    and the young generation gets `SERVING_THRESHOLDS`."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*SERVING_THRESHOLDS)


def release_free_pools() -> int:
    """The pages of the free pools in pymalloc's arenas given back (all but each pool's first:
    its header), in bytes; 0 without agent._arenas (csrc/arenas.c) or on a Python whose pools
    it does not know (then it never recorded an arena)."""
    try:
        import agent._arenas as _arenas
    except ImportError:
        return 0
    released: int = _arenas.release()
    return released


class BurstEnd:
    """Says when a burst of connections is over, so that what it left is given back once (a
    full collection: its connections lived long enough to reach the oldest generation, and an
    agent that now allocates little never collects it): the connections open fell to an
    eighth of the most seen since the last give-back, which was at least `burst` connections
    and `spacing` seconds ago. Fed from a loop that runs anyway (the memory watch's tick, the
    sweep), it wakes nothing of its own: an idle agent stays asleep."""

    __slots__ = ("burst", "given_at", "spacing", "top")

    def __init__(self, burst: int, spacing: float = 10.0) -> None:
        self.burst, self.spacing = burst, spacing
        self.top = 0  # connections at the top of the burst so far
        self.given_at = float("-inf")

    def over(self, live: int, now: float) -> bool:
        self.top = max(self.top, live)
        if self.top < self.burst or live > self.top // 8 or now - self.given_at < self.spacing:
            return False
        self.top, self.given_at = live, now
        return True


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where there is none (musl)."""
    name = ctypes.util.find_library("c")
    try:
        function = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if function is not None:
        function.argtypes, function.restype = [ctypes.c_size_t], ctypes.c_int
    return function


class CgroupMemory:
    """The agent's own memory cgroup: what it uses and what it may (v2 memory.current and
    memory.max, or v1 memory.usage_in_bytes and memory.limit_in_bytes). `limit` is None
    without a limit, or where no cgroup file can be read."""

    def __init__(self, proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> None:
        self.usage_path: str | None = None
        self.limit: int | None = None
        for line in _read(proc_cgroup).splitlines():
            hierarchy, _, rest = line.partition(":")
            controllers, _, path = rest.partition(":")
            if controllers == "" and hierarchy == "0":  # v2 (unless v1 memory is found)
                base = f"{root}/{path.lstrip('/')}".rstrip("/")
                self._take(f"{base}/memory.current", f"{base}/memory.max")
            elif "memory" in controllers.split(","):
                base = f"{root}/memory/{path.lstrip('/')}".rstrip("/")
                self._take(f"{base}/memory.usage_in_bytes", f"{base}/memory.limit_in_bytes")
                break

    def _take(self, usage: str, limit: str) -> None:
        text = _read(limit).strip()
        if not text or not _read(usage).strip():
            return
        self.usage_path = usage
        value = None if text == "max" else int(text)
        self.limit = value if value is not None and value < 2**60 else None  # v1: "no limit"

    def usage(self) -> int:
        return int(_read(self.usage_path).strip() or 0) if self.usage_path else 0


def _read(path: str | None) -> str:
    if path is None:
        return ""
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return ""


def resident_bytes() -> int:
    """This process's resident memory (VmRSS), from /proc/self/statm."""
    import os

    fields = _read("/proc/self/statm").split()
    return int(fields[1]) * os.sysconf("SC_PAGE_SIZE") if len(fields) > 1 else 0


class CgroupCpu:
    """The agent's own cpu cgroup's throttling count (v2 `cpu.stat` nr_throttled, v1 the
    `cpu` controller's): it grows when the agent used all the CPU its limit allows in a
    period, i.e. when the CPU is what limits it. `throttled()` is 0 without a cpu cgroup
    or limit (a Pi's whole core: the event loop's lag tells that one)."""

    def __init__(self, proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> None:
        self.stat_path: str | None = None
        for line in _read(proc_cgroup).splitlines():
            hierarchy, _, rest = line.partition(":")
            controllers, _, path = rest.partition(":")
            if controllers == "" and hierarchy == "0":  # v2 (unless a v1 cpu controller is found)
                candidate = f"{root}/{path.lstrip('/')}".rstrip("/") + "/cpu.stat"
                if "nr_throttled" in _read(candidate):
                    self.stat_path = candidate
            elif "cpu" in controllers.split(","):
                candidate = f"{root}/{controllers}/{path.lstrip('/')}".rstrip("/") + "/cpu.stat"
                if "nr_throttled" in _read(candidate):
                    self.stat_path = candidate
                    break

    def throttled(self) -> int:
        """Periods in which the cgroup ran out of its CPU quota, so far."""
        for line in _read(self.stat_path).splitlines():
            name, _, value = line.partition(" ")
            if name == "nr_throttled":
                return int(value)
        return 0
