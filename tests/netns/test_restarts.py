"""Restarts lose nothing: a client at 20 req/s opening a new connection each time, and one
over a keep-alive connection, across nodes through the mTLS tunnel, while each agent is
restarted with SIGTERM and with SIGKILL, as kubelet does after an OOM kill or a crash.

The socket keeper (`pinion keeper`, the DaemonSet's keeper container) holds every pod's
listeners while no agent runs: new connections wait in the kernel's backlog and the next
agent accepts them. SIGTERM drains: listeners are let go, HTTP/1 connections close right
after their response in flight, tunnel peers get GOAWAY and move streams they opened
meanwhile to the next agent."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.identity.files import init_identity_dir
from agent.lab.agents import REPO, LabAgent
from tests.netns.conftest import Mesh, running_mesh

RESTARTS = 5  # of each kind, on each agent


def start_clients(mesh: Mesh, client: object, server_ip: str) -> list[subprocess.Popen[str]]:
    clients = []
    for mode in ("new", "keepalive"):
        process = client.spawn([sys.executable, "-m", "agent.lab.steady", server_ip,  # type: ignore[attr-defined]
                                "--mode", mode, "--rate", "20", "--seconds", "400"],
                               stdout=subprocess.PIPE, text=True, cwd=str(REPO))
        assert process.stdout is not None and process.stdout.readline().strip() == "started"
        clients.append(process)
    return clients


def stop_clients(clients: list[subprocess.Popen[str]]) -> list[dict[str, object]]:
    summaries = []
    for process in clients:
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=30)
        summaries.append(json.loads(out.strip().splitlines()[-1]))
    return summaries


def restart(agent: LabAgent, sig: int) -> float:
    """Stop with `sig`, start again; seconds from the signal to /ready."""
    began = time.monotonic()
    agent.stop(sig, timeout=30)
    agent.start()
    return time.monotonic() - began


Summary = dict[str, object]


def phase(mesh: Mesh, client: object, server_ip: str, sig: int) -> tuple[list[Summary], list[float]]:
    clients = start_clients(mesh, client, server_ip)
    try:
        time.sleep(1.0)
        took = []
        for agent in reversed(mesh.agents):  # the server's node first, then the client's
            for _ in range(RESTARTS):
                took.append(restart(agent, sig))
                time.sleep(0.7)
        time.sleep(1.0)
    finally:
        summaries = stop_clients(clients)
    return summaries, took


@pytest.mark.parametrize("backend", ["nftables", "ebpf"])
def test_restarts_lose_no_request(tmp_path: Path, backend: str) -> None:
    """eBPF too: its programs stay attached while no agent runs, and send connects to the
    listeners the keeper holds."""
    identity = tmp_path / "identity"
    init_identity_dir(identity, trust_domain="cluster.local")
    with running_mesh(backend, ["--identity-dir", str(identity)], identity, keeper=True) as mesh:
        client, server = mesh.pod(0, "steady"), mesh.pod(1, "web")
        mesh.serve(server, "agent.lab.httpserver", "--port", "8080")
        assert mesh.http(client, f"http://{server.ip}:8080/")

        term, term_took = phase(mesh, client, server.ip, signal.SIGTERM)
        kill, kill_took = phase(mesh, client, server.ip, signal.SIGKILL)
        report = {"sigterm": term, "sigterm_restart_s": term_took,
                  "sigkill": kill, "sigkill_restart_s": kill_took}
        print(json.dumps(report, indent=1))
        for summary in term:
            assert summary["failed"] == 0, summary
        new_kill, keepalive_kill = kill
        refused = [e for e in new_kill["errors"] if "refused" in str(e["error"]).lower()]  # type: ignore[union-attr]
        assert not refused, new_kill
        assert int(keepalive_kill["failed"]) <= 2 * RESTARTS, keepalive_kill  # type: ignore[call-overload]


def wait_serving(agent: LabAgent, timeout: float = 20.0) -> None:
    """This very process is serving (the admin port answers for both during an overlap)."""
    deadline = time.monotonic() + timeout
    while "serving: admin" not in agent.log():
        assert agent.process is not None and agent.process.poll() is None, agent.log()[-2000:]
        assert time.monotonic() < deadline, agent.log()[-2000:]
        time.sleep(0.05)


def test_a_rolling_update_loses_no_request(tmp_path: Path) -> None:
    """As the DaemonSet's RollingUpdate with maxSurge: the next agent starts beside the
    running one (the keeper hands it the same listeners; both accept), then the old one
    gets SIGTERM and drains."""
    identity = tmp_path / "identity"
    init_identity_dir(identity, trust_domain="cluster.local")
    with running_mesh("nftables", ["--identity-dir", str(identity)], identity, keeper=True) as mesh:
        client, server = mesh.pod(0, "steady"), mesh.pod(1, "web")
        mesh.serve(server, "agent.lab.httpserver", "--port", "8080")
        clients = start_clients(mesh, client, server.ip)
        generation = 0
        try:
            time.sleep(1.0)
            for index in (1, 0, 1, 0):  # server's node, client's node, twice
                old = mesh.agents[index]
                generation += 1
                new = LabAgent(mesh.lab, old.node, redirect=old.redirect, extra_args=old.extra_args,
                               keeper=True, log_name=f"agent-{generation}.log")
                new.start(wait=False)
                wait_serving(new)
                time.sleep(0.5)  # both serve the node's pods
                assert old.stop(signal.SIGTERM, timeout=30) == 0, old.log()[-2000:]
                mesh.agents[index] = new
                time.sleep(0.5)
            time.sleep(1.0)
        finally:
            summaries = stop_clients(clients)
        print(json.dumps(summaries))
        for summary in summaries:
            assert summary["failed"] == 0, summary
        new_conn = summaries[0]
        assert int(new_conn["sent"]) > 100, new_conn  # type: ignore[call-overload]


def test_a_sigterm_during_start_up_ends_the_agent_at_once(tmp_path: Path) -> None:
    """As its container's PID 1 (a PID namespace), where an unhandled SIGTERM is ignored: one
    that comes while the agent imports must not wait out the grace period for SIGKILL."""
    import os

    argv = ["unshare", "--pid", "--fork", "--kill-child", sys.executable, "-m", "agent", "agent",
            "--node-name", "early", "--state-dir", str(tmp_path / "state"),
            "--cni-socket", str(tmp_path / "cni.sock"), "--pending-dir", str(tmp_path / "pending"),
            "--admin-addr", f"127.0.0.1:{free_port()}", "--redirect", "nftables"]
    process = subprocess.Popen(argv, cwd=str(REPO), stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        agent = 0
        while not agent or not handles_sigterm(agent):  # the CLI is imported; the agent not
            assert time.monotonic() < deadline, "the agent did not start"
            children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
            agent = int(children[0]) if children else 0
            time.sleep(0.005)
        sent = time.monotonic()
        os.kill(agent, signal.SIGTERM)
        assert process.wait(10) == 143
        assert time.monotonic() - sent < 2.0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def handles_sigterm(pid: int) -> bool:
    """SIGTERM is caught (SigCgt in /proc/PID/status): the CLI set its handler."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught, 16) & (1 << (signal.SIGTERM - 1)))


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
