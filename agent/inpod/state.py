"""The agent's memory across restarts: one JSON file per captured pod in --state-dir, each
written atomically (`agent.durable`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from agent.durable import atomic_write
from agent.model import Pod

log = logging.getLogger(__name__)


class PodStateStore:
    def __init__(self, directory: Path, subdir: str = "pods") -> None:
        self._dir = directory / subdir

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
                pods.append(Pod.from_json(json.loads(path.read_text())))
            except (OSError, ValueError, KeyError) as exc:
                log.warning("ignoring unreadable pod state %s: %s", path, exc)
                path.unlink(missing_ok=True)
        return pods
