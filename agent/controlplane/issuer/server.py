"""`pinion issuer`: the HTTPS shell around CertificateIssuer, its own certificate, its admin endpoint.

TLS 1.3 only, with a certificate for spiffe://<td>/ns/pinion-system/sa/pinion-issuer signed by the
issuer key and renewed at half-life. One short HTTP/1.1 exchange per connection (the agent signs
a handful of CSRs a day); every request gets exactly one log line and one count in
`pinion_issuer_requests_total{result}`, whatever goes wrong. Connections are bounded in number
and time by listener.py (refusals in `pinion_issuer_connections_refused_total`), and each source
address by a token bucket (limits.py) before anything reaches TokenReview.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path

from agent.config import parse_host_port
from agent.controlplane.issuer.decisions import (
    MAX_BODY_BYTES,
    RESULTS,
    CertificateIssuer,
    IssuerPolicy,
    Reply,
)
from agent.controlplane.issuer.kube import (
    KubePodDirectory,
    KubeTokenReviewer,
    keep_trust_bundle_published,
)
from agent.controlplane.issuer.limits import ListenerLimits
from agent.controlplane.issuer.listener import BoundedListener, connection_refusals
from agent.controlplane.kube.client import KubeClient, KubeConfig, KubeConfigError
from agent.core.limits import RateLimit, SourceRateLimiter
from agent.identity import files
from agent.identity.authority import IssueError, LocalSigner
from agent.identity.crypto import generate_key, make_csr
from agent.identity.spiffe import issuer_id
from agent.identity.tls import load_credentials
from agent.observability.admin import AdminServer
from agent.observability.exposition import CollectorRegistry, Counter, ProcessCollector

log = logging.getLogger(__name__)

SERVING_LIFETIME = 86400.0
MAX_HEAD_BYTES = 16 * 1024  # request line + headers; a projected token is ~1 KiB
ISSUER_LIMITS = ListenerLimits()
ISSUER_RATE = RateLimit()
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 429: "Too Many Requests", 500: "Internal Server Error",
            503: "Service Unavailable"}


@dataclass(frozen=True, slots=True)
class IssuerSettings:
    """`pinion issuer`'s flags, checked."""

    identity_dir: Path = Path("/var/run/pinion/issuer")
    listen: tuple[str, int] = ("0.0.0.0", 8443)
    admin: tuple[str, int] = ("0.0.0.0", 9990)
    kubeconfig: Path | None = None
    agent_namespace: str = "pinion-system"
    agent_service_account: str = "pinion-agent"
    audience: str = "pinion-issuer"
    bundle_namespace: str = "pinion-system"
    bundle_name: str = "pinion-trust-bundle"
    max_lifetime: float = 86400.0

    @classmethod
    def parse(cls, *, identity_dir: str, listen: str, admin_addr: str, kubeconfig: str | None,
              agent_service_account: str, audience: str, bundle_configmap: str,
              max_lifetime: str) -> IssuerSettings:
        """From the flags' text; ValueError says which one is wrong."""
        agent_namespace, _, agent_name = agent_service_account.partition(":")
        if not agent_namespace or not agent_name or ":" in agent_name:
            raise ValueError("--agent-service-account: expected NAMESPACE:NAME, "
                             f"got {agent_service_account!r}")
        bundle_namespace, _, bundle_name = bundle_configmap.partition("/")
        if not bundle_namespace or not bundle_name or "/" in bundle_name:
            raise ValueError(f"--bundle-configmap: expected NAMESPACE/NAME, got {bundle_configmap!r}")
        try:
            lifetime = float(max_lifetime)
        except ValueError:
            lifetime = 0.0
        if not 60 <= lifetime <= 366 * 86400:
            raise ValueError(f"--max-lifetime: expected seconds between 60 and a year, got {max_lifetime!r}")
        if not audience:
            raise ValueError("--audience must not be empty")
        return cls(Path(identity_dir), _address("--listen", listen), _address("--admin-addr", admin_addr),
                   Path(kubeconfig) if kubeconfig else None, agent_namespace, agent_name, audience,
                   bundle_namespace, bundle_name, lifetime)


def _address(flag: str, text: str) -> tuple[str, int]:
    try:
        return parse_host_port(text)
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from None


class ServingCertificate:
    """The issuer's own TLS server context; `renew()` reloads it in place (new handshakes only)."""

    def __init__(self, signer: LocalSigner, clock: Callable[[], float] = time.time) -> None:
        self.identity = issuer_id(signer.trust_domain)
        self._signer = signer
        self._clock = clock
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_3
        self.context.maximum_version = ssl.TLSVersion.TLSv1_3
        self.context.options |= ssl.OP_NO_TICKET  # nothing to resume: one exchange per connection
        self.context.num_tickets = 0
        self.not_after = self.next_renewal = 0.0
        self.renew()

    def renew(self) -> None:
        """A fresh key and certificate; load_cert_chain replaces both for later handshakes."""
        with generate_key() as key:
            issued = self._signer.sign_now(make_csr(key, str(self.identity)), self.identity, SERVING_LIFETIME)
            load_credentials(self.context, issued.chain_pem, key.private_pem())
        self.not_after = issued.not_after
        self.next_renewal = issued.not_before + (issued.not_after - issued.not_before) / 2  # half-life

    async def run(self, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """Renew at half-life; a failure is retried a minute later (the old one is still valid)."""
        while True:
            await sleep(max(1.0, self.next_renewal - self._clock()))
            try:
                self.renew()
                log.info("issuer: serving certificate renewed, valid until %s", _utc(self.not_after))
            except (IssueError, OSError, ssl.SSLError) as exc:
                self.next_renewal = self._clock() + 60
                log.warning("issuer: renewing the serving certificate failed (%s); retry in 60s, the current "
                            "one is valid until %s", exc, _utc(self.not_after))


class IssuerServer:
    """The HTTPS listener: one request per connection, rate-limited per source, handed to CertificateIssuer.

    Connections are bounded by a BoundedListener (listener.py); a source over its RateLimit is
    answered 429 with Retry-After before its token reaches TokenReview."""

    def __init__(self, issuer: CertificateIssuer, context: ssl.SSLContext, registry: CollectorRegistry, *,
                 limits: ListenerLimits = ISSUER_LIMITS, rate: RateLimit = ISSUER_RATE,
                 refusals: Counter | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._issuer = issuer
        self._requests = Counter("pinion_issuer_requests", "Certificate requests by outcome", ["result"],
                                 registry=registry)
        for result in RESULTS:
            self._requests.labels(result)
        if refusals is None:
            refusals = connection_refusals(registry, ("issuer",))
        self._limits = limits
        self._rate = SourceRateLimiter(rate)
        self._clock = clock
        self.listener = BoundedListener("issuer", self._serve, limits, refusals, context=context,
                                        stream_limit=MAX_HEAD_BYTES)

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen; returns the address bound (port 0 picks one)."""
        return await self.listener.start(host, port)

    async def close(self) -> None:
        await self.listener.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
        started = time.monotonic()
        method = path = "-"  # until the request line is read
        try:
            async with asyncio.timeout(self._limits.read_timeout):
                method, path, headers, body = await _read_request(reader)
            reply = await self._answer(peer, method, path, headers, body)
        except _BadHttp as exc:
            reply = Reply(400, "bad_request", {"error": str(exc), "reason": "bad_request"})
        except TimeoutError:
            self.listener.refused(peer, "read_timeout")
            log.info("issuer: %s: no complete request within %.0fs", peer, self._limits.read_timeout)
            return
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
            log.info("issuer: %s: connection ended before a full request (%s)", peer, type(exc).__name__)
            return
        self._requests.labels(reply.result).inc()
        _log_reply(peer, method, path, reply, time.monotonic() - started)
        await _send(writer, reply, self._limits.read_timeout)

    async def _answer(self, peer: str, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        """The rate limit first (it costs nothing), then the route; only a POST reaches TokenReview."""
        decision = self._rate.take(_source(peer), self._clock())
        if not decision.allowed:
            return Reply(429, "rate_limited", {"error": f"too many requests from {_source(peer)}; retry in "
                                                        f"{decision.retry_after}s", "reason": "rate_limited"},
                         retry_after=decision.retry_after)
        return await self._route(method, path, headers, body)

    async def _route(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        if path.split("?", 1)[0] != "/v1/certificates":
            return Reply(404, "bad_request", {"error": f"no such endpoint {path}", "reason": "bad_request"})
        if method != "POST":
            return Reply(405, "bad_request", {"error": "only POST", "reason": "bad_request"})
        return await self._issuer.handle(headers.get("authorization"), body)


class _BadHttp(Exception):
    """The bytes are not an HTTP/1.1 request the issuer accepts."""


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str], bytes]:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise _BadHttp(f"request head larger than {MAX_HEAD_BYTES} bytes") from None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadHttp("not an HTTP/1.x request line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.strip():
                raise _BadHttp("malformed header line")
            headers[name.lower()] = value.strip()
    if "transfer-encoding" in headers:
        raise _BadHttp("Transfer-Encoding is not accepted; send Content-Length")
    length_text = headers.get("content-length", "0")
    if not length_text.isdigit():
        raise _BadHttp("Content-Length is not a number")
    if int(length_text) > MAX_BODY_BYTES:
        raise _BadHttp(f"the body is larger than {MAX_BODY_BYTES} bytes")
    body = await reader.readexactly(int(length_text))
    return parts[0], parts[1], headers, body


async def _send(writer: asyncio.StreamWriter, reply: Reply, timeout: float) -> None:
    body = json.dumps(reply.body).encode()
    retry = f"Retry-After: {reply.retry_after}\r\n" if reply.retry_after > 0 else ""
    head = (f"HTTP/1.1 {reply.status} {_REASONS.get(reply.status, 'Error')}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{retry}"
            "Connection: close\r\n\r\n")
    try:
        writer.write(head.encode() + body)
        async with asyncio.timeout(timeout):
            await writer.drain()
    except (TimeoutError, ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


def _log_reply(peer: str, method: str, path: str, reply: Reply, seconds: float) -> None:
    what = " ".join(part for part in (reply.identity, f"node={reply.node}" if reply.node else "") if part)
    detail = f": {reply.message}" if reply.status != 200 else ""
    log.info("issuer: %s %s %s -> %d %s %s %.1fms%s", peer, _printable(method, 16), _printable(path, 100),
             reply.status, reply.result, what or "-", seconds * 1000, detail)


def _printable(text: str, limit: int) -> str:
    """At most `limit` characters of what a client sent, with nothing that could forge a log line."""
    clipped = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return clipped + ("…" if len(text) > limit else "")


def _source(peer: str) -> str:
    """The address part of `host:port` (IPv6 too): the rate limit's key."""
    return peer.rpartition(":")[0] or peer


def _utc(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


async def run_issuer(settings: IssuerSettings) -> int:
    """Serve until SIGTERM/SIGINT; 1 if the identity dir, the kubeconfig or a port is unusable."""
    try:
        signer = LocalSigner.from_dir(settings.identity_dir)
        bundle = (settings.identity_dir / files.TRUST_BUNDLE).read_text(encoding="ascii")
        serving = ServingCertificate(signer)
        client = KubeClient(KubeConfig.load(str(settings.kubeconfig) if settings.kubeconfig else None))
    except (OSError, ValueError, IssueError, KubeConfigError) as exc:
        log.error("issuer: cannot start: %s", exc)
        return 1
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    policy = IssuerPolicy(signer.trust_domain, settings.agent_namespace, settings.agent_service_account,
                          settings.audience, settings.max_lifetime,
                          also_protected=(settings.bundle_namespace,))
    issuer = CertificateIssuer(policy, signer, KubeTokenReviewer(client), KubePodDirectory(client))
    refusals = connection_refusals(registry, ("issuer",))
    server = IssuerServer(issuer, serving.context, registry, refusals=refusals)
    admin = AdminServer(*settings.admin, registry, lambda: [])  # the agent's, with its limits
    try:
        await admin.start()
        host, port = await server.start(*settings.listen)
        admin.ready = True
        log.info("issuer: serving %s on %s:%d (TLS 1.3), admin on %s:%d; issuer certificate valid until %s",
                 serving.identity, host, port, *settings.admin, _utc(signer.issuer_expires))
        publish = keep_trust_bundle_published(client, settings.bundle_namespace, settings.bundle_name, bundle)
        await _serve_until_stopped(serving, publish)
    except OSError as exc:
        log.error("issuer: cannot listen: %s", exc)
        return 1
    finally:
        admin.ready = False
        await server.close()
        await admin.close()
        await client.close()
    return 0


async def _serve_until_stopped(serving: ServingCertificate, publish: Coroutine[object, object, str]) -> None:
    """Keep the serving certificate fresh and publish the bundle (once) until SIGTERM/SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, stop.set)
    async with asyncio.TaskGroup() as tasks:
        renewer = tasks.create_task(serving.run())
        publisher = tasks.create_task(publish)
        await stop.wait()
        log.info("issuer: stopping")
        renewer.cancel()
        publisher.cancel()
