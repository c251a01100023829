"""Kubernetes-mode identity wiring: kubernetes_identities builds an IdentityManager around a
KubeSigner that expects the issuer's SPIFFE ID, follow_trust_bundle carries a changed mounted
bundle to both, and `pinion issuer` offers exactly the documented flags."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.cli import _parser
from agent.identity.files import init_identity_dir
from agent.identity.remote import KubeSigner, follow_trust_bundle, kubernetes_identities
from agent.identity.spiffe import SpiffeId
from agent.identity.tls import AES_FIRST


@pytest.fixture(scope="module")
def anchors(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    first, second = tmp_path_factory.mktemp("first"), tmp_path_factory.mktemp("second")
    init_identity_dir(first)
    init_identity_dir(second)
    return (first / "trust-bundle.crt").read_bytes(), (second / "trust-bundle.crt").read_bytes()


def test_the_manager_signs_through_a_kube_signer_expecting_the_issuer(tmp_path: Path,
                                                                      anchors: tuple[bytes, bytes]) -> None:
    (tmp_path / "bundle.crt").write_bytes(anchors[0])

    manager = kubernetes_identities("https://pinion-issuer.pinion-system.svc:8443", None, tmp_path / "token",
                                    tmp_path / "bundle.crt", "example.org", AES_FIRST, 3600)

    signer = manager.signer
    assert isinstance(signer, KubeSigner)
    assert signer.issuer_id == SpiffeId("example.org", "pinion-system", "pinion-issuer")
    assert (signer.host, signer.port, signer.token_file) == ("pinion-issuer.pinion-system.svc", 8443,
                                                             tmp_path / "token")
    assert (manager.trust_domain, manager.suites) == ("example.org", AES_FIRST)


def test_an_explicit_issuer_id_is_used(tmp_path: Path, anchors: tuple[bytes, bytes]) -> None:
    (tmp_path / "bundle.crt").write_bytes(anchors[0])

    manager = kubernetes_identities("https://10.43.0.10:8443", "spiffe://example.org/ns/mesh/sa/issuer",
                                    tmp_path / "token", tmp_path / "bundle.crt", "example.org", AES_FIRST)

    assert isinstance(manager.signer, KubeSigner)
    assert str(manager.signer.issuer_id) == "spiffe://example.org/ns/mesh/sa/issuer"


@pytest.mark.parametrize(("url", "issuer_id", "bundle", "says"), [
    ("https://issuer:8443", None, None, "trust bundle"),
    ("https://issuer:8443", None, b"no certificates here", "no PEM certificate"),
    ("http://issuer:8443", None, b"", "https://HOST"),
    ("https://issuer:8443", "spiffe://example.org/pinion-issuer", b"", "--issuer-id"),
])
def test_bad_settings_stop_the_agent_with_a_clear_message(tmp_path: Path, anchors: tuple[bytes, bytes],
                                                          url: str, issuer_id: str | None,
                                                          bundle: bytes | None, says: str) -> None:
    if bundle is not None:  # None: no file; b"": a good bundle
        (tmp_path / "bundle.crt").write_bytes(bundle or anchors[0])

    with pytest.raises(SystemExit, match=says):
        kubernetes_identities(url, issuer_id, tmp_path / "token", tmp_path / "bundle.crt", "example.org",
                              AES_FIRST)


def test_a_changed_bundle_reaches_the_manager_and_the_signer(tmp_path: Path, anchors: tuple[bytes, bytes],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    bundle_file = tmp_path / "bundle.crt"
    bundle_file.write_bytes(anchors[0])
    manager = kubernetes_identities("https://issuer:8443", None, tmp_path / "token", bundle_file,
                                    "cluster.local", AES_FIRST)
    signer = manager.signer
    assert isinstance(signer, KubeSigner)
    reloads: list[bytes] = []
    monkeypatch.setattr(signer, "reload_bundle", reloads.append)
    steps = iter([anchors[0] + anchors[1], b"half-written", None, anchors[0] + anchors[1]])

    async def sleep(_: float) -> None:
        step = next(steps, StopAsyncIteration)
        if step is StopAsyncIteration:
            raise asyncio.CancelledError
        if step is None:
            bundle_file.unlink()
        else:
            assert isinstance(step, bytes)
            bundle_file.write_bytes(step)

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(follow_trust_bundle(bundle_file, manager, sleep=sleep))

    assert reloads == [anchors[0] + anchors[1]]  # once: garbage and absence keep the old bundle


def test_pinion_issuer_has_the_documented_flags_and_defaults() -> None:
    args = _parser().parse_args(["issuer"])

    assert {name: value for name, value in vars(args).items() if name != "run"} == {
        "identity_dir": "/var/run/pinion/issuer", "listen": "0.0.0.0:8443",
        "admin_addr": "0.0.0.0:9990", "kubeconfig": None,
        "agent_service_account": "pinion-system:pinion-agent", "audience": "pinion-issuer",
        "bundle_configmap": "pinion-system/pinion-trust-bundle", "max_lifetime": "86400"}
