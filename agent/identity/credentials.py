"""One issued workload certificate, as the store keeps it and TLS contexts present it."""

from __future__ import annotations

from dataclasses import dataclass

from agent.identity.crypto import PrivateKey
from agent.identity.spiffe import SpiffeId


@dataclass(frozen=True, eq=False)
class Credentials:
    """One issued certificate: the identity it names, its key, and the chain (leaf + issuer)."""

    identity: SpiffeId
    key: PrivateKey
    chain_pem: bytes
    not_before: float
    not_after: float

    @property
    def renew_at(self) -> float:
        """Half-life: late enough to be cheap, early enough to survive an issuer outage."""
        return self.not_before + (self.not_after - self.not_before) / 2
