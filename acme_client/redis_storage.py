""":class:`~acme_client.storage.Storage` in Redis, so N proxy replicas act as one.

``[tls] storage = "redis://[:password@]host:port/db?prefix=tlsproxy"`` (``rediss://`` for
TLS). Every value lives under ``<prefix>:<key>`` with a version counter beside it
(``<prefix>:version:<key>``, a ``:`` never occurs in a key, so the two cannot collide);
a write bumps the counter and publishes the key on ``<prefix>:changes`` in one transaction.

The client is redis-py's *synchronous* one on purpose: the ACME flow (orders, locks, writes)
already runs in threads, and the only calls made on the event loop are ``version`` (one GET
per certificate every poll) and HTTP-01 token lookups (one GET per CA request). Those use
short timeouts, and ``version`` stops asking for a while after a failure, so an unreachable
Redis never stalls the loop: replicas keep serving the certificates they hold in memory.

The lock is a lease (``SET NX PX`` with a random owner token), renewed by a thread while the
holder works and released by a compare-and-delete script, so only the owner frees it and a
crashed holder's lock is taken over when its lease runs out.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from acme_client.storage import LOCK_POLL, LockBusy, Version, check_key

log = logging.getLogger("tlsproxy.redis")

SCHEMES = ("redis", "rediss")
OPTIONS = ("prefix", "lease")  # our query parameters, removed before redis-py sees the URL
DEFAULT_PREFIX = "tlsproxy"
DEFAULT_LEASE = 30.0  # seconds a lock outlives a holder that stopped renewing it
CHALLENGE_TTL = 3600  # seconds: an HTTP-01 token left behind by a crash expires
TIMEOUT = 2.0  # seconds per Redis command
CONNECT_TIMEOUT = 1.0
QUICK_TIMEOUT = 0.5  # seconds, for the one call made on the event loop
MAX_BACKOFF = 30.0  # seconds between attempts while Redis is unreachable

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
_EXTEND = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""


# Told True/False when Redis becomes reachable/unreachable (the proxy feeds a metric).
HEALTH_HOOKS: list[Callable[[bool], None]] = []


def _report(up: bool) -> None:
    for hook in HEALTH_HOOKS:
        hook(up)


def url_problem(storage: str) -> str | None:
    """Why ``storage`` (a URL) cannot be used, or None; for ``check`` before anything runs."""
    url = urlsplit(storage)
    if url.scheme.lower() not in SCHEMES:
        return (
            f"{url.scheme}:// storage is not available yet; use a directory path or a redis:// URL"
        )
    if not url.hostname and not url.path:
        return f"{storage!r}: no Redis host"
    try:
        options = dict(parse_qsl(url.query, strict_parsing=bool(url.query)))
        lease = float(options.get("lease", DEFAULT_LEASE))
    except ValueError:
        return f"{redacted(storage)}: bad query (use ?prefix=NAME&lease=SECONDS)"
    if lease <= 0:
        return f"{redacted(storage)}: lease must be positive"
    if ":" in options.get("prefix", DEFAULT_PREFIX) or not options.get("prefix", "x"):
        return f"{redacted(storage)}: prefix must be non-empty, without ':'"
    return None


def redacted(storage: str) -> str:
    """The URL without its password, for logs and messages."""
    url = urlsplit(storage)
    if url.password is None:
        return storage
    netloc = f"{url.username or ''}:***@{url.hostname}" + (f":{url.port}" if url.port else "")
    return urlunsplit(url._replace(netloc=netloc))


def _client(url: str, timeout: float, connect_timeout: float) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=connect_timeout,
        retry=Retry(NoBackoff(), 0),  # fail fast: callers have their own retry policy
    )


class RedisStorage:
    """:class:`~acme_client.storage.Storage` shared by every replica using the same Redis."""

    def __init__(self, url: str, client: redis.Redis | None = None) -> None:
        parts = urlsplit(url)
        options = dict(parse_qsl(parts.query))
        self.url = redacted(url)
        self.prefix = options.get("prefix", DEFAULT_PREFIX)
        self.lease = float(options.get("lease", DEFAULT_LEASE))
        self.channel = f"{self.prefix}:changes"
        rest = [(k, v) for k, v in parse_qsl(parts.query) if k not in OPTIONS]
        plain = urlunsplit(parts._replace(query=urlencode(rest)))
        self.client = client or _client(plain, TIMEOUT, CONNECT_TIMEOUT)
        # the change check runs on the event loop: it must give up fast
        self.quick = client or _client(plain, QUICK_TIMEOUT, QUICK_TIMEOUT)
        self._versions: dict[str, Version | None] = {}  # last seen, served while Redis is down
        self._down_until = 0.0
        self._backoff = 0.0
        self._state = threading.Lock()

    def _key(self, key: str) -> str:
        return f"{self.prefix}:{check_key(key)}"

    def _version_key(self, key: str) -> str:
        return f"{self.prefix}:version:{check_key(key)}"

    def describe(self, key: str) -> str:
        return f"{self.url} key {self._key(key)}"

    def load(self, key: str) -> bytes | None:
        value = self.client.get(self._key(key))
        return value.encode() if isinstance(value, str) else value

    def store(self, key: str, data: bytes, *, private: bool = False) -> None:
        """Value, version and announcement in one MULTI (``private`` is Redis's ACL's job)."""
        ttl = CHALLENGE_TTL if key.startswith("acme/challenges/") else None
        with self.client.pipeline(transaction=True) as pipe:
            pipe.set(self._key(key), data, ex=ttl)
            pipe.incr(self._version_key(key))
            if ttl is not None:
                pipe.expire(self._version_key(key), ttl)
            else:
                pipe.publish(self.channel, key)
            pipe.execute()

    def delete(self, key: str) -> None:
        self.client.delete(self._key(key), self._version_key(key))

    def version(self, key: str) -> Version | None:
        """The write counter. While Redis is unreachable the last known value is returned
        without asking (the proxy keeps what it serves); asks again with backoff."""
        if time.monotonic() < self._down_until:
            return self._versions.get(key)
        try:
            raw = self.quick.get(self._version_key(key))
        except RedisError as exc:
            self._failed(exc)
            return self._versions.get(key)
        self._recovered()
        version = None if raw is None else (int(raw), 0, 0)
        self._versions[key] = version
        return version

    def _failed(self, exc: Exception) -> None:
        with self._state:
            first = self._backoff == 0
            self._backoff = min(MAX_BACKOFF, max(1.0, self._backoff * 2))
            self._down_until = time.monotonic() + self._backoff
        if first:
            log.warning(
                "redis %s unreachable (%s): serving the certificates in memory; "
                "renewals wait until it is back",
                self.url,
                exc,
            )
            _report(False)

    def _recovered(self) -> None:
        if self._backoff:
            with self._state:
                self._backoff, self._down_until = 0.0, 0.0
            log.warning("redis %s reachable again", self.url)
            _report(True)

    @contextlib.contextmanager
    def lock(self, name: str, timeout: float = 0.0) -> Iterator[None]:
        """A lease lock: renewed every third of the lease while held; only the owner
        releases it; a holder that died loses it when the lease runs out."""
        key = f"{self.prefix}:lock:{check_key(name)}"
        token = secrets.token_hex(16)
        lease_ms = int(self.lease * 1000)
        deadline = time.monotonic() + timeout
        while not self.client.set(key, token, nx=True, px=lease_ms):
            if time.monotonic() >= deadline:
                raise LockBusy(f"{key} is held by another process (redis {self.url})")
            time.sleep(LOCK_POLL)
        stop = threading.Event()
        keeper = threading.Thread(
            target=self._keep, args=(key, token, lease_ms, stop), name=f"lease {name}", daemon=True
        )
        keeper.start()
        try:
            yield
        finally:
            stop.set()
            keeper.join()
            try:
                self.client.eval(_RELEASE, 1, key, token)
            except RedisError as exc:  # the lease expires on its own
                log.warning("redis: releasing lock %s failed: %s", key, exc)

    def _keep(self, key: str, token: str, lease_ms: int, stop: threading.Event) -> None:
        while not stop.wait(self.lease / 3):
            try:
                if not self.client.eval(_EXTEND, 1, key, token, lease_ms):
                    log.error(
                        "redis: lock %s was lost (lease expired); another replica may order too",
                        key,
                    )
                    return
            except RedisError as exc:
                log.warning("redis: renewing lock %s failed: %s", key, exc)

    def watch(self, changed: Callable[[str], None]) -> Callable[[], None]:
        """Call ``changed(key)`` (in a thread) for every write announced by any replica, and
        with ``""`` after a reconnect (messages may have been missed). Returns a stop function."""
        stop = threading.Event()
        thread = threading.Thread(
            target=self._listen, args=(changed, stop), name="redis changes", daemon=True
        )
        thread.start()
        return stop.set

    def _listen(self, changed: Callable[[str], None], stop: threading.Event) -> None:
        backoff = 0.0
        while not stop.is_set():
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self.channel)
                if backoff:
                    log.warning("redis %s: change notifications restored", self.url)
                    backoff = 0.0
                changed("")
                while not stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        data = message.get("data")
                        changed(data.decode() if isinstance(data, bytes) else str(data))
            except (RedisError, OSError) as exc:
                if not backoff:
                    log.warning(
                        "redis %s: change notifications interrupted (%s); polling continues",
                        self.url,
                        exc,
                    )
                backoff = min(MAX_BACKOFF, max(0.5, backoff * 2))
                stop.wait(backoff)
            finally:
                with contextlib.suppress(Exception):
                    pubsub.close()
