"""Building the agent's identity manager from its Config (standalone mode: the agent signs
its own pods' certificates with the issuer in --identity-dir)."""

from __future__ import annotations

import logging
import time

from agent.config import Config
from agent.controlplane.identity.authority import LocalSigner
from agent.controlplane.identity.files import TRUST_BUNDLE, read_trust_domain
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
