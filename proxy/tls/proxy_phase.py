"""The first phase of a connection from a listed balancer: its PROXY header, then hand over.

``[server] proxy_protocol`` lists the networks of L4 balancers that announce each client in a
PROXY header (:mod:`proxy.tls.proxy_protocol`). A connection accepted from such a source
starts with a :class:`HeaderPhase` as the TCP transport's protocol; once the header is
complete, the phase gives the transport back to the connection's own protocol (a TLS
connection before its handshake, a plain-HTTP connection before its parser) with
``header_received(header, rest)``, and that protocol reports the header's source as its peer
from then on. A connection from any other source never meets this module: its bytes are
never read for a header, so a client cannot claim an address by sending one.

A listed source that sends no valid header, a malformed or oversized one, or closes before
it is complete, is disconnected. The time a header may take is the handshake's: on the TLS
listeners the admission gate's handshake timeout already covers it (the phase runs inside
the handshake's ticket); the plain-HTTP listeners give the phase its own timer.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Sequence
from typing import Protocol, cast

from proxy.tls.proxy_protocol import ProxyHeader, ProxyHeaderError, parse

log = logging.getLogger("tlsproxy.proxy_protocol")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
LOG_INTERVAL = 10.0  # seconds between "refused a PROXY header" lines


class Proxied(Protocol):
    """The protocol a connection continues with after its header (an ``asyncio.Protocol``)."""

    def header_received(self, header: ProxyHeader, rest: bytes) -> None:
        """The header is complete; ``rest`` is what followed it in the same reads."""

    def connection_lost(self, exc: Exception | None) -> None: ...


class Sources:
    """Which peers must send a PROXY header first. One per proxy, shared by its listeners
    and changed in place on reload, so listeners bound earlier follow the new list."""

    __slots__ = ("networks", "timeout")

    def __init__(self, networks: Sequence[IPNetwork] = (), timeout: float = 10.0) -> None:
        self.networks = tuple(networks)
        self.timeout = timeout  # for listeners without a handshake gate (plain HTTP)

    def expects(self, transport: asyncio.BaseTransport) -> bool:
        """Whether the transport's peer is in a listed network (IPv4-mapped IPv6 included)."""
        peer = transport.get_extra_info("peername")
        try:
            address = ipaddress.ip_address(peer[0])
        except (TypeError, ValueError, IndexError):  # not an IP socket
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)


class HeaderPhase(asyncio.Protocol):
    """The TCP transport's protocol until the PROXY header is read."""

    __slots__ = ("_after", "_buffer", "_tcp", "_timer")

    def __init__(
        self, tcp: asyncio.Transport, after: Proxied, timeout: float | None = None
    ) -> None:
        self._tcp = tcp
        self._after = after
        self._buffer = b""
        self._timer = (
            asyncio.get_running_loop().call_later(timeout, self._expired)
            if timeout is not None
            else None
        )

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer = self._buffer + data
        try:
            parsed = parse(buffer)
        except ProxyHeaderError as exc:
            self._refuse(str(exc))
            return
        if parsed is None:
            return
        header, used = parsed
        self._stop_timer()
        self._buffer = b""
        self._tcp.set_protocol(cast(asyncio.Protocol, self._after))  # the next read: to it
        self._after.header_received(header, buffer[used:])

    def eof_received(self) -> bool:
        self._refuse("the balancer closed before its PROXY header was complete")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        self._after.connection_lost(exc)

    def _expired(self) -> None:
        self._timer = None
        self._refuse("no complete PROXY header within the handshake timeout")

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _refuse(self, reason: str) -> None:
        self._stop_timer()
        peer = self._tcp.get_extra_info("peername")
        _refusals.note(peer[0] if isinstance(peer, tuple) else "?", reason)
        self._tcp.abort()


class _Refusals:
    """One log line per interval for refused headers: a balancer sending none would
    otherwise log every connection."""

    def __init__(self) -> None:
        self._unlogged = 0
        self._next = 0.0

    def note(self, peer: str, reason: str) -> None:
        self._unlogged += 1
        now = time.monotonic()
        if now >= self._next:
            log.warning(
                "closed a connection from %s: %s (%d refused since the last message; "
                "server.proxy_protocol lists this source, so it must send a PROXY header)",
                peer,
                reason,
                self._unlogged,
            )
            self._unlogged = 0
            self._next = now + LOG_INTERVAL


_refusals = _Refusals()
