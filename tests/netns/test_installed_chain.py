"""The conflist `pinion cni install` derives is a working CNI chain: real bridge, host-local
and portmap plugins, then the installed pinion-cni, against a real agent."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.lab.agents import REPO, LabAgent
from agent.lab.cni import CniRuntime
from agent.lab.topology import Lab

pytestmark = pytest.mark.netns


@pytest.fixture
def node_with_agent() -> Iterator[tuple[Lab, LabAgent]]:
    lab = Lab(nodes=1)
    agent = LabAgent(lab, lab.nodes[0])
    try:
        agent.start()
        yield lab, agent
    finally:
        agent.stop()
        lab.close()


@pytest.mark.parametrize("cni_version", ["0.4.0", "1.0.0"])
def test_the_installed_chain_captures_a_pod(node_with_agent: tuple[Lab, LabAgent],
                                            cni_version: str, tmp_path: Path) -> None:
    lab, agent = node_with_agent
    node = lab.nodes[0]
    conf_dir, bin_dir = tmp_path / "net.d", tmp_path / "bin"
    conf_dir.mkdir()
    bin_dir.mkdir()
    primary = lab.conflist(node, cni_version)  # what flannel's conflist is on a k3s node
    primary["plugins"].append({"type": "portmap", "capabilities": {"portMappings": True}})
    (conf_dir / "10-flannel.conflist").write_text(json.dumps(primary))

    installed = subprocess.run(
        [sys.executable, "-m", "agent", "cni", "install", "--conf-dir", str(conf_dir),
         "--bin-dir", str(bin_dir), "--agent-socket", str(agent.cni_socket)],
        capture_output=True, text=True, cwd=str(REPO), timeout=30)
    assert installed.returncode == 0, installed.stderr
    chain = json.loads((conf_dir / "00-pinion.conflist").read_text())
    assert [p["type"] for p in chain["plugins"]] == ["bridge", "portmap", "pinion-cni"]

    netns = f"pn{lab.run_id}-installed"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)  # as runtimes do
    runtime = CniRuntime(bin_dirs=[str(bin_dir), "/usr/lib/cni"], run_in_netns=node.netns)
    container, path = uuid.uuid4().hex, f"/var/run/netns/{netns}"
    args = {"IgnoreUnknown": "1", "K8S_POD_NAMESPACE": "default", "K8S_POD_NAME": "installed"}
    try:
        result = runtime.add(chain, container, path, args=args)
        assert result["cniVersion"] == cni_version
        pods = json.loads(agent.get("/pods")[1])
        assert [p["name"] for p in pods] == ["installed"]
        runtime.check(chain, container, path, args=args, prev_result=result)
        runtime.delete(chain, container, path, args=args, prev_result=result)
        assert json.loads(agent.get("/pods")[1]) == []
    finally:
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
