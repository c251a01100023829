"""pinion-cni's own start: wall time of `CNI_COMMAND=VERSION` (no agent, no stdin), called
directly as a container runtime calls it, the C binary and the Python reference interleaved.

    flock /tmp/pinion-bench.lock .venv/bin/python bench/cni_start.py [--calls 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNTIME_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    calls = max(1, min(parser.parse_args().calls, 2000))  # bounded
    plugins = {"C (cni/pinion-cni)": [str(REPO / "cni" / "pinion-cni")],
               "Python reference (/usr/bin/python3)": ["/usr/bin/python3",
                                                       str(REPO / "cni" / "pinion_cni_reference.py")]}
    env = {"CNI_COMMAND": "VERSION", "PATH": RUNTIME_PATH}
    samples: dict[str, list[float]] = {name: [] for name in plugins}
    for _ in range(calls):
        for name, argv in plugins.items():
            started = time.perf_counter()
            subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, check=True, timeout=10)
            samples[name].append((time.perf_counter() - started) * 1000)
    print("| plugin | median ms | p90 ms |\n| --- | ---: | ---: |")
    for name, times in samples.items():
        times.sort()
        print(f"| {name} | {statistics.median(times):.2f} | {times[int(len(times) * 0.9)]:.2f} |")
    print(f"\n{calls} calls each, interleaved; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
