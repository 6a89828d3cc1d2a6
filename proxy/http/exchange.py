"""One request and its response: a sans-I/O state machine between a client and an upstream.

Events come in as method calls: the request from a protocol layer (HTTP/1.1 or HTTP/2),
the response from the upstream connection, the time from the deadline sweep. Actions go out
as calls on the ports the exchange is given, and on nothing else: its :class:`Downstream`
(the client's side: an HTTP/1.1 connection or an HTTP/2 stream), its upstream connection
(:class:`UpstreamLink`), and the :class:`Connector` that gives it one. No socket, no event
loop, no framing here: tests drive an exchange with a list of events and compare the exact
actions that come out (tests/test_exchange.py), as mitmproxy's playbook tests do.

Everything that changes an exchange's state is in this module (h11's rule). Its states:

====================  ==========================================================
``WAITING``           created; an earlier request on the same HTTP/1.1 connection
                      has not had its whole response yet
``STARTED``           its turn; the request head is still arriving
``CONNECTING``        head checked and routed; waiting for an upstream connection
``SENT``              the request is upstream; no response head yet
``RESPONDING``        the response head went to the client; its body streams
``COMPLETE``          the response ended (the upstream connection was released)
``FAILED``            answered with an error, or the response was cut short
``SWITCHED``          the upstream answered a WebSocket handshake with 101
====================  ==========================================================

and the request's own progress: ``HEAD`` (arriving), ``BODY`` (head checked, body
arriving), ``DONE``.

Design rules:
- Nothing goes upstream that does not belong to this exchange's checked request: the head
  once :meth:`request_head` has checked and routed it, body chunks as the protocol layer
  parsed them, the end once the request ended. Bytes that follow an Upgrade request belong
  to no request: the protocol layer holds them and hands them to the tunnel only after
  :meth:`switched` (a 101 to a WebSocket handshake).
- A refused request is answered in turn (:meth:`refuse`), never forwarded.
- An error before the response head is a status the client can read; after it, the
  response is cut (the client can tell it is incomplete).
- An upstream connection is reused only when its response ended cleanly, the request
  ended, and it carried no WebSocket handshake. A request is sent again only if it is
  idempotent, has no body, and the pooled connection it went out on closed before a byte
  of an answer (RFC 9110 9.2.2).
- Flow control both ways: a full upstream write buffer or a full body buffer pauses the
  request side (``Downstream.pause_request``); a client that cannot take more pauses
  reading from the upstream. Deadlines are values the sweep compares (:meth:`expire`),
  never timers.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Protocol

from proxy import metrics
from proxy.config import ServerConfig, Upstream
from proxy.http.message import (
    CHUNKED,
    NO_BODY,
    UNTIL_CLOSE,
    HTTPError,
    Request,
    RequestHead,
    Response,
)
from proxy.http.policy import Peer, check_request, check_response
from proxy.tls.policy import sni_matches_host

if TYPE_CHECKING:
    from proxy.http.accesslog import AccessLog
    from proxy.http.router import Route, Router

log = logging.getLogger("tlsproxy.proxy")

# The exchange's states (see the module docstring).
WAITING, STARTED, CONNECTING, SENT, RESPONDING, COMPLETE, FAILED, SWITCHED = range(8)
STATES = (
    "WAITING",
    "STARTED",
    "CONNECTING",
    "SENT",
    "RESPONDING",
    "COMPLETE",
    "FAILED",
    "SWITCHED",
)
# The request's progress.
HEAD, BODY, DONE = range(3)
# What the deadline means when it passes (none while waiting for its turn, or finished).
NO_DEADLINE, HEAD_TIMEOUT, BODY_TIMEOUT, UPSTREAM_TIMEOUT = range(4)
# Why the request side is paused (bits; reading resumes when none is left).
_CONNECTING = 1  # no upstream connection yet: the body would only pile up
_UPSTREAM_FULL = 2  # the upstream's write buffer is above its high-water mark
_BUFFER_FULL = 4  # MAX_BUFFERED bytes of body wait for an upstream connection

_NONE_TRIED: frozenset[Upstream] = frozenset()
MAX_BUFFERED = 256 * 1024  # request body bytes held while no upstream connection takes them
NEVER = float("inf")
# Methods a proxy may send again on its own (RFC 9110 9.2.2): no effect beyond the first.
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


class Clock(Protocol):
    def time(self) -> float: ...


class Context(Protocol):
    """What every exchange of a proxy shares (``proxy.http.runtime.Runtime``)."""

    @property
    def settings(self) -> ServerConfig: ...

    @property
    def router(self) -> Router: ...

    @property
    def pool(self) -> Connector: ...

    @property
    def access_log(self) -> AccessLog | None: ...

    @property
    def loop(self) -> Clock: ...


class ClientInfo(Protocol):
    """The client connection an exchange belongs to."""

    peer: Peer
    sni: str | None  # the server name of the TLS handshake
    sni_host: bytes  # the last Host found to match ``sni`` (a cache the exchange updates)


class Downstream(Protocol):
    """The client's side of one exchange: an HTTP/1.1 connection or an HTTP/2 stream.

    The exchange calls these only in its own turn, in this order: ``respond_interim``*,
    ``respond``, ``respond_body``*, then ``respond_end`` or ``cut``; or ``answer_error``
    alone; or ``respond`` then ``upgrade``. The protocol layer frames them.
    """

    def respond_interim(self, response: Response) -> None: ...

    def respond(self, exchange: Exchange, response: Response) -> None: ...

    def respond_body(self, data: bytes) -> None: ...

    def respond_end(self, exchange: Exchange) -> None: ...

    def answer_error(self, exchange: Exchange, error: HTTPError) -> None: ...

    def cut(self, exchange: Exchange) -> None: ...

    def pause_request(self, exchange: Exchange) -> None: ...

    def resume_request(self, exchange: Exchange) -> None: ...

    def upgrade(self, exchange: Exchange, link: UpstreamLink, rest: bytes) -> None: ...


class UpstreamLink(Protocol):
    """One HTTP/1.1 connection to an upstream (``proxy.http.upstream``); it frames what it
    sends and reports the response it parses to the exchange it is attached to."""

    upstream: Upstream
    reused: bool  # it served an earlier request (it may have been closed meanwhile)
    answered: bool  # a byte of a response to the current request has arrived

    def attach(self, exchange: Exchange, head_request: bool) -> None: ...

    def send_request(self, request: Request) -> None: ...

    def send_body(self, data: bytes) -> None: ...

    def send_end(self) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def close(self) -> None: ...

    def detach(self) -> asyncio.Transport:
        """Hand the transport over (to a WebSocket tunnel); the link is done with it."""


class Connector(Protocol):
    """Where upstream connections come from (``proxy.http.upstream.UpstreamPool``)."""

    connect_timeout: float

    def take(self, upstream: Upstream) -> UpstreamLink | None: ...

    def open(self, upstream: Upstream, exchange: Exchange) -> None:
        """Connect in the background; then ``exchange.connected`` or ``connect_failed``."""

    def release(self, link: UpstreamLink, reusable: bool) -> None: ...

    def mark_down(self, upstream: Upstream, reason: str) -> None: ...

    def is_up(self, upstream: Upstream) -> bool: ...


class Exchange:
    """One request and its response, from the request's first byte to the response's last."""

    __slots__ = (
        "body_bytes",
        "buffered",
        "buffered_bytes",
        "client",
        "context",
        "deadline",
        "deadline_kind",
        "dispatched",
        "downstream",
        "error",
        "link",
        "method",
        "paused",
        "request",
        "request_state",
        "response",
        "route",
        "sent",
        "stalled_since",
        "started",
        "state",
        "status",
        "target",
        "tried",
        "version",
    )

    def __init__(
        self,
        context: Context,
        downstream: Downstream,
        client: ClientInfo,
        now: float,
        *,
        started: bool = False,
    ) -> None:
        """``started``: its turn has come already (see :meth:`start`), which is so for the
        first request on an HTTP/1.1 connection."""
        self.context = context
        self.downstream = downstream
        self.client = client
        self.started = now
        self.state = WAITING
        self.request_state = HEAD
        self.method = b""
        self.target = b""
        self.version = b"1.1"
        self.request: Request | None = None
        self.route: Route | None = None
        self.link: UpstreamLink | None = None
        self.buffered: list[bytes] | None = None  # body chunks waiting for an upstream
        self.buffered_bytes = 0
        self.body_bytes = 0
        self.response: Response | None = None
        self.status = 0
        self.sent = 0
        self.error: HTTPError | None = None
        self.tried: frozenset[Upstream] = _NONE_TRIED
        self.dispatched = 0.0
        self.paused = 0
        self.stalled_since = 0.0  # when the client stopped taking the response (0: it takes)
        if started:
            self.state = STARTED
            self.deadline = now + context.settings.request_head_timeout
            self.deadline_kind = HEAD_TIMEOUT
        else:
            self.deadline = NEVER
            self.deadline_kind = NO_DEADLINE

    def __repr__(self) -> str:
        return f"<Exchange {self.method.decode()} {self.target.decode()} {STATES[self.state]}>"

    # -- events from the client's protocol layer ------------------------------------------

    def start(self) -> None:
        """Its turn: HTTP/1.1 starts an exchange when the one before it has its whole
        response; HTTP/2 at once."""
        if self.error is not None:
            self.state = STARTED
            self._fail(self.error)
            return
        self.state = STARTED
        if self.request is None:
            self._deadline(HEAD_TIMEOUT, self.context.settings.request_head_timeout)
        else:
            self._dispatch()

    def request_head(self, head: RequestHead) -> None:
        """The request head arrived: check and route it (raises HTTPError)."""
        self.method, self.target, self.version = head.method, head.target, head.version
        client = self.client
        request = check_request(head, client.peer)
        host = request.host
        if client.sni is not None and host != client.sni_host:
            if not sni_matches_host(client.sni, host):
                name = host.decode("latin-1")
                raise HTTPError(
                    421, f"Host {name!r} differs from the TLS server name {client.sni!r}"
                )
            client.sni_host = host  # checked once per connection, not once per request
        site = self.context.router.match(host)
        if site is None:
            raise HTTPError(421, f"no site is configured for Host {host.decode('latin-1')!r}")
        self.route = site.for_target(request.target) if site.prefixes else site.fallback
        limit = self.context.settings.max_body_bytes
        if limit and request.length > limit:
            raise HTTPError(413, f"request body of {request.length} bytes, limit {limit}")
        self.request = request
        self.request_state = BODY
        if self.state == STARTED:
            self._dispatch()

    def request_body(self, data: bytes) -> None:
        """A chunk of the request body, as the protocol layer parsed it (raises HTTPError)."""
        request = self.request
        assert request is not None and self.request_state == BODY
        self.body_bytes += len(data)
        limit = self.context.settings.max_body_bytes
        if limit and self.body_bytes > limit:
            raise HTTPError(413, f"request body over the limit of {limit} bytes")
        if request.length and self.body_bytes > request.length:  # llhttp never lets this by
            raise HTTPError(400, "more body than Content-Length", malformed=True)
        link = self.link
        if link is not None:
            link.send_body(data)
        else:  # no upstream connection yet (connecting, or not our turn): hold it, bounded
            if self.buffered is None:
                self.buffered = [data]
            else:
                self.buffered.append(data)
            self.buffered_bytes += len(data)
            if self.buffered_bytes > MAX_BUFFERED:
                self._pause(_BUFFER_FULL)
        if self.state != WAITING and self.response is None:
            self._deadline(BODY_TIMEOUT, self.context.settings.request_body_timeout)

    def request_end(self) -> None:
        """The request is complete."""
        request = self.request
        assert request is not None
        if request.length and self.body_bytes != request.length:
            raise HTTPError(400, "less body than Content-Length", malformed=True)
        self.request_state = DONE
        link = self.link
        if link is not None and request.framing == CHUNKED:  # else the length says it
            link.send_end()
        if self.state == SENT and self.deadline_kind != UPSTREAM_TIMEOUT:  # was the body's
            context = self.context
            self.deadline_kind = UPSTREAM_TIMEOUT
            self.deadline = context.loop.time() + context.settings.upstream_timeout

    def refuse(self, error: HTTPError) -> None:
        """The request is refused (its syntax or the policy): nothing of it goes upstream;
        it is answered in its turn."""
        self.error = error
        if self.state != WAITING and self.state < COMPLETE:
            self._fail(error)

    def client_writable(self, writable: bool) -> None:
        """The client's side stopped (False) or resumed (True) taking the response."""
        link = self.link
        if writable:
            self.stalled_since = 0.0
            if link is not None:
                link.resume_reading()
            if self.deadline_kind == UPSTREAM_TIMEOUT:  # the wait was the client's
                self._deadline(UPSTREAM_TIMEOUT, self.context.settings.upstream_timeout)
        else:
            self.stalled_since = self.context.loop.time()
            if link is not None:
                link.pause_reading()

    def client_gone(self) -> None:
        """The client connection closed: the upstream connection cannot be reused."""
        link = self.link
        self.link = None
        if link is not None:
            link.close()
        if self.state < COMPLETE:
            self.state = FAILED
        self.deadline_kind = NO_DEADLINE

    # -- events from the upstream side ----------------------------------------------------

    def connected(self, link: UpstreamLink) -> None:
        """An upstream connection for this exchange: send the request, and what of the body
        has arrived."""
        request = self.request
        assert request is not None and self.state == CONNECTING
        self.link = link
        link.attach(self, self.method == b"HEAD")
        if self.stalled_since:
            link.pause_reading()
        self.state = SENT
        link.send_request(request)
        if self.buffered:
            for chunk in self.buffered:
                link.send_body(chunk)
            self.buffered = None
            self.buffered_bytes = 0
        if self.request_state == DONE:
            if request.framing == CHUNKED:  # a body of unknown length ends explicitly
                link.send_end()
            self._deadline(UPSTREAM_TIMEOUT, self.context.settings.upstream_timeout)
        if self.paused:
            self._resume(_CONNECTING | _BUFFER_FULL)

    def connect_failed(self, upstream: Upstream, timed_out: bool, why: str) -> None:
        """Connecting to ``upstream`` failed: try the site's next upstream, or answer."""
        if self.state != CONNECTING:
            return
        route = self.route
        assert route is not None
        pool = self.context.pool
        pool.mark_down(upstream, why)
        if timed_out:
            metrics.upstream_error(route.name, "timeout")
            wait = pool.connect_timeout
            self._fail(
                HTTPError(504, f"upstream {upstream.url} did not accept within {wait:g} s"),
                upstream,
            )
            return
        metrics.upstream_error(route.name, "refused")
        self.tried |= {upstream}
        following = route.balancer.pick(self.tried)
        if following is None or following in self.tried:
            self._fail(
                HTTPError(502, f"upstream {upstream.url} refused the connection: {why}"),
                upstream,
            )
            return
        pool.open(following, self)

    def upstream_writable(self, writable: bool) -> None:
        """The upstream's write buffer went above (False) or below (True) its limits."""
        if writable:
            self._resume(_UPSTREAM_FULL)
        else:
            self._pause(_UPSTREAM_FULL)

    def response_head(
        self, status: int, reason: bytes, version: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        """The upstream's response head (raises HTTPError: the upstream broke the rules)."""
        route = self.route
        request = self.request
        assert route is not None and request is not None
        if status < 200 and status != 101:  # 100 Continue, 103 Early Hints: pass along
            interim = check_response(status, reason, version, headers, head_request=False)
            self.downstream.respond_interim(interim)
            return
        context = self.context
        now = context.loop.time()
        metrics.UPSTREAM_SECONDS.observe(now - self.dispatched, route.key)
        if status == 101 and not request.websocket:
            raise HTTPError(502, "upstream switched protocols without being asked to")
        response = check_response(
            status, reason, version, headers, head_request=self.method == b"HEAD", hsts=route.hsts
        )
        self.response = response
        self.status = status
        self.state = RESPONDING
        self.deadline_kind = UPSTREAM_TIMEOUT
        self.deadline = now + context.settings.upstream_timeout
        self.downstream.respond(self, response)

    def response_body(self, data: bytes) -> None:
        self.sent += len(data)
        self.downstream.respond_body(data)
        self.deadline = self.context.loop.time() + self.context.settings.upstream_timeout

    def response_end(self) -> None:
        response = self.response
        if response is None or self.status == 101:  # an interim response, or a tunnel
            return
        request = self.request
        assert request is not None
        link = self.link
        self.link = None
        self.state = COMPLETE
        self.deadline_kind = NO_DEADLINE
        if link is not None:  # one that saw a WebSocket handshake is never reused
            reusable = response.keep_alive and self.request_state == DONE and not request.websocket
            self.context.pool.release(link, reusable)
        self._log(link.upstream if link is not None else None)
        self.downstream.respond_end(self)

    def switched(self, rest: bytes) -> None:
        """The upstream answered a WebSocket handshake with 101; ``rest`` followed it."""
        link = self.link
        if link is None or self.status != 101:
            self.upstream_lost("upstream upgraded without a 101 response")
            return
        self.link = None
        self.state = SWITCHED
        self.deadline_kind = NO_DEADLINE
        self._log(link.upstream)
        self.downstream.upgrade(self, link, rest)

    def upstream_invalid(self, error: HTTPError) -> None:
        """The upstream sent what cannot be parsed or relayed (its connection is closed)."""
        link = self.link
        self.link = None
        if self.route is not None:
            metrics.upstream_error(self.route.name, "invalid")
        self._fail(error, link.upstream if link is not None else None)

    def upstream_eof(self) -> None:
        response = self.response
        if response is not None and response.framing == UNTIL_CLOSE:  # that was the end
            self.response_end()
            return
        self.upstream_lost("upstream closed the connection")

    def upstream_lost(self, reason: str) -> None:
        """The upstream connection closed or broke before the response ended."""
        link = self.link
        if link is None:
            return
        self.link = None
        link.close()
        request = self.request
        assert request is not None and self.route is not None
        if (
            link.reused
            and not link.answered
            and self.method in IDEMPOTENT
            and request.framing == NO_BODY
        ):
            # A pooled connection the upstream closed just as the request went out, before a
            # byte of an answer: the request can be sent again (RFC 9110 9.2.2), once.
            metrics.upstream_retry(self.route.name)
            self.state = CONNECTING
            self._pause(_CONNECTING)
            self.context.pool.open(link.upstream, self)
            return
        metrics.upstream_error(self.route.name, "reset")
        self._fail(HTTPError(502, reason), link.upstream)

    # -- time -----------------------------------------------------------------------------

    def expire(self, now: float) -> None:
        """Called by the sweep when ``deadline`` has passed or the client has taken nothing
        for ``send_timeout``: answer 408/504, or cut, as the state says."""
        settings = self.context.settings
        if 0.0 < self.stalled_since <= now - settings.send_timeout:
            why = f"the client read nothing for {settings.send_timeout:g} s (send_timeout)"
            self._fail(HTTPError(0, why), self._upstream())
            return
        kind = self.deadline_kind
        if self.deadline > now or kind == NO_DEADLINE:
            return
        if kind == HEAD_TIMEOUT:
            why = f"request head not received within {settings.request_head_timeout:g} s"
            self._fail(HTTPError(408, why))
        elif kind == BODY_TIMEOUT:
            why = f"request body stalled for {settings.request_body_timeout:g} s"
            self._fail(HTTPError(408, why))
        elif self.stalled_since:  # the client is slow, not the upstream
            self.deadline = now + settings.upstream_timeout
        else:
            if self.route is not None:
                metrics.upstream_error(self.route.name, "timeout")
            why = f"upstream sent nothing for {settings.upstream_timeout:g} s"
            self._fail(HTTPError(504, why), self._upstream())

    # -- the rest -------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Send the request upstream on a pooled connection, or open one."""
        route = self.route
        assert route is not None
        context = self.context
        self.state = CONNECTING
        self.dispatched = now = context.loop.time()
        if self.request_state == BODY and self.request is not None and self.request.framing:
            self.deadline_kind = BODY_TIMEOUT
            self.deadline = now + context.settings.request_body_timeout
        else:
            self.deadline_kind = UPSTREAM_TIMEOUT
            self.deadline = now + context.settings.upstream_timeout
        upstream = route.balancer.pick()
        assert upstream is not None
        link = context.pool.take(upstream)
        if link is not None:
            self.connected(link)
        else:
            self._pause(_CONNECTING)
            context.pool.open(upstream, self)

    def _fail(self, error: HTTPError, upstream: Upstream | None = None) -> None:
        """Answer ``error`` (or cut the response if its head went out); the upstream
        connection, if any, is closed."""
        link = self.link
        self.link = None
        if link is not None:
            link.close()
        self.deadline_kind = NO_DEADLINE
        if self.state >= COMPLETE:
            return
        route = self.route
        site = route.name if route is not None else "-"
        origin = upstream.url if upstream is not None else "-"
        client = self.client.peer.ip
        if self.state == RESPONDING or not error.status:  # started, or nobody reads an answer
            self.state = FAILED
            log.warning(
                "response to %s cut short: site=%s upstream=%s: %s",
                client,
                site,
                origin,
                error.reason,
            )
            self._log(upstream)
            self.downstream.cut(self)
            return
        self.state = FAILED
        log.warning(
            "%d for %s: site=%s upstream=%s: %s", error.status, client, site, origin, error.reason
        )
        self.status = error.status
        self.downstream.answer_error(self, error)  # sets ``sent``
        if self.method:
            self._log(upstream)

    def _upstream(self) -> Upstream | None:
        return self.link.upstream if self.link is not None else None

    def _log(self, upstream: Upstream | None) -> None:
        route = self.route
        metrics.request_done(route.name if route is not None else "-", self.status, self.version)
        access_log = self.context.access_log
        if access_log is not None:
            access_log.request(
                self.client.peer.ip,
                self.method,
                self.target,
                self.version,
                self.status,
                self.sent,
                self.context.loop.time() - self.started,
                route.name if route is not None else "",
                f"{upstream.host}:{upstream.port}" if upstream is not None else "",
            )

    def _deadline(self, kind: int, seconds: float) -> None:
        self.deadline_kind = kind
        self.deadline = self.context.loop.time() + seconds

    def _pause(self, reason: int) -> None:
        if not self.paused:
            self.downstream.pause_request(self)
        self.paused |= reason

    def _resume(self, reasons: int) -> None:
        if self.paused & reasons:
            self.paused &= ~reasons
            if not self.paused:
                self.downstream.resume_request(self)
