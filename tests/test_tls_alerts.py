"""A TLS error is answered with OpenSSL's fatal alert, then the connection closes (RFC 8446
§6.2): a client learns why (``decode_error``, ``bad_record_mac``), not just that its
connection was cut.

A real proxy process (both loops) and a client of our own over a raw socket: Python's
``ssl.SSLObject`` on memory BIOs, so a test can corrupt bytes between the client's TLS layer
and the wire, and read the server's answer record by record.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import time
from collections.abc import Iterator

import pytest

from tests.support import ProxyProcess, RawUpstream

ALERT = 0x15  # the record content type
FATAL = 2
DECODE_ERROR = 50


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def proxy(
    request: pytest.FixtureRequest, upstream: RawUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    directory = tmp_path_factory.mktemp(f"alerts-{request.param}")
    sites: list[dict[str, object]] = [{"hosts": ["app.test"], "upstreams": [upstream.url]}]
    running = ProxyProcess.start(directory, sites, server={"loop": request.param})
    yield running
    assert running.stop() == 0, running.log()
    assert "Traceback" not in running.log(), running.log()


def connect(proxy: ProxyProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.https_port), timeout=5)


def read_until_closed(sock: socket.socket) -> bytes:
    """All the server sends until its FIN (a reset fails the test: it can eat the alert)."""
    chunks = []
    while data := sock.recv(65536):
        chunks.append(data)
    return b"".join(chunks)


class Client:
    """A TLS client whose records pass through our hands: ``ssl.SSLObject`` over memory BIOs
    on a plain socket, verifying the proxy's certificate as any client would."""

    def __init__(self, proxy: ProxyProcess, version: ssl.TLSVersion) -> None:
        context = proxy.client_context()
        context.minimum_version = context.maximum_version = version
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="app.test")
        self.sock = connect(proxy)

    def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                self.sock.sendall(self.outgoing.read())
                data = self.sock.recv(65536)
                assert data, "the proxy closed during the handshake"
                self.incoming.write(data)
            else:
                self.sock.sendall(self.outgoing.read())  # TLS 1.3: our Finished
                return

    def record(self, plaintext: bytes) -> bytes:
        """The encrypted record(s) for ``plaintext``, not sent."""
        self.tls.write(plaintext)
        return self.outgoing.read()

    def answer(self) -> ssl.SSLError | bytes:
        """Decrypt what the server sends until it closes: the plaintext, or the error the
        client's TLS layer reports (a received alert, or an EOF without one)."""
        self.incoming.write(read_until_closed(self.sock))
        self.incoming.write_eof()
        plaintext = b""
        try:
            while chunk := self.tls.read(65536):
                plaintext += chunk
        except ssl.SSLError as exc:
            return exc
        return plaintext

    def close(self) -> None:
        self.sock.close()


def truncated(hello: bytes) -> bytes:
    """``hello`` (one record, one ClientHello) one byte short, with both its lengths (record
    and handshake message) fixed to match: complete, but its extensions no longer parse."""
    record_type, version, _ = struct.unpack("!BHH", hello[:5])
    body = hello[5:-1]
    message = body[:1] + (len(body) - 4).to_bytes(3, "big") + body[4:]
    return struct.pack("!BHH", record_type, version, len(message)) + message


def client_hello() -> bytes:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="app.test")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_a_malformed_client_hello_gets_a_decode_error_alert_before_the_close(
    proxy: ProxyProcess,
) -> None:
    with connect(proxy) as sock:
        sock.sendall(truncated(client_hello()))
        reply = read_until_closed(sock)
    # One plaintext alert record (no keys yet): type, version 3.x, length 2, fatal, reason.
    assert len(reply) == 7, reply
    record_type, major, length, level, description = struct.unpack("!BBxHBB", reply)
    assert (record_type, major, length) == (ALERT, 3, 2), reply
    assert (level, description) == (FATAL, DECODE_ERROR), reply


def test_bytes_that_are_not_tls_get_no_alert(proxy: ProxyProcess) -> None:
    """OpenSSL decides what deserves an alert: for bytes that do not look like TLS, none."""
    with connect(proxy) as sock:
        sock.sendall(b"\x00" * 512)
        assert read_until_closed(sock) == b""


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=["tls1.3", "tls1.2"]
)
def test_a_corrupted_record_gets_bad_record_mac_and_reaches_no_upstream(
    proxy: ProxyProcess, upstream: RawUpstream, version: ssl.TLSVersion
) -> None:
    client = Client(proxy, version)
    try:
        client.handshake()
        assert client.tls.version() == version.name.replace("_", ".")
        requests = len(upstream.requests)
        record = bytearray(client.record(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n"))
        record[-1] ^= 0x01  # a bit of the authentication tag: the record fails to decrypt
        started = time.monotonic()
        client.sock.sendall(record)
        answer = client.answer()
    finally:
        client.close()
    assert time.monotonic() - started < 3  # at once, not at some timeout
    # The client's TLS layer decrypted the proxy's alert: it reports the reason it was given.
    assert isinstance(answer, ssl.SSLError), answer
    assert answer.reason == "SSLV3_ALERT_BAD_RECORD_MAC", answer
    assert len(upstream.requests) == requests
