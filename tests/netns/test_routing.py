"""The reply route a captured pod needs, made over rtnetlink (routing.ensure) in a real netns:
the same rule and route, attribute for attribute, as the `ip` commands it replaced, made
once however often ensure runs, and found again by present()/remove() (which still use `ip`)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

SCRIPT = """
import json, subprocess, sys
from agent.dataplane.redirect import routing

class Plan:
    route_table = int(sys.argv[1])
    reply_mark = int(sys.argv[2], 0)

def show():
    def ip(*args):
        return json.loads(subprocess.run(["ip", "-d", "-j", *args], capture_output=True, text=True,
                                         check=True).stdout or "[]")
    return {"rules": ip("rule", "show"), "routes": ip("route", "show", "table", sys.argv[1])}

if sys.argv[3] == "netlink":
    routing.ensure(Plan)
    routing.ensure(Plan)  # a repeated ADD
    ensured = show()
    present = routing.present(Plan)
    routing.remove(Plan)
    print(json.dumps({"made": ensured, "present": present, "after_remove": show()}))
else:
    subprocess.run(["ip", "route", "replace", "local", "0.0.0.0/0", "dev", "lo", "table", sys.argv[1]],
                   check=True)
    subprocess.run(["ip", "rule", "add", "fwmark", sys.argv[2], "lookup", sys.argv[1], "priority", "15006"],
                   check=True)
    print(json.dumps({"made": show()}))
"""


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"pcnirt-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def run_in(netns: str, how: str) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", SCRIPT, "133", "0x4000", how],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_ensure_over_netlink_makes_what_ip_made_once_and_remove_takes_it_away(netns: str) -> None:
    netlink = run_in(netns, "netlink")
    baseline = run_in(netns, "ip")  # same netns, after remove: a clean slate again

    assert netlink["made"] == baseline["made"]
    assert [r for r in netlink["made"]["rules"] if r.get("table") == "133"] == [
        {"priority": 15006, "src": "all", "fwmark": "0x4000", "table": "133", "protocol": "unspec"}]
    assert [r["type"] for r in netlink["made"]["routes"]] == ["local"]
    assert netlink["present"] is True
    assert netlink["after_remove"]["routes"] == []
    assert all(r.get("table") != "133" for r in netlink["after_remove"]["rules"])
