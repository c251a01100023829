"""Who talks to whom, from the agents' series: outbound series name their destination with
dst_* labels (and server_id) once the pod registry / mesh tunnel sets them; inbound series name
the client identity with client_id. Without those labels only the sources are known, and an
edge says so (destination None) instead of guessing. Pure: no I/O."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from agent.viz.stats import INBOUND, OUTBOUND, Sample

_TRAFFIC = frozenset({"request_total", "response_total", "tcp_open_total"})
_EdgeKey = tuple[str, str, str | None, str | None]   # src ns, src pod, dst, dst ns


@dataclass(frozen=True)
class Edge:
    src: str
    src_namespace: str
    dst: str | None           # None: the series do not say (no dst_* labels yet)
    dst_namespace: str | None
    tls: str                  # the tls label values seen, comma-joined ("true", "disabled", ...)
    server_id: str | None = None
    client_id: str | None = None

    @property
    def secured(self) -> bool:
        return self.tls == "true"


def _destination(labels: Mapping[str, str]) -> tuple[str | None, str | None]:
    if labels.get("dst_pod"):
        return labels["dst_pod"], labels.get("dst_namespace") or None
    if labels.get("dst_service"):
        return f"svc/{labels['dst_service']}", labels.get("dst_namespace") or None
    return None, None


def _outbound(samples: Iterable[Sample]) -> dict[_EdgeKey, list[Mapping[str, str]]]:
    grouped: dict[_EdgeKey, list[Mapping[str, str]]] = {}
    for sample in samples:
        labels = sample.labels
        # outbound TCP series name their destination on the peer="dst" side only
        if (sample.name in _TRAFFIC and labels.get("direction") == OUTBOUND and labels.get("pod")
                and labels.get("peer") != "src"):
            dst, dst_namespace = _destination(labels)
            key = (labels.get("namespace", ""), labels["pod"], dst, dst_namespace)
            grouped.setdefault(key, []).append(labels)
    return grouped


def _joined(values: Iterable[str | None]) -> str | None:
    present = sorted({value for value in values if value})
    return ",".join(present) if present else None


def spiffe_namespace_account(identity: str) -> tuple[str, str] | None:
    """("ns", "sa") from spiffe://<trust-domain>/ns/<ns>/sa/<sa>; None for other shapes."""
    parts = identity.removeprefix("spiffe://").split("/")
    if identity.startswith("spiffe://") and len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa":
        return parts[2], parts[4]
    return None


def _inbound_from_unknown_clients(samples: Iterable[Sample],
                                  accounts: AbstractSet[tuple[str, str]]) -> list[Edge]:
    """Edges seen only from the server side: an inbound client_id whose service account no
    scraped pod runs as (its source's outbound series are not in these scrapes)."""
    grouped: dict[tuple[str, str, str], set[str]] = {}
    for sample in samples:
        labels = sample.labels
        client = labels.get("client_id")
        if (sample.name not in _TRAFFIC or labels.get("direction") != INBOUND or not client
                or not labels.get("pod")):
            continue
        account = spiffe_namespace_account(client)
        if account is not None and account in accounts:
            continue
        grouped.setdefault((client, labels.get("namespace", ""), labels["pod"]), set()).add(
            labels.get("tls", ""))
    edges = []
    for (client, namespace, pod), tls in sorted(grouped.items()):
        account = spiffe_namespace_account(client)
        src, src_namespace = (f"sa/{account[1]}", account[0]) if account else (client, "-")
        edges.append(Edge(src, src_namespace, pod, namespace, ",".join(sorted(tls)), client_id=client))
    return edges


def pod_edges(samples: Iterable[Sample], accounts: AbstractSet[tuple[str, str]] = frozenset(),
              namespace: str | None = None) -> list[Edge]:
    """One edge per (source pod, destination); `accounts` are the (namespace, service
    account) pairs of the scraped agents' pods. With `namespace`, edges touching it only."""
    materialized = list(samples)
    edges = [Edge(src, src_ns, dst, dst_ns, ",".join(sorted({s.get("tls", "") for s in series})),
                  server_id=_joined(s.get("server_id") for s in series))
             for (src_ns, src, dst, dst_ns), series in sorted(
                 _outbound(materialized).items(), key=lambda item: tuple(v or "" for v in item[0]))]
    edges += _inbound_from_unknown_clients(materialized, accounts)
    if namespace is None:
        return edges
    return [edge for edge in edges if namespace in (edge.src_namespace, edge.dst_namespace)]


def known_accounts(entries: Iterable[Mapping[str, object]]) -> set[tuple[str, str]]:
    """(namespace, serviceAccount) of the pods agents list on GET /pods."""
    return {(str(entry.get("namespace", "")), str(entry["serviceAccount"]))
            for entry in entries if entry.get("serviceAccount")}


def unknown_destinations(edges: Iterable[Edge]) -> bool:
    return any(edge.dst is None for edge in edges)

