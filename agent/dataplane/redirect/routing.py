"""The policy route that brings an app's replies back to the proxy's transparent sockets:
`ip rule fwmark <mark> lookup <table>` + `local 0.0.0.0/0 dev lo table <table>`.

Backend-independent (netfilter only marks; routing is the same for nftables and iptables).
Acts on the calling thread's netns: `ip` forked from a thread runs in that thread's netns, and
so does a netlink socket opened by that thread. `ensure` (on every pod ADD) speaks rtnetlink
itself: three `ip` processes cost 5-14 ms of a pod's CNI ADD, two netlink messages ~0.1 ms."""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
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


# rtnetlink, as <linux/netlink.h>, <linux/rtnetlink.h> and <linux/fib_rules.h> define it
_RTM_NEWROUTE, _RTM_NEWRULE, _NLMSG_ERROR = 24, 32, 2
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_REPLACE, _NLM_F_EXCL, _NLM_F_CREATE = 0x1, 0x4, 0x100, 0x200, 0x400
_RTPROT_BOOT, _RT_SCOPE_HOST, _RTN_LOCAL = 3, 254, 2
_RTA_OIF, _RTA_TABLE = 4, 15
_FRA_PRIORITY, _FRA_FWMARK, _FRA_TABLE, _FR_ACT_TO_TBL = 6, 10, 15, 1
_LOOPBACK_IFINDEX = 1  # lo is ifindex 1 in every netns (the kernel's LOOPBACK_IFINDEX)
_HEADER = struct.Struct("=IHHII")  # nlmsghdr
_BODY = struct.Struct("=BBBBBBBBI")  # rtmsg and fib_rule_hdr share this layout


def _attribute(kind: int, value: int) -> bytes:
    return struct.pack("=HHI", 8, kind, value)  # a u32: 4-byte aligned already


def _netlink(connection: socket.socket, kind: int, flags: int, body: bytes, what: str) -> int:
    """One request, its acknowledgement: 0, or the errno the kernel answered."""
    connection.send(_HEADER.pack(_HEADER.size + len(body), kind,
                                 _NLM_F_REQUEST | _NLM_F_ACK | flags, 1, 0) + body)
    reply = connection.recv(8192)
    if len(reply) < _HEADER.size + 4 or _HEADER.unpack_from(reply)[1] != _NLMSG_ERROR:
        raise RoutingError(f"{what}: no netlink acknowledgement")
    error: int = struct.unpack_from("=i", reply, _HEADER.size)[0]
    return -error


def ensure(plan: Plan) -> None:
    """Idempotent: add what is missing. The same route and rule as `ip route replace local
    0.0.0.0/0 dev lo table T` and `ip rule add fwmark M lookup T priority 15006` make."""
    table = plan.route_table
    route = _BODY.pack(socket.AF_INET, 0, 0, 0, table if table < 256 else 0, _RTPROT_BOOT,
                       _RT_SCOPE_HOST, _RTN_LOCAL, 0) + _attribute(_RTA_TABLE, table) + \
        _attribute(_RTA_OIF, _LOOPBACK_IFINDEX)
    rule = _BODY.pack(socket.AF_INET, 0, 0, 0, table if table < 256 else 0, 0, 0, _FR_ACT_TO_TBL, 0) + \
        _attribute(_FRA_FWMARK, plan.reply_mark) + _attribute(_FRA_PRIORITY, RULE_PRIORITY) + \
        _attribute(_FRA_TABLE, table)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       socket.NETLINK_ROUTE) as connection:
        connection.settimeout(5)
        error = _netlink(connection, _RTM_NEWROUTE, _NLM_F_CREATE | _NLM_F_REPLACE, route,
                         f"local default route in table {table}")
        if error:
            raise RoutingError(f"ip route replace local 0.0.0.0/0 dev lo table {table}: "
                               f"{os.strerror(error)}")
        # EXCL: an identical rule (a repeated ADD, a re-adopted pod) answers EEXIST
        error = _netlink(connection, _RTM_NEWRULE, _NLM_F_CREATE | _NLM_F_EXCL, rule,
                         f"rule for mark {plan.reply_mark:#x}")
        if error and error != errno.EEXIST:
            raise RoutingError(f"ip rule add fwmark {plan.reply_mark:#x} lookup {table} priority "
                               f"{RULE_PRIORITY}: {os.strerror(error)}")


def remove(plan: Plan) -> None:
    while _rule_present(plan):
        _ip("rule", "del", "fwmark", hex(plan.reply_mark), "lookup", str(plan.route_table))
    if _route_present(plan):
        _ip("route", "flush", "table", str(plan.route_table))


def missing(plan: Plan) -> list[str]:
    return [] if present(plan) else [_DESCRIPTION]
