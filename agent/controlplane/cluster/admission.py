"""Kubernetes mode: the API server, not the CNI args, says which of this node's pods are
meshed, and the agent follows it as labels change and pods go.

The CNI plugin still announces every pod sandbox (netns, IPs, cgroup) before its
containers start; the agent remembers every sandbox (meshed or not, across restarts) so a
namespace labelled later gets its running pods captured, and an opt-out releases them."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from agent.controlplane.cluster.objects import NamespaceRecord, PodRecord
from agent.controlplane.cluster.policy import apply_record, mesh_decision
from agent.controlplane.cluster.state import ClusterState
from agent.inpod.errors import CNI_INVALID_CONFIG, CNI_TRY_AGAIN_LATER, CaptureError
from agent.inpod.pods import Pods
from agent.inpod.state import PodStateStore
from agent.model import Pod

log = logging.getLogger(__name__)

# A healthy watch brings a pod within milliseconds of its creation, and kubelet asks the CNI
# only after that: past this the agent asks the API server itself (one GET), and if the API
# has the pod the watch has lost or not yet delivered, the watch is listed again.
ASK_API_AFTER = 2.0


class LookupFailed(Exception):
    """The API server could not be asked (unreachable, refused): the reason, for the log."""


# GET one pod ("namespace", "name"): its record, or None when the API server has none
PodLookup = Callable[[str, str], Awaitable[PodRecord | None]]

# What a change of these re-captures a pod for (rules, listeners, certificate, labels).
_CAPTURE_FIELDS = ("service_account", "capture", "opaque_ports", "inbound", "owner_kind", "owner_name")


class ClusterAdmission:
    def __init__(self, pods: Pods, state: ClusterState, sandboxes: PodStateStore, *,
                 wait_for_pod: float = 10.0, node: str = "", lookup: PodLookup | None = None,
                 resync: Callable[[str], None] | None = None) -> None:
        """`lookup` GETs a pod the watch does not have; `resync` lists this node's pods again."""
        self._pods = pods
        self._state = state
        self._store = sandboxes
        self._wait_for_pod = wait_for_pod
        self._node = node
        self._lookup = lookup
        self._resync = resync
        self._sandboxes: dict[str, Pod] = {}  # container id -> the pod as announced
        self._local: dict[str, PodRecord] = {}  # "ns/name" -> what this node's pod watch says
        self._arrival = asyncio.Event()  # replaced on every local pod event (a broadcast)
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self.synced = asyncio.Event()  # set once pods on this node and namespaces are listed

    def load(self) -> None:
        """Sandboxes known before a restart: those remembered, and those re-adopted."""
        self._store.prepare()
        for pod in self._store.load_all():
            self._sandboxes[pod.container_id] = pod
        for captured in self._pods.pods():
            self._sandboxes.setdefault(captured.pod.container_id, captured.pod)

    # --- the CNI plugin's requests ----------------------------------------------------------
    async def admit(self, pod: Pod, args: dict[str, Any]) -> None:
        record = await self._record_for(pod)
        async with self._lock:
            self._remember(pod)
            await self._converge(pod, record, announced=True)

    async def release(self, container_id: str) -> None:
        async with self._lock:
            self._sandboxes.pop(container_id, None)
            self._store.delete(container_id)
            await self._pods.delete(container_id)

    async def check(self, container_id: str) -> list[str]:
        if self._pods.captured(container_id) is None and container_id in self._sandboxes:
            return []  # known and, by the API's say, not meshed: nothing to check
        return await self._pods.check(container_id)

    # --- the watches ---------------------------------------------------------------------
    def local_pod_event(self, kind: str, key: str, old: PodRecord | None, new: PodRecord | None) -> None:
        if new is None:
            self._local.pop(key, None)
        else:
            self._local[key] = new
        self._arrival.set()
        self._arrival = asyncio.Event()
        if old is None or new is None or _matters(old) != _matters(new):
            self._mark(key)

    def namespace_event(self, kind: str, name: str, old: NamespaceRecord | None,
                        new: NamespaceRecord | None) -> None:
        if (old.mesh if old else None) != (new.mesh if new else None):
            for key in [k for k in self._local if k.split("/", 1)[0] == name]:
                self._mark(key)

    def _mark(self, key: str) -> None:
        self._dirty.add(key)
        self._wake.set()

    async def run(self) -> None:
        """Apply the API's answers as they change; owned by the agent's task group."""
        await self.synced.wait()
        self._dirty.update(str(p.key) for p in self._sandboxes.values())
        while True:
            self._wake.clear()
            dirty, self._dirty = self._dirty, set()
            for key in sorted(dirty):
                await self._reconcile(key)
            if not self._dirty:
                await self._wake.wait()

    async def sweep(self) -> None:
        """Forget sandboxes whose netns is gone without a DEL: bounded memory and disk."""
        async with self._lock:
            for container_id, pod in list(self._sandboxes.items()):
                if self._pods.captured(container_id) is None and not _netns_exists(pod.netns_path):
                    del self._sandboxes[container_id]
                    self._store.delete(container_id)

    # --- deciding -------------------------------------------------------------------------
    async def _record_for(self, pod: Pod) -> PodRecord:
        """This node's watch has the pod as soon as it is scheduled, before kubelet asks
        the CNI; wait a little for a watch that lags (asking the API server itself once the
        watch is late), then let the runtime retry."""
        started = time.monotonic()
        deadline = started + self._wait_for_pod
        ask_at = started + min(ASK_API_AFTER, self._wait_for_pod / 2) if self._lookup else deadline
        api_says = ""
        key = str(pod.key)
        while True:
            record = self._local.get(key)
            if record is not None and (not pod.uid or record.uid == pod.uid):
                return record
            now = time.monotonic()
            if self._lookup is not None and not api_says and now >= ask_at:
                api_says = await self._ask_api(pod, now - started)
                continue
            if now >= deadline:
                state = "synced" if self.synced.is_set() else "still listing"
                raise CaptureError(CNI_TRY_AGAIN_LATER, f"pod {key} (uid {pod.uid or '?'}) is not "
                                   f"known to the API server's watch on this node ({state}"
                                   f"{'; ' + api_says if api_says else ''}); try again later")
            try:
                await asyncio.wait_for(self._arrival.wait(),
                                       (ask_at if not api_says else deadline) - now)
            except TimeoutError:
                continue

    async def _ask_api(self, pod: Pod, waited: float) -> str:
        """GET the pod the watch has not brought: what the API server says, for the error;
        if it has the pod, on this node, this node's watch is listed again."""
        assert self._lookup is not None
        try:
            found = await self._lookup(pod.key.namespace, pod.key.name)
        except LookupFailed as exc:
            return f"the API server could not be asked: {exc}"
        if found is None:
            return "the API server has no such pod"
        if pod.uid and found.uid != pod.uid:
            return f"the API server's pod of that name has uid {found.uid}"
        if self._node and found.node != self._node:
            return f"the API server has it on node {found.node or '(none)'!r}, not this one"
        if self._resync is not None:
            self._resync(f"pod {pod.key} is in the API server but not in this watch after "
                         f"{waited:.1f}s")
        return "the API server has it: this node's pods are being listed again"

    def _remember(self, pod: Pod) -> None:
        if self._sandboxes.get(pod.container_id) != pod:
            self._sandboxes[pod.container_id] = pod
            self._store.save(pod)

    async def _reconcile(self, key: str) -> None:
        async with self._lock:
            for pod in [p for p in self._sandboxes.values() if str(p.key) == key]:
                record = self._local.get(key)
                if record is not None and pod.uid and record.uid != pod.uid:
                    record = None  # a new pod of the same name: this sandbox is the old one's
                try:
                    await self._converge(pod, record, announced=False)
                except CaptureError as exc:  # say why; the other pods go on being served
                    log.warning("pod %s: %s", key, exc.msg)
                except Exception:
                    log.exception("pod %s: reconciling failed", key)

    async def _converge(self, pod: Pod, record: PodRecord | None, announced: bool) -> None:
        """Capture, keep, re-capture or release one sandbox, as the API says."""
        captured = self._pods.captured(pod.container_id)
        if record is None:
            if captured is not None:
                log.info("pod %s is gone from the API: releasing", pod.key)
                await self._pods.delete(pod.container_id)
            return
        meshed, why = mesh_decision(record, self._state.namespace(record.namespace))
        if not meshed:
            if captured is not None:
                log.info("pod %s no longer meshed (%s): releasing", pod.key, why)
                await self._pods.delete(pod.container_id)
            elif announced:
                log.info("pod %s not meshed: %s", pod.key, why)
            return
        try:
            desired = apply_record(pod, record, self._state.owner(record))
        except ValueError as exc:
            raise CaptureError(CNI_INVALID_CONFIG, str(exc)) from None
        if captured is not None and _same_capture(captured.pod, desired):
            if announced:
                await self._pods.add(desired)  # a repeated ADD re-asserts the rules
            return
        if captured is not None:
            log.info("pod %s: settings changed; capturing it again", pod.key)
            await self._pods.delete(pod.container_id)
        await self._pods.add(desired)
        log.info("pod %s meshed (%s)", pod.key, why)


def _same_capture(current: Pod, desired: Pod) -> bool:
    return all(getattr(current, f) == getattr(desired, f) for f in _CAPTURE_FIELDS)


def _matters(record: PodRecord) -> tuple[Any, ...]:
    """What of a pod can change its capture: a status-only update (IP, phase) is ignored."""
    return (record.uid, record.mesh, record.settings, record.service_account, record.owner,
            record.host_network)


def _netns_exists(path: str) -> bool:
    return os.path.exists(path)
