"""When a pooled upstream connection fails, which requests the proxy may send again.

RFC 9110 9.2.2: a proxy must not retry a non-idempotent request on its own; the app could
act on it twice (an order placed twice). A pooled connection that the upstream closed just
as a request went out is the one case where retrying is right, for idempotent methods, and
only when not a byte of a response arrived. The upstream here answers the first request on
each connection and fails the second (closes, or closes after half a status line), so the
second request of a client always meets a dead pooled connection.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.promparse import scrape
from tests.support import LoopbackServer, ProxyProcess, free_port, https_request

HOST = "retry.test"


class FailingSecondUpstream(LoopbackServer):
    """Answers a connection's first request; on its second closes the connection, without a
    byte (``partial=False``) or after ``HTTP/1.1 200`` (``partial=True``)."""

    def __init__(self, partial: bool) -> None:
        self.partial = partial
        self.seen: list[bytes] = []  # request lines, in arrival order
        self._lock = threading.Lock()
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        buffer = b""
        answered = 0
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buffer += data
                while b"\r\n\r\n" in buffer:
                    head, _, buffer = buffer.partition(b"\r\n\r\n")
                    with self._lock:
                        self.seen.append(head.split(b"\r\n", 1)[0])
                    if answered:
                        if self.partial:
                            conn.sendall(b"HTTP/1.1 200")
                        return
                    answered += 1
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")


@pytest.fixture
def setup(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[ProxyProcess, int, FailingSecondUpstream]]:
    upstream = FailingSecondUpstream(partial=bool(request.param))
    admin = free_port()
    proxy = ProxyProcess.start(
        tmp_path,
        [{"hosts": [HOST], "upstreams": [upstream.url]}],
        server={"admin_listen": f"127.0.0.1:{admin}"},
    )
    yield proxy, admin, upstream
    proxy.stop()
    upstream.close()


def _warm_then(proxy: ProxyProcess, request: bytes) -> bytes:
    """One request that leaves a pooled upstream connection, then ``request`` on it."""
    warm = https_request(
        proxy, HOST, b"GET /warm HTTP/1.1\r\nHost: retry.test\r\nConnection: close\r\n\r\n"
    )
    assert warm.startswith(b"HTTP/1.1 200 ")
    return https_request(proxy, HOST, request)


def _retries(admin: int) -> float:
    _, page = scrape(admin)
    return page.value("tlsproxy_upstream_retries_total", site=HOST)


@pytest.mark.parametrize("setup", [False], indirect=True)
@pytest.mark.parametrize("method", [b"POST", b"PATCH"])
def test_a_non_idempotent_request_is_never_sent_twice(
    setup: tuple[ProxyProcess, int, FailingSecondUpstream], method: bytes
) -> None:
    proxy, admin, upstream = setup
    reply = _warm_then(
        proxy,
        method + b" /orders?order=42 HTTP/1.1\r\nHost: retry.test\r\nConnection: close\r\n\r\n",
    )
    assert reply.startswith(b"HTTP/1.1 502 ")
    assert upstream.seen.count(method + b" /orders?order=42 HTTP/1.1") == 1
    assert _retries(admin) == 0
    assert "upstream closed the connection" in proxy.log()


@pytest.mark.parametrize("setup", [False], indirect=True)
@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE"])
def test_an_idempotent_request_is_retried_once_on_a_new_connection(
    setup: tuple[ProxyProcess, int, FailingSecondUpstream], method: bytes
) -> None:
    proxy, admin, upstream = setup
    reply = _warm_then(
        proxy, method + b" /again HTTP/1.1\r\nHost: retry.test\r\nConnection: close\r\n\r\n"
    )
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert upstream.seen.count(method + b" /again HTTP/1.1") == 2  # the lost one, the retry
    assert _retries(admin) == 1


@pytest.mark.parametrize("setup", [True], indirect=True)
def test_no_retry_once_part_of_a_response_arrived(
    setup: tuple[ProxyProcess, int, FailingSecondUpstream],
) -> None:
    proxy, admin, upstream = setup
    reply = _warm_then(
        proxy, b"GET /half HTTP/1.1\r\nHost: retry.test\r\nConnection: close\r\n\r\n"
    )
    assert reply.startswith(b"HTTP/1.1 502 ")
    assert upstream.seen.count(b"GET /half HTTP/1.1") == 1
    assert _retries(admin) == 0
