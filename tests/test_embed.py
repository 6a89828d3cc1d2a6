"""tlsproxy as a library: the public names, examples/embed.py, and a ``Proxy`` driven from a
test's own event loop (start, a verified request, reload, the ``cert_store`` hook, stop)."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import trustme

import proxy
from proxy import (
    Address,
    CertificateSink,
    CertStore,
    Config,
    ConfigError,
    Proxy,
    ServerConfig,
    Site,
    TLSConfig,
    Upstream,
)
from tests.support import ROOT, RawUpstream

# -- the public names ---------------------------------------------------------------------


def test_every_public_name_is_importable_and_documented() -> None:
    assert len(set(proxy.__all__)) == len(proxy.__all__)
    namespace: dict[str, object] = {}
    exec("from proxy import *", namespace)
    assert set(proxy.__all__) <= set(namespace)
    for name in proxy.__all__:
        doc = getattr(proxy, name).__doc__ or ""
        assert doc.strip(), f"{name} has no docstring"
        assert not doc.startswith(f"{name}("), f"{name} has only the generated dataclass doc"
    assert proxy.__doc__ and "async with Proxy(" in proxy.__doc__


def test_the_cert_store_is_a_certificate_sink() -> None:
    assert isinstance(CertStore(), CertificateSink)


# -- examples/embed.py --------------------------------------------------------------------


def test_the_embed_example_makes_one_verified_request_and_exits_0() -> None:
    result = subprocess.run(
        [sys.executable, "-W", "error", str(ROOT / "examples" / "embed.py")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    status, body = result.stdout.splitlines()
    assert status == "200"
    seen = json.loads(body)
    assert seen["message"] == "hello through tlsproxy"
    assert (seen["client"], seen["scheme"]) == ("127.0.0.1", "https")
    assert seen["url_for"].startswith("https://localhost:")
    assert result.stderr == "", "the example leaves warnings or errors behind"


# -- a Proxy on the test's loop -----------------------------------------------------------


@pytest.fixture
def upstream() -> Iterator[RawUpstream]:
    server = RawUpstream()
    yield server
    server.close()


def code_config(storage: Path, *sites: Site) -> Config:
    return Config(
        server=ServerConfig(
            https_listen=(Address("127.0.0.1", 0),), http_listen=(), admin_listen=None
        ),
        tls=TLSConfig(storage=str(storage), issuer="internal"),
        sites=sites,
    )


def site(host: str, upstream: RawUpstream) -> Site:
    return Site(hosts=(host,), upstreams=(Upstream("127.0.0.1", upstream.port),))


def fetch(port: int, host: str, context: ssl.SSLContext) -> tuple[bytes, int]:
    """GET / with SNI and Host ``host``: (the response, the served certificate's serial)."""
    request = f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        tls.sendall(request)
        chunks = []
        while data := tls.recv(65536):
            chunks.append(data)
        cert = tls.getpeercert()
        assert cert is not None
        return b"".join(chunks), int(str(cert["serialNumber"]), 16)


async def test_start_request_reload_and_stop_from_code(
    tmp_path: Path, upstream: RawUpstream
) -> None:
    first = code_config(tmp_path, site("a.localhost", upstream))
    async with Proxy(first) as running:
        port = running.port("https")
        assert port != 0
        assert [listener.kind for listener in running.listeners] == ["https"]
        context = ssl.create_default_context(cafile=str(tmp_path / "ca" / "root.pem"))
        reply, _ = await asyncio.to_thread(fetch, port, "a.localhost", context)
        assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(
            b"raw upstream %d" % upstream.port
        )

        with pytest.raises(ConfigError):  # a config that cannot run is refused, the old stays
            await running.reload(replace(first, sites=()))
        assert running.config is first

        await running.reload(
            code_config(tmp_path, site("a.localhost", upstream), site("b.localhost", upstream))
        )
        reply, _ = await asyncio.to_thread(fetch, port, "b.localhost", context)
        assert reply.startswith(b"HTTP/1.1 200 ")

        async with asyncio.timeout(10), asyncio.TaskGroup() as group:
            serving = group.create_task(running.serve_forever())
            await running.stop()
            await running.stop()  # a second stop waits for the same one
        assert serving.done()
    with pytest.raises(OSError):
        await asyncio.to_thread(fetch, port, "a.localhost", context)


async def test_two_reloads_at_once_apply_one_after_the_other(
    tmp_path: Path, upstream: RawUpstream
) -> None:
    """Two SIGHUPs in a row (or two tasks): the second reload diffs against the first's
    result, so the admin listener moves once and nothing is bound twice."""
    first = code_config(tmp_path, site("a.localhost", upstream))
    first = replace(first, server=replace(first.server, admin_listen=Address("127.0.0.1", 0)))
    async with Proxy(first) as running:
        old = running.port("admin")
        moved = replace(
            first,
            server=replace(first.server, admin_listen=Address("127.0.0.2", 0)),
            sites=(*first.sites, site("b.localhost", upstream)),  # a leaf to issue: a pause
        )
        async with asyncio.timeout(20):
            await asyncio.gather(running.reload(moved), running.reload(moved))
        assert [listener.kind for listener in running.listeners] == ["https", "admin"]
        host, port = running.listeners[1].bound
        assert host == "127.0.0.2"
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n")
        assert (await reader.readline()).startswith(b"HTTP/1.1 200 ")
        writer.close()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", old)


async def test_your_own_cert_store_serves_what_you_install(
    tmp_path: Path, upstream: RawUpstream
) -> None:
    store = CertStore()
    async with Proxy(code_config(tmp_path, site("a.localhost", upstream)), cert_store=store) as p:
        installed = store.get("a.localhost")
        assert installed is not None and installed.issuer == "internal"

        ca = trustme.CA()
        leaf = ca.issue_cert("a.localhost")
        chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
        await asyncio.to_thread(store.install, ["a.localhost"], chain, leaf.private_key_pem.bytes())
        context = ssl.create_default_context()
        ca.configure_trust(context)
        reply, serial = await asyncio.to_thread(fetch, p.port("https"), "a.localhost", context)
        assert reply.startswith(b"HTTP/1.1 200 ")
        entry = store.get("a.localhost")
        assert entry is not None and int(entry.serial, 16) == serial
