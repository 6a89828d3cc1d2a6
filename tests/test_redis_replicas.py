"""Three proxy replicas sharing one real ``redis-server``, against real Pebble, on loopback.

Only replica 0 listens on Pebble's ``httpPort``: the CA's HTTP-01 requests reach it whoever
placed the order, so a validation succeeds only if tokens really come from Redis.
"""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.pebble import LoopbackDNS, Pebble, pebble_available, served_certificate
from tests.support import ROOT, ProxyProcess, RawUpstream, free_port, to_toml, wait_for_port
from tests.test_redis_storage import REDIS_SERVER, RedisServer

pytestmark = [
    pytest.mark.skipif(not pebble_available(), reason="pebble is not installed"),
    pytest.mark.skipif(not Path(REDIS_SERVER).exists(), reason="redis-server is not installed"),
]

HOST = "app.test"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def pebble(tmp_path: Path, dns: LoopbackDNS) -> Iterator[Pebble]:
    server = Pebble(tmp_path / "pebble", free_port(), dns.port).start()
    yield server
    server.stop()


@pytest.fixture
def replicas() -> Iterator[list[ProxyProcess]]:
    running: list[ProxyProcess] = []
    yield running
    for proxy in running:
        proxy.stop()


def write_config(
    directory: Path, pebble: Pebble, storage: str, upstream: RawUpstream, http_port: int
) -> tuple[Path, int]:
    https_port = free_port()
    config = {
        "server": {
            "https_listen": [f"127.0.0.1:{https_port}"],
            "http_listen": [f"127.0.0.1:{http_port}"],
            "https_port": https_port,
            "admin_listen": "",
            "shutdown_timeout": 5,
        },
        "tls": {"storage": storage, "issuer": "acme"},
        "acme": {"directory": pebble.url, "ca_bundle": str(pebble.api_ca), "email": "ops@a.test"},
        "sites": [{"hosts": [HOST], "upstreams": [upstream.url]}],
    }
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "proxy.toml"
    path.write_text(to_toml(config))
    return path, https_port


def start_replicas(
    tmp_path: Path,
    count: int,
    pebble: Pebble,
    storage: str,
    upstream: RawUpstream,
    replicas: list[ProxyProcess],
) -> None:
    """Start ``count`` replicas (they race for the order); replica 0 gets HTTP-01 and is
    listening before the others start (as behind a load balancer's health check)."""
    for index in range(count):
        http_port = pebble.http_port if index == 0 else free_port()
        config, https_port = write_config(
            tmp_path / f"replica{index}", pebble, storage, upstream, http_port
        )
        log_path = config.parent / "proxy.log"
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "proxy", "run", "--config", str(config)],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        replicas.append(ProxyProcess(config.parent, https_port, http_port, process, log_path))
        if index == 0:
            wait_for_port(http_port, process=process)
    for proxy in replicas:
        wait_for_port(proxy.https_port, process=proxy.process)


def serial_of(proxy: ProxyProcess, roots: Path) -> int | None:
    """The serial ``proxy`` serves if it verifies against Pebble's root (else None)."""
    try:
        return int(str(served_certificate(proxy.https_port, HOST, roots)["serialNumber"]), 16)
    except (ssl.SSLError, OSError):
        return None


def all_serve(replicas: list[ProxyProcess], roots: Path, timeout: float) -> int:
    """Wait until every replica serves one and the same Pebble certificate; its serial."""
    deadline = time.monotonic() + timeout
    while True:
        serials = {serial_of(proxy, roots) for proxy in replicas}
        if len(serials) == 1 and None not in serials:
            return serials.pop() or 0
        if time.monotonic() > deadline:
            raise AssertionError(f"replicas serve {serials} after {timeout} s\n{tails(replicas)}")
        time.sleep(0.05)


def tails(replicas: list[ProxyProcess]) -> str:
    """The last log lines of each replica (access log lines left out), for failures."""
    parts = []
    for proxy in replicas:
        lines = [line for line in proxy.log().splitlines() if '"GET ' not in line]
        parts.append(f"-- {proxy.directory.name}\n" + "\n".join(lines[-8:]))
    return "\n".join(parts)


def orders_placed(replicas: list[ProxyProcess]) -> int:
    return sum(len(re.findall(r"ordering a certificate", p.log())) for p in replicas)


def test_three_replicas_order_once_share_renewals_and_answer_each_others_challenges(
    tmp_path: Path,
    pebble: Pebble,
    redis_server: RedisServer,
    upstream: RawUpstream,
    replicas: list[ProxyProcess],
) -> None:
    roots = pebble.write_roots(tmp_path / "roots.pem")
    start_replicas(tmp_path, 3, pebble, redis_server.url, upstream, replicas)

    first = all_serve(replicas, roots, 20)
    time.sleep(1.0)  # a (wrong) second order would show by now
    assert pebble.orders() == 1, tails(replicas)
    assert orders_placed(replicas) == 1, tails(replicas)

    # a forced renewal by a process that does not listen on Pebble's httpPort: replica 0
    # answers the validation from Redis, and every replica serves the result within 2 s
    config, _ = write_config(
        tmp_path / "renew", pebble, redis_server.url, upstream, http_port=free_port()
    )
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "renew", "--config", str(config), "--force", HOST],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    renewed_at = time.monotonic()
    second = all_serve(replicas, roots, 2.0)
    print(f"renewal served by all replicas {time.monotonic() - renewed_at:.2f} s after it")
    assert second != first
    assert pebble.orders() == 2
    assert orders_placed(replicas) == 1, tails(replicas)  # they adopted it, none ordered


class Traffic:
    """HTTPS requests to every replica in a loop, counting failures."""

    def __init__(self, replicas: list[ProxyProcess], roots: Path) -> None:
        self.replicas, self.roots = replicas, roots
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        context = ssl.create_default_context(cafile=str(self.roots))
        while not self._stop.is_set():
            for proxy in self.replicas:
                try:
                    self._request(proxy, context)
                    self.ok += 1
                except (OSError, AssertionError) as exc:
                    self.failures.append(f"{proxy.directory.name}: {exc!r}")

    @staticmethod
    def _request(proxy: ProxyProcess, context: ssl.SSLContext) -> None:
        with (
            socket.create_connection(("127.0.0.1", proxy.https_port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname=HOST) as tls,
        ):
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
            assert data.startswith(b"HTTP/1.1 200"), data[:80]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.1)


def test_redis_stopped_and_restarted_while_requests_flow(
    tmp_path: Path,
    pebble: Pebble,
    redis_server: RedisServer,
    upstream: RawUpstream,
    replicas: list[ProxyProcess],
) -> None:
    roots = pebble.write_roots(tmp_path / "roots.pem")
    start_replicas(tmp_path, 2, pebble, redis_server.url, upstream, replicas)
    serial = all_serve(replicas, roots, 20)
    traffic = Traffic(replicas, roots)
    try:
        subprocess.run(
            ["redis-cli", "-p", str(redis_server.port), "SAVE"], check=False, capture_output=True
        )  # a persistent Redis: it comes back with its data
        redis_server.stop()
        wait_for(lambda: all("unreachable" in p.log() for p in replicas), 10, "unreachable logged")
        time.sleep(1.0)
        redis_server.start()
        wait_for(lambda: all("reachable again" in p.log() for p in replicas), 40, "recovery logged")
        time.sleep(0.5)
    finally:
        traffic.stop()
    assert traffic.failures == []
    assert traffic.ok > 20
    assert all_serve(replicas, roots, 2) == serial
    assert pebble.orders() == 1


class Relay:
    """Pebble's ``httpPort``: holds validation requests unanswered (so an order stays in
    flight) until :meth:`forward` sends them on to a replica's port-80 listener."""

    def __init__(self) -> None:
        self.port = free_port()
        self.target: int | None = None
        self.held = 0
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def forward(self, port: int) -> None:
        self.target = port

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._sockets.append(conn)
            if self.target is None:
                self.held += 1
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self._sockets.append(upstream)
            for one, other in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(one, other), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._listener.close()
        for sock in self._sockets:
            sock.close()


def test_kill_9_of_the_lock_holder_mid_order_another_replica_completes_it(
    tmp_path: Path,
    dns: LoopbackDNS,
    redis_server: RedisServer,
    upstream: RawUpstream,
    replicas: list[ProxyProcess],
) -> None:
    relay = Relay()
    pebble = Pebble(tmp_path / "pebble", relay.port, dns.port).start()
    try:
        roots = pebble.write_roots(tmp_path / "roots.pem")
        storage = redis_server.url + "?lease=3"
        holder_config, holder_port = write_config(
            tmp_path / "holder", pebble, storage, upstream, free_port()
        )
        first = start_replica(holder_config, holder_port, 0)
        replicas.append(first)
        wait_for(lambda: relay.held > 0, 20, "the holder's validation request")

        http_port = free_port()
        config, https_port = write_config(tmp_path / "other", pebble, storage, upstream, http_port)
        second = start_replica(config, https_port, http_port)
        replicas.append(second)
        time.sleep(1.0)
        assert orders_placed([second]) == 0  # the holder's lease keeps it waiting

        first.process.kill()  # SIGKILL: the lock is never released, its lease runs out
        killed = time.monotonic()
        relay.forward(http_port)
        serial = all_serve([second], roots, 20)
        took = time.monotonic() - killed
        print(f"order completed by the other replica {took:.1f} s after the kill")
        assert serial
        assert took > 1.5  # not before the lease (renewed every second until the kill) ran out
        assert orders_placed([second]) == 1
        assert pebble.orders() == 2  # the dead holder's and the one that completed
    finally:
        pebble.stop()
        relay.close()


def start_replica(config: Path, https_port: int, http_port: int) -> ProxyProcess:
    log_path = config.parent / "proxy.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", "--config", str(config)],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    proxy = ProxyProcess(config.parent, https_port, http_port, process, log_path)
    wait_for_port(https_port, process=process)
    return proxy
