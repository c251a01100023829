"""The agent's memory across restarts: one JSON file per captured pod in --state-dir, each
written atomically (`agent.durable`)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from agent.durable import atomic_write
from agent.model import Pod

log = logging.getLogger(__name__)


DAMAGED_SUFFIX = ".damaged"


class PodStateStore:
    """`load_all` never fails on a file's content: one it cannot read back is quarantined
    (renamed `<name>.json.damaged`, kept for a post-mortem, never read again), logged with
    the reason, and counted through `on_damaged`; the agent starts with the others."""

    def __init__(self, directory: Path, subdir: str = "pods",
                 on_damaged: Callable[[str], None] | None = None) -> None:
        self._dir = directory / subdir
        self._on_damaged = on_damaged

    def prepare(self) -> None:
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _path(self, container_id: str) -> Path:
        return self._dir / f"{container_id}.json"

    def save(self, pod: Pod) -> None:
        atomic_write(self._path(pod.container_id), json.dumps(pod.to_json()).encode(), 0o600)

    def delete(self, container_id: str) -> None:
        self._path(container_id).unlink(missing_ok=True)

    def load_all(self) -> list[Pod]:
        pods = []
        for path in sorted(self._dir.glob("*.json")):
            try:
                pods.append(Pod.from_json(json.loads(path.read_bytes())))
            except (OSError, ValueError, RecursionError) as exc:  # JSON, UTF-8, shape, types
                self._quarantine(path, exc)
        return pods

    def _quarantine(self, path: Path, exc: BaseException) -> None:
        try:
            path.replace(path.with_name(path.name + DAMAGED_SUFFIX))
        except OSError:
            path.unlink(missing_ok=True)
        log.warning("state file %s is damaged and set aside as %s%s: %s (the pod it described is "
                    "not re-adopted: a CNI DEL/ADD of it, or Kubernetes admission, recovers it)",
                    path, path.name, DAMAGED_SUFFIX, str(exc)[:200])
        if self._on_damaged is not None:
            self._on_damaged(self._dir.name)
