"""Who talks to whom right now, as `linkerd viz edges` finds it (linkerd2 viz/metrics-api
edges.go): outbound connections open now (tcp_open_connections > 0, the peer="dst" side that
names the destination), grouped by source and destination resource of one kind. An edge is
secured when its connections carry no no_tls_reason; otherwise SECURED says why, in Linkerd's
words. Pure: no I/O."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from agent.viz.resources import LABEL
from agent.viz.stats import OUTBOUND, Sample

# linkerd2 viz/metrics-api edges.go formatMsg
REASON_TEXT = {
    "disabled": "Disabled",
    "loopback": "Loopback",
    "no_authority_in_http_request": "No Authority In HTTP Request",
    "not_http": "Not HTTP",
    "not_provided_by_remote": "Not Provided By Remote",
    "not_provided_by_service_discovery": "Not Provided By Service Discovery",
}


@dataclass(frozen=True)
class Edge:
    src: str
    src_namespace: str
    dst: str
    dst_namespace: str
    client_id: str = ""   # the source pod's identity, when an agent lists it
    server_id: str = ""
    no_tls_reason: str = ""

    @property
    def secured(self) -> bool:
        return not self.no_tls_reason

    @property
    def message(self) -> str:
        """Linkerd's SECURED text for an edge that is not ("" when it is)."""
        reason = self.no_tls_reason
        return REASON_TEXT.get(reason) or reason.replace("_", " ").title()


def edges(samples: Iterable[Sample], kind: str, namespace: str | None,
          identities: Mapping[tuple[str, str], str]) -> list[Edge]:
    """One edge per (source, destination) with a connection open now; `identities` maps
    (namespace, pod) to the pod's SPIFFE ID. With `namespace`, edges touching it only. Sorted
    as Linkerd sorts them: by source namespace + destination namespace + source + destination."""
    label = LABEL[kind]
    found: dict[tuple[str, str, str, str], Edge] = {}
    for sample in samples:
        labels = sample.labels
        if (sample.name != "tcp_open_connections" or labels.get("direction") != OUTBOUND
                or labels.get("peer") != "dst" or sample.value <= 0):
            continue
        src, dst = labels.get(label, ""), labels.get("dst_" + label, "")
        src_ns, dst_ns = labels.get("namespace", ""), labels.get("dst_namespace", "")
        if not src or (namespace is not None and namespace not in (src_ns, dst_ns)):
            continue
        key = (src, src_ns, dst, dst_ns)
        if key not in found:
            found[key] = Edge(src, src_ns, dst, dst_ns,
                              client_id=identities.get((src_ns, labels.get("pod", "")), ""),
                              server_id=labels.get("server_id", ""),
                              no_tls_reason=labels.get("no_tls_reason", ""))
    return sorted(found.values(), key=lambda e: e.src_namespace + e.dst_namespace + e.src + e.dst)


def short_identity(identity: str) -> str:
    """What linkerd viz edges -o wide prints of an identity: Linkerd's
    sa.ns.serviceaccount.identity... becomes "sa.ns"; a SPIFFE ID spiffe://td/ns/NS/sa/SA too."""
    account = spiffe_namespace_account(identity)
    if account is not None:
        return f"{account[1]}.{account[0]}"
    parts = identity.split(".")
    return ".".join(parts[:2]) if len(parts) >= 2 else identity


def spiffe_namespace_account(identity: str) -> tuple[str, str] | None:
    """("ns", "sa") from spiffe://<trust-domain>/ns/<ns>/sa/<sa>; None for other shapes."""
    parts = identity.removeprefix("spiffe://").split("/")
    if identity.startswith("spiffe://") and len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa":
        return parts[2], parts[4]
    return None


def pod_identities(entries: Iterable[Mapping[str, object]], trust_domain: str = "cluster.local") -> dict[
        tuple[str, str], str]:
    """(namespace, pod) -> SPIFFE ID, from the service accounts agents list on GET /pods."""
    return {(str(entry.get("namespace", "")), str(entry["name"])):
            f"spiffe://{trust_domain}/ns/{entry.get('namespace', '')}/sa/{entry['serviceAccount']}"
            for entry in entries if entry.get("name") and entry.get("serviceAccount")}
