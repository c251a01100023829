"""Relays are bounded in time: a slowloris whose clients vanish (no FIN, no RST ever comes)
leaves nothing behind once the pod's idle timeout has passed, on either agent: no relay, no
fd, no memory. Before, such relays stayed until the kernel's keepalive, or forever."""

from __future__ import annotations

import signal
import subprocess
import sys

from agent.lab.agents import REPO
from tests.netns.conftest import eventually, running_mesh

IDLE = 3  # seconds: the agents' --relay-idle-timeout-seconds here (default 3600)


def open_connections(agent: object, pod: str, direction: str) -> float:
    return agent.metrics().value("tcp_open_connections", pod=pod, direction=direction)  # type: ignore[attr-defined]


def fds(agent: object) -> int:
    import os

    return len(os.listdir(f"/proc/{agent.process.pid}/fd"))  # type: ignore[attr-defined]


def test_a_vanished_slowloris_is_released_after_the_idle_timeout() -> None:
    with running_mesh("nftables", ["--relay-idle-timeout-seconds", str(IDLE)]) as mesh:
        attacker, server = mesh.pod(0, "attacker"), mesh.pod(1, "server")
        mesh.serve(server, "agent.lab.httpserver", "--port", "8080")
        client_agent, server_agent = mesh.agents
        baseline = [(fds(agent), agent.rss_bytes()) for agent in mesh.agents]
        slow = attacker.spawn([sys.executable, "-m", "tests.netns.attacks", "idle",
                               f"{server.ip}:8080", "--count", "500", "--hold", "60", "--say", "-1"],
                              stdout=subprocess.PIPE, text=True, cwd=str(REPO))
        assert slow.stdout is not None and '"opened": 500' in slow.stdout.readline()
        assert eventually(lambda: open_connections(server_agent, "server", "inbound") == 500, 10)
        assert open_connections(client_agent, "attacker", "outbound") == 500

        # the attacker's pod drops everything, then the attacker dies: nothing ever says so
        attacker.run(["nft", "add table ip vanish; add chain ip vanish out { type filter hook output "
                      "priority 0; policy drop; }; add chain ip vanish in { type filter hook input "
                      "priority 0; policy drop; }"])
        slow.send_signal(signal.SIGKILL)
        slow.wait(10)

        assert eventually(lambda: open_connections(client_agent, "attacker", "outbound") == 0
                          and open_connections(server_agent, "server", "inbound") == 0, IDLE + 5)
        assert client_agent.metrics().value("pinion_relay_idle_resets_total") == 500
        assert server_agent.metrics().value("pinion_relay_idle_resets_total") == 500
        for agent, (fds_before, rss_before) in zip(mesh.agents, baseline, strict=True):
            assert eventually(lambda agent=agent, fds_before=fds_before: fds(agent) <= fds_before + 2, 5)
            assert agent.rss_bytes() - rss_before < 2 * 1024 * 1024, (agent.node.name, rss_before,
                                                                       agent.rss_bytes())
