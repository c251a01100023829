"""The agent's connection budget: how many relayed connections the whole agent holds at once.

Each relayed connection costs the agent ~12 KiB (a relay, its two transports, an observer,
for a while a connect task). An agent that cannot keep up — a Pi's CPU, a burst of new
connections — would otherwise accept as fast as connections arrive and grow until its
memory cgroup kills it (issue #21: +50 MiB in two seconds at 0.2 CPU). At `limit` the agent
stops taking new work instead: the pods' listeners stop accepting (connections wait in the
kernel's backlog, as they do while an agent restarts) and new tunnel streams into this node
are refused (REFUSED_STREAM: they never reached the destination, and the client's agent
tries again after a pause, a few times, before it gives up); once the count is back under
`resume_at`, both resume. Tunnel connections are still read: the streams already open on
them need their bytes to finish, and finishing is what gives the budget back.

While the CPU is what limits the agent, the budget is also *paced* by what it serves
(Little's law: connections in the agent = the rate it completes them * the time each
spends there): new connections beyond `served_rate * TARGET_WAIT` would only queue inside
the agent, each costing memory for no throughput, so they wait in the kernel's backlog
instead. Connections open longer than `SETTLE_SECONDS` (long-lived, mostly idle: a
database pool, a websocket) are not paced, only counted against the memory-sized limit.

`RelaySet` is a pod's set of relays that keeps the count: the proxies add a relay when it is
accepted and the relay discards itself when it is counted closed, exactly once each."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.dataplane.relay import Relay

log = logging.getLogger(__name__)

DEFAULT_MAX_CONNECTIONS = 4096  # with no memory limit to size it by
# measured (bench/overload.py, cgroup v1 with kernel memory): ~13 KiB of heap and 9-20 KiB of
# kernel memory (socket slabs) per relayed connection
CONNECTION_BYTES = 40 * 1024
MIN_CONNECTIONS = 64
HEADROOM_BYTES = 4 * 1024 * 1024  # for a scrape, a burst of pods, the allocator's slack
# The event loop this late on a 100 ms tick, several ticks running: the CPU is the limit
LAG_BUSY_SECONDS = 0.05
LAG_BUSY_TICKS = 3
CPU_SHRINK_EVERY = 1.0  # seconds between two shrinks while the CPU stays the limit
# Pacing (Little's law), while the CPU is or lately was the limit: young connections held at
# most the rate the agent completes them times this wait; 0.2 CPU completing ~600 a second
# under bench/overload.py's 2x load so holds the floor, 64, not the ~300 its memory allows.
TARGET_WAIT = 0.1
PACE_HOLD_SECONDS = 30.0  # pacing lasts this long after the CPU was last the limit (a burst
# often comes back; the pace follows what is served, so a lasting one costs little)
SETTLE_SECONDS = 5  # a connection open this long is long-lived: counted, not paced
RATE_WINDOW = 1.0  # seconds over which the completion rate is measured
RATE_DECAY = 0.9  # per window: the rate kept is the best lately seen, fading as it ages
_SLOTS = 8  # one-second slots of young connections (> SETTLE_SECONDS + 1)


def sized_for(limit: int | None, in_use: int) -> int:
    """How many connections fit in what the memory limit leaves (85 % of it, less what the
    agent uses at start and some headroom): a 48 MiB agent starts at ~300, a 256 MiB one at
    ~4,500. Memory pressure then adjusts it (`shrink`, `grow`)."""
    if limit is None:
        return DEFAULT_MAX_CONNECTIONS
    room = int(limit * 0.85) - in_use - HEADROOM_BYTES
    return max(MIN_CONNECTIONS, min(16384, room // CONNECTION_BYTES))


class ConnectionBudget:
    __slots__ = ("_busy_at", "_lagging", "_on_pause", "_on_resume", "_served", "_shrunk_at",
                 "_window_at", "_young", "_young_epoch", "allowed", "ceiling", "cpu_busy",
                 "exhausted", "limit", "live", "paced", "pauses", "pressure", "resume_at",
                 "served_rate", "young")

    def __init__(self, limit: int = DEFAULT_MAX_CONNECTIONS, resume_fraction: float = 0.75) -> None:
        self.limit = self.ceiling = self.allowed = self.paced = limit
        self.resume_at = int(limit * resume_fraction)
        self.live = 0
        self.young = 0  # of `live`, opened in the last SETTLE_SECONDS (by `taken(started)`)
        self._young = [0] * _SLOTS  # per second of opening, slot epoch % _SLOTS
        self._young_epoch = [-1] * _SLOTS
        self.served_rate = 0.0  # connections completed a second, the best lately seen
        self._served = 0  # completed since `_window_at`
        self._window_at: float | None = None
        self._busy_at = float("-inf")  # when the CPU was last the limit (lag, throttling)
        self.exhausted = False
        self.pressure = False  # the memory cgroup is nearly full (`agent.app` watches it)
        self.pauses = 0  # times the budget ran out (a counter on /metrics)
        self.cpu_busy = False  # the event loop has been running late: see `loop_lag`
        self._lagging = 0
        self._shrunk_at = float("-inf")
        self._on_pause: list[Callable[[], None]] = []
        self._on_resume: list[Callable[[], None]] = []

    def when_exhausted(self, pause: Callable[[], None], resume: Callable[[], None]) -> None:
        self._on_pause.append(pause)
        self._on_resume.append(resume)

    def taken(self, started: float | None = None) -> None:
        """A connection accepted; `started` (its time.monotonic()) makes it young until it
        has been open SETTLE_SECONDS: paced. Without it, it counts as long-lived."""
        self.live += 1
        if started is not None:
            epoch = int(started)
            slot = epoch % _SLOTS
            if self._young_epoch[slot] != epoch:  # a slot no tick expired: its ones settled
                self.young -= self._young[slot]
                self._young[slot], self._young_epoch[slot] = 0, epoch
            self._young[slot] += 1
            self.young += 1
        if not self.exhausted and self.live >= self.allowed:
            self._run_out(f"{self.live} connections open")

    def returned(self, started: float | None = None) -> None:
        self.live -= 1
        self._served += 1
        if started is not None:
            epoch = int(started)
            slot = epoch % _SLOTS
            if self._young_epoch[slot] == epoch and self._young[slot] > 0:
                self._young[slot] -= 1
                self.young -= 1
        if self.exhausted and self.live <= self.resume_at and not self.pressure:
            self._come_back()

    def _set_limit(self, limit: int) -> None:
        self.limit = limit
        self._enforce()

    def _enforce(self) -> None:
        """What is allowed now: the memory- and lag-set limit, or the pace if lower."""
        self.allowed = min(self.limit, self.paced)
        self.resume_at = int(self.allowed * 0.75)

    def under_pressure(self, pressure: bool) -> None:
        """The memory cgroup is nearly full (or no longer): out of budget whatever the count."""
        if pressure == self.pressure:
            return
        self.pressure = pressure
        if pressure and not self.exhausted:
            self._run_out("memory nearly full")
        elif not pressure and self.exhausted and self.live <= self.resume_at:
            self._come_back()

    def shrink(self) -> None:
        """Memory ran short at `live` connections: the budget is what fit, less a fifth."""
        self._set_limit(max(MIN_CONNECTIONS, min(self.limit, int(self.live * 0.8))))

    def loop_lag(self, lag: float, now: float) -> None:
        """The event loop ran `lag` seconds late on its last tick. Late several ticks
        running, the agent's CPU (a Pi's core, its cgroup's share) is what limits it:
        connections held beyond what it serves only wait inside it, costing memory (and,
        after the burst, heap left fragmented) for no throughput. So the budget is halved
        to what is open, at most once a second, down to the floor (a multiplicative
        decrease, as TCP's congestion window); what it sheds waits in the kernel's backlog
        or is moved by the client's agent. Room grows it back by a tenth (`grow`)."""
        self._lagging = self._lagging + 1 if lag >= LAG_BUSY_SECONDS else 0
        self.cpu_busy = self._lagging >= LAG_BUSY_TICKS
        if self.cpu_busy:
            self._busy_at = now
        if self.cpu_busy and now - self._shrunk_at >= CPU_SHRINK_EVERY and self.live > MIN_CONNECTIONS:
            self._shrunk_at = now
            self._set_limit(max(MIN_CONNECTIONS, min(self.limit, self.live // 2)))
        self._pace(now)

    def cpu_throttled(self, now: float) -> None:
        """The agent's cpu cgroup ran out of its quota since the last tick: its CPU is the
        limit, whether or not the loop shows it yet (a closed loop of a few clients keeps it
        on time): pace."""
        self._busy_at = now

    def _pace(self, now: float) -> None:
        """Once a RATE_WINDOW: the completion rate measured, young connections aged, and
        the pace set (while the CPU is or lately was the limit: `served_rate *
        TARGET_WAIT` young connections, at least the floor, plus the long-lived ones)."""
        if self._window_at is None:
            self._window_at = now
            return
        elapsed = now - self._window_at
        if elapsed < RATE_WINDOW:
            return
        self.served_rate = max(self._served / elapsed, self.served_rate * RATE_DECAY)
        self._served, self._window_at = 0, now
        oldest = int(now) - SETTLE_SECONDS
        for slot, epoch in enumerate(self._young_epoch):
            if 0 <= epoch < oldest:
                self.young -= self._young[slot]
                self._young[slot], self._young_epoch[slot] = 0, -1
        if now - self._busy_at <= PACE_HOLD_SECONDS:
            settled = max(0, self.live - self.young)
            self.paced = min(self.ceiling, settled + max(MIN_CONNECTIONS,
                                                         int(self.served_rate * TARGET_WAIT)))
        else:
            self.paced = self.ceiling
        self._enforce()
        if self.exhausted and self.live <= self.resume_at and not self.pressure:
            self._come_back()

    def grow(self) -> None:
        """Memory has room again: a tenth more, up to where it started (or was set)."""
        self._set_limit(min(self.ceiling, self.limit + max(16, self.limit // 10)))

    def _run_out(self, why: str) -> None:
        self.exhausted = True
        self.pauses += 1
        log.warning("%s (%d connections): not accepting new ones for now", why, self.live)
        for pause in self._on_pause:
            pause()

    def _come_back(self) -> None:
        self.exhausted = False
        log.info("%d connections open: accepting again", self.live)
        for resume in self._on_resume:
            resume()


class RelaySet(set["Relay"]):
    """A pod's relays, counted against the agent's budget as they come and go. Typed as
    itself wherever it is used, never as a plain `set`: compiled code (mypyc, the relay)
    calls a `set`'s `add` and `discard` as C functions, passing these by."""

    __slots__ = ("budget",)

    def __init__(self, budget: ConnectionBudget | None = None) -> None:
        super().__init__()
        self.budget = budget

    def add(self, relay: Relay) -> None:
        if relay not in self:
            super().add(relay)
            if self.budget is not None:
                self.budget.taken(getattr(relay, "started", None))

    def discard(self, relay: object) -> None:
        if relay in self:
            super().discard(relay)
            if self.budget is not None:
                self.budget.returned(getattr(relay, "started", None))


def out_of_budget(relays: object) -> bool:
    """A pod's relay set says the agent's budget is out (see `RelaySet`)."""
    return isinstance(relays, RelaySet) and relays.budget is not None and relays.budget.exhausted
