"""`pinion multicluster mirror`: the service mirror of one link (Linkerd's service-mirror).

Two watches: the linked (remote) cluster's Services, projected to the exported ones
(`agent.core.multicluster.exported`: a Service that loses its export label is as good as
deleted), and this cluster's mirrors of that cluster (by label). Whenever either changes,
and every `resync` seconds, the difference is planned (`multicluster.plan`) and applied:
`<svc>-<cluster>` Services and their gateway EndpointSlices created, updated or deleted.

When the remote API server goes away, its watch retries with backoff and its last listed
state stays: mirrors are never deleted because the remote cannot be reached, only because a
successful list or watch says the Service is gone or unexported."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.controlplane.kube.client import ApiError, KubeClient
from agent.controlplane.kube.config import KubeConfig
from agent.controlplane.kube.reflector import Reflector
from agent.core import multicluster
from agent.core.multicluster import ExportedService, Link

log = logging.getLogger("pinion.mirror")

LINK_FILES = ("cluster-name", "gateway-address", "gateway-identity")  # + kubeconfig, remote-domain


def read_link_dir(directory: Path) -> tuple[Link, Path]:
    """A link as its Deployment mounts it (Secret + ConfigMap in one projected volume):
    the Link, and the path of the remote cluster's kubeconfig."""
    try:
        values = {name: (directory / name).read_text().strip() for name in LINK_FILES}
    except OSError as exc:
        raise multicluster.LinkError(f"link dir {directory}: {exc}") from None
    domain_file = directory / "remote-domain"
    domain = domain_file.read_text().strip() if domain_file.exists() else "cluster.local"
    host, _, port = values["gateway-address"].rpartition(":")
    if not port.isdigit():
        raise multicluster.LinkError(f"gateway-address must be IP:PORT, not {values['gateway-address']!r}")
    link = Link(values["cluster-name"], host, int(port), values["gateway-identity"], domain)
    return link, directory / "kubeconfig"


def _local_mirror(obj: dict[str, Any]) -> str | None:
    """A local mirror Service: the source version it was made from."""
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    return str(annotations.get(multicluster.REMOTE_VERSION, ""))


@dataclass
class MirrorStats:
    created: int = 0
    updated: int = 0
    deleted: int = 0
    failures: int = 0


class MirrorController:
    def __init__(self, local: KubeClient, remote: KubeClient, link: Link,
                 resync: float = 30.0) -> None:
        self.link = link
        self._local = local
        self._resync = resync
        self._changed = asyncio.Event()
        poke = self._poke
        self.remote: Reflector[ExportedService] = Reflector(
            remote, "/api/v1/services", multicluster.exported, on_event=poke)
        self.mirrors: Reflector[str] = Reflector(
            local, "/api/v1/services", _local_mirror, on_event=poke,
            params={"labelSelector": f"{multicluster.CLUSTER_LABEL}={link.cluster_name}"})
        self.stats = MirrorStats()

    def _poke(self, *_: object) -> None:
        self._changed.set()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.remote.run())
            tasks.create_task(self.mirrors.run())
            await self.mirrors.synced.wait()
            await self.remote.synced.wait()
            while True:
                self._changed.clear()
                await self.reconcile()
                with contextlib.suppress(TimeoutError):  # a resync: nothing changed meanwhile
                    await asyncio.wait_for(self._changed.wait(), self._resync)

    async def reconcile(self) -> None:
        plan = multicluster.plan(self.remote.store, self.mirrors.store, self.link.cluster_name)
        for service in plan.upserts:
            await self._guarded(self._upsert(service), f"mirroring {service.key}")
        for key in plan.deletes:
            await self._guarded(self._delete(key), f"deleting mirror {key}")

    async def _guarded(self, step: Any, what: str) -> None:
        try:
            await step
        except (OSError, TimeoutError, ApiError) as exc:  # retried at the next change or resync
            self.stats.failures += 1
            log.warning("%s: %s", what, exc)

    async def _upsert(self, remote: ExportedService) -> None:
        service, endpoint_slice = multicluster.mirror_objects(remote, self.link)
        # the endpoint first: a mirror is never seen without the gateway behind it
        await self._put(f"/apis/discovery.k8s.io/v1/namespaces/{remote.namespace}/endpointslices",
                        endpoint_slice)
        created = await self._put(f"/api/v1/namespaces/{remote.namespace}/services", service)
        if created:
            self.stats.created += 1
        else:
            self.stats.updated += 1
        log.info("mirror %s/%s of %s in %s: %s", remote.namespace, service["metadata"]["name"],
                 remote.key, self.link.cluster_name, "created" if created else "updated")

    async def _put(self, collection: str, obj: dict[str, Any]) -> bool:
        """Create `obj`, or update the existing one (keeping what the API server set, such
        as a Service's clusterIP); True when it was created."""
        try:
            await self._local.request("POST", collection, body=obj)
            return True
        except ApiError as exc:
            if exc.status != 409:
                raise
        path = f"{collection}/{obj['metadata']['name']}"
        current = await self._local.request("GET", path)
        current_meta = current.setdefault("metadata", {})
        owner = (current_meta.get("labels") or {}).get(multicluster.CLUSTER_LABEL)
        if owner != self.link.cluster_name:  # someone's own object by that name: never clobbered
            raise ApiError(409, "Conflict", f"{path} exists and is not a mirror of "
                           f"{self.link.cluster_name}: not replacing it")
        for field in ("labels", "annotations"):
            current_meta[field] = {**(current_meta.get(field) or {}), **obj["metadata"].get(field, {})}
        if obj["kind"] == "Service":
            current.setdefault("spec", {})["ports"] = obj["spec"]["ports"]
        else:
            current["endpoints"], current["ports"] = obj["endpoints"], obj["ports"]
        await self._local.request("PUT", path, body=current)
        return False

    async def _delete(self, key: str) -> None:
        namespace, name = key.split("/", 1)
        for path in (f"/api/v1/namespaces/{namespace}/services/{name}",  # the name goes first
                     f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices/{name}-gateway"):
            try:
                await self._local.request("DELETE", path)
            except ApiError as exc:
                if exc.status != 404:
                    raise
        self.stats.deleted += 1
        log.info("mirror %s deleted: no longer exported by %s", key, self.link.cluster_name)


async def run_mirror(local_kubeconfig: str | None, link_dir: Path, resync: float) -> int:
    link, remote_kubeconfig = read_link_dir(link_dir)
    local = KubeClient(KubeConfig.load(local_kubeconfig))
    remote = KubeClient(KubeConfig.load(str(remote_kubeconfig)))
    controller = MirrorController(local, remote, link, resync)
    log.info("mirroring Services exported by %s (gateway %s:%d, %s)", link.cluster_name,
             link.gateway_ip, link.gateway_port, link.gateway_identity)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    task = loop.create_task(controller.run())
    stopping = loop.create_task(stop.wait())
    try:
        await asyncio.wait([task, stopping], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for running in (task, stopping):
            running.cancel()
        await asyncio.gather(task, stopping, return_exceptions=True)
        await local.close()
        await remote.close()
    if task.done() and not task.cancelled() and task.exception() is not None:
        log.error("the mirror stopped: %r", task.exception())  # a bug: exit non-zero, be restarted
        return 1
    return 0
