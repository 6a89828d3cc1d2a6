"""The Redis storage backend against a real ``redis-server`` on loopback (no proxy, no CA).

:class:`RedisServer` is also what ``test_redis_replicas`` runs its replicas on.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis

from acme_client.account import ACMESettings
from acme_client.challenges import StorageChallengeStore
from acme_client.interfaces import MemoryChallengeStore
from acme_client.keys import inspect
from acme_client.location import open_storage
from acme_client.records import CertificateRecords, Metadata
from acme_client.redis_storage import HEALTH_HOOKS, RedisStorage, redacted, url_problem
from acme_client.renewer import Renewer
from acme_client.solvers import HTTP01Solver
from acme_client.storage import LockBusy
from acme_client.tlsalpn import ALPNChallenges
from tests.support import free_port, stop_process
from tests.test_acme_units import DIRECTORY, LocalCA, maintained, wait_for

TOKEN = "t0k3n_" * 7
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server is not installed"
)


@dataclass
class RedisServer:
    """A throwaway ``redis-server`` (no persistence) the test owns; restartable on its port."""

    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        log = (self.directory / "redis.log").open("ab")
        self.process = subprocess.Popen(
            [
                *(REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(self.directory)),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise
                time.sleep(0.05)
        client.close()
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
        self.process = None


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    running = RedisServer(tmp_path / "redis").start()
    yield running
    running.stop()


def test_values_versions_and_prefix(server: RedisServer) -> None:
    storage = RedisStorage(server.url + "?prefix=one")
    other = RedisStorage(server.url + "?prefix=two")
    assert storage.load("acme/x/meta.json") is None
    assert storage.version("acme/x/meta.json") is None
    storage.store("acme/x/meta.json", b"1")
    first = storage.version("acme/x/meta.json")
    storage.store("acme/x/meta.json", b"2")
    assert storage.load("acme/x/meta.json") == b"2"
    assert storage.version("acme/x/meta.json") not in (None, first)
    assert other.load("acme/x/meta.json") is None  # prefixes keep deployments apart
    storage.delete("acme/x/meta.json")
    assert storage.load("acme/x/meta.json") is None
    assert storage.version("acme/x/meta.json") is None
    with pytest.raises(ValueError):
        storage.load("../escape")


def test_challenge_tokens_are_shared_and_expire(server: RedisServer) -> None:
    writer = StorageChallengeStore(open_storage(server.url))
    reader = StorageChallengeStore(open_storage(server.url))
    writer.put(TOKEN, TOKEN + ".thumb")
    assert reader.get(TOKEN) == TOKEN + ".thumb"
    client = redis.Redis(port=server.port)
    assert 0 < client.ttl(f"tlsproxy:acme/challenges/{TOKEN}") <= 3600
    writer.delete(TOKEN)
    assert reader.get(TOKEN) is None


def test_tls_alpn_challenges_are_shared_by_replicas_and_expire(server: RedisServer) -> None:
    writer = ALPNChallenges(open_storage(server.url))  # the replica that orders
    reader = ALPNChallenges(open_storage(server.url))  # the replica the CA reaches
    writer.put("app.test", TOKEN + ".thumb")
    assert reader.get("app.test") == TOKEN + ".thumb"
    client = redis.Redis(port=server.port)
    assert 0 < client.ttl("tlsproxy:acme/challenges/tls-alpn-01/app.test") <= 3600
    writer.delete("app.test")
    assert reader.get("app.test") is None


def test_lock_is_exclusive_renewed_and_released_by_its_owner(server: RedisServer) -> None:
    one = RedisStorage(server.url + "?lease=0.6")
    two = RedisStorage(server.url + "?lease=0.6")
    with one.lock("site"):
        with pytest.raises(LockBusy):
            two.lock("site", timeout=0.1).__enter__()
        time.sleep(1.5)  # longer than the lease: the holder keeps renewing it
        with pytest.raises(LockBusy):
            two.lock("site").__enter__()
    with two.lock("site", timeout=0.5):
        pass


def test_a_dead_holders_lock_is_taken_over_after_the_lease(server: RedisServer) -> None:
    client = redis.Redis(port=server.port)
    client.set("tlsproxy:lock:site", "someone-else", px=700)  # a holder that died
    storage = RedisStorage(server.url)
    with pytest.raises(LockBusy):
        storage.lock("site", timeout=0.1).__enter__()
    started = time.monotonic()
    with storage.lock("site", timeout=3):
        assert time.monotonic() - started < 1.5
    # our lease lost and taken over meanwhile: releasing leaves the new owner's lock alone
    with storage.lock("site"):
        client.set("tlsproxy:lock:site", "new-owner")
    assert client.get("tlsproxy:lock:site") == b"new-owner"


def test_writes_are_announced(server: RedisServer) -> None:
    storage = RedisStorage(server.url)
    seen: list[str] = []
    ready = threading.Event()

    def changed(key: str) -> None:
        seen.append(key)
        ready.set()

    stop = storage.watch(changed)
    try:
        assert ready.wait(5)  # "" once subscribed
        RedisStorage(server.url).store("acme/ca/certificates/s/meta.json", b"{}")
        deadline = time.monotonic() + 5
        while "acme/ca/certificates/s/meta.json" not in seen:
            assert time.monotonic() < deadline, seen
            time.sleep(0.02)
    finally:
        stop()


def test_unreachable_redis_answers_versions_from_memory_without_waiting(
    server: RedisServer,
) -> None:
    storage = RedisStorage(server.url)
    storage.store("k", b"v")
    known = storage.version("k")
    health: list[bool] = []  # what the proxy's tlsproxy_storage_up gauge is told
    HEALTH_HOOKS.append(health.append)
    try:
        server.stop()
        started = time.monotonic()
        for _ in range(20):
            assert storage.version("k") == known
        assert time.monotonic() - started < 1.0
        server.start()
        storage._down_until = 0.0  # skip the backoff
        assert storage.version("k") is None  # a fresh server: empty again
    finally:
        HEALTH_HOOKS.remove(health.append)
    assert health == [False, True]


def test_url_checks_and_redaction() -> None:
    assert url_problem("redis://cache:6379/0") is None
    assert url_problem("rediss://:pw@cache:6380/1?prefix=prod&lease=10") is None
    assert "not available" in str(url_problem("memcached://cache"))
    assert "lease" in str(url_problem("redis://cache/0?lease=0"))
    assert "prefix" in str(url_problem("redis://cache/0?prefix=a:b"))
    assert redacted("redis://:secret@cache:6379/0") == "redis://:***@cache:6379/0"
    assert "secret" not in RedisStorage("redis://:secret@cache:6379/0").describe("k")


def _store_new_certificate(storage: RedisStorage, ca: LocalCA, site: str) -> str:
    """What another replica's successful order writes; returns the serial."""
    chain, key = ca.issue([site], 3600)
    info = inspect(chain)
    meta = Metadata((site,), DIRECTORY).with_certificate(info, datetime.now(UTC))
    CertificateRecords(storage, DIRECTORY).save_certificate(site, chain, key, meta)
    return info.serial


@pytest.mark.parametrize("announced", [True, False], ids=["pubsub", "polling"])
async def test_a_replica_serves_what_another_stored(server: RedisServer, announced: bool) -> None:
    """With the announcement the swap is immediate; without it (a missed message) the
    regular poll still catches up."""
    storage = RedisStorage(server.url)
    renewer = Renewer(ACMESettings(DIRECTORY), storage, [HTTP01Solver(MemoryChallengeStore())])
    renewer.ari = False
    ca = LocalCA()
    first = _store_new_certificate(RedisStorage(server.url), ca, "r.test")
    poll = 30.0 if announced else 1.0
    async with maintained(server.url, renewer, ("r.test",), poll, watch=announced) as store:
        await wait_for(lambda: store.serials == [first], 3)
        await asyncio.sleep(0.2)  # subscribed by now
        second = _store_new_certificate(RedisStorage(server.url), ca, "r.test")
        started = time.monotonic()
        await wait_for(lambda: store.serials == [first, second], 3)
        assert time.monotonic() - started < (0.5 if announced else 2.0)
