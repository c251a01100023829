"""Certificates for the in-test API server, made with the `openssl` command (lab only).

A CA, a serving certificate whose SANs name the listen address (kubectl and our client both verify
it), and client certificates (CN = user, O = group) for testing client-certificate authentication.
The mesh's own crypto module makes SPIFFE certificates only; DNS/IP SANs are this lab's business.
"""

from __future__ import annotations

import ipaddress
import subprocess
from dataclasses import dataclass
from pathlib import Path

_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
_DAYS = "3650"


@dataclass(frozen=True)
class ServerCerts:
    ca_pem: bytes
    ca_path: Path
    ca_key_path: Path
    cert_path: Path
    key_path: Path


def make_server_certs(directory: Path, hosts: list[str]) -> ServerCerts:
    """A CA and a serving certificate for `hosts` (IPs and names) under directory/pki."""
    pki = directory / "pki"
    pki.mkdir(parents=True, exist_ok=True)
    ca, ca_key = pki / "ca.crt", pki / "ca.key"
    _openssl("req", "-x509", *_EC, "-keyout", ca_key, "-out", ca, "-days", _DAYS,
             "-subj", "/CN=pinion-fake-apiserver-ca",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-addext", "subjectKeyIdentifier=hash")
    cert, key = pki / "apiserver.crt", pki / "apiserver.key"
    extensions = [f"subjectAltName={_alt_names(hosts)}", "extendedKeyUsage=serverAuth"]
    _issue(pki, ca, ca_key, "/CN=kube-apiserver", cert, key, extensions)
    return ServerCerts(ca.read_bytes(), ca, ca_key, cert, key)


def issue_client_cert(certs: ServerCerts, user: str, groups: tuple[str, ...] = ()) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) for `user`, signed by the server's CA, as kubeadm makes them."""
    pki = certs.ca_path.parent
    cert, key = pki / f"client-{user}.crt", pki / f"client-{user}.key"
    subject = "".join(f"/O={group}" for group in groups) + f"/CN={user}"
    _issue(pki, certs.ca_path, certs.ca_key_path, subject, cert, key, ["extendedKeyUsage=clientAuth"])
    return cert.read_bytes(), key.read_bytes()


def _issue(pki: Path, ca: Path, ca_key: Path, subject: str, cert: Path, key: Path,
           extensions: list[str]) -> None:
    csr, extfile = cert.with_suffix(".csr"), cert.with_suffix(".ext")
    common = ["basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment",
              "subjectKeyIdentifier=hash", "authorityKeyIdentifier=keyid"]
    extfile.write_text("\n".join([*common, *extensions]) + "\n")
    _openssl("req", "-new", *_EC, "-keyout", key, "-out", csr, "-subj", subject)
    _openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
             "-CAserial", pki / "ca.srl", "-out", cert, "-days", _DAYS, "-extfile", extfile)
    key.chmod(0o600)


def _alt_names(hosts: list[str]) -> str:
    names = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(f"IP:{ipaddress.ip_address(host)}")
        except ValueError:
            names.append(f"DNS:{host}")
    return ",".join(names)


def _openssl(*args: str | Path) -> None:
    result = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {result.stderr.strip()}")
