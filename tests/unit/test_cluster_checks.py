"""`pinion check --kubeconfig`: the cluster's side of `linkerd check`, against the in-test
API server (real HTTPS list/get), and the agents it finds there."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main
from agent.identity.files import init_identity_dir
from tests.support.kubeapi import FakeApiServer


@pytest.fixture
def api(tmp_path: Path) -> Iterator[FakeApiServer]:
    with FakeApiServer(directory=tmp_path / "api") as server:
        yield server


def installed(api: FakeApiServer, tmp_path: Path, ready: int = 2) -> None:
    """What `kubectl apply` of `pinion install` and a running cluster would leave."""
    identity = tmp_path / "identity"
    init_identity_dir(identity)
    meta = {"namespace": "pinion-system"}
    api.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "pinion-system"}})
    api.apply({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "pinion-issuer", **meta},
               "spec": {}, "status": {"availableReplicas": 1}})
    api.apply({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "pinion-agent", **meta},
               "spec": {}, "status": {"desiredNumberScheduled": 2, "numberReady": ready,
                                      "updatedNumberScheduled": 2}})
    api.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "pinion-trust-bundle", **meta},
               "data": {"trust-bundle.crt": (identity / "trust-bundle.crt").read_text()}})
    for index, host in enumerate(("127.0.0.1", "127.0.0.2")):
        api.apply(agent_pod(f"pinion-agent-{index}", host))


def agent_pod(name: str, host: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "pinion-system",
                         "labels": {"app.kubernetes.io/name": "pinion-agent"}},
            "spec": {"hostNetwork": True, "containers": [{"name": "agent", "image": "x"}]},
            "status": {"hostIP": host, "phase": "Running"}}


def check(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(["check", "--timeout", "1", *argv])
    return code, capsys.readouterr().out


def test_an_installed_cluster_passes_its_checks_and_the_agents_it_runs_are_checked_too(
        api: FakeApiServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    installed(api, tmp_path)

    code, out = check(capsys, "--kubeconfig", str(api.kubeconfig))

    assert "✓ the Kubernetes API answers: v1." in out
    assert "✓ issuer is available (1 replica)" in out
    assert "✓ an agent is ready on every node (2/2)" in out
    assert "✓ the trust bundle holds valid anchors" in out
    # found through the API: nothing listens on the nodes' 4191 here, so they fail
    assert "agent 127.0.0.1:4191" in out and "agent 127.0.0.2:4191" in out
    assert code == 1


def test_a_node_without_a_ready_agent_fails_with_a_hint(
        api: FakeApiServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    installed(api, tmp_path, ready=1)

    code, out = check(capsys, "--kubeconfig", str(api.kubeconfig), "--agent", "127.0.0.1:9")

    assert "✗ an agent is ready on every node (1/2)" in out
    assert "hint: kubectl -n pinion-system get pods -l app.kubernetes.io/name=pinion-agent -o wide" in out
    assert code == 1


def test_before_install_pre_checks_the_api_and_that_the_namespace_is_free(
        api: FakeApiServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = check(capsys, "--pre", "--kubeconfig", str(api.kubeconfig))

    assert "✓ the Kubernetes API answers" in out
    assert "✓ namespace pinion-system is free (not installed yet)" in out
    assert "this host: prerequisites for running an agent" in out
    assert code == (1 if "✗" in out else 0)  # the host's own lines depend on this machine


def test_not_installed_says_how_to_install(api: FakeApiServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = check(capsys, "--kubeconfig", str(api.kubeconfig))

    assert "✗ namespace pinion-system exists" in out and "pinion install | kubectl apply -f -" in out
    assert code == 1


def test_an_unreachable_api_is_one_clear_failure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with FakeApiServer(directory=tmp_path / "gone") as server:
        kubeconfig = server.kubeconfig
    code, out = check(capsys, "--kubeconfig", str(kubeconfig))

    assert "✗ the Kubernetes API at https://127.0.0.1:" in out
    assert code == 1
