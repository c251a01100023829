"""Which build of the agent's mypyc-compiled modules runs: the compiled build (setup.py) or
the Python sources. Two groups are compiled, each built and checked on its own:

- `tunnel`: `agent.core.tunnel_frames` and `agent.core.tunnel`, the mesh tunnel's framing;
- `counters`: `agent.core.counters`, the per-request and per-chunk counters.

A compiled build is used only when it was built from exactly the sources beside it. setup.py
names a group's files after a digest of its sources: mypyc's shared library
`_<group>_<digest>__mypyc.<ext>` and, in the directory `_<group>_<digest>/` (no `__init__.py`:
not a package, so nothing walks into it), one shim per module, e.g. `tunnel.<ext>`. They
never shadow the `.py` files; the import hook below loads the shims in place of the sources
only when the digest of the group's sources on disk names an existing build. A build left
from other sources (an edited `.py` in an editable install) is never loaded: the group's
Python modules are, and one warning says so. The modules of one group always come from the
same build. Environment `PINION_PURE_PYTHON=1` forces the Python modules of every group (the
tests of the fallback use it; agents started by the tests inherit it).
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
from typing import Final, NamedTuple


class Group(NamedTuple):
    """Modules of this package compiled together (one mypyc group), in dependency order."""

    name: str  # in the build's file names: _<name>_<digest>
    modules: tuple[str, ...]
    what: str  # what the agent's log calls it


TUNNEL: Final = Group("tunnel", ("tunnel_frames", "tunnel"), "tunnel framing")
COUNTERS: Final = Group("counters", ("counters",), "counters")
GROUPS: Final = (TUNNEL, COUNTERS)
COMPILED_MODULES: Final = TUNNEL.modules  # the tunnel group's (its tests' name for them)
PURE_PYTHON_ENV: Final = "PINION_PURE_PYTHON"
_PACKAGE: Final = "agent.core"
_HERE: Final = os.path.dirname(os.path.abspath(__file__))

log = logging.getLogger(__name__)


def source_digest(directory: str = _HERE, group: Group = TUNNEL) -> str:
    """The digest a build of `group` from `directory` carries in its file names."""
    digest = hashlib.sha256()
    for module in group.modules:
        with open(os.path.join(directory, module + ".py"), "rb") as source:
            digest.update(module.encode() + b"\0" + source.read() + b"\0")
    return digest.hexdigest()[:16]


def group_name(digest: str, group: Group = TUNNEL) -> str:
    """The mypyc group (and shared library prefix) of a build from sources of `digest`."""
    return f"{_PACKAGE}._{group.name}_{digest}"


def shim_directory(digest: str, group: Group = TUNNEL) -> str:
    """The directory (beside the sources) of the group's compiled shims."""
    return f"_{group.name}_{digest}"


def group_of(name: str) -> Group | None:
    """The group that compiles module `name` (e.g. agent.core.tunnel), if any."""
    if name.startswith(_PACKAGE + "."):
        module = name[len(_PACKAGE) + 1:]
        for group in GROUPS:
            if module in group.modules:
                return group
    return None


class CompiledModuleFinder:
    """A meta-path finder that answers for the compiled groups' modules only, with the build
    of the group that matches its sources, or not at all (the normal finders then load the
    `.py`)."""

    def __init__(self, directory: str = _HERE) -> None:
        self.directory = directory
        self._chosen: dict[str, dict[str, str]] = {}  # group -> {module: compiled file}; {} = Python

    def find_spec(self, name: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        group = group_of(name)
        if group is None:
            return None
        chosen = self._chosen.get(group.name)
        if chosen is None:
            chosen = self._chosen[group.name] = self._choose(group)
        location = chosen.get(name)
        return None if location is None else importlib.util.spec_from_file_location(name, location)

    def _choose(self, group: Group) -> dict[str, str]:
        if os.environ.get(PURE_PYTHON_ENV) == "1":
            return {}
        try:
            files = os.listdir(self.directory)
            digest = source_digest(self.directory, group)
        except OSError:  # no sources to check a build against: do not trust one
            return {}
        prefix = f"_{group.name}_"
        builds = sorted(name for name in files if name.startswith(prefix))
        shims = os.path.join(self.directory, shim_directory(digest, group))
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            wanted = {f"{_PACKAGE}.{module}": os.path.join(shims, module + suffix)
                      for module in group.modules}
            if f"{prefix}{digest}__mypyc{suffix}" in files and all(
                    os.path.exists(path) for path in wanted.values()):
                return wanted
        if builds:
            log.warning("compiled %s in %s is no complete build of the sources beside it (%s; "
                        "found %s): running the Python modules; rebuild with `make venv` or "
                        "`pip install -e .`", group.what, self.directory,
                        ", ".join(module + ".py" for module in group.modules), ", ".join(builds))
        return {}


def install() -> None:
    """Put the finder in front of the normal ones (once per process)."""
    if not any(isinstance(finder, CompiledModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, CompiledModuleFinder())


def is_compiled(module: ModuleType) -> bool:
    """Whether `module` (one of a group's, e.g. agent.core.tunnel) is the compiled build."""
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
