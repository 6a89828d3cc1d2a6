"""End to end: a proxy process's life — drain on SIGTERM, reload on SIGHUP, certificate files
swapped under it, a restart with the same storage, and what it writes to its log.

Every test runs real processes on loopback and asserts what a user (or their client) sees.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import stat
import time
import tomllib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trustme
from cryptography import x509

from tests.support import (
    ProxyProcess,
    UvicornApp,
    body_json,
    curl,
    https_request,
    to_toml,
)

T = TypeVar("T")


@pytest.fixture(scope="module")
def app() -> Iterator[UvicornApp]:
    server = UvicornApp()
    yield server
    server.stop()


# -- helpers ------------------------------------------------------------------------------


def get(host: str, path: str = "/", *, close: bool = True) -> bytes:
    connection = "Connection: close\r\n" if close else ""
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{connection}\r\n".encode()


def read_response(tls: ssl.SSLSocket) -> tuple[int, dict[str, str], bytes]:
    """One complete response with a content-length body: (status, headers, body)."""
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        data = tls.recv(65536)
        assert data, f"connection closed before a complete response head: {buffer!r}"
        buffer += data
    head, _, body = buffer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers["content-length"])
    while len(body) < length:
        data = tls.recv(65536)
        assert data, f"connection closed after {len(body)} of {length} body bytes"
        body += data
    return int(status_line.split()[1]), headers, body[:length]


def eventually(attempt: Callable[[], T | None], timeout: float, what: str) -> T:
    """Call ``attempt`` until it returns something other than None (errors count as None)."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = attempt()
        except (OSError, ssl.SSLError) as exc:  # SSLError is an OSError; named for clarity
            result, last_error = None, exc
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s (last error: {last_error!r})")
        time.sleep(0.1)


def rewrite_config(proxy: ProxyProcess, change: Callable[[dict[str, Any]], None]) -> None:
    """Edit the running proxy's config file in place (the user's ``vi`` before ``kill -HUP``)."""
    config = tomllib.loads(proxy.config_path.read_text())
    change(config)
    proxy.config_path.write_text(to_toml(config))


def wait_for_log(proxy: ProxyProcess, text: str, timeout: float = 10.0) -> str:
    return eventually(lambda: proxy.log() if text in proxy.log() else None, timeout, repr(text))


def peer_certificate(port: int, server_name: str, context: ssl.SSLContext) -> dict[str, Any]:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        cert = tls.getpeercert()
        assert cert is not None
        return dict(cert)


def dns_names(cert: dict[str, Any]) -> set[str]:
    return {value for kind, value in cert["subjectAltName"] if kind == "DNS"}


# -- SIGTERM ------------------------------------------------------------------------------


def wait_until_refused(port: int, timeout: float) -> float:
    """Connect repeatedly until the port refuses; returns when that happened (monotonic)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                pass
        except ConnectionRefusedError:
            return time.monotonic()
        except OSError:
            pass
        time.sleep(0.02)
    raise AssertionError(f"port {port} still accepts connections {timeout} s after SIGTERM")


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_sigterm_drains_the_in_flight_request_and_refuses_new_ones(
    app: UvicornApp, tmp_path: Path, loop: str
) -> None:
    proxy = ProxyProcess.start(
        tmp_path, [{"hosts": ["drain.test"], "upstreams": [app.url]}], server={"loop": loop}
    )
    try:
        context = proxy.client_context()
        with (
            socket.create_connection(("127.0.0.1", proxy.https_port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="drain.test") as tls,
        ):
            tls.sendall(get("drain.test", "/slow?seconds=2", close=False))
            sent = time.monotonic()
            time.sleep(0.5)
            proxy.process.send_signal(signal.SIGTERM)

            refused = wait_until_refused(proxy.https_port, timeout=1.0)
            assert refused - sent < 1.9, "new connections were still accepted mid-request"
            assert proxy.process.poll() is None, "the proxy exited with a request in flight"

            status, headers, body = read_response(tls)
            answered = time.monotonic()
            assert status == 200
            assert json.loads(body) == {"slept": 2.0}
            assert answered - sent >= 1.9
            assert headers.get("connection") == "close"  # the client learns not to reuse it
            assert tls.recv(65536) == b"", "the drained connection was not closed"
        assert proxy.process.wait(timeout=10) == 0, proxy.log()
        log = proxy.log()
        assert "draining 1 in-flight request(s)" in log
        assert "stopped" in log
    finally:
        proxy.stop()


# -- SIGHUP -------------------------------------------------------------------------------


def test_sighup_adds_a_site_and_keeps_open_connections(app: UvicornApp, tmp_path: Path) -> None:
    proxy = ProxyProcess.start(tmp_path, [{"hosts": ["a.test"], "upstreams": [app.url]}])
    try:
        context = proxy.client_context()
        with (
            socket.create_connection(("127.0.0.1", proxy.https_port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="a.test") as old,
        ):
            old.sendall(get("a.test", close=False))
            status, _, body = read_response(old)
            assert status == 200 and json.loads(body)["host"] == "a.test"

            rewrite_config(
                proxy, lambda c: c["sites"].append({"hosts": ["b.test"], "upstreams": [app.url]})
            )
            proxy.process.send_signal(signal.SIGHUP)

            def b_answers() -> bytes | None:
                reply = https_request(proxy, "b.test", get("b.test"))  # verifies b.test's cert
                return reply if reply.startswith(b"HTTP/1.1 200 ") else None

            reply = eventually(b_answers, 10, "b.test answered after SIGHUP")
            assert body_json(reply)["host"] == "b.test"
            assert "b.test" in dns_names(peer_certificate(proxy.https_port, "b.test", context))
            assert "reloaded: 2 site(s)" in proxy.log()

            old.sendall(get("a.test", "/?second=1", close=False))
            status, _, body = read_response(old)
            assert status == 200
            assert json.loads(body)["url"].endswith("/?second=1")
        assert https_request(proxy, "a.test", get("a.test")).startswith(b"HTTP/1.1 200 ")
    finally:
        assert proxy.stop() == 0, proxy.log()


def test_sighup_with_a_broken_config_is_refused_and_old_sites_keep_working(
    app: UvicornApp, tmp_path: Path
) -> None:
    proxy = ProxyProcess.start(tmp_path, [{"hosts": ["a.test"], "upstreams": [app.url]}])
    try:
        rewrite_config(
            proxy,
            lambda c: c["sites"].append({"hosts": ["bad.test"], "upstreams": ["ftp://x"]}),
        )
        proxy.process.send_signal(signal.SIGHUP)
        log = wait_for_log(proxy, "reload refused")
        refused = next(line for line in log.splitlines() if "reload refused" in line)
        assert "sites[1].upstreams[0]" in refused
        assert proxy.process.poll() is None
        assert https_request(proxy, "a.test", get("a.test")).startswith(b"HTTP/1.1 200 ")
        assert https_request(proxy, "a.test", get("bad.test")).startswith(b"HTTP/1.1 421 ")
    finally:
        assert proxy.stop() == 0, proxy.log()


def test_sighup_with_missing_certificate_files_is_one_log_line(
    app: UvicornApp, tmp_path: Path
) -> None:
    proxy = ProxyProcess.start(tmp_path, [{"hosts": ["a.test"], "upstreams": [app.url]}])
    missing = tmp_path / "not-yet"
    try:
        site = {
            "hosts": ["files.test"],
            "upstreams": [app.url],
            "cert": str(missing / "fullchain.pem"),
            "key": str(missing / "privkey.pem"),
        }
        rewrite_config(proxy, lambda c: c["sites"].append(site))
        proxy.process.send_signal(signal.SIGHUP)
        log = wait_for_log(proxy, "reload refused")
        time.sleep(0.5)  # whatever else the reload would log
        log = proxy.log()
        assert "Traceback" not in log, log
        [refused] = [line for line in log.splitlines() if "reload" in line]
        assert "old configuration kept" in refused
        assert f"sites[1].cert: cannot read '{missing / 'fullchain.pem'}'" in refused
        assert "No such file or directory" in refused
        assert proxy.process.poll() is None
        assert https_request(proxy, "a.test", get("a.test")).startswith(b"HTTP/1.1 200 ")
    finally:
        assert proxy.stop() == 0, proxy.log()


# -- certificate files --------------------------------------------------------------------


def write_pair(leaf: trustme.LeafCert, cert: Path, key: Path) -> None:
    """Replace both files atomically (temp file + rename), as certbot and cert-manager do."""
    for path, data in ((key, leaf.private_key_pem.bytes()), (cert, chain_pem(leaf))):
        temporary = path.with_name(f".{path.name}.new")
        temporary.write_bytes(data)
        os.replace(temporary, path)


def chain_pem(leaf: trustme.LeafCert) -> bytes:
    return b"".join(blob.bytes() for blob in leaf.cert_chain_pems)


def serial(leaf: trustme.LeafCert) -> int:
    return x509.load_pem_x509_certificate(chain_pem(leaf)).serial_number


def test_replaced_certificate_files_are_served_without_restart(
    app: UvicornApp, tmp_path: Path
) -> None:
    ca = trustme.CA()
    first, second = ca.issue_cert("files.test"), ca.issue_cert("files.test")
    cert, key = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    write_pair(first, cert, key)
    site: dict[str, object] = {
        "hosts": ["files.test"],
        "upstreams": [app.url],
        "cert": str(cert),
        "key": str(key),
    }
    proxy = ProxyProcess.start(tmp_path, [site], issuer="internal")
    try:
        context = ssl.create_default_context()
        ca.configure_trust(context)

        def served_serial() -> int:
            return int(
                peer_certificate(proxy.https_port, "files.test", context)["serialNumber"], 16
            )

        assert served_serial() == serial(first)
        with (
            socket.create_connection(("127.0.0.1", proxy.https_port), timeout=15) as raw,
            context.wrap_socket(raw, server_hostname="files.test") as before,
        ):
            write_pair(second, cert, key)
            started = time.monotonic()
            eventually(
                lambda: True if served_serial() == serial(second) else None,
                10,
                "the new certificate served",
            )
            assert time.monotonic() - started <= 10
            old_cert = before.getpeercert()
            assert old_cert is not None and int(str(old_cert["serialNumber"]), 16) == serial(first)
            before.sendall(get("files.test"))
            status, _, body = read_response(before)
            assert status == 200 and json.loads(body)["host"] == "files.test"
        assert "reloaded certificate from" in proxy.log()
    finally:
        assert proxy.stop() == 0, proxy.log()


# -- internal CA --------------------------------------------------------------------------


def test_internal_ca_survives_a_restart(app: UvicornApp, tmp_path: Path) -> None:
    sites: list[dict[str, object]] = [{"hosts": ["persist.test"], "upstreams": [app.url]}]
    first = ProxyProcess.start(tmp_path, sites)
    try:
        assert json.loads(curl(first, "persist.test").stdout)["scheme"] == "https"
        root = first.root_ca.read_bytes()
        leaf = peer_certificate(first.https_port, "persist.test", first.client_context())
    finally:
        assert first.stop() == 0, first.log()

    second = ProxyProcess.start(tmp_path, sites)
    try:
        assert second.root_ca.read_bytes() == root
        ca_dir = second.root_ca.parent
        assert stat.S_IMODE((ca_dir / "root.key").stat().st_mode) == 0o600
        assert stat.S_IMODE(ca_dir.stat().st_mode) == 0o700
        result = curl(second, "persist.test", "/", "-w", "\n%{http_code}")
        body, _, code = result.stdout.rpartition("\n")
        assert code == "200" and json.loads(body)["host"] == f"persist.test:{second.https_port}"
        again = peer_certificate(second.https_port, "persist.test", second.client_context())
        assert again["serialNumber"] == leaf["serialNumber"]  # the stored leaf is reused too
        assert second.log().count("issued internal certificate") == 1
    finally:
        assert second.stop() == 0, second.log()


# -- the log ------------------------------------------------------------------------------


def access_lines(log: str) -> list[str]:
    """Access lines: JSON objects, or text lines with a quoted request line."""
    return [
        line
        for line in log.splitlines()
        if line.startswith("{") or re.match(r'^\S+ \S+ "[A-Z]+ \S+ HTTP/1\.[01]" ', line)
    ]


def test_json_access_log_has_one_object_per_request(app: UvicornApp, tmp_path: Path) -> None:
    proxy = ProxyProcess.start(
        tmp_path,
        [{"hosts": ["json.test"], "upstreams": [app.url]}],
        server={"access_log": "json"},
    )
    try:
        assert https_request(proxy, "json.test", get("json.test", "/status/204?n=1")).startswith(
            b"HTTP/1.1 204 "
        )
        assert https_request(proxy, "json.test", get("json.test", "/status/404?n=2")).startswith(
            b"HTTP/1.1 404 "
        )
    finally:
        assert proxy.stop() == 0, proxy.log()
    lines = access_lines(proxy.log())
    assert len(lines) == 2, lines
    records = [json.loads(line) for line in lines]
    assert all(isinstance(record, dict) for record in records)
    assert [(r["method"], r["target"], r["status"], r["site"]) for r in records] == [
        ("GET", "/status/204?n=1", 204, "json.test"),
        ("GET", "/status/404?n=2", 404, "json.test"),
    ]


def test_access_log_off_writes_no_access_lines(app: UvicornApp, tmp_path: Path) -> None:
    proxy = ProxyProcess.start(
        tmp_path,
        [{"hosts": ["quiet.test"], "upstreams": [app.url]}],
        server={"access_log": "off"},
    )
    try:
        for _ in range(3):
            reply = https_request(proxy, "quiet.test", get("quiet.test", "/?marker=quiet"))
            assert reply.startswith(b"HTTP/1.1 200 ")
    finally:
        assert proxy.stop() == 0, proxy.log()
    log = proxy.log()
    assert access_lines(log) == []
    assert "marker=quiet" not in log
    assert f"listening: https on 127.0.0.1:{proxy.https_port}" in log
    assert f"site quiet.test -> {app.url}" in log
    assert "certificate quiet.test: internal" in log


def test_access_log_turned_on_by_sighup_logs_requests(app: UvicornApp, tmp_path: Path) -> None:
    """SIGHUP reloads the whole config, access_log included (off -> text)."""
    proxy = ProxyProcess.start(
        tmp_path,
        [{"hosts": ["later.test"], "upstreams": [app.url]}],
        server={"access_log": "off"},
    )
    try:
        rewrite_config(proxy, lambda c: c["server"].update(access_log="text"))
        proxy.process.send_signal(signal.SIGHUP)
        wait_for_log(proxy, "reloaded: 1 site(s)")
        reply = https_request(proxy, "later.test", get("later.test", "/?marker=after-reload"))
        assert reply.startswith(b"HTTP/1.1 200 ")
    finally:
        assert proxy.stop() == 0, proxy.log()
    lines = [line for line in access_lines(proxy.log()) if "marker=after-reload" in line]
    assert len(lines) == 1, (
        'access_log = "text" after a SIGHUP from "off": no access line was written '
        "(proxy/cli.py serve() disabled the tlsproxy.access logger for good at start-up)"
    )


def test_startup_summary_names_sites_upstreams_and_certificates(
    app: UvicornApp, tmp_path: Path
) -> None:
    ca = trustme.CA()
    cert, key = tmp_path / "own.pem", tmp_path / "own.key"
    write_pair(ca.issue_cert("own.test"), cert, key)
    other = "http://127.0.0.1:9"  # never contacted: the summary only names it
    sites: list[dict[str, object]] = [
        {"hosts": ["one.test", "www.one.test"], "upstreams": [app.url]},
        {"hosts": ["two.test"], "upstreams": [app.url, other]},
        {"hosts": ["own.test"], "upstreams": [app.url], "cert": str(cert), "key": str(key)},
    ]
    proxy = ProxyProcess.start(tmp_path, sites)
    try:
        log = wait_for_log(proxy, "certificate own.test")
    finally:
        assert proxy.stop() == 0, proxy.log()
    assert f"site one.test www.one.test -> {app.url}" in log
    assert f"site two.test -> {app.url}, {other}" in log
    assert f"site own.test -> {app.url}" in log
    now = datetime.now(UTC)
    for names, issuer in (
        ("one.test www.one.test", "internal"),
        ("two.test", "internal"),
        ("own.test", "file"),
    ):
        line = next(
            (line for line in log.splitlines() if f"certificate {names}: {issuer}" in line), None
        )
        assert line is not None, f"no certificate line for {names} in:\n{log}"
        assert "valid until " in line
        until = datetime.fromisoformat(line.rsplit("valid until ", 1)[1].strip())
        assert until > now
