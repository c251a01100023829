"""The iptables backend (legacy x_tables through python-iptables): two Pinion chains in the
nat table, jumped to from PREROUTING and OUTPUT, committed in one batch.

python-iptables keeps one process-wide handle per table, so every operation holds a lock,
re-reads the table in the calling thread's netns, and commits or discards before letting go."""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from agent.dataplane.redirect.plan import COMMENT_PREFIX, Action, Hook, Plan, Rule

# hook -> (table, our chain, the built-in chain that jumps to it)
_CHAINS = {
    Hook.GUARD: ("mangle", "PINION_GUARD", "PREROUTING"),
    Hook.REPLY_MARK: ("mangle", "PINION_REPLY_MARK", "OUTPUT"),
    Hook.INBOUND: ("nat", "PINION_INBOUND", "PREROUTING"),
    Hook.OUTBOUND: ("nat", "PINION_OUTPUT", "OUTPUT"),
}
_TABLES = ("mangle", "nat")  # applied in this order: reply routing before capture
_TARGETS = {Action.RETURN: "RETURN", Action.REDIRECT: "REDIRECT",
            Action.SET_CONNMARK: "CONNMARK", Action.RESTORE_MARK: "CONNMARK", Action.DROP: "DROP"}
_MULTIPORT_MAX = 15


@dataclass(frozen=True, slots=True)
class _IptRule:
    """One iptables rule in iptables-save terms; a plan Rule may need several."""

    table: str
    chain: str
    comment: str
    target: str
    protocol: str | None = None
    src: str | None = None
    dst: str | None = None
    in_iface: str | None = None
    out_iface: str | None = None
    mark: int | None = None
    ct_mark: int | None = None
    dports: str | None = None
    to_ports: int | None = None
    connmark: str | None = None  # "set-mark" | "restore-mark"
    connmark_value: int | None = None
    new_over_rate: tuple[int, int] | None = None  # conntrack NEW + hashlimit per source

    @property
    def hashlimit_name(self) -> str:
        return self.comment.removeprefix(COMMENT_PREFIX)

    def save_line(self) -> str:
        args = [f"-A {self.chain}"]
        for flag, value in (("-s", self.src), ("-d", self.dst), ("-i", self.in_iface),
                            ("-o", self.out_iface), ("-p", self.protocol)):
            if value:
                args.append(f"{flag} {value}")
        if self.dports and "," in self.dports:
            args.append(f"-m multiport --dports {self.dports}")
        elif self.dports:
            args.append(f"-m tcp --dport {self.dports}")
        if self.mark is not None:
            args.append(f"-m mark --mark {self.mark:#x}")
        if self.ct_mark is not None:
            args.append(f"-m connmark --mark {self.ct_mark:#x}")
        if self.new_over_rate is not None:
            rate, burst = self.new_over_rate
            args.append(f"-m conntrack --ctstate NEW -m hashlimit --hashlimit-above {rate}/sec "
                        f"--hashlimit-burst {burst} --hashlimit-mode srcip --hashlimit-name "
                        f"{self.hashlimit_name} --hashlimit-htable-expire 10000")
        args.append(f'-m comment --comment "{self.comment}"')
        args.append(f"-j {self.target}")
        if self.to_ports is not None:
            args.append(f"--to-ports {self.to_ports}")
        if self.connmark is not None:
            value = f" {self.connmark_value:#x}" if self.connmark_value is not None else ""
            args.append(f"--{self.connmark}{value}")
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
        _IptRule(table=table, chain=parent, comment=f"{COMMENT_PREFIX}{hook.value}-jump",
                 target=chain)
        for hook, (table, chain, parent) in _CHAINS.items()
    ]
    for rule in plan.rules:
        rules += list(_expand(rule))
    return rules


def _expand(rule: Rule) -> Iterator[_IptRule]:
    match = rule.match
    table, chain, _ = _CHAINS[rule.hook]
    connmark = rule.action.value if _TARGETS[rule.action] == "CONNMARK" else None
    port_groups: list[str | None] = [None]
    if match.dst_ports:
        ports = [str(p) for p in match.dst_ports]
        step = _MULTIPORT_MAX
        port_groups = [",".join(ports[i:i + step]) for i in range(0, len(ports), step)]
    for src in match.src_cidrs or (None,):
        for dst in match.dst_cidrs or (None,):
            for dports in port_groups:
                yield _IptRule(
                    table=table, chain=chain, comment=rule.comment, target=_TARGETS[rule.action],
                    protocol="tcp" if match.tcp else None, src=src, dst=dst,
                    in_iface=match.in_iface, out_iface=match.out_iface, mark=match.mark,
                    ct_mark=match.ct_mark, dports=dports, to_ports=rule.redirect_port,
                    connmark=connmark, connmark_value=rule.mark_value,
                    new_over_rate=match.new_over_rate,
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
            # python-iptables asks distutils for its site-packages path, falling back to
            # sysconfig when distutils is missing. With setuptools installed, distutils is
            # setuptools' shim: +16 MB RSS and +150 ms. Make it "missing" for this import.
            blocked = "distutils.sysconfig" not in sys.modules
            if blocked:
                sys.modules["distutils.sysconfig"] = None  # type: ignore[assignment]
            try:
                import iptc
            finally:
                if blocked:
                    del sys.modules["distutils.sysconfig"]

            self._module = iptc
        return self._module

    def render(self, plan: Plan) -> str:
        rules = translate(plan)
        lines = []
        for table in _TABLES:
            lines.append(f"*{table}")
            lines += [f":{chain} - [0:0]" for t, chain, _ in _CHAINS.values() if t == table]
            lines += [rule.save_line() for rule in rules if rule.table == table]
            lines.append("COMMIT")
        return "\n".join(lines) + "\n"

    def apply(self, plan: Plan) -> None:
        """Per table, one commit: mangle (reply routing) first, then nat (capture), so
        traffic is never captured before replies can find their way back to the proxy."""
        rules = translate(plan)
        with self._lock, self._tables() as tables:
            for name in _TABLES:
                table = tables[name]
                self._clear(table)
                for _, chain, _ in (c for c in _CHAINS.values() if c[0] == name):
                    table.create_chain(chain)
                for rule in (r for r in rules if r.table == name):
                    self._insert(table, rule)
                table.commit()

    def prepare(self) -> None:
        """Called once in the agent's own netns, before any pod is touched.

        Loads libxtables and the extensions our rules use (~175 ms), so the first ADD does
        not pay for it. And opens, for good, every legacy table of the node: python-iptables
        walks all tables named in the *process's* netns to classify a rule's target; a
        closed handle there crashes it, and a table not yet open would be created inside
        whichever pod netns the walking thread is in."""
        with self._lock:
            for name in _legacy_tables():
                if name not in _TABLES:
                    self._iptc.Table(name, autocommit=False)
        rule = self._iptc.Rule()
        rule.protocol = "tcp"
        for match in ("tcp", "multiport", "mark", "connmark", "conntrack", "hashlimit", "comment"):
            rule.create_match(match)
        rule.create_target("REDIRECT")
        rule.create_target("CONNMARK")

    def remove(self) -> None:
        with self._lock, self._tables() as tables:
            for name in reversed(_TABLES):
                self._clear(tables[name])
                tables[name].commit()

    def installed(self) -> set[str]:
        if not set(_TABLES) & set(_legacy_tables()):
            return set()  # looking must not create legacy tables in this netns
        with self._lock, self._tables() as tables:
            found: set[str] = set()
            for table in tables.values():
                for chain in table.chains:
                    for rule in chain.rules:
                        found.update(m.comment for m in rule.matches if m.name == "comment")
            return {c for c in found if c.startswith(COMMENT_PREFIX)}

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
                    if name in _TABLES:  # only ours are closed between uses: see prepare()
                        table.close()
            return total

    def _open(self, name: str):  # type: ignore[no-untyped-def]
        table = self._iptc.Table(name, autocommit=False)
        table.autocommit = False
        table.refresh()  # frees any old handle without commit; re-inits in this thread's netns
        return table

    @contextlib.contextmanager
    def _tables(self) -> Iterator[dict[str, Any]]:
        """Both of our tables, fresh in this thread's netns. Both are refreshed before any
        rule is built (python-iptables walks every table then) and closed after, so no
        handle keeps a pod's netns alive."""
        tables = {name: self._open(name) for name in _TABLES}
        try:
            yield tables
        finally:
            for table in tables.values():
                table.close()

    def _clear(self, table) -> None:  # type: ignore[no-untyped-def]
        for table_name, chain_name, parent_name in _CHAINS.values():
            if table_name != table.name:
                continue
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
        if spec.ct_mark is not None:
            rule.create_match("connmark").mark = f"{spec.ct_mark:#x}"
        if spec.new_over_rate is not None:
            rule.create_match("conntrack").ctstate = "NEW"
            limit = rule.create_match("hashlimit")
            limit.hashlimit_above = f"{spec.new_over_rate[0]}/sec"
            limit.hashlimit_burst = str(spec.new_over_rate[1])
            limit.hashlimit_mode = "srcip"
            limit.hashlimit_name = spec.hashlimit_name
            limit.hashlimit_htable_expire = "10000"
        rule.create_match("comment").comment = spec.comment
        target = rule.create_target(spec.target)
        if spec.to_ports is not None:
            target.to_ports = str(spec.to_ports)
        if spec.connmark is not None:
            value = "" if spec.connmark_value is None else f"{spec.connmark_value:#x}"
            setattr(target, spec.connmark.replace("-", "_"), value)
        chain = iptc.Chain(table, spec.chain)
        if spec.chain in ("PREROUTING", "OUTPUT"):
            chain.insert_rule(rule)  # our jump goes first, ahead of anything else there
        else:
            chain.append_rule(rule)
