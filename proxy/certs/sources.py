"""Where certificates come from: a site's own files, the internal CA, or an ACME CA.

:class:`CertificateManager` loads every source at start (errors name the site), then keeps
them fresh in one cancellable loop: file pairs are re-read when they change on disk, internal
leaves are re-issued when a third of their lifetime remains. A bad update is logged and the
old certificate keeps serving. ACME sites are delegated to :mod:`proxy.certs.acme_sites` (stored
certificate or a temporary one at start, then ``acme_client``'s renewer).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from acme_client import schedule
from acme_client.interfaces import ChallengeStore, MemoryChallengeStore
from acme_client.location import open_storage
from acme_client.ondemand_index import OnDemandIndex
from proxy.certs import acme_sites
from proxy.certs.internal_ca import DEFAULT_LEAF_LIFETIME, InternalCA, InternalCAError
from proxy.certs.pemfiles import CERT_MODE, KEY_MODE, locked, make_private_dir, write_atomic
from proxy.certs.store import CertEntry, CertStore, make_entry, normalize, safe_name
from proxy.config import ACMEConfig, Site, TLSConfig

log = logging.getLogger("tlsproxy.certs")

POLL_INTERVAL = 2.0  # seconds between checks of cert/key files (the contract says <= 10 s)
MIN_SLEEP = 0.05  # never spin, whatever the due times say


class CertificateError(Exception):
    """A site's certificate cannot be loaded or issued; the message names site and reason."""

    def __init__(self, site: str, reason: str) -> None:
        super().__init__(f"site {site}: {reason}")
        self.site = site
        self.reason = reason


def renewal_due(entry: CertEntry) -> datetime:
    """When to renew an installed certificate: :mod:`acme_client.schedule`'s rule."""
    return schedule.renewal_due(entry.not_before, entry.not_after)


# -- files -------------------------------------------------------------------------------


Stamp = tuple[int, int, int, int, int, int]


class FileCertificate:
    """A site's ``cert``/``key`` pair, re-installed whenever either file changes."""

    def __init__(self, store: CertStore, site: Site) -> None:
        if site.cert is None or site.key is None:
            raise CertificateError(site.name, "needs both cert and key")
        self.store = store
        self.site = site
        self.cert_path = Path(site.cert)
        self.key_path = Path(site.key)
        self._loaded: Stamp | None = None  # files as last installed
        self._failed: Stamp | None = None  # files as last rejected (log each bad state once)

    @property
    def identity(self) -> tuple[object, ...]:
        return (self.site.hosts, self.site.cert, self.site.key)

    def _stamp(self) -> Stamp:
        c, k = os.stat(self.cert_path), os.stat(self.key_path)
        return (c.st_mtime_ns, c.st_size, c.st_ino, k.st_mtime_ns, k.st_size, k.st_ino)

    def prepare(self) -> CertEntry:
        """Read and check both files; the entry to install. Raises :class:`CertificateError`."""
        try:
            stamp = self._stamp()  # before reading: a change during the read shows next time
            chain_pem = self.cert_path.read_bytes()
            key_pem = self.key_path.read_bytes()
        except OSError as exc:
            path = exc.filename or self.cert_path
            raise CertificateError(self.site.name, f"cannot read {path}: {exc.strerror}") from exc
        problem = _pair_problem(chain_pem, key_pem, self.cert_path, self.key_path)
        if problem is None:
            try:
                entry = make_entry(
                    self.site.hosts, chain_pem, key_pem, issuer="file", source=str(self.cert_path)
                )
            except (ssl.SSLError, ValueError) as exc:
                problem = f"cannot use {self.cert_path} with {self.key_path}: {exc}"
        if problem is not None:
            raise CertificateError(self.site.name, problem)
        self._loaded, self._failed = stamp, None
        return entry

    def poll(self) -> bool:
        """Re-install if the files changed since the last install; True if it did.

        A half-written or mismatched pair is logged once and retried on every later poll;
        meanwhile the previous certificate keeps serving.
        """
        try:
            stamp = self._stamp()
        except OSError:
            stamp = None
        if stamp is not None and stamp == self._loaded:
            return False
        try:
            entry = self.prepare()
        except CertificateError as exc:
            if stamp is None or stamp != self._failed:
                log.warning("%s; keeping the previous certificate", exc)
            self._failed = stamp
            return False
        self.store.install_entry(entry)
        log.info("site %s: reloaded certificate from %s", self.site.name, self.cert_path)
        return True


def _pair_problem(chain_pem: bytes, key_pem: bytes, cert_path: Path, key_path: Path) -> str | None:
    """Why the pair is unusable, in words that name the file, or None."""
    try:
        leaf = x509.load_pem_x509_certificate(chain_pem)
    except ValueError:
        return f"no PEM certificate in {cert_path}"
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        return f"no unencrypted PEM private key in {key_path}"
    if key.public_key() != leaf.public_key():
        return f"{key_path} is not the key of the certificate in {cert_path}"
    return None


# -- internal CA -------------------------------------------------------------------------


class InternalCertificate:
    """A site's leaf from the internal CA, stored so that restarts reuse it.

    Stored under ``<storage>/certificates/internal/<first host>/{cert.pem,key.pem}``.
    """

    def __init__(
        self,
        store: CertStore,
        site: Site,
        ca: InternalCA,
        storage: Path,
        lifetime: timedelta = DEFAULT_LEAF_LIFETIME,
    ) -> None:
        self.store = store
        self.site = site
        self.ca = ca
        self.lifetime = lifetime
        self.directory = storage / "certificates" / "internal" / safe_name(site.name)
        self.entry: CertEntry | None = None
        self.retry_at: datetime | None = None  # set after a failed re-issue
        self.failures = 0  # re-issues in a row that failed (the backoff's exponent)

    @property
    def identity(self) -> tuple[object, ...]:
        return (self.site.hosts, self.directory, self.ca.root_pem)

    @property
    def due(self) -> datetime:
        """The next time to act: renewal (or retry) time; "now" if nothing is loaded yet."""
        if self.retry_at is not None:
            return self.retry_at
        return renewal_due(self.entry) if self.entry is not None else datetime.now(UTC)

    def prepare(self, now: datetime | None = None) -> CertEntry:
        """The stored leaf if at ``now`` it is still fresh and for the same names, else a new one.

        Checked under the storage lock, so when several workers find the leaf due, the first
        re-issues and the others adopt its leaf instead of issuing their own.
        """
        now = datetime.now(UTC) if now is None else now
        try:
            make_private_dir(self.directory)
            with locked(self.directory / ".lock"):
                entry = self._stored(now)
                if entry is None:
                    chain_pem, key_pem = self.ca.issue(self.site.hosts, self.lifetime)
                    write_atomic(self.directory / "key.pem", key_pem, KEY_MODE)
                    write_atomic(self.directory / "cert.pem", chain_pem, CERT_MODE)
                    entry = self._entry(chain_pem, key_pem)
                    log.info(
                        "site %s: issued internal certificate %s", self.site.name, entry.serial
                    )
        except (OSError, ValueError, ssl.SSLError) as exc:
            raise CertificateError(self.site.name, f"internal certificate: {exc}") from exc
        self.entry = entry
        return entry

    def _entry(self, chain_pem: bytes, key_pem: bytes) -> CertEntry:
        hosts = self.site.hosts
        return make_entry(hosts, chain_pem, key_pem, issuer="internal", source="internal CA")

    def _stored(self, now: datetime) -> CertEntry | None:
        try:
            chain_pem = (self.directory / "cert.pem").read_bytes()
            key_pem = (self.directory / "key.pem").read_bytes()
            leaf = x509.load_pem_x509_certificate(chain_pem)
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            entry = self._entry(chain_pem, key_pem)
        except (OSError, ValueError, ssl.SSLError, x509.ExtensionNotFound):
            return None
        names = {normalize(n) for n in san.get_values_for_type(x509.DNSName)}
        names |= {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
        fresh = now < renewal_due(entry)
        same = names == {normalize(h) for h in self.site.hosts}
        return entry if fresh and same and self.ca.issued(leaf) else None

    def renew(self, now: datetime | None = None) -> bool:
        """Re-issue (or adopt another worker's fresh leaf) and install.

        On failure: log, keep serving the old leaf, retry with backoff.
        """
        try:
            entry = self.prepare(now)
        except CertificateError as exc:
            self.failures += 1
            delay = schedule.retry_delay(self.failures, self.lifetime)
            self.retry_at = datetime.now(UTC) + delay
            log.error("%s; retrying in %s", exc, delay)
            return False
        self.retry_at, self.failures = None, 0
        self.store.install_entry(entry)
        return True


# -- the `certs` table ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CertificateStatus:
    """One row of ``tlsproxy certs``, read from files and storage (no proxy running)."""

    names: tuple[str, ...]
    issuer: str
    not_after: str
    next_renewal: str
    last_error: str | None


def describe_certificates(
    sites: Sequence[Site], tls: TLSConfig, acme: ACMEConfig | None = None
) -> list[CertificateStatus]:
    """What each site would serve now, then each name that got a certificate on demand
    (one row per :func:`certificate_sites` entry); never creates or issues anything."""
    return [_describe(site, tls, acme or ACMEConfig()) for site in certificate_sites(sites, tls)]


def certificate_sites(sites: Sequence[Site], tls: TLSConfig) -> list[Site]:
    """The sites, then one per on-demand name in storage (its certificate is its own)."""
    if tls.issuer != "acme" or not any(site.on_demand for site in sites):
        return list(sites)
    try:
        names = OnDemandIndex(open_storage(tls.location)).names()
    except Exception as exc:  # Redis unreachable: the configured sites still get their rows
        log.warning("on-demand names unreadable: %s", exc)
        names = []
    return [*sites, *(Site((name,), ()) for name in names)]


def _describe(site: Site, tls: TLSConfig, acme: ACMEConfig) -> CertificateStatus:
    if site.cert is not None or site.key is not None:
        leaf = _read_leaf(Path(site.cert)) if site.cert is not None else None
        not_after = _iso(leaf.not_valid_after_utc) if leaf is not None else "-"
        return CertificateStatus(
            site.hosts, "file", not_after, "when the files change", _file_error(site)
        )
    storage = tls.location.directory
    if tls.issuer == "internal" and storage is not None:
        directory = storage / "certificates" / "internal" / safe_name(site.name)
        leaf = _read_leaf(directory / "cert.pem")
        if leaf is None:
            return CertificateStatus(site.hosts, "internal", "-", "at start", None)
        start, end = leaf.not_valid_before_utc, leaf.not_valid_after_utc
        return CertificateStatus(
            site.hosts, "internal", _iso(end), _iso(end - (end - start) / 3), None
        )
    if acme_sites.uses_acme(site, tls):
        try:
            status = acme_sites.describe(site, tls, acme)
        except Exception as exc:  # e.g. Redis storage unreachable: say so in the row
            return CertificateStatus(site.hosts, "acme", "-", "-", f"storage: {exc}")
        return CertificateStatus(
            site.hosts, status.issuer, status.not_after, status.next_renewal, status.last_error
        )
    return CertificateStatus(site.hosts, tls.issuer, "-", "-", None)


def _read_leaf(path: Path) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None


def _file_error(site: Site) -> str | None:
    try:
        FileCertificate(CertStore(), site).prepare()
    except CertificateError as exc:
        return exc.reason
    return None


def _iso(when: datetime) -> str:
    return when.isoformat(timespec="seconds")


# -- the manager -------------------------------------------------------------------------


class CertificateManager:
    """Loads and maintains every certificate of a configuration: files, internal, ACME."""

    def __init__(
        self,
        store: CertStore,
        sites: Sequence[Site],
        tls: TLSConfig,
        *,
        acme: ACMEConfig | None = None,
        challenges: ChallengeStore | None = None,
        poll_interval: float = POLL_INTERVAL,
        lifetime: timedelta = DEFAULT_LEAF_LIFETIME,
        http_listen: bool = True,
    ) -> None:
        self.store = store
        self.poll_interval = poll_interval
        self.lifetime = lifetime
        self.http_listen = http_listen  # something answers HTTP-01 (server.http_listen)
        self._sites = tuple(sites)
        self._tls = tls
        self._acme_config = acme or ACMEConfig()
        challenges = challenges if challenges is not None else MemoryChallengeStore()
        self.acme = acme_sites.ACMESites(store, challenges, self._load_ca)
        self._files: list[FileCertificate] = []
        self._internal: list[InternalCertificate] = []
        self._ca: InternalCA | None = None
        self._lock = threading.Lock()  # reload (in a thread) vs. a maintenance tick

    @property
    def ca(self) -> InternalCA | None:
        """The internal CA, once a site has needed it."""
        return self._ca

    def load_all(self) -> None:
        """Load or issue every certificate (blocking: call it in a thread from async code)."""
        self.reload(self._sites, self._tls)

    def reload(
        self,
        sites: Sequence[Site],
        tls: TLSConfig | None = None,
        acme: ACMEConfig | None = None,
        http_listen: bool | None = None,
    ) -> None:
        """Switch to a new site list (SIGHUP): all sources are prepared before any is installed.

        Unchanged sources are kept as they are; names no longer configured stop being served.
        Raises :class:`CertificateError`, leaving the store as it was.
        """
        tls = self._tls if tls is None else tls
        acme = self._acme_config if acme is None else acme
        http_listen = self.http_listen if http_listen is None else http_listen
        with self._lock:
            files, internal = self._sources(sites, tls)
            entries = [s.prepare() for s in files if s.identity not in self._file_ids()]
            entries += [s.prepare() for s in internal if s.entry is None]
            plan = self.acme.prepare(sites, tls, acme, http_listen)
            for entry in [*entries, *plan.entries]:
                self.store.install_entry(entry)
            kept = [*plan.keep, *(self.acme.demanded if plan.on_demand else ())]
            self.store.retain([*(h for site in sites for h in site.hosts), *kept])
            self.acme.commit(plan)
            self._sites, self._tls, self._files, self._internal = tuple(sites), tls, files, internal
            self._acme_config, self.http_listen = acme, http_listen

    def _file_ids(self) -> set[tuple[object, ...]]:
        return {s.identity for s in self._files}

    def _sources(
        self, sites: Sequence[Site], tls: TLSConfig
    ) -> tuple[list[FileCertificate], list[InternalCertificate]]:
        old_files = {s.identity: s for s in self._files}
        old_internal = {s.identity: s for s in self._internal}
        files: list[FileCertificate] = []
        internal: list[InternalCertificate] = []
        for site in sites:
            if site.cert is not None or site.key is not None:
                source = FileCertificate(self.store, site)
                files.append(old_files.get(source.identity, source))
            elif tls.issuer == "internal":
                storage = self._storage(site, tls)
                ca = self._load_ca(site, storage)
                leaf = InternalCertificate(self.store, site, ca, storage, self.lifetime)
                internal.append(old_internal.get(leaf.identity, leaf))
        return files, internal

    def _storage(self, site: Site, tls: TLSConfig) -> Path:
        directory = tls.location.directory
        if directory is None:
            reason = f"the internal issuer needs a directory as tls.storage, not {tls.storage!r}"
            raise CertificateError(site.name, reason)
        return directory

    def _load_ca(self, site: Site, storage: Path) -> InternalCA:
        if self._ca is None or self._ca.directory != storage / "ca":
            try:
                self._ca = InternalCA.load_or_create(storage / "ca")
            except (OSError, InternalCAError) as exc:
                raise CertificateError(site.name, f"internal CA: {exc}") from exc
        return self._ca

    def tick(self, now: datetime | None = None) -> None:
        """One maintenance pass: re-read changed files, re-issue due internal leaves and
        temporary certificates."""
        now = datetime.now(UTC) if now is None else now
        with self._lock:
            for source in self._files:
                try:
                    source.poll()
                except Exception:  # the loop must survive anything one source does
                    log.exception("site %s: certificate files check failed", source.site.name)
            for leaf in self._internal:
                if leaf.due <= now:
                    try:
                        leaf.renew(now)
                    except Exception:
                        log.exception("site %s: internal re-issue failed", leaf.site.name)
            self.acme.keep_temporaries(now)

    async def run(self) -> None:
        """Maintain certificates until cancelled: files, internal leaves and temporary
        certificates in one loop here, ACME certificates in their renewer's."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._run_local())
            group.create_task(self.acme.run())

    async def _run_local(self) -> None:
        """Files every ``poll_interval`` seconds; internal leaves and temporaries when due."""
        while True:
            now = datetime.now(UTC)
            due = any(leaf.due <= now for leaf in self._internal) or self.acme.temporary_due(now)
            if self._files or due:
                await asyncio.to_thread(self.tick, now)
            await asyncio.sleep(self._sleep_time())

    def _sleep_time(self) -> float:
        """Until the next internal due time, at most ``poll_interval`` (survives clock jumps)."""
        sleep = self.poll_interval
        now = datetime.now(UTC)
        for leaf in self._internal:
            sleep = min(sleep, (leaf.due - now).total_seconds())
        return max(sleep, MIN_SLEEP)
