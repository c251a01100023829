"""Golden metrics from Prometheus, for `pinion dashboard --prometheus URL`: the queries
Linkerd's viz dashboard runs, over Pinion's metric names (the agents export Linkerd's schema),
as instant queries on `/api/v1/query`. The inbound side, as `pinion stat`: what each pod
served. A window (`rate(...[1m])`) instead of two scrapes, so numbers survive a refresh."""

from __future__ import annotations

import json
import math
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
QUANTILES = {"latency_ms_p50": 0.5, "latency_ms_p95": 0.95, "latency_ms_p99": 0.99}


class PrometheusError(Exception):
    pass


class Prometheus:
    def __init__(self, url: str, window: str = "1m", timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.window = window
        self._timeout = timeout

    def query(self, promql: str) -> list[tuple[dict[str, str], float]]:
        target = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        try:
            with _OPENER.open(target, timeout=self._timeout) as response:
                answer = json.loads(response.read())
        except (OSError, ValueError) as exc:
            raise PrometheusError(f"{self.url}: {exc}") from exc
        if answer.get("status") != "success":
            raise PrometheusError(f"{self.url}: {answer.get('error', 'query failed')}")
        found = []
        for item in answer["data"]["result"]:
            value = float(item["value"][1])
            found.append((dict(item["metric"]), value))
        return found

    def golden(self, by: Sequence[str],
               namespace: str | None = None) -> dict[tuple[str, ...], dict[str, Any]]:
        """{label values of `by`: success, rps, p50/p95/p99, tcp} of the inbound side."""
        where = 'direction="inbound"' + (f',namespace="{_quoted(namespace)}"' if namespace else "")
        group, window = ", ".join(by), self.window
        queries = {
            "rps": f"sum by ({group}) (rate(request_total{{{where}}}[{window}]))",
            "success": (f'sum by ({group}) (rate(response_total{{{where},classification="success"}}'
                        f"[{window}])) / sum by ({group}) (rate(response_total{{{where}}}[{window}]))"),
            "tcp_open_connections": f"sum by ({group}) (tcp_open_connections{{{where}}})",
        }
        for name, quantile in QUANTILES.items():
            queries[name] = (f"histogram_quantile({quantile}, sum by (le, {group}) "
                             f"(rate(response_latency_ms_bucket{{{where}}}[{window}])))")
        rows: dict[tuple[str, ...], dict[str, Any]] = {}
        for name, promql in queries.items():
            for labels, value in self.query(promql):
                key = tuple(labels.get(label, "") for label in by)
                row = rows.setdefault(key, {"success": None, "rps": None,
                                            "tcp_open_connections": 0,
                                            **dict.fromkeys(QUANTILES)})
                row[name] = None if math.isnan(value) else value
        return rows


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')
