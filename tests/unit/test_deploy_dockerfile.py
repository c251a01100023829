"""deploy/Dockerfile without docker: two stages on bookworm-slim, every COPY source exists and
is in the build context, the runtime stage has what the agent loads and no compiler, and the
paths the manifests and the agent rely on are the ones the image has."""

from __future__ import annotations

import fnmatch
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "Dockerfile"
BASE = "debian:bookworm-slim"
RUNTIME_PACKAGES = {"python3", "libbpf1", "iptables", "nftables", "libnftables1", "iproute2"}
COMPILERS = re.compile(r"^(gcc|g\+\+|clang|llvm|cpp|make|build-essential)(-[0-9.]+)?$|-dev$")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(word.upper(), rest.strip()) for word, _, rest in
            (line.strip().partition(" ") for line in joined.splitlines() if line.strip())]


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instruction in instructions():
        if instruction[0] == "FROM":
            result.append([])
        result[-1].append(instruction)
    return result


def apt_packages(stage: list[tuple[str, str]]) -> set[str]:
    words = [w for name, args in stage if name == "RUN" for w in shlex.split(args)]
    packages, installing = set(), False
    for word in words:
        if word == "install":
            installing = True
        elif word in ("&&", ";"):
            installing = False
        elif installing and not word.startswith("-"):
            packages.add(word)
    return packages


def dockerignore() -> list[str]:
    return [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def ignored(path: str) -> bool:
    parts = Path(path).parts
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatch(prefix, pattern) or fnmatch.fnmatch(prefix, pattern.removeprefix("**/"))
               for pattern in dockerignore() for prefix in prefixes)


def test_builder_and_runtime_on_bookworm_slim_then_one_layer_from_scratch() -> None:
    froms = [args for name, args in instructions() if name == "FROM"]
    assert froms == [f"{BASE} AS builder", f"{BASE} AS runtime", "scratch"]
    assert stages()[2][1] == ("COPY", "--from=runtime / /")


def test_the_purge_keeps_what_the_agent_loads_and_then_tries_it() -> None:
    runtime = stages()[1]
    unused = next(args for name, args in runtime if name == "ARG" and args.startswith("UNUSED="))
    purged = set(shlex.split(unused.removeprefix("UNUSED="))[0].split())
    purge = next(args for name, args in runtime if name == "RUN" and "dpkg --purge" in args)
    purged |= {"debconf", "init-system-helpers", "perl-base", "tar", "diffutils"}
    assert "debconf init-system-helpers perl-base tar diffutils" in purge
    for kept in (*RUNTIME_PACKAGES, "dpkg", "libc6", "libc-bin", "dash", "coreutils", "libssl3",
                 "libelf1", "libmnl0", "libnftnl11", "libxtables12", "libip4tc2", "zlib1g"):
        assert kept not in purged, kept
    for check in ("import ctypes, importlib, pkgutil, agent, iptc", "libbpf.so.1", "libnftables.so.1",
                  "ip -V", "nft --version", "iptables -V", "pinion --help"):
        assert check in purge, check


def test_every_copied_path_exists_and_is_in_the_build_context() -> None:
    sources = []
    for name, args in instructions():
        if name == "COPY" and not args.startswith("--from"):
            sources += shlex.split(args)[:-1]
    assert sources, "no COPY from the context?"
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: no such path"
        assert not ignored(source.rstrip("/")), f"COPY {source}: excluded by .dockerignore"
    assert not ignored("bpf/capture.c") and not ignored("cni/pinion-cni.c")
    assert ignored("cni/pinion-cni")  # a host-built binary: the builder makes the image's own
    # The package data is a symlink into deploy/: both sides must be in the image.
    assert (REPO / "agent/deploy/manifests").resolve() == (REPO / "deploy").resolve()
    assert {"agent/", "deploy/"} <= set(sources)


def test_test_only_code_stays_out_of_the_build_context() -> None:
    # The fake Kubernetes API server lives in tests/support; no COPY may bring it in.
    for path in ("tests/support/kubeapi.py", "tests/unit/test_layers.py", "bench/foundation.py"):
        assert (REPO / path).exists() and ignored(path), path


def test_copies_between_stages_name_a_stage() -> None:
    names = {args.split(" AS ")[1] for name, args in instructions() if name == "FROM" and " AS " in args}
    for name, args in instructions():
        if name == "COPY" and args.startswith("--from="):
            assert args.split()[0].removeprefix("--from=") in names


def test_the_runtime_stage_has_what_the_agent_loads_and_no_compiler() -> None:
    builder, runtime, _ = stages()
    assert apt_packages(runtime) >= RUNTIME_PACKAGES
    assert not {p for p in apt_packages(runtime) if COMPILERS.search(p)}
    assert {"clang", "libbpf-dev", "python3-venv"} <= apt_packages(builder)


def test_the_bpf_object_is_built_with_the_makefiles_flags_for_the_targets_multiarch() -> None:
    makefile = (REPO / "Makefile").read_text()
    flags = re.search(r"^BPF_CFLAGS\s*=\s*(.+)$", makefile, re.M).group(1)
    build = next(args for name, args in stages()[0] if name == "RUN" and "clang -" in args)
    wanted = re.sub(r"\s*-I\S*\$\(shell [^)]*\)", "", flags).split()  # the include dir differs
    assert " ".join(wanted) in " ".join(build.split())
    assert "-I/usr/include/$(dpkg-architecture -qDEB_HOST_MULTIARCH)" in build  # not gcc -dumpmachine


def test_the_paths_the_manifests_use_are_where_the_image_puts_things() -> None:
    builder, runtime, final = stages()
    build = " ".join(args for name, args in builder if name == "RUN")
    env = " ".join(args for name, args in final if name == "ENV")
    bpf_object = re.search(r"PINION_BPF_OBJECT=(\S+)", env).group(1)
    assert f"-o {bpf_object}" in build
    daemonset = next(d for d in yaml.safe_load_all((REPO / "deploy/daemonset.yaml").read_text())
                     if d and d["kind"] == "DaemonSet")
    installer = next(c for c in daemonset["spec"]["template"]["spec"]["containers"]
                     if c["name"] == "cni-installer")
    plugin = next(a for a in installer["args"] if a.startswith("--plugin=")).removeprefix("--plugin=")
    assert f"-o {plugin} cni/pinion-cni.c cni/cnicore.c cni/cnijson.c" in build
    assert "/opt/pinion/venv/bin" in env and "pip install --no-cache-dir '.[fast]'" in build
    assert ("COPY", "--from=builder /opt/pinion /opt/pinion") in runtime


@pytest.mark.parametrize("command", ["agent", "issuer"])
def test_the_manifests_run_pinion_from_the_venv_on_path(command: str) -> None:
    documents = [d for path in (REPO / "deploy").glob("*.yaml") for d in yaml.safe_load_all(path.read_text())
                 if d and d["kind"] in ("DaemonSet", "Deployment")]
    containers = [c for d in documents for c in d["spec"]["template"]["spec"]["containers"]]
    assert command in {c["command"][1] for c in containers if c["command"][0] == "pinion"}
    assert {c["command"][0] for c in containers} == {"pinion", "pinion-keeper"}


def test_the_cni_plugin_is_built_static_with_the_makefiles_flags() -> None:
    """The installer copies /opt/pinion/cni/pinion-cni onto the host, which may have no
    libc the image's matches: the builder links it statically, as `make cni` does."""
    makefile = (REPO / "Makefile").read_text()
    flags = re.search(r"^CNI_CFLAGS\s*=\s*(.+)$", makefile, re.M).group(1).split()
    assert "-static" in flags
    build = " ".join(" ".join(args.split()) for name, args in stages()[0] if name == "RUN")
    assert f"gcc {' '.join(flags)} -s -o /opt/pinion/cni/pinion-cni" in build
    assert {"gcc", "libc6-dev"} <= apt_packages(stages()[0])


def test_the_keeper_binary_is_built_into_the_image_on_path() -> None:
    """deploy/keeper.yaml runs `pinion-keeper` (keeper/keeper.c): built in the builder stage
    into /opt/pinion/bin, which the runtime's PATH holds."""
    text = (REPO / "deploy" / "Dockerfile").read_text()
    assert "-o /opt/pinion/bin/pinion-keeper keeper/keeper.c" in text
    assert "COPY keeper/ keeper/" in text
    assert re.search(r"ENV PATH=[^\n]*/opt/pinion/bin", text)
