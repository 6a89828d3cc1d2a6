"""Who gets in on the TLS listeners, and how each handshake ends: ``max_connections``, metrics.

The gate sees every accepted connection before any TLS byte is read (:mod:`proxy.tls.connection`
asks it at accept), counts the handshakes in progress, and ends the ones that outlive
``handshake_timeout``. A handshake in progress holds its place under ``max_connections``
until it completes, fails, the client goes away, or the timeout ends it.

Deadlines are kept in one queue ordered by start time with one timer for the oldest
(a handshake's timeout is the same for all): no timer per connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sized
from typing import Protocol

from proxy import metrics
from proxy.metrics import HandshakeFailure

log = logging.getLogger("tlsproxy.admission")

LOG_INTERVAL = 10.0  # seconds between "connection limit reached" lines


class Handshaking(Protocol):
    """A connection in its TLS handshake, as the gate sees it."""

    def handshake_expired(self) -> None:
        """The timeout has passed: abort the connection (the gate has counted it)."""


class Ticket:
    """One handshake in progress; ``connection`` is None once it has ended."""

    __slots__ = ("connection", "started")

    def __init__(self, started: float, connection: Handshaking) -> None:
        self.started = started
        self.connection: Handshaking | None = connection


class Gate:
    """Admission and handshake accounting for the TLS listeners it is given to.

    ``limit`` is read at every accept (a reload changes it); ``established`` is the set of
    connections past their handshake (``Runtime.connections``).
    """

    def __init__(
        self, limit: Callable[[], int], established: Sized, handshake_timeout: float
    ) -> None:
        self._limit = limit
        self._established = established
        self._timeout = handshake_timeout
        self._tickets: deque[Ticket] = deque()  # by start time
        self._timer: asyncio.TimerHandle | None = None
        self.handshaking = 0
        self._refused_unlogged = 0
        self._next_log = 0.0

    def open_connections(self) -> int:
        """Established connections plus handshakes in progress (for the gauge)."""
        return len(self._established) + self.handshaking

    def admit(self, connection: Handshaking) -> Ticket | None:
        """At accept: None when ``max_connections`` are open (the caller closes at once)."""
        limit = self._limit()
        if len(self._established) + self.handshaking >= limit:
            self._refused(limit)
            return None
        tickets = self._tickets
        while tickets and tickets[0].connection is None:  # ended: forget them early
            tickets.popleft()
        ticket = Ticket(asyncio.get_running_loop().time(), connection)
        tickets.append(ticket)
        self.handshaking += 1
        if self._timer is None:
            self._arm(ticket.started)
        return ticket

    def ended(self, ticket: Ticket, failure: HandshakeFailure | None = None) -> None:
        """The handshake completed (``failure`` None) or failed for ``failure``."""
        if ticket.connection is not None:
            ticket.connection = None
            self.handshaking -= 1
            if failure is not None:
                metrics.handshake_failed(failure)

    def _refused(self, limit: int) -> None:
        metrics.CONNECTIONS_REFUSED.inc()
        self._refused_unlogged += 1
        now = time.monotonic()
        if now >= self._next_log:
            log.warning(
                "connection limit reached (max_connections = %d): refused %d new "
                "connection(s) since the last message",
                limit,
                self._refused_unlogged,
            )
            self._refused_unlogged = 0
            self._next_log = now + LOG_INTERVAL

    def _arm(self, oldest: float) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(oldest + self._timeout, self._expire)

    def _expire(self) -> None:
        """End the handshakes whose time is up; re-arm for the oldest one left."""
        self._timer = None
        tickets = self._tickets
        expired = asyncio.get_running_loop().time() - self._timeout
        while tickets:
            ticket = tickets[0]
            connection = ticket.connection
            if connection is not None and ticket.started > expired:
                self._arm(ticket.started)
                return
            tickets.popleft()
            if connection is not None:
                self.ended(ticket, "timeout")
                connection.handshake_expired()
