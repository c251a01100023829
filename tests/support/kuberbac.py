"""SubjectAccessReview for the in-test API server: Kubernetes RBAC evaluated over the Roles,
ClusterRoles and their bindings in the store (test-only, never in the installed package).

What it follows of the real authorizer (k8s.io/kubernetes plugin/pkg/auth/authorizer/rbac):
ClusterRoleBindings grant everywhere, RoleBindings only in their namespace (to a Role, or to
a ClusterRole's rules); subjects are User, Group, and ServiceAccount (the user
`system:serviceaccount:<ns>:<name>`); a rule matches when its apiGroups, resources (with
`resource/subresource`, `*` and `resource/*`), verbs and, if set, resourceNames all match.
Not modelled: aggregated ClusterRoles, nonResourceURLs, escalation checks.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from tests.support.kubestore import JsonObject, Selector, Store, resource_of_kind

RBAC = "rbac.authorization.k8s.io/v1"


def _objects(store: Store, kind: str, namespace: str | None) -> list[JsonObject]:
    resource = resource_of_kind(RBAC, kind)
    assert resource is not None
    return store.list(resource, Selector.parse(resource, namespace, "", ""))


def _subject_matches(subject: dict[str, Any], user: str, groups: list[str]) -> bool:
    kind, name = subject.get("kind"), subject.get("name")
    if kind == "User":
        return name == user
    if kind == "Group":
        return name in groups
    if kind == "ServiceAccount":
        return user == f"system:serviceaccount:{subject.get('namespace', '')}:{name}"
    return False


def _rules(store: Store, binding: JsonObject, namespace: str | None) -> Iterator[dict[str, Any]]:
    ref = binding.get("roleRef") or {}
    kind = ref.get("kind")
    if kind not in ("Role", "ClusterRole") or (kind == "Role" and namespace is None):
        return
    try:
        role_resource = resource_of_kind(RBAC, kind)
        assert role_resource is not None
        role = store.get(role_resource, namespace if kind == "Role" else None, str(ref.get("name")))
    except Exception:  # a binding to a missing role grants nothing
        return
    yield from role.get("rules") or []


def _rule_allows(rule: dict[str, Any], attributes: dict[str, Any]) -> bool:
    def has(values: object, wanted: str) -> bool:
        return isinstance(values, list) and (wanted in values or "*" in values)

    resource, sub = attributes.get("resource", ""), attributes.get("subresource", "")
    resources = rule.get("resources") or []
    combined = f"{resource}/{sub}" if sub else resource
    resource_ok = "*" in resources or combined in resources or (sub and f"{resource}/*" in resources)
    names = rule.get("resourceNames") or []
    return (has(rule.get("apiGroups"), attributes.get("group", "")) and bool(resource_ok)
            and has(rule.get("verbs"), attributes.get("verb", ""))
            and (not names or attributes.get("name") in names))


def access_review(store: Store, review: JsonObject) -> JsonObject:
    spec = review.get("spec") or {}
    user, groups = str(spec.get("user") or ""), list(spec.get("groups") or [])
    attributes = spec.get("resourceAttributes") or {}
    namespace = attributes.get("namespace") or None
    allowed, reason = False, ""
    bindings = [(b, None) for b in _objects(store, "ClusterRoleBinding", None)]
    if namespace:
        bindings += [(b, namespace) for b in _objects(store, "RoleBinding", namespace)]
    for binding, where in bindings:
        if not any(_subject_matches(s, user, groups) for s in binding.get("subjects") or []):
            continue
        if any(_rule_allows(rule, attributes) for rule in _rules(store, binding, where)):
            allowed = True
            kind = "RoleBinding" if where else "ClusterRoleBinding"
            reason = f'RBAC: allowed by {kind} "{binding["metadata"]["name"]}"'
            break
    status: JsonObject = {"allowed": allowed}
    if reason:
        status["reason"] = reason
    return {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
            "spec": spec, "status": status}
