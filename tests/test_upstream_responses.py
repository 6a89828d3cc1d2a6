"""What an upstream's response may be, and what of it reaches the client.

A scripted raw upstream answers ``GET /<case>`` with the bytes of that case, so each
malformed or unusual shape is tried over TLS through a real proxy process: framing the
proxy cannot trust becomes a 502 (the client never sees half a response), hop-by-hop
headers and what ``Connection`` names are dropped, and bodies are re-framed.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import LoopbackServer, ProxyProcess, https_request

HOST = "r.test"
HSTS = "max-age=600"

REFUSED = {
    "control byte in a value": b"HTTP/1.1 200 OK\r\nX-A: a\x01b\r\nContent-Length: 2\r\n\r\nok",
    "NUL in a value": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok",
    "bare CR in a value": b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 2\r\n\r\nok",
    "space in a name": b"HTTP/1.1 200 OK\r\nX A: b\r\nContent-Length: 2\r\n\r\nok",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 2\r\n\r\nok",
    "bare LF": b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
    "Content-Length and Transfer-Encoding": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n"
    ),
    "two Content-Lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
    "signed Content-Length": b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok",
    "gzip transfer coding": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nok",
    "switching protocols unasked": (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"
    ),
}
PASSED = {
    "hop-by-hop": (
        b"HTTP/1.1 200 OK\r\nConnection: X-Secret, keep-alive\r\nX-Secret: 1\r\n"
        b"Keep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nX-Kept: 1\r\n"
        b"Content-Length: 2\r\n\r\nok"
    ),
    "until close": b"HTTP/1.1 200 OK\r\nX-Kept: 1\r\n\r\nuntil the upstream closes",
    "chunked with trailers": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-T\r\n\r\n"
        b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-T: 1\r\n\r\n"
    ),
    "own HSTS": (
        b"HTTP/1.1 200 OK\r\nStrict-Transport-Security: max-age=1\r\nContent-Length: 2\r\n\r\nok"
    ),
}
RESPONSES = REFUSED | PASSED


class ScriptedUpstream(LoopbackServer):
    """Answers ``GET /<case>`` with the bytes of that case, then closes the connection."""

    def serve(self, conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(65536)
                if not data:
                    return
                head += data
            path = head.split(b" ", 2)[1].decode()
            name = path[1:].replace("%20", " ")
            conn.sendall(RESPONSES[name])
            conn.shutdown(socket.SHUT_WR)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    upstream = ScriptedUpstream()
    directory: Path = tmp_path_factory.mktemp("responses")
    running = ProxyProcess.start(
        directory, [{"hosts": [HOST], "upstreams": [upstream.url], "hsts": HSTS}]
    )
    yield running
    assert running.stop() == 0
    upstream.close()


def fetch(proxy: ProxyProcess, case: str) -> tuple[bytes, bytes]:
    path = "/" + case.replace(" ", "%20")
    raw = https_request(
        proxy, HOST, f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode()
    )
    head, _, body = raw.partition(b"\r\n\r\n")
    return head.lower(), body


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_untrustworthy_response_becomes_502(proxy: ProxyProcess, case: str) -> None:
    head, body = fetch(proxy, case)
    assert head.startswith(b"http/1.1 502 "), head
    assert body == b"502 Bad Gateway\n"
    assert "502 for 127.0.0.1: site=r.test" in proxy.log()


def test_hop_by_hop_and_connection_named_headers_are_dropped(proxy: ProxyProcess) -> None:
    head, body = fetch(proxy, "hop-by-hop")
    assert head.startswith(b"http/1.1 200 ")
    assert b"\r\nx-kept: 1" in head
    for gone in (b"x-secret", b"keep-alive", b"proxy-authenticate"):
        assert gone not in head
    assert b"\r\nconnection: close" in head
    assert body == b"ok"


def test_body_until_close_is_chunked_for_the_client(proxy: ProxyProcess) -> None:
    head, body = fetch(proxy, "until close")
    assert b"\r\ntransfer-encoding: chunked" in head and b"content-length" not in head
    assert body == b"19\r\nuntil the upstream closes\r\n0\r\n\r\n"


def test_chunked_body_is_reframed_without_extensions_or_trailers(proxy: ProxyProcess) -> None:
    head, body = fetch(proxy, "chunked with trailers")
    assert b"\r\ntransfer-encoding: chunked" in head and b"trailer" not in head
    assert body == b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"


def test_site_hsts_is_added_unless_the_upstream_set_its_own(proxy: ProxyProcess) -> None:
    head, _ = fetch(proxy, "hop-by-hop")
    assert head.count(b"strict-transport-security") == 1
    assert f"strict-transport-security: {HSTS}".encode() in head
    head, _ = fetch(proxy, "own HSTS")
    assert head.count(b"strict-transport-security") == 1
    assert b"strict-transport-security: max-age=1" in head
