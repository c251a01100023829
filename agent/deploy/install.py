"""`pinion install`: the manifests of deploy/ as one YAML stream for `kubectl apply -f -`, with
the issuer's credentials filled in.

The checked-in manifests are the template. Rendering changes only what is per-install:
- the Secret `pinion-issuer` is added (issuer.crt, issuer.key, trust-bundle.crt, trust-domain:
  the identity-dir layout minus the anchor, docs/kubernetes.md);
- the ConfigMap `pinion-trust-bundle` gets the real bundle instead of the placeholder;
- the ConfigMap `pinion-config` gets the trust domain, and `--redirect`/`--log-level` if given;
- `--image` replaces every container's image;
- the NetworkPolicy `pinion-issuer` admits 8443 from the node addresses `issuer_peers` derives from
  `--node-cidr` and `--pod-cidr` (deploy/issuer-networkpolicy.yaml says why those).

The trust anchor's private key is never emitted: a fresh anchor's key is dropped once it has
signed the issuer; with `--identity-dir` it stays in that directory.
"""

from __future__ import annotations

import base64
import copy
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata, resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import yaml

from agent.identity import files
from agent.identity.authority import IssueError, LocalSigner
from agent.identity.crypto import CryptoError, signed_by
from agent.identity.spiffe import check_trust_domain

NAMESPACE = "pinion-system"
# `kubectl apply -f deploy/` takes files in name order; the stream follows dependencies:
# namespace, accounts, settings, then the workloads that use them.
MANIFEST_FILES = ("00-namespace.yaml", "rbac.yaml", "config.yaml", "issuer.yaml", "issuer-networkpolicy.yaml",
                  "keeper.yaml", "daemonset.yaml")
SECRET_NAME = "pinion-issuer"
SECRET_KEYS = (files.ISSUER_CERT, files.ISSUER_KEY, files.TRUST_BUNDLE, files.TRUST_DOMAIN)
CONFIG_NAME = "pinion-config"
BUNDLE_NAME = "pinion-trust-bundle"
DEFAULT_TRUST_DOMAIN = "cluster.local"
WORKLOAD_KINDS = ("DaemonSet", "Deployment")
ISSUER_POLICY = "pinion-issuer"
DEFAULT_NODE_CIDRS = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")  # RFC 1918: home and lab LANs
DEFAULT_POD_CIDR = "10.42.0.0/16"  # k3s's --cluster-cidr
NODE_POD_PREFIX = 24  # k3s's --kube-controller-manager-arg node-cidr-mask-size default: a /24 per node
MAX_NODE_SUBNETS = 1024


class InstallError(Exception):
    """Why no manifests can be rendered; the message is for the user."""


@dataclass(frozen=True)
class IssuerCredentials:
    """What the cluster gets of an identity directory: the issuer and the bundle, no anchor key."""

    trust_domain: str
    issuer_cert: bytes
    issuer_key: bytes
    trust_bundle: bytes

    @classmethod
    def generate(cls, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> IssuerCredentials:
        """A new anchor and an issuer it signs; the anchor's key is dropped here."""
        try:
            made = files.new_authority(trust_domain)
        except ValueError as exc:
            raise InstallError(str(exc)) from exc
        return cls(trust_domain, made[files.ISSUER_CERT], made[files.ISSUER_KEY], made[files.TRUST_BUNDLE])

    @classmethod
    def from_identity_dir(cls, path: Path) -> IssuerCredentials:
        """The issuer of a `pinion identity init` directory, checked: its key matches its CA
        certificate, the bundle holds CA certificates, and one of them signed the issuer."""
        try:
            trust_domain = LocalSigner.from_dir(path).trust_domain
            anchors = files.load_trust_bundle(path)
            issuer_cert = (path / files.ISSUER_CERT).read_bytes()
            issuer_key = (path / files.ISSUER_KEY).read_bytes()
            bundle = (path / files.TRUST_BUNDLE).read_bytes()
            chains = any(signed_by(issuer_cert, anchor) for anchor in anchors)
        except (OSError, ValueError, CryptoError, IssueError) as exc:
            raise InstallError(f"{path} is not a usable identity directory: {exc}") from exc
        if not chains:
            raise InstallError(f"{path}: {files.ISSUER_CERT} is not signed by any anchor of "
                               f"{files.TRUST_BUNDLE}: agents would reject every certificate it issues")
        return cls(trust_domain, issuer_cert, issuer_key, bundle)

    def secret_data(self) -> dict[str, str]:
        """The Secret's `data`: every key base64, as the API wants it."""
        values = {files.ISSUER_CERT: self.issuer_cert, files.ISSUER_KEY: self.issuer_key,
                  files.TRUST_BUNDLE: self.trust_bundle,
                  files.TRUST_DOMAIN: f"{self.trust_domain}\n".encode()}
        return {key: base64.b64encode(values[key]).decode("ascii") for key in SECRET_KEYS}


@dataclass(frozen=True)
class Overrides:
    """Flags of `pinion install` that change the manifests; None keeps the checked-in value."""

    image: str | None = None
    redirect: str | None = None
    log_level: str | None = None
    node_cidrs: tuple[str, ...] = DEFAULT_NODE_CIDRS
    pod_cidr: str = DEFAULT_POD_CIDR


def manifest_directory() -> Traversable:
    """deploy/, through the package (a symlink in a checkout, copied files in a wheel)."""
    return resources.files("agent.deploy").joinpath("manifests")


def load_manifests(directory: Traversable | Path | None = None) -> list[dict[str, Any]]:
    """Every object of MANIFEST_FILES, in order."""
    where = directory if directory is not None else manifest_directory()
    documents: list[dict[str, Any]] = []
    for name in MANIFEST_FILES:
        try:
            text = where.joinpath(name).read_text(encoding="utf-8")
        except OSError as exc:
            raise InstallError(f"cannot read the manifest {name}: {exc}") from exc
        documents += [document for document in yaml.safe_load_all(text) if document is not None]
    return documents


def render(manifests: Sequence[dict[str, Any]], credentials: IssuerCredentials,
           overrides: Overrides = Overrides()) -> list[dict[str, Any]]:
    """The objects to apply: the manifests with the credentials and overrides filled in."""
    documents = copy.deepcopy(list(manifests))
    settings = _find(documents, "ConfigMap", CONFIG_NAME)["data"]
    settings["trust-domain"] = check_trust_domain(credentials.trust_domain)
    if overrides.redirect is not None:
        settings["redirect"] = overrides.redirect
    if overrides.log_level is not None:
        settings["log-level"] = overrides.log_level
    bundle = _find(documents, "ConfigMap", BUNDLE_NAME)
    bundle["data"] = {files.TRUST_BUNDLE: credentials.trust_bundle.decode("ascii")}
    if overrides.image is not None:
        for container in _containers(documents):
            container["image"] = overrides.image
    policy = _find(documents, "NetworkPolicy", ISSUER_POLICY)
    policy["spec"]["ingress"][0]["from"] = issuer_peers(overrides.node_cidrs, overrides.pod_cidr)
    documents.insert(documents.index(bundle) + 1, _secret(credentials))
    return documents


def with_multicluster(documents: list[dict[str, Any]], trust_domain: str, linked_domains: Sequence[str],
                      image: str | None) -> list[dict[str, Any]]:
    """The rendered manifests plus the gateway's (agent.deploy.multicluster), and the agents
    told to trust the gateway's forwarded identities (ConfigMap key gateway-identities)."""
    from agent.deploy import multicluster

    try:
        extra = multicluster.gateway_manifests(trust_domain, list(linked_domains),
                                               image or multicluster.DEFAULT_IMAGE)
    except ValueError as exc:
        raise InstallError(str(exc)) from None
    documents = copy.deepcopy(documents)
    settings = _find(documents, "ConfigMap", CONFIG_NAME)["data"]
    settings["gateway-identities"] = multicluster.gateway_identity(trust_domain)
    policy = _find(documents, "NetworkPolicy", ISSUER_POLICY)  # the gateway asks it too
    policy["spec"]["ingress"][0]["from"].append(
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": multicluster.GATEWAY}}})
    return documents + extra


def issuer_peers(node_cidrs: Sequence[str], pod_cidr: str,
                 node_prefix: int = NODE_POD_PREFIX) -> list[dict[str, Any]]:
    """The NetworkPolicy peers that are nodes: each node CIDR without the pod network, and the .0/31 of
    each node's pod subnet (flannel.1 and cni0 on k3s, the addresses agents' traffic takes there)."""
    pods = _network("--pod-cidr", pod_cidr)
    if not pods.prefixlen <= node_prefix < pods.max_prefixlen:
        raise InstallError(f"--pod-cidr {pods} is smaller than one node's /{node_prefix}")
    if 2 ** (node_prefix - pods.prefixlen) > MAX_NODE_SUBNETS:
        raise InstallError(f"--pod-cidr {pods} holds more than {MAX_NODE_SUBNETS} node subnets of "
                           f"/{node_prefix}; give a narrower one")
    peers: list[dict[str, Any]] = []
    for text in node_cidrs:
        nodes = _network("--node-cidr", text)
        if nodes.version == pods.version and nodes.subnet_of(pods):  # type: ignore[arg-type]
            raise InstallError(f"--node-cidr {nodes} lies inside --pod-cidr {pods}: it would admit pods")
        block: dict[str, Any] = {"cidr": str(nodes)}
        if nodes.version == pods.version and pods.subnet_of(nodes):  # type: ignore[arg-type]
            block["except"] = [str(pods)]
        peers.append({"ipBlock": block})
    for subnet in pods.subnets(new_prefix=node_prefix):
        peers.append({"ipBlock": {"cidr": f"{subnet.network_address}/{subnet.max_prefixlen - 1}"}})
    return peers


def _network(flag: str, text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise InstallError(f"{flag}: {exc}") from None


def _secret(credentials: IssuerCredentials) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": SECRET_NAME, "namespace": NAMESPACE,
                         "labels": {"app.kubernetes.io/part-of": "pinion",
                                    "app.kubernetes.io/component": "issuer"}},
            "type": "Opaque", "data": credentials.secret_data()}


def _find(documents: Iterable[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for document in documents:
        if document.get("kind") == kind and document.get("metadata", {}).get("name") == name:
            return document
    raise InstallError(f"the manifests have no {kind} {name}")


def _containers(documents: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every container (and init container) of every workload's pod template."""
    found = []
    for document in documents:
        if document.get("kind") in WORKLOAD_KINDS:
            pod = document["spec"]["template"]["spec"]
            found += pod.get("initContainers", []) + pod.get("containers", [])
    return found


class _Dumper(yaml.SafeDumper):  # type: ignore[misc]  # (no PyYAML stubs installed)
    """Multi-line strings (PEM) as literal blocks, so the output reads like the manifests."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _represent_str)


def to_yaml(documents: Sequence[dict[str, Any]], trust_domain: str) -> str:
    """One multi-document stream, with a header saying what it is."""
    try:
        version = metadata.version("pinion")
    except metadata.PackageNotFoundError:
        version = "unknown"
    header = (f"# Pinion {version} for trust domain {trust_domain}, from `pinion install`.\n"
              "# Apply with: kubectl apply -f -\n")
    return header + "".join("---\n" + yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=4096)
                            for document in documents)
