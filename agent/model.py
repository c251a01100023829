"""What the agent knows about a pod: its key, its identity-bearing metadata and capture settings."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class PodKey:
    """A pod is known by namespace/name; the uid tells incarnations apart."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class CaptureSettings:
    """Per-pod knobs of the traffic-capture plan (Istio/Linkerd annotation equivalents)."""

    exclude_outbound_ports: tuple[int, ...] = ()
    exclude_inbound_ports: tuple[int, ...] = ()
    exclude_outbound_cidrs: tuple[str, ...] = ()
    probe_sources: tuple[str, ...] = ()

    @classmethod
    def from_cni_args(cls, args: dict[str, str], gateways: list[str]) -> CaptureSettings:
        """Read PINION_EXCLUDE_* CNI args; kubelet probes come from the pod's gateway (cni0)."""
        return cls(
            exclude_outbound_ports=parse_ports(args.get("PINION_EXCLUDE_OUTBOUND_PORTS", "")),
            exclude_inbound_ports=parse_ports(args.get("PINION_EXCLUDE_INBOUND_PORTS", "")),
            exclude_outbound_cidrs=parse_cidrs(args.get("PINION_EXCLUDE_OUTBOUND_CIDRS", "")),
            probe_sources=_ipv4_only(gateways),
        )


INBOUND_MODES = ("permissive", "mesh-only")


@dataclass(frozen=True, slots=True)
class InboundPolicy:
    """Who may reach a pod. `permissive`: plaintext through 15006 and any meshed client;
    `mesh-only`: only mTLS through the tunnel. A non-empty `allowed_clients` (SPIFFE IDs)
    further limits which meshed clients are let in."""

    mode: str = "permissive"
    allowed_clients: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in INBOUND_MODES:
            raise ValueError(f"inbound policy must be one of {', '.join(INBOUND_MODES)}, "
                             f"not {self.mode!r}")
        for client in self.allowed_clients:
            if not client.startswith("spiffe://"):
                raise ValueError(f"allowed client {client!r} is not a spiffe:// ID")

    @property
    def plaintext_allowed(self) -> bool:
        return self.mode == "permissive"

    def admits(self, client_id: str) -> bool:
        return not self.allowed_clients or client_id in self.allowed_clients

    @classmethod
    def from_cni_args(cls, args: dict[str, str]) -> InboundPolicy:
        """PINION_INBOUND_POLICY and PINION_ALLOWED_CLIENTS (comma-separated SPIFFE IDs)."""
        clients = (c.strip() for c in args.get("PINION_ALLOWED_CLIENTS", "").split(","))
        return cls(args.get("PINION_INBOUND_POLICY") or "permissive",
                   tuple(sorted(set(filter(None, clients)))))


@dataclass(frozen=True, slots=True)
class Pod:
    """A meshed pod on this node, as announced by the CNI plugin."""

    key: PodKey
    uid: str
    container_id: str
    netns_path: str
    ips: tuple[str, ...]
    service_account: str = "default"
    capture: CaptureSettings = field(default_factory=CaptureSettings)
    # Ports relayed as opaque TCP, never parsed for HTTP (Linkerd's opaque-ports annotation).
    opaque_ports: tuple[int, ...] = ()
    inbound: InboundPolicy = field(default_factory=InboundPolicy)
    # The pod-level cgroup v2 (PINION_CGROUP), where eBPF capture attaches; "" = find it by uid.
    cgroup: str = ""
    # The controlling workload (Kubernetes mode), for Linkerd's `deployment="web"` labels.
    owner_kind: str = ""
    owner_name: str = ""
    # Seconds without a byte either way before a relayed connection is reset; 0 = the agent's.
    idle_timeout: float = 0.0

    @property
    def ipv4(self) -> str | None:
        """The pod's IPv4 address (capture and the tunnel are IPv4 for now)."""
        return next((ip for ip in self.ips if ipaddress.ip_address(ip).version == 4), None)

    def to_json(self) -> dict[str, Any]:
        data = self._fields_json()
        if self.owner_kind:
            data["owner"] = {"kind": self.owner_kind, "name": self.owner_name}
        if self.idle_timeout:
            data["idleTimeout"] = self.idle_timeout
        return data

    def _fields_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "namespace": self.key.namespace,
            "name": self.key.name,
            "uid": self.uid,
            "containerId": self.container_id,
            "netns": self.netns_path,
            "ips": list(self.ips),
            "serviceAccount": self.service_account,
            "opaquePorts": list(self.opaque_ports),
            "inboundPolicy": self.inbound.mode,
            "allowedClients": list(self.inbound.allowed_clients),
            "cgroup": self.cgroup,
            "capture": {
                "excludeOutboundPorts": list(self.capture.exclude_outbound_ports),
                "excludeInboundPorts": list(self.capture.exclude_inbound_ports),
                "excludeOutboundCidrs": list(self.capture.exclude_outbound_cidrs),
                "probeSources": list(self.capture.probe_sources),
            },
        }

    @classmethod
    def from_json(cls, data: object) -> Pod:
        """A pod as `to_json` wrote it; StateError (a ValueError) naming the first field
        that is missing or of the wrong type, whatever the file holds."""
        if not isinstance(data, dict):
            raise StateError(f"not a JSON object but {type(data).__name__}")
        version = data.get("version", STATE_VERSION)  # files from before versions are 1
        if version != STATE_VERSION:
            raise StateError(f"version {version!r}: this agent reads version {STATE_VERSION}")
        capture, owner = _object(data, "capture"), _object(data, "owner")
        ips = _texts(data, "ips", required=True)
        for ip in ips:
            _checked(ipaddress.ip_address, ip, "ips")
        try:
            inbound = InboundPolicy(_text(data, "inboundPolicy", "permissive"),
                                    _texts(data, "allowedClients"))
        except ValueError as exc:
            raise StateError(str(exc)) from None
        return cls(
            key=PodKey(_text(data, "namespace"), _text(data, "name")),
            uid=_text(data, "uid"),
            container_id=_text(data, "containerId"),
            netns_path=_text(data, "netns"),
            ips=ips,
            service_account=_text(data, "serviceAccount", "default"),
            opaque_ports=_ports(data, "opaquePorts"),
            inbound=inbound,
            cgroup=_text(data, "cgroup", ""),
            owner_kind=_text(owner, "kind", ""),
            owner_name=_text(owner, "name", ""),
            idle_timeout=_seconds(data, "idleTimeout"),
            capture=CaptureSettings(
                exclude_outbound_ports=_ports(capture, "excludeOutboundPorts"),
                exclude_inbound_ports=_ports(capture, "excludeInboundPorts"),
                exclude_outbound_cidrs=tuple(_checked(ipaddress.ip_network, cidr, "excludeOutboundCidrs")
                                             for cidr in _texts(capture, "excludeOutboundCidrs")),
                probe_sources=_texts(capture, "probeSources"),
            ),
        )


STATE_VERSION = 1


class StateError(ValueError):
    """A remembered pod that cannot be read back."""


_MISSING = object()


def _text(data: dict[str, Any], key: str, default: object = _MISSING) -> str:
    value = data.get(key, default)
    if value is _MISSING:
        raise StateError(f"{key!r} is missing")
    if not isinstance(value, str):
        raise StateError(f"{key!r} must be a string, not {value!r:.60}")
    return value


def _texts(data: dict[str, Any], key: str, required: bool = False) -> tuple[str, ...]:
    value = data.get(key, _MISSING if required else [])
    if value is _MISSING:
        raise StateError(f"{key!r} is missing")
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise StateError(f"{key!r} must be a list of strings, not {value!r:.60}")
    return tuple(value)


def _ports(data: dict[str, Any], key: str) -> tuple[int, ...]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(type(port) is int and 0 < port < 65536 for port in value):
        raise StateError(f"{key!r} must be a list of ports, not {value!r:.60}")
    return tuple(value)


def _seconds(data: dict[str, Any], key: str) -> float:
    value = data.get(key, 0)
    if type(value) not in (int, float) or not 0 <= value < 10**9:
        raise StateError(f"{key!r} must be a number of seconds, not {value!r:.60}")
    return float(value)


def _object(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise StateError(f"{key!r} must be an object, not {value!r:.60}")
    return value


def _checked(parse: Any, text: str, key: str) -> str:
    try:
        parse(text)
    except ValueError:
        raise StateError(f"{key!r} holds {text!r:.60}, not an address") from None
    return text


def _ipv4_only(addresses: list[str]) -> tuple[str, ...]:
    """Capture is IPv4 for now: a dual-stack pod's IPv6 gateway is not an error."""
    parsed = (ipaddress.ip_address(a) for a in addresses)
    return tuple(str(a) for a in parsed if a.version == 4)


_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text: str) -> float:
    """"90", "90s", "15m", "1h" -> seconds; "" -> 0 (unset). Anything else is a ValueError."""
    text = text.strip()
    if not text:
        return 0.0
    number, unit = (text[:-1], text[-1]) if text[-1] in _UNITS else (text, "s")
    seconds = float(number) * _UNITS[unit]
    if not 0 < seconds < 10**9:
        raise ValueError(f"duration {text!r} out of range")
    return seconds


def parse_ports(text: str) -> tuple[int, ...]:
    """"80, 443,80" -> (80, 443); a port out of range is a ValueError."""
    ports = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        port = int(part)
        if not 0 < port < 65536:
            raise ValueError(f"port {port} out of range")
        ports.append(port)
    return tuple(sorted(set(ports)))


def parse_cidrs(text: str) -> tuple[str, ...]:
    """"10.0.0.0/8, 192.168.1.7" -> normalised IPv4 networks; a bad one is a ValueError."""
    parts = filter(None, (p.strip() for p in text.split(",")))
    return tuple(str(ipaddress.IPv4Network(p, strict=False)) for p in parts)
