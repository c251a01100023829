"""Per-pod workload certificates: issued on demand, renewed at half-life, served as SSL contexts.

Each pod gets its own key (in memory only) and certificate. The renewal loop keeps them fresh;
a renewed certificate reaches new handshakes through rebuilt contexts, while established TLS
connections keep the certificate they were set up with.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from agent.identity.authority import IssueError, Signer
from agent.identity.credentials import Credentials
from agent.identity.crypto import PrivateKey, cert_info, generate_key, key_matches, make_csr
from agent.identity.files import split_pem_certificates
from agent.identity.spiffe import SpiffeId
from agent.identity.tls import make_client_context, make_server_context

log = logging.getLogger(__name__)

MIN_BACKOFF = 1.0
MAX_BACKOFF = 60.0
JITTER = 0.2  # each retry delay is scaled by a random factor in [1 - JITTER, 1 + JITTER)


@dataclass(eq=False)
class WorkloadCertificates:
    """One pod's certificates: the one presented, and the one before it until it expires."""

    current: Credentials
    previous: Credentials | None = None
    next_attempt: float = 0.0  # when the renewal loop next renews (half-life, or a retry)
    failures: int = 0  # consecutive renewal failures, the backoff exponent
    server: ssl.SSLContext | None = field(default=None, repr=False)
    client: ssl.SSLContext | None = field(default=None, repr=False)

    @property
    def identity(self) -> SpiffeId:
        return self.current.identity


class IdentityManager:
    """Issues, holds and renews every local pod's certificate; hands out its SSL contexts."""

    def __init__(self, signer: Signer, bundle_pem: bytes, trust_domain: str, suites: str,
                 lifetime: float = 86400.0, clock: Callable[[], float] = time.time,
                 on_change: Callable[[str, Credentials], None] | None = None, *,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 jitter: Callable[[], float] = random.random) -> None:
        """`on_change(pod_key, credentials)` runs after every issue and renewal; `sleep` and
        `jitter` (uniform in [0, 1)) are there so tests can drive time."""
        self._signer = signer
        self._bundle_pem = _check_bundle(bundle_pem)
        self._trust_domain = trust_domain
        self._suites = suites
        self._lifetime = lifetime
        self._clock = clock
        self._on_change = on_change
        self._sleep = sleep
        self._jitter = jitter
        self._pods: dict[str, WorkloadCertificates] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._wake = asyncio.Event()
        self.issued = 0
        self.renewals = 0
        self.renewal_failures = 0

    @property
    def trust_domain(self) -> str:
        return self._trust_domain

    @property
    def signer(self) -> Signer:
        return self._signer

    @property
    def suites(self) -> str:
        """The TLS 1.3 suite order every context gets."""
        return self._suites

    async def ensure(self, pod_key: str, identity: SpiffeId) -> Credentials:
        """The pod's valid credentials for `identity`, issuing them (new key, CSR, sign) if needed.

        Signer errors propagate: a pod without a certificate cannot join the mesh.
        """
        if identity.trust_domain != self._trust_domain:
            raise IssueError(f"{identity} is outside the mesh's trust domain {self._trust_domain}")
        lock = self._locks.setdefault(pod_key, asyncio.Lock())
        async with lock:
            entry = self._pods.get(pod_key)
            if entry is not None and entry.identity == identity and self._clock() < entry.current.not_after:
                return entry.current
            credentials = await self._issue(identity)
            if self._locks.get(pod_key) is lock:  # else the pod was forgotten while we signed
                self._install(pod_key, credentials)
            return credentials

    def get(self, pod_key: str) -> WorkloadCertificates | None:
        return self._pods.get(pod_key)

    def server_context(self, pod_key: str) -> ssl.SSLContext:
        """The context accepting tunnel connections to this pod (built once per certificate)."""
        entry = self._entry(pod_key)
        if entry.server is None:
            entry.server = make_server_context(entry.current, self._bundle_pem, self._suites)
        return entry.server

    def client_context(self, pod_key: str) -> ssl.SSLContext:
        """The context this pod's outbound tunnel connections present."""
        entry = self._entry(pod_key)
        if entry.client is None:
            entry.client = make_client_context(entry.current, self._bundle_pem, self._suites)
        return entry.client

    def forget(self, pod_key: str) -> None:
        """The pod is gone: drop its keys and contexts (open connections keep theirs)."""
        self._pods.pop(pod_key, None)
        self._locks.pop(pod_key, None)

    def reload_bundle(self, bundle_pem: bytes) -> None:
        """The trust anchors changed: later handshakes verify against the new bundle."""
        self._bundle_pem = _check_bundle(bundle_pem)
        for entry in self._pods.values():
            entry.server = entry.client = None

    def expiry(self) -> dict[str, float]:
        """Identity -> the earliest not_after among its pods' current certificates."""
        soonest: dict[str, float] = {}
        for entry in self._pods.values():
            name = str(entry.identity)
            soonest[name] = min(soonest.get(name, entry.current.not_after), entry.current.not_after)
        return soonest

    async def run(self) -> None:
        """Renew each pod's certificate at half-life, retrying failures with backoff; runs until cancelled."""
        while True:
            self._wake.clear()
            await self._renew_due()
            await self._wait_until(self._next_wakeup())

    # --- issuing ------------------------------------------------------------------------------

    async def _issue(self, identity: SpiffeId) -> Credentials:
        key = generate_key()
        try:
            issued = await self._signer.sign(make_csr(key, str(identity)), identity, self._lifetime)
            not_before, not_after = self._check_issued(issued.chain_pem, identity, key)
        except BaseException:
            key.close()
            raise
        self.issued += 1
        return Credentials(identity, key, issued.chain_pem, not_before, not_after)

    def _check_issued(self, chain_pem: bytes, identity: SpiffeId, key: PrivateKey) -> tuple[float, float]:
        """The leaf's validity, once it is known to name `identity`, hold `key` and be unexpired."""
        leaf = cert_info(chain_pem)
        if leaf.uri_sans != (str(identity),) or not key_matches(chain_pem, key):
            raise IssueError(f"the signer returned a certificate for {leaf.uri_sans} or another key, "
                             f"not {identity}")
        if leaf.not_after <= self._clock():
            raise IssueError(f"the signer returned a certificate for {identity} that is already expired")
        return leaf.not_before, leaf.not_after

    def _install(self, pod_key: str, credentials: Credentials) -> None:
        entry = self._pods.get(pod_key)
        now = self._clock()
        # A certificate already past half-life (a short one, or a lagging signer) waits a little.
        next_attempt = credentials.renew_at if credentials.renew_at > now else now + MIN_BACKOFF
        if entry is None or entry.identity != credentials.identity:
            self._pods[pod_key] = WorkloadCertificates(credentials, next_attempt=next_attempt)
        else:
            entry.previous, entry.current = entry.current, credentials
            entry.next_attempt, entry.failures = next_attempt, 0
            entry.server = entry.client = None  # rebuilt with the new certificate on next use
        self._wake.set()
        if self._on_change is not None:
            try:
                self._on_change(pod_key, credentials)
            except Exception as exc:
                log.warning("identity: on_change for %s raised %r", pod_key, exc)

    def _entry(self, pod_key: str) -> WorkloadCertificates:
        entry = self._pods.get(pod_key)
        if entry is None:
            raise KeyError(f"no credentials for pod {pod_key} (call ensure first)")
        return entry

    # --- renewal ------------------------------------------------------------------------------

    async def _renew_due(self) -> None:
        for pod_key, entry in list(self._pods.items()):
            now = self._clock()
            if entry.previous is not None and entry.previous.not_after <= now:
                entry.previous = None
            if entry.next_attempt <= now:
                await self._renew(pod_key, entry)

    async def _renew(self, pod_key: str, entry: WorkloadCertificates) -> None:
        lock = self._locks.get(pod_key)
        if lock is None:
            return
        async with lock:
            if self._pods.get(pod_key) is not entry or entry.next_attempt > self._clock():
                return  # forgotten, replaced or renewed by ensure() while we waited
            try:
                credentials = await self._issue(entry.identity)
            except Exception as exc:
                self._renewal_failed(pod_key, entry, exc)
                return
            if self._pods.get(pod_key) is entry:
                self.renewals += 1
                self._install(pod_key, credentials)

    def _renewal_failed(self, pod_key: str, entry: WorkloadCertificates, error: Exception) -> None:
        """Count it, log one line, and retry after 1 s, 2 s, 4 s ... 60 s (jittered), or when
        the issuer said to retry (Retry-After on a 429), if that is later."""
        self.renewal_failures += 1
        entry.failures += 1
        base = min(MAX_BACKOFF, MIN_BACKOFF * 2 ** min(entry.failures - 1, 16))
        delay = base * (1 - JITTER + 2 * JITTER * self._jitter())
        delay = max(delay, float(getattr(error, "retry_after", 0.0)))
        now = self._clock()
        entry.next_attempt = now + delay
        remaining = entry.current.not_after - now
        validity = (f"its certificate is valid for {remaining:.0f}s more" if remaining > 0
                    else f"its certificate EXPIRED {-remaining:.0f}s ago")
        log.warning("identity: renewing %s (%s) failed (%s); retry in %.1fs, %s",
                    pod_key, entry.identity, error, delay, validity)

    def _next_wakeup(self) -> float | None:
        """The earliest renewal (or retry) or expiry of a previous certificate; None if no pods."""
        times = [entry.next_attempt for entry in self._pods.values()]
        times += [entry.previous.not_after for entry in self._pods.values() if entry.previous is not None]
        return min(times, default=None)

    async def _wait_until(self, deadline: float | None) -> None:
        """Sleep until `deadline`, or until ensure() installs a pod (its renewal may come first)."""
        if deadline is None:
            await self._wake.wait()
            return
        delay = deadline - self._clock()
        if delay <= 0 or self._wake.is_set():
            return
        sleeper = asyncio.ensure_future(self._sleep(delay))
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait((sleeper, waker), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waker.cancel()
            await asyncio.gather(sleeper, waker, return_exceptions=True)


def _check_bundle(bundle_pem: bytes) -> bytes:
    if not split_pem_certificates(bundle_pem):
        raise ValueError("the trust bundle holds no PEM certificate")
    return bundle_pem
