"""Timeouts and WebSockets, end to end: slow or idle clients cannot hold the proxy.

Deadlines are checked about once a second, so the tests allow a second of slack; they
assert what happens (408, a close, who is served first), never how fast.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as websocket_connect

from tests.support import LoopbackServer, ProxyProcess, UvicornApp, body_json

HOST = "limits.test"


@pytest.fixture(scope="module")
def app() -> Iterator[UvicornApp]:
    server = UvicornApp()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy(app: UvicornApp, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    directory: Path = tmp_path_factory.mktemp("limits")
    running = ProxyProcess.start(
        directory,
        [{"hosts": [HOST], "upstreams": [app.url]}],
        server={
            "request_head_timeout": 2,
            "request_body_timeout": 2,
            "keepalive_timeout": 2,
            "websocket_idle_timeout": 3,
        },
    )
    yield running
    assert running.stop() == 0


def open_tls(proxy: ProxyProcess) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", proxy.https_port), timeout=15)
    return proxy.client_context().wrap_socket(raw, server_hostname=HOST)


def read_all(tls: ssl.SSLSocket) -> bytes:
    reply = b""
    try:
        while data := tls.recv(65536):
            reply += data
    except (ConnectionResetError, ssl.SSLError):
        pass
    return reply


def test_trickling_head_gets_408_while_others_are_served(proxy: ProxyProcess) -> None:
    with open_tls(proxy) as slow:
        slow.sendall(b"GET / HTTP/1.1\r\nHost: limits.test\r\n")
        stop = threading.Event()

        def trickle() -> None:
            for i in range(20):
                if stop.wait(0.3):
                    return
                try:
                    slow.sendall(b"X-Slow-%d: 1\r\n" % i)
                except OSError:
                    return

        thread = threading.Thread(target=trickle)
        thread.start()
        try:
            with open_tls(proxy) as fast:
                fast.sendall(b"GET / HTTP/1.1\r\nHost: limits.test\r\nConnection: close\r\n\r\n")
                assert body_json(read_all(fast))["scheme"] == "https"
            reply = read_all(slow)
        finally:
            stop.set()
            thread.join()
    assert reply.startswith(b"HTTP/1.1 408 ")
    assert "request head not received within 2 s" in proxy.log()


def test_idle_keepalive_connection_is_closed(proxy: ProxyProcess) -> None:
    with open_tls(proxy) as tls:
        tls.sendall(b"GET /status/204 HTTP/1.1\r\nHost: limits.test\r\n\r\n")
        first = tls.recv(65536)
        assert first.startswith(b"HTTP/1.1 204 ")
        started = time.monotonic()
        assert read_all(tls) == b""  # the proxy closes the idle connection
        assert time.monotonic() - started >= 1.5


def test_stalled_request_body_gets_408(proxy: ProxyProcess) -> None:
    with open_tls(proxy) as tls:
        tls.sendall(
            b"POST /upload HTTP/1.1\r\nHost: limits.test\r\nContent-Length: 100\r\n\r\n0123456789"
        )
        reply = read_all(tls)
    assert reply.startswith(b"HTTP/1.1 408 ")
    assert "request body stalled for 2 s" in proxy.log()


def test_websocket_echo_through_the_proxy(proxy: ProxyProcess) -> None:
    raw = socket.create_connection(
        ("127.0.0.1", proxy.https_port), timeout=10, source_address=("127.0.0.9", 0)
    )
    with websocket_connect(
        f"wss://{HOST}:{proxy.https_port}/ws",
        sock=raw,
        ssl=proxy.client_context(),
        server_hostname=HOST,
        open_timeout=10,
    ) as ws:
        for text in ("hello", "x" * 100_000, "last"):
            ws.send(text)
            assert ws.recv(timeout=10) == f"127.0.0.9: {text}"


def test_idle_websocket_is_closed(proxy: ProxyProcess) -> None:
    raw = socket.create_connection(("127.0.0.1", proxy.https_port), timeout=15)
    with websocket_connect(
        f"wss://{HOST}:{proxy.https_port}/ws",
        sock=raw,
        ssl=proxy.client_context(),
        server_hostname=HOST,
        open_timeout=10,
        ping_interval=None,
    ) as ws:
        ws.send("ping")
        assert ws.recv(timeout=10) == "127.0.0.1: ping"
        started = time.monotonic()
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=15)
        assert time.monotonic() - started >= 2.5


class EndlessUpstream(LoopbackServer):
    """Streams a response that never ends; records when the proxy closed each connection."""

    def __init__(self) -> None:
        self.closed = threading.Event()
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n\r\n")
                block = b"x" * 65536
                while True:
                    conn.sendall(block)
            except OSError:
                self.closed.set()


@pytest.fixture
def endless(tmp_path: Path) -> Iterator[tuple[ProxyProcess, EndlessUpstream]]:
    upstream = EndlessUpstream()
    running = ProxyProcess.start(
        tmp_path,
        [{"hosts": [HOST], "upstreams": [upstream.url]}],
        server={"send_timeout": 2, "upstream_timeout": 60},
    )
    yield running, upstream
    running.stop()
    upstream.close()


def test_a_client_that_stops_reading_is_cut_off_with_its_upstream(
    endless: tuple[ProxyProcess, EndlessUpstream],
) -> None:
    proxy, upstream = endless
    with open_tls(proxy) as tls:
        tls.sendall(b"GET /download HTTP/1.1\r\nHost: limits.test\r\n\r\n")
        assert tls.recv(65536).startswith(b"HTTP/1.1 200 ")
        # stop reading: the proxy's buffers fill, its writes to us stall
        assert upstream.closed.wait(15), "the upstream connection is still held"
        read_all(tls)  # what was in flight, then the end
    assert "the client read nothing for 2 s (send_timeout)" in proxy.log()


def test_a_reader_that_keeps_reading_is_not_cut_off_however_long_the_response(
    endless: tuple[ProxyProcess, EndlessUpstream],
) -> None:
    """send_timeout bounds a stall, not a response: three of them pass while reading."""
    proxy, upstream = endless
    with open_tls(proxy) as tls:
        tls.sendall(b"GET /download HTTP/1.1\r\nHost: limits.test\r\n\r\n")
        received = 0
        started = time.monotonic()
        while time.monotonic() - started < 6:
            received += len(tls.recv(65536))
            time.sleep(0.01)  # about 6 MB/s: buffers fill, and drain again
        assert not upstream.closed.is_set()
        assert received > 4 * 2**20  # more than all the buffers between us hold
