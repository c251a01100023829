"""`pinion tap` and the route view of `pinion top`: a live stream of finished requests from
every agent's `GET /tap`, printed as `linkerd viz tap` prints them (req/rsp/end lines, or one
JSON object per request), or folded into a table of the busiest routes (`linkerd viz top`).

Each agent is read by its own thread (a close-delimited NDJSON answer); lines meet in one
queue. Credentials: `--token-file` (standalone agents off this node), or the kubeconfig's
bearer token with `--kubeconfig` (Kubernetes mode: RBAC decides), which also finds the
agents (the pinion-agent pods' host IPs) when no `--agent` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO
from urllib.parse import urlencode

from agent.viz import render, scrape
from agent.viz.render import Column

GRPC_CODES = ("OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound",
              "AlreadyExists", "PermissionDenied", "ResourceExhausted", "FailedPrecondition",
              "Aborted", "OutOfRange", "Unimplemented", "Internal", "Unavailable", "DataLoss",
              "Unauthenticated")


class TapError(Exception):
    """An agent refused or failed the tap (the message says which and why)."""


@dataclass(frozen=True)
class TapQuery:
    resource: str
    namespace: str
    to: str | None = None
    source: str | None = None
    method: str | None = None
    path: str | None = None
    authority: str | None = None
    max_rps: float = 100.0
    to_namespace: str | None = None
    from_namespace: str | None = None

    def query(self) -> str:
        params = {"resource": self.resource, "namespace": self.namespace, "to": self.to,
                  "to_namespace": self.to_namespace, "from": self.source,
                  "from_namespace": self.from_namespace, "method": self.method, "path": self.path,
                  "authority": self.authority, "max_rps": f"{self.max_rps:g}"}
        return urlencode({k: v for k, v in params.items() if v})


def stream_agent(agent: str, tap: TapQuery, token: str | None, timeout: float,
                 stop: threading.Event, opened: list[socket.socket]) -> Iterator[dict[str, Any]]:
    """The JSON objects one agent's tap sends, until it ends or `stop` is set (whoever sets
    it shuts the sockets in `opened` down, which ends a blocked read)."""
    host, _, port = agent.rpartition(":")
    connection = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        connection.request("GET", "/tap?" + tap.query(), headers=headers)
        sock = connection.sock  # getresponse() lets go of it: the answer is close-delimited
        response = connection.getresponse()
        if response.status != 200:
            reason = response.read(4096).decode("utf-8", "replace").strip()
            raise TapError(f"{agent}: {response.status} {reason}")
        if sock is not None:
            sock.settimeout(None)  # a quiet tap is not a dead one
            opened.append(sock)
        while not stop.is_set():
            line = response.readline(1 << 20)
            if not line:
                return
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue
    except (OSError, ValueError, http.client.HTTPException) as exc:
        if stop.is_set():
            return
        raise TapError(f"{agent}: {exc or type(exc).__name__}") from exc
    finally:
        connection.close()


def merged(agents: Sequence[str], tap: TapQuery, token: str | None, timeout: float,
           stop: threading.Event, heartbeat: bool = False,
           ) -> Generator[dict[str, Any] | TapError | None, None, None]:
    """Every agent's objects (and errors) as they come; ends when all agents have ended.
    `heartbeat`: also a None every half second with nothing to show (a caller can notice
    that its own client went away)."""
    lines: queue.Queue[dict[str, Any] | TapError | None] = queue.Queue(maxsize=10_000)
    opened: list[socket.socket] = []

    def read(agent: str) -> None:
        try:
            for obj in stream_agent(agent, tap, token, timeout, stop, opened):
                lines.put(obj)
        except TapError as exc:
            lines.put(exc)
        finally:
            lines.put(None)

    threads = [threading.Thread(target=read, args=(a,), daemon=True) for a in agents]
    for thread in threads:
        thread.start()
    running = len(threads)
    try:
        while running:
            try:
                item = lines.get(timeout=0.5)
            except queue.Empty:
                if heartbeat:
                    yield None
                continue
            if item is None:
                running -= 1
            else:
                yield item
    finally:
        stop.set()
        for sock in list(opened):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


# --- rendering, as linkerd viz tap ------------------------------------------------------------

def _tls(event: dict[str, Any]) -> str:
    return "true" if event.get("tls") == "true" else "not_provided_by_remote"


def tap_lines(event: dict[str, Any], number: int, wide: bool) -> list[str]:
    """req / rsp / end lines of one finished request, `linkerd viz tap`'s default format."""
    proxy = "in " if event.get("direction") == "inbound" else "out"
    flow = f"proxy={proxy} src={event.get('src')} dst={event.get('dst')} tls={_tls(event)}"
    rid = f"id={number}:0"
    extra = ""
    if wide:
        for side in ("src", "dst"):
            if event.get(f"{side}_owner_name"):
                extra += f" {side}_res={event[f'{side}_owner_kind']}/{event[f'{side}_owner_name']}"
            elif event.get(f"{side}_pod"):
                extra += f" {side}_pod={event[f'{side}_pod']}"
            if event.get(f"{side}_namespace"):
                extra += f" {side}_ns={event[f'{side}_namespace']}"
    lines = [f"req {rid} {flow} :method={event.get('method')} :authority={event.get('authority')} "
             f":path={event.get('path')}{extra}"]
    latency, duration = event.get("latency_ms"), event.get("duration_ms")
    if event.get("status") is not None and latency is not None:
        lines.append(f"rsp {rid} {flow} :status={event['status']} latency={round(latency * 1000)}µs{extra}")
    since_response = max(0.0, (duration or 0.0) - (latency or 0.0))
    end = f"end {rid} {flow}"
    grpc = event.get("grpc_status")
    if event.get("error"):
        end += f" reset-error={event['error']}"
    elif grpc is not None:
        end += f" grpc-status={GRPC_CODES[grpc] if 0 <= grpc < len(GRPC_CODES) else grpc}"
    lines.append(f"{end} duration={round(since_response * 1000)}µs "
                 f"response-length={event.get('response_bytes', 0)}B{extra}")
    return lines


def json_line(event: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in event.items() if k != "kind"}, sort_keys=True)


# --- route top, as linkerd viz top --------------------------------------------------------------

def _side(event: dict[str, Any], side: str) -> str:
    if event.get(f"{side}_pod"):
        return str(event[f"{side}_pod"])
    return str(event.get(side, "")).rsplit(":", 1)[0]


@dataclass
class Route:
    source: str
    destination: str
    method: str
    path: str
    count: int = 0
    successes: int = 0
    best: float = float("inf")
    worst: float = 0.0
    last: float = 0.0


@dataclass
class RouteTable:
    """Requests folded by (source, destination, method, path); inbound requests only when
    both sides of a meshed call are tapped, so a call counts once."""

    routes: dict[tuple[str, str, str, str], Route] = field(default_factory=dict)
    limit: int = 10_000  # distinct routes kept (a path per request id must not grow us forever)

    def add(self, event: dict[str, Any]) -> None:
        key = (_side(event, "src"), _side(event, "dst"), str(event.get("method")),
               str(event.get("path")))
        route = self.routes.get(key)
        if route is None:
            if len(self.routes) >= self.limit:
                return
            route = self.routes[key] = Route(*key)
        latency = float(event.get("latency_ms") or 0.0)
        route.count += 1
        route.successes += event.get("classification") == "success"
        route.best, route.worst, route.last = min(route.best, latency), max(route.worst, latency), latency

    def busiest(self) -> list[Route]:
        return sorted(self.routes.values(), key=lambda r: (-r.count, r.path, r.source))


def top_table(routes: Sequence[Route], width: int = 120) -> str:
    columns = [Column("Source", shrink=True), Column("Destination", shrink=True), Column("Method"),
               Column("Path", shrink=True), Column("Count"), Column("Best"), Column("Worst"),
               Column("Last"), Column("Success Rate")]
    rows = [[r.source, r.destination, r.method, r.path, str(r.count), render.millis(r.best),
             render.millis(r.worst), render.millis(r.last),
             render.percent(r.successes / r.count if r.count else None)] for r in routes]
    return render.render_table(columns, rows, width)


def top_json(routes: Sequence[Route]) -> str:
    return render.to_json([{"source": r.source, "destination": r.destination, "method": r.method,
                            "path": r.path, "count": r.count, "best_ms": r.best,
                            "worst_ms": r.worst, "last_ms": r.last,
                            "success": r.successes / r.count if r.count else None}
                           for r in routes])


# --- commands -----------------------------------------------------------------------------------

def _positive(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return number


def add_tap_flags(parser: argparse.ArgumentParser, resource_required: bool = True) -> None:
    parser.add_argument("resource", nargs=None if resource_required else "?", metavar="RESOURCE",
                        help="pod/NAME, deploy/NAME or ns/NAME")
    parser.add_argument("-n", "--namespace", default="default")
    parser.add_argument("--to", metavar="RESOURCE", help="only requests the resource sends to this")
    parser.add_argument("--to-namespace", metavar="NS")
    parser.add_argument("--from", dest="source", metavar="RESOURCE",
                        help="only requests the resource receives from this")
    parser.add_argument("--from-namespace", metavar="NS")
    parser.add_argument("--method", help="only this HTTP method")
    parser.add_argument("--path", help="only paths that start with this prefix")
    parser.add_argument("--authority", help="only this :authority / Host")
    parser.add_argument("--max-rps", type=_positive, default=100.0,
                        help="requests per second each agent may send this tap (default 100)")
    parser.add_argument("--agent", action="append", type=scrape.agent_address, metavar="HOST:PORT",
                        help=f"an agent's admin endpoint; repeatable (default {scrape.DEFAULT_AGENT})")
    parser.add_argument("--kubeconfig", metavar="PATH", help="find the agents in this cluster "
                        "and tap with its token (Kubernetes RBAC decides)")
    parser.add_argument("--token-file", metavar="PATH",
                        help="the operator's tap token (standalone agents, tapped from afar)")
    parser.add_argument("--timeout", type=_positive, default=scrape.DEFAULT_TIMEOUT, metavar="S")


def tap_query(args: argparse.Namespace) -> TapQuery:
    return TapQuery(args.resource, args.namespace, args.to, args.source, args.method, args.path,
                    args.authority, args.max_rps, args.to_namespace, args.from_namespace)


def agents_and_token(args: argparse.Namespace) -> tuple[list[str], str | None]:
    token = None
    agents = list(dict.fromkeys(args.agent or []))
    if args.token_file:
        with open(args.token_file) as file:
            token = file.read().strip()
    if args.kubeconfig:
        from agent.viz.cluster_checks import cluster_agents

        discovered, token = cluster_agents(args.kubeconfig, args.timeout)
        agents = agents or discovered
    return agents or [scrape.DEFAULT_AGENT], token


def run_tap(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    agents, token = agents_and_token(args)
    stop = threading.Event()
    shown, failed = 0, False
    items = merged(agents, tap_query(args), token, args.timeout, stop)
    try:
        for item in items:
            if item is None:
                continue
            if isinstance(item, TapError):
                print(f"pinion tap: {item}", file=sys.stderr)
                failed = True
                continue
            if item.get("kind") == "stats":
                print(f"pinion tap: {item.get('dropped', 0)} events dropped (not read fast enough), "
                      f"{item.get('limited', 0)} over --max-rps", file=sys.stderr)
                continue
            shown += 1
            if args.output == "json":
                out.write(json_line(item) + "\n")
            else:
                out.write("\n".join(tap_lines(item, shown, args.output == "wide")) + "\n\n")
            out.flush()
            if args.max is not None and shown >= args.max:
                break
    except KeyboardInterrupt:
        pass
    finally:
        items.close()
    return 1 if failed and not shown else 0


def run_route_top(args: argparse.Namespace, out: TextIO = sys.stdout,
                  clock: Callable[[], float] = time.monotonic) -> int:
    agents, token = agents_and_token(args)
    stop = threading.Event()
    table = RouteTable()
    tty = out.isatty()
    next_draw = clock() + args.interval
    drawn, failed = 0, False
    try:
        for item in merged(agents, tap_query(args), token, args.timeout, stop, heartbeat=True):
            if isinstance(item, TapError):
                print(f"pinion top: {item}", file=sys.stderr)
                failed = True
            elif item is not None and item.get("kind") == "request":
                table.add(item)
            if clock() >= next_draw:
                next_draw = clock() + args.interval
                routes = table.busiest()[: args.routes]
                heading = (f"pinion top {args.resource}: {len(agents)} agent(s), "
                           f"{time.strftime('%H:%M:%S')}\n")
                block = top_json(routes) if args.output == "json" else (
                    heading + (top_table(routes) if routes else "(no requests yet)\n"))
                out.write(("\x1b[H\x1b[2J" if tty else ("\n" if drawn else "")) + block)
                out.flush()
                drawn += 1
                if args.iterations is not None and drawn >= args.iterations:
                    break
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
    return 1 if failed and not table.routes else 0

