"""TLS-level bad input: unknown SNI, old protocol versions, plain HTTP, garbage, stalled and
abandoned handshakes, the connection limit. Nothing of it may reach an upstream, leak a file
descriptor, or stop a well-behaved client from being served meanwhile.

The first tests run a ``CertStore`` listener with the admission gate in this process on both
loops; the rest run a real proxy process (both loops) in front of a ``RawUpstream`` that
records whatever reaches it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import uvloop
from cryptography import x509

from proxy import metrics
from proxy.certs.internal_ca import InternalCA
from proxy.certs.store import CertStore
from proxy.tls.admission import Gate
from proxy.tls.connection import TLSListener
from proxy.tls.policy import sni_matches_host, sni_of
from tests.promparse import scrape
from tests.support import ProxyProcess, RawUpstream, free_port, https_request, wait_until

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


@pytest.fixture(params=list(LOOPS))
def loop_factory(request: pytest.FixtureRequest) -> Callable[[], asyncio.AbstractEventLoop]:
    return LOOPS[request.param]


@pytest.fixture
def ca(tmp_path: Path) -> InternalCA:
    return InternalCA.load_or_create(tmp_path / "ca")


@pytest.fixture
def store(ca: InternalCA) -> CertStore:
    store = CertStore()
    store.install(["a.test"], *ca.issue(["a.test"]))  # the default
    store.install(["*.apps.test"], *ca.issue(["*.apps.test"]))
    return store


# -- in-process: the SNI policy and what the data path learns ---------------------------


class Recorder(asyncio.Protocol):
    """Records the SNI of each connection that completes its handshake, then answers it."""

    seen: list[str | None]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.seen.append(sni_of(transport))
        cast(asyncio.Transport, transport).write(b"hello")
        transport.close()


@contextlib.asynccontextmanager
async def listener(
    store: CertStore, reject: Callable[[], bool], limit: int = 100
) -> AsyncIterator[tuple[int, list[str | None]]]:
    seen: list[str | None] = []
    protocol = type("Bound", (Recorder,), {"seen": seen})
    context = store.listener_context(reject_unknown=reject)
    gate = Gate(lambda: limit, set(), handshake_timeout=5)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        TLSListener(context, gate, lambda alpn: protocol()), "127.0.0.1", 0
    )
    try:
        yield server.sockets[0].getsockname()[1], seen
    finally:
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.05)  # let closed transports finish


def handshake(port: int, ca: InternalCA, name: str | None) -> str:
    """The common name of the certificate served for ``name``; the chain is verified."""
    context = ssl.create_default_context(cafile=str(ca.root_path))
    context.check_hostname = False
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
        context.wrap_socket(sock, server_hostname=name) as tls,
    ):
        tls.recv(5)
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    return str(cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value)


def handshake_error(port: int, ca: InternalCA, name: str) -> ssl.SSLError:
    with pytest.raises(ssl.SSLError) as caught:
        handshake(port, ca, name)
    return caught.value


def failures(reason: str) -> float:
    return metrics.HANDSHAKE_FAILURES.value((reason,))


def test_unknown_sni_gets_the_default_certificate_by_default(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], store: CertStore, ca: InternalCA
) -> None:
    async def scenario() -> tuple[dict[str | None, str], list[str | None]]:
        async with listener(store, lambda: False) as (port, seen):
            names = ["a.test", "X.Apps.Test.", "other.test", None]
            served = {n: await asyncio.to_thread(handshake, port, ca, n) for n in names}
            return served, seen

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        served, seen = runner.run(scenario())
    assert served == {
        "a.test": "a.test",
        "X.Apps.Test.": "*.apps.test",
        "other.test": "a.test",
        None: "a.test",
    }
    assert seen == ["a.test", "x.apps.test", "other.test", None]  # normalized, for Host checks


def test_unknown_sni_is_refused_with_unrecognized_name_when_asked(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], store: CertStore, ca: InternalCA
) -> None:
    policy = {"reject": True}
    before = failures("unknown_sni")

    async def scenario() -> tuple[ssl.SSLError, dict[str | None, str], str, list[str | None]]:
        async with listener(store, lambda: policy["reject"]) as (port, seen):
            error = await asyncio.to_thread(handshake_error, port, ca, "other.test")
            known = ["a.test", "x.apps.test", None]  # no SNI: IP-address clients
            served = {n: await asyncio.to_thread(handshake, port, ca, n) for n in known}
            policy["reject"] = False  # what a reload does: the next handshake sees it
            after_reload = await asyncio.to_thread(handshake, port, ca, "other.test")
            return error, served, after_reload, seen

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        error, served, after_reload, seen = runner.run(scenario())
    assert error.reason == "TLSV1_UNRECOGNIZED_NAME", error  # the alert, not a bare close
    assert served == {"a.test": "a.test", "x.apps.test": "*.apps.test", None: "a.test"}
    assert after_reload == "a.test"
    assert seen == ["a.test", "x.apps.test", None, "other.test"]
    assert failures("unknown_sni") == before + 1


def test_host_is_compared_with_the_sni_name() -> None:
    for host in [b"a.test", b"A.Test", b"a.test:8443", b"a.test.", b"A.TEST.:443"]:
        assert sni_matches_host("a.test", host), host
    for host in [b"b.test", b"a.test.evil", b"xa.test", b"[::1]:443", b""]:
        assert not sni_matches_host("a.test", host), host


@needs_openssl
def test_openssl_s_client_sees_the_unrecognized_name_alert(
    store: CertStore, ca: InternalCA
) -> None:
    def s_client(port: int, *args: str) -> tuple[int, str]:
        command = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-brief"]
        command += ["-CAfile", str(ca.root_path), *args]
        done = subprocess.run(command, input=b"", capture_output=True, timeout=10, check=False)
        return done.returncode, (done.stdout + done.stderr).decode()

    async def scenario() -> dict[str, tuple[int, str]]:
        async with listener(store, lambda: True) as (port, _):
            cases = {
                "unknown": ["-servername", "nope.test"],
                "known": ["-servername", "a.test"],
                "none": ["-noservername"],
            }
            return {k: await asyncio.to_thread(s_client, port, *v) for k, v in cases.items()}

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        out = runner.run(scenario())
    assert out["unknown"][0] != 0
    assert "unrecognized name" in out["unknown"][1] and "alert number 112" in out["unknown"][1]
    assert out["known"][0] == 0 and "CN = a.test" in out["known"][1], out["known"][1]
    assert out["none"][0] == 0 and "CN = a.test" in out["none"][1], out["none"][1]


# -- a real proxy process ------------------------------------------------------------------

HANDSHAKE_TIMEOUT = 1.5


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def proxy(
    request: pytest.FixtureRequest, upstream: RawUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    directory = tmp_path_factory.mktemp(f"hardening-{request.param}")
    server = {"loop": request.param, "handshake_timeout": HANDSHAKE_TIMEOUT}
    sites: list[dict[str, object]] = [{"hosts": ["app.test"], "upstreams": [upstream.url]}]
    running = ProxyProcess.start(directory, sites, server=server)
    yield running
    assert running.stop() == 0, running.log()
    assert "Traceback" not in running.log(), running.log()


def get(host: str = "app.test") -> bytes:
    return f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()


def served(proxy: ProxyProcess) -> float:
    """Serve one normal request; returns how long it took."""
    started = time.monotonic()
    reply = https_request(proxy, "app.test", get())
    assert reply.startswith(b"HTTP/1.1 200 "), reply
    return time.monotonic() - started


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def client_hello(server_name: str = "app.test") -> bytes:
    """A real ClientHello, as the first bytes a TLS client sends."""
    bio_in, bio_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(bio_in, bio_out, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return bio_out.read()


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """What the server sends until it closes; fails if it has not closed within ``timeout``."""
    sock.settimeout(timeout)
    chunks = []
    with contextlib.suppress(ConnectionResetError):
        while data := sock.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


def connect(proxy: ProxyProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.https_port), timeout=5)


@needs_openssl
@pytest.mark.parametrize("version", ["-tls1", "-tls1_1"])
def test_tls_1_0_and_1_1_are_refused(proxy: ProxyProcess, version: str) -> None:
    command = ["openssl", "s_client", "-connect", f"127.0.0.1:{proxy.https_port}"]
    command += ["-servername", "app.test", "-cipher", "DEFAULT:@SECLEVEL=0"]
    old = subprocess.run(
        [*command, version], input=b"", capture_output=True, timeout=10, check=False
    )
    assert old.returncode != 0
    assert b"alert protocol version" in old.stderr, old.stderr  # told why, not just cut
    modern = subprocess.run(
        [*command, "-tls1_2"], input=b"", capture_output=True, timeout=10, check=False
    )
    assert modern.returncode == 0, modern.stderr


def test_plain_http_to_the_tls_port_gets_400_and_is_never_forwarded(
    proxy: ProxyProcess, upstream: RawUpstream
) -> None:
    served(proxy)  # the pool may hold a connection now; count from here
    connections, requests = upstream.connections, len(upstream.requests)
    with connect(proxy) as sock:
        sock.sendall(get() + b"POST /x HTTP/1.1\r\nHost: app.test\r\nContent-Length: 0\r\n\r\n")
        reply = read_until_closed(sock, HANDSHAKE_TIMEOUT + 3)
    assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n"), reply
    assert b"HTTPS only" in reply
    time.sleep(0.2)
    assert (upstream.connections, len(upstream.requests)) == (connections, requests)


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"]
)
def test_tls_1_2_and_1_3_keep_alive_and_close_notify_both_ways(
    proxy: ProxyProcess, upstream: RawUpstream, version: ssl.TLSVersion
) -> None:
    context = proxy.client_context()
    context.minimum_version = context.maximum_version = version
    body = b"raw upstream %d" % upstream.port

    def exchange(tls: ssl.SSLSocket, close: bool = False) -> bytes:
        tls.sendall(
            b"GET / HTTP/1.1\r\nHost: app.test\r\n%s\r\n" % (b"Connection: close\r\n" * close)
        )
        reply = b""
        while not reply.endswith(body):
            chunk = tls.recv(65536)
            assert chunk, reply
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 200 "), reply
        return reply

    # The proxy closes (`Connection: close`): the response, then its close_notify. Without
    # the close_notify a client that refuses ragged EOFs gets SSLEOFError instead of b"".
    with (
        connect(proxy) as raw,
        context.wrap_socket(raw, server_hostname="app.test", suppress_ragged_eofs=False) as tls,
    ):
        assert tls.version() == version.name.replace("_", ".")
        for _ in range(2):  # one connection, three requests
            exchange(tls)
        exchange(tls, close=True)
        assert tls.recv(100) == b""
    # The client closes: its close_notify is answered with ours.
    with connect(proxy) as raw, context.wrap_socket(raw, server_hostname="app.test") as tls:
        exchange(tls)
        plain = tls.unwrap()
        plain.settimeout(5)
        assert plain.recv(100) == b""


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x16\x03\x01\x00\x05hello",  # a handshake record that is no ClientHello
        b"\x16\x03\x01\xff\xff" + b"\x00" * 64,  # a record longer than the limit
        b"\x00" * 512,
        os.urandom(2048),
        client_hello()[:5] + b"\x01" + os.urandom(300),  # a ClientHello gone bad
    ],
    ids=["short-hello", "oversized-record", "zeros", "random", "corrupt-hello"],
)
def test_garbage_instead_of_a_client_hello_is_closed(
    proxy: ProxyProcess, upstream: RawUpstream, garbage: bytes
) -> None:
    requests = len(upstream.requests)
    with connect(proxy) as sock:
        started = time.monotonic()
        sock.sendall(garbage)
        read_until_closed(sock, HANDSHAKE_TIMEOUT + 3)
    assert time.monotonic() - started < HANDSHAKE_TIMEOUT + 2
    assert len(upstream.requests) == requests
    served(proxy)


def test_stalled_and_vanishing_handshakes_are_closed_while_others_are_served(
    proxy: ProxyProcess,
) -> None:
    pid = proxy.process.pid
    served(proxy)
    baseline = open_fds(pid)
    hello = client_hello()
    stalled: list[socket.socket] = []
    try:
        for index in range(40):  # silent, or half a ClientHello then silence
            sock = connect(proxy)
            stalled.append(sock)
            if index % 2:
                sock.sendall(hello[: len(hello) // 2])
        for _ in range(10):  # half a ClientHello, then the client is gone
            with connect(proxy) as sock:
                sock.sendall(hello[: len(hello) // 2])
        for _ in range(10):  # gone with a reset
            with connect(proxy) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        opened = time.monotonic()
        wait_until(lambda: open_fds(pid) >= baseline + 30, timeout=5, interval=0.02)
        assert served(proxy) < 1.0  # in well under a second, with 40 handshakes hanging
        deadline = opened + HANDSHAKE_TIMEOUT + 3
        for sock in stalled:  # each is closed by the proxy after the handshake timeout
            assert read_until_closed(sock, max(0.1, deadline - time.monotonic())) == b""
        assert time.monotonic() - opened < HANDSHAKE_TIMEOUT + 2
    finally:
        for sock in stalled:
            sock.close()
    wait_until(lambda: open_fds(pid) <= baseline, timeout=10, interval=0.1)
    served(proxy)


def test_a_client_that_completes_the_handshake_and_leaves_leaks_nothing(
    proxy: ProxyProcess,
) -> None:
    pid = proxy.process.pid
    served(proxy)
    baseline = open_fds(pid)
    context = proxy.client_context()
    for _ in range(20):
        with connect(proxy) as sock, context.wrap_socket(sock, server_hostname="app.test"):
            pass  # handshake, then close without a request
    wait_until(lambda: open_fds(pid) <= baseline, timeout=10, interval=0.1)


# -- the connection limit --------------------------------------------------------------


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_connections_over_max_connections_are_closed_at_accept(
    tmp_path: Path, upstream: RawUpstream, loop: str
) -> None:
    limit = 4
    admin = free_port()
    server: dict[str, Any] = {
        "loop": loop,
        "max_connections": limit,
        "handshake_timeout": HANDSHAKE_TIMEOUT,
        "admin_listen": f"127.0.0.1:{admin}",
    }
    sites: list[dict[str, object]] = [{"hosts": ["app.test"], "upstreams": [upstream.url]}]
    proxy = ProxyProcess.start(tmp_path, sites, server=server)
    context = proxy.client_context()
    held: list[ssl.SSLSocket] = []
    refused = scrape(admin)[1].value("tlsproxy_connections_refused_total")
    try:
        # the start-up port probe is a connection too; once it is gone, the slots are free
        wait_until(lambda: open_connections(admin) == 0, timeout=HANDSHAKE_TIMEOUT + 3)
        for _ in range(limit):  # established and idle: they count
            held.append(context.wrap_socket(connect(proxy), server_hostname="app.test"))
        for _ in range(5):  # closed before any TLS byte: no ServerHello comes back
            with connect(proxy) as sock:
                sock.sendall(client_hello())
                assert read_until_closed(sock, 3) == b""
        assert open_connections(admin) == limit
        page = scrape(admin)[1]
        assert page.value("tlsproxy_connections_refused_total") == refused + 5
        held.pop().close()  # one leaves: the next one gets in
        wait_until(lambda: _served_quietly(proxy), timeout=5, interval=0.1)
        for tls in held:  # everyone already in is still served
            tls.sendall(get())
            assert read_until_closed(tls, 5).startswith(b"HTTP/1.1 200 ")
    finally:
        for tls in held:
            tls.close()
        assert proxy.stop() == 0, proxy.log()
    log = proxy.log()
    assert log.count("connection limit reached (max_connections = 4)") == 1, log  # rate-limited
    assert "Traceback" not in log, log


def open_connections(admin: int) -> float:
    return scrape(admin)[1].value("tlsproxy_open_connections")


def _served_quietly(proxy: ProxyProcess) -> bool:
    try:
        served(proxy)
    except (OSError, AssertionError):
        return False
    return True
