"""HTTP/1.1 message parsing for the data path: llhttp (``httptools``) behind two small readers.

Bytes go in, events come out as calls on a handler; no I/O here. llhttp is strict by
default (no bare LF, no obs-fold, no CL+TE, no chunk-size overflow); the proxy's own rules
in :mod:`proxy.http.policy` hold on top of it. One parser per direction: requests from clients,
responses from upstreams.
"""

from __future__ import annotations

from typing import Protocol

import httptools

from proxy.http.message import HTTPError, RequestHead

_VERSIONS = {"1.1": b"1.1", "1.0": b"1.0"}


def _feed(
    parser: httptools.HttpRequestParser | httptools.HttpResponseParser,
    data: bytes,
    status: int,
    what: str,
) -> bytes | None:
    """Feed llhttp; our own HTTPError from a callback, or llhttp's as ``status``.

    After an accepted Upgrade (or 101) head, the bytes that follow it are returned.
    """
    try:
        parser.feed_data(data)
    except httptools.HttpParserUpgrade as upgrade:
        return data[upgrade.args[0] :]
    except httptools.HttpParserCallbackError as exc:
        if isinstance(exc.__context__, HTTPError):
            raise exc.__context__ from None
        raise
    except httptools.HttpParserError as exc:
        raise HTTPError(status, f"{what}: {exc}") from None
    return None


def _version(text: str) -> bytes:
    return _VERSIONS.get(text) or text.encode("latin-1")


class RequestHandler(Protocol):
    def request_begin(self) -> None: ...

    def request_head(self, head: RequestHead) -> None: ...

    def request_body(self, data: bytes) -> None: ...

    def request_end(self) -> None: ...


class _Closed:
    """The handler of a closed RequestReader: nothing reaches it (the parser is inert too)."""

    def request_begin(self) -> None:
        pass

    def request_head(self, head: RequestHead) -> None:
        pass

    def request_body(self, data: bytes) -> None:
        pass

    def request_end(self) -> None:
        pass


_CLOSED_HANDLER = _Closed()
_CLOSED_PARSER = httptools.HttpRequestParser(_CLOSED_HANDLER)  # no callbacks: parses into thin air


class RequestReader:
    """Parses requests from a client; enforces the head size and header count limits."""

    __slots__ = (
        "_handler",
        "_headers",
        "_max_bytes",
        "_max_headers",
        "_parser",
        "_size",
        "_target",
    )

    def __init__(self, handler: RequestHandler, max_header_bytes: int, max_headers: int) -> None:
        self._handler = handler
        self._max_bytes = max_header_bytes
        self._max_headers = max_headers
        self._parser = httptools.HttpRequestParser(self)
        self._target = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._size = 0

    def feed(self, data: bytes) -> bytes | None:
        """Parse ``data``; after a request with an Upgrade header, return the bytes that
        follow it. llhttp stops there for good, so the parser is replaced: what the caller
        feeds next is parsed as a new request (when the upstream did not switch)."""
        rest = _feed(self._parser, data, 400, "malformed request")
        if rest is not None and self._handler is not _CLOSED_HANDLER:
            self._parser = httptools.HttpRequestParser(self)
        return rest

    def close(self) -> None:
        """Forget the parser and the handler (the connection is gone).

        Both point back here, so without this a closed connection's objects (its transport
        and TLS state too) wait for the cyclic garbage collector: about 20 objects per
        connection, 3 % of the CPU with a new connection per request.
        """
        self._parser = _CLOSED_PARSER
        self._handler = _CLOSED_HANDLER

    def on_message_begin(self) -> None:
        self._target = b""
        self._headers = []
        self._size = 0
        self._handler.request_begin()

    def on_url(self, url: bytes) -> None:
        self._target += url
        self._size += len(url)
        if self._size > self._max_bytes:
            raise HTTPError(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        self._size += len(name) + len(value) + 4
        if self._size > self._max_bytes:
            raise HTTPError(431, f"request head larger than {self._max_bytes} bytes")
        if len(self._headers) > self._max_headers:
            raise HTTPError(431, f"more than {self._max_headers} header fields")

    def on_headers_complete(self) -> None:
        parser = self._parser
        headers, self._headers = self._headers, []  # not kept while the connection idles
        text = parser.get_http_version()
        version = _VERSIONS.get(text)
        if version is None:  # HTTP/2 comes by ALPN, never in a request line
            raise HTTPError(505, f"HTTP/{text} is not supported here")
        self._handler.request_head(RequestHead(parser.get_method(), self._target, version, headers))

    def on_body(self, body: bytes) -> None:
        self._handler.request_body(body)

    def on_message_complete(self) -> None:
        self._handler.request_end()


class ResponseHandler(Protocol):
    def response_head(
        self, status: int, reason: bytes, version: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None: ...

    def response_body(self, data: bytes) -> None: ...

    def response_end(self) -> None: ...


class ResponseReader:
    """Parses responses from an upstream.

    llhttp cannot be told that a response answers HEAD (it would wait for the body that
    Content-Length announces), so after such a head the message ends here and the parser
    is replaced once the current bytes are consumed.
    """

    __slots__ = ("_discard", "_headers", "_parser", "_reason", "handler", "head_request")

    def __init__(self, handler: ResponseHandler) -> None:
        self.handler = handler
        self._parser = httptools.HttpResponseParser(self)
        self._headers: list[tuple[bytes, bytes]] = []
        self._reason = b""
        self._discard = False
        self.head_request = False

    def feed(self, data: bytes) -> bytes | None:
        """Parse ``data``; after a 101 head, return the bytes that follow it (tunnel data)."""
        rest = _feed(self._parser, data, 502, "malformed response from upstream")
        if self._discard:
            self._discard = False
            self._parser = httptools.HttpResponseParser(self)
        return rest

    def on_message_begin(self) -> None:
        self._headers = []
        self._reason = b""

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        self.handler.response_head(
            status, self._reason, _version(parser.get_http_version()), self._headers
        )
        if self.head_request and status >= 200:
            self._discard = True
            self.handler.response_end()

    def on_body(self, body: bytes) -> None:
        if self._discard:
            raise HTTPError(502, "upstream sent a body after a response to HEAD")
        self.handler.response_body(body)

    def on_message_complete(self) -> None:
        if not self._discard:
            self.handler.response_end()
