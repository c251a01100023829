"""Kubernetes objects reduced to what the agent needs, as they arrive from a watch.

A pod object is 3 to 10 KB of JSON; what the mesh needs of it is a few strings. Projections
are frozen and small, so a cluster-wide pod watch costs little per pod; whole objects are
never kept."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from agent.core import multicluster

# Opt-in keys, in the order they are asked (docs/kubernetes.md).
MESH_KEY = "pinion.dev/mesh"
LINKERD_INJECT = "linkerd.io/inject"
ENABLED, DISABLED = "enabled", "disabled"

# Per-pod annotations we keep; Linkerd's spelling is read when Pinion's is absent.
SETTINGS: dict[str, tuple[str, ...]] = {
    "inbound-policy": ("pinion.dev/inbound-policy", "config.linkerd.io/default-inbound-policy"),
    "allowed-clients": ("pinion.dev/allowed-clients",),
    "exclude-inbound-ports": ("pinion.dev/exclude-inbound-ports", "config.linkerd.io/skip-inbound-ports"),
    "exclude-outbound-ports": ("pinion.dev/exclude-outbound-ports",
                               "config.linkerd.io/skip-outbound-ports"),
    "exclude-outbound-cidrs": ("pinion.dev/exclude-outbound-cidrs",
                               "config.alpha.linkerd.io/skip-outbound-ips"),
    "opaque-ports": ("pinion.dev/opaque-ports", "config.linkerd.io/opaque-ports"),
    "idle-timeout": ("pinion.dev/idle-timeout",),
}
# Linkerd's default-inbound-policy values, in our two modes.
LINKERD_POLICIES = {"all-unauthenticated": "permissive", "cluster-unauthenticated": "permissive",
                    "all-authenticated": "mesh-only", "cluster-authenticated": "mesh-only"}

FINISHED_PHASES = ("Succeeded", "Failed")


@dataclass(frozen=True, slots=True)
class Owner:
    """The workload a pod belongs to, as Linkerd labels it (`deployment="web"`)."""

    kind: str  # lower-case: deployment, statefulset, daemonset, replicaset, job, …
    name: str


@dataclass(frozen=True, slots=True)
class PodRecord:
    namespace: str
    name: str
    uid: str
    node: str
    ips: tuple[str, ...]
    service_account: str
    owner: Owner | None
    host_network: bool
    finished: bool  # Succeeded or Failed: its IP may already belong to another pod
    mesh: str | None  # the pod's own opt-in answer (label/annotation), None = not said
    settings: tuple[tuple[str, str], ...]  # (setting, raw value) from SETTINGS, sorted

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def setting(self, name: str) -> str:
        return dict(self.settings).get(name, "")


@dataclass(frozen=True, slots=True)
class NamespaceRecord:
    name: str
    mesh: str | None


@dataclass(frozen=True, slots=True)
class JobRecord:
    """A Job a CronJob made: its pods are labelled with the CronJob, as Linkerd labels them
    (`cronjob="nightly"`). Jobs of no CronJob are not kept."""

    namespace: str
    name: str
    cronjob: str

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str
    port: int
    target_port: int | str  # a number, or a container port's name (resolved by EndpointSlices)


@dataclass(frozen=True, slots=True)
class MirrorOf:
    """A Service mirrored from a linked cluster (agent.core.multicluster): whose it is and
    whom its endpoint, that cluster's gateway, must prove to be."""

    cluster: str
    remote_name: str  # the Service's name there (same namespace)
    gateway_identity: str


@dataclass(frozen=True, slots=True)
class ServiceRecord:
    namespace: str
    name: str
    cluster_ips: tuple[str, ...]
    ports: tuple[ServicePort, ...]
    mirror: MirrorOf | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class SliceRecord:
    """One EndpointSlice: the ready IPv4 endpoints of a Service, and its port numbers by name."""

    namespace: str
    name: str
    service: str  # the owning Service's name (label kubernetes.io/service-name)
    ports: tuple[tuple[str, int], ...]  # (port name, port number)
    addresses: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def service_key(self) -> str:
        return f"{self.namespace}/{self.service}"


def _meta(obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _strings(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items() if isinstance(v, (str, int, bool))}


def mesh_answer(labels: dict[str, str], annotations: dict[str, str]) -> str | None:
    """`pinion.dev/mesh` (label, then annotation), then Linkerd's `linkerd.io/inject`
    (annotation, then label): enabled / disabled / None when neither says."""
    for value in (labels.get(MESH_KEY), annotations.get(MESH_KEY),
                  annotations.get(LINKERD_INJECT), labels.get(LINKERD_INJECT)):
        if value is None:
            continue
        value = value.strip().lower()
        if value in (ENABLED, DISABLED):
            return value
    return None


def project_pod(obj: dict[str, Any]) -> PodRecord | None:
    meta, spec = _meta(obj), obj.get("spec") or {}
    status = obj.get("status") or {}
    if not meta.get("name") or not isinstance(spec, dict) or not isinstance(status, dict):
        return None
    labels, annotations = _strings(meta.get("labels")), _strings(meta.get("annotations"))
    settings = []
    for setting, keys in SETTINGS.items():
        value = next((annotations[k] for k in keys if k in annotations), None)
        if value is not None:
            settings.append((setting, value))
    return PodRecord(
        namespace=str(meta.get("namespace") or "default"),
        name=str(meta["name"]),
        uid=str(meta.get("uid") or ""),
        node=str(spec.get("nodeName") or ""),
        ips=_pod_ips(status),
        service_account=str(spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"),
        owner=owner_of(meta, labels),
        host_network=bool(spec.get("hostNetwork")),
        finished=status.get("phase") in FINISHED_PHASES,
        mesh=mesh_answer(labels, annotations),
        settings=tuple(sorted(settings)),
    )


def _pod_ips(status: dict[str, Any]) -> tuple[str, ...]:
    ips = [entry.get("ip") for entry in status.get("podIPs") or () if isinstance(entry, dict)]
    if not ips and status.get("podIP"):
        ips = [status["podIP"]]
    valid = []
    for ip in ips:
        try:
            valid.append(str(ipaddress.ip_address(str(ip))))
        except ValueError:
            continue
    return tuple(valid)


def owner_of(meta: dict[str, Any], labels: dict[str, str]) -> Owner | None:
    """The controlling workload. A ReplicaSet made by a Deployment is named
    `<deployment>-<pod-template-hash>`: the Deployment is read from the name, without
    watching ReplicaSets (Linkerd's destination service does the same)."""
    for ref in meta.get("ownerReferences") or ():
        if not isinstance(ref, dict) or not ref.get("controller"):
            continue
        kind, name = str(ref.get("kind") or "").lower(), str(ref.get("name") or "")
        if not kind or not name:
            return None
        template_hash = labels.get("pod-template-hash")
        if kind == "replicaset" and template_hash and name.endswith("-" + template_hash):
            return Owner("deployment", name[: -len(template_hash) - 1])
        return Owner(kind, name)
    return None


def project_namespace(obj: dict[str, Any]) -> NamespaceRecord | None:
    meta = _meta(obj)
    if not meta.get("name"):
        return None
    return NamespaceRecord(str(meta["name"]),
                           mesh_answer(_strings(meta.get("labels")), _strings(meta.get("annotations"))))


def project_service(obj: dict[str, Any]) -> ServiceRecord | None:
    """Services with a virtual IP; headless ones (clusterIP None) and ExternalName have none."""
    meta, spec = _meta(obj), obj.get("spec") or {}
    if not meta.get("name") or not isinstance(spec, dict):
        return None
    ips = [ip for ip in spec.get("clusterIPs") or [spec.get("clusterIP")] if ip and ip != "None"]
    vips = []
    for ip in ips:
        try:
            vips.append(str(ipaddress.ip_address(str(ip))))
        except ValueError:
            continue
    ports = []
    for port in spec.get("ports") or ():
        if not isinstance(port, dict) or str(port.get("protocol") or "TCP") != "TCP":
            continue
        number = port.get("port")
        if not isinstance(number, int):
            continue
        target = port.get("targetPort", number)
        target = target if isinstance(target, (int, str)) and target != "" else number
        ports.append(ServicePort(str(port.get("name") or ""), number, target))
    if not vips or not ports:
        return None
    return ServiceRecord(str(meta.get("namespace") or "default"), str(meta["name"]), tuple(vips),
                         tuple(ports), _mirror_of(meta))


def _mirror_of(meta: dict[str, Any]) -> MirrorOf | None:
    labels, annotations = _strings(meta.get("labels")), _strings(meta.get("annotations"))
    cluster = labels.get(multicluster.CLUSTER_LABEL, "")
    identity = annotations.get(multicluster.GATEWAY_IDENTITY, "")
    remote = annotations.get(multicluster.REMOTE_NAME, "").split(".", 1)[0]
    if labels.get(multicluster.MIRRORED_LABEL) != "true" or not cluster or not remote or \
            not identity.startswith("spiffe://"):
        return None
    return MirrorOf(cluster, remote, identity)


def project_job(obj: dict[str, Any]) -> JobRecord | None:
    """Only Jobs whose controller is a CronJob (the rest say nothing a pod does not)."""
    meta = _meta(obj)
    owner = owner_of(meta, {})
    if not meta.get("name") or owner is None or owner.kind != "cronjob":
        return None
    return JobRecord(str(meta.get("namespace") or "default"), str(meta["name"]), owner.name)


def project_slice(obj: dict[str, Any]) -> SliceRecord | None:
    """IPv4 slices of a Service: endpoints whose `ready` condition is not false."""
    meta = _meta(obj)
    service = _strings(meta.get("labels")).get("kubernetes.io/service-name")
    if not meta.get("name") or not service or obj.get("addressType") != "IPv4":
        return None
    ports = tuple((str(p.get("name") or ""), p["port"]) for p in obj.get("ports") or ()
                  if isinstance(p, dict) and isinstance(p.get("port"), int)
                  and str(p.get("protocol") or "TCP") == "TCP")
    addresses: list[str] = []
    for endpoint in obj.get("endpoints") or ():
        if not isinstance(endpoint, dict):
            continue
        conditions = endpoint.get("conditions") or {}
        if isinstance(conditions, dict) and conditions.get("ready") is False:
            continue
        addresses.extend(str(a) for a in endpoint.get("addresses") or () if isinstance(a, str))
    return SliceRecord(str(meta.get("namespace") or "default"), str(meta["name"]), service, ports,
                       tuple(sorted(set(addresses))))
