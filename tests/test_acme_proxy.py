"""ACME end to end: real proxy processes, real Pebble, real HTTP-01 validation on loopback.

Pebble's validator connects to the proxy's port-80 listener (its ``httpPort`` is the
proxy's ``http_listen`` port) and every name resolves to 127.0.0.1 through the test DNS
server. Clients trust only Pebble's root, fetched after each Pebble start.
"""

from __future__ import annotations

import re
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.pebble import (
    LoopbackDNS,
    Pebble,
    acme_config,
    pebble_available,
    served_certificate,
    start_proxy,
)
from tests.support import ROOT, ProxyProcess, RawUpstream, free_port

pytestmark = pytest.mark.skipif(not pebble_available(), reason="pebble is not installed")

T = TypeVar("T")


@pytest.fixture
def pebbles(tmp_path: Path, dns: LoopbackDNS) -> Iterator[Callable[..., Pebble]]:
    started: list[Pebble] = []

    def make(http_port: int | None = None, **options: Any) -> Pebble:
        pebble = Pebble(
            tmp_path / f"pebble{len(started)}", http_port or free_port(), dns.port, **options
        )
        started.append(pebble)
        return pebble.start()

    yield make
    for pebble in started:
        pebble.stop()


@pytest.fixture
def proxies() -> Iterator[list[ProxyProcess]]:
    running: list[ProxyProcess] = []
    yield running
    for proxy in running:
        proxy.stop()


# -- helpers ------------------------------------------------------------------------------


def eventually(attempt: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            result = attempt()
        except OSError as exc:
            result, last = None, exc
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s (last error: {last!r})")
        time.sleep(0.1)


def serial(cert: dict[str, Any]) -> int:
    return int(str(cert["serialNumber"]), 16)


def tlsproxy(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def certs_rows(config: Path) -> list[list[str]]:
    result = tlsproxy("certs", "--config", str(config))
    assert result.returncode == 0, result.stderr
    return [re.split(r"\s{2,}", line.strip()) for line in result.stdout.splitlines()[1:]]


def wait_for_log(proxy: ProxyProcess, pattern: str, timeout: float = 15.0) -> str:
    return eventually(
        lambda: proxy.log() if re.search(pattern, proxy.log()) else None, timeout, repr(pattern)
    )


def acme_serial(proxy: ProxyProcess, host: str, roots: Path) -> int | None:
    """The serial served for ``host`` if it verifies against Pebble's root, else None."""
    try:
        return serial(served_certificate(proxy.https_port, host, roots))
    except ssl.SSLCertVerificationError:
        return None


def get(tls: ssl.SSLSocket, host: str) -> bytes:
    tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(65536)
        assert chunk, "connection closed"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: *(\d+)", head, re.IGNORECASE)[1])  # type: ignore[index]
    while len(body) < length:
        chunk = tls.recv(65536)
        assert chunk, "connection closed"
        body += chunk
    return head.split(b"\r\n")[0]


@dataclass
class Serving:
    """A proxy with one ACME site, once its first certificate is served."""

    roots: Path
    sites: list[dict[str, object]]
    config: Path
    https_port: int
    proxy: ProxyProcess
    first: int


def serve_first(
    tmp_path: Path, pebble: Pebble, proxies: list[ProxyProcess], upstream: RawUpstream, host: str
) -> Serving:
    roots = pebble.write_roots(tmp_path / "roots.pem")
    sites: list[dict[str, object]] = [{"hosts": [host], "upstreams": [upstream.url]}]
    config, https_port = acme_config(tmp_path / "proxy", pebble, sites)
    proxy = start_proxy(config, https_port, pebble.http_port)
    proxies.append(proxy)
    first = eventually(lambda: acme_serial(proxy, host, roots), 15, "first certificate")
    return Serving(roots, sites, config, https_port, proxy, first)


# -- tests --------------------------------------------------------------------------------


def test_first_issuance_then_restart_serves_the_stored_certificate(
    tmp_path: Path,
    pebbles: Callable[..., Pebble],
    proxies: list[ProxyProcess],
    upstream: RawUpstream,
) -> None:
    pebble = pebbles()
    roots = pebble.write_roots(tmp_path / "roots.pem")
    sites = [{"hosts": ["app.test", "www.app.test"], "upstreams": [upstream.url]}]
    config, https_port = acme_config(tmp_path / "proxy", pebble, sites)
    started = time.monotonic()
    proxy = start_proxy(config, https_port, pebble.http_port)
    proxies.append(proxy)

    first = eventually(lambda: acme_serial(proxy, "www.app.test", roots), 15, "ACME certificate")
    issued_after = time.monotonic() - started
    print(f"first certificate served {issued_after:.2f} s after the proxy process started")
    assert "temporary certificate from the internal CA" in proxy.log()
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            str(roots),
            "--resolve",
            f"app.test:{https_port}:127.0.0.1",
            f"https://app.test:{https_port}/",
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"raw upstream {upstream.port}"
    assert pebble.orders() == 1

    storage = tmp_path / "proxy" / "data"
    keys = list(storage.rglob("key.pem"))
    assert len(keys) == 2  # the account key and the certificate key
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key

    assert proxy.stop() == 0
    proxy = start_proxy(config, https_port, pebble.http_port)
    proxies.append(proxy)
    # served at once from storage: the very first handshake verifies
    assert acme_serial(proxy, "app.test", roots) == first
    time.sleep(1.0)  # give a (wrong) new order the time it would need
    assert pebble.orders() == 1
    assert "using the stored ACME certificate" in proxy.log()
    assert "temporary" not in proxy.log().split("using the stored ACME certificate")[-1]

    ((names, issuer, not_after, renewal, error),) = certs_rows(config)
    assert names == "app.test www.app.test"
    assert issuer == f"acme:127.0.0.1:{pebble.port}"
    assert datetime.fromisoformat(not_after) > datetime.now(UTC)
    assert datetime.now(UTC) < datetime.fromisoformat(renewal) < datetime.fromisoformat(not_after)
    assert error == "-"


def test_scheduled_renewal_under_load_keeps_connections_and_requests_working(
    tmp_path: Path,
    pebbles: Callable[..., Pebble],
    proxies: list[ProxyProcess],
    upstream: RawUpstream,
) -> None:
    validity = 30  # renewal due when 10 s remain: ~20 s after issuance
    pebble = pebbles(validity=validity)
    up = serve_first(tmp_path, pebble, proxies, upstream, "renew.test")
    roots, https_port, proxy, first = up.roots, up.https_port, up.proxy, up.first
    cert = served_certificate(https_port, "renew.test", roots)
    not_before = ssl.cert_time_to_seconds(str(cert["notBefore"]))
    not_after = ssl.cert_time_to_seconds(str(cert["notAfter"]))
    due = not_after - (not_after - not_before) / 3  # when a third of the lifetime remains

    context = ssl.create_default_context(cafile=str(roots))
    kept = context.wrap_socket(
        socket.create_connection(("127.0.0.1", https_port), timeout=10),
        server_hostname="renew.test",
    )
    assert get(kept, "renew.test") == b"HTTP/1.1 200 OK"

    failures: list[BaseException] = []
    served: set[int] = set()
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                with (
                    socket.create_connection(("127.0.0.1", https_port), timeout=10) as raw,
                    context.wrap_socket(raw, server_hostname="renew.test") as tls,
                ):
                    peer = tls.getpeercert()
                    assert peer is not None
                    served.add(serial(dict(peer)))
                    assert get(tls, "renew.test") == b"HTTP/1.1 200 OK"
            except BaseException as exc:  # every failure counts
                failures.append(exc)
            time.sleep(0.02)

    workers = [threading.Thread(target=load) for _ in range(3)]
    for worker in workers:
        worker.start()
    try:
        second = eventually(
            lambda: s if (s := acme_serial(proxy, "renew.test", roots)) != first else None,
            validity,
            "renewed certificate",
        )
        late = time.time() - due
        time.sleep(0.5)  # requests keep flowing after the swap
    finally:
        stop.set()
        for worker in workers:
            worker.join(15)
    print(f"renewal served {late:+.2f} s from its due time (validity {validity} s)")
    assert not failures, failures[:3]
    assert {first, second} <= served
    assert -1.0 <= late <= 3.0  # on time, to the second (plus the order and our polling)
    assert get(kept, "renew.test") == b"HTTP/1.1 200 OK"  # the old connection survived
    kept.close()
    assert pebble.orders() == 2
    assert re.search(r"ordering a certificate for renew.test .*\(renewal due since", proxy.log())


def test_renew_force_while_the_proxy_runs_is_served_within_ten_seconds(
    tmp_path: Path,
    pebbles: Callable[..., Pebble],
    proxies: list[ProxyProcess],
    upstream: RawUpstream,
) -> None:
    pebble = pebbles()
    up = serve_first(tmp_path, pebble, proxies, upstream, "force.test")
    roots, config, proxy, first = up.roots, up.config, up.proxy, up.first

    result = tlsproxy("renew", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "not due" in result.stdout
    assert pebble.orders() == 1

    result = tlsproxy("renew", "--config", str(config), "--force", "force.test")
    assert result.returncode == 0, result.stderr
    assert "in use (a running proxy?)" in result.stderr  # the proxy answered the CA
    new = int(re.search(r"serial ([0-9A-F]+)", result.stdout)[1], 16)  # type: ignore[index]
    renewed = time.monotonic()
    assert new != first
    eventually(
        lambda: True if acme_serial(proxy, "force.test", roots) == new else None,
        10,
        "the running proxy serving the renewed certificate",
    )
    print(f"running proxy served the new certificate {time.monotonic() - renewed:.1f} s later")
    assert pebble.orders() == 2


def test_renew_without_a_proxy_listens_itself_and_reports_the_cas_error(
    tmp_path: Path, pebbles: Callable[..., Pebble], upstream: RawUpstream
) -> None:
    pebble = pebbles()
    sites = [{"hosts": ["cli.test"], "upstreams": [upstream.url]}]
    config, _ = acme_config(tmp_path / "proxy", pebble, sites)
    result = tlsproxy("renew", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "answering HTTP-01 on 127.0.0.1" in result.stderr
    assert "cli.test: new certificate" in result.stdout

    # something else answers port 80 with the wrong key authorization
    wrong = WrongTokenServer(pebble.http_port)
    try:
        result = tlsproxy("renew", "--config", str(config), "--force")
    finally:
        wrong.close()
    assert result.returncode == 1
    assert "urn:ietf:params:acme:error:unauthorized" in result.stderr
    assert "cli.test" in result.stderr
    ((_names, _issuer, not_after, _renewal, error),) = certs_rows(config)
    assert "unauthorized" in error
    assert not_after != "-"  # the earlier certificate is still there


class WrongTokenServer:
    """Answers every HTTP request with 200 and a wrong key authorization."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_server(("127.0.0.1", port))
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    conn.recv(65536)
                    body = b"not-the-key-authorization"
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                        % (len(body), body)
                    )
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def test_validation_failure_logs_the_cas_error_keeps_the_temporary_certificate_and_retries(
    tmp_path: Path,
    pebbles: Callable[..., Pebble],
    proxies: list[ProxyProcess],
    upstream: RawUpstream,
) -> None:
    nowhere = free_port()  # Pebble validates here; nothing listens
    pebble = pebbles(http_port=nowhere)
    sites = [{"hosts": ["broken.test"], "upstreams": [upstream.url]}]
    config, https_port = acme_config(
        tmp_path / "proxy", pebble, sites, server={"http_listen": [f"127.0.0.1:{free_port()}"]}
    )
    proxy = start_proxy(config, https_port, free_port())
    proxies.append(proxy)
    log = wait_for_log(proxy, r"certificate order for broken.test failed")
    line = next(line for line in log.splitlines() if "order for broken.test failed" in line)
    assert "urn:ietf:params:acme:error:connection" in line
    assert f"broken.test:{nowhere}" in line  # the CA's detail names the URL it tried
    assert "no ACME certificate yet" in line
    retry = datetime.fromisoformat(line.rsplit("next attempt at ", 1)[1].strip())
    assert 30 < (retry - datetime.now(UTC)).total_seconds() < 90  # ~1 min, with jitter

    # handshakes still work, with the temporary certificate from the internal CA
    cert = served_certificate(https_port, "broken.test", tmp_path / "proxy/data/ca/root.pem")
    assert ("DNS", "broken.test") in cert["subjectAltName"]

    ((names, _issuer, not_after, renewal, error),) = certs_rows(config)
    assert names == "broken.test"
    assert not_after == "-"
    assert datetime.fromisoformat(renewal) == retry
    assert "urn:ietf:params:acme:error:connection" in error


def test_ca_down_at_renewal_keeps_the_old_certificate_and_retries_until_it_is_back(
    tmp_path: Path,
    pebbles: Callable[..., Pebble],
    proxies: list[ProxyProcess],
    upstream: RawUpstream,
) -> None:
    pebble = pebbles(validity=20)  # renewal due ~13 s after issuance
    up = serve_first(tmp_path, pebble, proxies, upstream, "down.test")
    roots, config, proxy, first = up.roots, up.config, up.proxy, up.first
    pebble.stop()

    log = wait_for_log(proxy, r"order for down.test failed \(attempt 1\)", timeout=20)
    line = next(line for line in log.splitlines() if "failed (attempt 1)" in line)
    assert "CA unreachable" in line
    assert f"127.0.0.1:{pebble.port}" in line
    assert "keeps serving" in line
    retry = datetime.fromisoformat(line.rsplit("next attempt at ", 1)[1].strip())
    assert -2 < (retry - datetime.now(UTC)).total_seconds() < 5  # scaled to a 20 s lifetime
    assert acme_serial(proxy, "down.test", roots) == first  # the old one keeps serving
    ((_names, _issuer, _not_after, _renewal, error),) = certs_rows(config)
    assert error.startswith("CA unreachable")

    wait_for_log(proxy, r"order for down.test failed \(attempt 2\)", timeout=10)
    pebble.start()  # a new CA instance: new roots, and it has forgotten our account
    roots = pebble.write_roots(tmp_path / "roots2.pem")
    second = eventually(lambda: acme_serial(proxy, "down.test", roots), 15, "renewed certificate")
    assert second != first
    assert "registering again" in proxy.log()
    ((_names, _issuer, _not_after, _renewal, error),) = certs_rows(config)
    assert error == "-"


def test_a_site_added_by_sighup_reload_gets_its_certificate(
    tmp_path: Path,
    pebbles: Callable[..., Pebble],
    proxies: list[ProxyProcess],
    upstream: RawUpstream,
) -> None:
    pebble = pebbles()
    up = serve_first(tmp_path, pebble, proxies, upstream, "one.test")
    roots, sites, https_port, proxy, first = up.roots, up.sites, up.https_port, up.proxy, up.first

    sites.append({"hosts": ["two.test"], "upstreams": [upstream.url]})
    acme_config(tmp_path / "proxy", pebble, sites, https_port=https_port)
    proxy.process.send_signal(signal.SIGHUP)
    eventually(lambda: acme_serial(proxy, "two.test", roots), 15, "the new site's certificate")
    assert acme_serial(proxy, "one.test", roots) == first  # untouched by the reload
    assert pebble.orders() == 2
