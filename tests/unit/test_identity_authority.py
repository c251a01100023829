"""LocalSigner, the standalone authority: it signs exactly the identity the caller vouches for,
and only when the CSR asks for that same identity in its own trust domain."""

from __future__ import annotations

import asyncio
import re
import subprocess
from pathlib import Path

import pytest

from agent.identity.authority import IssueError, LocalSigner
from agent.identity.crypto import cert_info, generate_key, make_csr
from agent.identity.files import init_identity_dir, split_pem_certificates
from agent.identity.spiffe import SpiffeId

T0 = 1_800_000_000.0
CART = SpiffeId("cluster.local", "shop", "cart")


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def identity_dir(tmp_path: Path) -> Path:
    init_identity_dir(tmp_path / "identity", clock=lambda: T0)
    return tmp_path / "identity"


def test_a_signed_chain_is_leaf_then_issuer_and_verifies(identity_dir: Path, tmp_path: Path) -> None:
    clock = Clock(T0 + 100)
    signer = LocalSigner.from_dir(identity_dir, clock=clock)

    issued = asyncio.run(signer.sign(make_csr(generate_key(), str(CART)), CART, 86400))

    leaf, issuer = split_pem_certificates(issued.chain_pem)
    assert issuer == (identity_dir / "issuer.crt").read_bytes()
    assert cert_info(leaf).uri_sans == (str(CART),)
    assert (issued.not_before, issued.not_after) == (T0 + 100 - 60, T0 + 100 + 86400)  # backdated a minute
    (tmp_path / "chain.pem").write_bytes(issued.chain_pem)
    (tmp_path / "leaf.pem").write_bytes(leaf)
    verified = subprocess.run(
        ["openssl", "verify", "-x509_strict", "-attime", str(int(T0 + 200)), "-CAfile",
         str(identity_dir / "trust-bundle.crt"), "-untrusted", str(tmp_path / "chain.pem"),
         str(tmp_path / "leaf.pem")], capture_output=True, text=True, timeout=20)
    assert verified.returncode == 0, verified.stderr


def test_short_lifetimes_are_backdated_by_a_tenth_at_most(identity_dir: Path) -> None:
    signer = LocalSigner.from_dir(identity_dir, clock=Clock(T0 + 100))

    issued = signer.sign_now(make_csr(generate_key(), str(CART)), CART, 20)

    assert (issued.not_before, issued.not_after) == (T0 + 98, T0 + 120)


def test_a_leaf_never_outlives_its_issuer(identity_dir: Path) -> None:
    issuer_expiry = cert_info((identity_dir / "issuer.crt").read_bytes()).not_after
    signer = LocalSigner.from_dir(identity_dir, clock=Clock(issuer_expiry - 3600))

    issued = signer.sign_now(make_csr(generate_key(), str(CART)), CART, 86400)

    assert issued.not_after == issuer_expiry == signer.issuer_expires


def test_an_expired_issuer_signs_nothing(identity_dir: Path) -> None:
    signer = LocalSigner.from_dir(identity_dir, clock=Clock(T0 + 2 * 365 * 86400))

    with pytest.raises(IssueError, match="issuer certificate expired"):
        signer.sign_now(make_csr(generate_key(), str(CART)), CART, 86400)


def test_a_csr_asking_for_another_identity_is_refused(identity_dir: Path) -> None:
    signer = LocalSigner.from_dir(identity_dir, clock=Clock(T0))
    admin_csr = make_csr(generate_key(), "spiffe://cluster.local/ns/kube-system/sa/admin")

    with pytest.raises(IssueError, match=re.escape(
            "CSR asks for spiffe://cluster.local/ns/kube-system/sa/admin, "
            "but the caller is spiffe://cluster.local/ns/shop/sa/cart")):
        signer.sign_now(admin_csr, CART, 86400)


def test_an_identity_in_another_trust_domain_is_refused(identity_dir: Path) -> None:
    signer = LocalSigner.from_dir(identity_dir, clock=Clock(T0))
    foreign = SpiffeId("other.org", "shop", "cart")

    with pytest.raises(IssueError, match=r"outside this issuer's trust domain cluster\.local"):
        signer.sign_now(make_csr(generate_key(), str(foreign)), foreign, 86400)


def test_a_broken_csr_or_lifetime_is_refused(identity_dir: Path) -> None:
    signer = LocalSigner.from_dir(identity_dir, clock=Clock(T0))

    with pytest.raises(IssueError, match="CSR rejected"):
        signer.sign_now(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                        CART, 86400)
    with pytest.raises(IssueError, match="lifetime must be positive"):
        signer.sign_now(make_csr(generate_key(), str(CART)), CART, 0)


def test_a_directory_whose_issuer_key_does_not_match_is_refused(identity_dir: Path, tmp_path: Path) -> None:
    init_identity_dir(tmp_path / "other")
    (identity_dir / "issuer.key").write_bytes((tmp_path / "other" / "issuer.key").read_bytes())

    with pytest.raises(IssueError, match="not a CA certificate for the issuer key"):
        LocalSigner.from_dir(identity_dir)
