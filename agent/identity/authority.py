"""Who signs workload certificates: the Signer interface, and LocalSigner for standalone mode.

In standalone mode each agent holds the issuer from `--identity-dir` and signs its own pods'
CSRs inline (about a millisecond). In Kubernetes mode a remote issuer service implements the
same Signer, so the certificate store does not know which one it talks to.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent.identity import files
from agent.identity.crypto import (
    CryptoError,
    PrivateKey,
    cert_info,
    csr_info,
    issue,
    key_matches,
    load_private_key,
)
from agent.identity.spiffe import SpiffeId, check_trust_domain


class IssueError(Exception):
    """The authority refused to sign, or could not; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Issued:
    chain_pem: bytes  # the leaf, then the issuer
    not_before: float
    not_after: float


class Signer(Protocol):
    async def sign(self, csr_pem: bytes, identity: SpiffeId, lifetime: float) -> Issued: ...


class LocalSigner:
    """Signs CSRs with an issuer certificate and key held in this process."""

    def __init__(self, issuer_cert_pem: bytes, issuer_key: PrivateKey, trust_domain: str, *,
                 clock: Callable[[], float] = time.time, backdate: float = 60.0) -> None:
        """`backdate`: how far before now a leaf starts (at most a tenth of its lifetime), for peers
        whose clocks lag ours."""
        self._issuer_pem = _first_certificate(issuer_cert_pem)
        self._issuer_key = issuer_key
        self._issuer_expires = _check_issuer(self._issuer_pem, issuer_key)
        self.trust_domain = check_trust_domain(trust_domain)
        self._clock = clock
        self._backdate = backdate

    @classmethod
    def from_dir(cls, path: Path, clock: Callable[[], float] = time.time) -> LocalSigner:
        """The issuer of an identity directory written by `pinion identity init`."""
        key = load_private_key((path / files.ISSUER_KEY).read_bytes())
        return cls((path / files.ISSUER_CERT).read_bytes(), key, files.read_trust_domain(path), clock=clock)

    @property
    def issuer_expires(self) -> float:
        return self._issuer_expires

    async def sign(self, csr_pem: bytes, identity: SpiffeId, lifetime: float) -> Issued:
        return self.sign_now(csr_pem, identity, lifetime)

    def sign_now(self, csr_pem: bytes, identity: SpiffeId, lifetime: float) -> Issued:
        """Check the request, then sign it: leaf valid from now (backdated) for `lifetime` seconds,
        but never past the issuer's own expiry."""
        self._check_request(csr_pem, identity, lifetime)
        now = self._clock()
        if now >= self._issuer_expires:
            raise IssueError(f"the issuer certificate expired at {_utc(self._issuer_expires)}")
        # Certificates count whole seconds: round outwards, so a short lifetime is not cut short.
        not_before = math.floor(now - min(self._backdate, lifetime / 10))
        not_after = min(math.ceil(now + lifetime), self._issuer_expires)
        try:
            leaf = issue(csr_pem, issuer_cert_pem=self._issuer_pem, issuer_key=self._issuer_key,
                         spiffe_id=str(identity), not_before=not_before, not_after=not_after)
            info = cert_info(leaf)
        except CryptoError as exc:
            raise IssueError(f"signing for {identity} failed: {exc}") from exc
        return Issued(leaf + self._issuer_pem, info.not_before, info.not_after)

    def _check_request(self, csr_pem: bytes, identity: SpiffeId, lifetime: float) -> None:
        if identity.trust_domain != self.trust_domain:
            raise IssueError(f"{identity} is outside this issuer's trust domain {self.trust_domain}")
        if not lifetime > 0:
            raise IssueError(f"certificate lifetime must be positive, not {lifetime}")
        try:
            requested = csr_info(csr_pem).uri_sans
        except CryptoError as exc:
            raise IssueError(f"CSR rejected: {exc}") from exc
        if requested != (str(identity),):
            asked = ", ".join(requested) or "no URI SAN"
            raise IssueError(f"CSR asks for {asked}, but the caller is {identity}")


def _first_certificate(pem: bytes) -> bytes:
    """The issuer alone: a file may carry its chain after it, which leaves must not repeat."""
    certificates = files.split_pem_certificates(pem)
    if not certificates:
        raise IssueError("the issuer certificate file holds no PEM certificate")
    return certificates[0]


def _check_issuer(issuer_pem: bytes, issuer_key: PrivateKey) -> float:
    """The issuer's expiry, once it is known to be a CA certificate for `issuer_key`."""
    try:
        info = cert_info(issuer_pem)
        matches = key_matches(issuer_pem, issuer_key)
    except CryptoError as exc:
        raise IssueError(f"issuer certificate does not parse: {exc}") from exc
    if not info.is_ca or not matches:
        raise IssueError("issuer certificate is not a CA certificate for the issuer key")
    return info.not_after


def _utc(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
