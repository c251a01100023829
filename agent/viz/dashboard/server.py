"""The dashboard's web server: the page (static files, no build step, nothing fetched from
elsewhere) and the JSON it reads, all computed from the agents' admin endpoints.

    /                         namespaces: pods, meshed, success rate, RPS, p50/p95/p99, TCP
    /namespaces/NS            the namespace's deployments and pods
    /namespaces/NS/edges      who talks to whom, with TLS state (a graph and a table)
    /tap?resource=...&...     a live tap with the filters of `pinion tap`

Every page is its own URL (the server answers each with the same page; the script reads the
URL). Rates are counter deltas between two scrapes of each agent, as `pinion stat`: the
server keeps the last scrape and refreshes at most once a second whatever the page asks.

Only for the local user: it listens on 127.0.0.1, and answers only requests whose Host is
127.0.0.1/localhost at its port (a DNS-rebinding page elsewhere cannot read it). Taps through
it are bounded (`MAX_TAPS` at once, each ended when the browser goes away).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from agent.viz import scrape
from agent.viz.commands import WindowView, window_view
from agent.viz.dashboard.prom import Prometheus, PrometheusError
from agent.viz.edges import edges, pod_identities
from agent.viz.resources import Resource, Row, Selection, owners_of, stat_rows
from agent.viz.stats import Golden, PodKey, owner_name
from agent.viz.tap import TapError, TapQuery, merged

PACKAGE = "agent.viz.dashboard"
DEFAULT_PORT = 50750
MAX_TAPS = 4
REFRESH_SECONDS = 1.0
STATIC = {"app.js": "text/javascript", "app.css": "text/css"}
PAGES = ("/", "/namespaces", "/tap")


def golden_json(golden: Golden | None) -> dict[str, Any]:
    if golden is None:
        return {"success": None, "rps": None, "latency_ms_p50": None, "latency_ms_p95": None,
                "latency_ms_p99": None, "tcp_open_connections": 0}
    return {"success": golden.success_rate, "rps": golden.rps if golden.observed else None,
            "latency_ms_p50": golden.latency_ms(0.5), "latency_ms_p95": golden.latency_ms(0.95),
            "latency_ms_p99": golden.latency_ms(0.99),
            "tcp_open_connections": int(golden.tcp_open_connections)}


class AgentData:
    """The agents' numbers, as the page wants them, with `pinion stat`'s rows (agent/viz/
    resources.py): rates between the last two scrapes, refreshed at most once a second."""

    def __init__(self, agents: Sequence[str], timeout: float,
                 clock: Callable[[], float] = time.monotonic,
                 prometheus: Prometheus | None = None) -> None:
        self.agents = list(agents)
        self.prometheus = prometheus  # golden numbers from it; pods, edges, tap from agents
        self._timeout = timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._previous: list[scrape.Scrape] = []
        self._latest: list[scrape.Scrape] = []
        self._at = 0.0

    def refresh(self) -> tuple[list[scrape.Scrape], list[scrape.Scrape]]:
        with self._lock:
            if not self._latest or self._clock() - self._at >= REFRESH_SECONDS:
                if not self._latest:
                    self._latest = scrape.scrape_all(self.agents, self._timeout)
                    time.sleep(REFRESH_SECONDS)
                self._previous = self._latest
                self._latest = scrape.scrape_all(self.agents, self._timeout)
                self._at = self._clock()
            return self._previous, self._latest

    def rows(self, kind: str, namespace: str | None) -> tuple[list[Row], list[str]]:
        """`pinion stat KIND` rows (inbound golden metrics, MESHED counts) and agent errors."""
        before, after = self.refresh()
        selection = Selection(Resource(kind), namespace)
        view: WindowView[PodKey] = window_view(before, after, selection.key)
        owners = owners_of([s for one in after for s in one.samples],
                           [p for one in after for p in one.pods])
        return (stat_rows(selection, view.golden, view.meshed, view.seen, owners, owner_name),
                view.errors)

    def overview(self) -> dict[str, Any]:
        found, errors = self.rows("namespace", None)
        namespaces = {row.name: {"name": row.name, "pods": row.total, "meshed": row.meshed,
                                 **golden_json(row.golden)} for row in found}
        source = self._from_prometheus(namespaces, ("namespace",), None, errors)
        return {"namespaces": [namespaces[name] for name in sorted(namespaces)],
                "agents": self.agents, "errors": errors, "source": source}

    def _from_prometheus(self, rows: dict[str, dict[str, Any]], by: tuple[str, ...],
                         namespace: str | None, errors: list[str]) -> str:
        """Replace the golden numbers of `rows` (by name) with Prometheus' where it has them."""
        if self.prometheus is None:
            return "agents"
        try:
            golden = self.prometheus.golden(by, namespace)
        except PrometheusError as exc:
            errors.append(str(exc))
            return "agents"
        for key, numbers in golden.items():
            name = key[-1]
            if name in rows:
                rows[name].update(numbers)
            elif name and len(by) == 1:  # a namespace only Prometheus still knows
                rows[name] = {"name": name, "pods": 0, "meshed": 0, **numbers}
        return f"prometheus {self.prometheus.url} ({self.prometheus.window} window)"

    def namespace(self, name: str) -> dict[str, Any]:
        answer: dict[str, Any] = {"namespace": name, "errors": [], "source": "agents"}
        for resource, kind in (("deployments", "deployment"), ("pods", "pod")):
            found, errors = self.rows(kind, name)
            rows = {row.name: {"name": row.name, "meshed": f"{row.meshed}/{row.total}",
                               **golden_json(row.golden)} for row in found}
            answer["errors"] = errors
            answer["source"] = self._from_prometheus(rows, ("namespace", kind), name,
                                                     answer["errors"])
            answer[resource] = [rows[key] for key in sorted(rows)]
        return answer

    def edges(self, namespace: str) -> dict[str, Any]:
        """`pinion edges po -n NS`: pod to pod, connections open now, TLS or why not."""
        _, scrapes = self.refresh()
        samples = [sample for s in scrapes for sample in s.samples]
        identities = pod_identities(pod for s in scrapes for pod in s.pods)
        return {"namespace": namespace,
                "edges": [{"src": e.src, "src_namespace": e.src_namespace, "dst": e.dst,
                           "dst_namespace": e.dst_namespace, "secured": e.secured,
                           "tls": e.message, "client_id": e.client_id,
                           "server_id": e.server_id}
                          for e in edges(samples, "pod", namespace, identities)],
                "errors": [s.error for s in scrapes if s.error is not None]}


class Dashboard:
    """The server's state: the agents, the tap credentials, how many taps run."""

    def __init__(self, data: AgentData, token: str | None, port: int) -> None:
        self.data = data
        self.token = token
        self.port = port
        self.taps = 0
        self.lock = threading.Lock()

    def allowed_host(self, host: str | None) -> bool:
        return host in {f"127.0.0.1:{self.port}", f"localhost:{self.port}"}


def tap_query(params: dict[str, str]) -> TapQuery:
    try:
        max_rps = float(params.get("max_rps") or 100)
    except ValueError:
        raise ValueError("max_rps must be a number") from None
    if not params.get("resource"):
        raise ValueError("resource is required (pod/NAME, deploy/NAME or ns/NAME)")
    return TapQuery(params["resource"], params.get("namespace") or "default",
                    params.get("to") or None, params.get("from") or None,
                    params.get("method") or None, params.get("path") or None,
                    params.get("authority") or None, max_rps)


def handler_for(dashboard: Dashboard) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "pinion-dashboard"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: the terminal is the user's

        def do_GET(self) -> None:
            if not dashboard.allowed_host(self.headers.get("Host")):
                self._send(HTTPStatus.FORBIDDEN, "text/plain", b"wrong Host: open "
                           b"http://127.0.0.1:%d/\n" % dashboard.port)
                return
            url = urlsplit(self.path)
            params = {key: values[-1] for key, values in parse_qs(url.query).items()}
            path = url.path
            try:
                if path.startswith("/static/") and path[8:] in STATIC:
                    body = resources.files(PACKAGE).joinpath("static", path[8:]).read_bytes()
                    self._send(HTTPStatus.OK, STATIC[path[8:]], body)
                elif path == "/api/overview":
                    self._json(dashboard.data.overview())
                elif path == "/api/namespace":
                    self._json(dashboard.data.namespace(params.get("name") or "default"))
                elif path == "/api/edges":
                    self._json(dashboard.data.edges(params.get("namespace") or "default"))
                elif path == "/api/tap":
                    self._tap(params)
                elif path in PAGES or path.startswith("/namespaces/"):
                    page = resources.files(PACKAGE).joinpath("static", "index.html")
                    self._send(HTTPStatus.OK, "text/html; charset=utf-8", page.read_bytes())
                elif path == "/favicon.ico":
                    self._send(HTTPStatus.NO_CONTENT, "text/plain", b"")
                else:
                    self._send(HTTPStatus.NOT_FOUND, "text/plain", b"not found\n")
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _json(self, document: dict[str, Any]) -> None:
            self._send(HTTPStatus.OK, "application/json", json.dumps(document).encode())

        def _send(self, status: HTTPStatus, ctype: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("Content-Security-Policy", "default-src 'self'")
            self.end_headers()
            self.wfile.write(body)

        def _tap(self, params: dict[str, str]) -> None:
            try:
                query = tap_query(params)
            except ValueError as exc:
                self._send(HTTPStatus.BAD_REQUEST, "text/plain", f"{exc}\n".encode())
                return
            with dashboard.lock:
                if dashboard.taps >= MAX_TAPS:
                    self._send(HTTPStatus.TOO_MANY_REQUESTS, "text/plain",
                               b"too many taps open in this dashboard\n")
                    return
                dashboard.taps += 1
            stop = threading.Event()
            items = merged(dashboard.data.agents, query, dashboard.token, 5.0, stop, heartbeat=True)
            try:
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", "application/x-ndjson")
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.close_connection = True
                for item in items:
                    if item is None:  # nothing tapped lately: is the browser still there?
                        self.wfile.write(b"\n")
                    else:
                        line = ({"kind": "error", "message": str(item)}
                                if isinstance(item, TapError) else item)
                        self.wfile.write(json.dumps(line).encode() + b"\n")
                    self.wfile.flush()
            finally:
                items.close()
                with dashboard.lock:
                    dashboard.taps -= 1

    return Handler


def serve(agents: Sequence[str], token: str | None, port: int = DEFAULT_PORT,
          timeout: float = scrape.DEFAULT_TIMEOUT,
          ready: Callable[[ThreadingHTTPServer], None] | None = None,
          prometheus: Prometheus | None = None) -> None:
    dashboard = Dashboard(AgentData(agents, timeout, prometheus=prometheus), token, port)
    server = ThreadingHTTPServer(("127.0.0.1", port), handler_for(dashboard))
    server.daemon_threads = True
    dashboard.port = server.server_address[1]
    if ready is not None:
        ready(server)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
