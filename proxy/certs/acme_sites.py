"""ACME-managed sites inside the proxy: ``acme_client``'s renewer wired to the certificate store.

Sites without cert/key files under ``issuer = "acme"`` get their certificates from the CA in
``[acme]``. At start a valid stored certificate is served at once; a site without one gets a
temporary certificate from the internal CA (so handshakes work and the log says why) until
the renewer installs the real one. The renewer runs for the life of the proxy and installs
renewals, and certificates other processes (``tlsproxy renew``) put in storage, without a
restart.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

from acme_client.account import ACMESettings
from acme_client.challenges import StorageChallengeStore
from acme_client.interfaces import ChallengeStore, MemoryChallengeStore
from acme_client.location import open_storage
from acme_client.ondemand_index import OnDemandIndex
from acme_client.records import CertificateRecords
from acme_client.redis_storage import HEALTH_HOOKS
from acme_client.renewer import CertificateRequest, Renewer, due_time, usable
from acme_client.schedule import renewal_due
from acme_client.storage import Storage
from acme_client.tlsalpn import ALPNChallenges
from proxy import metrics
from proxy.certs.internal_ca import InternalCA
from proxy.certs.solvers import solvers_for
from proxy.certs.store import CertEntry, CertStore, make_entry, safe_name
from proxy.config import ACMEConfig, Site, TLSConfig

log = logging.getLogger("tlsproxy.certs")
if metrics.storage_up not in HEALTH_HOOKS:
    HEALTH_HOOKS.append(metrics.storage_up)  # Redis outages show on /metrics

TEMPORARY_LIFETIME = timedelta(days=7)
TEMPORARY_SOURCE = "temporary: waiting for the ACME certificate"
IDLE = 1.0  # seconds between looks for a renewer while no site uses ACME
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


_local: dict[str, Path] = {}


def local_directory(tls: TLSConfig) -> Path:
    """Where the internal CA of temporary certificates lives: the storage directory, or,
    with Redis storage, a private directory of this process (temporary certificates are
    never shared)."""
    if tls.location.directory is not None:
        return tls.location.directory
    if tls.storage not in _local:
        _local[tls.storage] = Path(tempfile.mkdtemp(prefix="tlsproxy-"))
    return _local[tls.storage]


def watch_changes(storage: Storage, renewer: Renewer) -> Callable[[], None] | None:
    """With Redis storage, wake the renewer when any replica announces a write, so new
    certificates are installed at once; polling still catches a missed announcement."""
    watch = getattr(storage, "watch", None)
    if watch is None:
        return None

    def changed(key: str) -> None:
        if not key or key.endswith("/meta.json"):
            renewer._wake()

    stop: Callable[[], None] = watch(changed)
    return stop


def uses_acme(site: Site, tls: TLSConfig) -> bool:
    """A site whose hosts get one ACME certificate (on-demand sites' names get one each)."""
    return tls.issuer == "acme" and site.cert is None and site.key is None and not site.on_demand


def request_for(site: Site) -> CertificateRequest:
    return CertificateRequest(safe_name(site.name), site.hosts)


def ca_label(directory: str) -> str:
    """``acme:<CA host>`` for the ``certs`` table's issuer column."""
    return f"acme:{urlsplit(directory).netloc or directory}"


class _Sink:
    """The certificate store as the renewer's ``CertificateSink``, labelled with the CA that
    issued the certificate (its metadata says which, when several are configured)."""

    def __init__(self, owner: ACMESites, store: CertStore, records: CertificateRecords) -> None:
        self.owner = owner
        self.store = store
        self.records = records

    def install(self, names: Sequence[str], chain_pem: bytes, key_pem: bytes) -> None:
        meta = self.records.meta(safe_name(names[0]))
        source = meta.directory if meta is not None else self.records.directory_url
        self.store.install(names, chain_pem, key_pem, issuer="acme", source=source)
        self.owner.temporary.pop(tuple(names), None)


@dataclass
class Plan:
    """What :meth:`ACMESites.prepare` found; :meth:`ACMESites.commit` applies it."""

    renewer: Renewer | None
    requests: list[CertificateRequest]
    key: tuple[ACMEConfig, str, bool] | None = None  # what the renewer is built for
    entries: list[CertEntry] = field(default_factory=list)
    installed: dict[str, str] = field(default_factory=dict)  # site -> serial of stored certs
    temporary: dict[tuple[str, ...], tuple[Site, Path]] = field(default_factory=dict)
    on_demand: bool = False  # an on-demand site is configured
    keep: list[str] = field(default_factory=list)  # names served beyond the sites' hosts


PLACEHOLDER = "on-demand.invalid"  # the default certificate's name when only on-demand sites


class ACMESites:
    """The ACME part of the certificate manager."""

    def __init__(
        self,
        store: CertStore,
        challenges: ChallengeStore,
        load_ca: Callable[[Site, Path], InternalCA],
    ) -> None:
        self.store = store
        self.challenges = challenges
        self.load_ca = load_ca
        self.renewer: Renewer | None = None
        self.temporary: dict[tuple[str, ...], tuple[Site, Path]] = {}  # names -> site, storage
        self._key: tuple[ACMEConfig, str, bool] | None = None  # what the renewer was built for
        self._requests: list[CertificateRequest] = []
        self._unwatch: Callable[[], None] | None = None
        self.demanded: set[str] = set()  # names this process obtained on demand

    def prepare(
        self, sites: Sequence[Site], tls: TLSConfig, acme: ACMEConfig, http_listen: bool = True
    ) -> Plan:
        """Certificates to install now for ``sites`` (stored or temporary); nothing changes yet.

        Blocking (storage reads, the internal CA): call it in a thread from async code.
        """
        on_demand = tls.issuer == "acme" and any(s.on_demand for s in sites)
        sites = [s for s in sites if uses_acme(s, tls)]
        if not sites and not on_demand:
            return Plan(None, [])
        settings = settings_for(acme)
        renewer = self.renewer
        key = (acme, tls.storage, http_listen)
        if renewer is None or self._key != key:
            storage = open_storage(tls.location)
            if tls.location.shared_url:
                metrics.storage_up(True)  # until Redis says otherwise
            renewer = Renewer(
                settings,
                storage,
                solvers_for(
                    acme, self.challenges, ALPNChallenges(storage), http_listen=http_listen
                ),
                _Sink(self, self.store, CertificateRecords(storage, acme.cas[0].directory)),
                on_outcome=metrics.acme_renewal,
            )
        demanded = [Site((n,), ()) for n in self._demanded(renewer)] if on_demand else []
        plan = Plan(renewer, [request_for(s) for s in [*sites, *demanded]], key)
        plan.on_demand, plan.keep = on_demand, [s.name for s in demanded]
        for site, request in zip([*sites, *demanded], plan.requests, strict=True):
            if renewer is self.renewer and request in self._requests:
                continue  # already served: the store has it, the renewer keeps it fresh
            try:
                stored = renewer.stored(request)
            except Exception as exc:
                if not tls.location.shared_url:
                    raise
                log.warning("site %s: storage unreachable (%s)", site.name, exc)
                stored = None
            if stored is not None:
                plan.entries.append(
                    make_entry(
                        site.hosts,
                        stored.chain_pem,
                        stored.key_pem,
                        issuer="acme",
                        source=stored.meta.directory,
                    )
                )
                plan.installed[request.site] = stored.info.serial
                log.info(
                    "site %s: using the stored ACME certificate serial %s (valid until %s, "
                    "renewal due %s)",
                    site.name,
                    stored.info.serial,
                    _iso(stored.info.not_after),
                    _iso(due_time(stored)),
                )
            elif site not in demanded and not self._serving(site):
                plan.entries.append(self._temporary(site, local_directory(tls)))
                plan.temporary[site.hosts] = (site, local_directory(tls))
        if on_demand and not plan.entries and self.store.default is None:
            placeholder = Site((PLACEHOLDER,), ())  # for clients that send no server name
            plan.entries.append(self._temporary(placeholder, local_directory(tls)))
            plan.temporary[placeholder.hosts] = (placeholder, local_directory(tls))
            plan.keep.append(PLACEHOLDER)
        return plan

    def _demanded(self, renewer: Renewer) -> list[str]:
        """The names that got a certificate on demand (in storage: every process's)."""
        return OnDemandIndex(renewer.records.storage).names()

    async def obtain_on_demand(self, name: str) -> bool:
        """Get ``name`` a certificate (stored, or ordered now) and serve it; True when it is
        installed. From then on it is renewed and listed like a site's."""
        renewer = self.renewer
        if renewer is None:
            return False
        request = CertificateRequest(safe_name(name), (name,))
        outcome = await asyncio.to_thread(renewer.renew, request, lock_timeout=LOCK_WAIT)
        certificate = outcome.certificate
        if certificate is None or renewer is not self.renewer:
            return False
        source = certificate.meta.directory
        chain, key = certificate.chain_pem, certificate.key_pem
        await asyncio.to_thread(self.store.install, (name,), chain, key, source=source)
        renewer.add(request, certificate.info.serial)
        self.demanded.add(name)
        await asyncio.to_thread(OnDemandIndex(renewer.records.storage).add, name)
        log.info("on-demand certificate for %s: serving serial %s", name, certificate.info.serial)
        return True

    def _serving(self, site: Site) -> bool:
        """A reload that changes the CA keeps the current ACME certificate until the new CA
        has issued one (rather than falling back to a temporary certificate)."""
        entry = self.store.get(site.hosts[0])
        return (
            entry is not None
            and entry.issuer == "acme"
            and set(site.hosts) <= set(entry.names)
            and entry.not_before <= datetime.now(UTC) < entry.not_after
        )

    def _temporary(self, site: Site, storage: Path) -> CertEntry:
        ca = self.load_ca(site, storage)
        chain_pem, key_pem = ca.issue(site.hosts, TEMPORARY_LIFETIME)
        log.warning(
            "site %s: no ACME certificate in storage yet: serving a temporary certificate from "
            "the internal CA (not publicly trusted) until the CA issues one",
            site.name,
        )
        return make_entry(
            site.hosts, chain_pem, key_pem, issuer="internal", source=TEMPORARY_SOURCE
        )

    def commit(self, plan: Plan) -> None:
        """After the plan's entries are installed: switch renewers, manage the new site list."""
        if plan.renewer is not self.renewer and self.renewer is not None:
            self.renewer.close()
        if plan.renewer is not self.renewer:
            if self._unwatch is not None:
                self._unwatch()
            self._unwatch = None
            if plan.renewer is not None:
                self._unwatch = watch_changes(plan.renewer.records.storage, plan.renewer)
        self.renewer = plan.renewer
        wanted = {r.names for r in plan.requests}
        kept = {names: value for names, value in self.temporary.items() if names in wanted}
        self.temporary = kept | plan.temporary
        self._requests = plan.requests
        if plan.renewer is None:
            self._key = None
            return
        self._key = plan.key
        plan.renewer.manage(plan.requests, plan.installed)

    async def run(self) -> None:
        """Run the current renewer (and its successors after reloads) until cancelled."""
        while True:
            renewer = self.renewer
            if renewer is None:
                await asyncio.sleep(IDLE)
                continue
            await renewer.run()  # returns once a reload has replaced (closed) it

    def temporary_due(self, now: datetime) -> bool:
        """Whether a temporary certificate still served is due for a re-issue."""
        return any(self._due_temporary(names, now) for names in list(self.temporary))

    def _due_temporary(self, names: tuple[str, ...], now: datetime) -> bool:
        entry = self.store.get(names[0])
        if entry is None or entry.source != TEMPORARY_SOURCE:
            return False
        return now >= renewal_due(entry.not_before, entry.not_after)

    def keep_temporaries(self, now: datetime) -> None:
        """A temporary certificate outlives a long CA outage: re-issued when due (blocking;
        the certificate manager's maintenance pass calls it with the files and leaves)."""
        for names, (site, storage) in list(self.temporary.items()):
            if not self._due_temporary(names, now):
                continue
            try:
                new = self._temporary(site, storage)
            except Exception:
                log.exception("site %s: temporary certificate failed", site.name)
                continue
            if names in self.temporary:
                self.store.install_entry(new)


@dataclass(frozen=True, slots=True)
class ACMEStatus:
    """One ``certs`` row for an ACME site, read from storage (no CA contact)."""

    not_after: str
    next_renewal: str
    last_error: str | None
    issuer: str


def describe(site: Site, tls: TLSConfig, acme: ACMEConfig) -> ACMEStatus:
    records = CertificateRecords(open_storage(tls.location), acme.cas[0].directory)
    request = request_for(site)
    meta, stored = records.load(request.site)
    now = datetime.now(UTC)
    current = usable(stored, request.names, now)
    issued_by = current.meta.directory if current is not None else acme.cas[0].directory
    label = ca_label(issued_by)
    retry = meta.next_attempt if meta is not None and meta.failures else None
    error = meta.last_error if meta is not None else None
    if current is None:
        when = _iso(retry) if retry is not None else "when the proxy starts"
        return ACMEStatus("-", when, error, label)
    due = due_time(current)
    if retry is not None:
        due = max(due, retry)
    return ACMEStatus(_iso(current.info.not_after), _iso(due), error, label)


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="seconds")
