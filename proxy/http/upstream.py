"""Connections to upstream servers: HTTP/1.1 client connections, a keep-alive pool per
origin, round robin, passive health.

The pool is shared by every exchange, so a burst of client connections (or the streams
of one HTTP/2 connection) reuses a handful of upstream connections. An upstream that
refuses connections is skipped for ``FAIL_TIMEOUT`` seconds (like nginx's ``max_fails=1
fail_timeout=10s``). An :class:`UpstreamConnection` is attached to one exchange at a time:
it frames what the exchange sends (:mod:`proxy.http.h1.framing`) and reports the response
it parses (:mod:`proxy.http.h1.parse`) straight to that exchange.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import cast

from proxy.config import Upstream
from proxy.http.exchange import CONNECTING, Exchange, UpstreamLink
from proxy.http.h1 import framing
from proxy.http.h1.parse import ResponseReader
from proxy.http.message import CHUNKED, HTTPError, Request
from proxy.http.writebatch import WriteBatch
from proxy.tasks import spawn

log = logging.getLogger("tlsproxy.upstream")

FAIL_TIMEOUT = 10.0  # seconds an upstream that refused a connection is skipped
IDLE_TIMEOUT = 4.0  # below uvicorn's 5 s keep-alive, so the upstream rarely closes first
MAX_IDLE_PER_ORIGIN = 256


class UpstreamConnection(asyncio.Protocol):
    """One HTTP/1.1 connection to an origin (an exchange's ``UpstreamLink``)."""

    __slots__ = (
        "answered",
        "batch",
        "chunked",
        "exchange",
        "idle_since",
        "pool",
        "reader",
        "reading_paused",
        "reused",
        "transport",
        "upstream",
    )

    def __init__(self, upstream: Upstream, pool: UpstreamPool) -> None:
        self.upstream = upstream
        self.pool = pool
        self.batch = pool.batch
        self.reader = ResponseReader(_NOBODY)
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
        self.reused = False
        self.answered = False  # a byte of a response to the current request has arrived
        self.chunked = False  # the current request's body goes in chunks we frame
        self.reading_paused = False
        self.idle_since = 0.0  # when it went back to the pool (time.monotonic())

    # -- UpstreamLink: what the exchange does with it -------------------------------------

    def attach(self, exchange: Exchange, head_request: bool) -> None:
        self.exchange = exchange
        self.answered = False
        self.reader.handler = exchange
        self.reader.head_request = head_request

    def send_request(self, request: Request) -> None:
        self.chunked = request.framing == CHUNKED
        if self.transport is not None:
            self.batch.write(self.transport, framing.request_head(request))

    def send_body(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None:
            if self.chunked:
                self.batch.write(transport, b"%x\r\n" % len(data))
                self.batch.write(transport, data)
                self.batch.write(transport, framing.CHUNK_END)
            else:
                self.batch.write(transport, data)

    def send_end(self) -> None:
        if self.chunked and self.transport is not None:
            self.batch.write(self.transport, framing.LAST_CHUNK)

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        self.exchange = None
        self.reader.handler = _NOBODY
        if self.transport is not None:
            self.transport.close()

    def detach(self) -> asyncio.Transport:
        """Hand the transport over to a tunnel: this object leaves the pool for good."""
        transport = self.transport
        assert transport is not None
        self.exchange = None
        self.reader.handler = _NOBODY
        self.transport = None
        self.pool.forget(self)
        self.resume_reading()
        transport.resume_reading()
        return transport

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop: not a subclass

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:  # bytes on an idle connection: nothing can frame them
            self.close()
            return
        self.answered = True
        try:
            rest = self.reader.feed(data)
        except HTTPError as error:
            self.close()
            exchange.upstream_invalid(error)
            return
        if rest is not None:
            exchange.switched(rest)

    def eof_received(self) -> bool:
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.upstream_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.forget(self)
        self.reader.handler = _NOBODY  # the parser must not keep an exchange alive
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.upstream_lost(
                "upstream closed the connection" + (f": {exc}" if exc is not None else "")
            )

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_writable(False)

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_writable(True)


class _NoBody:
    """The parser's handler while a connection has no exchange: any response is an error."""

    def response_head(
        self, status: int, reason: bytes, version: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        raise HTTPError(502, "response without a request")

    def response_body(self, data: bytes) -> None:
        raise HTTPError(502, "response without a request")

    def response_end(self) -> None:
        raise HTTPError(502, "response without a request")


_NOBODY = _NoBody()


class UpstreamPool:
    """Idle keep-alive connections per origin, and which origins are failing (the
    exchanges' ``Connector``)."""

    def __init__(self, connect_timeout: float, batch: WriteBatch | None = None) -> None:
        self.connect_timeout = connect_timeout
        self.batch = batch if batch is not None else WriteBatch()
        self._idle: dict[Upstream, list[UpstreamConnection]] = {}
        self._down_until: dict[Upstream, float] = {}
        self._failing: dict[Upstream, tuple[float, str]] = {}  # since (Unix time), last error

    def take(self, upstream: Upstream) -> UpstreamConnection | None:
        """A pooled connection to ``upstream`` ready for a request, or None."""
        idle = self._idle.get(upstream)
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to be closed
            if conn.transport is None or conn.transport.is_closing():
                continue
            if time.monotonic() - conn.idle_since > IDLE_TIMEOUT:  # the sweep has not run
                conn.close()
                continue
            conn.reused = True
            return conn
        return None

    def open(self, upstream: Upstream, exchange: Exchange) -> None:
        """Connect in the background; then ``exchange.connected`` or ``connect_failed``."""
        spawn(self._open(upstream, exchange), name=f"connect {upstream.url}")

    async def _open(self, upstream: Upstream, exchange: Exchange) -> None:
        try:
            conn = await self.connect(upstream)
        except TimeoutError:
            exchange.connect_failed(upstream, True, "connect timed out")
            return
        except OSError as exc:
            exchange.connect_failed(upstream, False, exc.strerror or str(exc))
            return
        if exchange.state != CONNECTING:  # the client went away; the connection is fresh
            self.release(conn, reusable=True)
            return
        exchange.connected(conn)

    async def connect(self, upstream: Upstream) -> UpstreamConnection:
        """A new connection; raises TimeoutError or OSError (the caller picks 504 or 502)."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.connect_timeout):
            _, conn = await loop.create_connection(
                lambda: UpstreamConnection(upstream, self), upstream.host, upstream.port
            )
        self.mark_up(upstream)
        return conn

    def release(self, link: UpstreamLink, reusable: bool) -> None:
        """Pool the connection when its last exchange ended cleanly on both sides, else close
        it (``link`` is one of this pool's connections: no other kind exists)."""
        conn: UpstreamConnection = link  # type: ignore[assignment]
        conn.exchange = None
        conn.reader.handler = _NOBODY
        if conn.reading_paused:
            conn.resume_reading()
        transport = conn.transport
        idle = self._idle.setdefault(conn.upstream, [])
        if (
            not reusable
            or transport is None
            or transport.is_closing()
            or len(idle) >= MAX_IDLE_PER_ORIGIN
        ):
            conn.close()
            return
        conn.idle_since = time.monotonic()  # no timer per request: sweep() closes old ones
        idle.append(conn)

    def sweep(self, now: float) -> None:
        """Close connections idle longer than ``IDLE_TIMEOUT`` (``now``: time.monotonic())."""
        for idle in self._idle.values():
            while idle and now - idle[0].idle_since > IDLE_TIMEOUT:
                idle.pop(0).close()

    def forget(self, conn: UpstreamConnection) -> None:
        """Drop a closed connection from the idle list."""
        idle = self._idle.get(conn.upstream)
        if idle and conn in idle:
            idle.remove(conn)

    def is_up(self, upstream: Upstream) -> bool:
        if not self._down_until:  # the usual case, without hashing ``upstream``
            return True
        until = self._down_until.get(upstream)
        return until is None or until <= time.monotonic()

    def mark_down(self, upstream: Upstream, reason: str) -> None:
        if self.is_up(upstream):
            log.warning(
                "upstream %s failing (%s); skipped for %.0f s", upstream.url, reason, FAIL_TIMEOUT
            )
        self._down_until[upstream] = time.monotonic() + FAIL_TIMEOUT
        since = self._failing.get(upstream, (time.time(), ""))[0]
        self._failing[upstream] = (since, reason)

    def failing(self, upstream: Upstream) -> tuple[float, str] | None:
        """For the status page: (Unix time of the first failure in a row, last error), or None
        when the last connection attempt succeeded (or none was made)."""
        return self._failing.get(upstream)

    def mark_up(self, upstream: Upstream) -> None:
        self._failing.pop(upstream, None)
        if self._down_until.pop(upstream, None) is not None:
            log.info("upstream %s is accepting connections again", upstream.url)

    def close_idle(self) -> None:
        for idle in self._idle.values():
            for conn in list(idle):
                conn.close()
        self._idle.clear()
