"""Backpressure, not growth: an agent holding --max-connections relays stops accepting; the
next connections wait in the kernel's backlog (not refused, not reset) and are served once
connections end. Before, an agent that could not keep up took every connection offered and
grew until its memory cgroup killed it (bench/overload.py: docs/benchmarks.md)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from agent.lab.agents import REPO
from agent.lab.topology import Pod
from tests.netns.conftest import eventually, running_mesh

LIMIT = 8  # back at 6


def test_over_its_budget_the_agent_makes_new_connections_wait_then_serves_them() -> None:
    with running_mesh("nftables", ["--max-connections", str(LIMIT)]) as mesh:
        client, server = mesh.pod(0, "busy"), mesh.pod(1, "web")
        mesh.serve(server, "agent.lab.httpserver", "--port", "8080")
        agent = mesh.agents[0]
        holders = _hold(client, server, LIMIT)
        assert eventually(lambda: agent.metrics().value("pinion_accepting") == 0.0, 10)
        metrics = agent.metrics()
        assert metrics.value("pinion_connection_budget_exhausted_total") == 1
        rss = metrics.value("pinion_memory_bytes", part="rss")
        assert 10 * 2**20 < rss < 200 * 2**20  # the agent's VmRSS, as /proc says
        parts = {s.labels["part"] for s in metrics.samples if s.name == "pinion_memory_bytes"}
        assert parts == {"cgroup_usage", "cgroup_limit", "rss", "relay_buffers", "tunnel_buffers"}
        assert metrics.value("tcp_open_connections", pod="busy", direction="outbound", peer="src") == LIMIT

        waiting = client.spawn(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                                "--max-time", "30", f"http://{server.ip}:8080/"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(1.5)
        assert waiting.poll() is None  # neither refused nor reset: it waits in the backlog
        assert agent.metrics().value("tcp_open_connections", pod="busy", direction="outbound",
                                     peer="src") == LIMIT

        holders.send_signal(signal.SIGKILL)  # the held connections end (the kernel closes them)
        holders.wait(10)
        out, _ = waiting.communicate(timeout=30)
        assert out.strip() == "200", out
        assert eventually(lambda: agent.metrics().value("pinion_accepting") == 1.0, 10)
        assert mesh.http(client, f"http://{server.ip}:8080/")  # and new ones go straight on


def test_a_pod_added_while_the_agent_holds_over_a_thousand_sockets() -> None:
    """libnftables talks to netlink with select(), and glibc aborts the process when that
    socket's fd is past FD_SETSIZE (1024): an agent holding ~500 connections (1,000 fds)
    died at its next pod ("bit out of range 0 - FD_SETSIZE on fd_set"). Past that the agent
    runs `nft` as a child, whose fds start at 0."""
    with running_mesh("nftables") as mesh:
        client, server = mesh.pod(0, "many"), mesh.pod(1, "web")
        mesh.serve(server, "agent.lab.httpserver", "--port", "8080")
        agent = mesh.agents[0]
        holders = _hold(client, server, 600)
        assert agent.process is not None
        assert eventually(lambda: len(os.listdir(f"/proc/{agent.process.pid}/fd")) > 1100, 10)
        late = mesh.pod(0, "late")  # rules written through nft: the agent must live on
        assert agent.process.poll() is None, agent.log()[-2000:]
        assert mesh.http(late, f"http://{server.ip}:8080/")
        mesh.lab.delete_pod(late)  # and removed the same way
        assert agent.process.poll() is None, agent.log()[-2000:]
        holders.send_signal(signal.SIGKILL)
        holders.wait(10)


def _hold(client: Pod, server: Pod, count: int) -> subprocess.Popen[str]:
    """`count` idle connections from `client` to `server`'s :8080, held 60 s; once all are open."""
    holders = client.spawn([sys.executable, "-m", "tests.netns.attacks", "idle",
                            f"{server.ip}:8080", "--count", str(count), "--hold", "60",
                            "--say", "-1"], stdout=subprocess.PIPE, text=True, cwd=str(REPO))
    assert holders.stdout is not None and f'"opened": {count}' in holders.stdout.readline()
    return holders


def _backlogs(pod: Pod) -> dict[int, int]:
    """Each listening port in the pod's netns -> its accept queue's size (`ss`'s Send-Q)."""
    found = {}
    for line in pod.run(["ss", "-Hltn"]).stdout.splitlines():
        fields = line.split()
        found[int(fields[3].rsplit(":", 1)[1])] = int(fields[2])
    return found


def test_the_pods_listeners_keep_their_backlog_when_served_and_served_again() -> None:
    # Issue #21: create_server(sock=) listen()s again with its own default, 100: under a
    # burst the pods' 15001/15006 accept queues overflowed (ListenOverflows in the pod; the
    # clients' handshakes and first bytes dropped and retried) long before the backlog the
    # budget counts on, 1024, was used.
    with running_mesh("iptables", ["--max-connections", str(LIMIT)]) as mesh:
        client, server = mesh.pod(0, "busy"), mesh.pod(1, "web")
        mesh.serve(server, "agent.lab.httpserver", "--port", "8080")
        for pod in (client, server):
            backlogs = _backlogs(pod)
            assert (backlogs[15001], backlogs[15006], backlogs[15008]) == (1024, 1024, 1024), backlogs
        agent = mesh.agents[0]
        holders = _hold(client, server, LIMIT)
        assert eventually(lambda: agent.metrics().value("pinion_accepting") == 0.0, 10)
        waiting = client.spawn(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                                "--max-time", "30", f"http://{server.ip}:8080/"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(1.0)
        assert waiting.poll() is None  # it waits in the backlog of the closed listener
        holders.send_signal(signal.SIGKILL)
        holders.wait(10)
        out, _ = waiting.communicate(timeout=30)
        assert out.strip() == "200", out
        assert eventually(lambda: agent.metrics().value("pinion_accepting") == 1.0, 10)
        # 15001 was served again (a new create_server on the same socket): still 1024
        assert _backlogs(client)[15001] == 1024, _backlogs(client)
