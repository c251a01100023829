"""The `pinion` command: agent, rules, demo."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from agent.config import REDIRECT_MODES, Config, Ports
from agent.model import CaptureSettings

_AGENT_FLAGS = ("node_name", "admin_addr", "cni_socket", "identity_dir", "state_dir",
                "redirect", "pending_dir", "log_level", "probe_sources")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pinion", description=__doc__)
    sub = parser.add_subparsers(metavar="COMMAND")

    agent = sub.add_parser("agent", help="run the node agent (standalone, no Kubernetes)")
    agent.add_argument("--node-name", help="this node's name (required; or PINION_NODE_NAME)")
    agent.add_argument("--admin-addr", help="IP:PORT of the admin endpoint (default 127.0.0.1:4191)")
    agent.add_argument("--cni-socket", help="Unix socket for pinion-cni (default /run/pinion/cni.sock)")
    agent.add_argument("--identity-dir",
                       help="trust anchor + issuer for workload certificates (accepted; the "
                            "mTLS tunnel that uses it is not in this build)")
    agent.add_argument("--state-dir", help="where captured pods are remembered (default /var/lib/pinion)")
    agent.add_argument("--pending-dir",
                       help="where a fail-open plugin spools ADDs (default /run/pinion/pending)")
    agent.add_argument("--redirect", choices=REDIRECT_MODES, help="capture backend (default auto)")
    agent.add_argument("--probe-sources", metavar="IP,IP",
                       help="addresses kubelet probes come from, never captured, besides each "
                            "pod's gateway (e.g. a SNAT address)")
    agent.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    agent.add_argument("--cleanup", action="store_true",
                       help="on shutdown remove every capture rule (uninstall) instead of "
                            "leaving pods captured for the next agent")
    agent.set_defaults(run=_run_agent)

    rules = sub.add_parser("rules", help="print the capture rules a pod would get (dry run)")
    rules.add_argument("--dry-run", action="store_true", required=True)
    rules.add_argument("--backend", choices=("iptables", "nftables"), default="nftables")
    rules.add_argument("--probe-source", action="append", default=[], metavar="IP")
    rules.add_argument("--exclude-outbound-ports", default="", metavar="P,P")
    rules.add_argument("--exclude-inbound-ports", default="", metavar="P,P")
    rules.add_argument("--exclude-outbound-cidrs", default="", metavar="CIDR,CIDR")
    rules.set_defaults(run=_run_rules)

    demo = sub.add_parser("demo", help="build a throwaway two-node lab and show the mesh at work")
    demo.add_argument("--redirect", choices=("iptables", "nftables"), default="nftables")
    demo.add_argument("--requests", type=int, default=200, help="HTTP requests per client pod")
    demo.set_defaults(run=_run_demo)
    return parser


def _run_agent(args: argparse.Namespace) -> int:
    values = {name: os.environ.get(f"PINION_{name.upper()}") for name in _AGENT_FLAGS}
    values.update({k: v for k, v in vars(args).items() if k in _AGENT_FLAGS and v is not None})
    try:
        config = Config.from_mapping(values)
    except ValueError as exc:
        print(f"pinion agent: {exc}", file=sys.stderr)
        return 2
    _setup_logging(config.log_level)
    from agent.app import run_agent

    runner = asyncio.run
    if os.environ.get("PINION_EVENT_LOOP", "uvloop") == "uvloop":
        try:
            import uvloop  # optional: a faster event loop

            runner = uvloop.run
        except ImportError:
            pass
    return runner(run_agent(config, cleanup=args.cleanup))


def _run_rules(args: argparse.Namespace) -> int:
    from agent.dataplane.redirect import make_backend
    from agent.dataplane.redirect.plan import build_plan

    args_map = {"PINION_EXCLUDE_OUTBOUND_PORTS": args.exclude_outbound_ports,
                "PINION_EXCLUDE_INBOUND_PORTS": args.exclude_inbound_ports,
                "PINION_EXCLUDE_OUTBOUND_CIDRS": args.exclude_outbound_cidrs}
    try:
        capture = CaptureSettings.from_cni_args(args_map, args.probe_source)
    except ValueError as exc:
        print(f"pinion rules: {exc}", file=sys.stderr)
        return 2
    from agent.config import DEFAULT_PROXY_MARK, DEFAULT_REPLY_MARK

    plan = build_plan(Ports(), DEFAULT_PROXY_MARK, DEFAULT_REPLY_MARK, capture)
    sys.stdout.write(make_backend(args.backend).render(plan))
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    _setup_logging("warning")
    from agent.lab.demo import run_demo

    return run_demo(redirect=args.redirect, requests=args.requests)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
