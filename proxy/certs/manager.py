"""The certificates a proxy serves, managed by name, and the one loop that keeps them fresh.

certmagic's model: a set of managed certificates that grows and shrinks at run time
(:meth:`CertificateManager.update`: the sites of a reload or of container labels, a name
obtained on demand), each behind the one :class:`~proxy.certs.protocol.Source` protocol,
and one maintenance loop (:meth:`CertificateManager.run`), a single task that

* every ``poll_interval`` seconds looks at all sources in one worker thread (files
  rewritten, certificates other processes stored): cheap;
* when a source is due (its answer comes from the schedule), runs its renewal in a small
  thread pool of its own: an ACME order can take minutes (DNS-01 propagation), and must
  hold up neither the looks nor more renewals than the pool has threads;
* then sleeps until the next poll or the earliest due time, or until woken (a source
  added, a renewal finished, another replica's announcement).

Every certificate is installed from the event loop, and only while its source is still
managed, so a removed name never comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

from proxy.certs.protocol import Source
from proxy.certs.store import CertEntry, CertStore

log = logging.getLogger("tlsproxy.certs")

POLL_INTERVAL = 2.0  # seconds between looks at files and storage (the contract says <= 10 s)
MAX_RENEWALS = 4  # renewals (orders, re-issues) running at once
MIN_SLEEP = 0.05  # never spin, whatever the due times say

Names = tuple[str, ...]


@dataclass(eq=False)
class _Managed:
    source: Source
    busy: bool = False  # a look or a renewal of it is running: never both at once


class CertificateManager:
    """Which certificates are served, by names; :meth:`run` keeps them fresh."""

    def __init__(
        self,
        store: CertStore,
        *,
        poll_interval: float = POLL_INTERVAL,
        renewals: int = MAX_RENEWALS,
    ) -> None:
        self.store = store
        self.poll_interval = poll_interval
        self.renewals = renewals
        self._managed: dict[Names, _Managed] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup = asyncio.Event()
        self._look_at = 0.0  # loop time of the next look

    def names(self) -> list[Names]:
        """The names of each managed certificate, in the order they were added."""
        return list(self._managed)

    def source(self, names: Names) -> Source | None:
        managed = self._managed.get(names)
        return managed.source if managed is not None else None

    # -- the managed set ------------------------------------------------------------------

    async def update(self, add: Sequence[Source] = (), remove: Iterable[Names] = ()) -> None:
        """Start managing ``add`` (each replacing the source with the same names) and stop
        managing and serving ``remove``.

        Every added source is loaded (in a thread) before anything changes, so a
        :class:`~proxy.certs.protocol.CertificateError` leaves everything as it was. Then
        the switch happens with no await in between: no handshake sees half of it.
        """
        loaded = await asyncio.to_thread(self._load, add)
        replaced = {source.names for source in add}
        kept = {name for source in add for name in source.names}  # served on, maybe anew
        for names in remove:
            managed = self._managed.pop(names, None) if names not in replaced else None
            if managed is not None:
                managed.source.close()
                self.store.remove([name for name in names if name not in kept])
                log.info("certificate for %s: no longer served or renewed", " ".join(names))
        for source, entry in loaded:
            old = self._managed.get(source.names)
            if old is not None:
                old.source.close()
            self._managed[source.names] = _Managed(source)
            if entry is not None:
                self.store.install_entry(entry)
        self._wake()

    def _load(self, sources: Sequence[Source]) -> list[tuple[Source, CertEntry | None]]:
        return [(source, source.load(self.store.get(source.names[0]))) for source in sources]

    async def replace_all(self, sources: Sequence[Source]) -> None:
        """Manage exactly ``sources`` (at start, and on reload): one whose identity is
        already managed keeps running untouched, the others are loaded as by
        :meth:`update`, and those no longer wanted stop."""
        wanted = {source.names for source in sources}
        add = [
            source
            for source in sources
            if (managed := self._managed.get(source.names)) is None
            or managed.source.identity != source.identity
        ]
        await self.update(add, [names for names in self._managed if names not in wanted])

    # -- the one maintenance loop ---------------------------------------------------------

    async def run(self) -> None:
        """Keep every managed certificate fresh until cancelled."""
        loop = self._loop = asyncio.get_running_loop()
        pool = ThreadPoolExecutor(self.renewals, thread_name_prefix="certificate renewal")
        try:
            while True:
                if loop.time() >= self._look_at:
                    self._look_at = loop.time() + self.poll_interval
                    await self._look()
                self._start_renewals(pool)
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._sleep_time()):
                        await self._wakeup.wait()
        finally:
            for managed in self._managed.values():
                managed.source.close()  # orders in flight stop at their next step
            pool.shutdown(wait=False, cancel_futures=True)

    def look_soon(self) -> None:
        """Look at every source now rather than at the next poll (from any thread: another
        replica announced a new certificate)."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(self._look_now)

    def _look_now(self) -> None:
        self._look_at = 0.0
        self._wake()

    def _wake(self) -> None:
        self._wakeup.set()

    async def _look(self) -> None:
        idle = [managed for managed in self._managed.values() if not managed.busy]
        for managed in idle:
            managed.busy = True
        try:
            found = await asyncio.to_thread(_look_all, idle)
        finally:
            for managed in idle:
                managed.busy = False
        for managed, entry in found:
            self._install(managed, entry)

    def _start_renewals(self, pool: ThreadPoolExecutor) -> None:
        now = datetime.now(UTC)
        for managed in self._managed.values():
            due = None if managed.busy else managed.source.due(now)
            if due is None or due > now:
                continue
            managed.busy = True
            future = pool.submit(managed.source.renew, now)
            future.add_done_callback(functools.partial(self._renewed_soon, managed))

    def _renewed_soon(self, managed: _Managed, future: Future[CertEntry | None]) -> None:
        """In the pool's thread: hand the result to the event loop."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to serve
                loop.call_soon_threadsafe(self._renewed, managed, future)

    def _renewed(self, managed: _Managed, future: Future[CertEntry | None]) -> None:
        managed.busy = False
        if not future.cancelled():
            error = future.exception()
            if error is not None:
                names = " ".join(managed.source.names)
                log.error("certificate for %s: renewal failed", names, exc_info=error)
            else:
                entry = future.result()
                if entry is not None:
                    self._install(managed, entry)
        self._wake()

    def _install(self, managed: _Managed, entry: CertEntry) -> None:
        if self._managed.get(managed.source.names) is managed:  # not removed meanwhile
            self.store.install_entry(entry)

    def _sleep_time(self) -> float:
        """Until the next look or the earliest due time (survives clock jumps)."""
        assert self._loop is not None
        sleep = self._look_at - self._loop.time()
        now = datetime.now(UTC)
        for managed in self._managed.values():
            due = None if managed.busy else managed.source.due(now)
            if due is not None:
                sleep = min(sleep, (due - now).total_seconds())
        return max(sleep, MIN_SLEEP)


def _look_all(sources: list[_Managed]) -> list[tuple[_Managed, CertEntry]]:
    """One look at each source (in a worker thread); what changed."""
    found = []
    for managed in sources:
        try:
            entry = managed.source.look()
        except Exception:  # the loop must survive anything one source does
            log.exception("certificate for %s: look failed", " ".join(managed.source.names))
            continue
        if entry is not None:
            found.append((managed, entry))
    return found
