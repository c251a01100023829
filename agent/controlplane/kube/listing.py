"""Decode a list response one item at a time, so a page of 500 pods is never whole Python objects at once.

`json.loads` of a 500-pod page builds ~20 MB of small dicts and strings; the allocator keeps most of
that memory after they are freed, so a reflector would carry it for life. ListReader walks the
top-level object with the standard decoder's raw_decode and hands out `items` one by one: the peak
is the body text plus one object. Pure: no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Generator, Iterator
from typing import Any

__all__ = ["ListReader"]

_WHITESPACE = " \t\n\r"


class ListReader:
    """`items()` yields each element of the top-level "items" array; `fields` holds every other key.

    `fields` is complete once items() is exhausted (Kubernetes puts metadata first, but nothing
    here relies on that). Malformed JSON raises ValueError, as json.loads would.
    """

    def __init__(self, text: str) -> None:
        self._text = text
        self._decoder = json.JSONDecoder()
        self.fields: dict[str, Any] = {}

    def items(self) -> Iterator[dict[str, Any]]:
        text, position = self._text, self._skip(0)
        self._expect(position, "{")
        position = self._skip(position + 1)
        if text.startswith("}", position):
            return
        while True:
            key, position = self._decoder.raw_decode(text, position)
            if not isinstance(key, str):
                raise ValueError(f"object key expected at {position}")
            position = self._skip(self._expect(self._skip(position), ":") + 1)
            if key == "items" and text.startswith("[", position):
                position = yield from self._array(position)
            else:
                self.fields[key], position = self._decoder.raw_decode(text, position)
            position = self._skip(position)
            if text.startswith("}", position):
                return
            position = self._skip(self._expect(position, ",") + 1)

    def _array(self, position: int) -> Generator[dict[str, Any], None, int]:
        """Yield the array's elements; returns the position after its closing bracket."""
        text = self._text
        position = self._skip(position + 1)
        if text.startswith("]", position):
            return position + 1
        while True:
            item, position = self._decoder.raw_decode(text, position)
            yield item
            position = self._skip(position)
            if text.startswith("]", position):
                return position + 1
            position = self._skip(self._expect(position, ",") + 1)

    def _skip(self, position: int) -> int:
        text = self._text
        while position < len(text) and text[position] in _WHITESPACE:
            position += 1
        return position

    def _expect(self, position: int, char: str) -> int:
        if not self._text.startswith(char, position):
            raise ValueError(f"expected {char!r} at {position} of a list response")
        return position
