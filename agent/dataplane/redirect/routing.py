"""The policy route that brings an app's replies back to the proxy's transparent sockets:
`ip rule fwmark <mark> lookup <table>` + `local 0.0.0.0/0 dev lo table <table>`.

Backend-independent (netfilter only marks; routing is the same for nftables and iptables).
Acts on the calling thread's netns: `ip` forked from a thread runs in that thread's netns."""

from __future__ import annotations

import json
import subprocess

from agent.dataplane.redirect.plan import Plan

RULE_PRIORITY = 15006
_DESCRIPTION = "local-delivery route"


class RoutingError(RuntimeError):
    pass


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        raise RoutingError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def _rule_present(plan: Plan) -> bool:
    for rule in json.loads(_ip("-j", "rule", "show") or "[]"):
        fwmark = rule.get("fwmark")
        if fwmark and int(fwmark, 0) == plan.reply_mark and str(rule.get("table")) == str(plan.route_table):
            return True
    return False


def _route_present(plan: Plan) -> bool:
    routes = json.loads(_ip("-j", "route", "show", "table", str(plan.route_table)) or "[]")
    return any(r.get("type") == "local" and r.get("dst") == "default" for r in routes)


def present(plan: Plan) -> bool:
    return _rule_present(plan) and _route_present(plan)


def ensure(plan: Plan) -> None:
    """Idempotent: add what is missing."""
    _ip("route", "replace", "local", "0.0.0.0/0", "dev", "lo", "table", str(plan.route_table))
    if not _rule_present(plan):
        _ip("rule", "add", "fwmark", hex(plan.reply_mark), "lookup", str(plan.route_table),
            "priority", str(RULE_PRIORITY))


def remove(plan: Plan) -> None:
    while _rule_present(plan):
        _ip("rule", "del", "fwmark", hex(plan.reply_mark), "lookup", str(plan.route_table))
    if _route_present(plan):
        _ip("route", "flush", "table", str(plan.route_table))


def missing(plan: Plan) -> list[str]:
    return [] if present(plan) else [_DESCRIPTION]
