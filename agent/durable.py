"""Durable, atomic file writes: a temporary file in the target's directory, fsynced, renamed
over the target, then the directory fsynced. Readers see the old file or the new, never a mix.

Temporary files are `.pinion-*.tmp`: hidden, and not a config extension, so a CNI runtime
watching the directory never reads a half-written one. They are created 0600 and only then
given their mode, so a key file is never readable by others, even for an instant."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

TEMP_PREFIX = ".pinion-"
TEMP_SUFFIX = ".tmp"


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` with `data` (exactly mode `mode`, whatever the umask)."""
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


def fsync_directory(directory: Path) -> None:
    """Make a rename or unlink in `directory` survive a crash."""
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
