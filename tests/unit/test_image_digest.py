"""deploy/image/sources-digest names what the image was built from: the containerd lane and the
arm64 image check refuse an image whose label differs. It must cover every source the
Dockerfile COPYs (an edit to csrc/ changes the image) and nothing .dockerignore keeps out (an
in-place rebuild of the same sources must not make the image look stale)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import re
import shutil
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "image" / "sources-digest"


def load(script: Path) -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("sources_digest_under_test", str(script))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def copied_from_context() -> set[str]:
    """Every path the Dockerfile COPYs from the build context (not from another stage)."""
    sources: set[str] = set()
    for line in (REPO / "deploy" / "Dockerfile").read_text().splitlines():
        words = line.split()
        if not words or words[0] != "COPY" or any(w.startswith("--from") for w in words):
            continue
        sources.update(w.rstrip("/") for w in words[1:-1] if not w.startswith("--"))
    return sources


def test_every_copied_source_is_in_the_digest() -> None:
    copied = copied_from_context()
    assert {"agent", "csrc", "setup.py"} <= copied  # the parse found the builder's COPYs
    assert copied <= set(load(SCRIPT).SOURCES)


def test_the_digest_follows_sources_not_build_outputs(tmp_path: Path) -> None:
    tree = tmp_path / "repo"
    (tree / "deploy" / "image").mkdir(parents=True)
    shutil.copy(SCRIPT, tree / "deploy" / "image" / "sources-digest")
    for name in ("csrc", "agent/core"):
        (tree / name).mkdir(parents=True, exist_ok=True)
    (tree / "csrc" / "h1scan.c").write_text("int x;\n")
    (tree / "agent" / "core" / "tunnel.py").write_text("X = 1\n")
    module = load(tree / "deploy" / "image" / "sources-digest")
    first = module.digest()
    assert re.fullmatch(r"[0-9a-f]{64}", first)
    # built in place, ignored by .dockerignore: the same image
    (tree / "agent" / "core" / "_http1fast.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF")
    (tree / "agent" / "core" / "__pycache__").mkdir()
    (tree / "agent" / "core" / "__pycache__" / "tunnel.cpython-311.pyc").write_bytes(b"pyc")
    assert module.digest() == first
    # a source the builder compiles: another image
    (tree / "csrc" / "h1scan.c").write_text("int y;\n")
    assert module.digest() != first


def test_dockerignore_drops_what_the_digest_skips() -> None:
    ignored = (REPO / ".dockerignore").read_text()
    for pattern in ("**/*.so", "**/__pycache__", "bpf/*.o", "keeper/pinion-keeper", "cni/pinion-cni"):
        assert pattern in ignored
