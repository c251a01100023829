"""Documents the in-test API server answers with: discovery, Status, Table, and token reviews.

Pure functions and one small token table; no I/O. Shapes follow what a v1.32 API server returns,
to the depth kubectl and Pinion's own client read them.
"""

from __future__ import annotations

import calendar
import time
from dataclasses import dataclass, field
from typing import Any

from tests.support.kubestore import RESOURCES, JsonObject, Resource, StoreError

API_AUDIENCE = "https://kubernetes.default.svc"
VERSION = {
    "major": "1", "minor": "32", "gitVersion": "v1.32.0+pinion-fake", "gitCommit": "",
    "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.23.4",
    "compiler": "gc", "platform": "linux/arm64",
}


def status(code: int, reason: str, message: str, details: JsonObject | None = None) -> JsonObject:
    document: JsonObject = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                            "message": message, "reason": reason, "code": code}
    if details:
        document["details"] = details
    return document


def status_of(error: StoreError) -> JsonObject:
    return status(error.code, error.reason, error.message, error.details)


# --- discovery ------------------------------------------------------------------------------------

def _groups() -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for resource in RESOURCES:
        if resource.group and resource.version not in groups.setdefault(resource.group, []):
            groups[resource.group].append(resource.version)
    return groups


def _group(name: str, versions: list[str]) -> JsonObject:
    entries = [{"groupVersion": f"{name}/{version}", "version": version} for version in versions]
    return {"name": name, "versions": entries, "preferredVersion": entries[0]}


def api_versions(server_address: str) -> JsonObject:
    return {"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}]}


def api_group_list() -> JsonObject:
    groups = [_group(name, versions) for name, versions in _groups().items()]
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


def api_group(name: str) -> JsonObject | None:
    versions = _groups().get(name)
    if versions is None:
        return None
    return {"kind": "APIGroup", "apiVersion": "v1", **_group(name, versions)}


def api_resource_list(group_version: str) -> JsonObject | None:
    resources = [_api_resource(r) for r in RESOURCES if r.group_version == group_version]
    if not resources:
        return None
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
            "resources": resources}


def _api_resource(resource: Resource) -> JsonObject:
    entry: JsonObject = {"name": resource.plural, "singularName": resource.kind.lower(),
                         "namespaced": resource.namespaced, "kind": resource.kind,
                         "verbs": list(resource.verbs)}
    if resource.short_names:
        entry["shortNames"] = list(resource.short_names)
    return entry


# --- tables (kubectl get) -------------------------------------------------------------------------

def wants_table(accept: str) -> bool:
    return "as=Table" in accept


def table(resource: Resource, items: list[JsonObject], list_metadata: JsonObject, include: str) -> JsonObject:
    definitions = [{"name": name, "type": "string", "format": "name" if name == "Name" else "",
                    "description": "", "priority": priority} for name, priority in _columns(resource)]
    rows = [{"cells": _cells(resource, item), **_row_object(item, include)} for item in items]
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": list_metadata,
            "columnDefinitions": definitions, "rows": rows}


def _columns(resource: Resource) -> list[tuple[str, int]]:
    """(name, priority): priority 1 columns show with -o wide."""
    if resource.kind == "Pod":
        return [("Name", 0), ("Ready", 0), ("Status", 0), ("Restarts", 0), ("Age", 0), ("IP", 1), ("Node", 1)]
    if resource.kind == "Namespace":
        return [("Name", 0), ("Status", 0), ("Age", 0)]
    return [("Name", 0), ("Age", 0)]


def _cells(resource: Resource, obj: JsonObject) -> list[Any]:
    metadata, spec, state = obj.get("metadata", {}), obj.get("spec", {}), obj.get("status", {})
    age = _age(metadata.get("creationTimestamp"))
    if resource.kind == "Pod":
        statuses = state.get("containerStatuses") or []
        ready = f"{sum(1 for s in statuses if s.get('ready'))}/{len(spec.get('containers') or [])}"
        restarts = str(sum(int(s.get("restartCount", 0)) for s in statuses))
        return [metadata.get("name"), ready, state.get("phase", "Pending"), restarts, age,
                state.get("podIP", "<none>"), spec.get("nodeName", "<none>")]
    if resource.kind == "Namespace":
        return [metadata.get("name"), state.get("phase", "Active"), age]
    return [metadata.get("name"), age]


def _row_object(obj: JsonObject, include: str) -> JsonObject:
    if include == "None":
        return {}
    if include == "Object":
        return {"object": obj}
    partial = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
               "metadata": obj.get("metadata")}
    return {"object": partial}


def _age(timestamp: str | None) -> str:
    if not timestamp:
        return "<unknown>"
    seconds = max(0, int(time.time() - _parse_timestamp(timestamp)))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _parse_timestamp(text: str) -> float:
    return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))


# --- tokens ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenEntry:
    username: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: dict[str, list[str]] = field(default_factory=dict)
    audiences: tuple[str, ...] = (API_AUDIENCE,)  # () = any audience (a static admin token)
    expires_at: float | None = None

    def user_info(self) -> JsonObject:
        info: JsonObject = {"username": self.username, "groups": list(self.groups)}
        if self.uid:
            info["uid"] = self.uid
        if self.extra:
            info["extra"] = {key: list(values) for key, values in self.extra.items()}
        return info


@dataclass
class TokenTable:
    """Bearer tokens the server knows: it authenticates requests and answers TokenReviews from them."""

    entries: dict[str, TokenEntry] = field(default_factory=dict)

    def add(self, token: str, entry: TokenEntry) -> None:
        self.entries[token] = entry

    def check(self, token: str, audiences: list[str]) -> tuple[TokenEntry, list[str]]:
        """The token's entry and the audiences it is good for; StoreError(401) with the reason otherwise."""
        entry = self.entries.get(token)
        if entry is None:
            raise StoreError(401, "Unauthorized", "invalid bearer token")
        if entry.expires_at is not None and time.time() >= entry.expires_at:
            raise StoreError(401, "Unauthorized", "invalid bearer token, token is expired (exp)")
        if not entry.audiences:
            return entry, audiences
        common = [audience for audience in audiences if audience in entry.audiences]
        if not common:
            raise StoreError(401, "Unauthorized", "invalid bearer token, token audiences "
                             f"{list(entry.audiences)} is invalid for the target audiences {audiences}")
        return entry, common

    def review(self, review: JsonObject) -> JsonObject:
        spec = review.get("spec") or {}
        audiences = list(spec.get("audiences") or [API_AUDIENCE])
        try:
            entry, common = self.check(str(spec.get("token") or ""), audiences)
            result: JsonObject = {"authenticated": True, "user": entry.user_info(), "audiences": common}
        except StoreError as error:
            result = {"user": {}, "error": f"[{error.message}]"}
        return {"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                "metadata": {"creationTimestamp": None}, "spec": spec, "status": result}
