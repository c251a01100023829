"""The identity directory: a trust anchor, an issuer, the trust bundle and the trust domain.

    trust-anchor.crt  trust-anchor.key   the root (keep its key offline once issuers exist)
    issuer.crt        issuer.key         the intermediate that signs workload certificates
    trust-bundle.crt                     every anchor the mesh trusts (several during rotation)
    trust-domain                         one line, e.g. cluster.local

`pinion identity init` writes it; an agent given `--identity-dir` reads it. Keys are 0600 in a
0700 directory, each file written to a temporary name and renamed, so a reader never sees half.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from agent.durable import atomic_write
from agent.identity.crypto import (
    CryptoError,
    cert_info,
    generate_key,
    issue_intermediate,
    load_private_key,
    self_signed_ca,
)
from agent.identity.spiffe import check_trust_domain

TRUST_ANCHOR_CERT = "trust-anchor.crt"
TRUST_ANCHOR_KEY = "trust-anchor.key"
ISSUER_CERT = "issuer.crt"
ISSUER_KEY = "issuer.key"
TRUST_BUNDLE = "trust-bundle.crt"
TRUST_DOMAIN = "trust-domain"

YEAR = 365 * 86400.0
# CA certificates start a little in the past so a node whose clock lags still accepts them.
CA_BACKDATE = 300.0
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?-----END CERTIFICATE-----\r?\n?", re.DOTALL)


def init_identity_dir(path: Path, trust_domain: str = "cluster.local", anchor_lifetime: float = 10 * YEAR,
                      issuer_lifetime: float = YEAR, *, force: bool = False,
                      clock: Callable[[], float] = time.time) -> list[Path]:
    """Create a trust anchor and an issuer under `path`; returns the files written, in order.

    Refuses (FileExistsError) to replace existing keys unless `force`: every certificate in the
    mesh chains to them.
    """
    check_trust_domain(trust_domain)
    if not 0 < issuer_lifetime <= anchor_lifetime:
        raise ValueError("the issuer must outlive zero seconds and not outlive the anchor")
    existing = [name for name in (TRUST_ANCHOR_KEY, ISSUER_KEY) if (path / name).exists()]
    if existing and not force:
        raise FileExistsError(f"{path} already holds {', '.join(existing)}; use --force to replace them")
    files = new_authority(trust_domain, anchor_lifetime, issuer_lifetime, clock=clock)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    for name, data in files.items():
        atomic_write(path / name, data, 0o600 if name.endswith(".key") else 0o644)
    return [path / name for name in files]


def new_authority(trust_domain: str = "cluster.local", anchor_lifetime: float = 10 * YEAR,
                  issuer_lifetime: float = YEAR, *,
                  clock: Callable[[], float] = time.time) -> dict[str, bytes]:
    """A fresh anchor + issuer in memory: {file name: contents} of an identity directory, keys
    first. (`pinion install` puts the issuer into a Secret and writes the anchor key nowhere.)"""
    check_trust_domain(trust_domain)
    if not 0 < issuer_lifetime <= anchor_lifetime:
        raise ValueError("the issuer must outlive zero seconds and not outlive the anchor")
    now = clock()
    not_before = now - CA_BACKDATE
    with generate_key() as anchor_key, generate_key() as issuer_key:
        anchor = self_signed_ca(anchor_key, f"root.pinion.{trust_domain}", not_before, now + anchor_lifetime,
                                trust_domain)
        issuer = issue_intermediate(issuer_key, issuer_cert_pem=anchor, issuer_key=anchor_key,
                                    common_name=f"identity.pinion.{trust_domain}", not_before=not_before,
                                    not_after=now + issuer_lifetime, trust_domain=trust_domain)
        return {
            TRUST_ANCHOR_KEY: anchor_key.private_pem(),
            ISSUER_KEY: issuer_key.private_pem(),
            TRUST_ANCHOR_CERT: anchor,
            ISSUER_CERT: issuer,
            TRUST_BUNDLE: anchor,
            TRUST_DOMAIN: f"{trust_domain}\n".encode(),
        }


def init_linked_identity_dir(path: Path, anchor_dir: Path, trust_domain: str,
                             issuer_lifetime: float = YEAR, *,
                             clock: Callable[[], float] = time.time) -> list[Path]:
    """An identity dir for another trust domain under the anchor of `anchor_dir` (multicluster:
    two clusters, two trust domains, one anchor, so each verifies the other's workloads). The
    anchor's key is read, not copied; the new dir holds its own issuer and the same bundle."""
    check_trust_domain(trust_domain)
    existing = [name for name in (ISSUER_KEY, ISSUER_CERT) if (path / name).exists()]
    if existing:
        raise FileExistsError(f"{path} already holds {', '.join(existing)}")
    anchor_pem = (anchor_dir / TRUST_ANCHOR_CERT).read_bytes()
    bundle = (anchor_dir / TRUST_BUNDLE).read_bytes()
    now = clock()
    with load_private_key((anchor_dir / TRUST_ANCHOR_KEY).read_bytes()) as anchor_key, \
            generate_key() as issuer_key:
        issuer = issue_intermediate(issuer_key, issuer_cert_pem=anchor_pem, issuer_key=anchor_key,
                                    common_name=f"identity.pinion.{trust_domain}",
                                    not_before=now - CA_BACKDATE, not_after=now + issuer_lifetime,
                                    trust_domain=trust_domain)
        files = {ISSUER_KEY: issuer_key.private_pem(), TRUST_ANCHOR_CERT: anchor_pem,
                 ISSUER_CERT: issuer, TRUST_BUNDLE: bundle,
                 TRUST_DOMAIN: f"{trust_domain}\n".encode()}
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    for name, data in files.items():
        atomic_write(path / name, data, 0o600 if name.endswith(".key") else 0o644)
    return [path / name for name in files]


def split_pem_certificates(pem: bytes) -> list[bytes]:
    """Each `CERTIFICATE` block of `pem`, in order, newline-terminated."""
    return [block if block.endswith(b"\n") else block + b"\n" for block in _PEM_CERT.findall(pem)]


def load_trust_bundle(path: Path) -> list[bytes]:
    """The anchors the mesh trusts (PEM, one per element); `path` is the directory or the bundle file.

    Every block must be a CA certificate; an empty bundle is an error (it would trust nothing).
    """
    bundle_file = path / TRUST_BUNDLE if path.is_dir() else path
    certificates = split_pem_certificates(bundle_file.read_bytes())
    if not certificates:
        raise ValueError(f"{bundle_file} holds no PEM certificate")
    for index, certificate in enumerate(certificates):
        try:
            is_ca = cert_info(certificate).is_ca
        except CryptoError as exc:
            raise ValueError(f"{bundle_file}: certificate {index + 1} does not parse: {exc}") from exc
        if not is_ca:
            raise ValueError(f"{bundle_file}: certificate {index + 1} is not a CA certificate")
    return certificates


def read_trust_domain(path: Path) -> str:
    """The trust domain named in the directory's `trust-domain` file."""
    return check_trust_domain((path / TRUST_DOMAIN).read_text().strip())
