"""End to end: a real tlsproxy process in front of a real FastAPI app under uvicorn.

Each test asserts what a user or the app itself can observe.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import (
    ProxyProcess,
    RawUpstream,
    RefusingPort,
    UvicornApp,
    body_json,
    curl,
    https_request,
)


@pytest.fixture(scope="module")
def app() -> Iterator[UvicornApp]:
    server = UvicornApp()
    yield server
    server.stop()


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def proxy(
    request: pytest.FixtureRequest, app: UvicornApp, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    directory = tmp_path_factory.mktemp(f"proxy-{request.param}")
    sites: list[dict[str, object]] = [
        {"hosts": ["app.test", "*.apps.test"], "upstreams": [app.url]},
        {"hosts": ["other.test"], "upstreams": [app.url], "hsts": "max-age=63072000"},
    ]
    running = ProxyProcess.start(directory, sites, server={"loop": request.param})
    yield running
    assert running.stop() == 0, running.log()


def get(host: str, path: str = "/", headers: str = "") -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}Connection: close\r\n\r\n").encode()


def test_app_sees_the_real_client_scheme_and_host(proxy: ProxyProcess) -> None:
    host = f"app.test:{proxy.https_port}"
    reply = https_request(proxy, "app.test", get(host), source="127.0.0.5")
    assert reply.startswith(b"HTTP/1.1 200 ")
    seen = body_json(reply)
    assert seen["client"] == "127.0.0.5"
    assert seen["scheme"] == "https"
    assert seen["host"] == host
    assert seen["url"] == f"https://{host}/"
    assert seen["headers"]["x-forwarded-proto"] == "https"
    assert seen["headers"]["x-forwarded-host"] == host
    assert seen["headers"]["x-forwarded-port"] == str(proxy.https_port)
    assert seen["headers"]["x-real-ip"] == "127.0.0.5"
    assert seen["headers"]["forwarded"] == f'for=127.0.0.5;host="{host}";proto=https'


def test_curl_trusts_the_internal_root(proxy: ProxyProcess) -> None:
    result = curl(proxy, "app.test", "/", "-w", "\n%{http_code} %{http_version}")
    body, _, status = result.stdout.rpartition("\n")
    assert status == "200 2"  # ALPN chose HTTP/2 (tests/test_http2.py has the rest)
    assert json.loads(body)["scheme"] == "https"


def peer_certificate(proxy: ProxyProcess, server_name: str | None) -> dict[str, object]:
    context = proxy.client_context()
    context.check_hostname = server_name is not None
    with (
        socket.create_connection(("127.0.0.1", proxy.https_port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        assert tls.selected_alpn_protocol() in (None, "http/1.1")
        cert = tls.getpeercert()
        assert cert is not None
        return dict(cert)


def test_each_site_gets_its_own_certificate(proxy: ProxyProcess) -> None:
    app_cert = peer_certificate(proxy, "app.test")
    other_cert = peer_certificate(proxy, "other.test")
    wildcard = peer_certificate(proxy, "x.apps.test")
    assert app_cert["serialNumber"] != other_cert["serialNumber"]
    assert ("DNS", "other.test") in other_cert["subjectAltName"]  # type: ignore[operator]
    assert ("DNS", "*.apps.test") in wildcard["subjectAltName"]  # type: ignore[operator]
    assert wildcard["serialNumber"] == app_cert["serialNumber"]


def test_wildcard_host_is_routed(proxy: ProxyProcess) -> None:
    reply = https_request(proxy, "x.apps.test", get("x.apps.test"))
    assert body_json(reply)["host"] == "x.apps.test"


def test_spoofed_forwarding_headers_never_reach_the_app(proxy: ProxyProcess) -> None:
    spoof = (
        "X-Forwarded-For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\n"
        "X-Forwarded-Proto: http\r\nX-Forwarded-Host: evil.test\r\n"
    )
    reply = https_request(proxy, "app.test", get("app.test", headers=spoof), source="127.0.0.7")
    seen = body_json(reply)
    assert seen["client"] == "127.0.0.7"
    assert seen["headers"]["x-forwarded-for"] == "127.0.0.7"
    assert seen["headers"]["x-real-ip"] == "127.0.0.7"
    assert seen["headers"]["x-forwarded-host"] == "app.test"
    assert "6.6.6.6" not in seen["headers"]["forwarded"]


def test_hop_by_hop_headers_are_removed(proxy: ProxyProcess) -> None:
    extra = (
        "Connection: x-secret, close\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n"
    )
    request = (
        f"GET / HTTP/1.1\r\nHost: app.test\r\n{extra}Proxy-Authorization: x\r\nX-Kept: yes\r\n\r\n"
    ).encode()
    seen = body_json(https_request(proxy, "app.test", request))["headers"]
    assert seen["x-kept"] == "yes"
    for name in ("x-secret", "keep-alive", "te", "proxy-authorization"):
        assert name not in seen


def test_unknown_host_is_answered_421_and_never_forwarded(proxy: ProxyProcess) -> None:
    reply = https_request(proxy, "app.test", get("nowhere.test"))
    assert reply.startswith(b"HTTP/1.1 421 ")
    assert b"hello from the example app" not in reply
    assert "Host 'nowhere.test' differs from the TLS server name 'app.test'" in proxy.log()


def test_hsts_is_added_for_sites_that_ask(proxy: ProxyProcess) -> None:
    with_hsts = https_request(proxy, "other.test", get("other.test"))
    without = https_request(proxy, "app.test", get("app.test"))
    assert b"strict-transport-security: max-age=63072000\r\n" in with_hsts.lower()
    assert b"strict-transport-security" not in without.lower()


@pytest.mark.parametrize("protocol", ["--http1.1", "--http2"])
def test_64_mib_upload_and_download_stream_with_flat_memory(
    proxy: ProxyProcess, tmp_path: Path, protocol: str
) -> None:
    size = 64 * 1024 * 1024
    block = bytes(range(256)) * 4096
    upload = tmp_path / "upload.bin"
    with upload.open("wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
    before = peak_rss_kib(proxy)
    result = curl(
        proxy,
        "app.test",
        "/upload",
        "--data-binary",
        f"@{upload}",
        "-H",
        "content-type: application/octet-stream",
        protocol,
    )
    answer = json.loads(result.stdout)
    assert answer["bytes"] == size
    assert answer["sha256"] == hashlib.sha256(upload.read_bytes()).hexdigest()
    download = tmp_path / "download.bin"
    curl(proxy, "app.test", f"/download?size={size}", "-o", str(download), protocol)
    assert download.stat().st_size == size
    assert (
        hashlib.sha256(download.read_bytes()).digest()
        == hashlib.sha256(upload.read_bytes()).digest()
    )
    growth_mib = (peak_rss_kib(proxy) - before) / 1024
    assert growth_mib < 24, f"proxy peak memory grew by {growth_mib:.0f} MiB"


def peak_rss_kib(proxy: ProxyProcess) -> int:
    status = Path(f"/proc/{proxy.process.pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0])


def test_server_sent_events_arrive_as_produced(proxy: ProxyProcess) -> None:
    context = proxy.client_context()
    with (
        socket.create_connection(("127.0.0.1", proxy.https_port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="app.test") as tls,
    ):
        tls.sendall(get("app.test", "/events?count=3&interval=1.5"))
        started = time.monotonic()
        received = b""
        while b"event 0" not in received:
            data = tls.recv(65536)
            assert data, "stream ended before the first event"
            received += data
        first_after = time.monotonic() - started
        while b"event 2" not in received:
            data = tls.recv(65536)
            assert data
            received += data
        last_after = time.monotonic() - started
    # The app produces event 2 three seconds after event 0: a proxy that buffered the
    # stream would deliver them together.
    assert last_after - first_after > 2.0
    assert b"text/event-stream" in received


def test_head_204_and_304_have_no_body(proxy: ProxyProcess) -> None:
    head = https_request(proxy, "app.test", get("app.test").replace(b"GET", b"HEAD", 1))
    assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
    assert int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]) > 0
    for code in (204, 304):
        reply = https_request(proxy, "app.test", get("app.test", f"/status/{code}"))
        assert reply.startswith(f"HTTP/1.1 {code} ".encode()) and reply.endswith(b"\r\n\r\n")


def test_expect_100_continue_is_relayed(proxy: ProxyProcess) -> None:
    context = proxy.client_context()
    body = b"x" * 1000
    with (
        socket.create_connection(("127.0.0.1", proxy.https_port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="app.test") as tls,
    ):
        tls.sendall(
            b"POST /upload HTTP/1.1\r\nHost: app.test\r\nContent-Length: 1000\r\n"
            b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
        )
        interim = tls.recv(65536)
        assert interim.startswith(b"HTTP/1.1 100 ")
        tls.sendall(body)
        reply = b""
        while data := tls.recv(65536):
            reply += data
    assert body_json(reply)["bytes"] == 1000


def test_pipelined_requests_are_answered_in_order(proxy: ProxyProcess) -> None:
    two = b"GET /slow?seconds=0.3 HTTP/1.1\r\nHost: app.test\r\n\r\n" + get(
        "app.test", "/status/204"
    )
    reply = https_request(proxy, "app.test", two)
    first = reply.index(b"HTTP/1.1 200 ")
    second = reply.index(b"HTTP/1.1 204 ")
    assert first < second


def test_port_80_redirects_to_https_and_guards_the_challenge_path(proxy: ProxyProcess) -> None:
    def plain(request: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", proxy.http_port), timeout=10) as sock:
            sock.sendall(request)
            reply = b""
            while data := sock.recv(65536):
                reply += data
            return reply

    reply = plain(get("App.Test", "/a/b?x=1&y=2"))
    assert reply.startswith(b"HTTP/1.1 308 ")
    location = f"location: https://app.test:{proxy.https_port}/a/b?x=1&y=2\r\n".encode()
    assert location in reply.lower()
    token = "A" * 43
    assert plain(get("app.test", f"/.well-known/acme-challenge/{token}")).startswith(
        b"HTTP/1.1 404 "
    )
    assert plain(get("app.test", "/.well-known/acme-challenge/../../etc/passwd")).startswith(
        b"HTTP/1.1 404 "
    )
    assert plain(get("nowhere.test", "/")).startswith(b"HTTP/1.1 404 ")


def test_access_log_has_one_line_per_request(proxy: ProxyProcess) -> None:
    https_request(proxy, "app.test", get("app.test", "/status/204?marker=access-log-check"))
    time.sleep(0.2)
    lines = [line for line in proxy.log().splitlines() if "marker=access-log-check" in line]
    assert len(lines) == 1
    assert '"GET /status/204?marker=access-log-check HTTP/1.1" 204' in lines[0]
    assert "site=app.test" in lines[0]


def test_pooled_upstream_connections_are_reused(tmp_path: Path) -> None:
    upstream = RawUpstream()
    proxy = ProxyProcess.start(tmp_path, [{"hosts": ["pool.test"], "upstreams": [upstream.url]}])
    try:
        for _ in range(10):
            request = b"".join(
                b"GET /%d HTTP/1.1\r\nHost: pool.test\r\n\r\n" % i for i in range(4)
            ) + get("pool.test", "/last")
            reply = https_request(proxy, "pool.test", request)
            assert reply.count(b"HTTP/1.1 200 ") == 5
        assert len(upstream.requests) == 50
        assert upstream.connections <= 2, f"{upstream.connections} upstream connections"
    finally:
        assert proxy.stop() == 0
        upstream.close()


def test_refused_upstream_is_skipped_and_502_names_site_and_upstream(tmp_path: Path) -> None:
    live = RawUpstream()
    dead = RefusingPort()
    proxy = ProxyProcess.start(
        tmp_path,
        [
            {"hosts": ["lb.test"], "upstreams": [dead.url, live.url]},
            {"hosts": ["down.test"], "upstreams": [dead.url]},
        ],
    )
    try:
        for _ in range(6):
            assert https_request(proxy, "lb.test", get("lb.test")).startswith(b"HTTP/1.1 200 ")
        assert len(live.requests) == 6
        reply = https_request(proxy, "down.test", get("down.test"))
        assert reply.startswith(b"HTTP/1.1 502 ")
        time.sleep(0.2)
        lines = [line for line in proxy.log().splitlines() if "502 for" in line]
        assert lines and "site=down.test" in lines[-1] and dead.url in lines[-1]
        assert "refused" in lines[-1]
    finally:
        assert proxy.stop() == 0
        live.close()
        dead.close()


def test_silent_upstream_gives_504(tmp_path: Path) -> None:
    silent = RawUpstream(mode="silent")
    proxy = ProxyProcess.start(
        tmp_path,
        [{"hosts": ["slow.test"], "upstreams": [silent.url]}],
        server={"upstream_timeout": 1},
    )
    try:
        reply = https_request(proxy, "slow.test", get("slow.test"))
        assert reply.startswith(b"HTTP/1.1 504 ")
        assert "sent nothing for 1 s" in proxy.log()
    finally:
        assert proxy.stop() == 0
        silent.close()
