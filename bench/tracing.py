"""Tracers around one benchmark run, for the scripts that profile the agents under the
yardstick's loads (bench/paced_split.py, bench/h2grpc.py). Standard library only."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable


def strace_calls(pids: Iterable[int], output: str, run: Callable[[], object]) -> dict[str, int]:
    """System calls by name (`strace -c -f`, its table kept in `output`) of `pids` during
    `run()`. strace slows what it traces: count calls with it, never time them."""
    command = ["strace", "-c", "-f", "-o", output]
    for pid in pids:
        command += ["-p", str(pid)]
    tracer = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)  # attached
        run()
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(timeout=60)
    calls: dict[str, int] = {}
    with open(output) as table:
        for line in table:
            fields = line.split()
            if len(fields) >= 5 and fields[0][0].isdigit() and fields[-1] != "total":
                calls[fields[-1]] = int(fields[3])
    return calls


def pyspy(binary: str, outputs: dict[int, str], seconds: float, rate: int,
          run: Callable[[], object]) -> None:
    """`py-spy record --native -f raw` (collapsed stacks) of each pid into its file, for
    `seconds` (+1), while `run()` runs."""
    for output in outputs.values():
        os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    spies = [subprocess.Popen([binary, "record", "--native", "-r", str(rate), "-f", "raw",
                               "-d", str(int(seconds) + 1), "-p", str(pid), "-o", output],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for pid, output in outputs.items()]
    time.sleep(1.0)  # attached
    try:
        run()
    finally:
        for spy in spies:
            spy.wait(timeout=120)
