"""Traffic-capture rules as data. A plan is rendered by a backend (iptables, nftables);
every rule carries the comment `pinion/<name>` so it can be found, diffed and removed."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from agent.config import Ports
from agent.model import CaptureSettings

COMMENT_PREFIX = "pinion/"


class Hook(Enum):
    """Where a chain sits: guard = PREROUTING before nat (mangle priority: it may drop),
    inbound = nat PREROUTING, outbound = nat OUTPUT, reply-mark = mangle OUTPUT (a mark
    change there re-routes the packet)."""

    GUARD = "guard"
    INBOUND = "inbound"
    OUTBOUND = "outbound"
    REPLY_MARK = "reply-mark"


class Action(Enum):
    RETURN = "return"  # leave the packet alone
    REDIRECT = "redirect"  # to the proxy port in Rule.redirect_port
    SET_CONNMARK = "set-mark"  # connection mark := Rule.mark_value
    RESTORE_MARK = "restore-mark"  # packet mark := connection mark
    DROP = "drop"  # (guard only) the kernel drops it: the agent never sees it


@dataclass(frozen=True, slots=True)
class Match:
    """All set fields must hold (AND). A field left None does not constrain."""

    tcp: bool = False
    mark: int | None = None
    ct_mark: int | None = None
    in_iface: str | None = None
    out_iface: str | None = None
    src_cidrs: tuple[str, ...] = ()
    dst_cidrs: tuple[str, ...] = ()
    dst_ports: tuple[int, ...] = ()
    # a new connection from a source that opened more than (per second, burst) of them
    new_over_rate: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    hook: Hook
    match: Match
    action: Action = Action.RETURN
    redirect_port: int | None = None
    mark_value: int | None = None

    @property
    def comment(self) -> str:
        return COMMENT_PREFIX + self.name


@dataclass(frozen=True, slots=True)
class Plan:
    """Rules, plus the policy route that delivers replies to the proxy's transparent sockets:
    packets marked `reply_mark` are looked up in `route_table`, which says: all is local."""

    rules: tuple[Rule, ...]
    reply_mark: int
    route_table: int

    def names(self) -> set[str]:
        return {rule.comment for rule in self.rules}

    def for_hook(self, hook: Hook) -> tuple[Rule, ...]:
        return tuple(rule for rule in self.rules if rule.hook is hook)


ROUTE_TABLE = 15006
# New mesh-tunnel connections per second from one address beyond which the kernel drops
# the SYN (after a burst of twice as many): well above what the agent's own gate admits to
# TLS (agent.core.limits), so it only ever stops a flood, and the flood costs the agent
# nothing. 0 turns it off.
TUNNEL_SYN_RATE = 50


def build_plan(ports: Ports, mark: int, reply_mark: int, capture: CaptureSettings,
               tunnel_syn_rate: int = TUNNEL_SYN_RATE) -> Plan:
    """The in-pod capture rules, in the shape of Istio's in-pod mode (design.md).

    Inbound delivery keeps the client's address: the proxy connects to the app from a
    transparent socket bound to the client's IP. The app's replies to that IP must come
    back to the proxy, not leave the pod: connections the proxy opens to the pod itself
    (over lo) get `reply_mark` in conntrack, the app's unmarked replies take it on, and
    packets so marked are routed locally (Plan.route_table). The proxy's own sockets keep
    `mark` (skip capture, normal routing); the two marks must differ."""
    if mark == reply_mark:
        raise ValueError("the proxy mark and the reply mark must differ")
    inbound, outbound, reply = Hook.INBOUND, Hook.OUTBOUND, Hook.REPLY_MARK
    rules = []
    if tunnel_syn_rate > 0:
        rate = (tunnel_syn_rate, 2 * tunnel_syn_rate)
        rules.append(Rule("tunnel-syn-rate", Hook.GUARD, Match(tcp=True, dst_ports=(ports.tunnel,),
                                                               new_over_rate=rate), Action.DROP))
    rules += [
        Rule("proxy-delivery-connmark", reply, Match(mark=mark, out_iface="lo"),
             Action.SET_CONNMARK, mark_value=reply_mark),
        Rule("app-reply-mark", reply, Match(mark=0, ct_mark=reply_mark), Action.RESTORE_MARK),
        Rule("inbound-skip-proxy", inbound, Match(mark=mark)),
        Rule("inbound-skip-loopback", inbound, Match(in_iface="lo")),
        Rule("inbound-skip-tunnel", inbound, Match(tcp=True, dst_ports=(ports.tunnel,))),
    ]
    if capture.probe_sources:
        rules.append(Rule("inbound-skip-probes", inbound, Match(src_cidrs=capture.probe_sources)))
    if capture.exclude_inbound_ports:
        excluded = capture.exclude_inbound_ports
        rules.append(Rule("inbound-skip-ports", inbound, Match(tcp=True, dst_ports=excluded)))
    rules += [
        Rule("inbound-capture", inbound, Match(tcp=True), Action.REDIRECT, ports.inbound),
        Rule("outbound-skip-proxy", outbound, Match(mark=mark)),
        Rule("outbound-skip-loopback", outbound, Match(out_iface="lo")),
        Rule("outbound-skip-local", outbound, Match(dst_cidrs=("127.0.0.0/8",))),
        Rule("outbound-skip-dns", outbound, Match(tcp=True, dst_ports=(53,))),
    ]
    if capture.exclude_outbound_ports:
        excluded = capture.exclude_outbound_ports
        rules.append(Rule("outbound-skip-ports", outbound, Match(tcp=True, dst_ports=excluded)))
    if capture.exclude_outbound_cidrs:
        cidrs = capture.exclude_outbound_cidrs
        rules.append(Rule("outbound-skip-cidrs", outbound, Match(dst_cidrs=cidrs)))
    rules.append(Rule("outbound-capture", outbound, Match(tcp=True), Action.REDIRECT, ports.outbound))
    return Plan(tuple(rules), reply_mark, ROUTE_TABLE)
