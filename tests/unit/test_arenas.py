"""agent._arenas (csrc/arenas.c): the free pools a burst leaves inside pymalloc's arenas are
given back, while a few objects made during the burst keep those arenas alive; the pools work
as before when taken again. Each case runs in a fresh interpreter, whose memory is its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

if not os.environ.get("CI"):  # in CI the extension must be there: `make venv` builds it
    pytest.importorskip("agent._arenas", reason="not built: pip install -e . builds it")

BURST = textwrap.dedent("""
    import gc, json, sys
    import agent  # records the arenas from here on
    import agent._arenas as arenas
    from agent.memory import release_free_pools, resident_bytes

    out = {"watching": arenas.watch()}
    burst = [(i, float(i), str(i), [i]) for i in range(200_000)]  # ~50 MiB of small objects
    out["arenas"] = arenas.arenas()[0]
    pins = burst[::1000]  # a few made mid-burst outlive it: every arena stays
    del burst
    gc.collect()
    out["before"] = resident_bytes()
    out["released"] = release_free_pools()
    out["after"] = resident_bytes()
    out["again"] = release_free_pools()  # nothing more: released pools are marked
    for _ in range(3):  # the released pools taken again, by every size class used above
        burst = [(i, float(i), str(i), [i]) for i in range(200_000)]
        assert all(t == (i, float(i), str(i), [i]) for i, t in enumerate(burst))
        del burst
        gc.collect()
        out.setdefault("rounds", []).append(release_free_pools())
    out["pins"] = all(p == (p[0], float(p[0]), str(p[0]), [p[0]]) for p in pins)
    print(json.dumps(out))
""")


def run(code: str, **env: str) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env}, check=True)
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_a_burst_s_free_pools_are_given_back_though_objects_it_made_live_on() -> None:
    out = run(BURST)
    assert out["watching"] is True
    assert isinstance(out["arenas"], int) and out["arenas"] >= 30  # the burst's arenas, recorded
    before, released, after = out["before"], out["released"], out["after"]
    assert isinstance(before, int) and isinstance(released, int) and isinstance(after, int)
    assert released >= 20 * 2**20, released  # 3/4 of each free pool (its first page stays)
    assert before - after >= released * 0.9, (before, after, released)  # resident no more
    assert out["again"] == 0
    rounds = out["rounds"]
    assert isinstance(rounds, list) and all(r >= 20 * 2**20 for r in rounds)  # reused, freed again
    assert out["pins"] is True  # the objects that lived through it all are intact


def test_without_pymalloc_nothing_is_recorded_or_touched() -> None:
    """PYTHONMALLOC=malloc: no pools; `watch` says so and `release` gives back nothing."""
    out = run("import json, agent._arenas as a; print(json.dumps([a.watch(), a.release(), a.arenas()]))",
              PYTHONMALLOC="malloc")
    assert out == [False, 0, [0, 0]]


THREAD_FRAMES = textwrap.dedent("""
    import json, threading
    import agent  # records from here on
    from agent.memory import release_free_pools

    # CPython takes its frames' stack chunks from the arena allocator too: a thread parked
    # deep in calls keeps live frames there, which a release must never touch
    parked, go, results = threading.Barrier(5), threading.Event(), []

    def deep(n, total=0):
        if n == 0:
            parked.wait()
            go.wait()
            return total
        local = [n, str(n)]
        return deep(n - 1, total + local[0] + len(local[1]))

    threads = [threading.Thread(target=lambda: results.append(deep(400))) for _ in range(4)]
    for thread in threads:
        thread.start()
    parked.wait()
    for _ in range(5):
        release_free_pools()
    go.set()
    for thread in threads:
        thread.join()
    print(json.dumps(results))
""")


def test_live_frames_of_parked_threads_are_never_given_back() -> None:
    """The agent crashed at exit (SIGSEGV, `pinion demo` in iptables mode) while the arena
    recorder also took the frames' stack chunks for arenas: only 1 MiB arenas are recorded."""
    expected = sum(n + len(str(n)) for n in range(1, 401))
    assert run(THREAD_FRAMES) == [expected] * 4  # type: ignore[comparison-overlap]
