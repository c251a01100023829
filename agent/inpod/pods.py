"""What the CNI server and the admissions need of pod lifecycle: protocols the PodManager
fulfils (and a test's stand-in, without casts)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from agent.model import Pod


class Captured(Protocol):
    """A pod this node captures now."""

    @property
    def pod(self) -> Pod: ...


class PodLifecycle(Protocol):
    """Capture, release, check: what the CNI server asks for each request."""

    async def add(self, pod: Pod) -> None: ...
    async def delete(self, container_id: str) -> bool: ...
    async def check(self, container_id: str) -> list[str]:
        """What is missing for this pod to be fully captured (empty = all in place)."""
        ...


class Pods(PodLifecycle, Protocol):
    """...and what is captured now: what Kubernetes admission reconciles against."""

    def pods(self) -> Sequence[Captured]: ...
    def captured(self, container_id: str) -> Captured | None: ...
