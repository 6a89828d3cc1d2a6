"""Keeps each managed certificate obtained, renewed on time and installed, in every process.

Per certificate (one per site), storage holds chain, key and metadata. A process:

* at start installs a valid stored certificate at once (no order on restart);
* orders when there is none, or when renewal is due (a third of the lifetime left, or the
  CA's ARI time), under a lock in storage, re-checking storage after taking it, so of all
  processes sharing the storage only one orders and the others adopt its result;
* after a failure writes the error and the next attempt (backoff) to the metadata, and
  keeps serving the old certificate;
* polls the metadata (one ``stat`` per certificate every ``poll_interval`` seconds) and
  installs what other processes (``tlsproxy renew``, replicas) stored.

:meth:`Renewer.renew` is the synchronous core (``tlsproxy renew`` calls it directly);
:meth:`Renewer.run` is the asyncio loop of a running proxy, running orders in threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Literal

from acme_client.account import Account, ACMESettings
from acme_client.fallback import FallbackIssuer
from acme_client.interfaces import CertificateSink
from acme_client.issuer import Issuer
from acme_client.keys import inspect
from acme_client.network import ACMEFailure
from acme_client.records import CertificateRecords, Metadata, StoredCertificate
from acme_client.schedule import broken_retry_delay, next_attempt, renewal_due
from acme_client.solvers import Solver
from acme_client.storage import LockBusy, Storage

log = logging.getLogger("tlsproxy.acme")

POLL_INTERVAL = 2.0  # seconds between checks of storage for other processes' changes
MIN_SLEEP = 0.05
ARI_RETRY = timedelta(hours=1)  # after a failed renewalInfo fetch


@dataclass(frozen=True, slots=True)
class CertificateRequest:
    """One managed certificate: a storage name (the site) and every name it must cover."""

    site: str
    names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What :meth:`Renewer.renew` did.

    ``issued``: a new certificate is stored; ``fresh``: the stored one is not due (another
    process may just have renewed it); ``waiting``: a failed attempt's backoff is running;
    ``busy``: another process holds the lock; ``failed``: the order failed (``error``).
    """

    status: Literal["issued", "fresh", "waiting", "busy", "failed"]
    certificate: StoredCertificate | None = None
    meta: Metadata | None = None
    error: ACMEFailure | None = None


def now_utc() -> datetime:
    return datetime.now(UTC)


def due_time(certificate: StoredCertificate) -> datetime:
    info = certificate.info
    return renewal_due(info.not_before, info.not_after, certificate.meta.ari_renew_at)


def usable(
    certificate: StoredCertificate | None, names: tuple[str, ...], now: datetime
) -> StoredCertificate | None:
    """The certificate if it serves ``names`` now."""
    if certificate is not None and certificate.covers(names) and certificate.valid_at(now):
        return certificate
    return None


@dataclass(eq=False)
class _Managed:
    """A running proxy's view of one certificate."""

    request: CertificateRequest
    installed: str | None = None  # serial handed to the sink
    version: object = None  # storage version of meta.json last read
    meta: Metadata | None = None
    certificate: StoredCertificate | None = None
    not_before: datetime | None = None  # no attempt before this (lock was busy)
    ari_check: datetime | None = None
    task: asyncio.Task[None] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    broken: int = 0  # maintenance attempts in a row that failed outside the CA (storage down)


class Renewer:
    """Obtains, renews and installs the certificates of one CA account."""

    def __init__(
        self,
        settings: ACMESettings | Sequence[ACMESettings],
        storage: Storage,
        solvers: Sequence[Solver],
        sink: CertificateSink | None = None,
        *,
        issuer: Issuer | FallbackIssuer | None = None,
        poll_interval: float = POLL_INTERVAL,
        rng: random.Random | None = None,
        on_outcome: Callable[[bool], None] | None = None,
    ) -> None:
        chain = [settings] if isinstance(settings, ACMESettings) else list(settings)
        self.settings = chain[0]  # the first CA: where certificates are stored and locked
        self.directories = tuple(s.directory for s in chain)  # tried in this order
        self.on_outcome = on_outcome  # told of every order: True issued, False failed
        self.records = CertificateRecords(storage, self.settings.directory)
        if issuer is None:
            issuers = [Issuer(Account(s, storage), solvers) for s in chain]
            issuer = issuers[0] if len(issuers) == 1 else FallbackIssuer(issuers)
        self.issuer = issuer
        self.sink = sink
        self.poll_interval = poll_interval
        self.rng = rng or random.Random()
        self.ari: bool | None = None  # does the CA offer renewalInfo? (None: not asked yet)
        self._managed: dict[str, _Managed] = {}
        self._closed = False
        self._wakeup: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- the synchronous core ------------------------------------------------------------

    def stored(self, request: CertificateRequest) -> StoredCertificate | None:
        """The stored certificate if it serves the request's names now (no network)."""
        _meta, certificate = self.records.load(request.site)
        return usable(certificate, request.names, now_utc())

    def renew(
        self,
        request: CertificateRequest,
        *,
        force: bool = False,
        respect_backoff: bool = True,
        lock_timeout: float = 0.0,
        cancel: threading.Event | None = None,
    ) -> Outcome:
        """Order a certificate if one is needed (or ``force``), under the storage lock.

        With ``respect_backoff`` (the running proxy), a failed attempt's retry time is waited
        for; ``tlsproxy renew`` tries at once. Never raises for CA problems: they are in the
        outcome and in the metadata.
        """
        try:
            with self.records.lock(request.site, lock_timeout):
                now = now_utc()
                meta, stored = self.records.load(request.site)  # re-check under the lock
                current = usable(stored, request.names, now)
                if not force:
                    if current is not None and now < due_time(current):
                        return Outcome("fresh", current, meta)
                    retry = meta.next_attempt if meta is not None and meta.failures else None
                    if respect_backoff and retry is not None and now < retry:
                        return Outcome("waiting", current, meta)
                return self._order(request, meta, current, force, cancel)
        except LockBusy:
            return Outcome("busy")

    def _order(
        self,
        request: CertificateRequest,
        meta: Metadata | None,
        current: StoredCertificate | None,
        force: bool,
        cancel: threading.Event | None,
    ) -> Outcome:
        site, names = request.site, request.names
        if current is None:
            reason = "no valid certificate stored"
        elif force:
            reason = "forced renewal"
        else:
            reason = f"renewal due since {_iso(due_time(current))}"
        log.info(
            "site %s: ordering a certificate for %s from %s (%s)",
            site,
            " ".join(names),
            ", then ".join(self.directories),
            reason,
        )
        base = meta if meta is not None else Metadata(names, self.settings.directory)
        base = replace(base, names=names, last_attempt=now_utc())
        try:
            issued = self.issuer.obtain(names, cancel)
        except ACMEFailure as error:
            if cancel is not None and cancel.is_set():
                log.info("site %s: order stopped: %s", site, error)
                return Outcome("failed", current, meta, error)
            return self._failed(request, base, current, error)
        info = inspect(issued.chain_pem)
        new_meta = replace(base.with_certificate(info, now_utc()), directory=issued.directory)
        self.records.save_certificate(site, issued.chain_pem, issued.key_pem, new_meta)
        certificate = StoredCertificate(issued.chain_pem, issued.key_pem, new_meta, info)
        log.info(
            "site %s: certificate for %s issued by %s (%s) in %.1f s: serial %s, valid until %s, "
            "renewal due %s%s",
            site,
            " ".join(names),
            info.issuer,
            issued.directory,
            issued.seconds,
            info.serial,
            _iso(info.not_after),
            _iso(due_time(certificate)),
            f" ({issued.bad_nonces} badNonce retried)" if issued.bad_nonces else "",
        )
        return Outcome("issued", certificate, new_meta)

    def _failed(
        self,
        request: CertificateRequest,
        base: Metadata,
        current: StoredCertificate | None,
        error: ACMEFailure,
    ) -> Outcome:
        now = now_utc()
        failures = base.failures + 1
        not_after = current.info.not_after if current is not None else None
        # retries scale with the certificate's lifetime, even once it has expired
        seconds = base.lifetime
        lifetime = timedelta(seconds=seconds) if seconds is not None else None
        retry = next_attempt(
            now,
            failures,
            not_after=not_after,
            lifetime=lifetime,
            retry_after=error.retry_after,
            rng=self.rng,
        )
        meta = replace(base, last_error=str(error), failures=failures, next_attempt=retry)
        self.records.save_meta(request.site, meta)
        serving = (
            f"the current certificate (valid until {_iso(not_after)}) keeps serving"
            if not_after is not None
            else "no ACME certificate yet"
        )
        log.error(
            "site %s: certificate order for %s failed (attempt %d): %s; %s; next attempt at %s",
            request.site,
            " ".join(request.names),
            failures,
            error,
            serving,
            _iso(retry),
        )
        return Outcome("failed", current, meta, error)

    def check_renewal_info(self, request: CertificateRequest) -> datetime:
        """Ask the CA's renewalInfo (ARI) when to renew and store it; returns the next check."""
        meta, stored = self.records.load(request.site)
        if stored is None:
            return now_utc() + ARI_RETRY
        try:
            window = self.issuer.renewal_window(stored.chain_pem, stored.meta.directory)
        except ACMEFailure as exc:
            log.warning("site %s: renewalInfo check failed: %s", request.site, exc)
            return now_utc() + ARI_RETRY
        if window is None:
            self.ari = False
            return now_utc() + ARI_RETRY
        self.ari = True
        renew_at, next_check = window
        try:
            with self.records.lock(request.site, 0.0):
                meta, again = self.records.load(request.site)
                if (
                    again is not None
                    and meta is not None
                    and again.info.serial == stored.info.serial
                ):
                    meta = replace(meta, ari_renew_at=renew_at, ari_next_check=next_check)
                    self.records.save_meta(request.site, meta)
                    log.info("site %s: the CA suggests renewal at %s", request.site, _iso(renew_at))
        except LockBusy:
            pass
        return next_check

    # -- the running proxy ---------------------------------------------------------------

    def manage(
        self, requests: Iterable[CertificateRequest], installed: dict[str, str] | None = None
    ) -> None:
        """Set the certificates to maintain; ``installed`` maps sites to serials already in
        the sink. Sites no longer listed stop being maintained (their orders are cancelled)."""
        installed = installed or {}
        wanted = {r.site: r for r in requests}
        for site, managed in list(self._managed.items()):
            if site not in wanted or wanted[site] != managed.request:
                managed.cancel.set()
                del self._managed[site]
        for site, request in wanted.items():
            if site not in self._managed:
                self._managed[site] = _Managed(request, installed=installed.get(site))
            elif site in installed:
                self._managed[site].installed = installed[site]
        self._wake()

    def add(self, request: CertificateRequest, installed: str | None = None) -> None:
        """Maintain one more certificate from now on (an on-demand name), keeping the others."""
        if request.site not in self._managed:
            self._managed[request.site] = _Managed(request, installed=installed)
            self._wake()

    def action_at(self, managed: _Managed, now: datetime) -> datetime:
        """When this process should next try to order for ``managed``."""
        certificate = usable(managed.certificate, managed.request.names, now)
        when = due_time(certificate) if certificate is not None else now
        meta = managed.meta
        if meta is not None and meta.failures and meta.next_attempt is not None:
            when = max(when, meta.next_attempt)
        if managed.not_before is not None:
            when = max(when, managed.not_before)
        return when

    async def run(self) -> None:
        """Maintain the managed certificates until cancelled or :meth:`close`."""
        self._wakeup = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        try:
            while not self._closed:
                for managed in list(self._managed.values()):
                    try:
                        await self._refresh(managed)
                    except Exception:
                        log.exception("site %s: reading storage failed", managed.request.site)
                    self._schedule(managed, now_utc())
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._sleep_time()):
                        await self._wakeup.wait()
        finally:
            await self._stop_tasks()

    def close(self) -> None:
        """Stop :meth:`run` soon (another configuration replaces this renewer)."""
        self._closed = True
        for managed in self._managed.values():
            managed.cancel.set()
        self._wake()

    def _wake(self) -> None:
        """Make :meth:`run` look at its certificates now (callable from any thread)."""
        wakeup, loop = self._wakeup, self._loop
        if wakeup is not None and loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(wakeup.set)

    def _schedule(self, managed: _Managed, now: datetime) -> None:
        if managed.task is not None or managed.cancel.is_set():
            return
        loop = asyncio.get_running_loop()
        if self.action_at(managed, now) <= now:
            managed.task = loop.create_task(self._maintain(managed))  # referenced by managed
        elif self._ari_due(managed, now):
            managed.task = loop.create_task(self._check_ari(managed))

    def _ari_due(self, managed: _Managed, now: datetime) -> bool:
        if self.ari is False or managed.certificate is None:
            return False
        return managed.ari_check is None or managed.ari_check <= now

    def _sleep_time(self) -> float:
        now = now_utc()
        sleep = self.poll_interval
        for managed in self._managed.values():
            if managed.task is None:
                sleep = min(sleep, (self.action_at(managed, now) - now).total_seconds())
        return max(sleep, MIN_SLEEP)

    async def _refresh(self, managed: _Managed) -> None:
        """Re-read the metadata when another process (or we) changed it; install news."""
        version = self.records.version(managed.request.site)
        if version == managed.version and version is not None:
            return
        meta, stored = await asyncio.to_thread(self.records.load, managed.request.site)
        managed.meta = meta
        if meta is not None and meta.serial is not None and stored is None:
            return  # between a writer's files: read again on the next poll
        managed.version = version
        managed.certificate = stored
        await self._install(managed, "from storage")

    async def _install(self, managed: _Managed, how: str) -> None:
        if managed.cancel.is_set():
            return  # no longer managed (a reload removed the site): do not bring it back
        certificate = usable(managed.certificate, managed.request.names, now_utc())
        if certificate is None or certificate.info.serial == managed.installed:
            return
        if self.sink is not None:
            names = managed.request.names
            await asyncio.to_thread(
                self.sink.install, names, certificate.chain_pem, certificate.key_pem
            )
        managed.installed = certificate.info.serial
        log.info(
            "site %s: serving ACME certificate serial %s %s (valid until %s, renewal due %s)",
            managed.request.site,
            certificate.info.serial,
            how,
            _iso(certificate.info.not_after),
            _iso(due_time(certificate)),
        )

    async def _maintain(self, managed: _Managed) -> None:
        try:
            outcome = await asyncio.to_thread(self.renew, managed.request, cancel=managed.cancel)
            if outcome.status == "busy":  # another process is ordering: adopt its result
                managed.not_before = now_utc() + timedelta(seconds=self.poll_interval)
                return
            managed.not_before = None
            if self.on_outcome is not None and outcome.status in ("issued", "failed"):
                self.on_outcome(outcome.status == "issued")
            if outcome.meta is not None:
                managed.meta = outcome.meta
            if outcome.certificate is not None:
                managed.certificate = outcome.certificate
                how = "just issued" if outcome.status == "issued" else "from storage"
                await self._install(managed, how)
            managed.version = self.records.version(managed.request.site)
            managed.broken = 0
        except Exception as exc:
            # Not the CA (its errors are outcomes): storage unreachable, say. Back off
            # exponentially, 15 s to 15 min; the traceback once, then one line each time.
            managed.broken += 1
            delay = broken_retry_delay(managed.broken).total_seconds()
            if managed.broken == 1:
                log.exception("site %s: certificate maintenance failed", managed.request.site)
            else:
                log.warning(
                    "site %s: certificate maintenance failed again (%s); next try in %.0f s",
                    managed.request.site,
                    exc,
                    delay,
                )
            managed.not_before = now_utc() + timedelta(seconds=delay)
        finally:
            managed.task = None
            self._wake()

    async def _check_ari(self, managed: _Managed) -> None:
        try:
            managed.ari_check = await asyncio.to_thread(self.check_renewal_info, managed.request)
            managed.version = None  # re-read the metadata (ari_renew_at)
        except Exception:
            log.exception("site %s: renewalInfo check failed", managed.request.site)
            managed.ari_check = now_utc() + ARI_RETRY
        finally:
            managed.task = None
            self._wake()

    async def _stop_tasks(self) -> None:
        tasks = []
        for managed in self._managed.values():
            managed.cancel.set()
            if managed.task is not None:
                managed.task.cancel()
                tasks.append(managed.task)
        await asyncio.gather(*tasks, return_exceptions=True)


def _iso(when: datetime | None) -> str:
    return when.astimezone(UTC).isoformat(timespec="seconds") if when is not None else "-"
