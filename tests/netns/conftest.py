"""Root tests on the real kernel: skipped on a workstation without root, failed in CI."""

from __future__ import annotations

import os
import shutil

import pytest


def _missing_capability() -> str | None:
    if os.geteuid() != 0:
        return "tests/netns need root (network namespaces, cgroups, netfilter)"
    if shutil.which("ip") is None:
        return "tests/netns need iproute2 (`ip`)"
    return None


@pytest.fixture(scope="session", autouse=True)
def require_root() -> None:
    """In CI (CI=true) a missing capability is a failure, never a silent skip."""
    reason = _missing_capability()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


# ---------------------------------------------------------------- a two-node meshed lab

import contextlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable, Iterator, Mapping, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

from agent.lab.agents import REPO, LabAgent, start_agents, stop_agents  # noqa: E402
from agent.lab.topology import Lab, Pod  # noqa: E402


@dataclass
class Mesh:
    """Two lab nodes, one real agent on each, pods announced through the real CNI chain."""

    lab: Lab
    agents: list[LabAgent]
    servers: list[subprocess.Popen[str]] = field(default_factory=list)
    identity_dir: Path | None = None  # the agents' --identity-dir, when the mesh runs mTLS
    # Appended to every pod name: a test on a shared mesh gets names (and so metric series)
    # no other test has used. Empty on a mesh of the test's own.
    name_suffix: str = ""

    def pod(self, node: int, name: str, meshed: bool = True, **args: str) -> Pod:
        if not meshed:
            args["PINION_MESH"] = "disabled"
        return self.lab.add_pod(self.lab.nodes[node], name + self.name_suffix, args=args)

    def serve(self, pod: Pod, module: str, *argv: str) -> None:
        """Start a lab server module in the pod and wait for its "listening" line."""
        server = pod.spawn([sys.executable, "-m", module, *argv], stdout=subprocess.PIPE,
                           text=True, cwd=str(REPO))
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "listening"
        self.servers.append(server)

    def plugin(self, command: str, pod: Pod, node: int = 0,
               prev_result: dict[str, object] | None = None) -> subprocess.CompletedProcess[str]:
        """Run the real pinion-cni by hand, as a runtime would (the lab runs whole chains)."""
        import json

        agent = self.agents[node]
        config: dict[str, object] = {"cniVersion": "1.0.0", "name": "lab", **agent.plugin_config()}
        plugin = str(config.pop("_path"))
        if prev_result is not None:
            config["prevResult"] = prev_result
        cni_args = f"K8S_POD_NAMESPACE={pod.namespace};K8S_POD_NAME={pod.name}"
        if pod.cgroup_path is not None:  # as the lab's runtime passes it
            cni_args += f";PINION_CGROUP={pod.cgroup_path}"
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": pod.container_id,
               "CNI_NETNS": pod.netns_path, "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni",
               "CNI_ARGS": cni_args,
               "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        return subprocess.run([plugin], input=json.dumps(config), env=env,
                              capture_output=True, text=True, timeout=30)

    def http(self, pod: Pod, url: str) -> str:
        result = pod.run(["curl", "-sS", "--max-time", "5", url], timeout=15)
        return str(result.stdout)


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll `check` until it holds or `timeout` passes (counters move just after a close)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def capture_rules(pod: Pod) -> list[str]:
    """Every Pinion rule in the pod's netns, from both nftables and legacy iptables, and
    every Pinion eBPF program attached to the pod's cgroup."""
    text = ""
    for argv in (["nft", "list", "ruleset"], ["iptables-legacy-save"]):
        text += subprocess.run(["ip", "netns", "exec", pod.netns, *argv], capture_output=True,
                               text=True, check=True).stdout
    return [line.strip() for line in text.splitlines() if "pinion/" in line] + bpf_programs(pod)


def bpf_programs(pod: Pod) -> list[str]:
    """Pinion's programs attached to the pod's cgroup, as `bpftool cgroup show` lists them."""
    if pod.cgroup_path is None or not pod.cgroup_path.exists():
        return []
    return [f"bpf {p['attach_type']} {p['name']} id {p['id']}" for p in cgroup_programs(pod.cgroup_path)
            if p["name"].startswith("pinion_")]


def cgroup_programs(cgroup: object) -> list[dict[str, object]]:
    import json

    out = subprocess.run(["bpftool", "-j", "cgroup", "show", str(cgroup)], capture_output=True,
                         text=True, check=True).stdout
    return list(json.loads(out.strip() or "[]"))


def outbound_capture(backend: str) -> str:
    """What capture_rules() shows for a pod's outbound capture with this backend."""
    return "pinion_connect4" if backend == "ebpf" else "pinion/outbound-capture"


@pytest.fixture(params=["nftables", "iptables", "ebpf"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# For a test of what happens to a connection once it is captured (relaying, L7 accounting,
# the tunnel) or of the CNI protocol before any rule is written: every backend hands the
# agent the same socket, and the tests of capture itself (test_capture.py, test_lifecycle.py,
# test_races.py, test_ebpf.py) still run on all three. nftables is the default backend.
after_capture = pytest.mark.parametrize("backend", ["nftables"])


@contextlib.contextmanager
def running_mesh(backend: str, extra_args: Sequence[str] = (),
                 identity_dir: Path | None = None, keeper: bool = False,
                 environments: Sequence[Mapping[str, str]] = ()) -> Iterator[Mesh]:
    """Two lab nodes with an agent each (`extra_args` added; node i's agent gets the
    environment variables `environments[i]`, if given); all removed afterwards."""
    agents: list[LabAgent] = []
    lab = Lab(nodes=2, extra_plugins=lambda node: [agents[node.index].plugin_config()])
    mesh = Mesh(lab, agents, identity_dir=identity_dir)
    try:
        agents += [LabAgent(lab, node, redirect=backend, extra_args=extra_args, keeper=keeper,
                            environment=environments[node.index] if environments else None)
                   for node in lab.nodes]
        start_agents(agents)
        for agent in agents:
            if backend == "ebpf":  # a fallback to netfilter must not pass for eBPF
                assert "redirect: ebpf" in agent.log(), agent.log()[-2000:]
        yield mesh
    finally:
        stop_agents(agents)
        lab.close()


@pytest.fixture
def mesh(backend: str) -> Iterator[Mesh]:
    with running_mesh(backend) as running:
        yield running


@pytest.fixture(scope="module")
def module_mesh() -> Iterator[Mesh]:
    """One nftables mesh for a module's tests that can share it (see `shared_mesh`)."""
    with running_mesh("nftables") as running:
        yield running


@pytest.fixture
def shared_mesh(module_mesh: Mesh, request: pytest.FixtureRequest) -> Iterator[Mesh]:
    """The module's mesh, for a test that neither restarts an agent nor counts agent-wide:
    its pods get names of their own (so its per-pod series are exact), and they are removed,
    with their servers, when it ends, also when it fails."""
    before = list(module_mesh.lab.pods)
    module_mesh.name_suffix = f"-{_test_number(request)}"
    try:
        yield module_mesh
    finally:
        module_mesh.name_suffix = ""
        errors: list[Exception] = []
        for pod in reversed([pod for pod in module_mesh.lab.pods if pod not in before]):
            try:
                module_mesh.lab.delete_pod(pod)
            except Exception as error:  # remove the others, then say so
                errors.append(error)
        module_mesh.servers[:] = [server for server in module_mesh.servers
                                  if server.poll() is None]
        if errors:
            raise errors[0]


def _test_number(request: pytest.FixtureRequest) -> int:
    """Which test of its module this is (1, 2, ...), as a short unique pod-name suffix."""
    items = request.session.items
    module = [item for item in items if item.module is request.node.module]
    return module.index(request.node) + 1
