"""Kubernetes mode: the API decides which announced pods are captured, and the agent follows
labels, annotations and deletions as they arrive (no sockets: a fake PodManager records)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from agent.controlplane.cluster.admission import ClusterAdmission, LookupFailed, PodLookup
from agent.controlplane.cluster.objects import NamespaceRecord, PodRecord, project_pod
from agent.controlplane.cluster.state import ClusterState
from agent.inpod.errors import CaptureError
from agent.inpod.state import PodStateStore
from agent.model import Pod, PodKey
from tests.unit.test_cluster_state import pod_object

T = TypeVar("T")


@dataclass
class Captured:
    pod: Pod


class FakePods:
    def __init__(self) -> None:
        self.captured_pods: dict[str, Captured] = {}
        self.log: list[tuple[str, str]] = []

    async def add(self, pod: Pod) -> None:
        self.captured_pods[pod.container_id] = Captured(pod)
        self.log.append(("add", pod.container_id))

    async def delete(self, container_id: str) -> bool:
        self.log.append(("delete", container_id))
        return self.captured_pods.pop(container_id, None) is not None

    async def check(self, container_id: str) -> list[str]:
        return [] if container_id in self.captured_pods else ["not captured"]

    def captured(self, container_id: str) -> Captured | None:
        return self.captured_pods.get(container_id)

    def pods(self) -> list[Captured]:
        return list(self.captured_pods.values())


class World:
    """A node's admission with its pods, state and namespace as the watches would feed them."""

    def __init__(self, tmp_path: Path, wait: float = 0.5, lookup: PodLookup | None = None,
                 resync: Callable[[str], None] | None = None) -> None:
        self.pods = FakePods()
        self.state = ClusterState()
        self.admission = ClusterAdmission(self.pods, self.state,
                                          PodStateStore(tmp_path, "sandboxes"), wait_for_pod=wait,
                                          node="n1", lookup=lookup, resync=resync)
        self.admission.load()
        self.runner: asyncio.Task[None] | None = None

    def namespace(self, name: str, mesh: str | None) -> None:
        old = self.state.namespace(name)
        new = NamespaceRecord(name, mesh)
        self.state.upsert_namespace(new)
        self.admission.namespace_event("upsert", name, old, new)

    def pod(self, name: str, **kw: Any) -> PodRecord:
        record = project_pod(pod_object(name, "10.42.1.5", **kw))
        assert record is not None
        key = record.key
        old = self.admission._local.get(key)
        self.admission.local_pod_event("upsert", key, old, record)
        return record

    def gone(self, key: str) -> None:
        self.admission.local_pod_event("delete", key, self.admission._local.get(key), None)

    async def start(self) -> None:
        self.admission.synced.set()
        self.runner = asyncio.get_running_loop().create_task(self.admission.run())
        await settle()

    async def stop(self) -> None:
        if self.runner is not None:
            self.runner.cancel()
            await asyncio.gather(self.runner, return_exceptions=True)


def sandbox(name: str, container_id: str = "c1", uid: str = "") -> Pod:
    return Pod(PodKey("shop", name), uid or f"uid-{name}", container_id, f"/run/netns/{container_id}",
               ("10.42.1.5",))


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def scenario(test: Callable[[World], Awaitable[None]]) -> Callable[[Path], None]:
    def run(tmp_path: Path) -> None:
        async def body() -> None:
            world = World(tmp_path)
            try:
                await test(world)
            finally:
                await world.stop()

        asyncio.run(body())

    run.__name__ = test.__name__
    return run


@scenario
async def test_an_opted_in_pod_is_captured_with_what_its_annotations_say(world: World) -> None:
    world.namespace("shop", "enabled")
    world.pod("web-1", annotations={"pinion.dev/inbound-policy": "mesh-only"})

    await world.admission.admit(sandbox("web-1"), {})

    pod = world.pods.captured_pods["c1"].pod
    assert pod.inbound.mode == "mesh-only" and pod.service_account == "web"
    assert (pod.owner_kind, pod.owner_name) == ("deployment", "web")


@scenario
async def test_a_pod_not_opted_in_starts_uncaptured_and_is_captured_when_its_namespace_opts_in(
        world: World) -> None:
    world.namespace("shop", None)
    world.pod("web-1")
    await world.start()

    await world.admission.admit(sandbox("web-1"), {})
    assert world.pods.captured_pods == {}
    assert await world.admission.check("c1") == []  # known, and not meant to be meshed

    world.namespace("shop", "enabled")
    await settle()
    assert list(world.pods.captured_pods) == ["c1"]


@scenario
async def test_opting_the_pod_out_releases_it_and_deleting_it_too(world: World) -> None:
    world.namespace("shop", "enabled")
    world.pod("web-1")
    world.pod("web-2")
    await world.admission.admit(sandbox("web-1", "c1"), {})
    await world.admission.admit(sandbox("web-2", "c2"), {})
    await world.start()

    world.pod("web-1", labels={"pinion.dev/mesh": "disabled"})
    world.gone("shop/web-2")
    await settle()

    assert world.pods.captured_pods == {}
    assert ("delete", "c1") in world.pods.log and ("delete", "c2") in world.pods.log


@scenario
async def test_an_add_waits_for_a_lagging_watch_then_captures(world: World) -> None:
    world.namespace("shop", "enabled")

    async def late() -> None:
        await asyncio.sleep(0.05)
        world.pod("web-1")

    task = asyncio.get_running_loop().create_task(late())
    await world.admission.admit(sandbox("web-1"), {})
    await task

    assert list(world.pods.captured_pods) == ["c1"]


@scenario
async def test_a_pod_the_api_never_shows_is_refused_with_try_again_later(world: World) -> None:
    with pytest.raises(CaptureError) as refused:
        await world.admission.admit(sandbox("ghost"), {})

    assert refused.value.code == 11 and "not known to the API server" in refused.value.msg


class Api:
    """What a GET of a pod answers, and the resyncs asked of the node's watch."""

    def __init__(self, answer: PodRecord | str | None) -> None:
        self.answer = answer
        self.asked: list[tuple[str, str]] = []
        self.resyncs: list[str] = []
        self.world: World | None = None

    async def lookup(self, namespace: str, name: str) -> PodRecord | None:
        self.asked.append((namespace, name))
        if isinstance(self.answer, str):
            raise LookupFailed(self.answer)
        return self.answer

    def resync(self, reason: str) -> None:
        self.resyncs.append(reason)
        assert self.world is not None and isinstance(self.answer, PodRecord)
        answer = self.answer
        asyncio.get_running_loop().call_later(0.02, lambda: self.world and self.world.admission
                                              .local_pod_event("upsert", answer.key, None, answer))


def test_a_pod_the_watch_lost_is_asked_of_the_api_and_the_watch_listed_again(tmp_path: Path) -> None:
    """The watch never brings the pod (a stalled stream): the agent GETs it, finds it on this
    node, asks the watch to list again, and the list brings it within the same ADD."""
    record = project_pod(pod_object("web-1", "10.42.1.5"))
    assert record is not None
    api = Api(record)

    async def body() -> None:
        world = World(tmp_path, wait=2.0, lookup=api.lookup, resync=api.resync)
        api.world = world
        world.namespace("shop", "enabled")
        started = asyncio.get_running_loop().time()
        await world.admission.admit(sandbox("web-1"), {})
        assert list(world.pods.captured_pods) == ["c1"]
        assert 1.0 <= asyncio.get_running_loop().time() - started < 1.5  # asked at half the wait

    asyncio.run(body())
    assert api.asked == [("shop", "web-1")]
    assert len(api.resyncs) == 1 and "shop/web-1 is in the API server" in api.resyncs[0]


@pytest.mark.parametrize(("answer", "says"), [
    (None, "the API server has no such pod"),
    ("connection refused", "the API server could not be asked: connection refused"),
    ("uid", "the API server's pod of that name has uid uid-other"),
    ("node", "the API server has it on node 'n2', not this one"),
])
def test_what_the_api_says_of_a_pod_the_watch_never_brought_is_in_the_refusal(
        tmp_path: Path, answer: str | None, says: str) -> None:
    api = Api(answer)
    if answer == "uid":
        api.answer = project_pod({**pod_object("web-1", "10.42.1.5"),
                                  "metadata": {"name": "web-1", "namespace": "shop", "uid": "uid-other"}})
    elif answer == "node":
        api.answer = project_pod(pod_object("web-1", "10.42.1.5", node="n2"))

    async def body() -> None:
        world = World(tmp_path, lookup=api.lookup, resync=api.resync)
        with pytest.raises(CaptureError) as refused:
            await world.admission.admit(sandbox("web-1"), {})
        assert refused.value.code == 11 and "not known to the API server" in refused.value.msg
        assert says in refused.value.msg

    asyncio.run(body())
    assert api.asked == [("shop", "web-1")] and api.resyncs == []


@scenario
async def test_a_sandbox_of_an_older_pod_with_the_same_name_waits_for_its_own_uid(world: World) -> None:
    world.namespace("shop", "enabled")
    world.pod("web-1")  # uid-web-1

    with pytest.raises(CaptureError):
        await world.admission.admit(sandbox("web-1", uid="uid-new"), {})


@scenario
async def test_a_changed_annotation_recaptures_and_a_bad_one_is_refused_naming_it(world: World) -> None:
    world.namespace("shop", "enabled")
    world.pod("web-1")
    await world.admission.admit(sandbox("web-1"), {})
    await world.start()

    world.pod("web-1", annotations={"pinion.dev/exclude-outbound-ports": "5432"})
    await settle()
    assert world.pods.captured_pods["c1"].pod.capture.exclude_outbound_ports == (5432,)
    assert world.pods.log == [("add", "c1"), ("delete", "c1"), ("add", "c1")]

    world.pod("web-2", annotations={"pinion.dev/inbound-policy": "strict"})
    with pytest.raises(CaptureError) as refused:
        await world.admission.admit(sandbox("web-2", "c2"), {})
    assert refused.value.code == 7 and "inbound policy" in refused.value.msg
    assert "c1" in world.pods.captured_pods  # the other pod is still served


def test_after_a_restart_a_remembered_sandbox_is_captured_when_it_opts_in(tmp_path: Path) -> None:
    async def first_run() -> None:
        world = World(tmp_path)
        world.namespace("shop", None)
        world.pod("web-1")
        await world.admission.admit(sandbox("web-1"), {})

    async def second_run() -> None:
        world = World(tmp_path)
        world.namespace("shop", "enabled")
        world.pod("web-1")
        await world.start()
        await world.stop()
        assert list(world.pods.captured_pods) == ["c1"]

    asyncio.run(first_run())
    asyncio.run(second_run())
