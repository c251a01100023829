"""`pinion cni install` / `uninstall` on fake hosts: a k3s node (new `data/cni` and old
`data/current/bin` layouts) and a kubeadm node, each a directory tree in tmp_path.

The story: the installer never touches the primary config; it writes its own conflist,
named to sort first, holding the primary's plugins with pinion-cni appended, copies the
plugin in, keeps both in step while the primary changes (k3s rewrites
10-flannel.conflist on every start), refuses clearly when the primary is unusable
(keeping the last good config), and on uninstall removes exactly what it added.
"""

from __future__ import annotations

import builtins
import contextlib
import importlib.machinery
import importlib.util
import json
import logging
import os
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.cli import main as pinion
from agent.controlplane import cni_install
from agent.controlplane.cni_install import files
from agent.controlplane.cni_install.derive import MARKER_KEY, Refusal, derive
from agent.controlplane.cni_install.installer import InstallSettings, Status, reconcile, uninstall
from agent.controlplane.cni_install.layout import detect_layout
from agent.controlplane.cni_install.watch import (
    IN_CLOSE_WRITE,
    IN_IGNORED,
    InotifySource,
    PollingSource,
    StopSignal,
    make_change_source,
    parse_events,
)

REPO = Path(__file__).resolve().parents[2]
PLUGIN = REPO / "cni" / "pinion-cni"  # built by `make cni`
REFERENCE = REPO / "cni" / "pinion_cni_reference.py"  # SUPPORTED_VERSIONS, which the C plugin shares
K3S_NET_D = "var/lib/rancher/k3s/agent/etc/cni/net.d"
OPTIONS = {"agentSocket": "/run/pinion/cni.sock", "failPolicy": "closed"}

# What k3s writes (pkg/agent/flannel/setup.go), in its 1.0.0 form.
FLANNEL = {
    "name": "cbr0",
    "cniVersion": "1.0.0",
    "plugins": [
        {"type": "flannel",
         "delegate": {"hairpinMode": True, "forceAddress": True, "isDefaultGateway": True}},
        {"type": "portmap", "capabilities": {"portMappings": True}},
        {"type": "bandwidth", "capabilities": {"bandwidth": True}},
    ],
}
BRIDGE_CONF = {  # a single-plugin .conf, as on a kubeadm lab node
    "cniVersion": "0.4.0",
    "name": "lab-bridge",
    "type": "bridge",
    "bridge": "cni0",
    "isGateway": True,
    "ipam": {"type": "host-local", "subnet": "10.244.0.0/24"},
}


# ---------------------------------------------------------------- fake hosts


class Host:
    """A fake host root: where its configs and plugins live, and how to use the CLI on it."""

    def __init__(self, root: Path, conf_dir: Path, bin_dir: Path) -> None:
        self.root, self.conf_dir, self.bin_dir = root, conf_dir, bin_dir

    @property
    def own(self) -> Path:
        return self.conf_dir / "00-pinion.conflist"

    @property
    def plugin(self) -> Path:
        return self.bin_dir / "pinion-cni"

    def write_primary(self, name: str, content: Any) -> Path:
        path = self.conf_dir / name
        path.write_text(content if isinstance(content, str) else json.dumps(content, indent=1))
        return path

    def derived(self, name: str = "00-pinion.conflist") -> dict[str, Any]:
        document: dict[str, Any] = json.loads((self.conf_dir / name).read_text())
        return document

    def settings(self) -> InstallSettings:
        layout = detect_layout(self.root)
        return InstallSettings(layout, PLUGIN.read_bytes(), OPTIONS,
                               socket_directory=self.root / "run" / "pinion")

    def config_names(self) -> list[str]:
        return sorted(path.name for path in self.conf_dir.iterdir())


def k3s_host(tmp_path: Path, bin_layout: str = "data/cni") -> Host:
    root = tmp_path / "host"
    conf_dir = root / K3S_NET_D
    conf_dir.mkdir(parents=True)
    data = root / "var/lib/rancher/k3s/data"
    if bin_layout == "data/cni":
        bin_dir = data / "cni"
        bin_dir.mkdir(parents=True)
    else:  # older k3s: data/current -> /var/lib/rancher/k3s/data/<hash> (an absolute host path)
        bin_dir = data / "5f1c0a" / "bin"
        bin_dir.mkdir(parents=True)
        (data / "current").symlink_to("/var/lib/rancher/k3s/data/5f1c0a")
    (root / "run").mkdir()
    return Host(root, conf_dir, bin_dir)


def kubeadm_host(tmp_path: Path) -> Host:
    root = tmp_path / "host"
    conf_dir, bin_dir = root / "etc/cni/net.d", root / "opt/cni/bin"
    conf_dir.mkdir(parents=True)
    bin_dir.mkdir(parents=True)
    (bin_dir / "bridge").write_bytes(b"\x7fELF bridge")
    (root / "run").mkdir()
    return Host(root, conf_dir, bin_dir)


def cni(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = pinion(["cni", *argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def identity(path: Path) -> tuple[int, int, bytes]:
    status = path.stat()
    return status.st_ino, status.st_mtime_ns, path.read_bytes()


def wait_until(condition: Callable[[], bool], timeout: float = 8.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


# ---------------------------------------------------------------- install: the happy paths


@pytest.mark.parametrize("bin_layout", ["data/cni", "data/current/bin"])
def test_k3s_install_writes_own_conflist_first_and_copies_the_plugin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bin_layout: str
) -> None:
    host = k3s_host(tmp_path, bin_layout)
    primary = host.write_primary("10-flannel.conflist", FLANNEL)
    primary_bytes = primary.read_bytes()

    status, out, err = cni(capsys, "install", "--host-root", str(host.root))

    assert (status, err) == (0, "")
    assert "00-pinion.conflist: 10-flannel.conflist + pinion-cni" in out
    assert host.config_names() == ["00-pinion.conflist", "10-flannel.conflist"]
    assert primary.read_bytes() == primary_bytes  # the primary is never edited
    assert host.plugin.read_bytes() == PLUGIN.read_bytes()
    assert stat.S_IMODE(host.plugin.stat().st_mode) == 0o755
    assert stat.S_IMODE(host.own.stat().st_mode) == 0o644
    assert stat.S_IMODE((host.root / "run/pinion").stat().st_mode) == 0o700
    assert not [path for path in host.conf_dir.iterdir() if path.name.endswith(".tmp")]


def test_the_derived_config_is_the_primary_with_pinion_cni_appended(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = k3s_host(tmp_path)
    host.write_primary("10-flannel.conflist", FLANNEL)

    cni(capsys, "install", "--host-root", str(host.root), "--agent-socket", "/run/p/cni.sock",
        "--fail-policy", "open")

    derived = host.derived()
    assert (derived["name"], derived["cniVersion"]) == ("cbr0", "1.0.0")
    assert derived["plugins"][:-1] == FLANNEL["plugins"]
    assert derived["plugins"][-1] == {
        "type": "pinion-cni", "agentSocket": "/run/p/cni.sock", "failPolicy": "open"}
    assert derived[MARKER_KEY]["derivedFrom"] == "10-flannel.conflist"
    assert (host.root / "run/p").is_dir()


def test_kubeadm_node_uses_etc_cni_and_opt_cni_bin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = kubeadm_host(tmp_path)
    host.write_primary("10-calico.conflist", dict(FLANNEL, name="k8s-pod-network"))

    status, _, _ = cni(capsys, "install", "--host-root", str(host.root))

    assert status == 0
    assert detect_layout(host.root).flavour == "standard"
    assert host.derived()["name"] == "k8s-pod-network"
    assert sorted(path.name for path in host.bin_dir.iterdir()) == ["bridge", "pinion-cni"]


def test_a_conf_primary_is_wrapped_into_a_conflist(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = kubeadm_host(tmp_path)
    host.write_primary("10-bridge.conf", BRIDGE_CONF)

    assert cni(capsys, "install", "--host-root", str(host.root))[0] == 0

    derived = host.derived()
    assert (derived["cniVersion"], derived["name"]) == ("0.4.0", "lab-bridge")
    bridge = {key: value for key, value in BRIDGE_CONF.items() if key not in ("name", "cniVersion")}
    assert [plugin["type"] for plugin in derived["plugins"]] == ["bridge", "pinion-cni"]
    assert derived["plugins"][0] == bridge


def test_a_primary_with_one_plugin_only_works(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = k3s_host(tmp_path)
    host.write_primary("10-flannel.conflist", dict(FLANNEL, plugins=FLANNEL["plugins"][:1]))

    assert cni(capsys, "install", "--host-root", str(host.root))[0] == 0
    assert [plugin["type"] for plugin in host.derived()["plugins"]] == ["flannel", "pinion-cni"]


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0", "1.0.0"])
def test_primaries_in_every_version_pinion_cni_speaks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], version: str
) -> None:
    host = k3s_host(tmp_path)
    host.write_primary("10-flannel.conflist", dict(FLANNEL, cniVersion=version))

    assert cni(capsys, "install", "--host-root", str(host.root))[0] == 0
    assert host.derived()["cniVersion"] == version


def test_supported_versions_are_the_plugins_own() -> None:
    """A conflist in a version the plugin rejects would stop every pod: keep them equal."""
    loader = importlib.machinery.SourceFileLoader("pinion_cni_plugin", str(REFERENCE))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    plugin = importlib.util.module_from_spec(spec)
    loader.exec_module(plugin)
    assert tuple(cni_install.SUPPORTED_CNI_VERSIONS) == tuple(plugin.SUPPORTED_VERSIONS)


def test_reinstall_changes_nothing_when_nothing_changed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = k3s_host(tmp_path)
    host.write_primary("10-flannel.conflist", FLANNEL)
    cni(capsys, "install", "--host-root", str(host.root))
    before = identity(host.own), identity(host.plugin)

    status, out, _ = cni(capsys, "install", "--host-root", str(host.root))

    assert status == 0 and "already in step" in out
    assert (identity(host.own), identity(host.plugin)) == before


def test_a_primary_sorting_before_00_pinion_gets_0_pinion(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = k3s_host(tmp_path)
    host.write_primary("00-aaa.conflist", FLANNEL)

    assert cni(capsys, "install", "--host-root", str(host.root))[0] == 0
    assert host.config_names() == ["0-pinion.conflist", "00-aaa.conflist"]

    # The primary moves to a later name: ours follows, and the stale name goes.
    (host.conf_dir / "00-aaa.conflist").rename(host.conf_dir / "10-flannel.conflist")
    assert cni(capsys, "install", "--host-root", str(host.root))[0] == 0
    assert host.config_names() == ["00-pinion.conflist", "10-flannel.conflist"]


@pytest.mark.parametrize("name", ["0-a.conflist", ".hidden.conflist"])
def test_a_primary_no_name_of_ours_sorts_before_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    """libcni reads hidden files too, so a hidden config would win over ours."""
    host = k3s_host(tmp_path)
    host.write_primary(name, FLANNEL)

    status, out, err = cni(capsys, "install", "--host-root", str(host.root))

    assert (status, out) == (1, "")
    assert f"{name}: sorts before every name Pinion can use" in err
    assert host.config_names() == [name]


def test_non_configs_and_directories_are_not_primaries(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """As libcni: only non-directory .conf/.conflist/.json entries count."""
    host = k3s_host(tmp_path)
    (host.conf_dir / "01-dir.conflist").mkdir()
    (host.conf_dir / "05-notes.txt").write_text("hello")
    (host.conf_dir / ".pinion-leftover.tmp").write_text("{")
    host.write_primary("10-flannel.conflist", FLANNEL)

    assert cni(capsys, "install", "--host-root", str(host.root))[0] == 0
    assert host.derived()[MARKER_KEY]["derivedFrom"] == "10-flannel.conflist"


def test_overrides_win_over_detection(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    host = k3s_host(tmp_path)
    conf_dir, bin_dir = tmp_path / "elsewhere/net.d", tmp_path / "elsewhere/bin"
    conf_dir.mkdir(parents=True)
    bin_dir.mkdir()
    (conf_dir / "10-flannel.conflist").write_text(json.dumps(FLANNEL))

    status, _, _ = cni(capsys, "install", "--host-root", str(host.root), "--conf-dir",
                       str(conf_dir), "--bin-dir", str(bin_dir))

    assert status == 0
    assert (conf_dir / "00-pinion.conflist").is_file() and (bin_dir / "pinion-cni").is_file()
    assert host.config_names() == []


def test_k3s_before_its_first_start_is_still_k3s(tmp_path: Path) -> None:
    root = tmp_path / "host"
    (root / "var/lib/rancher/k3s/agent").mkdir(parents=True)
    layout = detect_layout(root)
    assert layout.flavour == "k3s" and layout.conf_dir == root / K3S_NET_D


def test_empty_k3s_dirs_that_kubelet_made_for_the_daemonsets_mounts_are_not_k3s(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = kubeadm_host(tmp_path)
    (host.root / K3S_NET_D).mkdir(parents=True)            # the installer's hostPath volumes,
    (host.root / "var/lib/rancher/k3s/data").mkdir()       # created empty on a kubeadm node
    host.write_primary("10-calico.conflist", dict(FLANNEL, name="k8s-pod-network"))

    status, _, _ = cni(capsys, "install", "--host-root", str(host.root))

    assert status == 0 and detect_layout(host.root).flavour == "standard"
    assert host.config_names() == ["00-pinion.conflist", "10-calico.conflist"]
    assert list((host.root / K3S_NET_D).iterdir()) == []


@pytest.mark.parametrize("bin_layout", ["data/cni", "data/current/bin"])
def test_k3s_is_known_by_its_data_even_before_flannel_writes_a_config(
    tmp_path: Path, bin_layout: str
) -> None:
    host = k3s_host(tmp_path, bin_layout)  # agent/etc/cni/net.d empty, as our mount would leave it
    layout = detect_layout(host.root)
    assert (layout.flavour, layout.conf_dir) == ("k3s", host.conf_dir)
    assert layout.plugin_path() == host.plugin


def test_anything_of_k3s_own_in_its_agent_dir_makes_it_k3s(tmp_path: Path) -> None:
    root = tmp_path / "host"
    (root / K3S_NET_D).mkdir(parents=True)
    assert detect_layout(root).flavour == "standard"
    (root / "var/lib/rancher/k3s/agent/client-kubelet.crt").write_text("")
    assert detect_layout(root).flavour == "k3s"


# ---------------------------------------------------------------- refusals and no primary


def test_no_primary_fails_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = k3s_host(tmp_path)

    status, out, err = cni(capsys, "install", "--host-root", str(host.root))

    assert (status, out) == (1, "")
    assert err.strip() == f"pinion cni install: no primary CNI config in {host.conf_dir} yet"
    assert host.config_names() == [] and list(host.bin_dir.iterdir()) == []
    assert not (host.root / "run/pinion").exists()


def test_when_the_primary_is_gone_ours_goes_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = k3s_host(tmp_path)
    primary = host.write_primary("10-flannel.conflist", FLANNEL)
    cni(capsys, "install", "--host-root", str(host.root))
    primary.unlink()

    status, _, err = cni(capsys, "install", "--host-root", str(host.root))

    assert status == 1 and "removed 00-pinion.conflist (its primary is gone)" in err
    assert host.config_names() == []


BAD_PRIMARIES = {
    "not JSON": ("{\"name\": \"cbr0\", ", "is not valid JSON"),
    "not an object": ("[1, 2]", "is not a JSON object"),
    "unknown cniVersion": (dict(FLANNEL, cniVersion="9.9.9"),
                           'cniVersion "9.9.9" is not one pinion-cni supports'),
    "cniVersion 1.1.0": (dict(FLANNEL, cniVersion="1.1.0"),
                         'cniVersion "1.1.0" is not one pinion-cni supports'),
    "no plugins": (dict(FLANNEL, plugins=[]), "has no plugins"),
    "a plugin without type": (dict(FLANNEL, plugins=[{"bridge": "cni0"}]),
                              'plugin 0 has no "type"'),
    "already has pinion-cni": (json.loads((REPO / "cni/10-pinion-example.conflist").read_text()),
                               "already contains pinion-cni (plugin 1)"),
    "NaN": ('{"name": "x", "cniVersion": "1.0.0", "plugins": [{"type": "a", "mtu": NaN}]}',
            "is not valid JSON"),
    "empty (k3s mid-write)": ("", "is not valid JSON"),
}


@pytest.mark.parametrize("content, reason", BAD_PRIMARIES.values(), ids=BAD_PRIMARIES.keys())
def test_a_bad_primary_is_refused_clearly_and_nothing_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: Any, reason: str
) -> None:
    host = k3s_host(tmp_path)
    host.write_primary("10-flannel.conflist", content)

    status, out, err = cni(capsys, "install", "--host-root", str(host.root))

    assert (status, out) == (1, "")
    assert err.startswith("pinion cni install: 10-flannel.conflist: ") and reason in err
    assert err.rstrip().endswith("nothing written") and err.count("\n") == 1
    assert host.config_names() == ["10-flannel.conflist"]
    assert list(host.bin_dir.iterdir()) == []


@pytest.mark.parametrize("content, reason", BAD_PRIMARIES.values(), ids=BAD_PRIMARIES.keys())
def test_a_bad_primary_keeps_the_last_good_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: Any, reason: str
) -> None:
    host = k3s_host(tmp_path)
    host.write_primary("10-flannel.conflist", FLANNEL)
    cni(capsys, "install", "--host-root", str(host.root))
    last_good = identity(host.own)
    host.write_primary("10-flannel.conflist", content)

    status, _, err = cni(capsys, "install", "--host-root", str(host.root))

    assert status == 1 and reason in err
    assert "kept 00-pinion.conflist (derived from 10-flannel.conflist) as the last good" in err
    assert identity(host.own) == last_good


def test_a_dangling_symlink_primary_is_unreadable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = k3s_host(tmp_path)
    (host.conf_dir / "10-flannel.conflist").symlink_to(tmp_path / "missing.conflist")

    status, _, err = cni(capsys, "install", "--host-root", str(host.root))

    assert status == 1
    assert "10-flannel.conflist: cannot be read (No such file or directory)" in err


def test_a_primary_we_may_not_read_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Root ignores chmod 000, so open() is made to fail as it would for another user."""
    host = k3s_host(tmp_path)
    host.write_primary("10-flannel.conflist", FLANNEL)
    assert reconcile(host.settings()).status is Status.INSTALLED
    real_open = builtins.open

    def guarded_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if str(file).endswith("10-flannel.conflist"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    outcome = reconcile(host.settings())

    assert outcome.status is Status.REFUSED
    assert outcome.message.startswith("10-flannel.conflist: cannot be read (Permission denied)")
    assert "kept 00-pinion.conflist" in outcome.message and host.own.is_file()


def test_a_relative_agent_socket_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = k3s_host(tmp_path)
    status, _, err = cni(capsys, "install", "--host-root", str(host.root),
                         "--agent-socket", "cni.sock")
    assert status == 2 and "absolute" in err


def test_a_missing_bin_dir_fails_before_any_config_is_written(tmp_path: Path) -> None:
    host = k3s_host(tmp_path)
    host.write_primary("10-flannel.conflist", FLANNEL)
    host.bin_dir.rmdir()
    (host.root / "var/lib/rancher/k3s/data/current").unlink(missing_ok=True)

    outcome = reconcile(host.settings())

    assert outcome.status is Status.FAILED and "does not exist (see --bin-dir)" in outcome.message
    assert host.config_names() == ["10-flannel.conflist"]


# ---------------------------------------------------------------- uninstall


def test_uninstall_removes_exactly_what_install_added(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = k3s_host(tmp_path)
    primary = host.write_primary("10-flannel.conflist", FLANNEL)
    other = host.write_primary("20-other.conflist", dict(FLANNEL, name="other"))
    before = primary.read_bytes(), other.read_bytes()
    cni(capsys, "install", "--host-root", str(host.root))

    status, out, _ = cni(capsys, "uninstall", "--host-root", str(host.root))

    assert status == 0
    assert out.strip() == f"pinion cni uninstall: removed {host.own}, {host.plugin}"
    assert host.config_names() == ["10-flannel.conflist", "20-other.conflist"]
    assert (primary.read_bytes(), other.read_bytes()) == before
    assert not host.plugin.exists()
    assert cni(capsys, "uninstall", "--host-root", str(host.root))[:2] == (
        0, "pinion cni uninstall: nothing of Pinion's to remove\n")


def test_uninstall_keeps_a_file_named_like_ours_without_our_marker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = k3s_host(tmp_path)
    host.write_primary("00-pinion.conflist", FLANNEL)  # someone else's, hand-written

    assert cni(capsys, "uninstall", "--host-root", str(host.root))[0] == 0
    assert host.config_names() == ["00-pinion.conflist"]


def test_uninstall_leaves_a_plugin_that_is_not_ours_or_still_used(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = k3s_host(tmp_path)
    host.plugin.write_bytes(b"#!/bin/sh\n# another build\n")
    _, out, _ = cni(capsys, "uninstall", "--host-root", str(host.root))
    assert "left" in out and "not the plugin this installer ships" in out
    assert host.plugin.exists()

    host.plugin.write_bytes(PLUGIN.read_bytes())
    (host.conf_dir / "10-pinion-example.conflist").write_bytes(
        (REPO / "cni/10-pinion-example.conflist").read_bytes())
    _, out, _ = cni(capsys, "uninstall", "--host-root", str(host.root))
    assert "10-pinion-example.conflist still uses it" in out
    assert host.plugin.exists()


# ---------------------------------------------------------------- derive (pure)


def test_derive_refuses_a_conf_holding_a_plugin_list() -> None:
    result = derive("10-x.conf", json.dumps(FLANNEL), OPTIONS)
    assert isinstance(result, Refusal)
    assert str(result).startswith("10-x.conf: is a single-plugin config")


def test_derive_refuses_its_own_output_as_a_primary() -> None:
    ours = derive("10-flannel.conflist", json.dumps(FLANNEL), OPTIONS)
    assert not isinstance(ours, Refusal)
    again = derive("10-copy.conflist", ours.text, OPTIONS)
    assert isinstance(again, Refusal) and "derived config, not a primary" in again.reason


def test_derive_checks_every_cni_versions_entry() -> None:
    good = derive("a.conflist", json.dumps(dict(FLANNEL, cniVersions=["0.4.0", "1.0.0"])), OPTIONS)
    bad = derive("a.conflist", json.dumps(dict(FLANNEL, cniVersions=["1.0.0", "1.1.0"])), OPTIONS)
    assert not isinstance(good, Refusal)
    assert isinstance(bad, Refusal) and 'cniVersions entry "1.1.0"' in bad.reason


JSON_SCALARS = (st.none() | st.booleans() | st.integers() | st.text(max_size=8)
                | st.floats(allow_nan=False, allow_infinity=False))
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children,
                                                                       max_size=3),
    max_leaves=8)
PLUGIN_TYPES = st.sampled_from(["bridge", "flannel", "portmap", "pinion-cni", ""]) | JSON_SCALARS
PLUGINS = st.builds(lambda extra, kind: {**extra, "type": kind},
                    st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=3), PLUGIN_TYPES)
VERSIONS = st.sampled_from(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0", "9.9.9", ""]) | JSON_SCALARS
CONFLISTS = st.fixed_dictionaries(
    {"name": st.text(max_size=6) | JSON_SCALARS, "cniVersion": VERSIONS,
     "plugins": st.lists(PLUGINS | JSON_VALUES, max_size=4)},
    optional={"disableCheck": st.booleans(), MARKER_KEY: JSON_VALUES, "extra": JSON_VALUES})
SINGLE_CONFS = st.fixed_dictionaries(
    {"name": st.text(max_size=6), "cniVersion": VERSIONS, "type": PLUGIN_TYPES},
    optional={"ipam": JSON_VALUES, "plugins": JSON_VALUES})
PRIMARY_TEXTS = st.one_of(
    (CONFLISTS | SINGLE_CONFS | JSON_VALUES).map(json.dumps),
    (CONFLISTS | SINGLE_CONFS).map(json.dumps).flatmap(
        lambda text: st.integers(0, len(text)).map(lambda cut: text[:cut])),
    st.text(max_size=40))


@settings(max_examples=400, deadline=None)
@given(name=st.sampled_from(["10-flannel.conflist", "10-bridge.conf", "99-lab.json"]),
       text=PRIMARY_TEXTS)
def test_derive_refuses_or_appends_pinion_cni_and_never_raises(name: str, text: str) -> None:
    result = derive(name, text, OPTIONS)

    if isinstance(result, Refusal):
        assert str(result).startswith(f"{name}: ") and result.reason
        return
    derived = json.loads(result.text, parse_constant=lambda constant: pytest.fail(constant))
    primary = json.loads(text)
    if name.endswith(".conflist"):
        expected = primary["plugins"]
    else:
        expected = [{k: v for k, v in primary.items() if k not in ("name", "cniVersion")}]
    assert derived["plugins"][-1] == {"type": "pinion-cni", **OPTIONS}
    assert derived["plugins"][:-1] == expected
    assert (derived["name"], derived["cniVersion"]) == (primary["name"], primary["cniVersion"])
    assert primary["cniVersion"] in cni_install.SUPPORTED_CNI_VERSIONS
    assert "pinion-cni" not in [plugin["type"] for plugin in expected]


# ---------------------------------------------------------------- the watcher


@contextlib.contextmanager
def watching(host: Host, poll: bool, resync: float = 60.0) -> Iterator[list[str]]:
    """Runs `install --watch` in a thread; yields the names written (atomically) so far."""
    writes: list[str] = []
    real_atomic_write = files.atomic_write

    def counting_write(path: Path, data: bytes, mode: int) -> None:
        writes.append(path.name)
        real_atomic_write(path, data, mode)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(files, "atomic_write", counting_write)
        stop = StopSignal()
        source = PollingSource(host.conf_dir, 0.1) if poll else InotifySource(host.conf_dir, 0.1)
        thread = threading.Thread(target=cni_install.watch, args=(host.settings(), source, stop),
                                  kwargs={"resync_seconds": resync}, daemon=True)
        thread.start()
        try:
            yield writes
        finally:
            stop.set()
            thread.join(10)
            source.close()
            stop.close()
        assert not thread.is_alive(), "the watcher did not stop"


def derived_from_sha(host: Host) -> str | None:
    try:
        return str(host.derived()[MARKER_KEY]["sha256"])
    except (OSError, ValueError, KeyError):
        return None


def sha_of(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def k3s_rewrites_by_rename(path: Path, document: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.k3s-tmp")
    temporary.write_text(json.dumps(document))
    os.replace(temporary, path)


def k3s_rewrites_in_place(path: Path, document: dict[str, Any]) -> None:
    """os.WriteFile: truncate, then write (in two parts here, to be caught mid-way)."""
    text = json.dumps(document, indent=3)
    with open(path, "w") as file:
        file.write(text[:10])
        file.flush()
        time.sleep(0.05)
        file.write(text[10:])


@pytest.mark.parametrize("poll", [False, True], ids=["inotify", "poll"])
@pytest.mark.parametrize("rewrite", [k3s_rewrites_by_rename, k3s_rewrites_in_place])
def test_the_watcher_follows_k3s_rewriting_the_primary(
    tmp_path: Path, poll: bool, rewrite: Callable[[Path, dict[str, Any]], None]
) -> None:
    host = k3s_host(tmp_path)
    primary = host.write_primary("10-flannel.conflist", FLANNEL)

    with watching(host, poll) as writes:
        wait_until(lambda: derived_from_sha(host) == sha_of(primary))
        assert sorted(writes) == ["00-pinion.conflist", "pinion-cni"]

        for mtu in (1450, 1400):
            delegate = dict(FLANNEL["plugins"][0]["delegate"], mtu=mtu)
            rewrite(primary, dict(FLANNEL, plugins=[{"type": "flannel", "delegate": delegate}]))
            wait_until(lambda: derived_from_sha(host) == sha_of(primary))
            assert host.derived()["plugins"][0]["delegate"]["mtu"] == mtu

        time.sleep(0.6)  # long enough for a rewrite loop to show itself
        assert writes.count("00-pinion.conflist") == 3  # the first install + two changes
        assert writes.count("pinion-cni") == 1


@pytest.mark.parametrize("poll", [False, True], ids=["inotify", "poll"])
def test_the_watcher_waits_for_a_primary_and_keeps_the_last_good_one(
    tmp_path: Path, poll: bool, caplog: pytest.LogCaptureFixture
) -> None:
    host = k3s_host(tmp_path)
    host.conf_dir.rmdir()  # k3s has not even created its conf dir yet
    caplog.set_level(logging.INFO)

    with watching(host, poll):
        time.sleep(0.3)
        assert not host.conf_dir.exists() and list(host.bin_dir.iterdir()) == []
        host.conf_dir.mkdir()
        primary = host.write_primary("10-flannel.conflist", FLANNEL)
        wait_until(lambda: derived_from_sha(host) == sha_of(primary))
        last_good = host.own.read_bytes()

        host.write_primary("10-flannel.conflist", dict(FLANNEL, cniVersion="9.9.9"))
        wait_until(lambda: "is not one pinion-cni supports" in caplog.text)
        assert host.own.read_bytes() == last_good

        host.write_primary("10-flannel.conflist", dict(FLANNEL, cniVersion="0.3.1"))
        wait_until(lambda: host.derived()["cniVersion"] == "0.3.1")

    assert "kept 00-pinion.conflist (derived from 10-flannel.conflist)" in caplog.text
    assert "no primary CNI config" in caplog.text


def test_the_watcher_switches_when_another_config_becomes_primary(tmp_path: Path) -> None:
    host = k3s_host(tmp_path)
    host.write_primary("10-flannel.conflist", FLANNEL)

    with watching(host, poll=False):
        wait_until(host.own.exists)
        calico = host.write_primary("05-calico.conflist", dict(FLANNEL, name="k8s-pod-network"))
        wait_until(lambda: derived_from_sha(host) == sha_of(calico))
        assert host.derived()["name"] == "k8s-pod-network"


def test_the_periodic_resync_restores_a_deleted_config_of_ours(tmp_path: Path) -> None:
    host = k3s_host(tmp_path)
    host.write_primary("10-flannel.conflist", FLANNEL)

    with watching(host, poll=False, resync=0.3):
        wait_until(host.own.exists)
        host.own.unlink()
        wait_until(host.own.exists)


def test_without_inotify_the_watcher_polls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_inotify(*args: Any, **kwargs: Any) -> None:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(InotifySource, "__init__", no_inotify)
    source = make_change_source(tmp_path, poll=False, poll_interval=2.0)
    assert isinstance(source, PollingSource)
    assert "inotify unavailable (Function not implemented); polling" in caplog.text
    assert isinstance(make_change_source(tmp_path, poll=True, poll_interval=1), PollingSource)


def test_inotify_events_are_parsed_with_their_names() -> None:
    def event(mask: int, name: bytes, length: int) -> bytes:
        return struct.pack("iIII", 1, mask, 0, length) + name.ljust(length, b"\0")

    buffer = event(IN_CLOSE_WRITE, b"10-flannel.conflist", 32) + event(IN_IGNORED, b"", 0)
    assert parse_events(buffer) == [(IN_CLOSE_WRITE, "10-flannel.conflist"), (IN_IGNORED, "")]


@pytest.mark.parametrize("uninstall_on_exit", [True, False])
def test_sigterm_stops_the_watcher_cleanly(tmp_path: Path, uninstall_on_exit: bool) -> None:
    host = k3s_host(tmp_path)
    primary = host.write_primary("10-flannel.conflist", FLANNEL)
    command = [sys.executable, "-m", "agent", "cni", "install", "--watch",
               "--host-root", str(host.root)]
    if uninstall_on_exit:
        command.append("--uninstall-on-exit")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True) as process:
        try:
            wait_until(host.own.exists, timeout=15)  # signal handlers are set before this
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=15)
        finally:
            process.kill()
    assert process.returncode == 0, stderr
    assert "stop requested" in stderr
    assert host.own.exists() is not uninstall_on_exit
    assert host.plugin.exists() is not uninstall_on_exit
    assert primary.read_text() == json.dumps(FLANNEL, indent=1)


def test_uninstall_function_reports_failures_as_outcomes(tmp_path: Path) -> None:
    host = k3s_host(tmp_path)
    outcome = uninstall(detect_layout(host.root), None)
    assert outcome.ok and outcome.message == "nothing of Pinion's to remove"
