"""HPACK decoding (RFC 7541) for request field blocks, in one tight loop.

The ``hpack`` library's decoder takes about 12 us for seven fields that are all one-byte
table references (a method call, a memoryview slice, a log call and a tuple subclass per
field): more than a tenth of the proxy's whole HTTP/2 request. This one does the same
work with the common case inline (an index below 127 is one byte; the static table is a
tuple lookup). It keeps ``hpack``'s interface as far as ``h2`` uses it
(``decode(data, raw=True)``, ``max_header_list_size``, ``max_allowed_table_size``,
``header_table_size``) and raises ``hpack``'s exceptions, which ``h2`` turns into a
COMPRESSION_ERROR (or ENHANCE_YOUR_CALM for an oversized list). Huffman strings are
decoded by ``hpack``'s own table. tests/test_h2_decoder.py holds it to ``hpack``'s
results on generated blocks, and to the same refusals.
"""

from __future__ import annotations

from collections import deque

from hpack.exceptions import (
    HPACKDecodingError,
    InvalidTableIndexError,
    InvalidTableSizeError,
    OversizedHeaderListError,
)
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

_STATIC = HeaderTable.STATIC_TABLE  # index 1 is _STATIC[0]
_STATIC_COUNT = len(_STATIC)
_ENTRY_OVERHEAD = 32  # RFC 7541 4.1: what an entry costs beyond its bytes
_MAX_INTEGER_BYTES = 5  # 7 bits each after the prefix: beyond 2**28 nothing is sane


def _integer(data: bytes, i: int, bits: int) -> tuple[int, int]:
    """RFC 7541 5.1: the integer at ``data[i]`` with a ``bits``-bit prefix, and where it
    ends."""
    mask = (1 << bits) - 1
    value = data[i] & mask
    i += 1
    if value < mask:
        return value, i
    shift = 0
    end = min(len(data), i + _MAX_INTEGER_BYTES)
    while i < end:
        byte = data[i]
        i += 1
        value += (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7
    raise HPACKDecodingError("truncated or oversized integer in a field block")


def _string(data: bytes, i: int) -> tuple[bytes, int]:
    """RFC 7541 5.2: a string literal (Huffman-coded or not) and where it ends."""
    if i >= len(data):
        raise HPACKDecodingError("truncated field block")
    huffman = data[i] & 0x80
    length, i = _integer(data, i, 7)
    end = i + length
    if end > len(data):
        raise HPACKDecodingError("truncated field block")
    text = data[i:end]
    return (decode_huffman(text) if huffman else text), end


class Decoder:
    """One connection's HPACK decoding state: the dynamic table and its limits."""

    __slots__ = ("_dynamic", "_maxsize", "_size", "max_allowed_table_size", "max_header_list_size")

    def __init__(self, max_header_list_size: int = 65536) -> None:
        self._dynamic: deque[tuple[bytes, bytes]] = deque()  # the newest entry first
        self._size = 0
        self._maxsize = HeaderTable.DEFAULT_SIZE  # the encoder's current table size
        self.max_allowed_table_size = HeaderTable.DEFAULT_SIZE  # what our SETTINGS allow
        self.max_header_list_size = max_header_list_size

    @property
    def header_table_size(self) -> int:
        return self._maxsize

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        self._maxsize = value
        self._evict()

    def decode(self, data: bytes, raw: bool = True) -> list[tuple[bytes, bytes]]:
        """The fields of one whole field block, in order (raises an ``HPACKError``)."""
        if not raw:
            raise ValueError("this decoder returns bytes only (h2 asks for raw=True)")
        fields: list[tuple[bytes, bytes]] = []
        inflated = 0
        limit = self.max_header_list_size
        size = len(data)
        i = 0
        while i < size:
            byte = data[i]
            if byte & 0x80:  # indexed field
                index = byte & 0x7F
                if index < 0x7F:
                    i += 1
                else:
                    index, i = _integer(data, i, 7)
                if 0 < index <= _STATIC_COUNT:
                    field = _STATIC[index - 1]
                else:
                    field = self._dynamic_entry(index)
            elif byte & 0x40:  # literal, added to the table
                field, i = self._literal(data, i, 6)
                self._add(field)
            elif byte & 0x20:  # table size update: only before the first field
                if fields:
                    raise HPACKDecodingError("table size update after a field")
                new_size, i = _integer(data, i, 5)
                if new_size > self.max_allowed_table_size:
                    raise InvalidTableSizeError("table size above what the settings allow")
                self.header_table_size = new_size
                continue
            else:  # literal, not added (or never to be)
                field, i = self._literal(data, i, 4)
            fields.append(field)
            inflated += len(field[0]) + len(field[1]) + _ENTRY_OVERHEAD
            if inflated > limit:
                raise OversizedHeaderListError(f"a field list larger than {limit} bytes")
        if self._maxsize > self.max_allowed_table_size:  # our settings shrank: must follow
            raise InvalidTableSizeError("the encoder did not shrink its table")
        return fields

    def _dynamic_entry(self, index: int) -> tuple[bytes, bytes]:
        position = index - _STATIC_COUNT - 1
        if index == 0 or position >= len(self._dynamic):
            raise InvalidTableIndexError(f"no table entry {index}")
        return self._dynamic[position]

    def _literal(self, data: bytes, i: int, bits: int) -> tuple[tuple[bytes, bytes], int]:
        index, i = _integer(data, i, bits)
        if index:
            if index <= _STATIC_COUNT:
                name = _STATIC[index - 1][0]
            else:
                name = self._dynamic_entry(index)[0]
        else:
            name, i = _string(data, i)
        value, i = _string(data, i)
        return (name, value), i

    def _add(self, field: tuple[bytes, bytes]) -> None:
        size = len(field[0]) + len(field[1]) + _ENTRY_OVERHEAD
        if size > self._maxsize:  # RFC 7541 4.4: an entry too large empties the table
            self._dynamic.clear()
            self._size = 0
            return
        self._dynamic.appendleft(field)
        self._size += size
        self._evict()

    def _evict(self) -> None:
        dynamic = self._dynamic
        while self._size > self._maxsize and dynamic:
            name, value = dynamic.pop()
            self._size -= len(name) + len(value) + _ENTRY_OVERHEAD
