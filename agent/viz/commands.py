"""The `stat`, `edges`, `top` and `check` subcommands: flags, and the glue from scrapes to
output. `stat` and `top` scrape every agent twice and work on the difference, as
`linkerd viz stat` works on rate() over a window."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from agent.viz import checks, render, scrape
from agent.viz.edges import Edge, known_accounts, pod_edges, unknown_destinations
from agent.viz.render import CHECK, CROSS, Column
from agent.viz.stats import (
    Golden,
    PodKey,
    Sample,
    StatRow,
    busiest_first,
    deployments_of,
    golden_by,
    inbound_pod,
    merge_into,
    meshed_pods,
    pod_direction,
    pods_in,
    stat_rows,
    window_deltas,
)

K = TypeVar("K", bound=Hashable)
Sleep = Callable[[float], None]
UNKNOWN_DESTINATION_NOTE = "note: DST - = no dst_* labels yet; known once the pod registry/tunnel is in"


# --- flags ----------------------------------------------------------------------------------

def _agent_flag(value: str) -> str:
    try:
        return scrape.agent_address(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _positive(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return number


def _common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--agent", action="append", type=_agent_flag, metavar="HOST:PORT",
                        help=f"an agent's admin endpoint; repeatable (default {scrape.DEFAULT_AGENT})")
    parser.add_argument("-o", "--output", choices=("table", "json"), default="table")
    parser.add_argument("--timeout", type=_positive, default=scrape.DEFAULT_TIMEOUT, metavar="S",
                        help=f"seconds to wait for each agent (default {scrape.DEFAULT_TIMEOUT:g})")


def _namespace_flags(parser: argparse.ArgumentParser) -> None:
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", default="default", help="namespace (default: default)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace")


def add_viz_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    stat = sub.add_parser(
        "stat", help="golden metrics per pod or deployment, like `linkerd viz stat`",
        description="Success rate, requests/s and latency of the requests each pod SERVED "
                    "(its inbound side, as `linkerd viz stat`), over --window seconds between "
                    "two scrapes; TCP_CONN is inbound connections open now. Deployments are "
                    "guessed from pod names (<name>-<hash>-<5 chars>) until agents export owners.")
    stat.add_argument("resource", choices=("pods", "deployments"))
    stat.add_argument("--window", type=_positive, default=10.0, metavar="SECONDS",
                      help="seconds between the two scrapes (default 10)")
    _namespace_flags(stat)
    _common_flags(stat)
    stat.set_defaults(run=run_stat)
    edges = sub.add_parser("edges", help="who talks to whom and whether it is mTLS, like "
                                         "`linkerd viz edges`")
    edges.add_argument("resource", choices=("pods",))
    _namespace_flags(edges)
    _common_flags(edges)
    edges.set_defaults(run=run_edges)
    _add_top_and_check(sub)


def _add_top_and_check(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from agent.viz.tap import add_tap_flags, run_route_top, run_tap

    tap = sub.add_parser("tap", help="every request of a resource as it happens, like "
                                     "`linkerd viz tap`")
    add_tap_flags(tap)
    tap.add_argument("-o", "--output", choices=("default", "wide", "json"), default="default")
    tap.add_argument("--max", type=int, metavar="N", help="exit after N requests")
    tap.set_defaults(run=run_tap)
    top = sub.add_parser("top", help="the busiest routes live, like `linkerd viz top`; "
                                     "--pods: the busiest pods, from counters",
                         description="pinion top RESOURCE: routes (source, destination, method, "
                                     "path) by count, from tap. pinion top --pods: pods by RPS.")
    add_tap_flags(top, resource_required=False)
    top.add_argument("--pods", action="store_true",
                     help="the pod-level view: busiest pods from /metrics (no tap needed)")
    top.add_argument("--interval", type=_positive, default=2.0, metavar="S",
                     help="seconds between refreshes (default 2)")
    top.add_argument("--iterations", type=int, metavar="N", help="stop after N tables "
                     "(default: until Ctrl-C)")
    top.add_argument("--routes", type=int, default=20, metavar="N", help="rows shown (default 20)")
    top.add_argument("-o", "--output", choices=("table", "json"), default="table")

    def run_top_either(args: argparse.Namespace) -> int:
        if args.pods:
            if args.namespace == "default" and not args.resource:
                args.namespace = None  # the pod view's default: every namespace
            return run_top(args)
        if not args.resource:
            top.error("RESOURCE is required (pod/NAME, deploy/NAME, ns/NAME), or --pods")
        return run_route_top(args)

    top.set_defaults(run=run_top_either)
    dashboard = sub.add_parser("dashboard", help="a web page of the mesh on 127.0.0.1, like "
                                                 "`linkerd viz dashboard`")
    dashboard.add_argument("--port", type=int, default=50750, help="default 50750 (0: any free)")
    dashboard.add_argument("--agent", action="append", type=_agent_flag, metavar="HOST:PORT",
                           help=f"an agent's admin endpoint; repeatable (default {scrape.DEFAULT_AGENT})")
    dashboard.add_argument("--kubeconfig", metavar="PATH", help="find the agents in this cluster "
                           "and tap with its token")
    dashboard.add_argument("--token-file", metavar="PATH", help="the operator's tap token")
    dashboard.add_argument("--timeout", type=_positive, default=scrape.DEFAULT_TIMEOUT, metavar="S")
    dashboard.add_argument("--prometheus", metavar="URL", help="success rate, RPS, latencies "
                           "and connections from this Prometheus (pods, edges, tap: agents)")
    dashboard.add_argument("--prometheus-window", default="1m", metavar="RANGE",
                           help="rate() window of those queries (default 1m)")
    dashboard.set_defaults(run=run_dashboard)
    check = sub.add_parser("check", help="✓/✗ health of agents (or, with --pre, of this host)")
    check.add_argument("--pre", action="store_true",
                       help="check this host's prerequisites for running an agent instead")
    check.add_argument("--kubeconfig", metavar="PATH",
                       help="also check the cluster (API, issuer, agent DaemonSet, trust bundle) "
                            "and every agent it runs; with --pre: can Pinion be installed")
    _common_flags(check)
    check.set_defaults(run=run_check)


def _agents(args: argparse.Namespace) -> list[str]:
    return list(dict.fromkeys(args.agent or [scrape.DEFAULT_AGENT]))


def _namespace(args: argparse.Namespace) -> str | None:
    return None if getattr(args, "all_namespaces", False) else args.namespace


def _report(errors: Sequence[str], command: str) -> None:
    for error in errors:
        print(f"pinion {command}: {error}", file=sys.stderr)


# --- the window between two scrapes ---------------------------------------------------------

@dataclass
class WindowView(Generic[K]):
    golden: dict[K, Golden] = field(default_factory=dict)
    meshed: set[PodKey] = field(default_factory=set)
    seen: set[PodKey] = field(default_factory=set)
    owners: dict[PodKey, str] = field(default_factory=dict)  # pod -> its Deployment, when known
    errors: list[str] = field(default_factory=list)


def window_view(before: Sequence[scrape.Scrape], after: Sequence[scrape.Scrape],
                key: Callable[[Sample], K | None]) -> WindowView[K]:
    """Golden metrics per key over each agent's own interval between its two scrapes."""
    view: WindowView[K] = WindowView()
    for first, second in zip(before, after, strict=True):
        error = first.error or second.error
        if error is not None:
            view.errors.append(error)
            continue
        elapsed = max(second.taken_at - first.taken_at, 1e-6)
        deltas = window_deltas(first.samples, second.samples)
        merge_into(view.golden, golden_by(deltas, second.samples, elapsed, key))
        view.meshed |= meshed_pods(second.pods)
        view.seen |= pods_in(second.samples)
        view.owners.update(deployments_of(second.samples, second.pods))
    return view


# --- stat -----------------------------------------------------------------------------------

def stat_table(rows: Sequence[StatRow], all_namespaces: bool) -> str:
    columns = [Column("NAMESPACE", shrink=True)] if all_namespaces else []
    columns += [Column("NAME", shrink=True), Column("MESHED"), Column("SUCCESS"), Column("RPS"),
                Column("LATENCY_P50", "P50"), Column("LATENCY_P95", "P95"),
                Column("LATENCY_P99", "P99"), Column("TCP_CONN")]
    cells = [([row.namespace] if all_namespaces else [])
             + [row.name, f"{row.meshed}/{row.total}", render.percent(row.golden.success_rate),
                render.rate(row.golden.rps if row.golden.observed else None),
                *(render.millis(row.golden.latency_ms(q)) for q in (0.5, 0.95, 0.99)),
                render.count(row.golden.tcp_open_connections)]
             for row in rows]
    return render.render_table(columns, cells)


def stat_json(rows: Sequence[StatRow], kind: str) -> str:
    """The shape of `linkerd viz stat -o json`: one object per row, null where unknown."""
    return render.to_json([
        {"namespace": row.namespace, "kind": kind, "name": row.name,
         "meshed": f"{row.meshed}/{row.total}", "success": row.golden.success_rate,
         "rps": row.golden.rps if row.golden.observed else None,
         "latency_ms_p50": row.golden.latency_ms(0.5), "latency_ms_p95": row.golden.latency_ms(0.95),
         "latency_ms_p99": row.golden.latency_ms(0.99),
         "tcp_open_connections": int(row.golden.tcp_open_connections)} for row in rows])


def run_stat(args: argparse.Namespace, sleep: Sleep = time.sleep) -> int:
    agents = _agents(args)
    first = scrape.scrape_all(agents, args.timeout)
    sleep(args.window)
    view = window_view(first, scrape.scrape_all(agents, args.timeout), inbound_pod)
    rows = stat_rows(args.resource, view.golden, view.meshed, view.seen, _namespace(args), view.owners)
    _report(view.errors, "stat")
    if args.output == "json":
        sys.stdout.write(stat_json(rows, args.resource.removesuffix("s")))
    elif rows:
        sys.stdout.write(stat_table(rows, args.all_namespaces))
    else:
        where = "any namespace" if args.all_namespaces else f"namespace {args.namespace}"
        print(f"No pods found in {where}.", file=sys.stderr)
    return 1 if view.errors else 0


# --- edges ----------------------------------------------------------------------------------

def edges_table(edges: Sequence[Edge]) -> str:
    columns = [Column("SRC", shrink=True), Column("DST", shrink=True), Column("SRC_NS", shrink=True),
               Column("DST_NS", shrink=True), Column("SECURED")]
    cells = [[e.src, e.dst or "-", e.src_namespace, e.dst_namespace or "-",
              CHECK if e.secured else CROSS] for e in edges]
    return render.render_table(columns, cells)


def edges_json(edges: Sequence[Edge]) -> str:
    return render.to_json([
        {"src": e.src, "src_namespace": e.src_namespace, "dst": e.dst, "dst_namespace": e.dst_namespace,
         "secured": e.secured, "tls": e.tls, "server_id": e.server_id, "client_id": e.client_id}
        for e in edges])


def run_edges(args: argparse.Namespace) -> int:
    scrapes = scrape.scrape_all(_agents(args), args.timeout)
    errors = [s.error for s in scrapes if s.error is not None]
    samples = [sample for s in scrapes for sample in s.samples]
    accounts = known_accounts(pod for s in scrapes for pod in s.pods)
    edges = pod_edges(samples, accounts, _namespace(args))
    _report(errors, "edges")
    if args.output == "json":
        sys.stdout.write(edges_json(edges))
    elif edges:
        sys.stdout.write(edges_table(edges))
    else:
        print("No edges found.", file=sys.stderr)
    if unknown_destinations(edges):
        print(UNKNOWN_DESTINATION_NOTE, file=sys.stdout if args.output == "table" else sys.stderr)
    return 1 if errors else 0


# --- top ------------------------------------------------------------------------------------

_CLEAR = "\x1b[H\x1b[2J"


def top_rows(golden: dict[tuple[str, str, str], Golden], namespace: str | None) -> list[list[str]]:
    return [[f"{ns}/{pod}", direction, render.rate(g.rps), render.percent(g.success_rate),
             render.millis(g.latency_ms(0.99)), render.count(g.tcp_open_connections)]
            for (ns, pod, direction), g in busiest_first(golden)
            if namespace is None or ns == namespace]


def top_block(golden: dict[tuple[str, str, str], Golden], args: argparse.Namespace,
              agents: int) -> str:
    columns = [Column("POD", shrink=True), Column("DIRECTION"), Column("RPS"), Column("SUCCESS"),
               Column("P99"), Column("TCP_CONN")]
    heading = (f"pinion top: {agents} agent(s), every {args.interval:g}s, "
               f"{time.strftime('%H:%M:%S')}\n")
    rows = top_rows(golden, args.namespace)
    return heading + (render.render_table(columns, rows) if rows else "(no traffic)\n")


def _top_json(golden: dict[tuple[str, str, str], Golden], namespace: str | None) -> str:
    rows = [{"namespace": ns, "pod": pod, "direction": direction, "rps": g.rps,
             "success": g.success_rate, "latency_ms_p99": g.latency_ms(0.99),
             "tcp_open_connections": int(g.tcp_open_connections)}
            for (ns, pod, direction), g in busiest_first(golden) if namespace in (None, ns)]
    return render.to_json(rows)


def run_top(args: argparse.Namespace, sleep: Sleep = time.sleep) -> int:
    agents, failed, shown = _agents(args), False, 0
    tty = sys.stdout.isatty()
    try:
        previous = scrape.scrape_all(agents, args.timeout)
        while args.iterations is None or shown < args.iterations:
            sleep(args.interval)
            current = scrape.scrape_all(agents, args.timeout)
            view = window_view(previous, current, pod_direction)
            previous, shown, failed = current, shown + 1, failed or bool(view.errors)
            block = (_top_json(view.golden, args.namespace) if args.output == "json"
                     else top_block(view.golden, args, len(agents)))
            sys.stdout.write((_CLEAR if tty else ("\n" if shown > 1 else "")) + block)
            sys.stdout.flush()
            _report(view.errors, "top")
    except KeyboardInterrupt:
        pass
    return 1 if failed else 0


# --- dashboard ------------------------------------------------------------------------------

def run_dashboard(args: argparse.Namespace) -> int:
    from agent.viz.dashboard.prom import Prometheus
    from agent.viz.dashboard.server import serve
    from agent.viz.tap import agents_and_token

    agents, token = agents_and_token(args)
    prometheus = Prometheus(args.prometheus, args.prometheus_window, args.timeout) \
        if args.prometheus else None

    def ready(server: Any) -> None:
        print(f"pinion dashboard: http://127.0.0.1:{server.server_address[1]}/ "
              f"({len(agents)} agent(s); Ctrl-C to stop)", flush=True)

    try:
        serve(agents, token, args.port, args.timeout, ready, prometheus)
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"pinion dashboard: cannot listen on 127.0.0.1:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


# --- check ----------------------------------------------------------------------------------

def run_check(args: argparse.Namespace) -> int:
    sections: list[tuple[str, Sequence[checks.CheckResult]]] = []
    discovered: list[str] = []
    if args.kubeconfig:
        from agent.viz.cluster_checks import cluster_results

        results, discovered = cluster_results(args.kubeconfig, pre=args.pre, timeout=args.timeout)
        sections.append(("kubernetes" if args.pre else "pinion in the cluster", results))
    if args.pre:
        sections.append(("this host: prerequisites for running an agent",
                         checks.host_results(checks.HOST_PROBES)))
    elif not args.kubeconfig or discovered or args.agent:
        agents = list(dict.fromkeys(args.agent or discovered)) or _agents(args)
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(agents)))) as pool:
            answers = list(pool.map(lambda agent: checks.ask_agent(agent, args.timeout), agents))
        now = time.time()
        sections += [(f"agent {a.agent}", checks.agent_results(a, now)) for a in answers]
    if args.output == "json":
        sys.stdout.write(render.to_json(_check_json(sections)))
    else:
        sys.stdout.write(checks.render_results(sections))
    return 0 if checks.all_ok(sections) else 1


def _check_json(sections: Sequence[tuple[str, Sequence[checks.CheckResult]]]) -> dict[str, Any]:
    return {"success": checks.all_ok(sections),
            "categories": [{"name": title, "checks": [
                {"description": r.title, "result": "success" if r.ok else "error",
                 "detail": list(r.detail), "hint": None if r.ok else r.hint} for r in results]}
                for title, results in sections]}
