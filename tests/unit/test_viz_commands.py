"""`pinion stat/edges/top/check` end to end against fake admin endpoints on 127.0.0.1: canned
Prometheus text that moves between scrapes, /pods, /ready, /live."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main
from agent.observability.admin import public_pod_view
from agent.viz import checks
from tests.unit.test_viz_stats import AFTER, BEFORE, WINDOW_P95, WINDOW_P99, metrics_text, pod_series

WEB = "web-7d4b9c8f6d-x2x9q"


def pod_entry(name: str, namespace: str = "default", listening: bool = True,
              account: str = "web") -> dict[str, Any]:
    return {"namespace": namespace, "name": name, "uid": f"uid-{name}", "containerId": "c",
            "netns": f"/var/run/netns/{name}", "ips": ["10.42.0.5"], "serviceAccount": account,
            "capture": {}, "backend": "nftables", "listening": listening}


class FakeAgent:
    """An admin endpoint: /metrics answers each text in turn (then keeps the last). /pods as a
    real agent answers a caller on another host (the public view), or with `local` in full."""

    def __init__(self, metrics: Sequence[str], pods: Sequence[dict[str, Any]] = (),
                 ready: int = 200, live: int = 200, local: bool = False) -> None:
        self.metrics, self.scrapes = list(metrics), 0
        entries = list(pods) if local else [public_pod_view(pod) for pod in pods]
        self.routes = {"/pods": (200, json.dumps(entries)),
                       "/ready": (ready, "ready\n" if ready == 200 else "not ready\n"),
                       "/live": (live, "live\n")}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.address = f"127.0.0.1:{self.server.server_address[1]}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        agent = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, body = agent.answer(self.path)
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        return Handler

    def answer(self, path: str) -> tuple[int, str]:
        if path == "/metrics":
            text = self.metrics[min(self.scrapes, len(self.metrics) - 1)]
            self.scrapes += 1
            return 200, text
        return self.routes.get(path, (404, "not found\n"))

    def __enter__(self) -> FakeAgent:
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def dead_agent() -> Iterator[str]:
    """An address nothing listens on: connecting is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    yield f"127.0.0.1:{port}"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- stat -------------------------------------------------------------------------------------

def test_stat_pods_shows_the_inbound_golden_metrics_of_the_window(capsys: pytest.CaptureFixture[str]) -> None:
    with FakeAgent([BEFORE, AFTER], [pod_entry(WEB)]) as agent:
        code, out, err = run(capsys, "stat", "pods", "--agent", agent.address, "--window", "0.5")
    assert (code, err) == (0, "")
    header, row = out.splitlines()
    assert header.split() == ["NAME", "STATUS", "MESHED", "SUCCESS", "RPS", "LATENCY_P50", "LATENCY_P95",
                              "LATENCY_P99", "TCP_CONN"]
    cells = row.split()
    assert cells[:4] == [WEB, "Running", "1/1", "90.00%"]
    assert cells[4].endswith("rps") and 100 / 1.5 < float(cells[4].removesuffix("rps")) <= 100 / 0.5
    assert cells[5:] == ["9ms", "75ms", "95ms", "3"]


def test_stat_json_has_linkerds_shape(capsys: pytest.CaptureFixture[str]) -> None:
    with FakeAgent([BEFORE, AFTER], [pod_entry(WEB)]) as agent:
        code, out, _ = run(capsys, "stat", "deploy", "--agent", agent.address, "-t", "300ms", "-o", "json")
    [row] = json.loads(out) if code == 0 else [None]
    assert code == 0
    assert set(row) == {"namespace", "kind", "name", "meshed", "success", "rps", "latency_ms_p50",
                        "latency_ms_p95", "latency_ms_p99", "tcp_open_connections", "tcp_read_bytes_rate",
                        "tcp_write_bytes_rate"}
    assert (row["kind"], row["name"], row["meshed"], row["success"]) == ("deployment", "web", "1/1", 0.9)
    assert 100 / 1.3 < row["rps"] <= 100 / 0.3
    assert (row["latency_ms_p50"], row["latency_ms_p95"], row["latency_ms_p99"]) == (8.75, WINDOW_P95,
                                                                                   WINDOW_P99)
    assert row["tcp_open_connections"] == 3


def test_stat_refuses_unknown_kinds_and_durations(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["stat", "gateways"])
    assert "unknown resource type 'gateways'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["stat", "deploy", "-t", "soon"])
    assert "not a duration" in capsys.readouterr().err
    assert main(["stat", "deploy", "--to", "deploy/a", "--from", "deploy/b"]) == 2
    assert "--to and --from cannot be used together" in capsys.readouterr().err


def test_stat_groups_deployments_and_counts_meshed_pods(capsys: pytest.CaptureFixture[str]) -> None:
    second = "web-7d4b9c8f6d-k8m4t"
    text = metrics_text(pod_series("default", WEB, ok=5), pod_series("default", second, ok=5),
                        pod_series("default", "db-0", ok=1), pod_series("kube-system", "dns-0"))
    with FakeAgent([text], [pod_entry(WEB), pod_entry("db-0")]) as agent:
        code, out, _ = run(capsys, "stat", "deployments", "--agent", agent.address, "--window", "0.1")
    assert code == 0
    assert [line.split() for line in out.splitlines()[1:]] == [["db-0", "1/1", *["-"] * 6],
                                                                ["web", "1/2", *["-"] * 6]]
    with FakeAgent([text], []) as agent:
        _, out, _ = run(capsys, "stat", "pods", "-A", "--agent", agent.address, "--window", "0.1")
    assert out.splitlines()[0].split()[:2] == ["NAMESPACE", "NAME"]
    assert "kube-system" in out


def test_stat_shows_the_reachable_agents_and_names_the_unreachable_one(
        capsys: pytest.CaptureFixture[str], dead_agent: str) -> None:
    with FakeAgent([BEFORE, AFTER], [pod_entry(WEB)]) as agent:
        code, out, err = run(capsys, "stat", "pods", "--agent", agent.address, "--agent", dead_agent,
                             "--window", "0.2", "--timeout", "2")
    assert code == 1
    assert WEB in out and "90.00%" in out
    assert err == f"pinion stat: {dead_agent}: unreachable: connection refused\n"


def test_stat_with_no_pods_in_the_namespace_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    with FakeAgent([BEFORE]) as agent:
        code, out, err = run(capsys, "stat", "pods", "-n", "shop", "--agent", agent.address,
                             "--window", "0.1")
    assert (code, out, err) == (0, "", "No traffic found.\n")


# --- edges ------------------------------------------------------------------------------------

def _edge_series(dst: str, server: str = "", reason: str = "") -> dict[str, list[str]]:
    tls = {"tls": "true", "server_id": server} if server else {"tls": "no_identity", "no_tls_reason": reason}
    labels = ",".join(f'{k}="{v}"' for k, v in {
        "direction": "outbound", "peer": "dst", "namespace": "emojivoto", "pod": "vote-bot-5b7f5657f6-xbjjw",
        "deployment": "vote-bot", "dst_namespace": "emojivoto", "dst_deployment": dst, **tls}.items())
    return {"tcp_open_connections gauge": [f"tcp_open_connections{{{labels}}} 2"]}


def test_edges_print_as_linkerd_viz_edges(capsys: pytest.CaptureFixture[str]) -> None:
    text = metrics_text(_edge_series("web", server="spiffe://cluster.local/ns/emojivoto/sa/web"),
                        _edge_series("legacy", reason="not_provided_by_service_discovery"))
    bot = pod_entry("vote-bot-5b7f5657f6-xbjjw", "emojivoto", account="default")
    with FakeAgent([text], [bot]) as agent:
        code, out, err = run(capsys, "edges", "deploy", "-n", "emojivoto", "--agent", agent.address)
        _, wide, _ = run(capsys, "edges", "deployment", "-n", "emojivoto", "-o", "wide",
                         "--agent", agent.address)
        _, as_json, _ = run(capsys, "edges", "deploy", "-A", "-o", "json", "--agent", agent.address)
    assert (code, err) == (0, "")
    # every column left-aligned and padded, the last one too (tabwriter cells end in a tab)
    assert out == ("SRC        DST      SRC_NS      DST_NS      SECURED                          \n"
                   "vote-bot   legacy   emojivoto   emojivoto   Not Provided By Service Discovery\n"
                   "vote-bot   web      emojivoto   emojivoto   √                                \n")
    assert wide.splitlines()[0].split() == ["SRC", "DST", "SRC_NS", "DST_NS", "CLIENT_ID", "SERVER_ID",
                                            "SECURED"]
    assert wide.splitlines()[2].split() == ["vote-bot", "web", "emojivoto", "emojivoto",
                                            "default.emojivoto", "web.emojivoto", "√"]
    assert json.loads(as_json)[1] == {"src": "vote-bot", "src_namespace": "emojivoto", "dst": "web",
                                      "dst_namespace": "emojivoto", "client_id": "default.emojivoto",
                                      "server_id": "web.emojivoto", "no_tls_reason": ""}


def test_edges_without_open_connections_are_none(capsys: pytest.CaptureFixture[str]) -> None:
    with FakeAgent([metrics_text(pod_series("default", "web", "outbound", ok=3))]) as agent:
        code, out, err = run(capsys, "edges", "pods", "--agent", agent.address)
    assert (code, out, err) == (0, "", "No edges found.\n")
    assert main(["edges", "svc"]) == 2


# --- top --------------------------------------------------------------------------------------

def test_top_refreshes_busiest_first_for_the_given_iterations(capsys: pytest.CaptureFixture[str]) -> None:
    scrapes = [metrics_text(pod_series("default", "web", ok=n * 10, latencies={20: n * 10}, tcp_open=2),
                            pod_series("default", "api", ok=n, failed=n),
                            pod_series("default", "web", "outbound", ok=n))
               for n in range(3)]
    with FakeAgent(scrapes) as agent:
        code, out, err = run(capsys, "top", "--pods", "--agent", agent.address, "--interval", "0.1",
                             "--iterations", "2")
        assert agent.scrapes == 3
    assert (code, err) == (0, "")
    blocks = out.split("\n\n")
    assert len(blocks) == 2
    for block in blocks:
        lines = block.strip().splitlines()
        assert lines[0].startswith("pinion top: 1 agent(s), every 0.1s, ")
        assert lines[1].split() == ["POD", "DIRECTION", "RPS", "SUCCESS", "P99", "TCP_CONN"]
        assert [line.split()[:2] for line in lines[2:]] == [
            ["default/web", "inbound"], ["default/api", "inbound"], ["default/web", "outbound"]]
        assert lines[2].split()[3:] == ["100.00%", "20ms", "2"]
        assert lines[3].split()[3] == "50.00%"


# --- check ------------------------------------------------------------------------------------

def _green(address: str) -> str:
    title = f"agent {address}"
    return (f"{title}\n{'-' * len(title)}\n"
            "✓ agent is reachable\n✓ /live returns 200\n✓ /ready returns 200\n✓ metrics parse\n"
            "✓ every meshed pod is listening\n✓ agent clock is sane\n")


def test_check_all_green(capsys: pytest.CaptureFixture[str]) -> None:
    with FakeAgent([metrics_text(start_time=time.time() - 30)], [pod_entry(WEB)]) as agent:
        code, out, _ = run(capsys, "check", "--agent", agent.address)
    assert code == 0
    assert out == _green(agent.address) + "\nStatus check results are ✓\n"


def test_check_unreachable_agent_fails_and_the_other_is_still_checked(
        capsys: pytest.CaptureFixture[str], dead_agent: str) -> None:
    with FakeAgent([metrics_text(start_time=time.time())]) as agent:
        code, out, _ = run(capsys, "check", "--agent", dead_agent, "--agent", agent.address)
    title = f"agent {dead_agent}"
    assert code == 1
    assert out == (f"{title}\n{'-' * len(title)}\n✗ agent is reachable\n"
                   f"    {dead_agent}: unreachable: connection refused\n"
                   f"    hint: is `pinion agent --admin-addr {dead_agent}` running and reachable from here?\n"
                   f"\n{_green(agent.address)}\nStatus check results are ✗\n")


@pytest.mark.parametrize(("agent_kwargs", "start_offset", "failed_lines"), [
    ({"ready": 503}, 0, ["✗ /ready returns 200", "    got 503: not ready",
                         "    hint: the agent answers 503 until it serves; see its log"]),
    ({"pods": [pod_entry(WEB), pod_entry("api-0", "shop", listening=False)]}, 0,
     ["✗ every meshed pod is listening", "    shop/api-0 is not listening",
      "    hint: the agent could not open its ports in these pods' network namespaces; see its log"]),
    ({}, 3600, ["✗ agent clock is sane",
                "    the agent started 3600s in the future (more than 60s ahead of this host)",
                "    hint: synchronise the clocks (NTP); a node without a real-time clock (a Raspberry "
                "Pi) can boot with a wrong time, and certificates depend on it"]),
])
def test_check_failures(capsys: pytest.CaptureFixture[str], agent_kwargs: dict[str, Any],
                        start_offset: float, failed_lines: list[str]) -> None:
    text = metrics_text(start_time=time.time() + start_offset)
    with FakeAgent([text], **agent_kwargs) as agent:
        code, out, _ = run(capsys, "check", "--agent", agent.address)
    assert code == 1
    lines = out.splitlines()
    first = lines.index(failed_lines[0])
    assert lines[first:first + len(failed_lines)] == failed_lines
    assert sum(line.startswith("✗") for line in lines) == 1
    assert lines[-1] == "Status check results are ✗"


@pytest.mark.parametrize("local", [False, True])
def test_check_shows_ebpf_programs_and_their_cgroup_only_to_a_caller_on_the_agents_host(
        capsys: pytest.CaptureFixture[str], local: bool) -> None:
    cgroup = "/sys/fs/cgroup/kubepods.slice/pod-1"
    programs = [{"program": name, "attach": attach, "id": 7, "cgroup": cgroup, "attached": True}
                for name, attach in (("connect4", "cgroup_inet4_connect"),
                                     ("getsockopt", "cgroup_getsockopt"))]
    pod = {**pod_entry(WEB), "backend": "ebpf", "cgroup": cgroup, "programs": programs}
    with FakeAgent([metrics_text(start_time=time.time())], [pod], local=local) as agent:
        code, out, _ = run(capsys, "check", "--agent", agent.address)
    where = f" on {cgroup}" if local else ""
    assert code == 0
    assert ("✓ every meshed pod's eBPF programs are attached\n"
            f"    default/{WEB}: cgroup_inet4_connect, cgroup_getsockopt{where}\n") in out


def test_check_metrics_that_do_not_parse(capsys: pytest.CaptureFixture[str]) -> None:
    with FakeAgent(["request_total{pod=\"web\" 1\n"]) as agent:
        code, out, _ = run(capsys, "check", "--agent", agent.address)
    assert code == 1
    assert "✗ metrics parse" in out.splitlines()
    assert "✗ agent clock is sane" in out.splitlines()


def test_check_json(capsys: pytest.CaptureFixture[str]) -> None:
    with FakeAgent([metrics_text(start_time=time.time())], ready=503) as agent:
        code, out, _ = run(capsys, "check", "--agent", agent.address, "-o", "json")
    document = json.loads(out)
    assert (code, document["success"]) == (1, False)
    [category] = document["categories"]
    assert [c["result"] for c in category["checks"]] == ["success", "success", "error", "success",
                                                          "success", "success"]


# --- check --pre ------------------------------------------------------------------------------

K3S_NODE = {
    "/proc/modules": "nf_tables 319488 1 nft_chain_nat, Live 0x0\nnfnetlink 20480 3 nf_tables, Live 0x0\n",
    "/proc/cgroups": "#subsys_name\thierarchy\tnum_cgroups\tenabled\ncpu\t0\t80\t1\nmemory\t0\t80\t1\n",
}
K3S_MOUNTS = ("cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n"
              "bpf /sys/fs/bpf bpf rw,nosuid,nodev,noexec,relatime,mode=700 0 0\n")
K3S_CNI = checks.CniConfig("k3s", "/var/lib/rancher/k3s/agent/etc/cni/net.d", "10-flannel.conflist")


def host(**overrides: object) -> checks.HostProbes:
    """A k3s node on Raspberry Pi OS with every prerequisite, unless overridden."""
    probes = {"euid": lambda: 0, "which": lambda tool: None, "mounts": lambda: K3S_MOUNTS,
              "read_text": K3S_NODE.get, "kernel_release": lambda: "6.6.51+rpt",
              "cni_config": lambda: K3S_CNI, "succeeds": lambda argv: False}
    return checks.HostProbes(**{**probes, **overrides})  # type: ignore[arg-type]


def test_check_pre_all_green_on_a_k3s_node(capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checks, "HOST_PROBES", host())
    code, out, _ = run(capsys, "check", "--pre")
    assert code == 0
    assert out.splitlines() == [
        "this host: prerequisites for running an agent", "-" * 45,
        "✓ running as root", "✓ nftables or iptables is usable", "    nf_tables (loaded)",
        "✓ cgroup v2 is mounted", "    at /sys/fs/cgroup",
        "✓ the memory cgroup controller is enabled", "✓ bpffs is mounted at /sys/fs/bpf",
        "✓ a primary CNI config in /var/lib/rancher/k3s/agent/etc/cni/net.d (k3s)",
        "    10-flannel.conflist", "", "Status check results are ✓"]


def test_check_pre_every_prerequisite_missing(capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    raspberry_pi_os_defaults = "cpu\t0\t80\t1\nmemory\t0\t80\t0\n"  # cgroup_disable=memory
    no_conf_dir = checks.CniConfig("standard", "/etc/cni/net.d", None, "the directory does not exist")
    monkeypatch.setattr(checks, "HOST_PROBES", host(
        euid=lambda: 1000, mounts=lambda: "cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n",
        read_text={"/proc/cgroups": raspberry_pi_os_defaults}.get,
        cni_config=lambda: no_conf_dir))
    code, out, _ = run(capsys, "check", "--pre")
    lines = out.splitlines()
    assert code == 1
    assert [line for line in lines if line.startswith(("✓", "✗"))] == [
        "✗ running as root", "✗ nftables or iptables is usable", "✗ cgroup v2 is mounted",
        "✗ the memory cgroup controller is enabled", "✗ bpffs is mounted at /sys/fs/bpf",
        "✗ a primary CNI config in /etc/cni/net.d (standard)"]
    assert "    the directory does not exist" in lines
    assert any("cgroup_memory=1 cgroup_enable=memory" in line for line in lines)
    assert sum(line.startswith("    hint: ") for line in lines) == 6
    assert lines[-1] == "Status check results are ✗"


def test_check_pre_reads_the_memory_controller_from_cgroup2_without_proc_cgroups() -> None:
    def memory(controllers: str) -> bool:
        files = {"/sys/fs/cgroup/cgroup.controllers": controllers}
        return next(r.ok for r in checks.host_results(host(read_text=files.get))
                    if r.title == "the memory cgroup controller is enabled")

    assert memory("cpuset cpu io memory pids\n") and not memory("cpuset cpu io pids\n")


def test_check_pre_finds_netfilter_in_the_module_lists_or_by_asking_a_tool() -> None:
    release = "6.1.0-28-arm64"
    builtin = {f"/lib/modules/{release}/modules.builtin": "kernel/net/netfilter/nf_tables.ko\n"}
    loadable = {f"/lib/modules/{release}/modules.dep": "kernel/net/ipv4/netfilter/ip_tables.ko.xz: x\n"}
    for files, detail in ((builtin, "nf_tables (built in)"), (loadable, "ip_tables (a module)")):
        [result] = [r for r in checks.host_results(host(read_text=files.get, kernel_release=lambda: release))
                    if r.title == "nftables or iptables is usable"]
        assert (result.ok, result.detail) == (True, (detail,))
    # No module lists at all (/proc/modules and /lib/modules absent): a working read-only tool proves it.
    asked: list[tuple[str, ...]] = []
    probes = host(read_text={}.get, which=lambda tool: f"/usr/sbin/{tool}",
                  succeeds=lambda argv: asked.append(tuple(argv)) or argv[0] == "iptables-legacy")
    [result] = [r for r in checks.host_results(probes) if r.title == "nftables or iptables is usable"]
    assert (result.ok, result.detail) == (True, ("`iptables-legacy -t nat -S` works",))
    assert asked == [("nft", "list", "tables"), ("iptables-legacy", "-t", "nat", "-S")]


def test_check_pre_finds_the_primary_cni_config_not_ours(tmp_path: Path) -> None:
    from agent.controlplane.cni_install import layout

    conf_dir = tmp_path / layout.K3S_CONF_DIR
    conf_dir.mkdir(parents=True)
    (conf_dir / "00-pinion.conflist").write_text('{"pinion": {"managedBy": "pinion cni install"}}')
    found = checks._cni_config(tmp_path)
    assert (found.flavour, found.primary) == ("k3s", None)  # our own config is not a primary
    (conf_dir / "10-flannel.conflist").write_text("{}")
    assert checks._cni_config(tmp_path).primary == "10-flannel.conflist"


def test_agent_flag_must_be_host_port(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["check", "--agent", "localhost"])
    assert "expected HOST:PORT" in capsys.readouterr().err


def test_check_judges_workload_certificates_by_their_expiry() -> None:
    from agent.viz.checks import EXPIRY, certificates_check
    from agent.viz.stats import Sample

    now = 1_000_000.0
    fresh = Sample(EXPIRY, {"identity": "spiffe://cluster.local/ns/a/sa/web"}, now + 12 * 3600)
    stale = Sample(EXPIRY, {"identity": "spiffe://cluster.local/ns/a/sa/db"}, now - 30)
    failing = Sample("pinion_identity_renewals_total", {"result": "failure"}, 3)

    healthy = certificates_check([fresh], now)
    assert healthy is not None and healthy.ok
    assert healthy.detail == ("1 identities, soonest expiry in 12.0 h",)
    broken = certificates_check([fresh, stale, failing], now)
    assert broken is not None and not broken.ok
    assert broken.detail == ("spiffe://cluster.local/ns/a/sa/db expired 30s ago",)
    assert certificates_check([], now) is None  # an agent without identities: nothing to judge
