"""Keys, CSRs and certificates made through libcrypto, checked by the openssl CLI where it matters:
the chain verifies (RFC 5280 strict), the URI SAN is the one the caller chose, nothing leaks."""

from __future__ import annotations

import base64
import ctypes
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.identity.crypto import (
    CryptoError,
    PrivateKey,
    cert_info,
    csr_info,
    generate_key,
    issue,
    issue_intermediate,
    key_matches,
    load_private_key,
    make_csr,
    self_signed_ca,
    signed_by,
)

CART = "spiffe://cluster.local/ns/shop/sa/cart"
NOW = float(int(time.time()))
DAY = 86400.0


@dataclass
class Authority:
    anchor_key: PrivateKey
    anchor: bytes
    issuer_key: PrivateKey
    issuer: bytes


@pytest.fixture(scope="module")
def authority() -> Authority:
    anchor_key, issuer_key = generate_key(), generate_key()
    anchor = self_signed_ca(anchor_key, "root.pinion.cluster.local", NOW - 60, NOW + 3650 * DAY,
                            "cluster.local")
    issuer = issue_intermediate(issuer_key, issuer_cert_pem=anchor, issuer_key=anchor_key,
                                common_name="identity.pinion.cluster.local", not_before=NOW - 60,
                                not_after=NOW + 365 * DAY, trust_domain="cluster.local")
    return Authority(anchor_key, anchor, issuer_key, issuer)


def leaf_for(authority: Authority, spiffe_id: str = CART, key: PrivateKey | None = None,
             csr_id: str | None = None, not_before: float = NOW, not_after: float = NOW + DAY,
             serial: int | None = None) -> bytes:
    csr = make_csr(key or generate_key(), csr_id or spiffe_id)
    return issue(csr, issuer_cert_pem=authority.issuer, issuer_key=authority.issuer_key, spiffe_id=spiffe_id,
                 not_before=not_before, not_after=not_after, serial=serial)


def openssl(*args: str | Path, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *map(str, args)], input=stdin.decode() if stdin else None,
                          capture_output=True, text=True, timeout=20)


def write(directory: Path, **files: bytes) -> dict[str, Path]:
    paths = {}
    for name, data in files.items():
        paths[name] = directory / f"{name}.pem"
        paths[name].write_bytes(data)
    return paths


# --- keys ---------------------------------------------------------------------------------------


def test_a_generated_key_is_p256_and_survives_a_pem_round_trip(tmp_path: Path) -> None:
    key = generate_key()
    pem = key.private_pem()

    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")  # PKCS#8, unencrypted
    assert load_private_key(pem).public_der() == key.public_der()
    assert generate_key().public_der() != key.public_der()
    text = openssl("pkey", "-noout", "-text", stdin=pem).stdout
    assert "ASN1 OID: prime256v1" in text


def test_keys_other_than_p256_are_refused() -> None:
    rsa = openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024").stdout.encode()
    p384 = openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384").stdout.encode()

    for pem in (rsa, p384):
        with pytest.raises(CryptoError, match="not an ECDSA P-256 key"):
            load_private_key(pem)
    with pytest.raises(CryptoError, match="PEM_read_bio_PrivateKey"):
        load_private_key(b"-----BEGIN PRIVATE KEY-----\nnonsense\n-----END PRIVATE KEY-----\n")


def test_a_closed_key_cannot_be_used() -> None:
    key = generate_key()
    key.close()
    key.close()  # idempotent

    with pytest.raises(CryptoError, match="after close"):
        key.private_pem()


# --- CSRs ---------------------------------------------------------------------------------------


def test_a_csr_carries_the_spiffe_id_and_the_public_key() -> None:
    key = generate_key()
    csr = make_csr(key, CART)

    info = csr_info(csr)
    assert info.uri_sans == (CART,)
    assert info.public_key_der == key.public_der()
    text = openssl("req", "-verify", "-noout", "-text", stdin=csr)
    assert text.returncode == 0, text.stderr
    assert f"URI:{CART}" in text.stdout


def test_a_csr_edited_after_signing_is_rejected() -> None:
    """Someone rewrites the requested SAN (cart -> cars): the self-signature no longer verifies."""
    csr = make_csr(generate_key(), CART)
    der = base64.b64decode(b"".join(csr.splitlines()[1:-1]))
    assert der.count(b"/sa/cart") == 1
    edited = der.replace(b"/sa/cart", b"/sa/cars")
    pem = b"-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(edited) + \
        b"-----END CERTIFICATE REQUEST-----\n"

    with pytest.raises(CryptoError, match="self-signature"):
        csr_info(pem)


def test_a_csr_for_a_non_spiffe_uri_is_not_made() -> None:
    for uri in ("https://example.com/x", "spiffe://td/ns/a,URI:spiffe://td/ns/b", "spiffe://td/@section"):
        with pytest.raises(CryptoError, match="not a SPIFFE ID"):
            make_csr(generate_key(), uri)


# --- leaf certificates --------------------------------------------------------------------------


def test_a_leaf_is_an_x509_svid_that_chains_to_the_anchor(authority: Authority, tmp_path: Path) -> None:
    leaf = leaf_for(authority)
    paths = write(tmp_path, anchor=authority.anchor, issuer=authority.issuer, leaf=leaf)

    verified = openssl("verify", "-x509_strict", "-CAfile", paths["anchor"], "-untrusted", paths["issuer"],
                       paths["leaf"])
    assert verified.returncode == 0, verified.stderr
    text = openssl("x509", "-noout", "-text", "-in", paths["leaf"]).stdout
    assert re.search(r"Subject Alternative Name: critical\s+URI:spiffe://cluster\.local/ns/shop/sa/cart\n",
                     text)
    assert re.search(r"Basic Constraints: critical\s+CA:FALSE", text)
    assert re.search(r"Key Usage: critical\s+Digital Signature\n", text)
    assert "TLS Web Server Authentication, TLS Web Client Authentication" in text
    assert "Subject Key Identifier" in text and "Authority Key Identifier" in text
    assert "Signature Algorithm: ecdsa-with-SHA256" in text
    assert re.search(r"Subject: *\n", text)  # empty subject, as X509-SVIDs may have


def test_cert_info_reads_back_what_was_issued(authority: Authority) -> None:
    leaf = leaf_for(authority, not_before=NOW - 10, not_after=NOW + 3600, serial=0xC0FFEE)

    info = cert_info(leaf)
    assert info.subject == ""
    assert info.issuer == "CN=identity.pinion.cluster.local"
    assert (info.serial, info.not_before, info.not_after) == (0xC0FFEE, NOW - 10, NOW + 3600)
    assert info.uri_sans == (CART,)
    assert info.is_ca is False


def test_the_caller_decides_the_identity_not_the_csr(authority: Authority) -> None:
    leaf = leaf_for(authority, spiffe_id="spiffe://cluster.local/ns/shop/sa/web",
                    csr_id="spiffe://cluster.local/ns/kube-system/sa/admin")

    assert cert_info(leaf).uri_sans == ("spiffe://cluster.local/ns/shop/sa/web",)


def test_the_leaf_holds_the_csr_key(authority: Authority) -> None:
    key, other = generate_key(), generate_key()
    leaf = leaf_for(authority, key=key)

    assert key_matches(leaf, key)
    assert not key_matches(leaf, other)


def test_signed_by_checks_the_signature_not_the_names(authority: Authority) -> None:
    impostor = self_signed_ca(generate_key(), "root.pinion.cluster.local", NOW - 60, NOW + DAY,
                              "cluster.local")

    assert signed_by(authority.issuer, authority.anchor)
    assert signed_by(leaf_for(authority), authority.issuer)
    assert not signed_by(authority.issuer, impostor)  # same subject name, another key
    assert not signed_by(leaf_for(authority), authority.anchor)


def test_serials_are_random_128_bit_and_positive(authority: Authority) -> None:
    serials = {cert_info(leaf_for(authority)).serial for _ in range(20)}

    assert len(serials) == 20
    assert all(0 < serial < 1 << 128 for serial in serials)
    assert max(serials).bit_length() > 100  # random, not a counter


def test_times_after_2049_round_trip_as_generalized_time(authority: Authority) -> None:
    after_2050 = 2_600_000_000.0  # 2052-05-22
    anchor = self_signed_ca(authority.anchor_key, "far", NOW, after_2050, "cluster.local")

    assert cert_info(anchor).not_after == after_2050


def test_issuing_refuses_a_key_that_is_not_the_issuers(authority: Authority) -> None:
    csr = make_csr(generate_key(), CART)

    with pytest.raises(CryptoError, match="does not belong to the issuer"):
        issue(csr, issuer_cert_pem=authority.issuer, issuer_key=authority.anchor_key, spiffe_id=CART,
              not_before=NOW, not_after=NOW + DAY)


def test_issuing_refuses_backwards_validity(authority: Authority) -> None:
    with pytest.raises(CryptoError, match="later than not_before"):
        leaf_for(authority, not_before=NOW, not_after=NOW)


# --- the anchor and the issuer ------------------------------------------------------------------


def test_anchor_and_issuer_have_linkerds_root_and_intermediate_shape(authority: Authority,
                                                                      tmp_path: Path) -> None:
    paths = write(tmp_path, anchor=authority.anchor, issuer=authority.issuer)
    anchor_text = openssl("x509", "-noout", "-text", "-in", paths["anchor"]).stdout
    issuer_text = openssl("x509", "-noout", "-text", "-in", paths["issuer"]).stdout

    assert re.search(r"Basic Constraints: critical\s+CA:TRUE, pathlen:1", anchor_text)
    assert re.search(r"Basic Constraints: critical\s+CA:TRUE, pathlen:0", issuer_text)
    for text in (anchor_text, issuer_text):
        assert re.search(r"Key Usage: critical\s+Certificate Sign, CRL Sign", text)
        assert "URI:spiffe://cluster.local\n" in text
    anchor, issuer = cert_info(authority.anchor), cert_info(authority.issuer)
    assert (anchor.subject, anchor.issuer, anchor.is_ca) == (
        "CN=root.pinion.cluster.local", "CN=root.pinion.cluster.local", True)
    assert (issuer.subject, issuer.issuer, issuer.is_ca) == (
        "CN=identity.pinion.cluster.local", "CN=root.pinion.cluster.local", True)
    verified = openssl("verify", "-x509_strict", "-CAfile", paths["anchor"], paths["issuer"])
    assert verified.returncode == 0, verified.stderr


def test_the_issuer_cannot_mint_another_ca(authority: Authority, tmp_path: Path) -> None:
    """pathlen:0 is enforced: a CA signed by the issuer does not verify."""
    rogue_key = generate_key()
    rogue = issue_intermediate(rogue_key, issuer_cert_pem=authority.issuer, issuer_key=authority.issuer_key,
                               common_name="rogue", not_before=NOW, not_after=NOW + DAY,
                               trust_domain="cluster.local")
    csr = make_csr(generate_key(), CART)
    leaf = issue(csr, issuer_cert_pem=rogue, issuer_key=rogue_key, spiffe_id=CART, not_before=NOW,
                 not_after=NOW + DAY)
    paths = write(tmp_path, anchor=authority.anchor, chain=authority.issuer + rogue, leaf=leaf)

    verified = openssl("verify", "-CAfile", paths["anchor"], "-untrusted", paths["chain"], paths["leaf"])
    assert verified.returncode != 0
    assert "path length constraint exceeded" in verified.stdout + verified.stderr


# --- no leaks -----------------------------------------------------------------------------------


def _vm_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]


def _malloc_in_use() -> int:
    """Bytes malloc has handed out and not had back (glibc): where OpenSSL's objects live."""
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _Mallinfo2
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def _issue_one(authority: Authority, count: int) -> None:
    """Key, CSR, leaf, read back; every 4th time every other entry point too (they are slower)."""
    everything = count % 4 == 0
    key = generate_key()
    csr = make_csr(key, CART)
    leaf = issue(csr, issuer_cert_pem=authority.issuer, issuer_key=authority.issuer_key, spiffe_id=CART,
                 not_before=NOW, not_after=NOW + DAY)
    assert cert_info(leaf).uri_sans == (CART,)
    if everything:
        assert csr_info(csr).uri_sans == (CART,) and key_matches(leaf, key)
        load_private_key(key.private_pem()).close()
    if count % 2:  # the other half are freed by the garbage collector (PrivateKey.__del__)
        key.close()


def test_issuing_2000_certificates_leaks_nothing(authority: Authority) -> None:
    for count in range(100):  # warm up: OpenSSL's lazily built tables, Python's free lists
        _issue_one(authority, count)
    rss, heap = _vm_rss_kib(), _malloc_in_use()

    for count in range(2000):
        _issue_one(authority, count)

    assert _vm_rss_kib() - rss < 256, "RSS grew by more than 256 KiB over 2000 certificates"
    # Sharper: one leaked BIGNUM or ASN1_TIME per certificate would add >= 48 KiB here.
    assert _malloc_in_use() - heap < 48 * 1024
