"""Reading agents' admin endpoints (GET /metrics, /pods, /ready, /live) with urllib and a
timeout. An unreachable agent becomes a Scrape carrying a one-line error, never an exception,
so the other agents' results are still shown."""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from agent.viz.stats import Sample

DEFAULT_AGENT = "127.0.0.1:4191"
DEFAULT_TIMEOUT = 5.0
# Admin endpoints are reached directly: never through an http_proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class AgentError(Exception):
    """An agent could not be asked at all (refused, timed out, not HTTP)."""


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


@dataclass(frozen=True)
class Scrape:
    agent: str
    samples: tuple[Sample, ...] = ()
    pods: tuple[Mapping[str, Any], ...] = ()
    taken_at: float = 0.0          # time.monotonic() when /metrics had answered
    error: str | None = None


def agent_address(value: str) -> str:
    """argparse type for --agent: HOST:PORT (IPv6 as [ADDR]:PORT)."""
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return value


def get(agent: str, path: str, timeout: float = DEFAULT_TIMEOUT) -> Reply:
    """GET http://<agent><path>; any HTTP status is a Reply, no answer is an AgentError."""
    try:
        with _OPENER.open(f"http://{agent}{path}", timeout=timeout) as response:
            return Reply(response.status, response.read())
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, exc.read())
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise AgentError(f"{agent}: unreachable: {_reason(exc, timeout)}") from exc


def _reason(exc: BaseException, timeout: float) -> str:
    reason: object = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, socket.timeout | TimeoutError):
        return f"no answer within {timeout:g}s"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror.lower()
    return str(reason) or type(reason).__name__


def parse_metrics(text: str) -> tuple[Sample, ...]:
    """Prometheus text to samples; ValueError when it does not parse."""
    # Imported here: prometheus_client brings http.server, email, urllib and their kin (~3 MiB),
    # and the agent's own processes import this module with the CLI's parsers.
    from prometheus_client.parser import text_string_to_metric_families

    try:
        return tuple(Sample(s.name, dict(s.labels), float(s.value))
                     for family in text_string_to_metric_families(text) for s in family.samples)
    except (ValueError, TypeError, IndexError) as exc:
        raise ValueError(f"metrics do not parse: {exc}") from exc


def parse_pods(body: bytes) -> tuple[Mapping[str, Any], ...]:
    """GET /pods' JSON list; ValueError when it is not a list of objects."""
    try:
        entries = json.loads(body)
    except json.JSONDecodeError as exc:
        raise ValueError(f"/pods is not JSON: {exc}") from exc
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ValueError("/pods is not a JSON list of objects")
    return tuple(entries)


def _ok_body(agent: str, path: str, timeout: float) -> bytes:
    reply = get(agent, path, timeout)
    if reply.status != 200:
        raise AgentError(f"{agent}: GET {path} answered {reply.status}")
    return reply.body


def scrape(agent: str, timeout: float = DEFAULT_TIMEOUT,
           clock: Callable[[], float] = time.monotonic) -> Scrape:
    """One agent's /metrics and /pods."""
    try:
        samples = parse_metrics(_ok_body(agent, "/metrics", timeout).decode("utf-8", "replace"))
        taken_at = clock()
        pods = parse_pods(_ok_body(agent, "/pods", timeout))
    except AgentError as exc:
        return Scrape(agent, error=str(exc))
    except ValueError as exc:
        return Scrape(agent, error=f"{agent}: {exc}")
    return Scrape(agent, samples, pods, taken_at)


def scrape_all(agents: Sequence[str], timeout: float = DEFAULT_TIMEOUT) -> list[Scrape]:
    """Every agent at once (one slow agent costs one timeout, not one per agent)."""
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(agents)))) as pool:
        return list(pool.map(lambda agent: scrape(agent, timeout), agents))
