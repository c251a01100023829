"""Multicluster across two lab clusters (docs/multicluster.md), as Linkerd multicluster:
"edge" uses a Service that "cloud" exports, through cloud's gateway.

Each cluster is its own lab (one node, its own switch) with its own in-test API server and
agent, and both use the pod CIDR 10.42.0.0/16: the same pod IPs exist on both sides. The
clusters are joined only by a "WAN" link between their nodes (172.31.250.0/30), and edge's
node masquerades what leaves through it, as a NATed edge site does. Trust: one anchor, two
trust domains (cloud.local, edge.local); cloud's gateway admits edge.local only.

What runs is what a user would run: `pinion install --multicluster`'s gateway manifests
applied to cloud's API server, `pinion multicluster link` run against it and its output
applied to edge's, `pinion multicluster gateway` in cloud's node and `pinion multicluster
mirror` in edge's (its link dir made from the applied Secret and ConfigMap, as kubelet
mounts them)."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.core import multicluster
from agent.deploy.multicluster import gateway_manifests
from agent.identity.authority import LocalSigner
from agent.identity.files import TRUST_BUNDLE, init_identity_dir, init_linked_identity_dir
from agent.identity.spiffe import SpiffeId
from agent.identity.store import IdentityManager
from agent.identity.tls import CHACHA_FIRST
from agent.lab.agents import LabAgent, Metrics, node_socket
from agent.lab.topology import Lab, Node, Pod
from tests.netns.conftest import REPO, eventually
from tests.netns.test_kubernetes import (
    HTTP_SERVER,
    ISSUER_HOST,
    ISSUER_PORT,
    curl,
    pod_object,
    start_issuer,
)
from tests.support.kubeapi import FakeApiServer
from tests.support.kubestore import StoreError

pytestmark = pytest.mark.netns

EDGE_WAN, CLOUD_WAN = "172.31.250.1", "172.31.250.2"
API_PORT, GATEWAY_PORT, PROBE_PORT = 6443, 4143, 4191
GATEWAY_ID = "spiffe://cloud.local/ns/pinion-system/sa/pinion-gateway"
TOKEN = "remote-access-token-for-the-test"


@dataclass
class Side:
    """One cluster: its lab, API server and agent, and the pods it made."""

    name: str
    lab: Lab
    api: FakeApiServer
    agents: list[LabAgent] = field(default_factory=list)

    @property
    def node(self) -> Node:
        return self.lab.nodes[0]

    def pod(self, name: str, deployment: str, annotations: dict[str, str] | None = None,
            namespace: str = "shop") -> Pod:
        obj = self.api.apply(pod_object(name, namespace, self.node.name, None, annotations, deployment))
        pod = self.lab.add_pod(self.node, name, namespace, args={"K8S_POD_UID": obj["metadata"]["uid"]})
        obj["status"] = {"phase": "Running", "podIP": pod.ip, "podIPs": [{"ip": pod.ip}]}
        self.api.apply(obj)
        return pod


@dataclass
class Clusters:
    edge: Side
    cloud: Side
    tmp: Path
    gateway: subprocess.Popen[Any] | None = None
    mirror: subprocess.Popen[Any] | None = None

    def gateway_metrics(self) -> Metrics:
        result = self.cloud.node.run(["curl", "-sS", "--max-time", "3",
                                      f"http://{CLOUD_WAN}:{PROBE_PORT}/metrics"], check=False)
        return Metrics(result.stdout)

    def mirror_names(self) -> set[str]:
        listing = [s for s in self._services(self.edge.api)
                   if s["metadata"].get("labels", {}).get(multicluster.CLUSTER_LABEL) == "cloud"]
        return {s["metadata"]["name"] for s in listing}

    @staticmethod
    def _services(api: FakeApiServer) -> list[dict[str, Any]]:
        found = []
        for name in ("web-cloud", "api-cloud", "db-cloud"):
            try:
                found.append(api.get("v1", "Service", "shop", name))
            except StoreError:
                continue
        return found


def wan_link(edge: Lab, cloud: Lab) -> None:
    """A veth between the two nodes; edge masquerades what leaves by it (a NATed site)."""
    host_a, host_b = f"mc{edge.run_id}a", f"mc{edge.run_id}b"
    subprocess.run(["ip", "link", "add", host_a, "type", "veth", "peer", "name", host_b], check=True)
    edge.on_close(f"veth {host_a}", lambda: subprocess.run(["ip", "link", "del", host_a],
                                                           capture_output=True, check=False))
    for lab, name, address in ((edge, host_a, EDGE_WAN), (cloud, host_b, CLOUD_WAN)):
        node = lab.nodes[0]
        subprocess.run(["ip", "link", "set", name, "netns", node.netns], check=True)
        node.run(["ip", "link", "set", name, "name", "wan0"])
        node.run(["ip", "addr", "add", f"{address}/30", "dev", "wan0"])
        node.run(["ip", "link", "set", "wan0", "up"])
    edge.nodes[0].run(["nft", "add table ip pinionmc; add chain ip pinionmc post "
                       "{ type nat hook postrouting priority 100; }; "
                       "add rule ip pinionmc post oifname wan0 masquerade"])


def listening_socket(node: Node, address: str) -> socket.socket:
    sock = node_socket(node)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, API_PORT))
    sock.listen(64)
    return sock


def identities(tmp: Path) -> tuple[Path, Path]:
    """One anchor: cloud.local's identity dir has it; edge.local gets an issuer under it."""
    cloud, edge = tmp / "cloud-identity", tmp / "edge-identity"
    init_identity_dir(cloud, trust_domain="cloud.local")
    init_linked_identity_dir(edge, cloud, "edge.local")
    return cloud, edge


def spawn_logged(node: Node, argv: list[str], log: Path) -> subprocess.Popen[Any]:
    with open(log, "a") as out:
        return node.spawn([sys.executable, "-m", "agent", *argv], stdout=out,
                          stderr=subprocess.STDOUT, cwd=str(REPO))


def apply_all(api: FakeApiServer, documents: list[dict[str, Any]]) -> None:
    for document in documents:
        api.apply(document)


@contextmanager
def two_clusters(tmp: Path) -> Iterator[Clusters]:
    cloud_identity, edge_identity = identities(tmp)
    sides: list[Side] = []
    labs: list[Lab] = []
    agent_lists: list[list[LabAgent]] = [[], []]
    try:
        for agents in agent_lists:  # both use 10.42.0.0/24 for their node's pods
            labs.append(Lab(nodes=1, extra_plugins=lambda node, agents=agents: [agents[0].plugin_config()]))
        wan_link(labs[1], labs[0])
        for name, lab, agents in (("cloud", labs[0], agent_lists[0]), ("edge", labs[1], agent_lists[1])):
            node = lab.nodes[0]
            address = CLOUD_WAN if name == "cloud" else node.underlay_ip  # cloud's: for edge's mirror
            api = FakeApiServer(address, API_PORT, tmp / f"kubeapi-{name}",
                                listen_socket=listening_socket(node, address)).start()
            side = Side(name, lab, api, agents)
            sides.append(side)
            api.apply({"apiVersion": "v1", "kind": "Namespace",
                       "metadata": {"name": "shop", "labels": {"pinion.dev/mesh": "enabled"}}})
            for namespace in ("pinion-system",):
                api.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
            args = ["--kubeconfig", str(api.kubeconfig), "--identity-dir",
                    str(cloud_identity if name == "cloud" else edge_identity)]
            if name == "cloud":
                args += ["--gateway-identities", GATEWAY_ID]
            agents.append(LabAgent(lab, node, redirect="nftables", extra_args=args))
            agents[0].start()
        cloud, edge = sides
        yield Clusters(edge, cloud, tmp)
    finally:
        for side in sides:
            for agent in side.agents:
                agent.stop()
                print(f"--- {side.name} agent log ---\n{agent.log()[-3000:]}")
        for log in sorted(tmp.glob("*.log")):
            print(f"--- {log.name} ---\n{log.read_text()[-3000:]}")
        for lab in reversed(labs):
            lab.close()  # stops the gateway and the mirror too (processes of the nodes)
        for side in sides:
            side.api.stop()


def install_gateway(clusters: Clusters) -> None:
    """What `pinion install --multicluster --linked-trust-domain edge.local` adds, applied to
    cloud; the token controller's part (the token in its Secret) done by hand."""
    cloud = clusters.cloud
    apply_all(cloud.api, gateway_manifests("cloud.local", ["edge.local"]))
    secret = cloud.api.get("v1", "Secret", "pinion-system", "pinion-mirror-remote-access-token")
    secret["data"] = {"token": base64.b64encode(TOKEN.encode()).decode()}
    cloud.api.apply(secret)
    cloud.api.add_token(TOKEN, username="system:serviceaccount:pinion-system:pinion-mirror-remote-access")
    # its certificate from `pinion issuer`, for the gateway's own service-account token
    identity = clusters.tmp / "cloud-identity"
    start_issuer(cloud.lab, cloud.api, identity, clusters.tmp / "issuer.log")
    gateway_token = clusters.tmp / "gateway-token"
    gateway_token.write_text("gateway-token-for-the-test")
    cloud.api.add_token("gateway-token-for-the-test", audiences=("pinion-issuer",),
                        username="system:serviceaccount:pinion-system:pinion-gateway")
    clusters.gateway = spawn_logged(cloud.node, [
        "multicluster", "gateway", "--kubeconfig", str(cloud.api.kubeconfig),
        "--issuer-url", f"https://{ISSUER_HOST}:{ISSUER_PORT}", "--token-file", str(gateway_token),
        "--trust-bundle", str(identity / TRUST_BUNDLE), "--trust-domain", "cloud.local",
        "--listen", f"{CLOUD_WAN}:{GATEWAY_PORT}", "--admin-addr", f"{CLOUD_WAN}:{PROBE_PORT}",
        "--linked-trust-domain", "edge.local"], clusters.tmp / "gateway.log")

    def ready() -> bool:
        return cloud.node.run(["curl", "-sf", "--max-time", "1",
                               f"http://{CLOUD_WAN}:{PROBE_PORT}/ready"], check=False).returncode == 0

    assert eventually(ready, 20), (clusters.tmp / "gateway.log").read_text()


def link(clusters: Clusters) -> list[dict[str, Any]]:
    """`pinion multicluster link --cluster-name cloud` against cloud, applied to edge; the
    mirror started on the link dir kubelet would mount."""
    edge = clusters.edge
    result = edge.node.run([sys.executable, "-m", "agent", "multicluster", "link", "--cluster-name",
                            "cloud", "--kubeconfig", str(clusters.cloud.api.kubeconfig),
                            "--gateway-address", CLOUD_WAN], check=False, cwd=str(REPO))
    assert result.returncode == 0, result.stderr
    documents = [d for d in yaml.safe_load_all(result.stdout) if d]
    apply_all(edge.api, documents)
    secret = edge.api.get("v1", "Secret", "pinion-multicluster", "cluster-credentials-cloud")
    settings = edge.api.get("v1", "ConfigMap", "pinion-multicluster", "pinion-link-cloud")
    link_dir = clusters.tmp / "link-cloud"
    link_dir.mkdir()
    (link_dir / "kubeconfig").write_bytes(base64.b64decode(secret["data"]["kubeconfig"]))
    for key, value in settings["data"].items():
        (link_dir / key).write_text(value)
    clusters.mirror = spawn_logged(edge.node, [
        "multicluster", "mirror", "--kubeconfig", str(edge.api.kubeconfig), "--link-dir", str(link_dir),
        "--resync-seconds", "2"], clusters.tmp / "mirror.log")
    return documents


def export(api: FakeApiServer, name: str, pod: Pod | None, exported: bool = True) -> None:
    labels = {"mirror.linkerd.io/exported": "true"} if exported else {}
    vip = {"web": "10.43.0.10", "api": "10.43.0.11", "db": "10.43.0.12"}[name]
    api.apply({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": name, "namespace": "shop", "labels": labels},
               "spec": {"clusterIP": vip, "clusterIPs": [vip],
                        "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}})
    if pod is not None:
        api.apply({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
                   "metadata": {"name": f"{name}-abc12", "namespace": "shop",
                                "labels": {"kubernetes.io/service-name": name}},
                   "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                   "endpoints": [{"addresses": [pod.ip], "conditions": {"ready": True}}]})


def serve(pod: Pod) -> None:
    server = pod.spawn([sys.executable, "-m", HTTP_SERVER, "--port", "8080"], stdout=subprocess.PIPE,
                       text=True, cwd=str(REPO))
    assert server.stdout is not None and server.stdout.readline().strip() == "listening"


def mirror_vip(clusters: Clusters, name: str) -> str:
    return str(clusters.edge.api.get("v1", "Service", "shop", name)["spec"]["clusterIP"])


def first_reply(node: Node, identity_dir: Path, spiffe_id: SpiffeId) -> bytes:
    """TLS to the gateway from `node` with a certificate for `spiffe_id` signed by the issuer
    of `identity_dir`; what the gateway sends first (its preface once it admitted us), b""
    when it closed or reset the connection instead."""
    async def credentials() -> ssl.SSLContext:
        signer = LocalSigner.from_dir(identity_dir)
        manager = IdentityManager(signer, (identity_dir / TRUST_BUNDLE).read_bytes(),
                                  spiffe_id.trust_domain, CHACHA_FIRST)
        await manager.ensure("client", spiffe_id)
        return manager.client_context("client")

    context = asyncio.run(credentials())
    context.load_verify_locations(cadata=(Path(identity_dir.parent / "cloud-identity") /
                                          TRUST_BUNDLE).read_text())
    sock = node_socket(node)
    sock.settimeout(5)
    try:
        sock.connect((CLOUD_WAN, GATEWAY_PORT))
        with context.wrap_socket(sock, server_hostname=None) as tls:
            return tls.recv(64)
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return b""
    finally:
        sock.close()


@pytest.fixture
def clusters(tmp_path: Path) -> Iterator[Clusters]:
    with two_clusters(tmp_path) as running:
        yield running


def test_an_edge_pod_reaches_a_cloud_service_through_the_gateway(clusters: Clusters) -> None:
    web = clusters.cloud.pod("web", "web")
    client = clusters.edge.pod("client", "front")
    assert web.ip.startswith("10.42.0.") and client.ip.startswith("10.42.0.")  # overlapping
    serve(web)
    export(clusters.cloud.api, "web", web)
    install_gateway(clusters)
    documents = link(clusters)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in documents}
    assert ("Deployment", "pinion-mirror-cloud") in kinds and ("Secret", "cluster-credentials-cloud") in kinds

    # the mirror: web-cloud, with the cloud Service's port, its endpoint cloud's gateway
    assert eventually(lambda: clusters.mirror_names() == {"web-cloud"}, 20), \
        (clusters.tmp / "mirror.log").read_text()
    mirror = clusters.edge.api.get("v1", "Service", "shop", "web-cloud")
    assert mirror["metadata"]["annotations"][multicluster.GATEWAY_IDENTITY] == GATEWAY_ID
    assert [p["port"] for p in mirror["spec"]["ports"]] == [80]
    slice_ = clusters.edge.api.get("discovery.k8s.io/v1", "EndpointSlice", "shop", "web-cloud-gateway")
    assert slice_["endpoints"][0]["addresses"] == [CLOUD_WAN]

    # traffic: by the mirrored name's VIP, over the WAN, as TLS only
    vip = mirror_vip(clusters, "web-cloud")
    marker = "/mc-marker-0123456789"
    capture = subprocess.Popen(["ip", "netns", "exec", clusters.edge.node.netns, "tcpdump", "-Z", "root",
                                "--immediate-mode", "-U", "-i", "wan0", "-w",
                                str(clusters.tmp / "wan.pcap"), "tcp"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert capture.stderr is not None and "listening" in capture.stderr.readline()
        assert eventually(lambda: curl(client, f"http://{vip}{marker}").stdout.strip() == "ok", 20)
        for _ in range(4):
            assert curl(client, f"http://{vip}{marker}").stdout.strip() == "ok"
    finally:
        capture.terminate()
        capture.wait(10)
    pcap = (clusters.tmp / "wan.pcap").read_bytes()
    assert marker.encode() not in pcap  # the request crossed encrypted...
    packets = subprocess.run(["tcpdump", "-nn", "-r", str(clusters.tmp / "wan.pcap"),
                              f"tcp dst port {GATEWAY_PORT}"], capture_output=True, text=True, check=True)
    assert len(packets.stdout.splitlines()) > 0  # ...to the gateway's port
    assert f"{EDGE_WAN}." in packets.stdout and "10.42." not in packets.stdout  # masqueraded

    # metrics on both sides: edge's outbound knows the target cluster and Service...
    edge = clusters.edge.agents[0].metrics()
    assert edge.value("request_total", direction="outbound", namespace="shop", pod="client",
                      tls="true", dst_service="web-cloud", dst_target_cluster="cloud",
                      dst_target_service="web", server_id=GATEWAY_ID) >= 5
    # ...cloud's inbound sees edge's caller (forwarded by the gateway), not the gateway
    cloud = clusters.cloud.agents[0].metrics()
    assert cloud.value("request_total", direction="inbound", namespace="shop", pod="web", tls="true",
                       client_id="spiffe://edge.local/ns/shop/sa/front") >= 5
    assert clusters.gateway_metrics().value("pinion_gateway_streams_total", outcome="forwarded",
                                            target="shop/web") >= 5
    # every stream ended when its connection did: nothing held at the gateway
    assert eventually(lambda: clusters.gateway_metrics().value("pinion_gateway_active_streams") == 0, 10)

    # operate: gateways and check, from edge
    gateways = edge_command(clusters, "gateways")
    assert gateways.returncode == 0, gateways.stderr
    row = [line.split() for line in gateways.stdout.splitlines()][1]
    assert row[:3] == ["cloud", "True", "1"], gateways.stdout
    check = edge_command(clusters, "check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "1 exported, 1 mirrored" in check.stdout


def edge_command(clusters: Clusters, action: str) -> subprocess.CompletedProcess[str]:
    return clusters.edge.node.run([sys.executable, "-m", "agent", "multicluster", action,
                                   "--kubeconfig", str(clusters.edge.api.kubeconfig)],
                                  check=False, cwd=str(REPO))


def test_only_linked_trust_domains_get_through_the_gateway(clusters: Clusters) -> None:
    install_gateway(clusters)
    edge_node, tmp = clusters.edge.node, clusters.tmp
    linked = first_reply(edge_node, tmp / "edge-identity", SpiffeId("edge.local", "shop", "front"))
    assert len(linked) >= 12 and linked[0] == 2  # the tunnel's preface: WINDOW_UPDATE, version 2

    # same anchor, a trust domain nobody linked: TLS verifies, the gateway still refuses
    init_linked_identity_dir(tmp / "other-identity", tmp / "cloud-identity", "other.local")
    assert first_reply(edge_node, tmp / "other-identity", SpiffeId("other.local", "shop", "front")) == b""
    # another anchor altogether: the handshake itself fails
    init_identity_dir(tmp / "rogue-identity", trust_domain="edge.local")
    assert first_reply(edge_node, tmp / "rogue-identity", SpiffeId("edge.local", "shop", "front")) == b""

    failures = clusters.gateway_metrics()
    assert failures.value("pinion_tunnel_handshake_failures_total", reason="unlinked_trust_domain") == 1
    assert failures.value("pinion_tunnel_handshake_failures_total") >= 2


def test_mirrors_survive_the_remote_api_server_going_away_and_follow_unexports(clusters: Clusters) -> None:
    web = clusters.cloud.pod("web", "web")
    client = clusters.edge.pod("client", "front")
    serve(web)
    export(clusters.cloud.api, "web", web)
    install_gateway(clusters)
    link(clusters)
    assert eventually(lambda: clusters.mirror_names() == {"web-cloud"}, 20)
    vip = mirror_vip(clusters, "web-cloud")

    clusters.cloud.api.go_away()
    time.sleep(5)  # more than two resyncs of the mirror, while every list fails
    assert clusters.mirror_names() == {"web-cloud"}
    assert mirror_vip(clusters, "web-cloud") == vip
    assert curl(client, f"http://{vip}/").stdout.strip() == "ok"  # the gateway still routes

    clusters.cloud.api.come_back(listening_socket(clusters.cloud.node, CLOUD_WAN))
    export(clusters.cloud.api, "api", web)  # a change after the restart: the watch follows
    assert eventually(lambda: clusters.mirror_names() == {"web-cloud", "api-cloud"}, 40), \
        (clusters.tmp / "mirror.log").read_text()[-3000:]
    assert mirror_vip(clusters, "web-cloud") == vip  # never deleted and made again

    export(clusters.cloud.api, "web", None, exported=False)  # the label off: unexported
    assert eventually(lambda: clusters.mirror_names() == {"api-cloud"}, 20)

    def slice_gone() -> bool:
        try:
            clusters.edge.api.get("discovery.k8s.io/v1", "EndpointSlice", "shop", "web-cloud-gateway")
        except StoreError:
            return True
        return False

    assert eventually(slice_gone, 10)
    assert curl(client, f"http://{vip}/").returncode != 0  # the name is gone here


def test_link_output_is_valid_json_and_yaml(clusters: Clusters) -> None:
    install_gateway(clusters)
    documents = link(clusters)
    secret = next(d for d in documents if d["kind"] == "Secret")
    kubeconfig = json.loads(secret["stringData"]["kubeconfig"])
    assert kubeconfig["users"][0]["user"]["token"] == TOKEN  # the read-only token, not the admin's
    assert kubeconfig["clusters"][0]["cluster"]["server"] == f"https://{CLOUD_WAN}:{API_PORT}"


def test_the_callers_identity_reaches_the_destinations_policy_from_behind_one_nat(
        clusters: Clusters) -> None:
    """Five replicas of edge's `front` (one identity, one NATed address, five tunnel
    connections to the gateway): cloud's pods judge *them*, not the gateway, by their
    allow-lists."""
    allowed = "pinion.dev/allowed-clients"
    web = clusters.cloud.pod("web", "web", {allowed: "spiffe://edge.local/ns/shop/sa/front"})
    db = clusters.cloud.pod("db", "db", {allowed: "spiffe://edge.local/ns/shop/sa/admin"})
    for pod in (web, db):
        serve(pod)
    export(clusters.cloud.api, "web", web)
    export(clusters.cloud.api, "db", db)
    fronts = [clusters.edge.pod(f"front-{index}", "front") for index in range(5)]
    install_gateway(clusters)
    link(clusters)
    assert eventually(lambda: clusters.mirror_names() == {"web-cloud", "db-cloud"}, 20)
    web_vip, db_vip = mirror_vip(clusters, "web-cloud"), mirror_vip(clusters, "db-cloud")

    assert eventually(lambda: curl(fronts[0], f"http://{web_vip}/").stdout.strip() == "ok", 20)
    for front in fronts:
        assert curl(front, f"http://{web_vip}/").stdout.strip() == "ok"
        assert curl(front, f"http://{db_vip}/").returncode != 0  # db admits edge's admin only

    cloud = clusters.cloud.agents[0].metrics()
    assert cloud.value("request_total", direction="inbound", pod="web",
                       client_id="spiffe://edge.local/ns/shop/sa/front") >= 5
    assert cloud.value("pinion_proxy_errors_total", direction="inbound", reason="not_allowed") >= 5
    assert cloud.value("request_total", direction="inbound", pod="db") == 0
    failures = clusters.gateway_metrics()
    assert failures.value("pinion_tunnel_handshake_failures_total") == 0  # no replica refused


def test_a_cloud_pod_outside_the_mesh_is_reached_in_plain_tcp_from_the_gateway(clusters: Clusters) -> None:
    """cloud's `legacy` namespace is not meshed: the gateway's last hop is plain TCP inside
    cloud; the WAN crossing is mTLS all the same, and edge's client sees the whole answer."""
    for side in (clusters.cloud, clusters.edge):
        side.api.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "legacy"}})
    old = clusters.cloud.pod("old", "old", namespace="legacy")
    serve(old)
    clusters.cloud.api.apply({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "old", "namespace": "legacy", "labels": {"mirror.pinion.dev/exported": "true"}},
        "spec": {"clusterIP": "10.43.0.20", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})
    clusters.cloud.api.apply({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": "old-x", "namespace": "legacy", "labels": {"kubernetes.io/service-name": "old"}},
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [old.ip], "conditions": {"ready": True}}]})
    client = clusters.edge.pod("client", "front")
    install_gateway(clusters)
    link(clusters)

    def vip() -> str:
        try:
            return str(clusters.edge.api.get("v1", "Service", "legacy", "old-cloud")["spec"]["clusterIP"])
        except StoreError:
            return ""

    assert eventually(lambda: vip() != "", 20)
    assert eventually(lambda: curl(client, f"http://{vip()}/").stdout.strip() == "ok", 20)
    body = curl(client, f"http://{vip()}/bytes/300000").stdout  # more than a window's worth
    assert len(body) == 300000
    assert clusters.cloud.agents[0].metrics().value("request_total", direction="inbound",
                                                    pod="old") == 0  # not meshed: no agent on it
    gateway = clusters.gateway_metrics()
    assert gateway.value("pinion_gateway_streams_total", outcome="forwarded", target="legacy/old") >= 2
    assert gateway.value("pinion_gateway_bytes_total", direction="to_linked") >= 300000
    assert eventually(lambda: clusters.gateway_metrics().value("pinion_gateway_active_streams") == 0, 10)
