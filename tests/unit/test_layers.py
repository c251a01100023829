"""The packages of agent/ form a ladder: each imports only what stands on its own rung or
below. Every import counts, also one inside a function or under TYPE_CHECKING: a lazy import
that climbs is still a cycle in the design.

    commands    cli, app, __main__, lab, viz, deploy     (the composition root and tools)
    controlplane  kube, cluster, cni_install, issuer     (where pods, services, policy come from)
    inpod       pod lifecycle on this node               (CNI server, PodManager, its state)
    dataplane   proxies, tunnel, sockets, redirect/      (the only I/O-heavy code)
    identity, observability                              (certificates; metrics, admin endpoint)
    core, model, config, durable, memory, agent          (sans-IO logic and plain data)
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

AGENT = Path(__file__).resolve().parents[2] / "agent"

LADDER: tuple[tuple[str, ...], ...] = (  # top first
    ("agent.__main__", "agent.cli", "agent.app", "agent.lab", "agent.viz", "agent.deploy"),
    ("agent.controlplane",),
    ("agent.inpod",),
    ("agent.dataplane",),
    ("agent.identity", "agent.observability"),
    ("agent.core", "agent.model", "agent.config", "agent.durable", "agent.memory", "agent"),
)


def rung(module: str) -> int:
    """The ladder rung of a module (0 = top); the longest matching package decides."""
    best, found = -1, None
    for index, packages in enumerate(LADDER):
        for package in packages:
            if (module == package or module.startswith(package + ".")) and len(package) > best:
                best, found = len(package), index
    if found is None:
        raise AssertionError(f"{module} is on no rung of the ladder: add it to LADDER")
    return found


def imports(source: str, module: str) -> Iterator[str]:
    """Every agent module `source` imports, wherever the import statement stands."""
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.split(".")[0] == "agent")
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            if name.split(".")[0] == "agent":
                yield name


def climbing(files: dict[str, str]) -> list[str]:
    """`module -> imported` for each import that climbs the ladder."""
    found = []
    for module, source in sorted(files.items()):
        for imported in imports(source, module):
            if rung(imported) < rung(module):
                found.append(f"{module} -> {imported}")
    return found


def modules() -> dict[str, str]:
    found = {}
    for path in AGENT.rglob("*.py"):
        parts = path.relative_to(AGENT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path.read_text()
    return found


def test_no_import_climbs_the_ladder() -> None:
    assert climbing(modules()) == []


def test_a_climbing_import_is_caught_wherever_it_hides() -> None:
    lazy = "def route():\n    from agent.controlplane.cluster.state import ClusterState\n"
    typing_only = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                   "    from agent.inpod.manager import PodManager\n")
    relative = "from ..inpod import manager\n"
    going_down = "import agent.core.tunnel\n"
    assert climbing({"agent.dataplane.proxy": lazy, "agent.identity.store": typing_only,
                     "agent.dataplane.mesh": relative, "agent.inpod.manager": going_down}) == [
        "agent.dataplane.mesh -> agent.inpod",
        "agent.dataplane.proxy -> agent.controlplane.cluster.state",
        "agent.identity.store -> agent.inpod.manager",
    ]


def test_every_module_stands_on_a_rung() -> None:
    for module in modules():
        rung(module)
