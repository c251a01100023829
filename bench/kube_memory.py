"""Kubernetes client and watch memory (issue #6): a client's import cost, and the cost of each watched pod.

1. Imports: VmRSS of a fresh `python -c "import asyncio, ssl, json; <client>"`, median of 5, for
   the standard library alone, Pinion's client + reflector, and (with --third-party, which makes a
   scratch venv under /tmp, pip-installs them from PyPI and deletes it afterwards) lightkube and the
   official `kubernetes` package.
2. Per pod: the in-test API server runs as another process and holds N realistic pods (~3.5 KB of
   JSON each: labels, annotations, owner reference, a container with env, ports, probes, status).
   A child process builds a KubeClient, warms its connection, reads VmRSS, runs a Reflector until
   synced, collects garbage and reads VmRSS again; (after - before) / N is the cost per pod. Once
   with the small projection an agent keeps, once keeping whole objects, for comparison; and with
   glibc's mmap threshold pinned, which stops it keeping freed list-page buffers (see the docs).

    .venv/bin/python bench/kube_memory.py [--pods 2000] [--runs 3] [--third-party]

Every measured interpreter runs with compiled bytecode (PYTHONPYCACHEPREFIX in a temp dir, warmed
once), as an installed agent would: compiling our modules from source would count the compiler.
Prints markdown on stdout. No root needed; loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.controlplane.kube.client import KubeClient, KubeConfig  # noqa: E402 - after the path fix
from agent.controlplane.kube.reflector import Reflector  # noqa: E402

BASE = "import asyncio, ssl, json"
OURS = f"{BASE}; import agent.controlplane.kube.client, agent.controlplane.kube.reflector"
THIRD_PARTY = {
    "lightkube (`import lightkube`)": f"{BASE}; import lightkube",
    "lightkube, as an agent would use it (AsyncClient + core_v1 Pod)":
        f"{BASE}; from lightkube import AsyncClient; from lightkube.resources.core_v1 import Pod",
    "kubernetes (`from kubernetes import client, watch`)": f"{BASE}; from kubernetes import client, watch",
}
RSS_PRINT = ("; status = open('/proc/self/status').read().split('\\n')"
             "; print([line.split()[1] for line in status if line.startswith('VmRSS:')][0])")
NAMESPACES = ("shop", "payments", "search", "media", "monitoring")
NODES = tuple(f"pi-{index}" for index in range(1, 6))
KEPT_LABELS = ("app", "app.kubernetes.io/name", "version", "pinion.dev/mesh")


def bytecode_environment(cache: str) -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    return environment | {"PYTHONPYCACHEPREFIX": cache}


def rss_kib(python: str, code: str, environment: dict[str, str], runs: int = 5) -> int:
    """Median VmRSS (KiB) of fresh interpreters running `code`, after one unmeasured warm-up run."""
    samples = []
    for _ in range(runs + 1):
        output = subprocess.run([python, "-c", code + RSS_PRINT], capture_output=True, text=True, check=True,
                                cwd=REPO, env=environment).stdout
        samples.append(int(output.split()[-1]))
    return int(statistics.median(samples[1:]))


def third_party_imports(environment: dict[str, str]) -> tuple[dict[str, int], dict[str, str]]:
    """Import costs of lightkube and kubernetes, from a scratch venv that is deleted afterwards."""
    venv = Path(tempfile.mkdtemp(prefix="kube-clients-", dir="/tmp"))
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, "lightkube", "kubernetes"], check=True)
        python = str(venv / "bin" / "python")
        versions = subprocess.run([python, "-c", "import importlib.metadata as m; "
                                   "print(m.version('lightkube'), m.version('kubernetes'))"],
                                  capture_output=True, text=True, check=True).stdout.split()
        costs = {"standard library only (scratch venv)": rss_kib(python, BASE, environment)}
        costs |= {label: rss_kib(python, code, environment) for label, code in THIRD_PARTY.items()}
        return costs, {"lightkube": versions[0], "kubernetes": versions[1]}
    finally:
        shutil.rmtree(venv, ignore_errors=True)


# --- realistic pods --------------------------------------------------------------------------------

def realistic_pod(index: int) -> dict[str, Any]:
    app = f"svc-{index % 40:02d}"
    template = f"{(index // 40) * 7919 % 0xFFFFF:05x}7c9d"
    name = f"{app}-{template}-{index:05x}"
    labels = {"app": app, "app.kubernetes.io/name": app, "app.kubernetes.io/instance": f"{app}-prod",
              "app.kubernetes.io/version": "1.4.2", "version": "v1", "pod-template-hash": template,
              "tier": "backend", "pinion.dev/mesh": "enabled"}
    annotations = {"prometheus.io/scrape": "true", "prometheus.io/port": "9090",
                   "kubectl.kubernetes.io/restartedAt": "2026-11-20T10:00:00Z",
                   "pinion.dev/inbound-policy": "mesh-only", "config.linkerd.io/skip-outbound-ports": "4222"}
    ip = f"10.42.{index // 250}.{index % 250 + 2}"
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "generateName": f"{app}-{template}-", "namespace": NAMESPACES[index % 5],
                     "labels": labels, "annotations": annotations,
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                          "name": f"{app}-{template}", "controller": True,
                                          "uid": f"6f1c2a9e-3b7d-4e15-9a0c-{index:012x}",
                                          "blockOwnerDeletion": True}]},
        "spec": _spec(app, NODES[index % len(NODES)]),
        "status": _status(app, ip, NODES[index % len(NODES)]),
    }


def _spec(app: str, node: str) -> dict[str, Any]:
    probe = {"httpGet": {"path": "/healthz", "port": 8080, "scheme": "HTTP"}, "initialDelaySeconds": 5,
             "periodSeconds": 10, "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3}
    container = {
        "name": app, "image": f"registry.example.com/shop/{app}:1.4.2", "imagePullPolicy": "IfNotPresent",
        "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"},
                  {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}],
        "env": [{"name": "LOG_LEVEL", "value": "info"}, {"name": "PORT", "value": "8080"},
                {"name": "DATABASE_URL", "value": "postgres://db.shop.svc:5432/shop"},
                {"name": "POD_NAME",
                 "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}}],
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}},
        "volumeMounts": [{"name": "config", "mountPath": "/etc/app", "readOnly": True},
                         {"name": "kube-api-access-x7k2p", "readOnly": True,
                          "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
        "livenessProbe": probe, "readinessProbe": probe,
        "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
    }
    return {
        "containers": [container], "serviceAccountName": app, "serviceAccount": app, "nodeName": node,
        "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
        "schedulerName": "default-scheduler", "securityContext": {}, "priority": 0,
        "enableServiceLinks": True, "preemptionPolicy": "PreemptLowerPriority",
        "volumes": [{"name": "config", "configMap": {"name": f"{app}-config", "defaultMode": 420}},
                    {"name": "kube-api-access-x7k2p", "projected": {"defaultMode": 420, "sources": [
                        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                        {"configMap": {"name": "kube-root-ca.crt",
                                       "items": [{"key": "ca.crt", "path": "ca.crt"}]}}]}}],
        "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute",
                         "tolerationSeconds": 300},
                        {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
                         "tolerationSeconds": 300}],
    }


def _status(app: str, ip: str, node: str) -> dict[str, Any]:
    when = "2026-11-20T10:00:03Z"
    conditions = [{"type": kind, "status": "True", "lastProbeTime": None, "lastTransitionTime": when}
                  for kind in ("PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady",
                               "PodScheduled")]
    return {
        "phase": "Running", "conditions": conditions, "hostIP": "192.168.1.21",
        "hostIPs": [{"ip": "192.168.1.21"}], "podIP": ip, "podIPs": [{"ip": ip}], "startTime": when,
        "qosClass": "Burstable",
        "containerStatuses": [{"name": app, "state": {"running": {"startedAt": when}}, "lastState": {},
                               "ready": True, "restartCount": 0, "started": True,
                               "image": f"registry.example.com/shop/{app}:1.4.2",
                               "imageID": "registry.example.com/shop/app@sha256:" + "9f" * 32,
                               "containerID": "containerd://" + "3c" * 32}],
    }


# --- the measured child ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PodSummary:
    """What the agent keeps per pod (docs/kubernetes.md, "all pods")."""

    namespace: str
    name: str
    uid: str
    ip: str
    node: str
    service_account: str
    owner_kind: str
    owner_name: str
    labels: tuple[tuple[str, str], ...]


def summarize(obj: dict[str, Any]) -> PodSummary:
    metadata, spec = obj["metadata"], obj.get("spec", {})
    owner: dict[str, Any] = next(iter(metadata.get("ownerReferences") or ()), {})
    labels = metadata.get("labels") or {}
    kept = tuple((sys.intern(key), sys.intern(labels[key])) for key in KEPT_LABELS if key in labels)
    return PodSummary(sys.intern(metadata["namespace"]), metadata["name"], metadata["uid"],
                      obj.get("status", {}).get("podIP", ""), sys.intern(spec.get("nodeName", "")),
                      sys.intern(spec.get("serviceAccountName", "default")),
                      sys.intern(owner.get("kind", "")), owner.get("name", ""), kept)


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


async def measure_reflector(kubeconfig: str, whole: bool, page_size: int) -> dict[str, Any]:
    client = KubeClient(KubeConfig.load(kubeconfig), timeout=30.0)
    await client.request("GET", "/api/v1/namespaces", params={"limit": "1"})  # TLS session, pool, buffers
    project = (lambda obj: obj) if whole else summarize
    reflector: Reflector[Any] = Reflector(client, "/api/v1/pods", project, page_size=page_size)
    gc.collect()
    before, hwm_before = status_kib("VmRSS"), status_kib("VmHWM")
    started = time.monotonic()
    async with asyncio.TaskGroup() as group:
        running = group.create_task(reflector.run())
        await reflector.synced.wait()
        synced_after = time.monotonic() - started
        running.cancel()
    gc.collect()
    after, hwm_after = status_kib("VmRSS"), status_kib("VmHWM")
    await client.close()
    return {"before": before, "after": after, "hwm_before": hwm_before, "hwm_after": hwm_after,
            "count": len(reflector.store), "seconds": synced_after}


# --- the run ---------------------------------------------------------------------------------------

async def populate(kubeconfig: Path, count: int) -> int:
    """Create the namespaces and pods through the API (keep-alive, a few at a time); mean JSON size."""
    client = KubeClient(KubeConfig.load(str(kubeconfig)), timeout=30.0)
    try:
        for namespace in NAMESPACES:
            await client.request("POST", "/api/v1/namespaces", body={"metadata": {"name": namespace}})
        sizes = []
        for start in range(0, count, 4):
            pods = [realistic_pod(index) for index in range(start, min(count, start + 4))]
            created = await asyncio.gather(*(
                client.request("POST", f"/api/v1/namespaces/{pod['metadata']['namespace']}/pods", body=pod)
                for pod in pods))
            sizes += [len(json.dumps(pod, separators=(",", ":"))) for pod in created]
        return int(statistics.mean(sizes))
    finally:
        await client.close()


@contextlib.contextmanager
def api_server_process(directory: Path) -> Any:
    process = subprocess.Popen([sys.executable, "-m", "tests.support.kubeapi", "--dir", str(directory)],
                               cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while not (directory / "ready").exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the in-test API server did not start")
            time.sleep(0.05)
        yield directory / "kubeconfig"
    finally:
        process.terminate()
        process.wait(10)


def child_run(kubeconfig: Path, whole: bool, page_size: int, environment: dict[str, str]) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", str(kubeconfig), "--page-size", str(page_size)]
    command += ["--whole"] if whole else []
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=environment)
    return dict(json.loads(result.stdout))


def per_pod(kubeconfig: Path, whole: bool, page_size: int, runs: int,
            environment: dict[str, str]) -> dict[str, float]:
    samples = [child_run(kubeconfig, whole, page_size, environment) for _ in range(runs)]
    per_pod_kib = [(s["after"] - s["before"]) / s["count"] for s in samples]
    return {
        "count": samples[0]["count"],
        "min_kib": min(per_pod_kib),
        "max_kib": max(per_pod_kib),
        "rss_mib": statistics.median(s["after"] - s["before"] for s in samples) / 1024,
        "per_pod_kib": statistics.median(per_pod_kib),
        "peak_mib": statistics.median(s["hwm_after"] - s["hwm_before"] for s in samples) / 1024,
        "total_mib": statistics.median(s["after"] for s in samples) / 1024,
        "seconds": statistics.median(s["seconds"] for s in samples),
    }


def report(imports: dict[str, int], third: dict[str, int], versions: dict[str, str], pod_json: int,
           rows: dict[str, dict[str, float]]) -> str:
    base = imports["standard library only"]
    lines = ["| imports (fresh `python -c`, median of 5) | VmRSS MiB | over the stdlib |",
             "| --- | ---: | ---: |"]
    for label, kib in imports.items():
        lines.append(f"| {label} | {kib / 1024:.1f} | +{(kib - base) / 1024:.1f} |")
    if third:
        third_base = third["standard library only (scratch venv)"]
        for label, kib in third.items():
            if label != "standard library only (scratch venv)":
                lines.append(f"| {label} | {kib / 1024:.1f} | +{(kib - third_base) / 1024:.1f} |")
        lines.append(f"\nThird-party versions: lightkube {versions['lightkube']}, "
                     f"kubernetes {versions['kubernetes']}.")
    count = next(iter(rows.values()))["count"]
    lines += ["", f"Reflector over {count:,} pods (mean {pod_json:,} bytes of JSON each), run medians:",
              "", "| kept per pod | RSS after sync − before | per pod (runs' range) | peak (VmHWM) growth "
              "| process RSS after | list time |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for label, row in rows.items():
        lines.append(f"| {label} | {row['rss_mib']:.1f} MiB | {row['per_pod_kib']:.2f} KiB "
                     f"({row['min_kib']:.1f}–{row['max_kib']:.1f}) | {row['peak_mib']:.1f} MiB | "
                     f"{row['total_mib']:.1f} MiB | {row['seconds']:.2f} s |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pods", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--third-party", action="store_true", help="also measure lightkube and kubernetes")
    parser.add_argument("--child", metavar="KUBECONFIG", help=argparse.SUPPRESS)
    parser.add_argument("--whole", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--page-size", type=int, default=500, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(measure_reflector(args.child, args.whole, args.page_size))))
        return 0
    with tempfile.TemporaryDirectory(prefix="kube-memory-") as directory:
        environment = bytecode_environment(str(Path(directory) / "pycache"))
        imports = {"standard library only": rss_kib(sys.executable, BASE, environment),
                   "Pinion client + reflector": rss_kib(sys.executable, OURS, environment)}
        third, versions = third_party_imports(environment) if args.third_party else ({}, {})
        with api_server_process(Path(directory) / "api") as kubeconfig:
            pod_json = asyncio.run(populate(kubeconfig, args.pods))
            child_run(kubeconfig, False, 500, environment)  # warm-up: compiles the child's bytecode
            rows = {
                "projection (PodSummary, 9 fields), pages of 500": per_pod(kubeconfig, False, 500, args.runs,
                                                                          environment),
                "projection, pages of 100": per_pod(kubeconfig, False, 100, args.runs, environment),
                "projection, pages of 500, `MALLOC_MMAP_THRESHOLD_=131072`": per_pod(
                    kubeconfig, False, 500, args.runs, environment | {"MALLOC_MMAP_THRESHOLD_": "131072"}),
                "whole object (dict), pages of 500": per_pod(kubeconfig, True, 500, args.runs, environment),
            }
    print(report(imports, third, versions, pod_json, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
