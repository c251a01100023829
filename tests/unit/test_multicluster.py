"""Multicluster without sockets: which remote Services are exported, what their mirrors look
like, what the mirror controller must do, who gets through a gateway and as whom, where an
agent sends a connection to a mirrored Service, and the manifests of install and link."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from agent.controlplane.cluster.objects import project_service, project_slice
from agent.controlplane.cluster.state import ClusterState
from agent.core import connections, multicluster
from agent.core.connections import Forward, Path, Refuse, Route
from agent.core.multicluster import Admit, Deny, ExportedService, Link, LinkError
from agent.core.telemetry import PeerLabels
from agent.deploy import install
from agent.deploy import multicluster as manifests
from agent.model import InboundPolicy
from agent.observability.metrics import tcp_label_values
from agent.viz.multicluster import LinkStatus, render_gateways
from tests.support.kubestore import RESOURCES, Store

GATEWAY_ID = "spiffe://cloud.local/ns/pinion-system/sa/pinion-gateway"
LINK = Link("cloud", "203.0.113.7", 4143, GATEWAY_ID)
EDGE_CLIENT = "spiffe://edge.local/ns/shop/sa/front"


def remote_service(name: str = "web", labels: dict[str, str] | None = None,
                   ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "shop",
                         "labels": {"mirror.pinion.dev/exported": "true"} if labels is None else labels},
            "spec": {"clusterIP": "10.43.0.10",
                     "ports": ports if ports is not None else [{"name": "http", "port": 80,
                                                                "targetPort": 8080}]}}


# --- what is exported ---------------------------------------------------------------------

@pytest.mark.parametrize(("labels", "exported"), [
    ({"mirror.pinion.dev/exported": "true"}, True),
    ({"mirror.linkerd.io/exported": "true"}, True),  # Linkerd's label works too
    ({"mirror.linkerd.io/exported": "True"}, True),
    ({"mirror.pinion.dev/exported": "false"}, False),
    ({}, False),
])
def test_a_service_is_exported_by_its_label(labels: dict[str, str], exported: bool) -> None:
    assert (multicluster.exported(remote_service(labels=labels)) is not None) is exported


def test_an_exported_service_without_tcp_ports_has_nothing_to_mirror() -> None:
    udp = [{"name": "dns", "port": 53, "protocol": "UDP"}]
    assert multicluster.exported(remote_service(ports=udp)) is None
    tcp = multicluster.exported(remote_service(ports=[*udp, {"name": "web", "port": 80}]))
    assert tcp == ExportedService("shop", "web", (("web", 80),))


# --- the mirror ---------------------------------------------------------------------------

def test_a_mirror_is_a_service_without_selector_whose_endpoint_is_the_gateway() -> None:
    service, endpoint_slice = multicluster.mirror_objects(
        ExportedService("shop", "web", (("http", 80), ("admin", 9000))), LINK)

    assert service["metadata"]["name"] == "web-cloud" and "selector" not in service["spec"]
    assert [(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [
        ("http", 80, 4143), ("admin", 9000, 4143)]
    annotations = service["metadata"]["annotations"]
    assert annotations[multicluster.GATEWAY_IDENTITY] == GATEWAY_ID
    assert annotations[multicluster.REMOTE_NAME] == "web.shop.svc.cluster.local"
    assert endpoint_slice["metadata"]["labels"]["kubernetes.io/service-name"] == "web-cloud"
    assert endpoint_slice["endpoints"] == [{"addresses": ["203.0.113.7"], "conditions": {"ready": True}}]
    assert {p["port"] for p in endpoint_slice["ports"]} == {4143}


def test_the_plan_creates_what_is_missing_updates_what_changed_and_deletes_what_is_gone() -> None:
    web = ExportedService("shop", "web", (("http", 80),))
    api = ExportedService("shop", "api", (("http", 8080),))
    remote = {"shop/web": web, "shop/api": api}
    local = {"shop/web-cloud": multicluster.mirror_version(web),  # in step
             "shop/api-cloud": "http:80",  # the port changed there
             "shop/old-cloud": "http:80"}  # no longer exported

    plan = multicluster.plan(remote, local, "cloud")

    assert plan.upserts == (api,)
    assert plan.deletes == ("shop/old-cloud",)


def test_the_plan_skips_a_name_too_long_for_a_mirror_and_deletes_nothing_for_it() -> None:
    long_name = ExportedService("shop", "a" * 60, (("http", 80),))
    plan = multicluster.plan({"shop/x": long_name}, {}, "cloud")
    assert plan.upserts == () and plan.deletes == ()
    with pytest.raises(LinkError, match="not a valid Service name"):
        multicluster.mirror_name("a" * 60, "cloud")


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"cluster_name": "Cloud"}, "cluster name"),
    ({"gateway_ip": "gw.example"}, "IPv4"),
    ({"gateway_port": 0}, "port"),
    ({"gateway_identity": "cloud-gateway"}, "spiffe"),
])
def test_a_link_that_cannot_work_is_refused(kwargs: dict[str, Any], error: str) -> None:
    values = {"cluster_name": "cloud", "gateway_ip": "203.0.113.7", "gateway_port": 4143,
              "gateway_identity": GATEWAY_ID, **kwargs}
    with pytest.raises(LinkError, match=error):
        Link(**values)


# --- the gateway --------------------------------------------------------------------------

@pytest.mark.parametrize(("client", "decision"), [
    (EDGE_CLIENT, Admit(EDGE_CLIENT)),
    ("spiffe://other.local/ns/shop/sa/front", Deny("unlinked_trust_domain", "")),
    ("spiffe://cloud.local/ns/shop/sa/front", Deny("unlinked_trust_domain", "")),  # not its own either
    ("https://edge.local/front", Deny("no_spiffe_id", "")),
])
def test_only_identities_of_linked_trust_domains_get_in(client: str, decision: Admit | Deny) -> None:
    got = multicluster.admit_client(client, frozenset({"edge.local"}))
    assert type(got) is type(decision)
    if isinstance(decision, Deny):
        assert isinstance(got, Deny) and got.reason == decision.reason


@pytest.mark.parametrize(("metadata", "target"), [
    ({"target": "shop/web", "pod": "client"}, ("shop", "web")),
    ({"pod": "client"}, "no_target"),
    ({"target": "shop"}, "no_target"),
    ({"target": "shop/web/x"}, "no_target"),
    ({"target": "../etc"}, "no_target"),
])
def test_a_gateway_stream_names_its_target_service(metadata: dict[str, str],
                                                   target: tuple[str, str] | str) -> None:
    got = multicluster.stream_target(metadata)
    assert got == target if isinstance(target, tuple) else isinstance(got, Deny) and got.reason == target


def test_only_a_trusted_gateway_may_speak_for_its_caller() -> None:
    gateways = frozenset({GATEWAY_ID})
    metadata = {multicluster.CLIENT_KEY: EDGE_CLIENT}
    assert multicluster.forwarded_client(GATEWAY_ID, metadata, gateways) == EDGE_CLIENT
    other = "spiffe://cloud.local/ns/shop/sa/sneaky"
    assert multicluster.forwarded_client(other, metadata, gateways) == other
    assert multicluster.forwarded_client(GATEWAY_ID, {}, gateways) == GATEWAY_ID


@dataclass(frozen=True)
class Pod:
    own_ports: frozenset[int] = frozenset((15001, 15006, 15008))
    opaque_ports: frozenset[int] = frozenset()
    identity: str | None = "shop/web-1"
    ip: str | None = "10.42.0.5"
    inbound: InboundPolicy = field(default_factory=InboundPolicy)


def test_a_forwarded_caller_is_the_client_for_the_pods_allow_list_and_metrics() -> None:
    gateway_labels = PeerLabels(tls="true", client_id=GATEWAY_ID)
    allowed = Pod(inbound=InboundPolicy(allowed_clients=(EDGE_CLIENT,)))

    decision = connections.inbound_stream(8080, allowed, gateway_labels, EDGE_CLIENT)
    assert isinstance(decision, Forward) and decision.labels.client_id == EDGE_CLIENT

    stranger = connections.inbound_stream(8080, allowed, gateway_labels,
                                          "spiffe://edge.local/ns/shop/sa/other")
    assert isinstance(stranger, Refuse) and stranger.reason == "not_allowed"


# --- agents: a mirrored Service goes to its gateway ----------------------------------------

def mirrored_state() -> tuple[ClusterState, str]:
    state = ClusterState("edge.local")
    service, endpoint_slice = multicluster.mirror_objects(
        ExportedService("shop", "web", (("http", 80),)), LINK)
    service["spec"]["clusterIP"], service["spec"]["clusterIPs"] = "10.43.200.1", ["10.43.200.1"]
    record, slice_record = project_service(service), project_slice(endpoint_slice)
    assert record is not None and slice_record is not None
    state.upsert_service(record)
    state.upsert_slice(slice_record)
    return state, "10.43.200.1"


def test_a_mirrored_vip_routes_to_the_gateway_proving_its_identity_with_target_labels() -> None:
    state, vip = mirrored_state()
    route = state.route((vip, 80))
    assert route == Route(("203.0.113.7", 4143),
                          PeerLabels(dst_namespace="shop", dst_service="web-cloud",
                                     dst_target_cluster="cloud", dst_target_service="web"),
                          True, GATEWAY_ID, "shop/web")


def test_the_agent_tunnels_to_the_gateway_asking_for_the_service_and_the_port_dialled() -> None:
    state, vip = mirrored_state()
    decision = connections.outbound((vip, 80), Pod(), state, mesh=True)
    assert isinstance(decision, Forward)
    assert (decision.destination, decision.path, decision.identity) == (
        ("203.0.113.7", 4143), Path.TUNNEL, GATEWAY_ID)
    assert (decision.target, decision.target_port) == ("shop/web", 80)


def test_a_pod_without_identity_cannot_reach_another_cluster() -> None:
    state, vip = mirrored_state()
    decision = connections.outbound((vip, 80), Pod(identity=None), state, mesh=True)
    assert isinstance(decision, Refuse) and decision.reason == "no_identity"


def test_target_labels_are_rendered_as_linkerd_names_them() -> None:
    from agent.core.telemetry import TcpLabels

    labels = TcpLabels("outbound", "shop", "client", PeerLabels(
        tls="true", dst_service="web-cloud", dst_target_cluster="cloud", dst_target_service="web"))
    values = tcp_label_values(labels)
    assert values["dst_target_cluster"] == "cloud" and values["dst_target_service"] == "web"


def test_a_plain_service_is_not_mistaken_for_a_mirror() -> None:
    service = remote_service(labels={multicluster.CLUSTER_LABEL: "cloud"})  # no mirrored-service
    record = project_service(service)
    assert record is not None and record.mirror is None


# --- manifests ------------------------------------------------------------------------------

def test_install_multicluster_adds_the_gateway_and_tells_agents_to_trust_it() -> None:
    rendered = install.render(install.load_manifests(), install.IssuerCredentials.generate("cloud.local"))
    documents = install.with_multicluster(rendered, "cloud.local", ["edge.local"], None)
    named = {(d["kind"], d["metadata"]["name"]): d for d in documents}
    assert named[("ConfigMap", "pinion-config")]["data"]["gateway-identities"] == GATEWAY_ID
    gateway = named[("Deployment", "pinion-gateway")]
    args = gateway["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--linked-trust-domain=edge.local" in args and "--listen=0.0.0.0:4143" in args
    # its certificate comes from the issuer (which it may reach): it holds no issuer key
    assert "pinion-issuer" not in json.dumps(gateway["spec"]["template"]["spec"]["volumes"]).replace(
        '"audience": "pinion-issuer"', "")
    peers = named[("NetworkPolicy", "pinion-issuer")]["spec"]["ingress"][0]["from"]
    assert {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "pinion-gateway"}}} in peers
    with pytest.raises(install.InstallError, match="linked-trust-domain"):
        install.with_multicluster(rendered, "cloud.local", [], None)


def test_link_prints_credentials_settings_and_the_mirror() -> None:
    remote = manifests.RemoteCluster("https://203.0.113.7:6443", b"CA", "tok", "203.0.113.7:4143",
                                     GATEWAY_ID, "203.0.113.7:4191")
    documents = manifests.link_manifests("cloud", remote)
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in documents}
    kubeconfig = json.loads(by_kind[("Secret", "cluster-credentials-cloud")]["stringData"]["kubeconfig"])
    assert kubeconfig["users"][0]["user"] == {"token": "tok"}
    assert base64.b64decode(kubeconfig["clusters"][0]["cluster"]["certificate-authority-data"]) == b"CA"
    assert by_kind[("ConfigMap", "pinion-link-cloud")]["data"]["gateway-address"] == "203.0.113.7:4143"
    role = by_kind[("ClusterRole", "pinion-mirror")]
    assert {r["resources"][0] for r in role["rules"]} == {"services", "endpointslices"}
    with pytest.raises(LinkError):
        manifests.link_manifests("cloud", manifests.RemoteCluster(
            "https://x", None, "tok", "gw.example:4143", GATEWAY_ID, ""))


def test_gateways_table_reads_as_linkerds() -> None:
    text = render_gateways([LinkStatus("cloud", {}, True, 3.4, "", 2),
                            LinkStatus("lab", {}, False, None, "refused", 0)])
    assert [line.split() for line in text.splitlines()] == [
        ["CLUSTER", "ALIVE", "NUM_SVC", "LATENCY"], ["cloud", "True", "2", "3ms"],
        ["lab", "False", "0", "-"]]


# --- the in-test API server does what the mirror relies on ---------------------------------

def test_the_fake_api_server_allocates_cluster_ips_and_keeps_them() -> None:
    store = Store()
    services = next(r for r in RESOURCES if r.kind == "Service")
    created = store.create(services, {"metadata": {"name": "web-cloud", "namespace": "default"},
                                      "spec": {"ports": [{"port": 80}]}})
    vip = created["spec"]["clusterIP"]
    assert vip.startswith("10.43.") and created["spec"]["clusterIPs"] == [vip]
    updated = store.replace(services, {"metadata": {"name": "web-cloud", "namespace": "default"},
                                       "spec": {"ports": [{"port": 81}]}})
    assert updated["spec"]["clusterIP"] == vip


def test_the_fake_api_server_turns_string_data_into_data() -> None:
    store = Store()
    secrets = next(r for r in RESOURCES if r.kind == "Secret")
    created = store.create(secrets, {"metadata": {"name": "s", "namespace": "default"},
                                     "stringData": {"kubeconfig": "{}"}})
    assert "stringData" not in created and base64.b64decode(created["data"]["kubeconfig"]) == b"{}"


def test_the_gateway_reaches_only_exported_services_with_a_ready_endpoint() -> None:
    from agent.controlplane.cluster.objects import project_pod
    from agent.controlplane.multicluster.gateway import StateResolver
    from tests.unit.test_cluster_state import pod_object, service_object, slice_object

    state = ClusterState("cloud.local")
    for name, vip in (("web", "10.43.0.10"), ("db", "10.43.0.11")):
        service = project_service(service_object(name, vip, 80, 8080))
        endpoints = project_slice(slice_object(f"{name}-x", name, [("10.42.0.7", True)], 8080))
        assert service is not None and endpoints is not None
        state.upsert_service(service)
        state.upsert_slice(endpoints)
    pod = project_pod(pod_object("web-5d8f9c-abcde", "10.42.0.7"))
    assert pod is not None
    state.upsert_pod(pod)
    resolver = StateResolver(state, {"shop/web": object()})  # db is not exported

    route = resolver.resolve("shop", "web", 80)
    assert route is not None and route.destination == ("10.42.0.7", 8080)
    assert resolver.resolve("shop", "db", 80) is None  # a linked cluster cannot reach it
    assert resolver.resolve("shop", "web", 81) is None  # no such port


def test_the_gateways_limits_let_a_natted_site_in() -> None:
    from agent.controlplane.multicluster.gateway import gateway_settings
    from agent.dataplane.mesh import MeshSettings

    agent, gateway = MeshSettings(), gateway_settings(4143)
    assert gateway.max_peer_connections > 100 * agent.max_peer_connections // 4  # replicas, one address
    assert gateway.handshakes.per_source >= 16 * agent.handshakes.per_source
    assert gateway.handshakes.connections >= agent.handshakes.connections  # still bounded


# --- the mirror controller against in-test API servers --------------------------------------

def test_the_mirror_makes_updates_and_deletes_mirrors_and_never_replaces_a_users_service(
        tmp_path: Any) -> None:
    import asyncio

    from agent.controlplane.kube.client import KubeClient
    from agent.controlplane.kube.config import KubeConfig
    from agent.controlplane.multicluster.mirror import MirrorController
    from tests.support.kubeapi import FakeApiServer

    remote = FakeApiServer(directory=tmp_path / "remote").start()
    local = FakeApiServer(directory=tmp_path / "local").start()
    try:
        for api in (remote, local):
            api.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
        for name in ("web", "api"):
            remote.apply(remote_service(name))
        # someone's own Service, by the name a mirror of api would take
        local.apply({"apiVersion": "v1", "kind": "Service",
                     "metadata": {"name": "api-cloud", "namespace": "shop"},
                     "spec": {"ports": [{"port": 9}]}})

        async def scenario() -> MirrorController:
            clients = [KubeClient(KubeConfig.load(str(api.kubeconfig)), timeout=5.0)
                       for api in (local, remote)]
            controller = MirrorController(clients[0], clients[1], LINK, resync=0.2)
            task = asyncio.create_task(controller.run())
            try:
                await asyncio.sleep(1.5)
                remote.apply(remote_service("web", ports=[{"name": "http", "port": 8080}]))
                await asyncio.sleep(1.0)
                remote.delete("v1", "Service", "shop", "web")
                await asyncio.sleep(1.0)
            finally:
                task.cancel()
                outcome = await asyncio.gather(task, return_exceptions=True)
                assert not isinstance(outcome[0], Exception), outcome  # it ran until cancelled
                for client in clients:
                    await client.close()
            return controller

        controller = asyncio.run(scenario())
        stats = controller.stats
        assert (stats.created, stats.updated, stats.deleted) == (1, 1, 1)
        assert stats.failures >= 1  # api-cloud: tried, refused, tried again at each resync
        users = local.get("v1", "Service", "shop", "api-cloud")
        assert users["spec"]["ports"] == [{"port": 9}] and not users["metadata"].get("labels")
        with pytest.raises(Exception, match="not found"):
            local.get("v1", "Service", "shop", "web-cloud")
    finally:
        remote.stop()
        local.stop()
