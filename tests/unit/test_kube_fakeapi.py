"""The in-test Kubernetes API server behaves like a real one where our code and kubectl can tell:
Status errors, selectors, pagination, watch semantics (replay, synthetic ADDED, bookmarks, 410 as an
ERROR event, selector transitions), token reviews, and kubectl's discovery, dry-run apply and get.

The store's pure parts (selectors, merge patch, watch transitions) are tested without sockets."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from agent.controlplane.kube.client import ApiError, Gone, KubeClient, KubeConfig
from tests.support.kubeapi import FakeApiError, FakeApiServer, RemoteFakeApi
from tests.support.kubestore import (
    RESOURCES,
    Change,
    Selector,
    StoreError,
    merge_patch,
    parse_label_selector,
    watch_event,
)

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]
POD = RESOURCES[2]


def run(coroutine: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coroutine, timeout)

    return asyncio.run(bounded())


def pod(name: str, namespace: str = "default", node: str = "node-a", phase: str = "Running",
        **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "app", "image": "app:1"}]},
            "status": {"phase": phase, "podIP": "10.42.0.9"}}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[FakeApiServer]:
    api = FakeApiServer(directory=tmp_path / "api", bookmark_interval=0.2).start()
    yield api
    api.stop()


async def call(server: FakeApiServer, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
    kube = KubeClient(KubeConfig.load(str(server.kubeconfig)), timeout=5.0)
    try:
        return await kube.request(method, path, **kwargs)
    finally:
        await kube.close()


def get(server: FakeApiServer, path: str, **params: str) -> dict[str, Any]:
    return run(call(server, "GET", path, params=params or None))


def names(listing: dict[str, Any]) -> list[str]:
    return [item["metadata"]["name"] for item in listing["items"]]


async def watch(server: FakeApiServer, path: str, params: dict[str, str], count: int,
                ) -> list[tuple[str, str | None]]:
    kube = KubeClient(KubeConfig.load(str(server.kubeconfig)), timeout=5.0)
    seen: list[tuple[str, str | None]] = []
    events: AsyncIterator[dict[str, Any]] = kube.watch(path, params)
    try:
        async with contextlib.aclosing(events):
            async for event in events:
                seen.append((event["type"], event["object"]["metadata"].get("name")))
                if len(seen) == count:
                    break
    finally:
        await kube.close()
    return seen


def raw_get(server: FakeApiServer, path: str, token: str | None) -> tuple[int, dict[str, str], bytes]:
    context = ssl.create_default_context(cadata=server.ca_pem.decode())
    connection = http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=5)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    connection.request("GET", path, headers=headers)
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, body


# --- pure parts ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("selector", "labels", "matches"), [
    ("app=web", {"app": "web"}, True),
    ("app==web", {"app": "db"}, False),
    ("app!=web", {}, True),
    ("tier in (front, back),app", {"tier": "back", "app": "x"}, True),
    ("tier notin (front)", {"tier": "front"}, False),
    ("!canary", {"canary": "1"}, False),
    ("", {"anything": "at-all"}, True),
])
def test_label_selectors(selector: str, labels: dict[str, str], matches: bool) -> None:
    assert all(term.matches(labels) for term in parse_label_selector(selector)) is matches


def test_a_malformed_selector_is_a_bad_request() -> None:
    with pytest.raises(StoreError, match="unable to parse"):
        parse_label_selector("app in (x")


def test_merge_patch_follows_rfc_7386() -> None:
    target = {"a": "b", "c": {"d": "e", "f": "g"}, "list": [1, 2]}
    patch = {"a": "z", "c": {"f": None}, "list": [3], "new": {"x": 1}}
    assert merge_patch(target, patch) == {"a": "z", "c": {"d": "e"}, "list": [3], "new": {"x": 1}}
    assert target["c"] == {"d": "e", "f": "g"}


def test_a_watch_sees_objects_enter_and_leave_its_selection() -> None:
    on_node = Selector(fields=(("spec.nodeName", True, "node-a"),))
    pending, scheduled, moved = pod("p", node=""), pod("p"), pod("p", node="node-b")
    assert watch_event(Change(5, POD, "MODIFIED", pending, scheduled), on_node) == ("ADDED", scheduled)
    assert watch_event(Change(6, POD, "MODIFIED", scheduled, scheduled), on_node) == ("MODIFIED", scheduled)
    assert watch_event(Change(7, POD, "MODIFIED", scheduled, moved), on_node) == ("DELETED", moved)
    assert watch_event(Change(8, POD, "DELETED", moved, moved), on_node) is None


# --- HTTP: errors and auth -------------------------------------------------------------------------

def test_requests_without_a_valid_token_get_a_401_status(server: FakeApiServer) -> None:
    for token in (None, "guess"):
        status, _headers, body = raw_get(server, "/api/v1/pods", token)
        assert status == 401
        assert json.loads(body) | {"metadata": {}} == {"kind": "Status", "apiVersion": "v1", "metadata": {},
                                                     "status": "Failure", "message": "Unauthorized",
                                                     "reason": "Unauthorized", "code": 401}
    assert raw_get(server, "/version", None)[0] == 200


def test_errors_are_status_objects(server: FakeApiServer) -> None:
    server.apply(pod("web"))
    cases = [
        ("GET", "/api/v1/namespaces/default/pods/nope", None, 404, "NotFound"),
        ("POST", "/api/v1/namespaces/default/pods", pod("web"), 409, "AlreadyExists"),
        ("POST", "/api/v1/namespaces/absent/pods", pod("x", "absent"), 404, "NotFound"),
        ("DELETE", "/api/v1/namespaces/default/configmaps/none", None, 404, "NotFound"),
        ("GET", "/api/v1/widgets", None, 404, "NotFound"),
        ("GET", "/api/v1/services", {"fieldSelector": "spec.nodeName=a"}, 400, "BadRequest"),
    ]
    for method, path, body, status, reason in cases:
        params = body if method == "GET" else None
        payload = body if method != "GET" else None
        with pytest.raises(ApiError) as refused:
            run(call(server, method, path, params=params, body=payload))
        assert (refused.value.status, refused.value.reason) == (status, reason), path


def test_created_objects_keep_their_status_and_get_metadata(server: FakeApiServer) -> None:
    created = server.apply(pod("web"))
    assert created["status"] == {"phase": "Running", "podIP": "10.42.0.9"}
    assert created["metadata"]["uid"] and created["metadata"]["creationTimestamp"].endswith("Z")
    replaced = server.apply({**pod("web"), "status": {"phase": "Succeeded"}})
    assert replaced["metadata"]["uid"] == created["metadata"]["uid"]
    assert int(replaced["metadata"]["resourceVersion"]) == int(created["metadata"]["resourceVersion"]) + 1
    with pytest.raises(FakeApiError, match="namespaces \"nowhere\" not found"):
        server.apply(pod("lost", "nowhere"))


def test_deleting_a_namespace_deletes_what_is_in_it(server: FakeApiServer) -> None:
    server.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
    server.apply(pod("cart", "shop"))
    server.delete("v1", "Namespace", None, "shop")
    assert names(get(server, "/api/v1/pods")) == []


# --- lists -----------------------------------------------------------------------------------------

def test_lists_filter_by_namespace_labels_and_fields(server: FakeApiServer) -> None:
    server.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
    server.apply(pod("web", app="web", tier="front"))
    server.apply(pod("db", node="node-b", phase="Pending", app="db"))
    server.apply(pod("cart", "shop", app="cart", tier="front"))
    assert names(get(server, "/api/v1/pods")) == ["db", "web", "cart"]
    assert names(get(server, "/api/v1/namespaces/shop/pods")) == ["cart"]
    assert names(get(server, "/api/v1/pods", labelSelector="tier=front,app!=cart")) == ["web"]
    assert names(get(server, "/api/v1/pods", labelSelector="app in (db,cart)")) == ["db", "cart"]
    assert names(get(server, "/api/v1/pods", labelSelector="!tier")) == ["db"]
    assert names(get(server, "/api/v1/pods", fieldSelector="spec.nodeName=node-a")) == ["web", "cart"]
    assert names(get(server, "/api/v1/pods", fieldSelector="status.phase!=Running")) == ["db"]
    assert names(get(server, "/api/v1/pods", fieldSelector="metadata.namespace=shop")) == ["cart"]
    assert names(get(server, "/api/v1/pods", fieldSelector="metadata.name==web")) == ["web"]
    listing = get(server, "/api/v1/pods")
    assert listing["kind"] == "PodList" and "kind" not in listing["items"][0]


def test_pagination_with_limit_and_continue(server: FakeApiServer) -> None:
    for index in range(7):
        server.apply(pod(f"p{index}"))
    first = get(server, "/api/v1/pods", limit="3")
    assert names(first) == ["p0", "p1", "p2"] and first["metadata"]["remainingItemCount"] == 4
    server.apply(pod("p9"))  # the later pages read on from the last key
    second = get(server, "/api/v1/pods", limit="3", **{"continue": first["metadata"]["continue"]})
    third = get(server, "/api/v1/pods", limit="3", **{"continue": second["metadata"]["continue"]})
    assert names(second) == ["p3", "p4", "p5"] and names(third) == ["p6", "p9"]
    assert "continue" not in third["metadata"]
    assert third["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
    server.compact()
    with pytest.raises(Gone):
        get(server, "/api/v1/pods", limit="3", **{"continue": first["metadata"]["continue"]})


# --- watches ---------------------------------------------------------------------------------------

def test_a_watch_replays_changes_after_its_resource_version_then_goes_live(server: FakeApiServer) -> None:
    server.apply(pod("old"))
    since = str(server.resource_version)
    server.apply(pod("new"))
    server.delete("v1", "Pod", "default", "old")

    async def scenario() -> list[tuple[str, str | None]]:
        watching = asyncio.create_task(watch(server, "/api/v1/pods", {"resourceVersion": since}, 3))
        await asyncio.sleep(0.2)
        await asyncio.to_thread(server.apply, pod("live"))
        return await watching

    assert run(scenario()) == [("ADDED", "new"), ("DELETED", "old"), ("ADDED", "live")]


def test_a_watch_from_zero_starts_with_the_current_state(server: FakeApiServer) -> None:
    server.apply(pod("a"))
    server.apply(pod("b", node="node-b"))
    events = run(watch(server, "/api/v1/pods", {"resourceVersion": "0",
                                                "fieldSelector": "spec.nodeName=node-b"}, 1))
    assert events == [("ADDED", "b")]


def test_bookmarks_carry_only_the_resource_version(server: FakeApiServer) -> None:
    async def first_bookmark() -> dict[str, Any]:
        kube = KubeClient(KubeConfig.load(str(server.kubeconfig)))
        events = kube.watch("/api/v1/pods", {"resourceVersion": str(server.resource_version),
                                             "allowWatchBookmarks": "true"})
        try:
            async with contextlib.aclosing(events):
                return await anext(events)
        finally:
            await kube.close()

    started = time.monotonic()
    event = run(first_bookmark())
    assert time.monotonic() - started < 2
    revision = str(server.resource_version)
    assert event == {"type": "BOOKMARK",
                     "object": {"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": revision}}}


def test_a_compacted_resource_version_is_a_410_error_event_in_a_200_stream(server: FakeApiServer) -> None:
    server.apply(pod("a"))
    server.compact()
    status, headers, body = raw_get(server, "/api/v1/pods?watch=1&resourceVersion=1", server.token)
    assert (status, headers["transfer-encoding"]) == (200, "chunked")
    event = json.loads(body)
    assert event["type"] == "ERROR"
    assert (event["object"]["code"], event["object"]["reason"]) == (410, "Expired")
    assert raw_get(server, f"/api/v1/pods?watch=1&resourceVersion={server.resource_version}"
                           "&timeoutSeconds=1", server.token)[2] == b""


def test_requests_are_recorded_for_assertions(server: FakeApiServer) -> None:
    get(server, "/api/v1/pods", limit="500")
    assert ("GET", "/api/v1/pods?limit=500") in server.requests


# --- token reviews ---------------------------------------------------------------------------------

def review(server: FakeApiServer, token: str, audiences: list[str] | None = None) -> dict[str, Any]:
    body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "spec": {"token": token, **({"audiences": audiences} if audiences else {})}}
    return run(call(server, "POST", "/apis/authentication.k8s.io/v1/tokenreviews", body=body))["status"]


def test_token_reviews_answer_from_the_token_table(server: FakeApiServer) -> None:
    extra = {"authentication.kubernetes.io/node-name": ["node-a"]}
    server.add_token("agent-token", username="system:serviceaccount:pinion-system:pinion-agent", uid="u-1",
                     groups=("system:serviceaccounts",), extra=extra, audiences=("pinion-issuer",))
    server.add_token("old-token", username="someone", audiences=("pinion-issuer",),
                     expires_at=time.time() - 1)
    accepted = review(server, "agent-token", ["pinion-issuer"])
    assert accepted == {"authenticated": True, "audiences": ["pinion-issuer"],
                        "user": {"username": "system:serviceaccount:pinion-system:pinion-agent", "uid": "u-1",
                                 "groups": ["system:serviceaccounts"], "extra": extra}}
    for token, audiences, error in [("agent-token", None, "is invalid for the target audiences"),
                                    ("old-token", ["pinion-issuer"], "token is expired"),
                                    ("unknown", ["pinion-issuer"], "invalid bearer token")]:
        refused = review(server, token, audiences)
        assert not refused.get("authenticated") and error in refused["error"]


# --- as a process ----------------------------------------------------------------------------------

def test_the_server_runs_as_a_process_with_http_test_hooks(tmp_path: Path) -> None:
    directory = tmp_path / "api"
    process = subprocess.Popen([sys.executable, "-m", "tests.support.kubeapi", "--listen", "127.0.0.1:0",
                                "--dir", str(directory)], cwd=REPO)
    try:
        deadline = time.monotonic() + 20
        while not (directory / "ready").exists():
            assert process.poll() is None and time.monotonic() < deadline, "the server did not get ready"
            time.sleep(0.05)
        remote = RemoteFakeApi(directory)
        remote.apply(pod("web"))
        remote.add_token("t", username="tester")
        remote.compact()
        remote.drop_watches()
        config = KubeConfig.load(str(directory / "kubeconfig"))

        async def listing() -> dict[str, Any]:
            kube = KubeClient(KubeConfig(config.server, ca_pem=config.ca_pem, token="t"))
            try:
                return await kube.request("GET", "/api/v1/pods")
            finally:
                await kube.close()

        assert names(run(listing())) == ["web"]
        remote.delete("v1", "Pod", "default", "web")
        assert ("GET", "/api/v1/pods") in remote.requests
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0


# --- kubectl ---------------------------------------------------------------------------------------

MANIFEST = """\
apiVersion: v1
kind: Namespace
metadata:
  name: pinion-system
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: pinion-agent, namespace: pinion-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: pinion-agent}
rules:
- apiGroups: [""]
  resources: [pods, namespaces, services]
  verbs: [get, list, watch]
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: pinion-agent, namespace: pinion-system}
spec:
  selector: {matchLabels: {app: pinion-agent}}
  template:
    metadata: {labels: {app: pinion-agent}}
    spec:
      serviceAccountName: pinion-agent
      hostNetwork: true
      containers: [{name: agent, image: "pinion:dev"}]
---
apiVersion: v1
kind: Service
metadata: {name: pinion-agent-metrics, namespace: pinion-system}
spec:
  clusterIP: None
  ports: [{name: admin, port: 4191}]
"""


def kubectl(server: FakeApiServer, tmp_path: Path, *args: str) -> str:
    environment = {**os.environ, "HOME": str(tmp_path)}
    result = subprocess.run(["kubectl", "--kubeconfig", str(server.kubeconfig), "--cache-dir",
                             str(tmp_path / "cache"), *args], capture_output=True, text=True, timeout=60,
                            env=environment, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_kubectl_dry_run_applies_a_multi_document_manifest(server: FakeApiServer, tmp_path: Path) -> None:
    (tmp_path / "deploy").mkdir()
    (tmp_path / "deploy" / "pinion.yaml").write_text(MANIFEST)
    server.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "pinion-system"}})
    output = kubectl(server, tmp_path, "apply", "--dry-run=client", "--validate=false", "-f",
                     str(tmp_path / "deploy"))
    assert output.splitlines() == [
        "namespace/pinion-system configured (dry run)",
        "serviceaccount/pinion-agent created (dry run)",
        "clusterrole.rbac.authorization.k8s.io/pinion-agent created (dry run)",
        "daemonset.apps/pinion-agent created (dry run)",
        "service/pinion-agent-metrics created (dry run)",
    ]
    assert names(get(server, "/api/v1/namespaces/pinion-system/serviceaccounts")) == []


def test_kubectl_get_pods_in_all_namespaces(server: FakeApiServer, tmp_path: Path) -> None:
    server.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
    server.apply(pod("web"))
    server.apply(pod("cart", "shop", node="node-b"))
    table = kubectl(server, tmp_path, "get", "pods", "-A", "-o", "wide")
    rows = [line.split() for line in table.splitlines()]
    assert rows[0][:6] == ["NAMESPACE", "NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    assert [(row[0], row[1], row[3], row[7]) for row in rows[1:]] == [
        ("default", "web", "Running", "node-a"), ("shop", "cart", "Running", "node-b")]
    web = json.loads(kubectl(server, tmp_path, "get", "pod", "web", "-o", "json"))
    assert web["status"]["podIP"] == "10.42.0.9"
