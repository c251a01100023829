"""Fixtures the unit tests share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from agent.dataplane.netns import NetNs


@pytest.fixture
def netns() -> Iterator[NetNs]:
    """The test's own network namespace, as the relays' pods hold it (closed after)."""
    namespace = NetNs.current()
    yield namespace
    namespace.close()
