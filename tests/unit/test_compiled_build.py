"""Which build of the mypyc-compiled modules runs (agent/core/compiled.py): the tunnel framing,
the counters, the relay and the tunnel shell are one build, used when it was made from the
sources it compiles, else all of them run as Python with one warning, never a build of other
sources; PINION_PURE_PYTHON=1 forces Python; and the tests of every compiled module pass on
the Python modules too (run here in a child pytest with that setting)."""

from __future__ import annotations

import importlib
import importlib.machinery
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.core import compiled, counters, telemetry

from . import test_layers

REPO = Path(__file__).resolve().parents[2]
AGENT = REPO / "agent"
MODULES = [f"agent.{module}" for module in compiled.COMPILED_MODULES]
for _name in MODULES:  # every one of them, so this process shows which build each one is
    importlib.import_module(_name)
BUILT = compiled.is_compiled(counters)
needs_build = pytest.mark.skipif(not BUILT and not os.environ.get("CI"),
                                 reason="not built here: pip install -e . builds it")
# The tests of what is compiled: the tunnel framing, the counters and what renders them, the
# relay and the tunnel shell that drive both, the HTTP/2 observer and its header blocks.
TESTS_OF_THE_MODULES = [
    "tests/unit/test_http2_accounting.py", "tests/unit/test_http2_accounting_properties.py",
    "tests/unit/test_tunnel.py", "tests/unit/test_tunnel_properties.py",
    "tests/unit/test_tunnel_moves.py", "tests/unit/test_tunnel_shell.py",
    "tests/unit/test_tunnel_tls.py", "tests/unit/test_telemetry.py",
    "tests/unit/test_metrics.py", "tests/unit/test_authority_label.py",
    "tests/unit/test_counters.py", "tests/unit/test_relay.py", "tests/unit/test_relay_drain.py",
    "tests/unit/test_proxy_shells.py", "tests/unit/test_connection_budget.py",
    "tests/unit/test_http1_tally.py", "tests/unit/test_http2_tally.py",
    "tests/unit/test_tunnel_senders.py",
]


def test_this_process_runs_the_build_it_was_asked_for() -> None:
    builds = compiled.loaded_builds()
    assert sorted(builds) == sorted(MODULES)
    if os.environ.get(compiled.PURE_PYTHON_ENV) == "1":
        assert set(builds.values()) == {"python"}
    elif os.environ.get("CI"):  # `make venv` builds it: in CI a missing build is a failure
        assert set(builds.values()) == {"compiled (mypyc)"}
    assert len(set(builds.values())) == 1, builds  # never mixed
    assert compiled.tunnel_build() == compiled.counters_build() == builds["agent.core.tunnel"]
    assert telemetry.HttpCounters is counters.HttpCounters  # telemetry hands out this build's


def copy_of_tree(tmp_path: Path) -> Path:
    """The compiled sources and this tree's build of them, in a package directory of their own."""
    root = tmp_path / "agent"
    for module in (*compiled.COMPILED_MODULES, *compiled.TYPE_DEPENDENCIES):
        source = Path(compiled.source_path(str(root), module))
        source.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(compiled.source_path(str(AGENT), module), source)
    for build in AGENT.glob(compiled.PREFIX + "*"):  # the shared library, the shims' directory
        (shutil.copytree if build.is_dir() else shutil.copy2)(build, root / build.name)
    return root


@needs_build
@pytest.mark.parametrize("module", compiled.COMPILED_MODULES)
def test_the_build_of_these_sources_is_chosen(
        module: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    finder = compiled.CompiledModuleFinder(str(copy_of_tree(tmp_path)))
    spec = finder.find_spec(f"agent.{module}")
    assert spec is not None and spec.origin is not None
    origin = Path(spec.origin)
    package, name = module.split(".")
    assert origin.parent.name == package
    assert origin.parent.parent.name == compiled.shim_directory(compiled.source_digest())
    assert origin.name.startswith(name + ".")
    for python in ("agent.core.telemetry", "agent.dataplane.inbound", "agent.tunnel", "tunnel"):
        assert finder.find_spec(python) is None  # nothing else is its business
    assert not caplog.records


def test_the_digest_covers_every_agent_module_the_compiled_ones_import() -> None:
    """mypyc compiles against the types of what they import: an edited annotation there makes
    the build another program (a `set[Relay]` that was a RelaySet made the compiled relay
    call set.discard, never RelaySet.discard, and the agent's connection budget ran out)."""
    files = test_layers.modules()
    found: set[str] = set()
    waiting = [f"agent.{module}" for module in compiled.COMPILED_MODULES]
    while waiting:
        name = waiting.pop()
        if name not in files:  # `from agent.core.x import name`: its module is imported
            name = name.rsplit(".", 1)[0]
        if name in found or name == "agent":
            continue
        found.add(name)
        waiting += test_layers.imports(files[name], name)
    listed = {f"agent.{module}" for module in (*compiled.COMPILED_MODULES, *compiled.TYPE_DEPENDENCIES)}
    assert found == listed, f"add to TYPE_DEPENDENCIES: {sorted(found - listed)}; " \
                            f"remove: {sorted(listed - found)}"


@needs_build
@pytest.mark.parametrize("module", [*compiled.COMPILED_MODULES, "dataplane.context", "core"])
def test_an_edited_source_runs_every_module_as_python(
        module: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = copy_of_tree(tmp_path)
    with open(compiled.source_path(str(root), module), "a") as source:
        source.write("\nEDITED = True\n")
    finder = compiled.CompiledModuleFinder(str(root))
    with caplog.at_level(logging.WARNING, logger="agent.core.compiled"):
        for name in MODULES:  # the .py is loaded for every module of the build
            assert finder.find_spec(name) is None
    (warning,) = caplog.records  # said once
    assert "no complete build of the sources" in warning.getMessage()
    if module in compiled.COMPILED_MODULES:
        assert compiled.source_path("", module) in warning.getMessage()


@needs_build
@pytest.mark.parametrize("module", compiled.COMPILED_MODULES)
def test_a_build_missing_a_shim_is_not_loaded(
        module: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = copy_of_tree(tmp_path)
    Path(compiled.shim_path(str(root), compiled.source_digest(), module,
                            importlib.machinery.EXTENSION_SUFFIXES[0])).unlink()
    finder = compiled.CompiledModuleFinder(str(root))
    assert [finder.find_spec(name) for name in MODULES] == [None] * len(MODULES)
    (warning,) = caplog.records
    assert "(incomplete)" in warning.getMessage()


def test_builds_of_other_sources_are_stale_and_the_current_one_is_not(tmp_path: Path) -> None:
    """What setup.py removes before it builds, and what the warning names: builds of other
    digests, and those earlier setup.py left in agent/core."""
    root = tmp_path / "agent"
    (root / "core" / "_tunnel_0123").mkdir(parents=True)
    current, other = compiled.shim_directory("a" * 16), compiled.shim_directory("b" * 16)
    for name in (current, f"{current}__mypyc.so", other, f"{other}__mypyc.so",
                 "core/_compiled_cccc__mypyc.so", "core/tunnel.py", "core/_http1fast.so"):
        (root / name).touch()
    assert sorted(compiled.stale_builds(str(root), "a" * 16)) == sorted(
        str(root / name) for name in (other, f"{other}__mypyc.so", "core/_tunnel_0123",
                                      "core/_compiled_cccc__mypyc.so"))


@needs_build
@pytest.mark.parametrize("module", compiled.COMPILED_MODULES)
def test_an_edited_tree_runs_its_python_and_says_so(module: str, tmp_path: Path) -> None:
    """End to end, in a fresh interpreter: a copy of the package with its in-place build and
    one edited source imports the edited source, and every other compiled module as Python."""
    tree = tmp_path / "tree"
    shutil.copytree(AGENT, tree / "agent", ignore=shutil.ignore_patterns("__pycache__"))
    with open(compiled.source_path(str(tree / "agent"), module), "a") as source:
        source.write("\nEDITED = True\n")
    run = subprocess.run([sys.executable, "-c", "import importlib; from agent.core import compiled; "
                          f"edited = importlib.import_module('agent.{module}').EDITED; "
                          f"[importlib.import_module(name) for name in {MODULES!r}]; "
                          "print(edited, *sorted(set(compiled.loaded_builds().values())))"],
                         env={**os.environ, "PYTHONPATH": str(tree)}, cwd=tmp_path,
                         capture_output=True, text=True, timeout=60, check=True)
    assert run.stdout.split() == ["True", "python"]
    assert run.stderr.count("no complete build of the sources") == 1, run.stderr


def test_pinion_pure_python_forces_the_python_modules() -> None:
    run = subprocess.run([sys.executable, "-c", "import importlib; from agent.core import compiled; "
                          f"[importlib.import_module(name) for name in {MODULES!r}]; "
                          "print(len(compiled.loaded_builds()), *set(compiled.loaded_builds().values()))"],
                         env={**os.environ, compiled.PURE_PYTHON_ENV: "1"}, cwd=REPO,
                         capture_output=True, text=True, timeout=60, check=True)
    assert run.stdout.split() == [str(len(MODULES)), "python"] and not run.stderr


@needs_build
def test_the_tests_of_the_compiled_modules_pass_on_the_python_modules_too() -> None:
    """This process runs them on the compiled build; a child pytest on the Python one."""
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          *TESTS_OF_THE_MODULES,
                          __file__ + "::test_this_process_runs_the_build_it_was_asked_for"],
                         env={**os.environ, compiled.PURE_PYTHON_ENV: "1"}, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]
