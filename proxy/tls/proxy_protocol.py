"""The PROXY protocol header (v1 text and v2 binary) that L4 balancers send first: a parser.

HAProxy in ``mode tcp``, AWS NLB, GCP's TCP proxy and others forward a client's TCP
connection and tell who the client was in a header before the first byte of the client's
own (https://www.haproxy.org/download/2.6/doc/proxy-protocol.txt). No I/O here: bytes in, a
:class:`ProxyHeader` and the number of bytes it took out, or ``None`` for "more bytes, please",
or :class:`ProxyHeaderError`; :mod:`proxy.tls.proxy_phase` is the connection phase that feeds
it.

Strict on purpose, as the header decides the client address every later decision trusts:
anything the specification does not allow is an error, decided as soon as the bytes already
received show it (a TLS ClientHello or an HTTP request line fails at its first byte, without
waiting for more). Sizes are bounded: a v1 line is at most 107 bytes by definition, and a v2
header is refused past :data:`MAX_V2` bytes (the format allows 64 KiB; balancers send
addresses and a few small TLVs, well under 1 KiB).

Some answers keep the balancer's own address (``source`` is None): v1 ``UNKNOWN``, the v2
``LOCAL`` command (the balancer's health checks; its block is skipped unread, as the
specification says), and a v2 ``PROXY`` with an address family we cannot use
(``AF_UNSPEC``, ``AF_UNIX``). TLVs after the addresses are checked for framing and skipped.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

V1_PREFIX = b"PROXY "
V1_MAX = 107  # "PROXY TCP6 " + two full IPv6 addresses + two ports + spaces + CRLF
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version/command, family/transport, length
MAX_V2 = 4096  # the whole v2 header, TLVs included

_V2_LOCAL, _V2_PROXY = 0x0, 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_STREAM = 0x1
_ADDRESS_BYTES = {_AF_UNSPEC: 0, _AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}
_TCP4 = struct.Struct("!4s4sHH")
_TCP6 = struct.Struct("!16s16sHH")

Address = tuple[str, int]


class ProxyHeaderError(ValueError):
    """The bytes are not a valid PROXY header; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A complete header: the client's ``source`` (None: keep the connection's own peer) and
    the ``destination`` it connected to at the balancer."""

    version: int  # 1 or 2
    source: Address | None
    destination: Address | None = None


def parse(data: bytes) -> tuple[ProxyHeader, int] | None:
    """The header at the start of ``data`` and its length, or None if ``data`` is a valid
    beginning of one that needs more bytes. Raises :class:`ProxyHeaderError` otherwise."""
    if not data:
        return None
    if data[0] == V1_PREFIX[0]:
        return _parse_v1(data)
    if data[0] == V2_SIGNATURE[0]:
        return _parse_v2(data)
    raise ProxyHeaderError(f"no PROXY header: the connection starts with {data[:8]!r}")


# -- v1: one text line ----------------------------------------------------------------------


def _parse_v1(data: bytes) -> tuple[ProxyHeader, int] | None:
    if not data.startswith(V1_PREFIX[: len(data)]):
        raise ProxyHeaderError(f"not a PROXY v1 line: {data[:8]!r}")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX or b"\n" in data[:V1_MAX]:
            raise ProxyHeaderError("PROXY v1 line longer than 107 bytes, or without CRLF")
        _check_v1_prefix(data)
        return None
    line = data[:end]
    fields = line.split(b" ")
    protocol = fields[1] if len(fields) > 1 else b""
    if protocol == b"UNKNOWN":  # the rest of the line is to be ignored
        return ProxyHeader(1, None), end + 2
    if protocol not in (b"TCP4", b"TCP6") or len(fields) != 6:
        raise ProxyHeaderError(
            f"PROXY v1: expected 'PROXY TCP4|TCP6 src dst sport dport': {line!r}"
        )
    version = 4 if protocol == b"TCP4" else 6
    source = (_v1_address(fields[2], version), _v1_port(fields[4]))
    destination = (_v1_address(fields[3], version), _v1_port(fields[5]))
    return ProxyHeader(1, source, destination), end + 2


def _check_v1_prefix(data: bytes) -> None:
    """Refuse early what can never become a valid line: bytes outside printable ASCII."""
    if any(byte < 0x20 or byte > 0x7E for byte in data[len(V1_PREFIX) :].rstrip(b"\r")):
        raise ProxyHeaderError("PROXY v1 line with a control or non-ASCII byte")


def _v1_address(text: bytes, version: int) -> str:
    try:
        address = ipaddress.ip_address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProxyHeaderError(f"PROXY v1: {text[:50]!r} is not an IP address") from None
    if address.version != version or (version == 6 and b"%" in text):
        raise ProxyHeaderError(f"PROXY v1: {text[:50]!r} is not a TCP{version} address")
    return str(address)


def _v1_port(text: bytes) -> int:
    # decimal, no sign, no leading zero (the specification's own rule), at most 65535
    if not (text.isdigit() and len(text) <= 5 and (text == b"0" or not text.startswith(b"0"))):
        raise ProxyHeaderError(f"PROXY v1: {text[:10]!r} is not a port number")
    port = int(text)
    if port > 65535:
        raise ProxyHeaderError(f"PROXY v1: port {port} is out of range")
    return port


# -- v2: a binary block -----------------------------------------------------------------------


def _parse_v2(data: bytes) -> tuple[ProxyHeader, int] | None:
    signature = data[: len(V2_SIGNATURE)]
    if not V2_SIGNATURE.startswith(signature):
        raise ProxyHeaderError(f"not a PROXY v2 signature: {signature!r}")
    if len(data) > len(V2_SIGNATURE):
        version_command = data[12]
        if version_command >> 4 != 2:
            raise ProxyHeaderError(f"PROXY v2: version {version_command >> 4}, not 2")
        command = version_command & 0x0F
        if command not in (_V2_LOCAL, _V2_PROXY):
            raise ProxyHeaderError(f"PROXY v2: unknown command {command}")
    if len(data) < V2_FIXED:
        return None
    command = data[12] & 0x0F
    family, transport = data[13] >> 4, data[13] & 0x0F
    length = int.from_bytes(data[14:16], "big")
    total = V2_FIXED + length
    if total > MAX_V2:
        raise ProxyHeaderError(f"PROXY v2 header of {total} bytes (at most {MAX_V2})")
    if command == _V2_LOCAL:  # the balancer's own connection: the block is discarded unread
        return (ProxyHeader(2, None), total) if len(data) >= total else None
    if family not in _ADDRESS_BYTES or transport > 2:
        raise ProxyHeaderError(f"PROXY v2: unknown address family {family} or transport")
    if length < _ADDRESS_BYTES[family]:
        raise ProxyHeaderError(f"PROXY v2: {length} bytes cannot hold the addresses")
    if len(data) < total:
        return None
    block = data[V2_FIXED:total]
    _check_tlvs(block[_ADDRESS_BYTES[family] :])
    if family in (_AF_UNSPEC, _AF_UNIX):
        return ProxyHeader(2, None), total
    if transport != _STREAM:
        raise ProxyHeaderError("PROXY v2: a datagram header on a TCP connection")
    layout = _TCP4 if family == _AF_INET else _TCP6
    source, destination, source_port, destination_port = layout.unpack_from(block)
    return (
        ProxyHeader(
            2,
            (str(ipaddress.ip_address(source)), source_port),
            (str(ipaddress.ip_address(destination)), destination_port),
        ),
        total,
    )


def _check_tlvs(tlvs: bytes) -> None:
    """Type-length-value records fill the rest exactly; their contents are not used."""
    offset = 0
    while offset < len(tlvs):
        if len(tlvs) - offset < 3:
            raise ProxyHeaderError("PROXY v2: a truncated TLV")
        offset += 3 + int.from_bytes(tlvs[offset + 1 : offset + 3], "big")
        if offset > len(tlvs):
            raise ProxyHeaderError("PROXY v2: a TLV longer than the header")
