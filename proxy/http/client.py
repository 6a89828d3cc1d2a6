"""What every protocol layer of a client connection shares: who the client is.

An HTTP/1.1 and an HTTP/2 connection differ in everything but this: the runtime they
serve, the listener port, the transport, the client's address as the policy sees it
(:class:`~proxy.http.policy.Peer`) and the TLS server name its requests' ``Host`` must
match. Their exchanges read it as their ``ClientInfo``.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

from proxy.http.policy import Peer
from proxy.tls.policy import sni_of

if TYPE_CHECKING:
    from proxy.http.runtime import Runtime


class ClientConnection(asyncio.Protocol):
    """The base of :class:`~proxy.http.h1.server.H1Connection` and
    :class:`~proxy.http.h2.server.H2Connection`."""

    __slots__ = ("batch", "listen_port", "peer", "runtime", "sni", "sni_host", "transport")

    def __init__(self, runtime: Runtime, listen_port: int) -> None:
        self.runtime = runtime
        self.listen_port = listen_port
        self.batch = runtime.batch
        self.transport: asyncio.Transport | None = None
        self.peer: Peer = cast(Peer, None)  # set in connection_made
        self.sni: str | None = None  # the server name the client asked for in its handshake
        self.sni_host = b""  # the last Host found to match ``sni``

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        runtime = self.runtime
        self.transport = cast(asyncio.Transport, transport)  # uvloop: not a subclass
        self.peer = runtime.peer(transport.get_extra_info("peername")[0], self.listen_port)
        self.sni = sni_of(transport)
        runtime.connections.add(self)  # type: ignore[arg-type]  # subclasses are Served
