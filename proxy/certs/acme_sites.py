"""ACME certificates as a certificate source: ``acme_client``'s renewer behind the protocol
of :mod:`proxy.certs.protocol`.

Each site without cert/key files under ``issuer = "acme"``, and each name obtained on
demand, is one :class:`ACMESource`. When it starts being managed, a valid stored
certificate is served at once; a site without one is served a temporary certificate
(:mod:`proxy.certs.internal`) until its CA has issued, so handshakes work and the log says
why. An on-demand name gets no stand-in: its first handshake waits for the real one.
Renewals, and certificates other processes put in storage (``tlsproxy renew``, replicas),
are served without a restart.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from urllib.parse import urlsplit

from acme_client.account import ACMESettings
from acme_client.challenges import StorageChallengeStore
from acme_client.interfaces import ChallengeStore, MemoryChallengeStore
from acme_client.location import open_storage
from acme_client.records import CertificateRecords, StoredCertificate
from acme_client.redis_storage import HEALTH_HOOKS
from acme_client.renewer import CertificateRequest, Renewer, Tracked, due_time, usable
from acme_client.storage import Storage
from acme_client.tlsalpn import ALPNChallenges
from proxy import metrics
from proxy.certs.internal import TEMPORARY_SOURCE as TEMPORARY_SOURCE
from proxy.certs.internal import TemporarySource
from proxy.certs.protocol import CertificateError, CertificateStatus
from proxy.certs.solvers import solvers_for
from proxy.certs.store import CertEntry, make_entry, safe_name
from proxy.config import ACMEConfig, Site, TLSConfig

log = logging.getLogger("tlsproxy.certs")
if metrics.storage_up not in HEALTH_HOOKS:
    HEALTH_HOOKS.append(metrics.storage_up)  # Redis outages show on /metrics

LOCK_WAIT = 50.0  # seconds an on-demand order waits while another process orders that name


def settings_for(acme: ACMEConfig) -> list[ACMESettings]:
    """Each CA to ask, in order (``[[acme.issuers]]``, or ``[acme] directory``)."""
    return [
        ACMESettings(
            directory=ca.directory,
            email=ca.email,
            ca_bundle=ca.ca_bundle,
            eab_kid=ca.eab_kid,
            eab_hmac_key=ca.eab_hmac_key,
        )
        for ca in acme.cas
    ]


def challenge_store_for(tls: TLSConfig) -> ChallengeStore:
    """Tokens in storage, so every process sharing it (and ``tlsproxy renew``, and every
    replica on the same Redis) can answer."""
    if tls.location.kind == "unsupported":  # refused by start_problems before anything runs
        return MemoryChallengeStore()
    return StorageChallengeStore(open_storage(tls.location))


def watch_changes(storage: Storage, changed: Callable[[], None]) -> Callable[[], None] | None:
    """With Redis storage, call ``changed`` (in a thread) when any replica announces a
    certificate's write, so it is served at once; polling still catches a missed one.
    Returns the function that stops watching, or None for storage that cannot announce."""
    watch = getattr(storage, "watch", None)
    if watch is None:
        return None

    def announced(key: str) -> None:
        if not key or key.endswith("/meta.json"):
            changed()

    stop: Callable[[], None] = watch(announced)
    return stop


def uses_acme(site: Site, tls: TLSConfig) -> bool:
    """A site whose hosts get one ACME certificate (on-demand sites' names get one each)."""
    return tls.issuer == "acme" and site.cert is None and site.key is None and not site.on_demand


def request_for(site: Site) -> CertificateRequest:
    return CertificateRequest(safe_name(site.name), site.hosts)


def ca_label(directory: str) -> str:
    """``acme:<CA host>`` for the ``certs`` table's issuer column."""
    return f"acme:{urlsplit(directory).netloc or directory}"


class Issuance:
    """What every ACME source of one configuration shares: the storage, and the renewer
    (CA accounts and challenge solvers), built when the first source needs it."""

    def __init__(
        self,
        tls: TLSConfig,
        acme: ACMEConfig,
        challenges: ChallengeStore,
        *,
        http_listen: bool,
        on_change: Callable[[], None] | None = None,
        renewer: Renewer | None = None,
    ) -> None:
        self.tls = tls
        self.acme = acme
        self.challenges = challenges
        self.http_listen = http_listen  # something answers HTTP-01 (server.http_listen)
        self.on_change = on_change  # another process stored a certificate
        self.storage = open_storage(tls.location)
        self.records = CertificateRecords(self.storage, acme.cas[0].directory)
        self._renewer = renewer  # built on first need, unless given (tests: a fake CA)
        self._unwatch: Callable[[], None] | None = None
        self._watching = False
        self._lock = threading.Lock()

    def renewer(self) -> Renewer:
        """The renewer (blocking the first time: a DNS-01 secret file is read).

        Raises ``OSError``/``ValueError`` when the solvers cannot be made.
        """
        with self._lock:
            if self._renewer is None:
                solvers = solvers_for(
                    self.acme,
                    self.challenges,
                    ALPNChallenges(self.storage),
                    http_listen=self.http_listen,
                )
                if self.tls.location.shared_url:
                    metrics.storage_up(True)  # until Redis says otherwise
                self._renewer = Renewer(
                    settings_for(self.acme),
                    self.storage,
                    solvers,
                    on_outcome=metrics.acme_renewal,
                )
            if not self._watching and self.on_change is not None:
                self._watching = True
                self._unwatch = watch_changes(self.storage, self.on_change)
            return self._renewer

    def close(self) -> None:
        """Stop watching storage (another configuration replaces this one)."""
        with self._lock:
            if self._unwatch is not None:
                self._unwatch()
            self._unwatch = None


class ACMESource:
    """One ACME certificate: a site's hosts, or one on-demand name (no ``temporary``)."""

    def __init__(
        self, names: tuple[str, ...], issuance: Issuance, temporary: TemporarySource | None
    ) -> None:
        self.names = names
        self.issuance = issuance
        self.temporary = temporary
        self.request = CertificateRequest(safe_name(names[0]), names)
        self.tracked: Tracked | None = None  # once loaded
        self.standing_in = False  # the temporary certificate is what is served
        self._cancel = threading.Event()

    @property
    def identity(self) -> tuple[object, ...]:
        issuance = self.issuance
        key = (issuance.tls.storage, issuance.acme, issuance.http_listen)
        return ("acme", self.names, key, self.temporary is not None)

    def _renewer(self) -> Renewer:
        try:
            return self.issuance.renewer()
        except (OSError, ValueError) as exc:
            raise CertificateError(self.names[0], f"ACME: {exc}") from exc

    def load(self, serving: CertEntry | None) -> CertEntry | None:
        tracked = Tracked(self._renewer(), self.request, cancel=self._cancel)
        self.tracked = tracked
        try:
            stored = tracked.look()
        except Exception as exc:
            if not self.issuance.tls.location.shared_url:
                raise CertificateError(self.names[0], f"reading storage: {exc}") from exc
            log.warning("site %s: storage unreachable (%s)", self.names[0], exc)
            stored = None
        if stored is not None:
            log.info(
                "site %s: using the stored ACME certificate serial %s (valid until %s, "
                "renewal due %s)",
                self.names[0],
                stored.info.serial,
                _iso(stored.info.not_after),
                _iso(due_time(stored)),
            )
            return self._entry(stored)
        if self.temporary is None or _serves_acme(serving, self.names):
            return None
        log.warning(
            "site %s: no ACME certificate in storage yet: serving a temporary certificate from "
            "the internal CA (not publicly trusted) until the CA issues one",
            self.names[0],
        )
        self.standing_in = True
        return self.temporary.load()

    def look(self) -> CertEntry | None:
        certificate = self.tracked.look() if self.tracked is not None else None
        return self._serve(certificate, "from storage")

    def due(self, now: datetime) -> datetime | None:
        if self.tracked is None:
            return None
        at = self.tracked.renewal_at(now)
        if self.standing_in and self.temporary is not None:
            at = min(at, self.temporary.due(now))
        return at

    def renew(self, now: datetime) -> CertEntry | None:
        tracked = self.tracked
        if tracked is not None and tracked.renewal_at(now) <= now:
            entry = self._serve(tracked.renew(now), "after the order")
            if entry is not None:
                return entry
        if self.standing_in and self.temporary is not None and self.temporary.due(now) <= now:
            return self.temporary.renew(now)  # outlives a long CA outage
        return None

    def obtain(self) -> bool:
        """Order now, waiting up to :data:`LOCK_WAIT` while another process orders the same
        certificate (on demand: a handshake is waiting); True when storage has one."""
        renewer = self._renewer()
        outcome = renewer.renew(self.request, lock_timeout=LOCK_WAIT, cancel=self._cancel)
        return outcome.certificate is not None

    def close(self) -> None:
        self._cancel.set()

    def status(self) -> CertificateStatus:
        try:
            return describe(self.names, self.issuance.records)
        except Exception as exc:  # e.g. Redis storage unreachable: say so in the row
            return CertificateStatus(self.names, "acme", "-", "-", f"storage: {exc}")

    def _serve(self, certificate: StoredCertificate | None, how: str) -> CertEntry | None:
        if certificate is None:
            return None
        self.standing_in = False
        log.info(
            "site %s: serving ACME certificate serial %s %s (valid until %s, renewal due %s)",
            self.names[0],
            certificate.info.serial,
            how,
            _iso(certificate.info.not_after),
            _iso(due_time(certificate)),
        )
        return self._entry(certificate)

    def _entry(self, certificate: StoredCertificate) -> CertEntry:
        return make_entry(
            self.names,
            certificate.chain_pem,
            certificate.key_pem,
            issuer="acme",
            source=certificate.meta.directory,
        )


def _serves_acme(serving: CertEntry | None, names: tuple[str, ...]) -> bool:
    """A reload that changes the CA keeps the current ACME certificate until the new CA
    has issued one (rather than falling back to a temporary certificate)."""
    return (
        serving is not None
        and serving.issuer == "acme"
        and set(names) <= set(serving.names)
        and serving.not_before <= datetime.now(UTC) < serving.not_after
    )


def describe(names: tuple[str, ...], records: CertificateRecords) -> CertificateStatus:
    """The ``certs`` row of the certificate for ``names``, from storage (no CA contact)."""
    request = CertificateRequest(safe_name(names[0]), names)
    meta, stored = records.load(request.site)
    current = usable(stored, request.names, datetime.now(UTC))
    label = ca_label(current.meta.directory if current is not None else records.directory_url)
    retry = meta.next_attempt if meta is not None and meta.failures else None
    error = meta.last_error if meta is not None else None
    if current is None:
        when = _iso(retry) if retry is not None else "when the proxy starts"
        return CertificateStatus(names, label, "-", when, error)
    due = due_time(current)
    if retry is not None:
        due = max(due, retry)
    return CertificateStatus(names, label, _iso(current.info.not_after), _iso(due), error)


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="seconds")
