"""Text output: number formats and tables that fit the terminal (80 columns by default).

A table first tries its full headers (Linkerd's, e.g. LATENCY_P50); if that is too wide it
switches to short headers (P50), and then truncates the columns marked `shrink` (names) with
an ellipsis, widest first. Pure: returns strings."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

WIDTH = 80
_GAP = 2
_MIN_SHRUNK = 6
ELLIPSIS = "…"
CHECK, CROSS = "✓", "✗"


@dataclass(frozen=True)
class Column:
    header: str
    short: str | None = None   # header used when the full headers do not fit
    shrink: bool = False       # may be cut (with an ellipsis) to fit the width


def render_table(columns: Sequence[Column], rows: Sequence[Sequence[str]], width: int = WIDTH) -> str:
    """Left-aligned columns separated by two spaces, every line at most `width` wide."""
    headers = [column.header for column in columns]
    widths = _natural_widths(headers, rows)
    if _total(widths) > width:
        headers = [column.short or column.header for column in columns]
        widths = _natural_widths(headers, rows)
    widths = _shrink(widths, [column.shrink for column in columns], width)
    lines = [_line(headers, widths)] + [_line(row, widths) for row in rows]
    return "\n".join(lines) + "\n"


def _natural_widths(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[int]:
    return [max(len(cell) for cell in cells) for cells in zip(headers, *rows, strict=True)]


def _total(widths: Sequence[int]) -> int:
    return sum(widths) + _GAP * (len(widths) - 1)


def _shrink(widths: list[int], shrinkable: Sequence[bool], width: int) -> list[int]:
    """Take one character at a time from the widest shrinkable column until the table fits."""
    widths = list(widths)
    while _total(widths) > width:
        candidates = [i for i, ok in enumerate(shrinkable) if ok and widths[i] > _MIN_SHRUNK]
        if not candidates:
            break
        widest = max(candidates, key=lambda i: widths[i])
        widths[widest] -= 1
    return widths


def _fit(cell: str, width: int) -> str:
    return cell if len(cell) <= width else cell[: width - 1] + ELLIPSIS


def _line(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(_fit(cell, w).ljust(w) for cell, w in zip(cells, widths, strict=True)).rstrip()


def percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.2f}%"


def rate(per_second: float | None) -> str:
    return "-" if per_second is None else f"{per_second:.1f}"


def millis(value: float | None) -> str:
    """Latency as Linkerd prints it: whole milliseconds, a decimal below 10 ms."""
    if value is None:
        return "-"
    if value < 10:
        return f"{value:.1f}".removesuffix(".0") + "ms"
    return f"{value:.0f}ms"


def count(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def to_json(document: Any) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def section(title: str) -> str:
    return f"{title}\n{'-' * len(title)}\n"


# --- `linkerd viz` formats (viz/cmd/stat.go, edges.go) ----------------------------------------

LINKERD_PADDING = 3
SQUARE_ROOT = "√"  # linkerd viz edges' SECURED mark


def linkerd_table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """A table as linkerd viz prints it (Go's tabwriter, AlignRight, padding 3, the leading
    padding stripped): the first `left` columns (names) left-aligned, the others right-aligned,
    every column at least three spaces from the one before."""
    widths = [max(len(cell) for cell in cells) for cells in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = []
        for index, (cell, width) in enumerate(zip(cells, widths, strict=True)):
            text = cell.ljust(width) if index < left else cell.rjust(width)
            parts.append(text if index == 0 else " " * LINKERD_PADDING + text)
        return "".join(parts)  # a left-aligned last column keeps its padding, as tabwriter's

    return "".join(line(cells) + "\n" for cells in [headers, *rows])


def linkerd_percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.2f}%"


def linkerd_rps(per_second: float) -> str:
    return f"{per_second:.1f}rps"


def linkerd_millis(value: float | None) -> str:
    """Whole milliseconds, rounded half away from zero (Go's math.Round); 0 when undefined,
    as linkerd's metrics API reports a NaN quantile."""
    return f"{math.floor(value + 0.5) if value is not None and value >= 0 else 0}ms"


def linkerd_bytes(per_second: float) -> str:
    return f"{per_second:.1f}B/s"
