"""Traffic-capture rules as data. A plan is rendered by a backend (iptables, nftables);
every rule carries the comment `pinion/<name>` so it can be found, diffed and removed."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from agent.config import Ports
from agent.model import CaptureSettings

COMMENT_PREFIX = "pinion/"


class Hook(Enum):
    """Where a chain sits: inbound = nat PREROUTING, outbound = nat OUTPUT."""

    INBOUND = "inbound"
    OUTBOUND = "outbound"


@dataclass(frozen=True, slots=True)
class Match:
    """All set fields must hold (AND). A field left None does not constrain."""

    tcp: bool = False
    mark: int | None = None
    in_iface: str | None = None
    out_iface: str | None = None
    src_cidrs: tuple[str, ...] = ()
    dst_cidrs: tuple[str, ...] = ()
    dst_ports: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    hook: Hook
    match: Match
    redirect_port: int | None = None  # None = return (leave the packet alone)

    @property
    def comment(self) -> str:
        return COMMENT_PREFIX + self.name


@dataclass(frozen=True, slots=True)
class Plan:
    rules: tuple[Rule, ...]

    def names(self) -> set[str]:
        return {rule.comment for rule in self.rules}

    def for_hook(self, hook: Hook) -> tuple[Rule, ...]:
        return tuple(rule for rule in self.rules if rule.hook is hook)


def build_plan(ports: Ports, mark: int, capture: CaptureSettings) -> Plan:
    """The in-pod capture rules, in the shape of Istio's in-pod mode (design.md)."""
    inbound, outbound = Hook.INBOUND, Hook.OUTBOUND
    rules = [
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
        Rule("inbound-capture", inbound, Match(tcp=True), redirect_port=ports.inbound),
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
    rules.append(Rule("outbound-capture", outbound, Match(tcp=True), redirect_port=ports.outbound))
    return Plan(tuple(rules))
