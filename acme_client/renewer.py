"""Keeps each managed certificate obtained, renewed on time and served, in every process.

Per certificate (one per site, or per on-demand name), storage holds chain, key and
metadata. A process:

* at start serves a valid stored certificate at once (no order on restart);
* orders when there is none, or when renewal is due (a third of the lifetime left, or the
  CA's ARI time), under a lock in storage, re-checking storage after taking it, so of all
  processes sharing the storage only one orders and the others adopt its result;
* after a failure writes the error and the next attempt (backoff) to the metadata, and
  keeps serving the old certificate;
* looks at the metadata (one ``stat`` per certificate, on every poll) and serves what other
  processes (``tlsproxy renew``, replicas) stored.

:meth:`Renewer.renew` is the synchronous core (``tlsproxy renew`` calls it directly).
:class:`Tracked` is what a running process keeps per certificate; it has no loop and no
task of its own: the proxy's one maintenance loop calls :meth:`Tracked.look` on every poll
and :meth:`Tracked.renew` when :meth:`Tracked.renewal_at` has come, each in a worker thread.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Literal

from acme_client.account import Account, ACMESettings
from acme_client.fallback import FallbackIssuer
from acme_client.issuer import Issuer
from acme_client.keys import inspect
from acme_client.network import ACMEFailure
from acme_client.records import CertificateRecords, Metadata, StoredCertificate
from acme_client.schedule import (
    ARI_RETRY,
    BUSY_RETRY,
    broken_retry_delay,
    next_attempt,
    renewal_due,
)
from acme_client.solvers import Solver
from acme_client.storage import LockBusy, Storage

log = logging.getLogger("tlsproxy.acme")


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


class Renewer:
    """Obtains and renews certificates from a list of CAs (the first one's account and
    storage layout are where certificates live), shared by every certificate it tracks."""

    def __init__(
        self,
        settings: ACMESettings | Sequence[ACMESettings],
        storage: Storage,
        solvers: Sequence[Solver],
        *,
        issuer: Issuer | FallbackIssuer | None = None,
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
        self.rng = rng or random.Random()
        self.ari: bool | None = None  # does the CA offer renewalInfo? (None: not asked yet)

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


@dataclass(eq=False)
class Tracked:
    """A running process's view of one certificate: what storage held at the last look, what
    this process serves, and when to act next.

    Not thread-safe: the caller runs one of :meth:`look` or :meth:`renew` at a time.
    """

    renewer: Renewer
    request: CertificateRequest
    serving: str | None = None  # serial of the certificate handed out to be served
    version: object = None  # storage version of meta.json at the last read
    meta: Metadata | None = None
    certificate: StoredCertificate | None = None
    not_before: datetime | None = None  # no attempt before this (lock busy, storage down)
    ari_check: datetime | None = None
    broken: int = 0  # attempts in a row that failed outside the CA (storage down)
    cancel: threading.Event = field(default_factory=threading.Event)  # set: no longer managed

    def look(self) -> StoredCertificate | None:
        """Re-read the metadata if any process changed it; the certificate to serve if that
        brought a new one (blocking: one ``stat``, or one Redis read, when nothing changed)."""
        records, site = self.renewer.records, self.request.site
        version = records.version(site)
        if version == self.version and version is not None:
            return None
        meta, stored = records.load(site)
        self.meta = meta
        if meta is not None and meta.serial is not None and stored is None:
            return None  # between a writer's files: read again on the next look
        self.version = version
        self.certificate = stored
        return self._news()

    def _news(self) -> StoredCertificate | None:
        certificate = usable(self.certificate, self.request.names, now_utc())
        if certificate is None or certificate.info.serial == self.serving:
            return None
        self.serving = certificate.info.serial
        return certificate

    def renewal_at(self, now: datetime) -> datetime:
        """When :meth:`renew` has something to do: an order (the schedule's due time, held
        back by a failure's backoff or a busy lock), or an ARI check, whichever is first."""
        order, ari = self._order_at(now), self._ari_at(now)
        return order if ari is None else min(order, ari)

    def _order_at(self, now: datetime) -> datetime:
        certificate = usable(self.certificate, self.request.names, now)
        when = due_time(certificate) if certificate is not None else now
        meta = self.meta
        if meta is not None and meta.failures and meta.next_attempt is not None:
            when = max(when, meta.next_attempt)
        if self.not_before is not None:
            when = max(when, self.not_before)
        return when

    def _ari_at(self, now: datetime) -> datetime | None:
        if self.renewer.ari is False or self.certificate is None:
            return None
        return self.ari_check or now

    def renew(self, now: datetime) -> StoredCertificate | None:
        """Order if due (else ask the CA's ARI when that is due); the certificate to serve
        if there is a new one. Never raises: CA errors are in the metadata, and other
        failures (storage down) back off, 15 s doubling to 15 min."""
        ari = self._ari_at(now)
        if ari is not None and ari <= now and self._order_at(now) > now:
            try:
                self.ari_check = self.renewer.check_renewal_info(self.request)
            except Exception:
                log.exception("site %s: renewalInfo check failed", self.request.site)
                self.ari_check = now_utc() + ARI_RETRY
            self.version = None  # read the metadata again (ari_renew_at)
            return None
        try:
            return self._order()
        except Exception as exc:
            self.broken += 1
            delay = broken_retry_delay(self.broken)
            site = self.request.site
            if self.broken == 1:
                log.exception("site %s: certificate maintenance failed", site)
            else:
                log.warning(
                    "site %s: certificate maintenance failed again (%s); next try in %.0f s",
                    site,
                    exc,
                    delay.total_seconds(),
                )
            self.not_before = now_utc() + delay
            return None

    def _order(self) -> StoredCertificate | None:
        outcome = self.renewer.renew(self.request, cancel=self.cancel)
        if outcome.status == "busy":  # another process is ordering: adopt its result
            self.not_before = now_utc() + BUSY_RETRY
            return None
        self.not_before = None
        self.broken = 0
        on_outcome = self.renewer.on_outcome
        if on_outcome is not None and outcome.status in ("issued", "failed"):
            on_outcome(outcome.status == "issued")
        if outcome.meta is not None:
            self.meta = outcome.meta
        if outcome.certificate is not None:
            self.certificate = outcome.certificate
        self.version = self.renewer.records.version(self.request.site)
        return self._news()


def _iso(when: datetime | None) -> str:
    return when.astimezone(UTC).isoformat(timespec="seconds") if when is not None else "-"
