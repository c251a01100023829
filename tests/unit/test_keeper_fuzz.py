"""A bounded libFuzzer run (ASan + UBSan) over the C keeper's request handling, from the
checked-in corpus: any crash, leak of a descriptor, or broken invariant (keeper/fuzz.c) fails
the suite. `make fuzz-keeper FUZZ_SECONDS=600` runs it longer."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.emulation import EMULATION

KEEPER = Path(__file__).resolve().parents[2] / "keeper"


def test_the_keeper_survives_a_fuzz_run(tmp_path: Path) -> None:
    if shutil.which("clang") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("clang is needed for the keeper's fuzz run (make deps)")
        pytest.skip("clang is needed for the keeper's fuzz run")
    binary = tmp_path / "fuzz"
    subprocess.run(["clang", "-g", "-O1", "-fsanitize=fuzzer,address,undefined",
                    "-DKEEPER_FUZZING", str(KEEPER / "fuzz.c"), str(KEEPER / "keeper.c"),
                    "-o", str(binary)], check=True, capture_output=True, timeout=120)
    corpus = tmp_path / "corpus"
    shutil.copytree(KEEPER / "corpus", corpus)
    environment = dict(os.environ)
    if EMULATION is not None:
        # LeakSanitizer stops the world with ptrace-like thread access that qemu-user does not
        # emulate: at exit it dies with a fatal error of its own, after every input has run.
        # ASan and UBSan still check each input; leaks are checked natively (make test).
        environment["ASAN_OPTIONS"] = "detect_leaks=0"
    result = subprocess.run([str(binary), "-runs=300000", "-max_total_time=60", str(corpus)],
                            capture_output=True, text=True, timeout=180, env=environment)
    assert result.returncode == 0, result.stderr[-4000:]
    done = re.search(r"Done (\d+) runs", result.stderr)
    assert done is not None and int(done.group(1)) >= 10_000, result.stderr[-2000:]
