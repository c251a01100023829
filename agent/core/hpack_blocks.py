"""The HPACK header blocks of one direction of an HTTP/2 connection, decoded in byte-stream
order with memos, sans-IO (used by `agent.core.http2`).

hpack is pure Python (~10 us a block, ~150 us for a block of Huffman-coded literals), so
decoded blocks are memoised, two ways. A block that never reads the dynamic table (static
indices and literals only: nginx's responses, whose literals are indexed on every response
and never referred to) decodes the same at any table state; its memo keeps the entries it
adds, and a repeat adds them to the table as hpack would have — lazily: the entries wait in
a list until a block must be decoded against the table, and of a long wait only those that
would still be in the table are added (a table keeps the newest entries that fit in it, RFC
7541 4.4: once the list holds `PENDING_SLACK` more than the table's size, it is cut to them
and the table, whose entries they would all evict, emptied). Any other
block whose decoding left the table as it was (indexed fields, literals not indexed: the
steady state of a busy connection) is memoised until the table changes. Small blocks only
(`MEMO_BLOCK`, `MEMO_FIELDS`), at most `MEMO_SIZE` of each kind: a memo's memory stays
small.
"""

from __future__ import annotations

from typing import Any, Final, TypeVar, cast

import hpack
from hpack.table import HeaderTable

Headers = list[tuple[bytes, bytes]]
# Decoded blocks, per kind (see the module docstring). Oldest out when full.
MEMO_SIZE: Final = 64
MEMO_BLOCK: Final = 1024  # bytes of a block worth remembering (real ones: 3 to ~300)
MEMO_FIELDS: Final = 64  # decoded fields of a block worth remembering
_STATIC_ENTRIES: Final = 61  # RFC 7541 Appendix A: indices above read the dynamic table
# Entries waiting to be added to the table beyond a table's size before they are cut to
# one: the table and the list hold at most two tables' worth plus this.
PENDING_SLACK: Final = 16 * 1024
_DECODE_ERRORS: Final = (hpack.HPACKError, IndexError, ValueError)
_T = TypeVar("_T")
# hpack 4's HeaderTable keeps its size in `_current_size`; with another layout, `add` is used
# (not Final: a constant would be compiled in, and the tests take the other path too)
_FAST_REPLAY: bool = isinstance(getattr(HeaderTable(), "_current_size", None), int)


class HeaderBlocks:
    """One direction's HPACK decoder, its memos, and the table entries waiting to be added."""

    __slots__ = ("decoder", "lasting", "memo", "pending", "pending_limit", "pending_size")

    def __init__(self, max_header_list: int) -> None:
        self.decoder = hpack.Decoder(max_header_list_size=max_header_list)
        self.memo: dict[bytes, Headers] = {}  # block -> headers, at this table state
        # blocks that never read the table: block -> (headers, the entries it adds, their size)
        self.lasting: dict[bytes, tuple[Headers, Headers, int]] = {}
        # entries such blocks added since, not yet in the decoder's table (see `settle`)
        self.pending: Headers = []
        self.pending_size = 0
        self.pending_limit = self.decoder.header_table.maxsize + PENDING_SLACK  # then cut

    def decode(self, block: bytes) -> Headers | None:
        """A header block's fields, from a memo or hpack; None: a broken block (then this
        direction's state is undefined: the observer gives up)."""
        lasting = self.lasting.get(block)
        if lasting is not None:
            headers, adds, adds_size = lasting
            if adds:  # what hpack would have added: the table stays in step with the peer's
                if _FAST_REPLAY:
                    self.pending += adds
                    self.pending_size += adds_size
                    if self.pending_size > self.pending_limit:
                        self._cut_pending()
                else:
                    _replay(self.decoder.header_table, adds)
                self.memo.clear()
            return headers
        memoised = self.memo.get(block)
        if memoised is not None:
            return memoised
        self.settle()
        table = self.decoder.header_table
        entries = table.dynamic_entries
        size, count = table.maxsize, len(entries)
        newest = _newest(entries)  # add() puts a new tuple first
        try:
            headers = cast(Headers, self.decoder.decode(block, raw=True))
        except _DECODE_ERRORS:
            return None
        changed = (table.maxsize != size or len(entries) != count
                   or _newest(entries) is not newest)
        self.pending_limit = table.maxsize + PENDING_SLACK  # only a block resizes the table
        if changed:
            self.memo.clear()  # the table changed: what was memoised may decode otherwise
        if len(block) <= MEMO_BLOCK and len(headers) <= MEMO_FIELDS:
            added = table_free(block, len(headers))
            if added is not None:
                adds = [headers[i] for i in added]
                _remember(self.lasting, block, (headers, adds, sum(32 + len(n) + len(v) for n, v in adds)))
            elif not changed:
                _remember(self.memo, block, headers)
        return headers

    def settle(self) -> None:
        """Add the pending entries to the decoder's table: it is then the peer's table."""
        if self.pending:
            _replay(self.decoder.header_table, self.pending)
            self.pending, self.pending_size = [], 0

    def _cut_pending(self) -> None:
        """Keep of the pending entries only the newest that fit in the table together: a table
        holds the longest run of newest entries that fits (RFC 7541 4.4), so when even the
        pending ones do not all fit, the older ones and the table's present entries would all
        be evicted (an entry larger than the table empties it: the same cut); the table is
        emptied now."""
        table = self.decoder.header_table
        maxsize, pending = table.maxsize, self.pending
        kept, first = 0, len(pending)
        while first:
            name, value = pending[first - 1]
            entry_size = 32 + len(name) + len(value)
            if kept + entry_size > maxsize:
                break
            kept += entry_size
            first -= 1
        if first:
            table.dynamic_entries.clear()
            table._current_size = 0
            self.pending, self.pending_size = pending[first:], kept


def _newest(entries: Any) -> object:
    """The table's newest entry, the object itself (typed Any: compiled by mypyc, a
    `tuple[bytes, bytes]` would be unboxed and boxed anew, and never be the same object)."""
    return entries[0] if entries else None


def _replay(table: HeaderTable, adds: Headers) -> None:
    """`table.add` for each entry, in one call: the same entries, sizes and evictions (RFC 7541
    4.4), without hpack's per-entry calls and per-eviction log line."""
    if not _FAST_REPLAY:
        for name, value in adds:
            table.add(name, value)
        return
    entries, maxsize, size = table.dynamic_entries, table.maxsize, table._current_size
    for entry in adds:
        entry_size = 32 + len(entry[0]) + len(entry[1])
        if entry_size > maxsize:
            entries.clear()
            size = 0
            continue
        entries.appendleft((entry[0], entry[1]))
        size += entry_size
        while size > maxsize:
            name, value = entries.pop()
            size -= 32 + len(name) + len(value)
    table._current_size = size


def _remember(memo: dict[bytes, _T], block: bytes, value: _T) -> None:
    if len(memo) >= MEMO_SIZE:
        del memo[next(iter(memo))]
    memo[block] = value


def table_free(block: bytes, fields: int) -> list[int] | None:
    """Of a header block hpack decoded into `fields` fields: the positions of the fields it adds
    to the dynamic table, if no field reads the table (an index above the static table's) and
    it does not resize the table; else None."""
    added: list[int] = []
    pos, end, field = 0, len(block), 0
    while pos < end:
        first = block[pos]
        if first & 0x80:  # indexed field
            index, pos = _integer(block, pos, 0x7F)
            if index > _STATIC_ENTRIES:
                return None
        elif first & 0xE0 == 0x20:  # dynamic table size update
            return None
        else:  # a literal: 01 adds to the table (6-bit name index), 0000/0001 do not (4-bit)
            if first & 0x40:
                added.append(field)
            index, pos = _integer(block, pos, 0x3F if first & 0x40 else 0x0F)
            if index > _STATIC_ENTRIES:
                return None
            if index == 0:
                pos = _skip_string(block, pos)
            pos = _skip_string(block, pos)
        field += 1
    return added if field == fields and pos == end else None


def _integer(block: bytes, pos: int, mask: int) -> tuple[int, int]:
    """An HPACK integer (RFC 7541 5.1) with a `mask`-bit prefix at `pos`: (value, next pos)."""
    value = block[pos] & mask
    pos += 1
    if value == mask:
        shift = 0
        while True:
            octet = block[pos]
            pos += 1
            value += (octet & 0x7F) << shift
            shift += 7
            if not octet & 0x80:
                break
    return value, pos


def _skip_string(block: bytes, pos: int) -> int:
    length, pos = _integer(block, pos, 0x7F)
    return pos + length
