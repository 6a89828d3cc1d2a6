"""proxy/tls/clienthello.py on real ClientHellos (Python's OpenSSL client, TLS 1.2 and 1.3)."""

from __future__ import annotations

import ssl

import pytest

from proxy.tls import clienthello
from proxy.tls.clienthello import NEED_MORE, NOT_A_HELLO, ClientHello


def client_hello(
    server_name: str | None, alpn: list[str], version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3
) -> bytes:
    """The bytes a real client sends first."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.maximum_version = version
    if alpn:
        context.set_alpn_protocols(alpn)
    outgoing = ssl.MemoryBIO()
    client = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_server_name_and_alpn_of_a_real_client_hello(version: ssl.TLSVersion) -> None:
    data = client_hello("App.Example.test", ["acme-tls/1", "http/1.1"], version)
    assert clienthello.parse(data) == ClientHello("app.example.test", (b"acme-tls/1", b"http/1.1"))
    assert clienthello.complete_in_first_record(data)
    assert clienthello.parse(client_hello(None, [])) == ClientHello(None, ())


def test_an_incomplete_hello_asks_for_more_at_every_cut() -> None:
    data = client_hello("a.test", ["http/1.1"])
    for cut in range(len(data)):
        assert clienthello.parse(data[:cut]) == NEED_MORE, cut
    assert not clienthello.complete_in_first_record(data[:-1])


def test_a_hello_split_over_two_records_is_read_whole() -> None:
    data = client_hello("split.test", ["acme-tls/1"])
    message = data[5:]
    head, tail = message[:40], message[40:]
    records = b"".join(data[:3] + len(part).to_bytes(2, "big") + part for part in (head, tail))
    assert clienthello.parse(records) == ClientHello("split.test", (b"acme-tls/1",))
    assert clienthello.parse(records[:-1]) == NEED_MORE


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n",
        b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",  # a ServerHello, not a ClientHello
        b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\xff",  # a ClientHello too short to hold fields
    ],
)
def test_what_is_not_a_client_hello_is_left_to_openssl(data: bytes) -> None:
    assert clienthello.parse(data) == NOT_A_HELLO
