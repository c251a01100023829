"""The nftables backend through the `nft` binary (its path once the agent holds ~1,000 fds,
where libnftables' select() would abort the process): it reads a netns the same way."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator

import pytest

pytestmark = pytest.mark.netns

SCRIPT = """
import json
from agent.dataplane.redirect import nftables

nftables._lowest_free_fd = lambda: nftables._FD_SETSIZE  # as in an agent holding 1,024 fds
backend = nftables.NftablesBackend()
found = {"before": sorted(backend.installed())}
backend._nft.run("create table ip pinion\\nadd chain ip pinion c\\n"
                 "add rule ip pinion c meta l4proto tcp return comment \\"pinion/probe\\"\\n")
found["after"] = sorted(backend.installed())
print(json.dumps(found))
"""


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"pnftproc-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_installed_through_the_nft_process_in_a_netns_without_our_table(netns: str) -> None:
    # Issue #21's run: an iptables agent adding pods past ~150 looks for nftables rules left
    # in each new netns; `nft -j -f -` printed nothing for a `list` (status 0) and the pod's
    # ADD failed on json.loads(""); with our table there it would have said "none".
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", SCRIPT],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"before": [], "after": ["pinion/probe"]}
