"""Noticing changes in the CNI conf dir: inotify (through ctypes on libc), or polling.

A change source wakes the installer when a config other than ours may have changed,
when the periodic resync is due, or when it is asked to stop. Events on our own files
and temp files are ignored, so our writes never wake us (no rewrite loop).
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import logging
import os
import select
import struct
import time
from pathlib import Path
from typing import Protocol

from agent.controlplane.cni_install.layout import OWN_NAMES, is_config_name

log = logging.getLogger(__name__)

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
WATCH_MASK = (IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_CREATE | IN_DELETE
              | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR)
_EVENT_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len
_READ_SIZE = 64 * 1024


class Wake(enum.Enum):
    CHANGED = "changed"
    RESYNC = "resync"
    STOPPED = "stopped"


class StopSignal:
    """A stop request that a signal handler may set and `select` can wait on (self-pipe)."""

    def __init__(self) -> None:
        self._requested = False  # a plain flag: a signal handler must not take locks
        self._read_end, self._write_end = os.pipe()
        os.set_blocking(self._read_end, False)
        os.set_blocking(self._write_end, False)

    def set(self) -> None:
        self._requested = True
        with contextlib.suppress(OSError):  # a full or closed pipe: already woken
            os.write(self._write_end, b"\0")

    def is_set(self) -> bool:
        return self._requested

    def fileno(self) -> int:
        return self._read_end

    def wait(self, timeout: float) -> bool:
        """Sleep up to `timeout` seconds; True as soon as stop is requested."""
        if not self.is_set():
            select.select([self._read_end], [], [], max(timeout, 0.0))
        return self.is_set()

    def close(self) -> None:
        os.close(self._read_end)
        os.close(self._write_end)


class ChangeSource(Protocol):
    description: str

    def wait(self, stop: StopSignal, timeout: float) -> Wake: ...

    def close(self) -> None: ...


def is_relevant(name: str) -> bool:
    """A config the runtime might read and that is not ours (temp files are .tmp)."""
    return is_config_name(name) and name not in OWN_NAMES


def parse_events(buffer: bytes) -> list[tuple[int, str]]:
    """(mask, name) for each struct inotify_event in `buffer`; name is "" for the dir."""
    events, offset = [], 0
    while offset + _EVENT_HEADER.size <= len(buffer):
        _, mask, _, length = _EVENT_HEADER.unpack_from(buffer, offset)
        start = offset + _EVENT_HEADER.size
        raw_name = buffer[start:start + length].split(b"\0", 1)[0]
        events.append((mask, os.fsdecode(raw_name)))
        offset = start + length
    return events


def _load_libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.inotify_init1.argtypes = [ctypes.c_int]
    libc.inotify_init1.restype = ctypes.c_int
    libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    libc.inotify_add_watch.restype = ctypes.c_int
    return libc


class InotifySource:
    """Wakes on inotify events for the conf dir; re-adds the watch if the dir comes back."""

    def __init__(self, directory: Path, retry_interval: float = 2.0, debounce: float = 0.2,
                 max_debounce: float = 2.0) -> None:
        self.description = f"inotify on {directory}"
        self._directory = directory
        self._retry_interval = retry_interval
        self._debounce, self._max_debounce = debounce, max_debounce
        try:
            self._libc = _load_libc()
        except (OSError, AttributeError) as error:
            raise OSError(errno.ENOSYS, f"inotify is not available in libc: {error}") from None
        self._fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"inotify_init1: {os.strerror(code)}")
        self._watching = False
        try:
            self._add_watch()
        except OSError:
            os.close(self._fd)
            raise

    def _add_watch(self) -> bool:
        """True once the directory is watched; False while it does not exist."""
        path = os.fsencode(self._directory)
        if self._libc.inotify_add_watch(self._fd, path, WATCH_MASK) >= 0:
            self._watching = True
            return True
        code = ctypes.get_errno()
        if code in (errno.ENOENT, errno.ENOTDIR):
            return False
        raise OSError(code, f"inotify_add_watch {self._directory}: {os.strerror(code)}")

    def wait(self, stop: StopSignal, timeout: float) -> Wake:
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            if not self._watching:
                if stop.wait(min(remaining, self._retry_interval)):
                    return Wake.STOPPED
                if self._add_watch():
                    return Wake.CHANGED  # the directory appeared
                continue
            ready, _, _ = select.select([self._fd, stop], [], [], remaining)
            if stop.is_set():
                return Wake.STOPPED
            if self._fd in ready and self._read_relevant():
                self._settle(stop)
                return Wake.STOPPED if stop.is_set() else Wake.CHANGED
        return Wake.RESYNC

    def _read_relevant(self) -> bool:
        """Drain pending events; True if any may change what we derive."""
        relevant = False
        while True:
            try:
                buffer = os.read(self._fd, _READ_SIZE)
            except BlockingIOError:
                return relevant
            for mask, name in parse_events(buffer):
                if mask & (IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF):
                    self._watching = False  # the dir went away: watch for it to return
                relevant = relevant or bool(mask & IN_Q_OVERFLOW) or not name or is_relevant(name)

    def _settle(self, stop: StopSignal) -> None:
        """Debounce: wait until the dir is quiet (k3s may write several files at once)."""
        give_up = time.monotonic() + self._max_debounce
        while time.monotonic() < give_up and not stop.is_set():
            ready, _, _ = select.select([self._fd, stop], [], [], self._debounce)
            if not ready:
                return
            if self._fd in ready:
                self._read_relevant()

    def close(self) -> None:
        os.close(self._fd)


Snapshot = frozenset[tuple[str, int, int, int]] | None


def snapshot(directory: Path) -> Snapshot:
    """(name, mtime_ns, size, inode) of every relevant config; None if the dir is missing."""
    entries = set()
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return None
    for name in filter(is_relevant, names):
        path = directory / name
        try:
            status = os.stat(path) if os.path.exists(path) else os.lstat(path)
        except OSError:
            continue
        entries.add((name, status.st_mtime_ns, status.st_size, status.st_ino))
    return frozenset(entries)


class PollingSource:
    """Compares directory snapshots every `interval` seconds."""

    def __init__(self, directory: Path, interval: float = 2.0) -> None:
        self.description = f"polling {directory} every {interval:g}s"
        self._directory = directory
        self._interval = interval
        self._last = snapshot(directory)

    def wait(self, stop: StopSignal, timeout: float) -> Wake:
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            if stop.wait(min(self._interval, remaining)):
                return Wake.STOPPED
            current = snapshot(self._directory)
            if current != self._last:
                self._last = current
                return Wake.CHANGED
        return Wake.RESYNC

    def close(self) -> None:
        pass


def make_change_source(directory: Path, poll: bool, poll_interval: float) -> ChangeSource:
    """inotify unless polling is asked for or inotify cannot be had (then say why)."""
    if not poll:
        try:
            return InotifySource(directory, retry_interval=poll_interval)
        except OSError as error:
            log.warning("inotify unavailable (%s); polling %s every %gs instead",
                        error.strerror or error, directory, poll_interval)
    return PollingSource(directory, poll_interval)
