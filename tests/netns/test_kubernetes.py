"""Kubernetes mode on two lab nodes: an in-test API server (real list/watch over HTTPS, in
node0's netns) tells the agents which pods are meshed, which IPs are pods and which are
Service VIPs; the real CNI chain still announces every pod.

Pods here are made the way kubelet does it: the pod object exists (scheduled to a node)
before the runtime calls CNI ADD, and its status.podIP is written after."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.identity.files import init_identity_dir
from agent.inpod.errors import CNI_TRY_AGAIN_LATER
from agent.lab.agents import LabAgent, node_socket
from agent.lab.capture import UnderlayCapture
from agent.lab.cni import CniError
from agent.lab.topology import Lab, Pod
from tests.netns.conftest import REPO, eventually
from tests.support.kubeapi import FakeApiServer
from tests.support.kubestore import StoreError

pytestmark = pytest.mark.netns

HTTP_SERVER = "agent.lab.httpserver"
API_PORT = 6443
ISSUER_HOST = "10.250.0.1"  # node0's underlay address (agent.lab.topology.UNDERLAY_PREFIX)
ISSUER_PORT = 8443
ISSUER_ADMIN_PORT = 9990


@dataclass
class Cluster:
    lab: Lab
    api: FakeApiServer
    agents: list[LabAgent]
    servers: list[subprocess.Popen[str]] = field(default_factory=list)
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)  # pod objects as last applied

    def namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        self.api.apply({"apiVersion": "v1", "kind": "Namespace",
                        "metadata": {"name": name, "labels": labels or {}}})

    def pod(self, node: int, name: str, namespace: str = "shop", *, labels: dict[str, str] | None = None,
            annotations: dict[str, str] | None = None, deployment: str = "web") -> Pod:
        """The pod object first (scheduled to the node), then the sandbox through CNI, then
        its IP in the status, as kubelet would."""
        obj = self.api.apply(pod_object(name, namespace, self.lab.nodes[node].name, labels, annotations,
                                        deployment))
        pod = self.sandbox(node, name, namespace, obj["metadata"]["uid"])
        obj["status"] = {"phase": "Running", "podIP": pod.ip, "podIPs": [{"ip": pod.ip}]}
        self.objects[f"{namespace}/{name}"] = self.api.apply(obj)
        return pod

    def sandbox(self, node: int, name: str, namespace: str, uid: str) -> Pod:
        """The pod's sandbox through CNI. As kubelet, retry while the agent answers "try again
        later": its watch has not brought the pod object yet (a loaded machine)."""
        for attempt in range(10):
            try:
                return self.lab.add_pod(self.lab.nodes[node], name, namespace, args={"K8S_POD_UID": uid})
            except CniError as exc:
                if exc.code != CNI_TRY_AGAIN_LATER or attempt == 9:
                    raise
                time.sleep(0.3)
        raise AssertionError("unreachable")

    def relabel(self, pod: Pod, labels: dict[str, str]) -> None:
        obj = self.objects[f"{pod.namespace}/{pod.name}"]
        obj["metadata"]["labels"] = {**obj["metadata"].get("labels", {}), **labels}
        self.objects[f"{pod.namespace}/{pod.name}"] = self.api.apply(obj)

    def captured(self, node: int) -> set[str]:
        status, body = self.agents[node].get("/pods")
        assert status == 200
        return {f"{p['namespace']}/{p['name']}" for p in json.loads(body)}

    def serve(self, pod: Pod, *argv: str) -> None:
        server = pod.spawn([sys.executable, "-m", HTTP_SERVER, *argv], stdout=subprocess.PIPE, text=True,
                           cwd=str(REPO))
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        self.servers.append(server)


def pod_object(name: str, namespace: str, node: str, labels: dict[str, str] | None,
               annotations: dict[str, str] | None, deployment: str) -> dict[str, Any]:
    template_hash = "7c9d8f"
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {"app": deployment, "pod-template-hash": template_hash, **(labels or {})},
                         "annotations": annotations or {},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                              "name": f"{deployment}-{template_hash}", "controller": True,
                                              "uid": str(uuid.uuid4())}]},
            "spec": {"nodeName": node, "serviceAccountName": deployment,
                     "containers": [{"name": "app", "image": "lab"}]},
            "status": {"phase": "Pending"}}


def listening_socket(lab: Lab) -> socket.socket:
    """The API server listens in node0's netns, on the underlay: both agents reach it."""
    sock = node_socket(lab.nodes[0])
    sock.bind((lab.nodes[0].underlay_ip, API_PORT))
    sock.listen(64)
    return sock


@contextmanager
def kubernetes_cluster(tmp_path: Path, backend: str = "nftables", issuer: bool = False) -> Iterator[Cluster]:
    """Two nodes, the API server, one agent per node in Kubernetes mode. Certificates come
    from --identity-dir, or with `issuer` from a real `pinion issuer` on node0, as in deploy/."""
    identity = tmp_path / "identity"
    init_identity_dir(identity, trust_domain="cluster.local")
    agents: list[LabAgent] = []
    lab = Lab(nodes=2, extra_plugins=lambda node: [agents[node.index].plugin_config()])
    api: FakeApiServer | None = None
    issuer_log = tmp_path / "issuer.log"
    try:
        api = FakeApiServer(lab.nodes[0].underlay_ip, API_PORT, tmp_path / "kubeapi",
                            listen_socket=listening_socket(lab)).start()
        cluster = Cluster(lab, api, agents)
        cluster.namespace("shop", {"pinion.dev/mesh": "enabled"})
        cluster.namespace("legacy")
        if issuer:
            cluster.namespace("pinion-system")
            start_issuer(lab, api, identity, issuer_log)
        for node in lab.nodes:
            args = ["--kubeconfig", str(api.kubeconfig)]
            if issuer:
                args += agent_credentials(api, node.name, identity, tmp_path)
            else:
                args += ["--identity-dir", str(identity)]
            agents.append(LabAgent(lab, node, redirect=backend, extra_args=args))
        for agent in agents:
            agent.start()
        yield cluster
    finally:
        try:
            for agent in agents:
                agent.stop()
            with contextlib.suppress(OSError):  # a closed stdout must not leak the lab
                for agent in agents:
                    print(f"--- agent {agent.node.name} log ---\n{agent.log()[-4000:]}")
                if issuer_log.exists():
                    print(f"--- issuer log ---\n{issuer_log.read_text()[-4000:]}")
        finally:
            lab.close()
            if api is not None:
                api.stop()


def start_issuer(lab: Lab, api: FakeApiServer, identity: Path, log_path: Path) -> None:
    """`pinion issuer` in node0's netns, as its Deployment would run (the Secret = the dir)."""
    node = lab.nodes[0]
    with open(log_path, "a") as log:
        node.spawn([sys.executable, "-m", "agent", "issuer", "--identity-dir", str(identity),
                    "--listen", f"{node.underlay_ip}:{ISSUER_PORT}",
                    "--admin-addr", f"{node.underlay_ip}:{ISSUER_ADMIN_PORT}",
                    "--kubeconfig", str(api.kubeconfig)], stdout=log, stderr=subprocess.STDOUT,
                   cwd=str(REPO))
    ready = f"http://{node.underlay_ip}:{ISSUER_ADMIN_PORT}/ready"
    def answers() -> bool:
        return node.run(["curl", "-sf", "--max-time", "1", ready], check=False).returncode == 0

    assert eventually(answers, 15), log_path.read_text()


def agent_credentials(api: FakeApiServer, node: str, identity: Path, tmp_path: Path) -> list[str]:
    """What the DaemonSet mounts: a projected token (audience pinion-issuer, bound to this
    node) and the trust bundle ConfigMap."""
    token = f"agent-{node}-{uuid.uuid4().hex}"
    api.add_token(token, username="system:serviceaccount:pinion-system:pinion-agent",
                  extra={"authentication.kubernetes.io/node-name": [node]}, audiences=("pinion-issuer",))
    token_file = tmp_path / f"token-{node}"
    token_file.write_text(token)
    return ["--issuer-url", f"https://{ISSUER_HOST}:{ISSUER_PORT}", "--token-file", str(token_file),
            "--trust-bundle", str(identity / "trust-bundle.crt"), "--trust-domain", "cluster.local"]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with kubernetes_cluster(tmp_path) as running:
        yield running


def curl(pod: Pod, url: str) -> subprocess.CompletedProcess[str]:
    return pod.run(["curl", "-sS", "--max-time", "5", url], timeout=15, check=False)


def test_the_agent_captures_exactly_the_opted_in_pods_on_its_node(cluster: Cluster) -> None:
    cluster.pod(0, "web-a")  # namespace shop is labelled: meshed
    cluster.pod(0, "quiet", labels={"pinion.dev/mesh": "disabled"})  # the pod says no
    cluster.pod(0, "old", "legacy")  # namespace not labelled
    cluster.pod(1, "web-b")  # meshed, but on the other node

    assert cluster.captured(0) == {"shop/web-a"}
    assert cluster.captured(1) == {"shop/web-b"}


def test_a_pod_a_stalled_watch_never_brings_is_found_by_asking_the_api(cluster: Cluster) -> None:
    """The watch streams stay open and send nothing (a middlebox stopped forwarding): the
    agent GETs the pod kubelet announced, lists its node's pods again, and the first ADD
    succeeds; the new watch then brings later pods at once."""
    cluster.api.stall_watches()
    started = time.monotonic()
    cluster.pod(0, "web-a")
    assert 1.5 <= time.monotonic() - started < 10  # asked the API after 2 s, within one ADD
    assert cluster.captured(0) == {"shop/web-a"}
    assert "shop/web-a is in the API server but not in this watch" in cluster.agents[0].log()
    started = time.monotonic()
    cluster.pod(0, "web-b")  # the node's pod watch is a new stream now
    assert time.monotonic() - started < 1.5
    assert cluster.captured(0) == {"shop/web-a", "shop/web-b"}


def test_opting_in_later_captures_and_opting_out_or_deleting_releases(cluster: Cluster) -> None:
    old = cluster.pod(0, "old", "legacy")
    web = cluster.pod(0, "web-a")
    assert cluster.captured(0) == {"shop/web-a"}

    cluster.namespace("legacy", {"pinion.dev/mesh": "enabled"})
    assert eventually(lambda: cluster.captured(0) == {"shop/web-a", "legacy/old"}, 10)

    cluster.relabel(old, {"pinion.dev/mesh": "disabled"})
    assert eventually(lambda: cluster.captured(0) == {"shop/web-a"}, 10)

    cluster.api.delete("v1", "Pod", "shop", web.name)
    assert eventually(lambda: cluster.captured(0) == set(), 10)
    # released: its rules are gone, so the pod's traffic is its own again
    assert "pinion/" not in web.run(["nft", "list", "ruleset"], check=False).stdout


def test_linkerd_inject_annotation_is_honoured(cluster: Cluster) -> None:
    cluster.pod(0, "from-linkerd", "legacy", annotations={"linkerd.io/inject": "enabled"})

    assert cluster.captured(0) == {"legacy/from-linkerd"}


def test_a_service_vip_is_resolved_to_an_endpoint_and_labelled(cluster: Cluster) -> None:
    client = cluster.pod(0, "client", deployment="front")
    server = cluster.pod(1, "web-b")
    cluster.serve(server, "--port", "8080")
    vip = "10.43.0.10"  # no kube-proxy in the lab: only the agent can make this work
    port = {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}
    cluster.api.apply({"apiVersion": "v1", "kind": "Service",
                       "metadata": {"name": "web", "namespace": "shop"},
                       "spec": {"clusterIP": vip, "clusterIPs": [vip], "ports": [port]}})
    cluster.api.apply({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
                       "metadata": {"name": "web-abc12", "namespace": "shop",
                                    "labels": {"kubernetes.io/service-name": "web"}},
                       "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                       "endpoints": [{"addresses": [server.ip], "conditions": {"ready": True}}]})

    def answered() -> bool:
        return curl(client, f"http://{vip}/whoami").stdout.strip() == client.ip

    assert eventually(answered, 10)  # the watch brings the Service within moments
    for _ in range(4):
        assert curl(client, f"http://{vip}/whoami").stdout.strip() == client.ip

    metrics = cluster.agents[0].metrics()
    labels = {"direction": "outbound", "namespace": "shop", "pod": "client", "deployment": "front",
              "tls": "true", "dst_service": "web", "dst_pod": "web-b", "dst_namespace": "shop",
              "dst_deployment": "web", "server_id": "spiffe://cluster.local/ns/shop/sa/web"}
    assert metrics.value("request_total", **labels) >= 5
    inbound = cluster.agents[1].metrics()
    assert inbound.value("request_total", direction="inbound", namespace="shop", pod="web-b",
                         deployment="web", tls="true",
                         client_id="spiffe://cluster.local/ns/shop/sa/front") >= 5


def test_the_mesh_is_decided_by_the_registry_not_by_probing(cluster: Cluster, tmp_path: Path) -> None:
    client = cluster.pod(0, "client", deployment="front")
    plain = cluster.pod(1, "old", "legacy")  # a pod the API says is not meshed
    cluster.serve(plain, "--port", "8080")
    capture = UnderlayCapture(cluster.lab.nodes[1], tmp_path / "underlay.pcap")

    assert curl(client, f"http://{plain.ip}:8080/whoami").stdout.strip() == client.ip
    capture.stop()

    assert capture.count("tcp dst port 15008") == 0  # standalone mode would have tried 15008
    assert capture.count("tcp dst port 8080") > 0

    metrics = cluster.agents[0].metrics()
    assert metrics.value("request_total", direction="outbound", namespace="shop", pod="client",
                         deployment="front", tls="no_identity", dst_pod="old", dst_namespace="legacy",
                         dst_deployment="web") == 1


def test_with_the_issuer_service_pods_get_certificates_only_through_it(tmp_path: Path) -> None:
    with kubernetes_cluster(tmp_path, issuer=True) as cluster:
        client = cluster.pod(0, "client", deployment="front")
        server = cluster.pod(1, "web-b")
        cluster.serve(server, "--port", "8080")

        assert curl(client, f"http://{server.ip}:8080/whoami").stdout.strip() == client.ip

        metrics = cluster.agents[0].metrics()
        assert metrics.value("request_total", direction="outbound", namespace="shop", pod="client",
                             deployment="front", tls="true", dst_pod="web-b", dst_namespace="shop",
                             dst_deployment="web", server_id="spiffe://cluster.local/ns/shop/sa/web") == 1
        node = cluster.lab.nodes[0]
        issuer_metrics = node.run(["curl", "-sS", f"http://{node.underlay_ip}:{ISSUER_ADMIN_PORT}/metrics"]).stdout
        assert 'pinion_issuer_requests_total{result="issued"} 2.0' in issuer_metrics
        published = (tmp_path / "identity" / "trust-bundle.crt").read_text()

        def bundle() -> str:
            try:
                obj = cluster.api.get("v1", "ConfigMap", "pinion-system", "pinion-trust-bundle")
            except StoreError:  # not published yet
                return ""
            return str(obj["data"]["trust-bundle.crt"])

        assert eventually(lambda: bundle() == published, 10)


def test_a_compacted_history_and_dropped_watches_relist_without_releasing_anyone(cluster: Cluster) -> None:
    """An API server restart: every watch stream ends mid-chunk and the old resourceVersions
    are gone (410 on the next watch). The agents relist, keep what they captured, and follow
    the changes made while they were away."""
    web = cluster.pod(0, "web-a")
    old = cluster.pod(0, "old", "legacy")
    def pod_lists() -> int:
        return sum(1 for method, path in cluster.api.requests
                   if method == "GET" and "/pods" in path and "watch" not in path)

    lists_before = pod_lists()

    cluster.api.compact()
    cluster.api.drop_watches()
    cluster.namespace("legacy", {"pinion.dev/mesh": "enabled"})  # while the watches are down

    assert eventually(lambda: cluster.captured(0) == {"shop/web-a", "legacy/old"}, 15)
    assert eventually(lambda: pod_lists() > lists_before, 15)  # the pod watches listed again (410)
    assert "released pod shop/web-a" not in cluster.agents[0].log()
    # the relisted registry is current: old is now a meshed destination, reached over mTLS
    cluster.serve(old, "--port", "8080")
    assert curl(web, f"http://{old.ip}:8080/whoami").stdout.strip() == web.ip
    assert cluster.agents[0].metrics().value(
        "request_total", direction="outbound", namespace="shop", pod="web-a", deployment="web",
        tls="true", dst_pod="old", dst_namespace="legacy", dst_deployment="web",
        server_id="spiffe://cluster.local/ns/legacy/sa/web") == 1
