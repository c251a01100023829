"""The identity directory: `pinion identity init` writes an anchor and an issuer that chain, with
private files private; the trust bundle may hold several anchors (rotation)."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from agent.cli import main
from agent.identity.crypto import (
    cert_info,
    generate_key,
    key_matches,
    load_private_key,
    self_signed_ca,
)
from agent.identity.files import (
    YEAR,
    init_identity_dir,
    load_trust_bundle,
    read_trust_domain,
    split_pem_certificates,
)

NAMES = ["trust-anchor.key", "issuer.key", "trust-anchor.crt", "issuer.crt", "trust-bundle.crt",
         "trust-domain"]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_writes_an_anchor_and_an_issuer_that_chain(tmp_path: Path) -> None:
    directory = tmp_path / "identity"
    written = init_identity_dir(directory, "prod.example", clock=lambda: 1_800_000_000.0)

    assert [path.name for path in written] == NAMES
    assert sorted(path.name for path in directory.iterdir()) == sorted(NAMES)  # no temporary files left
    anchor = cert_info((directory / "trust-anchor.crt").read_bytes())
    issuer = cert_info((directory / "issuer.crt").read_bytes())
    assert anchor.subject == "CN=root.pinion.prod.example"
    assert issuer.subject == "CN=identity.pinion.prod.example"
    assert issuer.issuer == anchor.subject
    assert anchor.not_after == 1_800_000_000 + 10 * YEAR and issuer.not_after == 1_800_000_000 + YEAR
    assert anchor.not_before == issuer.not_before == 1_800_000_000 - 300  # lagging clocks still accept them
    assert key_matches((directory / "issuer.crt").read_bytes(),
                       load_private_key((directory / "issuer.key").read_bytes()))
    assert read_trust_domain(directory) == "prod.example"
    assert load_trust_bundle(directory) == [(directory / "trust-anchor.crt").read_bytes()]


def test_keys_are_private_and_the_directory_is_closed(tmp_path: Path) -> None:
    directory = tmp_path / "identity"
    init_identity_dir(directory)

    assert mode(directory) == 0o700
    assert mode(directory / "trust-anchor.key") == mode(directory / "issuer.key") == 0o600
    assert mode(directory / "trust-bundle.crt") == 0o644


def test_an_existing_directory_is_tightened(tmp_path: Path) -> None:
    directory = tmp_path / "identity"
    directory.mkdir(mode=0o755)

    init_identity_dir(directory)

    assert mode(directory) == 0o700


def test_existing_keys_are_not_replaced_without_force(tmp_path: Path) -> None:
    init_identity_dir(tmp_path)
    before = (tmp_path / "trust-anchor.key").read_bytes()

    with pytest.raises(FileExistsError, match=r"trust-anchor\.key, issuer\.key"):
        init_identity_dir(tmp_path)
    assert (tmp_path / "trust-anchor.key").read_bytes() == before

    init_identity_dir(tmp_path, force=True)
    assert (tmp_path / "trust-anchor.key").read_bytes() != before


def test_init_checks_its_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="trust domain"):
        init_identity_dir(tmp_path, "Not/A/Domain")
    with pytest.raises(ValueError, match="outlive"):
        init_identity_dir(tmp_path, anchor_lifetime=YEAR, issuer_lifetime=2 * YEAR)
    assert list(tmp_path.iterdir()) == []


def test_a_bundle_with_several_anchors_loads_each_of_them(tmp_path: Path) -> None:
    """Anchor rotation: old and new roots side by side, certificates from either verify."""
    old, new = tmp_path / "old", tmp_path / "new"
    init_identity_dir(old)
    init_identity_dir(new)
    bundle = tmp_path / "bundle.crt"
    old_anchor, new_anchor = (old / "trust-anchor.crt").read_bytes(), (new / "trust-anchor.crt").read_bytes()
    bundle.write_bytes(old_anchor + b"\n" + new_anchor)

    anchors = load_trust_bundle(bundle)

    assert anchors == [old_anchor, new_anchor]
    for directory in (old, new):
        verified = subprocess.run(["openssl", "verify", "-CAfile", bundle, directory / "issuer.crt"],
                                  capture_output=True, text=True, timeout=20)
        assert verified.returncode == 0, verified.stderr


def test_a_bundle_must_hold_ca_certificates(tmp_path: Path) -> None:
    init_identity_dir(tmp_path)
    empty, junk = tmp_path / "empty.crt", tmp_path / "junk.crt"
    empty.write_bytes(b"")
    junk.write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")

    with pytest.raises(ValueError, match="no PEM certificate"):
        load_trust_bundle(empty)
    with pytest.raises(ValueError, match="certificate 1 does not parse"):
        load_trust_bundle(junk)


def test_split_pem_keeps_order_and_ignores_other_blocks() -> None:
    key = generate_key()
    first = self_signed_ca(key, "a", 0, 1e9, "td")
    second = self_signed_ca(key, "b", 0, 1e9, "td")

    blocks = split_pem_certificates(b"junk\n" + first + key.private_pem() + second.rstrip(b"\n"))

    assert [cert_info(block).subject for block in blocks] == ["CN=a", "CN=b"]
    assert blocks[1].endswith(b"-----END CERTIFICATE-----\n")


def test_the_cli_writes_a_directory_and_says_what_it_wrote(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "id"

    assert main(["identity", "init", "--dir", str(directory), "--trust-domain", "example.org"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"wrote {directory / 'trust-anchor.key'} (0600)"
    assert [line.split()[1] for line in lines] == [str(directory / name) for name in NAMES]
    assert read_trust_domain(directory) == "example.org"

    assert main(["identity", "init", "--dir", str(directory)]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(["identity", "init", "--dir", str(directory), "--force"]) == 0
    assert read_trust_domain(directory) == "cluster.local"
