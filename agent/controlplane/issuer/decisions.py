"""The issuer's decisions (Kubernetes mode): whose CSR is signed, for which identity, and why not.

An agent proves who it is with its projected service-account token; TokenReview says whose token
it is and which node the agent runs on; the issuer then signs only identities of pods scheduled
on that node, so a stolen node can mint nothing for other nodes. Kubernetes sits behind two small
Protocols (issuer_kube.py implements them over the API); the HTTPS shell is issuer_server.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.identity.authority import IssueError, LocalSigner
from agent.identity.spiffe import ISSUER_NAMESPACE, SpiffeId

log = logging.getLogger(__name__)

NODE_NAME_KEY = "authentication.kubernetes.io/node-name"
POD_NAME_KEY = "authentication.kubernetes.io/pod-name"
POD_UID_KEY = "authentication.kubernetes.io/pod-uid"
MAX_BODY_BYTES = 64 * 1024
RESULTS = ("issued", "unauthenticated", "wrong_service_account", "not_on_node", "forbidden_namespace",
           "bad_request", "rate_limited", "error")
_FINISHED_PHASES = frozenset({"Succeeded", "Failed"})
_STATUS_RESULT = {401: "unauthenticated", 400: "bad_request"}
_UNAVAILABLE = {"error": "the Kubernetes API is unavailable; retry later", "reason": "error"}


@dataclass(frozen=True, slots=True)
class Review:
    """What TokenReview said about a token (status.authenticated, status.user, status.audiences)."""

    authenticated: bool
    username: str = ""
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    audiences: tuple[str, ...] = ()
    error: str = ""


@dataclass(frozen=True, slots=True)
class PodPlacement:
    """The few fields of a pod the issuer decides on."""

    namespace: str
    name: str
    uid: str
    node: str  # "" while unscheduled
    service_account: str
    phase: str


class KubeUnavailable(Exception):
    """The Kubernetes API could not answer (transport, 5xx, RBAC); the caller should retry later."""


class TokenReviewer(Protocol):
    async def review(self, token: str, audience: str) -> Review: ...


class PodDirectory(Protocol):
    async def get_pod(self, namespace: str, name: str) -> PodPlacement | None:
        """The pod, or None if it does not exist."""
        ...

    async def pods_on_node(self, namespace: str, node: str, service_account: str) -> list[PodPlacement]:
        """The namespace's unfinished pods running as `service_account` and scheduled on `node` (the
        caller checks each again, so an implementation may return more)."""
        ...


@dataclass(frozen=True, slots=True)
class IssuerPolicy:
    trust_domain: str
    agent_namespace: str = "pinion-system"
    agent_service_account: str = "pinion-agent"
    audience: str = "pinion-issuer"
    max_lifetime: float = 86400.0
    also_protected: tuple[str, ...] = ()  # e.g. where the trust bundle is published
    # the multicluster gateway (docs/multicluster.md): its own pod's token gets its own identity
    gateway_service_account: str = "pinion-gateway"

    @property
    def agent_username(self) -> str:
        return f"system:serviceaccount:{self.agent_namespace}:{self.agent_service_account}"

    @property
    def gateway_username(self) -> str:
        return f"system:serviceaccount:{self.agent_namespace}:{self.gateway_service_account}"

    @property
    def gateway_identity(self) -> SpiffeId:
        return SpiffeId(self.trust_domain, self.agent_namespace, self.gateway_service_account)

    @property
    def protected_namespaces(self) -> frozenset[str]:
        """The mesh's own namespaces: the issuer's (its identity lives there) and the agent's.

        Nothing in them is meshed, so no workload there needs a certificate, and one would carry
        the issuer's neighbourhood: `ns/pinion-system/sa/pinion-issuer` is the identity agents trust
        to sign for them."""
        return frozenset({ISSUER_NAMESPACE, self.agent_namespace, *self.also_protected})


@dataclass(frozen=True, slots=True)
class CertificateRequest:
    csr_pem: bytes
    identity: SpiffeId
    lifetime: float  # already capped at the policy's max_lifetime


@dataclass(frozen=True, slots=True)
class Reply:
    """One answer: HTTP status, the metric's `result` label, the JSON body, and what to log."""

    status: int
    result: str
    body: dict[str, Any]
    identity: str = ""
    node: str = ""
    detail: str = ""  # for the log only: what the caller is not told
    retry_after: int = 0  # seconds, sent as Retry-After when positive

    @property
    def message(self) -> str:
        return self.detail or str(self.body.get("error", ""))


class Refusal(Exception):
    """A request the issuer answers with an error status; `reason` goes into the body."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class CertificateIssuer:
    """Decides one `POST /v1/certificates` at a time; caches nothing between requests."""

    def __init__(self, policy: IssuerPolicy, signer: LocalSigner, reviewer: TokenReviewer,
                 pods: PodDirectory, clock: Callable[[], float] = time.time, *,
                 deadline: float = 20.0) -> None:
        """`deadline`: seconds a request may wait on the Kubernetes API before it is answered 503."""
        if signer.trust_domain != policy.trust_domain:
            raise ValueError(f"the signer's trust domain {signer.trust_domain} is not {policy.trust_domain}")
        self.policy = policy
        self._signer = signer
        self._reviewer = reviewer
        self._pods = pods
        self._clock = clock
        self._deadline = deadline

    async def handle(self, authorization: str | None, body: bytes) -> Reply:
        """The reply to a request with this Authorization header and body. Never raises."""
        identity = node = ""
        try:
            token = bearer_token(authorization)
            request = parse_request(body, self.policy)
            identity = str(request.identity)
            gateway = request.identity == self.policy.gateway_identity
            if not gateway:
                check_namespace(request.identity, self.policy)  # before TokenReview: it costs nothing
            async with asyncio.timeout(self._deadline):
                if gateway:  # its own token, its own identity: nothing else, from no one else
                    await self.check_gateway(token)
                else:
                    node = await self.caller_node(token)
                    await self.check_scheduled(request.identity, node)
            return self._issue(request, node)
        except Refusal as refusal:
            result = _STATUS_RESULT.get(refusal.status, refusal.reason)
            return Reply(refusal.status, result, {"error": str(refusal), "reason": refusal.reason},
                         identity, node)
        except (KubeUnavailable, TimeoutError) as exc:
            detail = str(exc) or f"no answer within {self._deadline:.0f}s"
            return Reply(503, "error", _UNAVAILABLE, identity, node, f"Kubernetes API: {detail}")
        except Exception as exc:  # a bug must cost one request, not the issuer
            log.exception("issuer: unexpected failure for %s", identity or "a request")
            return Reply(500, "error", {"error": "internal error", "reason": "error"}, identity, node,
                         f"internal error: {exc!r}")

    async def _reviewed(self, token: str) -> Review:
        """TokenReview's answer for a token valid for the issuer; Refusal 401 otherwise."""
        review = await self._reviewer.review(token, self.policy.audience)
        if not review.authenticated:
            raise Refusal(401, "unauthenticated",
                          f"TokenReview did not authenticate the token: {review.error or 'no reason given'}")
        if self.policy.audience not in review.audiences:
            # An empty status.audiences means the token is for the API server itself (Kubernetes docs).
            raise Refusal(401, "unauthenticated",
                          f"the token is not valid for audience {self.policy.audience}")
        return review

    async def check_gateway(self, token: str) -> None:
        """Refusal unless the token is the multicluster gateway's service account's."""
        review = await self._reviewed(token)
        if review.username != self.policy.gateway_username:
            raise Refusal(403, "wrong_service_account",
                          f"{review.username or 'the caller'} is not the gateway's service account "
                          f"({self.policy.gateway_username}): only it gets {self.policy.gateway_identity}")

    async def caller_node(self, token: str) -> str:
        """The node of the agent whose token this is; Refusal 401/403 when it is not an agent's."""
        review = await self._reviewed(token)
        if review.username != self.policy.agent_username:
            raise Refusal(403, "wrong_service_account",
                          f"{review.username or 'the caller'} is not the agent's service account "
                          f"({self.policy.agent_username})")
        node = _first(review.extra, NODE_NAME_KEY)
        return node if node else await self._node_of_agent_pod(review)

    async def _node_of_agent_pod(self, review: Review) -> str:
        """Before Kubernetes 1.30 bound tokens name the agent's pod, not its node: look the pod up."""
        pod_name = _first(review.extra, POD_NAME_KEY)
        if not pod_name:
            raise Refusal(403, "not_on_node", "the token names neither a node nor a pod (not a bound "
                                              "service-account token?), so the caller's node is unknown")
        where = f"{self.policy.agent_namespace}/{pod_name}"
        pod = await self._pods.get_pod(self.policy.agent_namespace, pod_name)
        if pod is None:
            raise Refusal(403, "not_on_node", f"the token's agent pod {where} does not exist")
        uid = _first(review.extra, POD_UID_KEY)
        if uid and pod.uid and uid != pod.uid:
            raise Refusal(403, "not_on_node",
                          f"the token's agent pod {where} was replaced (uid {uid} is gone)")
        if not pod.node:
            raise Refusal(403, "not_on_node", f"the token's agent pod {where} is not scheduled on a node")
        return pod.node

    async def check_scheduled(self, identity: SpiffeId, node: str) -> None:
        """Refusal 403 unless a live pod running as `identity` is scheduled on `node`."""
        for pod in await self._pods.pods_on_node(identity.namespace, node, identity.service_account):
            if (pod.node == node and pod.namespace == identity.namespace
                    and pod.service_account == identity.service_account
                    and pod.phase not in _FINISHED_PHASES):
                return
        raise Refusal(403, "not_on_node", f"no running pod in namespace {identity.namespace} with service "
                                          f"account {identity.service_account} is scheduled on node {node}")

    def _issue(self, request: CertificateRequest, node: str) -> Reply:
        if self._clock() >= self._signer.issuer_expires:
            return Reply(503, "error", {"error": "the issuer certificate has expired", "reason": "error"},
                         str(request.identity), node)
        try:
            issued = self._signer.sign_now(request.csr_pem, request.identity, request.lifetime)
        except IssueError as exc:
            raise Refusal(400, "bad_request", str(exc)) from None
        body = {"chain": issued.chain_pem.decode("ascii"), "notBefore": int(issued.not_before),
                "notAfter": int(issued.not_after)}
        return Reply(200, "issued", body, str(request.identity), node)


def bearer_token(authorization: str | None) -> str:
    scheme, _, token = (authorization or "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or any(c.isspace() for c in token):
        raise Refusal(401, "unauthenticated",
                      "no bearer token (Authorization: Bearer <service-account token>)")
    return token


def parse_request(body: bytes, policy: IssuerPolicy) -> CertificateRequest:
    """The body `{"csr": PEM, "identity": spiffe://…, "lifetimeSeconds": N}`, checked; Refusal 400 if not."""
    if len(body) > MAX_BODY_BYTES:
        raise _bad(f"the body is larger than {MAX_BODY_BYTES} bytes")
    try:
        fields = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; deep nesting recurses
        raise _bad("the body is not JSON") from None
    if not isinstance(fields, dict):
        raise _bad("the body is not a JSON object")
    csr, identity_text = fields.get("csr"), fields.get("identity")
    if not isinstance(csr, str) or not csr.isascii() or "-----BEGIN CERTIFICATE REQUEST-----" not in csr:
        raise _bad('"csr" must be a PEM certificate request')
    if not isinstance(identity_text, str):
        raise _bad('"identity" must be a spiffe:// URI')
    try:
        identity = SpiffeId.parse(identity_text)
    except ValueError as exc:
        raise _bad(f'"identity": {exc}') from None
    if identity.trust_domain != policy.trust_domain:
        raise _bad(f"{identity} is outside this issuer's trust domain {policy.trust_domain}")
    return CertificateRequest(csr.encode("ascii"), identity, _lifetime(fields, policy.max_lifetime))


def check_namespace(identity: SpiffeId, policy: IssuerPolicy) -> None:
    """Refusal 403 for an identity in one of the mesh's own namespaces (whoever asks)."""
    if identity.namespace in policy.protected_namespaces:
        raise Refusal(403, "forbidden_namespace", f"{identity} is in the mesh's own namespace "
                                                  f"{identity.namespace}: nothing there is issued a "
                                                  "workload certificate")


def _lifetime(fields: dict[str, Any], max_lifetime: float) -> float:
    requested = fields.get("lifetimeSeconds", max_lifetime)
    if isinstance(requested, bool) or not isinstance(requested, int | float) or not math.isfinite(requested):
        raise _bad('"lifetimeSeconds" must be a number')
    if requested <= 0:
        raise _bad('"lifetimeSeconds" must be positive')
    return float(min(requested, max_lifetime))


def _bad(message: str) -> Refusal:
    return Refusal(400, "bad_request", message)


def _first(extra: Mapping[str, tuple[str, ...]], key: str) -> str:
    values = extra.get(key, ())
    return values[0] if values else ""
