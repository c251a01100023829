"""Which build of the agent's mypyc-compiled modules runs: the modules compiled by mypyc
(setup.py), or their Python sources. Compiled together, as one mypyc group (one shared
library: the runtime mypyc links into each group is paid once, measured in
docs/fastpath.md): `agent.core.tunnel_frames` and `agent.core.tunnel` (the mesh tunnel's
framing), `agent.core.counters` (the per-request and per-chunk counters), and the data
path's shell around them, `agent.dataplane.relay` and `agent.dataplane.tunnel`.

A compiled build is used only when it was built from exactly the sources it compiles and the
sources of every agent module they import (TYPE_DEPENDENCIES: mypyc compiles against their
types; a `set` annotation that is a subclass at run time, say, becomes a call that passes the
subclass's method by, so a build made against other annotations is another program).
setup.py names its files after a digest of those sources: mypyc's shared library
`agent/_compiled_<digest>__mypyc.<ext>` and, in the directory `agent/_compiled_<digest>/`
(no `__init__.py`: not a package, so nothing walks into it), one shim per module under its
package's name, `core/tunnel.<ext>`, `dataplane/relay.<ext>`. They never shadow the `.py`
files; the import hook below loads the shims in place of the sources only when the digest of
the sources on disk names an existing build. A build left from other sources (an edited `.py`
in an editable install) is never loaded: the Python modules are, all of them (the modules
always come from one build), and one warning says so. Environment `PINION_PURE_PYTHON=1`
forces the Python modules (the tests of the fallback use it; agents started by the tests
inherit it).

This module names the data plane's modules but imports none of them (agent.core stays below
agent.dataplane); `agent.dataplane` installs the hook (by importing this package) before any
of its modules is found.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any, Final

# The modules compiled together (one mypyc group), named below `agent`, in dependency order.
COMPILED_MODULES: Final = ("core.tunnel_frames", "core.tunnel", "core.counters",
                           "core.hpack_blocks", "core.http2",
                           "dataplane.relay", "dataplane.tls", "dataplane.tunnel")
# The agent modules they import, transitively (TYPE_CHECKING imports too): mypyc compiles
# against their types. tests/unit/test_compiled_build.py checks the list is whole.
TYPE_DEPENDENCIES: Final = (
    "core", "core.accounting", "core.compiled", "core.detect", "core.http1",
    "core.tap", "core.telemetry", "dataplane", "dataplane.budget",
    "dataplane.context", "dataplane.netns", "dataplane.sockets", "dataplane.tapping", "model",
    "observability.exposition", "observability.metrics")
PREFIX: Final = "_compiled_"  # of the build's files: agent/_compiled_<digest>...
# builds by earlier setup.py, in agent/core: of the tunnel alone, and of agent.core's modules
FORMER_BUILDS: Final = (os.path.join("core", "_tunnel_"), os.path.join("core", PREFIX))
PURE_PYTHON_ENV: Final = "PINION_PURE_PYTHON"
_PACKAGE: Final = "agent"
_ROOT: Final = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # agent/
_WANTED: Final = frozenset(f"{_PACKAGE}.{module}" for module in COMPILED_MODULES)

log = logging.getLogger(__name__)


def source_path(root: str, module: str) -> str:
    """The source of `module` (named below `agent`) in the package directory `root`."""
    path = os.path.join(root, *module.split("."))
    return os.path.join(path, "__init__.py") if os.path.isdir(path) else path + ".py"


def source_digest(root: str = _ROOT) -> str:
    """The digest a build of COMPILED_MODULES from the package directory `root` carries: of
    their sources and of TYPE_DEPENDENCIES' (~250 KB read and hashed, once per process)."""
    digest = hashlib.sha256()
    for module in (*COMPILED_MODULES, *TYPE_DEPENDENCIES):
        with open(source_path(root, module), "rb") as source:
            digest.update(module.encode() + b"\0" + source.read() + b"\0")
    return digest.hexdigest()[:16]


def group_name(digest: str) -> str:
    """The mypyc group (and shared library's module name) of a build of sources of `digest`."""
    return f"{_PACKAGE}.{PREFIX}{digest}"


def shim_directory(digest: str) -> str:
    """The directory (in the package directory) of the modules' compiled shims."""
    return f"{PREFIX}{digest}"


def shim_module(digest: str, module: str) -> str:
    """The extension name setup.py gives `module`'s shim (its file's place, not a module
    anyone imports by that name)."""
    return f"{_PACKAGE}.{shim_directory(digest)}.{module}"


def shim_path(root: str, digest: str, module: str, suffix: str) -> str:
    return os.path.join(root, shim_directory(digest), *module.split(".")) + suffix


def stale_builds(root: str, digest: str) -> list[str]:
    """Paths of builds in `root` that are not the build of `digest` (nor part of it)."""
    found = []
    for prefix in (PREFIX, *FORMER_BUILDS):
        directory, start = os.path.split(os.path.join(root, prefix))
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        keep = shim_directory(digest) if directory == root else None
        found += [os.path.join(directory, name) for name in sorted(names)
                  if name.startswith(start) and not (keep and name.startswith(keep))]
    return found


class CompiledModuleFinder:
    """A meta-path finder that answers for COMPILED_MODULES only, with the build that
    matches the sources, or not at all (the normal finders then load the `.py`)."""

    def __init__(self, root: str = _ROOT) -> None:
        self.root = root
        self._chosen: dict[str, str] | None = None  # module name -> compiled file; {} = Python

    def find_spec(self, name: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        if name not in _WANTED:
            return None
        if self._chosen is None:
            self._chosen = self._choose()
        location = self._chosen.get(name)
        return None if location is None else importlib.util.spec_from_file_location(name, location)

    def _choose(self) -> dict[str, str]:
        if os.environ.get(PURE_PYTHON_ENV) == "1":
            return {}
        try:
            files = os.listdir(self.root)
            digest = source_digest(self.root)
        except OSError:  # no sources to check a build against: do not trust one
            return {}
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            wanted = {f"{_PACKAGE}.{module}": shim_path(self.root, digest, module, suffix)
                      for module in COMPILED_MODULES}
            if f"{PREFIX}{digest}__mypyc{suffix}" in files and all(
                    os.path.exists(path) for path in wanted.values()):
                return wanted
        builds = [os.path.relpath(path, self.root) for path in stale_builds(self.root, digest)]
        if builds or any(name.startswith(shim_directory(digest)) for name in files):
            log.warning("compiled modules in %s are no complete build of the sources "
                        "(%s; found %s): running the Python modules; rebuild with "
                        "`make venv` or `pip install -e .`", self.root,
                        ", ".join(source_path("", module) for module in COMPILED_MODULES)
                        + f" and the {len(TYPE_DEPENDENCIES)} agent modules they import",
                        ", ".join(builds) or shim_directory(digest) + " (incomplete)")
        return {}


def install() -> None:
    """Put the finder in front of the normal ones (once per process)."""
    if not any(isinstance(finder, CompiledModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, CompiledModuleFinder())


def c_extension(module: str, name: str) -> Any:
    """`name` of the C extension `module` (csrc/: agent.dataplane._tlsio, _podio), or None when
    it is not built or PINION_PURE_PYTHON=1 keeps the agent off compiled code; the caller then
    takes its Python (or event loop's) path."""
    if os.environ.get(PURE_PYTHON_ENV) == "1":
        return None
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:
        return None


def is_compiled(module: ModuleType) -> bool:
    """Whether `module` (one of COMPILED_MODULES) is the compiled build."""
    return isinstance(getattr(module, "__loader__", None), importlib.machinery.ExtensionFileLoader)


def _build(module: ModuleType) -> str:
    return "compiled (mypyc)" if is_compiled(module) else "python"


def loaded_builds() -> dict[str, str]:
    """The build of each of COMPILED_MODULES this process has imported (the modules of
    agent.dataplane are looked up, never imported, here): one value for all of them."""
    return {name: _build(module) for name in sorted(_WANTED)
            if (module := sys.modules.get(name)) is not None}


def tunnel_build() -> str:
    """`compiled (mypyc)` or `python`: what agent.core.tunnel is in this process."""
    from agent.core import tunnel

    return _build(tunnel)


def counters_build() -> str:
    """`compiled (mypyc)` or `python`: what agent.core.counters is in this process."""
    from agent.core import counters

    return _build(counters)


if __name__ == "__main__":  # the sources a build depends on, for the Makefile (stdlib only)
    print(*(os.path.relpath(source_path(_ROOT, module)) for module in
            (*COMPILED_MODULES, *TYPE_DEPENDENCIES)), os.path.relpath(__file__))
