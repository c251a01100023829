"""Keys, CSRs and certificates for the mesh: ECDSA P-256 and X.509 through libcrypto via ctypes.

This replaces the `cryptography` package (+12 MB RSS) with the libcrypto Python's `ssl` has
already loaded. Everything here is bytes in, bytes out (PEM); OpenSSL objects live only inside
one call, except the private key, which PrivateKey owns and frees.
"""

from __future__ import annotations

import ctypes
import os
import re
import time
from contextlib import ExitStack
from dataclasses import dataclass

from agent.identity._libcrypto import (
    EXFLAG_CA,
    MBSTRING_UTF8,
    NID_AUTHORITY_KEY_ID,
    NID_BASIC_CONSTRAINTS,
    NID_EXT_KEY_USAGE,
    NID_KEY_USAGE,
    NID_SUBJECT_ALT_NAME,
    NID_SUBJECT_KEY_ID,
    X509_EXTENSION_FREE,
    XN_FLAG_RFC2253,
    CryptoError,
    Tm,
    asn1_string,
    bio_bytes,
    clean_errors,
    crypto,
    fail,
    ok,
    owned,
    ptr,
    read_bio,
    write_bio,
)

__all__ = [
    "CertInfo",
    "CryptoError",
    "CsrInfo",
    "PrivateKey",
    "cert_info",
    "csr_info",
    "generate_key",
    "issue",
    "issue_intermediate",
    "key_matches",
    "load_private_key",
    "make_csr",
    "self_signed_ca",
    "signed_by",
]

GEN_URI = 6
_X509_V3 = 2
_CSR_V1 = 0
# What may appear in a URI SAN we write: SPIFFE IDs only, and nothing the OpenSSL extension
# config syntax treats specially (',' separates values, '@' names a section).
_SAN_URI = re.compile(r"spiffe://[A-Za-z0-9._\-]+(/[A-Za-z0-9._\-]+)*")
_LEAF_EXTENSIONS = (
    (NID_BASIC_CONSTRAINTS, "critical,CA:FALSE"),
    (NID_KEY_USAGE, "critical,digitalSignature"),
    (NID_EXT_KEY_USAGE, "serverAuth,clientAuth"),
    (NID_SUBJECT_KEY_ID, "hash"),
    (NID_AUTHORITY_KEY_ID, "keyid:always"),
)


class PrivateKey:
    """An ECDSA P-256 private key held by OpenSSL (EVP_PKEY*); freed by close() or when collected."""

    __slots__ = ("_pkey",)

    def __init__(self, pkey: int) -> None:
        self._pkey: int | None = pkey

    @property
    def handle(self) -> int:
        if self._pkey is None:
            raise CryptoError("private key used after close()")
        return self._pkey

    def private_pem(self) -> bytes:
        """PKCS#8, unencrypted (for an in-memory file handed to `ssl`, never for disk in the agent)."""
        with clean_errors(), ExitStack() as stack:
            bio = write_bio(stack)
            ok(crypto.PEM_write_bio_PrivateKey(bio, self.handle, None, None, 0, None, None),
               "PEM_write_bio_PrivateKey")
            return bio_bytes(bio)

    def public_der(self) -> bytes:
        """SubjectPublicKeyInfo, DER."""
        return _public_der(self.handle)

    def close(self) -> None:
        pkey, self._pkey = self._pkey, None
        if pkey is not None:
            crypto.EVP_PKEY_free(pkey)

    def __enter__(self) -> PrivateKey:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class CsrInfo:
    uri_sans: tuple[str, ...]
    public_key_der: bytes


@dataclass(frozen=True, slots=True)
class CertInfo:
    subject: str
    issuer: str
    serial: int
    not_before: float
    not_after: float
    uri_sans: tuple[str, ...]
    is_ca: bool


def generate_key() -> PrivateKey:
    """A fresh ECDSA P-256 key."""
    with clean_errors(), ExitStack() as stack:
        ctx = owned(stack, crypto.EVP_PKEY_CTX_new_from_name(None, b"EC", None), crypto.EVP_PKEY_CTX_free,
                    "EVP_PKEY_CTX_new_from_name")
        ok(crypto.EVP_PKEY_keygen_init(ctx), "EVP_PKEY_keygen_init")
        ok(crypto.EVP_PKEY_CTX_set_group_name(ctx, b"P-256"), "EVP_PKEY_CTX_set_group_name")
        pkey = ctypes.c_void_p()
        ok(crypto.EVP_PKEY_generate(ctx, ctypes.byref(pkey)), "EVP_PKEY_generate")
        return PrivateKey(ptr(pkey.value, "EVP_PKEY_generate"))


def load_private_key(pem: bytes) -> PrivateKey:
    """Read a PEM private key (PKCS#8 or SEC1); only ECDSA P-256 is accepted."""
    with clean_errors(), ExitStack() as stack:
        bio = read_bio(stack, pem)
        pkey = crypto.PEM_read_bio_PrivateKey(bio, None, None, None)
        key = PrivateKey(ptr(pkey, "PEM_read_bio_PrivateKey"))
        try:
            _require_p256(key.handle, "private key")
        except CryptoError:
            key.close()
            raise
        return key


def key_matches(cert_pem: bytes, key: PrivateKey) -> bool:
    """Whether `key` is the private half of the first certificate in `cert_pem`."""
    with clean_errors(), ExitStack() as stack:
        matches: bool = crypto.X509_check_private_key(_read_cert(stack, cert_pem), key.handle) == 1
        return matches


def signed_by(cert_pem: bytes, issuer_cert_pem: bytes) -> bool:
    """Whether the first certificate in `cert_pem` carries a signature by `issuer_cert_pem`'s key
    (the signature only: no names, dates or extensions are checked)."""
    with clean_errors(), ExitStack() as stack:
        issuer_key = ptr(crypto.X509_get0_pubkey(_read_cert(stack, issuer_cert_pem)), "X509_get0_pubkey")
        verified: bool = crypto.X509_verify(_read_cert(stack, cert_pem), issuer_key) == 1
        return verified


def make_csr(key: PrivateKey, spiffe_id: str) -> bytes:
    """A PEM CSR with an empty subject, asking for `spiffe_id` as its only URI SAN."""
    _check_san_uri(spiffe_id)
    with clean_errors(), ExitStack() as stack:
        req = owned(stack, crypto.X509_REQ_new(), crypto.X509_REQ_free, "X509_REQ_new")
        ok(crypto.X509_REQ_set_version(req, _CSR_V1), "X509_REQ_set_version")
        ok(crypto.X509_REQ_set_pubkey(req, key.handle), "X509_REQ_set_pubkey")
        extensions = ptr(crypto.OPENSSL_sk_new_null(), "OPENSSL_sk_new_null")
        stack.callback(crypto.OPENSSL_sk_pop_free, extensions, X509_EXTENSION_FREE)
        san = _extension(None, NID_SUBJECT_ALT_NAME, f"critical,URI:{spiffe_id}")
        if crypto.OPENSSL_sk_push(extensions, san) <= 0:
            crypto.X509_EXTENSION_free(san)
            raise fail("OPENSSL_sk_push")
        ok(crypto.X509_REQ_add_extensions(req, extensions), "X509_REQ_add_extensions")
        ok(crypto.X509_REQ_sign(req, key.handle, crypto.EVP_sha256()), "X509_REQ_sign")
        bio = write_bio(stack)
        ok(crypto.PEM_write_bio_X509_REQ(bio, req), "PEM_write_bio_X509_REQ")
        return bio_bytes(bio)


def csr_info(csr_pem: bytes) -> CsrInfo:
    """What a CSR asks for, after checking its self-signature; its key must be ECDSA P-256."""
    with clean_errors(), ExitStack() as stack:
        req = _read_csr(stack, csr_pem)
        public_key = crypto.X509_REQ_get0_pubkey(req)
        return CsrInfo(_csr_uri_sans(stack, req), _public_der(public_key))


def issue(csr_pem: bytes, *, issuer_cert_pem: bytes, issuer_key: PrivateKey, spiffe_id: str,
          not_before: float, not_after: float, serial: int | None = None) -> bytes:
    """A leaf X509-SVID (PEM) for the CSR's key, naming exactly `spiffe_id` (not what the CSR asked).

    Empty subject, so the URI SAN is critical; CA:FALSE, digitalSignature, server+client auth.
    """
    _check_san_uri(spiffe_id)
    with clean_errors(), ExitStack() as stack:
        req = _read_csr(stack, csr_pem)
        issuer = _read_cert(stack, issuer_cert_pem)
        _require_issuer_key(issuer, issuer_key)
        cert = _new_cert(stack, crypto.X509_REQ_get0_pubkey(req), issuer, not_before, not_after, serial)
        extensions = [*_LEAF_EXTENSIONS, (NID_SUBJECT_ALT_NAME, f"critical,URI:{spiffe_id}")]
        return _sign(stack, cert, issuer, issuer_key, extensions)


def self_signed_ca(key: PrivateKey, common_name: str, not_before: float, not_after: float,
                   trust_domain: str) -> bytes:
    """A trust anchor (PEM): CN=common_name, CA:TRUE pathlen:1, URI SAN spiffe://<trust_domain>.

    The shape of Linkerd's `root.linkerd.cluster.local` (step's root-ca profile): the anchor
    signs issuers only, and issuers sign leaves only.
    """
    _check_san_uri(f"spiffe://{trust_domain}")
    with clean_errors(), ExitStack() as stack:
        cert = _new_cert(stack, key.handle, None, not_before, not_after, None, common_name)
        extensions = _ca_extensions("critical,CA:TRUE,pathlen:1", trust_domain, with_authority=False)
        return _sign(stack, cert, cert, key, extensions)


def issue_intermediate(key: PrivateKey, *, issuer_cert_pem: bytes, issuer_key: PrivateKey, common_name: str,
                       not_before: float, not_after: float, trust_domain: str) -> bytes:
    """An issuer certificate (PEM) for `key`'s public half: CA:TRUE pathlen:0, signed by the anchor.

    The shape of Linkerd's `identity.linkerd.cluster.local` (step's intermediate-ca profile).
    """
    _check_san_uri(f"spiffe://{trust_domain}")
    with clean_errors(), ExitStack() as stack:
        issuer = _read_cert(stack, issuer_cert_pem)
        _require_issuer_key(issuer, issuer_key)
        cert = _new_cert(stack, key.handle, issuer, not_before, not_after, None, common_name)
        extensions = _ca_extensions("critical,CA:TRUE,pathlen:0", trust_domain, with_authority=True)
        return _sign(stack, cert, issuer, issuer_key, extensions)


def cert_info(pem: bytes) -> CertInfo:
    """The fields the mesh cares about, from the first certificate in `pem`."""
    with clean_errors(), ExitStack() as stack:
        cert = _read_cert(stack, pem)
        return CertInfo(
            subject=_name(stack, crypto.X509_get_subject_name(cert)),
            issuer=_name(stack, crypto.X509_get_issuer_name(cert)),
            serial=_serial(stack, cert),
            not_before=_time(crypto.X509_getm_notBefore(cert)),
            not_after=_time(crypto.X509_getm_notAfter(cert)),
            uri_sans=_cert_uri_sans(stack, cert),
            is_ca=bool(crypto.X509_get_extension_flags(cert) & EXFLAG_CA),
        )


# --- building blocks -------------------------------------------------------------------------


def _check_san_uri(uri: str) -> None:
    if not _SAN_URI.fullmatch(uri):
        raise CryptoError(f"not a SPIFFE ID this CA will write: {uri!r}")


def _require_p256(pkey: int, what: str) -> None:
    name = ctypes.create_string_buffer(64)
    is_p256 = (crypto.EVP_PKEY_is_a(pkey, b"EC") == 1
               and crypto.EVP_PKEY_get_group_name(pkey, name, len(name), None) == 1
               and name.value in (b"prime256v1", b"P-256"))
    crypto.ERR_clear_error()
    if not is_p256:
        raise CryptoError(f"{what} is not an ECDSA P-256 key")


def _require_issuer_key(issuer: int, issuer_key: PrivateKey) -> None:
    if crypto.X509_check_private_key(issuer, issuer_key.handle) != 1:
        crypto.ERR_clear_error()
        raise CryptoError("the issuer key does not belong to the issuer certificate")


def _public_der(pkey: int) -> bytes:
    length = crypto.i2d_PUBKEY(pkey, None)
    if length <= 0:
        raise fail("i2d_PUBKEY")
    buffer = ctypes.create_string_buffer(length)
    cursor = ctypes.c_void_p(ctypes.addressof(buffer))  # i2d advances it past what it wrote
    ok(crypto.i2d_PUBKEY(pkey, ctypes.byref(cursor)), "i2d_PUBKEY")
    return buffer.raw


def _read_cert(stack: ExitStack, pem: bytes) -> int:
    bio = read_bio(stack, pem)
    cert = crypto.PEM_read_bio_X509(bio, None, None, None)
    return owned(stack, cert, crypto.X509_free, "PEM_read_bio_X509")


def _read_csr(stack: ExitStack, pem: bytes) -> int:
    """A parsed CSR whose self-signature verifies and whose key is P-256."""
    bio = read_bio(stack, pem)
    req = owned(stack, crypto.PEM_read_bio_X509_REQ(bio, None, None, None), crypto.X509_REQ_free,
                "PEM_read_bio_X509_REQ")
    public_key = ptr(crypto.X509_REQ_get0_pubkey(req), "X509_REQ_get0_pubkey")
    if crypto.X509_REQ_verify(req, public_key) != 1:
        raise fail("CSR self-signature does not verify")
    _require_p256(public_key, "CSR public key")
    return req


def _new_cert(stack: ExitStack, public_key: int, issuer: int | None, not_before: float, not_after: float,
              serial: int | None, common_name: str | None = None) -> int:
    """An unsigned v3 certificate: key, serial, validity, subject; issuer None = self-issued."""
    if not_after <= not_before:
        raise CryptoError(f"not_after ({not_after}) must be later than not_before ({not_before})")
    cert = owned(stack, crypto.X509_new(), crypto.X509_free, "X509_new")
    ok(crypto.X509_set_version(cert, _X509_V3), "X509_set_version")
    _set_serial(stack, cert, serial if serial is not None else _random_serial())
    ok(crypto.X509_set_pubkey(cert, public_key), "X509_set_pubkey")
    _set_time(crypto.X509_getm_notBefore(cert), not_before)
    _set_time(crypto.X509_getm_notAfter(cert), not_after)
    if common_name is not None:
        subject = owned(stack, crypto.X509_NAME_new(), crypto.X509_NAME_free, "X509_NAME_new")
        value = common_name.encode()
        ok(crypto.X509_NAME_add_entry_by_txt(subject, b"CN", MBSTRING_UTF8, value, len(value), -1, 0),
           "X509_NAME_add_entry_by_txt")
        ok(crypto.X509_set_subject_name(cert, subject), "X509_set_subject_name")
    issuer_name = crypto.X509_get_subject_name(issuer if issuer is not None else cert)
    ok(crypto.X509_set_issuer_name(cert, issuer_name), "X509_set_issuer_name")
    return cert


def _ca_extensions(basic_constraints: str, trust_domain: str, *,
                   with_authority: bool) -> list[tuple[int, str]]:
    extensions = [
        (NID_BASIC_CONSTRAINTS, basic_constraints),
        (NID_KEY_USAGE, "critical,keyCertSign,cRLSign"),
        (NID_SUBJECT_KEY_ID, "hash"),
        (NID_SUBJECT_ALT_NAME, f"URI:spiffe://{trust_domain}"),
    ]
    if with_authority:
        extensions.append((NID_AUTHORITY_KEY_ID, "keyid:always"))
    return extensions


def _sign(stack: ExitStack, cert: int, issuer: int, issuer_key: PrivateKey,
          extensions: list[tuple[int, str]]) -> bytes:
    """Add extensions (in order: the subject key id must precede the authority key id), sign, PEM."""
    ctx = ctypes.create_string_buffer(256)  # X509V3_CTX is 8 words in 3.0; room to spare
    crypto.X509V3_set_ctx(ctx, issuer, cert, None, None, 0)
    for nid, value in extensions:
        extension = _extension(ctx, nid, value)
        try:
            ok(crypto.X509_add_ext(cert, extension, -1), "X509_add_ext")
        finally:
            crypto.X509_EXTENSION_free(extension)
    ok(crypto.X509_sign(cert, issuer_key.handle, crypto.EVP_sha256()), "X509_sign")
    bio = write_bio(stack)
    ok(crypto.PEM_write_bio_X509(bio, cert), "PEM_write_bio_X509")
    return bio_bytes(bio)


def _extension(ctx: ctypes.Array[ctypes.c_char] | None, nid: int, value: str) -> int:
    """A new X509_EXTENSION* from OpenSSL's config syntax; the caller frees it."""
    return ptr(crypto.X509V3_EXT_nconf_nid(None, ctx, nid, value.encode()), f"extension {value!r}")


def _random_serial() -> int:
    """128 random bits, top bit clear so the DER INTEGER stays positive in 16 bytes; never 0."""
    return (int.from_bytes(os.urandom(16), "big") >> 1) | 1


def _set_serial(stack: ExitStack, cert: int, serial: int) -> None:
    if not 0 < serial < 1 << 159:
        raise CryptoError("serial must be positive and at most 20 octets")
    raw = serial.to_bytes((serial.bit_length() + 7) // 8, "big")
    bn = owned(stack, crypto.BN_bin2bn(raw, len(raw), None), crypto.BN_free, "BN_bin2bn")
    ptr(crypto.BN_to_ASN1_INTEGER(bn, crypto.X509_get_serialNumber(cert)), "BN_to_ASN1_INTEGER")


def _set_time(asn1_time: int, when: float) -> None:
    """Set from a string, not a time_t: 32-bit Raspberry Pi OS builds disagree on time_t's width."""
    text = time.strftime("%Y%m%d%H%M%SZ", time.gmtime(int(when)))
    ok(crypto.ASN1_TIME_set_string_X509(asn1_time, text.encode()), f"ASN1_TIME_set_string_X509 {text}")


def _time(asn1_time: int) -> float:
    tm = Tm()
    ok(crypto.ASN1_TIME_to_tm(asn1_time, ctypes.byref(tm)), "ASN1_TIME_to_tm")
    days = _days_since_epoch(tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday)
    return float(days * 86400 + tm.tm_hour * 3600 + tm.tm_min * 60 + tm.tm_sec)


def _days_since_epoch(year: int, month: int, day: int) -> int:
    """Days from 1970-01-01 to a proleptic Gregorian date (calendar.timegm without its ~0.5 MB import)."""
    year -= month <= 2
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146097 + day_of_era - 719468


def _serial(stack: ExitStack, cert: int) -> int:
    bn = owned(stack, crypto.ASN1_INTEGER_to_BN(crypto.X509_get0_serialNumber(cert), None), crypto.BN_free,
               "ASN1_INTEGER_to_BN")
    buffer = ctypes.create_string_buffer((crypto.BN_num_bits(bn) + 7) // 8)
    crypto.BN_bn2bin(bn, buffer)
    return int.from_bytes(buffer.raw, "big")


def _name(stack: ExitStack, name: int) -> str:
    bio = write_bio(stack)
    if crypto.X509_NAME_print_ex(bio, name, 0, XN_FLAG_RFC2253) < 0:
        raise fail("X509_NAME_print_ex")
    return bio_bytes(bio).decode(errors="replace")


def _csr_uri_sans(stack: ExitStack, req: int) -> tuple[str, ...]:
    extensions = crypto.X509_REQ_get_extensions(req)
    if not extensions:
        crypto.ERR_clear_error()
        return ()
    stack.callback(crypto.OPENSSL_sk_pop_free, extensions, X509_EXTENSION_FREE)
    critical = ctypes.c_int()
    names = crypto.X509V3_get_d2i(extensions, NID_SUBJECT_ALT_NAME, ctypes.byref(critical), None)
    return _uri_names(stack, names, critical.value)


def _cert_uri_sans(stack: ExitStack, cert: int) -> tuple[str, ...]:
    critical = ctypes.c_int()
    names = crypto.X509_get_ext_d2i(cert, NID_SUBJECT_ALT_NAME, ctypes.byref(critical), None)
    return _uri_names(stack, names, critical.value)


def _uri_names(stack: ExitStack, names: int | None, critical: int) -> tuple[str, ...]:
    """URIs from a GENERAL_NAMES* (freed here); `critical` -1 = absent, -2 = repeated (refused)."""
    if not names:
        if critical == -2:
            raise CryptoError("more than one subjectAltName extension")
        if critical != -1:
            raise fail("subjectAltName does not parse")
        return ()
    stack.callback(crypto.GENERAL_NAMES_free, names)
    uris = []
    kind = ctypes.c_int()
    for index in range(crypto.OPENSSL_sk_num(names)):
        value = crypto.GENERAL_NAME_get0_value(crypto.OPENSSL_sk_value(names, index), ctypes.byref(kind))
        if kind.value == GEN_URI and value:
            uris.append(asn1_string(value).decode("ascii", errors="replace"))
    return tuple(uris)
