"""The compiled parts of the agent (everything else is in pyproject.toml).

agent.core._http1fast: the fast path of HTTP/1 request accounting (csrc/). `pip install`
(and so `make venv` and deploy/Dockerfile's builder stage) compiles it with the Python
headers and a C compiler both already need for python-iptables; the agent runs without it
(the pure-Python observer), but `make test` requires it (tests/unit/test_http1_fast.py).

agent.dataplane._podio: a pod's sockets as C asyncio transports — the relay's connection to the
pod's app, made without a coroutine, and the connections its 15001/15006 accept, accepted in C
(csrc/podio.c; without it the event loop's own transports and servers).

agent._arenas: gives back the free pools inside pymalloc's arenas after a burst (csrc/arenas.c;
without it the agent keeps them, as before).

agent.core.tunnel_frames + agent.core.tunnel (the mesh tunnel's framing), agent.core.counters
(the per-request counters), agent.dataplane.relay and agent.dataplane.tunnel (the relay and the
tunnel's I/O shell): the same sources compiled by mypyc, one group (a build requirement
in pyproject.toml; nothing at run time). The files are named after a digest of the sources
(agent/core/compiled.py), which loads them only when it matches the sources beside them: an
edited `.py` never runs as a stale build. Without mypy (`--no-build-isolation` in an
environment that lacks it) the agent runs the Python modules."""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import sys
from types import ModuleType

from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _compiled_rules() -> ModuleType:
    """agent/core/compiled.py, loaded by path: building must not import the agent."""
    path = os.path.join(HERE, "agent", "core", "compiled.py")
    spec = importlib.util.spec_from_file_location("_pinion_compiled", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mypyc_extensions() -> list[Extension]:
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("setup.py: mypy (mypyc) is not installed: the tunnel framing, the counters, the relay "
              "and the tunnel shell stay Python", file=sys.stderr)
        return []
    rules = _compiled_rules()
    package = os.path.join(HERE, "agent")
    digest = rules.source_digest(package)
    # builds of other sources: in place, and in setuptools' build directory (which a wheel
    # made from this tree would otherwise carry: they are never loaded, only shipped)
    for place in [package, *glob.glob(os.path.join(HERE, "build", "lib*", "agent"))]:
        for stale in rules.stale_builds(place, digest):
            shutil.rmtree(stale) if os.path.isdir(stale) else os.remove(stale)
    extensions: list[Extension] = mypycify(
        [os.path.relpath(rules.source_path(package, module), HERE)
         for module in rules.COMPILED_MODULES],
        group_name=rules.group_name(digest), opt_level="3", debug_level="0")
    for extension in extensions:  # the shims: in a directory of their own, never shadowing a .py
        if not extension.name.endswith("__mypyc"):
            module = extension.name.removeprefix("agent.")
            extension.name = rules.shim_module(digest, module)
            # an in-place build (pip install -e) copies the shims there, and does not create it
            os.makedirs(os.path.dirname(rules.shim_path(package, digest, module, ".so")),
                        exist_ok=True)
    return extensions


setup(
    ext_modules=[
        Extension(
            "agent.core._http1fast",
            sources=["csrc/http1fast.c", "csrc/h1scan.c"],
            depends=["csrc/h1scan.h"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-Wno-missing-field-initializers"],
        ),
        Extension(  # the free pools of pymalloc's arenas given back (issue #21)
            "agent._arenas",
            sources=["csrc/arenas.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-Wno-missing-field-initializers"],
        ),
        Extension(  # the mesh tunnel's TLS records and socket in C (issue #16; libssl-dev)
            "agent.dataplane._tlsio",
            sources=["csrc/tlsio.c"],
            libraries=["ssl", "crypto"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-Wno-missing-field-initializers"],
        ),
        Extension(  # a pod's sockets as C asyncio transports, accepted in C (issue #16)
            "agent.dataplane._podio",
            sources=["csrc/podio.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-Wno-missing-field-initializers"],
        ),
        *mypyc_extensions(),
    ],
)
