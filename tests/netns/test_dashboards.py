"""Linkerd's Grafana dashboards and `linkerd viz` queries against Pinion (issue #14).

A two-node cluster in Kubernetes mode (the in-test API server), a real Prometheus that finds
both agents through the shipped scrape configuration (deploy/prometheus/scrape-config.yaml:
its relabelling and honor_labels as shipped; Kubernetes pod discovery replaced by the same
targets and __meta labels through file_sd, as Debian's Prometheus has no Kubernetes
discovery), and a known traffic mix: a Deployment client calling a Deployment web over mTLS
(HTTP 200/500 through a Service VIP, gRPC OK/NOT_FOUND/UNAVAILABLE, refused connections),
pairs of StatefulSets, Jobs, DaemonSets and CronJobs calling each other, every meshed pod
calling an unmeshed one and called by one (plaintext).

The queries have the shapes of linkerd/linkerd2 grafana/dashboards (variables and panels,
$__rate_interval as 30s; with PINION_LINKERD_DASHBOARDS=<dir of their JSON> the dashboards'
own queries are read and run) and of viz/metrics-api: each must return data, and the success
rate must agree with what the clients saw."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.lab.agents import REPO
from agent.lab.topology import Pod
from tests.netns.conftest import eventually
from tests.netns.test_golden_metrics import GRPC, HTTP1_CLIENT
from tests.netns.test_kubernetes import Cluster, kubernetes_cluster
from tests.netns.test_prometheus import Prometheus

pytestmark = pytest.mark.netns

SCRAPE_CONFIG = REPO / "deploy" / "prometheus" / "scrape-config.yaml"
RATE = "30s"
VIP = "10.43.0.20"
# Linkerd's proxies export no tcp_connection_duration_ms any more (linkerd2-proxy has no such
# metric): those panels are empty on Linkerd too. TCP CONNECTION FAILURES panels have data only
# where a connection failed (here: web's inbound side, deployment dashboard).
NOT_EXPORTED_BY_LINKERD = "tcp_connection_duration_ms_bucket"


def owned_pod(cluster: Cluster, node: int, name: str, namespace: str, owner: tuple[str, str, str],
              labels: dict[str, str] | None = None) -> Pod:
    """A pod object owned by `owner` (apiVersion, kind, name), then its sandbox, as kubelet."""
    api_version, kind, owner_name = owner
    obj = cluster.api.apply({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {"app": owner_name},
                     "ownerReferences": [{"apiVersion": api_version, "kind": kind, "name": owner_name,
                                          "controller": True, "uid": str(uuid.uuid4())}]},
        "spec": {"nodeName": cluster.lab.nodes[node].name,
                 "serviceAccountName": (labels or {}).get("app", owner_name),
                 "containers": [{"name": "app", "image": "lab"}]},
        "status": {"phase": "Pending"}})
    pod = cluster.sandbox(node, name, namespace, obj["metadata"]["uid"])
    obj["status"] = {"phase": "Running", "podIP": pod.ip, "podIPs": [{"ip": pod.ip}]}
    cluster.objects[f"{namespace}/{name}"] = cluster.api.apply(obj)
    return pod


def agent_pods(cluster: Cluster) -> list[dict[str, Any]]:
    """The agents as the DaemonSet's pods: hostNetwork (pod IP = node IP), port `admin`."""
    cluster.namespace("pinion-system")
    pods = []
    for index, agent in enumerate(cluster.agents):
        pods.append(cluster.api.apply({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"pinion-agent-n{index}", "namespace": "pinion-system",
                         "labels": {"app.kubernetes.io/name": "pinion-agent"}},
            "spec": {"nodeName": agent.node.name, "hostNetwork": True,
                     "containers": [{"name": "agent", "image": "pinion", "ports": [
                         {"name": "admin", "containerPort": agent.admin[1]},
                         {"name": "unrelated", "containerPort": 9}]}]},
            "status": {"phase": "Running", "podIP": agent.admin[0],
                       "podIPs": [{"ip": agent.admin[0]}]}}))
    return pods


def discovered(pods: list[dict[str, Any]], job: dict[str, Any]) -> list[dict[str, Any]]:
    """What Prometheus' Kubernetes pod discovery (role: pod) gives the job for these pods: one
    target per container port, with its __meta_kubernetes_* labels, after the job's namespace
    and label selectors. Debian's Prometheus is built without Kubernetes discovery, so the test
    hands these to file_sd; the job's relabel_configs and honor_labels then run as shipped."""
    (discovery,) = job["kubernetes_sd_configs"]
    assert discovery["role"] == "pod"
    namespaces = discovery["namespaces"]["names"]
    wanted = dict(s["label"].split("=", 1) for s in discovery["selectors"] if s["role"] == "pod")
    groups = []
    for pod in pods:
        meta, labels = pod["metadata"], pod["metadata"].get("labels", {})
        if meta["namespace"] not in namespaces or any(labels.get(k) != v for k, v in wanted.items()):
            continue
        for container in pod["spec"]["containers"]:
            for port in container.get("ports", []):
                groups.append({"targets": [f"{pod['status']['podIP']}:{port['containerPort']}"], "labels": {
                    "__meta_kubernetes_namespace": meta["namespace"],
                    "__meta_kubernetes_pod_name": meta["name"],
                    "__meta_kubernetes_pod_node_name": pod["spec"]["nodeName"],
                    "__meta_kubernetes_pod_container_name": container["name"],
                    "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
                    "__meta_kubernetes_pod_container_port_number": str(port["containerPort"]),
                    **{"__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", k): v
                       for k, v in labels.items()}}})
    return groups


def shipped_config(pods: list[dict[str, Any]], directory: Path) -> dict[str, Any]:
    """deploy/prometheus/scrape-config.yaml as shipped, but for discovery (see `discovered`)
    and a 1 s interval."""
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    for job in config["scrape_configs"]:
        targets = directory / f"{job['job_name']}.json"
        targets.write_text(json.dumps(discovered(pods, job)))
        del job["kubernetes_sd_configs"]
        job["file_sd_configs"] = [{"files": [str(targets)]}]
        job["scrape_interval"] = "1s"
    return {"global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            **config}


class ClusterPrometheus(Prometheus):
    """test_prometheus' Prometheus, in node0's netns, with the configuration given."""

    def __init__(self, cluster: Cluster, config: dict[str, Any]) -> None:
        self.node = cluster.lab.nodes[0]
        self.address = (self.node.underlay_ip, 9090)
        self.dir = cluster.lab.workdir / "prometheus"
        self.dir.mkdir()
        (self.dir / "prometheus.yml").write_text(json.dumps(config))
        self.log_path = self.dir / "prometheus.log"
        self.process: subprocess.Popen[Any] | None = None

    def label_values(self, label: str, selector: str) -> list[str]:
        """Grafana's label_values(selector, label), answered from a query."""
        return sorted({r["metric"][label] for r in self.query(f"group by ({label}) ({selector})")
                       if r["metric"].get(label)})


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with kubernetes_cluster(tmp_path) as running:
        yield running


def _http(client: Pod, host: str, port: int, ok: int, failed: int) -> dict[str, int]:
    paths = (["/status/200"] * ok + ["/status/500"] * failed)
    result = client.run([sys.executable, "-c", HTTP1_CLIENT, host, str(port), json.dumps(paths), "2"],
                        timeout=60)
    return dict(json.loads(result.stdout))


def _service(cluster: Cluster, web: Pod) -> None:
    port = {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}
    cluster.api.apply({"apiVersion": "v1", "kind": "Service",
                       "metadata": {"name": "web", "namespace": "shop"},
                       "spec": {"clusterIP": VIP, "clusterIPs": [VIP], "ports": [port]}})
    cluster.api.apply({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
                       "metadata": {"name": "web-x1", "namespace": "shop",
                                    "labels": {"kubernetes.io/service-name": "web"}},
                       "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                       "endpoints": [{"addresses": [web.ip], "conditions": {"ready": True}}]})


def _panel_queries(name: str) -> list[tuple[str, str]]:
    """The dashboard's panel queries: from its JSON when PINION_LINKERD_DASHBOARDS names a
    directory holding linkerd2's grafana/dashboards (not vendored here), else the same query
    shapes written out by `_workload_panels`."""
    directory = os.environ.get("PINION_LINKERD_DASHBOARDS")
    if not directory:
        return _workload_panels(name)
    dashboard = json.loads((Path(directory) / f"{name}.json").read_text())
    found: list[tuple[str, str]] = []

    def walk(panel: dict[str, Any]) -> None:
        found.extend((panel.get("title", ""), t["expr"]) for t in panel.get("targets") or [] if t.get("expr"))
        for child in panel.get("panels") or []:
            walk(child)
    for panel in dashboard.get("panels") or []:
        walk(panel)
    return found


_LABEL = {"top-line": "deployment", "namespace": "deployment", "deployment": "deployment", "pod": "pod",
          "statefulset": "statefulset", "job": "k8s_job", "daemonset": "daemonset", "cronjob": "cronjob",
          "health": "deployment"}
_VARIABLE = {"job": "job", "pod": "pod", "top-line": "deployment", "namespace": "deployment",
             "health": "deployment"}


def _golden(selector: str, by: str) -> list[tuple[str, str]]:
    """A row of Linkerd's dashboards: success rate, request rate (mTLS and not), latencies."""
    rate, group = "[$__rate_interval]", f" by ({by})" if by else ""
    panels = [("SUCCESS RATE", f'sum(irate(response_total{{classification="success", {selector}}}{rate}))'
                               f'{group} / sum(irate(response_total{{{selector}}}{rate})){group}'),
              ("REQUEST RATE", f'sum(irate(request_total{{{selector}, tls="true"}}{rate})){group}'),
              ("REQUEST RATE", f'sum(irate(request_total{{{selector}, tls!="true"}}{rate})){group}')]
    panels += [("LATENCY", f"histogram_quantile({q}, sum(irate(response_latency_ms_bucket{{{selector}}}"
                           f"{rate})) by (le{', ' + by if by else ''}))") for q in ("0.5", "0.95", "0.99")]
    return panels


def _workload_panels(name: str) -> list[tuple[str, str]]:
    """Linkerd's per-workload dashboard rows, for the workload label of `name`: its inbound
    traffic, its TCP, who calls it (outbound series naming it as dst_), whom it calls."""
    if name == "authority":
        base = 'namespace="$namespace", authority="$authority"'
        return (_golden(f'{base}, direction="inbound"', "authority")
                + _golden(f'{base}, direction="outbound"', "deployment")
                + _golden(f'{base}, direction="outbound"', "pod"))
    if name == "service":
        base = 'dst_namespace="$namespace", dst_service="$service", direction="outbound"'
        return _golden(base, "dst_service") + _golden(base, "deployment")
    label = _LABEL[name]
    own = f'namespace="$namespace", {label}="${_VARIABLE.get(name, label)}"'
    if name == "health":
        own = 'namespace=~"$namespace|$namespace-viz", deployment="$deployment"'
    panels = _golden(f'{own}, direction="inbound"', label)
    panels += [("TCP CONNECTION FAILURES", f'tcp_close_total{{{own}, direction="inbound", errno!=""}}'),
               ("TCP CONNECTIONS OPEN", f'tcp_open_connections{{{own}, direction="inbound"}}')]
    if name in ("top-line", "namespace", "health"):
        return panels
    dst = f'dst_namespace="$namespace", dst_{label}="${_VARIABLE.get(name, label)}"'
    panels += [("INBOUND", f'count(count(request_total{{{dst}, {label}!="", direction="outbound"}}) '
                           f"by (namespace, {label}))")]
    panels += _golden(f'{label}="$inbound", {dst}, direction="outbound"', f"{label}, pod")
    panels += _golden(f'{own}, direction="outbound"', f"dst_{label}")
    panels += [("OUTBOUND", f'count(count(request_total{{{own}, direction="outbound"}}) '
                            f"by (namespace, dst_{label}))"),
               ("TCP CONNECTIONS OPEN", f'tcp_open_connections{{{own}, direction="outbound"}}')]
    return panels + _golden(f'{own}, dst_{label}="$outbound", direction="outbound"', f"dst_{label}")


def _substituted(expr: str, variables: dict[str, str]) -> str:
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace(f"${name}", variables[name])
    return expr.replace("$__rate_interval", RATE)


# Meshed workloads in pairs across the nodes, each calling the other over mTLS (so every
# dashboard's inbound and outbound rows have traffic): (node, pod, owner apiVersion, kind, name).
WORKLOADS = [
    (0, "client-5f6d7-k8m2n", "apps/v1", "ReplicaSet", "client-5f6d7"), (1, "web-7c9d8f-x2b4q", "apps/v1",
                                                                         "ReplicaSet", "web-7c9d8f"),
    (0, "cache-0", "apps/v1", "StatefulSet", "cache"), (1, "db-0", "apps/v1", "StatefulSet", "db"),
    (0, "backup-29k4x", "batch/v1", "Job", "backup"), (1, "report-7h2kq", "batch/v1", "Job", "report"),
    (0, "logger-q7w2z", "apps/v1", "DaemonSet", "logger"), (1, "shipper-m4x9p", "apps/v1", "DaemonSet",
                                                            "shipper"),
    (0, "nightly-29000000-x2k4p", "batch/v1", "Job", "nightly-29000000"),  # Jobs of CronJobs
    (1, "hourly-29000060-q8w3z", "batch/v1", "Job", "hourly-29000060"),
]


def test_linkerds_dashboards_and_viz_queries_answer_from_pinions_metrics(cluster: Cluster) -> None:
    agents = agent_pods(cluster)
    cluster.namespace("legacy")
    for job, cronjob in (("nightly-29000000", "nightly"), ("hourly-29000060", "hourly")):
        cluster.api.apply({"apiVersion": "batch/v1", "kind": "Job", "metadata": {
            "name": job, "namespace": "shop", "ownerReferences": [
                {"apiVersion": "batch/v1", "kind": "CronJob", "name": cronjob, "controller": True,
                 "uid": str(uuid.uuid4())}]}})
    pods: dict[str, Pod] = {}
    for node, name, api_version, kind, owner in WORKLOADS:
        labels = {"app": owner.split("-")[0]}
        if kind == "ReplicaSet":
            labels["pod-template-hash"] = owner.split("-")[1]
        pods[owner.split("-")[0]] = owned_pod(cluster, node, name, "shop", (api_version, kind, owner), labels)
    old = owned_pod(cluster, 1, "old-0", "legacy", ("apps/v1", "StatefulSet", "old"))
    outsider = owned_pod(cluster, 0, "outsider-0", "legacy", ("apps/v1", "StatefulSet", "outsider"))
    for pod in [*pods.values(), old]:
        cluster.serve(pod, "--port", "8080")
    web = pods["web"]
    grpc = web.spawn([sys.executable, "-m", GRPC, "--port", "50051"], stdout=subprocess.PIPE, text=True,
                     cwd=str(REPO))
    cluster.servers.append(grpc)
    assert grpc.stdout is not None and grpc.stdout.readline().strip() == "listening"
    _service(cluster, web)
    assert eventually(lambda: _http(pods["client"], VIP, 80, 1, 0) == {"200": 1}, 10)

    prometheus = ClusterPrometheus(cluster, shipped_config(agents, cluster.lab.workdir))
    try:
        prometheus.start()
        prometheus.wait_for("both agents found and scraped", lambda: sorted(
            float(r["value"][1]) for r in prometheus.query('up{job="pinion-agent"}')) == [1.0, 1.0])
        assert len(prometheus.query("up")) == 2  # the `unrelated` port was not kept
        _run_mix(cluster, pods, old, outsider, prometheus)
        _check_success_rate(prometheus)
        # connections refused: by web's app (web's inbound side), and to web (its outbound side):
        # tcp_close_total{errno="ECONNREFUSED"}
        pods["client"].run(["curl", "-s", "--max-time", "2", f"http://{web.ip}:9999/"], check=False)
        web.run(["curl", "-s", "--max-time", "2", f"http://{old.ip}:9999/"], check=False)
        refused = 'namespace="shop", deployment="web", errno="ECONNREFUSED"'
        prometheus.wait_for("the refused connections scraped", lambda: len(
            prometheus.query(f"sum(tcp_close_total{{{refused}}}) by (direction)")) == 2)
        _check_dashboards(prometheus)
        _check_viz_queries(prometheus)
        _check_cli(cluster, pods, old)
    finally:
        prometheus.stop()


def _run_mix(cluster: Cluster, pods: dict[str, Pod], old: Pod, outsider: Pod,
             prometheus: ClusterPrometheus) -> None:
    """Two rounds (rates need two points) of: each pair both ways over mTLS, HTTP and gRPC
    errors from client to web (through the Service VIP), every meshed pod to an unmeshed one
    and back (plaintext)."""
    seen = {"200": 0, "500": 0}
    pairs = [("client", "web"), ("cache", "db"), ("backup", "report"), ("logger", "shipper"),
             ("nightly", "hourly")]
    for _ in range(2):
        for status, count in _http(pods["client"], VIP, 80, 45, 5).items():
            seen[status] += count
        grpc = pods["client"].run([sys.executable, "-m", "agent.lab.grpcclient", f"{pods['web'].ip}:50051",
                                   "--ok", "4", "--fail", "5=2", "--fail", "14=2"], cwd=str(REPO), timeout=30)
        assert json.loads(grpc.stdout) == {"0": 4, "5": 2, "14": 2}
        for first, second in pairs:
            assert _http(pods[first], pods[second].ip, 8080, 4, 1) == {"200": 4, "500": 1}
            assert _http(pods[second], pods[first].ip, 8080, 4, 1) == {"200": 4, "500": 1}
        for pod in pods.values():
            assert _http(pod, old.ip, 8080, 2, 0) == {"200": 2}
            assert _http(outsider, pod.ip, 8080, 2, 0) == {"200": 2}
        time.sleep(2)
    assert seen == {"200": 90, "500": 10}
    served = cluster.agents[1].metrics().value("request_total", direction="inbound", namespace="shop",
                                               deployment="web")
    prometheus.wait_for("the last round scraped", lambda: prometheus.scalar(
        'sum(request_total{direction="inbound", namespace="shop", deployment="web"})') == served)


DASHBOARDS: dict[str, dict[str, str]] = {
    # variables, as a user would pick them from the variable queries' answers
    "top-line": {"namespace": "shop", "deployment": "web"},
    "namespace": {"namespace": "shop", "deployment": "web"},
    "deployment": {"namespace": "shop", "deployment": "web", "inbound": "client", "outbound": "client"},
    "pod": {"namespace": "shop", "pod": "web-7c9d8f-x2b4q", "deployment": "web",
            "inbound": "client-5f6d7-k8m2n", "outbound": "client-5f6d7-k8m2n"},
    "service": {"namespace": "shop", "service": "web"},
    "authority": {"namespace": "shop", "authority": VIP},
    "statefulset": {"namespace": "shop", "statefulset": "db", "inbound": "cache", "outbound": "cache"},
    "job": {"namespace": "shop", "job": "backup", "inbound": "report", "outbound": "report"},
    "daemonset": {"namespace": "shop", "daemonset": "logger", "inbound": "shipper", "outbound": "shipper"},
    "cronjob": {"namespace": "shop", "cronjob": "nightly", "inbound": "hourly", "outbound": "hourly"},
    "health": {"namespace": "shop", "namespace-viz": "shop", "deployment": "web"},
}


def _may_be_empty(name: str, expr: str) -> bool:
    """Panels this traffic cannot fill, on Linkerd either: plaintext towards a meshed workload
    (it is all mTLS), the authority dashboard's outbound rows (only web's own callers name the
    VIP: client has them), connection failures other than web's refused one."""
    if 'tls!="true"' in expr and ('dst_' in expr.split("}")[0] or name in ("service", "authority")):
        return True
    return 'errno!=""' in expr and name not in ("deployment", "pod")


def _check_dashboards(prometheus: ClusterPrometheus) -> None:
    # the variable queries of the dashboards fill
    process = "process_start_time_seconds"
    assert "shop" in prometheus.label_values("namespace", f'{process}{{deployment!=""}}')
    assert prometheus.label_values("deployment", f'{process}{{namespace="shop"}}') == ["client", "web"]
    assert prometheus.label_values("statefulset", f'{process}{{namespace="shop"}}') == ["cache", "db"]
    assert prometheus.label_values("k8s_job", f'{process}{{namespace="shop"}}') == ["backup", "report"]
    assert prometheus.label_values("daemonset", f'{process}{{namespace="shop"}}') == ["logger", "shipper"]
    assert prometheus.label_values("cronjob", f'{process}{{namespace="shop"}}') == ["hourly", "nightly"]
    assert "web-7c9d8f-x2b4q" in prometheus.label_values("pod", f'{process}{{namespace="shop"}}')
    assert prometheus.label_values("dst_service", 'request_total{namespace="shop"}') == ["web"]
    assert VIP in prometheus.label_values("authority", 'request_total{namespace="shop"}')
    assert prometheus.label_values(
        "k8s_job", 'request_total{dst_namespace="shop", dst_k8s_job="backup"}') == ["report"]
    empty: list[str] = []
    ran = 0
    for name, variables in DASHBOARDS.items():
        panels = [(title, expr) for title, expr in _panel_queries(name)
                  if NOT_EXPORTED_BY_LINKERD not in expr and 'job="linkerd-' not in expr]
        assert panels, name
        for title, expr in panels:
            query = _substituted(expr, variables)
            ran += 1
            if not prometheus.query(query) and not _may_be_empty(name, expr):
                empty.append(f"{name} / {title}: {query}")
    print(f"{ran} panel queries run, {len(empty)} empty")
    assert not empty, "\n".join(empty)


def _check_success_rate(prometheus: ClusterPrometheus) -> None:
    """What web served over mTLS, as its clients saw it: HTTP through the VIP 1 (the warm-up)
    + 90 x 200 and 10 x 500, HTTP from client directly 8 x 200 and 2 x 500, gRPC 8 OK,
    4 NOT_FOUND (a success, as Linkerd classifies it) and 4 UNAVAILABLE (a failure).
    Compared on the counters themselves: increase() extrapolates each series on its own, so
    the ratio of two increases is not the ratio of what happened."""
    web = 'namespace="shop", deployment="web", direction="inbound", tls="true"'
    success = prometheus.scalar(f'sum(response_total{{{web}, classification="success"}})')
    total = prometheus.scalar(f"sum(response_total{{{web}}})")
    requests = prometheus.scalar(f"sum(request_total{{{web}}})")
    assert success is not None and total
    expected = (1 + 90 + 8 + 8 + 4) / (1 + 100 + 10 + 16)
    print(f"web success rate {success / total:.4f}, clients saw {expected:.4f}; requests {requests}")
    assert requests == total == 1 + 100 + 10 + 16
    assert success / total == pytest.approx(expected, rel=0.02)


def _check_viz_queries(prometheus: ClusterPrometheus) -> None:
    """viz/metrics-api: stat (pods and --to), edges, pod list."""
    inbound = prometheus.query('sum(increase(response_total{direction="inbound", namespace="shop"}[1m])) '
                               'by (deployment, classification, tls)')
    assert {r["metric"].get("deployment") for r in inbound} >= {"web"}
    to = ('direction="outbound", dst_deployment="web", dst_namespace="shop", deployment="client", '
          'namespace="shop"')
    for query in (f'sum(increase(tcp_read_bytes_total{{{to}, peer="dst"}}[1m])) by (deployment)',
                  f'sum(increase(tcp_write_bytes_total{{{to}, peer="dst"}}[1m])) by (deployment)',
                  f"sum(tcp_open_connections{{{to}}}) by (deployment)"):
        assert prometheus.query(query), query
    edges = prometheus.query('sum(tcp_open_connections{direction="outbound"}) by (deployment, '
                             'dst_deployment, pod, server_id, namespace, dst_namespace, no_tls_reason)')
    assert edges is not None  # connections are closed by now: an empty answer is Linkerd's too
    plain = prometheus.query('sum(tcp_open_total{direction="outbound", peer="dst", dst_namespace="legacy"}) '
                             'by (pod, no_tls_reason)')
    assert {r["metric"]["no_tls_reason"] for r in plain} == {"not_provided_by_service_discovery"}
    assert len(plain) == len(WORKLOADS)
    pods = prometheus.query('max(process_start_time_seconds{namespace="shop"}) by (pod, namespace)')
    assert {r["metric"]["pod"] for r in pods} == {name for _, name, *_ in WORKLOADS}


HOLD_OPEN = """
import socket, sys, time
connections = [socket.create_connection((host, 8080), timeout=5) for host in sys.argv[1:]]
print("open", flush=True)
time.sleep(20)
"""
STAT_HEADERS = ["NAME", "MESHED", "SUCCESS", "RPS", "LATENCY_P50", "LATENCY_P95", "LATENCY_P99", "TCP_CONN",
                "READ_BYTES/SEC", "WRITE_BYTES/SEC"]


def _pinion(cluster: Cluster, *argv: str) -> str:
    agents = [f"--agent={a.admin[0]}:{a.admin[1]}" for a in cluster.agents]
    done = cluster.lab.nodes[0].run([sys.executable, "-m", "agent", *argv, *agents], cwd=str(REPO),
                                    timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    print(f"$ pinion {' '.join(argv)}\n{done.stdout}")
    return str(done.stdout)


def _check_cli(cluster: Cluster, pods: dict[str, Pod], old: Pod) -> None:
    """`pinion stat` / `edges` on the same cluster print linkerd viz's columns and formats, and
    their numbers are the traffic's."""
    holder = pods["client"].spawn([sys.executable, "-c", HOLD_OPEN, pods["web"].ip, old.ip],
                                  stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        def send() -> None:
            time.sleep(0.5)  # inside the window, which starts with the first scrape
            _http(pods["client"], VIP, 80, 36, 4)

        sender = threading.Thread(target=send)
        sender.start()
        table = _pinion(cluster, "stat", "deploy", "-n", "shop", "-t", "4s", "-o", "wide")
        sender.join(60)
        edges_out = _pinion(cluster, "edges", "po", "-n", "shop")
        wide_edges = _pinion(cluster, "edges", "deploy", "-n", "shop", "-o", "wide")
    finally:
        holder.kill()
        holder.wait(5)
    header, *rows = table.splitlines()
    assert header.split() == STAT_HEADERS
    cells = {row.split()[0]: row.split() for row in rows}
    assert sorted(cells) == ["client", "web"]
    web = cells["web"]
    assert web[1] == "1/1" and web[2] == "90.00%"   # 36 x 200, 4 x 500 in the window
    assert re.fullmatch(r"\d+\.\drps", web[3]) and 40 / 6 <= float(web[3][:-3]) <= 40 / 4
    assert all(re.fullmatch(r"\d+ms", cell) for cell in web[4:7])
    assert re.fullmatch(r"\d+", web[7]) and int(web[7]) >= 1  # the connection held open
    assert all(re.fullmatch(r"\d+\.\dB/s", cell) for cell in web[8:])
    assert cells["client"][2:] == ["-"] * 8  # served nothing in the window
    lines = edges_out.splitlines()
    assert lines[0].split() == ["SRC", "DST", "SRC_NS", "DST_NS", "SECURED"]
    assert [line.split()[:4] for line in lines[1:]] == [
        ["client-5f6d7-k8m2n", "old-0", "shop", "legacy"],
        ["client-5f6d7-k8m2n", "web-7c9d8f-x2b4q", "shop", "shop"]]
    assert lines[1].rstrip().endswith("   Not Provided By Service Discovery")
    assert lines[2].split()[4] == "√"
    wide = wide_edges.splitlines()
    assert wide[0].split() == ["SRC", "DST", "SRC_NS", "DST_NS", "CLIENT_ID", "SERVER_ID", "SECURED"]
    assert ["client", "web", "shop", "shop", "client.shop", "web.shop", "√"] in [w.split() for w in wide]
