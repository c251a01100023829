"""The installed package is the product and nothing else: the wheel built from this tree holds
agent/ and the manifests `pinion install` applies, and none of the test-only code of
tests/support (the fake Kubernetes API server).

The wheel is built the way `pip install .` in deploy/Dockerfile builds it (the PEP 517 backend
of pyproject.toml), from a copy of the whole tree, tests/ included, so a packaging rule that
picks up tests/ would show here. Offline and without build isolation: the venv's setuptools
builds it (about 3 s). And since the wheel has no tests/, nothing in agent/ may reach for it.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import setuptools

from agent.core import compiled

REPO = Path(__file__).resolve().parents[2]
SUPPORT = REPO / "tests" / "support"
NOT_SOURCE = (".git", ".venv", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis",
              "__pycache__", "build", "dist", "*.egg-info", "*.o", "*.so")  # names, at any depth


def missing_wheel_backend() -> str | None:
    """Why this venv's setuptools cannot build a wheel offline, or None when it can."""
    major, minor = (int(part) for part in setuptools.__version__.split(".")[:2])
    if (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None:
        return None
    return (f"setuptools {setuptools.__version__} has no bdist_wheel and `wheel` is not installed: "
            "`make venv` installs the dev extra's setuptools>=70.1")


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    reason = missing_wheel_backend()
    if reason is not None:
        if os.environ.get("CI"):  # CI's venv comes from `make venv`: a missing backend is a bug
            pytest.fail(reason)
        pytest.skip(reason)
    scratch = tmp_path_factory.mktemp("wheel")
    tree = scratch / "pinion"  # a copy: the build writes build/ and *.egg-info into its source
    shutil.copytree(REPO, tree, symlinks=True, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--no-index", "--quiet", "--wheel-dir", str(scratch / "dist"), str(tree)],
                   check=True, timeout=120)
    (wheel,) = (scratch / "dist").glob("pinion-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def test_the_wheel_holds_the_agent_the_demo_lab_and_the_manifests(wheel_files: list[str]) -> None:
    assert {"agent/cli.py", "agent/app.py", "agent/lab/demo.py", "agent/lab/topology.py"} <= set(wheel_files)
    manifests = {f"agent/deploy/manifests/{path.name}" for path in (REPO / "deploy").glob("*.yaml")}
    assert manifests and manifests <= set(wheel_files)


def test_the_wheel_holds_the_compiled_http1_fast_path_and_arena_release(wheel_files: list[str]) -> None:
    # built from csrc/ by setup.py (the tree copied above has no in-place build of it)
    assert [name for name in wheel_files if name.startswith("agent/core/_http1fast.")
            and name.endswith(".so")], "agent.core._http1fast was not compiled into the wheel"
    assert [name for name in wheel_files if name.startswith("agent/_arenas.")
            and name.endswith(".so")], "agent._arenas was not compiled into the wheel"


def test_the_wheel_holds_the_modules_compiled_by_mypyc_from_their_sources(
        wheel_files: list[str]) -> None:
    # mypyc's shared library and one shim per module, named after the digest of the sources
    # they were built from (agent/core/compiled.py loads nothing else)
    digest = compiled.source_digest(str(REPO / "agent"))
    assert {"core.tunnel", "core.counters", "dataplane.relay"} <= set(compiled.COMPILED_MODULES)
    build = f"agent/{compiled.shim_directory(digest)}"
    for part in (*(f"/{module.replace('.', '/')}." for module in compiled.COMPILED_MODULES),
                 "__mypyc."):
        assert [name for name in wheel_files if name.startswith(build + part)
                and name.endswith(".so")], f"{part}: no build of these sources in the wheel"
    assert not [name for name in wheel_files if name.startswith("agent/core/_compiled_")]


def test_the_wheel_holds_only_the_agent_package(wheel_files: list[str]) -> None:
    top = {name.split("/")[0] for name in wheel_files}
    assert top == {"agent", "pinion-0.1.0.dist-info"}


def test_no_test_support_module_is_in_the_wheel_under_any_path(wheel_files: list[str]) -> None:
    test_only = {path.stem for path in SUPPORT.glob("*.py") if path.stem != "__init__"}
    assert {"kubeapi", "kubestore"} <= test_only  # the server is where this test looks for it
    shipped = {Path(name).stem for name in wheel_files if name.endswith(".py")}
    assert not shipped & test_only


def top_level_imports(source: str) -> set[str]:
    """The top-level package of every absolute import in `source`, wherever it stands."""
    names: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.append(node.module or "")
    return {name.split(".")[0] for name in names}


def test_nothing_that_ships_reaches_for_test_code() -> None:
    # A wheel without tests/ only works if agent/ never imports it, lazily or by `python -m`.
    for path in sorted((REPO / "agent").rglob("*.py")):
        source = path.read_text()
        assert not top_level_imports(source) & {"tests", "bench"}, path
        assert "tests.support" not in source, path
