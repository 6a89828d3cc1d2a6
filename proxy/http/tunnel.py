"""A WebSocket connection after the upstream's 101: bytes both ways, unchanged.

The HTTP/1.1 layer hands both transports over (``set_protocol``), so the tunnel is two
small Protocols and no HTTP code: each side writes what it reads to the other, a full
write buffer on one side pauses reading on the other, and either side closing closes
both. It takes the HTTP connection's place in the runtime's connections: the sweep closes
it after ``websocket_idle_timeout`` without traffic, or when the client has taken nothing
for ``send_timeout``; graceful shutdown waits for it like an in-flight request.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.http.runtime import Runtime

log = logging.getLogger("tlsproxy.proxy")


class _End(asyncio.Protocol):
    """One side of a tunnel: what it reads goes to the other side's transport."""

    __slots__ = ("other", "transport", "tunnel")

    def __init__(self, tunnel: Tunnel, transport: asyncio.Transport) -> None:
        self.tunnel = tunnel
        self.transport = transport
        self.other: _End | None = None

    def data_received(self, data: bytes) -> None:
        tunnel = self.tunnel
        tunnel.idle_until = (
            tunnel.runtime.loop.time() + tunnel.runtime.settings.websocket_idle_timeout
        )
        other = self.other
        if other is not None:
            tunnel.runtime.batch.write(other.transport, data)

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost closes the other side

    def pause_writing(self) -> None:
        if self.other is not None:
            self.other.transport.pause_reading()
        if self is self.tunnel.client:
            self.tunnel.stalled_since = self.tunnel.runtime.loop.time()

    def resume_writing(self) -> None:
        if self.other is not None:
            self.other.transport.resume_reading()
        if self is self.tunnel.client:
            self.tunnel.stalled_since = 0.0

    def connection_lost(self, exc: Exception | None) -> None:
        self.tunnel.close()


class Tunnel:
    """Both sides of one WebSocket connection, in the runtime's connections."""

    __slots__ = ("client", "idle_until", "runtime", "stalled_since", "upstream")

    def __init__(
        self,
        runtime: Runtime,
        client: asyncio.Transport,
        upstream: asyncio.Transport,
        to_client: bytes,
        to_upstream: bytes,
    ) -> None:
        """``to_client``: what the upstream sent after its 101; ``to_upstream``: what the
        client sent after its handshake (held until the 101)."""
        self.runtime = runtime
        self.stalled_since = 0.0
        self.idle_until = runtime.loop.time() + runtime.settings.websocket_idle_timeout
        self.client = _End(self, client)
        self.upstream = _End(self, upstream)
        self.client.other, self.upstream.other = self.upstream, self.client
        client.set_protocol(self.client)
        upstream.set_protocol(self.upstream)
        runtime.connections.add(self)
        if to_client:
            runtime.batch.write(client, to_client)
        if to_upstream:
            runtime.batch.write(upstream, to_upstream)
        client.resume_reading()
        upstream.resume_reading()

    @property
    def transport(self) -> asyncio.Transport:
        return self.client.transport

    @property
    def deadline(self) -> float:
        """No traffic for ``websocket_idle_timeout``, or a client that takes nothing."""
        if self.stalled_since:
            return min(self.idle_until, self.stalled_since + self.runtime.settings.send_timeout)
        return self.idle_until

    def expire(self, now: float) -> None:
        settings = self.runtime.settings
        if 0.0 < self.stalled_since <= now - settings.send_timeout:
            log.warning(
                "WebSocket closed: the client read nothing for %g s (send_timeout)",
                settings.send_timeout,
            )
        elif self.idle_until > now:
            return
        self.close()

    def retire(self) -> None:
        """A WebSocket keeps its connection across reloads."""

    def close_if_idle(self) -> bool:
        return False  # an open WebSocket is in flight until it ends or the drain times out

    def close(self) -> None:
        """Close both sides once what each has waiting is sent (a close frame goes first)."""
        runtime = self.runtime
        runtime.forget(self)
        client, upstream = self.client, self.upstream
        client.other = upstream.other = None
        for end in (client, upstream):
            if not end.transport.is_closing():
                runtime.batch.close(end.transport)
