"""Connections to upstream servers: a keep-alive pool per origin, round robin, passive health.

The pool is shared by every client connection, so a burst of client connections reuses a
handful of upstream connections. An upstream that refuses connections is skipped for
``FAIL_TIMEOUT`` seconds (like nginx's ``max_fails=1 fail_timeout=10s``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Protocol, cast

from proxy.config import Upstream
from proxy.http.h1.parse import ResponseHandler, ResponseReader
from proxy.http.policy import HTTPError

log = logging.getLogger("tlsproxy.upstream")

FAIL_TIMEOUT = 10.0  # seconds an upstream that refused a connection is skipped
IDLE_TIMEOUT = 4.0  # below uvicorn's 5 s keep-alive, so the upstream rarely closes first
MAX_IDLE_PER_ORIGIN = 256


class Owner(ResponseHandler, Protocol):
    """The client connection that currently holds an upstream connection."""

    def upstream_lost(self, reason: str) -> None: ...

    def upstream_eof(self) -> None: ...

    def upstream_data(self, conn: UpstreamConnection, data: bytes) -> None: ...

    def upstream_writing_paused(self, paused: bool) -> None: ...

    def tunnel_to_client(self, data: bytes) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    """One HTTP/1.1 connection to an origin; its parser reports straight to the owner."""

    def __init__(self, upstream: Upstream, pool: UpstreamPool) -> None:
        self.upstream = upstream
        self.pool = pool
        self.reader = ResponseReader(_NOBODY)
        self.transport: asyncio.Transport | None = None
        self.owner: Owner | None = None
        self.reused = False
        self.answered = False  # a byte of a response to the current request has arrived
        self.tunnel = False
        self.reading_paused = False
        self.idle_since = 0.0  # when it went back to the pool (time.monotonic())

    def attach(self, owner: Owner, head_request: bool) -> None:
        self.owner = owner
        self.answered = False
        self.reader.handler = owner
        self.reader.head_request = head_request

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop: not a subclass

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        if owner is None:  # bytes on an idle connection: nothing can frame them
            self.close()
            return
        if self.tunnel:
            owner.tunnel_to_client(data)
        else:
            self.answered = True
            owner.upstream_data(self, data)

    def eof_received(self) -> bool:
        owner, self.owner = self.owner, None
        if owner is not None:
            owner.upstream_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.forget(self)
        self.reader.handler = _NOBODY  # the parser must not keep a client connection alive
        owner, self.owner = self.owner, None
        if owner is not None:
            owner.upstream_lost(
                "upstream closed the connection" + (f": {exc}" if exc is not None else "")
            )

    def pause_writing(self) -> None:
        if self.owner is not None:
            self.owner.upstream_writing_paused(True)

    def resume_writing(self) -> None:
        if self.owner is not None:
            self.owner.upstream_writing_paused(False)

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        self.owner = None
        if self.transport is not None:
            self.transport.close()


class _NoBody:
    """The parser's handler while a connection has no owner: any response is an error."""

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
    """Idle keep-alive connections per origin, and which origins are failing."""

    def __init__(self, connect_timeout: float) -> None:
        self.connect_timeout = connect_timeout
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

    async def connect(self, upstream: Upstream) -> UpstreamConnection:
        """A new connection; raises TimeoutError or OSError (the caller picks 504 or 502)."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.connect_timeout):
            _, conn = await loop.create_connection(
                lambda: UpstreamConnection(upstream, self), upstream.host, upstream.port
            )
        self.mark_up(upstream)
        return conn

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        """Pool ``conn`` when its last exchange ended cleanly on both sides, else close it."""
        conn.owner = None
        conn.reader.handler = _NOBODY
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


class Balancer:
    """Round robin over a site's upstreams, skipping those marked down."""

    def __init__(self, upstreams: Sequence[Upstream], pool: UpstreamPool) -> None:
        self._upstreams = tuple(upstreams)
        self._single = self._upstreams[0] if len(self._upstreams) == 1 else None
        self._pool = pool
        self._next = 0

    def pick(self, exclude: frozenset[Upstream] = frozenset()) -> Upstream | None:
        """The next healthy upstream; when all are down, still try one (it may be back)."""
        if self._single is not None and not exclude:
            return self._single
        count = len(self._upstreams)
        start = self._next
        self._next = (start + 1) % count
        fallback: Upstream | None = None
        for i in range(count):
            upstream = self._upstreams[(start + i) % count]
            if upstream in exclude:
                continue
            if self._pool.is_up(upstream):
                return upstream
            if fallback is None:
                fallback = upstream
        return fallback
