"""eBPF capture's own lifecycle on the real kernel: nothing of ours stays attached after DEL
or a --cleanup shutdown, a restarted agent adopts its pinned programs (never attaching
twice), a pod without a cgroup is refused alone, and loader errors say what went wrong."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.lab.agents import REPO, LabAgent
from agent.lab.topology import Lab, Pod
from tests.netns.conftest import cgroup_programs, eventually

pytestmark = pytest.mark.netns

HTTP = "agent.lab.httpserver"


def ours_in_tree(root: Path) -> list[str]:
    """`bpftool cgroup tree` below root, Pinion's programs only: "<cgroup> <type> <name>"."""
    out = subprocess.run(["bpftool", "-j", "cgroup", "tree", str(root)], capture_output=True,
                         text=True, check=True).stdout
    found = []
    for entry in json.loads(out.strip() or "[]"):
        for program in entry.get("programs", []):
            if str(program["name"]).startswith("pinion_"):
                found.append(f"{entry['cgroup']} {program['attach_type']} {program['name']}")
    return found


def attach_types(cgroup: Path) -> list[str]:
    return sorted(str(p["attach_type"]) for p in cgroup_programs(cgroup)
                  if str(p["name"]).startswith("pinion_"))


@pytest.fixture
def node() -> Iterator[tuple[Lab, list[LabAgent]]]:
    agents: list[LabAgent] = []
    lab = Lab(nodes=2, extra_plugins=lambda node: [agents[node.index].plugin_config()])
    try:
        yield lab, agents
    finally:
        for agent in agents:
            agent.stop()
        lab.close()


def _serve(pod: Pod) -> None:
    server = pod.spawn([sys.executable, "-m", HTTP, "--port", "8080"], stdout=subprocess.PIPE,
                       text=True, cwd=str(REPO))
    assert server.stdout is not None and server.stdout.readline().strip() == "listening"


def _whoami(client: Pod, server: Pod) -> str:
    done = client.run(["curl", "-sS", "--max-time", "5", f"http://{server.ip}:8080/whoami"],
                      check=False)
    return str(done.stdout).strip()


def test_del_and_cleanup_shutdown_leave_nothing_attached(node: tuple[Lab, list[LabAgent]]) -> None:
    lab, agents = node
    assert lab.cgroup_root is not None
    agent = LabAgent(lab, lab.nodes[0], redirect="ebpf", extra_args=["--cleanup"])
    agents.append(agent.start())
    web, api = lab.add_pod(lab.nodes[0], "web"), lab.add_pod(lab.nodes[0], "api")
    assert attach_types(web.cgroup_path) == ["cgroup_inet4_connect", "cgroup_inet6_connect",
                                             "cgroup_sock_ops"]
    assert attach_types(lab.nodes[0].cgroup_path) == ["cgroup_getsockopt"]  # the agent's own

    lab.delete_pod(web)  # CNI DEL through the chain, then the pod's netns and cgroup go

    assert not any("/web " in line for line in ours_in_tree(lab.cgroup_root))
    assert attach_types(api.cgroup_path) != []
    pins = list(agent.bpf_dir.rglob("pinion_connect4"))
    assert len(pins) == 1

    assert agent.stop() == 0

    assert ours_in_tree(lab.cgroup_root) == []
    assert not pins[0].exists()


def test_a_killed_agent_comes_back_without_attaching_twice(node: tuple[Lab, list[LabAgent]]) -> None:
    lab, agents = node
    agents += [LabAgent(lab, n, redirect="ebpf").start() for n in lab.nodes]
    client, web = lab.add_pod(lab.nodes[0], "client"), lab.add_pod(lab.nodes[1], "web")
    _serve(web)
    assert _whoami(client, web) == client.ip
    before = cgroup_programs(client.cgroup_path)

    agents[0].stop(sig=signal.SIGKILL)
    assert _whoami(client, web) == ""  # programs stay, nobody listens: fail closed
    agents[0].start()

    assert cgroup_programs(client.cgroup_path) == before  # the same programs, once each
    assert attach_types(lab.nodes[0].cgroup_path) == ["cgroup_getsockopt"]
    assert "adopted the programs and maps pinned" in agents[0].log()
    assert _whoami(client, web) == client.ip
    pods = json.loads(agents[0].get("/pods")[1])
    assert [p["attached"] for p in pods[0]["programs"]] == [True, True, True]


def test_a_pod_without_a_cgroup_is_refused_and_others_are_served(
        node: tuple[Lab, list[LabAgent]]) -> None:
    lab, agents = node
    agents += [LabAgent(lab, n, redirect="ebpf").start() for n in lab.nodes]
    netns = f"pn{lab.run_id}-nocg"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        reply = _send(agents[0], {"command": "ADD", "containerId": "nocg",
                                  "netns": f"/var/run/netns/{netns}",
                                  "args": {"K8S_POD_NAMESPACE": "default", "K8S_POD_NAME": "nocg",
                                           "K8S_POD_UID": "0000-no-such-pod"}})
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=True)

    assert reply["ok"] is False and "no cgroup for pod uid 0000-no-such-pod" in str(reply["msg"])
    client, web = lab.add_pod(lab.nodes[0], "client"), lab.add_pod(lab.nodes[1], "web")
    _serve(web)
    assert _whoami(client, web) == client.ip


def test_excluded_ports_are_not_captured_but_counted_in_the_kernel(
        node: tuple[Lab, list[LabAgent]]) -> None:
    lab, agents = node
    agents += [LabAgent(lab, n, redirect="ebpf").start() for n in lab.nodes]
    client = lab.add_pod(lab.nodes[0], "client", args={"PINION_EXCLUDE_OUTBOUND_PORTS": "8080"})
    web = lab.add_pod(lab.nodes[1], "web", args={"PINION_MESH": "disabled"})
    _serve(web)

    assert _whoami(client, web) == client.ip

    def kernel_counted() -> bool:
        metrics = agents[0].metrics()
        return (metrics.value("tcp_open_total", direction="outbound", pod="client") == 1
                and metrics.value("tcp_close_total", pod="client") == 1
                and metrics.value("tcp_read_bytes_total", pod="client") > 0)

    assert eventually(kernel_counted)
    assert agents[0].metrics().value("pinion_proxy_errors_total") == 0


def test_a_verifier_rejection_is_reported_with_the_verifiers_words(tmp_path: Path) -> None:
    from agent.dataplane.redirect import libbpf

    source = tmp_path / "bad.c"
    source.write_text('#include <linux/bpf.h>\n#include <bpf/bpf_helpers.h>\n'
                      'SEC("cgroup/connect4") int bad(struct bpf_sock_addr *ctx)\n'
                      '{ return *(int *)((char *)ctx + 4000); }\n'
                      'char LICENSE[] SEC("license") = "GPL";\n')
    machine = subprocess.run(["gcc", "-dumpmachine"], capture_output=True, text=True,
                             check=True).stdout.strip()
    subprocess.run(["clang", "-O2", "-g", "-target", "bpf", f"-I/usr/include/{machine}", "-c",
                    str(source), "-o", str(tmp_path / "bad.o")], check=True)

    with pytest.raises(libbpf.BpfError) as failure:
        libbpf.load_and_pin(tmp_path / "bad.o", tmp_path, (), ("bad",))

    assert "loading bad.o" in str(failure.value)
    assert "invalid bpf_context access" in str(failure.value)  # the verifier's log tail


def _send(agent: LabAgent, request: dict[str, object]) -> dict[str, object]:
    import socket

    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(15)
        conn.connect(str(agent.cni_socket))
        conn.sendall(json.dumps(request).encode() + b"\n")
        return dict(json.loads(conn.makefile("rb").readline()))


def test_ipv6_is_left_alone_and_ipv4_mapped_connects_are_captured(
        node: tuple[Lab, list[LabAgent]]) -> None:
    lab, agents = node
    agents += [LabAgent(lab, n, redirect="ebpf").start() for n in lab.nodes]
    client = lab.add_pod(lab.nodes[0], "client")
    web = lab.add_pod(lab.nodes[1], "web", args={"PINION_MESH": "disabled"})
    _serve(web)
    script = ("import socket, sys\n"
              "server = socket.socket(socket.AF_INET6)\n"
              "server.bind(('::1', 9000)); server.listen()\n"
              "plain6 = socket.create_connection(('::1', 9000), timeout=5)\n"
              "assert server.accept()[1][0] == '::1'\n"
              "mapped = socket.socket(socket.AF_INET6)\n"
              "mapped.settimeout(5)\n"
              "mapped.connect(('::ffff:' + sys.argv[1], 8080))\n"
              "mapped.sendall(b'GET /whoami HTTP/1.0\\r\\n\\r\\n')\n"
              "reply = b''\n"
              "while chunk := mapped.recv(4096):\n"
              "    reply += chunk\n"
              "print(reply.decode().strip().rsplit(chr(10), 1)[-1])\n")

    seen = client.run([sys.executable, "-c", script, web.ip]).stdout.strip()

    assert seen.endswith(client.ip)  # through the agent, with the pod's own source IP
    assert eventually(lambda: agents[0].metrics().value(
        "tcp_open_total", direction="outbound", pod="client") == 1)
