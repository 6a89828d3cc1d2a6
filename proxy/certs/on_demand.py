"""On-demand TLS: a certificate obtained during the first handshake for a name (Caddy's model).

For a SaaS whose customers point their own names at it, the names are not known in advance.
A ClientHello for a name with no certificate that an on-demand site's hosts match (``"*"``,
or a pattern such as ``"*.customers.example.com"``) is held while:

1. the ``ask`` endpoint says whether the name may have one (``GET ask?domain=NAME``: 2xx
   yes; anything else, a timeout or an error: no), then
2. the certificate is obtained (stored, renewed and listed like any other),

and the handshake goes on with it; the very first client gets a valid certificate. Every
refusal is an alert. What keeps a flood of random server names from costing CA rate limits
or memory: IP addresses and invalid names are refused without asking; a refused name is
remembered for :data:`REFUSED_FOR`; a name whose order failed waits for the schedule's
backoff; handshakes for the same name share one attempt; at most :data:`MAX_ORDERS` orders
run at once and at most :data:`MAX_WAITING` names wait for one.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

from acme_client import schedule
from proxy.certs.store import CertStore, normalize
from proxy.config import Site
from proxy.tasks import spawn

log = logging.getLogger("tlsproxy.certs")

ASK_TIMEOUT = 5.0  # seconds for the ask endpoint's answer
WAIT = 60.0  # seconds a held handshake waits for its certificate at most
REFUSED_FOR = 60.0  # seconds a refused name is refused without asking again
MAX_ORDERS = 4  # on-demand orders running at once
MAX_WAITING = 100  # names being asked about or ordered at once; more are refused
MAX_REMEMBERED = 10_000  # refused or failing names kept (oldest forgotten first)
_NAME = re.compile(r"(?=.{1,253}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{1,63}")

Obtain = Callable[[str], Awaitable[bool]]  # name -> certificate installed?


def matches(pattern: str, name: str) -> bool:
    """An on-demand site's host pattern: ``*`` (any name), ``*.parent`` (one label under
    it), or a name itself."""
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        label, dot, parent = name.partition(".")
        return bool(label and dot) and parent == pattern[2:]
    return name == pattern


def acceptable(name: str) -> bool:
    """A DNS name a CA could issue for: not an IP address, valid labels, at least two."""
    try:
        ipaddress.ip_address(name)
        return False
    except ValueError:
        return bool(_NAME.fullmatch(name))


@dataclass
class _Failing:
    failures: int
    retry_at: float  # monotonic


class OnDemand:
    """Decides, per held ClientHello, whether and when the handshake goes on."""

    def __init__(self, store: CertStore, sites: Sequence[Site], ask: str, obtain: Obtain) -> None:
        self.store = store
        self.patterns = [host for site in sites if site.on_demand for host in site.hosts]
        self.ask_url = ask
        self.obtain = obtain
        self._pending: dict[str, asyncio.Future[bool]] = {}
        self._refused: dict[str, float] = {}  # name -> monotonic time the refusal ends
        self._failing: dict[str, _Failing] = {}
        self._orders = asyncio.Semaphore(MAX_ORDERS)

    def covers(self, name: str) -> bool:
        """Whether an on-demand site's hosts match ``name`` (normalized)."""
        return any(matches(pattern, name) for pattern in self.patterns)

    def hold(self, server_name: str | None) -> asyncio.Future[bool] | None:
        """None: no need to wait (not an on-demand name, or its certificate is installed).
        Otherwise a future: True once the certificate is installed, False to refuse."""
        if not server_name:
            return None
        name = normalize(server_name)
        if not self.covers(name) or self.store.covers(name):
            return None
        pending = self._pending.get(name)
        if pending is not None:
            return pending  # one attempt per name, however many handshakes wait for it
        refusal = self._refusal(name)
        if refusal is not None:
            log.info("on-demand certificate for %r refused: %s", name, refusal)
            return _done(False)
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending[name] = future
        spawn(self._attempt(name, future), name=f"on-demand {name}")
        return future

    def _refusal(self, name: str) -> str | None:
        """Why ``name`` is refused without asking, or None."""
        now = time.monotonic()
        if not acceptable(name):
            return "not a valid DNS name"
        if self._refused.get(name, 0.0) > now:
            return "the ask endpoint refused it recently"
        failing = self._failing.get(name)
        if failing is not None and failing.retry_at > now:
            return f"its last order failed; next attempt in {failing.retry_at - now:.0f} s"
        if len(self._pending) >= MAX_WAITING:
            return f"{MAX_WAITING} names are already waiting"
        return None

    async def _attempt(self, name: str, future: asyncio.Future[bool]) -> None:
        installed = False
        try:
            if not await asyncio.to_thread(self._allowed, name):
                _remember(self._refused, name, time.monotonic() + REFUSED_FOR)
                log.info("on-demand certificate for %s: the ask endpoint said no", name)
                return
            async with self._orders:
                installed = await asyncio.wait_for(self.obtain(name), WAIT)
        except TimeoutError:
            log.warning("on-demand certificate for %s: not obtained within %g s", name, WAIT)
        except Exception:
            log.exception("on-demand certificate for %s failed", name)
        finally:
            self._pending.pop(name, None)
            if installed:
                self._failing.pop(name, None)
            elif name not in self._refused:
                self._backoff(name)
            if not future.done():
                future.set_result(installed)

    def _backoff(self, name: str) -> None:
        failures = self._failing[name].failures + 1 if name in self._failing else 1
        delay = schedule.retry_delay(failures, timedelta(days=90)).total_seconds()
        _remember(self._failing, name, _Failing(failures, time.monotonic() + delay))

    def _allowed(self, name: str) -> bool:
        """``GET ask?domain=NAME``: 2xx allows; any other answer, an error or a timeout
        refuses (blocking: run in a thread)."""
        url = f"{self.ask_url}?{urllib.parse.urlencode({'domain': name})}"
        try:
            with urllib.request.urlopen(url, timeout=ASK_TIMEOUT) as response:
                return 200 <= int(response.status) < 300
        except urllib.error.HTTPError as error:
            return 200 <= error.code < 300
        except (OSError, ValueError) as error:
            log.warning("on-demand: asking %s about %s failed: %s", self.ask_url, name, error)
            return False


def _done(value: bool) -> asyncio.Future[bool]:
    future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


V = TypeVar("V")


def _remember(table: dict[str, V], name: str, value: V) -> None:
    """Keep at most :data:`MAX_REMEMBERED` names: the oldest is forgotten first."""
    table.pop(name, None)
    if len(table) >= MAX_REMEMBERED:
        del table[next(iter(table))]
    table[name] = value
