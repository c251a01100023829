"""Multicluster, sans-IO: the names, labels and objects of mirrored Services, and the
gateway's decisions (who may come in, where a stream goes), as Linkerd multicluster has them.

A cluster *exports* a Service by labelling it `mirror.pinion.dev/exported=true` (Linkerd's
`mirror.linkerd.io/exported=true` is honoured too). A linked cluster's mirror controller
keeps, for each exported `<ns>/<svc>` of cluster `<cluster>`, a Service `<ns>/<svc>-<cluster>`
without selector and an EndpointSlice whose one endpoint is the remote gateway. Agents that
see a connection to such a Service's VIP send it as a tunnel stream to that gateway, proving
the gateway's identity, with the target Service in the stream's open header (`TARGET_KEY`)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

EXPORT_LABELS = ("mirror.pinion.dev/exported", "mirror.linkerd.io/exported")
MIRRORED_LABEL = "mirror.pinion.dev/mirrored-service"
CLUSTER_LABEL = "mirror.pinion.dev/cluster-name"
REMOTE_NAME = "mirror.pinion.dev/remote-svc-fq-name"
GATEWAY_IDENTITY = "mirror.pinion.dev/remote-gateway-identity"
GATEWAY_ADDRESS = "mirror.pinion.dev/remote-gateway-address"
REMOTE_VERSION = "mirror.pinion.dev/remote-resource-version"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY = "endpointslice.kubernetes.io/managed-by"
MANAGER = "mirror.pinion.dev"

# Open-header metadata keys of a stream to a gateway (agent.core.tunnel_frames: at most 16
# entries, values at most 256 bytes): the Service it is for, as `<namespace>/<name>`.
TARGET_KEY = "target"
# A gateway forwarding a stream into a pod says whose it is: the caller's proven identity.
CLIENT_KEY = "client-id"

GATEWAY_PORT = 4143  # as Linkerd's gateway
GATEWAY_NAMESPACE = "pinion-system"  # the issuer signs pinion-gateway's identity there only
GATEWAY_SERVICE_ACCOUNT = "pinion-gateway"

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


class LinkError(ValueError):
    """A link's settings cannot work (bad cluster name, gateway address, identity)."""


@dataclass(frozen=True, slots=True)
class Link:
    """What a cluster knows of a linked one: its name, its gateway and whom the gateway proves."""

    cluster_name: str
    gateway_ip: str
    gateway_port: int
    gateway_identity: str  # spiffe://<remote trust domain>/ns/.../sa/...
    remote_domain: str = "cluster.local"  # the remote cluster's DNS domain, for fq names

    def __post_init__(self) -> None:
        check_cluster_name(self.cluster_name)
        parts = self.gateway_ip.split(".")
        if len(parts) != 4 or not all(p.isdigit() and 0 <= int(p) <= 255 for p in parts):
            raise LinkError(f"gateway address must be an IPv4 address, not {self.gateway_ip!r}")
        if not 0 < self.gateway_port < 65536:
            raise LinkError(f"gateway port out of range: {self.gateway_port}")
        if not self.gateway_identity.startswith("spiffe://"):
            raise LinkError(f"gateway identity must be a spiffe:// ID, not {self.gateway_identity!r}")


def check_cluster_name(name: str) -> str:
    if not _DNS_LABEL.fullmatch(name) or len(name) > 40:
        raise LinkError(f"cluster name must be a DNS label of at most 40 characters, not {name!r}")
    return name


def trust_domain_of(spiffe_id: str) -> str:
    """`td` of spiffe://td/…; "" if it is not a spiffe:// ID."""
    if not spiffe_id.startswith("spiffe://"):
        return ""
    return spiffe_id[len("spiffe://"):].split("/", 1)[0]


# --- the mirror -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ExportedService:
    """A remote Service labelled for export, as much of it as a mirror needs."""

    namespace: str
    name: str
    ports: tuple[tuple[str, int], ...]  # (name, port), TCP only

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def exported(obj: Mapping[str, Any]) -> ExportedService | None:
    """The projection of a remote Service: None unless it is labelled for export and has TCP
    ports (an unexported Service is a deleted one, for the mirror)."""
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    if not isinstance(labels, dict) or not any(str(labels.get(k, "")).lower() == "true"
                                               for k in EXPORT_LABELS):
        return None
    spec = obj.get("spec") or {}
    ports = tuple((str(p.get("name") or ""), p["port"]) for p in spec.get("ports") or ()
                  if isinstance(p, dict) and isinstance(p.get("port"), int)
                  and str(p.get("protocol") or "TCP") == "TCP")
    if not meta.get("name") or not ports:
        return None
    return ExportedService(str(meta.get("namespace") or "default"), str(meta["name"]), ports)


def mirror_name(service: str, cluster: str) -> str:
    """`<svc>-<cluster>`; LinkError when that is no valid Service name (63 characters)."""
    name = f"{service}-{cluster}"
    if len(name) > 63 or not _DNS_LABEL.fullmatch(name):
        raise LinkError(f"mirror of {service!r} from {cluster!r} would be named {name!r}: not a "
                        "valid Service name (a DNS label of at most 63 characters)")
    return name


def mirror_objects(remote: ExportedService, link: Link) -> tuple[dict[str, Any], dict[str, Any]]:
    """The local Service and EndpointSlice that mirror `remote`: the Service has the remote's
    ports and no selector; the slice's one endpoint is the gateway, every port its port."""
    name = mirror_name(remote.name, link.cluster_name)
    labels = {MIRRORED_LABEL: "true", CLUSTER_LABEL: link.cluster_name}
    annotations = {
        REMOTE_NAME: f"{remote.name}.{remote.namespace}.svc.{link.remote_domain}",
        GATEWAY_IDENTITY: link.gateway_identity,
        GATEWAY_ADDRESS: f"{link.gateway_ip}:{link.gateway_port}",
        REMOTE_VERSION: mirror_version(remote),
    }
    service = {"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": name, "namespace": remote.namespace, "labels": labels,
                            "annotations": annotations},
               "spec": {"type": "ClusterIP",
                        "ports": [{"name": port_name, "port": port, "protocol": "TCP",
                                   "targetPort": link.gateway_port}
                                  for port_name, port in remote.ports]}}
    endpoint_slice = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                      "metadata": {"name": f"{name}-gateway", "namespace": remote.namespace,
                                   "labels": {**labels, SERVICE_NAME_LABEL: name,
                                              MANAGED_BY: MANAGER}},
                      "addressType": "IPv4",
                      "endpoints": [{"addresses": [link.gateway_ip], "conditions": {"ready": True}}],
                      "ports": [{"name": port_name, "port": link.gateway_port, "protocol": "TCP"}
                                for port_name, _ in remote.ports]}
    return service, endpoint_slice


@dataclass(frozen=True, slots=True)
class MirrorPlan:
    """What the mirror controller must do to make the local mirrors match the remote exports."""

    upserts: tuple[ExportedService, ...]
    deletes: tuple[str, ...]  # "<ns>/<mirror name>"


def plan(remote: Mapping[str, ExportedService], local: Mapping[str, str],
         cluster: str) -> MirrorPlan:
    """`remote`: exported Services by key; `local`: this cluster's mirrors of `cluster`, key ->
    the remote resource version they were made from. Upsert what is missing or changed,
    delete mirrors of Services no longer exported. Names that cannot be mirrored are skipped."""
    wanted: dict[str, ExportedService] = {}
    for service in remote.values():
        try:
            wanted[f"{service.namespace}/{mirror_name(service.name, cluster)}"] = service
        except LinkError:
            continue
    upserts = tuple(service for key, service in sorted(wanted.items())
                    if local.get(key) != mirror_version(service))
    deletes = tuple(sorted(key for key in local if key not in wanted))
    return MirrorPlan(upserts, deletes)


def mirror_version(service: ExportedService) -> str:
    """What a mirror records of its source (annotation REMOTE_VERSION): its ports. Not the
    resourceVersion, which a restarted or relisted API server may change for nothing."""
    return ",".join(f"{name}:{port}" for name, port in service.ports)


# --- the gateway ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Admit:
    client_id: str


@dataclass(frozen=True, slots=True)
class Deny:
    reason: str  # a metric label
    detail: str


def admit_client(client_id: str, linked_domains: frozenset[str]) -> Admit | Deny:
    """A client the gateway's TLS verified: only identities of linked trust domains get in."""
    domain = trust_domain_of(client_id)
    if not domain:
        return Deny("no_spiffe_id", f"{client_id!r} is not a SPIFFE ID")
    if domain not in linked_domains:
        return Deny("unlinked_trust_domain", f"{client_id} is not in a linked trust domain "
                    f"({', '.join(sorted(linked_domains)) or 'none linked'})")
    return Admit(client_id)


def stream_target(metadata: Mapping[str, str]) -> tuple[str, str] | Deny:
    """(namespace, service) a gateway stream is for, from its open header."""
    target = metadata.get(TARGET_KEY, "")
    namespace, _, name = target.partition("/")
    if not namespace or not name or not _DNS_LABEL.fullmatch(namespace) or \
            not _DNS_LABEL.fullmatch(name):
        return Deny("no_target", f"stream names no target Service (<namespace>/<name>): {target!r}")
    return namespace, name


def forwarded_client(peer_id: str, metadata: Mapping[str, str],
                     gateways: frozenset[str]) -> str:
    """The identity a stream is from: the tunnel's proven peer, or, when that peer is a
    trusted gateway of this cluster, the caller the gateway proved and forwards."""
    if peer_id in gateways:
        forwarded = metadata.get(CLIENT_KEY, "")
        if forwarded.startswith("spiffe://"):
            return forwarded
    return peer_id
