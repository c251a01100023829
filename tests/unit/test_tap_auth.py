"""Who may tap, through the real admin endpoint on loopback. Kubernetes mode: the agent asks
the in-test API server (TokenReview, then SubjectAccessReview answered from stored RBAC);
allowed, refused and credential-less callers. Standalone: the node or the token holder. A
refused caller gets a status and a reason, and no event; bad requests and a full hub too."""

from __future__ import annotations

import asyncio
import http.client
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.controlplane.kube.tapauth import kube_tap_authorizer
from agent.core.tap import Resource, TapHub
from agent.observability.admin import AdminServer
from agent.observability.exposition import CollectorRegistry
from agent.observability.tap import NodeOrToken, TapAuthorizer, TapCaller, TapEndpoint, TapRefused
from tests.support.kubeapi import FakeApiServer

EVENT = {"kind": "request", "direction": "inbound", "namespace": "shop", "pod": "web-1",
         "owner_kind": "deployment", "owner_name": "web", "method": "GET", "path": "/secret-url",
         "authority": "web", "src_namespace": "", "src_pod": "", "src_owner_kind": "",
         "src_owner_name": "", "dst_namespace": "", "dst_pod": "", "dst_owner_kind": "",
         "dst_owner_name": ""}


class Agent:
    """An admin endpoint with a tap hub, on its own event loop thread."""

    def __init__(self, authorizer: TapAuthorizer, max_taps: int = 4) -> None:
        self.loop = asyncio.new_event_loop()
        self.hub = TapHub(time.monotonic, max_taps=max_taps)
        self.responses: list[http.client.HTTPResponse] = []
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.endpoint = TapEndpoint(self.hub, authorizer)
        self.server = AdminServer("127.0.0.1", 0, CollectorRegistry(), lambda: [], tap=self.endpoint)
        self.call(self.server.start())

    def call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(10)

    def publish(self) -> None:
        self.loop.call_soon_threadsafe(self.hub.publish, dict(EVENT))

    def tap(self, query: str, token: str | None = None) -> tuple[int, http.client.HTTPResponse]:
        host, port = self.server.address
        connection = http.client.HTTPConnection(host, port, timeout=5)
        connection.request("GET", "/tap?" + query,
                           headers={"Authorization": f"Bearer {token}"} if token else {})
        response = connection.getresponse()
        self.responses.append(response)
        return response.status, response

    def close(self) -> None:
        self.call(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()
        for response in self.responses:
            response.close()


@pytest.fixture
def api(tmp_path: Path) -> Iterator[FakeApiServer]:
    server = FakeApiServer(directory=tmp_path / "api").start()
    server.add_token("alice-token", username="alice", groups=("system:authenticated",))
    server.add_token("bob-token", username="bob", groups=("system:authenticated",))
    server.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
    server.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                  "metadata": {"name": "pinion-tap"},
                  "rules": [{"apiGroups": ["tap.pinion.dev"], "verbs": ["watch"],
                             "resources": ["pods/tap", "deployments/tap", "namespaces/tap"]}]})
    server.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                  "metadata": {"name": "alice-taps-shop", "namespace": "shop"},
                  "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                              "name": "pinion-tap"},
                  "subjects": [{"kind": "User", "name": "alice"}]})
    yield server
    server.stop()


def kube_agent(api: FakeApiServer) -> Agent:
    return Agent(kube_tap_authorizer(str(api.kubeconfig)))


def test_kubernetes_rbac_lets_a_bound_user_tap_its_namespace(api: FakeApiServer) -> None:
    agent = kube_agent(api)
    try:
        status, response = agent.tap("resource=deploy/web&namespace=shop", "alice-token")
        assert status == 200 and response.headers["Content-Type"] == "application/x-ndjson"
        assert agent.hub.taps == 1
        agent.publish()
        assert b'"path":"/secret-url"' in response.readline()
        assert ("POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews") in api.requests
    finally:
        agent.close()


@pytest.mark.parametrize(("query", "token", "status", "reason"), [
    ("resource=deploy/web&namespace=default", "alice-token", 403,
     "tap refused: alice may not watch deployments/tap (tap.pinion.dev) of deployment/web in "
     "namespace default: no RBAC rule allows it"),
    ("resource=deploy/web&namespace=shop", "bob-token", 403, "tap refused: bob may not watch"),
    ("resource=deploy/web&namespace=shop", None, 401, "tap needs credentials"),
    ("resource=deploy/web&namespace=shop", "forged", 401,
     "tap refused: Kubernetes does not accept this token ([invalid bearer token])"),
])
def test_kubernetes_refuses_with_a_reason_and_shows_nothing(
        api: FakeApiServer, query: str, token: str | None, status: int, reason: str) -> None:
    agent = kube_agent(api)
    try:
        got, response = agent.tap(query, token)
        body = response.read().decode()
        assert got == status and body.startswith(reason), body
        assert agent.hub.taps == 0 and "/secret-url" not in body
    finally:
        agent.close()


def test_standalone_node_callers_and_token_holders_only() -> None:
    authorizer = NodeOrToken("op-token")
    target = Resource.parse("pod/web-1", "shop")

    async def decide(caller: TapCaller) -> str:
        return await authorizer.authorize(caller, target)

    assert asyncio.run(decide(TapCaller(True, None, "127.0.0.1"))) == "this node"
    assert asyncio.run(decide(TapCaller(False, "op-token", "10.0.0.9"))) == "token holder"
    for caller, status in [(TapCaller(False, None, "10.0.0.9"), 401),
                           (TapCaller(False, "guess", "10.0.0.9"), 403)]:
        with pytest.raises(TapRefused) as refused:
            asyncio.run(decide(caller))
        assert refused.value.status == status
    with pytest.raises(TapRefused):  # no token configured: none is accepted
        asyncio.run(NodeOrToken(None).authorize(TapCaller(False, "", "10.0.0.9"), target))


def local_agent(max_taps: int = 4) -> Agent:
    return Agent(NodeOrToken(None), max_taps)


@pytest.mark.parametrize(("query", "reason"), [
    ("", "resource is required"),
    ("resource=svc/web", "cannot tap 'svc/web'"),
    ("resource=pod/a&max_rps=-1", "max_rps must be in"),
    ("resource=pod/a&max_rps=lots", "max_rps must be a number"),
    ("resource=pod/a&path=nope", "path must start with '/'"),
    ("resource=pod/a&colour=red", "unknown parameter(s): colour"),
    ("resource=pod/a&to=pod/b&from=pod/c", "to and from exclude each other"),
])
def test_bad_tap_requests_get_a_clear_400(query: str, reason: str) -> None:
    agent = local_agent()
    try:
        status, response = agent.tap(query)
        assert status == 400 and reason in response.read().decode()
    finally:
        agent.close()


def test_taps_beyond_the_cap_are_refused_and_a_closed_tap_frees_its_place() -> None:
    agent = local_agent(max_taps=2)
    try:
        first = agent.tap("resource=ns/shop")
        second = agent.tap("resource=ns/shop")
        assert (first[0], second[0]) == (200, 200)
        status, response = agent.tap("resource=ns/shop")
        assert status == 429 and "already serves 2 taps" in response.read().decode()
        first[1].close()
        deadline = time.monotonic() + 5
        while agent.hub.taps != 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert agent.hub.taps == 1 and agent.tap("resource=ns/shop")[0] == 200
    finally:
        agent.close()


def test_kubeconfig_discovery_finds_the_agents_and_the_token_to_tap_with(api: FakeApiServer) -> None:
    from agent.viz.cluster_checks import cluster_agents

    api.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "pinion-system"}})
    for name, host in [("pinion-agent-a", "192.168.1.21"), ("pinion-agent-b", "192.168.1.22")]:
        api.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": name, "namespace": "pinion-system",
            "labels": {"app.kubernetes.io/name": "pinion-agent"}},
            "spec": {"nodeName": name}, "status": {"hostIP": host}})
    agents, token = cluster_agents(str(api.kubeconfig), timeout=5.0)
    assert agents == ["192.168.1.21:4191", "192.168.1.22:4191"]
    assert token == api.token
