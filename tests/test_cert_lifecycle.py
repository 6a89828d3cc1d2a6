"""One certificate lifecycle: certificates managed by name at run time, and one loop.

Real handshakes on loopback against the certificate store, real leaves from the internal CA
(short-lived, so the schedule makes them due within seconds), a real ``Proxy`` on the
test's own event loop. No part of the lifecycle is replaced by a fake.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from datetime import timedelta
from pathlib import Path

import pytest
import trustme

from proxy import Address, Config, Proxy, ServerConfig, Site, TLSConfig, Upstream
from proxy.certs.internal_ca import InternalCA
from proxy.certs.manager import CertificateManager
from proxy.certs.sources import CertificateSources
from proxy.certs.store import CertStore
from proxy.config import ACMEConfig, DockerConfig
from proxy.tasks import spawn
from tests.support import ROOT
from tests.test_tls_certs import ahandshake, serial_of, tls_server

# A leaf from the internal CA is backdated by a minute: with 33 s to go, a third of its 93 s
# lifetime is left 2 s after it was issued. Renewal is due then.
SHORT = timedelta(seconds=33)


def site(*hosts: str) -> Site:
    return Site(hosts=hosts, upstreams=(Upstream("127.0.0.1", 9),))


async def test_a_name_added_at_run_time_is_served_and_a_removed_one_is_no_longer_served_or_renewed(
    tmp_path: Path,
) -> None:
    tls = TLSConfig(storage=str(tmp_path), issuer="internal")
    sources = CertificateSources(tls, lifetime=SHORT)
    store = CertStore()
    manager = CertificateManager(store, poll_interval=0.1)
    kept = sources.for_site(site("kept.test"))
    assert kept is not None
    await manager.update(add=[kept])
    ca = sources.ca
    assert isinstance(ca, InternalCA)
    stored = tmp_path / "certificates" / "internal"
    loop = spawn(manager.run(), name="certificate maintenance")
    try:
        async with tls_server(store) as port:
            with pytest.raises(ssl.SSLCertVerificationError):  # the default: kept.test's
                await ahandshake(port, ca, "added.test")

            added = sources.for_site(site("added.test"))
            assert added is not None
            await manager.update(add=[added])
            seen = await ahandshake(port, ca, "added.test")  # verified for its name
            assert seen.serial == serial_of((stored / "added.test" / "cert.pem").read_bytes())

            await manager.update(remove=[("added.test",)])
            with pytest.raises(ssl.SSLCertVerificationError):  # the default again
                await ahandshake(port, ca, "added.test")
            last = (stored / "added.test" / "cert.pem").read_bytes()

            # Both leaves fall due 2 s after they were issued; only the managed one is renewed.
            renewals = 0
            kept_serial = serial_of((stored / "kept.test" / "cert.pem").read_bytes())
            deadline = time.monotonic() + 10
            while renewals < 2:
                assert time.monotonic() < deadline, "kept.test was not renewed on schedule"
                await asyncio.sleep(0.1)
                serial = serial_of((stored / "kept.test" / "cert.pem").read_bytes())
                renewals += serial != kept_serial
                kept_serial = serial
            assert (await ahandshake(port, ca, "kept.test")).serial == kept_serial
            assert (stored / "added.test" / "cert.pem").read_bytes() == last, "renewed"
            assert manager.names() == [("kept.test",)]
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)


def _ours(task: asyncio.Task[object]) -> bool:
    """A task running code of the certificate packages (its outermost coroutine's)."""
    code = getattr(task.get_coro(), "cr_code", None)
    filename = getattr(code, "co_filename", "")
    return filename.startswith((str(ROOT / "proxy" / "certs"), str(ROOT / "acme_client")))


async def test_one_task_maintains_files_internal_leaves_and_acme_certificates(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Certificate files, a temporary certificate and an ACME order (to a CA that is
    down) are all kept by the one maintenance loop: no other task runs certificate code."""
    ca = trustme.CA()
    cert, key = tmp_path / "files.pem", tmp_path / "files.key"
    leaf = ca.issue_cert("files.test")
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    files = Site(hosts=("files.test",), upstreams=site().upstreams, cert=str(cert), key=str(key))
    config = Config(
        server=ServerConfig(
            https_listen=(Address("127.0.0.1", 0),), http_listen=(), admin_listen=None
        ),
        tls=TLSConfig(storage=str(tmp_path / "data")),
        acme=ACMEConfig(directory="https://127.0.0.1:9/directory", challenges=("tls-alpn-01",)),
        sites=(files, site("acme.test")),
    )
    with caplog.at_level(logging.INFO, logger="tlsproxy"):
        async with Proxy(config) as running:
            deadline = time.monotonic() + 10
            while "certificate order for acme.test failed" not in caplog.text:
                assert time.monotonic() < deadline, "no ACME order was attempted"
                await asyncio.sleep(0.05)
            newer = ca.issue_cert("files.test")
            key.write_bytes(newer.private_key_pem.bytes())
            cert.write_bytes(b"".join(blob.bytes() for blob in newer.cert_chain_pems))
            while "reloaded certificate from" not in caplog.text:
                assert time.monotonic() < deadline, "the replaced files were not read"
                await asyncio.sleep(0.05)
            tasks = [task for task in asyncio.all_tasks() if _ours(task)]
            assert [task.get_name() for task in tasks] == ["certificate maintenance"]
            assert running.cert_store.get("acme.test") is not None  # the stand-in


async def test_with_sites_only_from_container_labels_the_proxy_starts(tmp_path: Path) -> None:
    """No site has a certificate of its own yet: a temporary default certificate lets the
    listener start (the previous code refused to: no certificate installed)."""
    config = Config(
        server=ServerConfig(
            https_listen=(Address("127.0.0.1", 0),), http_listen=(), admin_listen=None
        ),
        tls=TLSConfig(storage=str(tmp_path), issuer="internal"),
        docker=DockerConfig(endpoint=f"unix://{tmp_path / 'no-engine.sock'}"),
        sites=(),
    )
    async with Proxy(config) as running:
        default = running.cert_store.default
        assert default is not None and default.names == ("default.invalid",)
        ca = InternalCA.load_or_create(tmp_path / "ca")
        seen = await ahandshake(running.port("https"), ca, None)
        assert seen.serial == int(default.serial, 16)
