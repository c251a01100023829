"""What the issuer reads and writes in the Kubernetes API: TokenReviews, pods, the trust-bundle ConfigMap.

Each class wraps a KubeClient (agent.controlplane.kube.client); only its `request` coroutine is used,
so tests may hand in anything with that method. API failures become KubeUnavailable (the issuer
answers 503 and the agent retries); a 404 (ApiError) where absence means something becomes None.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, Protocol
from urllib.parse import quote

from agent.controlplane.issuer.decisions import KubeUnavailable, PodPlacement, Review
from agent.controlplane.kube.client import ApiError

log = logging.getLogger(__name__)

TOKEN_REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"
BUNDLE_KEY = "trust-bundle.crt"
MIN_BACKOFF = 1.0
MAX_BACKOFF = 60.0


class ApiRequester(Protocol):
    """What the issuer uses of KubeClient."""

    async def request(self, method: str, path: str, *, params: dict[str, str] | None = None,
                      body: dict[str, Any] | None = None) -> dict[str, Any]: ...


async def _call(client: ApiRequester, method: str, path: str, *, params: dict[str, str] | None = None,
                body: dict[str, Any] | None = None) -> dict[str, Any]:
    """One API call's JSON object; any failure is KubeUnavailable."""
    answer = await _call_or_missing(client, method, path, params=params, body=body, missing_ok=False)
    assert answer is not None  # only a 404 with missing_ok gives None
    return answer


async def _get_if_exists(client: ApiRequester, path: str) -> dict[str, Any] | None:
    """GET one object; None if it does not exist (404)."""
    return await _call_or_missing(client, "GET", path, missing_ok=True)


async def _call_or_missing(client: ApiRequester, method: str, path: str, *, missing_ok: bool,
                           params: dict[str, str] | None = None,
                           body: dict[str, Any] | None = None) -> dict[str, Any] | None:
    try:
        answer = await client.request(method, path, params=params, body=body)
    except ApiError as exc:
        if missing_ok and exc.status == 404:
            return None
        raise KubeUnavailable(f"{method} {path}: {exc}") from exc
    except Exception as exc:  # transport, timeout, protocol: the API is unreachable for now
        raise KubeUnavailable(f"{method} {path}: {exc!r}") from exc
    if not isinstance(answer, dict):
        raise KubeUnavailable(f"{method} {path}: the answer is not a JSON object")
    return answer


class KubeTokenReviewer:
    """TokenReviewer over `POST /apis/authentication.k8s.io/v1/tokenreviews` (never cached)."""

    def __init__(self, client: ApiRequester) -> None:
        self._client = client

    async def review(self, token: str, audience: str) -> Review:
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "spec": {"token": token, "audiences": [audience]}}
        answer = await _call(self._client, "POST", TOKEN_REVIEWS, body=body)
        return review_from_status(answer.get("status"))


def review_from_status(status: object) -> Review:
    """A Review from a TokenReview's status, distrusting its shape: anything odd is not authenticated."""
    if not isinstance(status, dict):
        return Review(False, error="TokenReview returned no status")
    user = _object(status.get("user"))
    extra = _object(user.get("extra"))
    return Review(
        authenticated=status.get("authenticated") is True,
        username=_text(user.get("username")),
        extra={str(key): _texts(values) for key, values in extra.items()},
        audiences=_texts(status.get("audiences")),
        error=_text(status.get("error")),
    )


class KubePodDirectory:
    """PodDirectory over `GET /api/v1/namespaces/<ns>/pods[/<name>]` (RBAC: get/list pods)."""

    def __init__(self, client: ApiRequester) -> None:
        self._client = client

    async def get_pod(self, namespace: str, name: str) -> PodPlacement | None:
        path = f"/api/v1/namespaces/{quote(namespace, safe='')}/pods/{quote(name, safe='')}"
        pod = await _get_if_exists(self._client, path)
        return None if pod is None else placement(pod)

    async def pods_on_node(self, namespace: str, node: str, service_account: str) -> list[PodPlacement]:
        """The API server narrows the list (a busy node's pods would be a large answer)."""
        path = f"/api/v1/namespaces/{quote(namespace, safe='')}/pods"
        selector = (f"spec.nodeName={node},spec.serviceAccountName={service_account},"
                    "status.phase!=Succeeded,status.phase!=Failed")
        answer = await _call(self._client, "GET", path, params={"fieldSelector": selector})
        items = answer.get("items")
        return [placement(pod) for pod in items if isinstance(pod, dict)] if isinstance(items, list) else []


def placement(pod: dict[str, Any]) -> PodPlacement:
    metadata, spec, status = (_object(pod.get(part)) for part in ("metadata", "spec", "status"))
    return PodPlacement(
        namespace=_text(metadata.get("namespace")),
        name=_text(metadata.get("name")),
        uid=_text(metadata.get("uid")),
        node=_text(spec.get("nodeName")),
        # Admission fills in "default"; an object without it (a hand-made one) means the same.
        service_account=_text(spec.get("serviceAccountName")) or "default",
        phase=_text(status.get("phase")),
    )


async def publish_trust_bundle(client: ApiRequester, namespace: str, name: str, bundle_pem: str) -> str:
    """Make the ConfigMap's `trust-bundle.crt` equal `bundle_pem`; returns unchanged/updated/created.

    Other keys are left alone; the PUT carries the resourceVersion read, so a concurrent writer
    makes it fail (409) rather than be overwritten.
    """
    path = f"/api/v1/namespaces/{quote(namespace, safe='')}/configmaps"
    current = await _get_if_exists(client, f"{path}/{quote(name, safe='')}")
    if current is None:
        created = {"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": name, "namespace": namespace}, "data": {BUNDLE_KEY: bundle_pem}}
        await _call(client, "POST", path, body=created)
        return "created"
    data = _object(current.get("data"))
    if data.get(BUNDLE_KEY) == bundle_pem:
        return "unchanged"
    await _call(client, "PUT", f"{path}/{quote(name, safe='')}",
                body={**current, "data": {**data, BUNDLE_KEY: bundle_pem}})
    return "updated"


async def keep_trust_bundle_published(client: ApiRequester, namespace: str, name: str, bundle_pem: str, *,
                                      sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                                      jitter: Callable[[], float] = random.random) -> str:
    """publish_trust_bundle until it succeeds: a failure is logged and retried after 1 s, 2 s … 60 s."""
    failures = 0
    while True:
        try:
            outcome = await publish_trust_bundle(client, namespace, name, bundle_pem)
        except KubeUnavailable as exc:
            failures += 1
            delay = min(MAX_BACKOFF, MIN_BACKOFF * 2 ** min(failures - 1, 16)) * (0.8 + 0.4 * jitter())
            log.warning("issuer: publishing the trust bundle to ConfigMap %s/%s failed (%s); retry in %.1fs",
                        namespace, name, exc, delay)
            await sleep(delay)
            continue
        log.info("issuer: trust bundle in ConfigMap %s/%s %s", namespace, name, outcome)
        return outcome


def _object(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _texts(values: object) -> tuple[str, ...]:
    if isinstance(values, str):
        return (values,)
    return tuple(v for v in values if isinstance(v, str)) if isinstance(values, list) else ()
