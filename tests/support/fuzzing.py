"""A bounded libFuzzer run (ASan + UBSan) of a harness built with clang, from a checked-in
corpus, as the suite's fuzz tests do it: the run must end cleanly after enough inputs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.emulation import EMULATION


def fuzz_run(tmp_path: Path, sources: list[Path], corpus: Path, what: str, runs: int,
             defines: tuple[str, ...] = (), libs: tuple[str, ...] = ()) -> None:
    """Build `sources` with -fsanitize=fuzzer,address,undefined and run it for at most
    `runs` inputs or 60 s; fails on a crash, a sanitizer report or fewer than 10,000 runs."""
    if shutil.which("clang") is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"clang is needed for {what}'s fuzz run (make deps)")
        pytest.skip(f"clang is needed for {what}'s fuzz run")
    binary = tmp_path / "fuzz"
    subprocess.run(["clang", "-g", "-O1", "-fsanitize=fuzzer,address,undefined", *defines,
                    *map(str, sources), *libs, "-o", str(binary)],
                   check=True, capture_output=True, timeout=120)
    copy = tmp_path / "corpus"
    shutil.copytree(corpus, copy)
    environment = dict(os.environ)
    if EMULATION is not None:
        # LeakSanitizer stops the world with thread access qemu-user does not emulate: it dies
        # at exit after every input ran. ASan and UBSan still check each input; leaks are
        # checked natively (make test).
        environment["ASAN_OPTIONS"] = "detect_leaks=0"
    result = subprocess.run([str(binary), f"-runs={runs}", "-max_total_time=60", str(copy)],
                            capture_output=True, text=True, timeout=180, env=environment)
    assert result.returncode == 0, result.stderr[-4000:]
    done = re.search(r"Done (\d+) runs", result.stderr)
    assert done is not None and int(done.group(1)) >= 10_000, result.stderr[-2000:]
