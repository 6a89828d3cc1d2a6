"""The container image, built from the real Dockerfile and run with podman.

tests/test_container.py reads the Dockerfile and runs its command outside a container; here
the image itself is built (``podman build --pull=never --format docker``, the base image made
locally: tests/podman.py) and run, and each promise of docs/container.md is checked on a
running container: HTTPS with the internal issuer on the published ports, the HEALTHCHECK,
the non-root user, state in /data that a new container reuses, ``TLSPROXY_*`` overrides, and
a graceful ``podman stop``. All traffic stays on loopback: containers publish on 127.0.0.1
only, or share the host's network and listen on 127.0.0.1.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.podman import IMAGE, Podman, base_image_name, run_args, wait_logged
from tests.support import UvicornApp, free_port, wait_for_port

pytestmark = pytest.mark.timeout(600)  # the first test builds the image (base: about 40 s)

# What the image adds to its base: the venv and tlsproxy, 65 MB when measured (cryptography
# 16, uvloop 14, aiohttp and its helpers for Docker discovery 13, redis 7, byte code 12,
# dnspython 3).
MAX_ADDED_BYTES = 70_000_000
PROXY_USER = "10001"


@pytest.fixture(scope="module")
def image(podman: Podman) -> Iterator[str]:
    seconds = podman.build()
    print(f"image built in {seconds:.1f} s")
    yield IMAGE


@pytest.fixture(scope="module")
def app() -> Iterator[UvicornApp]:
    server = UvicornApp()
    yield server
    server.stop()


def https(
    port: int, cafile: Path, path: str = "/", *, timeout: float = 10
) -> tuple[int, bytes, bytes]:
    """GET https://localhost:<port><path>, verified against ``cafile``: status, body, and the
    certificate the server presented (DER)."""
    context = ssl.create_default_context(cafile=str(cafile))
    connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=timeout)
    try:
        connection.connect()
        assert isinstance(connection.sock, ssl.SSLSocket)
        certificate = connection.sock.getpeercert(binary_form=True)
        assert certificate is not None
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read(), certificate
    finally:
        connection.close()


def plain(port: int, host: str, path: str) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path, headers={"Host": host})
        response = connection.getresponse()
        response.read()
        return response
    finally:
        connection.close()


def root_pem(podman: Podman, container: str, directory: Path) -> Path:
    """The internal CA's root, read from /data inside the container."""
    path = directory / f"{container}-root.pem"
    path.write_text(podman("exec", container, "cat", "/data/ca/root.pem").stdout)
    return path


def host_network_env(https_port: int, http_port: int, admin_port: int) -> dict[str, str]:
    """Overrides that move the listeners to free loopback ports on the host's network."""
    return {
        "TLSPROXY_HTTPS_LISTEN": f"127.0.0.1:{https_port}",
        "TLSPROXY_HTTP_LISTEN": f"127.0.0.1:{http_port}",
        "TLSPROXY_ADMIN_LISTEN": f"127.0.0.1:{admin_port}",
        "TLSPROXY_HTTPS_PORT": str(https_port),
        "TLSPROXY_SHUTDOWN_TIMEOUT": "8",
    }


def config_for(app: UvicornApp, directory: Path) -> Path:
    """A configuration to mount over /etc/tlsproxy/proxy.toml: one site, the test app."""
    path = directory / "proxy.toml"
    path.write_text(
        '[server]\nhttps_listen = ["0.0.0.0:8443"]\nhttp_listen = ["0.0.0.0:8080"]\n'
        '[tls]\nissuer = "internal"\n'
        f'[[sites]]\nhosts = ["localhost"]\nupstreams = ["{app.url}"]\n'
    )
    path.chmod(0o644)
    return path


def start_on_host_network(
    podman: Podman, name: str, volume: str, config: Path
) -> tuple[int, int, int]:
    """A proxy container on the host's network with ``volume`` on /data; its ports."""
    ports = free_port(), free_port(), free_port()
    extra = [
        "--network",
        "host",
        "--volume",
        f"{volume}:/data",
        "--volume",
        f"{config}:/etc/tlsproxy/proxy.toml:ro",
        IMAGE,
    ]
    podman(*run_args(name, host_network_env(*ports), extra))
    wait_logged(podman, name, "listening: https")
    wait_for_port(ports[0])
    return ports


def test_the_image_is_small_and_holds_no_build_tools(podman: Podman, image: str) -> None:
    size = podman.image_size(image)
    base = podman.image_size(base_image_name())
    print(f"image {size / 1e6:.0f} MB: base {base / 1e6:.0f} MB + {(size - base) / 1e6:.0f} MB")
    assert size - base < MAX_ADDED_BYTES, "two stages, no compilers, no caches, no pip"
    absent = [
        "/opt/build",  # the build stage's hatchling and pip
        "/opt/tlsproxy/bin/pip",  # the runtime venv has none
        "/wheels",
        "/src",
        "/root/.cache",
        "/data/.cache",
    ]
    check = "; ".join(f'test ! -e "{path}" || echo "{path}"' for path in absent)
    found = podman("run", "--rm", "--entrypoint", "sh", image, "-c", check).stdout.split()
    assert found == []
    compilers = podman(
        "run", "--rm", "--entrypoint", "sh", image, "-c", "command -v cc gcc || true"
    ).stdout
    assert compilers.strip() == ""
    inspected = podman.inspect("--type", "image", image)
    assert inspected["User"] == f"{PROXY_USER}:{PROXY_USER}"
    healthcheck = inspected.get("Healthcheck")
    assert isinstance(healthcheck, dict), "build with --format docker: OCI drops HEALTHCHECK"
    assert healthcheck["Test"][:2] == ["CMD", "python"]


def test_the_image_serves_https_and_redirects_on_its_published_ports(
    podman: Podman, image: str, tmp_path: Path
) -> None:
    """The image as shipped: its own configuration, ports 8443 and 8080 published (on
    127.0.0.1 only), a certificate for ``localhost`` from the internal CA in /data."""
    https_port, http_port = free_port(), free_port()
    name = "published"
    podman(
        "run",
        "--detach",
        "--name",
        name,
        "--publish",
        f"127.0.0.1:{https_port}:8443",
        "--publish",
        f"127.0.0.1:{http_port}:8080",
        image,
    )
    try:
        wait_logged(podman, name, "listening: https")
        root = root_pem(podman, name, tmp_path)
        deadline = time.monotonic() + 10
        while True:  # the published port accepts before the container's listener does
            try:
                status, body, _ = https(https_port, root)
                break
            except (TimeoutError, ConnectionError, ssl.SSLError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert status == 502, body  # a verified handshake; the image's app:8000 is not there
        redirect = plain(http_port, "localhost", "/items?id=1")
        assert redirect.status == 308
        assert redirect.getheader("location") == "https://localhost/items?id=1"
    finally:
        podman("rm", "--force", "--time", "0", name)


def test_a_container_proxies_as_non_root_and_answers_its_healthcheck(
    podman: Podman, image: str, app: UvicornApp, tmp_path: Path
) -> None:
    name = "healthy"
    podman("volume", "create", "healthy-data")
    https_port, http_port, _ = start_on_host_network(
        podman, name, "healthy-data", config_for(app, tmp_path)
    )
    try:
        root = root_pem(podman, name, tmp_path)
        status, body, _ = https(https_port, root)
        assert status == 200
        seen = json.loads(body)
        assert (seen["client"], seen["scheme"]) == ("127.0.0.1", "https")

        health = podman("healthcheck", "run", name, check=False)
        assert health.returncode == 0, health.stdout + health.stderr

        uids = podman("exec", name, "grep", "^Uid:", "/proc/1/status").stdout.split()[1:]
        assert uids == [PROXY_USER] * 4, "PID 1 (tlsproxy) runs as the image's user"
        owner = podman("exec", name, "stat", "-c", "%u %a", "/data").stdout.split()
        assert owner == [PROXY_USER, "700"]

        log = podman("logs", name).stderr
        assert "environment sets server.https_port" in log
        redirect = plain(http_port, "localhost", "/a")
        assert redirect.getheader("location") == f"https://localhost:{https_port}/a"
    finally:
        podman("rm", "--force", "--time", "0", name)
    podman("volume", "rm", "healthy-data")


def test_a_new_container_on_the_same_volume_serves_the_same_ca_and_certificate(
    podman: Podman, image: str, app: UvicornApp, tmp_path: Path
) -> None:
    podman("volume", "create", "kept-data")
    config = config_for(app, tmp_path)
    served = []
    roots = []
    logs = []
    for name in ("first", "second"):
        https_port, _, _ = start_on_host_network(podman, name, "kept-data", config)
        try:
            roots.append(root_pem(podman, name, tmp_path).read_bytes())
            status, _, certificate = https(https_port, tmp_path / f"{name}-root.pem")
            assert status == 200
            served.append(certificate)
        finally:
            podman("stop", "--time", "10", name)
            logs.append(podman("logs", name).stderr)
            podman("rm", name)
    assert roots[0] == roots[1]
    assert served[0] == served[1], "the second container re-issued the certificate"
    assert "issued internal certificate" in logs[0]
    assert "issued" not in logs[1], logs[1]
    podman("volume", "rm", "kept-data")


def test_podman_stop_drains_an_in_flight_request_and_exits_0(
    podman: Podman, image: str, app: UvicornApp, tmp_path: Path
) -> None:
    name = "draining"
    podman("volume", "create", "draining-data")
    https_port, _, _ = start_on_host_network(
        podman, name, "draining-data", config_for(app, tmp_path)
    )
    root = root_pem(podman, name, tmp_path)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        request = pool.submit(https, https_port, root, "/slow?seconds=2", timeout=20)
        time.sleep(0.7)  # the request is at the app, which answers 2 s after it arrived
        started = time.monotonic()
        podman("stop", "--time", "10", name, timeout=30)
        stopping = time.monotonic() - started
        status, body, _ = request.result(timeout=20)
    state = podman.inspect("--type", "container", name)["State"]
    log = podman("logs", name).stderr
    podman("rm", name)
    podman("volume", "rm", "draining-data")
    assert (status, json.loads(body)) == (200, {"slept": 2.0})
    assert isinstance(state, dict) and state["ExitCode"] == 0, log
    assert 0.5 < stopping < 9, f"stopped in {stopping:.1f} s: not drained, or killed"
    assert "SIGTERM: stopping" in log and "draining 1 in-flight request(s)" in log
