"""The client side of the data path: one asyncio Protocol per TLS connection.

Design rules:
- Requests are answered in order. A pipelined request waits, head parsed and body
  buffered (bounded: reading pauses), until the one before it has its full response.
- Bodies stream chunk by chunk in both directions and are re-framed by the proxy, never
  collected. A full upstream write buffer pauses reading the client; a full client write
  buffer pauses reading the upstream.
- Nothing goes upstream before the request head is complete, checked and routed; errors
  before the response starts become a readable status, after it the connection is cut so
  the client can tell the body is incomplete.
- Timeouts are deadlines checked by one sweep per second for all connections (see
  :meth:`Runtime.sweep`), not a timer per request.
- Every socket write, both ways, goes through the runtime's :class:`WriteBatch` and leaves
  at the end of the loop iteration; closing a connection sends what waits first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import cast

from proxy import metrics
from proxy.config import ServerConfig, Upstream
from proxy.http.accesslog import AccessLog
from proxy.http.h1.parse import RequestReader
from proxy.http.policy import (
    CHUNKED,
    NO_BODY,
    UNTIL_CLOSE,
    HTTPError,
    Peer,
    Request,
    Response,
    parse_request,
    parse_response,
)
from proxy.http.router import Route, Router
from proxy.http.upstream import UpstreamConnection, UpstreamPool
from proxy.http.writebatch import WriteBatch
from proxy.tasks import spawn
from proxy.tls.policy import sni_matches_host, sni_of

log = logging.getLogger("tlsproxy.proxy")

MAX_PIPELINED = 16  # queued requests before reading from the client pauses
MAX_BUFFERED = 256 * 1024  # request body bytes buffered while waiting for an upstream
PEERS_CACHED = 4096  # client addresses whose Peer is kept (the cache starts over when full)
# Methods a proxy may send again on its own (RFC 9110 9.2.2): no effect beyond the first.
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

# Reasons to stop reading from the client (bit flags: reading resumes when none is left).
_CONNECTING = 1  # the current request has no upstream connection yet
_UPSTREAM_FULL = 2  # the upstream's write buffer is above its high-water mark
_QUEUED = 4  # too much pipelined input is waiting
_CLOSING = 8  # an answer is being sent before the connection closes
_UPGRADING = 16  # a WebSocket handshake waits for the upstream's 101

# What a connection's deadline means when it passes.
_IDLE, _HEAD, _BODY, _UPSTREAM, _TUNNEL = range(5)
_CHUNK_END = b"\r\n"
_LAST_CHUNK = b"0\r\n\r\n"


@dataclass(slots=True)
class Runtime:
    """What every client connection shares; the server swaps ``router`` on reload."""

    settings: ServerConfig
    router: Router
    pool: UpstreamPool
    access_log: AccessLog | None
    connections: set[ClientConnection] = field(default_factory=set)
    batch: WriteBatch = field(default_factory=WriteBatch)  # every socket write goes through it
    peers: dict[tuple[str, int], Peer] = field(default_factory=dict)  # by (client IP, port)
    draining: bool = False
    drained: asyncio.Event = field(default_factory=asyncio.Event)  # set: draining, none left

    async def sweep_forever(self, interval: float = 1.0) -> None:
        """Check every connection's deadline once per ``interval`` until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            self.sweep(loop.time())

    def peer(self, ip: str, listen_port: int) -> Peer:
        """What we know about a client address, worked out once per address (and reload)."""
        key = (ip, listen_port)
        peer = self.peers.get(key)
        if peer is None:
            if len(self.peers) >= PEERS_CACHED:
                self.peers.clear()
            peer = Peer.from_address(ip, listen_port, self.settings.trusted_proxies)
            self.peers[key] = peer
        return peer

    def sweep(self, now: float) -> None:
        """Expire every connection whose deadline has passed, or whose client has read
        nothing for ``send_timeout`` (called about once a second)."""
        stalled_before = now - self.settings.send_timeout
        for connection in list(self.connections):
            if connection.deadline <= now or 0.0 < connection.stalled_since <= stalled_before:
                connection.expire(now)
        self.pool.sweep(time.monotonic())


class Exchange:
    """One request and its response, from the first request byte to the last response byte."""

    __slots__ = (
        "body_bytes",
        "dispatched",
        "head",
        "method",
        "pending",
        "request",
        "request_done",
        "response",
        "route",
        "sent",
        "started",
        "status",
        "target",
        "tried",
        "upstream",
        "version",
    )

    def __init__(self, started: float) -> None:
        self.started = started
        self.method = b""
        self.target = b""
        self.version = b"1.1"
        self.request: Request | None = None
        self.route: Route | None = None
        self.upstream: UpstreamConnection | None = None
        self.pending: list[bytes] = []  # framed request body waiting for an upstream
        self.body_bytes = 0
        self.request_done = False
        self.response: Response | None = None
        self.head = False  # the response head has been sent to the client
        self.status = 0
        self.sent = 0
        self.tried: frozenset[Upstream] = frozenset()
        self.dispatched = 0.0  # when the request was handed to an upstream (for metrics)


class ClientConnection(asyncio.Protocol):
    """Relays requests from one client connection to upstreams and responses back."""

    __slots__ = (
        "batch",
        "buffered",
        "client_out",
        "current",
        "deadline",
        "deadline_kind",
        "deferred_error",
        "held",
        "listen_port",
        "loop",
        "outbox",
        "paused",
        "peer",
        "queue",
        "reader",
        "receiving",
        "runtime",
        "settings",
        "sni",
        "sni_host",
        "stalled_since",
        "transport",
        "tunnel",
        "writing_paused",
    )

    def __init__(self, runtime: Runtime, listen_port: int) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.listen_port = listen_port
        self.loop = asyncio.get_running_loop()
        self.batch = runtime.batch
        self.transport: asyncio.Transport | None = None
        self.peer: Peer | None = None
        self.sni: str | None = None  # the server name the client asked for in its handshake
        self.sni_host = b""  # the last Host found to match ``sni``
        self.reader = RequestReader(self, self.settings.max_header_bytes, self.settings.max_headers)
        self.current: Exchange | None = None  # the exchange being answered
        self.receiving: Exchange | None = None  # the exchange whose request is being read
        self.queue: list[Exchange] = []  # pipelined; at most MAX_PIPELINED (a deque: 600 B)
        self.deferred_error: HTTPError | None = None  # a queued request's refusal, in order
        self.paused = 0
        self.buffered = 0  # request body bytes held in Exchange.pending
        self.writing_paused = False
        self.stalled_since = 0.0  # when writing to the client paused (0: it is not paused)
        self.tunnel: UpstreamConnection | None = None
        self.held = b""  # what followed a WebSocket handshake: for the tunnel, if it opens
        self.outbox: list[bytes] | None = None  # upstream writes held while a chunk is parsed
        self.client_out: list[bytes] | None = None  # client writes held while one is parsed
        self.deadline = 0.0
        self.deadline_kind = _IDLE

    # -- asyncio.Protocol: client side --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop: not a subclass
        self.peer = self.runtime.peer(transport.get_extra_info("peername")[0], self.listen_port)
        self.sni = sni_of(transport)
        self.runtime.connections.add(self)
        self._set_deadline(_IDLE, self.settings.keepalive_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.reader.close()  # frees this connection (and its transport) without the collector
        runtime = self.runtime
        runtime.connections.discard(self)
        if runtime.draining and not runtime.connections:
            runtime.drained.set()
        exchange = self.current
        self.current = None
        self.queue.clear()
        if self.tunnel is not None:
            self.batch.flush()  # what the client sent last (a WebSocket close frame) goes first
            self.tunnel.close()
            self.tunnel = None
        if exchange is not None and exchange.upstream is not None:
            exchange.upstream.close()  # cut short: the upstream connection cannot be reused
            exchange.upstream = None

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.deadline = self.loop.time() + self.settings.websocket_idle_timeout
            if self.tunnel.transport is not None:
                self.batch.write(self.tunnel.transport, data)
            return
        # Upstream writes wait until the whole chunk is parsed: a bad body in the same
        # packet then stops the request before any of it leaves, and head and body go out
        # in one write.
        outbox = self.outbox = []
        try:
            rest = self.reader.feed(data)
        except HTTPError as error:
            self.outbox = None
            if outbox and self.receiving is not self.current:  # the bad one is queued
                self._send_upstream(outbox)
            self._refuse(error)
            return
        self.outbox = None
        if outbox:
            self._send_upstream(outbox)
        if rest is not None:
            self._after_upgrade_request(rest)

    def _after_upgrade_request(self, rest: bytes) -> None:
        """The parser stopped after a request with an Upgrade header; ``rest`` followed it.

        Only a WebSocket handshake is forwarded as an upgrade. What follows it belongs to
        no checked request: it is held here, never in an exchange's body, and reading
        stops, until the upstream answers 101 (the tunnel opens and ``rest`` goes first) or
        anything else (the connection closes after that answer; ``rest`` is dropped). Any
        other Upgrade was removed from the forwarded request (hop-by-hop), so ``rest`` is
        the client's next request and is parsed as one.
        """
        exchange = self.queue[-1] if self.queue else self.current
        if exchange is None or exchange.request is None:  # refused: the connection closes
            return
        if exchange.request.websocket:
            self.held = rest
            self._pause(_UPGRADING)
        elif rest:
            self.data_received(rest)

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        self.writing_paused = True
        self.stalled_since = self.loop.time()
        upstream = self.tunnel or (self.current.upstream if self.current else None)
        if upstream is not None:
            upstream.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self.stalled_since = 0.0
        upstream = self.tunnel or (self.current.upstream if self.current else None)
        if upstream is not None:
            upstream.resume_reading()
        if self.deadline_kind == _UPSTREAM:
            self.deadline = self.loop.time() + self.settings.upstream_timeout

    # -- request events (from RequestReader) -------------------------------------------

    def request_begin(self) -> None:
        exchange = Exchange(self.loop.time())
        self.receiving = exchange
        if self.current is None:
            self.current = exchange
            self._set_deadline(_HEAD, self.settings.request_head_timeout)
        else:
            self.queue.append(exchange)
            self._check_backlog()

    def request_head(
        self, method: bytes, target: bytes, version: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        exchange = self.receiving
        assert exchange is not None and self.peer is not None
        exchange.method, exchange.target, exchange.version = method, target, version
        request = parse_request(method, target, version, headers, self.peer)
        exchange.request = request
        if (
            self.sni is not None
            and request.host != self.sni_host
            and not sni_matches_host(self.sni, request.host)
        ):
            host = request.host.decode("latin-1")
            raise HTTPError(421, f"Host {host!r} differs from the TLS server name {self.sni!r}")
        self.sni_host = request.host  # checked once per connection, not once per request
        site = self.runtime.router.match(request.host)
        if site is None:
            raise HTTPError(
                421, f"no site is configured for Host {request.host.decode('latin-1')!r}"
            )
        exchange.route = site.for_target(request.target) if site.prefixes else site.fallback
        limit = self.settings.max_body_bytes
        if limit and request.length > limit:
            raise HTTPError(413, f"request body of {request.length} bytes, limit {limit}")
        if exchange is self.current:
            if request.framing != NO_BODY:
                self._set_deadline(_BODY, self.settings.request_body_timeout)
            self._dispatch(exchange)

    def request_body(self, data: bytes) -> None:
        exchange = self.receiving
        assert exchange is not None and exchange.request is not None
        exchange.body_bytes += len(data)
        limit = self.settings.max_body_bytes
        if limit and exchange.body_bytes > limit:
            raise HTTPError(413, f"request body over the limit of {limit} bytes")
        if exchange.request.framing == CHUNKED:
            framed = [b"%x\r\n" % len(data), data, _CHUNK_END]
        else:
            framed = [data]
        if exchange.upstream is not None:
            self._send_upstream(framed)
        else:  # no upstream yet (connecting, or a pipelined request): hold it, bounded
            exchange.pending += framed
            self.buffered += len(data)
            self._check_backlog()
        if exchange is self.current:
            self.deadline = self.loop.time() + self.settings.request_body_timeout

    def request_end(self) -> None:
        exchange = self.receiving
        assert exchange is not None and exchange.request is not None
        exchange.request_done = True
        self.receiving = None
        if exchange.request.framing == CHUNKED:
            if exchange.upstream is not None:
                self._send_upstream([_LAST_CHUNK])
            else:
                exchange.pending.append(_LAST_CHUNK)
        if exchange is self.current and exchange.response is None:
            self._set_deadline(_UPSTREAM, self.settings.upstream_timeout)

    # -- upstream connections ----------------------------------------------------------

    def _dispatch(self, exchange: Exchange) -> None:
        """Send ``exchange`` upstream on a pooled connection, or open one."""
        assert exchange.route is not None
        exchange.dispatched = self.loop.time()
        upstream = exchange.route.balancer.pick()
        assert upstream is not None
        conn = self.runtime.pool.take(upstream)
        if conn is not None:
            self._attach(exchange, conn)
        else:
            self._pause(_CONNECTING)
            spawn(self._open(exchange, upstream), name=f"connect {upstream.url}")

    async def _open(self, exchange: Exchange, upstream: Upstream) -> None:
        """Connect, trying the site's other upstreams when one refuses (nothing was sent)."""
        route = exchange.route
        assert route is not None
        pool = self.runtime.pool
        while True:
            try:
                conn = await pool.connect(upstream)
                break
            except TimeoutError:
                metrics.upstream_error(route.name, "timeout")
                pool.mark_down(upstream, "connect timed out")
                self._fail(
                    exchange,
                    504,
                    f"upstream {upstream.url} did not accept within {pool.connect_timeout:g} s",
                    upstream,
                )
                return
            except OSError as exc:
                metrics.upstream_error(route.name, "refused")
                pool.mark_down(upstream, exc.strerror or str(exc))
                exchange.tried |= {upstream}
                following = route.balancer.pick(exchange.tried)
                if following is None or following in exchange.tried:
                    why = f"upstream {upstream.url} refused the connection: {exc.strerror or exc}"
                    self._fail(exchange, 502, why, upstream)
                    return
                upstream = following
        if self.current is not exchange or self.transport is None or self.transport.is_closing():
            pool.release(conn, reusable=True)  # the client went away; the connection is fresh
            return
        self._attach(exchange, conn)
        if self.tunnel is None:
            self._resume(_CONNECTING)

    def _attach(self, exchange: Exchange, conn: UpstreamConnection) -> None:
        """Send the request head, and whatever of the body has arrived, upstream."""
        request = exchange.request
        assert request is not None and conn.transport is not None
        exchange.upstream = conn
        conn.attach(self, exchange.method == b"HEAD")
        if self.writing_paused:
            conn.pause_reading()
        self._send_upstream([request.upstream_head, *exchange.pending])
        if exchange.pending:
            exchange.pending = []
            self.buffered = sum(len(b) for e in self.queue for b in e.pending)
            self._check_backlog()
        if exchange.request_done and exchange.response is None:
            self._set_deadline(_UPSTREAM, self.settings.upstream_timeout)

    def _send_upstream(self, chunks: list[bytes]) -> None:
        """Write to the current exchange's upstream, or hold it while a chunk is parsed."""
        if self.outbox is not None:
            self.outbox += chunks
            return
        exchange = self.current
        conn = exchange.upstream if exchange is not None else None
        if conn is not None and conn.transport is not None:
            self.batch.write(conn.transport, chunks[0] if len(chunks) == 1 else b"".join(chunks))

    # -- response events (from the upstream's ResponseReader) ---------------------------

    def upstream_data(self, conn: UpstreamConnection, data: bytes) -> None:
        """Parse upstream bytes; what they produce for the client leaves in one write."""
        out = self.client_out = []
        try:
            rest = conn.reader.feed(data)
        except HTTPError as exc:
            self.client_out = None
            conn.owner = None
            conn.close()
            self.upstream_lost(exc.reason, "invalid")
            return
        if self.client_out is out:
            self._flush_client()
        if rest is not None:
            self.upstream_upgraded(rest)

    def _to_client(self, data: bytes) -> None:
        out = self.client_out
        if out is not None:
            out.append(data)
        elif self.transport is not None:
            self.batch.write(self.transport, data)

    def _flush_client(self) -> None:
        out = self.client_out
        self.client_out = None
        if out and self.transport is not None:
            self.batch.write(self.transport, out[0] if len(out) == 1 else b"".join(out))

    def response_head(
        self, status: int, reason: bytes, version: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        exchange = self.current
        transport = self.transport
        assert exchange is not None and exchange.route is not None and transport is not None
        request = exchange.request
        assert request is not None
        if status < 200 and status != 101:  # 100 Continue, 103 Early Hints: pass along
            if exchange.version == b"1.1":
                interim = parse_response(
                    status,
                    reason,
                    version,
                    headers,
                    head_request=False,
                    client_http10=False,
                    close=False,
                )
                self._to_client(interim.head.replace(b"transfer-encoding: chunked\r\n", b""))
            return
        metrics.upstream_response(exchange.route.name, self.loop.time() - exchange.dispatched)
        if status == 101 and not request.websocket:
            raise HTTPError(502, "upstream switched protocols without being asked to")
        close = not request.keep_alive or request.websocket or self.runtime.draining
        response = parse_response(
            status,
            reason,
            version,
            headers,
            head_request=exchange.method == b"HEAD",
            client_http10=exchange.version == b"1.0",
            close=close,
            hsts=exchange.route.hsts_line,
        )
        exchange.response = response
        exchange.status = status
        exchange.head = True
        self.deadline = self.loop.time() + self.settings.upstream_timeout
        self.deadline_kind = _UPSTREAM
        self._to_client(response.head)

    def response_body(self, data: bytes) -> None:
        exchange = self.current
        transport = self.transport
        assert exchange is not None and exchange.response is not None and transport is not None
        exchange.sent += len(data)
        if exchange.response.client_chunked:
            self._to_client(b"%x\r\n" % len(data))
            self._to_client(data)
            self._to_client(_CHUNK_END)
        else:
            self._to_client(data)
        self.deadline = self.loop.time() + self.settings.upstream_timeout

    def response_end(self) -> None:
        exchange = self.current
        transport = self.transport
        assert exchange is not None and transport is not None and exchange.request is not None
        request = exchange.request
        response = exchange.response
        if response is None or exchange.status == 101:  # interim, or a tunnel starts
            return
        if response.client_chunked:
            self._to_client(_LAST_CHUNK)
        upstream = exchange.upstream
        exchange.upstream = None
        if upstream is not None:  # one that saw a WebSocket handshake is never reused
            reusable = response.keep_alive and exchange.request_done and not request.websocket
            self.runtime.pool.release(upstream, reusable)
        self._log(exchange, upstream.upstream if upstream is not None else None)
        self._next()

    def upstream_eof(self) -> None:
        exchange = self.current
        response = exchange.response if exchange is not None else None
        if response is not None and response.upstream_framing == UNTIL_CLOSE:
            self.response_end()
            return
        self.upstream_lost("upstream closed the connection")

    def upstream_lost(self, reason: str, kind: metrics.UpstreamError = "reset") -> None:
        if self.tunnel is not None:
            self.tunnel = None
            if self.transport is not None:
                self._close(self.transport)
            return
        exchange = self.current
        if exchange is None or exchange.upstream is None:
            return
        conn = exchange.upstream
        exchange.upstream = None
        conn.close()
        request = exchange.request
        assert request is not None
        if (
            conn.reused
            and not conn.answered
            and exchange.method in IDEMPOTENT
            and request.framing == NO_BODY
        ):
            # A pooled connection the upstream closed just as the request went out, before a
            # byte of an answer: the request can be sent again (RFC 9110 9.2.2), once.
            if exchange.route is not None:
                metrics.upstream_retry(exchange.route.name)
            self._pause(_CONNECTING)
            spawn(self._open(exchange, conn.upstream), name=f"reconnect {conn.upstream.url}")
            return
        if exchange.route is not None:
            metrics.upstream_error(exchange.route.name, kind)
        self._fail(exchange, 502, reason, conn.upstream)

    def upstream_writing_paused(self, paused: bool) -> None:
        if paused:
            self._pause(_UPSTREAM_FULL)
        else:
            self._resume(_UPSTREAM_FULL)

    # -- WebSocket tunnel --------------------------------------------------------------

    def upstream_upgraded(self, rest: bytes) -> None:
        """The upstream answered 101: from now on bytes flow unchanged both ways."""
        exchange = self.current
        transport = self.transport
        assert exchange is not None and transport is not None
        conn = exchange.upstream
        if conn is None or exchange.status != 101:
            self.upstream_lost("upstream upgraded without a 101 response")
            return
        self._log(exchange, conn.upstream)
        conn.tunnel = True
        self.tunnel = conn
        self.current = None
        self._set_deadline(_TUNNEL, self.settings.websocket_idle_timeout)
        if rest:
            self.batch.write(transport, rest)
        held, self.held = self.held, b""
        if held and conn.transport is not None:
            self.batch.write(conn.transport, held)
        self._resume(_UPGRADING)

    def tunnel_to_client(self, data: bytes) -> None:
        self.deadline = self.loop.time() + self.settings.websocket_idle_timeout
        if self.transport is not None:
            self.batch.write(self.transport, data)

    # -- the end of an exchange --------------------------------------------------------

    def _next(self) -> None:
        """Move on to the next pipelined request, or wait for one."""
        exchange = self.current
        assert exchange is not None and exchange.request is not None
        transport = self.transport
        assert transport is not None
        self.current = None
        request = exchange.request
        if not exchange.request_done or not request.keep_alive or request.websocket:
            self._flush_client()
            self._close(transport)
            return
        if self.runtime.draining:
            self._flush_client()
            self._close(transport)
            return
        if self.queue:
            following = self.queue.pop(0)
            self.current = following
            self._check_backlog()
            if self.deferred_error is not None and following is self.receiving:
                self._fail(following, self.deferred_error.status, self.deferred_error.reason, None)
                return
            if following.route is None:  # its head is still arriving
                self._set_deadline(_HEAD, self.settings.request_head_timeout)
                return
            if not following.request_done:
                self._set_deadline(_BODY, self.settings.request_body_timeout)
            self._dispatch(following)
            return
        if self.deferred_error is not None:
            error = self.deferred_error
            self._fail(Exchange(self.loop.time()), error.status, error.reason, None)
            return
        self._set_deadline(_IDLE, self.settings.keepalive_timeout)

    # -- failures ----------------------------------------------------------------------

    def _refuse(self, error: HTTPError) -> None:
        """A bad request: answer it in order, then close the connection."""
        current = self.current
        if current is not None and self.receiving is not current:
            self.deferred_error = error  # answer the requests before it first
            self._pause(_CLOSING)
            return
        exchange = current or self.receiving or Exchange(self.loop.time())
        self._fail(exchange, error.status, error.reason, None)

    def _fail(self, exchange: Exchange, status: int, why: str, upstream: Upstream | None) -> None:
        """Answer ``status`` ourselves (or cut the connection if a response has started)."""
        transport = self.transport
        site = exchange.route.name if exchange.route is not None else "-"
        origin = upstream.url if upstream is not None else "-"
        client = self.peer.ip if self.peer is not None else "-"
        if exchange.upstream is not None:
            exchange.upstream.close()
            exchange.upstream = None
        if transport is None or transport.is_closing():
            return
        if exchange.head:
            self.client_out = None  # what is held back belongs to the failed response
            log.warning(
                "response to %s cut short: site=%s upstream=%s: %s", client, site, origin, why
            )
            self._log(exchange, upstream)
            self.batch.flush()  # what was sent before the failure still goes out first
            transport.abort()
            return
        self._flush_client()  # a response before this one may still be held back
        log.warning("%d for %s: site=%s upstream=%s: %s", status, client, site, origin, why)
        phrase = HTTPStatus(status).phrase.encode()
        body = b"%d %s\n" % (status, phrase)
        head = (
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n" % (status, phrase, len(body))
        )
        self.batch.write(transport, head if exchange.method == b"HEAD" else head + body)
        exchange.status = status
        exchange.sent = len(body)
        if exchange.method:
            self._log(exchange, upstream)
        self.current = None
        self.queue.clear()
        self._pause(_CLOSING)
        self._close(transport)

    def _log(self, exchange: Exchange, upstream: Upstream | None) -> None:
        route = exchange.route
        metrics.request_done(route.name if route is not None else "-", exchange.status)
        access_log = self.runtime.access_log
        if access_log is None:
            return
        access_log.request(
            self.peer.ip if self.peer is not None else "-",
            exchange.method,
            exchange.target,
            exchange.version,
            exchange.status,
            exchange.sent,
            self.loop.time() - exchange.started,
            exchange.route.name if exchange.route is not None else "",
            f"{upstream.host}:{upstream.port}" if upstream is not None else "",
        )

    # -- flow control and deadlines ----------------------------------------------------

    def _pause(self, reason: int) -> None:
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused |= reason

    def _resume(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and self.transport is not None:
                self.transport.resume_reading()

    def _check_backlog(self) -> None:
        """Stop reading while too much pipelined input waits; read again once it drains."""
        if len(self.queue) >= MAX_PIPELINED or self.buffered > MAX_BUFFERED:
            self._pause(_QUEUED)
        else:
            self._resume(_QUEUED)

    def _close(self, transport: asyncio.Transport) -> None:
        """Close the client connection once what is waiting in the write batch is sent."""
        self.batch.close(transport)

    def _set_deadline(self, kind: int, seconds: float) -> None:
        self.deadline_kind = kind
        self.deadline = self.loop.time() + seconds

    def expire(self, now: float) -> None:
        """The deadline passed: close, or answer 408/504, as the connection's state says."""
        kind = self.deadline_kind
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if 0.0 < self.stalled_since <= now - self.settings.send_timeout:
            self._give_up_sending(transport)
            return
        if kind == _UPSTREAM and self.writing_paused:  # the client is slow, not the upstream
            self.deadline = now + self.settings.upstream_timeout
            return
        exchange = self.current
        if kind in (_IDLE, _TUNNEL) or exchange is None:
            self._close(transport)
        elif kind == _HEAD:
            self._fail(
                exchange,
                408,
                f"request head not received within {self.settings.request_head_timeout:g} s",
                None,
            )
        elif kind == _BODY:
            self._fail(
                exchange,
                408,
                f"request body stalled for {self.settings.request_body_timeout:g} s",
                None,
            )
        else:
            upstream = exchange.upstream.upstream if exchange.upstream is not None else None
            if exchange.route is not None:
                metrics.upstream_error(exchange.route.name, "timeout")
            self._fail(
                exchange,
                504,
                f"upstream sent nothing for {self.settings.upstream_timeout:g} s",
                upstream,
            )
        self.deadline = now + 3600.0

    def _give_up_sending(self, transport: asyncio.Transport) -> None:
        """The client has read nothing for ``send_timeout``: cut it off, and the upstream
        connection (or tunnel) that feeds it, so neither is held by a client that left."""
        why = f"the client read nothing for {self.settings.send_timeout:g} s (send_timeout)"
        exchange = self.current
        if exchange is not None and exchange.head:
            upstream = exchange.upstream.upstream if exchange.upstream is not None else None
            self._fail(exchange, 0, why, upstream)  # logs the cut-short response, aborts
            return
        log.warning("connection from %s closed: %s", self.peer.ip if self.peer else "-", why)
        self.batch.flush()
        transport.abort()  # connection_lost closes the tunnel or upstream connection

    def close_if_idle(self) -> bool:
        """Close now when no request is in flight (graceful shutdown); True if closed."""
        if self.current is None and self.tunnel is None and self.transport is not None:
            self._close(self.transport)
            return True
        return False
