"""The two builds of the counters in one process, for tests that compare them: the module the
process imported (the mypyc build when it matches its sources, see agent/core/compiled.py) and
a fresh load of the Python source — with the modules that hold its classes (telemetry, and the
metrics that render them) loaded fresh beside it, so a whole scrape can be made on each build."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

from agent.core import compiled, counters, telemetry
from agent.observability import metrics

CORE = Path(compiled.__file__).parent
# what a fresh Python build loads, in dependency order (each imports the one before)
NAMES = ("agent.core.counters", "agent.core.telemetry", "agent.observability.metrics")


class Build(NamedTuple):
    counters: ModuleType
    telemetry: ModuleType
    metrics: ModuleType


def python_build() -> Build:
    """agent.core.counters loaded from its `.py`, and telemetry and metrics on top of it; the
    process's own modules are left in place."""
    saved = {name: sys.modules.pop(name) for name in NAMES if name in sys.modules}
    try:
        loaded: list[ModuleType] = []
        for name, path in zip(NAMES, (CORE / "counters.py", Path(telemetry.__file__),
                                      Path(metrics.__file__)), strict=True):
            spec = importlib.util.spec_from_file_location(name, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            loaded.append(module)
        assert not compiled.is_compiled(loaded[0])
        return Build(*loaded)
    finally:
        for name in NAMES:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


def process_build() -> Build:
    """The counters, telemetry and metrics this process imported."""
    return Build(counters, telemetry, metrics)
