"""Manifests of multicluster (docs/multicluster.md), as `linkerd multicluster install|link`:

- `gateway_manifests`: what a cluster that *exports* Services runs (`pinion install
  --multicluster`): the gateway Deployment and its LoadBalancer Service (4143 tunnel, 4191
  probe), its read-only RBAC, the ConfigMap `pinion-gateway` (its identity and the linked
  trust domains it admits), and the service account a linked cluster's mirror reads exported
  Services with, with a token Secret;
- `link_manifests`: what `pinion multicluster link --cluster-name NAME` prints, read from the
  exporting cluster, for the cluster that *uses* its Services: the credentials (a kubeconfig
  with the read-only token), the link's settings, and the mirror Deployment with its RBAC."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from agent.core import multicluster

NAMESPACE = "pinion-system"  # the gateway's, beside the issuer that signs its certificate
LINK_NAMESPACE = "pinion-multicluster"  # the links' and mirrors'
GATEWAY = "pinion-gateway"
REMOTE_ACCESS = "pinion-mirror-remote-access"
REMOTE_ACCESS_TOKEN = f"{REMOTE_ACCESS}-token"
PROBE_PORT = 4191
DEFAULT_IMAGE = "ghcr.io/pinion-mesh/pinion:0.1.0"
_PART_OF = {"app.kubernetes.io/part-of": "pinion"}


def gateway_identity(trust_domain: str) -> str:
    return (f"spiffe://{trust_domain}/ns/{multicluster.GATEWAY_NAMESPACE}/sa/"
            f"{multicluster.GATEWAY_SERVICE_ACCOUNT}")


def _meta(name: str, namespace: str | None, component: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": {**_PART_OF, "app.kubernetes.io/component": component}}
    if namespace is not None:
        meta["namespace"] = namespace
    return meta


def _role(name: str, rules: list[tuple[str, str, list[str]]]) -> dict[str, Any]:
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": _meta(name, None, "multicluster"),
            "rules": [{"apiGroups": [group], "resources": [resource], "verbs": verbs}
                      for group, resource, verbs in rules]}


def _binding(name: str, account: str, namespace: str, role: str | None = None) -> dict[str, Any]:
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": _meta(name, None, "multicluster"),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": role or name},
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}]}


def _account(name: str, namespace: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(name, namespace, "multicluster")}


READ = ["get", "list", "watch"]


def gateway_manifests(trust_domain: str, linked_domains: list[str], image: str = DEFAULT_IMAGE,
                      ) -> list[dict[str, Any]]:
    """The exporting cluster's side (after `pinion install`'s own manifests)."""
    if not linked_domains:
        raise ValueError("--linked-trust-domain: the gateway admits only linked trust domains; "
                         "name at least one")
    labels = {"app.kubernetes.io/name": GATEWAY}
    args = ["multicluster", "gateway", f"--trust-domain={trust_domain}", "--in-cluster",
            f"--listen=0.0.0.0:{multicluster.GATEWAY_PORT}", f"--admin-addr=0.0.0.0:{PROBE_PORT}",
            *(f"--linked-trust-domain={domain}" for domain in linked_domains)]
    container = {
        "name": "gateway", "image": image, "imagePullPolicy": "IfNotPresent",
        "command": ["pinion"], "args": args,
        "ports": [{"name": "mc-gateway", "containerPort": multicluster.GATEWAY_PORT, "protocol": "TCP"},
                  {"name": "probe", "containerPort": PROBE_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": "probe"}, "periodSeconds": 10},
        "livenessProbe": {"httpGet": {"path": "/live", "port": "probe"}, "periodSeconds": 20},
        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"},
                      "limits": {"cpu": "1", "memory": "96Mi"}},
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "runAsNonRoot": True, "runAsUser": 65532, "capabilities": {"drop": ["ALL"]}},
        # its certificate from pinion-issuer, for its own service account's token (no issuer key)
        "volumeMounts": [{"name": "issuer-token", "mountPath": "/var/run/secrets/pinion", "readOnly": True},
                         {"name": "trust-bundle", "mountPath": "/var/run/pinion/trust-bundle",
                          "readOnly": True}]}
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(GATEWAY, NAMESPACE, "gateway"),
        "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": {**labels, **_PART_OF}},
                              "spec": {"serviceAccountName": GATEWAY, "containers": [container],
                                       "nodeSelector": {"kubernetes.io/os": "linux"},
                                       "volumes": [
                                           {"name": "issuer-token", "projected": {"sources": [
                                               {"serviceAccountToken": {"audience": "pinion-issuer",
                                                                        "expirationSeconds": 3600,
                                                                        "path": "token"}}]}},
                                           {"name": "trust-bundle",
                                            "configMap": {"name": "pinion-trust-bundle"}}]}}}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": _meta(GATEWAY, NAMESPACE, "gateway"),
               "spec": {"type": "LoadBalancer", "selector": labels,
                        "ports": [{"name": "mc-gateway", "port": multicluster.GATEWAY_PORT,
                                   "targetPort": "mc-gateway", "protocol": "TCP"},
                                  {"name": "probe", "port": PROBE_PORT, "targetPort": "probe",
                                   "protocol": "TCP"}]}}
    settings = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(GATEWAY, NAMESPACE, "gateway"),
                "data": {"identity": gateway_identity(trust_domain),
                         "linked-trust-domains": ",".join(linked_domains)}}
    token = {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/service-account-token",
             "metadata": {**_meta(REMOTE_ACCESS_TOKEN, NAMESPACE, "multicluster"),
                          "annotations": {"kubernetes.io/service-account.name": REMOTE_ACCESS}}}
    return [_account(GATEWAY, NAMESPACE),
            _role(GATEWAY, [("", "pods", READ), ("", "namespaces", READ), ("", "services", READ),
                            ("discovery.k8s.io", "endpointslices", READ)]),
            _binding(GATEWAY, GATEWAY, NAMESPACE), settings, deployment, service,
            _account(REMOTE_ACCESS, NAMESPACE), _role(REMOTE_ACCESS, [("", "services", READ)]),
            _binding(REMOTE_ACCESS, REMOTE_ACCESS, NAMESPACE), token]


@dataclass(frozen=True)
class RemoteCluster:
    """What `link` reads of the exporting cluster."""

    api_server: str
    ca_pem: bytes | None
    token: str
    gateway_address: str  # IP:PORT
    gateway_identity: str
    probe_address: str  # IP:PORT of the gateway's /ready


def remote_kubeconfig(remote: RemoteCluster, cluster_name: str) -> str:
    """A kubeconfig (JSON, which YAML readers take) with the remote-access token only."""
    cluster: dict[str, Any] = {"server": remote.api_server}
    if remote.ca_pem:
        cluster["certificate-authority-data"] = base64.b64encode(remote.ca_pem).decode()
    return json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": cluster_name,
        "clusters": [{"name": cluster_name, "cluster": cluster}],
        "users": [{"name": REMOTE_ACCESS, "user": {"token": remote.token}}],
        "contexts": [{"name": cluster_name, "context": {"cluster": cluster_name, "user": REMOTE_ACCESS}}],
    }, indent=1)


def link_manifests(cluster_name: str, remote: RemoteCluster, image: str = DEFAULT_IMAGE,
                   remote_domain: str = "cluster.local") -> list[dict[str, Any]]:
    """The using cluster's side of a link to `cluster_name`."""
    multicluster.check_cluster_name(cluster_name)
    host, _, port = remote.gateway_address.rpartition(":")
    multicluster.Link(cluster_name, host, int(port) if port.isdigit() else 0, remote.gateway_identity,
                      remote_domain)  # checks the address and identity
    name = f"pinion-mirror-{cluster_name}"
    credentials = f"cluster-credentials-{cluster_name}"
    settings = f"pinion-link-{cluster_name}"
    labels = {"app.kubernetes.io/name": name, multicluster.CLUSTER_LABEL: cluster_name}
    container = {
        "name": "mirror", "image": image, "imagePullPolicy": "IfNotPresent", "command": ["pinion"],
        "args": ["multicluster", "mirror", "--in-cluster", "--link-dir=/var/run/pinion/link"],
        "resources": {"requests": {"cpu": "5m", "memory": "24Mi"}, "limits": {"memory": "64Mi"}},
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "runAsNonRoot": True, "runAsUser": 65532,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "link", "mountPath": "/var/run/pinion/link", "readOnly": True}]}
    volume = {"name": "link", "projected": {"sources": [
        {"secret": {"name": credentials, "items": [{"key": "kubeconfig", "path": "kubeconfig"}]}},
        {"configMap": {"name": settings}}]}}
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": _meta(LINK_NAMESPACE, None, "multicluster")},
        {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
         "metadata": {**_meta(credentials, LINK_NAMESPACE, "multicluster"),
                      "labels": {**_PART_OF, multicluster.CLUSTER_LABEL: cluster_name}},
         "stringData": {"kubeconfig": remote_kubeconfig(remote, cluster_name)}},
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {**_meta(settings, LINK_NAMESPACE, "multicluster"),
                      "labels": {**_PART_OF, "mirror.pinion.dev/link": "true",
                                 multicluster.CLUSTER_LABEL: cluster_name}},
         "data": {"cluster-name": cluster_name, "gateway-address": remote.gateway_address,
                  "gateway-identity": remote.gateway_identity, "probe-address": remote.probe_address,
                  "remote-domain": remote_domain}},
        _account(name, LINK_NAMESPACE),
        _role("pinion-mirror", [("", "services", [*READ, "create", "update", "delete"]),
                                ("discovery.k8s.io", "endpointslices", [*READ, "create", "update",
                                                                        "delete"])]),
        _binding(name, name, LINK_NAMESPACE, role="pinion-mirror"),
        {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": _meta(name, LINK_NAMESPACE, "mirror"),
         "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                  "template": {"metadata": {"labels": {**labels, **_PART_OF}},
                               "spec": {"serviceAccountName": name, "containers": [container],
                                        "volumes": [volume]}}}},
    ]


async def read_remote(client: Any, api_server: str, ca_pem: bytes | None, gateway_address: str | None,
                      gateway_identity_override: str | None) -> RemoteCluster:
    """What the link needs of the exporting cluster, through `client` (a KubeClient on it)."""
    token_secret = await client.get_optional(
        f"/api/v1/namespaces/{NAMESPACE}/secrets/{REMOTE_ACCESS_TOKEN}")
    token = base64.b64decode(((token_secret or {}).get("data") or {}).get("token", "")).decode()
    if not token:
        raise ValueError(f"the exporting cluster has no token in {NAMESPACE}/{REMOTE_ACCESS_TOKEN}: "
                         "run `pinion install --multicluster` there first")
    settings = await client.get_optional(f"/api/v1/namespaces/{NAMESPACE}/configmaps/{GATEWAY}")
    identity = gateway_identity_override or ((settings or {}).get("data") or {}).get("identity", "")
    if not identity:
        raise ValueError(f"the exporting cluster has no ConfigMap {NAMESPACE}/{GATEWAY}: give "
                         "--gateway-identity, or install its gateway")
    address = gateway_address
    if address is None:
        service = await client.get_optional(f"/api/v1/namespaces/{NAMESPACE}/services/{GATEWAY}")
        ingress = (((service or {}).get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
        ip = ingress[0].get("ip") if ingress and isinstance(ingress[0], dict) else None
        if not ip:
            raise ValueError(f"the Service {NAMESPACE}/{GATEWAY} has no load-balancer address yet: "
                             "give --gateway-address IP[:PORT]")
        address = str(ip)
    if ":" not in address:
        address = f"{address}:{multicluster.GATEWAY_PORT}"
    probe = f"{address.rpartition(':')[0]}:{PROBE_PORT}"
    return RemoteCluster(api_server, ca_pem, token, address, identity, probe)
