"""mTLS for the mesh tunnel: SSL contexts from in-memory credentials, suite order, peer identity.

TLS 1.3 only, a certificate required of both sides, no hostname check: a peer is who the
SPIFFE ID in its certificate says, checked by `verify_peer`. Private keys reach OpenSSL through
an anonymous memory file (memfd), never through the filesystem.
"""

from __future__ import annotations

import ctypes
import os
import ssl
import sys
from pathlib import Path
from typing import cast

from agent.identity._libcrypto import CryptoError, libssl, openssl_errors
from agent.identity.credentials import Credentials
from agent.identity.spiffe import SpiffeId

CHACHA_FIRST = "TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384"
AES_FIRST = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
TLS13_SUITES = frozenset({"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256",
                          "TLS_AES_128_CCM_SHA256", "TLS_AES_128_CCM_8_SHA256"})
# A server honours the client's ChaCha20 preference even when it prefers AES itself, so a Pi 4
# (no AES instructions) talking to a Pi 5 still gets the cipher that is fast on both.
OP_PRIORITIZE_CHACHA = 0x00200000
_OVERRIDES = {"chacha20": CHACHA_FIRST, "chacha": CHACHA_FIRST, "aes": AES_FIRST, "aes-gcm": AES_FIRST}


class IdentityError(Exception):
    """A peer's certificate does not name an acceptable identity; `reason` is a metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def make_server_context(credentials: Credentials, bundle_pem: bytes, suites: str) -> ssl.SSLContext:
    """Accepts tunnel connections: presents `credentials`, requires a client certificate.

    No session tickets (num_tickets = 0, OP_NO_TICKET): tunnel connections are long-lived and
    pooled, so resumption would rarely be used, while every ticket costs an encryption and a
    message per handshake, and a resumed session would keep a peer's identity past its renewal.
    """
    context = _base_context(ssl.PROTOCOL_TLS_SERVER, credentials, bundle_pem, suites)
    context.options |= ssl.OP_NO_TICKET | OP_PRIORITIZE_CHACHA
    context.num_tickets = 0
    return context


def make_client_context(credentials: Credentials, bundle_pem: bytes, suites: str) -> ssl.SSLContext:
    """Opens tunnel connections: presents `credentials`, requires the server's certificate."""
    context = _base_context(ssl.PROTOCOL_TLS_CLIENT, credentials, bundle_pem, suites)
    context.options |= ssl.OP_NO_TICKET
    return context


def _base_context(protocol: ssl._SSLMethod, credentials: Credentials, bundle_pem: bytes,
                  suites: str) -> ssl.SSLContext:
    context = ssl.SSLContext(protocol)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False  # the SPIFFE ID is checked instead, by verify_peer
    context.verify_mode = ssl.CERT_REQUIRED
    # RFC 5280 strictness (e.g. an empty subject needs a critical SAN); our certificates comply.
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    context.load_verify_locations(cadata=bundle_pem.decode("ascii"))  # str = PEM; bytes would be DER
    load_credentials(context, credentials.chain_pem, credentials.key.private_pem())
    set_ciphersuites(context, suites)
    return context


def load_credentials(context: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    """`load_cert_chain` from an anonymous memory file: `ssl` reads only paths, and keys stay off disk."""
    fd = os.memfd_create("pinion-credentials", os.MFD_CLOEXEC)
    try:
        for data in (chain_pem, key_pem):
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)  # the memory goes with the last reference


def set_ciphersuites(context: ssl.SSLContext, suites: str) -> None:
    """Order the TLS 1.3 suites (Python's `ssl` cannot): SSL_CTX_set_ciphersuites on the context's SSL_CTX."""
    if not set(suites.split(":")) <= TLS13_SUITES:
        raise ValueError(f"not a list of TLS 1.3 suites: {suites!r}")
    if libssl.SSL_CTX_set_ciphersuites(_ssl_ctx_pointer(context), suites.encode()) != 1:
        raise CryptoError(f"SSL_CTX_set_ciphersuites({suites}): {openssl_errors()}")
    configured = [cipher["name"] for cipher in context.get_ciphers() if cipher["protocol"] == "TLSv1.3"]
    if configured != suites.split(":"):
        raise CryptoError(f"TLS 1.3 suites are {configured} after setting {suites}")


def _ssl_ctx_pointer(context: ssl.SSLContext) -> int:
    """The SSL_CTX* inside a CPython SSLContext: the first field after PyObject_HEAD.

    Cross-checked against two values Python reads through its own pointer (options and verify
    mode) before anything is written through ours.
    """
    if sys.implementation.name != "cpython" or not isinstance(context, ssl.SSLContext):
        raise CryptoError("finding the SSL_CTX needs CPython's ssl.SSLContext")
    pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if (not pointer or libssl.SSL_CTX_get_options(pointer) != context.options
            or libssl.SSL_CTX_get_verify_mode(pointer) & 3 != _OPENSSL_VERIFY_MODE[context.verify_mode]):
        raise CryptoError("SSLContext layout is not the one expected (PyObject_HEAD, SSL_CTX *ctx)")
    return pointer


# Python's CERT_* and OpenSSL's SSL_VERIFY_* differ: REQUIRED = PEER | FAIL_IF_NO_PEER_CERT (the two
# low bits; POST_HANDSHAKE may be set above them).
_OPENSSL_VERIFY_MODE = {ssl.CERT_NONE: 0, ssl.CERT_OPTIONAL: 1, ssl.CERT_REQUIRED: 3}


def choose_suites(override: str | None, cpuinfo: str | None = None) -> tuple[str, str]:
    """The TLS 1.3 suite order for this CPU, and one line saying why (for the agent's log).

    `override`: "chacha20" / "aes", or a raw list such as "TLS_AES_128_GCM_SHA256:...".
    `cpuinfo`: the text of /proc/cpuinfo (read when None).
    """
    if override:
        chosen = _OVERRIDES.get(override.strip().lower(), override.strip())
        if not set(chosen.split(":")) <= TLS13_SUITES:
            raise ValueError(f"unknown cipher-suite setting {override!r}: "
                             "chacha20, aes, or TLS 1.3 suite names")
        return chosen, f"{chosen.split(':')[0]} first: configured ({override})"
    features = _cpu_features(cpuinfo if cpuinfo is not None else _read_cpuinfo())
    if features is None:
        return AES_FIRST, "AES-GCM first: CPU features unknown (no flags/Features line in /proc/cpuinfo)"
    if "aes" in features:
        return AES_FIRST, "AES-GCM first: this CPU has AES instructions"
    return CHACHA_FIRST, "ChaCha20-Poly1305 first: this CPU has no AES instructions"


def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def _cpu_features(cpuinfo: str) -> set[str] | None:
    """The first `flags` (x86) or `Features` (ARM) line's words; None if there is neither."""
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return set(value.split())
    return None


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> SpiffeId:
    """The one SPIFFE ID in the verified peer certificate's URI SANs."""
    certificate = ssl_object.getpeercert()
    if not certificate:
        raise IdentityError("no_spiffe_id", "the peer presented no verified certificate")
    alt_names = cast("tuple[tuple[str, str], ...]", certificate.get("subjectAltName", ()))
    uris = [value for kind, value in alt_names if kind == "URI" and value.lower().startswith("spiffe://")]
    if len(uris) != 1:
        raise IdentityError("no_spiffe_id", f"the peer certificate has {len(uris)} spiffe:// URI SANs, not 1")
    try:
        return SpiffeId.parse(uris[0])
    except ValueError as exc:
        raise IdentityError("no_spiffe_id", str(exc)) from exc


def verify_peer(ssl_object: ssl.SSLObject | ssl.SSLSocket, trust_domain: str,
                expected: SpiffeId | None = None, allowed: frozenset[SpiffeId] | None = None) -> SpiffeId:
    """The peer's identity if it is in `trust_domain`, equals `expected` and is in `allowed` (when
    given); otherwise IdentityError with reason wrong_trust_domain / unexpected_identity / not_allowed
    (or no_spiffe_id from peer_identity)."""
    identity = peer_identity(ssl_object)
    if identity.trust_domain != trust_domain:
        raise IdentityError("wrong_trust_domain", f"{identity} is not in {trust_domain}")
    if expected is not None and identity != expected:
        raise IdentityError("unexpected_identity", f"expected {expected}, the peer is {identity}")
    if allowed is not None and identity not in allowed:
        raise IdentityError("not_allowed", f"{identity} is not allowed here")
    return identity
