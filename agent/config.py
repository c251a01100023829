"""Every agent setting, read once into a frozen Config and passed down."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T", int, float)

REDIRECT_MODES = ("auto", "iptables", "nftables", "ebpf")

# Pinion's socket mark: ASCII "PIN". Distinct from Istio's 0x539 so both can coexist.
DEFAULT_PROXY_MARK = 0x50494E
# Conntrack/route mark that brings an app's replies back to the proxy (must differ).
DEFAULT_REPLY_MARK = 0x50494F


# Where meshed pods may be: the outbound side probes 15008 only there (RFC 1918 + CGNAT,
# which covers k3s's 10.42.0.0/16); any other destination goes straight out as plain TCP.
DEFAULT_MESH_NETWORKS = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")


# Kubernetes mode (docs/kubernetes.md): where the issuer is, and what the DaemonSet mounts.
DEFAULT_ISSUER_URL = "https://pinion-issuer.pinion-system.svc:8443"
DEFAULT_TOKEN_FILE = "/var/run/secrets/pinion/token"
DEFAULT_TRUST_BUNDLE = "/var/run/pinion/trust-bundle/trust-bundle.crt"


@dataclass(frozen=True, slots=True)
class Ports:
    """The ports the agent owns inside every meshed pod's netns (design.md)."""

    outbound: int = 15001
    inbound: int = 15006
    tunnel: int = 15008


@dataclass(frozen=True, slots=True)
class Config:
    node_name: str
    admin_host: str
    admin_port: int
    cni_socket: Path
    state_dir: Path
    identity_dir: Path | None = None
    pending_dir: Path = Path("/run/pinion/pending")
    redirect: str = "auto"
    proxy_mark: int = DEFAULT_PROXY_MARK
    reply_mark: int = DEFAULT_REPLY_MARK
    ports: Ports = Ports()
    metrics_grace_seconds: float = 300.0
    sweep_interval_seconds: float = 10.0
    connect_timeout_seconds: float = 10.0
    write_buffer_high: int = 64 * 1024
    log_level: str = "info"
    probe_sources: tuple[str, ...] = ()  # beyond each pod's gateway (kubelet's usual source)
    tls_ciphers: str | None = None  # None: ChaCha20 first without AES instructions, else AES-GCM
    certificate_lifetime_seconds: float = 86400.0
    tunnel_idle_seconds: float = 60.0
    relay_idle_timeout_seconds: float = 3600.0  # a pod's own (PINION_IDLE_TIMEOUT) wins
    tunnel_syn_rate: int = 50  # new 15008 connections/s per source the kernel lets in; 0 = any
    mesh_networks: tuple[str, ...] = DEFAULT_MESH_NETWORKS
    bpf_dir: Path | None = None  # eBPF pins: default /sys/fs/bpf/pinion
    bpf_object: Path | None = None  # the compiled bpf/capture.o: default next to the package
    # Kubernetes mode (docs/kubernetes.md): None = standalone; "in-cluster" or a kubeconfig path.
    kubernetes: str | None = None
    issuer_url: str = DEFAULT_ISSUER_URL
    issuer_id: str | None = None  # default spiffe://<trust domain>/ns/pinion-system/sa/pinion-issuer
    token_file: Path = Path(DEFAULT_TOKEN_FILE)
    trust_bundle: Path = Path(DEFAULT_TRUST_BUNDLE)
    trust_domain: str = "cluster.local"
    pod_wait_seconds: float = 10.0  # how long a CNI ADD waits for the pod to appear in the watch
    pod_uid: str = ""  # the agent's own pod (PINION_POD_UID from the downward API), for its cgroup
    bpf_max_pods: int = 256  # eBPF maps are sized for this many meshed pods on the node...
    bpf_max_connections: int = 8192  # ...and this many outbound connects in flight
    keeper_socket: Path | None = None  # the socket keeper (agent/inpod/keeper.py); None: none
    drain_seconds: float = 20.0  # SIGTERM: in-flight connections finish within this
    max_connections: int = 0  # relayed connections at once, all pods; 0 = from the memory limit
    # multicluster gateways of this cluster (SPIFFE IDs): their streams carry the identity of
    # a linked cluster's caller, which pods' policies and metrics then see (docs/multicluster.md)
    gateway_identities: tuple[str, ...] = ()

    @classmethod
    def from_mapping(cls, values: Mapping[str, str | None]) -> Config:
        """Build from flags/env already merged into one mapping of strings."""

        def get(name: str, default: str | None = None) -> str | None:
            value = values.get(name)
            return default if value in (None, "") else value

        node_name = get("node_name")
        if not node_name:
            raise ValueError("node name is required (--node-name or PINION_NODE_NAME)")
        admin_host, admin_port = parse_host_port(get("admin_addr", "127.0.0.1:4191") or "")
        redirect = get("redirect", "auto") or "auto"
        if redirect not in REDIRECT_MODES:
            raise ValueError(f"--redirect must be one of {', '.join(REDIRECT_MODES)}, not {redirect!r}")
        identity_dir = get("identity_dir")
        proxy_mark = _number(get("proxy_mark", str(DEFAULT_PROXY_MARK)), "proxy mark", int)
        if not 0 < proxy_mark < 2**32:
            raise ValueError(f"proxy mark must be within 1..0xffffffff, not {proxy_mark:#x}")
        return cls(
            node_name=node_name,
            admin_host=admin_host,
            admin_port=admin_port,
            cni_socket=Path(get("cni_socket", "/run/pinion/cni.sock") or ""),
            state_dir=Path(get("state_dir", "/var/lib/pinion") or ""),
            identity_dir=Path(identity_dir) if identity_dir else None,
            pending_dir=Path(get("pending_dir", "/run/pinion/pending") or ""),
            redirect=redirect,
            proxy_mark=proxy_mark,
            metrics_grace_seconds=_number(get("metrics_grace_seconds", "300"), "grace", float),
            sweep_interval_seconds=_number(get("sweep_interval_seconds", "10"), "sweep", float),
            log_level=get("log_level", "info") or "info",
            probe_sources=_addresses(get("probe_sources", "") or ""),
            tls_ciphers=get("tls_ciphers"),
            certificate_lifetime_seconds=_positive(get("certificate_lifetime", "86400"),
                                                   "certificate lifetime"),
            tunnel_idle_seconds=_number(get("tunnel_idle_seconds", "60"), "tunnel idle", float),
            tunnel_syn_rate=_number(get("tunnel_syn_rate", "50"), "tunnel SYN rate", int),
            relay_idle_timeout_seconds=_positive(get("relay_idle_timeout_seconds", "3600"),
                                                 "relay idle timeout"),
            mesh_networks=_networks(get("mesh_networks", "") or "") or DEFAULT_MESH_NETWORKS,
            bpf_dir=_path(get("bpf_dir")),
            bpf_object=_path(get("bpf_object")),
            kubernetes=get("kubernetes"),
            issuer_url=get("issuer_url", DEFAULT_ISSUER_URL) or DEFAULT_ISSUER_URL,
            issuer_id=get("issuer_id"),
            token_file=Path(get("token_file", DEFAULT_TOKEN_FILE) or DEFAULT_TOKEN_FILE),
            trust_bundle=Path(get("trust_bundle", DEFAULT_TRUST_BUNDLE) or DEFAULT_TRUST_BUNDLE),
            trust_domain=get("trust_domain", "cluster.local") or "cluster.local",
            pod_wait_seconds=_number(get("pod_wait_seconds", "10"), "pod wait", float),
            pod_uid=get("pod_uid", "") or "",
            bpf_max_pods=_at_least_one(get("bpf_max_pods", "256"), "--bpf-max-pods"),
            bpf_max_connections=_at_least_one(get("bpf_max_connections", "8192"),
                                              "--bpf-max-connections"),
            keeper_socket=_path(get("keeper_socket")),
            drain_seconds=_number(get("drain_seconds", "20"), "--drain-seconds", float),
            max_connections=_number(get("max_connections", "0"), "--max-connections", int),
            gateway_identities=_spiffe_ids(get("gateway_identities", "") or ""),
        )


def _spiffe_ids(text: str) -> tuple[str, ...]:
    ids = tuple(sorted({i.strip() for i in text.split(",") if i.strip()}))
    for spiffe_id in ids:
        if not spiffe_id.startswith("spiffe://") or "/ns/" not in spiffe_id:
            raise ValueError(f"--gateway-identity: {spiffe_id!r} is not a spiffe://TD/ns/NS/sa/SA ID")
    return ids


def _at_least_one(text: str | None, what: str) -> int:
    value = _number(text, what, int)
    if value < 1:
        raise ValueError(f"{what} must be at least 1, not {text}")
    return value


def _path(text: str | None) -> Path | None:
    return Path(text) if text else None


def _number(text: str | None, what: str, kind: type[T]) -> T:
    try:
        value = kind(text or "", 0) if kind is int else kind(text or "")  # type: ignore[call-arg]
    except (TypeError, ValueError):
        raise ValueError(f"{what}: {text!r} is not a number") from None
    if value < 0:
        raise ValueError(f"{what} must not be negative, not {text}")
    return value


def _positive(text: str | None, what: str) -> float:
    value = _number(text, what, float)
    if value < 1:
        raise ValueError(f"{what} must be at least 1 second, not {text}")
    return value


def _networks(text: str) -> tuple[str, ...]:
    try:
        return tuple(str(ipaddress.IPv4Network(n.strip(), strict=False))
                     for n in text.split(",") if n.strip())
    except ValueError as exc:
        raise ValueError(f"mesh networks: {exc}") from None


def _addresses(text: str) -> tuple[str, ...]:
    try:
        return tuple(str(ipaddress.IPv4Address(a.strip())) for a in text.split(",") if a.strip())
    except ValueError as exc:
        raise ValueError(f"probe sources: {exc}") from None


def parse_host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected IP:PORT, got {text!r}")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"expected IP:PORT, got {text!r} ({host!r} is not an IP)") from None
    return host, int(port)
