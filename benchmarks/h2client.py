"""Just enough of an HTTP/2 client to check that a proxy really speaks h2 and to hold idle h2
connections: the connection preface, SETTINGS (and their ACK), one GET on stream 1 and its
response frames. The request's header block is written by hand (HPACK static-table
indexes and one literal, no Huffman); the response's is not decoded: the body, which only
the upstream's ``200`` carries, is what is checked. No dependency beyond the standard
library, so the suite runs on a tree without the ``h2`` package."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
ALPN_OFFER = ["h2", "http/1.1"]  # what browsers offer: a server without h2 can still answer

DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7
END_STREAM, ACK, END_HEADERS, PADDED = 0x1, 0x1, 0x4, 0x8
SETTINGS_ENABLE_PUSH = 0x2
MAX_FRAME = 1 << 24


class H2Error(Exception):
    """The server ended the stream or the connection instead of answering."""


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    """One frame: 24-bit length, type, flags, 31-bit stream id, payload."""
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", kind, flags, stream) + payload


def request_frames(authority: str, path: str = "/") -> bytes:
    """The preface, our SETTINGS (no server push) and a GET on stream 1 that ends it."""
    block = bytes([0x82, 0x87])  # :method GET, :scheme https (static table 2 and 7)
    block += b"\x84" if path == "/" else b"\x04" + _string(path)  # :path (static table 4)
    block += b"\x01" + _string(authority)  # :authority, literal without indexing (name 1)
    settings = struct.pack(">HI", SETTINGS_ENABLE_PUSH, 0)
    return (
        PREFACE
        + frame(SETTINGS, 0, 0, settings)
        + frame(HEADERS, END_STREAM | END_HEADERS, 1, block)
    )


def _string(text: str) -> bytes:
    """An HPACK string literal without Huffman coding (7-bit prefix length)."""
    raw = text.encode("ascii")
    if len(raw) >= 127:
        raise ValueError("header value too long for this client")
    return bytes([len(raw)]) + raw


async def get(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, authority: str, path: str = "/"
) -> bytes:
    """Send the preface and one GET, answer SETTINGS and PINGs, return the response body
    once stream 1 ends; the connection stays open for the caller."""
    writer.write(request_frames(authority, path))
    body = b""
    while True:
        head = await reader.readexactly(9)
        length = int.from_bytes(head[:3], "big")
        kind, flags, stream = head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
        payload = await reader.readexactly(length) if length else b""
        if kind == SETTINGS and not flags & ACK:
            writer.write(frame(SETTINGS, ACK, 0))
        elif kind == PING and not flags & ACK:
            writer.write(frame(PING, ACK, 0, payload))
        elif kind == GOAWAY:
            code = int.from_bytes(payload[4:8], "big") if len(payload) >= 8 else -1
            raise H2Error(f"GOAWAY (error code {code}) before the response ended")
        elif kind == RST_STREAM and stream == 1:
            raise H2Error(f"RST_STREAM (error code {int.from_bytes(payload[:4], 'big')})")
        elif kind == DATA and stream == 1:
            if flags & PADDED and payload:
                payload = payload[1 : len(payload) - payload[0]]
            body += payload
        if stream == 1 and kind in (DATA, HEADERS) and flags & END_STREAM:
            await writer.drain()
            return body


def negotiate(port: int, ca: str, *, host: str = "localhost", timeout: float = 10.0) -> str:
    """The ALPN protocol a server picks when offered ``h2, http/1.1`` ("none" for none)."""
    context = ssl.create_default_context(cafile=ca)
    context.set_alpn_protocols(ALPN_OFFER)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        return tls.selected_alpn_protocol() or "none"


def fetch(port: int, ca: str, *, host: str = "localhost", timeout: float = 10.0) -> bytes:
    """One verified h2 GET of ``/`` (ALPN must pick h2): the response body."""

    async def once() -> bytes:
        context = ssl.create_default_context(cafile=ca)
        context.set_alpn_protocols(ALPN_OFFER)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname=host
        )
        try:
            chosen = writer.get_extra_info("ssl_object").selected_alpn_protocol()
            if chosen != "h2":
                raise H2Error(f"ALPN chose {chosen or 'nothing'}, not h2")
            return await get(reader, writer, host)
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 2)

    return asyncio.run(asyncio.wait_for(once(), timeout))
