"""eBPF capture without a kernel: the plan split, the map layouts bpf/capture.c reads, and
where a pod's cgroup is found."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from agent.config import DEFAULT_PROXY_MARK, DEFAULT_REPLY_MARK, Ports
from agent.dataplane import cgroups
from agent.dataplane.redirect import bpfmaps
from agent.dataplane.redirect.plan import Action, Hook, Match, Plan, Rule, build_plan
from agent.model import CaptureSettings
from agent.viz import checks
from agent.viz.scrape import Reply

CAPTURE = CaptureSettings(exclude_outbound_ports=(80, 443), exclude_inbound_ports=(22,),
                          exclude_outbound_cidrs=("10.0.0.0/8", "192.168.1.0/24"),
                          probe_sources=("10.42.0.1",))


def _plan(capture: CaptureSettings = CAPTURE) -> Plan:
    return build_plan(Ports(), DEFAULT_PROXY_MARK, DEFAULT_REPLY_MARK, capture)


# ---------------------------------------------------------------- the plan split

def test_the_outbound_chain_becomes_a_policy_and_the_rest_stays_netfilter() -> None:
    plan = _plan()

    netfilter, policy = bpfmaps.split_plan(plan)

    assert netfilter.for_hook(Hook.OUTBOUND) == ()
    assert netfilter.for_hook(Hook.INBOUND) == plan.for_hook(Hook.INBOUND)
    assert netfilter.for_hook(Hook.REPLY_MARK) == plan.for_hook(Hook.REPLY_MARK)
    assert (netfilter.reply_mark, netfilter.route_table) == (plan.reply_mark, plan.route_table)
    assert policy == bpfmaps.OutboundPolicy(
        redirect_port=15001, proxy_mark=DEFAULT_PROXY_MARK, skip_ports=(80, 443),
        skip_cidrs=("10.0.0.0/8", "192.168.1.0/24"),
        rule_names=frozenset(r.comment for r in plan.for_hook(Hook.OUTBOUND)))


def test_without_exclusions_the_policy_has_none() -> None:
    _, policy = bpfmaps.split_plan(_plan(CaptureSettings()))

    assert (policy.skip_ports, policy.skip_cidrs) == ((), ())
    assert "pinion/outbound-capture" in policy.rule_names


def test_an_outbound_rule_the_programs_cannot_express_is_an_error() -> None:
    plan = _plan()
    odd = Rule("outbound-skip-odd", Hook.OUTBOUND, Match(tcp=True, in_iface="eth1"), Action.RETURN)

    with pytest.raises(ValueError, match="outbound-skip-odd"):
        bpfmaps.split_plan(Plan((*plan.rules, odd), plan.reply_mark, plan.route_table))


def test_a_plan_without_outbound_capture_is_an_error() -> None:
    plan = _plan()
    inbound_only = Plan(tuple(r for r in plan.rules if r.hook is not Hook.OUTBOUND),
                        plan.reply_mark, plan.route_table)

    with pytest.raises(ValueError, match="no outbound capture"):
        bpfmaps.split_plan(inbound_only)


# ---------------------------------------------------------------- map layouts (bpf/capture.c)

COOKIE = 0x1122334455667788


def test_pod_config_is_mark_then_port_in_host_order() -> None:
    _, policy = bpfmaps.split_plan(_plan())

    value = bpfmaps.pod_config_value(policy)

    assert len(value) == 8  # struct pod_config
    assert struct.unpack("=IHH", value) == (DEFAULT_PROXY_MARK, 15001, 0)


def test_port_keys_are_cookie_port_and_padding() -> None:
    key = bpfmaps.port_key(COOKIE, 8080)

    assert len(key) == bpfmaps.PORT_KEY_SIZE == 16  # struct port_key
    assert bpfmaps.cookie_of_port_key(key) == COOKIE
    assert key[8:] == struct.pack("=I", 8080) + bytes(4)


def test_cidr_keys_match_the_whole_cookie_then_the_prefix() -> None:
    key = bpfmaps.cidr_key(COOKIE, "10.1.2.3/8")  # normalised to its network

    assert len(key) == bpfmaps.CIDR_KEY_SIZE == 16  # struct cidr_key, packed
    assert struct.unpack("=I", key[:4]) == (64 + 8,)
    assert bpfmaps.cookie_of_cidr_key(key) == COOKIE
    assert key[12:] == bytes([10, 0, 0, 0])  # network byte order, as ctx->user_ip4


def test_own_ips_are_local_and_excluded_cidrs_are_counted() -> None:
    _, policy = bpfmaps.split_plan(_plan())

    entries = bpfmaps.cidr_entries(COOKIE, policy, ("10.42.0.5", "fd00::5"))

    assert entries == {
        bpfmaps.cidr_key(COOKIE, "10.0.0.0/8"): bytes([bpfmaps.SKIP_EXCLUDED]),
        bpfmaps.cidr_key(COOKIE, "192.168.1.0/24"): bytes([bpfmaps.SKIP_EXCLUDED]),
        bpfmaps.cidr_key(COOKIE, "10.42.0.5/32"): bytes([bpfmaps.SKIP_LOCAL]),
    }


def test_stats_are_four_counters() -> None:
    raw = struct.pack("=QQQQ", 3, 2, 1000, 200)

    assert bpfmaps.stats_value(raw) == bpfmaps.TcpStats(opened=3, closed=2, read_bytes=1000,
                                                        write_bytes=200)


def test_the_c_source_declares_what_the_loader_expects() -> None:
    source = (Path(__file__).resolve().parents[2] / "bpf" / "capture.c").read_text()

    for name in bpfmaps.MAPS:
        assert f"}} {name} SEC(\".maps\");" in source
    for name, attach in bpfmaps.PROGRAMS.items():
        assert f"int {name}(" in source
        assert attach in ("connect4", "connect6", "sockops", "getsockopt")
    assert "vmlinux.h" not in source and "BPF_CORE_READ" not in source  # no BTF needed


# ---------------------------------------------------------------- cgroups

MOUNTS_HYBRID = """\
tmpfs /sys/fs/cgroup tmpfs rw 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0
"""


def test_the_v2_mount_is_found_in_a_hybrid_layout() -> None:
    assert cgroups.cgroup2_mount(MOUNTS_HYBRID) == Path("/sys/fs/cgroup/unified")
    assert cgroups.cgroup2_mount("tmpfs /run tmpfs rw 0 0\n") is None


def test_our_own_cgroup_is_the_0_line() -> None:
    text = "4:memory:/x\n0::/kubepods.slice/pinion.scope\n"

    assert cgroups.own_cgroup(text, Path("/sys/fs/cgroup")) == Path(
        "/sys/fs/cgroup/kubepods.slice/pinion.scope")
    with pytest.raises(cgroups.CgroupError, match="no cgroup v2"):
        cgroups.own_cgroup("4:memory:/x\n", Path("/sys/fs/cgroup"))


UID = "5b1e0c2a-1111-2222-3333-444455556666"


@pytest.mark.parametrize("layout", [
    "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod5b1e0c2a_1111_2222_3333_444455556666.slice",
    "kubepods.slice/kubepods-pod5b1e0c2a_1111_2222_3333_444455556666.slice",
    "kubepods/besteffort/pod5b1e0c2a-1111-2222-3333-444455556666",
    "kubepods/pod5b1e0c2a-1111-2222-3333-444455556666",
])
def test_a_pod_cgroup_is_found_by_uid_in_the_kubelet_layouts(tmp_path: Path, layout: str) -> None:
    (tmp_path / layout).mkdir(parents=True)

    assert cgroups.pod_cgroup(tmp_path, "", UID) == tmp_path / layout


def test_k3s_in_a_container_nests_the_kubelet_tree(tmp_path: Path) -> None:
    layout = tmp_path / "k3s" / "kubepods" / "burstable" / f"pod{UID}"
    layout.mkdir(parents=True)

    assert cgroups.pod_cgroup(tmp_path, "", UID, roots=("", "k3s")) == layout


def test_pinion_cgroup_wins_and_may_be_relative_to_the_mount(tmp_path: Path) -> None:
    (tmp_path / "lab" / "node0" / "web").mkdir(parents=True)
    (tmp_path / "kubepods" / f"pod{UID}").mkdir(parents=True)

    assert cgroups.pod_cgroup(tmp_path, "/lab/node0/web", UID) == tmp_path / "lab/node0/web"
    assert cgroups.pod_cgroup(tmp_path, str(tmp_path / "lab/node0/web"), "") == \
        tmp_path / "lab/node0/web"


def test_an_unresolvable_cgroup_says_what_was_tried(tmp_path: Path) -> None:
    with pytest.raises(cgroups.CgroupError, match="PINION_CGROUP=/nope"):
        cgroups.pod_cgroup(tmp_path, "/nope", UID)
    with pytest.raises(cgroups.CgroupError, match=f"no cgroup for pod uid {UID}.*kubepods"):
        cgroups.pod_cgroup(tmp_path, "", UID)
    with pytest.raises(cgroups.CgroupError, match="no PINION_CGROUP and no K8S_POD_UID"):
        cgroups.pod_cgroup(tmp_path, "", "")
    with pytest.raises(cgroups.CgroupError):
        cgroups.pod_cgroup(tmp_path, "/../../etc", "")


# ---------------------------------------------------------------- pinion check

def _replies(pods: list[dict[str, object]]) -> checks.AgentReplies:
    return checks.AgentReplies("10.0.0.1:4191", replies={
        "/live": Reply(200, b"ok"), "/ready": Reply(200, b"ok"),
        "/metrics": Reply(200, b"process_start_time_seconds 1\n"),
        "/pods": Reply(200, json.dumps(pods).encode())})


def _pod(name: str, attached: tuple[bool, bool, bool]) -> dict[str, object]:
    kinds = ("connect4", "connect6", "sockops")
    return {"namespace": "shop", "name": name, "listening": True, "backend": "ebpf",
            "programs": [{"program": f"pinion_{k}", "attach": k, "id": 7, "attached": a,
                          "cgroup": f"/sys/fs/cgroup/kubepods/pod-{name}"}
                         for k, a in zip(kinds, attached, strict=True)]}


def test_check_shows_where_each_pods_programs_hang_and_fails_on_a_missing_one() -> None:
    results = checks.agent_results(_replies([_pod("web", (True, True, True)),
                                             _pod("api", (False, True, True))]), now=10.0)

    [programs] = [r for r in results if "eBPF" in r.title]
    assert not programs.ok
    assert programs.detail == (
        "shop/web: connect4, connect6, sockops on /sys/fs/cgroup/kubepods/pod-web",
        "shop/api: connect6, sockops on /sys/fs/cgroup/kubepods/pod-api (NOT attached: connect4)")


def test_check_says_nothing_of_ebpf_for_a_netfilter_agent() -> None:
    pods = [{"namespace": "shop", "name": "web", "listening": True, "backend": "nftables"}]

    assert not any("eBPF" in r.title for r in checks.agent_results(_replies(pods), now=10.0))


def test_the_maps_are_sized_for_a_node_not_for_the_objects_ceilings() -> None:
    from agent.dataplane.redirect.bpfmaps import MAPS, map_sizes

    sizes = map_sizes(max_pods=110, max_connections=4096)
    assert sizes == {"pod_config": 110, "stats": 110, "skip_ports": 1760, "skip_cidrs": 1760,
                     "by_cookie": 4096, "by_port": 4096}
    assert set(sizes) == set(MAPS)


def test_resized_maps_are_a_new_version_of_the_pins_never_adopted() -> None:
    from agent.dataplane.redirect.bpfmaps import map_sizes
    from agent.dataplane.redirect.ebpf import pin_version

    program = b"\x7fELF the same object"
    assert pin_version(program, map_sizes(64, 8192)) == pin_version(program, map_sizes(64, 8192))
    assert pin_version(program, map_sizes(64, 8192)) != pin_version(program, map_sizes(1024, 8192))
    assert pin_version(program, map_sizes(64, 8192)) != pin_version(program + b"!", map_sizes(64, 8192))
