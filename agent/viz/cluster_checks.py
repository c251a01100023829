"""`pinion check --kubeconfig`: the cluster side of `linkerd check` — is the API reachable,
is Pinion installed and healthy (namespace, issuer, agent DaemonSet, trust bundle), and
where are the agents (their admin endpoints, for the per-agent checks)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from agent.controlplane.kube.client import ApiError, KubeClient
from agent.controlplane.kube.config import KubeConfig, KubeConfigError
from agent.viz.checks import CheckResult

NAMESPACE = "pinion-system"
AGENT_SELECTOR = "app.kubernetes.io/name=pinion-agent"
ADMIN_PORT = 4191
MIN_MINOR = 25  # the oldest Kubernetes the manifests are written for (EndpointSlice v1, …)


def api_check(version: dict[str, Any]) -> CheckResult:
    major, minor = str(version.get("major", "")), str(version.get("minor", "")).rstrip("+")
    text = f"v{major}.{minor} ({version.get('gitVersion', '?')})"
    ok = major == "1" and minor.isdigit() and int(minor) >= MIN_MINOR
    return CheckResult(f"the Kubernetes API answers: {text}", ok, (),
                       f"Pinion needs Kubernetes 1.{MIN_MINOR} or newer")


def issuer_check(deployment: dict[str, Any] | None) -> CheckResult:
    if deployment is None:
        return CheckResult("issuer Deployment pinion-issuer exists", False,
                           hint="pinion install | kubectl apply -f -")
    status = deployment.get("status") or {}
    available = int(status.get("availableReplicas") or 0)
    return CheckResult(f"issuer is available ({available} replica{'s' * (available != 1)})", available > 0,
                       hint=f"kubectl -n {NAMESPACE} describe deployment pinion-issuer; "
                            f"kubectl -n {NAMESPACE} logs deploy/pinion-issuer")


def daemonset_check(daemonset: dict[str, Any] | None) -> CheckResult:
    if daemonset is None:
        return CheckResult("agent DaemonSet pinion-agent exists", False,
                           hint="pinion install | kubectl apply -f -")
    status = daemonset.get("status") or {}
    desired = int(status.get("desiredNumberScheduled") or 0)
    ready = int(status.get("numberReady") or 0)
    updated = int(status.get("updatedNumberScheduled") or desired)
    detail = () if updated == desired else (f"{updated}/{desired} run the current version (rolling out)",)
    ok = desired > 0 and ready == desired
    return CheckResult(f"an agent is ready on every node ({ready}/{desired})", ok, detail,
                       f"kubectl -n {NAMESPACE} get pods -l {AGENT_SELECTOR} -o wide")


def bundle_check(configmap: dict[str, Any] | None, now: float) -> CheckResult:
    from agent.identity.crypto import CryptoError, cert_info
    from agent.identity.files import split_pem_certificates

    title = "the trust bundle holds valid anchors"
    if configmap is None:
        return CheckResult(title, False, ("ConfigMap pinion-trust-bundle is missing",),
                           "pinion install | kubectl apply -f -")
    pem = str((configmap.get("data") or {}).get("trust-bundle.crt", "")).encode()
    try:
        anchors = [cert_info(c) for c in split_pem_certificates(pem)]
    except (CryptoError, ValueError) as exc:
        return CheckResult(title, False, (f"trust-bundle.crt does not parse: {exc}",))
    if not anchors:
        return CheckResult(title, False, ("trust-bundle.crt holds no certificate",),
                           "pinion install | kubectl apply -f -")
    valid = [a for a in anchors if a.not_before <= now < a.not_after]
    detail = tuple(f"anchor valid until {time.strftime('%Y-%m-%d', time.gmtime(a.not_after))}"
                   for a in anchors)
    return CheckResult(title, bool(valid), detail, "rotate the trust anchor: pinion install --identity-dir")


def agent_addresses(pods: dict[str, Any]) -> list[str]:
    """The admin endpoints of the agent pods (hostNetwork: the node's IP, port 4191)."""
    addresses = []
    for pod in pods.get("items") or ():
        host = (pod.get("status") or {}).get("hostIP")
        if host:
            addresses.append(f"[{host}]:{ADMIN_PORT}" if ":" in host else f"{host}:{ADMIN_PORT}")
    return sorted(set(addresses))


async def _cluster(client: KubeClient, pre: bool) -> tuple[list[CheckResult], list[str]]:
    results = [api_check(await client.request("GET", "/version"))]
    namespace = await client.get_optional(f"/api/v1/namespaces/{NAMESPACE}")
    if pre:
        results.append(CheckResult(f"namespace {NAMESPACE} is free (not installed yet)", namespace is None,
                                   hint="already installed: `pinion check --kubeconfig …` checks it"))
        return results, []
    if namespace is None:
        results.append(CheckResult(f"namespace {NAMESPACE} exists", False,
                                   hint="pinion install | kubectl apply -f -"))
        return results, []
    base = f"/apis/apps/v1/namespaces/{NAMESPACE}"
    results.append(issuer_check(await client.get_optional(f"{base}/deployments/pinion-issuer")))
    results.append(daemonset_check(await client.get_optional(f"{base}/daemonsets/pinion-agent")))
    results.append(bundle_check(await client.get_optional(f"/api/v1/namespaces/{NAMESPACE}/configmaps/"
                                                   "pinion-trust-bundle"), time.time()))
    pods = await client.request("GET", f"/api/v1/namespaces/{NAMESPACE}/pods",
                                params={"labelSelector": AGENT_SELECTOR})
    return results, agent_addresses(pods)


def cluster_results(kubeconfig: str | None, pre: bool = False,
                    timeout: float = 10.0) -> tuple[list[CheckResult], list[str]]:
    """(checks, agent admin addresses). `kubeconfig` None: in-cluster."""
    try:
        config = KubeConfig.load(kubeconfig)
    except KubeConfigError as exc:
        return [CheckResult("a kubeconfig to reach the cluster", False, (str(exc),),
                            "pass --kubeconfig (k3s: /etc/rancher/k3s/k3s.yaml)")], []

    async def run() -> tuple[list[CheckResult], list[str]]:
        client = KubeClient(config, timeout=timeout)
        try:
            return await _cluster(client, pre)
        finally:
            await client.close()

    try:
        return asyncio.run(run())
    except (ApiError, OSError, TimeoutError) as exc:
        return [CheckResult(f"the Kubernetes API at {config.server} answers", False,
                            (str(exc) or type(exc).__name__,), "is the kubeconfig right? is the API up?")], []


def cluster_agents(kubeconfig: str | None, timeout: float = 10.0) -> tuple[list[str], str | None]:
    """(agent admin addresses, the kubeconfig's bearer token) for `pinion tap --kubeconfig`."""
    config = KubeConfig.load(kubeconfig)
    token = config.token
    if config.token_file:
        with open(config.token_file) as file:
            token = file.read().strip()

    async def run() -> list[str]:
        client = KubeClient(config, timeout=timeout)
        try:
            pods = await client.request("GET", f"/api/v1/namespaces/{NAMESPACE}/pods",
                                        params={"labelSelector": AGENT_SELECTOR})
            return agent_addresses(pods)
        finally:
            await client.close()

    return asyncio.run(run()), token
