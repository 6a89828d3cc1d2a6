"""HTTP/2 from clients (RFC 9113): one asyncio Protocol per connection, one exchange per stream.

The TLS connection hands the decrypted bytes here when ALPN chose ``h2``. The ``h2``
library (python-hyper: what hypercorn and mitmproxy use) parses frames, keeps the
HPACK state and the flow-control windows; its header validation is off (it costs about
half the throughput) and :mod:`proxy.http.h2.fields` checks requests instead. Each stream
gets an :class:`~proxy.http.exchange.Exchange` of its own, so a slow request never holds
up the other streams; every exchange takes its upstream connection from the same pool.

Design rules:
- Streams opened by one read start only after the whole read is handled: a stream the
  client resets in the same read (Rapid Reset, CVE-2023-44487) never costs an upstream
  request; more than ``MAX_RESETS`` resets, or ``MAX_CONTROL_FRAMES`` frames that ask for
  work and carry no request (PING, SETTINGS, empty DATA), per ``WINDOW`` seconds end the
  connection with GOAWAY ENHANCE_YOUR_CALM.
- Backpressure to the real peer both ways. A client's DATA is acknowledged (WINDOW_UPDATE)
  only once the exchange took it and its upstream is not full; a response is sent within
  the client's windows, the rest held per stream, and a stream holding more than
  ``HELD_BYTES`` pauses its upstream. A full socket write buffer pauses every upstream and
  stops reading from the client, which bounds what a client that does not read can make
  the proxy queue (PING and SETTINGS acknowledgements included).
- A malformed request is a stream error (RST_STREAM PROTOCOL_ERROR), nothing forwarded; a
  refused one gets its status on its stream. A decoded field block larger than
  ``max_header_bytes`` is a 431; HPACK bombs and CONTINUATION floods end the connection
  (the library bounds them: ``MAX_HEADER_LIST_SIZE``, 64 CONTINUATION frames).
- Graceful stop and reload send GOAWAY with the last stream taken; open streams finish
  (bounded by ``shutdown_timeout``). The ``h2`` state machine refuses to send anything
  after its own GOAWAY, so that frame is written here, outside it.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from typing import TYPE_CHECKING, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import h2.stream
import h2.utilities
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

from proxy.http.client import ClientConnection
from proxy.http.exchange import COMPLETE, DONE, NEVER, Exchange, UpstreamLink
from proxy.http.h2.decoder import Decoder
from proxy.http.h2.encoder import StatelessEncoder
from proxy.http.h2.fields import request_head
from proxy.http.message import NO_BODY, HTTPError, Response, error_body
from proxy.http.writebatch import LIMIT

if TYPE_CHECKING:
    from proxy.http.runtime import Runtime

log = logging.getLogger("tlsproxy.proxy")

MAX_STREAMS = 100  # SETTINGS_MAX_CONCURRENT_STREAMS, advertised and enforced
STREAM_WINDOW = 256 * 1024  # what a client may send on one stream before we acknowledge
CONNECTION_WINDOW = 1024 * 1024  # ... and on all of them together
HELD_BYTES = 64 * 1024  # response bytes a stream holds (no window) before its upstream pauses
WINDOW = 10.0  # seconds over which resets and control frames are counted
MAX_RESETS = 200  # streams the client resets per WINDOW before it is told to calm down
MAX_CONTROL_FRAMES = 1000  # PING, SETTINGS and empty DATA frames per WINDOW
_CONFIG = h2.config.H2Configuration(
    client_side=False,
    header_encoding=None,  # fields stay bytes
    validate_inbound_headers=False,  # proxy.http.h2.fields does it, in one pass
    normalize_inbound_headers=False,
    validate_outbound_headers=False,  # the policy built them
    normalize_outbound_headers=False,
)
_ERROR_TYPE = b"text/plain; charset=utf-8"


_NO_FLAGS = h2.utilities.HeaderValidationFlags(
    is_client=False, is_trailer=False, is_response_header=False, is_push_promise=False
)


class _Stream(h2.stream.H2Stream):
    """The library's stream, less what the proxy does itself or never needs (hooks of
    h2 4.x's private methods, pinned with the library and held by tests/test_http2.py):
    - no Content-Length accounting: the library ends the whole connection on a mismatch;
      the exchange counts instead, and a wrong length is a stream error, as RFC 9113
      8.1.1 requires;
    - no header validation flags (validation is off: they were built and never read);
    - response headers sent as they are: already bytes, never a request, never trailers
      (the library copies and scans them for those);
    - HEADERS, CONTINUATION and DATA frames made as bytes (:class:`_Frame`), with the same
      state-machine inputs and flow-control accounting the library makes.
    Together 13 % fewer instructions per HTTP/2 request (callgrind)."""

    def _initialize_content_length(self, headers: object) -> None:
        pass

    def _build_hdr_validation_flags(self, events: object) -> h2.utilities.HeaderValidationFlags:
        return _NO_FLAGS

    def send_headers(  # type: ignore[override]
        self,
        headers: list[tuple[bytes, bytes]],
        encoder: StatelessEncoder,
        end_stream: bool = False,
    ) -> list[_Frame]:
        informational = headers[0][1][:1] == b"1"  # :status comes first, from send_headers
        self.state_machine.process_input(_SEND_INFORMATIONAL if informational else _SEND_HEADERS)
        block = encoder.encode(headers)
        flags = _END_STREAM if end_stream else 0
        if end_stream:
            self.state_machine.process_input(_SEND_END_STREAM)
        size = self.max_outbound_frame_size or len(block)
        if len(block) <= size:  # the usual case: one HEADERS frame
            return [_Frame(_HEADERS, flags | _END_HEADERS, self.stream_id, block)]
        frames = [_Frame(_HEADERS, flags, self.stream_id, block[:size])]
        for start in range(size, len(block), size):
            last = start + size >= len(block)
            frames.append(
                _Frame(
                    _CONTINUATION,
                    _END_HEADERS if last else 0,
                    self.stream_id,
                    block[start : start + size],
                )
            )
        return frames

    def send_data(  # type: ignore[override]
        self, data: bytes, end_stream: bool = False, pad_length: None = None
    ) -> list[_Frame]:
        self.state_machine.process_input(_SEND_DATA)
        if end_stream:
            self.state_machine.process_input(_SEND_END_STREAM)
        self.outbound_flow_control_window -= len(data)
        return [_Frame(_DATA, _END_STREAM if end_stream else 0, self.stream_id, data)]


class _Frame:
    """A frame as the library queues it (``serialize``, ``body_len``), made directly: the
    proxy's HEADERS and DATA carry no padding or priority, and building hyperframe objects
    with their flag sets for each cost more than the bytes themselves."""

    __slots__ = ("_bytes", "body_len")

    def __init__(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        self.body_len = len(payload)
        self._bytes = _HEAD.pack(self.body_len >> 8, self.body_len & 0xFF, kind, flags, stream_id)
        self._bytes += payload

    def serialize(self) -> bytes:
        return self._bytes


_HEAD = struct.Struct(">HBBBL")  # RFC 9113 4.1: 24-bit length, type, flags, stream id
_DATA, _HEADERS, _CONTINUATION = 0x0, 0x1, 0x9
_END_STREAM, _END_HEADERS = 0x1, 0x4
_SEND_DATA = h2.stream.StreamInputs.SEND_DATA


_SEND_HEADERS = h2.stream.StreamInputs.SEND_HEADERS
_SEND_INFORMATIONAL = h2.stream.StreamInputs.SEND_INFORMATIONAL_HEADERS
_SEND_END_STREAM = h2.stream.StreamInputs.SEND_END_STREAM
_STREAM_OPEN = h2.stream.STREAM_OPEN
_CLOSED = h2.stream.StreamState.CLOSED


class _Library(h2.connection.H2Connection):
    """The library's connection with two private hooks of h2 4.x (pinned with it): its
    streams are :class:`_Stream`, and open streams are counted without two property calls
    per stream (the count runs at every new stream, over all of them: 5 % of the time)."""

    def _open_streams(self, remainder: int) -> int:
        count = 0
        closed: list[int] = []
        for stream_id, stream in self.streams.items():
            state = stream.state_machine.state
            if _STREAM_OPEN[state]:
                if stream_id % 2 == remainder:
                    count += 1
            elif state == _CLOSED:
                closed.append(stream_id)
        for stream_id in closed:  # as the library does: forget them, remember how they ended
            self._closed_streams[stream_id] = self.streams.pop(stream_id).closed_by
        return count

    def _begin_new_stream(
        self, stream_id: int, allowed_ids: h2.connection.AllowedStreamIDs
    ) -> h2.stream.H2Stream:
        stream = super()._begin_new_stream(stream_id, allowed_ids)
        stream.__class__ = _Stream
        return stream


class H2Stream:
    """One stream of an HTTP/2 connection: the Downstream of its exchange."""

    __slots__ = (
        "blocked_since",
        "connection",
        "done",
        "exchange",
        "held",
        "held_bytes",
        "holding",
        "id",
        "stalled",
        "unacked",
    )

    def __init__(self, connection: H2Connection, stream_id: int) -> None:
        self.connection = connection
        self.id = stream_id
        self.exchange: Exchange = cast(Exchange, None)  # set right after
        self.held: list[bytes] | None = None  # response data waiting for window; None: ended
        self.held_bytes = 0
        self.blocked_since = 0.0  # when held data last found no window (0: none waits)
        self.done = False  # the exchange is over; the stream ends once what is held is sent
        self.stalled = False  # its upstream is paused: too much is held
        self.holding = False  # the exchange asked to pause the client: acknowledge nothing
        self.unacked = 0  # DATA bytes taken meanwhile, acknowledged when it resumes

    # -- Downstream ------------------------------------------------------------------------

    def respond_interim(self, response: Response) -> None:
        self.connection.send_headers(self, response, end=False)

    def respond(self, exchange: Exchange, response: Response) -> None:
        end = response.framing == NO_BODY
        self.connection.send_headers(self, response, end=end)
        self.held = None if end else []

    def respond_body(self, data: bytes) -> None:
        held = self.held
        if held is not None and data:  # sent at the iteration's end: the end may come too
            held.append(data)
            self.held_bytes += len(data)
            if self.held_bytes > LIMIT:  # bulk data goes at once (backpressure sees it)
                self.connection.send_held(self)
            elif len(held) == 1:
                self.connection.send_later(self)

    def respond_end(self, exchange: Exchange) -> None:
        held = self.held
        if held is not None:
            held.append(b"")  # the end, after what is held
            if len(held) == 1:
                self.connection.send_later(self)
        self.connection.finished(self)

    def answer_error(self, exchange: Exchange, error: HTTPError) -> None:
        connection = self.connection
        if error.malformed or not error.status:
            connection.reset(self, ErrorCodes.PROTOCOL_ERROR if error.status else ErrorCodes.CANCEL)
        else:
            body = error_body(error.status)
            exchange.sent = len(body)
            connection.send_error(self, error.status, body)
        connection.finished(self)

    def cut(self, exchange: Exchange) -> None:
        self.held = None
        self.connection.reset(self, ErrorCodes.INTERNAL_ERROR)
        self.connection.finished(self)

    def pause_request(self, exchange: Exchange) -> None:
        self.holding = True

    def resume_request(self, exchange: Exchange) -> None:
        self.holding = False
        taken, self.unacked = self.unacked, 0
        if taken:
            self.connection.acknowledge(self, taken)

    def upgrade(self, exchange: Exchange, link: UpstreamLink, rest: bytes) -> None:
        raise AssertionError("no WebSocket handshake is forwarded from HTTP/2")


class H2Connection(ClientConnection):
    """The HTTP/2 protocol layer of one client connection."""

    __slots__ = (
        "closing",
        "control_frames",
        "counted_since",
        "flushing",
        "h2",
        "idle_deadline",
        "last_stream",
        "paused",
        "queued",
        "resets",
        "streams",
    )

    def __init__(self, runtime: Runtime, listen_port: int) -> None:
        super().__init__(runtime, listen_port)
        self.h2 = _Library(_CONFIG)
        self.h2.encoder = StatelessEncoder()  # type: ignore[assignment]
        self.streams: dict[int, H2Stream] = {}
        self.idle_deadline = 0.0
        self.closing = False  # GOAWAY sent: no new streams; close when the last one ends
        self.last_stream = 0  # the last stream id taken, once GOAWAY has been sent
        self.paused = False  # the socket's write buffer is full
        self.flushing = False  # _send_queued will run before the write batch's next flush
        self.queued = 0  # DATA bytes the library holds for the next write
        self.resets = 0
        self.control_frames = 0
        self.counted_since = 0.0

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        runtime = self.runtime
        settings = runtime.settings
        now = runtime.loop.time()
        self.idle_deadline = now + settings.keepalive_timeout
        self.counted_since = now
        conn = self.h2
        conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 2 * settings.max_header_bytes,
                h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL: 0,
            },
        )
        conn.max_inbound_frame_size = conn.local_settings.max_frame_size  # 16 KiB, as announced
        conn.decoder = Decoder(2 * settings.max_header_bytes)  # type: ignore[assignment]
        conn.initiate_connection()
        conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.runtime.forget(self)
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.exchange.client_gone()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:  # the library queued its GOAWAY
            log.info("HTTP/2 connection from %s closed: %s", self.peer.ip, exc)
            self._close()
            return
        started: list[H2Stream] = []
        for event in events:
            kind = type(event)
            if kind is h2.events.RequestReceived:
                started.append(self._request(cast(h2.events.RequestReceived, event)))
            elif kind is h2.events.DataReceived:
                self._data(cast(h2.events.DataReceived, event))
            elif kind is h2.events.StreamEnded:
                self._request_end(cast(h2.events.StreamEnded, event).stream_id)
            elif kind is h2.events.WindowUpdated:
                self._window_updated(cast(h2.events.WindowUpdated, event).stream_id)
            elif kind is h2.events.StreamReset:
                self._reset_by_client(cast(h2.events.StreamReset, event).stream_id)
            elif kind is h2.events.RemoteSettingsChanged:
                self._control_frame()
                self._window_updated(0)  # a new initial window may have opened all of them
            elif kind is h2.events.PingReceived:
                self._control_frame()
            elif kind is h2.events.ConnectionTerminated:
                self._close()  # the library sends nothing after a GOAWAY: cut what is open
                return
        for stream in started:
            if self.streams.get(stream.id) is stream:  # not reset meanwhile
                stream.exchange.start()
        self._flush()
        if self.closing and not self.streams:
            self._close()

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        """The socket's buffer is full: stop reading (nothing new to answer) and pause every
        upstream until it drains."""
        self.paused = True
        if self.transport is not None:
            self.transport.pause_reading()
        for stream in self.streams.values():
            stream.exchange.client_writable(False)

    def resume_writing(self) -> None:
        self.paused = False
        if self.transport is not None:
            self.transport.resume_reading()
        for stream in list(self.streams.values()):
            if not stream.stalled:
                stream.exchange.client_writable(True)

    # -- the client's frames ---------------------------------------------------------------

    def _request(self, event: h2.events.RequestReceived) -> H2Stream:
        runtime = self.runtime
        stream_id = event.stream_id
        stream = H2Stream(self, stream_id)
        exchange = stream.exchange = Exchange(runtime, stream, self, runtime.loop.time())
        if self.closing and stream_id > self.last_stream:  # after our GOAWAY: refused
            self.h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            return stream
        self.streams[stream_id] = stream
        if self.paused:
            exchange.client_writable(False)
        try:
            head = request_head(
                event.headers,
                body=event.stream_ended is None,
                max_bytes=runtime.settings.max_header_bytes,
            )
            exchange.request_head(head)
        except HTTPError as error:
            exchange.refuse(error)
        return stream

    def _data(self, event: h2.events.DataReceived) -> None:
        stream = self.streams.get(event.stream_id)
        size = event.flow_controlled_length
        if not event.data and event.stream_ended is None:
            self._control_frame()  # an empty DATA frame asks for work and brings nothing
        if stream is None or stream.exchange.request is None or stream.exchange.error:
            if size:  # a stream we dropped: give the connection window back
                self.h2.acknowledge_received_data(size, event.stream_id)
            return
        try:
            stream.exchange.request_body(event.data)
        except HTTPError as error:  # over the size limit, or more than Content-Length
            stream.exchange.refuse(error)
            return
        if not size:
            return
        if stream.holding:  # the exchange asked to pause: acknowledge once it resumes
            stream.unacked += size
        else:
            self.h2.acknowledge_received_data(size, event.stream_id)

    def _request_end(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None or stream.exchange.request is None or stream.exchange.error:
            return
        try:
            stream.exchange.request_end()
        except HTTPError as error:  # less than Content-Length
            stream.exchange.refuse(error)

    def _reset_by_client(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return
        stream.exchange.client_gone()
        self.resets += 1
        self._check_budget()

    def _control_frame(self) -> None:
        self.control_frames += 1
        self._check_budget()

    def _check_budget(self) -> None:
        """Resets and control frames beyond their budget per WINDOW: GOAWAY, close."""
        now = self.runtime.loop.time()
        if now - self.counted_since > WINDOW:
            self.counted_since = now
            self.resets = self.control_frames = 0
            return
        if self.resets > MAX_RESETS or self.control_frames > MAX_CONTROL_FRAMES:
            what = "stream resets" if self.resets > MAX_RESETS else "control frames"
            log.warning(
                "HTTP/2 connection from %s closed: too many %s (ENHANCE_YOUR_CALM)",
                self.peer.ip,
                what,
            )
            self._goaway(ErrorCodes.ENHANCE_YOUR_CALM)
            self._close()

    def _window_updated(self, stream_id: int) -> None:
        if stream_id:
            stream = self.streams.get(stream_id)
            if stream is not None and stream.held:
                self.send_held(stream)
        else:
            for stream in list(self.streams.values()):
                if stream.held:
                    self.send_held(stream)
        self._flush()

    # -- for the streams -------------------------------------------------------------------

    def send_headers(self, stream: H2Stream, response: Response, *, end: bool) -> None:
        fields = [(b":status", b"%d" % response.status)]
        fields += [(name.lower(), value) for name, value in response.fields]
        try:
            self.h2.send_headers(stream.id, fields, end_stream=end)
        except h2.exceptions.ProtocolError:  # the stream went away meanwhile
            return
        self._flush()

    def send_error(self, stream: H2Stream, status: int, body: bytes) -> None:
        fields = [
            (b":status", b"%d" % status),
            (b"content-type", _ERROR_TYPE),
            (b"content-length", b"%d" % len(body)),
        ]
        try:
            self.h2.send_headers(stream.id, fields)
            self.h2.send_data(stream.id, body, end_stream=True)
        except h2.exceptions.ProtocolError:
            return
        self._flush()

    def send_later(self, stream: H2Stream) -> None:
        """Send what ``stream`` holds just before this iteration's writes leave, so a small
        body and its end go as one DATA frame."""
        self.runtime.batch.produce(lambda: self.send_held(stream))

    def send_held(self, stream: H2Stream) -> None:
        """Send what the stream holds as far as the windows allow; pause its upstream when
        too much is left, resume it when all is gone."""
        held = stream.held
        if held is None:
            return
        conn = self.h2
        sent = False
        try:
            while held:
                chunk = held[0]
                if not chunk:  # the end, with nothing before it
                    conn.send_data(stream.id, b"", end_stream=True)
                    stream.held = None
                    sent = True
                    break
                window = conn.local_flow_control_window(stream.id)
                if window <= 0:
                    break
                size = min(window, conn.max_outbound_frame_size, len(chunk))
                sent = True
                self.queued += size
                stream.held_bytes -= size
                if size < len(chunk):
                    conn.send_data(stream.id, chunk[:size])
                    held[0] = chunk[size:]
                elif len(held) > 1 and not held[1]:  # the last piece: it ends the stream
                    conn.send_data(stream.id, chunk, end_stream=True)
                    stream.held = None
                    break
                else:
                    conn.send_data(stream.id, chunk)
                    held.pop(0)
        except h2.exceptions.ProtocolError:  # the stream went away meanwhile
            stream.held = None
        if sent:
            self._flush()
        if not stream.held:
            stream.blocked_since = 0.0
            stream.held_bytes = 0
            if stream.done:
                self._drop(stream)
                return
        elif not stream.blocked_since:
            stream.blocked_since = self.runtime.loop.time()
        exchange = stream.exchange
        if stream.held_bytes > HELD_BYTES:
            if not stream.stalled:
                stream.stalled = True
                exchange.client_writable(False)
        elif stream.stalled:
            stream.stalled = False
            if not self.paused:
                exchange.client_writable(True)

    def acknowledge(self, stream: H2Stream, size: int) -> None:
        self.h2.acknowledge_received_data(size, stream.id)
        self._flush()

    def reset(self, stream: H2Stream, code: ErrorCodes) -> None:
        try:
            self.h2.reset_stream(stream.id, code)
        except h2.exceptions.ProtocolError:
            return
        self._flush()

    def finished(self, stream: H2Stream) -> None:
        """The stream's exchange is done; the stream ends once what it holds is sent."""
        stream.done = True
        if not stream.held:
            self._drop(stream)

    def _drop(self, stream: H2Stream) -> None:
        """The stream is over on our side; a client still sending its body is told to stop."""
        if self.streams.pop(stream.id, None) is None:
            return
        if stream.exchange.request_state != DONE:  # the client is still sending: stop it
            library_stream = self.h2.streams.get(stream.id)
            if library_stream is not None and not library_stream.closed:
                self.reset(stream, ErrorCodes.NO_ERROR)
        if not self.streams:
            self.idle_deadline = self.runtime.loop.time() + self.runtime.settings.keepalive_timeout
            if self.closing:
                self._close()

    # -- deadlines and the end -------------------------------------------------------------

    @property
    def deadline(self) -> float:
        streams = self.streams
        if not streams:
            return self.idle_deadline
        send_timeout = self.runtime.settings.send_timeout
        due = NEVER
        for stream in streams.values():
            exchange = stream.exchange
            if exchange.state < COMPLETE and exchange.deadline < due:
                due = exchange.deadline
            stalled = exchange.stalled_since or stream.blocked_since
            if stalled and stalled + send_timeout < due:
                due = stalled + send_timeout
        return due

    def expire(self, now: float) -> None:
        if not self.streams:
            if self.idle_deadline <= now:
                self._goaway(ErrorCodes.NO_ERROR)
                self._close()
            return
        send_timeout = self.runtime.settings.send_timeout
        for stream in list(self.streams.values()):
            if stream.blocked_since and stream.blocked_since + send_timeout <= now:
                log.warning(
                    "HTTP/2 stream from %s reset: the client read nothing for %g s (send_timeout)",
                    self.peer.ip,
                    send_timeout,
                )
                stream.held = None
                self.reset(stream, ErrorCodes.CANCEL)
                stream.exchange.client_gone()
                self._drop(stream)
            else:
                stream.exchange.expire(now)
        self._flush()

    def retire(self) -> None:
        """GOAWAY: the client opens a new connection (with the new settings) for new
        requests; the open streams finish here."""
        self.close_if_idle()

    def close_if_idle(self) -> bool:
        """Graceful stop: GOAWAY (no new streams); close now if none is open."""
        if not self.closing:
            self._goaway(ErrorCodes.NO_ERROR)
        if not self.streams:
            self._close()
            return True
        return False

    def _goaway(self, code: ErrorCodes) -> None:
        """A GOAWAY naming the last stream taken, written outside the library (which would
        refuse to send anything afterwards, the open streams' responses included)."""
        self.closing = True
        self.last_stream = self.h2.highest_inbound_stream_id
        frame = GoAwayFrame(0)
        frame.last_stream_id = self.last_stream
        frame.error_code = code
        self._send_queued()  # what the library queued goes before it
        if self.transport is not None:
            self.batch.write(self.transport, frame.serialize())

    def _flush(self) -> None:
        """What the library queued leaves with this iteration's writes: one write for every
        stream that answered meanwhile. Bulk data goes at once, so the socket's buffer (and
        its pause, which stops the upstreams) sees a large body as it arrives."""
        if self.queued > LIMIT:
            self._send_queued()
        elif not self.flushing:
            self.flushing = True
            self.batch.produce(self._send_queued)

    def _send_queued(self) -> None:
        self.flushing = False
        self.queued = 0
        data = self.h2.data_to_send()
        if data and self.transport is not None:
            self.batch.write(self.transport, data)

    def _close(self) -> None:
        self._send_queued()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            self.batch.close(transport)
