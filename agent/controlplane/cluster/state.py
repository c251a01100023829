"""The cluster as the watches last told it: pods by IP, namespaces, Services by VIP and
their ready endpoints. Fed by watch callbacks, asked by the proxy on every outbound
connection (dictionary lookups, no I/O)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from agent.controlplane.cluster.objects import (
    JobRecord,
    MirrorOf,
    NamespaceRecord,
    Owner,
    PodRecord,
    ServicePort,
    ServiceRecord,
    SliceRecord,
)
from agent.controlplane.cluster.policy import mesh_decision
from agent.core.connections import Route
from agent.core.telemetry import PLAINTEXT, PeerLabels


class ClusterState:
    def __init__(self, trust_domain: str = "cluster.local") -> None:
        self.trust_domain = trust_domain
        self._pods: dict[str, PodRecord] = {}
        self._by_ip: dict[str, str] = {}
        self._namespaces: dict[str, NamespaceRecord] = {}
        self._services: dict[str, ServiceRecord] = {}
        self._vips: dict[tuple[str, int], tuple[str, ServicePort]] = {}
        self._slices: dict[str, SliceRecord] = {}
        self._slices_of: dict[str, set[str]] = {}
        self._turns: dict[tuple[str, int], itertools.count[int]] = {}
        self._cronjob_of: dict[str, str] = {}  # "ns/job" -> the CronJob that made it

    # --- fed by the watches -------------------------------------------------------------
    def upsert_pod(self, record: PodRecord) -> None:
        old = self._pods.get(record.key)
        if old is not None:
            self._unindex_pod(old)
        self._pods[record.key] = record
        if not record.finished and not record.host_network:
            for ip in record.ips:  # an IP handed to a new pod: the newest claim wins
                self._by_ip[ip] = record.key

    def delete_pod(self, key: str) -> None:
        old = self._pods.pop(key, None)
        if old is not None:
            self._unindex_pod(old)

    def _unindex_pod(self, record: PodRecord) -> None:
        for ip in record.ips:
            if self._by_ip.get(ip) == record.key:
                del self._by_ip[ip]

    def upsert_job(self, record: JobRecord) -> None:
        self._cronjob_of[record.key] = record.cronjob

    def delete_job(self, key: str) -> None:
        self._cronjob_of.pop(key, None)

    def owner(self, record: PodRecord) -> Owner | None:
        """The pod's workload as Linkerd names it: a CronJob's Job's pod is the CronJob's."""
        owner = record.owner
        if owner is not None and owner.kind == "job":
            cronjob = self._cronjob_of.get(f"{record.namespace}/{owner.name}")
            if cronjob:
                return Owner("cronjob", cronjob)
        return owner

    def upsert_namespace(self, record: NamespaceRecord) -> None:
        self._namespaces[record.name] = record

    def delete_namespace(self, name: str) -> None:
        self._namespaces.pop(name, None)

    def upsert_service(self, record: ServiceRecord) -> None:
        self.delete_service(record.key)
        self._services[record.key] = record
        for ip in record.cluster_ips:
            for port in record.ports:
                self._vips[(ip, port.port)] = (record.key, port)

    def delete_service(self, key: str) -> None:
        old = self._services.pop(key, None)
        if old is None:
            return
        for ip in old.cluster_ips:
            for port in old.ports:
                if self._vips.get((ip, port.port), ("",))[0] == key:
                    del self._vips[(ip, port.port)]
                    self._turns.pop((ip, port.port), None)

    def upsert_slice(self, record: SliceRecord) -> None:
        self.delete_slice(record.key)
        self._slices[record.key] = record
        self._slices_of.setdefault(record.service_key, set()).add(record.key)

    def delete_slice(self, key: str) -> None:
        old = self._slices.pop(key, None)
        if old is None:
            return
        keys = self._slices_of.get(old.service_key)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._slices_of[old.service_key]

    # --- asked by the agent ---------------------------------------------------------------
    def pod(self, key: str) -> PodRecord | None:
        return self._pods.get(key)

    def service(self, key: str) -> ServiceRecord | None:
        return self._services.get(key)

    def namespace(self, name: str) -> NamespaceRecord | None:
        return self._namespaces.get(name)

    def pods_in(self, namespace: str) -> Iterator[PodRecord]:
        return (p for p in self._pods.values() if p.namespace == namespace)

    def pod_at(self, ip: str) -> PodRecord | None:
        key = self._by_ip.get(ip)
        return self._pods.get(key) if key is not None else None

    def meshed(self, record: PodRecord) -> bool:
        return mesh_decision(record, self._namespaces.get(record.namespace))[0]

    def identity_of(self, record: PodRecord) -> str:
        return f"spiffe://{self.trust_domain}/ns/{record.namespace}/sa/{record.service_account}"

    def endpoints(self, vip: str, port: int) -> tuple[str, list[tuple[str, int]]] | None:
        """(service key, ready endpoints) when vip:port is a Service port, else None."""
        found = self._vips.get((vip, port))
        if found is None:
            return None
        key, service_port = found
        endpoints: list[tuple[str, int]] = []
        for slice_key in sorted(self._slices_of.get(key, ())):
            record = self._slices[slice_key]
            number = _target_port(service_port, record)
            if number is not None:
                endpoints.extend((address, number) for address in record.addresses)
        return key, endpoints

    def route(self, destination: tuple[str, int]) -> Route:
        """A Service VIP becomes one of its ready endpoints, taken in turn; a pod IP gets
        the pod's labels; anything else goes where it was going, unlabelled."""
        service = ""
        resolved = self.endpoints(*destination)
        if resolved is not None and resolved[1]:
            key, endpoints = resolved
            turn = self._turns.setdefault(destination, itertools.count())
            destination = endpoints[next(turn) % len(endpoints)]
            service = key.split("/", 1)[1]
            mirror = self._services[key].mirror
            if mirror is not None:  # another cluster's Service: through its gateway
                return _through_gateway(destination, key, mirror)
        record = self.pod_at(destination[0])
        if record is None:
            labels = PeerLabels(dst_service=service) if service else PLAINTEXT
            return Route(destination, labels, False, "")
        owner = self.owner(record)
        labels = PeerLabels(dst_namespace=record.namespace, dst_pod=record.name,
                            dst_owner_kind=owner.kind if owner else "",
                            dst_owner_name=owner.name if owner else "", dst_service=service)
        meshed = self.meshed(record)
        return Route(destination, labels, meshed, self.identity_of(record) if meshed else "")

    def sizes(self) -> dict[str, int]:
        return {"pods": len(self._pods), "namespaces": len(self._namespaces),
                "services": len(self._services), "endpointslices": len(self._slices),
                "cronjob jobs": len(self._cronjob_of)}


def _through_gateway(gateway: tuple[str, int], key: str, mirror: MirrorOf) -> Route:
    """A mirrored Service's route: to the linked cluster's gateway, which must prove its
    identity, asking for the Service there (Linkerd's dst_target_* labels say which)."""
    namespace, name = key.split("/", 1)
    labels = PeerLabels(dst_namespace=namespace, dst_service=name,
                        dst_target_cluster=mirror.cluster, dst_target_service=mirror.remote_name)
    return Route(gateway, labels, True, mirror.gateway_identity,
                 f"{namespace}/{mirror.remote_name}")


def _target_port(service_port: ServicePort, record: SliceRecord) -> int | None:
    """The endpoint port: the slice's port of the same name (that is how EndpointSlices
    name them), else a numeric targetPort when the slice names none."""
    for name, number in record.ports:
        if name == service_port.name:
            return number
    if isinstance(service_port.target_port, int) and not record.ports:
        return service_port.target_port
    return None
