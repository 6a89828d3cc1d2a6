"""SIGHUP and the listen addresses: a reload applies them at once (the new one is bound
before the old one closes), or is refused as a whole; never a listener left open under a
configuration that no longer protects it.

"Public" and "loopback" are played by 127.0.0.2 and 127.0.0.1, so all traffic stays on the
loopback interface.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    ProxyProcess,
    UvicornApp,
    curl,
    free_port,
    https_request,
    to_toml,
    wait_for_port,
    wait_until,
)

PUBLIC = "127.0.0.2"  # stands for 0.0.0.0 or a LAN address
TOKEN = "s3cret"


@pytest.fixture(scope="module")
def app() -> Iterator[UvicornApp]:
    server = UvicornApp()
    yield server
    server.stop()


def rewrite(proxy: ProxyProcess, change: Callable[[dict[str, Any]], None]) -> None:
    config = tomllib.loads(proxy.config_path.read_text())
    change(config)
    proxy.config_path.write_text(to_toml(config))


def reload(proxy: ProxyProcess, expect: str, count: int = 1) -> str:
    """SIGHUP, then wait until ``expect`` is in the log ``count`` times (once per worker)."""
    before = proxy.log().count(expect)
    proxy.process.send_signal(signal.SIGHUP)
    wait_until(lambda: proxy.log().count(expect) >= before + count, timeout=15)
    return proxy.log()


def admin_get(sock: socket.socket, path: str, token: str | None = None) -> bytes:
    """One request on an open admin connection; the reply's status line, or b"" if closed."""
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: admin\r\n{auth}\r\n".encode())
    reply = b""
    try:
        while b"\r\n" not in reply:
            data = sock.recv(65536)
            if not data:
                break
            reply += data
    except ConnectionResetError:
        pass
    return reply.partition(b"\r\n")[0]


def status_line(host: str, port: int, path: str, token: str | None = None) -> bytes:
    with socket.create_connection((host, port), timeout=5) as sock:
        return admin_get(sock, path, token)


def refused(host: str, port: int, attempts: int = 1) -> bool:
    """Every one of ``attempts`` connections is refused (several: each may reach another
    worker's socket under SO_REUSEPORT)."""
    for _ in range(attempts):
        try:
            with socket.create_connection((host, port), timeout=2):
                return False
        except ConnectionRefusedError:
            continue
    return True


def get(host: str) -> bytes:
    return f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()


@pytest.mark.parametrize("workers", [1, 2])
def test_moving_the_admin_listener_to_loopback_closes_the_public_one(
    app: UvicornApp, tmp_path: Path, workers: int
) -> None:
    """The outside report: admin on a public address with a token; the file moves it to
    loopback without a token; after SIGHUP the public socket answered /api/status to anyone."""
    public, loopback = free_port(PUBLIC), free_port()
    proxy = ProxyProcess.start(
        tmp_path,
        [{"hosts": ["a.test"], "upstreams": [app.url]}],
        server={"admin_listen": f"{PUBLIC}:{public}", "admin_token": TOKEN, "workers": workers},
    )
    try:
        wait_for_port(public, host=PUBLIC, process=proxy.process)
        wait_until(lambda: proxy.log().count("listening: admin") >= workers)
        assert status_line(PUBLIC, public, "/api/status") == b"HTTP/1.1 401 Unauthorized"
        # A client that connected before the reload and keeps its connection open.
        kept = socket.create_connection((PUBLIC, public), timeout=5)
        assert admin_get(kept, "/healthz") == b"HTTP/1.1 200 OK"

        def to_loopback(config: dict[str, Any]) -> None:
            config["server"]["admin_listen"] = f"127.0.0.1:{loopback}"
            del config["server"]["admin_token"]

        rewrite(proxy, to_loopback)
        log = reload(proxy, "reloaded: 1 site(s)", count=workers)

        assert refused(PUBLIC, public, attempts=20), "the public admin socket is still open"
        with kept:
            assert admin_get(kept, "/api/status") == b"", "the open public connection answered"
        # The new address works at once, as the file says: loopback, no token.
        assert status_line("127.0.0.1", loopback, "/api/status") == b"HTTP/1.1 200 OK"
        assert f"listening: admin on 127.0.0.1:{loopback}" in log
        assert f"stopped listening: admin on {PUBLIC}:{public}" in log
        assert "take effect on restart" not in log
    finally:
        assert proxy.stop() == 0, proxy.log()
    assert "Traceback" not in proxy.log()


def test_a_reload_whose_new_admin_address_is_taken_is_refused_as_a_whole(
    app: UvicornApp, tmp_path: Path
) -> None:
    public = free_port(PUBLIC)
    taken = socket.create_server(("127.0.0.1", 0))  # another program on the new address
    proxy = ProxyProcess.start(
        tmp_path,
        [{"hosts": ["a.test"], "upstreams": [app.url]}],
        server={"admin_listen": f"{PUBLIC}:{public}", "admin_token": TOKEN},
    )
    try:
        wait_for_port(public, host=PUBLIC, process=proxy.process)

        def change(config: dict[str, Any]) -> None:
            config["server"]["admin_listen"] = f"127.0.0.1:{taken.getsockname()[1]}"
            del config["server"]["admin_token"]
            config["sites"].append({"hosts": ["b.test"], "upstreams": [app.url]})

        rewrite(proxy, change)
        log = reload(proxy, "reload refused")
        [line] = [line for line in log.splitlines() if "reload refused" in line]
        assert f"127.0.0.1:{taken.getsockname()[1]}" in line and "in use" in line, line
        assert "Traceback" not in log
        # The old configuration as a whole: its token on its listener, its sites only.
        assert status_line(PUBLIC, public, "/api/status") == b"HTTP/1.1 401 Unauthorized"
        assert status_line(PUBLIC, public, "/api/status", TOKEN) == b"HTTP/1.1 200 OK"
        assert https_request(proxy, "a.test", get("b.test")).startswith(b"HTTP/1.1 421 ")
        assert proxy.process.poll() is None
    finally:
        assert proxy.stop() == 0, proxy.log()
        taken.close()


def test_https_and_http_listeners_move_and_open_connections_stay(
    app: UvicornApp, tmp_path: Path
) -> None:
    proxy = ProxyProcess.start(tmp_path, [{"hosts": ["a.test"], "upstreams": [app.url]}])
    old_https, old_http = proxy.https_port, proxy.http_port
    new_https, new_http = free_port(), free_port()
    try:
        context = proxy.client_context()
        with (
            socket.create_connection(("127.0.0.1", old_https), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="a.test") as before,
        ):

            def move(config: dict[str, Any]) -> None:
                config["server"].update(
                    https_listen=[f"127.0.0.1:{new_https}"],
                    http_listen=[f"127.0.0.1:{new_http}"],
                    https_port=new_https,
                )

            rewrite(proxy, move)
            reload(proxy, "reloaded: 1 site(s)")
            assert refused("127.0.0.1", old_https) and refused("127.0.0.1", old_http)

            proxy.https_port, proxy.http_port = new_https, new_http
            assert json.loads(curl(proxy, "a.test").stdout)["scheme"] == "https"
            # Port 80's redirects name the new HTTPS port: curl -L follows them there.
            followed = curl_http(proxy, "a.test", "/?via=http", "-L")
            assert json.loads(followed)["url"] == f"https://a.test:{new_https}/?via=http"

            # The connection accepted on the old port before the reload keeps working.
            before.sendall(get("a.test"))
            assert before.recv(65536).startswith(b"HTTP/1.1 200 ")
    finally:
        assert proxy.stop() == 0, proxy.log()


def curl_http(proxy: ProxyProcess, host: str, path: str, *args: str) -> str:
    """curl to the proxy's port-80 listener, resolving ``host`` to loopback on both ports."""
    return subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "20",
            "--cacert",
            str(proxy.root_ca),
            "--resolve",
            f"{host}:{proxy.http_port}:127.0.0.1",
            "--resolve",
            f"{host}:{proxy.https_port}:127.0.0.1",
            *args,
            f"http://{host}:{proxy.http_port}{path}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout


def test_addresses_that_change_roles_are_rebound(app: UvicornApp, tmp_path: Path) -> None:
    """A new listener on a port an outgoing one holds (as 0.0.0.0:9901 -> 127.0.0.1:9901 is,
    on Linux) cannot be bound first: the outgoing one is closed, then the port taken."""
    proxy = ProxyProcess.start(tmp_path, [{"hosts": ["a.test"], "upstreams": [app.url]}])
    https, http = proxy.https_port, proxy.http_port
    try:

        def swap(config: dict[str, Any]) -> None:
            config["server"].update(
                https_listen=[f"127.0.0.1:{http}"],
                http_listen=[],
                admin_listen=f"127.0.0.1:{https}",
                https_port=http,
            )

        rewrite(proxy, swap)
        reload(proxy, "reloaded: 1 site(s)")
        proxy.https_port = http
        assert json.loads(curl(proxy, "a.test").stdout)["scheme"] == "https"
        assert status_line("127.0.0.1", https, "/healthz") == b"HTTP/1.1 200 OK"
    finally:
        assert proxy.stop() == 0, proxy.log()
    assert "Traceback" not in proxy.log()


def test_an_unchanged_listener_is_not_rebound(app: UvicornApp, tmp_path: Path) -> None:
    admin = free_port()
    proxy = ProxyProcess.start(
        tmp_path,
        [{"hosts": ["a.test"], "upstreams": [app.url]}],
        server={"admin_listen": f"127.0.0.1:{admin}"},
    )
    try:
        wait_for_port(admin)
        with socket.create_connection(("127.0.0.1", admin), timeout=5) as kept:
            assert admin_get(kept, "/healthz") == b"HTTP/1.1 200 OK"
            rewrite(
                proxy, lambda c: c["sites"].append({"hosts": ["b.test"], "upstreams": [app.url]})
            )
            log = reload(proxy, "reloaded: 2 site(s)")
            time.sleep(0.2)
            assert admin_get(kept, "/healthz") == b"HTTP/1.1 200 OK"
        assert "stopped listening" not in log
        assert log.count("listening: https") == 1
    finally:
        assert proxy.stop() == 0, proxy.log()
