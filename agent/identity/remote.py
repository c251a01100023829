"""Kubernetes-mode signing for the agent: KubeSigner asks the issuer service over HTTPS, and
kubernetes_identities builds the IdentityManager around it.

Each sign is one TLS 1.3 connection to `--issuer-url` carrying the projected service-account token,
read fresh from `--token-file` (kubelet rotates it). The issuer must present a certificate that
chains to the trust bundle and names exactly `--issuer-id`. Every failure is an IssueError; the
IdentityManager retries with backoff. Standard library only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

from agent.identity import spiffe
from agent.identity.authority import Issued, IssueError
from agent.identity.files import split_pem_certificates
from agent.identity.spiffe import SpiffeId
from agent.identity.store import IdentityManager
from agent.identity.tls import IdentityError, verify_peer

log = logging.getLogger(__name__)

MAX_RESPONSE_BYTES = 256 * 1024
CERTIFICATES_PATH = "/v1/certificates"


class IssuerRefused(IssueError):
    """The issuer answered with an error: HTTP `status` and its `reason` (unauthenticated, …)."""

    def __init__(self, status: int, reason: str, message: str, retry_after: float = 0.0) -> None:
        super().__init__(f"the issuer refused ({status} {reason}): {message}")
        self.status = status
        self.reason = reason
        self.retry_after = retry_after  # its Retry-After (429): no sooner than this, in seconds


class KubeSigner:
    """Signs by `POST <issuer_url>/v1/certificates`; implements authority.Signer."""

    def __init__(self, issuer_url: str, issuer_id: SpiffeId, token_file: Path, bundle_pem: bytes, *,
                 timeout: float = 10.0) -> None:
        """`issuer_url`: https://HOST[:PORT][/prefix]; `timeout` bounds a whole exchange."""
        url = urlsplit(issuer_url)
        if url.scheme != "https" or not url.hostname or url.query or url.fragment:
            raise ValueError(f"the issuer URL must be https://HOST[:PORT][/path], not {issuer_url!r}")
        self.host = url.hostname
        self.port = url.port or 443
        self.path = url.path.rstrip("/") + CERTIFICATES_PATH
        self.issuer_id = issuer_id
        self.token_file = token_file
        self.timeout = timeout
        self._context = _client_context(bundle_pem)

    def reload_bundle(self, bundle_pem: bytes) -> None:
        """The trust anchors changed: later connections verify the issuer against these."""
        self._context = _client_context(bundle_pem)

    async def sign(self, csr_pem: bytes, identity: SpiffeId, lifetime: float) -> Issued:
        token = self._token()
        body = json.dumps({"csr": csr_pem.decode("ascii"), "identity": str(identity),
                           "lifetimeSeconds": max(1, round(lifetime))}).encode()
        try:
            async with asyncio.timeout(self.timeout):
                status, answer, retry_after = await self._exchange(token, body)
        except TimeoutError:
            raise IssueError(f"the issuer at {self.host}:{self.port} did not answer within "
                             f"{self.timeout:.0f}s") from None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            raise IssueError(f"cannot reach the issuer at {self.host}:{self.port}: {exc}") from None
        return _issued(status, answer, retry_after)

    def _token(self) -> str:
        try:
            token = self.token_file.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise IssueError(f"cannot read the service-account token {self.token_file}: {exc}") from None
        if not token or any(c.isspace() for c in token):
            raise IssueError(f"the service-account token file {self.token_file} holds no token")
        return token

    async def _exchange(self, token: str, body: bytes) -> tuple[int, bytes, float]:
        reader, writer = await asyncio.open_connection(
            self.host, self.port, ssl=self._context, server_hostname=self.host, limit=MAX_RESPONSE_BYTES)
        try:
            try:
                verify_peer(writer.get_extra_info("ssl_object"), self.issuer_id.trust_domain, self.issuer_id)
            except IdentityError as exc:
                raise IssueError(f"the server at {self.host}:{self.port} is not the issuer: {exc}") from None
            writer.write(_request(self.host, self.port, self.path, token, body))
            await writer.drain()
            return await _read_response(reader)
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)  # the TLS close_notify, then the socket


def _client_context(bundle_pem: bytes) -> ssl.SSLContext:
    """TLS 1.3, the issuer's certificate verified against the bundle; the name is checked by SPIFFE ID."""
    if not split_pem_certificates(bundle_pem):
        raise ValueError("the trust bundle holds no PEM certificate")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False  # verify_peer checks the URI SAN instead
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    context.load_verify_locations(cadata=bundle_pem.decode("ascii"))
    return context


def _request(host: str, port: int, path: str, token: str, body: bytes) -> bytes:
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    head = (f"POST {path} HTTP/1.1\r\nHost: {authority}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode("ascii") + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, float]:
    """The status, body (Content-Length, or up to EOF) and Retry-After (seconds, 0 if none)
    of one HTTP/1.1 response."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    status_line, *header_lines = head.split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise IssueError(f"the issuer's answer is not HTTP: {status_line[:80]!r}")
    length, retry_after = None, 0.0
    for line in header_lines:
        name, _, value = line.partition(":")
        name, value = name.strip().lower(), value.strip()
        if name == "content-length" and value.isdigit():
            length = int(value)
        elif name == "retry-after" and value.isdigit():  # seconds (not the HTTP-date form)
            retry_after = min(float(value), 3600.0)
    if length is not None and length > MAX_RESPONSE_BYTES:
        raise IssueError(f"the issuer's answer is larger than {MAX_RESPONSE_BYTES} bytes")
    body = await (reader.readexactly(length) if length is not None else reader.read(MAX_RESPONSE_BYTES))
    return int(parts[1]), body, retry_after


def _issued(status: int, answer: bytes, retry_after: float = 0.0) -> Issued:
    try:
        fields = json.loads(answer)
    except (ValueError, RecursionError):
        fields = None
    if not isinstance(fields, dict):
        raise IssueError(f"the issuer answered {status} without a JSON object")
    if status != 200:
        raise IssuerRefused(status, str(fields.get("reason", "unknown")), str(fields.get("error", "")),
                            retry_after)
    chain, not_before, not_after = fields.get("chain"), fields.get("notBefore"), fields.get("notAfter")
    if (not isinstance(chain, str) or not split_pem_certificates(chain.encode("ascii", errors="replace"))
            or not isinstance(not_before, int | float) or not isinstance(not_after, int | float)):
        raise IssueError("the issuer's answer lacks chain, notBefore or notAfter")
    return Issued(chain.encode("ascii", errors="replace"), float(not_before), float(not_after))


def kubernetes_identities(issuer_url: str, issuer_id: str | None, token_file: Path,
                          bundle_path: Path, trust_domain: str, suites: str,
                          lifetime: float = 86400.0) -> IdentityManager:
    """Pods' certificates signed by the issuer service (KubeSigner); the bundle is the mounted ConfigMap.

    `issuer_id` None: the default issuer identity in `trust_domain`. Keep the bundle current with
    `follow_trust_bundle(bundle_path, manager)`.
    """
    try:
        expected = SpiffeId.parse(issuer_id) if issuer_id else spiffe.issuer_id(trust_domain)
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
    log.debug("identity: trust domain %s, certificates from %s (%s), token %s", trust_domain, issuer_url,
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
