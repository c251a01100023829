"""The CNI installer at exit: a DaemonSet rollout keeps pinion-cni in the chain, an
uninstall (the DaemonSet gone or being deleted, or no API to ask) takes it out."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.controlplane.cni_install.rollout import uninstall_unless_rolling
from tests.support.kubeapi import FakeApiServer

DAEMONSET = "pinion-system/pinion-agent"


@pytest.fixture
def api(tmp_path: Path) -> Iterator[FakeApiServer]:
    with FakeApiServer(directory=tmp_path / "api") as server:
        server.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "pinion-system"}})
        yield server


def daemonset(**metadata: str) -> dict[str, object]:
    return {"apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": "pinion-agent", "namespace": "pinion-system", **metadata}, "spec": {}}


def test_a_rollout_keeps_the_chain(api: FakeApiServer) -> None:
    api.apply(daemonset())

    assert uninstall_unless_rolling(DAEMONSET, str(api.kubeconfig)) is False


def test_an_uninstall_removes_it(api: FakeApiServer) -> None:
    assert uninstall_unless_rolling(DAEMONSET, str(api.kubeconfig)) is True


def test_a_daemonset_being_deleted_removes_it(api: FakeApiServer) -> None:
    api.apply(daemonset(deletionTimestamp="2026-11-21T10:00:00Z"))

    assert uninstall_unless_rolling(DAEMONSET, str(api.kubeconfig)) is True


def test_no_api_to_ask_removes_it_so_the_node_keeps_starting_pods(tmp_path: Path) -> None:
    with FakeApiServer(directory=tmp_path / "gone") as server:
        kubeconfig = str(server.kubeconfig)

    assert uninstall_unless_rolling(DAEMONSET, kubeconfig, timeout=1.0) is True
