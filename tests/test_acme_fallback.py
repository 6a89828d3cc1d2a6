"""Issuer fallback end to end: two Pebble CAs in ``[[acme.issuers]]``, the first one down.

The order goes to the second CA; the certificate records which CA issued it (``tlsproxy
certs``); once the first CA is back, the next order (a forced renewal) goes to it again.
Real HTTP-01 validation on loopback, as in test_acme_proxy.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pebble import (
    LoopbackDNS,
    Pebble,
    acme_config,
    issuer,
    pebble_available,
    served_certificate,
    start_proxy,
)
from tests.support import ROOT, RawUpstream, free_port

pytestmark = pytest.mark.skipif(not pebble_available(), reason="pebble is not installed")


@pytest.fixture
def two_cas(tmp_path: Path, dns: LoopbackDNS) -> Iterator[tuple[Pebble, Pebble]]:
    http_port = free_port()  # both validate on the proxy's http_listen
    first = Pebble(tmp_path / "first", http_port, dns.port).start()
    second = Pebble(tmp_path / "second", http_port, dns.port).start()
    yield first, second
    first.stop()
    second.stop()


def tlsproxy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], cwd=ROOT, capture_output=True, text=True, timeout=90
    )


def issuer_column(config: Path) -> str:
    result = tlsproxy("certs", "--config", str(config))
    ((_names, issued_by, _not_after, _renewal, _error),) = [
        re.split(r"\s{2,}", line.strip()) for line in result.stdout.splitlines()[1:]
    ]
    return issued_by


def serial_for(port: int, host: str, roots: Path) -> int | None:
    try:
        return int(str(served_certificate(port, host, roots)["serialNumber"]), 16)
    except OSError:
        return None


def wait_for(port: int, host: str, roots: Path, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while (found := serial_for(port, host, roots)) is None:
        assert time.monotonic() < deadline, f"no certificate from {roots} within {timeout} s"
        time.sleep(0.1)
    return found


def test_the_second_ca_issues_while_the_first_is_down_and_the_first_again_once_back(
    tmp_path: Path, two_cas: tuple[Pebble, Pebble], upstream: RawUpstream
) -> None:
    first, second = two_cas
    first.stop()
    sites = [{"hosts": ["fallback.test"], "upstreams": [upstream.url]}]
    config, https_port = acme_config(
        tmp_path / "proxy", second, sites, acme={"issuers": [issuer(first), issuer(second)]}
    )
    assert tlsproxy("check", "--config", str(config)).returncode == 0
    proxy = start_proxy(config, https_port, second.http_port)
    try:
        from_second = wait_for(
            https_port, "fallback.test", second.write_roots(tmp_path / "2.pem"), 20
        )
        log = proxy.log()
        assert re.search(
            rf"order for fallback.test at {re.escape(first.url)} failed \(CA unreachable: .*\): "
            rf"trying the next CA, {re.escape(second.url)}",
            log,
        )
        assert "issued by Pebble Intermediate CA" in log and f"({second.url})" in log
        assert issuer_column(config) == f"acme:127.0.0.1:{second.port}"
        assert second.orders() == 1

        first.start()  # back: the next order starts again from the first CA
        result = tlsproxy("renew", "--config", str(config), "--force")
        assert result.returncode == 0, result.stderr
        roots = first.write_roots(tmp_path / "1.pem")
        renewed = wait_for(https_port, "fallback.test", roots, 10)  # the running proxy too
        assert renewed != from_second
        assert issuer_column(config) == f"acme:127.0.0.1:{first.port}"
        assert second.orders() == 1  # the second CA was not asked this time
    finally:
        proxy.stop()


def test_when_every_ca_fails_the_error_names_each(
    tmp_path: Path, two_cas: tuple[Pebble, Pebble], upstream: RawUpstream
) -> None:
    first, second = two_cas
    first.stop()
    second.stop()
    sites = [{"hosts": ["nowhere.test"], "upstreams": [upstream.url]}]
    config, _ = acme_config(
        tmp_path / "proxy", second, sites, acme={"issuers": [issuer(first), issuer(second)]}
    )
    result = tlsproxy("renew", "--config", str(config))
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("tlsproxy: renew: nowhere.test: every CA failed (2): ")
    assert f"{first.url}: CA unreachable" in line and f"{second.url}: CA unreachable" in line
