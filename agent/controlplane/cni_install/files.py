"""Durable, atomic file operations on the host: write via a temp file + rename, remove.

Temp files are `.pinion-*.tmp` in the target's own directory: same filesystem, so the
rename is atomic, and not a config extension, so a runtime never reads one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from agent.controlplane.cni_install.layout import TEMP_PREFIX, TEMP_SUFFIX


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` with `data` (mode `mode`) so readers see old or new, never a mix."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fchmod(file.fileno(), mode)
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):  # keep the original error
            os.unlink(temporary)
        raise
    fsync_directory(path.parent)


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


def fsync_directory(directory: Path) -> None:
    """Make a rename or unlink in `directory` survive a crash."""
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
