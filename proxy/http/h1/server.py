"""HTTP/1.1 from clients: one asyncio Protocol per connection, exchanges answered in order.

The TLS connection hands the decrypted bytes here when ALPN chose ``http/1.1`` (or the
client offered no ALPN). This layer parses requests (llhttp, :mod:`proxy.http.h1.parse`),
starts one :class:`~proxy.http.exchange.Exchange` per request, and frames what the
exchange answers (:mod:`proxy.http.h1.framing`); the exchange decides everything else.

Design rules:
- Requests are answered in order. A pipelined request waits, head parsed and body buffered
  (bounded: reading pauses), until the one before it has its whole response; then it
  starts. A request refused while an earlier one is in flight is answered in its turn,
  and nothing after it is read.
- After a request with an Upgrade header llhttp stops; what follows is held here and
  reading stops until the upstream answers a WebSocket handshake with 101 (the bytes open
  the tunnel, :mod:`proxy.http.tunnel`) or anything else (the connection closes after the
  answer). Any other Upgrade was removed from the forwarded request, so what follows is
  parsed as the next request.
- The connection's deadline is its current exchange's, or the keep-alive idle timeout;
  a client that takes nothing of what is written to it for ``send_timeout`` is cut off.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from proxy.http.client import ClientConnection
from proxy.http.exchange import COMPLETE, DONE, Exchange, UpstreamLink
from proxy.http.h1 import framing
from proxy.http.h1.parse import RequestReader
from proxy.http.message import CHUNKED, UNTIL_CLOSE, HTTPError, RequestHead, Response
from proxy.http.tunnel import Tunnel

if TYPE_CHECKING:
    from proxy.http.runtime import Runtime

log = logging.getLogger("tlsproxy.proxy")

MAX_PIPELINED = 16  # queued requests before reading from the client pauses
MAX_QUEUED_BODY = 256 * 1024  # body bytes queued requests may hold before reading pauses

# Why reading from the client is paused (bits: it resumes when none is left).
_EXCHANGE = 1  # an exchange asked (no upstream yet, upstream full, body buffer full)
_QUEUED = 2  # too much pipelined input waits
_CLOSING = 4  # an answer goes out, then the connection closes: nothing more is read
_UPGRADING = 8  # a WebSocket handshake waits for the upstream's answer


class H1Connection(ClientConnection):
    """The HTTP/1.1 protocol layer of one client connection (the exchanges' Downstream)."""

    __slots__ = (
        "chunked",
        "close_after",
        "exchanges",
        "held",
        "holding",
        "idle_deadline",
        "paused",
        "reader",
        "receiving",
        "stalled_since",
    )

    def __init__(self, runtime: Runtime, listen_port: int) -> None:
        super().__init__(runtime, listen_port)
        self.reader: RequestReader | None = None  # made with the first request byte
        self.exchanges: list[Exchange] = []  # [0] is answered; the rest wait (pipelined)
        self.receiving: Exchange | None = None  # whose request is being read
        self.holding: list[Exchange] = []  # exchanges that asked to pause reading
        self.paused = 0
        self.chunked = False  # the current response's body goes out in chunks we frame
        self.close_after = False  # the connection closes after the current response
        self.held = b""  # what followed a WebSocket handshake: for the tunnel, if it opens
        self.stalled_since = 0.0  # when writing to the client paused (0: it is not paused)
        self.idle_deadline = 0.0

    # -- the deadline sweep ---------------------------------------------------------------

    @property
    def deadline(self) -> float:
        """When :meth:`expire` must run: the current exchange's deadline, the keep-alive
        idle timeout, or the send timeout of a client that takes nothing."""
        exchanges = self.exchanges
        deadline = exchanges[0].deadline if exchanges else self.idle_deadline
        if self.stalled_since:
            return min(deadline, self.stalled_since + self.runtime.settings.send_timeout)
        return deadline

    def expire(self, now: float) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        exchanges = self.exchanges
        if exchanges and exchanges[0].state < COMPLETE:
            exchanges[0].expire(now)
        elif self.stalled_since:
            why = f"the client read nothing for {self.runtime.settings.send_timeout:g} s"
            log.warning("connection from %s closed: %s (send_timeout)", self.peer.ip, why)
            self.batch.flush()
            transport.abort()
        elif not exchanges and self.idle_deadline <= now:
            self.batch.close(transport)

    def retire(self) -> None:
        """Nothing to do: every request reads the current settings."""

    def close_if_idle(self) -> bool:
        """Close now when no request is in flight (graceful shutdown); True if closed."""
        if not self.exchanges and self.transport is not None:
            self.batch.close(self.transport)
            return True
        return False

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        runtime = self.runtime
        self.idle_deadline = runtime.loop.time() + runtime.settings.keepalive_timeout

    def connection_lost(self, exc: Exception | None) -> None:
        if self.reader is not None:
            self.reader.close()  # frees this connection (and its transport) without the GC
        self.runtime.forget(self)
        exchanges, self.exchanges = self.exchanges, []
        for exchange in exchanges:
            exchange.client_gone()

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        if reader is None:
            if self.paused & _CLOSING:
                return  # refused: nothing more is read
            reader = self.reader = RequestReader(
                self, self.runtime.settings.max_header_bytes, self.runtime.settings.max_headers
            )
        try:
            rest = reader.feed(data)
        except HTTPError as error:
            self._refuse(error)
            return
        if rest is not None:
            self._after_upgrade_request(rest)

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        self.stalled_since = self.runtime.loop.time()
        if self.exchanges:
            self.exchanges[0].client_writable(False)

    def resume_writing(self) -> None:
        self.stalled_since = 0.0
        if self.exchanges:
            self.exchanges[0].client_writable(True)

    # -- request events (from RequestReader) ----------------------------------------------

    def request_begin(self) -> None:
        exchanges = self.exchanges
        first = not exchanges
        exchange = Exchange(self.runtime, self, self, self.runtime.loop.time(), started=first)
        self.receiving = exchange
        exchanges.append(exchange)
        if not first:
            self._check_backlog()

    def request_head(self, head: RequestHead) -> None:
        self.receiving.request_head(head)  # type: ignore[union-attr]  # set by request_begin

    def request_body(self, data: bytes) -> None:
        self.receiving.request_body(data)  # type: ignore[union-attr]  # set by request_begin

    def request_end(self) -> None:
        exchange = self.receiving
        assert exchange is not None
        self.receiving = None
        exchange.request_end()

    def _refuse(self, error: HTTPError) -> None:
        """A request the parser or the policy refused: nothing more is read; it is answered
        in its turn, after the requests before it."""
        self._pause(_CLOSING)
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        exchange = self.receiving
        self.receiving = None
        if exchange is not None:
            exchange.refuse(error)  # answered now if it is the current one, else in turn
            return
        # refused before a first byte made an exchange (garbage): one to carry the answer
        exchange = Exchange(self.runtime, self, self, self.runtime.loop.time())
        exchange.refuse(error)
        self.exchanges.append(exchange)
        if len(self.exchanges) == 1:
            exchange.start()

    def _after_upgrade_request(self, rest: bytes) -> None:
        """The parser stopped after a request with an Upgrade header; ``rest`` followed it.

        Only a WebSocket handshake is forwarded as an upgrade: what follows it belongs to
        no checked request, so it is held here (never in an exchange's body) and reading
        stops, until the upstream answers 101 (the tunnel opens and ``rest`` goes first) or
        anything else (the connection closes after that answer; ``rest`` is dropped). Any
        other Upgrade was removed from the forwarded request (hop-by-hop), so ``rest`` is
        the client's next request and is parsed as one.
        """
        exchanges = self.exchanges
        request = exchanges[-1].request if exchanges else None
        if request is None:  # refused: the connection closes
            return
        if request.websocket:
            self.held = rest
            self._pause(_UPGRADING)
        elif rest:
            self.data_received(rest)

    # -- Downstream: what the current exchange answers ------------------------------------

    def respond_interim(self, response: Response) -> None:
        if self.exchanges[0].version == b"1.1" and self.transport is not None:
            head = framing.response_head(response, chunked=False, close=False)
            self.batch.write(self.transport, head)

    def respond(self, exchange: Exchange, response: Response) -> None:
        request = exchange.request
        assert request is not None and self.transport is not None
        http10 = exchange.version == b"1.0"
        self.chunked = response.framing in (CHUNKED, UNTIL_CLOSE) and not http10
        self.close_after = close = (
            not request.keep_alive or request.websocket or self.runtime.draining or http10
        )
        head = framing.response_head(response, chunked=self.chunked, close=close)
        self.batch.write(self.transport, head)

    def respond_body(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        if self.chunked:
            self.batch.write(transport, b"%x\r\n" % len(data))
            self.batch.write(transport, data)
            self.batch.write(transport, framing.CHUNK_END)
        else:
            self.batch.write(transport, data)

    def respond_end(self, exchange: Exchange) -> None:
        """The response is complete: move on to the next pipelined request, or wait."""
        transport = self.transport
        assert transport is not None
        if self.chunked:
            self.batch.write(transport, framing.LAST_CHUNK)
        exchanges = self.exchanges
        exchanges.pop(0)
        if self.holding:
            self.resume_request(exchange)
        if self.close_after or exchange.request_state != DONE:  # else its body is unread
            self._clear()
            self._pause(_CLOSING)
            self.batch.close(transport)
            return
        if self.runtime.draining:
            self._clear()
            self.batch.close(transport)
            return
        if exchanges:
            self._check_backlog()
            following = exchanges[0]
            if self.stalled_since:
                following.client_writable(False)
            following.start()
            return
        self.idle_deadline = self.runtime.loop.time() + self.runtime.settings.keepalive_timeout

    def answer_error(self, exchange: Exchange, error: HTTPError) -> None:
        """The proxy's own answer; the connection closes after it (what follows it in the
        pipeline is dropped: the client sees the close and may send it again)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not error.status:  # nobody to answer (a client that reads nothing)
            self.cut(exchange)
            return
        answer, exchange.sent = framing.error_answer(error.status, exchange.method == b"HEAD")
        self.batch.write(transport, answer)
        self._pause(_CLOSING)
        self._clear()
        self.batch.close(transport)

    def cut(self, exchange: Exchange) -> None:
        """The response cannot be completed: the client must see it incomplete."""
        transport = self.transport
        self._clear()
        if transport is not None:
            self.batch.flush()  # what was sent before the failure still goes out first
            transport.abort()

    def pause_request(self, exchange: Exchange) -> None:
        self.holding.append(exchange)
        self._pause(_EXCHANGE)

    def resume_request(self, exchange: Exchange) -> None:
        holding = self.holding
        if exchange in holding:
            holding.remove(exchange)
            if not holding:
                self._resume(_EXCHANGE)

    def upgrade(self, exchange: Exchange, link: UpstreamLink, rest: bytes) -> None:
        """The upstream answered 101: from now on a tunnel carries the bytes both ways."""
        transport = self.transport
        assert transport is not None
        self._clear()
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        held, self.held = self.held, b""
        self.runtime.connections.discard(self)  # the tunnel takes its place
        Tunnel(self.runtime, transport, link.detach(), rest, held)

    def _clear(self) -> None:
        """Forget every exchange: the connection is closing."""
        exchanges, self.exchanges = self.exchanges, []
        for other in exchanges[1:]:
            other.client_gone()
        self.holding.clear()
        self.receiving = None

    # -- flow control ---------------------------------------------------------------------

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
        exchanges = self.exchanges
        if len(exchanges) > MAX_PIPELINED or (
            len(exchanges) > 1 and sum(e.buffered_bytes for e in exchanges) > MAX_QUEUED_BODY
        ):
            self._pause(_QUEUED)
        else:
            self._resume(_QUEUED)
