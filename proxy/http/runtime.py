"""What every client connection and exchange of one proxy shares, and the deadline sweep.

The server builds one :class:`Runtime` and swaps its ``settings`` and ``router`` on reload;
connections read them per request, so a reload needs no connection to restart.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Protocol

from proxy.config import ServerConfig
from proxy.http.accesslog import AccessLog
from proxy.http.policy import Peer
from proxy.http.router import Router
from proxy.http.upstream import UpstreamPool
from proxy.http.writebatch import WriteBatch

PEERS_CACHED = 4096  # client addresses whose Peer is kept (the cache starts over when full)


class Served(Protocol):
    """An open client connection as the sweep and a graceful stop see it: an HTTP/1.1 or
    HTTP/2 connection, or a WebSocket tunnel."""

    @property
    def deadline(self) -> float:
        """When :meth:`expire` must run next (loop time)."""

    @property
    def transport(self) -> asyncio.Transport | None: ...

    def expire(self, now: float) -> None: ...

    def close_if_idle(self) -> bool:
        """Close now when no request is in flight (graceful shutdown); True if closed."""

    def retire(self) -> None:
        """A reload happened: a connection that keeps per-connection settings (HTTP/2's)
        asks its client to open a new one once its requests are done."""


@dataclass(slots=True, eq=False)
class Runtime:
    """What every client connection shares; the server swaps ``router`` on reload."""

    settings: ServerConfig
    router: Router
    pool: UpstreamPool
    access_log: AccessLog | None
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    connections: set[Served] = field(default_factory=set)
    batch: WriteBatch = field(default_factory=WriteBatch)  # every socket write goes through it
    peers: dict[tuple[str, int], Peer] = field(default_factory=dict)  # by (client IP, port)
    draining: bool = False
    drained: asyncio.Event = field(default_factory=asyncio.Event)  # set: draining, none left

    async def sweep_forever(self, interval: float = 1.0) -> None:
        """Check every connection's deadline once per ``interval`` until cancelled."""
        while True:
            await asyncio.sleep(interval)
            self.sweep(self.loop.time())

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
        """Expire every connection whose deadline has passed (about once a second)."""
        for connection in list(self.connections):
            if connection.deadline <= now:
                connection.expire(now)
        self.pool.sweep(time.monotonic())

    def forget(self, connection: Served) -> None:
        """``connection`` closed: once draining and none is left, the stop may finish."""
        connections = self.connections
        connections.discard(connection)
        if self.draining and not connections:
            self.drained.set()
