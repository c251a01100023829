"""A meshed pod's TCP goes through its node's agent, on the real kernel, with both backends."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.lab.agents import Metrics
from tests.netns.conftest import Mesh, after_capture, capture_rules, eventually

pytestmark = pytest.mark.netns

HTTP = "agent.lab.httpserver"
TCP = "agent.lab.tcpserver"



def _ip_rules(pod_netns: str) -> str:
    return subprocess.run(["ip", "-n", pod_netns, "rule"], capture_output=True, text=True,
                          check=True).stdout


def _listening_ports(pod_netns: str) -> set[int]:
    out = subprocess.run(["ip", "netns", "exec", pod_netns, "ss", "-Hltn"],
                         capture_output=True, text=True, check=True).stdout
    return {int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines() if line.strip()}


def test_outbound_goes_through_the_agent_and_keeps_the_pods_source_ip(mesh: Mesh) -> None:
    client = mesh.pod(0, "client")
    legacy = mesh.pod(1, "legacy", meshed=False)
    mesh.serve(legacy, HTTP, "--port", "8080")

    seen = mesh.http(client, f"http://{legacy.ip}:8080/whoami")

    assert seen.strip() == client.ip  # the destination sees the pod's own IP
    metrics = mesh.agents[0].metrics()
    assert metrics.value("tcp_open_total", direction="outbound", pod="client") == 1
    assert metrics.value("tcp_read_bytes_total", direction="outbound", pod="client") > 0
    assert metrics.value("tcp_write_bytes_total", direction="outbound", pod="client") > 0
    assert eventually(lambda: mesh.agents[0].metrics().value(
        "tcp_close_total", pod="client", errno="") == 1)
    assert mesh.agents[1].metrics().value("tcp_open_total") == 0  # legacy is not meshed


def test_inbound_to_a_meshed_pod_goes_through_15006_and_keeps_the_clients_ip(mesh: Mesh) -> None:
    web = mesh.pod(1, "web")
    outsider = mesh.pod(0, "outsider", meshed=False)
    mesh.serve(web, HTTP, "--port", "8080")

    assert mesh.http(outsider, f"http://{web.ip}:8080/whoami").strip() == outsider.ip

    inbound = mesh.agents[1].metrics()
    assert inbound.value("tcp_open_total", direction="inbound", pod="web") == 1
    assert inbound.value("tcp_read_bytes_total", direction="inbound", pod="web") > 0


def test_meshed_to_meshed_across_nodes_is_counted_on_both_agents(mesh: Mesh) -> None:
    client, web = mesh.pod(0, "client"), mesh.pod(1, "web")
    mesh.serve(web, HTTP, "--port", "8080")

    for _ in range(2):
        assert len(mesh.http(client, f"http://{web.ip}:8080/bytes/5000")) == 5000
    assert mesh.http(client, f"http://{web.ip}:8080/whoami").strip() == client.ip

    out, inb = mesh.agents[0].metrics(), mesh.agents[1].metrics()
    assert out.value("tcp_open_total", direction="outbound", pod="client") == 3
    assert inb.value("tcp_open_total", direction="inbound", pod="web") == 3
    # the responses: read from web's side (peer="dst"), written to the client's app ("src")
    assert out.value("tcp_read_bytes_total", pod="client") >= 10000
    assert out.value("tcp_write_bytes_total", pod="client", peer="src") >= 10000
    assert inb.value("tcp_write_bytes_total", pod="web") >= 10000


def test_loopback_and_dns_are_not_captured(mesh: Mesh) -> None:
    client = mesh.pod(0, "client")
    dns = mesh.pod(0, "dns", meshed=False)
    mesh.serve(client, TCP, "--port", "9000", "--host", "127.0.0.1", "--mode", "echo")
    mesh.serve(dns, TCP, "--port", "53", "--mode", "echo")
    mesh.serve(client, HTTP, "--port", "8081")
    script = ("import socket,sys\n"
              "for host, port in [('127.0.0.1', 9000), (sys.argv[1], 53), (sys.argv[2], 8081)]:\n"
              "    s = socket.create_connection((host, port), timeout=5)\n"
              "    s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n' if port == 8081 else b'ping')\n"
              "    assert s.recv(64), (host, port)\n"
              "    s.close()\n")

    client.run([sys.executable, "-c", script, dns.ip, client.ip])

    assert mesh.agents[0].metrics().value("tcp_open_total") == 0  # own IP, loopback, DNS


def test_delete_leaves_no_rule_and_no_listener(mesh: Mesh, backend: str) -> None:
    pod = mesh.pod(0, "web")
    assert capture_rules(pod)
    assert {15001, 15006, 15008} <= _listening_ports(pod.netns)
    assert "fwmark 0x50494f lookup 15006" in _ip_rules(pod.netns)

    done = mesh.plugin("DEL", pod)
    assert done.returncode == 0, done.stdout + done.stderr

    assert capture_rules(pod) == []
    assert not {15001, 15006, 15008} & _listening_ports(pod.netns)
    assert "fwmark" not in _ip_rules(pod.netns)
    assert json.loads(mesh.agents[0].get("/pods")[1]) == []


def test_a_restarted_agent_recaptures_existing_pods(mesh: Mesh) -> None:
    client, legacy = mesh.pod(0, "client"), mesh.pod(1, "legacy", meshed=False)
    mesh.serve(legacy, HTTP, "--port", "8080")
    url = f"http://{legacy.ip}:8080/"
    agent = mesh.agents[0]
    assert mesh.http(client, url).strip() == "ok"

    agent.stop(sig=9)  # crash: rules stay, nobody listens -> the pod fails closed
    down = client.run(["curl", "-sS", "--max-time", "3", url], check=False)
    assert down.returncode != 0

    agent.start()
    assert mesh.http(client, url).strip() == "ok"
    pods = json.loads(agent.get("/pods")[1])
    assert [p["name"] for p in pods] == ["client"] and pods[0]["listening"]
    assert agent.metrics().value("tcp_open_total", pod="client") == 1  # counted after restart


# Relaying, once captured: one backend (conftest.after_capture).
@after_capture
def test_half_close_is_forwarded(mesh: Mesh) -> None:
    client, server = mesh.pod(0, "client"), mesh.pod(1, "server")
    mesh.serve(server, TCP, "--port", "7000", "--mode", "echo-after-eof")
    script = ("import socket,sys\n"
              "s = socket.create_connection((sys.argv[1], 7000), timeout=5)\n"
              "s.sendall(b'x' * 100000)\n"
              "s.shutdown(socket.SHUT_WR)\n"
              "reply = b''\n"
              "while chunk := s.recv(100):\n"
              "    reply += chunk\n"
              "print(reply.decode())\n")

    result = client.run([sys.executable, "-c", script, server.ip])

    assert result.stdout.strip() == "got 100000 bytes"
    assert eventually(lambda: [agent.metrics().value("tcp_close_total", errno="")
                                for agent in mesh.agents] == [1, 1])


# Relaying, once captured: one backend (conftest.after_capture).
@after_capture
def test_a_reset_upstream_becomes_a_reset_downstream(mesh: Mesh) -> None:
    client, server = mesh.pod(0, "client"), mesh.pod(1, "server")
    mesh.serve(server, TCP, "--port", "7000", "--mode", "reset")
    script = ("import socket,sys,time\n"
              "s = socket.create_connection((sys.argv[1], 7000), timeout=5)\n"
              "s.sendall(b'hello')\n"
              "try:\n"
              "    data = s.recv(10)\n"
              "    print('eof' if data == b'' else 'data')\n"
              "except ConnectionResetError:\n"
              "    print('reset')\n")

    assert client.run([sys.executable, "-c", script, server.ip]).stdout.strip() == "reset"
    assert eventually(lambda: mesh.agents[0].metrics().value(
        "tcp_close_total", errno="ECONNRESET") == 1)


# Relaying, once captured: one backend (conftest.after_capture).
@after_capture
def test_a_refused_upstream_is_refused_to_the_client(mesh: Mesh) -> None:
    client, legacy = mesh.pod(0, "client"), mesh.pod(1, "legacy", meshed=False)
    started = time.monotonic()
    result = client.run(["curl", "-sS", "--max-time", "5", f"http://{legacy.ip}:9/"], check=False)
    # Our RST reaches curl during connect (7: as if refused directly) or on read (56: reset);
    # either way at once, never a hang until the timeout (28).
    assert result.returncode in (7, 56), result.stderr
    assert time.monotonic() - started < 3
    metrics = mesh.agents[0].metrics()
    assert metrics.value("pinion_proxy_errors_total", reason="econnrefused") == 1
    assert eventually(lambda: mesh.agents[0].metrics().value(
        "tcp_close_total", errno="ECONNREFUSED") == 1)


# Relaying, once captured: one backend; its pods' names are its own and it counts nothing
# agent-wide, so it runs on the module's shared mesh.
def test_a_stalled_reader_does_not_make_the_agent_buffer(shared_mesh: Mesh) -> None:
    client, sink = shared_mesh.pod(0, "client"), shared_mesh.pod(1, "sink")
    shared_mesh.serve(sink, TCP, "--port", "7000", "--mode", "sink", "--rcvbuf", "65536")
    rss_before = shared_mesh.agents[0].rss_bytes() + shared_mesh.agents[1].rss_bytes()
    script = ("import socket,sys\n"
              "s = socket.create_connection((sys.argv[1], 7000), timeout=5)\n"
              "s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)\n"
              "sent = 0\n"
              "try:\n"
              "    while sent < 200_000_000:\n"
              "        sent += s.send(b'x' * 65536)\n"
              "except (TimeoutError, socket.timeout):\n"
              "    pass\n"
              "print(sent)\n")

    accepted = int(client.run([sys.executable, "-c", script, sink.ip], timeout=60).stdout)

    # Socket buffers on four sockets (two receiving, two sending: each can autotune up to the
    # machine's tcp_rmem/tcp_wmem maximum) plus the agents' 64 KiB high-water marks, not 200 MB.
    assert accepted < 2 * _tcp_max("rmem") + 2 * _tcp_max("wmem") + 1024 * 1024
    growth = shared_mesh.agents[0].rss_bytes() + shared_mesh.agents[1].rss_bytes() - rss_before
    assert growth < 16 * 1024 * 1024


def _tcp_max(kind: str) -> int:
    """The largest a socket's buffer may autotune to here (net.ipv4.tcp_rmem / tcp_wmem)."""
    return int(Path(f"/proc/sys/net/ipv4/tcp_{kind}").read_text().split()[2])


# The admin endpoint, whatever captures: one backend, the module's shared mesh.
def test_metrics_endpoint_is_prometheus_text(shared_mesh: Mesh) -> None:
    status, body = shared_mesh.agents[0].get("/metrics")
    assert status == 200
    Metrics(body)  # parses
    assert shared_mesh.agents[0].get("/live")[0] == 200
    assert shared_mesh.agents[0].get("/nope")[0] == 404


# Relaying, once captured: one backend; its pods' names are its own and it counts nothing
# agent-wide, so it runs on the module's shared mesh.
def test_an_immediate_half_close_is_not_lost_while_upstream_connects(shared_mesh: Mesh) -> None:
    """Send a byte and shut down writes at once, before the agent can have connected
    upstream: the FIN must still reach the server (which answers only after EOF)."""
    client, server = shared_mesh.pod(0, "client"), shared_mesh.pod(1, "server")
    shared_mesh.serve(server, TCP, "--port", "7000", "--mode", "echo-after-eof")
    script = ("import socket,sys\n"
              "for _ in range(30):\n"
              "    s = socket.create_connection((sys.argv[1], 7000), timeout=5)\n"
              "    s.sendall(b'x')\n"
              "    s.shutdown(socket.SHUT_WR)\n"
              "    assert s.recv(100) == b'got 1 bytes'\n"
              "    s.close()\n"
              "print('ok')\n")

    result = client.run([sys.executable, "-c", script, server.ip], timeout=120, check=False)

    assert result.stdout.strip() == "ok", result.stderr[-500:]
