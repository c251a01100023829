"""Whether the CNI installer, stopping, should take pinion-cni out of the chain.

A DaemonSet rollout (or a restart of the agent pod) stops the installer too. Removing the
chain then lets pods created in those seconds start unmeshed, and Kubernetes mode only
learns of pods through CNI ADD: they would stay unmeshed until restarted. Kept instead, such
pods fail closed (the agent is away), kubelet retries, and the new agent captures them.
Only when Pinion is being removed (its DaemonSet gone or being deleted) does the chain go,
so nodes keep starting pods after an uninstall."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from agent.controlplane.kube.client import ApiError, KubeClient
from agent.controlplane.kube.config import KubeConfig, KubeConfigError

log = logging.getLogger(__name__)


async def _daemonset(kubeconfig: str | None, namespace: str, name: str,
                     timeout: float) -> dict[str, Any] | None:
    client = KubeClient(KubeConfig.load(kubeconfig), timeout=timeout)
    try:
        return await client.get_optional(f"/apis/apps/v1/namespaces/{namespace}/daemonsets/{name}")
    finally:
        await client.close()


def uninstall_unless_rolling(daemonset: str, kubeconfig: str | None = None, timeout: float = 5.0) -> bool:
    """True (uninstall) when the DaemonSet `NS/NAME` is gone or being deleted, or the API
    cannot say; False (keep the chain) while it exists: a rollout or a restart."""
    namespace, _, name = daemonset.partition("/")
    try:
        found = asyncio.run(_daemonset(kubeconfig, namespace, name, timeout))
    except (KubeConfigError, ApiError, OSError, TimeoutError) as exc:
        log.warning("cannot ask the API about DaemonSet %s (%s): uninstalling, so this node "
                    "keeps starting pods", daemonset, exc)
        return True
    if found is None:
        log.info("DaemonSet %s is gone: uninstalling", daemonset)
        return True
    if (found.get("metadata") or {}).get("deletionTimestamp"):
        log.info("DaemonSet %s is being deleted: uninstalling", daemonset)
        return True
    log.info("DaemonSet %s still exists (a rollout or a restart): keeping pinion-cni in the "
             "chain; new pods wait for the next agent", daemonset)
    return False
