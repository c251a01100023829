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

from agent.model import parse_duration
from agent.viz import checks, render, scrape
from agent.viz.edges import Edge, edges, pod_identities, short_identity
from agent.viz.render import Column
from agent.viz.resources import Resource, Row, Selection, owners_of, parse_resource, stat_rows
from agent.viz.stats import (
    Golden,
    PodKey,
    Sample,
    busiest_first,
    golden_by,
    merge_into,
    meshed_pods,
    owner_name,
    pod_direction,
    pods_in,
    window_deltas,
)

K = TypeVar("K", bound=Hashable)
Sleep = Callable[[float], None]


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


def _resource(value: str) -> Resource:
    try:
        return parse_resource(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _duration(value: str) -> float:
    """10s, 1m, 1h (linkerd viz -t), 500ms; a bare number is seconds."""
    try:
        seconds = float(value[:-2]) / 1000 if value.endswith("ms") else parse_duration(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a duration (10s, 1m, 1h): {value!r}") from exc
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return seconds


def _common_flags(parser: argparse.ArgumentParser, wide: bool = False) -> None:
    parser.add_argument("--agent", action="append", type=_agent_flag, metavar="HOST:PORT",
                        help=f"an agent's admin endpoint; repeatable (default {scrape.DEFAULT_AGENT})")
    parser.add_argument("-o", "--output", choices=("table", "json", "wide") if wide else ("table", "json"),
                        default="table")
    parser.add_argument("--timeout", type=_positive, default=scrape.DEFAULT_TIMEOUT, metavar="S",
                        help=f"seconds to wait for each agent (default {scrape.DEFAULT_TIMEOUT:g})")


def _namespace_flags(parser: argparse.ArgumentParser) -> None:
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", default="default", help="namespace (default: default)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace")


def add_viz_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    stat = sub.add_parser(
        "stat", help="golden metrics per resource, like `linkerd viz stat`",
        description="Success rate, responses/s and latency of what each resource SERVED (its "
                    "inbound side, as `linkerd viz stat`), or with --to/--from of the requests "
                    "between two resources (the client's outbound side), over a window between "
                    "two scrapes of every agent. TCP_CONN: connections open now; -o wide adds "
                    "TCP bytes/s. Pods of no known owner (standalone mode) are grouped into "
                    "Deployments by their names (<name>-<hash>-<5 chars>).")
    stat.add_argument("resource", type=_resource, metavar="TYPE[/NAME]",
                      help="po, deploy, sts, ds, job, cj, ns or svc (or their long names), "
                           "optionally /NAME")
    window = stat.add_mutually_exclusive_group()
    window.add_argument("-t", "--time-window", type=_duration, dest="window", metavar="DURATION",
                        help="the window between the two scrapes: 10s, 1m, ... (default 10s)")
    window.add_argument("--window", type=_positive, dest="window", metavar="SECONDS",
                        help=argparse.SUPPRESS)
    stat.set_defaults(window=10.0)
    stat.add_argument("--to", type=_resource, metavar="TYPE/NAME",
                      help="only requests to this resource (outbound stats of the resources)")
    stat.add_argument("--to-namespace", metavar="NS", help="namespace of --to (default: -n's)")
    stat.add_argument("--from", dest="from_", type=_resource, metavar="TYPE/NAME",
                      help="only requests from this resource (outbound stats of it)")
    stat.add_argument("--from-namespace", metavar="NS", help="namespace of --from (default: -n's)")
    _namespace_flags(stat)
    _common_flags(stat, wide=True)
    stat.set_defaults(run=run_stat)
    edges = sub.add_parser("edges", help="who talks to whom now and whether it is mTLS, like "
                                         "`linkerd viz edges`",
                           description="Pairs of resources with an outbound connection open now "
                                       "(as `linkerd viz edges`): √ when mTLS, else why not. "
                                       "-o wide adds the client and server identities.")
    edges.add_argument("resource", type=_resource, metavar="TYPE",
                       help="po, deploy, sts, ds, job or cj (or their long names)")
    _namespace_flags(edges)
    _common_flags(edges, wide=True)
    edges.set_defaults(run=run_edges)
    _add_top_and_check(sub)


def _add_top_and_check(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    top = sub.add_parser("top", help="live table of the busiest pods, like `linkerd viz top`")
    top.add_argument("--interval", type=_positive, default=2.0, metavar="S",
                     help="seconds between refreshes (default 2)")
    top.add_argument("--iterations", type=int, metavar="N", help="stop after N tables "
                     "(default: until Ctrl-C)")
    top.add_argument("-n", "--namespace", help="only this namespace (default: all)")
    _common_flags(top)
    top.set_defaults(run=run_top)
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
    return view


# --- stat -----------------------------------------------------------------------------------

def stat_table(rows: Sequence[Row], selection: Selection, all_namespaces: bool, wide: bool) -> str:
    """As `linkerd viz stat` prints it: "-" across a row with no requests in the window."""
    kind = selection.target.kind
    headers = (["NAMESPACE"] if all_namespaces and kind != "namespace" else []) + ["NAME"]
    headers += ["STATUS"] if kind == "pod" else []
    headers += ["MESHED", "SUCCESS", "RPS", "LATENCY_P50", "LATENCY_P95", "LATENCY_P99", "TCP_CONN"]
    headers += ["READ_BYTES/SEC", "WRITE_BYTES/SEC"] if wide else []
    cells = []
    for row in rows:
        line = ([row.namespace] if len(headers) > 1 and headers[0] == "NAMESPACE" else []) + [row.name]
        line += [("Running" if row.running else "-")] if kind == "pod" else []
        line.append("-" if kind == "service" else f"{row.meshed}/{row.total}")
        golden = row.golden
        if golden is None or not golden.responses:
            line += ["-"] * (8 if wide else 6)
        else:
            line += [render.linkerd_percent(golden.success_rate), render.linkerd_rps(golden.response_rps),
                     *(render.linkerd_millis(golden.latency_ms(q)) for q in (0.5, 0.95, 0.99)),
                     f"{golden.tcp_open_connections:.0f}"]
            if wide:
                line += [render.linkerd_bytes(golden.read_bps), render.linkerd_bytes(golden.write_bps)]
        cells.append(line)
    return render.linkerd_table(headers, cells, left=2 if headers[0] == "NAMESPACE" else 1)


def stat_json(rows: Sequence[Row], kind: str) -> str:
    """The shape of `linkerd viz stat -o json`: one object per row, null where unknown."""
    out = []
    for row in rows:
        golden = row.golden if row.golden is not None and row.golden.responses else None
        out.append({"namespace": row.namespace, "kind": kind, "name": row.name,
                    "meshed": "-" if kind == "service" else f"{row.meshed}/{row.total}",
                    "success": golden.success_rate if golden else None,
                    "rps": golden.response_rps if golden else None,
                    "latency_ms_p50": golden.latency_ms(0.5) if golden else None,
                    "latency_ms_p95": golden.latency_ms(0.95) if golden else None,
                    "latency_ms_p99": golden.latency_ms(0.99) if golden else None,
                    "tcp_open_connections": int(golden.tcp_open_connections) if golden else None,
                    "tcp_read_bytes_rate": golden.read_bps if golden else None,
                    "tcp_write_bytes_rate": golden.write_bps if golden else None})
    return render.to_json(out)


def run_stat(args: argparse.Namespace, sleep: Sleep = time.sleep) -> int:
    namespace = _namespace(args)
    try:
        selection = Selection(args.resource, namespace, args.to, args.from_,
                              args.to_namespace or args.from_namespace)
    except ValueError as exc:
        print(f"pinion stat: {exc}", file=sys.stderr)
        return 2
    agents = _agents(args)
    first = scrape.scrape_all(agents, args.timeout)
    sleep(args.window)
    second = scrape.scrape_all(agents, args.timeout)
    view = window_view(first, second, selection.key)
    owners = owners_of([s for one in second for s in one.samples], [p for one in second for p in one.pods])
    rows = stat_rows(selection, view.golden, view.meshed, view.seen, owners, owner_name)
    _report(view.errors, "stat")
    if args.output == "json":
        sys.stdout.write(stat_json(rows, selection.target.kind))
    elif rows:
        sys.stdout.write(stat_table(rows, selection, args.all_namespaces, args.output == "wide"))
    else:
        print("No traffic found.", file=sys.stderr)
    return 1 if view.errors else 0


# --- edges ----------------------------------------------------------------------------------

def edges_table(found: Sequence[Edge], wide: bool) -> str:
    """As `linkerd viz edges` prints it: every column left-aligned, √ when secured."""
    headers = ["SRC", "DST", "SRC_NS", "DST_NS", *(["CLIENT_ID", "SERVER_ID"] if wide else []), "SECURED"]
    rows = [[e.src, e.dst, e.src_namespace, e.dst_namespace,
             *([short_identity(e.client_id) if e.client_id else "",
                short_identity(e.server_id) if e.server_id else ""] if wide else []),
             e.message if e.no_tls_reason else render.SQUARE_ROOT] for e in found]
    return render.linkerd_table(headers, rows, left=len(headers))


def edges_json(found: Sequence[Edge]) -> str:
    """The shape of `linkerd viz edges -o json`."""
    return render.to_json([
        {"src": e.src, "src_namespace": e.src_namespace, "dst": e.dst, "dst_namespace": e.dst_namespace,
         "client_id": short_identity(e.client_id) if e.client_id else "",
         "server_id": short_identity(e.server_id) if e.server_id else "",
         "no_tls_reason": e.message if e.no_tls_reason else ""} for e in found])


def run_edges(args: argparse.Namespace) -> int:
    if args.resource.kind in ("namespace", "service") or args.resource.name is not None:
        print(f"pinion edges: edges are between resources of one type (po, deploy, sts, ds, job, cj), "
              f"not {args.resource}", file=sys.stderr)
        return 2
    scrapes = scrape.scrape_all(_agents(args), args.timeout)
    errors = [s.error for s in scrapes if s.error is not None]
    samples = [sample for s in scrapes for sample in s.samples]
    identities = pod_identities(pod for s in scrapes for pod in s.pods)
    found = edges(samples, args.resource.kind, _namespace(args), identities)
    _report(errors, "edges")
    if args.output == "json":
        sys.stdout.write(edges_json(found))
    elif found:
        sys.stdout.write(edges_table(found, args.output == "wide"))
    else:
        print("No edges found.", file=sys.stderr)
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
