"""The PROXY protocol parser (proxy/tls/proxy_protocol.py): bytes in, a header or an error.

Examples from the specification (haproxy's proxy-protocol.txt), what the balancers send, and
properties over generated headers: every header round-trips, every proper prefix of one asks
for more bytes, bytes after it are left alone, and no input makes the parser do anything
but answer or raise ProxyHeaderError.
"""

from __future__ import annotations

import contextlib
import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.config import ConfigError, parse_config
from proxy.envconfig import parse_with_env
from proxy.tls.proxy_protocol import (
    MAX_V2,
    V1_MAX,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    parse,
)

TLS_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"


def v1(source: str, destination: str, sport: int, dport: int) -> bytes:
    family = "TCP6" if ":" in source else "TCP4"
    return f"PROXY {family} {source} {destination} {sport} {dport}\r\n".encode()


def v2(
    source: str,
    destination: str,
    sport: int,
    dport: int,
    *,
    command: int = 0x1,
    tlvs: bytes = b"",
    transport: int = 0x1,
) -> bytes:
    a, b = ipaddress.ip_address(source), ipaddress.ip_address(destination)
    family = 0x1 if a.version == 4 else 0x2
    block = a.packed + b.packed + struct.pack("!HH", sport, dport) + tlvs
    return (
        V2_SIGNATURE
        + bytes([0x20 | command, family << 4 | transport])
        + len(block).to_bytes(2, "big")
        + block
    )


def v2_raw(command: int, family_transport: int, block: bytes) -> bytes:
    return (
        V2_SIGNATURE
        + bytes([0x20 | command, family_transport])
        + len(block).to_bytes(2, "big")
        + block
    )


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + len(value).to_bytes(2, "big") + value


# -- examples -------------------------------------------------------------------------------


def test_v1_tcp4_and_tcp6() -> None:
    line = b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\n"
    assert parse(line + TLS_HELLO) == (
        ProxyHeader(1, ("192.0.2.1", 56324), ("198.51.100.7", 443)),
        len(line),
    )
    line = b"PROXY TCP6 2001:db8::1 2001:db8::2 65535 0\r\n"
    assert parse(line) == (ProxyHeader(1, ("2001:db8::1", 65535), ("2001:db8::2", 0)), len(line))


def test_v1_unknown_keeps_the_connection_address() -> None:
    for line in (b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"):
        assert parse(line + b"GET") == (ProxyHeader(1, None), len(line))


def test_v2_proxy_over_ipv4_and_ipv6_with_tlvs_skipped() -> None:
    tlvs = tlv(0x01, b"h2") + tlv(0x05, b"\x00" * 16) + tlv(0x20, b"\x01\x00\x00\x00\x00")
    header = v2("203.0.113.9", "10.0.0.1", 40000, 8443, tlvs=tlvs)
    assert parse(header + TLS_HELLO) == (
        ProxyHeader(2, ("203.0.113.9", 40000), ("10.0.0.1", 8443)),
        len(header),
    )
    header = v2("2001:db8::7", "::1", 1, 2)
    assert parse(header) == (ProxyHeader(2, ("2001:db8::7", 1), ("::1", 2)), len(header))


def test_v2_local_keeps_the_connection_address_whatever_its_block() -> None:
    """A balancer's own health check: the block is discarded unread (the specification)."""
    for header in (
        v2_raw(0x0, 0x00, b""),
        v2("10.0.0.5", "10.0.0.1", 1, 2, command=0x0),
        v2_raw(0x0, 0x11, b"\xff" * 3),  # too short for the family it names: unread anyway
    ):
        assert parse(header + TLS_HELLO) == (ProxyHeader(2, None), len(header))


def test_v2_proxy_with_unspec_or_unix_keeps_the_connection_address() -> None:
    for header in (v2_raw(0x1, 0x00, b""), v2_raw(0x1, 0x31, b"/run/a.sock".ljust(216, b"\0"))):
        assert parse(header) == (ProxyHeader(2, None), len(header))


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(TLS_HELLO, id="a TLS ClientHello"),
        pytest.param(b"GET / HTTP/1.1\r\n", id="an HTTP request"),
        pytest.param(b"proxy TCP4 1.2.3.4 1.2.3.4 1 2\r\n", id="v1 lower case"),
        pytest.param(b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n", id="v1 LF only"),
        pytest.param(b"PROXY TCP4 1.2.3.4  1.2.3.4 1 2\r\n", id="v1 two spaces"),
        pytest.param(b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 \r\n", id="v1 trailing space"),
        pytest.param(b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n", id="v1 missing port"),
        pytest.param(b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n", id="v1 unknown protocol"),
        pytest.param(b"PROXY TCP4 ::1 ::1 1 2\r\n", id="v1 TCP4 with IPv6"),
        pytest.param(b"PROXY TCP6 1.2.3.4 1.2.3.4 1 2\r\n", id="v1 TCP6 with IPv4"),
        pytest.param(b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", id="v1 IPv6 scope"),
        pytest.param(b"PROXY TCP4 01.2.3.4 1.2.3.4 1 2\r\n", id="v1 leading zero in address"),
        pytest.param(b"PROXY TCP4 1.2.3.4 1.2.3.4 065535 2\r\n", id="v1 leading zero in port"),
        pytest.param(b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 2\r\n", id="v1 port out of range"),
        pytest.param(b"PROXY TCP4 1.2.3.4 1.2.3.4 +1 2\r\n", id="v1 signed port"),
        pytest.param(b"PROXY TCP4 host 1.2.3.4 1 2\r\n", id="v1 name for address"),
        pytest.param(b"PROXY TCP4 1.2.3.4\x00", id="v1 NUL"),
        pytest.param(b"PROXY TCP4 1.2.3.4\r1.2.3.4", id="v1 lone CR"),
        pytest.param(b"PROXY " + b"1" * (V1_MAX - 6), id="v1 longer than 107 bytes"),
        pytest.param(b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\xc3\xa9\r\n", id="v1 non-ASCII"),
        pytest.param(V2_SIGNATURE[:5] + b"X", id="v2 wrong signature"),
        pytest.param(V2_SIGNATURE + b"\x11", id="v2 version 1"),
        pytest.param(V2_SIGNATURE + b"\x22", id="v2 unknown command"),
        pytest.param(v2_raw(0x1, 0x41, b"\0" * 12), id="v2 unknown family"),
        pytest.param(v2_raw(0x1, 0x13, b"\0" * 12), id="v2 unknown transport"),
        pytest.param(v2_raw(0x1, 0x11, b"\0" * 11), id="v2 block shorter than IPv4 addresses"),
        pytest.param(v2_raw(0x1, 0x21, b"\0" * 35), id="v2 block shorter than IPv6 addresses"),
        pytest.param(v2("1.2.3.4", "1.2.3.4", 1, 2, transport=0x2), id="v2 datagram"),
        pytest.param(v2("1.2.3.4", "1.2.3.4", 1, 2, tlvs=b"\x01\x00"), id="v2 truncated TLV"),
        pytest.param(
            v2("1.2.3.4", "1.2.3.4", 1, 2, tlvs=b"\x01\x00\x05abc"), id="v2 TLV past the end"
        ),
        pytest.param(
            V2_SIGNATURE + b"\x21\x11" + (MAX_V2 - 15).to_bytes(2, "big"), id="v2 oversized"
        ),
    ],
)
def test_malformed_headers_are_refused(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse(data)


def test_a_wrong_first_byte_is_refused_at_once() -> None:
    """No waiting for a line end that a client speaking TLS or HTTP will never send."""
    for first in (b"\x16", b"G", b"\x00", b"Q"):
        with pytest.raises(ProxyHeaderError):
            parse(first)


def test_the_largest_v2_header_allowed_is_accepted() -> None:
    header = v2("1.2.3.4", "5.6.7.8", 1, 2, tlvs=tlv(0xEE, b"x" * (MAX_V2 - 16 - 12 - 3)))
    assert len(header) == MAX_V2
    assert parse(header) == (ProxyHeader(2, ("1.2.3.4", 1), ("5.6.7.8", 2)), MAX_V2)


# -- properties -----------------------------------------------------------------------------

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)
tlv_lists = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=4).map(
    lambda items: b"".join(tlv(kind, value) for kind, value in items)
)


@st.composite
def headers(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    family = draw(st.sampled_from([ipv4, ipv6]))
    source, destination = draw(family), draw(family)
    sport, dport = draw(ports), draw(ports)
    expected = ProxyHeader(0, (source, sport), (destination, dport))
    if draw(st.booleans()):
        return v1(source, destination, sport, dport), ProxyHeader(1, *_addresses(expected))
    data = v2(source, destination, sport, dport, tlvs=draw(tlv_lists))
    return data, ProxyHeader(2, *_addresses(expected))


def _addresses(header: ProxyHeader) -> tuple[tuple[str, int] | None, tuple[str, int] | None]:
    return header.source, header.destination


@given(headers(), st.binary(max_size=64))
def test_every_header_round_trips_and_leaves_what_follows(
    case: tuple[bytes, ProxyHeader], after: bytes
) -> None:
    data, expected = case
    assert parse(data + after) == (expected, len(data))


@given(headers())
def test_every_proper_prefix_asks_for_more(case: tuple[bytes, ProxyHeader]) -> None:
    data, _ = case
    for end in range(len(data)):
        assert parse(data[:end]) is None


@given(st.binary(max_size=300))
def test_any_bytes_give_a_header_more_please_or_an_error(data: bytes) -> None:
    try:
        result = parse(data)
    except ProxyHeaderError:
        return
    if result is not None:
        header, used = result
        assert 0 < used <= len(data) and header.version in (1, 2)


@given(st.binary(min_size=1, max_size=200))
def test_bytes_after_a_signature_never_crash_the_v2_parser(block: bytes) -> None:
    with contextlib.suppress(ProxyHeaderError):
        parse(V2_SIGNATURE + block)


# -- the setting ----------------------------------------------------------------------------

SITE = {"sites": [{"hosts": ["a.test"], "upstreams": ["http://127.0.0.1:8000"]}]}


def test_the_setting_takes_networks_and_addresses() -> None:
    config = parse_config({"server": {"proxy_protocol": ["10.0.0.0/8", "::1"]}, **SITE})
    assert [str(n) for n in config.server.proxy_protocol] == ["10.0.0.0/8", "::1/128"]
    assert parse_config(SITE).server.proxy_protocol == ()
    with pytest.raises(ConfigError, match=r"^server.proxy_protocol\[1\]: expected a network"):
        parse_config({"server": {"proxy_protocol": ["10.0.0.0/8", "balancer"]}, **SITE})
    from_env = parse_with_env(SITE, {"TLSPROXY_PROXY_PROTOCOL": "10.0.0.0/8,192.0.2.1"})
    assert [str(n) for n in from_env.server.proxy_protocol] == ["10.0.0.0/8", "192.0.2.1/32"]
