"""Fixtures the unit tests share."""

from __future__ import annotations

import ssl
from collections.abc import Iterator

import pytest

from agent.dataplane.netns import NetNs
from agent.identity.files import init_identity_dir


@pytest.fixture
def netns() -> Iterator[NetNs]:
    """The test's own network namespace, as the relays' pods hold it (closed after)."""
    namespace = NetNs.current()
    yield namespace
    namespace.close()


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """Two pods' mTLS contexts from one CA: the server pod's (web) and the client pod's
    (cart), for tunnel sessions between two agents."""
    from tests.unit.test_identity_tls import manager_for, with_pods
    from tests.unit.test_tunnel_tls import CART, WEB

    path = tmp_path_factory.mktemp("ca")
    init_identity_dir(path)
    manager = with_pods(manager_for(path), cart=CART, web=WEB)
    return manager.server_context("web"), manager.client_context("cart")
