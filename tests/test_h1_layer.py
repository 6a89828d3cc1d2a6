"""The HTTP/1.1 layer in memory: bytes from a client in, what it writes and what goes up out.

The layer runs on a real event loop (its writes leave at the end of the loop iteration)
but over a transport that records, with the exchanges' upstream side recorded by the
playbook's pool and links (tests/playbook.py). What these show in isolation: pipelined
requests answered in order, a refused request answered in its turn with nothing after
it read, bytes after a WebSocket handshake held until a 101.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from proxy.config import ServerConfig, Site
from proxy.http.h1.server import H1Connection
from proxy.http.router import Router
from proxy.http.runtime import Runtime
from proxy.http.upstream import UpstreamPool
from tests.playbook import APP, Action, Link, Pool


class Transport(asyncio.Transport):
    """A client connection that records what is written to it and whether it reads."""

    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.reading = True
        self.closed = False
        self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("192.0.2.7", 40000) if name == "peername" else default


class Layer:
    def __init__(self, pooled: int = 0) -> None:
        self.actions: list[Action] = []
        self.pool = Pool(self.actions)
        self.links = [Link(self.actions, APP, reused=True) for _ in range(pooled)]
        self.pool.idle.extend(self.links)
        site = Site(hosts=("app.test",), upstreams=(APP,))
        self.runtime = Runtime(
            ServerConfig(), Router([site], self.pool), cast(UpstreamPool, self.pool), None
        )
        self.transport = Transport()
        self.connection = H1Connection(self.runtime, 443)
        self.connection.connection_made(self.transport)

    def feed(self, data: bytes) -> None:
        self.connection.data_received(data)
        self.runtime.batch.flush()

    def sent_up(self) -> list[bytes]:
        return [a[1] for a in self.actions if a[0] == "link.send_request"]


def _request(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: app.test\r\n{extra}\r\n".encode()


async def test_pipelined_requests_go_up_one_at_a_time_and_are_answered_in_order() -> None:
    layer = Layer(pooled=2)
    layer.feed(_request("/a") + _request("/b"))
    assert layer.sent_up() == [b"GET /a HTTP/1.1"]  # /b waits for /a's whole response
    first = layer.connection.exchanges[0]
    first.response_head(200, b"OK", b"1.1", [(b"Content-Length", b"1")])
    first.response_body(b"A")
    first.response_end()
    assert layer.sent_up() == [b"GET /a HTTP/1.1", b"GET /b HTTP/1.1"]
    second = layer.connection.exchanges[0]
    second.response_head(200, b"OK", b"1.1", [(b"Content-Length", b"1")])
    second.response_body(b"B")
    second.response_end()
    layer.runtime.batch.flush()
    answers = layer.transport.written.split(b"HTTP/1.1 200 OK\r\n")[1:]
    assert [a[-1:] for a in answers] == [b"A", b"B"]
    assert not layer.transport.is_closing()


async def test_a_refused_pipelined_request_is_answered_after_the_one_before() -> None:
    layer = Layer(pooled=1)
    layer.feed(
        _request("/good") + b"GET /bad HTTP/1.1\r\nHost: app.test\r\nContent-Length: x\r\n\r\n"
    )
    assert layer.sent_up() == [b"GET /good HTTP/1.1"]
    assert not layer.transport.reading  # nothing after the refused request is read
    assert layer.transport.written == b""
    good = layer.connection.exchanges[0]
    good.response_head(200, b"OK", b"1.1", [(b"Content-Length", b"2")])
    good.response_body(b"ok")
    good.response_end()
    layer.runtime.batch.flush()
    written = layer.transport.written
    assert written.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\n\r\nokHTTP/1.1 400 Bad Request\r\n" in written
    assert layer.transport.closed
    assert layer.sent_up() == [b"GET /good HTTP/1.1"]


async def test_bytes_after_a_websocket_handshake_wait_for_the_101() -> None:
    layer = Layer(pooled=1)
    handshake = _request("/ws", "Connection: Upgrade\r\nUpgrade: websocket\r\n")
    layer.feed(handshake + _request("/smuggled", "X-Forwarded-For: 6.6.6.6\r\n"))
    assert layer.sent_up() == [b"GET /ws HTTP/1.1"]
    assert not layer.transport.reading
    assert [a for a in layer.actions if a[0] == "link.send_body"] == []
    exchange = layer.connection.exchanges[0]
    exchange.response_head(403, b"Forbidden", b"1.1", [(b"Content-Length", b"0")])
    exchange.response_end()
    layer.runtime.batch.flush()
    assert layer.transport.written.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert b"connection: close" in layer.transport.written
    assert layer.transport.closed
    assert layer.sent_up() == [b"GET /ws HTTP/1.1"]  # the held bytes were never sent
    assert ("pool.release", False) in layer.actions


async def test_bytes_after_another_upgrade_are_the_next_request_checked_as_any() -> None:
    layer = Layer(pooled=2)
    layer.feed(_request("/a", "Connection: Upgrade\r\nUpgrade: foo\r\n") + _request("/b"))
    first = layer.connection.exchanges[0]
    first.response_head(200, b"OK", b"1.1", [(b"Content-Length", b"0")])
    first.response_end()
    assert layer.sent_up() == [b"GET /a HTTP/1.1", b"GET /b HTTP/1.1"]
    heads = [link.head for link in layer.links if hasattr(link, "head")]
    assert all(b"upgrade" not in head.lower() for head in heads)
    assert all(b"x-forwarded-for: 192.0.2.7\r\n" in head for head in heads)


async def test_an_http_1_0_client_gets_its_body_until_close() -> None:
    layer = Layer(pooled=1)
    layer.feed(b"GET / HTTP/1.0\r\nHost: app.test\r\n\r\n")
    exchange = layer.connection.exchanges[0]
    exchange.response_head(200, b"OK", b"1.1", [(b"Transfer-Encoding", b"chunked")])
    exchange.response_body(b"streamed")
    exchange.response_end()
    layer.runtime.batch.flush()
    written = layer.transport.written
    assert b"transfer-encoding" not in written.lower()
    assert b"connection: close\r\n" in written
    assert written.endswith(b"\r\n\r\nstreamed")
    assert layer.transport.closed


async def test_a_client_that_stops_reading_pauses_the_upstream() -> None:
    layer = Layer(pooled=1)
    layer.feed(_request("/big"))
    exchange = layer.connection.exchanges[0]
    exchange.response_head(200, b"OK", b"1.1", [(b"Content-Length", b"100")])
    layer.connection.pause_writing()
    layer.connection.resume_writing()
    assert [a for a in layer.actions if "reading" in a[0]] == [
        ("link.pause_reading",),
        ("link.resume_reading",),
    ]
