"""A bounded libFuzzer run (ASan + UBSan) over pinion-cni's parsers of untrusted bytes (the
network config on stdin, CNI_ARGS, the agent's reply), from the checked-in corpus: any crash,
undefined behaviour, leak, or JSON we produce that does not parse again (cni/fuzz.c) fails
the suite. `make fuzz-cni FUZZ_SECONDS=600` runs it longer."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.emulation import EMULATION

CNI = Path(__file__).resolve().parents[2] / "cni"


def test_the_cni_plugins_parsers_survive_a_fuzz_run(tmp_path: Path) -> None:
    if shutil.which("clang") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("clang is needed for pinion-cni's fuzz run (make deps)")
        pytest.skip("clang is needed for pinion-cni's fuzz run")
    binary = tmp_path / "fuzz"
    subprocess.run(["clang", "-g", "-O1", "-fsanitize=fuzzer,address,undefined", str(CNI / "fuzz.c"),
                    str(CNI / "cnicore.c"), str(CNI / "cnijson.c"), "-lm", "-o", str(binary)],
                   check=True, capture_output=True, timeout=120)
    corpus = tmp_path / "corpus"
    shutil.copytree(CNI / "corpus", corpus)
    environment = dict(os.environ)
    if EMULATION is not None:
        # LeakSanitizer stops the world with thread access qemu-user does not emulate: it dies
        # at exit after every input ran. ASan and UBSan still check each input; leaks are
        # checked natively (make test). As tests/unit/test_keeper_fuzz.py does.
        environment["ASAN_OPTIONS"] = "detect_leaks=0"
    result = subprocess.run([str(binary), "-runs=200000", "-max_total_time=60", str(corpus)],
                            capture_output=True, text=True, timeout=180, env=environment)
    assert result.returncode == 0, result.stderr[-4000:]
    done = re.search(r"Done (\d+) runs", result.stderr)
    assert done is not None and int(done.group(1)) >= 10_000, result.stderr[-2000:]
