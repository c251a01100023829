"""Durable file operations on the host's CNI directories: ensure, remove (atomic writes
come from agent.durable: `.pinion-*.tmp` temp files, which a runtime never reads)."""

from __future__ import annotations

import os
from pathlib import Path

from agent.durable import atomic_write, fsync_directory

__all__ = ["atomic_write", "ensure_file", "ensure_private_directory", "fsync_directory", "remove_file"]


def ensure_file(path: Path, data: bytes, mode: int) -> bool:
    """Make `path` hold `data` with `mode`; True if it had to be (re)written."""
    try:
        current = path.read_bytes()
        current_mode = os.lstat(path).st_mode & 0o7777
    except OSError:
        current, current_mode = None, None
    if current == data and not path.is_symlink():
        if current_mode != mode:
            os.chmod(path, mode)
        return False
    atomic_write(path, data, mode)
    return True


def remove_file(path: Path) -> bool:
    """Remove `path` durably; False if it was not there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    fsync_directory(path.parent)
    return True


def ensure_private_directory(path: Path) -> bool:
    """Create `path` with mode 0700 if it is missing (an existing one is left alone)."""
    if path.exists():
        return False
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        return False
    os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask
    return True
