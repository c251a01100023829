"""Kubernetes mode's moving parts: the six watches (docs/kubernetes.md), the cluster
state they feed, and the admission that follows them. Imported only in Kubernetes mode."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import quote

from agent.config import Config
from agent.controlplane.cluster.admission import ClusterAdmission, LookupFailed
from agent.controlplane.cluster.objects import (
    JobRecord,
    NamespaceRecord,
    PodRecord,
    ServiceRecord,
    SliceRecord,
    project_job,
    project_namespace,
    project_pod,
    project_service,
    project_slice,
)
from agent.controlplane.cluster.state import ClusterState
from agent.controlplane.kube.client import ApiError, KubeClient
from agent.controlplane.kube.config import KubeConfig
from agent.controlplane.kube.reflector import Reflector
from agent.inpod.pods import Pods
from agent.inpod.state import PodStateStore

log = logging.getLogger(__name__)

T = TypeVar("T")


class KubernetesMode:
    def __init__(self, config: Config, pods: Pods, state: ClusterState,
                 on_damaged: Callable[[str], None] | None = None) -> None:
        """`state`: what the watches feed; the outbound proxy routes by it (built first).
        `on_damaged`: told of each sandbox state file set aside as damaged."""
        assert config.kubernetes is not None
        source = None if config.kubernetes == "in-cluster" else config.kubernetes
        self.client = KubeClient(KubeConfig.load(source))
        self.state = state
        sandboxes = PodStateStore(config.state_dir, "sandboxes", on_damaged)
        node = config.node_name
        self.admission = ClusterAdmission(pods, self.state, sandboxes,
                                          wait_for_pod=config.pod_wait_seconds, node=node,
                                          lookup=self._lookup_pod,
                                          resync=lambda reason: self.local_pods.resync(reason))
        state, admission = self.state, self.admission
        self.local_pods: Reflector[PodRecord] = self._watch(
            "/api/v1/pods", {"fieldSelector": f"spec.nodeName={node}"}, project_pod,
            admission.local_pod_event)
        self.pods: Reflector[PodRecord] = self._watch(
            "/api/v1/pods", {}, project_pod, _feed(state.upsert_pod, state.delete_pod))
        self.namespaces: Reflector[NamespaceRecord] = self._watch(
            "/api/v1/namespaces", {}, project_namespace, self._namespace_event)
        self.services: Reflector[ServiceRecord] = self._watch(
            "/api/v1/services", {}, project_service, _feed(state.upsert_service, state.delete_service))
        self.slices: Reflector[SliceRecord] = self._watch(
            "/apis/discovery.k8s.io/v1/endpointslices", {}, project_slice,
            _feed(state.upsert_slice, state.delete_slice))
        self.jobs: Reflector[JobRecord] = self._watch(
            "/apis/batch/v1/jobs", {}, project_job, _feed(state.upsert_job, state.delete_job))

    def _watch(self, path: str, params: dict[str, str], project: Callable[[dict[str, Any]], T | None],
               on_event: Callable[[str, str, T | None, T | None], None]) -> Reflector[T]:
        return Reflector(self.client, path, project, on_event=on_event, params=params)

    async def _lookup_pod(self, namespace: str, name: str) -> PodRecord | None:
        path = f"/api/v1/namespaces/{quote(namespace, safe='')}/pods/{quote(name, safe='')}"
        try:
            found = await self.client.get_optional(path)
        except (OSError, TimeoutError, ApiError) as exc:
            raise LookupFailed(str(exc) or type(exc).__name__) from exc
        return None if found is None else project_pod(found)

    def _namespace_event(self, kind: str, key: str, old: NamespaceRecord | None,
                         new: NamespaceRecord | None) -> None:
        if new is None:
            self.state.delete_namespace(key)
        else:
            self.state.upsert_namespace(new)
        self.admission.namespace_event(kind, key, old, new)

    def reflectors(self) -> list[Reflector[Any]]:
        return [self.local_pods, self.pods, self.namespaces, self.services, self.slices, self.jobs]

    async def run(self) -> None:
        """Every watch, and the admission once this node's pods and the namespaces are known."""
        async with asyncio.TaskGroup() as tasks:
            for reflector in self.reflectors():
                tasks.create_task(reflector.run())
            tasks.create_task(self._signal_synced())
            tasks.create_task(self.admission.run())

    async def _signal_synced(self) -> None:
        # a CronJob's pod is labelled by its Job's owner: know the Jobs before admitting
        await asyncio.gather(self.local_pods.synced.wait(), self.namespaces.synced.wait(),
                             self.jobs.synced.wait())
        self.admission.synced.set()
        await asyncio.gather(*(r.synced.wait() for r in self.reflectors()))
        log.info("kubernetes: watches synced: %s", self.state.sizes())

    async def close(self) -> None:
        await self.client.close()


def _feed(upsert: Callable[[T], None], delete: Callable[[str], None]
          ) -> Callable[[str, str, T | None, T | None], None]:
    def on_event(kind: str, key: str, old: T | None, new: T | None) -> None:
        if new is None:
            delete(key)
        else:
            upsert(new)

    return on_event
