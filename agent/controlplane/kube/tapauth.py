"""Who may tap, in Kubernetes mode: the cluster's RBAC decides, as for `linkerd viz tap`.

The caller sends a bearer token (`pinion tap --kubeconfig` sends its kubeconfig's). The agent
asks the API who it is (TokenReview), then whether that user may `watch` the tapped
resource's `tap` subresource in group `tap.pinion.dev` (SubjectAccessReview), e.g.

    rules: [{apiGroups: [tap.pinion.dev], resources: [pods/tap, deployments/tap,
             namespaces/tap], verbs: [watch]}]

(deploy/ has a ClusterRole `pinion-tap` with that rule). Nothing is cached: a tap is long-
lived and rare, and a revoked binding applies to the next tap. The agent's own service
account needs `create` on tokenreviews and subjectaccessreviews (deploy/ grants both).
"""

from __future__ import annotations

from typing import Any, Protocol

from agent.controlplane.kube.client import KubeClient
from agent.controlplane.kube.config import KubeConfig
from agent.core.tap import Resource
from agent.observability.tap import PLURALS, TAP_GROUP, TapCaller, TapRefused

TOKEN_REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"
ACCESS_REVIEWS = "/apis/authorization.k8s.io/v1/subjectaccessreviews"


class ApiRequester(Protocol):
    async def request(self, method: str, path: str, *, params: dict[str, str] | None = None,
                      body: dict[str, Any] | None = None) -> dict[str, Any]: ...


def access_review(user: dict[str, Any], target: Resource) -> dict[str, Any]:
    """The SubjectAccessReview asking whether `user` may tap `target`."""
    spec: dict[str, Any] = {
        "user": str(user.get("username") or ""),
        "groups": [str(group) for group in user.get("groups") or [] if isinstance(group, str)],
        "resourceAttributes": {"namespace": target.namespace, "verb": "watch",
                               "group": TAP_GROUP, "version": "v1alpha1",
                               "resource": PLURALS[target.kind], "subresource": "tap",
                               "name": target.name}}
    if user.get("uid"):
        spec["uid"] = str(user["uid"])
    if isinstance(user.get("extra"), dict):
        spec["extra"] = {str(k): [str(v) for v in values] for k, values in user["extra"].items()
                         if isinstance(values, list)}
    return {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": spec}


class KubeTapAuthorizer:
    """TokenReview, then SubjectAccessReview, through the agent's own API client."""

    def __init__(self, client: ApiRequester) -> None:
        self._client = client

    async def authorize(self, caller: TapCaller, target: Resource) -> str:
        if caller.token is None:
            raise TapRefused(401, "tap needs credentials: a bearer token Kubernetes knows "
                                  "(pinion tap --kubeconfig sends the kubeconfig's token)")
        review = await self._post(TOKEN_REVIEWS, {
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "spec": {"token": caller.token}})
        status = _object(review.get("status"))
        user = _object(status.get("user"))
        if status.get("authenticated") is not True or not user.get("username"):
            raise TapRefused(401, "tap refused: Kubernetes does not accept this token "
                                  f"({status.get('error') or 'not authenticated'})")
        username = str(user["username"])
        answer = await self._post(ACCESS_REVIEWS, access_review(user, target))
        decision = _object(answer.get("status"))
        if decision.get("allowed") is not True:
            why = decision.get("reason") or decision.get("evaluationError") or "no RBAC rule allows it"
            raise TapRefused(403, f"tap refused: {username} may not watch "
                                  f"{PLURALS[target.kind]}/tap ({TAP_GROUP}) of {target.text()} "
                                  f"in namespace {target.namespace}: {why}")
        return username

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            answer = await self._client.request("POST", path, body=body)
        except Exception as exc:  # transport, 5xx, the agent's own RBAC: not the caller's fault
            raise TapRefused(503, f"cannot check tap permissions now: {exc}") from None
        return answer if isinstance(answer, dict) else {}


def _object(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def kube_tap_authorizer(source: str) -> KubeTapAuthorizer:
    """`source`: "in-cluster" or a kubeconfig path, as Config.kubernetes."""
    return KubeTapAuthorizer(KubeClient(KubeConfig.load(None if source == "in-cluster" else source)))
