"""Bytes that follow an Upgrade request never reach an upstream outside a checked request.

The attack (found by outside testing): a request with ``Connection: Upgrade`` and any
``Upgrade`` value, on a connection for which the proxy opens a new upstream connection,
followed by a second request carrying a spoofed ``X-Forwarded-For``. The proxy used to
write the second request upstream raw, together with the first one's head; when the
upstream refused to switch protocols, that upstream connection went back into the pool with
the smuggled request's response waiting in it for the next, innocent client.

What must hold instead (nginx and HAProxy behave so): nothing after an upgrade request is
forwarded until the upstream answers 101; with any other answer the bytes that followed are
parsed as the client's next request, through every check, or the connection is closed.
Every case here gets its own site and upstream, so its first request always opens a new
upstream connection, the situation in which the proxy used to smuggle.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import LoopbackServer, ProxyProcess, UvicornApp

UPGRADES = ["websocket", "foo", "TLS/1.2", "WebSocket, foo/2"]
STATUSES = [200, 400, 403]
SEGMENTS = ["same segment", "later segment"]
CASES = [(u, s, g) for u in UPGRADES for s in STATUSES for g in SEGMENTS]


class RefusingUpstream(LoopbackServer):
    """Answers every request with ``status`` and keeps the connection open, never switching
    protocols: what an app does that has no WebSocket route at that path. Records each
    request head with the number of the connection it came on."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.heads: list[tuple[int, bytes]] = []
        self._lock = threading.Lock()
        self._count = 0
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        with self._lock:
            self._count += 1
            number = self._count
        buffer = b""
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buffer += data
                while b"\r\n\r\n" in buffer:
                    head, _, buffer = buffer.partition(b"\r\n\r\n")
                    with self._lock:
                        self.heads.append((number, head))
                    path = head.split(b" ", 2)[1]
                    body = b"path=" + path
                    conn.sendall(
                        b"HTTP/1.1 %d Answer\r\ncontent-length: %d\r\n\r\n%s"
                        % (self.status, len(body), body)
                    )


def _host(index: int) -> str:
    return f"c{index}.test"


@pytest.fixture(scope="module")
def upstreams() -> Iterator[list[RefusingUpstream]]:
    servers = [RefusingUpstream(status) for _, status, _ in CASES]
    yield servers
    for server in servers:
        server.close()


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory, upstreams: list[RefusingUpstream]
) -> Iterator[ProxyProcess]:
    sites: list[dict[str, object]] = [
        {"hosts": [_host(i)], "upstreams": [u.url]} for i, u in enumerate(upstreams)
    ]
    running = ProxyProcess.start(tmp_path_factory.mktemp("smuggling"), sites)
    yield running
    running.stop()


def _tls(proxy: ProxyProcess, host: str) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", proxy.https_port), timeout=5)
    return proxy.client_context().wrap_socket(raw, server_hostname=host)


def _read_responses(sock: ssl.SSLSocket, wanted: int, timeout: float) -> tuple[list[bytes], bool]:
    """Up to ``wanted`` whole responses (content-length framed), and whether the connection
    was closed by the proxy within ``timeout``."""
    sock.settimeout(0.2)
    data = b""
    deadline = time.monotonic() + timeout
    closed = False
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            if len(_split(data)) >= wanted:
                break
            continue
        except (ssl.SSLError, OSError):
            closed = True
            break
        if not chunk:
            closed = True
            break
        data += chunk
    return _split(data), closed


def _attack(proxy: ProxyProcess, host: str, upgrade: str, segment: str) -> tuple[list[bytes], bool]:
    """An upgrade request for /first, then /smuggled with a spoofed X-Forwarded-For, in the
    same segment or a later one; the answers the attacker got, and whether it was closed."""
    first = (
        f"GET /first HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: {upgrade}\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    smuggled = (
        f"GET /smuggled HTTP/1.1\r\nHost: {host}\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n"
    ).encode()
    with _tls(proxy, host) as attacker:
        if segment == "same segment":
            attacker.sendall(first + smuggled)
        else:
            attacker.sendall(first)
            time.sleep(0.3)
            attacker.sendall(smuggled)
        return _read_responses(attacker, 2, timeout=3.0)


def _innocent(proxy: ProxyProcess, host: str) -> bytes:
    """What a later, innocent client gets for GET /innocent."""
    with _tls(proxy, host) as innocent:
        innocent.sendall(f"GET /innocent HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        (answer,), _ = _read_responses(innocent, 1, timeout=5.0)
    return answer


def _split(data: bytes) -> list[bytes]:
    responses = []
    while b"\r\n\r\n" in data:
        head, _, rest = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(rest) < length:
            break
        responses.append(head + b"\r\n\r\n" + rest[:length])
        data = rest[length:]
    return responses


@pytest.mark.parametrize(("index", "case"), list(enumerate(CASES)), ids=[str(c) for c in CASES])
def test_bytes_after_an_upgrade_request_are_never_smuggled(
    proxy: ProxyProcess, upstreams: list[RefusingUpstream], index: int, case: tuple[str, int, str]
) -> None:
    upgrade, status, segment = case
    host = _host(index)
    upstream = upstreams[index]
    answers, closed = _attack(proxy, host, upgrade, segment)
    answer = _innocent(proxy, host)
    assert answer.startswith(b"HTTP/1.1 %d " % status)
    assert answer.endswith(b"\r\n\r\npath=/innocent"), "the innocent client got another answer"

    heads = [head for _, head in upstream.heads]
    assert not [h for h in heads if b"6.6.6.6" in h], "a client-sent X-Forwarded-For went up"
    for head in heads:
        assert b"\r\nx-forwarded-for: 127.0.0.1\r\n" in head.lower(), head
    assert answers, "the upgrade request got no answer"
    assert answers[0].startswith(b"HTTP/1.1 %d " % status)
    assert answers[0].endswith(b"path=/first")
    if len(answers) == 2:  # parsed as the client's next request, through every check
        assert answers[1].endswith(b"path=/smuggled")
        assert [h.split(b" ", 2)[1] for h in heads] == [b"/first", b"/smuggled", b"/innocent"]
    else:  # or the connection was closed, and the rest never forwarded
        assert closed, "the client's next request was neither answered nor refused"
        assert [h.split(b" ", 2)[1] for h in heads] == [b"/first", b"/innocent"]


@pytest.fixture(scope="module", params=["h11 --ws none", "httptools --ws websockets"])
def app(request: pytest.FixtureRequest) -> Iterator[UvicornApp]:
    """A FastAPI app that records every request it answers, under uvicorn with and without
    WebSocket support."""
    http, _, ws = str(request.param).partition(" --ws ")
    server = UvicornApp("tests.recording_app:app", extra=["--http", http, "--ws", ws])
    yield server
    server.stop()


def _seen_by(app: UvicornApp) -> list[dict[str, Any]]:
    """Every request the app answered, as the app itself saw it (asked directly)."""
    with urllib.request.urlopen(f"{app.url}/_seen", timeout=5) as reply:
        seen: list[dict[str, Any]] = json.load(reply)
    return [view for view in seen if view["path"] != "/_seen"]


@pytest.mark.parametrize("upgrade", UPGRADES)
@pytest.mark.parametrize("segment", SEGMENTS)
def test_the_app_never_sees_a_smuggled_request(
    tmp_path: Path, app: UvicornApp, upgrade: str, segment: str
) -> None:
    """The same attack against a FastAPI app under uvicorn: by the app's own record, every
    request it answered came from the real client and the innocent client got its own
    answer."""
    host = "app.test"
    before = len(_seen_by(app))
    proxy = ProxyProcess.start(tmp_path, [{"hosts": [host], "upstreams": [app.url]}])
    try:
        _attack(proxy, host, upgrade, segment)
        answer = _innocent(proxy, host)
    finally:
        proxy.stop()
    view = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert view["path"] == "/innocent", "the innocent client got another request's answer"
    seen = _seen_by(app)[before:]
    assert [v for v in seen if v["client"] != "127.0.0.1"] == []
    assert not [v for v in seen if "6.6.6.6" in json.dumps(v["headers"])]
    assert [v["path"] for v in seen][-1] == "/innocent"
