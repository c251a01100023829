"""Where the Kubernetes API server is and how to prove who we are: in-cluster or a kubeconfig.

Everything is read once into a frozen KubeConfig; only a token *file* stays a path, because the
kubelet rotates projected service-account tokens and the client re-reads the file when it changes.
A kubeconfig that is JSON needs nothing beyond the standard library; a YAML one imports PyYAML
lazily (k3s writes YAML; in-cluster agents never need it).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["SERVICE_ACCOUNT_DIR", "KubeConfig", "KubeConfigError"]

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


class KubeConfigError(Exception):
    """The configuration cannot be used; the message is one line that says why."""


@dataclass(frozen=True)
class KubeConfig:
    """The API server's address and this client's credentials, all in memory except token_file."""

    server: str  # https://host:port (a path prefix is kept: proxies such as Rancher's use one)
    ca_pem: bytes | None = None  # None: the system's CAs
    token: str | None = field(default=None, repr=False)
    token_file: str | None = None  # re-read when it changes; wins over `token`, as in client-go
    client_cert_pem: bytes | None = None
    client_key_pem: bytes | None = field(default=None, repr=False)
    insecure: bool = False  # insecure-skip-tls-verify
    namespace: str = "default"
    tls_server_name: str | None = None  # the name to verify instead of the server's host

    @classmethod
    def load(cls, kubeconfig: str | None, *, environ: Mapping[str, str] | None = None,
             service_account_dir: str = SERVICE_ACCOUNT_DIR) -> KubeConfig:
        """None: in-cluster (service-account token, CA and namespace); a path: that kubeconfig."""
        if kubeconfig is None:
            return _in_cluster(os.environ if environ is None else environ, Path(service_account_dir))
        return _from_kubeconfig(Path(kubeconfig))

    @staticmethod
    def in_cluster_available(environ: Mapping[str, str] | None = None,
                             service_account_dir: str = SERVICE_ACCOUNT_DIR) -> bool:
        """True inside a pod: the service host variable is set and the token is mounted."""
        env = os.environ if environ is None else environ
        return bool(env.get("KUBERNETES_SERVICE_HOST")) and (Path(service_account_dir) / "token").is_file()


def _in_cluster(environ: Mapping[str, str], account_dir: Path) -> KubeConfig:
    host = environ.get("KUBERNETES_SERVICE_HOST", "")
    port = environ.get("KUBERNETES_SERVICE_PORT", "")
    if not host or not port:
        raise KubeConfigError("not in a cluster: KUBERNETES_SERVICE_HOST/KUBERNETES_SERVICE_PORT are not set")
    token_file = account_dir / "token"
    if not token_file.is_file():
        raise KubeConfigError(f"not in a cluster: no service-account token at {token_file}")
    namespace_file = account_dir / "namespace"
    namespace = namespace_file.read_text().strip() if namespace_file.is_file() else "default"
    return KubeConfig(
        server=f"https://{_bracket(host)}:{port}",
        ca_pem=_read_file(account_dir / "ca.crt", "service-account CA"),
        token_file=str(token_file),
        namespace=namespace or "default",
    )


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _from_kubeconfig(path: Path) -> KubeConfig:
    document = _parse(path)
    context = _current_context(document, path)
    cluster = _named(document, "clusters", "cluster", context.get("cluster"), path)
    user = _named(document, "users", "user", context.get("user"), path) if context.get("user") else {}
    server = str(cluster.get("server") or "")
    if not server.startswith(("https://", "http://")):
        raise KubeConfigError(f"{path}: cluster {context.get('cluster')!r} has no https:// server")
    base = path.parent
    cert = _pem(user, "client-certificate", base)
    key = _pem(user, "client-key", base)
    if (cert is None) != (key is None):
        raise KubeConfigError(f"{path}: user {context.get('user')!r} has a client certificate or a key, "
                              "not both")
    token = user.get("token")
    token_file = user.get("tokenFile")
    if token_file is not None:
        token_file = str(base / str(token_file))
    if not (token or token_file or cert):
        _refuse_unsupported_auth(user, context, path)
    return KubeConfig(
        server=server.rstrip("/"),
        ca_pem=_pem(cluster, "certificate-authority", base),
        token=str(token) if token else None,
        token_file=token_file,
        client_cert_pem=cert,
        client_key_pem=key,
        insecure=bool(cluster.get("insecure-skip-tls-verify", False)),
        namespace=str(context.get("namespace") or "default"),
        tls_server_name=cluster.get("tls-server-name") or None,
    )


def _parse(path: Path) -> dict[str, Any]:
    text = _read_file(path, "kubeconfig").decode("utf-8", errors="replace")
    if text.lstrip().startswith("{"):
        try:
            document = json.loads(text)
        except ValueError as error:
            raise KubeConfigError(f"{path}: not valid JSON: {error}") from error
    else:
        document = _parse_yaml(text, path)
    if not isinstance(document, dict):
        raise KubeConfigError(f"{path}: not a kubeconfig (expected a mapping at the top)")
    return document


def _parse_yaml(text: str, path: Path) -> Any:
    try:
        import yaml  # lazily: only YAML kubeconfigs (k3s.yaml) need it
    except ImportError as error:
        raise KubeConfigError(f"{path} is YAML and PyYAML is not installed (or write it as JSON)") from error
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise KubeConfigError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from error


def _current_context(document: dict[str, Any], path: Path) -> dict[str, Any]:
    name = document.get("current-context")
    if not name:
        raise KubeConfigError(f"{path}: current-context is not set")
    return _named(document, "contexts", "context", name, path)


def _named(document: dict[str, Any], section: str, key: str, name: object, path: Path) -> dict[str, Any]:
    for entry in document.get(section) or ():
        if isinstance(entry, dict) and entry.get("name") == name:
            value = entry.get(key) or {}
            if not isinstance(value, dict):
                break
            return value
    raise KubeConfigError(f"{path}: no {key} named {name!r}")


def _pem(section: dict[str, Any], key: str, base: Path) -> bytes | None:
    """`<key>-data` (base64) or `<key>` (a path, relative to the kubeconfig's directory)."""
    data = section.get(f"{key}-data")
    if data:
        try:
            return base64.b64decode(str(data), validate=True)
        except (binascii.Error, ValueError) as error:
            raise KubeConfigError(f"{key}-data is not valid base64: {error}") from error
    if section.get(key):
        return _read_file(base / str(section[key]), key)
    return None


def _refuse_unsupported_auth(user: dict[str, Any], context: dict[str, Any], path: Path) -> None:
    for method in ("exec", "auth-provider", "username"):
        if user.get(method):
            raise KubeConfigError(f"{path}: user {context.get('user')!r} authenticates with {method!r}, "
                                  "which is not supported: use a token, tokenFile or client certificate")


def _read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise KubeConfigError(f"cannot read {what} {path}: {error.strerror or error}") from error
