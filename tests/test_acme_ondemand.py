"""On-demand TLS end to end: real Pebble, a real ask endpoint, real TLS clients.

A catch-all site (``hosts = ["*"]``, ``on_demand = true``): the first handshake for a name
the ask endpoint allows waits for its certificate and gets it; concurrent handshakes share
one order; a refused name gets an alert and is not asked again soon; a restart serves the
certificates from storage without new orders; ``tlsproxy certs`` lists them.
"""

from __future__ import annotations

import re
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.pebble import (
    LoopbackDNS,
    Pebble,
    acme_config,
    pebble_available,
    served_certificate,
    start_proxy,
)
from tests.support import ROOT, ProxyProcess, RawUpstream, free_port, wait_until

pytestmark = pytest.mark.skipif(not pebble_available(), reason="pebble is not installed")


class AskEndpoint:
    """``GET /allowed?domain=NAME``: 200 for the allowed names, 403 otherwise; counts asks."""

    def __init__(self, allowed: set[str]) -> None:
        self.allowed = allowed
        self.asked: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                name = parse_qs(urlsplit(self.path).query).get("domain", [""])[0]
                owner.asked.append(name)
                self.send_response(200 if name in owner.allowed else 403)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/allowed"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def ask() -> Iterator[AskEndpoint]:
    endpoint = AskEndpoint({"a.customer.test", "b.customer.test", "www.other.test"})
    yield endpoint
    endpoint.close()


def serial(port: int, name: str, roots: Path) -> int:
    return int(str(served_certificate(port, name, roots)["serialNumber"]), 16)


def test_on_demand_certificates_at_the_first_handshake_behind_the_ask_endpoint(
    tmp_path: Path, dns: LoopbackDNS, ask: AskEndpoint, upstream: RawUpstream
) -> None:
    pebble = Pebble(tmp_path / "pebble", free_port(), dns.port).start()
    proxy: ProxyProcess | None = None
    try:
        roots = pebble.write_roots(tmp_path / "roots.pem")
        sites = [{"hosts": ["*"], "upstreams": [upstream.url], "on_demand": True}]
        config, https_port = acme_config(
            tmp_path / "proxy", pebble, sites, tls={"on_demand": {"ask": ask.url}}
        )
        proxy = start_proxy(config, https_port, pebble.http_port)

        started = time.monotonic()
        first = serial(https_port, "a.customer.test", roots)  # the very first client
        print(f"first handshake with an on-demand certificate: {time.monotonic() - started:.2f} s")
        assert ask.asked == ["a.customer.test"]
        assert pebble.orders() == 1

        results: list[int | BaseException] = []

        def client() -> None:
            try:
                results.append(serial(https_port, "b.customer.test", roots))
            except BaseException as exc:
                results.append(exc)

        threads = [threading.Thread(target=client) for _ in range(5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert len(set(results)) == 1 and isinstance(results[0], int), results
        assert pebble.orders() == 2  # five handshakes, one order
        assert ask.asked.count("b.customer.test") == 1

        for _ in range(2):  # refused, then remembered: asked once
            with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
                serial(https_port, "evil.test", roots)
        assert ask.asked.count("evil.test") == 1
        with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
            serial(https_port, "nodots", roots)  # not a valid DNS name: not even asked
        assert "nodots" not in ask.asked
        assert pebble.orders() == 2

        rows = subprocess.run(
            [sys.executable, "-m", "proxy", "certs", "--config", str(config)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        assert re.search(r"^a\.customer\.test\s+acme:127\.0\.0\.1", rows, re.M), rows
        assert re.search(r"^b\.customer\.test\s+acme:127\.0\.0\.1", rows, re.M), rows

        assert proxy.stop() == 0
        asked = len(ask.asked)
        proxy = start_proxy(config, https_port, pebble.http_port)
        assert serial(https_port, "a.customer.test", roots) == first  # from storage
        assert pebble.orders() == 2 and len(ask.asked) == asked  # no order, no question
    finally:
        if proxy is not None:
            proxy.stop()
        pebble.stop()


def test_a_name_no_on_demand_site_covers_after_a_reload_is_no_longer_served_or_renewed(
    tmp_path: Path, dns: LoopbackDNS, ask: AskEndpoint, upstream: RawUpstream
) -> None:
    pebble = Pebble(tmp_path / "pebble", free_port(), dns.port).start()
    proxy: ProxyProcess | None = None
    try:
        roots = pebble.write_roots(tmp_path / "roots.pem")

        def configure(pattern: str) -> tuple[Path, int]:
            sites = [{"hosts": [pattern], "upstreams": [upstream.url], "on_demand": True}]
            tls = {"on_demand": {"ask": ask.url}}
            return acme_config(tmp_path / "proxy", pebble, sites, https_port=port, tls=tls)

        port = free_port()
        config, _ = configure("*.customer.test")
        proxy = start_proxy(config, port, pebble.http_port)
        first = serial(port, "a.customer.test", roots)

        def reload(pattern: str) -> None:
            assert proxy is not None
            reloads = proxy.log().count("reloaded:")
            configure(pattern)
            proxy.process.send_signal(signal.SIGHUP)
            wait_until(lambda: proxy.log().count("reloaded:") > reloads)

        reload("*.other.test")  # no on-demand site covers a.customer.test any more
        assert "certificate for a.customer.test: no longer served or renewed" in proxy.log()
        with pytest.raises(ssl.SSLCertVerificationError):  # the default certificate now
            serial(port, "a.customer.test", roots)
        assert ask.asked == ["a.customer.test"], "not asked again: no site covers it"
        rows = subprocess.run(
            [sys.executable, "-m", "proxy", "certs", "--config", str(config)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        assert "a.customer.test" not in rows, rows

        reload("*.customer.test")  # covered again: served from storage, no new order
        assert serial(port, "a.customer.test", roots) == first
        assert pebble.orders() == 1 and ask.asked == ["a.customer.test"]
    finally:
        if proxy is not None:
            proxy.stop()
        pebble.stop()
