"""HTTP/1.1 serialisation: heads, chunk framing and the proxy's own error answers.

The one place that knows how HTTP/1.1 writes a message (RFC 9112); the message model and
the header policy know nothing of it. Used both ways: towards clients that speak HTTP/1.x
(:mod:`proxy.http.h1.server`) and towards upstreams, which always do
(:mod:`proxy.http.upstream`).
"""

from __future__ import annotations

from http import HTTPStatus

from proxy.http.message import Request, Response, error_body

CHUNK_END = b"\r\n"
LAST_CHUNK = b"0\r\n\r\n"
_CHUNKED_LINE = b"transfer-encoding: chunked\r\n"
_CLOSE_LINE = b"connection: close\r\n"
_UPGRADE_LINE = b"connection: upgrade\r\n"


def request_head(request: Request) -> bytes:
    """The head sent upstream: origin-form target, Host first, forwarding fields last."""
    lines = [b"%s %s HTTP/1.1\r\nhost: %s\r\n" % (request.method, request.target, request.host)]
    for field in request.fields:
        lines.append(b"%s: %s\r\n" % field)
    lines.append(request.forwarding.h1)
    lines.append(b"\r\n")
    return b"".join(lines)


def response_head(response: Response, *, chunked: bool, close: bool) -> bytes:
    """The head for an HTTP/1.x client. ``chunked``: the body goes in chunks we frame;
    ``close``: the connection ends after this response."""
    lines = [b"HTTP/1.1 %d %s\r\n" % (response.status, response.reason)]
    for field in response.fields:
        lines.append(b"%s: %s\r\n" % field)
    if chunked:
        lines.append(_CHUNKED_LINE)
    if response.status == 101:
        lines.append(_UPGRADE_LINE)
    elif close:
        lines.append(_CLOSE_LINE)
    lines.append(b"\r\n")
    return b"".join(lines)


def chunk(data: bytes) -> list[bytes]:
    """``data`` as one chunk (three pieces: the caller joins them with what else it sends)."""
    return [b"%x\r\n" % len(data), data, CHUNK_END]


def error_answer(status: int, head_only: bool) -> tuple[bytes, int]:
    """The proxy's own answer for ``status`` (and the connection closes after it); returns
    the bytes and the body's length (for the access log)."""
    body = error_body(status)
    head = (
        b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n"
        % (status, HTTPStatus(status).phrase.encode(), len(body))
    )
    return (head if head_only else head + body), len(body)
