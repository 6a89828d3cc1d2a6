"""HPACK for responses without a dynamic table: each field's encoding made once, then reused.

The ``h2`` library's encoder indexes response fields into the dynamic table, which makes
every block depend on the blocks before it, so nothing can be reused: it encoded 20 % of
the proxy's HTTP/2 time. This encoder sends fields the way RFC 7541 allows without state:
a full static-table match as an index (``:status: 200`` is one byte), anything else as a
literal *without indexing*, with the name's static index when it has one and Huffman-
coded strings. A field's bytes then depend on the field alone, so they are kept (bounded)
and a response block is a join of known pieces. What it costs: repeated fields go on the
wire each time instead of as one-byte references (nginx makes the same trade).

The decoder on the other side keeps an empty table for us; when the client changes
``SETTINGS_HEADER_TABLE_SIZE`` the next block starts with a table size update to 0, as
RFC 7541 4.2 asks of an encoder after a change.
"""

from __future__ import annotations

from collections.abc import Iterable

from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.table import HeaderTable

_HUFFMAN = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)
_STATIC_FIELDS: dict[tuple[bytes, bytes], int] = {}
_STATIC_NAMES: dict[bytes, int] = {}
for _index, (_name, _value) in enumerate(HeaderTable.STATIC_TABLE, start=1):
    _STATIC_FIELDS.setdefault((_name, _value), _index)
    _STATIC_NAMES.setdefault(_name, _index)
CACHED = 4096  # distinct fields kept (then the cache starts over)
_CACHE: dict[tuple[bytes, bytes], bytes] = {}  # stateless: every connection can share it


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """RFC 7541 5.1: ``value`` with an N-bit prefix; ``first`` holds the bits above it."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(data: bytes) -> bytes:
    """RFC 7541 5.2: Huffman-coded when that is shorter."""
    coded = _HUFFMAN.encode(data)
    if len(coded) < len(data):
        return _integer(len(coded), 7, 0x80) + coded
    return _integer(len(data), 7, 0) + data


def encode_field(name: bytes, value: bytes) -> bytes:
    """One field, independent of any table state."""
    index = _STATIC_FIELDS.get((name, value))
    if index is not None:
        return _integer(index, 7, 0x80)  # indexed
    index = _STATIC_NAMES.get(name)
    if index is not None:  # literal without indexing, indexed name
        return _integer(index, 4, 0x00) + _string(value)
    return b"\x00" + _string(name) + _string(value)


class StatelessEncoder:
    """A stand-in for ``hpack.Encoder`` on a server connection (``H2Connection.encoder``)."""

    __slots__ = ("_size_update",)

    def __init__(self) -> None:
        self._size_update = False

    @property
    def header_table_size(self) -> int:
        return 0

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        self._size_update = True  # tell the decoder ours is 0, whatever it allows

    def encode(self, headers: Iterable[tuple[bytes, bytes]], huffman: bool = True) -> bytes:
        cache = _CACHE
        parts = [b"\x20"] if self._size_update else []  # dynamic table size update: 0
        self._size_update = False
        for field in headers:
            encoded = cache.get(field)
            if encoded is None:
                if len(cache) >= CACHED:
                    cache.clear()
                encoded = cache[field] = encode_field(field[0], field[1])
            parts.append(encoded)
        return b"".join(parts)
