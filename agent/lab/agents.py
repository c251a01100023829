"""Running a real `pinion agent` inside a lab node, as a hostNetwork DaemonSet pod would run,
and reading its admin endpoint from inside that node's netns."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from agent.dataplane.netns import NetNs, NetnsSwitch
from agent.lab.topology import Lab, Node

# Seconds an agent gets from spawn to /ready. Natively it takes well under one; under full-system
# emulation (tools/arm64/smoke-init.sh, TCG on a shared host) the interpreter's start-up alone
# can take most of 20, so the smoke raises it there.
READY_TIMEOUT = float(os.environ.get("PINION_LAB_READY_TIMEOUT", "20"))

REPO = Path(__file__).resolve().parents[2]
PLUGIN = REPO / "cni" / "pinion-cni"
ADMIN_PORT = 4191
BPF_LAB_ROOT = Path("/sys/fs/bpf/pinion")


class LabAgent:
    def __init__(self, lab: Lab, node: Node, redirect: str = "nftables",
                 fail_policy: str = "closed", extra_args: Iterable[str] = (),
                 keeper: bool = False, log_name: str = "agent.log",
                 environment: Mapping[str, str] | None = None) -> None:
        self.node = node
        self.environment = dict(environment or {})  # set for the agent, on top of ours
        self.redirect = redirect
        self.fail_policy = fail_policy
        self.extra_args = list(extra_args)
        self.dir = lab.workdir / f"agent-{node.name}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cni_socket = self.dir / "cni.sock"
        self.state_dir = self.dir / "state"
        self.pending_dir = self.dir / "pending"
        self.log_path = self.dir / log_name
        self.admin = (node.underlay_ip, ADMIN_PORT)
        self.process: subprocess.Popen[Any] | None = None
        # the socket keeper, as the DaemonSet's keeper container: outlives agent restarts
        self.keeper_socket = self.dir / "keeper.sock" if keeper else None
        self.keeper: subprocess.Popen[Any] | None = None
        # eBPF pins of this lab's agents: in bpffs, outside the workdir; removed with the lab
        self.bpf_dir = BPF_LAB_ROOT / f"lab-{lab.run_id}"
        lab.on_close(f"bpf pins {self.bpf_dir}", lambda: shutil.rmtree(self.bpf_dir, ignore_errors=True))

    def plugin_config(self) -> dict[str, Any]:
        """The pinion-cni entry of this node's conflist (lab: plugin run from the repo)."""
        if not PLUGIN.exists():  # a checkout, not an install: the binary is built by make
            raise RuntimeError(f"{PLUGIN} is not built: run `make cni` (gcc, static glibc)")
        return {"type": "pinion-cni", "_path": str(PLUGIN), "agentSocket": str(self.cni_socket),
                "failPolicy": self.fail_policy, "pendingDir": str(self.pending_dir),
                "timeoutSeconds": 20}

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "agent", "agent", "--node-name", self.node.name,
                "--admin-addr", f"{self.admin[0]}:{self.admin[1]}",
                "--cni-socket", str(self.cni_socket), "--state-dir", str(self.state_dir),
                "--pending-dir", str(self.pending_dir), "--redirect", self.redirect,
                "--bpf-dir", str(self.bpf_dir),
                # a lab's pods come and go in seconds: sweep every second, not every ten
                "--sweep-interval-seconds", "1",
                *(["--keeper-socket", str(self.keeper_socket)] if self.keeper_socket else []),
                *self.extra_args]

    def start_keeper(self, timeout: float = 10.0) -> None:
        """Start this node's socket keeper (once; it outlives the agent's restarts)."""
        assert self.keeper_socket is not None
        if self.keeper is not None and self.keeper.poll() is None:
            return
        log = open(self.dir / "keeper.log", "a")  # noqa: SIM115 - the child owns it after spawn
        self.keeper = self.node.spawn([sys.executable, "-m", "agent", "keeper", "--socket",
                                       str(self.keeper_socket)], stdout=log,
                                      stderr=subprocess.STDOUT, cwd=str(REPO))
        log.close()
        deadline = time.monotonic() + timeout
        while not self.keeper_socket.exists():
            if self.keeper.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"keeper on {self.node.name} did not start: "
                                   f"{(self.dir / 'keeper.log').read_text()[-2000:]}")
            time.sleep(0.02)

    def start(self, wait: bool = True) -> LabAgent:
        if self.keeper_socket is not None:
            self.start_keeper()
        log = open(self.log_path, "a")  # noqa: SIM115 - the child owns it after spawn
        self.process = self.node.spawn(self.argv(), stdout=log, stderr=subprocess.STDOUT,
                                       cwd=str(REPO), env={**os.environ, **self.environment})
        log.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"agent on {self.node.name} exited: {self.log()[-2000:]}")
            try:
                if self.get("/ready")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"agent on {self.node.name} not ready: {self.log()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Signal the agent (by its PID) and wait for it to exit."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(5)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        """GET from the admin endpoint, over a socket made inside the node's netns."""
        return admin_get(self.node, self.admin, path, timeout)

    def metrics(self) -> Metrics:
        status, body = self.get("/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        return Metrics(body)

    def rss_bytes(self) -> int:
        assert self.process is not None
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")


def start_agents(agents: Iterable[LabAgent]) -> None:
    """Spawn every agent, then wait for each: they start side by side, not one after another."""
    started = [agent.start(wait=False) for agent in agents]
    for agent in started:
        agent.wait_ready()


def stop_agents(agents: Iterable[LabAgent], timeout: float = 15.0) -> None:
    """SIGTERM every running agent (by its PID), then wait for each: they drain side by side."""
    running = [agent for agent in agents
               if agent.process is not None and agent.process.poll() is None]
    for agent in running:
        assert agent.process is not None
        agent.process.send_signal(signal.SIGTERM)
    for agent in running:
        assert agent.process is not None
        try:
            agent.process.wait(timeout)
        except subprocess.TimeoutExpired:
            agent.process.kill()
            agent.process.wait(5)


class Metrics:
    """Prometheus text parsed into samples; `value` sums the samples matching some labels.

    Each relayed connection has two TCP series, as in Linkerd: the peer's side (inbound
    peer="src", outbound peer="dst": these name the client or the destination) and the agent's
    local hop to the pod (no_tls_reason="loopback"). Unless `peer` is asked for, a tcp_* sum
    counts each connection once, from its peer's side."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = [s for family in text_string_to_metric_families(text)
                        for s in family.samples]

    def value(self, name: str, **labels: str) -> float:
        local_too = not name.startswith("tcp_") or "peer" in labels
        return sum(s.value for s in self.samples if s.name == name
                   and (local_too or s.labels.get("no_tls_reason") != "loopback")
                   and all(s.labels.get(k) == v for k, v in labels.items()))


def admin_get(node: Node, admin: tuple[str, int], path: str,
              timeout: float = 5.0) -> tuple[int, str]:
    """GET `path` from an agent's admin endpoint at `admin`, from inside `node`'s netns."""
    sock = node_socket(node)
    try:
        sock.settimeout(timeout)
        sock.connect(admin)
        conn = http.client.HTTPConnection(*admin, timeout=timeout)
        conn.sock = sock
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        sock.close()


def node_socket(node: Node) -> socket.socket:
    home = NetNs.current()
    target = NetNs(node.netns_path)
    try:
        return NetnsSwitch(home).call(target, socket.socket)
    finally:
        target.close()
        home.close()
