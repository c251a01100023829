"""The C head scanner and body walker of the HTTP/1 fast path (csrc/h1scan.c) under libFuzzer with ASan and
UBSan: a bounded run on every test run (about 20 s), from a seed corpus of real heads.
A longer run and how to repeat it: docs/fastpath.md."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.emulation import EMULATION

REPO = Path(__file__).resolve().parents[2]
SEEDS = {
    "request": b"GET /a?b=c HTTP/1.1\r\nHost: svc\r\nContent-Length: 2\r\n\r\nabPOST /x HTTP/1.1\r\n\r\n",
    "response": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcHTTP/1.1 503 x\r\nContent-Length: 0\r\n\r\n",
    "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n00A\r\n0123456789\r\n"
               b"0\r\n\r\nHTTP/1.1 404 x\r\nContent-Length: 1\r\n\r\nz",
    "chunked_request": b"PUT /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n",
}


@pytest.fixture(scope="module")
def fuzzer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    clang = shutil.which("clang")
    if clang is None:
        if os.environ.get("CI"):
            pytest.fail("clang is missing: `make deps` installs it")
        pytest.skip("clang is not installed")
    binary = tmp_path_factory.mktemp("fuzz") / "fuzz_h1scan"
    subprocess.run([clang, "-g", "-O1", "-fsanitize=fuzzer,address,undefined",
                    "-fno-sanitize-recover=undefined", str(REPO / "csrc/fuzz_h1scan.c"),
                    str(REPO / "csrc/h1scan.c"), "-o", str(binary)], check=True, timeout=120)
    return binary


def test_the_head_scanner_survives_a_bounded_fuzz_run(fuzzer: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, seed in SEEDS.items():
        (corpus / name).write_bytes(seed)
    environment = dict(os.environ)
    if EMULATION is not None:
        # LeakSanitizer cannot stop the world under qemu-user (a fatal error at exit, after every
        # input ran): ASan and UBSan still check each input; leaks are checked natively.
        environment["ASAN_OPTIONS"] = "detect_leaks=0"
    run = subprocess.run([str(fuzzer), "-max_total_time=20", "-rss_limit_mb=512", "-max_len=4096",
                          f"-artifact_prefix={tmp_path}/", str(corpus)],
                         capture_output=True, text=True, timeout=120, env=environment)
    assert run.returncode == 0, run.stderr[-4000:]
    done = [line for line in run.stderr.splitlines() if line.startswith("Done ")]
    assert done and int(done[-1].split()[1]) > 10_000, run.stderr[-2000:]  # it really ran
