"""Kubernetes mode on two lab nodes: an in-test API server (real list/watch over HTTPS, in
node0's netns) tells the agents which pods are meshed, which IPs are pods and which are
Service VIPs; the real CNI chain still announces every pod.

Pods here are made the way kubelet does it: the pod object exists (scheduled to a node)
before the runtime calls CNI ADD, and its status.podIP is written after."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.controlplane.identity.files import init_identity_dir
from agent.lab.agents import LabAgent, node_socket
from agent.lab.kubeapi import FakeApiServer
from agent.lab.topology import Lab, Pod
from tests.netns.conftest import REPO, eventually

pytestmark = pytest.mark.netns

HTTP_SERVER = "agent.lab.httpserver"
API_PORT = 6443


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
        uid = obj["metadata"]["uid"]
        pod = self.lab.add_pod(self.lab.nodes[node], name, namespace, args={"K8S_POD_UID": uid})
        obj["status"] = {"phase": "Running", "podIP": pod.ip, "podIPs": [{"ip": pod.ip}]}
        self.objects[f"{namespace}/{name}"] = self.api.apply(obj)
        return pod

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
def kubernetes_cluster(tmp_path: Path, backend: str = "nftables") -> Iterator[Cluster]:
    identity = tmp_path / "identity"
    init_identity_dir(identity, trust_domain="cluster.local")
    agents: list[LabAgent] = []
    lab = Lab(nodes=2, extra_plugins=lambda node: [agents[node.index].plugin_config()])
    api: FakeApiServer | None = None
    try:
        api = FakeApiServer(lab.nodes[0].underlay_ip, API_PORT, tmp_path / "kubeapi",
                            listen_socket=listening_socket(lab)).start()
        cluster = Cluster(lab, api, agents)
        cluster.namespace("shop", {"pinion.dev/mesh": "enabled"})
        cluster.namespace("legacy")
        args = ["--kubeconfig", str(api.kubeconfig), "--identity-dir", str(identity)]
        agents += [LabAgent(lab, node, redirect=backend, extra_args=args) for node in lab.nodes]
        for agent in agents:
            agent.start()
        yield cluster
    finally:
        for agent in agents:
            agent.stop()
            print(f"--- agent {agent.node.name} log ---\n{agent.log()[-4000:]}")
        lab.close()
        if api is not None:
            api.stop()


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


def test_the_mesh_is_decided_by_the_registry_not_by_probing(cluster: Cluster) -> None:
    client = cluster.pod(0, "client", deployment="front")
    plain = cluster.pod(1, "old", "legacy")  # a pod the API says is not meshed
    cluster.serve(plain, "--port", "8080")

    assert curl(client, f"http://{plain.ip}:8080/whoami").stdout.strip() == client.ip

    metrics = cluster.agents[0].metrics()
    assert metrics.value("request_total", direction="outbound", namespace="shop", pod="client",
                         deployment="front", tls="disabled", dst_pod="old", dst_namespace="legacy",
                         dst_deployment="web") == 1
