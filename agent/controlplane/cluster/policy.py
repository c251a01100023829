"""Pure decisions on watched pods: is a pod meshed, and with which capture settings."""

from __future__ import annotations

import dataclasses

from agent.controlplane.cluster.objects import (
    ENABLED,
    LINKERD_POLICIES,
    NamespaceRecord,
    Owner,
    PodRecord,
)
from agent.model import CaptureSettings, InboundPolicy, Pod, parse_cidrs, parse_duration, parse_ports


def mesh_decision(pod: PodRecord, namespace: NamespaceRecord | None) -> tuple[bool, str]:
    """(meshed, why). The pod's own answer wins over its namespace's; host-network pods
    share the node's netns and are never captured."""
    if pod.host_network:
        return False, "host network"
    if pod.mesh is not None:
        return pod.mesh == ENABLED, f"pod says {pod.mesh}"
    if namespace is not None and namespace.mesh is not None:
        return namespace.mesh == ENABLED, f"namespace {namespace.name} says {namespace.mesh}"
    return False, "not opted in (pinion.dev/mesh or linkerd.io/inject)"


def inbound_policy(pod: PodRecord) -> InboundPolicy:
    mode = pod.setting("inbound-policy").strip()
    mode = LINKERD_POLICIES.get(mode, mode) or "permissive"
    clients = (c.strip() for c in pod.setting("allowed-clients").split(","))
    return InboundPolicy(mode, tuple(sorted(set(filter(None, clients)))))


def apply_record(pod: Pod, record: PodRecord, owner: Owner | None = None) -> Pod:
    """The pod as the CNI plugin announced it, with what the API says of it: service
    account, owner (`owner`: as the cluster state resolves it; default the pod's own
    controller), and the per-pod annotations. A malformed annotation is a ValueError
    naming it: the pod is refused rather than meshed with a weaker policy than asked."""
    try:
        capture = CaptureSettings(
            exclude_outbound_ports=parse_ports(record.setting("exclude-outbound-ports")),
            exclude_inbound_ports=parse_ports(record.setting("exclude-inbound-ports")),
            exclude_outbound_cidrs=parse_cidrs(record.setting("exclude-outbound-cidrs")),
            probe_sources=pod.capture.probe_sources,
        )
        opaque_ports = parse_ports(record.setting("opaque-ports"))
        inbound = inbound_policy(record)
        idle_timeout = parse_duration(record.setting("idle-timeout"))
    except ValueError as exc:
        raise ValueError(f"pod {record.key}: bad annotation: {exc}") from None
    owner = owner if owner is not None else record.owner
    return dataclasses.replace(
        pod, uid=record.uid or pod.uid, service_account=record.service_account,
        capture=capture, opaque_ports=opaque_ports, inbound=inbound, idle_timeout=idle_timeout,
        owner_kind=owner.kind if owner else "", owner_name=owner.name if owner else "")
