"""The client side of the data path: one asyncio Protocol per TLS connection.

Design rules:
- One request at a time per client connection; pipelined requests wait in h11's buffer and
  reading pauses until the response is done (bounded buffering, answers in order).
- Bodies are streamed event by event in both directions, never collected. Backpressure:
  a full upstream write buffer pauses reading the client, a full client write buffer
  pauses reading the upstream.
- Nothing the client sends is forwarded before the request head is complete and routed;
  errors before the response starts become a readable status, after it the connection is
  cut so the client can tell the body is incomplete.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import cast

import h11

from proxy.accesslog import AccessLog
from proxy.config import ServerConfig, Upstream
from proxy.headers import Peer, client_response_headers, upstream_request_headers
from proxy.router import Route, Router
from proxy.tasks import spawn
from proxy.upstream import UpstreamConnection, UpstreamPool

log = logging.getLogger("tlsproxy.proxy")

MAX_REQUEST_HEAD = 64 * 1024

# Reasons to stop reading from the client (bit flags: reading resumes when none is left).
_CONNECTING = 1  # no upstream connection yet for the current request
_UPSTREAM_FULL = 2  # the upstream's write buffer is above its high-water mark
_AWAITING = 4  # request complete; its response is not


@dataclass(slots=True)
class Runtime:
    """What every client connection shares; the server swaps ``router`` on reload."""

    settings: ServerConfig
    router: Router
    pool: UpstreamPool
    access_log: AccessLog | None
    connections: set[ClientConnection] = field(default_factory=set)
    draining: bool = False
    drained: asyncio.Event = field(default_factory=asyncio.Event)  # set: draining, none left


class ClientConnection(asyncio.Protocol):
    """Relays requests from one client connection to upstreams and responses back."""

    def __init__(self, runtime: Runtime, listen_port: int) -> None:
        self.runtime = runtime
        self.listen_port = listen_port
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer: Peer | None = None
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        self.paused = 0
        self.writing_paused = False
        self.idle_timer: asyncio.TimerHandle | None = None
        self._reset_exchange()

    def _reset_exchange(self) -> None:
        self.request: h11.Request | None = None
        self.route: Route | None = None
        self.upstream: UpstreamConnection | None = None
        self.upstream_request: h11.Request | None = None
        self.tried: frozenset[Upstream] = frozenset()
        self.connecting = False
        self.request_has_body = False
        self.request_done = False
        self.response_started = False
        self.status = 0
        self.sent = 0
        self.started = 0.0
        self.last_upstream_activity = 0.0
        self.upstream_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol: client side --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop: not a subclass
        peername = transport.get_extra_info("peername")
        self.peer = Peer.from_address(
            peername[0], self.listen_port, self.runtime.settings.trusted_proxies
        )
        self.runtime.connections.add(self)
        self._arm_idle_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        runtime = self.runtime
        runtime.connections.discard(self)
        if runtime.draining and not runtime.connections:
            runtime.drained.set()
        self._cancel_timers()
        upstream, self.upstream = self.upstream, None
        if upstream is not None:  # the exchange is cut short: the upstream cannot be reused
            upstream.close()

    def data_received(self, data: bytes) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        self.h11.receive_data(data)
        self._process()

    def eof_received(self) -> bool:
        self.h11.receive_data(b"")
        self._process()
        return False

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self.last_upstream_activity = self.loop.time()
        if self.upstream is not None:
            self.upstream.resume_reading()

    # -- requests ----------------------------------------------------------------------

    def _process(self) -> None:
        """Pull request events from h11 until it needs data or we must wait."""
        conn = self.h11
        while not self.connecting:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._fail(exc.error_status_hint, f"bad request: {exc}")
                return
            kind = type(event)
            if kind is h11.Data:
                self._to_upstream(event)  # type: ignore[arg-type]
            elif kind is h11.Request:
                self._begin(event)  # type: ignore[arg-type]
            elif kind is h11.EndOfMessage:
                self.request_done = True
                if self.upstream is not None:
                    self._to_upstream(event)  # type: ignore[arg-type]
                    self._arm_upstream_timer()
            elif event is h11.NEED_DATA:
                return
            elif event is h11.PAUSED:
                self._pause(_AWAITING)
                return
            elif kind is h11.ConnectionClosed:
                if self.transport is not None and self.request is None:
                    self.transport.close()
                return

    def _begin(self, request: h11.Request) -> None:
        self.request = request
        self.started = self.loop.time()
        host = b""
        for name, value in request.headers:
            if name == b"host":
                host = value
                break
        site = self.runtime.router.match(host)
        if site is None:
            self._fail(421, f"no site is configured for host {host.decode('latin-1')!r}")
            return
        route = site.for_target(request.target) if site.prefixes else site.fallback
        self.route = route
        assert self.peer is not None
        headers = upstream_request_headers(request.headers, self.peer)
        self.request_has_body = any(
            (n == b"content-length" and v != b"0") or n == b"transfer-encoding" for n, v in headers
        )
        self.upstream_request = h11.Request(
            method=request.method, target=request.target, headers=headers
        )
        upstream = route.balancer.pick()
        assert upstream is not None
        conn = self.runtime.pool.take(upstream)
        if conn is not None:
            self._attach(conn)
        else:
            self._connect(upstream)

    def _connect(self, upstream: Upstream) -> None:
        self.connecting = True
        self._pause(_CONNECTING)
        spawn(self._open(upstream), name=f"connect {upstream.url}")

    async def _open(self, upstream: Upstream) -> None:
        """Connect, trying the site's other upstreams when one refuses (nothing was sent)."""
        route = self.route
        assert route is not None
        pool = self.runtime.pool
        while True:
            try:
                conn = await pool.connect(upstream)
                break
            except TimeoutError:
                pool.mark_down(upstream, "connect timed out")
                self._fail(
                    504,
                    f"upstream {upstream.url} did not accept within {pool.connect_timeout:g} s",
                    upstream,
                )
                return
            except OSError as exc:
                pool.mark_down(upstream, exc.strerror or str(exc))
                self.tried |= {upstream}
                following = route.balancer.pick(self.tried)
                if following is None or following in self.tried:
                    self._fail(
                        502,
                        f"upstream {upstream.url} refused the connection: {exc.strerror or exc}",
                        upstream,
                    )
                    return
                upstream = following
        if self.transport is None or self.transport.is_closing() or self.request is None:
            pool.release(conn)  # the client went away; the fresh connection is still good
            return
        self.connecting = False
        self._attach(conn)
        self._resume(_CONNECTING)
        self._process()

    def _attach(self, conn: UpstreamConnection) -> None:
        """Send the request head (and the end, if the client already finished) upstream."""
        assert self.upstream_request is not None
        self.upstream = conn
        conn.handler = self
        if self.writing_paused:
            conn.pause_reading()
        conn.write(self.upstream_request)
        if self.request_done:
            conn.write(h11.EndOfMessage())
            self._arm_upstream_timer()

    def _to_upstream(self, event: h11.Data | h11.EndOfMessage) -> None:
        upstream = self.upstream
        if upstream is None:  # already answered locally; the rest of the body is dropped
            return
        if type(event) is h11.EndOfMessage:
            event = h11.EndOfMessage()  # request trailers are not forwarded
        upstream.write(event)

    # -- responses (called by UpstreamConnection) ---------------------------------------

    def upstream_event(self, event: h11.Event) -> None:
        transport = self.transport
        assert transport is not None
        self.last_upstream_activity = self.loop.time()
        kind = type(event)
        if kind is h11.Data:
            data = self.h11.send(event)
            self.sent += len(event.data)  # type: ignore[attr-defined]
            if data:
                transport.write(data)
        elif kind is h11.Response:
            self._respond(event)  # type: ignore[arg-type]
        elif kind is h11.EndOfMessage:
            data = self.h11.send(h11.EndOfMessage())
            if data:
                transport.write(data)
            self._finish()
        elif kind is h11.InformationalResponse:
            info: h11.InformationalResponse = event  # type: ignore[assignment]
            if info.status_code != 101:
                assert self.route is not None
                headers = client_response_headers(info.headers, None, False)
                transport.write(
                    self.h11.send(
                        h11.InformationalResponse(status_code=info.status_code, headers=headers)
                    )
                )

    def _respond(self, response: h11.Response) -> None:
        assert self.route is not None and self.transport is not None
        self.response_started = True
        self.status = response.status_code
        headers = client_response_headers(response.headers, self.route.hsts, self.runtime.draining)
        try:
            data = self.h11.send(
                h11.Response(
                    status_code=response.status_code, headers=headers, reason=response.reason
                )
            )
        except h11.LocalProtocolError as exc:
            self.response_started = False
            self._fail(502, f"unusable response from upstream: {exc}", self._upstream_origin())
            return
        self.transport.write(data)

    def upstream_lost(self, reason: str) -> None:
        upstream = self.upstream
        self.upstream = None
        if upstream is None:
            return
        upstream.close()
        if self.response_started:
            self._abort(f"{reason} in the middle of the response", upstream.upstream)
        elif upstream.reused and not self.request_has_body and not self.response_started:
            # A pooled connection the upstream had closed just as we sent: safe to resend.
            self._cancel_upstream_timer()
            self._connect_again(upstream.upstream)
        else:
            self._fail(502, reason, upstream.upstream)

    def _connect_again(self, upstream: Upstream) -> None:
        self.connecting = True
        self._pause(_CONNECTING)
        spawn(self._open(upstream), name=f"reconnect {upstream.url}")

    def upstream_writing_paused(self, paused: bool) -> None:
        if paused:
            self._pause(_UPSTREAM_FULL)
        else:
            self._resume(_UPSTREAM_FULL)

    def _finish(self) -> None:
        """The response is complete: log, pool the upstream, then the next request."""
        self._cancel_upstream_timer()
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            self.runtime.pool.release(upstream)
        self._log_access(upstream.upstream if upstream is not None else None)
        self._reset_exchange()
        conn = self.h11
        if (
            conn.our_state is h11.DONE
            and conn.their_state is h11.DONE
            and not self.runtime.draining
        ):
            conn.start_next_cycle()
            self._resume(_AWAITING)
            self._arm_idle_timer()
            self._process()
        elif self.transport is not None:
            self.transport.close()

    # -- failures ----------------------------------------------------------------------

    def _upstream_origin(self) -> Upstream | None:
        return self.upstream.upstream if self.upstream is not None else None

    def _fail(self, status: int, why: str, upstream: Upstream | None = None) -> None:
        """Answer ``status`` ourselves (or cut the connection if a response has started)."""
        if self.response_started:
            self._abort(why, upstream)
            return
        site = self.route.site.name if self.route is not None else "-"
        origin = upstream.url if upstream is not None else "-"
        log.warning("%d for %s: site=%s upstream=%s: %s", status, self._client(), site, origin, why)
        self._cancel_upstream_timer()
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None
        phrase = HTTPStatus(status).phrase
        body = f"{status} {phrase}\n".encode()
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        try:
            data = self.h11.send(h11.Response(status_code=status, headers=headers, reason=phrase))
            if self.request is None or self.request.method != b"HEAD":
                data += self.h11.send(h11.Data(data=body))
            data += self.h11.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            transport.abort()
            return
        self.status = status
        self.sent = len(body)
        transport.write(data)
        if self.request is not None:
            self._log_access(upstream)
        self._reset_exchange()
        self.connecting = True  # nothing more is read from this connection
        transport.close()

    def _abort(self, why: str, upstream: Upstream | None) -> None:
        site = self.route.site.name if self.route is not None else "-"
        origin = upstream.url if upstream is not None else "-"
        log.warning(
            "aborted response to %s: site=%s upstream=%s: %s", self._client(), site, origin, why
        )
        if self.request is not None:
            self._log_access(upstream)
        self._cancel_upstream_timer()
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None
        self._reset_exchange()
        self.connecting = True
        if self.transport is not None:
            self.transport.abort()

    def _client(self) -> str:
        return self.peer.ip if self.peer is not None else "-"

    def _log_access(self, upstream: Upstream | None) -> None:
        access_log = self.runtime.access_log
        request = self.request
        if access_log is None or request is None:
            return
        access_log.request(
            self._client(),
            request.method,
            request.target,
            request.http_version,
            self.status,
            self.sent,
            self.loop.time() - self.started,
            self.route.site.name if self.route is not None else "",
            f"{upstream.host}:{upstream.port}" if upstream is not None else "",
        )

    # -- flow control and timers -------------------------------------------------------

    def _pause(self, reason: int) -> None:
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused |= reason

    def _resume(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and self.transport is not None:
                self.transport.resume_reading()

    def _arm_idle_timer(self) -> None:
        self.idle_timer = self.loop.call_later(
            self.runtime.settings.keepalive_timeout, self._idle_timeout
        )

    def _idle_timeout(self) -> None:
        self.idle_timer = None
        if self.request is None and self.transport is not None:
            self.transport.close()

    def _arm_upstream_timer(self) -> None:
        self.last_upstream_activity = self.loop.time()
        if self.upstream_timer is None:
            self.upstream_timer = self.loop.call_later(
                self.runtime.settings.upstream_timeout, self._upstream_timeout
            )

    def _upstream_timeout(self) -> None:
        """Fires at most once per ``upstream_timeout``; re-arms while the upstream is active."""
        self.upstream_timer = None
        timeout = self.runtime.settings.upstream_timeout
        idle = self.loop.time() - self.last_upstream_activity
        if self.upstream is None:
            return
        if self.writing_paused or idle < timeout:
            self.upstream_timer = self.loop.call_later(
                timeout - idle if idle < timeout else timeout, self._upstream_timeout
            )
            return
        self._fail(504, f"upstream sent nothing for {timeout:g} s", self.upstream.upstream)

    def _cancel_upstream_timer(self) -> None:
        if self.upstream_timer is not None:
            self.upstream_timer.cancel()
            self.upstream_timer = None

    def _cancel_timers(self) -> None:
        self._cancel_upstream_timer()
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    def close_if_idle(self) -> bool:
        """Close now when no request is in flight (graceful shutdown); True if closed."""
        if self.request is None and self.transport is not None:
            self.transport.close()
            return True
        return False
