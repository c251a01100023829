"""The issuer's decisions, with Kubernetes played by two in-memory fakes: an agent's token gets a
certificate only for an identity of a live pod on that agent's own node; everything else is
refused with the status and reason of the contract (docs/kubernetes.md), and never crashes."""

from __future__ import annotations

import asyncio
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.controlplane.issuer.decisions import (
    NODE_NAME_KEY,
    POD_NAME_KEY,
    POD_UID_KEY,
    CertificateIssuer,
    IssuerPolicy,
    KubeUnavailable,
    PodPlacement,
    Reply,
    Review,
)
from agent.identity.authority import LocalSigner
from agent.identity.crypto import cert_info, generate_key, make_csr
from agent.identity.files import init_identity_dir, split_pem_certificates
from agent.identity.spiffe import SpiffeId

AGENT = "system:serviceaccount:pinion-system:pinion-agent"
CART = SpiffeId("cluster.local", "shop", "cart")
WEB = SpiffeId("cluster.local", "shop", "web")


def pod(name: str, node: str, service_account: str = "cart", namespace: str = "shop",
        phase: str = "Running", uid: str = "") -> PodPlacement:
    return PodPlacement(namespace, name, uid or f"uid-{name}", node, service_account, phase)


@dataclass
class FakeReviews:
    """TokenReview: answers from a table, as the API server would (unknown = not authenticated)."""

    table: dict[str, Review] = field(default_factory=dict)
    asked: list[tuple[str, str]] = field(default_factory=list)
    failure: Exception | None = None

    def agent(self, token: str, *, node: str = "", pod_name: str = "", pod_uid: str = "",
              username: str = AGENT, audiences: tuple[str, ...] = ("pinion-issuer",)) -> None:
        extra = {key: (value,) for key, value in
                 ((NODE_NAME_KEY, node), (POD_NAME_KEY, pod_name), (POD_UID_KEY, pod_uid)) if value}
        self.table[token] = Review(True, username, extra, audiences)

    async def review(self, token: str, audience: str) -> Review:
        self.asked.append((token, audience))
        if self.failure is not None:
            raise self.failure
        review = self.table.get(token)
        if review is None:
            return Review(False, error="[invalid bearer token, token lookup failed]")
        if review.audiences and audience not in review.audiences:
            return Review(False, error="[invalid bearer token, token audiences is invalid]")
        return review


@dataclass
class FakePods:
    pods: list[PodPlacement] = field(default_factory=list)

    async def get_pod(self, namespace: str, name: str) -> PodPlacement | None:
        return next((p for p in self.pods if (p.namespace, p.name) == (namespace, name)), None)

    async def pods_on_node(self, namespace: str, node: str, service_account: str) -> list[PodPlacement]:
        """Only the node's pods, but every service account and phase: the issuer must filter again."""
        return [p for p in self.pods if p.namespace == namespace and p.node == node]


@dataclass
class World:
    issuer: CertificateIssuer
    reviews: FakeReviews
    pods: FakePods
    identity_dir: Path

    def ask(self, body: bytes | dict[str, object], token: str | None = "agent-n1") -> Reply:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        authorization = None if token is None else f"Bearer {token}"
        return asyncio.run(self.issuer.handle(authorization, raw))


def csr_body(identity: SpiffeId = CART, asks_for: SpiffeId | None = None,
             lifetime: float = 86400) -> dict[str, object]:
    csr = make_csr(generate_key(), str(asks_for or identity))
    return {"csr": csr.decode(), "identity": str(identity), "lifetimeSeconds": lifetime}


@pytest.fixture
def world(tmp_path: Path) -> World:
    init_identity_dir(tmp_path / "identity")
    signer = LocalSigner.from_dir(tmp_path / "identity")
    reviews, pods = FakeReviews(), FakePods()
    reviews.agent("agent-n1", node="n1")
    pods.pods += [pod("cart-1", "n1"), pod("web-1", "n2", "web")]
    policy = IssuerPolicy("cluster.local", max_lifetime=3600)
    return World(CertificateIssuer(policy, signer, reviews, pods), reviews, pods, tmp_path / "identity")


# --- issued -----------------------------------------------------------------------------------


def test_a_pod_on_the_callers_node_gets_a_chain_that_openssl_verifies(world: World, tmp_path: Path) -> None:
    reply = world.ask(csr_body(CART))

    assert (reply.status, reply.result, reply.identity, reply.node) == (200, "issued", str(CART), "n1")
    leaf, issuer = split_pem_certificates(reply.body["chain"].encode())
    assert cert_info(leaf).uri_sans == (str(CART),)
    assert issuer == (world.identity_dir / "issuer.crt").read_bytes()
    (tmp_path / "chain.pem").write_text(reply.body["chain"])
    verified = subprocess.run(["openssl", "verify", "-x509_strict", "-CAfile",
                               str(world.identity_dir / "trust-bundle.crt"), "-untrusted",
                               str(tmp_path / "chain.pem"), str(tmp_path / "chain.pem")],
                              capture_output=True, text=True, timeout=20)
    assert verified.returncode == 0, verified.stderr
    assert world.reviews.asked == [("agent-n1", "pinion-issuer")]


def test_the_lifetime_is_capped_at_max_lifetime(world: World) -> None:
    reply = world.ask(csr_body(CART, lifetime=10 * 86400))

    assert reply.status == 200
    lifetime = reply.body["notAfter"] - reply.body["notBefore"]
    assert 3600 <= lifetime <= 3600 + 60 + 1  # backdated a minute; whole seconds, rounded outwards


def test_without_node_name_the_agent_pod_names_the_node(world: World) -> None:
    world.reviews.agent("agent-old", pod_name="pinion-agent-x", pod_uid="uid-pinion-agent-x")
    world.pods.pods.append(pod("pinion-agent-x", "n1", "pinion-agent", namespace="pinion-system"))

    reply = world.ask(csr_body(CART), token="agent-old")

    assert (reply.status, reply.node) == (200, "n1")


# --- 401 unauthenticated ----------------------------------------------------------------------


@pytest.mark.parametrize("authorization", [None, "", "Bearer", "Bearer ", "Basic dXNlcjpwdw==", "agent-n1",
                                           "Bearer two words"])
def test_no_bearer_token_is_401_without_asking_kubernetes(world: World, authorization: str | None) -> None:
    body = json.dumps(csr_body(CART)).encode()
    reply = asyncio.run(world.issuer.handle(authorization, body))

    assert (reply.status, reply.result, reply.body["reason"]) == (401, "unauthenticated", "unauthenticated")
    assert world.reviews.asked == []


def test_an_unknown_or_expired_token_is_401_with_tokenreviews_reason(world: World) -> None:
    reply = world.ask(csr_body(CART), token="expired-or-unknown")

    assert (reply.status, reply.result) == (401, "unauthenticated")
    assert "token lookup failed" in reply.body["error"]


def test_a_token_for_another_audience_is_401(world: World) -> None:
    world.reviews.agent("for-the-api-server", node="n1", audiences=("https://kubernetes.default.svc",))

    reply = world.ask(csr_body(CART), token="for-the-api-server")

    assert (reply.status, reply.result) == (401, "unauthenticated")


def test_an_authenticated_review_without_our_audience_is_401(world: World) -> None:
    """Kubernetes: empty status.audiences means the token is valid for the API server, not for us."""
    world.reviews.agent("audience-unaware", node="n1", audiences=())

    reply = world.ask(csr_body(CART), token="audience-unaware")

    assert (reply.status, reply.result) == (401, "unauthenticated")
    assert "audience pinion-issuer" in reply.body["error"]


# --- 403 --------------------------------------------------------------------------------------


def test_another_service_accounts_token_is_403_wrong_service_account(world: World) -> None:
    world.reviews.agent("cart-token", node="n1", username="system:serviceaccount:shop:cart")

    reply = world.ask(csr_body(CART), token="cart-token")

    assert (reply.status, reply.result, reply.body["reason"]) == (403, "wrong_service_account",
                                                                   "wrong_service_account")
    assert "system:serviceaccount:shop:cart" in reply.body["error"]


def test_a_pod_on_another_node_is_403_not_on_node(world: World) -> None:
    reply = world.ask(csr_body(WEB))  # web-1 runs on n2; the caller is n1's agent

    assert (reply.status, reply.result, reply.body["reason"]) == (403, "not_on_node", "not_on_node")
    assert "service account web is scheduled on node n1" in reply.body["error"]


def test_another_service_account_on_the_same_node_does_not_count(world: World) -> None:
    world.pods.pods = [pod("cart-1", "n1", service_account="default")]

    assert world.ask(csr_body(CART)).result == "not_on_node"


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_finished_pods_are_ignored(world: World, phase: str) -> None:
    world.pods.pods = [pod("cart-job", "n1", phase=phase)]

    assert world.ask(csr_body(CART)).result == "not_on_node"


def test_a_pending_pod_already_scheduled_counts(world: World) -> None:
    world.pods.pods = [pod("cart-2", "n1", phase="Pending")]

    assert world.ask(csr_body(CART)).status == 200


def test_a_token_naming_neither_node_nor_pod_is_403(world: World) -> None:
    world.reviews.agent("legacy-secret-token")

    reply = world.ask(csr_body(CART), token="legacy-secret-token")

    assert (reply.status, reply.result) == (403, "not_on_node")
    assert "neither a node nor a pod" in reply.body["error"]


@pytest.mark.parametrize(("agent_pod", "says"), [
    (None, "does not exist"),
    (pod("pinion-agent-x", "", "pinion-agent", namespace="pinion-system"), "not scheduled"),
    (pod("pinion-agent-x", "n1", "pinion-agent", namespace="pinion-system", uid="new-uid"), "was replaced"),
])
def test_the_agent_pod_must_exist_be_the_same_and_be_scheduled(world: World, agent_pod: PodPlacement | None,
                                                               says: str) -> None:
    world.reviews.agent("agent-old", pod_name="pinion-agent-x", pod_uid="uid-pinion-agent-x")
    if agent_pod is not None:
        world.pods.pods.append(agent_pod)

    reply = world.ask(csr_body(CART), token="agent-old")

    assert (reply.status, reply.result) == (403, "not_on_node")
    assert says in reply.body["error"]


# --- 400 bad_request --------------------------------------------------------------------------


def test_a_csr_asking_for_another_identity_is_400(world: World) -> None:
    reply = world.ask(csr_body(CART, asks_for=WEB))

    assert (reply.status, reply.result, reply.body["reason"]) == (400, "bad_request", "bad_request")
    assert "CSR asks for spiffe://cluster.local/ns/shop/sa/web" in reply.body["error"]


def test_a_foreign_trust_domain_is_400_before_any_api_call(world: World) -> None:
    body = csr_body(SpiffeId("evil.org", "shop", "cart"))

    reply = world.ask(body)

    assert (reply.status, reply.result) == (400, "bad_request")
    assert "outside this issuer's trust domain" in reply.body["error"]
    assert world.reviews.asked == []


@pytest.mark.parametrize(("policy", "namespace", "refused"), [
    (IssuerPolicy("cluster.local"), "pinion-system", True),  # the issuer's own identity lives there
    (IssuerPolicy("cluster.local"), "shop", False),
    (IssuerPolicy("cluster.local", agent_namespace="mesh"), "mesh", True),  # the agents' namespace too
    (IssuerPolicy("cluster.local", agent_namespace="mesh"), "pinion-system", True),
    (IssuerPolicy("cluster.local", also_protected=("bundles",)), "bundles", True),
    (IssuerPolicy("cluster.local"), "pinion-system-apps", False),  # a name, not a prefix
])
def test_the_mesh_namespaces_are_protected(policy: IssuerPolicy, namespace: str, refused: bool) -> None:
    assert (namespace in policy.protected_namespaces) is refused


def test_a_pod_in_the_mesh_namespace_is_403_before_any_api_call(world: World) -> None:
    issuer_like = SpiffeId("cluster.local", "pinion-system", "pinion-issuer")
    world.pods.pods.append(pod("sneaky", "n1", "pinion-issuer", namespace="pinion-system"))

    reply = world.ask(csr_body(issuer_like))

    assert (reply.status, reply.result, reply.body["reason"]) == (403, "forbidden_namespace",
                                                                  "forbidden_namespace")
    assert "mesh's own namespace pinion-system" in reply.body["error"]
    assert reply.identity == str(issuer_like)
    assert world.reviews.asked == []  # refused before TokenReview


def _garbage_csr() -> dict[str, object]:
    return {"csr": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            "identity": str(CART)}


@pytest.mark.parametrize("body", [
    b"", b"\xff\xfe\x00garbage", b"not json", b"[1, 2]", b"null", b"[" * 60000,
    {"identity": str(CART)},
    {"csr": 42, "identity": str(CART)},
    {"csr": "hello", "identity": str(CART)},
    {"csr": "-----BEGIN CERTIFICATE REQUEST-----", "identity": "spiffe://cluster.local/ns/shop"},
    {"csr": "-----BEGIN CERTIFICATE REQUEST-----", "identity": ["x"]},
    {"csr": "-----BEGIN CERTIFICATE REQUEST-----", "identity": str(CART), "lifetimeSeconds": -5},
    {"csr": "-----BEGIN CERTIFICATE REQUEST-----", "identity": str(CART), "lifetimeSeconds": True},
    {"csr": "-----BEGIN CERTIFICATE REQUEST-----", "identity": str(CART), "lifetimeSeconds": "86400"},
    b'{"csr": "-----BEGIN CERTIFICATE REQUEST-----", "identity": "spiffe://cluster.local/ns/a/sa/b", '
    b'"lifetimeSeconds": 1e999}',
    b"{" + b" " * (64 * 1024) + b"}",
])
def test_malformed_bodies_are_400_before_any_api_call(world: World, body: bytes | dict[str, object]) -> None:
    reply = world.ask(body)

    assert (reply.status, reply.result, reply.body["reason"]) == (400, "bad_request", "bad_request")
    assert world.reviews.asked == []


def test_a_csr_that_does_not_parse_is_400_after_authorization(world: World) -> None:
    reply = world.ask(_garbage_csr())

    assert (reply.status, reply.result) == (400, "bad_request")
    assert "CSR rejected" in reply.body["error"]


# --- errors -----------------------------------------------------------------------------------


def test_kubernetes_unavailable_is_503_error_with_the_detail_kept_for_the_log(world: World) -> None:
    world.reviews.failure = KubeUnavailable("POST /apis/...: connection refused")

    reply = world.ask(csr_body(CART))

    assert (reply.status, reply.result, reply.body["reason"]) == (503, "error", "error")
    assert reply.body["error"] == "the Kubernetes API is unavailable; retry later"
    assert "connection refused" in reply.message


def test_a_kubernetes_api_that_does_not_answer_is_503_after_the_deadline(world: World) -> None:
    class Hanging(FakeReviews):
        async def review(self, token: str, audience: str) -> Review:
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

    signer = LocalSigner.from_dir(world.identity_dir)
    world.issuer = CertificateIssuer(world.issuer.policy, signer, Hanging(), world.pods, deadline=0.05)

    reply = world.ask(csr_body(CART))

    assert (reply.status, reply.result) == (503, "error")
    assert "no answer within" in reply.message


def test_a_bug_costs_one_request_not_the_issuer(world: World, caplog: pytest.LogCaptureFixture) -> None:
    world.reviews.failure = ZeroDivisionError("oops")

    reply = world.ask(csr_body(CART))

    assert (reply.status, reply.result, reply.body["error"]) == (500, "error", "internal error")
    assert "ZeroDivisionError" in caplog.text
    world.reviews.failure = None
    assert world.ask(csr_body(CART)).status == 200


def test_an_expired_issuer_is_503_not_a_bad_request(world: World) -> None:
    world.issuer._clock = lambda: 4_000_000_000.0

    reply = world.ask(csr_body(CART))

    assert (reply.status, reply.result) == (503, "error")
    assert "expired" in reply.body["error"]


def test_the_signer_must_be_in_the_policys_trust_domain(world: World) -> None:
    signer = LocalSigner.from_dir(world.identity_dir)

    with pytest.raises(ValueError, match="trust domain"):
        CertificateIssuer(IssuerPolicy("other.org"), signer, world.reviews, world.pods)


# --- the multicluster gateway (docs/multicluster.md) -------------------------------------------

GATEWAY = SpiffeId("cluster.local", "pinion-system", "pinion-gateway")


def test_the_gateways_own_token_gets_the_gateways_identity_and_nothing_else(world: World) -> None:
    world.reviews.agent("gateway", username="system:serviceaccount:pinion-system:pinion-gateway")

    issued = world.ask(csr_body(GATEWAY), token="gateway")
    assert (issued.status, issued.result, issued.identity) == (200, "issued", str(GATEWAY))
    assert world.ask(csr_body(CART), token="gateway").result == "wrong_service_account"
    other = SpiffeId("cluster.local", "pinion-system", "pinion-agent")
    assert world.ask(csr_body(other), token="gateway").result == "forbidden_namespace"


def test_no_one_else_gets_the_gateways_identity(world: World) -> None:
    world.reviews.agent("web", username="system:serviceaccount:shop:web")

    assert world.ask(csr_body(GATEWAY)).result == "wrong_service_account"  # an agent's token
    assert world.ask(csr_body(GATEWAY), token="web").result == "wrong_service_account"
    assert world.ask(csr_body(GATEWAY), token="nobody").result == "unauthenticated"
