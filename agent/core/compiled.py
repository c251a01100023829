"""Which build of the agent's mypyc-compiled modules runs: the modules compiled by mypyc
(setup.py), or their Python sources. Compiled together, as one mypyc group (one shared
library: the runtime mypyc links into each group is paid once, measured in
docs/fastpath.md): `agent.core.tunnel_frames` and `agent.core.tunnel` (the mesh tunnel's
framing) and `agent.core.counters` (the per-request and per-chunk counters).

A compiled build is used only when it was built from exactly the sources beside it. setup.py
names its files after a digest of those sources: mypyc's shared library
`_compiled_<digest>__mypyc.<ext>` and, in the directory `_compiled_<digest>/` (no
`__init__.py`: not a package, so nothing walks into it), one shim per module, `tunnel.<ext>`.
They never shadow the `.py` files; the import hook below loads the shims in place of the
sources only when the digest of the sources on disk names an existing build. A build left
from other sources (an edited `.py` in an editable install) is never loaded: the Python
modules are, all of them (the modules always come from one build), and one warning says so.
Environment `PINION_PURE_PYTHON=1` forces the Python modules (the tests of the fallback use
it; agents started by the tests inherit it).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Final

# The modules of this package compiled together (one mypyc group), in dependency order.
COMPILED_MODULES: Final = ("tunnel_frames", "tunnel", "counters")
PREFIX: Final = "_compiled_"  # of the build's files: _compiled_<digest>...
FORMER_PREFIXES: Final = ("_tunnel_",)  # of builds by earlier setup.py (the tunnel alone)
PURE_PYTHON_ENV: Final = "PINION_PURE_PYTHON"
_PACKAGE: Final = "agent.core"
_HERE: Final = os.path.dirname(os.path.abspath(__file__))

log = logging.getLogger(__name__)


def source_digest(directory: str = _HERE) -> str:
    """The digest a build of COMPILED_MODULES from `directory` carries in its file names."""
    digest = hashlib.sha256()
    for module in COMPILED_MODULES:
        with open(os.path.join(directory, module + ".py"), "rb") as source:
            digest.update(module.encode() + b"\0" + source.read() + b"\0")
    return digest.hexdigest()[:16]


def group_name(digest: str) -> str:
    """The mypyc group (and shared library prefix) of a build from sources of `digest`."""
    return f"{_PACKAGE}.{PREFIX}{digest}"


def shim_directory(digest: str) -> str:
    """The directory (beside the sources) of the modules' compiled shims."""
    return f"{PREFIX}{digest}"


class CompiledModuleFinder:
    """A meta-path finder that answers for COMPILED_MODULES only, with the build that
    matches the sources, or not at all (the normal finders then load the `.py`)."""

    def __init__(self, directory: str = _HERE) -> None:
        self.directory = directory
        self._chosen: dict[str, str] | None = None  # module name -> compiled file; {} = Python

    def find_spec(self, name: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        if not name.startswith(_PACKAGE + ".") or name[len(_PACKAGE) + 1:] not in COMPILED_MODULES:
            return None
        if self._chosen is None:
            self._chosen = self._choose()
        location = self._chosen.get(name)
        return None if location is None else importlib.util.spec_from_file_location(name, location)

    def _choose(self) -> dict[str, str]:
        if os.environ.get(PURE_PYTHON_ENV) == "1":
            return {}
        try:
            files = os.listdir(self.directory)
            digest = source_digest(self.directory)
        except OSError:  # no sources to check a build against: do not trust one
            return {}
        builds = sorted(name for name in files if name.startswith((PREFIX, *FORMER_PREFIXES)))
        shims = os.path.join(self.directory, shim_directory(digest))
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            wanted = {f"{_PACKAGE}.{module}": os.path.join(shims, module + suffix)
                      for module in COMPILED_MODULES}
            if f"{PREFIX}{digest}__mypyc{suffix}" in files and all(
                    os.path.exists(path) for path in wanted.values()):
                return wanted
        if builds:
            log.warning("compiled modules in %s are no complete build of the sources "
                        "beside it (%s; found %s): running the Python modules; rebuild with "
                        "`make venv` or `pip install -e .`", self.directory,
                        ", ".join(module + ".py" for module in COMPILED_MODULES), ", ".join(builds))
        return {}


def install() -> None:
    """Put the finder in front of the normal ones (once per process)."""
    if not any(isinstance(finder, CompiledModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, CompiledModuleFinder())


def is_compiled(module: ModuleType) -> bool:
    """Whether `module` (one of COMPILED_MODULES) is the compiled build."""
    return isinstance(getattr(module, "__loader__", None), importlib.machinery.ExtensionFileLoader)


def _build(module: ModuleType) -> str:
    return "compiled (mypyc)" if is_compiled(module) else "python"


def tunnel_build() -> str:
    """`compiled (mypyc)` or `python`: what agent.core.tunnel is in this process."""
    from agent.core import tunnel

    return _build(tunnel)


def counters_build() -> str:
    """`compiled (mypyc)` or `python`: what agent.core.counters is in this process."""
    from agent.core import counters

    return _build(counters)
