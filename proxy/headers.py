"""Header rewriting between client and upstream: pure functions, no I/O.

Rules (config-contract.md, "What the upstream receives"): hop-by-hop headers never cross
the proxy; client-sent forwarding headers are believed only from ``trusted_proxies``;
``Host`` is forwarded unchanged.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

Headers = list[tuple[bytes, bytes]]

# RFC 9110 section 7.6.1 plus the legacy names every proxy strips. The framing headers
# (content-length, transfer-encoding) are kept here because the HTTP layer re-frames the
# body from them; it never passes the client's framing bytes through.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
FORWARDING = frozenset(
    {
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"x-real-ip",
        b"forwarded",
    }
)


@dataclass(frozen=True, slots=True)
class Peer:
    """What the proxy knows about one client connection, computed once per connection."""

    ip: str
    trusted: bool
    port: bytes  # the listener port the client connected to, for X-Forwarded-Port
    forwarded_for: bytes  # the RFC 7239 "for=" value for ``ip``

    @classmethod
    def from_address(
        cls,
        ip: str,
        listen_port: int,
        trusted_networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
    ) -> Peer:
        address = ipaddress.ip_address(ip)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        trusted = any(address in network for network in trusted_networks)
        text = str(address)
        node = f'"[{text}]"' if address.version == 6 else text
        return cls(text, trusted, str(listen_port).encode(), node.encode())


def connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Header names listed in ``Connection`` (they are hop-by-hop too, RFC 9110 7.6.1)."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(tokens)


def _quote_if_needed(value: bytes) -> bytes:
    """RFC 7239 values that are not tokens (a host with a port: ':') must be quoted."""
    if any(c in value for c in b':[]"; ,='):
        return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return value


def upstream_request_headers(headers: Sequence[tuple[bytes, bytes]], peer: Peer) -> Headers:
    """The headers to send upstream for a request received from ``peer``."""
    drop = HOP_BY_HOP
    if any(name == b"connection" for name, _ in headers):
        drop = HOP_BY_HOP | connection_tokens(headers)
    out: Headers = []
    host = b""
    received: dict[bytes, bytes] = {}
    chunked = False
    for name, value in headers:
        if name in drop:
            continue
        if name in FORWARDING:
            if peer.trusted:
                previous = received.get(name)
                received[name] = value if previous is None else previous + b", " + value
            continue
        if name == b"host":
            host = value
        elif name == b"transfer-encoding":
            chunked = True
        out.append((name, value))
    if chunked:  # RFC 9112 6.3: Transfer-Encoding overrides and Content-Length must go
        out = [(n, v) for n, v in out if n != b"content-length"]
    ip = peer.ip.encode()
    prior_for = received.get(b"x-forwarded-for")
    out.append((b"x-forwarded-for", ip if prior_for is None else prior_for + b", " + ip))
    out.append((b"x-forwarded-proto", received.get(b"x-forwarded-proto", b"https")))
    out.append((b"x-forwarded-host", received.get(b"x-forwarded-host", host)))
    out.append((b"x-forwarded-port", received.get(b"x-forwarded-port", peer.port)))
    out.append((b"x-real-ip", received.get(b"x-real-ip", ip)))
    element = b"for=" + peer.forwarded_for + b";host=" + _quote_if_needed(host) + b";proto=https"
    prior = received.get(b"forwarded")
    out.append((b"forwarded", element if prior is None else prior + b", " + element))
    return out


def client_response_headers(
    headers: Sequence[tuple[bytes, bytes]], hsts: bytes | None, close: bool
) -> Headers:
    """The headers to send the client for an upstream response."""
    drop = HOP_BY_HOP
    if any(name == b"connection" for name, _ in headers):
        drop = HOP_BY_HOP | connection_tokens(headers)
    out: Headers = [(n, v) for n, v in headers if n not in drop]
    if hsts is not None and not any(n == b"strict-transport-security" for n, _ in out):
        out.append((b"strict-transport-security", hsts))
    if close:
        out.append((b"connection", b"close"))
    return out
