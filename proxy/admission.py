"""Who gets in on the TLS listeners, and how each handshake ends: ``max_connections``, metrics.

Neither asyncio nor uvloop tells the application about a connection before its TLS
handshake has completed: the protocol factory runs at accept time but its protocol only
hears ``connection_made`` after the handshake, and failed, timed out or abandoned handshakes
are dropped silently (logged at debug level at most, the loop's exception handler is not
called for ``OSError``). Raising from the protocol factory is no way to refuse either (the
default loop then leaves the accepted socket to the garbage collector).

What both loops do the same way is drive every server handshake through the listener
context's ``sslobject_class``: ``wrap_bio`` at accept, then ``do_handshake()`` at once (no
bytes read yet) and again each time handshake bytes arrive. So the gate is a subclass of
``ssl.SSLObject``:

- the first ``do_handshake()`` is the accept: over ``max_connections`` (established
  connections, which ``runtime.connections`` holds, plus handshakes in progress) it raises an
  ``SSLError`` before any TLS byte is read or written, and the loop closes the socket;
- an ``SSLError`` from OpenSSL is a failed handshake (``protocol``, or ``unknown_sni`` when
  the SNI callback refused the name). Both loops then close the socket without sending what
  OpenSSL queued. Where the client deserves to know (its name is unknown: the
  ``unrecognized_name`` alert; its TLS version or ciphers are refused; it spoke plain HTTP:
  a plaintext 400) the gate answers "want read" instead, the loop sends the queued bytes,
  and the error is raised at the next event: the client's close (real clients close on a
  fatal alert), more bytes, or the handshake timeout. Anything else (garbage) is closed at
  once, as an alert would only keep it open;
- a handshake that neither completes nor fails was ended by the loop: ``timeout`` once its
  ``handshake_timeout`` has passed (the loop aborts it then). A client that went away
  earlier is counted as ``other`` when its ``SSLObject`` was freed before the deadline: on
  uvloop that is immediate; the default loop keeps failed and abandoned handshakes in
  reference cycles until the garbage collector runs, so there such a client may be counted
  as ``timeout``.

A handshake in progress holds its place under ``max_connections`` until it completes,
fails, its ``SSLObject`` is freed, or ``handshake_timeout`` (plus ``GRACE``) has passed,
whichever comes first: on the default loop a client that vanished may be counted that long.
Deadlines are swept lazily (at each accept and each scrape) from a queue ordered by start
time: no timer per connection. Costs on the data path: none (only handshakes are wrapped,
and reads and writes go straight to the C object, skipping ``ssl.SSLObject``'s wrappers).
"""

from __future__ import annotations

import logging
import ssl
import time
from collections import deque
from collections.abc import Callable, Sized
from typing import Any, ClassVar

from proxy import metrics
from proxy.tls import FAILURE_ATTRIBUTE

log = logging.getLogger("tlsproxy.admission")

LOG_INTERVAL = 10.0  # seconds between "connection limit reached" lines
GRACE = 0.5  # seconds past handshake_timeout before a handshake is taken for aborted
_AGAIN = (ssl.SSLWantReadError, ssl.SSLWantWriteError, ssl.SSLSyscallError)  # the loops' "again"
_PLAIN_HTTP = {"HTTP_REQUEST", "HTTPS_PROXY_REQUEST"}  # OpenSSL saw an HTTP request line
# A real TLS client we cannot talk to: worth its alert (it closes when it reads it). Garbage
# gets a plain close instead: an alert would only keep its connection until the timeout.
_TELL_CLIENT = {
    "UNSUPPORTED_PROTOCOL",
    "VERSION_TOO_LOW",
    "NO_PROTOCOLS_AVAILABLE",
    "NO_SHARED_CIPHER",
    "NO_SUITABLE_KEY_SHARE",
}
_PLAIN_HTTP_BODY = b"400 Bad Request: this port speaks HTTPS only\n"
_PLAIN_HTTP_ANSWER = (
    b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_PLAIN_HTTP_BODY), _PLAIN_HTTP_BODY)
)


class Refused(ssl.SSLError):
    """Raised from the first ``do_handshake()``: the loop closes the connection quietly."""


class _Ticket:
    """One handshake in progress."""

    __slots__ = ("failure", "gone_at", "open", "started")

    def __init__(self, started: float) -> None:
        self.started = started
        self.open = True  # still counted as a handshake in progress
        self.failure: str | None = None  # failed (and counted); raised once the alert is out
        self.gone_at: float | None = None  # when its SSLObject was freed


class Gate:
    """Admission and handshake accounting for the listeners whose context it is installed in.

    ``limit`` is read at every accept (a reload changes it); ``established`` is the set of
    connections past their handshake (``Runtime.connections``).
    """

    def __init__(
        self, limit: Callable[[], int], established: Sized, handshake_timeout: float
    ) -> None:
        self._limit = limit
        self._established = established
        self._timeout = handshake_timeout
        self._tickets: deque[_Ticket] = deque()  # by start time, for the deadline sweep
        self._gone: deque[_Ticket] = deque()  # freed before they ended (appends are atomic)
        self.handshaking = 0
        self._refused_unlogged = 0
        self._next_log = 0.0
        self.sslobject_class: type[ssl.SSLObject] = type(
            "GatedSSLObject", (GatedSSLObject,), {"gate": self}
        )

    def install(self, context: ssl.SSLContext) -> ssl.SSLContext:
        """Make ``context`` (a listener's) run its handshakes through this gate."""
        context.sslobject_class = self.sslobject_class
        return context

    def open_connections(self) -> int:
        """Established connections plus handshakes in progress (for the gauge)."""
        self.sweep(time.monotonic())
        return len(self._established) + self.handshaking

    # -- called from GatedSSLObject, on the event loop ----------------------------------

    def admit(self) -> _Ticket:
        now = time.monotonic()
        self.sweep(now)
        limit = self._limit()
        if len(self._established) + self.handshaking >= limit:
            metrics.CONNECTIONS_REFUSED.inc()
            self._refused_unlogged += 1
            if now >= self._next_log:
                log.warning(
                    "connection limit reached (max_connections = %d): refused %d new "
                    "connection(s) since the last message",
                    limit,
                    self._refused_unlogged,
                )
                self._refused_unlogged = 0
                self._next_log = now + LOG_INTERVAL
            raise Refused("too many open connections")
        ticket = _Ticket(now)
        self._tickets.append(ticket)
        self.handshaking += 1
        return ticket

    def release(self, ticket: _Ticket) -> None:
        if ticket.open:
            ticket.open = False
            self.handshaking -= 1

    def sweep(self, now: float) -> None:
        """Release handshakes that were freed or whose deadline has passed."""
        gone = self._gone
        while gone:
            self._end(gone.popleft())
        tickets = self._tickets
        expired = now - self._timeout - GRACE
        while tickets and tickets[0].started <= expired:
            self._end(tickets.popleft())

    def _end(self, ticket: _Ticket) -> None:
        """A handshake that neither completed nor failed (or failed and sent its alert)."""
        if not ticket.open:
            return
        self.release(ticket)
        if ticket.failure is not None:  # failed and counted already
            return
        gone_at = ticket.gone_at
        early = gone_at is not None and gone_at < ticket.started + 0.9 * self._timeout
        metrics.handshake_failed("other" if early else "timeout")


class GatedSSLObject(ssl.SSLObject):
    """An ``SSLObject`` that reports its handshake to its :class:`Gate` (see the module doc)."""

    gate: ClassVar[Gate]
    _outgoing: ssl.MemoryBIO
    _ticket: _Ticket | None

    @classmethod
    def _create(
        cls, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, *args: Any, **kw: Any
    ) -> Any:
        obj = super()._create(incoming, outgoing, *args, **kw)  # type: ignore[misc]
        obj._outgoing = outgoing
        obj._ticket = None
        # The loops call these once or more per received or sent record; ssl.SSLObject
        # wraps each in a Python method that only forwards to the C object. Bound to the
        # instance they skip that frame (the loops bind them after wrap_bio).
        inner = obj._sslobj
        obj.read, obj.write, obj.pending = inner.read, inner.write, inner.pending
        return obj

    def do_handshake(self) -> None:
        ticket = self._ticket
        if ticket is None:  # the loop has just accepted the connection
            self._ticket = ticket = self.gate.admit()
        elif ticket.failure is not None:  # failed earlier; its alert has been sent
            self.gate.release(ticket)
            raise ssl.SSLError(f"TLS handshake failed: {ticket.failure}")
        try:
            super().do_handshake()
        except _AGAIN:
            raise
        except ssl.SSLError as exc:
            refused_name = getattr(self, FAILURE_ATTRIBUTE, None) == "unknown_sni"
            metrics.handshake_failed("unknown_sni" if refused_name else "protocol")
            tell = refused_name or exc.reason in _TELL_CLIENT
            if exc.reason in _PLAIN_HTTP:
                self._outgoing.write(_PLAIN_HTTP_ANSWER)
                tell = True
            if tell and self._outgoing.pending and ticket.open:
                # Not the exception itself: its traceback would hold this object in a cycle.
                ticket.failure = str(exc.reason or exc)
                raise ssl.SSLWantReadError("sending the alert first") from None
            self.gate.release(ticket)
            raise
        self.gate.release(ticket)

    def __del__(self) -> None:
        # May run in any thread (the garbage collector's): only a write and an atomic append;
        # the gate releases the ticket on the event loop.
        ticket = self.__dict__.get("_ticket")
        if ticket is not None and ticket.open and ticket.gone_at is None:
            ticket.gone_at = time.monotonic()
            self.gate._gone.append(ticket)
