"""Sites from container labels, live, against a real Docker-compatible engine.

podman's API socket (``podman system service``, the same Engine API as Docker's) serves the
proxy's ``[docker]`` provider; the test starts and stops real containers with labels, each a
tiny HTTP server from the locally made base image on the host's network (so the proxy
reaches them on 127.0.0.1), and checks through real TLS connections: a labelled container
is served within 2 s of starting, with a certificate from the internal CA issued at run
time; a second one with the same hosts shares the load; a stopped one is dropped within
2 s, its certificate with it (only the certificates of sites that came or went change); a
connection to another site stays open throughout; a host in the file is the file's;
the status page says where each site came from; and with the API gone, routes stay until
it is back. The measured latency is printed (``pytest -s``).
"""

from __future__ import annotations

import json
import signal
import socket
import ssl
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.podman import Podman, base_image_name
from tests.support import ProxyProcess, RawUpstream, free_port, stop_process, wait_until

pytestmark = pytest.mark.timeout(600)  # the first test may make the base image

LIVE = 2.0  # seconds: the bound for a start or a stop to show
APP = """
import http.server, os, signal
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = os.environ["NAME"].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"""


@pytest.fixture(scope="module")
def api(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The Docker-compatible API socket of this session's podman."""
    folder = tmp_path_factory.mktemp("docker-api")
    endpoint = f"unix://{folder / 'podman.sock'}"
    service = podman.service(endpoint, folder / "service.log")
    yield endpoint
    stop_process(service)


def start_app(podman: Podman, name: str, labels: dict[str, str], *, port_label: bool = True) -> int:
    """A labelled app container on the host's network; the loopback port it answers on (in
    its ``tlsproxy.port`` label too, unless ``port_label`` is false or it has one)."""
    port = free_port()
    args = ["run", "--detach", "--name", name, "--network", "host"]
    args += ["--env", f"NAME={name}", "--env", f"PORT={port}"]
    if port_label:
        labels = {"tlsproxy.port": str(port), **labels}
    for key, value in labels.items():
        args += ["--label", f"{key}={value}"]
    podman(*args, base_image_name(), "python3", "-c", APP)
    deadline = time.monotonic() + 10
    while True:  # the app listens a moment after the container starts
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return port
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def remove(podman: Podman, *names: str) -> None:
    podman("rm", "--force", "--time", "2", *names)


def labels(hosts: str, port: int | None = None, **extra: str) -> dict[str, str]:
    found = {"tlsproxy.enable": "true", "tlsproxy.hosts": hosts, **extra}
    if port is not None:
        found["tlsproxy.port"] = str(port)
    return found


def get(proxy: ProxyProcess, host: str, *, verify: bool = True) -> tuple[int, str]:
    """GET https://<host>/ through the proxy: (status, body); (0, reason) when TLS fails."""
    context = proxy.client_context()
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection(("127.0.0.1", proxy.https_port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            reply = b""
            while chunk := tls.recv(65536):
                reply += chunk
    except (ssl.SSLError, OSError) as exc:
        return 0, str(exc)
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def until(condition: Any, limit: float) -> float:
    """Seconds until ``condition()`` holds, polled every 20 ms; fails past ``limit``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > limit:
            raise AssertionError(f"not within {limit} s")
        time.sleep(0.02)
    return time.monotonic() - started


class KeptAlive:
    """One TLS connection to a file site, used again and again: it must never be dropped."""

    def __init__(self, proxy: ProxyProcess, host: str) -> None:
        raw = socket.create_connection(("127.0.0.1", proxy.https_port), timeout=5)
        self.tls = proxy.client_context().wrap_socket(raw, server_hostname=host)
        self.host = host

    def request(self) -> int:
        """One more request on the same connection; its status."""
        self.tls.sendall(f"GET /kept HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        reply = b""
        while True:
            chunk = self.tls.recv(65536)
            assert chunk, "the kept-alive connection was closed"
            reply += chunk
            head, end, body = reply.partition(b"\r\n\r\n")
            fields = dict(
                line.lower().split(b": ", 1) for line in head.split(b"\r\n")[1:] if b": " in line
            )
            if end and len(body) >= int(fields.get(b"content-length", b"0")):
                return int(head.split()[1])

    def close(self) -> None:
        self.tls.close()


@pytest.fixture
def file_upstream() -> Iterator[RawUpstream]:
    server = RawUpstream()
    yield server
    server.close()


def start_proxy(
    directory: Path, endpoint: str, upstream: RawUpstream, admin_port: int | None = None
) -> ProxyProcess:
    return ProxyProcess.start(
        directory,
        [{"hosts": ["file.test", "shared.test"], "upstreams": [upstream.url]}],
        server={"admin_listen": f"127.0.0.1:{admin_port}" if admin_port else ""},
        tables={"docker": {"endpoint": endpoint}},
    )


def test_labelled_containers_are_served_and_dropped_live(
    podman: Podman, api: str, file_upstream: RawUpstream, tmp_path: Path
) -> None:
    admin_port = free_port()
    proxy = start_proxy(tmp_path, api, file_upstream, admin_port)
    kept = KeptAlive(proxy, "file.test")
    try:
        wait_until(lambda: "discovering sites from container labels" in proxy.log())
        assert kept.request() == 200

        started = time.monotonic()
        start_app(podman, "app-one", labels("app.test,www.app.test"))
        running = time.monotonic() - started
        latency = until(lambda: get(proxy, "app.test") == (200, "app-one"), LIVE)
        print(f"\ndiscovery: served {latency:.2f} s after `podman run` returned ({running:.2f} s)")
        assert get(proxy, "www.app.test") == (200, "app-one"), "a verified internal certificate"
        assert "site app.test: issued internal certificate" in proxy.log()

        start_app(podman, "app-two", labels("app.test,www.app.test"))
        until(lambda: {get(proxy, "app.test")[1] for _ in range(6)} == {"app-one", "app-two"}, LIVE)
        status = json.load(
            urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/api/status", timeout=5)
        )
        sources = {site["name"]: site["source"] for site in status["sites"]}
        assert sources == {"file.test": "file", "app.test": "docker: app-one, app-two"}
        assert kept.request() == 200

        started = time.monotonic()
        podman("kill", "app-one")
        dropped = until(lambda: {get(proxy, "app.test")[1] for _ in range(4)} == {"app-two"}, LIVE)
        podman("stop", "--time", "5", "app-two")
        gone = until(lambda: get(proxy, "app.test", verify=False)[0] == 421, LIVE)
        print(f"discovery: a killed container dropped in {dropped:.2f} s, the last in {gone:.2f} s")
        assert get(proxy, "app.test")[0] == 0, "its certificate is no longer served"
        assert kept.request() == 200, "the connection to the file's site stayed open"
    finally:
        kept.close()
        remove(podman, "app-one", "app-two")
        assert proxy.stop() == 0, proxy.log()
    log = proxy.log()
    assert "discovered: app.test -> http://127.0.0.1:" in log
    assert "no longer discovered: app.test" in log
    # Per host name, not the whole set: the second container (same hosts) left the first's
    # certificate alone, and the last one's stop dropped exactly that certificate, once.
    assert log.count("site app.test: issued internal certificate") == 1
    assert log.count("no longer served or renewed") == 1
    assert "certificate for app.test www.app.test: no longer served or renewed" in log


def test_a_host_in_the_file_wins_over_a_label(
    podman: Podman, api: str, file_upstream: RawUpstream, tmp_path: Path
) -> None:
    proxy = start_proxy(tmp_path, api, file_upstream)
    try:
        start_app(podman, "claims", labels("shared.test,own.test"))
        until(lambda: get(proxy, "own.test") == (200, "claims"), LIVE)
        status, body = get(proxy, "shared.test")
        assert (status, body) == (200, f"raw upstream {file_upstream.port}")
        warnings = [line for line in proxy.log().splitlines() if "the file wins" in line]
        assert len(warnings) == 1 and "host shared.test" in warnings[0] and "claims" in warnings[0]

        proxy.process.send_signal(signal.SIGHUP)  # a reload keeps what was discovered
        wait_until(lambda: "reloaded" in proxy.log())
        assert get(proxy, "own.test") == (200, "claims")
        assert get(proxy, "shared.test") == (200, f"raw upstream {file_upstream.port}")
        assert proxy.log().count("the file wins") == 1, "said once, not again on reload"
    finally:
        remove(podman, "claims")
        assert proxy.stop() == 0, proxy.log()


def test_a_container_with_bad_labels_is_skipped_with_its_name(
    podman: Podman, api: str, file_upstream: RawUpstream, tmp_path: Path
) -> None:
    proxy = start_proxy(tmp_path, api, file_upstream)
    try:
        start_app(podman, "bad-host", labels("bad_host!.test", 8000))
        start_app(podman, "not-enabled", {"tlsproxy.hosts": "quiet.test", "tlsproxy.port": "1"})
        start_app(podman, "fine", labels("fine.test"), port_label=False)  # and no exposed port
        wait_until(lambda: "container bad-host: tlsproxy.hosts[0]" in proxy.log(), LIVE)
        log = proxy.log()
        assert "container fine: no tlsproxy.port label" in log
        assert "not-enabled" not in log
        assert get(proxy, "quiet.test", verify=False)[0] == 421
    finally:
        remove(podman, "bad-host", "not-enabled", "fine")
        assert proxy.stop() == 0, proxy.log()


def test_with_the_api_gone_routes_stay_until_it_is_back(
    podman: Podman, file_upstream: RawUpstream, tmp_path: Path
) -> None:
    """Over tcp:// this time: the provider reconnects with backoff and logs once."""
    port = free_port()
    service_log = tmp_path / "service.log"
    service = podman.service(f"tcp:127.0.0.1:{port}", service_log)
    proxy = start_proxy(tmp_path, f"tcp://127.0.0.1:{port}", file_upstream)
    try:
        app_port = start_app(podman, "stays", labels("stays.test"))
        until(lambda: get(proxy, "stays.test") == (200, "stays"), LIVE)

        stop_process(service)
        wait_until(lambda: "unreachable" in proxy.log())
        time.sleep(2)  # a few reconnect attempts
        assert proxy.log().count("unreachable") == 1, "logged once, not per attempt"
        assert get(proxy, "stays.test") == (200, "stays"), "the last known routes stay"

        service = podman.service(f"tcp:127.0.0.1:{port}", service_log)
        start_app(podman, "after", labels("after.test"))
        until(lambda: get(proxy, "after.test") == (200, "after"), 5 + LIVE)  # + backoff
        assert "answers again" in proxy.log()
        assert app_port
    finally:
        remove(podman, "stays", "after")
        stop_process(service)
        assert proxy.stop() == 0, proxy.log()
