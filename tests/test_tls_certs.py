"""Certificates end to end: real TLS handshakes on loopback against the CertStore's listener.

The server runs on both the default asyncio loop and uvloop (each test that needs a loop is
parametrized through the ``run`` fixture); clients are blocking ``ssl`` sockets in a thread,
so they exercise the server and not the loop under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import ssl
import stat
import subprocess
import time
import warnings
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import pytest
import trustme
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from acme_client.interfaces import CertificateSink
from acme_client.schedule import renewal_due
from proxy.certs.acme_sites import ACMESource
from proxy.certs.files import FileSource
from proxy.certs.internal import TEMPORARY_SOURCE, InternalSource
from proxy.certs.internal_ca import InternalCA
from proxy.certs.manager import CertificateManager
from proxy.certs.pemfiles import CERT_MODE, KEY_MODE, write_atomic
from proxy.certs.protocol import CertificateError
from proxy.certs.sources import CertificateSources, describe_certificates
from proxy.certs.store import CertEntry, CertStore, make_entry, safe_name
from proxy.config import ACMEConfig, Site, TLSConfig, Upstream
from proxy.tasks import spawn

T = TypeVar("T")
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


class Run(Protocol):
    def __call__(self, coro: Coroutine[Any, Any, T], /) -> T: ...


@pytest.fixture(params=list(LOOPS))
def run(request: pytest.FixtureRequest) -> Run:
    """Run a coroutine to completion on a fresh loop of the parametrized kind."""
    factory = LOOPS[request.param]

    def run(coro: Coroutine[Any, Any, T], /) -> T:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(coro)

    return run


@pytest.fixture
def ca(tmp_path: Path) -> InternalCA:
    return InternalCA.load_or_create(tmp_path / "ca")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- a server and a client ---------------------------------------------------------------


OPEN: set[asyncio.Transport] = set()  # server-side transports, closed when a server stops


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        OPEN.add(self.transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        OPEN.discard(self.transport)


@contextlib.asynccontextmanager
async def tls_server(store: CertStore) -> AsyncIterator[int]:
    """Listen on a loopback port with the store's listener context; yields the port."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, "127.0.0.1", 0, ssl=store.listener_context())
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for transport in list(OPEN):
            transport.close()
        await server.wait_closed()
        await asyncio.sleep(0)  # let closed transports run connection_lost


@dataclass(frozen=True)
class Seen:
    """What a client saw in a handshake."""

    serial: int
    common_name: str
    alpn: str | None
    version: str | None
    certificate: x509.Certificate


def client_context(ca: InternalCA, server_name: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca.root_path))
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    if server_name is None or server_name.endswith(".unknown"):
        ctx.check_hostname = False  # the chain is still verified
    return ctx


def connect(port: int, ca: InternalCA, server_name: str | None) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        return client_context(ca, server_name).wrap_socket(sock, server_hostname=server_name)
    except BaseException:
        sock.close()
        raise


def seen(tls: ssl.SSLSocket) -> Seen:
    der = tls.getpeercert(binary_form=True)
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    return Seen(cert.serial_number, str(cn), tls.selected_alpn_protocol(), tls.version(), cert)


def handshake(port: int, ca: InternalCA, server_name: str | None) -> Seen:
    with connect(port, ca, server_name) as tls:
        return seen(tls)


async def ahandshake(port: int, ca: InternalCA, server_name: str | None) -> Seen:
    return await asyncio.to_thread(handshake, port, ca, server_name)


def serial_of(chain_pem: bytes) -> int:
    return x509.load_pem_x509_certificate(chain_pem).serial_number


# -- handshakes --------------------------------------------------------------------------


def test_sni_picks_each_names_certificate(run: Run, ca: InternalCA) -> None:
    store = CertStore()
    a, b = ca.issue(["a.test"]), ca.issue(["b.test", "127.0.0.1"])
    store.install(["a.test"], *a, issuer="internal")
    store.install(["B.test."], *b, issuer="internal")

    async def scenario() -> tuple[Seen, Seen, Seen]:
        async with tls_server(store) as port:
            first = await ahandshake(port, ca, "a.test"), await ahandshake(port, ca, "b.test")
            store.set_alpn(["http/1.1"])  # http2 = false, on a live listener (a reload)
            return *first, await ahandshake(port, ca, "b.test")

    seen_a, seen_b, http11 = run(scenario())
    assert (seen_a.serial, seen_b.serial) == (serial_of(a[0]), serial_of(b[0]))
    assert http11.alpn == "http/1.1"
    for s in (seen_a, seen_b):
        assert s.alpn == "h2"  # the switched context's ALPN agrees with the listener's
        assert s.version == "TLSv1.3"
        key = s.certificate.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        assert key.curve.name == "secp256r1"


def test_wildcard_matches_one_label_and_others_get_default(run: Run, ca: InternalCA) -> None:
    store = CertStore()
    default, wild = ca.issue(["default.test"]), ca.issue(["*.w.test"])
    store.install(["default.test"], *default)
    store.install(["*.w.test"], *wild)
    names = ["x.w.test", "a.b.w.test.unknown", "w.test.unknown", "nobody.unknown", None]

    async def scenario() -> list[int]:
        async with tls_server(store) as port:
            return [(await ahandshake(port, ca, name)).serial for name in names]

    # ".unknown" names are sent as SNI but not checked against the certificate by the client
    assert store.lookup("a.b.w.test") is store.lookup(None) is store.lookup("w.test")
    assert run(scenario()) == [serial_of(wild[0])] + [serial_of(default[0])] * 4


def test_chain_with_an_intermediate_is_served_whole(run: Run) -> None:
    root = trustme.CA()
    leaf = root.create_child_ca().issue_cert("i.test")
    chain_pem = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)  # leaf, intermediate
    store = CertStore()
    store.install(["i.test"], chain_pem, leaf.private_key_pem.bytes(), issuer="file")

    def client(port: int) -> str | None:
        ctx = ssl.create_default_context()
        root.configure_trust(ctx)  # trusts the root only: the intermediate must come from us
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
            ctx.wrap_socket(sock, server_hostname="i.test") as tls,
        ):
            return tls.version()

    async def scenario() -> str | None:
        async with tls_server(store) as port:
            return await asyncio.to_thread(client, port)

    assert run(scenario()) == "TLSv1.3"


def test_tls_1_1_client_is_refused(run: Run, ca: InternalCA) -> None:
    store = CertStore()
    store.install(["a.test"], *ca.issue(["a.test"]))

    def client(port: int, maximum: ssl.TLSVersion) -> str | None:
        ctx = client_context(ca, "a.test")
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # so it is the server that says no
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = maximum
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
            ctx.wrap_socket(sock, server_hostname="a.test") as tls,
        ):
            return tls.version()

    async def scenario() -> str | None:
        async with tls_server(store) as port:
            with pytest.raises(ssl.SSLError):
                await asyncio.to_thread(client, port, ssl.TLSVersion.TLSv1_1)
            return await asyncio.to_thread(client, port, ssl.TLSVersion.TLSv1_2)

    assert run(scenario()) == "TLSv1.2"  # the same client, allowed TLS 1.2, gets in


def test_install_reaches_new_handshakes_and_open_connections_keep_working(
    run: Run, ca: InternalCA
) -> None:
    store = CertStore()
    old, new = ca.issue(["a.test"]), ca.issue(["a.test"])
    store.install(["a.test"], *old)

    def exchange(tls: ssl.SSLSocket, data: bytes) -> bytes:
        tls.sendall(data)
        return tls.recv(100)

    async def scenario() -> tuple[int, int, bytes]:
        async with tls_server(store) as port:
            tls = await asyncio.to_thread(connect, port, ca, "a.test")
            with tls:
                assert await asyncio.to_thread(exchange, tls, b"before") == b"before"
                store.install(["a.test"], *new)
                fresh = await ahandshake(port, ca, "a.test")
                echoed = await asyncio.to_thread(exchange, tls, b"after")
                return seen(tls).serial, fresh.serial, echoed

    kept, fresh, echoed = run(scenario())
    assert (kept, fresh, echoed) == (serial_of(old[0]), serial_of(new[0]), b"after")
    assert len(store.entries()) == 1


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl binary")
def test_openssl_s_client_servername_and_groups(ca: InternalCA) -> None:
    store = CertStore()
    store.install(["a.test"], *ca.issue(["a.test"]))
    store.install(["b.test"], *ca.issue(["b.test"]))

    def s_client(port: int, *args: str) -> tuple[int, str]:
        command = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}"]
        command += ["-CAfile", str(ca.root_path), "-verify_return_error", *args]
        done = subprocess.run(command, input=b"", capture_output=True, timeout=10, check=False)
        return done.returncode, (done.stdout + done.stderr).decode()

    async def scenario() -> dict[str, tuple[int, str]]:
        async with tls_server(store) as port:
            cases = {
                "b": ["-brief", "-servername", "b.test"],
                "none": ["-brief", "-noservername"],
                "chain": ["-showcerts", "-servername", "b.test"],
                "tls1.1": ["-servername", "a.test", "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"],
            }
            for group in ["X25519", "P-256", "P-384", "P-521", "X448"]:
                cases[group] = ["-brief", "-servername", "a.test", "-groups", group]  # TLS 1.3
            return {k: await asyncio.to_thread(s_client, port, *v) for k, v in cases.items()}

    out = asyncio.run(scenario())
    assert out["b"][0] == 0 and "CN = b.test" in out["b"][1]
    assert out["none"][0] == 0 and "CN = a.test" in out["none"][1]
    assert out["chain"][1].count("BEGIN CERTIFICATE") == 1  # the leaf; the client has the root
    assert "Verify return code: 0 (ok)" in out["chain"][1]
    assert "Server Temp Key: X25519" in out["X25519"][1]
    assert "Server Temp Key: ECDH, prime256v1" in out["P-256"][1]
    assert out["tls1.1"][0] != 0
    for accepted in ["X25519", "P-256", "P-384"]:
        assert out[accepted][0] == 0, out[accepted][1]
    for refused in ["P-521", "X448"]:
        assert out[refused][0] != 0, out[refused][1]


# -- the store without sockets -----------------------------------------------------------


def test_store_lookup_default_and_remove(ca: InternalCA) -> None:
    store = CertStore()
    assert isinstance(store, CertificateSink)
    with pytest.raises(LookupError, match="no certificate installed"):
        store.listener_context()
    with pytest.raises(LookupError):
        store.lookup("a.test")
    store.install(["a.test", "www.a.test"], *ca.issue(["a.test", "www.a.test"]))
    store.install(["*.b.test"], *ca.issue(["*.b.test"]), issuer="internal", source="internal CA")
    a, b = store.get("a.test"), store.get("*.b.test")
    assert a is not None and b is not None
    assert store.lookup("WWW.A.TEST.") is a.context
    assert store.lookup("x.b.test") is b.context
    assert store.lookup(None) is a.context  # first installed
    store.set_default("*.b.test")
    assert store.lookup("unknown.test") is b.context
    # a re-issue for part of an entry's names takes over those names only
    store.install(["www.a.test"], *ca.issue(["www.a.test"]))
    assert store.lookup("a.test") is a.context
    assert store.lookup("www.a.test") is not a.context
    assert len(store.entries()) == 3
    store.remove(["*.b.test"])  # the default is no longer served
    assert store.lookup("x.b.test") is a.context  # falls back to the oldest remaining entry
    store.remove(["a.test", "www.a.test"])
    assert store.entries() == []
    with pytest.raises(LookupError):
        store.lookup(None)
    chain_pem, key_pem = ca.issue(["c.test"])
    built = make_entry(["c.test"], chain_pem, key_pem, issuer="internal", source="internal CA")
    assert store.install_entry(built) is built is store.default
    assert built.not_before < datetime.now(UTC) < built.not_after
    assert built.serial == f"{serial_of(chain_pem):X}"


def test_storage_directory_names_are_safe() -> None:
    assert safe_name("*.App.test.") == "wildcard_.app.test"
    assert safe_name("::1") == "--1"
    assert safe_name("../x") == "_x"


# -- the internal CA ---------------------------------------------------------------------


def test_internal_ca_root_is_created_once_and_private(tmp_path: Path) -> None:
    directory = tmp_path / "storage" / "ca"
    first = InternalCA.load_or_create(directory)
    again = InternalCA.load_or_create(directory)
    assert first.root_pem == again.root_pem == (directory / "root.pem").read_bytes()
    assert first.root_path == directory / "root.pem"
    assert mode(directory) == 0o700
    assert mode(directory / "root.key") == KEY_MODE
    assert mode(directory / "root.pem") == CERT_MODE
    root = first.certificate
    cn = root.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    assert str(cn).startswith("tlsproxy Local Root CA - ")
    constraints = root.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0


def test_internal_leaf_is_short_lived_and_chains_to_the_root(ca: InternalCA) -> None:
    chain_pem, key_pem = ca.issue(["app.test", "*.app.test", "127.0.0.1", "::1"])
    leaf, root = x509.load_pem_x509_certificates(chain_pem)
    assert root == ca.certificate
    assert ca.issued(leaf)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["app.test", "*.app.test"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    lifespan = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert timedelta(days=7) <= lifespan < timedelta(days=8)
    assert leaf.not_valid_before_utc < datetime.now(UTC) - timedelta(seconds=30)
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    with pytest.raises(ValueError):
        ca.issue(["app.test"], timedelta(days=366))
    assert b"PRIVATE KEY" in key_pem


def manage(sites: list[Site], tls: TLSConfig, store: CertStore | None = None) -> CertificateManager:
    """A manager serving ``sites`` into ``store`` (what a proxy does at start), no loop."""
    manager = CertificateManager(store or CertStore())
    asyncio.run(manager.replace_all(CertificateSources(tls).for_sites(sites)))
    return manager


def due(entry: CertEntry) -> datetime:
    return renewal_due(entry.not_before, entry.not_after)


def test_internal_certificates_are_stored_reused_and_renewed(tmp_path: Path) -> None:
    tls = TLSConfig(storage=str(tmp_path), issuer="internal")
    sites = [Site(hosts=("*.app.test", "app.test"), upstreams=())]
    store = CertStore()
    manager = manage(sites, tls, store)
    leaf_dir = tmp_path / "certificates" / "internal" / "wildcard_.app.test"
    assert mode(leaf_dir / "key.pem") == KEY_MODE
    assert mode(leaf_dir / "cert.pem") == CERT_MODE
    assert mode(tmp_path / "ca" / "root.key") == KEY_MODE
    first = store.get("app.test")
    assert first is not None and first.issuer == "internal"
    assert store.lookup("x.app.test") is first.context

    (row,) = describe_certificates(sites, tls)  # the `tlsproxy certs` table, offline
    assert (row.names, row.issuer, row.last_error) == (("*.app.test", "app.test"), "internal", None)
    assert row.not_after == first.not_after.isoformat(timespec="seconds")
    assert row.next_renewal == due(first).isoformat(timespec="seconds")

    restarted = CertStore()  # a restart reuses the stored leaf: no churn
    manage(sites, tls, restarted)
    reused = restarted.get("app.test")
    assert reused is not None and reused.serial == first.serial

    source = manager.source(sites[0].hosts)
    assert isinstance(source, InternalSource)
    assert source.due(datetime.now(UTC)) == due(first)  # the schedule's answer
    renewed = source.renew(due(first) + timedelta(seconds=1))
    assert renewed is not None and renewed.serial != first.serial
    assert serial_of((leaf_dir / "cert.pem").read_bytes()) == int(renewed.serial, 16)
    assert source.due(datetime.now(UTC)) == due(renewed)

    other = [Site(hosts=("other.test",), upstreams=())]  # SIGHUP, new hosts
    asyncio.run(manager.replace_all(CertificateSources(tls).for_sites(other)))
    assert store.get("app.test") is None
    assert [e.names for e in store.entries()] == [("other.test",)]
    assert manager.names() == [("other.test",)]


# -- certificate files -------------------------------------------------------------------


def test_file_certificate_errors_name_site_and_file(tmp_path: Path, ca: InternalCA) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    site = Site(hosts=("f.test",), upstreams=(), cert=str(cert), key=str(key))
    tls = TLSConfig(storage=str(tmp_path))
    with pytest.raises(CertificateError, match=r"site f\.test: cannot read .*cert\.pem"):
        manage([site], tls)
    (row,) = describe_certificates([site], tls)
    assert row.issuer == "file" and row.last_error is not None and "cert.pem" in row.last_error
    chain_pem, _ = ca.issue(["f.test"])
    cert.write_bytes(chain_pem)
    key.write_bytes(ca.issue(["f.test"])[1])
    store = CertStore()
    with pytest.raises(CertificateError, match=r"key\.pem is not the key of the certificate"):
        manage([site], tls, store)
    assert store.entries() == []  # nothing served from a source that failed to load


def test_file_watcher_swaps_certificates_and_ignores_a_mismatched_pair(
    run: Run, ca: InternalCA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    pairs = [ca.issue(["f.test"]) for _ in range(3)]

    def write(chain_pem: bytes | None, key_pem: bytes | None) -> None:
        if key_pem is not None:
            write_atomic(key, key_pem, KEY_MODE)
        if chain_pem is not None:
            write_atomic(cert, chain_pem, CERT_MODE)

    write(*pairs[0])
    site = Site(hosts=("f.test",), upstreams=(), cert=str(cert), key=str(key))
    store = CertStore()
    manager = CertificateManager(store, poll_interval=0.05)

    async def serial_becomes(port: int, expected: int, within: float = 5.0) -> float:
        start = time.monotonic()
        while (await ahandshake(port, ca, "f.test")).serial != expected:
            assert time.monotonic() - start < within, "the new certificate was not served"
            await asyncio.sleep(0.05)
        return time.monotonic() - start

    async def scenario() -> None:
        await manager.replace_all([FileSource(site)])
        entry = store.get("f.test")
        assert entry is not None and (entry.issuer, entry.source) == ("file", str(cert))
        maintenance = spawn(manager.run(), name="certificate maintenance")
        try:
            async with tls_server(store) as port:
                await serial_becomes(port, serial_of(pairs[0][0]), within=0)
                write(*pairs[1])
                assert await serial_becomes(port, serial_of(pairs[1][0])) < 5
                caplog.clear()  # the swap above may have caught a half-written pair
                with caplog.at_level(logging.WARNING, logger="tlsproxy.certs"):
                    write(pairs[2][0], None)  # new certificate, old key: a broken pair
                    await asyncio.sleep(0.5)  # ten polls
                    assert (await ahandshake(port, ca, "f.test")).serial == serial_of(pairs[1][0])
                    write(None, pairs[2][1])  # the key arrives: the pair is whole again
                    await serial_becomes(port, serial_of(pairs[2][0]))
        finally:
            maintenance.cancel()
            await asyncio.gather(maintenance, return_exceptions=True)

    run(scenario())
    warnings_logged = [r for r in caplog.records if r.name == "tlsproxy.certs"]
    assert any("is not the key of the certificate" in r.getMessage() for r in warnings_logged)
    assert sum("not the key" in r.getMessage() for r in warnings_logged) == 1  # logged once


def test_a_temporary_certificate_is_reissued_when_due_while_the_ca_is_down(
    tmp_path: Path,
) -> None:
    """An ACME site with no certificate yet serves a temporary one; a CA outage longer
    than its life must not leave it expired: the source's renewal re-issues it."""
    tls = TLSConfig(storage=str(tmp_path))
    acme = ACMEConfig(directory="https://127.0.0.1:9/directory")  # nothing listens there
    site = Site(hosts=("tmp.test",), upstreams=(Upstream("127.0.0.1", 9),))
    source = CertificateSources(tls, acme).for_site(site)
    assert isinstance(source, ACMESource)
    first = source.load(None)
    assert first is not None and first.source == TEMPORARY_SOURCE
    assert source.renew(first.not_before + timedelta(hours=1)) is None  # the order fails
    later = first.not_after - timedelta(seconds=1)
    assert (due_at := source.due(later)) is not None and due_at <= later
    second = source.renew(later)  # the order fails again; the stand-in is due
    assert second is not None and second.source == TEMPORARY_SOURCE
    assert second.serial != first.serial
