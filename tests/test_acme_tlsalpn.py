"""TLS-ALPN-01 (RFC 8737) on the HTTPS listener: real TLS clients, then Pebble with no port 80.

A ClientHello offering ``acme-tls/1`` for a name whose challenge is pending (its key
authorization in storage, where any process can find it) gets the challenge certificate and
nothing else; every other client gets the ordinary certificate.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from acme_client.storage import FileStorage
from acme_client.tlsalpn import ACME_IDENTIFIER, ALPNChallenges
from tests.pebble import (
    LoopbackDNS,
    Pebble,
    acme_config,
    pebble_available,
    served_certificate,
    start_proxy,
)
from tests.support import ProxyProcess, RawUpstream, free_port

pytestmark = pytest.mark.skipif(not pebble_available(), reason="pebble is not installed")


def handshake(
    port: int, name: str, alpn: list[str], read: bool = False
) -> tuple[x509.Certificate, str | None, bytes]:
    """Certificate, negotiated protocol, and (``read``) what the server sends next."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(alpn)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        protocol = tls.selected_alpn_protocol()
        after = b"<not read>"
        if read:
            try:
                after = tls.recv(100)
            except (ssl.SSLError, OSError):
                after = b"<error>"
        return x509.load_der_x509_certificate(der), protocol, after


def acme_identifier(cert: x509.Certificate) -> bytes | None:
    try:
        extension = cert.extensions.get_extension_for_oid(ACME_IDENTIFIER)
    except x509.ExtensionNotFound:
        return None
    assert extension.critical
    return extension.value.value  # type: ignore[attr-defined,no-any-return]


@pytest.fixture
def proxies() -> Iterator[list[ProxyProcess]]:
    running: list[ProxyProcess] = []
    yield running
    for proxy in running:
        proxy.stop()


def test_only_an_acme_tls_client_for_a_pending_name_gets_the_challenge_certificate(
    tmp_path: Path, upstream: RawUpstream, proxies: list[ProxyProcess], dns: LoopbackDNS
) -> None:
    pebble = Pebble(tmp_path / "pebble", free_port(), dns.port)  # never started: orders fail
    sites = [{"hosts": ["alpn.test", "other.test"], "upstreams": [upstream.url]}]
    config, https_port = acme_config(
        tmp_path / "proxy",
        pebble,
        sites,
        server={"http_listen": []},
        acme={"challenges": ["tls-alpn-01"]},
    )
    proxy = start_proxy(config, https_port, free_port())
    proxies.append(proxy)
    key_authorization = "token-1234567890abcdef.thumbprint"
    ALPNChallenges(FileStorage(tmp_path / "proxy" / "data")).put("alpn.test", key_authorization)

    cert, protocol, after = handshake(https_port, "alpn.test", ["acme-tls/1"], read=True)
    assert protocol == "acme-tls/1"
    digest = hashlib.sha256(key_authorization.encode()).digest()
    assert acme_identifier(cert) == b"\x04\x20" + digest
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["alpn.test"]
    assert after == b""  # closed after the handshake: no application behind it

    for name, alpn in (("alpn.test", ["http/1.1"]), ("other.test", ["acme-tls/1"])):
        cert, protocol, _ = handshake(https_port, name, alpn)
        assert acme_identifier(cert) is None, (name, alpn)  # the ordinary certificate
        assert protocol == ("http/1.1" if alpn == ["http/1.1"] else None)
    assert "answered a TLS-ALPN-01 validation for alpn.test" in proxy.log()


def test_a_certificate_over_tls_alpn_01_with_no_port_80_at_all(
    tmp_path: Path, upstream: RawUpstream, proxies: list[ProxyProcess], dns: LoopbackDNS
) -> None:
    https_port = free_port()
    pebble = Pebble(tmp_path / "pebble", free_port(), dns.port, tls_port=https_port).start()
    try:
        roots = pebble.write_roots(tmp_path / "roots.pem")
        sites = [{"hosts": ["tls.test", "www.tls.test"], "upstreams": [upstream.url]}]
        config, _ = acme_config(
            tmp_path / "proxy",
            pebble,
            sites,
            https_port=https_port,
            server={"http_listen": []},
            acme={"challenges": ["tls-alpn-01"]},
        )
        started = time.monotonic()
        proxy = start_proxy(config, https_port, free_port())
        proxies.append(proxy)
        deadline = started + 20
        while True:
            try:
                cert = served_certificate(https_port, "www.tls.test", roots)
                break
            except ssl.SSLCertVerificationError:
                assert time.monotonic() < deadline, proxy.log()[-3000:]
                time.sleep(0.1)
        print(f"TLS-ALPN-01 certificate served {time.monotonic() - started:.2f} s after start")
        assert ("DNS", "tls.test") in cert["subjectAltName"]
        assert proxy.log().count("answered a TLS-ALPN-01 validation for") >= 2
        assert "POST /chalZ/" in pebble.log()
        storage = tmp_path / "proxy" / "data" / "acme" / "challenges" / "tls-alpn-01"
        assert not list(storage.glob("*"))  # cleaned up
    finally:
        pebble.stop()
