"""Every agent setting, read once into a frozen Config and passed down."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

REDIRECT_MODES = ("auto", "iptables", "nftables", "ebpf")

# Pinion's socket mark: ASCII "PIN". Distinct from Istio's 0x539 so both can coexist.
DEFAULT_PROXY_MARK = 0x50494E


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
    ports: Ports = Ports()
    metrics_grace_seconds: float = 300.0
    sweep_interval_seconds: float = 10.0
    connect_timeout_seconds: float = 10.0
    write_buffer_high: int = 64 * 1024
    log_level: str = "info"

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
        return cls(
            node_name=node_name,
            admin_host=admin_host,
            admin_port=admin_port,
            cni_socket=Path(get("cni_socket", "/run/pinion/cni.sock") or ""),
            state_dir=Path(get("state_dir", "/var/lib/pinion") or ""),
            identity_dir=Path(identity_dir) if identity_dir else None,
            pending_dir=Path(get("pending_dir", "/run/pinion/pending") or ""),
            redirect=redirect,
            proxy_mark=int(get("proxy_mark", str(DEFAULT_PROXY_MARK)) or "0", 0),
            metrics_grace_seconds=float(get("metrics_grace_seconds", "300") or "0"),
            sweep_interval_seconds=float(get("sweep_interval_seconds", "10") or "0"),
            log_level=get("log_level", "info") or "info",
        )


def parse_host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected IP:PORT, got {text!r}")
    return host.strip("[]"), int(port)
