"""The mTLS mesh tunnel between two lab nodes, on the real kernel: what crosses the underlay
is TLS, the server pod still sees the client pod's own IP, 15008 turns away whoever lacks a
certificate of the mesh (and keeps serving), mesh-only pods refuse plaintext, and a
certificate renewal drops no connection."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from agent.core import compiled, tunnel
from agent.identity.authority import LocalSigner
from agent.identity.crypto import generate_key, make_csr
from agent.identity.files import TRUST_BUNDLE, init_identity_dir
from agent.identity.spiffe import SpiffeId
from agent.lab.agents import REPO
from agent.lab.capture import UnderlayCapture
from agent.lab.topology import Pod
from tests.netns.conftest import Mesh, after_capture, eventually, running_mesh

HTTP_SERVER = "agent.lab.httpserver"


@contextlib.contextmanager
def tls_mesh_running(tmp_path: Path, backend: str, lifetime: str = "86400",
                     environments: Sequence[Mapping[str, str]] = ()) -> Iterator[Mesh]:
    """Two agents sharing one identity dir; their logs are printed (pytest shows them for a
    failed test)."""
    identity = tmp_path / "identity"
    init_identity_dir(identity, trust_domain="cluster.local")
    args = ["--identity-dir", str(identity), "--certificate-lifetime", lifetime]
    with running_mesh(backend, args, identity, environments=environments) as mesh:
        try:
            yield mesh
        finally:
            for agent in mesh.agents:
                print(f"--- agent {agent.node.name} log ---\n{agent.log()[-4000:]}")


@pytest.fixture
def tls_mesh(tmp_path: Path, backend: str) -> Iterator[Mesh]:
    with tls_mesh_running(tmp_path, backend) as mesh:
        yield mesh


def curl(pod: Pod, url: str, *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return pod.run(["curl", "-sS", "--max-time", "5", *extra, url], timeout=15, check=check)


# End to end through each backend's capture, into the tunnel and out to the server pod.
def test_node_to_node_bytes_are_tls_and_the_server_sees_the_client_pods_ip(
        tls_mesh: Mesh, tmp_path: Path) -> None:
    client, server = tls_mesh.pod(0, "client"), tls_mesh.pod(1, "server")
    tls_mesh.serve(server, HTTP_SERVER, "--port", "8080")
    marker = "pinion-secret-marker-4f1d"
    capture = UnderlayCapture(tls_mesh.lab.nodes[1], tmp_path / "underlay.pcap")

    seen_as = curl(client, f"http://{server.ip}:8080/whoami?{marker}")
    body = curl(client, f"http://{server.ip}:8080/{marker}", "-H", f"X-Marker: {marker}")
    wire = capture.stop()

    assert seen_as.returncode == 0 and seen_as.stdout.strip() == client.ip
    assert body.returncode == 0 and body.stdout.strip() == "ok"
    assert capture.count("tcp dst port 15008") > 0  # the request went through the tunnel...
    assert capture.count("tcp port 8080") == 0  # ...never to the app port in the open
    assert marker.encode() not in wire and b"GET /" not in wire and b"HTTP/1.1" not in wire
    assert b"\x16\x03\x01" in wire  # a TLS handshake record (ClientHello) did cross


# The tunnel behind the capture: one backend (conftest.after_capture).
@after_capture
def test_tunnel_traffic_is_labelled_tls_with_the_peers_identities(tls_mesh: Mesh) -> None:
    client, server = tls_mesh.pod(0, "client"), tls_mesh.pod(1, "server")
    tls_mesh.serve(server, HTTP_SERVER, "--port", "8080")
    for _ in range(3):
        assert curl(client, f"http://{server.ip}:8080/status/200").returncode == 0
    identity = "spiffe://cluster.local/ns/default/sa/default"

    def counted() -> bool:
        outbound = tls_mesh.agents[0].metrics()
        inbound = tls_mesh.agents[1].metrics()
        return (outbound.value("tcp_close_total", direction="outbound", pod="client", tls="true",
                               server_id=identity, dst_namespace="default") == 3
                and outbound.value("response_total", direction="outbound", pod="client",
                                   tls="true", status_code="200") == 3
                and inbound.value("tcp_close_total", direction="inbound", pod="server",
                                  tls="true", client_id=identity) == 3
                and inbound.value("request_total", direction="inbound", pod="server",
                                  tls="true", client_id=identity) == 3)

    assert eventually(counted), "\n".join(
        line for agent in tls_mesh.agents for line in agent.metrics().text.splitlines()
        if line.startswith(("tcp_", "request_total", "response_total", "pinion_proxy")))
    # three client connections, one tunnel connection between the two pods
    assert tls_mesh.agents[0].metrics().value("pinion_tunnel_connections",
                                                direction="outbound") == 1
    expiry = tls_mesh.agents[1].metrics().value(
        "pinion_identity_certificate_expiry_timestamp_seconds", identity=identity)
    assert time.time() + 23 * 3600 < expiry <= time.time() + 24 * 3600 + 60


# The tunnel behind the capture: one backend (conftest.after_capture).
@after_capture
def test_a_destination_that_is_not_meshed_gets_plain_tcp(tls_mesh: Mesh) -> None:
    client = tls_mesh.pod(0, "client")
    plain = tls_mesh.pod(1, "plain", meshed=False)
    tls_mesh.serve(plain, HTTP_SERVER, "--port", "8080")
    for _ in range(2):
        assert curl(client, f"http://{plain.ip}:8080/").stdout.strip() == "ok"
    assert eventually(lambda: tls_mesh.agents[0].metrics().value(
        "tcp_close_total", direction="outbound", pod="client", tls="no_identity") == 2)


# ------------------------------------------------------------------ who 15008 turns away


def openssl_client(pod: Pod, address: str, *args: str,
                   wait: bool = False) -> subprocess.CompletedProcess[str]:
    """s_client; with `wait`, it stays to read what the server says after the handshake: in
    TLS 1.3 the client finishes first, so a refused client certificate shows as an alert."""
    command = (f"sleep {1 if wait else 0} | openssl s_client -connect {address}:15008 "
               f"-tls1_3 -verify_return_error {' '.join(args)}")
    return pod.run(["sh", "-c", command], timeout=20, check=False)


def issue_files(directory: Path, identity_dir: Path, name: str, spiffe: SpiffeId,
                not_before: float, lifetime: float) -> tuple[Path, Path]:
    key = generate_key()
    signer = LocalSigner.from_dir(identity_dir, clock=lambda: not_before)
    issued = signer.sign_now(make_csr(key, str(spiffe)), spiffe, lifetime)
    cert, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert.write_bytes(issued.chain_pem)
    key_path.write_bytes(key.private_pem())
    return cert, key_path


def credentials(files: tuple[Path, Path]) -> list[str]:
    """s_client flags presenting the leaf and its issuer (-cert alone sends the leaf only)."""
    return ["-cert", str(files[0]), "-cert_chain", str(files[0]), "-key", str(files[1])]


# The tunnel behind the capture: one backend (conftest.after_capture).
@after_capture
def test_15008_refuses_strangers_and_keeps_serving(tls_mesh: Mesh, tmp_path: Path) -> None:
    client, server = tls_mesh.pod(0, "client"), tls_mesh.pod(1, "server")
    prober = tls_mesh.pod(0, "prober", meshed=False)  # a meshed pod's own 15008 dials are captured
    tls_mesh.serve(server, HTTP_SERVER, "--port", "8080")
    identity_dir = tls_mesh.identity_dir
    assert identity_dir is not None
    bundle = identity_dir / TRUST_BUNDLE
    stranger_dir = tmp_path / "stranger"
    init_identity_dir(stranger_dir, trust_domain="other.example")
    who = SpiffeId("cluster.local", "default", "default")
    now = time.time()
    good = issue_files(tmp_path, identity_dir, "good", who, now, 3600)
    stranger = issue_files(tmp_path, stranger_dir, "stranger",
                           SpiffeId("other.example", "default", "default"), now, 3600)
    expired = issue_files(tmp_path, identity_dir, "expired", who, now - 7200, 3600)

    # a member of the mesh completes the handshake and stays connected; the certificate the
    # agent serves for the server pod verifies against the bundle and names it by SPIFFE ID
    accepted = openssl_client(prober, server.ip, *credentials(good), "-CAfile", str(bundle),
                              "-showcerts", wait=True)
    assert accepted.returncode == 0, accepted.stderr
    assert "Verify return code: 0 (ok)" in accepted.stdout
    served = re.findall(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n",
                        accepted.stdout, re.S)
    assert len(served) == 2  # the pod's leaf and the issuer
    (tmp_path / "leaf.pem").write_text(served[0])
    (tmp_path / "issuer.pem").write_text(served[1])
    verified = subprocess.run(["openssl", "verify", "-x509_strict", "-CAfile", str(bundle),
                               "-untrusted", str(tmp_path / "issuer.pem"), str(tmp_path / "leaf.pem")],
                              capture_output=True, text=True)
    assert verified.returncode == 0 and verified.stdout.strip().endswith("OK"), verified.stderr
    text = subprocess.run(["openssl", "x509", "-noout", "-text", "-in", str(tmp_path / "leaf.pem")],
                          capture_output=True, text=True, check=True).stdout
    assert "URI:spiffe://cluster.local/ns/default/sa/default" in text
    assert "TLS Web Server Authentication, TLS Web Client Authentication" in text

    for name, args in (("no certificate", []),
                       ("another trust domain", credentials(stranger)),
                       ("expired", credentials(expired))):
        refused = openssl_client(prober, server.ip, "-CAfile", str(bundle), *args, wait=True)
        # the server ends the connection right after the client's Finished: s_client fails
        assert refused.returncode != 0, (name, refused.stderr)
        assert "CONNECTED" in refused.stdout  # TLS 1.3: the client finishes first

    def failures(reason: str) -> float:
        return tls_mesh.agents[1].metrics().value("pinion_tunnel_handshake_failures_total",
                                                  direction="inbound", reason=reason)

    assert eventually(lambda: failures("no_certificate") >= 1 and failures("unknown_ca") >= 1
                      and failures("expired") >= 1), [
        line for line in tls_mesh.agents[1].metrics().text.splitlines() if "handshake" in line]
    # garbage on the mesh port: refused too
    garbage = prober.run([sys.executable, "-c", (
        f"import socket; s = socket.create_connection(('{server.ip}', 15008), 5); "
        "s.sendall(b'GET / HTTP/1.1\\r\\n\\r\\n'); print(repr(s.recv(100)))")],
        timeout=20, cwd=str(REPO), check=False)
    assert eventually(lambda: failures("not_tls") >= 1), garbage.stdout + garbage.stderr
    # and the agent keeps serving the mesh
    assert curl(client, f"http://{server.ip}:8080/").stdout.strip() == "ok"


# ------------------------------------------------------------------------------ policy


# Policy, decided behind the capture: one backend (conftest.after_capture).
@after_capture
def test_a_mesh_only_pod_refuses_plaintext_and_accepts_the_mesh(tls_mesh: Mesh) -> None:
    server = tls_mesh.pod(1, "vault", PINION_INBOUND_POLICY="mesh-only")
    meshed = tls_mesh.pod(0, "meshed")
    outsider = tls_mesh.pod(0, "outsider", meshed=False)
    tls_mesh.serve(server, HTTP_SERVER, "--port", "8080")

    assert curl(meshed, f"http://{server.ip}:8080/").stdout.strip() == "ok"
    refused = curl(outsider, f"http://{server.ip}:8080/", check=False)
    assert refused.returncode != 0  # reset by the proxy
    assert eventually(lambda: tls_mesh.agents[1].metrics().value(
        "pinion_proxy_errors_total", direction="inbound", reason="policy_plaintext") == 1)


# Policy, decided behind the capture: one backend (conftest.after_capture).
@after_capture
def test_an_allow_list_admits_only_the_named_identities(tls_mesh: Mesh) -> None:
    server = tls_mesh.pod(1, "ledger", PINION_ALLOWED_CLIENTS="spiffe://cluster.local/ns/default/sa/billing")
    billing = tls_mesh.pod(0, "billing", PINION_SERVICE_ACCOUNT="billing")
    other = tls_mesh.pod(0, "other", PINION_SERVICE_ACCOUNT="web")
    tls_mesh.serve(server, HTTP_SERVER, "--port", "8080")

    assert curl(billing, f"http://{server.ip}:8080/").stdout.strip() == "ok"
    assert curl(other, f"http://{server.ip}:8080/", check=False).returncode != 0
    assert eventually(lambda: tls_mesh.agents[1].metrics().value(
        "pinion_tunnel_handshake_failures_total", direction="inbound", reason="not_allowed") >= 1)


# ---------------------------------------------------------------------------- renewal


def test_certificate_renewal_under_traffic_drops_no_connection(tmp_path: Path) -> None:
    with tls_mesh_running(tmp_path, "nftables", lifetime="4") as mesh:  # renewed every ~2 s
        client, server = mesh.pod(0, "client"), mesh.pod(1, "server")
        mesh.serve(server, HTTP_SERVER, "--port", "8080")
        # one long download over a slow-reading client, spanning several renewals...
        slow = client.spawn(["curl", "-sS", "--max-time", "30", "--limit-rate", "200k", "-o",
                             "/dev/null", "-w", "%{http_code} %{size_download}",
                             f"http://{server.ip}:8080/bytes/1500000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # ...and new connections all along
        deadline, answers = time.monotonic() + 7, []
        while time.monotonic() < deadline:
            answers.append(curl(client, f"http://{server.ip}:8080/").stdout.strip())
            time.sleep(0.2)
        out, err = slow.communicate(timeout=30)
        assert out == "200 1500000", err
        assert answers and all(answer == "ok" for answer in answers)
        renewed = [agent.metrics().value("pinion_identity_renewals_total", result="success")
                   for agent in mesh.agents]
        assert all(count >= 2 for count in renewed), renewed
        failed = sum(s.value for s in mesh.agents[0].metrics().samples
                     if s.name == "tcp_close_total" and s.labels.get("errno"))
        assert failed == 0


# ------------------------------------------------------------------ builds interoperate


@pytest.mark.skipif(not compiled.is_compiled(tunnel) and not os.environ.get("CI"),
                    reason="the tunnel framing is not compiled here (pip install -e . builds it)")
def test_a_compiled_agent_and_a_python_agent_tunnel_to_each_other(tmp_path: Path) -> None:
    """Node 0 runs the mypyc build (tunnel framing, counters, relay, tunnel shell), node 1 the Python
    sources (PINION_PURE_PYTHON=1): requests both ways, and a download larger than every
    window, each counted alike by the two builds of the counters."""
    environments = [{compiled.PURE_PYTHON_ENV: "0"}, {compiled.PURE_PYTHON_ENV: "1"}]
    with tls_mesh_running(tmp_path, "nftables", environments=environments) as mesh:
        assert "tunnel framing: compiled (mypyc)" in mesh.agents[0].log()
        assert "counters: compiled (mypyc)" in mesh.agents[0].log()
        assert "relay and tunnel shell: compiled (mypyc)" in mesh.agents[0].log()
        assert "tunnel framing: python" in mesh.agents[1].log()
        assert "counters: python" in mesh.agents[1].log()
        assert "relay and tunnel shell: python" in mesh.agents[1].log()
        pods = [mesh.pod(0, "left"), mesh.pod(1, "right")]
        for pod in pods:
            mesh.serve(pod, HTTP_SERVER, "--port", "8080")
        for client, server in (pods, pods[::-1]):
            for _ in range(3):
                assert curl(client, f"http://{server.ip}:8080/whoami").stdout.strip() == client.ip
            download = curl(client, f"http://{server.ip}:8080/bytes/3000000", "-o", "/dev/null",
                            "-w", "%{http_code} %{size_download}")
            assert download.stdout == "200 3000000", download.stderr
        for agent in mesh.agents:
            assert agent.metrics().value("pinion_tunnel_connections", direction="outbound") == 1

        def counted_alike() -> bool:  # 4 requests each way: the client's agent and the server's
            metrics = [agent.metrics() for agent in mesh.agents]
            return all(metrics[client].value(name, direction="outbound", pod=pods[client].name, **labels)
                       == metrics[1 - client].value(name, direction="inbound", pod=pods[1 - client].name,
                                                    **labels) == 4
                       for client in (0, 1) for name, labels in (
                           ("request_total", {}), ("response_total", {"status_code": "200"}),
                           ("response_latency_ms_count", {}), ("tcp_close_total", {"tls": "true"})))

        assert eventually(counted_alike), "\n".join(
            line for agent in mesh.agents for line in agent.metrics().text.splitlines()
            if line.startswith(("tcp_close_total", "request_total", "response_total")))
