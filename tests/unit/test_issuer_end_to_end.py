"""`pinion issuer` as a real process against the in-test Kubernetes API server, asked by KubeSigner:
a CSR for a pod on the caller's node is signed and the chain verifies with openssl; a pod on
another node, another service account's token and an expired token are refused; bad bytes on the
port do not stop it; it publishes the trust bundle; an agent's IdentityManager gets certificates."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.controlplane.kube.client import KubeClient, KubeConfig
from agent.identity.authority import IssueError
from agent.identity.crypto import cert_info, generate_key, make_csr
from agent.identity.files import init_identity_dir, split_pem_certificates
from agent.identity.remote import IssuerRefused, KubeSigner, kubernetes_identities
from agent.identity.spiffe import SpiffeId, issuer_id
from agent.identity.tls import AES_FIRST
from tests.support.kubeapi import FakeApiServer

REPO = Path(__file__).resolve().parents[2]
AGENT = "system:serviceaccount:pinion-system:pinion-agent"
NODE_NAME = "authentication.kubernetes.io/node-name"
POD_NAME = "authentication.kubernetes.io/pod-name"
CART = SpiffeId("cluster.local", "shop", "cart")
WEB = SpiffeId("cluster.local", "shop", "web")
CONFIGMAP = "/api/v1/namespaces/pinion-system/configmaps/pinion-trust-bundle"
STALE_BUNDLE = {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "pinion-trust-bundle", "namespace": "pinion-system"},
                "data": {"trust-bundle.crt": "stale", "note": "kept"}}


def pod(name: str, namespace: str, node: str, service_account: str, phase: str = "Running") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace},
            "spec": {"nodeName": node, "serviceAccountName": service_account,
                     "containers": [{"name": "app", "image": "app:1"}]},
            "status": {"phase": phase}}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Issuer:
    api: FakeApiServer
    process: subprocess.Popen[bytes]
    port: int
    admin_port: int
    identity_dir: Path
    directory: Path
    log: Path

    @property
    def bundle(self) -> bytes:
        return (self.identity_dir / "trust-bundle.crt").read_bytes()

    def signer(self, token: str) -> KubeSigner:
        token_file = self.directory / f"token-{token}"
        token_file.write_text(token)
        return KubeSigner(f"https://127.0.0.1:{self.port}", issuer_id("cluster.local"), token_file,
                          self.bundle)

    def sign(self, token: str, identity: SpiffeId) -> bytes:
        issued = asyncio.run(self.signer(token).sign(make_csr(generate_key(), str(identity)), identity, 3600))
        return issued.chain_pem

    def admin(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, ""


def start_issuer(api: FakeApiServer, identity_dir: Path, directory: Path) -> Issuer:
    port, admin_port = free_port(), free_port()
    log = directory / "issuer.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "agent", "issuer", "--identity-dir", str(identity_dir),
             "--listen", f"127.0.0.1:{port}", "--admin-addr", f"127.0.0.1:{admin_port}",
             "--kubeconfig", str(api.kubeconfig)],
            cwd=REPO, stdout=output, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    issuer = Issuer(api, process, port, admin_port, identity_dir, directory, log)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"pinion issuer exited {process.returncode}:\n{log.read_text()}")
        try:
            if issuer.admin("/ready")[0] == 200:
                return issuer
        except OSError:
            pass
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"pinion issuer never became ready:\n{log.read_text()}")


def stop(issuer: Issuer) -> int:
    issuer.process.send_signal(signal.SIGTERM)
    return issuer.process.wait(10)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeApiServer, Path, Path]]:
    directory = tmp_path_factory.mktemp("issuer")
    init_identity_dir(directory / "identity")
    api = FakeApiServer(directory=directory / "api").start()
    for namespace in ("pinion-system", "shop"):
        api.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    api.apply(STALE_BUNDLE)
    for name, node, service_account in (("cart-1", "n1", "cart"), ("web-1", "n2", "web"),
                                        ("pinion-agent-a", "n1", "pinion-agent")):
        api.apply(pod(name, "pinion-system" if "agent" in name else "shop", node, service_account))
    api.apply(pod("report-1", "shop", "n1", "report", phase="Succeeded"))
    api.add_token("agent-n1", username=AGENT, extra={NODE_NAME: ["n1"]}, audiences=("pinion-issuer",))
    api.add_token("agent-by-pod", username=AGENT, extra={POD_NAME: ["pinion-agent-a"]},
                  audiences=("pinion-issuer",))
    api.add_token("cart-token", username="system:serviceaccount:shop:cart", extra={NODE_NAME: ["n1"]},
                  audiences=("pinion-issuer",))
    api.add_token("expired", username=AGENT, extra={NODE_NAME: ["n1"]}, audiences=("pinion-issuer",),
                  expires_at=time.time() - 1)
    api.add_token("for-the-api-server", username=AGENT, extra={NODE_NAME: ["n1"]})
    try:
        yield api, directory / "identity", directory
    finally:
        api.stop()


@pytest.fixture(scope="module")
def issuer(cluster: tuple[FakeApiServer, Path, Path]) -> Iterator[Issuer]:
    running = start_issuer(*cluster)
    try:
        yield running
    finally:
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait(10)


# --- signed -------------------------------------------------------------------------------------


def test_a_pod_on_the_callers_node_is_signed_and_openssl_verifies_the_chain(issuer: Issuer,
                                                                           tmp_path: Path) -> None:
    chain = issuer.sign("agent-n1", CART)

    leaf, _ = split_pem_certificates(chain)
    assert cert_info(leaf).uri_sans == (str(CART),)
    (tmp_path / "chain.pem").write_bytes(chain)
    (tmp_path / "leaf.pem").write_bytes(leaf)
    verified = subprocess.run(["openssl", "verify", "-x509_strict", "-CAfile",
                               str(issuer.identity_dir / "trust-bundle.crt"), "-untrusted",
                               str(tmp_path / "chain.pem"), str(tmp_path / "leaf.pem")],
                              capture_output=True, text=True, timeout=20)
    assert verified.returncode == 0, verified.stderr


def test_an_agent_token_without_a_node_name_is_placed_by_its_pod(issuer: Issuer) -> None:
    chain = issuer.sign("agent-by-pod", CART)

    assert cert_info(chain).uri_sans == (str(CART),)


def test_an_identity_manager_from_kubernetes_identities_gets_pod_certificates(issuer: Issuer) -> None:
    token_file, bundle_file = issuer.directory / "token-agent-n1-manager", issuer.directory / "bundle.crt"
    token_file.write_text("agent-n1")
    bundle_file.write_bytes(issuer.bundle)
    manager = kubernetes_identities(f"https://127.0.0.1:{issuer.port}", None, token_file, bundle_file,
                                    "cluster.local", AES_FIRST, 7200)

    credentials = asyncio.run(manager.ensure("shop/cart-1", CART))

    assert credentials.identity == CART
    assert cert_info(credentials.chain_pem).uri_sans == (str(CART),)
    assert manager.server_context("shop/cart-1") is not None


# --- refused ------------------------------------------------------------------------------------


def refusal(issuer: Issuer, token: str, identity: SpiffeId) -> IssuerRefused:
    with pytest.raises(IssuerRefused) as refused:
        issuer.sign(token, identity)
    return refused.value


def test_a_pod_on_another_node_is_refused(issuer: Issuer) -> None:
    refused = refusal(issuer, "agent-n1", WEB)

    assert (refused.status, refused.reason) == (403, "not_on_node")


def test_a_pod_in_the_mesh_namespace_is_refused_though_it_runs_on_the_callers_node(issuer: Issuer) -> None:
    refused = refusal(issuer, "agent-n1", SpiffeId("cluster.local", "pinion-system", "pinion-agent"))

    assert (refused.status, refused.reason) == (403, "forbidden_namespace")


def test_a_finished_pod_on_the_callers_node_is_refused(issuer: Issuer) -> None:
    refused = refusal(issuer, "agent-n1", SpiffeId("cluster.local", "shop", "report"))

    assert (refused.status, refused.reason) == (403, "not_on_node")


def test_a_token_of_another_service_account_is_refused(issuer: Issuer) -> None:
    refused = refusal(issuer, "cart-token", CART)

    assert (refused.status, refused.reason) == (403, "wrong_service_account")


@pytest.mark.parametrize("token", ["expired", "for-the-api-server", "never-issued"])
def test_expired_foreign_audience_and_unknown_tokens_are_refused(issuer: Issuer, token: str) -> None:
    refused = refusal(issuer, token, CART)

    assert (refused.status, refused.reason) == (401, "unauthenticated")


def test_a_deleted_pod_is_refused_at_once_nothing_is_cached(issuer: Issuer) -> None:
    issuer.api.apply(pod("batch-1", "shop", "n1", "batch"))
    batch = SpiffeId("cluster.local", "shop", "batch")
    issuer.sign("agent-n1", batch)

    issuer.api.delete("v1", "Pod", "shop", "batch-1")

    assert refusal(issuer, "agent-n1", batch).reason == "not_on_node"


# --- robustness, publishing, admin --------------------------------------------------------------


def test_garbage_and_plaintext_on_the_tls_port_do_not_stop_the_issuer(issuer: Issuer) -> None:
    for junk in (b"\x16\x03\x01\x02\x00" + os.urandom(600), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b""):
        with socket.create_connection(("127.0.0.1", issuer.port), timeout=5) as client:
            client.sendall(junk)
            client.shutdown(socket.SHUT_WR)
            try:
                while client.recv(4096):
                    pass
            except ConnectionResetError:
                pass

    assert cert_info(issuer.sign("agent-n1", CART)).uri_sans == (str(CART),)


def test_the_trust_bundle_configmap_is_published(issuer: Issuer) -> None:
    async def read() -> dict[str, Any]:
        client = KubeClient(KubeConfig.load(str(issuer.api.kubeconfig)), timeout=5)
        try:
            configmap = await client.request("GET", CONFIGMAP)
            return dict(configmap["data"])
        finally:
            await client.close()

    deadline = time.monotonic() + 10
    while (data := asyncio.run(read()))["trust-bundle.crt"] == "stale" and time.monotonic() < deadline:
        time.sleep(0.1)

    assert data == {"trust-bundle.crt": issuer.bundle.decode(), "note": "kept"}


def test_the_admin_endpoint_is_live_and_counts_requests(issuer: Issuer) -> None:
    issuer.sign("agent-n1", CART)

    status, metrics = issuer.admin("/metrics")

    assert issuer.admin("/live")[0] == 200
    assert status == 200
    counts = {line.split("{")[1].split("}")[0]: float(line.rsplit(" ", 1)[1])
              for line in metrics.splitlines() if line.startswith("pinion_issuer_requests_total{")}
    assert counts['result="issued"'] >= 1
    assert set(counts) == {f'result="{r}"' for r in ("issued", "unauthenticated", "wrong_service_account",
                                                     "not_on_node", "forbidden_namespace", "bad_request",
                                                     "rate_limited", "error")}
    refusals = [line for line in metrics.splitlines()
                if line.startswith("pinion_issuer_connections_refused_total{")]
    assert "\npinion_admin_connections 1.0\n" in metrics  # the admin port is the agent's, bounded
    assert any(line.startswith('pinion_issuer_connections_refused_total{listener="issuer",reason="silent"}')
               for line in refusals)
    assert "process_resident_memory_bytes" in metrics


def test_sigterm_stops_the_issuer_and_each_request_was_logged(cluster: tuple[FakeApiServer, Path, Path],
                                                              tmp_path: Path) -> None:
    api, identity_dir, _ = cluster
    own = start_issuer(api, identity_dir, tmp_path)
    own.sign("agent-n1", CART)
    with pytest.raises(IssueError):
        own.sign("cart-token", CART)

    assert stop(own) == 0
    lines = [line for line in own.log.read_text().splitlines() if "POST /v1/certificates" in line]
    assert len(lines) == 2
    assert "-> 200 issued" in lines[0] and "-> 403 wrong_service_account" in lines[1]


def test_an_unusable_identity_dir_stops_the_issuer_with_a_clear_message(tmp_path: Path) -> None:
    finished = subprocess.run([sys.executable, "-m", "agent", "issuer", "--identity-dir",
                               str(tmp_path / "none"), "--kubeconfig", str(tmp_path / "none.yaml")],
                              cwd=REPO, capture_output=True, text=True, timeout=30)

    assert finished.returncode == 1
    assert "issuer: cannot start" in finished.stderr and "none" in finished.stderr
