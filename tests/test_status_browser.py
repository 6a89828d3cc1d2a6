"""The status page in a real headless Chromium, against a real proxy process.

Both tests serve a healthy site (certificate files from the internal CA, uvicorn upstream)
and a site whose upstream refuses connections and whose ACME renewal fails because the CA
answers every request with an ACME problem document whose detail holds a ``<script>``:

* the first has no ACME certificate yet (a temporary one from the internal CA is served
  while the renewer's own orders fail); it saves the screenshot the README shows;
* the second gets a real certificate from Pebble, then Pebble is replaced on its port by the
  failing CA and ``tlsproxy renew --force`` fails (skipped without Pebble).

They assert what a person sees: states as words, reasons, the countdown, the script as text.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from proxy.certs.internal_ca import InternalCA
from tests.pebble import LoopbackDNS, Pebble, acme_config, pebble_available, start_proxy
from tests.support import (
    ROOT,
    ProxyProcess,
    RefusingPort,
    UvicornApp,
    curl,
    free_port,
    wait_for_port,
    wait_until,
)

EVIL = "<script>document.title='owned'</script>"
SCREENSHOT = ROOT / "docs" / "status-page.png"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
)


class _BrokenCA(BaseHTTPRequestHandler):
    """An ACME server that is failing: every request gets a problem document."""

    def do_GET(self) -> None:
        problem = {
            "type": "urn:ietf:params:acme:error:serverInternal",
            "detail": f"the CA is on fire {EVIL}",
            "status": 500,
        }
        body = json.dumps(problem).encode()
        self.send_response(500)
        self.send_header("Content-Type", "application/problem+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_POST = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def _serve_broken_ca(port: int = 0, tls: ssl.SSLContext | None = None) -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", port), _BrokenCA)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def broken_ca() -> Iterator[str]:
    with _serve_broken_ca() as port:
        yield f"http://127.0.0.1:{port}/directory"


def _browser(tmp_path: Path) -> tuple[Any, str]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("chromium and chromium-driver are not installed (tests/run.sh installs them)")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    return options, driver


def _files_certificate(data: Path, host: str) -> dict[str, str]:
    """A cert/key pair for ``host`` from the proxy's own internal CA (so curl trusts it)."""
    ca = InternalCA.load_or_create(data / "ca")
    chain, key = ca.issue((host,))
    (data / f"{host}.pem").write_bytes(chain)
    (data / f"{host}.key").write_bytes(key)
    return {"cert": str(data / f"{host}.pem"), "key": str(data / f"{host}.key")}


def test_the_status_page_shows_failures_as_text_in_a_real_browser(
    tmp_path: Path, broken_ca: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    options, driver_path = _browser(tmp_path)
    monkeypatch.setenv("TLSPROXY_ACME_DIRECTORY", broken_ca)
    app, down = UvicornApp(), RefusingPort()
    admin = free_port()
    files = _files_certificate(tmp_path / "data", "good.test")
    proxy = ProxyProcess.start(
        tmp_path,
        [
            {"hosts": ["good.test"], "upstreams": [app.url], **files},
            {"hosts": ["down.test"], "upstreams": [down.url]},
        ],
        server={"admin_listen": f"127.0.0.1:{admin}"},
        issuer="acme",
    )
    try:
        wait_for_port(admin)
        assert _status(proxy, "good.test") == "200"
        assert _status(proxy, "down.test") == "502"
        wait_until(lambda: _failed_order(tmp_path / "data"), timeout=20)
        shot = SCREENSHOT if os.environ.get("TLSPROXY_UPDATE_SCREENSHOT") else tmp_path / "shot.png"
        failing = _check_page(options, driver_path, admin, screenshot=shot)
        assert "temporary" in failing  # no ACME certificate yet: the internal CA's stands in
    finally:
        proxy.stop()
        app.stop()
        down.close()


@pytest.mark.skipif(not pebble_available(), reason="pebble is not installed")
def test_a_failing_renewal_of_a_pebble_certificate_in_a_real_browser(tmp_path: Path) -> None:
    options, driver_path = _browser(tmp_path)
    dns = LoopbackDNS()
    pebble = Pebble(tmp_path / "pebble", free_port(), dns.port).start()
    app, down = UvicornApp(), RefusingPort()
    admin = free_port()
    files = _files_certificate(tmp_path / "proxy" / "data", "good.test")
    sites: list[dict[str, object]] = [
        {"hosts": ["good.test"], "upstreams": [app.url], **files},
        {"hosts": ["down.test"], "upstreams": [down.url]},
    ]
    server = {"admin_listen": f"127.0.0.1:{admin}"}
    config, https_port = acme_config(tmp_path / "proxy", pebble, sites, server=server)
    proxy = start_proxy(config, https_port, pebble.http_port)
    try:
        wait_until(lambda: _acme_served(tmp_path / "proxy" / "data"), timeout=20)
        pebble.stop()  # the CA now fails: same address, same TLS certificate, error answers
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(pebble.directory / "api-cert.pem", pebble.directory / "api-key.pem")
        with _serve_broken_ca(pebble.port, tls):
            renew = subprocess.run(
                [sys.executable, "-m", "proxy", "renew", "--config", str(config), "--force"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=60,
            )
        assert renew.returncode == 1, renew.stdout + renew.stderr
        assert _status(proxy, "down.test", "-k") == "502"
        failing = _check_page(options, driver_path, admin, screenshot=None)
        assert f"acme:127.0.0.1:{pebble.port}" in failing and "temporary" not in failing
    finally:
        proxy.stop()
        pebble.stop()
        dns.stop()
        app.stop()
        down.close()


def _check_page(options: Any, driver_path: str, admin: int, *, screenshot: Path | None) -> str:
    """Open the page, assert what a person sees; the failing certificate row's text."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    browser = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        browser.set_page_load_timeout(20)
        browser.get(f"http://127.0.0.1:{admin}/")
        assert browser.title == "tlsproxy status"  # the injected script did not run

        sites = {r.get_attribute("data-site"): r.text for r in _rows(browser, By, "sites")}
        assert "✔ UP" in sites["good.test"]
        assert "✖ DOWN" in sites["down.test"]
        assert "FAILING since" in sites["down.test"]
        assert "refused" in sites["down.test"].lower()

        certs = {r.get_attribute("data-site"): r.text for r in _rows(browser, By, "certificates")}
        assert "✔ OK" in certs["good.test"] and "file" in certs["good.test"]
        assert "expires in 6 d 23 h" in certs["good.test"]  # the countdown
        failing = str(certs["down.test"])
        assert "✖ FAILING" in failing and "expires in" in failing
        assert "serverInternal: the CA is on fire " + EVIL in failing  # as text, in full
        assert not browser.find_elements(By.CSS_SELECTOR, "td script")
        summary = browser.find_element(By.ID, "summary").text
        assert "DOWN site down.test" in summary and "FAILING certificate down.test" in summary
        if screenshot is not None:  # docs/status-page.png only with TLSPROXY_UPDATE_SCREENSHOT
            browser.save_screenshot(str(screenshot))
            data = screenshot.read_bytes()
            assert data.startswith(b"\x89PNG") and len(data) > 10_000
        return failing
    finally:
        browser.quit()


def _status(proxy: ProxyProcess, host: str, *args: str) -> str:
    return str(curl(proxy, host, "/", *args, "-o", "/dev/null", "-w", "%{http_code}").stdout)


def _acme_served(storage: Path) -> bool:
    return any(storage.glob("acme/*/certificates/*/cert.pem"))


def _failed_order(storage: Path) -> bool:
    for meta in storage.glob("acme/*/certificates/*/meta.json"):
        if json.loads(meta.read_text()).get("failures"):
            return True
    return False


def _rows(browser: Any, by: Any, table: str) -> list[Any]:
    rows: list[Any] = browser.find_elements(by.CSS_SELECTOR, f"#{table} tr[data-site]")
    return rows
