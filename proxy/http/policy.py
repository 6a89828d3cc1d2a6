"""What a request or response may be, and what of it crosses the proxy: pure, no I/O.

The rules here are the proxy's own and hold for every protocol layer; they work on the
message model (:mod:`proxy.http.message`). Field syntax is the protocol layer's job:
llhttp, strict, refuses HTTP/1.1 names that are not tokens, control characters in values
and obs-fold before anything reaches this module (tests/test_http_strict.py holds it to
that); the HTTP/2 layer checks its fields itself (:mod:`proxy.http.h2.fields`). One pass
over the fields both checks and rewrites them:
- anything an upstream could frame differently from us is refused (RFC 9112 6.3, 11.2):
  Content-Length with Transfer-Encoding, several or malformed Content-Length values,
  Transfer-Encoding other than ``chunked`` or on HTTP/1.0, versions other than 1.0/1.1/2;
- hop-by-hop fields never cross (RFC 9110 7.6.1), nor what ``Connection`` names;
- client-sent forwarding fields are believed only from ``trusted_proxies``;
- field names with an underscore are dropped (nginx's ``underscores_in_headers off``):
  WSGI and CGI servers map ``_`` and ``-`` to the same variable, so ``X_Forwarded_For``
  would reach such an app as the field the proxy sets;
- ``Host`` (or HTTP/2's ``:authority``) is forwarded unchanged and must be one
  well-formed value.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

from proxy.http.message import (
    CHUNKED,
    LENGTH,
    NO_BODY,
    UNTIL_CLOSE,
    Fields,
    Forwarding,
    HTTPError,
    Request,
    RequestHead,
    Response,
)

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",  # bodies are re-framed by the proxy, never passed through
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
_REQUEST_SPECIAL = HOP_BY_HOP | FORWARDING | {b"host", b"content-length", b"expect"}
_RESPONSE_SPECIAL = HOP_BY_HOP | {b"content-length", b"strict-transport-security"}
_CONNECTION_OPTIONS = frozenset({b"close", b"keep-alive", b"upgrade"})
_KEEP_ALIVE = [b"keep-alive"]
_EXPECT_CONTINUE = (b"expect", b"100-continue")
_WEBSOCKET = ((b"connection", b"upgrade"), (b"upgrade", b"websocket"))
_CHUNKED = (b"transfer-encoding", b"chunked")

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_MAX_DIGITS = 18  # a Content-Length longer than this is refused (it would not fit int64)
_HOST = re.compile(
    rb"(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})+(?::[0-9]{1,5})?"
    rb"|\[[0-9A-Fa-f:.]+\](?::[0-9]{1,5})?"
)
_ABSOLUTE = re.compile(rb"https?://([^/?#@]+)([^#]*)", re.IGNORECASE)
_VALID_HOSTS: set[bytes] = set()  # Host values that matched _HOST: requests repeat a few
_VALID_HOSTS_MAX = 1024  # then the cache starts over (bounded whatever clients send)


class Peer:
    """What the proxy knows about one client address, computed once per address.

    It also remembers the forwarding fields per ``Host`` for requests that carry no
    forwarding fields of their own: a keep-alive connection asks for the same ones again
    and again.
    """

    __slots__ = ("forwarded_for", "ip", "known", "port", "trusted")

    _LIMIT = 64

    def __init__(self, ip: str, trusted: bool, port: bytes, forwarded_for: bytes) -> None:
        self.ip = ip
        self.trusted = trusted
        self.port = port  # the listener port the client connected to, for X-Forwarded-Port
        self.forwarded_for = forwarded_for  # the RFC 7239 "for=" value for ``ip``
        self.known: dict[bytes, Forwarding] = {}  # forwarding fields per Host, made before

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

    def forwarding(self, host: bytes) -> Forwarding:
        """The forwarding fields for a request to ``host`` that brought none."""
        found = self.known.get(host)
        if found is None:
            if len(self.known) >= self._LIMIT:
                self.known.clear()
            ip = self.ip.encode()
            found = self.known[host] = Forwarding(
                (
                    (b"x-forwarded-for", ip),
                    (b"x-forwarded-proto", b"https"),
                    (b"x-forwarded-port", self.port),
                    (b"x-real-ip", ip),
                    (b"x-forwarded-host", host),
                    (b"forwarded", self.element(host)),
                )
            )
        return found

    def element(self, host: bytes) -> bytes:
        """This hop's RFC 7239 ``Forwarded`` element."""
        return b"for=" + self.forwarded_for + b";host=" + _quote(host) + b";proto=https"


_COMMON_TOKENS = {  # the usual values, as _tokens would return them (copied: callers extend)
    b"keep-alive": (b"keep-alive",),
    b"close": (b"close",),
    b"chunked": (b"chunked",),
}


def _tokens(value: bytes) -> list[bytes]:
    if b"," not in value:  # the usual "keep-alive", "close", "chunked"
        token = value.strip().lower()
        return [token] if token else []
    return [t.strip().lower() for t in value.split(b",") if t.strip()]


def _quote(value: bytes) -> bytes:
    """RFC 7239 values that are not tokens (a host with a port: ':') must be quoted."""
    if _TOKEN.fullmatch(value):
        return value
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _connection_rules(keep_alive: bool, connection: list[bytes]) -> tuple[bool, set[bytes]]:
    """The same rules both ways: ``close`` ends keep-alive; the other fields ``Connection``
    names are hop-by-hop (returned, usually none, for the caller to drop)."""
    return keep_alive and b"close" not in connection, set(connection) - _CONNECTION_OPTIONS


def _without(fields: list[tuple[bytes, bytes]], named: set[bytes]) -> list[tuple[bytes, bytes]]:
    return [field for field in fields if field[0].lower() not in named]


def check_request(head: RequestHead, peer: Peer) -> Request:
    """Check a request head and decide what of it goes upstream (raises HTTPError)."""
    method, target, version = head.method, head.target, head.version
    if version != b"1.1" and version != b"2.0" and version != b"1.0":
        raise HTTPError(505, f"HTTP/{version.decode('latin-1')} is not supported")
    if method == b"CONNECT":
        raise HTTPError(501, "CONNECT is not supported by a reverse proxy")
    host = head.authority or b""
    hosts = 0
    length_value = b""
    lengths = 0
    codings: list[bytes] = []
    connection: list[bytes] = []
    upgrade = b""
    received: dict[bytes, bytes] = {}
    fields: list[tuple[bytes, bytes]] = []
    for field in head.fields:
        name, value = field
        lname = name.lower()
        if lname not in _REQUEST_SPECIAL:
            if b"_" not in name:  # X_Forwarded_For would pose as ours to a WSGI/CGI app
                fields.append(field)
        elif lname == b"host":
            if head.authority is not None and value != head.authority:
                raise HTTPError(400, "Host differs from :authority", malformed=True)
            host = value
            hosts += 1
        elif lname == b"content-length":
            length_value = value
            lengths += 1
        elif lname == b"transfer-encoding":
            codings += _tokens(value) or [b""]
        elif lname == b"connection":
            connection += _tokens(value)
        elif lname == b"upgrade":
            upgrade = value.strip().lower()
        elif lname == b"expect":
            if value.strip().lower() != b"100-continue":
                raise HTTPError(417, "only 'Expect: 100-continue' is understood")
            fields.append(_EXPECT_CONTINUE)
        elif peer.trusted and lname in FORWARDING:
            previous = received.get(lname)
            received[lname] = value if previous is None else previous + b", " + value
    if head.authority is None:
        if hosts != 1 and version == b"1.1":
            raise HTTPError(400, "an HTTP/1.1 request needs exactly one Host header")
    elif not host:
        raise HTTPError(400, "no :authority", malformed=True)
    if hosts > 1 or (host and host not in _VALID_HOSTS and not _valid_host(host)):
        raise HTTPError(400, "invalid Host header")
    keep_alive = version == b"1.1"
    if connection:
        keep_alive, named = _connection_rules(keep_alive, connection)
        if named:
            fields = _without(fields, named)
    if target[:1] != b"/":
        target = _origin_form(method, target, host)
    if codings:
        if version != b"1.1":
            raise HTTPError(400, f"Transfer-Encoding on an HTTP/{version.decode()} request")
        if lengths:
            raise HTTPError(400, "both Content-Length and Transfer-Encoding")
        if codings != [b"chunked"]:
            raise HTTPError(501, "only 'Transfer-Encoding: chunked' is supported")
        framing, length = CHUNKED, 0
        fields.append(_CHUNKED)
    elif lengths:
        if lengths > 1 or not _is_length(length_value):
            raise HTTPError(400, "invalid or repeated Content-Length", malformed=True)
        length = int(length_value)
        framing = LENGTH if length else NO_BODY
        fields.append((b"content-length", b"%d" % length))
    elif head.body:  # an HTTP/2 body of unknown length: chunked to the upstream
        framing, length = CHUNKED, 0
        fields.append(_CHUNKED)
    else:
        framing, length = NO_BODY, 0
    websocket = False
    if upgrade:
        websocket = (
            upgrade == b"websocket"
            and b"upgrade" in connection
            and method == b"GET"
            and version == b"1.1"
        )
        if websocket:
            if framing != NO_BODY:  # its bytes could not be told from the tunnel's
                raise HTTPError(400, "a WebSocket handshake with a body")
            fields += _WEBSOCKET
        elif b"h2c" in _tokens(upgrade):
            raise HTTPError(400, "Upgrade: h2c is not supported")
    if received:
        forwarding = _forwarding(peer, host, received)
    else:
        forwarding = peer.known.get(host) or peer.forwarding(host)
    return Request(
        method, host, target, version, framing, length, keep_alive, websocket, fields, forwarding
    )


def _valid_host(host: bytes) -> bool:
    if _HOST.fullmatch(host) is None:
        return False
    if len(_VALID_HOSTS) >= _VALID_HOSTS_MAX:
        _VALID_HOSTS.clear()
    _VALID_HOSTS.add(host)
    return True


def _is_length(value: bytes) -> bool:
    """1 to 18 ASCII digits (``bytes.isdigit`` knows no other digits)."""
    return value.isdigit() and len(value) <= _MAX_DIGITS


def _origin_form(method: bytes, target: bytes, host: bytes) -> bytes:
    if target == b"*" and method == b"OPTIONS":
        return target
    absolute = _ABSOLUTE.fullmatch(target)
    if absolute is None:
        raise HTTPError(400, "invalid request target")
    if absolute.group(1).lower() != host.lower():
        raise HTTPError(400, "the absolute-form target names another host than Host")
    path = absolute.group(2)
    return path if path.startswith(b"/") else b"/" + path


def _forwarding(peer: Peer, host: bytes, received: dict[bytes, bytes]) -> Forwarding:
    """Forwarding fields that extend what a trusted proxy in front of us sent."""
    ip = peer.ip.encode()
    element = peer.element(host)
    prior_for = received.get(b"x-forwarded-for")
    prior = received.get(b"forwarded")
    return Forwarding(
        (
            (b"x-forwarded-for", ip if prior_for is None else prior_for + b", " + ip),
            (b"x-forwarded-proto", received.get(b"x-forwarded-proto", b"https")),
            (b"x-forwarded-host", received.get(b"x-forwarded-host", host)),
            (b"x-forwarded-port", received.get(b"x-forwarded-port", peer.port)),
            (b"x-real-ip", received.get(b"x-real-ip", ip)),
            (b"forwarded", element if prior is None else prior + b", " + element),
        )
    )


def check_response(
    status: int,
    reason: bytes,
    version: bytes,
    headers: Fields,
    *,
    head_request: bool,
    hsts: tuple[bytes, bytes] | None = None,
) -> Response:
    """Check an upstream's HTTP/1.x response head; decide what reaches the client (raises
    HTTPError). ``hsts`` (a site's ``Strict-Transport-Security`` field) is added unless the
    upstream set that field itself."""
    fields: list[tuple[bytes, bytes]] = []
    length_value = b""
    lengths = 0
    codings: list[bytes] = []
    connection: list[bytes] = []
    for field in headers:
        name, value = field
        lname = name.lower()
        if lname not in _RESPONSE_SPECIAL:
            fields.append(field)
        elif lname == b"content-length":
            length_value = value
            lengths += 1
        elif lname == b"transfer-encoding":
            codings += _tokens(value) or [b""]
        elif lname == b"connection":
            common = _COMMON_TOKENS.get(value)
            connection += common if common is not None else _tokens(value)
        elif lname == b"strict-transport-security":
            hsts = None  # the upstream's own policy wins
            fields.append(field)
        elif status == 101 and lname == b"upgrade":
            fields.append(field)
    if lengths and (lengths > 1 or not length_value.isdigit() or len(length_value) > _MAX_DIGITS):
        raise HTTPError(502, "upstream sent an invalid or repeated Content-Length")
    if codings and (lengths or codings != [b"chunked"]):
        raise HTTPError(502, "upstream sent a Transfer-Encoding the proxy cannot frame")
    keep_alive = version == b"1.1"
    if connection:
        if connection == _KEEP_ALIVE:  # nginx and uvicorn say so on every response
            keep_alive = True
        else:
            keep_alive, named = _connection_rules(keep_alive, connection)
            if named:
                fields = _without(fields, named)
    if head_request or status < 200 or status == 204 or status == 304:
        framing = NO_BODY
    elif codings:
        framing = CHUNKED
    elif lengths:
        framing = LENGTH
    else:
        framing = UNTIL_CLOSE
        keep_alive = False
    if lengths and (framing == LENGTH or head_request or status == 304):
        fields.append((b"content-length", length_value))
    if hsts is not None:
        fields.append(hsts)
    return Response(
        status, reason, fields, framing, int(length_value) if lengths else 0, keep_alive
    )
