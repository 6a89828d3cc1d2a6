"""Several worker processes behind one supervisor, sharing the ports (SO_REUSEPORT)."""

from __future__ import annotations

import json
import os
import signal
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import (
    ProxyProcess,
    UvicornApp,
    body_json,
    free_port,
    https_request,
    to_toml,
    wait_until,
)


@pytest.fixture(scope="module")
def app() -> Iterator[UvicornApp]:
    server = UvicornApp()
    yield server
    server.stop()


def workers_of(proxy: ProxyProcess) -> set[int]:
    children = Path(f"/proc/{proxy.process.pid}/task/{proxy.process.pid}/children")
    return {int(pid) for pid in children.read_text().split()}


def get(host: str) -> bytes:
    return f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()


def test_two_workers_serve_reload_restart_and_stop(app: UvicornApp, tmp_path: Path) -> None:
    admin = free_port()
    proxy = ProxyProcess.start(
        tmp_path,
        [{"hosts": ["w.test"], "upstreams": [app.url]}],
        server={"workers": 2, "admin_listen": f"127.0.0.1:{admin}"},
    )
    try:
        wait_until(lambda: len(workers_of(proxy)) == 2)
        first = workers_of(proxy)
        wait_until(lambda: proxy.log().count("listening: https") >= 2)
        for _ in range(20):
            assert body_json(https_request(proxy, "w.test", get("w.test")))["scheme"] == "https"

        # Whichever worker answers, the status page counts the whole instance's requests.
        def counted() -> int:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/api/status", timeout=5) as r:
                document = json.load(r)
            assert document["scope"] == "the whole instance (2 worker processes, merged)"
            total: int = document["sites"][0]["requests"]["total"]
            return total

        wait_until(lambda: counted() == 20, timeout=10)
        assert all(counted() == 20 for _ in range(6))

        # SIGHUP reaches every worker: the new site answers on every new connection.
        config = tomllib.loads(proxy.config_path.read_text())
        config["sites"].append({"hosts": ["v.test"], "upstreams": [app.url]})
        proxy.config_path.write_text(to_toml(config))
        proxy.process.send_signal(signal.SIGHUP)
        wait_until(lambda: proxy.log().count("reloaded: 2 site(s)") >= 2)
        for _ in range(20):
            assert https_request(proxy, "v.test", get("v.test")).startswith(b"HTTP/1.1 200 ")

        # A worker killed outright is replaced; service goes on.
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: len(workers_of(proxy)) == 2 and victim not in workers_of(proxy))
        time.sleep(0.5)
        for _ in range(10):
            assert https_request(proxy, "w.test", get("w.test")).startswith(b"HTTP/1.1 200 ")
        assert "restarting it" in proxy.log()
    finally:
        assert proxy.stop() == 0, proxy.log()
    assert proxy.log().count("stopped") >= 2
