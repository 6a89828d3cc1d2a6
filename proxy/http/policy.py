"""What a request or response head may be, and what crosses the proxy: pure, no I/O.

Field syntax is the parser's job: llhttp, strict, refuses header names that are not
tokens, control characters (NUL, bare CR, LF, ...) in values and obs-fold before anything
reaches this module (tests/test_http_strict.py holds it to that). The rules here are the
proxy's own and hold whichever parser feeds them; one pass over the headers both checks
and rewrites them:
- anything an upstream could frame differently from us is refused (RFC 9112 6.3, 11.2):
  Content-Length with Transfer-Encoding, several or malformed Content-Length values,
  Transfer-Encoding other than ``chunked`` or on HTTP/1.0, versions other than 1.0/1.1;
- hop-by-hop headers never cross (RFC 9110 7.6.1), nor what ``Connection`` names;
- client-sent forwarding headers are believed only from ``trusted_proxies``;
- header names with an underscore are dropped (nginx's ``underscores_in_headers off``):
  WSGI and CGI servers map ``_`` and ``-`` to the same variable, so ``X_Forwarded_For``
  would reach such an app as the header the proxy sets;
- ``Host`` is forwarded unchanged and must be one well-formed value.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

RawHeaders = Sequence[tuple[bytes, bytes]]

NO_BODY, LENGTH, CHUNKED, UNTIL_CLOSE = 0, 1, 2, 3

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

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_MAX_DIGITS = 18  # a Content-Length longer than this is refused (it would not fit int64)
_HOST = re.compile(
    rb"(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})+(?::[0-9]{1,5})?"
    rb"|\[[0-9A-Fa-f:.]+\](?::[0-9]{1,5})?"
)
_ABSOLUTE = re.compile(rb"https?://([^/?#@]+)([^#]*)", re.IGNORECASE)
_VALID_HOSTS: set[bytes] = set()  # Host values that matched _HOST: requests repeat a few
_VALID_HOSTS_MAX = 1024  # then the cache starts over (bounded whatever clients send)


class HTTPError(Exception):
    """A request the proxy refuses: the status to answer and why (for the log)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Peer:
    """What the proxy knows about one client address, computed once per address.

    It also remembers the forwarding lines per ``Host`` for requests that carry no
    forwarding headers of their own: a keep-alive connection asks for the same lines again
    and again.
    """

    __slots__ = ("_lines", "forwarded_for", "ip", "port", "trusted")

    _LINES_LIMIT = 64

    def __init__(self, ip: str, trusted: bool, port: bytes, forwarded_for: bytes) -> None:
        self.ip = ip
        self.trusted = trusted
        self.port = port  # the listener port the client connected to, for X-Forwarded-Port
        self.forwarded_for = forwarded_for  # the RFC 7239 "for=" value for ``ip``
        self._lines: dict[bytes, bytes] = {}

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

    def forwarding(self, host: bytes) -> bytes:
        """The forwarding header lines for a request to ``host`` that brought none."""
        lines = self._lines.get(host)
        if lines is None:
            if len(self._lines) >= self._LINES_LIMIT:
                self._lines.clear()
            ip = self.ip.encode()
            lines = self._lines[host] = (
                b"x-forwarded-for: %s\r\nx-forwarded-proto: https\r\nx-forwarded-port: %s\r\n"
                b"x-real-ip: %s\r\nx-forwarded-host: %s\r\nforwarded: %s\r\n"
                % (ip, self.port, ip, host, self._element(host))
            )
        return lines

    def _element(self, host: bytes) -> bytes:
        """This hop's RFC 7239 ``Forwarded`` element."""
        return b"for=" + self.forwarded_for + b";host=" + _quote(host) + b";proto=https"


class Request:
    """A checked request head and the head to send upstream.

    A plain slotted class, not a dataclass: one is built per request, and a frozen
    dataclass's ``__init__`` costs four times as much.
    """

    __slots__ = ("framing", "host", "keep_alive", "length", "target", "upstream_head", "websocket")

    def __init__(
        self,
        host: bytes,
        target: bytes,  # origin-form, as sent upstream
        framing: int,  # NO_BODY | LENGTH | CHUNKED
        length: int,
        keep_alive: bool,
        websocket: bool,
        upstream_head: bytes,
    ) -> None:
        self.host = host
        self.target = target
        self.framing = framing
        self.length = length
        self.keep_alive = keep_alive
        self.websocket = websocket
        self.upstream_head = upstream_head


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


def _without(lines: list[bytes], named: set[bytes]) -> list[bytes]:
    """``lines`` minus the header lines whose names ``Connection`` listed (rare)."""
    return [line for line in lines if line.split(b":", 1)[0].lower() not in named]


def _connection_rules(
    keep_alive: bool, connection: list[bytes], lines: list[bytes]
) -> tuple[bool, list[bytes]]:
    """The same rules both ways: ``close`` ends keep-alive, other named headers are hop-by-hop."""
    named = set(connection) - _CONNECTION_OPTIONS
    return keep_alive and b"close" not in connection, _without(lines, named) if named else lines


def parse_request(
    method: bytes, target: bytes, version: bytes, headers: RawHeaders, peer: Peer
) -> Request:
    """Check a request head and build the head to send upstream (raises HTTPError)."""
    if version != b"1.1" and version != b"1.0":
        raise HTTPError(505, f"HTTP/{version.decode('latin-1')} is not supported")
    if method == b"CONNECT":
        raise HTTPError(501, "CONNECT is not supported by a reverse proxy")
    host = b""
    hosts = 0
    length_value = b""
    lengths = 0
    codings: list[bytes] = []
    connection: list[bytes] = []
    upgrade = b""
    received: dict[bytes, bytes] = {}
    lines: list[bytes] = []
    for name, value in headers:
        lname = name.lower()
        if lname not in _REQUEST_SPECIAL:
            if b"_" not in name:  # X_Forwarded_For would pose as ours to a WSGI/CGI app
                lines.append(b"%s: %s\r\n" % (name, value))
        elif lname == b"host":
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
            lines.append(b"expect: 100-continue\r\n")
        elif peer.trusted and lname in FORWARDING:
            previous = received.get(lname)
            received[lname] = value if previous is None else previous + b", " + value
    if hosts != 1 and version == b"1.1":
        raise HTTPError(400, "an HTTP/1.1 request needs exactly one Host header")
    if hosts > 1 or (host and host not in _VALID_HOSTS and not _valid_host(host)):
        raise HTTPError(400, "invalid Host header")
    keep_alive = version == b"1.1"
    if connection:
        keep_alive, lines = _connection_rules(keep_alive, connection, lines)
    if target[:1] != b"/":
        target = _origin_form(method, target, host)
    if codings:
        if version == b"1.0":
            raise HTTPError(400, "Transfer-Encoding on an HTTP/1.0 request")
        if lengths:
            raise HTTPError(400, "both Content-Length and Transfer-Encoding")
        if codings != [b"chunked"]:
            raise HTTPError(501, "only 'Transfer-Encoding: chunked' is supported")
        framing, length = CHUNKED, 0
        lines.append(b"transfer-encoding: chunked\r\n")
    elif lengths:
        if lengths > 1 or not _is_length(length_value):
            raise HTTPError(400, "invalid or repeated Content-Length")
        length = int(length_value)
        framing = LENGTH if length else NO_BODY
        lines.append(b"content-length: %d\r\n" % length)
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
            lines.append(b"connection: upgrade\r\nupgrade: websocket\r\n")
        elif b"h2c" in _tokens(upgrade):
            raise HTTPError(400, "Upgrade: h2c is not supported")
    lines.append(_forwarding(peer, host, received) if received else peer.forwarding(host))
    head = b"%s %s HTTP/1.1\r\nhost: %s\r\n%s\r\n" % (method, target, host, b"".join(lines))
    return Request(host, target, framing, length, keep_alive, websocket, head)


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


def _forwarding(peer: Peer, host: bytes, received: dict[bytes, bytes]) -> bytes:
    """Forwarding lines that extend what a trusted proxy in front of us sent."""
    ip = peer.ip.encode()
    element = peer._element(host)
    prior_for = received.get(b"x-forwarded-for")
    prior = received.get(b"forwarded")
    values = (
        (b"x-forwarded-for", ip if prior_for is None else prior_for + b", " + ip),
        (b"x-forwarded-proto", received.get(b"x-forwarded-proto", b"https")),
        (b"x-forwarded-host", received.get(b"x-forwarded-host", host)),
        (b"x-forwarded-port", received.get(b"x-forwarded-port", peer.port)),
        (b"x-real-ip", received.get(b"x-real-ip", ip)),
        (b"forwarded", element if prior is None else prior + b", " + element),
    )
    return b"".join(b"%s: %s\r\n" % pair for pair in values)


class Response:
    """A checked upstream response head, re-framed for the client (slotted, as Request)."""

    __slots__ = ("client_chunked", "head", "keep_alive", "length", "upstream_framing")

    def __init__(
        self,
        head: bytes,
        upstream_framing: int,  # how to read the body from the upstream
        length: int,
        client_chunked: bool,  # the body goes to the client in chunks we frame
        keep_alive: bool,  # the upstream connection may serve another request
    ) -> None:
        self.head = head
        self.upstream_framing = upstream_framing
        self.length = length
        self.client_chunked = client_chunked
        self.keep_alive = keep_alive


def parse_response(
    status: int,
    reason: bytes,
    version: bytes,
    headers: RawHeaders,
    *,
    head_request: bool,
    client_http10: bool,
    close: bool,
    hsts: bytes = b"",
) -> Response:
    """Check an upstream response head and build the head for the client (raises HTTPError).

    ``hsts`` (a whole ``Strict-Transport-Security`` line) is added unless the upstream set
    that header itself.
    """
    lines: list[bytes] = []
    length_value = b""
    lengths = 0
    codings: list[bytes] = []
    connection: list[bytes] = []
    for name, value in headers:
        lname = name.lower()
        if lname not in _RESPONSE_SPECIAL:
            lines.append(b"%s: %s\r\n" % (name, value))
        elif lname == b"content-length":
            length_value = value
            lengths += 1
        elif lname == b"transfer-encoding":
            codings += _tokens(value) or [b""]
        elif lname == b"connection":
            connection += _tokens(value)
        elif lname == b"strict-transport-security":
            hsts = b""  # the upstream's own policy wins
            lines.append(b"%s: %s\r\n" % (name, value))
        elif status == 101 and lname == b"upgrade":
            lines.append(b"%s: %s\r\n" % (name, value))
    if lengths and (lengths > 1 or not _is_length(length_value)):
        raise HTTPError(502, "upstream sent an invalid or repeated Content-Length")
    if codings and (lengths or codings != [b"chunked"]):
        raise HTTPError(502, "upstream sent a Transfer-Encoding the proxy cannot frame")
    keep_alive = version == b"1.1"
    if connection:
        keep_alive, lines = _connection_rules(keep_alive, connection, lines)
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
        lines.append(b"content-length: %s\r\n" % length_value)
    chunked = framing in (CHUNKED, UNTIL_CLOSE) and not client_http10
    if chunked:
        lines.append(b"transfer-encoding: chunked\r\n")
    if status == 101:
        lines.append(b"connection: upgrade\r\n")
    elif close or client_http10:
        lines.append(b"connection: close\r\n")
    if hsts:
        lines.append(hsts)
    head = b"HTTP/1.1 %d %s\r\n%s\r\n" % (status, reason, b"".join(lines))
    return Response(head, framing, int(length_value) if lengths else 0, chunked, keep_alive)
