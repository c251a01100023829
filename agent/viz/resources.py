"""What `pinion stat` aggregates over, as `linkerd viz stat` does: a resource kind (pods,
deployments, statefulsets, daemonsets, jobs, cronjobs, namespaces, services), optionally one name, and
--to / --from another resource. Decides which series count for which row; the label choice
follows linkerd2 viz/metrics-api buildRequestLabels: without --to/--from the resource's own
inbound series, with them the outbound series between the two (TCP from the peer="dst" side).
Pure: no I/O."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from agent.viz.stats import INBOUND, LOOPBACK, OUTBOUND, Golden, PodKey, Sample

# kind -> the aliases linkerd viz accepts for it (plural, short name)
_ALIASES = {
    "pod": ("po", "pod", "pods"),
    "deployment": ("deploy", "deployment", "deployments"),
    "statefulset": ("sts", "statefulset", "statefulsets"),
    "daemonset": ("ds", "daemonset", "daemonsets"),
    "job": ("job", "jobs"),
    "cronjob": ("cj", "cronjob", "cronjobs"),
    "namespace": ("ns", "namespace", "namespaces"),
    "service": ("svc", "service", "services"),
}
KIND_OF = {alias: kind for kind, aliases in _ALIASES.items() for alias in aliases}
# the series label naming a resource of each kind (a Job is k8s_job, as Linkerd's)
LABEL = {"pod": "pod", "deployment": "deployment", "statefulset": "statefulset",
         "daemonset": "daemonset", "job": "k8s_job", "cronjob": "cronjob", "namespace": "namespace",
         "service": "dst_service"}
POD_OWNERS = ("deployment", "statefulset", "daemonset", "job", "cronjob")
_TCP_WINDOW = frozenset({"tcp_read_bytes_total", "tcp_write_bytes_total", "tcp_open_connections"})


@dataclass(frozen=True)
class Resource:
    kind: str
    name: str | None = None

    def __str__(self) -> str:
        return self.kind if self.name is None else f"{self.kind}/{self.name}"


def parse_resource(text: str) -> Resource:
    """"deploy/web", "sts", "pods/web-0" -> Resource; a clear ValueError otherwise."""
    kind_text, _, name = text.partition("/")
    kind = KIND_OF.get(kind_text.lower())
    if kind is None:
        raise ValueError(f"unknown resource type {kind_text!r}: one of "
                         f"{', '.join(aliases[-1] for aliases in _ALIASES.values())} "
                         "(or their short names: po, deploy, sts, ds, job, cj, ns, svc)")
    if "/" in text and not name:
        raise ValueError(f"{text!r}: no name after the '/'")
    return Resource(kind, name or None)


@dataclass(frozen=True)
class Selection:
    """Which series make a stat row, and the row's (namespace, name) key."""

    target: Resource
    namespace: str | None  # None: every namespace
    to: Resource | None = None
    from_: Resource | None = None
    peer_namespace: str | None = None  # of --to/--from (default: `namespace`)

    def __post_init__(self) -> None:
        if self.to is not None and self.from_ is not None:
            raise ValueError("--to and --from cannot be used together")
        for other in (self.to, self.from_):
            if other is not None and (other.name is None or other.kind == "namespace"):
                raise ValueError(f"--to/--from take one resource (TYPE/NAME, not a namespace), "
                                 f"not {other}")
        if self.from_ is not None and self.target.kind == "service":
            raise ValueError("services can be a --to target, not stat'ed --from something")

    @property
    def by_pod(self) -> bool:
        """Rows are folded from pods (their own series name them); else the key is the row."""
        return self.target.kind != "service" and self.from_ is None

    @property
    def tcp_peer(self) -> str:
        """linkerd viz: TCP bytes of plain stat from peer="src", of --to/--from from peer="dst"."""
        return "src" if self.to is None and self.from_ is None else "dst"

    def key(self, sample: Sample) -> PodKey | None:
        labels = sample.labels
        if sample.name.startswith("tcp_") and (
                sample.name not in _TCP_WINDOW or labels.get("peer") != self.tcp_peer
                or labels.get("no_tls_reason") == LOOPBACK):
            return None
        if self.target.kind == "service":
            return self._service_key(labels)
        if self.from_ is not None:
            if labels.get("direction") != OUTBOUND or not _names(labels, self.from_, self._peer_ns(), ""):
                return None
            return self._row(labels, "dst_", labels.get("dst_namespace", ""))
        if self.to is not None:
            if labels.get("direction") != OUTBOUND or not _names(labels, self.to, self._peer_ns(), "dst_"):
                return None
            return self._row(labels, "", labels.get("namespace", ""))
        if labels.get("direction") != INBOUND:
            return None
        return self._row(labels, "", labels.get("namespace", ""))

    def _peer_ns(self) -> str | None:
        return self.peer_namespace or self.namespace

    def _row(self, labels: Mapping[str, str], prefix: str, namespace: str) -> PodKey | None:
        """By pod: the pod the series is of; --from: the destination's row."""
        kind = self.target.kind
        if self.by_pod:
            pod = labels.get("pod")
            if not pod or (kind != "namespace" and self.namespace is not None
                           and namespace != self.namespace):
                return None
            return PodKey(namespace, pod)
        if kind == "namespace":
            return PodKey("", namespace) if namespace else None
        name = labels.get(prefix + LABEL[kind])
        if not name or (self.target.name is not None and name != self.target.name):
            return None
        if self.namespace is not None and namespace != self.namespace:
            return None
        return PodKey(namespace, name)

    def wants_row(self, row: PodKey) -> bool:
        if self.target.name is not None and row.name != self.target.name:
            return False
        return self.target.kind == "namespace" or self.namespace is None or row.namespace == self.namespace

    def _service_key(self, labels: Mapping[str, str]) -> PodKey | None:
        """Services are seen from their clients: outbound series with dst_service."""
        if labels.get("direction") != OUTBOUND or (self.to is not None and not _names(
                labels, self.to, self._peer_ns(), "dst_")):
            return None
        name, namespace = labels.get("dst_service"), labels.get("dst_namespace", "")
        if not name or (self.target.name is not None and name != self.target.name):
            return None
        if self.namespace is not None and namespace != self.namespace:
            return None
        return PodKey(namespace, name)


def _names(labels: Mapping[str, str], resource: Resource, namespace: str | None, prefix: str) -> bool:
    """Do these labels name `resource` (with prefix "dst_": as the destination)?"""
    if resource.kind == "service":
        return prefix == "dst_" and labels.get("dst_service") == resource.name \
            and (namespace is None or labels.get("dst_namespace") == namespace)
    if labels.get(prefix + LABEL[resource.kind]) != resource.name:
        return False
    return namespace is None or labels.get(prefix + "namespace") == namespace


def owners_of(samples: Iterable[Sample],
              entries: Iterable[Mapping[str, object]]) -> dict[PodKey, tuple[str, str]]:
    """Pod -> (owner kind, name), from the workload labels of series and the owner in GET /pods."""
    owners: dict[PodKey, tuple[str, str]] = {}
    for sample in samples:
        namespace, pod = sample.labels.get("namespace"), sample.labels.get("pod")
        if not namespace or not pod:
            continue
        for kind in POD_OWNERS:
            name = sample.labels.get(LABEL[kind])
            if name:
                owners[PodKey(namespace, pod)] = (kind, name)
    for entry in entries:
        owner = entry.get("owner")
        if isinstance(owner, dict) and owner.get("kind") in POD_OWNERS and entry.get("name"):
            owners[PodKey(str(entry.get("namespace", "")), str(entry["name"]))] = (
                str(owner["kind"]), str(owner.get("name")))
    return owners


def row_of_pod(pod: PodKey, kind: str, owners: Mapping[PodKey, tuple[str, str]],
               guess: Callable[[str], str]) -> PodKey | None:
    """The row a pod counts in for MESHED: itself, its namespace, or its owner of `kind` (a
    pod of no known owner is guessed a Deployment from its name, standalone mode's case)."""
    if kind == "pod":
        return pod
    if kind == "namespace":
        return PodKey("", pod.namespace)
    owner = owners.get(pod)
    if owner is None:
        return PodKey(pod.namespace, guess(pod.name)) if kind == "deployment" else None
    return PodKey(pod.namespace, owner[1]) if owner[0] == kind else None


@dataclass
class Row:
    namespace: str
    name: str
    meshed: int = 0
    total: int = 0
    running: bool = False  # a pod an agent holds captured (pods only)
    golden: Golden | None = None


def stat_rows(selection: Selection, golden: Mapping[PodKey, Golden], meshed: set[PodKey],
              seen: set[PodKey], owners: Mapping[PodKey, tuple[str, str]],
              guess: Callable[[str], str]) -> list[Row]:
    """The rows of `linkerd viz stat` for the selection: every resource of the kind that an
    agent meshes or has series for, its MESHED count, and the golden metrics of its series."""
    kind, rows = selection.target.kind, dict[PodKey, Row]()

    def row(key: PodKey) -> Row:
        return rows.setdefault(key, Row(key.namespace, key.name))

    for pod in sorted(meshed | seen):
        key = row_of_pod(pod, kind, owners, guess) if kind != "service" else None
        if key is not None and selection.wants_row(key):
            found = row(key)
            found.total += 1
            found.meshed += pod in meshed
            found.running = found.running or pod in meshed
    for golden_key, value in golden.items():
        key = row_of_pod(golden_key, kind, owners, guess) if selection.by_pod else golden_key
        if key is None or (selection.by_pod and not selection.wants_row(key)):
            continue
        found = row(key)
        if found.golden is None:
            found.golden = Golden()
        found.golden.merge(value)
    return [rows[key] for key in sorted(rows)]
