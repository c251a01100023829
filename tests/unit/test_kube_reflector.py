"""Reflectors mirror a collection as small projections: list (paginated), then watch from the list's
resourceVersion; bookmarks move it on; a 410 relists and emits only the difference; a dropped stream
reconnects from where it was. First the pure store/diff/backoff logic, then the whole against the
in-test API server."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import pytest

from agent.controlplane.kube.client import KubeClient, KubeConfig
from agent.controlplane.kube.listing import ListReader
from agent.controlplane.kube.reflector import Backoff, Reflector, Update, apply_event, object_key, replace_all
from tests.support.kubeapi import FakeApiServer

T = TypeVar("T")


@dataclass(frozen=True)
class PodView:
    ip: str
    node: str
    mesh: str


def project(obj: dict[str, Any]) -> PodView | None:
    labels = obj["metadata"].get("labels") or {}
    if labels.get("mesh") == "off":
        return None
    return PodView(obj.get("status", {}).get("podIP", ""), obj.get("spec", {}).get("nodeName", ""),
                   labels.get("mesh", ""))


def pod(name: str, namespace: str = "default", ip: str = "10.42.0.1", mesh: str = "on",
        note: str = "") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": {"mesh": mesh},
                         "annotations": {"note": note}},
            "spec": {"nodeName": "node-a", "containers": [{"name": "app", "image": "app:1"}]},
            "status": {"phase": "Running", "podIP": ip}}


# --- pure ------------------------------------------------------------------------------------------

def test_events_update_the_store_and_say_what_changed() -> None:
    store: dict[str, PodView] = {}
    added = apply_event(store, "ADDED", pod("web"), project)
    assert added == Update("upsert", "default/web", None, PodView("10.42.0.1", "node-a", "on"))
    assert apply_event(store, "MODIFIED", pod("web", note="status heartbeat"), project) is None
    moved = apply_event(store, "MODIFIED", pod("web", ip="10.42.0.2"), project)
    assert moved is not None and (moved.old, moved.new) == (added.new, PodView("10.42.0.2", "node-a", "on"))
    left = apply_event(store, "MODIFIED", pod("web", mesh="off"), project)
    assert left == Update("delete", "default/web", moved.new, None)
    assert apply_event(store, "DELETED", pod("web"), project) is None
    assert store == {}


def test_a_relist_emits_only_the_difference() -> None:
    same, changed = PodView("1", "a", "on"), PodView("2", "a", "on")
    store = {"ns/same": same, "ns/changed": changed, "ns/gone": PodView("3", "a", "on")}
    fresh = {"ns/same": same, "ns/changed": PodView("2", "b", "on"), "ns/new": PodView("4", "a", "on")}
    updates = replace_all(store, fresh)
    assert [(u.kind, u.key) for u in updates] == [("delete", "ns/gone"), ("upsert", "ns/changed"),
                                                  ("upsert", "ns/new")]
    assert updates[1].old == changed and store == fresh


def test_keys_are_namespace_slash_name_or_name() -> None:
    assert object_key({"metadata": {"namespace": "shop", "name": "cart"}}) == "shop/cart"
    assert object_key({"metadata": {"name": "shop"}}) == "shop"


def test_backoff_doubles_to_thirty_seconds_with_jitter_and_resets() -> None:
    backoff = Backoff(rng=random.Random(7))
    delays = [backoff.next() for _ in range(9)]
    nominal = [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert all(n / 2 <= d <= n for d, n in zip(delays, nominal, strict=True))
    backoff.reset()
    assert 0.25 <= backoff.next() <= 0.5


@pytest.mark.parametrize("document", [
    {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "7", "continue": "c"},
     "items": [pod("a"), pod("b", note='with "quotes", [brackets], {braces} and \\ ')]},
    {"items": [{"x": [1, {"y": None}]}], "metadata": {"resourceVersion": "9"}},  # items first
    {"kind": "PodList", "items": []},
    {"kind": "PodList", "items": None},
    {},
])
@pytest.mark.parametrize("indent", [None, 2])
def test_list_items_are_decoded_one_by_one_like_json_loads(document: dict[str, Any],
                                                           indent: int | None) -> None:
    reader = ListReader(json.dumps(document, indent=indent))
    items = list(reader.items())
    assert items == (document.get("items") or [])
    assert reader.fields == {key: value for key, value in document.items() if key != "items" or value is None}


@pytest.mark.parametrize("text", ['{"items": [1, 2', '[1]', '{"items": [1] "x": 2}', '{"a" 1}', ""])
def test_a_malformed_list_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        list(ListReader(text).items())


# --- against the in-test API server ------------------------------------------------------------------

@pytest.fixture
def server(tmp_path: Path) -> Iterator[FakeApiServer]:
    api = FakeApiServer(directory=tmp_path / "api", bookmark_interval=0.2).start()
    yield api
    api.stop()


def run(coroutine: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coroutine, timeout)

    return asyncio.run(bounded())


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def __call__(self, kind: str, key: str, old: PodView | None, new: PodView | None) -> None:
        self.calls.append((kind, key))


async def mirror(server: FakeApiServer, scenario: Callable[[Reflector[PodView], Recorder], Awaitable[None]],
                 **options: Any) -> None:
    """Run a pod Reflector in a TaskGroup for the length of the scenario."""
    client = KubeClient(KubeConfig.load(str(server.kubeconfig)), timeout=5.0)
    recorder = Recorder()
    reflector = Reflector(client, "/api/v1/pods", project, on_event=recorder, **options)
    try:
        async with asyncio.TaskGroup() as group:
            running = group.create_task(reflector.run())
            try:
                await asyncio.wait_for(reflector.synced.wait(), 5)
                await eventually(lambda: len(watches(server)) == 1)  # listed, and now watching
                await scenario(reflector, recorder)
            finally:
                running.cancel()
    finally:
        await client.close()


def watches(server: FakeApiServer) -> list[dict[str, list[str]]]:
    return [parse_qs(urlsplit(target).query) for _, target in server.requests if "watch=1" in target]


def lists(server: FakeApiServer) -> list[str]:
    return [target for _, target in server.requests if target.startswith("/api/v1/pods?limit=")]


def test_the_first_list_is_paginated_and_fills_the_store(server: FakeApiServer) -> None:
    for index in range(5):
        server.apply(pod(f"p{index}", ip=f"10.42.0.{index}"))
    server.apply(pod("ignored", mesh="off"))

    async def scenario(reflector: Reflector[PodView], recorder: Recorder) -> None:
        assert sorted(reflector.store) == [f"default/p{index}" for index in range(5)]
        assert recorder.calls == [("upsert", f"default/p{index}") for index in range(5)]
        assert reflector.resource_version == str(server.resource_version)

    run(mirror(server, scenario, page_size=2))
    assert len(lists(server)) == 3 and "continue=" in lists(server)[1]
    watch = watches(server)[0]
    assert watch["allowWatchBookmarks"] == ["true"] and 300 <= int(watch["timeoutSeconds"][0]) <= 600


def test_live_changes_reach_the_store_and_the_callback(server: FakeApiServer) -> None:
    server.apply(pod("web"))

    async def scenario(reflector: Reflector[PodView], recorder: Recorder) -> None:
        recorder.calls.clear()
        await asyncio.to_thread(server.apply, pod("cart", ip="10.42.0.9"))
        await asyncio.to_thread(server.apply, pod("web", note="not projected"))
        await asyncio.to_thread(server.apply, pod("web", ip="10.42.0.5"))
        await asyncio.to_thread(server.delete, "v1", "Pod", "default", "cart")
        await eventually(lambda: len(recorder.calls) == 3)
        assert recorder.calls == [("upsert", "default/cart"), ("upsert", "default/web"),
                                  ("delete", "default/cart")]
        assert reflector.store == {"default/web": PodView("10.42.0.5", "node-a", "on")}
        assert reflector.events == 4 and reflector.relists == 0

    run(mirror(server, scenario))


def test_a_projection_of_none_means_absent(server: FakeApiServer) -> None:
    server.apply(pod("web", mesh="off"))

    async def scenario(reflector: Reflector[PodView], recorder: Recorder) -> None:
        assert reflector.store == {} and recorder.calls == []
        await asyncio.to_thread(server.apply, pod("web", mesh="on"))
        await eventually(lambda: "default/web" in reflector.store)
        await asyncio.to_thread(server.apply, pod("web", mesh="off"))
        await eventually(lambda: "default/web" not in reflector.store)
        assert recorder.calls == [("upsert", "default/web"), ("delete", "default/web")]

    run(mirror(server, scenario))


def test_bookmarks_advance_the_resource_version_and_a_drop_reconnects_without_a_relist(
        server: FakeApiServer) -> None:
    server.apply(pod("web"))

    async def scenario(reflector: Reflector[PodView], recorder: Recorder) -> None:
        await asyncio.to_thread(server.apply, {"apiVersion": "v1", "kind": "ConfigMap",
                                               "metadata": {"name": "elsewhere", "namespace": "default"}})
        await eventually(lambda: reflector.resource_version == str(server.resource_version))
        bookmarked = reflector.resource_version
        await asyncio.to_thread(server.drop_watches)
        await eventually(lambda: len(watches(server)) == 2)
        assert watches(server)[1]["resourceVersion"] == [bookmarked]
        await asyncio.to_thread(server.apply, pod("cart"))
        await eventually(lambda: "default/cart" in reflector.store)
        assert (reflector.relists, reflector.restarts) == (0, 1)

    run(mirror(server, scenario, backoff=Backoff(initial=0.2)))
    assert len(lists(server)) == 1


def test_a_compacted_history_relists_once_and_emits_what_was_missed(server: FakeApiServer) -> None:
    for name in ("same", "changed", "deleted"):
        server.apply(pod(name))

    async def scenario(reflector: Reflector[PodView], recorder: Recorder) -> None:
        recorder.calls.clear()
        await asyncio.to_thread(server.drop_watches)  # reconnects in 1-2 s (the backoff below)
        await asyncio.to_thread(server.delete, "v1", "Pod", "default", "deleted")
        await asyncio.to_thread(server.apply, pod("changed", ip="10.42.0.77"))
        await asyncio.to_thread(server.apply, pod("added"))
        await asyncio.to_thread(server.compact)
        await eventually(lambda: reflector.relists == 1)
        assert recorder.calls == [("delete", "default/deleted"), ("upsert", "default/added"),
                                  ("upsert", "default/changed")]  # deletes first, then the list's order
        assert reflector.store["default/changed"].ip == "10.42.0.77"
        await asyncio.sleep(0.5)  # bookmarks flow; nothing lists again
        assert (reflector.relists, reflector.restarts) == (1, 1)

    run(mirror(server, scenario, backoff=Backoff(initial=2.0)))
    assert len(lists(server)) == 2


def test_a_failing_callback_does_not_stop_the_mirror(server: FakeApiServer) -> None:
    def explode(kind: str, key: str, old: PodView | None, new: PodView | None) -> None:
        raise RuntimeError("consumer bug")

    async def scenario() -> None:
        client = KubeClient(KubeConfig.load(str(server.kubeconfig)))
        reflector = Reflector(client, "/api/v1/pods", project, on_event=explode)
        async with asyncio.TaskGroup() as group:
            running = group.create_task(reflector.run())
            await asyncio.to_thread(server.apply, pod("web"))
            await eventually(lambda: "default/web" in reflector.store)
            await asyncio.to_thread(server.apply, pod("cart"))
            await eventually(lambda: "default/cart" in reflector.store)
            running.cancel()
        await client.close()

    run(scenario())


def test_a_refused_list_is_retried_with_backoff_until_it_works(server: FakeApiServer) -> None:
    server.apply(pod("web"))

    async def scenario() -> None:
        config = KubeConfig.load(str(server.kubeconfig))
        client = KubeClient(KubeConfig(config.server, ca_pem=config.ca_pem, token="not-yet"))
        reflector = Reflector(client, "/api/v1/pods", project, backoff=Backoff(initial=0.1))
        async with asyncio.TaskGroup() as group:
            running = group.create_task(reflector.run())
            await eventually(lambda: reflector.restarts >= 2)  # 401, 401, ...
            assert not reflector.synced.is_set()
            await asyncio.to_thread(server.add_token, "not-yet", username="agent")
            await asyncio.wait_for(reflector.synced.wait(), 5)
            assert list(reflector.store) == ["default/web"] and reflector.relists == 0
            running.cancel()
        await client.close()

    run(scenario())


def test_resync_ends_a_stalled_watch_and_lists_what_it_held_back(server: FakeApiServer) -> None:
    server.apply(pod("web"))

    async def scenario(reflector: Reflector[PodView], recorder: Recorder) -> None:
        await asyncio.to_thread(server.stall_watches)
        await asyncio.to_thread(server.apply, pod("cart", ip="10.42.0.9"))
        await asyncio.to_thread(server.delete, "v1", "Pod", "default", "web")
        await asyncio.sleep(0.5)  # bookmarks every 0.2 s: a live stream would have told by now
        assert sorted(reflector.store) == ["default/web"]
        recorder.calls.clear()
        reflector.resync("a consumer knows of default/cart")
        reflector.resync("asked twice before the list: one list")
        await eventually(lambda: "default/cart" in reflector.store)
        assert sorted(reflector.store) == ["default/cart"]
        assert recorder.calls == [("delete", "default/web"), ("upsert", "default/cart")]
        await eventually(lambda: len(watches(server)) == 2)  # watching again, from the list
        assert watches(server)[1]["resourceVersion"] == [reflector.resource_version]
        assert (reflector.resyncs, reflector.relists, reflector.restarts) == (1, 1, 0)
        await asyncio.to_thread(server.apply, pod("api"))
        await eventually(lambda: "default/api" in reflector.store)  # the new watch delivers

    run(mirror(server, scenario))
    assert len(lists(server)) == 2
