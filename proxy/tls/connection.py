"""TLS termination on a plain TCP connection: the transport the data path reads and writes.

Why not the event loop's own TLS (``create_server(ssl=...)``): uvloop's keeps a 256 KiB
read buffer and a Cython protocol layer per connection (the default loop's a 256 KiB
buffer too); with an empty protocol an idle connection cost 24 KiB there. With this
module an idle proxy connection costs 19.7 KiB instead of 26.2 (5,000 idle connections), a
keep-alive request 9 % and a new connection 10 % less CPU. And neither loop tells the
application about a connection before its handshake has completed, so admission,
handshake timeouts and the answer to a failed handshake had to be wedged into an
``SSLObject`` subclass; here they are plain code.

A connection from a balancer listed in ``[server] proxy_protocol`` starts with one more phase,
before the handshake: its PROXY header (:mod:`proxy.tls.proxy_phase`), whose source address
``get_extra_info("peername")`` then returns. Other connections never enter it.

How: the loop's plain TCP transport below, an ``ssl.SSLObject`` over two memory BIOs in
between, the application's protocol (a :class:`~proxy.http.connection.ClientConnection`) above,
created when the handshake completes. Encryption is synchronous: a ``write`` encrypts and
hands the records to the TCP transport at once, so flow control, ``pause_writing`` and
the write buffer are the TCP transport's. Each read decrypts the whole records received
and hands them over in one call, unless the application has paused reading: then the
input waits, still encrypted, in the incoming BIO.

A TLS error (a failed handshake; a bad record, alert or message afterwards) ends the
connection as RFC 8446 §6.2 asks: what OpenSSL queued in the outgoing BIO, its fatal alert,
is sent, then the TCP connection is closed; closed, not aborted, as an abort would drop the
alert still waiting in the write buffer and the client would see its connection cut, not
why. OpenSSL decides what deserves an alert: bytes that do not look like TLS get none. A
client that spoke plain HTTP gets a plaintext 400 instead. A failed handshake is also
counted (:mod:`proxy.tls.admission`). All of it is on the error paths: a read or write that
succeeds does no extra work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from typing import Any, cast

from proxy.tls import clienthello
from proxy.tls.admission import Gate, Ticket
from proxy.tls.policy import FAILURE_ATTRIBUTE
from proxy.tls.proxy_phase import HeaderPhase, Sources
from proxy.tls.proxy_protocol import ProxyHeader

log = logging.getLogger("tlsproxy.tls")

READ_SIZE = 16384  # one TLS record's plaintext at most: SSL_read never returns more
_PLAIN_HTTP = {"HTTP_REQUEST", "HTTPS_PROXY_REQUEST"}  # OpenSSL saw an HTTP request line
_PLAIN_HTTP_BODY = b"400 Bad Request: this port speaks HTTPS only\n"
_PLAIN_HTTP_ANSWER = (
    b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_PLAIN_HTTP_BODY), _PLAIN_HTTP_BODY)
)
ACME_TLS_ALPN = b"acme-tls/1"  # RFC 8737's ALPN protocol
_UNRECOGNIZED_NAME_ALERT = b"\x15\x03\x03\x00\x02\x02\x70"  # fatal unrecognized_name (112)
_SSL_EXTRA = {"ssl_object", "sslcontext", "peercert", "cipher", "compression"}


class TLSListener:
    """What every connection accepted on one TLS listener shares; its ``__call__`` is the
    protocol factory for ``loop.create_server`` (no ``ssl=``: this module does TLS).

    ``alpn_challenge`` (TLS-ALPN-01, RFC 8737): given the server name of a ClientHello that
    offers ``acme-tls/1``, the context serving that name's challenge certificate, or None
    when no challenge is pending for it.

    ``hold`` (on-demand TLS): given a ClientHello's server name, None to go on at once, or a
    future the handshake waits for: True, go on (a certificate is installed now); False,
    refuse with an ``unrecognized_name`` alert. Without either hook no ClientHello is
    looked at.

    ``proxy_sources`` (PROXY protocol): the peers that send a PROXY header before the
    handshake (:mod:`proxy.tls.proxy_phase`); from any other peer no header is read.
    """

    __slots__ = ("alpn_challenge", "app_factory", "context", "gate", "hold", "proxy_sources")

    def __init__(
        self,
        context: ssl.SSLContext,
        gate: Gate,
        app_factory: Callable[[str | None], asyncio.Protocol],
        alpn_challenge: Callable[[str], ssl.SSLContext | None] | None = None,
        hold: Callable[[str | None], asyncio.Future[bool] | None] | None = None,
        proxy_sources: Sources | None = None,
    ) -> None:
        """``app_factory(alpn)`` makes the protocol layer for the ALPN protocol the handshake
        chose (None: the client offered none)."""
        self.context = context
        self.gate = gate
        self.app_factory = app_factory
        self.alpn_challenge = alpn_challenge
        self.hold = hold
        self.proxy_sources = proxy_sources

    def __call__(self) -> TLSConnection:
        return TLSConnection(self)


class TLSConnection(asyncio.Protocol, asyncio.Transport):
    """The TCP transport's protocol, and the application's transport."""

    __slots__ = (
        "_app",
        "_app_data",
        "_challenge",
        "_closing",
        "_hello",
        "_incoming",
        "_listener",
        "_outgoing",
        "_paused",
        "_peername",
        "_pending",
        "_read",
        "_sslobj",
        "_tcp",
        "_ticket",
        "_write",
    )

    def __init__(self, listener: TLSListener) -> None:
        self._listener = listener
        self._tcp: asyncio.Transport | None = None
        self._app: asyncio.Protocol | None = None  # once the handshake has completed
        self._ticket: Ticket | None = None  # while the handshake is in progress
        self._app_data: Callable[[bytes], None] | None = None
        self._closing = False
        self._paused = False
        self._hello: bytearray | None = None  # the ClientHello so far, while it is looked at
        self._challenge: str | None = None  # a TLS-ALPN-01 validation for this name
        self._peername: tuple[str, int] | None = None  # from a PROXY header

    # -- below: the TCP transport ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tcp = self._tcp = cast(asyncio.Transport, transport)  # uvloop: not a subclass
        self._ticket = self._listener.gate.admit(self)
        if self._ticket is None:
            self._closing = True
            tcp.abort()
            return
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._use(self._listener.context)
        if self._listener.alpn_challenge is not None or self._listener.hold is not None:
            self._hello = bytearray()
        sources = self._listener.proxy_sources
        if sources is not None and sources.networks and sources.expects(tcp):
            tcp.set_protocol(HeaderPhase(tcp, self))  # under the handshake's ticket and timeout

    def _use(self, context: ssl.SSLContext) -> None:
        """Handshake with ``context`` (bytes already in the incoming BIO are kept)."""
        self._sslobj = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        inner = self._sslobj._sslobj  # type: ignore[attr-defined]  # the C object
        # bound C methods: no Python frame per record
        self._read, self._write, self._pending = inner.read, inner.write, inner.pending

    def header_received(self, header: ProxyHeader, rest: bytes) -> None:
        """The PROXY header phase is over (:mod:`proxy.tls.proxy_phase`): its source is the
        peer from now on; what followed it starts the handshake."""
        if header.source is not None:
            self._peername = header.source
        if rest:
            self.data_received(rest)

    def data_received(self, data: bytes) -> None:
        self._incoming.write(data)
        if self._app is not None:
            self._deliver()
        elif self._ticket is not None:
            if self._hello is not None and not self._read_hello(data):
                return  # the ClientHello is not complete yet
            self._handshake()

    def _read_hello(self, data: bytes) -> bool:
        """The phase before the handshake when TLS-ALPN-01 is on: a ClientHello offering
        ``acme-tls/1`` for a name with a pending challenge gets the challenge certificate
        (and no application after the handshake). False while the ClientHello is incomplete.
        An ordinary ClientHello costs one substring search: ``acme-tls/1`` is not in it."""
        hello, listener = self._hello, self._listener
        assert hello is not None
        hello += data
        if (
            listener.hold is None
            and ACME_TLS_ALPN not in hello
            and clienthello.complete_in_first_record(hello)
        ):
            self._hello = None
            return True
        found = clienthello.parse(bytes(hello))
        if found == clienthello.NEED_MORE:
            return False
        self._hello = None
        if not isinstance(found, clienthello.ClientHello):
            return True
        alpn_challenge = listener.alpn_challenge
        if alpn_challenge is not None and ACME_TLS_ALPN in found.alpn and found.server_name:
            context = alpn_challenge(found.server_name)
            if context is not None:
                self._use(context)
                self._challenge = found.server_name
                return True
        wait = listener.hold(found.server_name) if listener.hold is not None else None
        if wait is None:
            return True
        self._hold(wait)
        return False

    def _hold(self, wait: asyncio.Future[bool]) -> None:
        """On-demand TLS: the ClientHello waits (reading paused) while its certificate is
        obtained. It leaves the gate's handshake clock meanwhile (the wait has its own
        bound) and comes back through admission afterwards."""
        ticket, self._ticket = self._ticket, None
        assert ticket is not None and self._tcp is not None
        self._listener.gate.ended(ticket)
        self._tcp.pause_reading()
        wait.add_done_callback(self._held)

    def _held(self, wait: asyncio.Future[bool]) -> None:
        tcp = self._tcp
        if self._closing or tcp is None:
            return  # the client gave up
        self._ticket = self._listener.gate.admit(self)
        if self._ticket is None:
            self._closing = True
            tcp.abort()
            return
        tcp.resume_reading()
        if not wait.cancelled() and wait.result():
            self._handshake()
            return
        ticket, self._ticket = self._ticket, None
        self._listener.gate.ended(ticket, "unknown_sni")
        self._closing = True
        tcp.write(_UNRECOGNIZED_NAME_ALERT)
        tcp.close()

    def eof_received(self) -> bool:
        app = self._app
        if app is not None and not self._closing:
            app.eof_received()
        return False  # the TCP transport closes (sending what waits first)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        ticket = self._ticket
        if ticket is not None:  # gone during the handshake
            self._ticket = None
            self._listener.gate.ended(ticket, "other")
        app = self._app
        if app is not None:
            self._app = None  # no cycle left between us and the application
            self._app_data = None
            app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._app is not None:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._app is not None:
            self._app.resume_writing()

    # -- the handshake --------------------------------------------------------------------

    def _handshake(self) -> None:
        ticket = self._ticket
        assert ticket is not None and self._tcp is not None
        try:
            self._sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except ssl.SSLError as exc:
            self._ticket = None
            self._handshake_failed(ticket, exc)
            return
        self._ticket = None
        self._listener.gate.ended(ticket)
        if self._challenge is not None:  # the CA has seen the certificate: that is all
            log.info("answered a TLS-ALPN-01 validation for %s", self._challenge)
            self._flush()
            self.close()
            return
        if self._sslobj.version() != "TLSv1.3":  # TLS 1.2: our Finished, which the client awaits
            self._flush()
        # In TLS 1.3 only session tickets wait and no client waits for them: they leave with
        # the first response, in its TCP write (a write less per connection).
        app = self._app = self._listener.app_factory(self._sslobj.selected_alpn_protocol())
        self._app_data = app.data_received
        app.connection_made(self)
        if self._incoming.pending or self._pending():  # the first request came along
            self._deliver()

    def _handshake_failed(self, ticket: Ticket, exc: ssl.SSLError) -> None:
        refused_name = getattr(self._sslobj, FAILURE_ATTRIBUTE, None) == "unknown_sni"
        self._listener.gate.ended(ticket, "unknown_sni" if refused_name else "protocol")
        log.debug("TLS handshake failed: %s", exc.reason or exc)
        if exc.reason in _PLAIN_HTTP and self._tcp is not None:  # OpenSSL queued no alert
            self._tcp.write(_PLAIN_HTTP_ANSWER)
        self._fail()

    def _fail(self) -> None:
        """End the connection after a TLS error: send what OpenSSL queued (its fatal alert,
        after anything that waited before it), then close TCP. No ``unwrap``: a fatal alert
        ends the session without a close_notify. No abort: the alert would be dropped."""
        self._closing = True
        tcp = self._tcp
        if tcp is not None:
            self._flush()
            tcp.close()

    def handshake_expired(self) -> None:
        """Called by the gate (which counts it) when the handshake timeout has passed."""
        self._ticket = None
        self._closing = True
        if self._tcp is not None:
            self._tcp.abort()

    # -- above: the application's transport -----------------------------------------------

    def _deliver(self) -> None:
        """Decrypt the whole records the incoming BIO holds; the app gets them in one call
        (a 100 KiB upload arrives as seven records: one parser pass, not seven)."""
        if self._paused or self._closing:
            return
        read = self._read
        incoming = self._incoming
        outgoing = self._outgoing.pending  # what waits to leave with the next write (tickets)
        chunks: list[bytes] = []
        closed = False
        while True:
            try:
                chunk = read(READ_SIZE)
            except ssl.SSLWantReadError:  # an incomplete record: more bytes to come
                break
            except ssl.SSLError as exc:  # a bad record or message, or an alert from the client
                log.debug("TLS error on an open connection: %s", exc.reason or exc)
                self._fail()  # what was decrypted before it is dropped: no reply could be sent
                return
            if not chunk:  # the client's close_notify
                closed = True
                break
            chunks.append(chunk)
            if not incoming.pending and not self._pending():
                break
        if chunks:
            self._app_data(chunks[0] if len(chunks) == 1 else b"".join(chunks))  # type: ignore[misc]
        if closed and not self._closing:
            self.eof_received()
            self.close()
        elif self._outgoing.pending > outgoing:  # a reply to a key update, an alert
            self._flush()

    def _flush(self) -> None:
        if self._outgoing.pending and self._tcp is not None:
            self._tcp.write(self._outgoing.read())

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._closing and self._encrypt(data):
            self._tcp.write(self._outgoing.read())  # type: ignore[union-attr]

    def _encrypt(self, data: bytes | bytearray | memoryview) -> bool:
        """Records for ``data`` into the outgoing BIO; False if TLS failed (then closed, after
        OpenSSL's alert if it queued one)."""
        try:
            self._write(data)
        except ssl.SSLError as exc:
            log.debug("TLS error while writing: %s", exc.reason or exc)
            self._fail()
            return False
        return True

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS has no half-close")

    def get_write_buffer_size(self) -> int:
        return self._tcp.get_write_buffer_size() if self._tcp is not None else 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        assert self._tcp is not None
        return self._tcp.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        assert self._tcp is not None
        self._tcp.set_write_buffer_limits(high, low)

    def is_reading(self) -> bool:
        return not self._paused and not self._closing

    def pause_reading(self) -> None:
        if not self._paused:
            self._paused = True
            if self._tcp is not None and not self._closing:
                self._tcp.pause_reading()

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            if self._tcp is not None and not self._closing:
                self._tcp.resume_reading()
                if self._incoming.pending or self._pending():
                    asyncio.get_running_loop().call_soon(self._deliver)

    def is_closing(self) -> bool:
        return self._closing

    def close(self, last: bytes = b"") -> None:
        """Send ``last``, a close_notify and anything else waiting in one TCP write, then close
        the TCP connection."""
        if self._closing:
            return
        self._closing = True
        if self._tcp is None:
            return
        if last and not self._encrypt(last):
            return
        with contextlib.suppress(ssl.SSLError):  # "want read": not waiting for the client's
            self._sslobj.unwrap()
        self._flush()
        self._tcp.close()

    def abort(self) -> None:
        self._closing = True
        if self._tcp is not None:
            self._tcp.abort()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._app = protocol  # type: ignore[assignment]
        self._app_data = protocol.data_received  # type: ignore[attr-defined]

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._app is not None
        return self._app

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name in _SSL_EXTRA:
            sslobj = self._sslobj
            if name == "ssl_object":
                return sslobj
            if name == "sslcontext":
                return sslobj.context
            if name == "peercert":
                return sslobj.getpeercert()
            if name == "cipher":
                return sslobj.cipher()
            return sslobj.compression()
        if name == "peername" and self._peername is not None:
            return self._peername
        if self._tcp is None:
            return default
        return self._tcp.get_extra_info(name, default)
