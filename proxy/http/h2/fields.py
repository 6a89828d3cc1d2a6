"""An HTTP/2 request's field block, checked (RFC 9113 8.2-8.3) and turned into a request head.

The ``h2`` library's own header validation is switched off for speed (it roughly halves
the requests per CPU-second); what it checked, and what RFC 9113 makes a *malformed*
request, is checked here in one pass instead, before anything can go upstream:
- names: lower case, no control characters, spaces or bytes above 0x7e; values: no NUL,
  CR or LF, no leading or trailing space or tab (8.2.1);
- pseudo-fields: only ``:method``, ``:scheme``, ``:authority`` and ``:path``, each at most
  once, all before the regular fields; ``:method``, ``:scheme`` and ``:path`` present, the
  path not empty, the scheme ``https`` (this is a TLS listener) (8.3.1);
- connection-specific fields (``Connection``, ``Keep-Alive``, ``Proxy-Connection``,
  ``Transfer-Encoding``, ``Upgrade``) and ``TE`` other than ``trailers`` (8.2.2).
A malformed request is a stream error (:class:`HTTPError` with ``malformed``). Cookie
crumbs are joined for the HTTP/1.1 upstream (8.2.3). The rest of the policy (Host, length,
forwarding fields) is :mod:`proxy.http.policy`'s, as for HTTP/1.1.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from proxy.http.message import HTTPError, RequestHead

VERSION = b"2.0"
_BAD_NAME = re.compile(rb"[^!#$%&'*+\-.^_`|~0-9a-z]").search  # a lower-case token only
_CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path"})
_CHECKED: set[tuple[bytes, bytes]] = set()  # regular fields that passed: clients repeat them
_CHECKED_PSEUDO: set[tuple[bytes, bytes]] = set()  # pseudo-fields whose value passed
_BAD_PSEUDO_VALUE = re.compile(rb"[\r\n\0 ]").search
_CHECKED_MAX = 4096  # then the set starts over (bounded whatever clients send)


def _malformed(why: str) -> HTTPError:
    return HTTPError(400, f"malformed HTTP/2 request: {why}", malformed=True)


def request_head(
    block: Sequence[tuple[bytes, bytes]], *, body: bool, max_bytes: int
) -> RequestHead:
    """The request head of one HEADERS block (raises HTTPError, ``malformed`` for a
    protocol error, 431 for a block over ``max_bytes`` decoded).

    ``body``: the block did not end the stream (DATA frames may follow).
    """
    size = 0
    pseudo: dict[bytes, bytes] = {}
    fields: list[tuple[bytes, bytes]] = []
    cookies: list[bytes] = []
    checked = _CHECKED
    checked_pseudo = _CHECKED_PSEUDO
    for field in block:
        name, value = field
        size += len(name) + len(value) + 4  # as an HTTP/1.1 line would count it
        if field in checked:
            fields.append(field)
            continue
        if name[:1] == b":":
            if fields or cookies:
                raise _malformed(f"{name!r} after a regular field")
            if name not in _PSEUDO or name in pseudo:
                raise _malformed(f"unknown or repeated pseudo-field {name!r}")
            if field not in checked_pseudo:
                if _BAD_PSEUDO_VALUE(value):
                    raise _malformed(f"CR, LF, NUL or space in {name.decode()}")
                if len(checked_pseudo) >= _CHECKED_MAX:
                    checked_pseudo.clear()
                checked_pseudo.add(field)
            pseudo[name] = value
            continue
        if not name or _BAD_NAME(name):
            raise _malformed(f"invalid field name {name!r}")
        if b"\r" in value or b"\n" in value or b"\0" in value:
            raise _malformed(f"CR, LF or NUL in the value of {name.decode()}")
        if (value[:1] in b" \t" and value) or (value[-1:] in b" \t" and value):
            raise _malformed(f"space around the value of {name.decode()}")
        if name in _CONNECTION_SPECIFIC:
            raise _malformed(f"connection-specific field {name.decode()}")
        if name == b"te":
            if value != b"trailers":
                raise _malformed("TE other than 'trailers'")
            continue  # hop-by-hop: not forwarded
        if name == b"cookie":
            cookies.append(value)
            continue
        fields.append(field)
        if len(checked) >= _CHECKED_MAX:
            checked.clear()
        checked.add(field)
    if size > max_bytes:
        raise HTTPError(431, f"request fields larger than {max_bytes} bytes")
    method = pseudo.get(b":method")
    path = pseudo.get(b":path")
    if not method or not path or pseudo.get(b":scheme") is None:
        raise _malformed(":method, :scheme and :path are required")
    if pseudo[b":scheme"] != b"https":
        raise _malformed(f"scheme {pseudo[b':scheme']!r} on a TLS connection")
    if cookies:
        fields.append((b"cookie", b"; ".join(cookies)))
    authority = pseudo.get(b":authority")
    if authority is None and not any(name == b"host" for name, _ in fields):
        raise _malformed("neither :authority nor Host")
    return RequestHead(method, path, VERSION, fields, authority, body)
