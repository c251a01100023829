"""Pinion as a k3s node runs it: a real containerd (Debian's 1.6, its CRI plugin) drives the
CNI chain, and the DaemonSet's two containers run from the image under the manifest's own
security context and mounts.

Two simulated nodes (lab netns on one underlay), each with a containerd of its own on a
k3s-laid-out directory: CNI conf dir agent/etc/cni/net.d, bin dir data/cni, a bridge +
host-local conflist where k3s writes flannel's. Pods are made through the CRI API as kubelet
makes them (RunPodSandbox, CreateContainer, StopPodSandbox, RemovePodSandbox over gRPC), so the
netns paths, the K8S_POD_* args and the DEL on stop are the runtime's. The images are
`make image` and `make pause-image`'s, copied from podman's storage into each containerd.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.identity.files import init_identity_dir
from agent.lab.topology import Lab
from tests.netns.conftest import REPO, cgroup_programs, eventually
from tests.netns.test_kubernetes import (
    API_PORT,
    ISSUER_HOST,
    ISSUER_PORT,
    listening_socket,
    pod_object,
    start_issuer,
)
from tests.support import daemonset
from tests.support.containerd import IMAGE, PAUSE_IMAGE, K3sNode
from tests.support.cri import CriError
from tests.support.k3spods import (
    AgentPod,
    KubeAccess,
    WorkloadPod,
    sandbox_gone,
    unified_cgroup_mount,
)
from tests.support.kubeapi import FakeApiServer

HTTP_SERVER = ["python3", "-m", "agent.lab.httpserver", "--port", "8080"]
IDENTITY = "spiffe://cluster.local/ns/default/sa/default"
BPF_ROOT = Path("/sys/fs/bpf/pinion")


# ---------------------------------------------------------------- images and the cluster


def image_problem() -> str | None:
    """Why the images cannot be used: missing, or built from other sources than these (the
    lane would test another agent): `make image` labels it with deploy/image/sources-digest."""
    if shutil.which("podman") is None or shutil.which("containerd") is None:
        return "needs podman and containerd (sudo make deps)"
    missing = [image for image in (IMAGE, PAUSE_IMAGE)
               if subprocess.run(["podman", "image", "exists", image]).returncode != 0]
    if missing:
        return f"no image {', '.join(missing)} in podman's storage (sudo make image pause-image)"
    # binfmt_misc would run another architecture's agent here, emulated and slowly: refuse it
    # (`make image ARCH=arm64` tags localhost/pinion:dev-arm64, never this one).
    architecture = subprocess.run(["podman", "image", "inspect", "--format", "{{.Architecture}}", IMAGE],
                                  capture_output=True, text=True, check=True).stdout.strip()
    host = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True).stdout.strip()
    if architecture != host:
        return f"{IMAGE} is linux/{architecture}, this host is {host} (sudo make image)"
    if os.environ.get("PINION_IMAGE"):
        return None  # named by the caller: theirs to keep current
    label = subprocess.run(["podman", "image", "inspect", "--format",
                            '{{index .Labels "io.pinion.sources"}}', IMAGE],
                           capture_output=True, text=True, check=True).stdout.strip()
    sources = subprocess.run([sys.executable, str(REPO / "deploy/image/sources-digest")],
                             capture_output=True, text=True, check=True).stdout.strip()
    if label != sources:
        return f"{IMAGE} was built from other sources than this checkout's (sudo make image)"
    return None


@pytest.fixture(scope="module")
def image_archives(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The pause and Pinion images, saved from podman's storage for `ctr images import`."""
    problem = image_problem()
    if problem is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(problem)
        pytest.skip(problem)
    directory = tmp_path_factory.mktemp("images")
    archives = []
    for image, name in ((PAUSE_IMAGE, "pause.tar"), (IMAGE, "pinion.tar")):
        subprocess.run(["podman", "save", "-q", "--format", "docker-archive", "-o",
                        str(directory / name), image], check=True, timeout=300)
        archives.append(directory / name)
    return archives


@dataclass
class Cluster:
    lab: Lab
    nodes: list[K3sNode] = field(default_factory=list)
    agents: list[AgentPod] = field(default_factory=list)

    def workload(self, node: int, name: str) -> WorkloadPod:
        return WorkloadPod(self.nodes[node], name).run()


@contextlib.contextmanager
def k3s_cluster(redirect: str, archives: list[Path]) -> Iterator[Cluster]:
    """Two nodes, each: containerd, the agent pod's installer container, then its agent."""
    lab = Lab(nodes=2)
    cluster = Cluster(lab)
    try:
        identity = lab.workdir / "identity"
        init_identity_dir(identity, trust_domain="cluster.local")
        for lab_node in lab.nodes:
            node = K3sNode(lab_node, lab.workdir / f"k3s-{lab_node.name}")
            lab.on_close(f"containerd of {lab_node.name}", node.close)
            cluster.nodes.append(node)
            node.start()
            node.import_images(archives)
            bpf_dir = BPF_ROOT / f"cri-{lab.run_id}-{lab_node.name}"
            lab.on_close(f"bpf pins {bpf_dir}", lambda d=bpf_dir: shutil.rmtree(d, ignore_errors=True))
            agent = AgentPod(node, redirect, str(bpf_dir), identity_dir=identity)
            cluster.agents.append(agent)
            agent.boot()
        for agent in cluster.agents:
            agent.wait_ready()
            if redirect == "ebpf":  # a fallback to netfilter must not pass for eBPF
                assert "redirect ebpf" in agent.log("agent"), agent.log("agent")[-3000:]
                # In its container's own cgroup, under its pod's (found from PINION_POD_UID):
                # its getsockopt program answers for the agent's sockets, not the node's.
                own = Path(f"/proc/{agent.pid('agent')}/cgroup").read_text()
                assert f"0::{agent.sandbox.cgroup_parent}/" in own, own
                assert pinion_programs(agent.cgroup()) == ["pinion_getsockopt"]
        for agent in cluster.agents:  # the DaemonSet's memory limit, on the agent's container
            assert memory_limit(agent.pid("agent")) == 256 << 20
        yield cluster
    finally:
        for agent in cluster.agents:
            print(f"--- {agent.node.node.name}: agent ---\n{agent.log('agent')[-4000:]}")
            print(f"--- {agent.node.node.name}: cni-installer ---\n{agent.log('cni-installer')[-1500:]}")
        for node in cluster.nodes:
            errors = [line for line in node.log().splitlines() if "level=error" in line]
            print(f"--- {node.node.name}: containerd errors ---\n" + "\n".join(errors[-10:]))
        lab.close()


def memory_limit(pid: int) -> int:
    """The memory limit of a process's cgroup: v1's memory controller, else v2's memory.max."""
    entries = [line.split(":", 2) for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()]
    for _, controllers, path in entries:
        if "memory" in controllers.split(","):
            return int(Path(f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes").read_text())
    path = next(path for _, controllers, path in entries if controllers == "")
    return int((unified_cgroup_mount() / path.lstrip("/") / "memory.max").read_text())


# ---------------------------------------------------------------- in a pod, as kubectl exec


def exec_in(pod: WorkloadPod, argv: Sequence[str], timeout: float = 120,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run argv in the pod: its netns (the runtime's path) and a cgroup under the pod's own,
    where eBPF capture hangs, as a container of the pod would be."""
    cgroup = pod.cgroup() / "exec"
    cgroup.mkdir(exist_ok=True)
    script = f'echo $$ > {cgroup}/cgroup.procs && exec "$@"'
    return subprocess.run(["nsenter", f"--net={pod.netns_path}", "--", "sh", "-c", script, "sh",
                           *argv], capture_output=True, text=True, timeout=timeout, check=check)


def http_get(pod: WorkloadPod, url: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return exec_in(pod, ["curl", "-sS", "--max-time", "3", url], timeout=15, check=check)


def load(pod: WorkloadPod, url: str, requests: int, concurrency: int = 4) -> dict[str, int]:
    """ab (apache2-utils): `requests` requests, each its own connection; counts parsed."""
    done = exec_in(pod, ["ab", "-q", "-n", str(requests), "-c", str(concurrency), "-s", "10", url],
                   timeout=180, check=False)
    counts = {key: int(value) for key, value in re.findall(
        r"^(Complete requests|Failed requests|Non-2xx responses):\s+(\d+)", done.stdout, re.M)}
    assert "Complete requests" in counts, done.stdout + done.stderr
    return counts


@contextlib.contextmanager
def held_netns(pod: WorkloadPod) -> Iterator[str]:
    """A path to the pod's netns that outlives the runtime's (StopPodSandbox unmounts that):
    whatever the agent left in it can still be looked at."""
    fd = os.open(pod.netns_path, os.O_RDONLY)
    try:
        yield f"/proc/{os.getpid()}/fd/{fd}"
    finally:
        os.close(fd)


def left_in(netns: str) -> dict[str, list[str]]:
    """Pinion's rules, listeners and routing rules in a netns."""
    def run(*argv: str) -> str:
        return subprocess.run(["nsenter", f"--net={netns}", "--", *argv], capture_output=True,
                              text=True, check=True, timeout=30).stdout

    rules = run("nft", "list", "ruleset") + run("iptables-legacy-save")
    return {"rules": [line.strip() for line in rules.splitlines() if "pinion/" in line],
            "listeners": [line for line in run("ss", "-Hltn").splitlines()
                          if re.search(r":1500[168]\b", line)],
            "ip rules": [line for line in run("ip", "rule").splitlines() if "fwmark" in line]}


def pinion_programs(cgroup: Path) -> list[str]:
    if not cgroup.exists():
        return []
    return [str(p["name"]) for p in cgroup_programs(cgroup) if str(p["name"]).startswith("pinion_")]


def pods_of(agent: AgentPod) -> list[str]:
    return [pod["name"] for pod in json.loads(agent.get("/pods")[1])]


# ---------------------------------------------------------------- the tests


@pytest.mark.parametrize("redirect", ["nftables", "ebpf"])
def test_a_cri_pod_pair_on_two_nodes_talks_mtls_and_stop_leaves_nothing(
        redirect: str, image_archives: list[Path]) -> None:
    with k3s_cluster(redirect, image_archives) as cluster:
        client, server = cluster.workload(0, "client"), cluster.workload(1, "server")
        server.serve(HTTP_SERVER)
        # The runtime's own netns path and K8S_POD_* args reached the agents through the chain.
        for agent, pod in ((cluster.agents[0], client), (cluster.agents[1], server)):
            listed = json.loads(agent.get("/pods")[1])
            assert [(p["namespace"], p["name"]) for p in listed] == [("default", pod.name)]
            assert pod.netns_path in agent.log("agent")
        if redirect == "ebpf":
            assert "pinion_connect4" in pinion_programs(client.cgroup())

        counts = load(client, f"http://{server.ip}:8080/", 1000)
        assert counts["Complete requests"] == 1000
        assert counts["Failed requests"] == 0 and counts.get("Non-2xx responses", 0) == 0

        outbound, inbound = cluster.agents[0], cluster.agents[1]
        assert eventually(lambda: outbound.metrics().value(
            "response_total", direction="outbound", pod="client", tls="true", server_id=IDENTITY,
            status_code="200") == 1000 and inbound.metrics().value(
            "request_total", direction="inbound", pod="server", tls="true", client_id=IDENTITY) == 1000,
            timeout=10), outbound.metrics().text[-3000:] + inbound.metrics().text[-3000:]

        for agent in cluster.agents:  # for the record (pytest -s): what a node pays
            print(f"{agent.node.node.name} ({redirect}): agent {agent.rss_kib('agent')} KiB RSS, "
                  f"cni-installer {agent.rss_kib('cni-installer')} KiB")
        with held_netns(client) as client_netns, held_netns(server) as server_netns:
            before = {"client": left_in(client_netns), "server": left_in(server_netns)}
            assert all(found["rules"] and found["listeners"] for found in before.values()), before
            client.stop()
            server.stop()
            assert left_in(client_netns) == {"rules": [], "listeners": [], "ip rules": []}
            assert left_in(server_netns) == {"rules": [], "listeners": [], "ip rules": []}
        assert pinion_programs(client.cgroup()) == [] and pinion_programs(server.cgroup()) == []
        assert pods_of(outbound) == [] and pods_of(inbound) == []
        for pod in (client, server):
            pod.remove()
            assert sandbox_gone(pod.node, pod.sandbox_id)
            assert not Path(pod.netns_path).exists()


@pytest.mark.parametrize("redirect", ["nftables", "ebpf"])  # eBPF: pins re-adopted from bpffs
def test_restarts_as_kubernetes_does_them(redirect: str, image_archives: list[Path]) -> None:
    with k3s_cluster(redirect, image_archives) as cluster:
        client, server = cluster.workload(0, "client"), cluster.workload(1, "server")
        server.serve(HTTP_SERVER)
        url = f"http://{server.ip}:8080/"
        assert http_get(client, url).stdout.strip() == "ok"
        agent = cluster.agents[0]

        # The agent container dies (SIGKILL): the pod's rules stay, nobody listens: fail closed.
        agent.kill("agent")
        assert http_get(client, url, check=False).returncode != 0
        # A pod created meanwhile: the chain's ADD fails (closed), the runtime undoes the sandbox.
        late = WorkloadPod(cluster.nodes[0], "late")
        with pytest.raises(CriError, match="pinion"):
            late.run()
        with cluster.nodes[0].cri() as cri:
            assert sorted(cri.list_pod_sandboxes()) == sorted([agent.sandbox_id, client.sandbox_id])

        # kubelet starts a new container (attempt 1): the pod is re-adopted and works again,
        # and kubelet's retry of the late pod's sandbox now succeeds, captured.
        agent.start("agent")
        agent.wait_ready()
        if redirect == "ebpf":  # through the bpffs mount: the dead container's pins, in use
            assert "ebpf: adopted the programs and maps pinned" in agent.log("agent")
        assert http_get(client, url).stdout.strip() == "ok"
        late.run()
        assert sorted(pods_of(agent)) == ["client", "late"]
        assert http_get(late, url).stdout.strip() == "ok"

        # containerd restarts on both nodes: pods and the agent keep working while it is away,
        # and it finds its sandboxes again.
        for node in cluster.nodes:
            with node.cri() as cri:
                sandboxes = sorted(cri.list_pod_sandboxes())
            node.stop()
            assert http_get(client, url).stdout.strip() == "ok"
            node.start()
            with node.cri() as cri:
                assert sorted(cri.list_pod_sandboxes()) == sandboxes
        assert all(a.running("agent") and a.running("cni-installer") for a in cluster.agents)
        after = cluster.workload(1, "after-restart")
        assert http_get(after, url).stdout.strip() == "ok"
        assert sorted(pods_of(cluster.agents[1])) == ["after-restart", "server"]
        counts = load(client, url, 200)
        assert counts["Complete requests"] == 200 and counts["Failed requests"] == 0
        assert eventually(lambda: agent.metrics().value(
            "response_total", direction="outbound", pod="client", tls="true", status_code="200")
            >= 200, timeout=10)


# ---------------------------------------------------------------- in a cluster


@contextlib.contextmanager
def k3s_kubernetes_cluster(archives: list[Path], tmp_path: Path) -> Iterator[tuple[Cluster, FakeApiServer]]:
    """The same two nodes, the agents in Kubernetes mode as the DaemonSet runs them: the
    in-cluster config kubelet gives (API address env, automounted token and CA), the issuer
    token and trust bundle volumes; `pinion issuer` (as its Deployment, on node0) and the
    in-test API server (node0's underlay) are processes of the test."""
    identity = tmp_path / "identity"
    init_identity_dir(identity, trust_domain="cluster.local")
    lab = Lab(nodes=2)
    cluster = Cluster(lab)
    api: FakeApiServer | None = None
    try:
        api = FakeApiServer(lab.nodes[0].underlay_ip, API_PORT, tmp_path / "kubeapi",
                            listen_socket=listening_socket(lab)).start()
        for namespace, labels in (("pinion-system", {}), ("shop", {"pinion.dev/mesh": "enabled"})):
            api.apply({"apiVersion": "v1", "kind": "Namespace",
                       "metadata": {"name": namespace, "labels": labels}})
        start_issuer(lab, api, identity, tmp_path / "issuer.log")
        for lab_node in lab.nodes:
            node = K3sNode(lab_node, lab.workdir / f"k3s-{lab_node.name}")
            lab.on_close(f"containerd of {lab_node.name}", node.close)
            cluster.nodes.append(node)
            node.start()
            node.import_images(archives)
            account, issuer_token = f"sa-{uuid.uuid4().hex}", f"issuer-{uuid.uuid4().hex}"
            api.add_token(account, username="system:serviceaccount:pinion-system:pinion-agent")
            api.add_token(issuer_token, username="system:serviceaccount:pinion-system:pinion-agent",
                          extra={"authentication.kubernetes.io/node-name": [lab_node.name]},
                          audiences=("pinion-issuer",))
            kube = KubeAccess(lab.nodes[0].underlay_ip, API_PORT, api.ca_pem, account, issuer_token,
                              (identity / "trust-bundle.crt").read_bytes(),
                              f"https://{ISSUER_HOST}:{ISSUER_PORT}")
            bpf_dir = BPF_ROOT / f"cri-{lab.run_id}-{lab_node.name}"
            agent = AgentPod(node, "nftables", str(bpf_dir), kube=kube)
            cluster.agents.append(agent)
            agent.boot()
        for agent in cluster.agents:
            agent.wait_ready()
        yield cluster, api
    finally:
        for agent in cluster.agents:
            print(f"--- {agent.node.node.name}: agent ---\n{agent.log('agent')[-4000:]}")
            print(f"--- {agent.node.node.name}: cni-installer ---\n{agent.log('cni-installer')[-3000:]}")
        if (tmp_path / "issuer.log").exists():
            print(f"--- issuer ---\n{(tmp_path / 'issuer.log').read_text()[-2000:]}")
        lab.close()
        if api is not None:
            api.stop()


def cluster_pod(api: FakeApiServer, node: K3sNode, name: str, namespace: str) -> WorkloadPod:
    """As kubelet: the pod object (scheduled to the node) first, then the sandbox with the
    object's uid, then its IP in the status."""
    obj = api.apply(pod_object(name, namespace, node.node.name, None, None, name))
    pod = WorkloadPod(node, name, namespace, uid=obj["metadata"]["uid"]).run()
    obj["status"] = {"phase": "Running", "podIP": pod.ip, "podIPs": [{"ip": pod.ip}]}
    api.apply(obj)
    return pod


def test_in_kubernetes_mode_the_daemonsets_volumes_carry_identity_and_api_access(
        image_archives: list[Path], tmp_path: Path) -> None:
    with k3s_kubernetes_cluster(image_archives, tmp_path) as (cluster, api):
        client = cluster_pod(api, cluster.nodes[0], "client", "shop")
        server = cluster_pod(api, cluster.nodes[1], "server", "shop")
        server.serve(HTTP_SERVER)
        counts = load(client, f"http://{server.ip}:8080/", 200)
        assert counts["Complete requests"] == 200 and counts["Failed requests"] == 0
        client_id, server_id = ("spiffe://cluster.local/ns/shop/sa/client",
                                "spiffe://cluster.local/ns/shop/sa/server")
        outbound, inbound = cluster.agents[0], cluster.agents[1]
        assert eventually(lambda: outbound.metrics().value(
            "response_total", direction="outbound", pod="client", tls="true", server_id=server_id,
            deployment="client", dst_pod="server", status_code="200") == 200
            and inbound.metrics().value("request_total", direction="inbound", pod="server",
                                        tls="true", client_id=client_id) == 200, timeout=10), \
            outbound.metrics().text[-3000:] + inbound.metrics().text[-3000:]
        # In-cluster config from what kubelet mounts and injects; certificates from the issuer,
        # asked with the projected token, each for a pod on the asking node.
        assert "kubernetes mode: in-cluster, node node0" in outbound.log("agent")
        issuer_log = (tmp_path / "issuer.log").read_text()
        assert "issued spiffe://cluster.local/ns/shop/sa/client node=node0" in issuer_log
        assert "issued spiffe://cluster.local/ns/shop/sa/server node=node1" in issuer_log
        # The trust bundle's mount point lies inside the /run/pinion hostPath: the runtime
        # leaves an empty directory for it on the host (deploy/README.md says so).
        mount_point = cluster.nodes[0].run_pinion / "trust-bundle"
        assert mount_point.is_dir() and not any(mount_point.iterdir())
        client.stop()
        assert pods_of(outbound) == []
        client.remove()


def test_the_installer_keeps_the_chain_through_a_rollout_and_removes_it_on_uninstall(
        image_archives: list[Path], tmp_path: Path) -> None:
    with k3s_kubernetes_cluster(image_archives, tmp_path) as (cluster, api):
        node, agent = cluster.nodes[0], cluster.agents[0]
        api.apply(daemonset.daemonset_object())
        conflist, plugin = agent.wait_installed(), node.bin_dir / "pinion-cni"

        # A rollout or restart: the installer stops while its DaemonSet exists: the chain
        # stays (a pod made meanwhile waits, fail closed, for the next agent).
        agent.stop("cni-installer")
        assert conflist.exists() and plugin.exists()
        assert "still exists (a rollout or a restart)" in agent.log("cni-installer")
        agent.start("cni-installer")
        assert agent.wait_installed() == conflist
        # (its SIGTERM handler is set once it watches: before that, as a container's PID 1, it
        # ignores SIGTERM and is killed at the end of the grace period, without uninstalling)
        agent.wait_log("cni-installer", "already in step")

        # `kubectl delete`: the DaemonSet is gone, so the installer's exit takes Pinion out of
        # k3s' chain; k3s' own conflist is what the runtime uses again.
        api.delete("apps/v1", "DaemonSet", "pinion-system", "pinion-agent")
        agent.stop("cni-installer")
        assert not conflist.exists() and not plugin.exists()
        assert "is gone: uninstalling" in agent.log("cni-installer")
        assert sorted(path.name for path in node.conf_dir.iterdir()) == ["10-flannel.conflist"]
        plain = cluster_pod(api, node, "after-uninstall", "shop")
        assert pods_of(agent) == [] and plain.ip
