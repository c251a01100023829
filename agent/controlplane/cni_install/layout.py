"""Where the host keeps its CNI configs and plugins, and what the conf dir holds.

Detection (k3s or a standard kubeadm-style node) looks under a host root, the host's `/` as
mounted into the installer's container. The conf dir is read the way libcni (containerd,
CRI-O) reads it: every entry that is not a directory and whose extension is .conf,
.conflist or .json, sorted by name; the runtime uses the first one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.controlplane.cni_install.derive import marker_of

K3S_AGENT_DIR = "var/lib/rancher/k3s/agent"
K3S_CONF_DIR = "var/lib/rancher/k3s/agent/etc/cni/net.d"
K3S_DATA_DIR = "var/lib/rancher/k3s/data"  # what k3s extracts from its binary at each start
K3S_BIN_DIR = "var/lib/rancher/k3s/data/cni"
K3S_OLD_BIN_DIR = "var/lib/rancher/k3s/data/current/bin"  # `current` links to data/<hash>
STANDARD_CONF_DIR = "etc/cni/net.d"
STANDARD_BIN_DIR = "opt/cni/bin"

CONFIG_EXTENSIONS = (".conf", ".conflist", ".json")
# Our conflist must sort before the primary; the second name is for primaries like
# "00-aaa.conflist" ('-' sorts before '0'). Both sort after any name starting with '.'.
OWN_NAMES = ("00-pinion.conflist", "0-pinion.conflist")
PLUGIN_FILE_NAME = "pinion-cni"
MAX_CONFIG_BYTES = 1 << 20
_MAX_SYMLINK_HOPS = 40


@dataclass(frozen=True)
class HostLayout:
    """The host's CNI conf dir and plugin bin dir, as paths the installer can open."""

    flavour: str
    host_root: Path
    conf_dir: Path
    bin_dir: Path

    def plugin_path(self) -> Path:
        """Where the plugin goes, resolving host symlinks (k3s `data/current`) now."""
        return resolve_in_root(self.host_root, self.bin_dir) / PLUGIN_FILE_NAME


def detect_layout(
    host_root: Path, conf_dir: Path | None = None, bin_dir: Path | None = None
) -> HostLayout:
    """k3s if k3s has left anything of its own under `host_root`, else standard; overrides win."""
    if k3s_was_here(host_root):
        flavour = "k3s"
        default_conf = host_root / K3S_CONF_DIR
        default_bin = host_root / K3S_BIN_DIR
        if not resolve_in_root(host_root, default_bin).is_dir():
            default_bin = host_root / K3S_OLD_BIN_DIR
    else:
        flavour = "standard"
        default_conf = host_root / STANDARD_CONF_DIR
        default_bin = host_root / STANDARD_BIN_DIR
    if conf_dir is not None or bin_dir is not None:
        flavour += " (overridden)"
    return HostLayout(flavour, host_root, conf_dir or default_conf, bin_dir or default_bin)


def k3s_was_here(host_root: Path) -> bool:
    """Whether k3s runs (or ran) on this host, by what only k3s makes: its extracted data
    (`data/cni`, `data/current`), or its agent dir holding anything but an empty
    `etc/cni/net.d` chain. The DaemonSet mounts `agent/etc/cni/net.d` and `data` on every
    node, and kubelet creates a missing hostPath; directories it made, empty, on a kubeadm
    node must not make that node look like k3s."""
    data = host_root / K3S_DATA_DIR
    if (data / "cni").is_dir() or resolve_in_root(host_root, data / "current").is_dir():
        return True
    agent = host_root / K3S_AGENT_DIR
    return agent.is_dir() and not _only_the_empty_chain(agent, Path(K3S_CONF_DIR).relative_to(K3S_AGENT_DIR))


def _only_the_empty_chain(directory: Path, chain: Path) -> bool:
    """`directory` holds `chain` (e.g. etc/cni/net.d) and nothing else, and its end is empty."""
    for part in chain.parts:
        try:
            if [entry.name for entry in directory.iterdir()] != [part]:
                return False
        except OSError:
            return False
        directory = directory / part
    try:
        return directory.is_dir() and not any(directory.iterdir())
    except OSError:
        return False


def resolve_in_root(host_root: Path, path: Path) -> Path:
    """`path` with symlinks followed as on the host: an absolute target is a host path.

    Needed when the host's `/` is mounted elsewhere: k3s' `data/current` points at an
    absolute `/var/lib/rancher/k3s/data/<hash>`. Paths outside `host_root` are returned as is.
    """
    if host_root == Path("/"):
        return path
    try:
        pending = list(path.relative_to(host_root).parts)
    except ValueError:
        return path
    current, hops = host_root, 0
    while pending:
        part = pending.pop(0)
        if part in (".", ""):
            continue
        if part == "..":
            current = current.parent if current != host_root else host_root
            continue
        candidate = current / part
        if candidate.is_symlink() and hops < _MAX_SYMLINK_HOPS:
            hops += 1
            target = Path(os.readlink(candidate))
            if target.is_absolute():
                current, pending = host_root, [*target.parts[1:], *pending]
            else:
                pending = [*target.parts, *pending]
            continue
        current = candidate
    return current


def is_config_name(name: str) -> bool:
    return name.endswith(CONFIG_EXTENSIONS)


def config_names(conf_dir: Path) -> list[str]:
    """Names the runtime would consider, in the order it considers them (libcni's rule)."""
    names = []
    with os.scandir(conf_dir) as entries:
        for entry in entries:
            if is_config_name(entry.name) and not entry.is_dir(follow_symlinks=False):
                names.append(entry.name)
    return sorted(names, key=os.fsencode)  # byte order, as Go's sort.Strings


def read_config_bytes(path: Path) -> bytes:
    """A config file's bytes; ValueError if it is implausibly large for a config."""
    with open(path, "rb") as file:
        data = file.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ValueError(f"larger than {MAX_CONFIG_BYTES} bytes")
    return data


@dataclass(frozen=True)
class ConfDirScan:
    """The conf dir split into configs we derived (with their markers) and the others."""

    directory: Path
    own: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    others: tuple[str, ...] = ()

    @property
    def primary(self) -> str | None:
        """The first config that is not ours: the one the runtime would use without us."""
        return self.others[0] if self.others else None


def scan_conf_dir(conf_dir: Path) -> ConfDirScan:
    """Reads every config to tell ours (by marker) from the rest. FileNotFoundError if absent."""
    own: dict[str, Mapping[str, Any]] = {}
    others = []
    for name in config_names(conf_dir):
        marker = _marker_of_file(conf_dir / name)
        if marker is None:
            others.append(name)
        else:
            own[name] = marker
    return ConfDirScan(conf_dir, own, tuple(others))


def _marker_of_file(path: Path) -> Mapping[str, Any] | None:
    try:
        return marker_of(read_config_bytes(path).decode("utf-8"))
    except (OSError, ValueError):  # unreadable, too big, not UTF-8: not ours
        return None


def choose_own_name(primary: str) -> str | None:
    """The first of OWN_NAMES that sorts before `primary`, or None if none does."""
    return next((name for name in OWN_NAMES if name < primary), None)
