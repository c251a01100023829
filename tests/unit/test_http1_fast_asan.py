"""The C glue of the HTTP/1 fast path (csrc/http1fast.c: the pending ring, the hand-over,
Records, the series' Tally and the relay's direct feed) under AddressSanitizer and UBSan: the
extension is compiled with them into a temporary file, loaded in a child interpreter in place
of the installed one, and driven by the differential tests of test_http1_fast.py (300
generated conversations, 200 byte soups) and test_http1_tally.py (the tally against the
counters, a relay on either path), the Host finder's tests and the authority / at_rest
scenarios. The libFuzzer run
(test_http1_fast_fuzz.py) covers the scanner, body walker and Host finder alone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def loading(name: str) -> str:
    """The start of a child script: the extension at sys.argv[1] imported as `name` (as
    `module`), in place of the installed one."""
    return textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("{name}", sys.argv[1])
        module = importlib.util.module_from_spec(spec)
        sys.modules["{name}"] = module
        spec.loader.exec_module(module)
    """)


CHILD = loading("agent.core._http1fast") + textwrap.dedent("""
    from agent.core import http1
    assert http1._Http1Fast is module.Http1Fast, "the instrumented build is not the one in use"
    from tests.unit import test_http1_fast as t
    t.test_fast_and_python_observers_count_the_same()
    t.test_byte_soup_counts_the_same()
    t.test_abandon_on_both_paths()
    t.test_a_chunk_extension_hands_over_mid_body()
    t.test_chunked_bodies_stay_on_the_fast_path_split_anywhere()
    t.test_common_messages_stay_on_the_fast_path_bodies_split_anywhere()
    t.test_the_c_host_finder_finds_what_the_python_one_finds()
    t.test_the_c_host_finder_cases()
    t.test_authority_on_the_fast_path_and_after_a_hand_over()
    t.test_at_rest_on_the_fast_path_and_after_a_hand_over()
    from tests.unit import test_http1_tally as tally
    tally.test_the_tally_counts_what_the_counters_count()
    tally.test_a_relay_counts_the_same_on_the_fast_path_and_in_python()
    print("instrumented run ok")
""")


def runtime(name: str) -> str:
    path = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True,
                          check=True).stdout.strip()
    if not os.path.isabs(path):  # gcc echoes the bare name when it has no such library
        pytest.fail(f"gcc has no {name}: `make deps` installs gcc with its sanitizer runtimes")
    return path


def instrumented(module: Path, sources: list[str], libraries: tuple[str, ...] = ()
                 ) -> dict[str, str]:
    """`sources` (under csrc/) built with ASan and UBSan into `module`; the environment a
    child interpreter loads it in (the sanitizers' runtimes preloaded, 300 examples for the
    generated tests)."""
    if shutil.which("gcc") is None:
        if os.environ.get("CI"):
            pytest.fail("gcc is missing: `make deps` installs it")
        pytest.skip("gcc is not installed")
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-g", "-fno-omit-frame-pointer",
                    "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                    f"-I{sysconfig.get_paths()['include']}",
                    *(str(REPO / "csrc" / source) for source in sources),
                    *(f"-l{library}" for library in libraries), "-o", str(module)],
                   check=True, timeout=120)
    return dict(os.environ, PYTHONPATH=str(REPO), PINION_DIFF_EXAMPLES="300",
                ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",  # the interpreter's own leaks
                LD_PRELOAD=f"{runtime('libasan.so')} {runtime('libubsan.so')}")


def test_the_c_glue_is_clean_under_asan_and_ubsan(tmp_path: Path) -> None:
    module = tmp_path / "_http1fast_asan.so"
    env = instrumented(module, ["http1fast.c", "h1scan.c"])
    run = subprocess.run([sys.executable, "-c", CHILD, str(module)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "instrumented run ok" in run.stdout
