"""Giving memory back after a burst: what an idle agent would otherwise keep.

A relay and its two sides form a reference cycle, freed only by a garbage collection, which
an idle agent (allocating nothing) does not trigger; and glibc keeps freed heap pages unless
asked to trim. After many connections end at once (an idle sweep, a flood that stopped), one
call does both, in a few milliseconds."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable
from functools import cache


def give_back_memory() -> None:
    gc.collect(1)  # the young generations: where the burst's cycles are
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where there is none (musl)."""
    name = ctypes.util.find_library("c")
    try:
        function = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if function is not None:
        function.argtypes, function.restype = [ctypes.c_size_t], ctypes.c_int
    return function
