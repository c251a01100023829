"""Building the agent's identity manager: standalone (the agent signs its own pods' certificates
with the issuer in --identity-dir) or Kubernetes (the issuer service signs them)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from agent.config import Config
from agent.controlplane.identity import spiffe
from agent.controlplane.identity.authority import LocalSigner
from agent.controlplane.identity.files import TRUST_BUNDLE, read_trust_domain, split_pem_certificates
from agent.controlplane.identity.store import IdentityManager
from agent.controlplane.identity.tls import choose_suites

log = logging.getLogger(__name__)


def standalone_identities(config: Config) -> IdentityManager:
    """Issuer + trust bundle from the identity dir; TLS 1.3 suites chosen for this CPU."""
    assert config.identity_dir is not None
    directory = config.identity_dir
    try:
        trust_domain = read_trust_domain(directory)
        signer = LocalSigner.from_dir(directory)
        bundle = (directory / TRUST_BUNDLE).read_bytes()
    except OSError as exc:
        raise SystemExit(f"identity dir {directory}: {exc} (create it with `pinion identity "
                         f"init --dir {directory}`)") from None
    suites, why = choose_suites(config.tls_ciphers)
    log.info("identity: trust domain %s, issuer valid until %s; TLS 1.3 suites %s (%s)",
             trust_domain, time.strftime("%Y-%m-%d", time.gmtime(signer.issuer_expires)),
             suites, why)
    return IdentityManager(signer, bundle, trust_domain, suites,
                           lifetime=config.certificate_lifetime_seconds)


def kubernetes_identities(issuer_url: str, issuer_id: str | None, token_file: Path,
                          bundle_path: Path, trust_domain: str, suites: str,
                          lifetime: float = 86400.0) -> IdentityManager:
    """Pods' certificates signed by the issuer service (KubeSigner); the bundle is the mounted ConfigMap.

    `issuer_id` None: the default issuer identity in `trust_domain`. Keep the bundle current with
    `follow_trust_bundle(bundle_path, manager)`.
    """
    from agent.controlplane.identity.remote import KubeSigner

    try:
        expected = spiffe.SpiffeId.parse(issuer_id) if issuer_id else spiffe.issuer_id(trust_domain)
    except ValueError as exc:
        raise SystemExit(f"--issuer-id: {exc}") from None
    try:
        bundle = bundle_path.read_bytes()
        signer = KubeSigner(issuer_url, expected, token_file, bundle)
    except OSError as exc:
        raise SystemExit(f"trust bundle {bundle_path}: {exc} (the ConfigMap pinion-trust-bundle, "
                         "mounted)") from None
    except ValueError as exc:
        raise SystemExit(f"{exc} ({bundle_path}, --issuer-url {issuer_url})") from None
    log.info("identity: trust domain %s, certificates from %s (%s), token %s", trust_domain, issuer_url,
             expected, token_file)
    return IdentityManager(signer, bundle, trust_domain, suites, lifetime=lifetime)


async def follow_trust_bundle(bundle_path: Path, manager: IdentityManager, interval: float = 10.0, *,
                              sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
    """Re-read the bundle every `interval` seconds; when it changes, the manager's contexts and the
    signer's check of the issuer use the new anchors. An unreadable or empty file is logged and the
    old bundle kept. Runs until cancelled."""
    try:
        current = bundle_path.read_bytes()
    except OSError:
        current = b""
    while True:
        await sleep(interval)
        try:
            bundle = bundle_path.read_bytes()
        except OSError as exc:
            log.warning("identity: cannot re-read the trust bundle %s (%s); keeping the old one",
                        bundle_path, exc)
            continue
        if bundle == current:
            continue
        if not split_pem_certificates(bundle):
            log.warning("identity: %s holds no certificate; keeping the old trust bundle", bundle_path)
            continue
        reload_trust_bundle(manager, bundle)
        current = bundle
        log.info("identity: trust bundle %s changed: %d anchor(s)", bundle_path,
                 len(split_pem_certificates(bundle)))


def reload_trust_bundle(manager: IdentityManager, bundle_pem: bytes) -> None:
    """New anchors for the manager's TLS contexts and, if it checks the issuer (KubeSigner), its signer."""
    manager.reload_bundle(bundle_pem)
    reload_signer = getattr(manager.signer, "reload_bundle", None)
    if callable(reload_signer):
        reload_signer(bundle_pem)
