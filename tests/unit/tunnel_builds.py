"""The two builds of the tunnel framing in one process, for tests that compare them: the
modules the process imported (the mypyc build when it matches its sources, see
agent/core/compiled.py) and a fresh load of the Python sources."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from agent.core import compiled, tunnel, tunnel_frames

CORE = Path(compiled.__file__).parent
NAMES = ("agent.core.tunnel_frames", "agent.core.tunnel")  # frames first


def python_build() -> tuple[ModuleType, ModuleType]:
    """(tunnel_frames, tunnel) loaded from the `.py` files, whatever the process runs; the
    process's own modules are left in place."""
    saved = {name: sys.modules.pop(name) for name in NAMES if name in sys.modules}
    try:
        loaded: list[ModuleType] = []
        for name in NAMES:  # tunnel's `from agent.core.tunnel_frames import` finds the one above
            spec = importlib.util.spec_from_file_location(name, CORE / f"{name.rsplit('.', 1)[1]}.py")
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            loaded.append(module)
        assert not any(compiled.is_compiled(module) for module in loaded)
        return loaded[0], loaded[1]
    finally:
        for name in NAMES:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


def process_build() -> tuple[ModuleType, ModuleType]:
    """(tunnel_frames, tunnel) as this process imported them."""
    return tunnel_frames, tunnel
