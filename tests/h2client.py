"""A raw HTTP/2 client for tests: the ``h2`` library for the well-behaved parts, hand-made
frames (hyperframe, hpack) for what a well-behaved client never sends.

Its own validation is off, so a test can send exactly the malformed request or the flood
it means to, and read back every frame the proxy answers with.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from hpack import Encoder
from hyperframe.frame import ContinuationFrame, HeadersFrame

from tests.support import ProxyProcess

Fields = Sequence[tuple[bytes, bytes]]


@dataclass
class Answer:
    """What came back on one stream."""

    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    ended: bool = False
    reset: int | None = None  # the RST_STREAM error code, if the proxy reset it
    ended_at: float = 0.0


class H2Client:
    def __init__(
        self,
        proxy: ProxyProcess,
        host: str,
        *,
        settings: dict[int, int] | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.host = host
        context = proxy.client_context()
        context.set_alpn_protocols(["h2"])
        raw = socket.create_connection(("127.0.0.1", proxy.https_port), timeout=timeout)
        self.sock = context.wrap_socket(raw, server_hostname=host)
        assert self.sock.selected_alpn_protocol() == "h2"
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=False,
        )
        self.conn = h2.connection.H2Connection(config)
        self.conn.initiate_connection()
        if settings:
            self.conn.update_settings(settings)
        self.answers: dict[int, Answer] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.closed = False
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(
        self,
        path: str = "/",
        method: str = "GET",
        fields: Fields = (),
        body: bytes | None = None,
        end: bool = True,
    ) -> int:
        """Send a request; returns its stream id."""
        stream_id = self.conn.get_next_available_stream_id()
        headers = [
            (b":method", method.encode()),
            (b":scheme", b"https"),
            (b":authority", self.host.encode()),
            (b":path", path.encode()),
            *fields,
        ]
        self.conn.send_headers(stream_id, headers, end_stream=end and body is None)
        if body is not None:
            self.conn.send_data(stream_id, body, end_stream=end)
        self.answers[stream_id] = Answer()
        self.flush()
        return stream_id

    def raw_headers(self, stream_id: int, block: Fields, *, end: bool = True) -> None:
        """A HEADERS block exactly as given: the client library checks nothing (its
        validation is off) and keeps its stream state, so the proxy's answer is understood."""
        self.conn.send_headers(stream_id, list(block), end_stream=end)
        self.answers[stream_id] = Answer()
        self.flush()

    def continuation_flood(self, stream_id: int, frames: int) -> None:
        """A HEADERS frame without END_HEADERS and ``frames`` CONTINUATION frames after it."""
        encoder = Encoder()
        first = HeadersFrame(stream_id)
        first.data = encoder.encode([(b":method", b"GET"), (b":path", b"/")])
        data = first.serialize()
        for i in range(frames):
            more = ContinuationFrame(stream_id)
            more.data = encoder.encode([(b"x-filler-%d" % i, b"v" * 1000)])
            data += more.serialize()
        self.send_raw(data)

    def send_raw(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            self.closed = True

    def read(
        self, until: float = 5.0, stream: int | None = None, *, to_close: bool = False
    ) -> None:
        """Read and handle frames until ``stream`` has ended (or every stream, when None;
        or only the connection's end, ``to_close``), the connection closes, or ``until``
        seconds pass."""
        deadline = time.monotonic() + until
        while time.monotonic() < deadline and not self.closed:
            if stream is not None and self._done(stream):
                return
            if (
                not to_close
                and stream is None
                and self.answers
                and all(map(self._done, self.answers))
            ):
                return
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except (OSError, ssl.SSLError):
                self.closed = True
                return
            if not data:
                self.closed = True
                return
            try:
                events = self.conn.receive_data(data)
            except h2.exceptions.ProtocolError:
                self.closed = True
                return
            self._handle(events)
            try:
                self.flush()
            except OSError:
                self.closed = True

    def _done(self, stream_id: int) -> bool:
        answer = self.answers.get(stream_id)
        return answer is not None and (answer.ended or answer.reset is not None)

    def _handle(self, events: list[h2.events.Event]) -> None:
        for event in events:
            if isinstance(event, h2.events.ResponseReceived):
                answer = self.answers.setdefault(event.stream_id, Answer())
                headers = [(bytes(n), bytes(v)) for n, v in event.headers]
                answer.headers = headers
                answer.status = int(dict(headers)[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                self.answers.setdefault(event.stream_id, Answer()).body += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                answer = self.answers.setdefault(event.stream_id, Answer())
                answer.ended = True
                answer.ended_at = time.monotonic()
            elif isinstance(event, h2.events.StreamReset):
                self.answers.setdefault(event.stream_id, Answer()).reset = int(event.error_code)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = event

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> H2Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
