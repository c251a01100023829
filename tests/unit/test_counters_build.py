"""Which build of the counters runs (agent/core/compiled.py): they are compiled by mypyc in one
build with the tunnel framing (tests/unit/test_tunnel_build.py), used when it was made from
the sources beside it, else all of them run as Python with one warning; PINION_PURE_PYTHON=1
forces Python; and the tests of the counters, of what renders them and of the relay that
drives them pass on the Python module too (run here in a child pytest with that setting)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.core import compiled, counters, telemetry, tunnel

REPO = Path(__file__).resolve().parents[2]
CORE = REPO / "agent" / "core"
BUILT = compiled.is_compiled(counters)
needs_build = pytest.mark.skipif(not BUILT and not os.environ.get("CI"),
                                 reason="not built here: pip install -e . builds it")
COUNTER_TESTS = ["tests/unit/test_telemetry.py", "tests/unit/test_metrics.py",
                 "tests/unit/test_relay.py", "tests/unit/test_authority_label.py",
                 "tests/unit/test_counters.py", "tests/unit/test_http1_tally.py"]


def test_this_process_runs_the_build_it_was_asked_for() -> None:
    if os.environ.get(compiled.PURE_PYTHON_ENV) == "1":
        assert compiled.counters_build() == "python"
    elif os.environ.get("CI"):  # `make venv` builds it: in CI a missing build is a failure
        assert compiled.counters_build() == "compiled (mypyc)"
    assert compiled.is_compiled(counters) == compiled.is_compiled(tunnel)  # never mixed
    assert telemetry.HttpCounters is counters.HttpCounters  # telemetry hands out this build's


def copy_of_core(tmp_path: Path) -> Path:
    """The compiled sources and this tree's build of them, in a directory of their own."""
    directory = tmp_path / "core"
    directory.mkdir()
    for module in compiled.COMPILED_MODULES:
        shutil.copy2(CORE / f"{module}.py", directory)
    for build in CORE.glob(compiled.PREFIX + "*"):  # the shared library, the shims' directory
        (shutil.copytree if build.is_dir() else shutil.copy2)(build, directory / build.name)
    return directory


@needs_build
def test_the_build_of_these_sources_holds_the_counters(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    finder = compiled.CompiledModuleFinder(str(copy_of_core(tmp_path)))
    spec = finder.find_spec("agent.core.counters")
    assert spec is not None and spec.origin is not None
    origin = Path(spec.origin)
    assert origin.parent.name == compiled.shim_directory(compiled.source_digest())
    assert origin.name.startswith("counters.")
    assert finder.find_spec("agent.core.telemetry") is None  # stays Python
    assert not caplog.records


@needs_build
def test_an_edited_counters_source_runs_as_python_with_the_tunnel_framing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = copy_of_core(tmp_path)
    with open(directory / "counters.py", "a") as source:
        source.write("\nEDITED = True\n")
    finder = compiled.CompiledModuleFinder(str(directory))
    with caplog.at_level(logging.WARNING, logger="agent.core.compiled"):
        assert finder.find_spec("agent.core.counters") is None  # the .py is loaded...
        assert finder.find_spec("agent.core.tunnel") is None  # ...for every module of the build
    (warning,) = caplog.records  # said once
    assert "no complete build of the sources" in warning.getMessage()
    assert "counters.py" in warning.getMessage()


@needs_build
def test_an_edited_tree_runs_its_python_counters_and_says_so(tmp_path: Path) -> None:
    """End to end, in a fresh interpreter: a copy of the package with its in-place build and
    an edited counters.py imports the edited source."""
    tree = tmp_path / "tree"
    shutil.copytree(REPO / "agent", tree / "agent", ignore=shutil.ignore_patterns("__pycache__"))
    with open(tree / "agent" / "core" / "counters.py", "a") as source:
        source.write("\nEDITED = True\n")
    run = subprocess.run([sys.executable, "-c", "from agent.core import compiled, counters; "
                          "print(counters.EDITED, compiled.counters_build())"],
                         env={**os.environ, "PYTHONPATH": str(tree)}, cwd=tmp_path,
                         capture_output=True, text=True, timeout=60, check=True)
    assert run.stdout.split() == ["True", "python"]
    assert run.stderr.count("no complete build of the sources") == 1, run.stderr


def test_pinion_pure_python_forces_the_python_counters() -> None:
    run = subprocess.run([sys.executable, "-c", "from agent.core import compiled, telemetry; "
                          "print(compiled.counters_build(), compiled.is_compiled(telemetry))"],
                         env={**os.environ, compiled.PURE_PYTHON_ENV: "1"}, cwd=REPO,
                         capture_output=True, text=True, timeout=60, check=True)
    assert run.stdout.split() == ["python", "False"] and not run.stderr


@needs_build
def test_the_counters_tests_pass_on_the_python_module_too() -> None:
    """This process runs them on the compiled build; a child pytest on the Python one."""
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          *COUNTER_TESTS, __file__ + "::test_this_process_runs_the_build_it_was_asked_for"],
                         env={**os.environ, compiled.PURE_PYTHON_ENV: "1"}, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]
