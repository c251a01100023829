"""`pinion multicluster gateways` and `pinion multicluster check`, as Linkerd's: each link of
this cluster (the ConfigMaps `link` printed), its gateway's probe (alive, latency), its
mirrored Services here, and for `check` also the linked API server through the link's own
read-only credentials."""

from __future__ import annotations

import asyncio
import base64
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

from agent.controlplane.kube.client import ApiError, KubeClient
from agent.controlplane.kube.config import KubeConfig, KubeConfigError
from agent.core import multicluster
from agent.deploy.multicluster import LINK_NAMESPACE
from agent.viz.checks import CheckResult, all_ok, render_results
from agent.viz.scrape import AgentError, get


@dataclass(frozen=True)
class LinkStatus:
    cluster: str
    settings: dict[str, str]
    alive: bool
    latency_ms: float | None
    probe_error: str
    mirrored: int


async def _links(client: KubeClient) -> list[dict[str, str]]:
    listing = await client.request("GET", f"/api/v1/namespaces/{LINK_NAMESPACE}/configmaps",
                                   params={"labelSelector": "mirror.pinion.dev/link=true"})
    return [{str(k): str(v) for k, v in (item.get("data") or {}).items()}
            for item in listing.get("items") or () if isinstance(item, dict)]


async def _mirrored(client: KubeClient, cluster: str) -> int:
    listing = await client.request("GET", "/api/v1/services",
                                   params={"labelSelector": f"{multicluster.CLUSTER_LABEL}={cluster}"})
    return len(listing.get("items") or ())


def probe(address: str, timeout: float) -> tuple[bool, float | None, str]:
    """GET the gateway's /ready: (alive, latency in ms, why not)."""
    started = time.monotonic()
    try:
        reply = get(address, "/ready", timeout)
    except AgentError as exc:
        return False, None, str(exc)
    latency = (time.monotonic() - started) * 1000
    return reply.status == 200, latency, "" if reply.status == 200 else f"/ready answered {reply.status}"


async def link_statuses(client: KubeClient, timeout: float) -> list[LinkStatus]:
    statuses = []
    for settings in await _links(client):
        cluster = settings.get("cluster-name", "?")
        alive, latency, why = await asyncio.to_thread(probe, settings.get("probe-address", ""), timeout)
        statuses.append(LinkStatus(cluster, settings, alive, latency, why,
                                   await _mirrored(client, cluster)))
    return statuses


def render_gateways(statuses: Sequence[LinkStatus]) -> str:
    rows = [("CLUSTER", "ALIVE", "NUM_SVC", "LATENCY")]
    for status in statuses:
        latency = f"{status.latency_ms:.0f}ms" if status.latency_ms is not None else "-"
        rows.append((status.cluster, "True" if status.alive else "False", str(status.mirrored), latency))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                   + "\n" for row in rows)


async def _remote_services(client: KubeClient, cluster: str) -> tuple[int | None, str]:
    """How many Services the linked cluster exports, read with the link's credentials."""
    secret = await client.get_optional(
        f"/api/v1/namespaces/{LINK_NAMESPACE}/secrets/cluster-credentials-{cluster}")
    data = (secret or {}).get("data") or {}
    text = base64.b64decode(data.get("kubeconfig", "")).decode() if data.get("kubeconfig") else ""
    if not text:
        return None, f"no Secret {LINK_NAMESPACE}/cluster-credentials-{cluster} with a kubeconfig"
    handle, path = tempfile.mkstemp(prefix="pinion-link-")
    try:
        os.write(handle, text.encode())
        os.close(handle)
        remote = KubeClient(KubeConfig.load(path), timeout=5.0)
        try:
            listing = await remote.request("GET", "/api/v1/services")
        finally:
            await remote.close()
    except (OSError, TimeoutError, ApiError, KubeConfigError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    finally:
        os.unlink(path)
    items = [i for i in listing.get("items") or () if isinstance(i, dict)]
    return sum(1 for item in items if multicluster.exported(item) is not None), ""


async def check_results(client: KubeClient, timeout: float) -> list[tuple[str, list[CheckResult]]]:
    try:
        statuses = await link_statuses(client, timeout)
    except (OSError, TimeoutError, ApiError) as exc:
        failed = CheckResult("links can be read", False, (str(exc),),
                             "is --kubeconfig right, and Pinion installed?")
        return [("pinion-multicluster", [failed])]
    sections = [("pinion-multicluster", [CheckResult(
        "links are configured", bool(statuses), tuple(f"{s.cluster}" for s in statuses),
        "`pinion multicluster link --cluster-name NAME | kubectl apply -f -` in this cluster")])]
    for status in statuses:
        results = []
        try:
            multicluster.Link(status.cluster, *_address(status.settings.get("gateway-address", "")),
                              status.settings.get("gateway-identity", ""))
            results.append(CheckResult("link settings are valid", True))
        except ValueError as exc:
            results.append(CheckResult("link settings are valid", False, (str(exc),)))
        exported, why = await _remote_services(client, status.cluster)
        results.append(CheckResult("remote API server reachable with the link's credentials",
                                   exported is not None, (why,) if why else (),
                                   "the token may be revoked or the address wrong: run link again"))
        results.append(CheckResult(
            "gateway is alive", status.alive,
            (f"probe {status.settings.get('probe-address')}: " +
             (f"{status.latency_ms:.0f} ms" if status.alive and status.latency_ms is not None
              else status.probe_error),),
            "is the gateway running, and its probe port reachable from here?"))
        if exported is not None:
            results.append(CheckResult(
                "all exported Services are mirrored", status.mirrored == exported,
                (f"{exported} exported, {status.mirrored} mirrored",),
                f"see the logs of deploy/pinion-mirror-{status.cluster} in {LINK_NAMESPACE}"))
        sections.append((f"link {status.cluster}", results))
    return sections


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port) if port.isdigit() else 0


async def run(kubeconfig: str | None, command: str, timeout: float) -> tuple[str, int]:
    client = KubeClient(KubeConfig.load(kubeconfig), timeout=timeout)
    try:
        if command == "gateways":
            return render_gateways(await link_statuses(client, timeout)), 0
        sections = await check_results(client, timeout)
        return render_results(sections), 0 if all_ok(sections) else 1
    finally:
        await client.close()


def table_rows(text: str) -> list[list[str]]:
    """The gateways table, split (for tests and scripts)."""
    return [line.split() for line in text.splitlines() if line.strip()]

