"""HTTP/2 to clients, end to end: real clients (curl, h2load), a FastAPI app under uvicorn,
and raw frames (tests/h2client.py) for malformed requests and the attacks of 2019-2024.

Each attack test ends with an ordinary client served normally by the same proxy.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import h2.settings
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import DataFrame, HeadersFrame, PingFrame, SettingsFrame

from tests.h2client import Answer, H2Client
from tests.promparse import scrape
from tests.support import (
    LoopbackServer,
    ProxyProcess,
    RawUpstream,
    UvicornApp,
    curl,
    free_port,
)

HOST = "h2.test"
RAW = "raw.test"
ADMIN = free_port()


@pytest.fixture(scope="module")
def app() -> Iterator[UvicornApp]:
    server = UvicornApp()
    yield server
    server.stop()


class CountingUpstream(RawUpstream):
    """The raw upstream, answering 200 at once: counts what reaches it."""


@pytest.fixture(scope="module")
def raw() -> Iterator[CountingUpstream]:
    server = CountingUpstream()
    yield server
    server.close()


@pytest.fixture(scope="module")
def proxy(
    app: UvicornApp, raw: CountingUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    running = ProxyProcess.start(
        tmp_path_factory.mktemp("h2"),
        [
            {"hosts": [HOST], "upstreams": [app.url]},
            {"hosts": [RAW], "upstreams": [raw.url]},
        ],
        server={
            "send_timeout": 2,
            "max_body_bytes": 10_000_000,
            "admin_listen": f"127.0.0.1:{ADMIN}",
        },
    )
    yield running
    assert running.stop() == 0


def served_normally(proxy: ProxyProcess) -> None:
    """An ordinary HTTP/2 client gets its answer: the proxy is still serving everyone."""
    result = curl(proxy, HOST, "/", "--http2", "-w", "\n%{http_code} %{http_version}")
    assert result.stdout.rpartition("\n")[2] == "200 2"


# -- real clients ------------------------------------------------------------------------


def test_curl_speaks_http2_and_the_app_sees_the_real_client(proxy: ProxyProcess) -> None:
    result = curl(
        proxy, HOST, "/?q=1", "--http2", "--interface", "127.0.0.9", "-w", "\n%{http_version}"
    )
    body, _, version = result.stdout.rpartition("\n")
    assert version == "2"
    seen = json.loads(body)
    assert seen["client"] == "127.0.0.9"
    assert seen["scheme"] == "https"
    assert seen["host"] == f"{HOST}:{proxy.https_port}"  # :authority, as curl sent it
    assert seen["headers"]["x-forwarded-proto"] == "https"
    assert seen["headers"]["x-forwarded-for"] == "127.0.0.9"
    assert "HTTP/2.0" in proxy.log()


def test_metrics_and_the_status_page_count_requests_per_protocol(proxy: ProxyProcess) -> None:
    curl(proxy, HOST, "/", "--http1.1")
    curl(proxy, HOST, "/", "--http2")
    _, page = scrape(ADMIN)
    assert page.value("tlsproxy_requests_by_protocol_total", protocol="HTTP/2.0") >= 1
    assert page.value("tlsproxy_requests_by_protocol_total", protocol="HTTP/1.1") >= 1
    with urllib.request.urlopen(f"http://127.0.0.1:{ADMIN}/api/status", timeout=10) as reply:
        protocols = json.load(reply)["protocols"]
    assert protocols["HTTP/2.0"] >= 1 and protocols["HTTP/1.1"] >= 1
    with urllib.request.urlopen(f"http://127.0.0.1:{ADMIN}/", timeout=10) as reply:
        assert "HTTP/2.0: " in reply.read().decode()


def test_cookie_crumbs_are_joined_for_the_upstream(proxy: ProxyProcess) -> None:
    with H2Client(proxy, HOST) as client:
        stream = client.request("/", fields=[(b"cookie", b"a=1"), (b"cookie", b"b=2")])
        client.read(stream=stream)
    seen = json.loads(client.answers[stream].body)
    assert seen["headers"]["cookie"] == "a=1; b=2"


def test_h2load_tens_of_thousands_of_requests_without_an_error(proxy: ProxyProcess) -> None:
    result = subprocess.run(
        [
            "h2load",
            "-n",
            "20000",
            "-c",
            "8",
            "-m",
            "16",
            "-H",
            f":authority: {RAW}",
            f"https://127.0.0.1:{proxy.https_port}/",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "Application protocol: h2" in result.stdout
    assert "20000 succeeded, 0 failed, 0 errored, 0 timeout" in result.stdout, result.stdout
    assert "status codes: 20000 2xx" in result.stdout


def test_a_slow_stream_does_not_hold_up_the_others(proxy: ProxyProcess) -> None:
    with H2Client(proxy, HOST) as client:
        slow = client.request("/slow?seconds=2")
        fast = client.request("/")
        client.read(until=10)
    assert client.answers[fast].status == 200 and client.answers[slow].status == 200
    assert client.answers[slow].ended_at - client.answers[fast].ended_at > 1.5


def test_server_sent_events_stream_unbuffered(proxy: ProxyProcess) -> None:
    with H2Client(proxy, HOST) as client:
        stream = client.request("/events?count=3&interval=1.5")
        client.read(until=1.2, stream=stream)
        early = client.answers[stream].body
        client.read(until=10, stream=stream)
    assert b"event 0" in early and b"event 2" not in early
    assert b"event 2" in client.answers[stream].body


def test_http2_off_offers_http_1_1_only(app: UvicornApp, tmp_path: Path) -> None:
    proxy = ProxyProcess.start(
        tmp_path, [{"hosts": [HOST], "upstreams": [app.url]}], server={"http2": False}
    )
    try:
        result = curl(proxy, HOST, "/", "--http2", "-w", "\n%{http_version}")
        assert result.stdout.rpartition("\n")[2] == "1.1"
    finally:
        proxy.stop()


# -- flow control ------------------------------------------------------------------------


class SilentReader(LoopbackServer):
    """Accepts a request head and then reads nothing more: a slow app."""

    def __init__(self) -> None:
        self.heads = 0
        self.release = threading.Event()
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        with conn:
            conn.recv(4096)
            self.heads += 1
            self.release.wait(30)


def test_a_client_cannot_push_more_than_its_window_at_a_slow_app(tmp_path: Path) -> None:
    app = SilentReader()
    proxy = ProxyProcess.start(tmp_path, [{"hosts": [HOST], "upstreams": [app.url]}])
    try:
        with H2Client(proxy, HOST) as client:
            stream = client.request("/up", "POST", [(b"content-length", b"%d" % 2**30)], end=False)
            sent = 0
            block = b"x" * 16384
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if client.conn.local_flow_control_window(stream) >= len(block):
                    client.conn.send_data(stream, block)
                    client.flush()
                    sent += len(block)
                else:
                    client.read(until=0.2)  # a WINDOW_UPDATE, if the proxy took more
            # what the proxy acknowledged is what it took: its windows plus what the
            # app's socket buffers hold, never the gigabyte
            assert sent < 32 * 2**20, f"the proxy took {sent} bytes for a slow app"
            assert client.conn.local_flow_control_window(stream) < len(block)
    finally:
        app.release.set()
        proxy.stop()
        app.close()


# -- malformed requests: a stream error, nothing forwarded ----------------------------------


def _block(*regular: tuple[bytes, bytes], path: bytes = b"/") -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", RAW.encode()),
        (b":path", path),
        *regular,
    ]


MALFORMED = {
    "Connection": _block((b"connection", b"keep-alive")),
    "Keep-Alive": _block((b"keep-alive", b"timeout=5")),
    "Proxy-Connection": _block((b"proxy-connection", b"close")),
    "Transfer-Encoding": _block((b"transfer-encoding", b"chunked")),
    "Upgrade": _block((b"upgrade", b"websocket")),
    "TE other than trailers": _block((b"te", b"gzip")),
    "an upper-case name": _block((b"X-Upper", b"1")),
    "a space in a name": _block((b"x bad", b"1")),
    "LF in a value": _block((b"x-a", b"1\nx-b: 2")),
    "a missing :path": [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"r")],
    "a repeated :method": [(b":method", b"GET"), *_block()],
    "an unknown pseudo-field": _block((b":foo", b"1")),
    "a pseudo-field after a regular one": [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b"x-a", b"1"),
        (b":authority", RAW.encode()),
        (b":path", b"/"),
    ],
    "scheme http on TLS": [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":authority", RAW.encode()),
        (b":path", b"/"),
    ],
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_request_is_reset_and_never_forwarded(
    case: str, proxy: ProxyProcess, raw: CountingUpstream
) -> None:
    before = len(raw.requests)
    with H2Client(proxy, RAW) as client:
        client.raw_headers(1, MALFORMED[case])
        client.read(stream=1)
        answer = client.answers[1]
        assert answer.reset == ErrorCodes.PROTOCOL_ERROR, answer
        good = client.request("/")  # the connection goes on
        client.read(stream=good)
        assert client.answers[good].status == 200
    assert len(raw.requests) == before + 1


def test_a_body_longer_than_its_content_length_is_reset(
    proxy: ProxyProcess, raw: CountingUpstream
) -> None:
    with H2Client(proxy, RAW) as client:
        stream = client.request("/up", "POST", [(b"content-length", b"5")], body=b"0123456789")
        client.read(stream=stream)
        assert client.answers[stream].reset == ErrorCodes.PROTOCOL_ERROR
        good = client.request("/")
        client.read(stream=good)
        assert client.answers[good].status == 200


def test_a_field_block_over_max_header_bytes_is_431(proxy: ProxyProcess) -> None:
    with H2Client(proxy, RAW) as client:
        stream = client.request("/", fields=[(b"x-big", b"v" * 40_000)])
        client.read(stream=stream)
        assert client.answers[stream].status == 431


# -- attacks -------------------------------------------------------------------------------


def test_rapid_reset_costs_no_upstream_request_and_is_told_to_calm_down(
    proxy: ProxyProcess, raw: CountingUpstream
) -> None:
    """CVE-2023-44487: streams opened and reset at once, in a loop."""
    before = len(raw.requests)
    with H2Client(proxy, RAW) as client:
        for _ in range(1000):
            stream = client.conn.get_next_available_stream_id()
            client.conn.send_headers(stream, _block())
            client.conn.reset_stream(stream, ErrorCodes.CANCEL)
            client.send_raw(client.conn.data_to_send())
            if client.closed:
                break
        client.read(until=5, to_close=True)
        assert client.goaway is not None
        assert client.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert len(raw.requests) - before < 200
    served_normally(proxy)


def test_continuation_flood_ends_the_connection(proxy: ProxyProcess) -> None:
    with H2Client(proxy, RAW) as client:
        client.continuation_flood(1, 200)
        client.read(until=5, to_close=True)
        assert client.closed or client.goaway is not None
    served_normally(proxy)


def test_an_hpack_bomb_ends_the_connection(proxy: ProxyProcess) -> None:
    """One 4 KiB field in the dynamic table, then referenced hundreds of times: a few bytes
    on the wire that decode to megabytes."""
    with H2Client(proxy, RAW) as client:
        client.raw_headers(1, _block((b"x-bomb", b"b" * 4000)))
        client.read(stream=1)
        bomb = _block(*[(b"x-bomb", b"b" * 4000)] * 500)
        client.raw_headers(3, bomb)
        client.read(until=5, to_close=True)
        assert client.goaway is not None or client.closed
        assert not client.answers[3].status
    served_normally(proxy)


@pytest.mark.parametrize("flood", ["SETTINGS", "PING", "empty DATA"])
def test_control_frame_floods_are_told_to_calm_down(proxy: ProxyProcess, flood: str) -> None:
    """CVE-2019-9512 (PING), -9515 (SETTINGS), -9518 (empty frames)."""
    with H2Client(proxy, HOST) as client:
        if flood == "empty DATA":
            stream = client.request("/upload", "POST", end=False)  # the app awaits a body
        frames = b""
        for i in range(3000):
            if flood == "SETTINGS":
                frames += SettingsFrame(0).serialize()
            elif flood == "PING":
                frames += PingFrame(0, opaque_data=b"%08d" % i).serialize()
            else:
                frames += DataFrame(stream).serialize()
        client.send_raw(frames)
        client.read(until=5, to_close=True)
        assert client.goaway is not None
        assert client.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    served_normally(proxy)


def test_a_zero_window_client_loses_its_stream_after_send_timeout(proxy: ProxyProcess) -> None:
    """CVE-2019-9517: a client that asks for a large body and never opens its window."""
    with H2Client(
        proxy, HOST, settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0}
    ) as client:
        stream = client.request(f"/download?size={64 * 2**20}")
        client.read(until=8, stream=stream)  # send_timeout is 2 s here
        answer = client.answers[stream]
        assert answer.status == 200 and answer.body == b""
        assert answer.reset is not None
    assert "the client read nothing for 2 s" in proxy.log()
    served_normally(proxy)


def test_more_streams_than_advertised_are_refused(proxy: ProxyProcess) -> None:
    with H2Client(proxy, HOST) as client:
        client.read(until=0.5)
        limit = client.conn.remote_settings.max_concurrent_streams
        assert limit == 100
        streams = [client.request(f"/slow?seconds=1&n={i}") for i in range(limit)]
        extra = client.conn.get_next_available_stream_id()
        frame = HeadersFrame(extra)  # by hand: the client library refuses to send it
        frame.data = client.conn.encoder.encode(_block())
        frame.flags.add("END_HEADERS")
        frame.flags.add("END_STREAM")
        client.send_raw(frame.serialize())
        client.answers[extra] = Answer()
        client.read(until=10, to_close=True)
        assert client.closed or client.goaway is not None or client.answers[extra].reset
        assert not client.answers[extra].status
        assert streams
    served_normally(proxy)


# -- lifecycle -----------------------------------------------------------------------------


def test_an_idle_connection_gets_goaway(app: UvicornApp, tmp_path: Path) -> None:
    proxy = ProxyProcess.start(
        tmp_path, [{"hosts": [HOST], "upstreams": [app.url]}], server={"keepalive_timeout": 1}
    )
    try:
        with H2Client(proxy, HOST) as client:
            stream = client.request("/")
            client.read(stream=stream)
            client.read(until=5, to_close=True)
            assert client.goaway is not None and client.goaway.error_code == ErrorCodes.NO_ERROR
            assert client.closed
    finally:
        proxy.stop()


def test_sigterm_lets_an_open_stream_finish(app: UvicornApp, tmp_path: Path) -> None:
    proxy = ProxyProcess.start(tmp_path, [{"hosts": [HOST], "upstreams": [app.url]}])
    slow = subprocess.Popen(
        [
            "curl",
            "-sS",
            "--http2",
            "--cacert",
            str(proxy.root_ca),
            "--resolve",
            f"{HOST}:{proxy.https_port}:127.0.0.1",
            "-w",
            "\n%{http_code} %{http_version}",
            f"https://{HOST}:{proxy.https_port}/slow?seconds=2",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.7)  # the request is upstream
    proxy.process.send_signal(signal.SIGTERM)
    out, _ = slow.communicate(timeout=20)
    assert out.rpartition("\n")[2] == "200 2"
    assert json.loads(out.rpartition("\n")[0]) == {"slept": 2.0}
    assert proxy.process.wait(20) == 0
