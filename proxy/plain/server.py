"""A tiny keep-alive HTTP/1.1 server Protocol for the proxy's own small answers.

Port 80 (ACME tokens and redirects) and the admin listener answer short, bodiless requests
from a plain function; no streaming, so h11 alone does all the framing. A connection from a
balancer listed in ``[server] proxy_protocol`` first has its PROXY header read
(:mod:`proxy.tls.proxy_phase`, with its own timer here), before h11 sees a byte; ``peer`` is
then the client that header names.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import cast

import h11

from proxy.tls.proxy_phase import HeaderPhase, Sources
from proxy.tls.proxy_protocol import ProxyHeader

log = logging.getLogger("tlsproxy.http")

IDLE_TIMEOUT = 15.0
MAX_HEAD = 16 * 1024


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    content_type: bytes = b"text/plain; charset=utf-8"


Handler = Callable[[h11.Request], Answer]


def text(status: int, message: str | None = None) -> Answer:
    """A plain-text answer whose body defaults to the status line."""
    body = message if message is not None else f"{status} {HTTPStatus(status).phrase}"
    return Answer(status, (body + "\n").encode())


class PlainHTTPProtocol(asyncio.Protocol):
    """Answers each request on a plain TCP connection with ``handler(request)``."""

    def __init__(
        self,
        handler: Handler,
        connections: set[asyncio.Transport],
        proxy_sources: Sources | None = None,
    ) -> None:
        self._handler = handler
        self._connections = connections
        self._proxy_sources = proxy_sources
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.peer: tuple[str, int] | None = None  # the client: the TCP peer or a PROXY header's

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tcp = self._transport = cast(asyncio.Transport, transport)  # uvloop: not a subclass
        self._connections.add(tcp)
        self._timer = asyncio.get_running_loop().call_later(IDLE_TIMEOUT, transport.close)
        self.peer = tcp.get_extra_info("peername")
        sources = self._proxy_sources
        if sources is not None and sources.networks and sources.expects(tcp):
            tcp.set_protocol(HeaderPhase(tcp, self, sources.timeout))

    def header_received(self, header: ProxyHeader, rest: bytes) -> None:
        """The PROXY header phase is over: its source is the client; h11 gets what followed."""
        if header.source is not None:
            self.peer = header.source
        if rest:
            self.data_received(rest)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._connections.discard(self._transport)
        if self._timer is not None:
            self._timer.cancel()

    def data_received(self, data: bytes) -> None:
        self._h11.receive_data(data)
        self._process()

    def eof_received(self) -> bool:
        self._h11.receive_data(b"")
        self._process()
        return False

    def _process(self) -> None:
        transport = self._transport
        assert transport is not None
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                self._send(None, text(exc.error_status_hint, f"bad request: {exc}"), close=True)
                return
            if event is h11.NEED_DATA:
                return
            if type(event) is h11.Request:
                request = event
                try:
                    answer = self._handler(request)
                except Exception:
                    log.exception("error answering %r from %s", request.target, self.peer)
                    answer = text(500)
                self._send(request, answer, close=False)
            elif type(event) is h11.EndOfMessage:
                if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
                    self._h11.start_next_cycle()
                else:
                    transport.close()
                    return
            elif type(event) is h11.ConnectionClosed or event is h11.PAUSED:
                transport.close()
                return

    def _send(self, request: h11.Request | None, answer: Answer, close: bool) -> None:
        transport = self._transport
        assert transport is not None
        headers = [
            (b"content-type", answer.content_type),
            (b"content-length", str(len(answer.body)).encode()),
            *answer.headers,
        ]
        if close:
            headers.append((b"connection", b"close"))
        try:
            out = self._h11.send(
                h11.Response(
                    status_code=answer.status,
                    headers=headers,
                    reason=HTTPStatus(answer.status).phrase,
                )
            )
            if request is None or request.method != b"HEAD":
                out += self._h11.send(h11.Data(data=answer.body))
            out += self._h11.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            transport.abort()
            return
        transport.write(out)
        if close:
            transport.close()
