"""Building the agent's identity manager from its Config (standalone mode: the agent signs
its own pods' certificates with the issuer in --identity-dir)."""

from __future__ import annotations

import logging
import time

from agent.config import Config
from agent.identity.authority import LocalSigner
from agent.identity.files import TRUST_BUNDLE, read_trust_domain
from agent.identity.store import IdentityManager
from agent.identity.tls import choose_suites

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


def issuer_identities(config: Config) -> IdentityManager:
    """Kubernetes mode: certificates signed by the issuer service (docs/kubernetes.md)."""
    from agent.identity.remote import kubernetes_identities

    suites, why = choose_suites(config.tls_ciphers)
    issuer_id = config.issuer_id or f"spiffe://{config.trust_domain}/ns/pinion-system/sa/pinion-issuer"
    log.info("identity: issuer %s (%s), trust domain %s; TLS 1.3 suites %s (%s)", config.issuer_url,
             issuer_id, config.trust_domain, suites, why)
    return kubernetes_identities(issuer_url=config.issuer_url, issuer_id=issuer_id,
                                 token_file=config.token_file, bundle_path=config.trust_bundle,
                                 trust_domain=config.trust_domain, suites=suites,
                                 lifetime=config.certificate_lifetime_seconds)
