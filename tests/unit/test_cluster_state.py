"""What the agent keeps of watched objects, who is meshed, and where a Service VIP goes."""

from __future__ import annotations

from typing import Any

import pytest

from agent.controlplane.cluster.objects import (
    NamespaceRecord,
    Owner,
    project_job,
    project_namespace,
    project_pod,
    project_service,
    project_slice,
)
from agent.controlplane.cluster.policy import apply_record, mesh_decision
from agent.controlplane.cluster.state import ClusterState
from agent.core.telemetry import PeerLabels, TcpLabels
from agent.model import Pod, PodKey
from agent.observability.metrics import tcp_label_values


def pod_object(name: str, ip: str, *, namespace: str = "shop", node: str = "n1",
               labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None,
               owner: tuple[str, str] | None = ("ReplicaSet", "web-5d8f9c"), sa: str = "web",
               phase: str = "Running", host_network: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "uid": f"uid-{name}",
                            "labels": {"app": "web", "pod-template-hash": "5d8f9c", **(labels or {})},
                            "annotations": annotations or {}}
    if owner:
        meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": owner[0], "name": owner[1],
                                    "uid": "x", "controller": True}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
            "spec": {"nodeName": node, "serviceAccountName": sa, "hostNetwork": host_network,
                     "containers": [{"name": "app", "image": "nginx"}]},
            "status": {"phase": phase, "podIP": ip, "podIPs": [{"ip": ip}]}}


def service_object(name: str, vip: str, port: int, target: int | str, port_name: str = "http",
                   namespace: str = "shop") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
            "spec": {"clusterIP": vip, "clusterIPs": [vip],
                     "ports": [{"name": port_name, "port": port, "targetPort": target,
                                "protocol": "TCP"}]}}


def slice_object(name: str, service: str, addresses: list[tuple[str, bool]], port: int,
                 port_name: str = "http", namespace: str = "shop") -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": service}},
            "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": ready}} for ip, ready in addresses]}


def record(name: str = "web-5d8f9c-abcde", ip: str = "10.42.1.5", **kw: Any):  # type: ignore[no-untyped-def]
    projected = project_pod(pod_object(name, ip, **kw))
    assert projected is not None
    return projected


def test_a_pod_is_kept_as_a_few_strings_with_its_deployment_read_from_the_replicaset_name() -> None:
    pod = record()

    assert (pod.namespace, pod.name, pod.uid, pod.node, pod.ips) == (
        "shop", "web-5d8f9c-abcde", "uid-web-5d8f9c-abcde", "n1", ("10.42.1.5",))
    assert pod.owner == Owner("deployment", "web")
    assert pod.service_account == "web"


def test_other_controllers_are_named_as_they_are() -> None:
    assert record(owner=("StatefulSet", "db")).owner == Owner("statefulset", "db")
    assert record(owner=("ReplicaSet", "bare-rs")).owner == Owner("replicaset", "bare-rs")
    assert record(owner=None).owner is None


@pytest.mark.parametrize(("pod_says", "namespace_says", "meshed"), [
    ({"labels": {"pinion.dev/mesh": "enabled"}}, None, True),
    ({"annotations": {"pinion.dev/mesh": "disabled"}}, "enabled", False),
    ({"annotations": {"linkerd.io/inject": "enabled"}}, None, True),
    ({"annotations": {"linkerd.io/inject": "disabled"}}, "enabled", False),
    ({}, "enabled", True),
    ({}, "disabled", False),
    ({}, None, False),
    ({"labels": {"pinion.dev/mesh": "maybe"}}, "enabled", True),  # nonsense = not said
])
def test_the_pod_wins_over_its_namespace_and_linkerd_inject_is_honoured(
        pod_says: dict[str, dict[str, str]], namespace_says: str | None, meshed: bool) -> None:
    namespace = NamespaceRecord("shop", namespace_says)

    assert mesh_decision(record(**pod_says), namespace)[0] is meshed


def test_a_namespace_label_opts_in_and_host_network_pods_never_are() -> None:
    namespace = project_namespace({"metadata": {"name": "shop", "labels": {"pinion.dev/mesh": "enabled"}}})

    assert namespace == NamespaceRecord("shop", "enabled")
    assert mesh_decision(record(host_network=True), namespace) == (False, "host network")


def test_annotations_become_the_pods_capture_settings_linkerd_spelling_too() -> None:
    pod = record(annotations={"pinion.dev/inbound-policy": "mesh-only",
                              "config.linkerd.io/skip-outbound-ports": "5432, 6379",
                              "config.linkerd.io/opaque-ports": "3306",
                              "pinion.dev/allowed-clients": "spiffe://cluster.local/ns/shop/sa/front",
                              "pinion.dev/idle-timeout": "2h"})
    announced = Pod(PodKey("shop", "web-5d8f9c-abcde"), "", "c1", "/run/netns/x", ("10.42.1.5",))

    meshed = apply_record(announced, pod)

    assert meshed.idle_timeout == 7200.0
    assert meshed.service_account == "web" and meshed.uid == "uid-web-5d8f9c-abcde"
    assert meshed.capture.exclude_outbound_ports == (5432, 6379)
    assert meshed.opaque_ports == (3306,)
    assert meshed.inbound.mode == "mesh-only"
    assert meshed.inbound.allowed_clients == ("spiffe://cluster.local/ns/shop/sa/front",)
    assert (meshed.owner_kind, meshed.owner_name) == ("deployment", "web")


def test_linkerds_inbound_policies_map_onto_ours_and_a_typo_refuses_the_pod() -> None:
    announced = Pod(PodKey("shop", "p"), "", "c1", "/run/netns/x", ())
    strict = record(annotations={"config.linkerd.io/default-inbound-policy": "all-authenticated"})
    assert apply_record(announced, strict).inbound.mode == "mesh-only"

    typo = record(annotations={"pinion.dev/inbound-policy": "mesh-onyl"})
    with pytest.raises(ValueError, match="bad annotation"):
        apply_record(announced, typo)
    with pytest.raises(ValueError, match="out of range"):
        apply_record(announced, record(annotations={"pinion.dev/exclude-inbound-ports": "70000"}))


def cluster() -> ClusterState:
    state = ClusterState("cluster.local")
    state.upsert_namespace(NamespaceRecord("shop", "enabled"))
    state.upsert_pod(record("web-5d8f9c-aaaaa", "10.42.1.5"))
    state.upsert_pod(record("web-5d8f9c-bbbbb", "10.42.2.7", node="n2"))
    service = project_service(service_object("web", "10.43.0.10", 80, "http"))
    assert service is not None
    state.upsert_service(service)
    endpoints = project_slice(slice_object("web-x1", "web", [("10.42.1.5", True), ("10.42.2.7", True),
                                                             ("10.42.3.9", False)], 8080))
    assert endpoints is not None
    state.upsert_slice(endpoints)
    return state


def test_a_service_vip_is_resolved_to_its_ready_endpoints_in_turn_and_labelled() -> None:
    state = cluster()

    routes = [state.route(("10.43.0.10", 80)) for _ in range(4)]

    assert [r.destination for r in routes] == [("10.42.1.5", 8080), ("10.42.2.7", 8080)] * 2
    first = routes[0]
    assert first.labels == PeerLabels(dst_namespace="shop", dst_pod="web-5d8f9c-aaaaa",
                                      dst_owner_kind="deployment", dst_owner_name="web",
                                      dst_service="web")
    assert first.meshed and first.identity == "spiffe://cluster.local/ns/shop/sa/web"


def test_an_unknown_ip_goes_where_it_was_going_unlabelled_and_not_meshed() -> None:
    route = cluster().route(("192.0.2.1", 443))

    assert (route.destination, route.meshed, route.labels.dst_pod) == (("192.0.2.1", 443), False, "")


def test_a_service_without_ready_endpoints_is_passed_to_the_vip_and_a_deleted_one_forgotten() -> None:
    state = cluster()
    state.delete_slice("shop/web-x1")
    assert state.route(("10.43.0.10", 80)).destination == ("10.43.0.10", 80)

    state.delete_service("shop/web")
    assert state.endpoints("10.43.0.10", 80) is None


def test_an_ip_reused_by_a_new_pod_belongs_to_the_new_pod_and_finished_pods_hold_none() -> None:
    state = cluster()
    state.upsert_pod(record("batch-1", "10.42.1.5", owner=("Job", "batch"), phase="Succeeded"))
    assert state.pod_at("10.42.1.5").name == "web-5d8f9c-aaaaa"  # type: ignore[union-attr]

    state.upsert_pod(record("new-1", "10.42.1.5", owner=None))
    state.delete_pod("shop/web-5d8f9c-aaaaa")  # the old pod's delete arrives late

    assert state.pod_at("10.42.1.5").name == "new-1"  # type: ignore[union-attr]


def test_a_pod_not_opted_in_is_labelled_but_not_meshed() -> None:
    state = cluster()
    state.upsert_namespace(NamespaceRecord("shop", None))

    route = state.route(("10.42.2.7", 8080))

    assert route.labels.dst_pod == "web-5d8f9c-bbbbb" and not route.meshed and route.identity == ""


def test_owner_and_destination_workloads_render_as_linkerd_labels() -> None:
    labels = TcpLabels("outbound", "shop", "front-1", cluster().route(("10.43.0.10", 80)).labels,
                       owner_kind="deployment", owner_name="front")

    values = tcp_label_values(labels)

    assert values["deployment"] == "front"
    assert values["dst_deployment"] == "web"
    assert (values["dst_service"], values["dst_pod"], values["dst_namespace"]) == (
        "web", "web-5d8f9c-aaaaa", "shop")


def test_headless_services_and_ipv6_slices_are_not_kept() -> None:
    assert project_service(service_object("db", "None", 5432, 5432)) is None
    ipv6 = slice_object("web-v6", "web", [("fd00::1", True)], 8080)
    ipv6["addressType"] = "IPv6"
    assert project_slice(ipv6) is None


def job_object(name: str, cronjob: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "shop"}
    if cronjob:
        meta["ownerReferences"] = [{"apiVersion": "batch/v1", "kind": "CronJob", "name": cronjob,
                                    "uid": "x", "controller": True}]
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta}


def test_a_cronjobs_pods_are_the_cronjobs_as_linkerd_labels_them_and_other_jobs_stay_jobs() -> None:
    state = cluster()
    assert project_job(job_object("backup", None)) is None  # only CronJobs' Jobs are kept
    made = project_job(job_object("nightly-29000000", "nightly"))
    assert made is not None
    state.upsert_job(made)
    nightly = record("nightly-29000000-x7k2p", "10.42.1.9", owner=("Job", "nightly-29000000"))
    backup = record("backup-q7w2z", "10.42.1.10", owner=("Job", "backup"))
    for pod in (nightly, backup):
        state.upsert_pod(pod)

    assert state.owner(nightly) == Owner("cronjob", "nightly")
    assert state.owner(backup) == Owner("job", "backup")
    assert state.route(("10.42.1.9", 8080)).labels.dst_owner_kind == "cronjob"
    announced = Pod(PodKey("shop", nightly.name), "uid", "c", "/netns", ("10.42.1.9",))
    assert apply_record(announced, nightly, state.owner(nightly)).owner_kind == "cronjob"
    to_backup = state.route(("10.42.1.10", 80)).labels
    values = tcp_label_values(TcpLabels("outbound", "shop", "front-1", to_backup))
    assert values["dst_k8s_job"] == "backup"
    state.delete_job(made.key)
    assert state.owner(nightly) == Owner("job", "nightly-29000000")
