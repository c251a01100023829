"""Root tests on the real kernel: skipped on a workstation without root, failed in CI."""

from __future__ import annotations

import os
import shutil

import pytest


def _missing_capability() -> str | None:
    if os.geteuid() != 0:
        return "tests/netns need root (network namespaces, cgroups, netfilter)"
    if shutil.which("ip") is None:
        return "tests/netns need iproute2 (`ip`)"
    return None


@pytest.fixture(scope="session", autouse=True)
def require_root() -> None:
    """In CI (CI=true) a missing capability is a failure, never a silent skip."""
    reason = _missing_capability()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)
