"""The lab builds real nodes and pods with real CNI plugins, and leaves nothing behind."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import select
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from agent.lab.cni import CniError
from agent.lab.topology import Lab, Pod, cgroup2_mount

pytestmark = pytest.mark.netns

HTTP_PORT = 8080


def _lab_namespaces(run_id: str) -> set[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    names = {line.split()[0] for line in listing.stdout.splitlines() if line.strip()}
    return {name for name in names if name.startswith(f"pn{run_id}-")}


def _assert_nothing_left(lab: Lab) -> None:
    assert _lab_namespaces(lab.run_id) == set()
    assert lab.cgroup_root is None or not lab.cgroup_root.exists()
    assert not lab.workdir.exists()


@contextlib.contextmanager
def _closing_lab(**options: Any) -> Iterator[Lab]:
    lab = Lab(**options)
    try:
        yield lab
    finally:
        lab.close()
        _assert_nothing_left(lab)


@pytest.fixture
def lab() -> Iterator[Lab]:
    with _closing_lab(nodes=2) as built:
        yield built


def _serve_http(pod: Pod) -> subprocess.Popen[bytes]:
    """Start the lab HTTP server in a pod; return once it says it is listening."""
    server = pod.spawn(
        [sys.executable, "-m", "agent.lab.httpserver", "--port", str(HTTP_PORT)], stdout=subprocess.PIPE
    )
    assert server.stdout is not None
    ready, _, _ = select.select([server.stdout], [], [], 10.0)
    line = server.stdout.readline() if ready else b""
    assert line.strip() == b"listening", f"server in {pod.name} did not start: {line!r}"
    return server


def _whoami(client: Pod, server: Pod) -> str:
    """What the server pod sees as the client pod's source address."""
    url = f"http://{server.ip}:{HTTP_PORT}/whoami"
    return client.run(["curl", "-s", "--max-time", "5", url]).stdout.strip()


def _reserved_ips(lab: Lab, node_name: str) -> list[str]:
    """IPs host-local still holds for a node (it keeps one file per reserved address)."""
    reserved = []
    for path in (lab.workdir / "ipam" / node_name).rglob("*"):
        with contextlib.suppress(ValueError):
            reserved.append(str(ipaddress.ip_address(path.name)))
    return reserved


@pytest.mark.parametrize(("server_node", "client_node"), [(0, 0), (1, 0)], ids=["same-node", "cross-node"])
def test_pods_reach_each_other_and_see_the_real_source_ip(
    lab: Lab, server_node: int, client_node: int
) -> None:
    server = lab.add_pod(lab.nodes[server_node], "server")
    client = lab.add_pod(lab.nodes[client_node], "client")
    assert ipaddress.ip_address(server.ip) in ipaddress.ip_network(server.node.pod_cidr)
    assert ipaddress.ip_address(client.ip) in ipaddress.ip_network(client.node.pod_cidr)

    _serve_http(server)

    assert _whoami(client, server) == client.ip


def test_pod_processes_run_in_the_pod_cgroup_and_netns(lab: Lab) -> None:
    pod = lab.add_pod(lab.nodes[0], "worker")
    sleeper = pod.spawn(["sleep", "60"])

    mount = cgroup2_mount()
    assert mount is not None and pod.cgroup_path is not None
    with open(f"/proc/{sleeper.pid}/cgroup") as cgroups:
        unified = next(line for line in cgroups if line.startswith("0::"))
    assert mount / unified.strip()[len("0::/") :] == pod.cgroup_path
    assert pod.cgroup_path.parent == lab.cgroup_root / pod.node.name
    assert os.stat(f"/proc/{sleeper.pid}/ns/net").st_ino == os.stat(pod.netns_path).st_ino


def test_close_removes_namespaces_cgroups_and_processes() -> None:
    lab = Lab(nodes=2)
    try:
        pod = lab.add_pod(lab.nodes[0], "sleeper")
        in_pod = pod.spawn(["sleep", "60"])
        on_node = lab.nodes[1].spawn(["sleep", "60"])
        assert _lab_namespaces(lab.run_id) == {
            f"pn{lab.run_id}-sw",
            f"pn{lab.run_id}-n0",
            f"pn{lab.run_id}-n1",
            pod.netns,
        }
        assert lab.cgroup_root is not None and lab.cgroup_root.is_dir()
    finally:
        lab.close()
        _assert_nothing_left(lab)
    assert in_pod.returncode is not None
    assert on_node.returncode is not None
    lab.close()  # idempotent


def test_a_failing_chain_raises_and_leaves_no_pod_behind() -> None:
    with _closing_lab(nodes=1, extra_plugins=lambda node: [{"type": "does-not-exist"}]) as lab:
        with pytest.raises(CniError) as failure:
            lab.add_pod(lab.nodes[0], "doomed")

        assert failure.value.plugin == "does-not-exist"
        assert _lab_namespaces(lab.run_id) == {f"pn{lab.run_id}-sw", f"pn{lab.run_id}-n0"}
        assert lab.pods == []
        assert lab.cgroup_root is not None
        assert [path for path in (lab.cgroup_root / "node0").iterdir() if path.is_dir()] == []
        assert _reserved_ips(lab, "node0") == []  # DEL ran for the whole chain


def test_cni_0_4_0_pods_work_and_pass_check(lab: Lab) -> None:
    old = lab.add_pod(lab.nodes[0], "old", cni_version="0.4.0")
    new = lab.add_pod(lab.nodes[1], "new")
    assert old.result["cniVersion"] == "0.4.0"
    assert new.result["cniVersion"] == "1.0.0"

    lab.check_pod(old)
    lab.check_pod(new)
    _serve_http(old)

    assert _whoami(new, old) == new.ip


def test_deleting_a_pod_releases_everything_it_held(lab: Lab) -> None:
    node = lab.nodes[0]
    pod = lab.add_pod(node, "short-lived", namespace="jobs")
    sleeper = pod.spawn(["sleep", "60"])
    assert _reserved_ips(lab, node.name) == [pod.ip]

    lab.delete_pod(pod)

    assert sleeper.returncode is not None
    assert pod.netns not in _lab_namespaces(lab.run_id)
    assert pod.cgroup_path is not None and not pod.cgroup_path.exists()
    assert _reserved_ips(lab, node.name) == []
    assert lab.pods == []
    again = lab.add_pod(node, "short-lived", namespace="jobs")
    assert again.netns == pod.netns


def test_long_pod_names_get_short_unique_namespace_names(lab: Lab) -> None:
    first = lab.add_pod(lab.nodes[0], "a-very-long-deployment-name-7d9f8c6b5-abcde")
    second = lab.add_pod(lab.nodes[0], "a-very-long-deployment-name-7d9f8c6b5-vwxyz")

    assert first.netns != second.netns
    assert len(first.netns) <= 40 and len(second.netns) <= 40
    assert first.netns.startswith(f"{lab.nodes[0].netns}-a-very-long")
