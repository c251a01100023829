"""Workload identities as SPIFFE IDs: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

Parsing is strict (the SPIFFE ID spec's character sets, and exactly the Kubernetes shape),
because a peer's identity is read from its certificate and decides what it may do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# SPIFFE ID spec: a trust domain is lowercase letters, digits, '.', '-', '_'; a path segment
# adds uppercase letters, and may not be '.' or '..'. Kubernetes names fit inside both.
_TRUST_DOMAIN = re.compile(r"[a-z0-9._\-]{1,255}")
_SEGMENT = re.compile(r"[A-Za-z0-9._\-]{1,253}")
_MAX_URI_BYTES = 2048


@dataclass(frozen=True, slots=True)
class SpiffeId:
    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        check_trust_domain(self.trust_domain)
        for what, segment in (("namespace", self.namespace), ("service account", self.service_account)):
            if not _SEGMENT.fullmatch(segment) or segment in (".", ".."):
                raise ValueError(f"invalid {what} {segment!r} for a SPIFFE ID")
        if len(str(self)) > _MAX_URI_BYTES:
            raise ValueError("SPIFFE ID longer than 2048 bytes")

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """`spiffe://td/ns/NS/sa/SA` and nothing else (no port, query, fragment, extra segments)."""
        if not uri.startswith("spiffe://"):
            raise ValueError(f"not a spiffe:// URI: {uri!r}")
        parts = uri[len("spiffe://"):].split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
            raise ValueError(f"not spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>: {uri!r}")
        return cls(parts[0], parts[2], parts[4])

    @classmethod
    def for_pod(cls, trust_domain: str, namespace: str, service_account: str) -> SpiffeId:
        """The identity a pod runs as: its namespace and service account, in this trust domain."""
        return cls(trust_domain, namespace, service_account)

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"


for_pod = SpiffeId.for_pod

# Who the Kubernetes-mode issuer service is (docs/kubernetes.md): agents accept no other signer.
ISSUER_NAMESPACE = "pinion-system"
ISSUER_SERVICE_ACCOUNT = "pinion-issuer"


def issuer_id(trust_domain: str) -> SpiffeId:
    """spiffe://<trust-domain>/ns/pinion-system/sa/pinion-issuer."""
    return SpiffeId(trust_domain, ISSUER_NAMESPACE, ISSUER_SERVICE_ACCOUNT)


def check_trust_domain(trust_domain: str) -> str:
    """`trust_domain` if it is a valid SPIFFE trust domain name; else ValueError."""
    if not _TRUST_DOMAIN.fullmatch(trust_domain) or trust_domain in (".", ".."):
        raise ValueError(f"invalid trust domain {trust_domain!r} (lowercase letters, digits, '.', '-', '_')")
    return trust_domain
