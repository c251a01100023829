"""Entering a network namespace safely: per thread, always returning, failing loudly.

setns(2) changes only the calling thread. Code that must create a socket or talk netlink
inside a pod's netns enters it, does that one thing, and returns to the agent's own netns.
A thread that cannot return would leave later work in the wrong namespace, so that is fatal.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
from collections.abc import Callable, Iterator
from typing import TypeVar

CLONE_NEWNET = 0x40000000

log = logging.getLogger(__name__)
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


class NetnsError(OSError):
    """A namespace could not be opened or entered."""


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise NetnsError(code, f"setns: {os.strerror(code)}")


class NetNs:
    """An open handle on a network namespace; holding it keeps the namespace alive."""

    __slots__ = ("_fd", "inode", "path")

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NetnsError(errno.ENOENT, f"network namespace {path} does not exist") from None
        except OSError as exc:
            raise NetnsError(exc.errno, f"cannot open network namespace {path}: {exc}") from None
        stat = os.fstat(self._fd)
        self.inode = (stat.st_dev, stat.st_ino)

    @classmethod
    def current(cls) -> NetNs:
        """The namespace of the calling thread (the agent's own, when called at start-up)."""
        return cls("/proc/thread-self/ns/net")

    def fileno(self) -> int:
        return self._fd

    def still_at_path(self) -> bool:
        """True while the path still names this very namespace (the pod was not deleted)."""
        try:
            stat = os.stat(self.path)
        except OSError:
            return False
        return (stat.st_dev, stat.st_ino) == self.inode

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __repr__(self) -> str:
        return f"NetNs({self.path!r})"



class NetnsSwitch:
    """Enters pod namespaces from the agent's home namespace and always returns to it."""

    def __init__(self, home: NetNs) -> None:
        self.home = home

    @contextlib.contextmanager
    def entered(self, target: NetNs) -> Iterator[None]:
        _setns(target.fileno())
        try:
            yield
        finally:
            self._return_home()

    def call(self, target: NetNs, fn: Callable[[], T]) -> T:
        """`fn()` inside `target` (what `entered` does, without a generator: it is on the
        path of every upstream connection)."""
        _setns(target.fileno())
        try:
            return fn()
        finally:
            self._return_home()

    def _return_home(self) -> None:
        try:
            _setns(self.home.fileno())
        except NetnsError:
            log.critical("could not return to the agent's netns; exiting to stay safe")
            os._exit(70)
