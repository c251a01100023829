"""A lab agent in memory and CPU limits of its own, as a DaemonSet's resources.limits would
put it: cgroup v1 `memory` and `cpu` controllers where mounted, else v2 (bench/overload.py,
tests/netns/test_budget_pacing.py)."""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path

from agent.lab.agents import LabAgent


class Cgroup:
    """The agent's memory and CPU limits: cgroup v1 controllers if mounted, else v2."""

    def __init__(self, name: str, memory_bytes: int, cpu: float, period: float = 0.1) -> None:
        """`cpu` cores' worth of each CFS `period` (seconds; 0.1 is the kernel's and
        Kubernetes' default): the group runs `cpu * period` seconds of it, then waits."""
        period_us = int(period * 1_000_000)
        self.v1 = Path("/sys/fs/cgroup/memory").is_dir() and Path("/sys/fs/cgroup/cpu").is_dir()
        if self.v1:
            self.memory = Path("/sys/fs/cgroup/memory") / name
            self.cpu = Path("/sys/fs/cgroup/cpu") / name
            for path in (self.memory, self.cpu):
                path.mkdir()
            (self.memory / "memory.limit_in_bytes").write_text(str(memory_bytes))
            with contextlib.suppress(OSError):  # no swap here, but say so if there were
                (self.memory / "memory.memsw.limit_in_bytes").write_text(str(memory_bytes))
            (self.cpu / "cpu.cfs_period_us").write_text(str(period_us))
            (self.cpu / "cpu.cfs_quota_us").write_text(str(int(cpu * period_us)))
        else:
            self.memory = self.cpu = Path("/sys/fs/cgroup") / name
            self.memory.mkdir()
            (self.memory / "memory.max").write_text(str(memory_bytes))
            (self.memory / "cpu.max").write_text(f"{int(cpu * period_us)} {period_us}")

    def usage(self) -> int:
        name = "memory.usage_in_bytes" if self.v1 else "memory.current"
        return int((self.memory / name).read_text())

    def peak(self) -> int:
        name = "memory.max_usage_in_bytes" if self.v1 else "memory.peak"
        return int((self.memory / name).read_text())

    def reset_peak(self) -> bool:
        """Start peak() over; False where the kernel cannot (cgroup v2's memory.peak takes a
        write only since Linux 6.12: before, it is the peak since the group was made)."""
        try:
            (self.memory / ("memory.max_usage_in_bytes" if self.v1 else "memory.peak")).write_text("0")
        except OSError:
            return False
        return True

    def anon(self) -> int:
        stat = dict(line.split() for line in (self.memory / "memory.stat").read_text().splitlines())
        return int(stat.get("rss" if self.v1 else "anon", 0))

    def kernel(self) -> int:
        """Kernel memory charged to the group (v1: memory.kmem.usage_in_bytes; v2: the
        kernel-side counters of memory.stat)."""
        if self.v1:
            with contextlib.suppress(OSError):
                return int((self.memory / "memory.kmem.usage_in_bytes").read_text())
            return 0
        stat = dict(line.split() for line in (self.memory / "memory.stat").read_text().splitlines())
        return sum(int(stat.get(k, 0)) for k in ("kernel", "sock")) or int(stat.get("slab", 0))

    def oom_kills(self) -> int:
        if self.v1:
            text = (self.memory / "memory.oom_control").read_text()
        else:
            text = (self.memory / "memory.events").read_text()
        match = re.search(r"oom_kill (\d+)", text)
        return int(match.group(1)) if match else 0

    def remove(self) -> None:
        for path in {self.memory, self.cpu}:
            for _ in range(50):
                try:
                    path.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)


class LimitedAgent(LabAgent):
    """Started inside the cgroup (a v1 group charges only what is allocated after joining)."""

    cgroup: Cgroup

    def argv(self) -> list[str]:
        joins = "; ".join(f"echo $$ > {path}/cgroup.procs"
                          for path in sorted({str(self.cgroup.memory), str(self.cgroup.cpu)}))
        return ["/bin/sh", "-c", f'{joins}; exec "$@"', "sh", *super().argv()]
