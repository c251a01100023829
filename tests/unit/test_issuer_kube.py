"""What the issuer asks the Kubernetes API, and how it reads the answers: TokenReview with our
audience, pods by node, the trust-bundle ConfigMap created / left alone / updated, and API
failures turned into KubeUnavailable (or None for a pod that does not exist)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from agent.controlplane.issuer.decisions import KubeUnavailable, PodPlacement, Review
from agent.controlplane.issuer.kube import (
    KubePodDirectory,
    KubeTokenReviewer,
    keep_trust_bundle_published,
    publish_trust_bundle,
    review_from_status,
)
from agent.controlplane.kube.client import ApiError

BUNDLE = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
CONFIGMAPS = "/api/v1/namespaces/pinion-system/configmaps"


@dataclass
class FakeApi:
    """Answers (method, path) from a table; an exception in the table is raised."""

    answers: dict[tuple[str, str], list[Any]] = field(default_factory=dict)
    calls: list[tuple[str, str, dict[str, str] | None, Any]] = field(default_factory=list)

    def on(self, method: str, path: str, *answers: Any) -> None:
        self.answers.setdefault((method, path), []).extend(answers)

    async def request(self, method: str, path: str, *, params: dict[str, str] | None = None,
                      body: dict[str, Any] | None = None) -> Any:
        self.calls.append((method, path, params, body))
        queue = self.answers.get((method, path))
        if not queue:
            raise ApiError(404, "NotFound", f"{path} not found")
        answer = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_a_token_review_asks_for_our_audience_and_reads_user_and_audiences() -> None:
    api = FakeApi()
    api.on("POST", "/apis/authentication.k8s.io/v1/tokenreviews", {"status": {
        "authenticated": True, "audiences": ["pinion-issuer"],
        "user": {"username": "system:serviceaccount:pinion-system:pinion-agent", "uid": "u1",
                 "groups": ["system:serviceaccounts"],
                 "extra": {"authentication.kubernetes.io/node-name": ["n1"],
                           "authentication.kubernetes.io/pod-name": ["pinion-agent-x"]}}}})

    review = asyncio.run(KubeTokenReviewer(api).review("tok", "pinion-issuer"))

    assert api.calls[0][:2] == ("POST", "/apis/authentication.k8s.io/v1/tokenreviews")
    body = api.calls[0][3]
    assert body == {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                    "spec": {"token": "tok", "audiences": ["pinion-issuer"]}}
    assert review == Review(True, "system:serviceaccount:pinion-system:pinion-agent",
                            {"authentication.kubernetes.io/node-name": ("n1",),
                             "authentication.kubernetes.io/pod-name": ("pinion-agent-x",)},
                            ("pinion-issuer",))


@pytest.mark.parametrize("status", [None, "yes", {}, {"authenticated": "true"}, {"authenticated": 1},
                                    {"authenticated": False, "error": "token expired"}])
def test_an_odd_or_negative_review_is_not_authenticated(status: object) -> None:
    review = review_from_status(status)

    assert review.authenticated is False


def test_odd_user_fields_are_dropped_not_trusted() -> None:
    review = review_from_status({"authenticated": True, "audiences": "pinion-issuer",
                                 "user": {"username": 7, "extra": {"k": "v", "n": [1, "a"]}}})

    assert (review.username, review.audiences) == ("", ("pinion-issuer",))
    assert review.extra == {"k": ("v",), "n": ("a",)}


def test_a_failing_token_review_is_kube_unavailable() -> None:
    api = FakeApi()
    api.on("POST", "/apis/authentication.k8s.io/v1/tokenreviews", ApiError(403, "Forbidden", "RBAC"))

    with pytest.raises(KubeUnavailable, match="403 Forbidden"):
        asyncio.run(KubeTokenReviewer(api).review("tok", "pinion-issuer"))


def test_pods_of_a_service_account_on_a_node_are_listed_with_a_field_selector() -> None:
    api = FakeApi()
    api.on("GET", "/api/v1/namespaces/shop/pods", {"items": [
        {"metadata": {"namespace": "shop", "name": "cart-1", "uid": "u1"},
         "spec": {"nodeName": "n1", "serviceAccountName": "cart"}, "status": {"phase": "Running"}},
        {"metadata": {"namespace": "shop", "name": "bare"}, "spec": {"nodeName": "n1"}},
        "not a pod"]})

    pods = asyncio.run(KubePodDirectory(api).pods_on_node("shop", "n1", "cart"))

    assert api.calls[0][2] == {"fieldSelector": "spec.nodeName=n1,spec.serviceAccountName=cart,"
                                                "status.phase!=Succeeded,status.phase!=Failed"}
    assert pods == [PodPlacement("shop", "cart-1", "u1", "n1", "cart", "Running"),
                    PodPlacement("shop", "bare", "", "n1", "default", "")]


def test_a_missing_pod_is_none_and_other_failures_are_kube_unavailable() -> None:
    api = FakeApi()
    api.on("GET", "/api/v1/namespaces/pinion-system/pods/broken", ApiError(500, "InternalError", "etcd"))
    directory = KubePodDirectory(api)

    assert asyncio.run(directory.get_pod("pinion-system", "gone")) is None
    with pytest.raises(KubeUnavailable):
        asyncio.run(directory.get_pod("pinion-system", "broken"))


def test_a_transport_failure_is_kube_unavailable() -> None:
    api = FakeApi()
    api.on("GET", "/api/v1/namespaces/shop/pods", ConnectionRefusedError("refused"))

    with pytest.raises(KubeUnavailable, match="refused"):
        asyncio.run(KubePodDirectory(api).pods_on_node("shop", "n1", "cart"))


# --- the trust bundle ConfigMap ----------------------------------------------------------------


def test_an_absent_configmap_is_created() -> None:
    api = FakeApi()
    api.on("POST", CONFIGMAPS, {"kind": "ConfigMap"})

    outcome = asyncio.run(publish_trust_bundle(api, "pinion-system", "pinion-trust-bundle", BUNDLE))

    assert outcome == "created"
    assert api.calls[-1][3] == {"apiVersion": "v1", "kind": "ConfigMap",
                                "metadata": {"name": "pinion-trust-bundle", "namespace": "pinion-system"},
                                "data": {"trust-bundle.crt": BUNDLE}}


def test_an_equal_bundle_is_left_alone() -> None:
    api = FakeApi()
    api.on("GET", f"{CONFIGMAPS}/pinion-trust-bundle", {"data": {"trust-bundle.crt": BUNDLE}})

    outcome = asyncio.run(publish_trust_bundle(api, "pinion-system", "pinion-trust-bundle", BUNDLE))

    assert outcome == "unchanged"
    assert [call[0] for call in api.calls] == ["GET"]


def test_a_different_bundle_is_replaced_keeping_other_keys_and_the_resource_version() -> None:
    api = FakeApi()
    current = {"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "pinion-trust-bundle", "namespace": "pinion-system",
                            "resourceVersion": "7"},
               "data": {"trust-bundle.crt": "old", "note": "kept"}}
    api.on("GET", f"{CONFIGMAPS}/pinion-trust-bundle", current)
    api.on("PUT", f"{CONFIGMAPS}/pinion-trust-bundle", {})

    assert asyncio.run(publish_trust_bundle(api, "pinion-system", "pinion-trust-bundle", BUNDLE)) == "updated"
    put = api.calls[-1][3]
    assert put["metadata"]["resourceVersion"] == "7"
    assert put["data"] == {"trust-bundle.crt": BUNDLE, "note": "kept"}


def test_publishing_is_retried_with_backoff_until_it_works(caplog: pytest.LogCaptureFixture) -> None:
    api = FakeApi()
    path = f"{CONFIGMAPS}/pinion-trust-bundle"
    api.on("GET", path, ApiError(503, "ServiceUnavailable", ""), ApiError(503, "ServiceUnavailable", ""),
           ConnectionResetError("reset"), {"data": {"trust-bundle.crt": BUNDLE}})
    delays: list[float] = []

    async def sleep(seconds: float) -> None:
        delays.append(seconds)

    outcome = asyncio.run(keep_trust_bundle_published(api, "pinion-system", "pinion-trust-bundle", BUNDLE,
                                                      sleep=sleep, jitter=lambda: 0.5))

    assert outcome == "unchanged"
    assert delays == [1.0, 2.0, 4.0]
    assert caplog.text.count("retry in") == 3
