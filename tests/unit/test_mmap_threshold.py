"""The agent fixes glibc's mmap threshold at start (agent.memory.fix_mmap_threshold), as
the DaemonSet's MALLOC_MMAP_THRESHOLD_ did: blocks of 128 KiB and more get mappings of their
own from then on, instead of the heap once one such block was freed. Seen from outside: a
200 KB block filled and freed again and again faults its pages in every time (a fresh
mapping each time) with the threshold fixed, and almost never without (the heap keeps it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from agent.memory import MMAP_THRESHOLD, fix_mmap_threshold

REPO = Path(__file__).resolve().parents[2]

_PROBE = r"""
import json, resource, sys
sys.path.insert(0, sys.argv[1])
from agent.memory import fix_mmap_threshold
fixed = fix_mmap_threshold() if sys.argv[2] == "fix" else None
blocks = [b"x" * 200_000 for _ in range(3)]  # freed: glibc's own threshold would rise here
del blocks
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):
    block = b"x" * 200_000  # 49 pages written
    del block
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps({"fixed": fixed, "faults": (after - before) / 200}))
"""


def _probe(mode: str, **environment: str) -> dict[str, object]:
    env = {key: value for key, value in os.environ.items() if key != "MALLOC_MMAP_THRESHOLD_"}
    run = subprocess.run([sys.executable, "-c", _PROBE, str(REPO), mode], capture_output=True,
                         text=True, timeout=60, env={**env, **environment}, check=True)
    result: dict[str, object] = json.loads(run.stdout.strip().splitlines()[-1])
    return result


def test_blocks_above_the_threshold_get_mappings_of_their_own() -> None:
    fixed = _probe("fix")
    assert fixed["fixed"] is True
    assert isinstance(fixed["faults"], float) and fixed["faults"] >= 40  # a fresh mapping each time
    glibc = _probe("leave")  # the control: glibc's own threshold rose past the block
    assert isinstance(glibc["faults"], float) and glibc["faults"] < 5


def test_an_operators_own_setting_is_left_as_glibc_applied_it() -> None:
    assert fix_mmap_threshold({"MALLOC_MMAP_THRESHOLD_": "1048576"}) is False
    probe = _probe("fix", MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    assert probe["fixed"] is False
    assert isinstance(probe["faults"], float) and probe["faults"] < 5  # 1 MiB: the heap serves it


def test_the_daemonset_leaves_it_to_the_agent() -> None:
    """One place sets it: an environment variable there would make the agent step aside."""
    assert "MALLOC_MMAP_THRESHOLD_" not in (REPO / "deploy" / "daemonset.yaml").read_text()
    assert MMAP_THRESHOLD == 131072  # the value the DaemonSet set
