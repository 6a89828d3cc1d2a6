"""What a TLS ClientHello asks for (server name, ALPN protocols), read before OpenSSL sees it.

Python's ``ssl`` shows the server name to the SNI callback, which must answer at once, and
never shows the ALPN list. Two things need both before the handshake starts: a ClientHello
that offers ``acme-tls/1`` (RFC 8737) gets the TLS-ALPN-01 challenge certificate instead of
the site's, and (later) a ClientHello for a name without a certificate can wait while one is
obtained. This module only reads bytes: no I/O, no state; the TLS connection keeps the bytes
and asks again when more arrive.

The ClientHello is the first handshake message; it may span several TLS records (RFC 8446
5.1). Anything that does not parse is :data:`NOT_A_HELLO`: OpenSSL then sees the bytes as
they are and answers them as it would have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

MAX_HELLO = 64 * 1024  # bytes of handshake message we are willing to wait for
_HANDSHAKE = 22  # TLS record content type
_CLIENT_HELLO = 1  # handshake message type
_SERVER_NAME = 0  # extension types
_ALPN = 16


@dataclass(frozen=True, slots=True)
class ClientHello:
    server_name: str | None  # lower case, no trailing dot; None when not sent
    alpn: tuple[bytes, ...]  # the protocols offered, in the client's order


NEED_MORE: Final = "need more"
NOT_A_HELLO: Final = "not a hello"


def parse(data: bytes) -> ClientHello | str:
    """The ClientHello at the start of ``data``, :data:`NEED_MORE` while it is incomplete,
    or :data:`NOT_A_HELLO`."""
    message = bytearray()
    offset = 0
    while True:  # gather handshake bytes from as many records as the message needs
        if len(data) < offset + 5:
            return NEED_MORE
        if data[offset] != _HANDSHAKE:
            return NOT_A_HELLO
        length = int.from_bytes(data[offset + 3 : offset + 5], "big")
        if len(data) < offset + 5 + length:
            return NEED_MORE
        message += data[offset + 5 : offset + 5 + length]
        offset += 5 + length
        if len(message) >= 4:
            if message[0] != _CLIENT_HELLO:
                return NOT_A_HELLO
            size = int.from_bytes(message[1:4], "big")
            if size > MAX_HELLO:
                return NOT_A_HELLO
            if len(message) >= 4 + size:
                return _hello(bytes(message[4 : 4 + size]))
        if offset > MAX_HELLO:
            return NOT_A_HELLO


def complete_in_first_record(data: bytes | bytearray) -> bool:
    """Cheap: the first record has fully arrived (a ClientHello usually fits in it)."""
    return len(data) >= 5 and len(data) >= 5 + int.from_bytes(data[3:5], "big")


def _hello(body: bytes) -> ClientHello | str:
    try:
        reader = _Reader(body)
        reader.skip(2 + 32)  # legacy_version, random
        reader.skip(reader.uint(1))  # legacy_session_id
        reader.skip(reader.uint(2))  # cipher_suites
        reader.skip(reader.uint(1))  # legacy_compression_methods
        if reader.done():
            return ClientHello(None, ())  # no extensions at all
        extensions = _Reader(reader.take(reader.uint(2)))
        name: str | None = None
        alpn: tuple[bytes, ...] = ()
        while not extensions.done():
            kind = extensions.uint(2)
            value = _Reader(extensions.take(extensions.uint(2)))
            if kind == _SERVER_NAME:
                name = _server_name(value)
            elif kind == _ALPN:
                protocols = _Reader(value.take(value.uint(2)))
                found = []
                while not protocols.done():
                    found.append(protocols.take(protocols.uint(1)))
                alpn = tuple(found)
        return ClientHello(name, alpn)
    except (IndexError, ValueError, UnicodeDecodeError):
        return NOT_A_HELLO


def _server_name(value: _Reader) -> str | None:
    names = _Reader(value.take(value.uint(2)))
    while not names.done():
        kind = names.uint(1)
        host = names.take(names.uint(2))
        if kind == 0:  # host_name
            text = host.decode("ascii").lower()
            return text[:-1] if text.endswith(".") else text
    return None


class _Reader:
    """Big-endian fields off the front of a byte string; running short is an IndexError."""

    __slots__ = ("data", "offset")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def take(self, count: int) -> bytes:
        end = self.offset + count
        if end > len(self.data):
            raise IndexError("truncated")
        chunk = self.data[self.offset : end]
        self.offset = end
        return chunk

    def skip(self, count: int) -> None:
        self.take(count)

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def done(self) -> bool:
        return self.offset >= len(self.data)
