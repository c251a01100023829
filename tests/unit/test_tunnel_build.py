"""Which build of the tunnel framing runs (agent/core/compiled.py): the mypyc build when it
was made from the sources beside it, else the Python sources with one warning, never a
build of other sources; PINION_PURE_PYTHON=1 forces Python; and the tunnel's tests pass on
the Python modules too (run here in a child pytest with that setting). The counters are
compiled in the same build: tests/unit/test_counters_build.py."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.core import compiled, tunnel

REPO = Path(__file__).resolve().parents[2]
CORE = REPO / "agent" / "core"
BUILT = compiled.is_compiled(tunnel)
needs_build = pytest.mark.skipif(not BUILT and not os.environ.get("CI"),
                                 reason="not built here: pip install -e . builds it")
TUNNEL_TESTS = ["tests/unit/test_tunnel.py", "tests/unit/test_tunnel_properties.py",
                "tests/unit/test_tunnel_moves.py", "tests/unit/test_tunnel_shell.py"]


def test_this_process_runs_the_build_it_was_asked_for() -> None:
    if os.environ.get(compiled.PURE_PYTHON_ENV) == "1":
        assert compiled.tunnel_build() == "python"
    elif os.environ.get("CI"):  # `make venv` builds it: in CI a missing build is a failure
        assert compiled.tunnel_build() == "compiled (mypyc)"
    from agent.core import tunnel_frames
    assert compiled.is_compiled(tunnel_frames) == compiled.is_compiled(tunnel)  # never mixed


def copy_of_core(tmp_path: Path) -> Path:
    """The compiled sources and this tree's builds of them, in a directory of their own."""
    directory = tmp_path / "core"
    directory.mkdir()
    for module in compiled.COMPILED_MODULES:
        shutil.copy2(CORE / f"{module}.py", directory)
    for build in CORE.glob(compiled.PREFIX + "*"):  # the shared library, and the shims' directory
        (shutil.copytree if build.is_dir() else shutil.copy2)(build, directory / build.name)
    return directory


@needs_build
def test_a_build_of_these_sources_is_chosen(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    finder = compiled.CompiledModuleFinder(str(copy_of_core(tmp_path)))
    spec = finder.find_spec("agent.core.tunnel")
    assert spec is not None and spec.origin is not None
    origin = Path(spec.origin)
    assert origin.parent.name == compiled.shim_directory(compiled.source_digest())
    assert origin.name.startswith("tunnel.")
    assert finder.find_spec("agent.core.connections") is None  # nothing else is its business
    assert not caplog.records


@needs_build
def test_a_build_missing_a_shim_is_not_loaded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = copy_of_core(tmp_path)
    (shim,) = (directory / compiled.shim_directory(compiled.source_digest())).glob("tunnel_frames.*")
    shim.unlink()
    assert compiled.CompiledModuleFinder(str(directory)).find_spec("agent.core.tunnel") is None
    assert len(caplog.records) == 1


@needs_build
def test_an_edited_source_is_never_shadowed_by_its_old_build(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = copy_of_core(tmp_path)
    with open(directory / "tunnel.py", "a") as source:
        source.write("\nEDITED = True\n")
    finder = compiled.CompiledModuleFinder(str(directory))
    with caplog.at_level(logging.WARNING, logger="agent.core.compiled"):
        assert finder.find_spec("agent.core.tunnel_frames") is None  # the .py is loaded...
        assert finder.find_spec("agent.core.tunnel") is None  # ...for both modules
    (warning,) = caplog.records  # said once
    assert "no complete build of the sources" in warning.getMessage() and "tunnel.py" in warning.getMessage()


@needs_build
def test_an_edited_tree_runs_its_python_and_says_so(tmp_path: Path) -> None:
    """End to end, in a fresh interpreter: a copy of the package with its in-place build and
    one edited source imports the edited source."""
    tree = tmp_path / "tree"
    shutil.copytree(REPO / "agent", tree / "agent", ignore=shutil.ignore_patterns("__pycache__"))
    with open(tree / "agent" / "core" / "tunnel.py", "a") as source:
        source.write("\nEDITED = True\n")
    run = subprocess.run([sys.executable, "-c", "from agent.core import compiled, tunnel; "
                          "print(tunnel.EDITED, compiled.tunnel_build())"],
                         env={**os.environ, "PYTHONPATH": str(tree)}, cwd=tmp_path,
                         capture_output=True, text=True, timeout=60, check=True)
    assert run.stdout.split() == ["True", "python"]
    assert run.stderr.count("no complete build of the sources") == 1, run.stderr


def test_pinion_pure_python_forces_the_python_modules() -> None:
    run = subprocess.run([sys.executable, "-c", "from agent.core import compiled, tunnel_frames, tunnel; "
                          "print(compiled.tunnel_build(), compiled.is_compiled(tunnel_frames))"],
                         env={**os.environ, compiled.PURE_PYTHON_ENV: "1"}, cwd=REPO,
                         capture_output=True, text=True, timeout=60, check=True)
    assert run.stdout.split() == ["python", "False"] and not run.stderr


@needs_build
def test_the_tunnel_tests_pass_on_the_python_modules_too() -> None:
    """This process runs them on the compiled build; a child pytest on the Python one."""
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          *TUNNEL_TESTS, __file__ + "::test_this_process_runs_the_build_it_was_asked_for"],
                         env={**os.environ, compiled.PURE_PYTHON_ENV: "1"}, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]
