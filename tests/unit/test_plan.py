"""The capture plan, and how each backend spells it: rules as data, rendered as text.

The golden texts below are what `pinion rules --dry-run` prints and what the backends
apply; a change to them is a change to every meshed pod's netfilter rules."""

from __future__ import annotations

import re

import pytest

from agent.cli import main
from agent.config import DEFAULT_PROXY_MARK, DEFAULT_REPLY_MARK, Ports
from agent.dataplane.redirect.iptables import IptablesBackend, translate
from agent.dataplane.redirect.nftables import NftablesBackend
from agent.dataplane.redirect.plan import COMMENT_PREFIX, Action, Hook, Plan, build_plan
from agent.model import CaptureSettings

DEFAULT_CAPTURE = CaptureSettings(probe_sources=("10.42.0.1",))

NFTABLES_DEFAULT = """\
table ip pinion {
\tchain guard {
\t\ttype filter hook prerouting priority mangle; policy accept;
\t\ttcp dport 15008 ct state new meter tunnel_syn_rate size 4096 { ip saddr timeout 10s limit rate over 50/second burst 100 packets } drop comment "pinion/tunnel-syn-rate"
\t}
\tchain reply_mark {
\t\ttype route hook output priority mangle; policy accept;
\t\tmeta mark 0x50494e oifname "lo" ct mark set 0x50494f comment "pinion/proxy-delivery-connmark"
\t\tmeta mark 0x0 ct mark 0x50494f meta mark set ct mark comment "pinion/app-reply-mark"
\t}
\tchain inbound {
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tmeta mark 0x50494e return comment "pinion/inbound-skip-proxy"
\t\tiifname "lo" return comment "pinion/inbound-skip-loopback"
\t\ttcp dport 15008 return comment "pinion/inbound-skip-tunnel"
\t\tip saddr 10.42.0.1 return comment "pinion/inbound-skip-probes"
\t\tmeta l4proto tcp redirect to :15006 comment "pinion/inbound-capture"
\t}
\tchain outbound {
\t\ttype nat hook output priority -100; policy accept;
\t\tmeta mark 0x50494e return comment "pinion/outbound-skip-proxy"
\t\toifname "lo" return comment "pinion/outbound-skip-loopback"
\t\tip daddr 127.0.0.0/8 return comment "pinion/outbound-skip-local"
\t\ttcp dport 53 return comment "pinion/outbound-skip-dns"
\t\tmeta l4proto tcp redirect to :15001 comment "pinion/outbound-capture"
\t}
}
"""

IPTABLES_DEFAULT = """\
*mangle
:PINION_GUARD - [0:0]
:PINION_REPLY_MARK - [0:0]
-A PREROUTING -m comment --comment "pinion/guard-jump" -j PINION_GUARD
-A OUTPUT -m comment --comment "pinion/reply-mark-jump" -j PINION_REPLY_MARK
-A PINION_GUARD -p tcp -m tcp --dport 15008 -m conntrack --ctstate NEW -m hashlimit --hashlimit-above 50/sec --hashlimit-burst 100 --hashlimit-mode srcip --hashlimit-name tunnel-syn-rate --hashlimit-htable-expire 10000 -m comment --comment "pinion/tunnel-syn-rate" -j DROP
-A PINION_REPLY_MARK -o lo -m mark --mark 0x50494e -m comment --comment "pinion/proxy-delivery-connmark" -j CONNMARK --set-mark 0x50494f
-A PINION_REPLY_MARK -m mark --mark 0x0 -m connmark --mark 0x50494f -m comment --comment "pinion/app-reply-mark" -j CONNMARK --restore-mark
COMMIT
*nat
:PINION_INBOUND - [0:0]
:PINION_OUTPUT - [0:0]
-A PREROUTING -m comment --comment "pinion/inbound-jump" -j PINION_INBOUND
-A OUTPUT -m comment --comment "pinion/outbound-jump" -j PINION_OUTPUT
-A PINION_INBOUND -m mark --mark 0x50494e -m comment --comment "pinion/inbound-skip-proxy" -j RETURN
-A PINION_INBOUND -i lo -m comment --comment "pinion/inbound-skip-loopback" -j RETURN
-A PINION_INBOUND -p tcp -m tcp --dport 15008 -m comment --comment "pinion/inbound-skip-tunnel" -j RETURN
-A PINION_INBOUND -s 10.42.0.1 -m comment --comment "pinion/inbound-skip-probes" -j RETURN
-A PINION_INBOUND -p tcp -m comment --comment "pinion/inbound-capture" -j REDIRECT --to-ports 15006
-A PINION_OUTPUT -m mark --mark 0x50494e -m comment --comment "pinion/outbound-skip-proxy" -j RETURN
-A PINION_OUTPUT -o lo -m comment --comment "pinion/outbound-skip-loopback" -j RETURN
-A PINION_OUTPUT -d 127.0.0.0/8 -m comment --comment "pinion/outbound-skip-local" -j RETURN
-A PINION_OUTPUT -p tcp -m tcp --dport 53 -m comment --comment "pinion/outbound-skip-dns" -j RETURN
-A PINION_OUTPUT -p tcp -m comment --comment "pinion/outbound-capture" -j REDIRECT --to-ports 15001
COMMIT
"""

# A pod that opts many ports and two networks out of capture.
MANY_PORTS = tuple(range(8000, 8017))  # 17 ports: one more than a full multiport chunk and one
BUSY_CAPTURE = CaptureSettings(
    exclude_outbound_ports=MANY_PORTS,
    exclude_inbound_ports=(22, 9100),
    exclude_outbound_cidrs=("10.0.0.0/8", "192.168.0.0/16"),
    probe_sources=("10.42.0.1",),
)


def plan_for(capture: CaptureSettings = DEFAULT_CAPTURE) -> Plan:
    return build_plan(Ports(), DEFAULT_PROXY_MARK, DEFAULT_REPLY_MARK, capture)


@pytest.fixture(scope="module")
def nftables() -> NftablesBackend:
    return NftablesBackend()


@pytest.fixture(scope="module")
def iptables() -> IptablesBackend:
    return IptablesBackend()


# ---------------------------------------------------------------- the plan itself


def test_the_proxy_mark_spells_pin() -> None:
    assert DEFAULT_PROXY_MARK == 0x50494E
    assert DEFAULT_PROXY_MARK.to_bytes(3, "big") == b"PIN"


def test_a_default_pod_gets_these_rules_in_this_order() -> None:
    plan = plan_for()

    assert [rule.comment for rule in plan.rules] == [
        "pinion/tunnel-syn-rate",
        "pinion/proxy-delivery-connmark",
        "pinion/app-reply-mark",
        "pinion/inbound-skip-proxy",
        "pinion/inbound-skip-loopback",
        "pinion/inbound-skip-tunnel",
        "pinion/inbound-skip-probes",
        "pinion/inbound-capture",
        "pinion/outbound-skip-proxy",
        "pinion/outbound-skip-loopback",
        "pinion/outbound-skip-local",
        "pinion/outbound-skip-dns",
        "pinion/outbound-capture",
    ]


@pytest.mark.parametrize("capture", [CaptureSettings(), DEFAULT_CAPTURE, BUSY_CAPTURE])
@pytest.mark.parametrize("hook", [Hook.INBOUND, Hook.OUTBOUND])
def test_in_each_hook_every_skip_comes_before_the_one_capture_rule(
        capture: CaptureSettings, hook: Hook) -> None:
    rules = plan_for(capture).for_hook(hook)

    *skips, capture_rule = rules
    assert all(rule.redirect_port is None for rule in skips)
    assert capture_rule.name == f"{hook.value}-capture"
    assert capture_rule.match.tcp
    expected_port = Ports().inbound if hook is Hook.INBOUND else Ports().outbound
    assert capture_rule.redirect_port == expected_port


@pytest.mark.parametrize("capture", [CaptureSettings(), DEFAULT_CAPTURE, BUSY_CAPTURE])
def test_the_proxys_own_traffic_dns_loopback_and_the_tunnel_are_always_left_alone(
        capture: CaptureSettings) -> None:
    rules = {rule.name: rule for rule in plan_for(capture).rules}

    assert rules["inbound-skip-proxy"].match.mark == DEFAULT_PROXY_MARK
    assert rules["outbound-skip-proxy"].match.mark == DEFAULT_PROXY_MARK
    assert rules["inbound-skip-loopback"].match.in_iface == "lo"
    assert rules["outbound-skip-loopback"].match.out_iface == "lo"
    assert rules["outbound-skip-local"].match.dst_cidrs == ("127.0.0.0/8",)
    assert rules["outbound-skip-dns"].match.dst_ports == (53,)
    assert rules["inbound-skip-tunnel"].match.dst_ports == (Ports().tunnel,) == (15008,)
    assert rules["inbound-skip-tunnel"].hook is Hook.INBOUND


def test_without_probe_sources_or_exclusions_there_are_no_empty_rules() -> None:
    names = plan_for(CaptureSettings()).names()

    assert "pinion/inbound-skip-probes" not in names
    assert not {"pinion/inbound-skip-ports", "pinion/outbound-skip-ports",
                "pinion/outbound-skip-cidrs"} & names


def test_exclusions_become_skip_rules_in_their_own_hook() -> None:
    rules = {rule.name: rule for rule in plan_for(BUSY_CAPTURE).rules}

    assert rules["inbound-skip-ports"].hook is Hook.INBOUND
    assert rules["inbound-skip-ports"].match.dst_ports == (22, 9100)
    assert rules["outbound-skip-ports"].hook is Hook.OUTBOUND
    assert rules["outbound-skip-ports"].match.dst_ports == MANY_PORTS
    assert rules["outbound-skip-cidrs"].hook is Hook.OUTBOUND
    assert rules["outbound-skip-cidrs"].match.dst_cidrs == ("10.0.0.0/8", "192.168.0.0/16")


def test_the_same_settings_always_give_the_same_plan_and_text(
        nftables: NftablesBackend, iptables: IptablesBackend) -> None:
    first, second = plan_for(BUSY_CAPTURE), plan_for(BUSY_CAPTURE)

    assert first == second
    assert nftables.render(first) == nftables.render(second)
    assert iptables.render(first) == iptables.render(second)


# ---------------------------------------------------------------- nftables


def test_nftables_renders_the_default_plan_as_one_table(nftables: NftablesBackend) -> None:
    assert nftables.render(plan_for()) == NFTABLES_DEFAULT


def test_nftables_gives_every_rule_a_pinion_comment(nftables: NftablesBackend) -> None:
    plan = plan_for(BUSY_CAPTURE)
    text = nftables.render(plan)

    rule_lines = [line.strip() for line in text.splitlines() if line.strip().endswith('"')]
    comments = {re.search(r'comment "([^"]+)"$', line).group(1)  # type: ignore[union-attr]
                for line in rule_lines}
    assert len(rule_lines) == len(plan.rules)
    assert comments == plan.names()
    assert all(comment.startswith(COMMENT_PREFIX) for comment in comments)


def test_nftables_puts_exclusions_in_sets_ahead_of_the_capture(nftables: NftablesBackend) -> None:
    text = nftables.render(plan_for(BUSY_CAPTURE))
    ports = ", ".join(str(port) for port in MANY_PORTS)

    inbound, outbound = _nft_chain(text, "inbound"), _nft_chain(text, "outbound")
    assert inbound[-2:] == [
        'tcp dport { 22, 9100 } return comment "pinion/inbound-skip-ports"',
        'meta l4proto tcp redirect to :15006 comment "pinion/inbound-capture"',
    ]
    assert outbound[-3:] == [
        f'tcp dport {{ {ports} }} return comment "pinion/outbound-skip-ports"',
        'ip daddr { 10.0.0.0/8, 192.168.0.0/16 } return comment "pinion/outbound-skip-cidrs"',
        'meta l4proto tcp redirect to :15001 comment "pinion/outbound-capture"',
    ]


@pytest.mark.parametrize("capture", [CaptureSettings(), DEFAULT_CAPTURE, BUSY_CAPTURE])
def test_nftables_returns_before_it_redirects(
        nftables: NftablesBackend, capture: CaptureSettings) -> None:
    text = nftables.render(plan_for(capture))

    for chain in ("inbound", "outbound"):
        *skips, last = _nft_chain(text, chain)
        assert all(" return " in line for line in skips)
        assert " redirect to :" in last


def _nft_chain(text: str, chain: str) -> list[str]:
    """The rule lines of one chain (without its `type ... policy` header)."""
    lines = [line.strip() for line in text.splitlines()]
    start = lines.index(f"chain {chain} {{") + 2
    return lines[start:lines.index("}", start)]


# ---------------------------------------------------------------- iptables


def test_iptables_renders_the_default_plan_as_a_restore_file(iptables: IptablesBackend) -> None:
    assert iptables.render(plan_for()) == IPTABLES_DEFAULT


def test_iptables_gives_every_rule_a_pinion_comment(iptables: IptablesBackend) -> None:
    plan = plan_for(BUSY_CAPTURE)
    rules = translate(plan)
    text = iptables.render(plan)

    rule_lines = [line for line in text.splitlines() if line.startswith("-A ")]
    assert len(rule_lines) == len(rules)
    assert all(re.search(r'-m comment --comment "pinion/[a-z-]+"', line) for line in rule_lines)
    jumps = {"pinion/guard-jump", "pinion/reply-mark-jump", "pinion/inbound-jump", "pinion/outbound-jump"}
    assert {rule.comment for rule in rules} == plan.names() | jumps


def test_iptables_jumps_into_its_chains_before_any_chain_rule() -> None:
    rules = translate(plan_for())

    assert [(r.table, r.chain, r.target) for r in rules[:4]] == [
        ("mangle", "PREROUTING", "PINION_GUARD"), ("mangle", "OUTPUT", "PINION_REPLY_MARK"),
        ("nat", "PREROUTING", "PINION_INBOUND"), ("nat", "OUTPUT", "PINION_OUTPUT")]
    assert all(r.chain.startswith("PINION_") for r in rules[4:])


def test_replies_to_the_proxys_transparent_sockets_are_marked_and_routed_home() -> None:
    """Inbound delivery speaks as the client; the app's replies must come back to us."""
    plan = plan_for()
    delivery, reply = plan.for_hook(Hook.REPLY_MARK)

    assert delivery.match.mark == DEFAULT_PROXY_MARK and delivery.match.out_iface == "lo"
    assert delivery.action is Action.SET_CONNMARK and delivery.mark_value == DEFAULT_REPLY_MARK
    assert reply.match.mark == 0 and reply.match.ct_mark == DEFAULT_REPLY_MARK
    assert reply.action is Action.RESTORE_MARK
    assert plan.reply_mark == DEFAULT_REPLY_MARK != DEFAULT_PROXY_MARK


def test_the_two_marks_must_differ() -> None:
    with pytest.raises(ValueError, match="must differ"):
        build_plan(Ports(), 0x10, 0x10, DEFAULT_CAPTURE)


@pytest.mark.parametrize("capture", [CaptureSettings(), DEFAULT_CAPTURE, BUSY_CAPTURE])
@pytest.mark.parametrize("chain", ["PINION_INBOUND", "PINION_OUTPUT"])
def test_iptables_returns_before_it_redirects(capture: CaptureSettings, chain: str) -> None:
    *skips, last = [r for r in translate(plan_for(capture)) if r.chain == chain]

    assert {r.target for r in skips} == {"RETURN"}
    assert last.target == "REDIRECT"
    assert last.protocol == "tcp"


def test_iptables_splits_many_ports_into_multiport_chunks_of_fifteen(
        iptables: IptablesBackend) -> None:
    text = iptables.render(plan_for(BUSY_CAPTURE))
    first, rest = MANY_PORTS[:15], MANY_PORTS[15:]

    skip_ports = [line for line in text.splitlines() if "pinion/outbound-skip-ports" in line]
    assert skip_ports == [
        f"-A PINION_OUTPUT -p tcp -m multiport --dports {','.join(map(str, first))} "
        '-m comment --comment "pinion/outbound-skip-ports" -j RETURN',
        f"-A PINION_OUTPUT -p tcp -m multiport --dports {','.join(map(str, rest))} "
        '-m comment --comment "pinion/outbound-skip-ports" -j RETURN',
    ]


@pytest.mark.parametrize(("count", "chunk_sizes"), [
    (1, [1]), (2, [2]), (15, [15]), (16, [15, 1]), (30, [15, 15]), (31, [15, 15, 1]),
])
def test_iptables_never_puts_more_than_fifteen_ports_in_one_rule(
        count: int, chunk_sizes: list[int]) -> None:
    ports = tuple(range(1000, 1000 + count))
    capture = CaptureSettings(exclude_outbound_ports=ports)

    chunks = [r.dports for r in translate(plan_for(capture)) if r.comment == "pinion/outbound-skip-ports"]
    assert [len(c.split(",")) for c in chunks if c] == chunk_sizes
    assert [int(p) for c in chunks if c for p in c.split(",")] == list(ports)


def test_iptables_single_port_uses_the_tcp_match_and_many_use_multiport() -> None:
    capture = CaptureSettings(exclude_outbound_ports=tuple(range(1000, 1016)))
    lines = [r.save_line() for r in translate(plan_for(capture))
             if r.comment == "pinion/outbound-skip-ports"]

    assert "-m multiport --dports 1000,1001," in lines[0]
    assert "-m tcp --dport 1015 " in lines[1]


def test_iptables_writes_one_rule_per_excluded_cidr(iptables: IptablesBackend) -> None:
    text = iptables.render(plan_for(BUSY_CAPTURE))

    assert [line for line in text.splitlines() if "pinion/outbound-skip-cidrs" in line] == [
        '-A PINION_OUTPUT -d 10.0.0.0/8 -m comment --comment "pinion/outbound-skip-cidrs" -j RETURN',
        '-A PINION_OUTPUT -d 192.168.0.0/16 -m comment --comment "pinion/outbound-skip-cidrs" -j RETURN',
    ]
    assert ('-A PINION_INBOUND -p tcp -m multiport --dports 22,9100 '
            '-m comment --comment "pinion/inbound-skip-ports" -j RETURN') in text.splitlines()


# ---------------------------------------------------------------- `pinion rules --dry-run`


def test_pinion_rules_dry_run_prints_the_nftables_table(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["rules", "--dry-run", "--backend", "nftables", "--probe-source", "10.42.0.1"])

    out, err = capsys.readouterr()
    assert code == 0
    assert out == NFTABLES_DEFAULT
    assert err == ""


def test_pinion_rules_dry_run_prints_the_iptables_restore_file(
        capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["rules", "--dry-run", "--backend", "iptables", "--probe-source", "10.42.0.1"])

    assert code == 0
    assert capsys.readouterr().out == IPTABLES_DEFAULT


def test_pinion_rules_dry_run_shows_exclusions_normalised(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["rules", "--dry-run", "--backend", "nftables",
                 "--exclude-outbound-ports", "443, 80,443", "--exclude-outbound-cidrs", "10.1.2.3/8"])

    out = capsys.readouterr().out
    assert code == 0
    assert '\t\ttcp dport { 80, 443 } return comment "pinion/outbound-skip-ports"\n' in out
    assert '\t\tip daddr 10.0.0.0/8 return comment "pinion/outbound-skip-cidrs"\n' in out


def test_pinion_rules_refuses_a_port_out_of_range(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["rules", "--dry-run", "--exclude-outbound-ports", "70000"])

    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert err == "pinion rules: port 70000 out of range\n"
