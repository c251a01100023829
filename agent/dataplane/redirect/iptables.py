"""The iptables backend (legacy x_tables through python-iptables): two Pinion chains in the
nat table, jumped to from PREROUTING and OUTPUT, committed in one batch.

python-iptables keeps one process-wide handle per table, so every operation holds a lock,
re-reads the table in the calling thread's netns, and commits or discards before letting go."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from agent.dataplane.redirect.plan import COMMENT_PREFIX, Hook, Match, Plan, Rule

_CHAINS = {Hook.INBOUND: ("PINION_INBOUND", "PREROUTING"), Hook.OUTBOUND: ("PINION_OUTPUT", "OUTPUT")}
_MULTIPORT_MAX = 15


@dataclass(frozen=True, slots=True)
class _IptRule:
    """One iptables rule in iptables-save terms; a plan Rule may need several."""

    chain: str
    comment: str
    target: str
    protocol: str | None = None
    src: str | None = None
    dst: str | None = None
    in_iface: str | None = None
    out_iface: str | None = None
    mark: int | None = None
    dports: str | None = None
    to_ports: int | None = None

    def save_line(self) -> str:
        args = [f"-A {self.chain}"]
        for flag, value in (("-s", self.src), ("-d", self.dst), ("-i", self.in_iface),
                            ("-o", self.out_iface), ("-p", self.protocol)):
            if value:
                args.append(f"{flag} {value}")
        if self.dports:
            kind = "--dport" if "," not in self.dports else "-m multiport --dports"
            args.append(f"{'-m tcp ' if ',' not in self.dports else ''}{kind} {self.dports}")
        if self.mark is not None:
            args.append(f"-m mark --mark {self.mark:#x}")
        args.append(f'-m comment --comment "{self.comment}"')
        args.append(f"-j {self.target}")
        if self.to_ports is not None:
            args.append(f"--to-ports {self.to_ports}")
        return " ".join(args)


def _legacy_tables() -> list[str]:
    """Legacy tables initialised in the calling thread's netns (thread-self: setns is per thread)."""
    try:
        with open("/proc/thread-self/net/ip_tables_names") as names:
            return names.read().split()
    except FileNotFoundError:
        return []


def translate(plan: Plan) -> list[_IptRule]:
    """Plan -> iptables rules, jumps first. Sets become one rule per element (CIDRs)
    or multiport chunks (ports)."""
    rules = [
        _IptRule(chain=parent, comment=f"{COMMENT_PREFIX}{hook.value}-jump", target=chain)
        for hook, (chain, parent) in _CHAINS.items()
    ]
    for rule in plan.rules:
        rules += list(_expand(rule))
    return rules


def _expand(rule: Rule) -> Iterator[_IptRule]:
    match: Match = rule.match
    chain = _CHAINS[rule.hook][0]
    target = "RETURN" if rule.redirect_port is None else "REDIRECT"
    port_groups: list[str | None] = [None]
    if match.dst_ports:
        ports = [str(p) for p in match.dst_ports]
        port_groups = [",".join(ports[i:i + _MULTIPORT_MAX]) for i in range(0, len(ports), _MULTIPORT_MAX)]
    for src in match.src_cidrs or (None,):
        for dst in match.dst_cidrs or (None,):
            for dports in port_groups:
                yield _IptRule(
                    chain=chain, comment=rule.comment, target=target,
                    protocol="tcp" if match.tcp else None, src=src, dst=dst,
                    in_iface=match.in_iface, out_iface=match.out_iface, mark=match.mark,
                    dports=dports, to_ports=rule.redirect_port,
                )


class IptablesBackend:
    name = "iptables"
    _lock = threading.Lock()  # python-iptables' table handles are process-wide singletons

    def __init__(self) -> None:
        self._module: Any = None

    @property
    def _iptc(self):  # type: ignore[no-untyped-def]
        """python-iptables costs ~20 MB RSS (libxtables and its extensions): load it only
        when legacy tables are really read or written, never just to look for them."""
        if self._module is None:
            import iptc

            self._module = iptc
        return self._module

    def render(self, plan: Plan) -> str:
        chains = [f":{chain} - [0:0]" for chain, _ in _CHAINS.values()]
        lines = ["*nat", *chains, *(r.save_line() for r in translate(plan)), "COMMIT"]
        return "\n".join(lines) + "\n"

    def apply(self, plan: Plan) -> None:
        rules = translate(plan)
        with self._lock:
            table = self._open()
            try:
                self._clear(table)
                for chain, _ in _CHAINS.values():
                    table.create_chain(chain)
                for rule in rules:
                    self._insert(table, rule)
                table.commit()
            finally:
                table.close()

    def prepare(self) -> None:
        """Called once in the agent's own netns, before any pod is touched.

        Loads libxtables and the extensions our rules use (~175 ms), so the first ADD does
        not pay for it. And opens, for good, every legacy table of the node: python-iptables
        walks all tables named in the *process's* netns to classify a rule's target; a
        closed handle there crashes it, and a table not yet open would be created inside
        whichever pod netns the walking thread is in."""
        with self._lock:
            for name in _legacy_tables():
                if name != "nat":
                    self._iptc.Table(name, autocommit=False)
        rule = self._iptc.Rule()
        rule.protocol = "tcp"
        for match in ("tcp", "multiport", "mark", "comment"):
            rule.create_match(match)
        rule.create_target("REDIRECT")

    def remove(self) -> None:
        with self._lock:
            table = self._open()
            try:
                self._clear(table)
                table.commit()
            finally:
                table.close()

    def installed(self) -> set[str]:
        if "nat" not in _legacy_tables():
            return set()  # looking must not create a legacy nat table in this netns
        with self._lock:
            table = self._open()
            try:
                found = set()
                for chain in table.chains:
                    for rule in chain.rules:
                        found.update(m.comment for m in rule.matches if m.name == "comment")
                return {c for c in found if c.startswith(COMMENT_PREFIX)}
            finally:
                table.close()

    def count_rules(self) -> int:
        """Rules in the legacy tables of this netns: does the node itself use iptables?"""
        names = _legacy_tables()
        if not names:
            return 0
        with self._lock:
            total = 0
            for name in names:
                table = self._open(name)
                try:
                    total += sum(len(chain.rules) for chain in table.chains)
                finally:
                    if name == "nat":  # only nat is closed between uses: see prepare()
                        table.close()
            return total

    def _open(self, name: str = "nat"):  # type: ignore[no-untyped-def]
        table = self._iptc.Table(name, autocommit=False)
        table.autocommit = False
        table.refresh()  # frees any old handle without commit; re-inits in this thread's netns
        return table

    def _clear(self, table) -> None:  # type: ignore[no-untyped-def]
        for chain_name, parent_name in _CHAINS.values():
            parent = self._iptc.Chain(table, parent_name)
            for rule in list(parent.rules):
                if rule.target.name == chain_name:
                    parent.delete_rule(rule)
            if table.is_chain(chain_name):
                chain = self._iptc.Chain(table, chain_name)
                chain.flush()
                chain.delete()

    def _insert(self, table, spec: _IptRule) -> None:  # type: ignore[no-untyped-def]
        iptc = self._iptc
        rule = iptc.Rule()
        if spec.protocol:
            rule.protocol = spec.protocol
        if spec.src:
            rule.src = spec.src
        if spec.dst:
            rule.dst = spec.dst
        if spec.in_iface:
            rule.in_interface = spec.in_iface
        if spec.out_iface:
            rule.out_interface = spec.out_iface
        if spec.dports and "," in spec.dports:
            rule.create_match("multiport").dports = spec.dports
        elif spec.dports:
            rule.create_match("tcp").dport = spec.dports
        if spec.mark is not None:
            rule.create_match("mark").mark = f"{spec.mark:#x}"
        rule.create_match("comment").comment = spec.comment
        target = rule.create_target(spec.target)
        if spec.to_ports is not None:
            target.to_ports = str(spec.to_ports)
        chain = iptc.Chain(table, spec.chain)
        if spec.chain in ("PREROUTING", "OUTPUT"):
            chain.insert_rule(rule)  # our jump goes first, ahead of anything else there
        else:
            chain.append_rule(rule)
