"""What the eBPF programs read, as bytes: the capture plan split into the netfilter part
(inbound + reply routing, unchanged) and the outbound policy the maps carry, and the exact
key/value layouts of bpf/capture.c's maps. Pure: no kernel, no libbpf."""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

from agent.dataplane.redirect.plan import Action, Hook, Plan

# Map and program names in bpf/capture.c.
MAPS = ("pod_config", "skip_ports", "skip_cidrs", "by_cookie", "by_port", "stats")
PORTS_PER_POD = 16  # excluded ports (and CIDRs) a pod may have, on average


def map_sizes(max_pods: int, max_connections: int) -> dict[str, int]:
    """Entries per map for a node of `max_pods` meshed pods and `max_connections` outbound
    connects in flight (connect -> the proxy's accept): hash and LRU maps take their kernel
    memory up front, so the object's ceilings (1,024 pods, 65,536 connections: ~12 MiB
    charged to the agent's cgroup) are cut to what the node runs."""
    return {"pod_config": max_pods, "stats": max_pods,
            "skip_ports": max_pods * PORTS_PER_POD, "skip_cidrs": max_pods * PORTS_PER_POD,
            "by_cookie": max_connections, "by_port": max_connections}
PROGRAMS = {"pinion_connect4": "connect4", "pinion_connect6": "connect6",
            "pinion_sockops": "sockops", "pinion_getsockopt": "getsockopt"}
POD_PROGRAMS = ("pinion_connect4", "pinion_connect6", "pinion_sockops")  # on each pod cgroup
AGENT_PROGRAM = "pinion_getsockopt"  # on the agent's own cgroup

SKIP_EXCLUDED, SKIP_LOCAL = 1, 2  # skip_cidrs values
_COOKIE = struct.Struct("=Q")
_POD_CONFIG = struct.Struct("=IHH")  # proxy_mark, outbound_port, flags
_PORT_KEY = struct.Struct("=QII")  # netns cookie, port (host order), pad
_CIDR_KEY = struct.Struct("=IQ4s")  # prefixlen (64 + CIDR bits), netns cookie, address
_STATS = struct.Struct("=QQQQ")  # opened, closed, read bytes, write bytes
_COOKIE_BITS = 64

# Outbound rules the programs implement themselves (bpf/capture.c), by plan rule name.
BUILT_IN = {"outbound-skip-loopback", "outbound-skip-local", "outbound-skip-dns"}


@dataclass(frozen=True, slots=True)
class OutboundPolicy:
    """The outbound half of a plan, as the eBPF programs apply it."""

    redirect_port: int
    proxy_mark: int
    skip_ports: tuple[int, ...] = ()
    skip_cidrs: tuple[str, ...] = ()
    rule_names: frozenset[str] = frozenset()  # the plan rules this policy stands for


@dataclass(frozen=True, slots=True)
class TcpStats:
    opened: int
    closed: int
    read_bytes: int
    write_bytes: int


def split_plan(plan: Plan) -> tuple[Plan, OutboundPolicy]:
    """Inbound and reply-mark rules stay netfilter rules; the outbound chain becomes map
    entries. An outbound rule the programs do not know is an error, never silently lost."""
    netfilter = Plan(tuple(r for r in plan.rules if r.hook is not Hook.OUTBOUND),
                     plan.reply_mark, plan.route_table)
    redirect_port = proxy_mark = None
    ports: tuple[int, ...] = ()
    cidrs: tuple[str, ...] = ()
    for rule in plan.for_hook(Hook.OUTBOUND):
        match = rule.match
        if rule.action is Action.REDIRECT and rule.redirect_port is not None:
            redirect_port = rule.redirect_port
        elif rule.name == "outbound-skip-proxy" and match.mark is not None:
            proxy_mark = match.mark
        elif rule.name in BUILT_IN:
            continue
        elif rule.action is Action.RETURN and match.dst_ports and not match.dst_cidrs:
            ports += match.dst_ports
        elif rule.action is Action.RETURN and match.dst_cidrs and not match.dst_ports:
            cidrs += match.dst_cidrs
        else:
            raise ValueError(f"the eBPF programs cannot express outbound rule {rule.name}")
    if redirect_port is None or proxy_mark is None:
        raise ValueError("the plan has no outbound capture or no proxy-mark exemption")
    names = frozenset(r.comment for r in plan.for_hook(Hook.OUTBOUND))
    return netfilter, OutboundPolicy(redirect_port, proxy_mark, tuple(sorted(set(ports))),
                                     tuple(dict.fromkeys(cidrs)), names)


def cookie_key(netns_cookie: int) -> bytes:
    return _COOKIE.pack(netns_cookie)


def pod_config_value(policy: OutboundPolicy) -> bytes:
    return _POD_CONFIG.pack(policy.proxy_mark, policy.redirect_port, 0)


def port_key(netns_cookie: int, port: int) -> bytes:
    return _PORT_KEY.pack(netns_cookie, port, 0)


def cidr_key(netns_cookie: int, cidr: str) -> bytes:
    network = ipaddress.IPv4Network(cidr, strict=False)
    return _CIDR_KEY.pack(_COOKIE_BITS + network.prefixlen, netns_cookie,
                          network.network_address.packed)


def cidr_entries(netns_cookie: int, policy: OutboundPolicy,
                 own_ips: tuple[str, ...]) -> dict[bytes, bytes]:
    """skip_cidrs entries of one pod: its excluded CIDRs, and its own IPv4 addresses as
    /32s (traffic to itself stays in the pod, as netfilter's `oifname lo` exemption)."""
    entries = {cidr_key(netns_cookie, c): bytes([SKIP_EXCLUDED]) for c in policy.skip_cidrs}
    for ip in own_ips:
        if ipaddress.ip_address(ip).version == 4:
            entries[cidr_key(netns_cookie, f"{ip}/32")] = bytes([SKIP_LOCAL])
    return entries


def stats_value(value: bytes) -> TcpStats:
    return TcpStats(*_STATS.unpack(value))


STATS_SIZE = _STATS.size
ZERO_STATS = bytes(_STATS.size)
PORT_KEY_SIZE = _PORT_KEY.size
CIDR_KEY_SIZE = _CIDR_KEY.size


def cookie_of_port_key(key: bytes) -> int:
    return int(_PORT_KEY.unpack(key)[0])


def cookie_of_cidr_key(key: bytes) -> int:
    return int(_CIDR_KEY.unpack(key)[1])


SO_NETNS_COOKIE = 71  # asm-generic/socket.h, Linux >= 5.14


def netns_cookie() -> int:
    """The calling thread's network namespace's cookie (what bpf_get_netns_cookie returns)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        return int(_COOKIE.unpack(probe.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0])
