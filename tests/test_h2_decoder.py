"""The proxy's HPACK decoder gives what the ``hpack`` library gives, and refuses what it
refuses: the same blocks, from ``hpack``'s own encoder, through both decoders in step."""

from __future__ import annotations

import pytest
from hpack import Decoder as Reference
from hpack import Encoder
from hpack.exceptions import HPACKError, OversizedHeaderListError
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.http.h2.decoder import Decoder

names = st.sampled_from(
    [b":method", b":path", b":authority", b"accept", b"cookie", b"user-agent", b"x-a", b"x-b"]
) | st.binary(min_size=1, max_size=20)
values = st.sampled_from([b"GET", b"/", b"*/*", b"", b"gzip, deflate"]) | st.binary(max_size=300)
blocks = st.lists(st.lists(st.tuples(names, values), max_size=12), min_size=1, max_size=8)


@settings(max_examples=300, deadline=None)
@given(blocks, st.booleans(), st.sampled_from([4096, 256, 0]))
def test_it_decodes_what_hpack_decodes(
    sequence: list[list[tuple[bytes, bytes]]], huffman: bool, table_size: int
) -> None:
    encoder = Encoder()
    encoder.header_table_size = table_size  # the next block starts with a size update
    ours, reference = Decoder(10**9), Reference()
    reference.max_header_list_size = 10**9
    for fields in sequence:
        block = encoder.encode(fields, huffman=huffman)
        assert ours.decode(block, raw=True) == list(reference.decode(block, raw=True))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64))
def test_it_refuses_what_hpack_refuses(block: bytes) -> None:
    ours, reference = Decoder(), Reference()
    try:
        expected = list(reference.decode(block, raw=True))
    except (HPACKError, IndexError, TypeError, UnicodeDecodeError):
        expected = None
    try:
        got = ours.decode(block, raw=True)
    except HPACKError:
        got = None
    assert got == expected


def test_a_bomb_is_refused_before_it_grows() -> None:
    """One large field in the table, then referenced over and over: few bytes, a big list."""
    encoder = Encoder()
    decoder = Decoder(max_header_list_size=64 * 1024)
    decoder.decode(encoder.encode([(b"x-bomb", b"b" * 4000)]), raw=True)
    bomb = encoder.encode([(b"x-bomb", b"b" * 4000)] * 100)
    assert len(bomb) < 200
    with pytest.raises(OversizedHeaderListError):
        decoder.decode(bomb, raw=True)
