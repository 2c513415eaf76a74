"""A fast, tolerant HPACK block walker for a passive observer.

The per-direction state is a real ``hpack.Decoder`` (its ``header_table`` and its
``max_allowed_table_size``); only the decode loop is ours, for two reasons:

* Tolerance. ``Decoder.decode`` is all or nothing: one unknown dynamic-table index and the
  whole block is lost. An observer attached mid-connection meets unknown indices all the
  time, and the value it cares about (a ``traceparent`` value after a dynamic-table name)
  is still there as a literal. The walker resolves what it can, reports what it cannot,
  and keeps the table consistent wherever that is knowable.
* Speed. hpack's Huffman decoder steps a nibble state machine in Python (four steps per
  byte incl. flag tests); ours steps a byte-wide table derived from the same states, and
  the integer decoding is inlined for the one-byte case that dominates real blocks.

Keeping the table consistent, theory of operation
-------------------------------------------------
Our dynamic table is always a *prefix* (the newest entries) of the encoder's table:

* From a clean start (preface seen) it is the whole table.
* Attached mid-connection, or after a reset, it starts empty. Entries inserted from then
  on sit at the front of the encoder's table, in the same order, with the same sizes; the
  older entries we never saw sit behind them. Eviction removes the oldest first, so the
  encoder drops all of the unseen entries before it drops one of ours, and at that moment
  both tables are identical. An index inside our table is therefore right; an index
  beyond it is merely *unknown* (``None``), never wrong.
* The one insertion we cannot mirror is a literal with incremental indexing whose NAME is
  an unknown index: we know the value, not the entry size. The walker then clears our
  table (``reset``) after that insertion so the prefix property holds again.
* A malformed representation (bad Huffman code, integer overflow, index 0) leaves the rest
  of the block unreadable; the caller resets the table.

The caveat: the prefix property assumes our idea of the table's maximum size is right. A
size update we never saw (attached after it) can make the encoder evict sooner than we do.
"""

from __future__ import annotations

from hpack import Decoder
from hpack.huffman_table import (
    HUFFMAN_COMPLETE,
    HUFFMAN_EMIT_SYMBOL,
    HUFFMAN_FAIL,
    HUFFMAN_TABLE,
)
from hpack.table import HeaderTable

__all__ = [
    "TABLE_SIZE_CAP",
    "BlockState",
    "HpackMalformed",
    "huffman_decode",
    "walk",
]

#: We never let a peer's SETTINGS_HEADER_TABLE_SIZE make our table larger than this.
TABLE_SIZE_CAP = 1 << 20

_STATIC: tuple[tuple[bytes, bytes], ...] = HeaderTable.STATIC_TABLE
_NSTATIC = len(_STATIC)
#: decoded size (name + value + 32) of static entry i, 1-based
_STATIC_SIZES = (0, *(len(name) + len(value) + 32 for name, value in _STATIC))
_VARINT_MAX_BYTES = 5  # 2**35: far beyond any sane length or index


class HpackMalformed(Exception):
    """The block cannot be read past this point (bad Huffman, bad integer, index 0)."""


class _Incomplete(Exception):
    """The representation runs past the end of the bytes we have (streaming)."""


# ---------------------------------------------------------------------------------------
# Huffman: a byte-wide state machine composed from hpack's nibble machine.
# Entry (state << 8 | byte) -> (next state << 8, bytes emitted, ends on a symbol boundary).
# States are kept pre-shifted so the hot loop indexes with ``state | byte``. State 256 is
# the dead state (a FAIL was seen); it absorbs everything.

_DEAD = 256


def _build_byte_table() -> tuple[list[int], list[bytes], bytes]:
    """Per (state, input byte): the next state (<< 8), the bytes emitted, "complete".

    Three flat tables rather than one of tuples: 65,792 entries share 257 state ints and
    17,665 distinct outputs, ~1.5 MB instead of ~8 MB of tuples per daemon.
    """
    states: list[int] = []
    outs: list[bytes] = []
    done = bytearray()
    shared_states = [st << 8 for st in range(_DEAD + 1)]
    shared_outs: dict[bytes, bytes] = {}
    for state in range(_DEAD + 1):
        for byte in range(256):
            out = bytearray()
            st = state
            flags = HUFFMAN_FAIL if state == _DEAD else 0
            if state != _DEAD:
                for nibble in (byte >> 4, byte & 0x0F):
                    st, flags, sym = HUFFMAN_TABLE[st * 16 + nibble]
                    if flags & HUFFMAN_FAIL:
                        break
                    if flags & HUFFMAN_EMIT_SYMBOL:
                        out.append(sym)
            if flags & HUFFMAN_FAIL:
                states.append(shared_states[_DEAD])
                outs.append(b"")
                done.append(0)
            else:
                states.append(shared_states[st])
                emitted = bytes(out)
                outs.append(shared_outs.setdefault(emitted, emitted))
                done.append(1 if flags & HUFFMAN_COMPLETE else 0)
    return states, outs, bytes(done)


_HUFF_STATES, _HUFF_OUTS, _HUFF_DONE = _build_byte_table()


def huffman_decode(raw: bytes) -> bytes:
    """Decode an HPACK Huffman string (RFC 7541 5.2); raise HpackMalformed if invalid."""
    if not raw:
        return b""
    states, outs = _HUFF_STATES, _HUFF_OUTS
    state = 0
    i = 0
    parts: list[bytes] = []
    append = parts.append
    for byte in raw:
        i = state | byte
        append(outs[i])
        state = states[i]
    if not _HUFF_DONE[i]:  # also false in the dead state
        raise HpackMalformed("invalid Huffman string")
    return b"".join(parts)


# ---------------------------------------------------------------------------------------


class BlockState:
    """What the walker learnt from one header block so far (it may span many calls)."""

    __slots__ = (
        "fields",
        "malformed",
        "reset",
        "size",
        "size_update_over",
        "unresolved",
    )

    def __init__(self) -> None:
        #: (name, value) in wire order; name None = unknown dynamic index (value known,
        #: from a literal). Indexed fields we cannot resolve are only counted.
        self.fields: list[tuple[bytes | None, bytes]] = []
        #: decoded header list size, RFC 9113 6.5.2: name + value + 32 per field
        #: (fields we could not resolve count 32 + what is known)
        self.size = 0
        self.unresolved = 0  # representations referring to an index we do not have
        self.reset = False  # the walker cleared the table (unmirrorable insertion)
        self.malformed: str | None = None
        self.size_update_over = False  # a size update above max_allowed_table_size


def _varint(data: bytes, pos: int, end: int, value: int) -> tuple[int, int]:
    """Continue an HPACK integer whose prefix was all ones (``value``) at ``pos``."""
    shift = 0
    count = 0
    while True:
        if pos >= end:
            raise _Incomplete
        byte = data[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        count += 1
        if count >= _VARINT_MAX_BYTES:
            raise HpackMalformed("HPACK integer too long")


def _string(data: bytes, pos: int, end: int) -> tuple[bytes, int]:
    if pos >= end:
        raise _Incomplete
    first = data[pos]
    length = first & 0x7F
    pos += 1
    if length == 0x7F:
        length, pos = _varint(data, pos, end, 0x7F)
    stop = pos + length
    if stop > end:
        raise _Incomplete
    raw = data[pos:stop]
    if first & 0x80:
        return huffman_decode(raw), stop
    return raw, stop


def walk(decoder: Decoder, data: bytes, pos: int, end: int, state: BlockState) -> int:
    """Decode the complete representations in ``data[pos:end]`` into ``state``.

    Returns the offset of the first byte not consumed: ``end`` when the block is done,
    less when the last representation is incomplete (feed it again with more bytes).
    Raises HpackMalformed when the rest cannot be read (the table may then be behind
    the encoder's: the caller resets it).
    """
    table: HeaderTable = decoder.header_table
    entries = table.dynamic_entries
    append = state.fields.append
    static = _STATIC
    static_sizes = _STATIC_SIZES
    size = 0  # added to state.size on the way out, whichever way that is
    try:
        while pos < end:
            start = pos
            try:
                byte = data[pos]
                if byte & 0x80:
                    # 6.1 indexed header field: the dominant case
                    index = byte & 0x7F
                    pos += 1
                    if index == 0x7F:
                        index, pos = _varint(data, pos, end, 0x7F)
                    if index <= _NSTATIC:
                        if not index:
                            raise HpackMalformed("HPACK index 0")
                        append(static[index - 1])
                        size += static_sizes[index]
                        continue
                    dyn = index - _NSTATIC - 1
                    if dyn >= len(entries):
                        state.unresolved += 1
                        size += 32
                        continue
                    entry = entries[dyn]
                    append(entry)
                    size += len(entry[0]) + len(entry[1]) + 32
                    continue
                if byte & 0x40:
                    # 6.2.1 literal with incremental indexing
                    index = byte & 0x3F
                    pos += 1
                    if index == 0x3F:
                        index, pos = _varint(data, pos, end, 0x3F)
                    indexing = True
                elif byte & 0x20:
                    # 6.3 dynamic table size update
                    new_size = byte & 0x1F
                    pos += 1
                    if new_size == 0x1F:
                        new_size, pos = _varint(data, pos, end, 0x1F)
                    if new_size > decoder.max_allowed_table_size:
                        state.size_update_over = True
                    table.maxsize = min(new_size, TABLE_SIZE_CAP)
                    continue
                else:
                    # 6.2.2 / 6.2.3 literal without indexing / never indexed
                    index = byte & 0x0F
                    pos += 1
                    if index == 0x0F:
                        index, pos = _varint(data, pos, end, 0x0F)
                    indexing = False
                lname: bytes | None
                if index == 0:
                    lname, pos = _string(data, pos, end)
                elif index <= _NSTATIC:
                    lname = static[index - 1][0]
                else:
                    dyn = index - _NSTATIC - 1
                    lname = entries[dyn][0] if dyn < len(entries) else None
                value, pos = _string(data, pos, end)
            except _Incomplete:
                return start
            if lname is None:
                state.unresolved += 1
                append((None, value))
                size += len(value) + 32
                if indexing:
                    # we cannot size this entry: forget the table (see module docstring)
                    limit = table.maxsize
                    table.maxsize = 0  # the setter empties the table and its size count
                    table.maxsize = limit
                    state.reset = True
                continue
            append((lname, value))
            size += len(lname) + len(value) + 32
            if indexing:
                table.add(lname, value)
        return pos
    finally:
        state.size += size
