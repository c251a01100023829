"""The scrape configurations Pinion ships (deploy/prometheus/ and the Service annotations in
deploy/daemonset.yaml) all keep the agents' own namespace/pod labels: honor_labels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def test_the_plain_scrape_job_honours_labels_and_keeps_only_the_admin_port() -> None:
    (config,) = _documents("prometheus/scrape-config.yaml")
    (job,) = config["scrape_configs"]
    assert job["honor_labels"] is True
    (discovery,) = job["kubernetes_sd_configs"]
    assert discovery["role"] == "pod" and discovery["namespaces"]["names"] == ["pinion-system"]
    keep = job["relabel_configs"][0]
    assert keep == {"source_labels": ["__meta_kubernetes_pod_container_port_name"], "action": "keep",
                    "regex": "admin"}


def test_the_operator_monitors_honour_labels_on_the_agents_admin_port() -> None:
    (pod_monitor,) = _documents("prometheus/podmonitor.yaml")
    (service_monitor,) = _documents("prometheus/servicemonitor.yaml")
    assert pod_monitor["kind"] == "PodMonitor" and service_monitor["kind"] == "ServiceMonitor"
    for monitor, endpoints in ((pod_monitor, "podMetricsEndpoints"), (service_monitor, "endpoints")):
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "pinion-agent"}
        assert [(e["port"], e["honorLabels"]) for e in monitor["spec"][endpoints]] == [("admin", True)]


def test_the_service_carries_the_prometheus_community_annotations() -> None:
    """The chart's kubernetes-service-endpoints job keeps annotated Services and has
    honor_labels: true, so the annotations alone are enough there."""
    service = next(d for d in _documents("daemonset.yaml") if d["kind"] == "Service")
    assert service["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true", "prometheus.io/port": "4191", "prometheus.io/path": "/metrics"}
