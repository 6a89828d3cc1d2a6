"""PROXY protocol on the listeners, end to end: a real HAProxy in front, and raw headers.

The proxy runs with ``proxy_protocol = ["127.0.0.2/32"]``. HAProxy (Debian's package) in
``mode tcp`` connects to it from 127.0.0.2 with ``send-proxy`` or ``send-proxy-v2``, and a
curl connects to HAProxy from 127.0.0.3 (or ::1): the FastAPI app behind the proxy, which
trusts the proxy's forwarding headers, must report 127.0.0.3, the client HAProxy saw, and
the proxy's access log must name it, over HTTP/1.1 and HTTP/2 alike (the header is a phase
of the TLS connection, below whichever protocol ALPN picks). Raw sockets from 127.0.0.2
send what a balancer might (a header in pieces, a header and the ClientHello in one
write, a v2 LOCAL health check) and what it must not (malformed or oversized headers, none
at all, none in time); raw sockets from 127.0.0.1, not listed, show that a header from
anyone else is never believed.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    ProxyProcess,
    UvicornApp,
    free_port,
    stop_process,
    wait_for_port,
    wait_until,
)
from tests.test_proxy_protocol import v2, v2_raw

BALANCER = "127.0.0.2"  # the one source in proxy_protocol
CLIENT = "127.0.0.3"  # a client of the balancer
HANDSHAKE_TIMEOUT = 2
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


@pytest.fixture(scope="module")
def app() -> Iterator[UvicornApp]:
    server = UvicornApp()  # trusts forwarding headers from the proxy (127.0.0.1)
    yield server
    server.stop()


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def proxy(
    app: UvicornApp, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[ProxyProcess]:
    """One proxy per event loop: the header phase swaps the TCP transport's protocol, which
    each loop implements on its own."""
    process = ProxyProcess.start(
        tmp_path_factory.mktemp("proxy-protocol"),
        [{"hosts": ["localhost"], "upstreams": [app.url]}],
        server={
            "proxy_protocol": [f"{BALANCER}/32"],
            "handshake_timeout": HANDSHAKE_TIMEOUT,
            "https_port": 443,
            "loop": request.param,
        },
    )
    yield process
    assert process.stop() == 0, process.log()


class HAProxy:
    """haproxy in the foreground, ``mode tcp``: one frontend per (name, bind, target port,
    server options), each forwarding from 127.0.0.2."""

    def __init__(self, directory: Path, frontends: list[tuple[str, str, int, str]]) -> None:
        lines = [
            "global",
            "    maxconn 200",
            "defaults",
            "    mode tcp",
            "    timeout connect 5s",
            "    timeout client 30s",
            "    timeout server 30s",
        ]
        self.ports: dict[str, int] = {}
        for name, host, target, options in frontends:
            port = self.ports[name] = free_port(host)
            bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            lines += [
                f"frontend {name}",
                f"    bind {bind}",
                f"    default_backend {name}",
                f"backend {name}",
                f"    server proxy 127.0.0.1:{target} source {BALANCER} {options}",
            ]
        config = directory / "haproxy.cfg"
        config.write_text("\n".join(lines) + "\n")
        self.log_path = directory / "haproxy.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [HAPROXY, "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT
            )
        for (_, host, _, _), port in zip(frontends, self.ports.values(), strict=True):
            wait_for_port(port, host=host, process=self.process)

    def stop(self) -> None:
        stop_process(self.process)


@pytest.fixture(scope="module")
def haproxy(proxy: ProxyProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HAProxy]:
    if not Path(HAPROXY).exists():
        pytest.fail("haproxy is missing: bash tests/run.sh installs it (Debian package haproxy)")
    balancer = HAProxy(
        tmp_path_factory.mktemp("haproxy"),
        [
            ("v1", "127.0.0.1", proxy.https_port, "send-proxy"),
            ("v2", "127.0.0.1", proxy.https_port, "send-proxy-v2"),
            ("v1_ipv6", "::1", proxy.https_port, "send-proxy"),
            ("v2_ipv6", "::1", proxy.https_port, "send-proxy-v2"),
            ("plain_v2", "127.0.0.1", proxy.http_port, "send-proxy-v2"),
        ],
    )
    yield balancer
    balancer.stop()


def through(
    haproxy: HAProxy, proxy: ProxyProcess, frontend: str, source: str, http: str = "--http2"
) -> Any:
    """curl -> HAProxy frontend -> proxy -> app; the app's JSON."""
    port = haproxy.ports[frontend]
    address = "[::1]" if ":" in source else "127.0.0.1"
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "--fail",
            "--max-time",
            "20",
            http,
            "--interface",
            source,
            "--cacert",
            str(proxy.root_ca),
            "--resolve",
            f"localhost:{port}:{address}",
            "-H",
            "X-Forwarded-For: 198.51.100.66",  # a client's own claim: dropped
            f"https://localhost:{port}/",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr + proxy.log()
    return json.loads(result.stdout)


# -- HAProxy in front ---------------------------------------------------------------------


@pytest.mark.parametrize("http", ["--http1.1", "--http2"])
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_haproxy_tells_the_app_who_the_client_is(
    haproxy: HAProxy, proxy: ProxyProcess, version: str, http: str
) -> None:
    seen = through(haproxy, proxy, version, CLIENT, http)
    assert seen["client"] == CLIENT, "the app sees the client HAProxy saw, not the balancer"
    headers = seen["headers"]
    assert headers["x-forwarded-for"] == CLIENT  # the client is not trusted: its claim dropped
    assert headers["x-real-ip"] == CLIENT
    assert f"for={CLIENT}" in headers["forwarded"]
    shown = "HTTP/2.0" if http == "--http2" else "HTTP/1.1"
    assert f'{CLIENT} "GET / {shown}" 200' in proxy.log()


@pytest.mark.parametrize("version", ["v1_ipv6", "v2_ipv6"])
def test_haproxy_passes_an_ipv6_client(haproxy: HAProxy, proxy: ProxyProcess, version: str) -> None:
    seen = through(haproxy, proxy, version, "::1")
    assert seen["client"] == "::1"
    assert seen["headers"]["x-forwarded-for"] == "::1"


def test_haproxy_in_front_of_the_http_listener(haproxy: HAProxy) -> None:
    connection = socket.create_connection(
        ("127.0.0.1", haproxy.ports["plain_v2"]), timeout=10, source_address=(CLIENT, 0)
    )
    with connection:
        connection.sendall(b"GET /a?b=1 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        reply = receive_all(connection)
    assert reply.startswith(b"HTTP/1.1 308 ")
    assert b"location: https://localhost/a?b=1\r\n" in reply


# -- raw headers --------------------------------------------------------------------------


def receive_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def https_after(
    proxy: ProxyProcess, prefix: bytes, *, source: str = BALANCER, byte_by_byte: bool = False
) -> bytes:
    """GET / over TLS on a raw socket from ``source`` that first sends ``prefix``: with the
    ClientHello in the same write, or before it one byte per write. The decrypted reply;
    ConnectionError if the proxy closes during the handshake."""
    context = proxy.client_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with socket.create_connection(
        ("127.0.0.1", proxy.https_port), timeout=10, source_address=(source, 0)
    ) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pending = prefix
        if byte_by_byte:
            for index in range(len(prefix)):
                sock.sendall(prefix[index : index + 1])
                time.sleep(0.005)
            pending = b""
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(pending + outgoing.read())
                pending = b""
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("closed during the handshake") from None
                incoming.write(data)
        tls.write(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        sock.sendall(outgoing.read())
        reply = b""
        while True:
            data = sock.recv(65536)
            if not data:
                return reply
            incoming.write(data)
            try:
                while chunk := tls.read(65536):
                    reply += chunk
            except ssl.SSLWantReadError:
                continue
            except ssl.SSLZeroReturnError:
                return reply


def client_seen(reply: bytes) -> str:
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), reply[:200]
    client = json.loads(body)["client"]
    assert isinstance(client, str)
    return client


V1_HEADER = b"PROXY TCP4 192.0.2.10 192.0.2.1 50000 443\r\n"


def test_a_header_in_the_same_write_as_the_client_hello(proxy: ProxyProcess) -> None:
    assert client_seen(https_after(proxy, V1_HEADER)) == "192.0.2.10"
    v2_header = v2("2001:db8::5", "2001:db8::1", 50000, 443)
    assert client_seen(https_after(proxy, v2_header)) == "2001:db8::5"


def test_a_header_arriving_one_byte_at_a_time(proxy: ProxyProcess) -> None:
    assert client_seen(https_after(proxy, V1_HEADER, byte_by_byte=True)) == "192.0.2.10"
    v2_header = v2("192.0.2.11", "192.0.2.1", 1, 443)
    assert client_seen(https_after(proxy, v2_header, byte_by_byte=True)) == "192.0.2.11"


def test_a_v2_local_health_check_keeps_the_balancers_address(proxy: ProxyProcess) -> None:
    assert client_seen(https_after(proxy, v2_raw(0x0, 0x00, b""))) == BALANCER
    assert client_seen(https_after(proxy, b"PROXY UNKNOWN\r\n")) == BALANCER


@pytest.mark.parametrize(
    "prefix",
    [
        pytest.param(b"", id="no header: the ClientHello first"),
        pytest.param(b"PROXY TCP4 192.0.2.10 192.0.2.1 50000\r\n", id="v1 missing a port"),
        pytest.param(b"PROXY TCP4 192.0.2.10 " + b"9" * 120, id="v1 without an end"),
        pytest.param(b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff" + b"\0" * 100, id="v2 oversized"),
        pytest.param(v2("192.0.2.10", "192.0.2.1", 1, 2, tlvs=b"\x01\x00"), id="v2 bad TLV"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", id="plain HTTP"),
    ],
)
def test_a_listed_source_without_a_valid_header_is_closed(
    proxy: ProxyProcess, prefix: bytes
) -> None:
    with pytest.raises(ConnectionError):
        https_after(proxy, prefix)
    assert client_seen(https_after(proxy, V1_HEADER)) == "192.0.2.10", "still serving"


def test_a_listed_source_that_sends_nothing_is_closed_after_the_handshake_timeout(
    proxy: ProxyProcess,
) -> None:
    with socket.create_connection(
        ("127.0.0.1", proxy.https_port), timeout=10, source_address=(BALANCER, 0)
    ) as sock:
        sock.sendall(V1_HEADER[:20])
        started = time.monotonic()
        assert receive_all(sock) == b""
        waited = time.monotonic() - started
    assert HANDSHAKE_TIMEOUT - 0.5 < waited < HANDSHAKE_TIMEOUT + 2


def test_a_header_from_a_source_not_listed_is_never_believed(proxy: ProxyProcess) -> None:
    """Security: only listed balancers may name the client. From 127.0.0.1 the header's bytes
    are the start of the TLS stream, and the handshake fails."""
    with pytest.raises((ConnectionError, ssl.SSLError)):
        https_after(proxy, V1_HEADER, source="127.0.0.1")
    with pytest.raises((ConnectionError, ssl.SSLError)):
        https_after(proxy, v2("192.0.2.10", "192.0.2.1", 1, 2), source="127.0.0.1")
    assert client_seen(https_after(proxy, b"", source="127.0.0.1")) == "127.0.0.1"


def plain_from(proxy: ProxyProcess, source: str, data: bytes) -> bytes:
    with socket.create_connection(
        ("127.0.0.1", proxy.http_port), timeout=10, source_address=(source, 0)
    ) as sock:
        sock.sendall(data)
        return receive_all(sock)


REQUEST = b"GET /x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


def test_the_http_listener_reads_the_header_before_the_request(proxy: ProxyProcess) -> None:
    assert plain_from(proxy, BALANCER, V1_HEADER + REQUEST).startswith(b"HTTP/1.1 308 ")
    assert plain_from(proxy, BALANCER, REQUEST) == b"", "a listed source must send a header"
    forged = plain_from(proxy, "127.0.0.1", V1_HEADER + REQUEST)
    assert forged.startswith(b"HTTP/1.1 400 "), "from anyone else it is not a header"


def test_a_reload_applies_the_list_to_listeners_already_open(
    app: UvicornApp, tmp_path: Path
) -> None:
    proxy = ProxyProcess.start(tmp_path, [{"hosts": ["localhost"], "upstreams": [app.url]}])
    try:
        assert client_seen(https_after(proxy, b"")) == BALANCER
        config = proxy.config_path.read_text()
        proxy.config_path.write_text(
            config.replace("[server]\n", f'[server]\nproxy_protocol = ["{BALANCER}"]\n')
        )
        proxy.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "reloaded" in proxy.log())
        assert client_seen(https_after(proxy, V1_HEADER)) == "192.0.2.10"
        with pytest.raises(ConnectionError):
            https_after(proxy, b"")
    finally:
        assert proxy.stop() == 0, proxy.log()
