"""The agent's memory of captured pods survives anything on disk: a file it cannot read back
is set aside (renamed, logged, counted) and the others load; nothing is half-written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.inpod.state import DAMAGED_SUFFIX, PodStateStore
from agent.model import Pod, PodKey

WEB = Pod(PodKey("shop", "web"), "uid-1", "c0ffee01", "/var/run/netns/cni-1", ("10.42.0.5",))
GOOD = json.dumps(WEB.to_json())

DAMAGED = {
    "empty": b"",
    "truncated": GOOD[: len(GOOD) // 2].encode(),
    "a-list": b"[]",
    "null": b"null",
    "ips-a-number": json.dumps({**WEB.to_json(), "ips": 5}).encode(),
    "unknown-version": json.dumps({**WEB.to_json(), "version": 99}).encode(),
    "not-utf8": b"\xff\xfe{",
    "deeply-nested": b"[" * 100_000,
}


def test_damaged_files_are_set_aside_counted_and_the_others_load(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    damaged: list[str] = []
    store = PodStateStore(tmp_path, on_damaged=damaged.append)
    store.prepare()
    store.save(WEB)
    for name, content in DAMAGED.items():
        (tmp_path / "pods" / f"{name}.json").write_bytes(content)

    assert store.load_all() == [WEB]
    assert damaged == ["pods"] * len(DAMAGED)
    assert sorted(p.name for p in (tmp_path / "pods").iterdir()) == sorted(
        [f"{WEB.container_id}.json"] + [f"{name}.json{DAMAGED_SUFFIX}" for name in DAMAGED])
    assert len([r for r in caplog.records if "is damaged and set aside" in r.getMessage()]) == len(DAMAGED)
    assert store.load_all() == [WEB] and len(damaged) == len(DAMAGED)  # set aside once, not again


def test_a_save_is_atomic_and_private(tmp_path: Path) -> None:
    store = PodStateStore(tmp_path)
    store.prepare()
    store.save(WEB)
    path = tmp_path / "pods" / f"{WEB.container_id}.json"
    assert json.loads(path.read_text()) == WEB.to_json()
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left
    store.delete(WEB.container_id)
    assert store.load_all() == []
