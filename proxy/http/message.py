"""The protocol-neutral message model: what a protocol layer hands an exchange, and back.

HTTP/1.1 and HTTP/2 differ in framing, not in what a request or a response *is*: a method,
a target, an authority, a list of fields, a body that arrives in chunks and an end. Each
protocol layer turns its own framing into these values (``proxy.http.h1``,
``proxy.http.h2``), the header policy (``proxy.http.policy``) checks and rewrites them,
and the exchange (``proxy.http.exchange``) relays them. Fields are ``(name, value)`` byte
pairs as they arrived: HTTP/1.1 names keep their case, HTTP/2 names are lower case.

Plain slotted classes rather than dataclasses: one of each is built per request, and a
dataclass ``__init__`` costs several times as much.
"""

from __future__ import annotations

from collections.abc import Sequence
from http import HTTPStatus

Fields = Sequence[tuple[bytes, bytes]]

# How a body is delimited: none, by a known length, in chunks of unknown total, or (a
# response only) by the end of the connection.
NO_BODY, LENGTH, CHUNKED, UNTIL_CLOSE = 0, 1, 2, 3


class HTTPError(Exception):
    """A message the proxy refuses: the status to answer and why (for the log).

    ``malformed`` marks a request that breaks the protocol's own rules rather than the
    proxy's policy: HTTP/2 resets such a stream (RFC 9113 8.1.1) instead of answering it.
    """

    def __init__(self, status: int, reason: str, *, malformed: bool = False) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.malformed = malformed


class RequestHead:
    """A request head as a protocol layer parsed it, not yet checked.

    ``authority`` is HTTP/2's ``:authority`` (None for HTTP/1.1, whose ``Host`` is one of
    the fields); ``version`` is ``b"1.0"``, ``b"1.1"`` or ``b"2"``. ``body`` says whether
    a body follows when no field says so (an HTTP/2 HEADERS frame without END_STREAM).
    """

    __slots__ = ("authority", "body", "fields", "method", "target", "version")

    def __init__(
        self,
        method: bytes,
        target: bytes,
        version: bytes,
        fields: Fields,
        authority: bytes | None = None,
        body: bool = False,
    ) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.fields = fields
        self.authority = authority
        self.body = body


class Request:
    """A checked request: where it goes and what crosses to the upstream.

    ``fields`` are the end-to-end fields to forward (hop-by-hop ones and client-sent
    forwarding headers already removed), ``forwarding`` the forwarding fields this hop adds.
    """

    __slots__ = (
        "fields",
        "forwarding",
        "framing",
        "host",
        "keep_alive",
        "length",
        "method",
        "target",
        "version",
        "websocket",
    )

    def __init__(
        self,
        method: bytes,
        host: bytes,
        target: bytes,  # origin-form, as sent upstream
        version: bytes,
        framing: int,  # NO_BODY | LENGTH | CHUNKED
        length: int,
        keep_alive: bool,  # the client connection may carry another request (HTTP/1.x)
        websocket: bool,  # a WebSocket handshake, forwarded with its Upgrade
        fields: list[tuple[bytes, bytes]],
        forwarding: Forwarding,
    ) -> None:
        self.method = method
        self.host = host
        self.target = target
        self.version = version
        self.framing = framing
        self.length = length
        self.keep_alive = keep_alive
        self.websocket = websocket
        self.fields = fields
        self.forwarding = forwarding


class Forwarding:
    """The forwarding fields one hop adds (``X-Forwarded-*``, ``Forwarded``), with their
    HTTP/1.1 lines made once: a keep-alive client asks for the same ones again and again,
    so :class:`proxy.http.policy.Peer` keeps them per ``Host``. (Every upstream speaks
    HTTP/1.1; were one to speak HTTP/2, ``fields`` is what it would encode.)"""

    __slots__ = ("fields", "h1")

    def __init__(self, fields: tuple[tuple[bytes, bytes], ...]) -> None:
        self.fields = fields
        self.h1 = b"".join([b"%s: %s\r\n" % field for field in fields])


class Response:
    """A checked response head from an upstream, ready for any protocol layer.

    ``fields`` are the end-to-end fields for the client (hop-by-hop ones removed, the
    site's HSTS added); ``framing`` is how the upstream delimits the body (the client's
    framing is the protocol layer's choice); ``keep_alive``: the upstream connection may
    serve another request afterwards.
    """

    __slots__ = ("fields", "framing", "keep_alive", "length", "reason", "status")

    def __init__(
        self,
        status: int,
        reason: bytes,
        fields: list[tuple[bytes, bytes]],
        framing: int,
        length: int,
        keep_alive: bool,
    ) -> None:
        self.status = status
        self.reason = reason
        self.fields = fields
        self.framing = framing
        self.length = length
        self.keep_alive = keep_alive


def error_body(status: int) -> bytes:
    """The body of the proxy's own answer for ``status``: the status line's words only (the
    reason, for the log, may name upstreams and is not for clients)."""
    return b"%d %s\n" % (status, HTTPStatus(status).phrase.encode())
