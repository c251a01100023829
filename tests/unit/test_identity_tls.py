"""mTLS between pods, over a real loopback socket pair: TLS 1.3 with the suite we ordered, both
certificates checked, identities read back as SPIFFE IDs; strangers and expired certificates fail."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.identity.authority import LocalSigner
from agent.identity.credentials import Credentials
from agent.identity.crypto import generate_key, issue, load_private_key, make_csr
from agent.identity.files import init_identity_dir
from agent.identity.spiffe import SpiffeId
from agent.identity.store import IdentityManager
from agent.identity.tls import (
    AES_FIRST,
    CHACHA_FIRST,
    IdentityError,
    choose_suites,
    load_credentials,
    make_client_context,
    make_server_context,
    verify_peer,
)

CART = SpiffeId("cluster.local", "shop", "cart")
WEB = SpiffeId("cluster.local", "shop", "web")
X86_AES = "processor\t: 0\nflags\t\t: fpu vme sse2 aes avx\n"
X86_NO_AES = "processor\t: 0\nflags\t\t: fpu vme sse2 avx\n"
PI5 = "processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32\n"
PI4 = "processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"


# --- a real handshake ---------------------------------------------------------------------------


@dataclass
class Side:
    cipher: str | None = None
    peer: SpiffeId | IdentityError | None = None
    error: Exception | None = None
    has_ticket: bool = False


def _run_side(context: ssl.SSLContext, sock: socket.socket, server_side: bool, side: Side) -> None:
    sock.settimeout(5)
    try:
        with context.wrap_socket(sock, server_side=server_side) as tls:
            if server_side:
                tls.sendall(b"hello")
            elif tls.recv(5) != b"hello":  # also where a server's rejection (an alert) shows up
                raise EOFError("the server closed the connection")
            side.cipher = tls.cipher()[0]  # type: ignore[index]
            try:
                side.peer = verify_peer(tls, "cluster.local")
            except IdentityError as exc:
                side.peer = exc
            side.has_ticket = bool(tls.session and tls.session.has_ticket)
    except (ssl.SSLError, OSError, EOFError) as exc:
        side.error = exc
    finally:
        sock.close()


def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> tuple[Side, Side]:
    """Connect a client context to a server context over socketpair(); what each side saw."""
    server_socket, client_socket = socket.socketpair()
    server_side, client_side = Side(), Side()
    thread = threading.Thread(target=_run_side, args=(server, server_socket, True, server_side))
    thread.start()
    _run_side(client, client_socket, False, client_side)
    thread.join(10)
    assert not thread.is_alive()
    return server_side, client_side


# --- fixtures: two independent identity directories ---------------------------------------------


@pytest.fixture(scope="module")
def dir_a(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("a")
    init_identity_dir(path)
    return path


@pytest.fixture(scope="module")
def dir_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("b")
    init_identity_dir(path)
    return path


def manager_for(directory: Path, suites: str = AES_FIRST, bundle: bytes | None = None) -> IdentityManager:
    bundle = bundle if bundle is not None else (directory / "trust-bundle.crt").read_bytes()
    return IdentityManager(LocalSigner.from_dir(directory), bundle, "cluster.local", suites)


def with_pods(manager: IdentityManager, **pods: SpiffeId) -> IdentityManager:
    async def ensure_all() -> None:
        for pod_key, identity in pods.items():
            await manager.ensure(pod_key, identity)

    asyncio.run(ensure_all())
    return manager


# --- mTLS between pods --------------------------------------------------------------------------


def test_two_pods_of_one_mesh_complete_mtls_and_see_each_others_identity(dir_a: Path) -> None:
    manager = with_pods(manager_for(dir_a), cart=CART, web=WEB)

    server, client = handshake(manager.server_context("web"), manager.client_context("cart"))

    assert server.error is None and client.error is None
    assert server.peer == CART  # the server knows who called
    assert client.peer == WEB  # and the client knows whom it reached


def test_a_client_from_another_trust_anchor_is_refused(dir_a: Path, dir_b: Path) -> None:
    """The stranger trusts our anchor (so it would talk to us), but we do not trust its anchor."""
    both_anchors = (dir_a / "trust-bundle.crt").read_bytes() + (dir_b / "trust-bundle.crt").read_bytes()
    stranger = with_pods(manager_for(dir_b, bundle=both_anchors), cart=CART)
    ours = with_pods(manager_for(dir_a), web=WEB)

    server, client = handshake(ours.server_context("web"), stranger.client_context("cart"))

    assert isinstance(server.error, ssl.SSLCertVerificationError)
    assert "unable to get local issuer certificate" in str(server.error)
    assert client.error is not None and client.peer is None


def test_a_server_from_another_trust_anchor_is_refused(dir_a: Path, dir_b: Path) -> None:
    stranger = with_pods(manager_for(dir_b), web=WEB)
    ours = with_pods(manager_for(dir_a), cart=CART)

    server, client = handshake(stranger.server_context("web"), ours.client_context("cart"))

    assert isinstance(client.error, ssl.SSLCertVerificationError)
    assert server.error is not None and server.peer is None


def _expired_credentials(directory: Path, identity: SpiffeId) -> Credentials:
    key = generate_key()
    issuer = (directory / "issuer.crt").read_bytes()
    now = time.time()
    leaf = issue(make_csr(key, str(identity)), issuer_cert_pem=issuer,
                 issuer_key=load_private_key((directory / "issuer.key").read_bytes()),
                 spiffe_id=str(identity), not_before=now - 7200, not_after=now - 3600)
    return Credentials(identity, key, leaf + issuer, now - 7200, now - 3600)


def test_an_expired_server_certificate_fails_the_handshake(dir_a: Path) -> None:
    bundle = (dir_a / "trust-bundle.crt").read_bytes()
    expired = make_server_context(_expired_credentials(dir_a, WEB), bundle, AES_FIRST)
    client = with_pods(manager_for(dir_a), cart=CART).client_context("cart")

    server_side, client_side = handshake(expired, client)

    assert isinstance(client_side.error, ssl.SSLCertVerificationError)
    assert "certificate has expired" in str(client_side.error)
    assert server_side.peer is None


def test_an_expired_client_certificate_fails_the_handshake(dir_a: Path) -> None:
    bundle = (dir_a / "trust-bundle.crt").read_bytes()
    expired = make_client_context(_expired_credentials(dir_a, CART), bundle, AES_FIRST)
    server = with_pods(manager_for(dir_a), web=WEB).server_context("web")

    server_side, client_side = handshake(server, expired)

    assert isinstance(server_side.error, ssl.SSLCertVerificationError)
    assert "certificate has expired" in str(server_side.error)
    assert client_side.peer is None


# --- cipher suites ------------------------------------------------------------------------------


@pytest.mark.parametrize(("server_suites", "client_suites", "negotiated"), [
    (CHACHA_FIRST, AES_FIRST, "TLS_CHACHA20_POLY1305_SHA256"),  # the server's order decides...
    (AES_FIRST, AES_FIRST, "TLS_AES_128_GCM_SHA256"),
    (AES_FIRST, CHACHA_FIRST, "TLS_CHACHA20_POLY1305_SHA256"),  # ...except that ChaCha-first clients get it
    ("TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256", AES_FIRST, "TLS_AES_256_GCM_SHA384"),
])
def test_the_handshake_uses_the_preferred_suite(dir_a: Path, server_suites: str, client_suites: str,
                                                 negotiated: str) -> None:
    server = with_pods(manager_for(dir_a, server_suites), web=WEB)
    client = with_pods(manager_for(dir_a, client_suites), cart=CART)

    server_side, client_side = handshake(server.server_context("web"), client.client_context("cart"))

    assert server_side.cipher == client_side.cipher == negotiated


def test_contexts_are_tls13_only_with_certificates_required_and_suites_in_order(dir_a: Path) -> None:
    manager = with_pods(manager_for(dir_a, CHACHA_FIRST), web=WEB)

    for context in (manager.server_context("web"), manager.client_context("web")):
        assert context.minimum_version == context.maximum_version == ssl.TLSVersion.TLSv1_3
        assert context.verify_mode == ssl.CERT_REQUIRED and not context.check_hostname
        tls13 = [cipher["name"] for cipher in context.get_ciphers() if cipher["protocol"] == "TLSv1.3"]
        assert tls13 == CHACHA_FIRST.split(":")


def test_servers_issue_no_session_tickets(dir_a: Path) -> None:
    manager = with_pods(manager_for(dir_a), cart=CART, web=WEB)
    with_tickets = manager_for(dir_a)
    with_pods(with_tickets, web=WEB)
    control = with_tickets.server_context("web")
    control.num_tickets = 2  # what Python would do by default

    assert handshake(control, manager.client_context("cart"))[1].has_ticket  # the check can see tickets
    assert not handshake(manager.server_context("web"), manager.client_context("cart"))[1].has_ticket


@pytest.mark.parametrize(("cpuinfo", "suites", "why"), [
    (X86_AES, AES_FIRST, "has AES instructions"),
    (PI5, AES_FIRST, "has AES instructions"),
    (X86_NO_AES, CHACHA_FIRST, "no AES instructions"),
    (PI4, CHACHA_FIRST, "no AES instructions"),
    ("", AES_FIRST, "unknown"),
])
def test_suites_follow_the_cpu(cpuinfo: str, suites: str, why: str) -> None:
    chosen, reason = choose_suites(None, cpuinfo)

    assert chosen == suites
    assert why in reason


def test_a_configured_suite_order_wins_over_the_cpu() -> None:
    assert choose_suites("chacha20", X86_AES)[0] == CHACHA_FIRST
    assert choose_suites("AES", PI4)[0] == AES_FIRST
    raw = "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
    assert choose_suites(raw, PI4) == (raw, f"TLS_AES_256_GCM_SHA384 first: configured ({raw})")
    with pytest.raises(ValueError, match="unknown cipher-suite setting"):
        choose_suites("ECDHE-RSA-AES128-GCM-SHA256", PI4)


def test_an_unknown_suite_is_refused_when_building_a_context(dir_a: Path) -> None:
    manager = with_pods(manager_for(dir_a, "TLS_AES_128_GCM_SHA256:TLS_BOGUS"), web=WEB)

    with pytest.raises(ValueError, match=r"not a list of TLS 1\.3 suites"):
        manager.server_context("web")


# --- credentials in memory ----------------------------------------------------------------------


def test_loading_credentials_leaves_no_file_and_no_descriptor(dir_a: Path) -> None:
    credentials = with_pods(manager_for(dir_a), web=WEB).get("web")
    assert credentials is not None
    descriptors = set(os.listdir("/proc/self/fd"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)

    load_credentials(context, credentials.current.chain_pem, credentials.current.key.private_pem())

    assert set(os.listdir("/proc/self/fd")) == descriptors
    with pytest.raises(ssl.SSLError):  # a mismatched key is caught by OpenSSL, not silently used
        load_credentials(context, credentials.current.chain_pem, generate_key().private_pem())


# --- the peer's identity ------------------------------------------------------------------------


class PeerWith:
    """Stands in for an SSLObject whose verified peer certificate has these subjectAltNames."""

    def __init__(self, *alt_names: tuple[str, str]) -> None:
        self._certificate: dict[str, Any] = {"subject": (), "subjectAltName": alt_names} if alt_names else {}

    def getpeercert(self) -> dict[str, Any]:
        return self._certificate


def reason(peer: PeerWith, **kwargs: Any) -> str:
    with pytest.raises(IdentityError) as caught:
        verify_peer(peer, "cluster.local", **kwargs)  # type: ignore[arg-type]
    return caught.value.reason


def test_verify_peer_accepts_the_expected_identity() -> None:
    peer = PeerWith(("DNS", "web.shop"), ("URI", str(WEB)))

    assert verify_peer(peer, "cluster.local", expected=WEB, allowed=frozenset({WEB, CART})) == WEB  # type: ignore[arg-type]


def test_verify_peer_names_why_it_refused() -> None:
    assert reason(PeerWith(("URI", "spiffe://evil.org/ns/shop/sa/web"))) == "wrong_trust_domain"
    assert reason(PeerWith(("URI", str(WEB))), expected=CART) == "unexpected_identity"
    assert reason(PeerWith(("URI", str(WEB))), allowed=frozenset({CART})) == "not_allowed"
    assert reason(PeerWith(("DNS", "web.shop"))) == "no_spiffe_id"
    assert reason(PeerWith()) == "no_spiffe_id"
    assert reason(PeerWith(("URI", str(WEB)), ("URI", str(CART)))) == "no_spiffe_id"
    assert reason(PeerWith(("URI", "spiffe://cluster.local/web"))) == "no_spiffe_id"
