"""The issuer's HTTPS shell and the agent's KubeSigner, over real loopback TLS (Kubernetes faked):
TLS 1.3 only, the issuer proves its SPIFFE ID before the agent sends its token, every request
is answered, logged and counted once, and bad bytes on the port cost nothing but themselves."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.controlplane.issuer.decisions import CertificateIssuer, IssuerPolicy
from agent.controlplane.issuer.server import IssuerServer, IssuerSettings, ServingCertificate
from agent.identity.authority import IssueError, LocalSigner
from agent.identity.crypto import cert_info, generate_key, make_csr
from agent.identity.files import init_identity_dir
from agent.identity.remote import IssuerRefused, KubeSigner
from agent.identity.spiffe import SpiffeId, issuer_id
from agent.identity.store import IdentityManager
from agent.identity.tls import AES_FIRST
from agent.observability.exposition import CollectorRegistry
from tests.unit.test_issuer_decisions import CART, WEB, FakePods, FakeReviews, pod

ISSUER = issuer_id("cluster.local")


@pytest.fixture(scope="module")
def identity_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("identity")
    init_identity_dir(path)
    return path


@pytest.fixture(scope="module")
def foreign_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("foreign")
    init_identity_dir(path)
    return path


@dataclass
class Running:
    port: int
    reviews: FakeReviews
    pods: FakePods
    registry: CollectorRegistry
    serving: ServingCertificate
    token_file: Path
    bundle: bytes
    server: IssuerServer

    def signer(self, expected: SpiffeId = ISSUER, bundle: bytes | None = None,
               timeout: float = 10.0) -> KubeSigner:
        return KubeSigner(f"https://127.0.0.1:{self.port}", expected, self.token_file,
                          bundle if bundle is not None else self.bundle, timeout=timeout)

    def count(self, result: str) -> float:
        value = self.registry.get_sample_value("pinion_issuer_requests_total", {"result": result})
        return value or 0.0


def serve(identity_dir: Path, tmp_path: Path, scenario: Callable[[Running], Awaitable[None]],
          **options: Any) -> None:
    """Run an issuer on 127.0.0.1:<random> with faked Kubernetes while `scenario` runs; `options` go
    to IssuerServer (limits, rate)."""

    async def main() -> None:
        signer = LocalSigner.from_dir(identity_dir)
        reviews, pods = FakeReviews(), FakePods([pod("cart-1", "n1"), pod("web-1", "n2", "web")])
        reviews.agent("agent-n1", node="n1")
        registry = CollectorRegistry()
        serving = ServingCertificate(signer)
        server = IssuerServer(CertificateIssuer(IssuerPolicy("cluster.local"), signer, reviews, pods),
                              serving.context, registry, **options)
        _, port = await server.start("127.0.0.1", 0)
        token_file = tmp_path / "token"
        token_file.write_text("agent-n1\n")
        try:
            await scenario(Running(port, reviews, pods, registry, serving, token_file,
                                   (identity_dir / "trust-bundle.crt").read_bytes(), server))
        finally:
            await server.close()

    asyncio.run(main())


def csr_for(identity: SpiffeId) -> bytes:
    return make_csr(generate_key(), str(identity))


def insecure_client(maximum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.maximum_version = maximum
    return context


async def raw(port: int, data: bytes, *, tls: bool = True) -> bytes:
    """Send `data` (over TLS unless told not to) and return everything until the issuer closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=insecure_client() if tls else None)
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def parse_reply(answer: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


# --- the good path ------------------------------------------------------------------------------


def test_kube_signer_gets_a_certificate_from_the_issuer(identity_dir: Path, tmp_path: Path) -> None:
    async def scenario(issuer: Running) -> None:
        issued = await issuer.signer().sign(csr_for(CART), CART, 3600)

        assert cert_info(issued.chain_pem).uri_sans == (str(CART),)
        assert 3600 <= issued.not_after - issued.not_before <= 3600 + 61
        assert issuer.reviews.asked == [("agent-n1", "pinion-issuer")]
        assert issuer.count("issued") == 1

    serve(identity_dir, tmp_path, scenario)


def test_an_identity_manager_with_a_kube_signer_issues_pod_certificates(identity_dir: Path,
                                                                        tmp_path: Path) -> None:
    async def scenario(issuer: Running) -> None:
        manager = IdentityManager(issuer.signer(), issuer.bundle, "cluster.local", AES_FIRST, lifetime=7200)

        credentials = await manager.ensure("shop/cart-1", CART)

        assert credentials.identity == CART
        assert credentials.not_after - credentials.not_before >= 7200
        manager.server_context("shop/cart-1")  # the chain and key make a working context

    serve(identity_dir, tmp_path, scenario)


def test_the_token_is_read_from_its_file_for_every_request(identity_dir: Path, tmp_path: Path) -> None:
    async def scenario(issuer: Running) -> None:
        signer = issuer.signer()
        await signer.sign(csr_for(CART), CART, 3600)
        issuer.reviews.agent("agent-n1-rotated", node="n1")
        issuer.token_file.write_text("agent-n1-rotated")

        await signer.sign(csr_for(CART), CART, 3600)

        assert [token for token, _ in issuer.reviews.asked] == ["agent-n1", "agent-n1-rotated"]

    serve(identity_dir, tmp_path, scenario)


def test_a_refusal_carries_the_issuers_status_reason_and_message(identity_dir: Path, tmp_path: Path) -> None:
    async def scenario(issuer: Running) -> None:
        with pytest.raises(IssuerRefused) as refused:
            await issuer.signer().sign(csr_for(WEB), WEB, 3600)

        assert (refused.value.status, refused.value.reason) == (403, "not_on_node")
        assert "service account web is scheduled on node n1" in str(refused.value)
        assert isinstance(refused.value, IssueError)  # what IdentityManager retries
        assert issuer.count("not_on_node") == 1

    serve(identity_dir, tmp_path, scenario)


# --- who the issuer is --------------------------------------------------------------------------


def test_the_issuer_serves_tls13_with_a_certificate_naming_its_spiffe_id(identity_dir: Path,
                                                                        tmp_path: Path) -> None:
    async def scenario(issuer: Running) -> None:
        context = ssl.create_default_context(cadata=issuer.bundle.decode())
        context.check_hostname = False
        _, writer = await asyncio.open_connection("127.0.0.1", issuer.port, ssl=context)
        ssl_object = writer.get_extra_info("ssl_object")
        assert ssl_object.version() == "TLSv1.3"
        assert ssl_object.getpeercert()["subjectAltName"] == (("URI", str(ISSUER)),)
        writer.close()

        with pytest.raises((ssl.SSLError, ConnectionError)):  # a TLS 1.2 client: no common version
            await asyncio.open_connection("127.0.0.1", issuer.port,
                                          ssl=insecure_client(ssl.TLSVersion.TLSv1_2))

    serve(identity_dir, tmp_path, scenario)


def test_a_server_with_another_spiffe_id_never_sees_the_token(identity_dir: Path, tmp_path: Path) -> None:
    async def scenario(issuer: Running) -> None:
        someone_else = SpiffeId("cluster.local", "pinion-system", "not-the-issuer")

        with pytest.raises(IssueError, match="is not the issuer: unexpected_identity"):
            await issuer.signer(expected=someone_else).sign(csr_for(CART), CART, 3600)

        assert issuer.reviews.asked == []

    serve(identity_dir, tmp_path, scenario)


def test_an_issuer_outside_the_trust_bundle_is_refused(identity_dir: Path, foreign_dir: Path,
                                                       tmp_path: Path) -> None:
    async def scenario(issuer: Running) -> None:
        foreign = (foreign_dir / "trust-bundle.crt").read_bytes()
        signer = issuer.signer(bundle=foreign)

        with pytest.raises(IssueError, match="certificate verify failed"):
            await signer.sign(csr_for(CART), CART, 3600)
        assert issuer.reviews.asked == []

        signer.reload_bundle(foreign + issuer.bundle)  # anchor rotation: both trusted
        await signer.sign(csr_for(CART), CART, 3600)

    serve(identity_dir, tmp_path, scenario)


def test_a_renewed_serving_certificate_reaches_new_connections(identity_dir: Path, tmp_path: Path) -> None:
    async def scenario(issuer: Running) -> None:
        async def serial() -> int:
            _, writer = await asyncio.open_connection("127.0.0.1", issuer.port, ssl=insecure_client())
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            writer.close()
            return hash(der)

        before = await serial()
        issuer.serving.renew()

        assert await serial() != before
        await issuer.signer().sign(csr_for(CART), CART, 3600)

    serve(identity_dir, tmp_path, scenario)


def test_the_serving_certificate_is_renewed_at_half_life(identity_dir: Path) -> None:
    now = [time.time()]

    def clock() -> float:
        return now[0]

    serving = ServingCertificate(LocalSigner.from_dir(identity_dir, clock=clock), clock=clock)
    first_expiry = serving.not_after
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds
        if len(sleeps) == 2:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(serving.run(sleep=sleep))

    # Half-way through a day that started a minute early (the backdate).
    assert sleeps[0] == pytest.approx((86400 + 60) / 2 - 60, abs=2)
    assert serving.not_after > first_expiry


# --- bad input on the port ----------------------------------------------------------------------


def test_garbage_plaintext_and_silent_clients_do_not_stop_the_issuer(identity_dir: Path,
                                                                    tmp_path: Path) -> None:
    async def scenario(issuer: Running) -> None:
        _, silent = await asyncio.open_connection("127.0.0.1", issuer.port)  # holds a handshake open
        assert await raw(issuer.port, b"\x16\x03\x01\xff\xff" + bytes(range(256)) * 8, tls=False) == b""
        assert await raw(issuer.port, b"POST /v1/certificates HTTP/1.1\r\nHost: x\r\n\r\n", tls=False) == b""
        _, half = await asyncio.open_connection("127.0.0.1", issuer.port, ssl=insecure_client())
        half.write(b"POST /v1/certif")  # and never finishes
        half.close()

        await issuer.signer().sign(csr_for(CART), CART, 3600)

        silent.close()
        assert issuer.count("issued") == 1

    serve(identity_dir, tmp_path, scenario)


@pytest.mark.parametrize(("request_bytes", "status", "says"), [
    (b"POST /v1/certificates HTTP/1.1\r\nContent-Length: 70000\r\n\r\n", 400, "larger than 65536"),
    (b"POST /v1/certificates HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n", 400, "head larger"),
    (b"POST /v1/certificates HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400,
     "Transfer-Encoding"),
    (b"POST /v1/certificates HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400, "Content-Length"),
    (b"HELLO\r\n\r\n", 400, "request line"),
    (b"GET /v1/certificates HTTP/1.1\r\n\r\n", 405, "only POST"),
    (b"POST /admin HTTP/1.1\r\n\r\n", 404, "no such endpoint"),
    (b"POST /v1/certificates HTTP/1.1\r\nContent-Length: 8\r\n\r\nnot json", 401, "no bearer token"),
    (b"POST /v1/certificates HTTP/1.1\r\nAuthorization: Bearer agent-n1\r\nContent-Length: 8\r\n\r\n"
     b"not json", 400, "not JSON"),
])
def test_bad_http_is_answered_and_counted(identity_dir: Path, tmp_path: Path, request_bytes: bytes,
                                          status: int, says: str) -> None:
    async def scenario(issuer: Running) -> None:
        answered, body = parse_reply(await raw(issuer.port, request_bytes))

        assert answered == status
        assert says in str(body["error"])
        result = "unauthenticated" if status == 401 else "bad_request"
        assert issuer.count(result) == 1
        assert sum(issuer.count(r) for r in ("issued", "bad_request", "unauthenticated", "error")) == 1
        await issuer.signer().sign(csr_for(CART), CART, 3600)  # and the next one is served

    serve(identity_dir, tmp_path, scenario)


def test_every_request_logs_one_line(identity_dir: Path, tmp_path: Path,
                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="agent.controlplane.issuer.server")

    async def scenario(issuer: Running) -> None:
        await issuer.signer().sign(csr_for(CART), CART, 3600)
        with pytest.raises(IssuerRefused):
            await issuer.signer().sign(csr_for(WEB), WEB, 3600)

    serve(identity_dir, tmp_path, scenario)
    lines = [r.getMessage() for r in caplog.records if r.name == "agent.controlplane.issuer.server"]
    assert len(lines) == 2
    assert "POST /v1/certificates -> 200 issued spiffe://cluster.local/ns/shop/sa/cart node=n1" in lines[0]
    assert "-> 403 not_on_node spiffe://cluster.local/ns/shop/sa/web node=n1" in lines[1]
    assert "agent-n1" not in " ".join(lines)  # the token is never logged


def test_what_a_client_sends_cannot_forge_log_lines(identity_dir: Path, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="agent.controlplane.issuer.server")

    async def scenario(issuer: Running) -> None:
        await raw(issuer.port, b"POST /v1/\x1b[31mfake\x08 HTTP/1.1\r\n\r\n")

    serve(identity_dir, tmp_path, scenario)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "agent.controlplane.issuer.server"]
    assert "POST /v1/?[31mfake? -> 404 bad_request" in line


# --- KubeSigner's own failures ------------------------------------------------------------------


def test_an_unreachable_issuer_is_an_issue_error(identity_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "token").write_text("t")
    signer = KubeSigner("https://127.0.0.1:1", ISSUER, tmp_path / "token",
                        (identity_dir / "trust-bundle.crt").read_bytes())

    with pytest.raises(IssueError, match=r"cannot reach the issuer at 127\.0\.0\.1:1\b"):
        asyncio.run(signer.sign(csr_for(CART), CART, 3600))


def test_a_silent_issuer_times_out(identity_dir: Path, tmp_path: Path) -> None:
    async def main() -> None:
        accepted: list[asyncio.StreamWriter] = []
        server = await asyncio.start_server(lambda _, writer: accepted.append(writer), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        (tmp_path / "token").write_text("t")
        signer = KubeSigner(f"https://127.0.0.1:{port}", ISSUER, tmp_path / "token",
                            (identity_dir / "trust-bundle.crt").read_bytes(), timeout=0.3)
        with pytest.raises(IssueError, match="did not answer within"):
            await signer.sign(csr_for(CART), CART, 3600)
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()

    asyncio.run(main())


def test_a_missing_token_file_is_an_issue_error(identity_dir: Path, tmp_path: Path) -> None:
    signer = KubeSigner("https://127.0.0.1:1", ISSUER, tmp_path / "absent",
                        (identity_dir / "trust-bundle.crt").read_bytes())

    with pytest.raises(IssueError, match="cannot read the service-account token"):
        asyncio.run(signer.sign(csr_for(CART), CART, 3600))


@pytest.mark.parametrize("url", ["http://issuer:8443", "https://", "issuer:8443", "https://h/p?q=1"])
def test_the_issuer_url_must_be_https(identity_dir: Path, url: str) -> None:
    with pytest.raises(ValueError, match="https://HOST"):
        KubeSigner(url, ISSUER, Path("t"), (identity_dir / "trust-bundle.crt").read_bytes())


def test_the_url_path_prefixes_the_endpoint(identity_dir: Path) -> None:
    bundle = (identity_dir / "trust-bundle.crt").read_bytes()

    signer = KubeSigner("https://pinion-issuer.pinion-system.svc:8443/base/", ISSUER, Path("t"), bundle)

    assert (signer.host, signer.port, signer.path) == ("pinion-issuer.pinion-system.svc", 8443,
                                                       "/base/v1/certificates")
    assert KubeSigner("https://[::1]", ISSUER, Path("t"), bundle).port == 443


# --- settings -----------------------------------------------------------------------------------


def test_settings_from_the_documented_defaults() -> None:
    settings = IssuerSettings.parse(
        identity_dir="/var/run/pinion/issuer", listen="0.0.0.0:8443", admin_addr="0.0.0.0:9990",
        kubeconfig=None, agent_service_account="pinion-system:pinion-agent", audience="pinion-issuer",
        bundle_configmap="pinion-system/pinion-trust-bundle", max_lifetime="86400")

    assert settings == IssuerSettings()


@pytest.mark.parametrize(("flag", "value", "says"), [
    ("listen", "localhost:8443", "--listen"), ("admin_addr", "0.0.0.0", "--admin-addr"),
    ("agent_service_account", "pinion-agent", "NAMESPACE:NAME"),
    ("bundle_configmap", "pinion-trust-bundle", "NAMESPACE/NAME"),
    ("max_lifetime", "forever", "--max-lifetime"), ("max_lifetime", "0", "--max-lifetime"),
    ("audience", "", "--audience"),
])
def test_bad_flags_say_which(flag: str, value: str, says: str) -> None:
    flags: dict[str, Any] = {"identity_dir": "/d", "listen": "0.0.0.0:8443", "admin_addr": "0.0.0.0:9990",
                             "kubeconfig": None, "agent_service_account": "a:b", "audience": "x",
                             "bundle_configmap": "a/b", "max_lifetime": "600"}

    with pytest.raises(ValueError, match=says):
        IssuerSettings.parse(**{**flags, flag: value})
