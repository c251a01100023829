"""A tapped request as its tap event: the Record's fields plus what the relay knows of the
connection (pod, direction, addresses, TLS, peer identity). Runs only for requests that
started while a tap was open (`Record.detail` set); see agent/core/tap.py."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from agent.core.accounting import Record

if TYPE_CHECKING:
    from agent.dataplane.relay import Relay


def _address(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host = str(address[0])
        return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
    return ""


def tap_fields(relay: Relay, record: Record) -> dict[str, Any]:
    """The event of one finished request (the JSON object `pinion tap -o json` prints)."""
    detail = record.detail
    assert detail is not None
    pod, peer = relay.pod, relay.peer_labels
    src_pod = ("", "", "", "")
    if relay.direction == "outbound":
        src = _address(_peername(relay))
        dst = _address(relay.destination)
        src_pod = (pod.namespace, pod.name, pod.owner_kind, pod.owner_name)
        dst_pod = (peer.dst_namespace, peer.dst_pod, peer.dst_owner_kind, peer.dst_owner_name)
        identity = peer.server_id
    else:
        src = _address(relay.source or _peername(relay))
        dst = _address(relay.destination)
        if relay.peer_pod is not None:
            src_pod = relay.peer_pod
        dst_pod = (pod.namespace, pod.name, pod.owner_kind, pod.owner_name)
        identity = peer.client_id
    latency = record.latency_ms
    return {
        "kind": "request", "ts": round(time.time(), 6), "direction": relay.direction,
        "namespace": pod.namespace, "pod": pod.name,
        "owner_kind": pod.owner_kind, "owner_name": pod.owner_name,
        "src": src, "dst": dst,
        "src_namespace": src_pod[0], "src_pod": src_pod[1],
        "src_owner_kind": src_pod[2], "src_owner_name": src_pod[3],
        "dst_namespace": dst_pod[0], "dst_pod": dst_pod[1],
        "dst_owner_kind": dst_pod[2], "dst_owner_name": dst_pod[3],
        "tls": peer.tls, "identity": identity,
        "method": record.method or "", "authority": detail.authority, "path": detail.path,
        "status": record.status_code, "grpc_status": record.grpc_status,
        "classification": record.classification, "error": record.error,
        "latency_ms": None if latency is None else round(latency, 3),
        "duration_ms": None if detail.end_ms is None else round(detail.end_ms, 3),
        "request_bytes": detail.request_bytes, "response_bytes": detail.response_bytes,
    }


def _peername(relay: Relay) -> object:
    client = relay.client.transport
    return client.get_extra_info("peername") if client is not None else None


def publish_tapped(relay: Relay, record: Record) -> None:
    hub, switch = relay.proxy.telemetry.tap, relay.pod.tap
    ready = hub.ready_for(switch) if switch is not None else None
    if ready:  # else no tap of this pod has room: no event is built
        hub.publish(tap_fields(relay, record), ready)
