"""Storage of the in-test Kubernetes API server: typed objects, resourceVersions, history, watchers.

No I/O: the server (tests/support/kubeapi.py) calls it from one event-loop thread. Objects are never
mutated once stored (a change stores a new dict), so lists and watch events can share them.
Label and field selectors, JSON merge patch and continue tokens live here too, as pure functions.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

JsonObject = dict[str, Any]

CRUD = ("create", "delete", "get", "list", "patch", "update", "watch")


class StoreError(Exception):
    """A refusal the server turns into a Status: HTTP code, reason, message, and details."""

    def __init__(self, code: int, reason: str, message: str, details: JsonObject | None = None) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details or {}


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    kind: str
    plural: str
    namespaced: bool
    verbs: tuple[str, ...] = CRUD
    short_names: tuple[str, ...] = ()

    @property
    def group_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> tuple[str, str]:
        return self.group_version, self.plural


RESOURCES: tuple[Resource, ...] = (
    Resource("", "v1", "Namespace", "namespaces", False, short_names=("ns",)),
    Resource("", "v1", "Node", "nodes", False, short_names=("no",)),
    Resource("", "v1", "Pod", "pods", True, short_names=("po",)),
    Resource("", "v1", "Service", "services", True, short_names=("svc",)),
    Resource("", "v1", "Endpoints", "endpoints", True, short_names=("ep",)),
    Resource("", "v1", "ConfigMap", "configmaps", True, short_names=("cm",)),
    Resource("", "v1", "Secret", "secrets", True),
    Resource("", "v1", "ServiceAccount", "serviceaccounts", True, short_names=("sa",)),
    Resource("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices", True),
    Resource("apps", "v1", "DaemonSet", "daemonsets", True, short_names=("ds",)),
    Resource("apps", "v1", "Deployment", "deployments", True, short_names=("deploy",)),
    Resource("batch", "v1", "Job", "jobs", True),
    Resource("networking.k8s.io", "v1", "NetworkPolicy", "networkpolicies", True, short_names=("netpol",)),
    Resource("rbac.authorization.k8s.io", "v1", "ClusterRole", "clusterroles", False),
    Resource("rbac.authorization.k8s.io", "v1", "ClusterRoleBinding", "clusterrolebindings", False),
    Resource("rbac.authorization.k8s.io", "v1", "Role", "roles", True),
    Resource("rbac.authorization.k8s.io", "v1", "RoleBinding", "rolebindings", True),
    Resource("authentication.k8s.io", "v1", "TokenReview", "tokenreviews", False, verbs=("create",)),
)
STORED = tuple(resource for resource in RESOURCES if "get" in resource.verbs)
INITIAL_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


def resource_for(group_version: str, plural: str) -> Resource | None:
    return next((r for r in RESOURCES if r.group_version == group_version and r.plural == plural), None)


def resource_of_kind(api_version: str, kind: str) -> Resource | None:
    return next((r for r in RESOURCES if r.group_version == api_version and r.kind == kind), None)


# --- selectors ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str  # "=", "!=", "in", "notin", "exists", "!"
    values: frozenset[str] = frozenset()

    def matches(self, labels: dict[str, str]) -> bool:
        present = self.key in labels
        if self.operator == "exists":
            return present
        if self.operator == "!":
            return not present
        if self.operator in ("=", "in"):
            return present and labels[self.key] in self.values
        return not present or labels[self.key] not in self.values  # "!=", "notin"


_SET_TERM = re.compile(r"^\s*([^\s!=()]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")
_EQUALITY_TERM = re.compile(r"^\s*([^\s!=]+)\s*(==|=|!=)\s*([^\s]*)\s*$")
_EXISTS_TERM = re.compile(r"^\s*(!?)\s*([^\s!=()]+)\s*$")


def parse_label_selector(text: str) -> list[Requirement]:
    """`a=b`, `a==b`, `a!=b`, `a in (x,y)`, `a notin (x)`, `a`, `!a`, joined by commas."""
    requirements = []
    for term in _split_terms(text):
        if match := _SET_TERM.match(term):
            values = frozenset(v.strip() for v in match[3].split(",") if v.strip())
            requirements.append(Requirement(match[1], match[2], values))
        elif match := _EQUALITY_TERM.match(term):
            operator = "!=" if match[2] == "!=" else "="
            requirements.append(Requirement(match[1], operator, frozenset([match[3]])))
        elif match := _EXISTS_TERM.match(term):
            requirements.append(Requirement(match[2], "!" if match[1] else "exists"))
        else:
            raise StoreError(400, "BadRequest", f"unable to parse requirement: {term.strip()!r}")
    return requirements


def _split_terms(text: str) -> list[str]:
    """Split on commas outside parentheses."""
    terms, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            terms.append(text[start:index])
            start = index + 1
    terms.append(text[start:])
    return [term for term in terms if term.strip()]


FIELDS: dict[str, Callable[[JsonObject], str]] = {
    "metadata.name": lambda obj: str(obj.get("metadata", {}).get("name", "")),
    "metadata.namespace": lambda obj: str(obj.get("metadata", {}).get("namespace", "")),
    "spec.nodeName": lambda obj: str(obj.get("spec", {}).get("nodeName", "")),
    "spec.serviceAccountName": lambda obj: str(obj.get("spec", {}).get("serviceAccountName", "")),
    "status.phase": lambda obj: str(obj.get("status", {}).get("phase", "")),
    "status.podIP": lambda obj: str(obj.get("status", {}).get("podIP", "")),
}
_POD_ONLY_FIELDS = {"spec.nodeName", "spec.serviceAccountName", "status.phase", "status.podIP"}


def parse_field_selector(text: str, resource: Resource) -> list[tuple[str, bool, str]]:
    """(field, equal?, value) terms; fields this kind does not support are a 400, as on a real server."""
    terms = []
    for term in _split_terms(text):
        match = _EQUALITY_TERM.match(term)
        if not match:
            raise StoreError(400, "BadRequest", f"invalid field selector: {term.strip()!r}")
        name = match[1]
        if name not in FIELDS or (name in _POD_ONLY_FIELDS and resource.kind != "Pod"):
            raise StoreError(400, "BadRequest", f'field label not supported: {name}')
        terms.append((name, match[2] != "!=", match[3]))
    return terms


@dataclass(frozen=True)
class Selector:
    """What a list or watch asked for: a namespace (None = all), label and field requirements."""

    namespace: str | None = None
    labels: tuple[Requirement, ...] = ()
    fields: tuple[tuple[str, bool, str], ...] = ()

    @classmethod
    def parse(cls, resource: Resource, namespace: str | None, label_selector: str,
              field_selector: str) -> Selector:
        return cls(namespace, tuple(parse_label_selector(label_selector)),
                   tuple(parse_field_selector(field_selector, resource)))

    def matches(self, obj: JsonObject) -> bool:
        metadata = obj.get("metadata", {})
        if self.namespace is not None and metadata.get("namespace") != self.namespace:
            return False
        labels = metadata.get("labels") or {}
        if not all(requirement.matches(labels) for requirement in self.labels):
            return False
        return all((FIELDS[name](obj) == value) == equal for name, equal, value in self.fields)


# --- merge patch ----------------------------------------------------------------------------------

def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch; returns a new value (neither argument is changed)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# --- continue tokens ------------------------------------------------------------------------------

def encode_continue(revision: int, after: tuple[str, str]) -> str:
    raw = json.dumps({"v": "meta.k8s.io/v1", "rv": revision, "start": list(after)}).encode()
    return base64.urlsafe_b64encode(raw).decode()


def decode_continue(token: str) -> tuple[int, tuple[str, str]]:
    """(the list's resourceVersion, the last (namespace, name) it returned)."""
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        namespace, name = data["start"]
        return int(data["rv"]), (str(namespace), str(name))
    except (ValueError, KeyError, TypeError) as error:
        raise StoreError(400, "BadRequest", f"invalid continue token: {error}") from error


def object_key(obj: JsonObject) -> tuple[str, str]:
    metadata = obj.get("metadata") or {}
    return str(metadata.get("namespace") or ""), str(metadata.get("name") or "")


# --- the store ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Change:
    revision: int
    resource: Resource
    type: str  # ADDED, MODIFIED, DELETED
    old: JsonObject | None
    new: JsonObject  # for DELETED: the object as it was deleted, with the deletion's revision


def watch_event(change: Change, selector: Selector) -> tuple[str, JsonObject] | None:
    """What a watcher with this selector sees of a change (an object leaving the selection = DELETED)."""
    was = change.old is not None and change.type != "DELETED" and selector.matches(change.old)
    now = selector.matches(change.new)
    if change.type == "DELETED":
        return ("DELETED", change.new) if now else None
    if was and now:
        return "MODIFIED", change.new
    if now:
        return "ADDED", change.new
    if was:
        return "DELETED", change.new
    return None


@dataclass(eq=False)
class Watcher:
    resource: Resource
    selector: Selector
    deliver: Callable[[str, JsonObject], None]

    def offer(self, change: Change) -> None:
        if change.resource == self.resource and (event := watch_event(change, self.selector)):
            self.deliver(*event)


@dataclass
class Store:
    """All objects, the global resourceVersion counter, a bounded change history, live watchers."""

    history_limit: int = 10_000
    revision: int = 1
    horizon: int = 0  # watching from a resourceVersion older than this is 410 Gone
    allocated_ips: int = 0  # ClusterIPs handed out
    _objects: dict[tuple[str, str], dict[tuple[str, str], JsonObject]] = field(default_factory=dict)
    _history: deque[Change] = field(default_factory=deque)
    _watchers: set[Watcher] = field(default_factory=set)

    def __post_init__(self) -> None:
        for name in INITIAL_NAMESPACES:
            self.create(RESOURCES[0], {"metadata": {"name": name}})

    def get(self, resource: Resource, namespace: str | None, name: str) -> JsonObject:
        obj = self._table(resource).get((namespace or "", name))
        if obj is None:
            raise not_found(resource, name)
        return obj

    def list(self, resource: Resource, selector: Selector) -> list[JsonObject]:
        table = self._table(resource)
        return [table[key] for key in sorted(table) if selector.matches(table[key])]

    def create(self, resource: Resource, obj: JsonObject) -> JsonObject:
        key = self._key(resource, obj)
        if key in self._table(resource):
            raise StoreError(409, "AlreadyExists", f'{resource.plural} "{key[1]}" already exists',
                             {"name": key[1], "kind": resource.plural})
        self._require_namespace(resource, key[0])
        metadata = obj.setdefault("metadata", {})
        metadata["uid"] = str(uuid.uuid4())
        metadata["creationTimestamp"] = _timestamp(time.time())
        if resource.kind == "Namespace":
            obj.setdefault("spec", {"finalizers": ["kubernetes"]})
            obj.setdefault("status", {"phase": "Active"})
        if resource.kind == "Service":
            self._allocate_cluster_ip(obj)
        return self._commit(resource, key, "ADDED", None, obj)

    def _allocate_cluster_ip(self, obj: JsonObject) -> None:
        """As a real API server: a ClusterIP Service created without one gets one (from
        10.43.0.0/16, k3s's service CIDR), kept when an update leaves it out."""
        spec = obj.setdefault("spec", {})
        if spec.get("type", "ClusterIP") not in ("ClusterIP", "NodePort", "LoadBalancer") or \
                spec.get("clusterIP"):
            return
        self.allocated_ips += 1
        ip = f"10.43.{200 + self.allocated_ips // 250}.{self.allocated_ips % 250 + 1}"
        spec["clusterIP"], spec["clusterIPs"] = ip, [ip]

    def replace(self, resource: Resource, obj: JsonObject) -> JsonObject:
        key = self._key(resource, obj)
        current = self._table(resource).get(key)
        if current is None:
            raise not_found(resource, key[1])
        wanted = obj.get("metadata", {}).get("resourceVersion")
        if wanted and wanted != current["metadata"]["resourceVersion"]:
            raise StoreError(409, "Conflict", f'Operation cannot be fulfilled on {resource.plural} '
                             f'"{key[1]}": the object has been modified; please apply your changes to the '
                             "latest version and try again", {"name": key[1], "kind": resource.plural})
        metadata = obj.setdefault("metadata", {})
        for kept in ("uid", "creationTimestamp"):
            metadata[kept] = current["metadata"][kept]
        if resource.kind == "Service" and not (obj.get("spec") or {}).get("clusterIP"):
            current_spec = current.get("spec") or {}
            for field_name in ("clusterIP", "clusterIPs"):  # immutable: an update keeps it
                if field_name in current_spec:
                    obj.setdefault("spec", {})[field_name] = current_spec[field_name]
        return self._commit(resource, key, "MODIFIED", current, obj)

    def apply(self, resource: Resource, obj: JsonObject) -> JsonObject:
        """Create, or replace whatever is there (ignoring the resourceVersion the caller sent)."""
        key = self._key(resource, obj)
        if key not in self._table(resource):
            return self.create(resource, obj)
        obj.setdefault("metadata", {}).pop("resourceVersion", None)
        return self.replace(resource, obj)

    def delete(self, resource: Resource, namespace: str | None, name: str) -> JsonObject:
        key = (namespace or "", name)
        current = self._table(resource).get(key)
        if current is None:
            raise not_found(resource, name)
        if resource.kind == "Namespace":
            self._delete_contents(name)
        gone = {**current, "metadata": dict(current["metadata"])}
        return self._commit(resource, key, "DELETED", current, gone)

    def watch(self, resource: Resource, selector: Selector, since: str,
              deliver: Callable[[str, JsonObject], None]) -> Watcher:
        """Subscribe; first deliver what the watcher missed (or the current state, for "" and "0")."""
        watcher = Watcher(resource, selector, deliver)
        if since in ("", "0"):
            for obj in self.list(resource, selector):
                deliver("ADDED", obj)
        else:
            revision = _revision(since)
            if revision < self.horizon:
                raise StoreError(410, "Expired", f"too old resource version: {revision} ({self.horizon})")
            for change in self._history:
                if change.revision > revision:
                    watcher.offer(change)
        self._watchers.add(watcher)
        return watcher

    def unwatch(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)

    def compact(self) -> None:
        """Forget the history: any watch or continue token from before now gets 410."""
        self._history.clear()
        self.horizon = self.revision

    def check_continue(self, revision: int) -> None:
        if revision < self.horizon:
            raise StoreError(410, "Expired", "The provided continue parameter is too old to display a "
                             "consistent list result. You can start a new list without the continue "
                             "parameter.")

    @staticmethod
    def _string_data(resource: Resource, obj: JsonObject) -> None:
        """As a real API server: a Secret's stringData is written into data, base64."""
        if resource.kind == "Secret" and isinstance(obj.get("stringData"), dict):
            data = obj.setdefault("data", {})
            for key, value in obj.pop("stringData").items():
                data[key] = base64.b64encode(str(value).encode()).decode()

    def _commit(self, resource: Resource, key: tuple[str, str], change_type: str, old: JsonObject | None,
                new: JsonObject) -> JsonObject:
        self._string_data(resource, new)
        self.revision += 1
        new["apiVersion"], new["kind"] = resource.group_version, resource.kind
        new["metadata"]["resourceVersion"] = str(self.revision)
        if resource.namespaced:
            new["metadata"]["namespace"] = key[0]
        table = self._table(resource)
        if change_type == "DELETED":
            del table[key]
        else:
            table[key] = new
        self._record(Change(self.revision, resource, change_type, old, new))
        return new

    def _record(self, change: Change) -> None:
        self._history.append(change)
        while len(self._history) > self.history_limit:
            self.horizon = self._history.popleft().revision
        for watcher in list(self._watchers):
            watcher.offer(change)

    def _delete_contents(self, namespace: str) -> None:
        for resource in STORED:
            if resource.namespaced:
                for key in [key for key in self._table(resource) if key[0] == namespace]:
                    self.delete(resource, namespace, key[1])

    def _table(self, resource: Resource) -> dict[tuple[str, str], JsonObject]:
        return self._objects.setdefault(resource.key, {})

    def _key(self, resource: Resource, obj: JsonObject) -> tuple[str, str]:
        metadata = obj.get("metadata") or {}
        name = metadata.get("name")
        if not name:
            raise StoreError(422, "Invalid", f"{resource.kind} is invalid: metadata.name: Required value")
        namespace = metadata.get("namespace") or ("default" if resource.namespaced else "")
        return (namespace if resource.namespaced else ""), str(name)

    def _require_namespace(self, resource: Resource, namespace: str) -> None:
        if resource.namespaced and ("", namespace) not in self._table(RESOURCES[0]):
            raise StoreError(404, "NotFound", f'namespaces "{namespace}" not found',
                             {"name": namespace, "kind": "namespaces"})


def not_found(resource: Resource, name: str) -> StoreError:
    label = f"{resource.plural}.{resource.group}" if resource.group else resource.plural
    return StoreError(404, "NotFound", f'{label} "{name}" not found',
                      {"name": name, "group": resource.group, "kind": resource.plural})


def _revision(text: str) -> int:
    try:
        return int(text)
    except ValueError as error:
        raise StoreError(400, "BadRequest", f"invalid resource version: {text!r}") from error


def _timestamp(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def objects_of(items: Iterable[JsonObject]) -> list[JsonObject]:
    """List items as a real server sends them: without kind and apiVersion."""
    return [{k: v for k, v in item.items() if k not in ("kind", "apiVersion")} for item in items]
